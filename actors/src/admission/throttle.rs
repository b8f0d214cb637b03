//! Throttles for what is asked before anyone is authenticated (sign-in per
//! account and per client address, registration per address): GCRA per key,
//! in Redis when configured (shared by every server process), else in this
//! process; when Redis fails, this process's state decides.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::ratelimit::{self, Decision, Quota};
use crate::ports::RateLimitStore;

const SHARDS: usize = 16;
/// A shard holding more keys than this drops those whose limit is full again.
const SHARD_KEYS: usize = 50_000;

pub struct Throttle {
    limiter: Option<Arc<dyn RateLimitStore>>,
    shards: Vec<Mutex<HashMap<String, f64>>>,
    born: Instant,
}

impl Throttle {
    pub fn new(limiter: Option<Arc<dyn RateLimitStore>>) -> Self {
        Throttle {
            limiter,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            born: Instant::now(),
        }
    }

    /// One attempt under `key`: allowed, or refused with when to retry.
    pub async fn check(&self, key: &str, quota: Quota) -> Decision {
        if let Some(limiter) = &self.limiter {
            if let Ok(d) = limiter.check(key, quota, 1).await {
                return d;
            }
        }
        self.local(key, quota)
    }

    fn local(&self, key: &str, quota: Quota) -> Decision {
        let now = self.born.elapsed().as_secs_f64() * 1000.0;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let mut shard = match self.shards[(h.finish() as usize) % SHARDS].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if shard.len() > SHARD_KEYS {
            // Keys whose theoretical arrival time has passed are as good as absent.
            shard.retain(|_, tat| *tat > now);
        }
        let d = ratelimit::check(quota, shard.get(key).copied(), now, 1);
        if d.allowed {
            shard.insert(key.to_string(), d.tat_ms);
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_key_is_limited_on_its_own() {
        let t = Throttle::new(None);
        let q = Quota {
            limit: 3,
            period_ms: 60_000,
        };
        for _ in 0..3 {
            assert!(t.check("login:acct:a@example.com", q).await.allowed);
        }
        let refused = t.check("login:acct:a@example.com", q).await;
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ms, 20_000, "one attempt back every period/limit");
        assert!(
            t.check("login:acct:b@example.com", q).await.allowed,
            "another key is unaffected"
        );
    }
}
