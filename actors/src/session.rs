//! UserSession: one actor per active user. It owns the user's rate-limit state
//! (in memory, mirrored from Redis when Redis is configured) and its quota view, and
//! its mailbox serializes the user's accounting: `Admit` is handled atomically (no
//! other message of this user is processed until it has answered), so two requests
//! of one user never race past a limit in this process. Across processes the
//! quota is enforced by the store's atomic conditional increment and the rate
//! limit by Redis.
//!
//! Senders: the HTTP layer (through `SessionRegistry`) sends `Admit`, then
//! `Complete` or `Release` with the permit; the registry sends `Reload` after plan
//! changes. The session sends one `Record` per completed permit to the ledger.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{Plan, UsageRecord};
use crate::knowledge::Owner;
use crate::ledger::Ledger;
use crate::plans::{month_of, Period, PlanCatalog, PlanLimits, Resource};
use crate::ports::{AccountStore, DocumentStore, RateLimitStore, Reservation, StoreError, UsageStore};
use crate::ratelimit::{self, Quota};

/// Rate-limit buckets: each route says which one it draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bucket {
    Chat,
    Search,
    Api,
}

impl Bucket {
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Chat => "chat",
            Bucket::Search => "search",
            Bucket::Api => "api",
        }
    }
}

/// What to do when the quota store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum StoreDownPolicy {
    /// Refuse with 503: nobody gets service the ledger cannot account for.
    FailClosed,
    /// Admit up to `allowance` units per resource per session while the store is
    /// down; the counters are reconciled when it is back.
    FailOpen { allowance: u64 },
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub rate_limits: BTreeMap<Bucket, Quota>,
    pub idle_timeout: Duration,
    pub store_down: StoreDownPolicy,
}

/// The current plan catalog: the base from config/plans.toml with the
/// `subscription_limits` override applied; swapped whole when it changes.
pub struct PlanBook {
    base: PlanCatalog,
    current: std::sync::RwLock<Arc<PlanCatalog>>,
}

pub const SUBSCRIPTION_LIMITS_KEY: &str = "subscription_limits";

impl PlanBook {
    pub fn new(base: PlanCatalog) -> Self {
        PlanBook {
            current: std::sync::RwLock::new(Arc::new(base.clone())),
            base,
        }
    }

    pub fn current(&self) -> Arc<PlanCatalog> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn base(&self) -> &PlanCatalog {
        &self.base
    }

    /// Re-reads the override row; an invalid override is refused (logged) and the
    /// last good catalog stays.
    pub async fn reload(&self, accounts: &dyn AccountStore) -> Result<(), String> {
        let catalog = match accounts
            .get_setting(SUBSCRIPTION_LIMITS_KEY)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(v) => self.base.with_overrides(&v)?,
            None => self.base.clone(),
        };
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(catalog),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(catalog),
        }
        Ok(())
    }
}

/// Everything a session needs; shared by all sessions.
#[derive(Clone)]
pub struct SessionDeps {
    pub accounts: Arc<dyn AccountStore>,
    pub usage: Arc<dyn UsageStore>,
    pub limiter: Option<Arc<dyn RateLimitStore>>,
    pub ledger: Ledger,
    pub plans: Arc<PlanBook>,
    pub config: Arc<SessionConfig>,
}

/// Rate-limit figures for the RateLimit-* headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateInfo {
    pub limit: u32,
    pub remaining: u32,
    pub reset_secs: u64,
}

/// Proof that one unit of work was admitted. Hand it back with `Complete` (the
/// work happened: recorded once) or `Release` (it did not: the quota is returned).
#[derive(Debug, Clone, PartialEq)]
pub struct Permit {
    pub id: Uuid,
    pub user_id: Uuid,
    pub resource: Resource,
    pub cost: u64,
    pub period: Period,
    pub plan: Plan,
    /// Counter value after this reservation.
    pub used: u64,
    pub limit: u64,
    pub rate: Option<RateInfo>,
    /// Admitted on the local allowance while the store was down.
    pub offline: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    RateLimited {
        bucket: Bucket,
        limit: u32,
        period_secs: u64,
        retry_after_ms: u64,
        reset_ms: u64,
    },
    QuotaExceeded {
        resource: Resource,
        used: u64,
        limit: u64,
        plan: Plan,
    },
    /// New documents would take the user past the plan's storage.
    StorageExceeded {
        used_bytes: u64,
        requested_bytes: u64,
        limit_bytes: u64,
    },
    /// The user no longer exists or is deactivated.
    UnknownUser,
    /// The quota store is down and the policy is to fail closed, or the local
    /// allowance is spent.
    Unavailable(String),
}

#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Permit, Rejection>")]
pub struct Admit {
    pub bucket: Option<Bucket>,
    pub resource: Resource,
    pub cost: u64,
}

/// The admitted work happened: record its usage once.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Complete {
    pub permit: Permit,
    pub metadata: serde_json::Value,
}

/// The admitted work did not happen: give the quota back.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Release {
    pub permit: Permit,
}

/// The user's plan or the catalog changed: forget cached limits.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Reload;

/// Reserves room for `bytes` of new private documents under the plan's
/// `storage_mb`. Handled atomically, so a user's uploads are checked one at a
/// time, and bytes reserved by uploads still being stored count as used. Hand
/// the grant back with `ReleaseStorage` once the documents are stored (or not).
#[derive(Message)]
#[rtype(result = "Result<StorageGrant, Rejection>")]
pub struct ReserveStorage {
    pub store: Arc<dyn DocumentStore>,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StorageGrant {
    pub id: Uuid,
    pub bytes: u64,
}

/// A grant nobody handed back (its request vanished) stops counting after this.
const STORAGE_HOLD: Duration = Duration::from_secs(30 * 60);

#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReleaseStorage(pub StorageGrant);

/// Makes the session panic (fault tests of the supervision).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Crash;

/// Called when a session stops, so the registry can forget it.
pub trait SessionExit: Send + Sync + 'static {
    /// `crashed`: the session is being torn down by a panic, not stopping cleanly.
    fn session_stopped(&self, user_id: Uuid, addr: &Addr<UserSession>, crashed: bool);
}

pub struct UserSession {
    user_id: Uuid,
    deps: SessionDeps,
    exit: Arc<dyn SessionExit>,
    plan: Option<(Plan, PlanLimits)>,
    /// GCRA state per bucket: the fallback when Redis is down, and the only state
    /// when Redis is not configured.
    local_tat: HashMap<Bucket, f64>,
    /// Quotas known to be spent in a period (cleared on Reload).
    exhausted: HashMap<(Resource, DateTime<Utc>), u64>,
    /// Units admitted on the local allowance, to add to the counters later.
    unreconciled: Vec<(Resource, DateTime<Utc>, u64)>,
    offline_used: HashMap<Resource, u64>,
    in_flight: usize,
    /// Grants to uploads still being stored: id, bytes, when.
    storage: Vec<(Uuid, u64, Instant)>,
    last_active: Instant,
    born: Instant,
}

impl UserSession {
    pub fn new(user_id: Uuid, deps: SessionDeps, exit: Arc<dyn SessionExit>) -> Self {
        UserSession {
            user_id,
            deps,
            exit,
            plan: None,
            local_tat: HashMap::new(),
            exhausted: HashMap::new(),
            unreconciled: Vec::new(),
            offline_used: HashMap::new(),
            in_flight: 0,
            storage: Vec::new(),
            last_active: Instant::now(),
            born: Instant::now(),
        }
    }

    fn now_ms(&self) -> f64 {
        // Monotonic milliseconds since this session was born: GCRA only needs
        // differences, and a wall-clock jump must not grant a burst.
        self.born.elapsed().as_secs_f64() * 1000.0
    }

    fn local_check(&mut self, bucket: Bucket, quota: Quota, enforce: bool) -> ratelimit::Decision {
        let now = self.now_ms();
        let d = ratelimit::check(quota, self.local_tat.get(&bucket).copied(), now, 1);
        if d.allowed || !enforce {
            // Mirror Redis decisions too, so a fallback starts from warm state.
            let tat = if d.allowed {
                d.tat_ms
            } else {
                self.local_tat.get(&bucket).copied().unwrap_or(now)
            };
            self.local_tat.insert(bucket, tat);
        }
        d
    }
}

pub static SESSION_MAILBOX: crate::supervision::Mailbox = crate::supervision::Mailbox::new("user-session");
crate::tracked_mailbox!(UserSession, SESSION_MAILBOX; Admit, Complete, Release, ReserveStorage, ReleaseStorage, Reload, Crash);

impl Actor for UserSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
        let every = (self.deps.config.idle_timeout / 4).max(Duration::from_millis(50));
        ctx.run_interval(every, |act, ctx| {
            act.storage.retain(|g| g.2.elapsed() < STORAGE_HOLD);
            if act.in_flight == 0 && act.storage.is_empty() && act.last_active.elapsed() >= act.deps.config.idle_timeout
            {
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.exit
            .session_stopped(self.user_id, &ctx.address(), std::thread::panicking());
    }
}

struct AdmitOutcome {
    plan: Option<(Plan, PlanLimits)>,
    rate: Option<(Bucket, Quota, Result<ratelimit::Decision, ()>)>,
    result: Result<Permit, Rejection>,
    /// Offline units that could not be reconciled yet; put back into the actor.
    requeue: Vec<(Resource, DateTime<Utc>, u64)>,
}

impl Handler<Admit> for UserSession {
    type Result = AtomicResponse<Self, Result<Permit, Rejection>>;

    fn handle(&mut self, msg: Admit, _ctx: &mut Self::Context) -> Self::Result {
        self.last_active = Instant::now();
        let deps = self.deps.clone();
        let user_id = self.user_id;
        let cached_plan = self.plan.clone();
        let now = Utc::now();
        let period = month_of(now);
        let exhausted = self.exhausted.get(&(msg.resource, period.start)).copied();
        let bucket_quota = msg
            .bucket
            .and_then(|b| deps.config.rate_limits.get(&b).map(|q| (b, *q)));
        // Without Redis the local GCRA decides right here, inside the atomic handler.
        let local_first = match (bucket_quota, &deps.limiter) {
            (Some((b, q)), None) => Some(self.local_check(b, q, true)),
            _ => None,
        };
        let offline_used = self.offline_used.get(&msg.resource).copied().unwrap_or(0);
        let unreconciled = std::mem::take(&mut self.unreconciled);

        let fut = async move {
            let mut out = AdmitOutcome {
                plan: cached_plan.clone(),
                rate: None,
                result: Err(Rejection::UnknownUser),
                requeue: Vec::new(),
            };
            // 1. The plan (loaded once per session life, and after Reload).
            let (plan, limits) = match plan_of(&deps, user_id, cached_plan).await {
                Ok(p) => p,
                Err(r) => {
                    out.result = Err(r);
                    return out;
                }
            };
            out.plan = Some((plan, limits.clone()));
            // 2. The rate limit: Redis when configured (falling back to local state).
            let mut rate_info = None;
            if let Some((bucket, quota)) = bucket_quota {
                let decision = match (local_first, &deps.limiter) {
                    (Some(d), _) => Ok(d),
                    (None, Some(limiter)) => {
                        let key = format!("rl:{user_id}:{}", bucket.as_str());
                        limiter.check(&key, quota, 1).await.map_err(|_| ())
                    }
                    (None, None) => Err(()),
                };
                out.rate = Some((bucket, quota, decision));
                // The local fallback is applied in `map` below (it needs the actor);
                // here only a definite refusal stops us.
                if let Ok(d) = decision {
                    if !d.allowed {
                        out.result = Err(Rejection::RateLimited {
                            bucket,
                            limit: quota.limit,
                            period_secs: quota.period_ms / 1000,
                            retry_after_ms: d.retry_after_ms,
                            reset_ms: d.reset_ms,
                        });
                        return out;
                    }
                    rate_info = Some(RateInfo {
                        limit: quota.limit,
                        remaining: d.remaining,
                        reset_secs: d.reset_ms.div_ceil(1000),
                    });
                }
                // Err: Redis unavailable; decided against local state after the await.
            }
            // 3. The quota.
            let limit = limits.limit(msg.resource);
            let mut permit = Permit {
                id: Uuid::new_v4(),
                user_id,
                resource: msg.resource,
                cost: msg.cost,
                period,
                plan,
                used: 0,
                limit,
                rate: rate_info,
                offline: false,
            };
            if let Some(used) = exhausted {
                out.result = Err(Rejection::QuotaExceeded {
                    resource: msg.resource,
                    used,
                    limit,
                    plan,
                });
                return out;
            }
            // Units admitted offline are added to the counters first, once the store answers.
            let mut pending = unreconciled.into_iter();
            while let Some((r, start, n)) = pending.next() {
                if deps.usage.force_add(user_id, r, start, n).await.is_err() {
                    out.requeue.push((r, start, n));
                    out.requeue.extend(pending);
                    out.result = store_down(deps.config.store_down, permit, offline_used, "quota store unreachable");
                    return out;
                }
            }
            out.result = match deps
                .usage
                .try_reserve(user_id, msg.resource, period.start, msg.cost, limit)
                .await
            {
                Ok(Reservation::Granted { used }) => {
                    permit.used = used;
                    Ok(permit)
                }
                Ok(Reservation::Denied { used }) => Err(Rejection::QuotaExceeded {
                    resource: msg.resource,
                    used,
                    limit,
                    plan,
                }),
                Err(StoreError::Unavailable(e)) | Err(StoreError::Internal(e)) => {
                    store_down(deps.config.store_down, permit, offline_used, &e)
                }
                Err(e) => Err(Rejection::Unavailable(e.to_string())),
            };
            // When Redis was unreachable the map step below applies the local rate
            // decision, and releases this reservation if that refuses.
            out
        };

        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |mut out, act, _ctx| {
            act.plan = out.plan.take();
            act.unreconciled.append(&mut out.requeue);
            let mut result = out.result;
            if let Some((bucket, quota, decision)) = out.rate {
                match decision {
                    Ok(d) if d.allowed => {
                        // Mirror a Redis grant into local state for a warm fallback.
                        if act.deps.limiter.is_some() {
                            act.local_check(bucket, quota, false);
                        }
                    }
                    Ok(_) => {}
                    Err(()) => {
                        let d = act.local_check(bucket, quota, true);
                        if !d.allowed {
                            if let Ok(p) = &result {
                                release_later(&act.deps, p.clone());
                            }
                            result = Err(Rejection::RateLimited {
                                bucket,
                                limit: quota.limit,
                                period_secs: quota.period_ms / 1000,
                                retry_after_ms: d.retry_after_ms,
                                reset_ms: d.reset_ms,
                            });
                        } else if let Ok(p) = &mut result {
                            p.rate = Some(RateInfo {
                                limit: quota.limit,
                                remaining: d.remaining,
                                reset_secs: d.reset_ms.div_ceil(1000),
                            });
                        }
                    }
                }
            }
            match &result {
                Ok(p) => {
                    act.in_flight += 1;
                    if p.offline {
                        *act.offline_used.entry(p.resource).or_insert(0) += p.cost;
                    }
                }
                Err(Rejection::QuotaExceeded { resource, used, .. }) => {
                    act.exhausted.insert((*resource, month_of(Utc::now()).start), *used);
                }
                Err(_) => {}
            }
            act.last_active = Instant::now();
            result
        })))
    }
}

/// The quota store did not answer: apply the configured policy.
fn store_down(policy: StoreDownPolicy, mut permit: Permit, offline_used: u64, why: &str) -> Result<Permit, Rejection> {
    match policy {
        StoreDownPolicy::FailOpen { allowance } if offline_used + permit.cost <= allowance => {
            permit.offline = true;
            Ok(permit)
        }
        _ => Err(Rejection::Unavailable(format!("quota store unreachable: {why}"))),
    }
}

fn release_later(deps: &SessionDeps, permit: Permit) {
    if permit.offline {
        return;
    }
    let usage = deps.usage.clone();
    actix::spawn(async move {
        if let Err(e) = usage
            .release(permit.user_id, permit.resource, permit.period.start, permit.cost)
            .await
        {
            tracing::warn!(user = %permit.user_id, error = %e, "could not release a quota reservation");
        }
    });
}

impl Handler<Complete> for UserSession {
    type Result = ();

    fn handle(&mut self, msg: Complete, _ctx: &mut Self::Context) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.last_active = Instant::now();
        let p = msg.permit;
        if p.offline {
            self.unreconciled.push((p.resource, p.period.start, p.cost));
        }
        self.deps.ledger.record(UsageRecord {
            id: p.id,
            user_id: p.user_id,
            resource: p.resource,
            quantity: p.cost,
            period: p.period,
            metadata: msg.metadata,
            created_at: Utc::now(),
        });
    }
}

impl Handler<Release> for UserSession {
    type Result = ();

    fn handle(&mut self, msg: Release, _ctx: &mut Self::Context) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let p = msg.permit;
        if p.offline {
            if let Some(n) = self.offline_used.get_mut(&p.resource) {
                *n = n.saturating_sub(p.cost);
            }
        }
        self.exhausted.remove(&(p.resource, p.period.start));
        release_later(&self.deps, p);
    }
}

/// The user's plan and limits: the cached ones, else from the account store.
async fn plan_of(
    deps: &SessionDeps,
    user_id: Uuid,
    cached: Option<(Plan, PlanLimits)>,
) -> Result<(Plan, PlanLimits), Rejection> {
    if let Some(p) = cached {
        return Ok(p);
    }
    match deps.accounts.user_by_id(user_id).await {
        Ok(Some(u)) if u.is_active => Ok((
            u.subscription_plan,
            deps.plans.current().get(u.subscription_plan).clone(),
        )),
        Ok(_) => Err(Rejection::UnknownUser),
        Err(e) => Err(Rejection::Unavailable(format!("account store: {e}"))),
    }
}

impl Handler<ReserveStorage> for UserSession {
    type Result = AtomicResponse<Self, Result<StorageGrant, Rejection>>;

    fn handle(&mut self, msg: ReserveStorage, _ctx: &mut Self::Context) -> Self::Result {
        self.last_active = Instant::now();
        let deps = self.deps.clone();
        let user_id = self.user_id;
        let cached = self.plan.clone();
        self.storage.retain(|g| g.2.elapsed() < STORAGE_HOLD);
        let reserved: u64 = self.storage.iter().map(|g| g.1).sum();
        let fut = async move {
            let plan = plan_of(&deps, user_id, cached).await?;
            let limit_bytes = plan.1.limit(Resource::StorageMb).saturating_mul(1 << 20);
            let used = msg
                .store
                .stored_bytes(&Owner::User(user_id))
                .await
                .map_err(|e| Rejection::Unavailable(format!("document store: {e}")))?;
            let used_bytes = used.saturating_add(reserved);
            if used_bytes.saturating_add(msg.bytes) > limit_bytes {
                return Err(Rejection::StorageExceeded {
                    used_bytes,
                    requested_bytes: msg.bytes,
                    limit_bytes,
                });
            }
            Ok((
                plan,
                StorageGrant {
                    id: Uuid::new_v4(),
                    bytes: msg.bytes,
                },
            ))
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(|out, act, _ctx| {
            let (plan, grant) = out?;
            act.plan = Some(plan);
            act.storage.push((grant.id, grant.bytes, Instant::now()));
            Ok(grant)
        })))
    }
}

impl Handler<ReleaseStorage> for UserSession {
    type Result = ();

    fn handle(&mut self, msg: ReleaseStorage, _ctx: &mut Self::Context) {
        self.last_active = Instant::now();
        self.storage.retain(|g| g.0 != msg.0.id);
    }
}

impl Handler<Reload> for UserSession {
    type Result = ();

    fn handle(&mut self, _: Reload, _ctx: &mut Self::Context) {
        self.plan = None;
        self.exhausted.clear();
    }
}

impl Handler<Crash> for UserSession {
    type Result = ();

    fn handle(&mut self, _: Crash, _ctx: &mut Self::Context) {
        // Deliberate: the fault test checks the registry restarts the session.
        #[allow(clippy::panic)]
        {
            panic!("session {} crashed on request", self.user_id);
        }
    }
}
