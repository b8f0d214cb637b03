//! In-memory stores for the unit tests of sessions, the registry and billing: the
//! accounts (user rows only) and the usage counters, with the same conditional
//! increment as the real stores and a count of the calls made to them;
//! subscriptions, invoices, upgrade requests and payments with the same
//! conditional writes as the real stores.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::registry::SessionRegistry;
use super::session::{Bucket, SessionConfig, SessionDeps, StoreDownPolicy};
use super::users::UserCache;
use crate::admission::ratelimit::Quota;
use crate::domain::{
    ApiKey, AuditEntry, Invoice, NewUser, Organization, Page, Payment, RefreshOutcome, RefreshToken, Subscription,
    UpgradeDecision, UpgradeRequest, UpgradeStatus, UsageRecord, User, UserFilter, UserPatch,
};
use crate::ledger::{Ledger, LedgerConfig};
use crate::plans::{Period, Plan, PlanBook, PlanCatalog, PlanLimits, Resource};
use crate::ports::{AccountStore, Reservation, StoreError, StoreResult, UsageStore};
use crate::supervision::RestartPolicy;

fn no<T>() -> StoreResult<T> {
    Err(StoreError::Internal("not in the fake".into()))
}

/// Runs while a user row is being read (to race a change against the read).
type ReadHook = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
pub struct Accounts {
    pub users: Mutex<HashMap<Uuid, User>>,
    pub reads: AtomicU64,
    pub during_read: Mutex<Option<ReadHook>>,
    /// Refresh-token families revoked (logins ended), and reads of them.
    pub revoked_families: Mutex<std::collections::HashSet<Uuid>>,
    pub family_lookups: AtomicU64,
}

impl Accounts {
    pub fn add(&self, plan: Plan) -> Uuid {
        let now = Utc::now();
        let id = Uuid::new_v4();
        let user = User {
            id,
            email: format!("{id}@example.com"),
            hashed_password: String::new(),
            full_name: None,
            is_active: true,
            is_verified: true,
            is_superuser: false,
            subscription_plan: plan,
            organization_id: None,
            preferences: serde_json::json!({}),
            created_at: now,
            updated_at: now,
        };
        if let Ok(mut u) = self.users.lock() {
            u.insert(id, user);
        }
        id
    }

    /// Ends a login as another node would (in the store only).
    pub fn revoke_family(&self, family_id: Uuid) {
        if let Ok(mut f) = self.revoked_families.lock() {
            f.insert(family_id);
        }
    }

    pub fn family_reads(&self) -> u64 {
        self.family_lookups.load(Ordering::Relaxed)
    }

    fn run_read_hook(&self) {
        if let Some(hook) = self.during_read.lock().ok().as_ref().and_then(|h| h.as_ref()) {
            hook();
        }
    }

    pub fn deactivate(&self, id: Uuid) {
        if let Ok(mut m) = self.users.lock() {
            if let Some(u) = m.get_mut(&id) {
                u.is_active = false;
            }
        }
    }
}

#[async_trait]
impl AccountStore for Accounts {
    fn backend(&self) -> &'static str {
        "fake"
    }
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
    async fn create_organization(&self, _: &str) -> StoreResult<Organization> {
        no()
    }
    async fn organization(&self, _: Uuid) -> StoreResult<Option<Organization>> {
        no()
    }
    async fn create_user(&self, _: NewUser) -> StoreResult<User> {
        no()
    }
    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let row = self.users.lock().ok().and_then(|u| u.get(&id).cloned());
        self.run_read_hook();
        Ok(row)
    }
    async fn user_by_email(&self, _: &str) -> StoreResult<Option<User>> {
        no()
    }
    async fn list_users(&self, _: &UserFilter, _: Page) -> StoreResult<(Vec<User>, u64)> {
        no()
    }
    async fn update_user(&self, id: Uuid, patch: &UserPatch) -> StoreResult<User> {
        let mut users = self.users.lock().map_err(|_| StoreError::Internal("poisoned".into()))?;
        let user = users.get_mut(&id).ok_or(StoreError::NotFound)?;
        if let Some(plan) = patch.subscription_plan {
            user.subscription_plan = plan;
        }
        if let Some(active) = patch.is_active {
            user.is_active = active;
        }
        Ok(user.clone())
    }
    async fn insert_api_key(&self, _: &ApiKey) -> StoreResult<()> {
        no()
    }
    async fn list_api_keys(&self, _: Uuid) -> StoreResult<Vec<ApiKey>> {
        no()
    }
    async fn revoke_api_key(&self, _: Uuid, _: Uuid) -> StoreResult<bool> {
        no()
    }
    async fn use_api_key(&self, _: &str) -> StoreResult<Option<ApiKey>> {
        no()
    }
    async fn insert_refresh_token(&self, _: &RefreshToken) -> StoreResult<()> {
        no()
    }
    async fn consume_refresh_token(&self, _: &str, _: DateTime<Utc>) -> StoreResult<RefreshOutcome> {
        no()
    }
    async fn revoke_refresh_family_of(&self, _: &str) -> StoreResult<Option<Uuid>> {
        no()
    }
    async fn refresh_family_revoked(&self, family_id: Uuid) -> StoreResult<bool> {
        self.family_lookups.fetch_add(1, Ordering::Relaxed);
        // A real read waits for the database: let other requests run meanwhile.
        tokio::task::yield_now().await;
        let revoked = self.revoked_families.lock().is_ok_and(|f| f.contains(&family_id));
        self.run_read_hook();
        Ok(revoked)
    }
    async fn get_setting(&self, _: &str) -> StoreResult<Option<serde_json::Value>> {
        Ok(None)
    }
    async fn put_setting(&self, _: &str, _: &serde_json::Value) -> StoreResult<()> {
        no()
    }
    async fn record_audit(&self, _: &AuditEntry) -> StoreResult<()> {
        no()
    }
    async fn audit_for(&self, _: Uuid) -> StoreResult<Vec<AuditEntry>> {
        no()
    }
}

type Key = (Uuid, Resource, DateTime<Utc>);

#[derive(Default)]
pub struct Usage {
    pub counters: Mutex<HashMap<Key, u64>>,
    pub records: Mutex<Vec<UsageRecord>>,
    /// Conditional increments asked for.
    pub reserves: AtomicU64,
    /// Writes of usage records asked for.
    pub inserts: AtomicU64,
    /// The store is unreachable: counter calls fail.
    pub down: std::sync::atomic::AtomicBool,
    /// Each conditional increment takes this long (ms).
    pub reserve_delay_ms: AtomicU64,
    pub subscriptions: Mutex<HashMap<Uuid, Subscription>>,
    pub invoices: Mutex<Vec<Invoice>>,
    pub requests: Mutex<Vec<UpgradeRequest>>,
    pub payments: Mutex<Vec<Payment>>,
    /// Plan changes committed here set the user's plan in these accounts (as the
    /// SQL stores do in one transaction).
    pub accounts: std::sync::OnceLock<Arc<Accounts>>,
    /// Storage epochs and holds (id → user, bytes, made at, released at epoch).
    pub storage: Mutex<StorageHolds>,
}

#[derive(Default)]
pub struct StorageHolds {
    pub epochs: HashMap<Uuid, u64>,
    pub holds: HashMap<Uuid, (Uuid, u64, DateTime<Utc>, Option<u64>)>,
}

fn locked<T>(m: &Mutex<T>) -> StoreResult<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| StoreError::Internal("poisoned".into()))
}

fn close(r: &mut UpgradeRequest, d: &UpgradeDecision) {
    r.status = d.status;
    r.decided_at = Some(d.decided_at);
    r.decided_by = d.decided_by;
    r.note = d.note.clone();
    r.charged_cents = d.charged_cents;
}

impl Usage {
    /// The counters, when the store is reachable.
    fn reachable_counters(&self) -> StoreResult<std::sync::MutexGuard<'_, HashMap<Key, u64>>> {
        self.reachable()?;
        self.counters
            .lock()
            .map_err(|_| StoreError::Internal("poisoned".into()))
    }

    fn reachable(&self) -> StoreResult<()> {
        if self.down.load(Ordering::Relaxed) {
            Err(StoreError::Unavailable("the usage store is down".into()))
        } else {
            Ok(())
        }
    }
}

impl Usage {
    pub fn counter(&self, user: Uuid, r: Resource, start: DateTime<Utc>) -> u64 {
        self.counters
            .lock()
            .ok()
            .and_then(|c| c.get(&(user, r, start)).copied())
            .unwrap_or(0)
    }

    pub fn recorded(&self, user: Uuid) -> u64 {
        self.records
            .lock()
            .map(|r| r.iter().filter(|x| x.user_id == user).map(|x| x.quantity).sum())
            .unwrap_or(0)
    }
}

#[async_trait]
impl UsageStore for Usage {
    async fn storage_epoch(&self, u: Uuid) -> StoreResult<u64> {
        self.reachable()?;
        Ok(locked(&self.storage)?.epochs.get(&u).copied().unwrap_or(0))
    }
    async fn hold_storage(
        &self,
        u: Uuid,
        id: Uuid,
        bytes: u64,
        stored: u64,
        epoch: u64,
        limit: u64,
        expire_before: DateTime<Utc>,
    ) -> StoreResult<Reservation> {
        self.reachable()?;
        let mut s = locked(&self.storage)?;
        s.epochs.entry(u).or_insert(0);
        s.holds
            .retain(|_, (user, _, at, released)| *user != u || released.is_some() || *at >= expire_before);
        let held: u64 = s
            .holds
            .values()
            .filter(|(user, _, _, released)| *user == u && released.is_none_or(|r| r > epoch))
            .map(|(_, b, _, _)| *b)
            .sum();
        let used = stored.saturating_add(held);
        if used.saturating_add(bytes) > limit {
            return Ok(Reservation::Denied { used });
        }
        s.holds.insert(id, (u, bytes, Utc::now(), None));
        Ok(Reservation::Granted { used: used + bytes })
    }
    async fn release_storage(&self, u: Uuid, id: Uuid) -> StoreResult<()> {
        self.reachable()?;
        let mut s = locked(&self.storage)?;
        let epoch = {
            let e = s.epochs.entry(u).or_insert(0);
            *e += 1;
            *e
        };
        if let Some(h) = s.holds.get_mut(&id).filter(|h| h.0 == u && h.3.is_none()) {
            h.3 = Some(epoch);
        }
        Ok(())
    }
    async fn try_reserve(
        &self,
        u: Uuid,
        r: Resource,
        s: DateTime<Utc>,
        cost: u64,
        limit: u64,
    ) -> StoreResult<Reservation> {
        self.reserves.fetch_add(1, Ordering::Relaxed);
        let delay = self.reserve_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let mut c = self.reachable_counters()?;
        let used = c.entry((u, r, s)).or_insert(0);
        if *used + cost <= limit {
            *used += cost;
            Ok(Reservation::Granted { used: *used })
        } else {
            Ok(Reservation::Denied { used: *used })
        }
    }
    async fn release(&self, u: Uuid, r: Resource, s: DateTime<Utc>, cost: u64) -> StoreResult<()> {
        let mut c = self.reachable_counters()?;
        let used = c.entry((u, r, s)).or_insert(0);
        *used = used.saturating_sub(cost);
        Ok(())
    }
    async fn force_add(&self, u: Uuid, r: Resource, s: DateTime<Utc>, cost: u64) -> StoreResult<()> {
        let mut c = self.reachable_counters()?;
        *c.entry((u, r, s)).or_insert(0) += cost;
        Ok(())
    }
    async fn counters(&self, u: Uuid, s: DateTime<Utc>) -> StoreResult<BTreeMap<Resource, u64>> {
        let c = self.reachable_counters()?;
        Ok(c.iter()
            .filter(|((uu, _, ss), _)| *uu == u && *ss == s)
            .map(|((_, r, _), n)| (*r, *n))
            .collect())
    }
    async fn insert_usage(&self, records: &[UsageRecord]) -> StoreResult<u64> {
        self.inserts.fetch_add(1, Ordering::Relaxed);
        self.reachable()?;
        let mut all = self
            .records
            .lock()
            .map_err(|_| StoreError::Internal("poisoned".into()))?;
        let mut new = 0;
        for r in records {
            if !all.iter().any(|x| x.id == r.id) {
                all.push(r.clone());
                new += 1;
            }
        }
        Ok(new)
    }
    async fn usage_record_count(&self, u: Uuid) -> StoreResult<u64> {
        Ok(self
            .records
            .lock()
            .map(|r| r.iter().filter(|x| x.user_id == u).count() as u64)
            .unwrap_or(0))
    }
    async fn subscription(&self, u: Uuid) -> StoreResult<Option<Subscription>> {
        self.reachable()?;
        Ok(locked(&self.subscriptions)?.get(&u).cloned())
    }
    async fn put_subscription(&self, sub: &Subscription) -> StoreResult<()> {
        self.reachable()?;
        locked(&self.subscriptions)?.insert(sub.user_id, sub.clone());
        Ok(())
    }
    async fn insert_invoice(&self, invoice: &Invoice) -> StoreResult<()> {
        self.reachable()?;
        let mut all = locked(&self.invoices)?;
        if !all
            .iter()
            .any(|i| i.user_id == invoice.user_id && i.period_start == invoice.period_start)
        {
            all.push(invoice.clone());
        }
        Ok(())
    }
    async fn invoices(&self, u: Uuid) -> StoreResult<Vec<Invoice>> {
        let mut list: Vec<Invoice> = locked(&self.invoices)?
            .iter()
            .filter(|i| i.user_id == u)
            .cloned()
            .collect();
        list.sort_by_key(|i| i.period_start);
        Ok(list)
    }
    async fn usage_totals(&self, _: Uuid, _: Period) -> StoreResult<BTreeMap<Resource, u64>> {
        Ok(BTreeMap::new())
    }
    async fn commit_plan_change(
        &self,
        expected: &Subscription,
        sub: &Subscription,
        request: Option<(Uuid, &UpgradeDecision)>,
    ) -> StoreResult<bool> {
        self.reachable()?;
        let mut subs = locked(&self.subscriptions)?;
        let mut requests = locked(&self.requests)?;
        let Some(stored) = subs.get(&sub.user_id) else {
            return Ok(false);
        };
        if (stored.plan, stored.billing_cycle, stored.period_adjustments_cents)
            != (expected.plan, expected.billing_cycle, expected.period_adjustments_cents)
        {
            return Ok(false);
        }
        if let Some((id, d)) = request {
            match requests
                .iter_mut()
                .find(|r| r.id == id && r.status == UpgradeStatus::Pending)
            {
                Some(r) => close(r, d),
                None => return Ok(false),
            }
        }
        subs.insert(sub.user_id, sub.clone());
        if let Some(accounts) = self.accounts.get() {
            if let Some(u) = locked(&accounts.users)?.get_mut(&sub.user_id) {
                u.subscription_plan = sub.plan;
            }
        }
        Ok(true)
    }
    async fn insert_upgrade_request(&self, request: &UpgradeRequest) -> StoreResult<()> {
        self.reachable()?;
        let mut all = locked(&self.requests)?;
        if all
            .iter()
            .any(|r| r.user_id == request.user_id && r.status == UpgradeStatus::Pending)
        {
            return Err(StoreError::Conflict("one pending request per user".into()));
        }
        all.push(request.clone());
        Ok(())
    }
    async fn upgrade_request(&self, id: Uuid) -> StoreResult<Option<UpgradeRequest>> {
        Ok(locked(&self.requests)?.iter().find(|r| r.id == id).cloned())
    }
    async fn latest_upgrade_request(&self, u: Uuid) -> StoreResult<Option<UpgradeRequest>> {
        let all = locked(&self.requests)?;
        let mine = all.iter().filter(|r| r.user_id == u);
        Ok(mine
            .clone()
            .find(|r| r.status == UpgradeStatus::Pending)
            .or_else(|| mine.max_by_key(|r| r.created_at))
            .cloned())
    }
    async fn upgrade_requests(
        &self,
        status: Option<UpgradeStatus>,
        page: Page,
    ) -> StoreResult<(Vec<UpgradeRequest>, u64)> {
        let all = locked(&self.requests)?;
        let matching: Vec<UpgradeRequest> = all
            .iter()
            .filter(|r| status.is_none_or(|s| r.status == s))
            .cloned()
            .collect();
        let total = matching.len() as u64;
        Ok((
            matching
                .into_iter()
                .skip(page.offset as usize)
                .take(page.limit as usize)
                .collect(),
            total,
        ))
    }
    async fn close_upgrade_request(&self, id: Uuid, d: &UpgradeDecision) -> StoreResult<bool> {
        self.reachable()?;
        let mut all = locked(&self.requests)?;
        match all
            .iter_mut()
            .find(|r| r.id == id && r.status == UpgradeStatus::Pending)
        {
            Some(r) => {
                close(r, d);
                Ok(true)
            }
            None => Ok(false),
        }
    }
    async fn record_payment(&self, p: &Payment, limit_cents: u64) -> StoreResult<bool> {
        self.reachable()?;
        let mut all = locked(&self.payments)?;
        if all.iter().any(|x| x.id == p.id) {
            return Ok(true);
        }
        let month: u64 = all
            .iter()
            .filter(|x| x.user_id == p.user_id && x.month_start == p.month_start && !x.refunded)
            .map(|x| x.amount_cents)
            .sum();
        if month + p.amount_cents > limit_cents {
            return Ok(false);
        }
        all.push(p.clone());
        Ok(true)
    }
    async fn refund_payment(&self, id: Uuid) -> StoreResult<bool> {
        let mut all = locked(&self.payments)?;
        match all.iter_mut().find(|x| x.id == id && !x.refunded) {
            Some(x) => {
                x.refunded = true;
                Ok(true)
            }
            None => Ok(false),
        }
    }
    async fn payments(&self, u: Uuid) -> StoreResult<Vec<Payment>> {
        Ok(locked(&self.payments)?
            .iter()
            .filter(|x| x.user_id == u)
            .cloned()
            .collect())
    }
}

fn limits(messages: u64, api_calls: u64) -> PlanLimits {
    PlanLimits {
        messages,
        background_tasks: 10,
        api_calls,
        storage_mb: 10,
        price_monthly_cents: 0,
        price_yearly_cents: 0,
        features: Vec::new(),
    }
}

/// A registry over the fakes: free = 20 messages / 1,000 API calls, pro = 1,000 /
/// 100,000; no rate limit unless given; leases of up to `max_lease` units.
pub struct World {
    pub accounts: Arc<Accounts>,
    pub usage: Arc<Usage>,
    pub registry: Arc<SessionRegistry>,
    pub users: Arc<UserCache>,
    /// What the registry's sessions were given (for a second registry).
    pub deps: SessionDeps,
}

pub fn world(max_lease: u64, lease_idle: Duration, rate_limits: BTreeMap<Bucket, Quota>) -> World {
    world_with(max_lease, lease_idle, rate_limits, |_| {})
}

/// `world`, with the session settings changed by `tweak`.
pub fn world_with(
    max_lease: u64,
    lease_idle: Duration,
    rate_limits: BTreeMap<Bucket, Quota>,
    tweak: impl FnOnce(&mut SessionConfig),
) -> World {
    let accounts = Arc::new(Accounts::default());
    let usage = Arc::new(Usage::default());
    let spool = std::env::temp_dir().join(format!("ragchat-fake-spool-{}.jsonl", Uuid::new_v4().simple()));
    let ledger = Ledger::start(
        usage.clone(),
        LedgerConfig {
            flush_interval: Duration::from_millis(10),
            max_batch: 100,
            spool_path: spool,
            max_spool_bytes: 1 << 20,
        },
        RestartPolicy::default(),
    )
    .expect("ledger");
    let catalog = PlanCatalog {
        free: limits(20, 1_000),
        pro: limits(1_000, 100_000),
        enterprise: limits(1_000_000, 1_000_000),
    };
    let users = Arc::new(UserCache::new(Duration::from_secs(60)));
    let mut config = SessionConfig {
        rate_limits,
        idle_timeout: Duration::from_secs(600),
        store_down: StoreDownPolicy::FailClosed,
        max_lease,
        lease_idle,
        max_concurrent_chats: 0,
    };
    tweak(&mut config);
    let deps = SessionDeps {
        accounts: accounts.clone(),
        usage: usage.clone(),
        limiter: None,
        ledger,
        plans: Arc::new(PlanBook::new(catalog)),
        users: users.clone(),
        config: Arc::new(config),
    };
    let registry = SessionRegistry::new(deps.clone(), 1, Duration::from_secs(5));
    World {
        accounts,
        usage,
        registry,
        users,
        deps,
    }
}
