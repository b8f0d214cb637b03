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
//!
//! The handlers are thin: the rules are pure functions beside this file
//! (`ratelimit` for GCRA, `quota` for leases, `storage` for reservations). When
//! the user's row is cached (`users`), Redis is not involved and the quota lease
//! holds units, `Admit` is decided without any await: no store round trip.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::quota::{Lease, QuotaStep};
use super::ratelimit::{self, Quota};
use super::storage::{self, Holds, StorageGrant};
use super::users::UserCache;
use crate::domain::UsageRecord;
use crate::knowledge::Owner;
use crate::ledger::Ledger;
use crate::plans::{month_of, Period, Plan, PlanBook, PlanLimits, Resource};
use crate::ports::{AccountStore, DocumentStore, RateLimitStore, Reservation, StoreError, UsageStore};

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
    /// The most quota units a session reserves at a time (1: every unit is
    /// reserved in the store as it is admitted).
    pub max_lease: u64,
    /// Units of a lease unused this long go back to the store.
    pub lease_idle: Duration,
    /// The most chat turns one user may have admitted and unfinished at once
    /// in this process (0: no cap), so that one user cannot fill the shared
    /// generation queue; beyond it `Busy`.
    pub max_concurrent_chats: usize,
}

/// Everything a session needs; shared by all sessions.
#[derive(Clone)]
pub struct SessionDeps {
    pub accounts: Arc<dyn AccountStore>,
    pub usage: Arc<dyn UsageStore>,
    pub limiter: Option<Arc<dyn RateLimitStore>>,
    pub ledger: Ledger,
    pub plans: Arc<PlanBook>,
    /// User rows, read at most once per `ttl` per user (shared with authentication).
    pub users: Arc<UserCache>,
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
    /// Units of the month admitted, this one included.
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
    /// The user already has `limit` unfinished requests of this bucket.
    Busy { bucket: Bucket, limit: usize },
    /// The user no longer exists or is deactivated.
    UnknownUser,
    /// The quota store is down and the policy is to fail closed, or the local
    /// allowance is spent.
    Unavailable(String),
    /// Usage cannot be recorded durably: the usage store is down and the
    /// ledger's spool is full (records wait in memory). No new work until the
    /// store has taken them.
    UsageUnrecordable,
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
/// `storage_mb` (see `storage`). Hand the grant back with `ReleaseStorage` once
/// the documents are stored (or not).
#[derive(Message)]
#[rtype(result = "Result<StorageGrant, Rejection>")]
pub struct ReserveStorage {
    pub store: Arc<dyn DocumentStore>,
    pub bytes: u64,
}

#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReleaseStorage(pub StorageGrant);

/// Hands the units of the user's leases back to the store now (so its
/// counters read exactly what was admitted); answers once they are written.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReturnLeases;

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
    /// GCRA state per bucket: the fallback when Redis is down, and the only state
    /// when Redis is not configured.
    local_tat: HashMap<Bucket, f64>,
    /// Quotas known to be spent in a period (cleared on Reload).
    /// Quotas the store refused, with when: refused again without asking the
    /// store for `lease_idle` (units may come back from other sessions' leases).
    exhausted: HashMap<(Resource, DateTime<Utc>), (u64, Instant)>,
    /// Units admitted on the local allowance, to add to the counters later.
    unreconciled: Vec<(Resource, DateTime<Utc>, u64)>,
    /// Lease units whose hand-back failed (store down): tried again with the next.
    unreturned: Vec<(Resource, DateTime<Utc>, u64)>,
    offline_used: HashMap<Resource, u64>,
    in_flight: usize,
    /// Chat permits admitted and not yet completed or released.
    chats: HashSet<Uuid>,
    /// Quota units reserved in the store and not admitted yet, per resource.
    leases: HashMap<Resource, Lease>,
    /// A check of idle leases is scheduled.
    lease_check: bool,
    /// Grants to uploads still being stored.
    storage: Holds,
    last_active: Instant,
    born: Instant,
}

impl UserSession {
    pub fn new(user_id: Uuid, deps: SessionDeps, exit: Arc<dyn SessionExit>) -> Self {
        UserSession {
            user_id,
            deps,
            exit,
            local_tat: HashMap::new(),
            exhausted: HashMap::new(),
            unreconciled: Vec::new(),
            unreturned: Vec::new(),
            offline_used: HashMap::new(),
            in_flight: 0,
            chats: HashSet::new(),
            leases: HashMap::new(),
            lease_check: false,
            storage: Holds::default(),
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
crate::tracked_mailbox!(UserSession, SESSION_MAILBOX;
    Admit, Complete, Release, ReserveStorage, ReleaseStorage, ReturnLeases, Reload, Crash);

impl Actor for UserSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
        let every = (self.deps.config.idle_timeout / 4).max(Duration::from_millis(50));
        ctx.run_interval(every, |act, ctx| {
            act.storage.expire(Instant::now());
            if act.in_flight == 0 && act.storage.is_empty() && act.last_active.elapsed() >= act.deps.config.idle_timeout
            {
                // Units admitted while the store was down are added to the
                // counters before the session may go: it stays until they are.
                if act.unreconciled.is_empty() {
                    ctx.stop();
                } else {
                    let pending = std::mem::take(&mut act.unreconciled);
                    let usage = act.deps.usage.clone();
                    let user_id = act.user_id;
                    ctx.wait(
                        async move { reconcile(usage.as_ref(), user_id, pending).await }
                            .into_actor(act)
                            .map(|left, act, _| act.unreconciled.extend(left)),
                    );
                }
            }
        });
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        // Units reserved and not admitted go back (a panic loses them: the
        // counter then overstates the month by at most one lease).
        if !std::thread::panicking() {
            let returns = self.take_leases();
            let usage = self.deps.usage.clone();
            let user_id = self.user_id;
            actix::spawn(async move {
                hand_back(usage.as_ref(), user_id, returns).await;
            });
        }
        Running::Stop
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.exit
            .session_stopped(self.user_id, &ctx.address(), std::thread::panicking());
    }
}

impl UserSession {
    /// Empties every lease: (resource, month, units) to hand back to the store,
    /// with the units an earlier hand-back could not return.
    fn take_leases(&mut self) -> Vec<(Resource, DateTime<Utc>, u64)> {
        let mut returns = std::mem::take(&mut self.unreturned);
        returns.extend(self.leases.iter_mut().filter_map(|(r, l)| {
            let n = l.take_unused();
            (n > 0).then_some((*r, l.period_start, n))
        }));
        returns
    }

    /// Hands units back to the store before the next message is handled (so an
    /// admission right after sees them); what fails is kept and tried again.
    fn hand_back_now(&mut self, ctx: &mut Context<Self>, returns: Vec<(Resource, DateTime<Utc>, u64)>) {
        if returns.is_empty() {
            return;
        }
        let usage = self.deps.usage.clone();
        let user_id = self.user_id;
        ctx.wait(
            async move { hand_back(usage.as_ref(), user_id, returns).await }
                .into_actor(self)
                .map(|failed, act, _| act.unreturned.extend(failed)),
        );
    }

    /// Checks for idle leases after `lease_idle` (once scheduled, until none holds units).
    fn schedule_lease_check(&mut self, ctx: &mut Context<Self>) {
        if self.lease_check || !self.leases.values().any(|l| l.held > 0) {
            return;
        }
        self.lease_check = true;
        let idle = self.deps.config.lease_idle;
        ctx.run_later(idle, move |act, ctx| {
            act.lease_check = false;
            if act.last_active.elapsed() >= idle {
                let returns = act.take_leases();
                act.hand_back_now(ctx, returns);
            } else {
                act.schedule_lease_check(ctx);
            }
        });
    }

    /// Decides an admission without waiting for anything, when everything it
    /// needs is here: the user's row cached, the rate limit local (no Redis for
    /// this bucket) and the quota lease holding the units. None otherwise.
    fn admit_now(&mut self, msg: &Admit, period: &Period) -> Option<Result<Permit, Rejection>> {
        let user = self.deps.users.cached(self.user_id)?;
        if !user.is_active {
            return Some(Err(Rejection::UnknownUser));
        }
        let bucket_quota = msg
            .bucket
            .and_then(|b| self.deps.config.rate_limits.get(&b).map(|q| (b, *q)));
        if bucket_quota.is_some() && self.deps.limiter.is_some() {
            return None;
        }
        let lease = self.leases.get(&msg.resource)?;
        if lease.period_start != period.start || lease.held < msg.cost || !self.unreconciled.is_empty() {
            return None;
        }
        let plan = user.subscription_plan;
        let limit = self.deps.plans.current().get(plan).limit(msg.resource);
        let mut rate = None;
        if let Some((bucket, quota)) = bucket_quota {
            let d = self.local_check(bucket, quota, true);
            if !d.allowed {
                return Some(Err(rate_limited(bucket, quota, &d)));
            }
            rate = Some(rate_info(quota, &d));
        }
        let lease = self.leases.get_mut(&msg.resource)?;
        let used = match lease.step(msg.cost, limit, self.deps.config.max_lease) {
            QuotaStep::Admit { used } => used,
            QuotaStep::Reserve { .. } => return None,
        };
        self.in_flight += 1;
        let id = Uuid::new_v4();
        if msg.bucket == Some(Bucket::Chat) {
            self.chats.insert(id);
        }
        Some(Ok(Permit {
            id,
            user_id: self.user_id,
            resource: msg.resource,
            cost: msg.cost,
            period: *period,
            plan,
            used,
            limit,
            rate,
            offline: false,
        }))
    }
}

fn rate_limited(bucket: Bucket, quota: Quota, d: &ratelimit::Decision) -> Rejection {
    Rejection::RateLimited {
        bucket,
        limit: quota.limit,
        period_secs: quota.period_ms / 1000,
        retry_after_ms: d.retry_after_ms,
        reset_ms: d.reset_ms,
    }
}

fn rate_info(quota: Quota, d: &ratelimit::Decision) -> RateInfo {
    RateInfo {
        limit: quota.limit,
        remaining: d.remaining,
        reset_secs: d.reset_ms.div_ceil(1000),
    }
}

/// Adds units admitted while the store was down to its counters; returns
/// those it could not add yet.
async fn reconcile(
    usage: &dyn UsageStore,
    user_id: Uuid,
    pending: Vec<(Resource, DateTime<Utc>, u64)>,
) -> Vec<(Resource, DateTime<Utc>, u64)> {
    let mut left = Vec::new();
    for (r, start, n) in pending {
        if !left.is_empty() || usage.force_add(user_id, r, start, n).await.is_err() {
            left.push((r, start, n));
        }
    }
    left
}

/// Hands unused lease units back to the store; returns those it could not.
async fn hand_back(
    usage: &dyn UsageStore,
    user_id: Uuid,
    returns: Vec<(Resource, DateTime<Utc>, u64)>,
) -> Vec<(Resource, DateTime<Utc>, u64)> {
    let mut failed = Vec::new();
    for (resource, start, n) in returns {
        // A second try gets a new connection: at shutdown the pool's connections
        // of the server's stopped workers fail once each ("runtime is being
        // shutdown") and are dropped by the pool.
        let mut outcome = usage.release(user_id, resource, start, n).await;
        for _ in 0..8 {
            if outcome.is_ok() {
                break;
            }
            outcome = usage.release(user_id, resource, start, n).await;
        }
        if let Err(e) = outcome {
            tracing::warn!(user = %user_id, error = %e, units = n, "could not hand back leased quota units");
            failed.push((resource, start, n));
        }
    }
    failed
}

struct AdmitOutcome {
    rate: Option<(Bucket, Quota, Result<ratelimit::Decision, ()>)>,
    result: Result<Permit, Rejection>,
    /// The lease after this admission.
    lease: Lease,
    /// Offline units that could not be reconciled yet; put back into the actor.
    requeue: Vec<(Resource, DateTime<Utc>, u64)>,
    /// Lease units whose hand-back failed.
    unreturned: Vec<(Resource, DateTime<Utc>, u64)>,
}

impl Handler<Admit> for UserSession {
    type Result = AtomicResponse<Self, Result<Permit, Rejection>>;

    fn handle(&mut self, msg: Admit, ctx: &mut Self::Context) -> Self::Result {
        self.last_active = Instant::now();
        if self.deps.ledger.refusing() {
            return AtomicResponse::new(Box::pin(fut::ready(Err(Rejection::UsageUnrecordable))));
        }
        let cap = self.deps.config.max_concurrent_chats;
        if msg.bucket == Some(Bucket::Chat) && cap > 0 && self.chats.len() >= cap {
            return AtomicResponse::new(Box::pin(fut::ready(Err(Rejection::Busy {
                bucket: Bucket::Chat,
                limit: cap,
            }))));
        }
        let now = Utc::now();
        let period = month_of(now);
        if let Some(result) = self.admit_now(&msg, &period) {
            return AtomicResponse::new(Box::pin(fut::ready(result)));
        }
        let deps = self.deps.clone();
        let user_id = self.user_id;
        let lease_idle = self.deps.config.lease_idle;
        let exhausted = self
            .exhausted
            .get(&(msg.resource, period.start))
            .filter(|(_, at)| at.elapsed() < lease_idle)
            .map(|(used, _)| *used);
        // A lease of last month: its units go back to last month's counter.
        let lease = match self.leases.remove(&msg.resource) {
            Some(l) if l.period_start == period.start => l,
            Some(mut old) => {
                let n = old.take_unused();
                if n > 0 {
                    self.hand_back_now(ctx, vec![(msg.resource, old.period_start, n)]);
                }
                Lease::empty(period.start)
            }
            None => Lease::empty(period.start),
        };
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
        let period_start = period.start;

        let fut = async move {
            // Offline units not yet added stay queued whatever the outcome.
            let mut out = AdmitOutcome {
                rate: None,
                result: Err(Rejection::UnknownUser),
                lease,
                requeue: unreconciled,
                unreturned: Vec::new(),
            };
            // 1. The plan, from the user's row (cached for a second).
            let (plan, limits) = match plan_of(&deps, user_id).await {
                Ok(p) => p,
                Err(r) => {
                    out.result = Err(r);
                    return out;
                }
            };
            // 2. The rate limit: Redis when configured (falling back to local state).
            let mut rate = None;
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
                        out.result = Err(rate_limited(bucket, quota, &d));
                        return out;
                    }
                    rate = Some(rate_info(quota, &d));
                }
                // Err: Redis unavailable; decided against local state after the await.
            }
            // 3. The quota: from the lease, else reserved in the store.
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
                rate,
                offline: false,
            };
            let refused = |used| Rejection::QuotaExceeded {
                resource: msg.resource,
                used,
                limit,
                plan,
            };
            if let Some(used) = exhausted {
                out.result = Err(refused(used));
                return out;
            }
            // Units admitted offline are added to the counters first, once the store answers.
            while let Some(&(r, start, n)) = out.requeue.first() {
                if deps.usage.force_add(user_id, r, start, n).await.is_err() {
                    out.result = store_down(deps.config.store_down, permit, offline_used, "quota store unreachable");
                    return out;
                }
                out.requeue.remove(0);
            }
            // A lease taken under a higher limit (the plan changed elsewhere): its
            // units go back before the store is asked under the current limit.
            if out.lease.held > 0 && out.lease.used() + msg.cost > limit {
                let n = out.lease.take_unused();
                out.unreturned = hand_back(deps.usage.as_ref(), user_id, vec![(msg.resource, period.start, n)]).await;
            }
            // At most twice: a refused lease is asked again at the size the fresh
            // counter allows (down to the request's own cost).
            for _ in 0..2 {
                let units = match out.lease.step(msg.cost, limit, deps.config.max_lease) {
                    QuotaStep::Admit { used } => {
                        permit.used = used;
                        out.result = Ok(permit);
                        return out;
                    }
                    QuotaStep::Reserve { units } => units,
                };
                match deps
                    .usage
                    .try_reserve(user_id, msg.resource, period.start, units, limit)
                    .await
                {
                    Ok(Reservation::Granted { used }) => {
                        permit.used = out.lease.granted(units, used, msg.cost);
                        out.result = Ok(permit);
                        return out;
                    }
                    Ok(Reservation::Denied { used }) => {
                        out.lease.refused(used);
                        out.result = Err(refused(used));
                        if units <= msg.cost {
                            return out;
                        }
                    }
                    Err(StoreError::Unavailable(e)) | Err(StoreError::Internal(e)) => {
                        out.result = store_down(deps.config.store_down, permit, offline_used, &e);
                        return out;
                    }
                    Err(e) => {
                        out.result = Err(Rejection::Unavailable(e.to_string()));
                        return out;
                    }
                }
            }
            // When Redis was unreachable the map step below applies the local rate
            // decision, and gives this unit back if that refuses.
            out
        };

        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |mut out, act, ctx| {
            act.unreconciled.append(&mut out.requeue);
            act.unreturned.append(&mut out.unreturned);
            let mut result = out.result;
            let mut lease = out.lease;
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
                                if !p.offline {
                                    lease.give_back(p.cost);
                                }
                            }
                            result = Err(rate_limited(bucket, quota, &d));
                        } else if let Ok(p) = &mut result {
                            p.rate = Some(rate_info(quota, &d));
                        }
                    }
                }
            }
            act.leases.insert(msg.resource, lease);
            match &result {
                Ok(p) => {
                    act.in_flight += 1;
                    if msg.bucket == Some(Bucket::Chat) {
                        act.chats.insert(p.id);
                    }
                    if p.offline {
                        *act.offline_used.entry(p.resource).or_insert(0) += p.cost;
                    }
                }
                Err(Rejection::QuotaExceeded { resource, used, .. }) => {
                    act.exhausted.insert((*resource, period_start), (*used, Instant::now()));
                }
                Err(_) => {}
            }
            act.last_active = Instant::now();
            act.schedule_lease_check(ctx);
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

impl Handler<Complete> for UserSession {
    type Result = ();

    fn handle(&mut self, msg: Complete, _ctx: &mut Self::Context) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.chats.remove(&msg.permit.id);
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

    fn handle(&mut self, msg: Release, ctx: &mut Self::Context) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.chats.remove(&msg.permit.id);
        let p = msg.permit;
        self.exhausted.remove(&(p.resource, p.period.start));
        if p.offline {
            if let Some(n) = self.offline_used.get_mut(&p.resource) {
                *n = n.saturating_sub(p.cost);
            }
            return;
        }
        // The unit goes back to this month's lease (handed back to the store
        // when the lease sits idle), or straight to the store.
        match self.leases.get_mut(&p.resource) {
            Some(l) if l.period_start == p.period.start => {
                l.give_back(p.cost);
                self.schedule_lease_check(ctx);
            }
            _ => self.hand_back_now(ctx, vec![(p.resource, p.period.start, p.cost)]),
        }
    }
}

/// The user's plan and limits, from the user's row (cached for a second).
async fn plan_of(deps: &SessionDeps, user_id: Uuid) -> Result<(Plan, PlanLimits), Rejection> {
    match deps.users.get(deps.accounts.as_ref(), user_id).await {
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
        let fut = async move {
            let (_, limits) = plan_of(&deps, user_id).await?;
            let limit_bytes = limits.limit(Resource::StorageMb).saturating_mul(1 << 20);
            let usage_down = |e: StoreError| Rejection::Unavailable(format!("usage store: {e}"));
            // The epoch first, then the stored bytes: a hold released in between
            // (its documents perhaps not in the read) still counts.
            let epoch = deps.usage.storage_epoch(user_id).await.map_err(usage_down)?;
            let stored = msg
                .store
                .stored_bytes(&Owner::User(user_id))
                .await
                .map_err(|e| Rejection::Unavailable(format!("document store: {e}")))?;
            let grant = StorageGrant {
                id: Uuid::new_v4(),
                bytes: msg.bytes,
            };
            let expire_before =
                Utc::now() - chrono::Duration::from_std(storage::STORAGE_HOLD).unwrap_or(chrono::Duration::minutes(30));
            match deps
                .usage
                .hold_storage(user_id, grant.id, msg.bytes, stored, epoch, limit_bytes, expire_before)
                .await
                .map_err(usage_down)?
            {
                Reservation::Granted { .. } => Ok(grant),
                Reservation::Denied { used } => Err(Rejection::StorageExceeded {
                    used_bytes: used,
                    requested_bytes: msg.bytes,
                    limit_bytes,
                }),
            }
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(|out, act, _ctx| {
            let grant = out?;
            act.storage.hold(grant, Instant::now());
            Ok(grant)
        })))
    }
}

impl Handler<ReleaseStorage> for UserSession {
    type Result = ();

    fn handle(&mut self, msg: ReleaseStorage, _ctx: &mut Self::Context) {
        self.last_active = Instant::now();
        self.storage.release(msg.0.id);
        // In the shared store; one that fails leaves the hold until it expires
        // (the user's room is smaller meanwhile, never larger).
        let (usage, user_id, id) = (self.deps.usage.clone(), self.user_id, msg.0.id);
        actix::spawn(async move {
            if let Err(e) = usage.release_storage(user_id, id).await {
                tracing::warn!(error = %e, user = %user_id, "storage hold not released; it expires by itself");
            }
        });
    }
}

impl Handler<ReturnLeases> for UserSession {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: ReturnLeases, _ctx: &mut Self::Context) -> Self::Result {
        // Units admitted on the local allowance (the store was slow or down) are
        // added to the counters too, so they read what was admitted (at shutdown
        // this is the last chance).
        let returns = self.take_leases();
        let pending = std::mem::take(&mut self.unreconciled);
        let usage = self.deps.usage.clone();
        let user_id = self.user_id;
        AtomicResponse::new(Box::pin(
            async move {
                let left = reconcile(usage.as_ref(), user_id, pending).await;
                (hand_back(usage.as_ref(), user_id, returns).await, left)
            }
            .into_actor(self)
            .map(|(failed, left), act, _| {
                act.unreturned.extend(failed);
                act.unreconciled.extend(left);
            }),
        ))
    }
}

impl Handler<Reload> for UserSession {
    type Result = ();

    fn handle(&mut self, _: Reload, ctx: &mut Self::Context) {
        // The plan or its limits changed: spent quotas may not be spent any more,
        // and the leases were sized for the old limits (handed back before the
        // next admission is decided).
        self.deps.users.forget(self.user_id);
        self.exhausted.clear();
        let returns = self.take_leases();
        self.hand_back_now(ctx, returns);
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
