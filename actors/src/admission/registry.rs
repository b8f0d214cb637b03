//! SessionRegistry: finds or starts the `UserSession` of a user, supervises it and
//! forgets it when it stops.
//!
//! Sessions run on a small pool of dedicated arbiters (threads), sharded by user
//! id, away from the HTTP workers. Supervision: a session that panicked leaves a
//! dead address behind; the next request finds it disconnected (or its send fails),
//! and the registry starts a fresh session, which reloads the user's plan and quota
//! view from the stores (quota counters live in the store, so nothing is lost but
//! the in-memory rate-limit state). Restarts are counted. Idle sessions stop
//! themselves after `idle_timeout` and are removed here.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

use super::session::{
    Admit, Complete, Permit, Rejection, Release, ReleaseStorage, Reload, ReserveStorage, ReturnLeases, SessionDeps,
    SessionExit, UserSession,
};
use super::storage::StorageGrant;
use crate::ports::DocumentStore;
use crate::supervision::{RestartPolicy, SendTracked};

const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    pub active: usize,
    pub created: u64,
    pub evicted: u64,
    pub restarted: u64,
}

pub struct SessionRegistry {
    shards: Vec<Mutex<HashMap<Uuid, Addr<UserSession>>>>,
    arbiters: Vec<ArbiterHandle>,
    deps: SessionDeps,
    send_timeout: Duration,
    created: AtomicU64,
    evicted: AtomicU64,
    restarted: AtomicU64,
    storms: Mutex<RestartPolicy>,
    me: Weak<SessionRegistry>,
}

fn shard_of(user_id: &Uuid, n: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    user_id.hash(&mut h);
    (h.finish() as usize) % n.max(1)
}

struct Exit(Weak<SessionRegistry>);

impl SessionExit for Exit {
    fn session_stopped(&self, user_id: Uuid, addr: &Addr<UserSession>, crashed: bool) {
        if let Some(reg) = self.0.upgrade() {
            reg.forget(user_id, addr, crashed);
        }
    }
}

impl SessionRegistry {
    /// Starts `threads` arbiters for sessions. Must run inside an actix System.
    pub fn new(deps: SessionDeps, threads: usize, send_timeout: Duration) -> Arc<Self> {
        let arbiters = (0..threads.max(1)).map(|_| Arbiter::new().handle()).collect();
        Arc::new_cyclic(|me| SessionRegistry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            arbiters,
            deps,
            send_timeout,
            created: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            restarted: AtomicU64::new(0),
            storms: Mutex::new(RestartPolicy::new(
                Duration::from_secs(60),
                Duration::ZERO,
                Duration::ZERO,
                10,
            )),
            me: me.clone(),
        })
    }

    fn shard(&self, user_id: &Uuid) -> std::sync::MutexGuard<'_, HashMap<Uuid, Addr<UserSession>>> {
        let m = &self.shards[shard_of(user_id, SHARDS)];
        match m.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The live session of a user, started if absent or dead.
    pub fn session(&self, user_id: Uuid) -> Addr<UserSession> {
        let mut shard = self.shard(&user_id);
        if let Some(addr) = shard.get(&user_id) {
            if addr.connected() {
                return addr.clone();
            }
            // Still registered but its mailbox is gone: it died without stopping.
            self.note_restart(user_id, "session died; restarting it");
        }
        let deps = self.deps.clone();
        let exit: Arc<dyn SessionExit> = Arc::new(Exit(self.me.clone()));
        let arbiter = &self.arbiters[shard_of(&user_id, self.arbiters.len())];
        let addr = UserSession::start_in_arbiter(arbiter, move |_| UserSession::new(user_id, deps, exit));
        self.created.fetch_add(1, Ordering::Relaxed);
        shard.insert(user_id, addr.clone());
        addr
    }

    /// Counts a session restart (in metrics too) and logs it; many within a
    /// minute, across users, are logged as a restart storm. Sessions restart on
    /// the user's next request, with no backoff: the request is waiting.
    fn note_restart(&self, user_id: Uuid, what: &str) {
        self.restarted.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(user = %user_id, "{what}");
        let mut storms = match self.storms.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let _ = storms.note_restart("user-session");
    }

    /// Removes a stopped session, unless a newer one already took its place.
    fn forget(&self, user_id: Uuid, addr: &Addr<UserSession>, crashed: bool) {
        let mut shard = self.shard(&user_id);
        if shard.get(&user_id).is_some_and(|a| a == addr) {
            shard.remove(&user_id);
            if crashed {
                // The next request starts a fresh session (state reloaded from the stores).
                self.note_restart(user_id, "session crashed; it restarts on the next request");
            } else {
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Asks the user's session to admit work. A session that died mid-request is
    /// restarted and asked once more.
    pub async fn admit(&self, user_id: Uuid, msg: Admit) -> Result<Permit, Rejection> {
        for attempt in 0..2 {
            let addr = self.session(user_id);
            let mut reply = Box::pin(addr.send_tracked(msg.clone()));
            match tokio::time::timeout(self.send_timeout, &mut reply).await {
                Ok(Ok(result)) => return result,
                Ok(Err(_mailbox_closed)) if attempt == 0 => continue,
                Ok(Err(_)) => break,
                Err(_elapsed) => {
                    // The session may still admit it after the caller stopped
                    // waiting: such a late permit is handed back, never left
                    // counted for work that was refused.
                    if let Some(me) = self.me.upgrade() {
                        tokio::spawn(async move {
                            if let Ok(Ok(permit)) = reply.await {
                                me.release(permit);
                            }
                        });
                    }
                    return Err(Rejection::Unavailable("session overloaded".into()));
                }
            }
        }
        Err(Rejection::Unavailable("session unavailable".into()))
    }

    /// Reserves room for new private documents (see `ReserveStorage`).
    pub async fn reserve_storage(
        &self,
        user_id: Uuid,
        store: Arc<dyn DocumentStore>,
        bytes: u64,
    ) -> Result<StorageGrant, Rejection> {
        let addr = self.session(user_id);
        match tokio::time::timeout(self.send_timeout, addr.send_tracked(ReserveStorage { store, bytes })).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Rejection::Unavailable("session unavailable".into())),
            Err(_elapsed) => Err(Rejection::Unavailable("session overloaded".into())),
        }
    }

    /// Hands a storage grant back once its documents are stored (or failed).
    pub fn release_storage(&self, user_id: Uuid, grant: StorageGrant) {
        self.session(user_id).do_send_tracked(ReleaseStorage(grant));
    }

    /// Records the work of a permit (once). If the session is gone the ledger is
    /// fed through a fresh one: usage is never dropped.
    pub fn complete(&self, permit: Permit, metadata: serde_json::Value) {
        let addr = self.session(permit.user_id);
        if let Err(e) = addr.try_send_tracked(Complete { permit, metadata }) {
            let Complete { permit, metadata } = match e {
                SendError::Full(m) | SendError::Closed(m) => m,
            };
            self.session(permit.user_id)
                .do_send_tracked(Complete { permit, metadata });
        }
    }

    /// Gives back the quota of a permit whose work did not happen.
    pub fn release(&self, permit: Permit) {
        self.session(permit.user_id).do_send_tracked(Release { permit });
    }

    /// Hands the quota units the user's session holds in leases back to the
    /// store, so the store's counters read what was admitted (on this node).
    pub async fn return_leases(&self, user_id: Uuid) {
        if let Some(addr) = self.existing(user_id) {
            let _ = tokio::time::timeout(self.send_timeout, addr.send_tracked(ReturnLeases)).await;
        }
    }

    /// Hands back the leases of every session (at shutdown, before the ledger's
    /// last flush), each waited for at most the send timeout.
    pub async fn return_all_leases(&self) {
        let sessions: Vec<Addr<UserSession>> = self
            .shards
            .iter()
            .flat_map(|shard| match shard.lock() {
                Ok(g) => g.values().cloned().collect::<Vec<_>>(),
                Err(p) => p.into_inner().values().cloned().collect(),
            })
            .collect();
        for addr in sessions {
            let _ = tokio::time::timeout(self.send_timeout, addr.send_tracked(ReturnLeases)).await;
        }
    }

    /// Forgets cached plan and limits of a user (plan changed).
    pub fn invalidate(&self, user_id: Uuid) {
        self.deps.users.forget(user_id);
        if let Some(addr) = self.shard(&user_id).get(&user_id) {
            addr.do_send_tracked(Reload);
        }
    }

    /// Forgets cached plans of every session (catalog changed).
    pub fn invalidate_all(&self) {
        self.deps.users.clear();
        for shard in &self.shards {
            let guard = match shard.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            for addr in guard.values() {
                addr.do_send_tracked(Reload);
            }
        }
    }

    /// The address of a user's session if one is running (fault tests).
    pub fn existing(&self, user_id: Uuid) -> Option<Addr<UserSession>> {
        self.shard(&user_id).get(&user_id).cloned()
    }

    pub fn stats(&self) -> RegistryStats {
        let active = self
            .shards
            .iter()
            .map(|s| match s.lock() {
                Ok(g) => g.len(),
                Err(p) => p.into_inner().len(),
            })
            .sum();
        RegistryStats {
            active,
            created: self.created.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            restarted: self.restarted.load(Ordering::Relaxed),
        }
    }

    pub fn deps(&self) -> &SessionDeps {
        &self.deps
    }
}
/// One admitted unit of work: the permit and the registry it goes back to.
/// `complete` records its usage once; dropped without `complete` (the work did
/// not happen, or its request vanished) it gives the unit back.
pub struct Ticket {
    permit: Option<Permit>,
    registry: Arc<SessionRegistry>,
}

impl Ticket {
    /// Asks the user's session to admit `msg`.
    pub async fn admit(registry: Arc<SessionRegistry>, user_id: Uuid, msg: Admit) -> Result<Ticket, Rejection> {
        let permit = registry.admit(user_id, msg).await?;
        Ok(Ticket {
            permit: Some(permit),
            registry,
        })
    }

    pub fn permit(&self) -> Option<&Permit> {
        self.permit.as_ref()
    }

    /// The work happened: record its usage (once).
    pub fn complete(mut self, metadata: serde_json::Value) -> Option<Permit> {
        let permit = self.permit.take()?;
        self.registry.complete(permit.clone(), metadata);
        Some(permit)
    }

    /// Gives the unit back now (the work did not happen).
    pub fn release(mut self) {
        if let Some(p) = self.permit.take() {
            self.registry.release(p);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.registry.release(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

    use futures_util::future::join_all;

    use super::*;
    use crate::admission::fakes::world;
    use crate::admission::ratelimit::Quota;
    use crate::admission::session::Bucket;
    use crate::plans::{month_of, Plan, Resource};
    use crate::ports::UsageStore;

    fn api() -> Admit {
        Admit {
            bucket: Some(Bucket::Api),
            resource: Resource::ApiCalls,
            cost: 1,
        }
    }

    async fn ticket(reg: &Arc<SessionRegistry>, user: Uuid) -> Result<Ticket, Rejection> {
        Ticket::admit(reg.clone(), user, api()).await
    }

    #[actix::test]
    async fn concurrent_requests_admit_exactly_the_quota_and_each_completion_is_recorded_once() {
        let w = world(32, Duration::from_secs(60), BTreeMap::new());
        let user = w.accounts.add(Plan::Free); // 1,000 api calls
        let results = join_all((0..1_100).map(|_| ticket(&w.registry, user))).await;
        let (ok, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
        assert_eq!((ok.len(), refused.len()), (1_000, 100));
        assert!(refused.iter().all(|r| matches!(
            r,
            Err(Rejection::QuotaExceeded {
                used: 1_000,
                limit: 1_000,
                ..
            })
        )));
        for t in ok.into_iter().flatten() {
            t.complete(serde_json::json!({}));
        }
        for _ in 0..200 {
            if w.usage.recorded(user) == 1_000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(w.usage.recorded(user), 1_000);
        assert_eq!(w.usage.usage_record_count(user).await.ok(), Some(1_000));
    }

    #[actix::test]
    async fn leases_admit_without_a_store_write_per_request() {
        let w = world(32, Duration::from_secs(60), BTreeMap::new());
        let user = w.accounts.add(Plan::Pro); // 100,000 api calls: leases of 32
        for _ in 0..320 {
            ticket(&w.registry, user)
                .await
                .expect("admitted")
                .complete(serde_json::json!({}));
        }
        assert_eq!(
            w.usage.reserves.load(Ordering::Relaxed),
            10,
            "one conditional increment per 32 units"
        );
        assert_eq!(w.accounts.reads.load(Ordering::Relaxed), 1, "the user row is read once");
        // The counter holds exactly what was admitted: the leases were used up.
        let month = month_of(chrono::Utc::now()).start;
        assert_eq!(w.usage.counter(user, Resource::ApiCalls, month), 320);
        let t = ticket(&w.registry, user).await.expect("admitted");
        assert_eq!(
            t.permit().map(|p| p.used),
            Some(321),
            "the permit counts what was admitted"
        );
        assert_eq!(
            w.usage.counter(user, Resource::ApiCalls, month),
            352,
            "32 units reserved ahead"
        );
        // Handed back on demand (GET /billing/usage), the counter reads what was admitted.
        w.registry.return_leases(user).await;
        assert_eq!(w.usage.counter(user, Resource::ApiCalls, month), 321);
    }

    #[actix::test]
    async fn a_permit_granted_after_the_caller_stopped_waiting_is_handed_back() {
        let w = world(32, Duration::from_secs(60), BTreeMap::new());
        let user = w.accounts.add(Plan::Free);
        let month = month_of(chrono::Utc::now()).start;
        // The store takes 300 ms to reserve, the caller waits 50: each admission
        // times out, and the session admits it later.
        w.usage.reserve_delay_ms.store(300, Ordering::Relaxed);
        let hasty = SessionRegistry::new(w.deps.clone(), 1, Duration::from_millis(50));
        for _ in 0..3 {
            let r = hasty.admit(user, api()).await;
            assert!(matches!(r, Err(Rejection::Unavailable(_))), "{r:?}");
        }
        // The late permits come back to the session's lease, which goes back to the store.
        w.usage.reserve_delay_ms.store(0, Ordering::Relaxed);
        // The reservation lands once the store answers: a lease of 32 units.
        let mut counter = 0;
        for _ in 0..500 {
            counter = w.usage.counter(user, Resource::ApiCalls, month);
            if counter > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(counter, 32);
        for _ in 0..300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            hasty.return_leases(user).await;
            counter = w.usage.counter(user, Resource::ApiCalls, month);
            if counter == 0 {
                break;
            }
        }
        assert_eq!(counter, 0, "refused requests are not counted");
        assert_eq!(w.usage.recorded(user), 0);
    }

    #[actix::test]
    async fn work_that_did_not_happen_gives_its_unit_back() {
        let w = world(32, Duration::from_secs(60), BTreeMap::new());
        let user = w.accounts.add(Plan::Free);
        let month = month_of(chrono::Utc::now()).start;
        // Released explicitly, or dropped (the request vanished): not counted.
        ticket(&w.registry, user).await.expect("admitted").release();
        drop(ticket(&w.registry, user).await.expect("admitted"));
        let done = ticket(&w.registry, user).await.expect("admitted");
        assert_eq!(
            done.permit().map(|p| p.used),
            Some(1),
            "two units came back: {:?}",
            done.permit()
        );
        done.complete(serde_json::json!({}));
        w.registry.return_leases(user).await;
        assert_eq!(w.usage.counter(user, Resource::ApiCalls, month), 1);
    }

    #[actix::test]
    async fn an_idle_lease_goes_back_to_the_store() {
        let w = world(32, Duration::from_millis(50), BTreeMap::new());
        let user = w.accounts.add(Plan::Pro);
        let month = month_of(chrono::Utc::now()).start;
        ticket(&w.registry, user)
            .await
            .expect("admitted")
            .complete(serde_json::json!({}));
        assert_eq!(w.usage.counter(user, Resource::ApiCalls, month), 32);
        for _ in 0..100 {
            if w.usage.counter(user, Resource::ApiCalls, month) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(w.usage.counter(user, Resource::ApiCalls, month), 1);
    }

    #[actix::test]
    async fn the_rate_limit_refuses_the_call_after_the_limit_and_gives_nothing_of_the_quota() {
        let limits = BTreeMap::from([(
            Bucket::Api,
            Quota {
                limit: 5,
                period_ms: 60_000,
            },
        )]);
        let w = world(32, Duration::from_secs(60), limits);
        let user = w.accounts.add(Plan::Pro);
        for i in 0..5 {
            let t = ticket(&w.registry, user).await.expect("admitted");
            assert_eq!(t.permit().and_then(|p| p.rate).map(|r| r.remaining), Some(4 - i));
            t.complete(serde_json::json!({}));
        }
        assert!(matches!(
            ticket(&w.registry, user).await,
            Err(Rejection::RateLimited { limit: 5, .. })
        ));
        let t = ticket(&w.registry, user).await;
        assert!(t.is_err());
        w.registry.return_leases(user).await;
        let month = month_of(chrono::Utc::now()).start;
        assert_eq!(w.usage.counter(user, Resource::ApiCalls, month), 5);
    }

    #[actix::test]
    async fn units_admitted_while_the_store_was_down_are_counted_before_the_session_goes() {
        use crate::admission::session::StoreDownPolicy;
        let w = crate::admission::fakes::world_with(32, Duration::from_secs(60), BTreeMap::new(), |c| {
            c.store_down = StoreDownPolicy::FailOpen { allowance: 5 };
            c.idle_timeout = Duration::from_millis(100);
        });
        let user = w.accounts.add(Plan::Pro);
        w.usage.down.store(true, Ordering::Relaxed);
        for _ in 0..2 {
            let t = ticket(&w.registry, user)
                .await
                .expect("admitted on the offline allowance");
            assert!(t.permit().is_some_and(|p| p.offline));
            t.complete(serde_json::json!({}));
        }
        // Idle, but holding units the counters lack: the session stays.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(w.registry.stats().active, 1, "the session waits for the store");
        w.usage.down.store(false, Ordering::Relaxed);
        let month = month_of(chrono::Utc::now()).start;
        // Up to 10 s: the reconciliation retries on a timer, and a loaded machine
        // (the whole test suite on 2 cores) can take more than a second or two.
        for _ in 0..500 {
            if w.registry.stats().active == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            w.usage.counter(user, Resource::ApiCalls, month),
            2,
            "both units counted"
        );
        assert_eq!(w.registry.stats().active, 0, "then it went");
    }

    #[actix::test]
    async fn a_user_has_at_most_the_configured_chats_in_progress_and_others_are_not_held_up() {
        let w = crate::admission::fakes::world_with(32, Duration::from_secs(60), BTreeMap::new(), |c| {
            c.max_concurrent_chats = 2;
        });
        let chat = || Admit {
            bucket: Some(Bucket::Chat),
            resource: Resource::Messages,
            cost: 1,
        };
        let (user, other) = (w.accounts.add(Plan::Pro), w.accounts.add(Plan::Pro));
        // Many at once: exactly two admitted, whatever the order in the mailbox.
        let results = join_all((0..10).map(|_| Ticket::admit(w.registry.clone(), user, chat()))).await;
        let (ok, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
        assert_eq!((ok.len(), refused.len()), (2, 8));
        assert!(refused.iter().all(|r| matches!(
            r,
            Err(Rejection::Busy {
                bucket: Bucket::Chat,
                limit: 2
            })
        )));
        // Other buckets and other users are not capped by it.
        ticket(&w.registry, user)
            .await
            .expect("an API call meanwhile")
            .complete(serde_json::json!({}));
        let theirs = Ticket::admit(w.registry.clone(), other, chat())
            .await
            .expect("another user");
        // A finished (completed) or abandoned (released, or dropped) turn frees its place.
        let mut ok = ok.into_iter().flatten();
        ok.next().expect("first").complete(serde_json::json!({}));
        let third = Ticket::admit(w.registry.clone(), user, chat())
            .await
            .expect("after one completed");
        assert!(matches!(
            Ticket::admit(w.registry.clone(), user, chat()).await,
            Err(Rejection::Busy { .. })
        ));
        drop(ok.next());
        drop(third);
        let again = join_all((0..3).map(|_| Ticket::admit(w.registry.clone(), user, chat()))).await;
        assert_eq!(again.iter().filter(|r| r.is_ok()).count(), 2, "both places free again");
        theirs.release();
        // Refusals cost nothing: one message recorded (the completed turn), and the
        // counter holds exactly the units admitted and not given back.
        drop(again);
        for _ in 0..200 {
            if w.usage.recorded(user) >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(w.usage.recorded(user), 2, "one chat and one API call");
    }

    #[actix::test]
    async fn a_deactivated_user_is_refused_once_this_node_forgets_the_row() {
        let w = world(32, Duration::from_secs(60), BTreeMap::new());
        let user = w.accounts.add(Plan::Pro);
        ticket(&w.registry, user)
            .await
            .expect("admitted")
            .complete(serde_json::json!({}));
        w.accounts.deactivate(user);
        // The admin route calls invalidate after the change: the cached row is dropped.
        w.registry.invalidate(user);
        assert!(w.users.cached(user).is_none());
        assert!(matches!(ticket(&w.registry, user).await, Err(Rejection::UnknownUser)));
    }
}
