//! Rate limits in Redis: one Lua script per check (GCRA, the same arithmetic as
//! ragchat_actors::admission::ratelimit), so several server processes share each user's limit.
//! Keys expire when their bucket is full again.
//!
//! A circuit breaker keeps a Redis outage cheap: a failed or slow call (over
//! `timeout`) opens it for `cooldown`, during which checks answer `Unavailable`
//! at once and sessions use their in-memory state; the first check after the
//! cooldown tries Redis again and closes the breaker if it answers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ragchat_actors::admission::ratelimit::{Decision, Quota};
use ragchat_actors::ports::{RateLimitStore, StoreError, StoreResult};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local emission = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission * cost
local allow_at = new_tat - period
if allow_at <= now + 0.000001 then
  redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
  local remaining = math.floor((period - (new_tat - now)) / emission + 0.000000001)
  if remaining < 0 then remaining = 0 end
  return {1, remaining, math.ceil(new_tat - now), 0}
end
return {0, 0, math.ceil(tat - now), math.ceil(allow_at - now)}
"#;

pub struct RedisRateLimits {
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    script: redis::Script,
    timeout: Duration,
    cooldown: Duration,
    epoch: Instant,
    open_until_ms: AtomicU64,
    fallback_active: Arc<AtomicBool>,
}

impl RedisRateLimits {
    pub fn new(url: &str, timeout: Duration, cooldown: Duration) -> Result<Self, redis::RedisError> {
        Ok(RedisRateLimits {
            client: redis::Client::open(url)?,
            conn: Mutex::new(None),
            script: redis::Script::new(GCRA),
            timeout,
            cooldown,
            epoch: Instant::now(),
            open_until_ms: AtomicU64::new(0),
            fallback_active: Arc::new(AtomicBool::new(false)),
        })
    }

    /// True while the breaker is open (sessions use local state).
    pub fn fallback_active(&self) -> bool {
        self.fallback_active.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn trip(&self, why: &str) {
        let until = self.now_ms() + u64::try_from(self.cooldown.as_millis()).unwrap_or(u64::MAX / 2);
        self.open_until_ms.store(until, Ordering::Relaxed);
        if !self.fallback_active.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = why,
                cooldown_ms = self.cooldown.as_millis() as u64,
                "redis rate limiter down: using in-memory limits"
            );
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let c = self
            .client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| e.to_string())?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn run(&self, key: &str, quota: Quota, cost: u32) -> Result<Decision, String> {
        let mut conn = self.connection().await?;
        let reply: Vec<i64> = self
            .script
            .key(key)
            .arg(quota.emission_ms())
            .arg(quota.period_ms)
            .arg(cost)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let get = |i: usize| reply.get(i).copied().unwrap_or(0);
        let nonneg = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(Decision {
            allowed: get(0) == 1,
            remaining: u32::try_from(get(1)).unwrap_or(0),
            reset_ms: nonneg(get(2)),
            retry_after_ms: nonneg(get(3)),
            tat_ms: 0.0,
        })
    }
}

#[async_trait]
impl RateLimitStore for RedisRateLimits {
    async fn check(&self, key: &str, quota: Quota, cost: u32) -> StoreResult<Decision> {
        if self.now_ms() < self.open_until_ms.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable("redis circuit open".into()));
        }
        match tokio::time::timeout(self.timeout, self.run(key, quota, cost)).await {
            Ok(Ok(d)) => {
                if self.fallback_active.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis rate limiter back");
                }
                Ok(d)
            }
            Ok(Err(e)) => {
                self.trip(&e);
                Err(StoreError::Unavailable(e))
            }
            Err(_) => {
                self.trip("timeout");
                Err(StoreError::Unavailable("redis timeout".into()))
            }
        }
    }
}
