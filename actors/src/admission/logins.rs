//! Which logins have ended, for the access tokens that carry one (`sid`, the
//! refresh-token family of the login).
//!
//! An access token is a signed JWT: nothing in it changes when its user logs
//! out. So authentication asks whether the token's login has ended (logout, or a
//! refresh token presented twice), and this cache keeps that question cheap:
//! - an ended login is remembered for `keep` (the life of an access token): it
//!   never comes back, so that answer needs no second read;
//! - a login still going is trusted for `ttl` (a second by default): a busy
//!   client costs the account store one read a second, not one a request.
//!
//! A logout on this node is told here at once (`end`); a logout on another node
//! is seen within `ttl`. A read that started before an `end` does not put back
//! "still going".
//!
//! One read per login at a time: a burst of requests of one login (a client
//! opening many connections at once) waits for the read in flight and shares its
//! answer, instead of each taking a database connection. Measured: without it,
//! 60 concurrent calls of one token over two servers answered up to 19 of them
//! 503 (connection pool timeouts) in `two_server_processes_sharing_postgres_…`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use uuid::Uuid;

use crate::ports::{AccountStore, StoreError, StoreResult};

/// The answer of a read in flight, for the requests waiting on it.
type Answer = Option<Result<bool, StoreError>>;

/// Entries held before the stale ones are swept (a burst of one-off logins).
const SWEEP_ABOVE: usize = 100_000;

#[derive(Default)]
struct State {
    /// Logins read as still going, and when.
    going: HashMap<Uuid, Instant>,
    /// Logins known to have ended, and since when.
    ended: HashMap<Uuid, Instant>,
    /// How many times `end` was called: a read that saw another count is stale.
    ends: u64,
    /// Reads in flight, by login: later requests wait for their answer.
    reading: HashMap<Uuid, watch::Receiver<Answer>>,
}

/// The read in flight of one login; its entry goes when it ends, answered or
/// not (a request dropped mid-read leaves its waiters to read themselves).
struct Flight<'a> {
    logins: &'a Logins,
    sid: Uuid,
    answer: watch::Sender<Answer>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.logins.state().reading.remove(&self.sid);
    }
}

/// A store error again, for each request that waited on the read.
fn same_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::NotFound => StoreError::NotFound,
        StoreError::Conflict(m) => StoreError::Conflict(m.clone()),
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Internal(m) => StoreError::Internal(m.clone()),
    }
}

pub struct Logins {
    ttl: Duration,
    keep: Duration,
    state: Mutex<State>,
}

impl Logins {
    /// `ttl`: how long "still going" is trusted (zero: the store is read every
    /// time); `keep`: how long an ended login is remembered (at least the life
    /// of an access token, so no token outlives the memory of its logout).
    pub fn new(ttl: Duration, keep: Duration) -> Self {
        Logins {
            ttl,
            keep,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The cached answer, if any: Some(true) ended, Some(false) going (fresh).
    pub fn cached(&self, sid: Uuid) -> Option<bool> {
        let now = Instant::now();
        let state = self.state();
        if state.ended.contains_key(&sid) {
            return Some(true);
        }
        state
            .going
            .get(&sid)
            .filter(|at| now.duration_since(**at) < self.ttl)
            .map(|_| false)
    }

    /// True when the login has ended: cached, else read from the store (or from
    /// the read of this login already in flight).
    pub async fn has_ended(&self, accounts: &dyn AccountStore, sid: Uuid) -> StoreResult<bool> {
        loop {
            if let Some(answer) = self.cached(sid) {
                return Ok(answer);
            }
            // Wait for the read in flight, or become it.
            let role = {
                let mut state = self.state();
                match state.reading.get(&sid) {
                    Some(rx) => Err(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        state.reading.insert(sid, rx);
                        Ok((tx, Instant::now(), state.ends))
                    }
                }
            };
            let mut waiting = match role {
                Err(waiting) => waiting,
                Ok((answer, read_at, ends)) => {
                    let flight = Flight {
                        logins: self,
                        sid,
                        answer,
                    };
                    return self.read(accounts, flight, read_at, ends).await;
                }
            };
            let answered = match waiting.wait_for(Option::is_some).await {
                Ok(a) => a.as_ref().map(|r| r.as_ref().copied().map_err(same_error)),
                Err(_) => None,
            };
            if let Some(result) = answered {
                return result;
            }
            // That read was dropped unanswered (its request went away): again.
        }
    }

    /// Reads the store for the flight, answers its waiters and caches the answer.
    async fn read(
        &self,
        accounts: &dyn AccountStore,
        flight: Flight<'_>,
        read_at: Instant,
        ends: u64,
    ) -> StoreResult<bool> {
        let read = accounts.refresh_family_revoked(flight.sid).await;
        flight
            .answer
            .send_replace(Some(read.as_ref().copied().map_err(same_error)));
        let sid = flight.sid;
        drop(flight);
        let ended = read?;
        let mut state = self.state();
        if ended {
            Self::remember_ended(&mut state, sid, read_at, self.keep);
        } else if !self.ttl.is_zero() && state.ends == ends {
            if state.going.len() > SWEEP_ABOVE {
                let ttl = self.ttl;
                state.going.retain(|_, at| read_at.duration_since(*at) < ttl);
            }
            state.going.insert(sid, read_at);
        }
        Ok(ended)
    }

    /// The login ended on this node (logout, reuse of a refresh token): its
    /// access tokens stop working here at once.
    pub fn end(&self, sid: Uuid) {
        let mut state = self.state();
        state.going.remove(&sid);
        state.ends += 1;
        Self::remember_ended(&mut state, sid, Instant::now(), self.keep);
    }

    fn remember_ended(state: &mut State, sid: Uuid, at: Instant, keep: Duration) {
        if state.ended.len() > SWEEP_ABOVE {
            // Every token of a login ended longer ago than `keep` has expired.
            state.ended.retain(|_, since| at.duration_since(*since) < keep);
        }
        state.ended.entry(sid).or_insert(at);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::admission::fakes::Accounts;

    #[tokio::test]
    async fn an_ended_login_is_read_once_and_a_going_one_once_per_ttl() {
        let accounts = Accounts::default();
        let logins = Logins::new(Duration::from_millis(40), Duration::from_secs(60));
        let sid = Uuid::new_v4();
        assert_eq!(logins.has_ended(&accounts, sid).await.ok(), Some(false));
        assert_eq!(logins.has_ended(&accounts, sid).await.ok(), Some(false));
        assert_eq!(accounts.family_reads(), 1, "the second answer came from the cache");
        // Ended on another node: seen once the cached answer is older than the ttl.
        accounts.revoke_family(sid);
        assert_eq!(
            logins.has_ended(&accounts, sid).await.ok(),
            Some(false),
            "within the ttl"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(logins.has_ended(&accounts, sid).await.ok(), Some(true));
        assert_eq!(logins.has_ended(&accounts, sid).await.ok(), Some(true));
        assert_eq!(accounts.family_reads(), 2, "an ended login is not read again");
    }

    #[tokio::test]
    async fn a_login_ended_on_this_node_stops_at_once_and_a_zero_ttl_always_reads() {
        let accounts = Accounts::default();
        let logins = Logins::new(Duration::from_secs(60), Duration::from_secs(60));
        let sid = Uuid::new_v4();
        assert_eq!(logins.has_ended(&accounts, sid).await.ok(), Some(false));
        logins.end(sid);
        assert_eq!(logins.cached(sid), Some(true));
        let uncached = Logins::new(Duration::ZERO, Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(uncached.has_ended(&accounts, sid).await.ok(), Some(false));
        }
        assert_eq!(accounts.family_reads(), 4);
    }

    #[tokio::test]
    async fn a_burst_of_requests_of_one_login_costs_one_read() {
        let accounts = Accounts::default();
        let logins = Logins::new(Duration::from_secs(60), Duration::from_secs(60));
        let sid = Uuid::new_v4();
        let burst = (0..20).map(|_| logins.has_ended(&accounts, sid));
        let answers = futures_util::future::join_all(burst).await;
        assert!(answers.iter().all(|a| matches!(a, Ok(false))), "{answers:?}");
        assert_eq!(accounts.family_reads(), 1);
        assert!(logins.state().reading.is_empty());
        // Uncached (ttl zero), a burst still shares the read in flight.
        let uncached = Logins::new(Duration::ZERO, Duration::from_secs(60));
        let burst = (0..20).map(|_| uncached.has_ended(&accounts, sid));
        futures_util::future::join_all(burst).await;
        assert_eq!(accounts.family_reads(), 2);
    }

    #[tokio::test]
    async fn a_read_dropped_mid_way_leaves_no_flight_behind() {
        use futures_util::FutureExt;
        let accounts = Accounts::default();
        let logins = Logins::new(Duration::from_secs(60), Duration::from_secs(60));
        let sid = Uuid::new_v4();
        let mut gone = Box::pin(logins.has_ended(&accounts, sid));
        assert!((&mut gone).now_or_never().is_none(), "waiting for the store");
        let mut waiter = Box::pin(logins.has_ended(&accounts, sid));
        assert!((&mut waiter).now_or_never().is_none(), "waiting for that read");
        drop(gone);
        assert_eq!(waiter.await.ok(), Some(false), "the waiter read it itself");
        assert!(logins.state().reading.is_empty());
        assert_eq!(accounts.family_reads(), 2);
    }

    #[tokio::test]
    async fn a_read_that_started_before_an_end_does_not_put_back_going() {
        let accounts = Arc::new(Accounts::default());
        let logins = Arc::new(Logins::new(Duration::from_secs(60), Duration::from_secs(60)));
        let sid = Uuid::new_v4();
        // The login ends (on this node) while the store is being read.
        let during = logins.clone();
        if let Ok(mut hook) = accounts.during_read.lock() {
            *hook = Some(Box::new(move || during.end(sid)));
        }
        assert_eq!(logins.has_ended(accounts.as_ref(), sid).await.ok(), Some(false));
        assert_eq!(logins.cached(sid), Some(true), "the stale answer was not kept");
    }
}
