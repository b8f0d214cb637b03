//! The user rows admission reads on every request (who is calling, active or
//! not, which plan), kept for at most `ttl` (a second by default) so a busy
//! user costs the account store one read a second instead of one a request.
//!
//! A change made on this node (deactivation, plan change, logout, key
//! revocation) forgets the row at once (`forget`); a change made on another
//! node is seen here when the row expires, within `ttl`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::domain::User;
use crate::ports::{AccountStore, StoreResult};

const SHARDS: usize = 16;

/// Rows of one shard and when each was read, and how many times the shard was
/// told to forget: a read that started before a `forget` must not put back the
/// row it read.
#[derive(Default)]
struct Shard {
    rows: HashMap<Uuid, (Arc<User>, Instant)>,
    forgets: u64,
}

pub struct UserCache {
    ttl: Duration,
    shards: Vec<Mutex<Shard>>,
}

impl UserCache {
    /// `ttl` zero: nothing is cached (every call reads the store).
    pub fn new(ttl: Duration) -> Self {
        UserCache {
            ttl,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    fn shard(&self, id: &Uuid) -> MutexGuard<'_, Shard> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        let m = &self.shards[(h.finish() as usize) % SHARDS];
        match m.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The row if it is fresh enough.
    pub fn cached(&self, id: Uuid) -> Option<Arc<User>> {
        let now = Instant::now();
        let shard = self.shard(&id);
        shard
            .rows
            .get(&id)
            .filter(|(_, at)| now.duration_since(*at) < self.ttl)
            .map(|(u, _)| u.clone())
    }

    /// The user's row: cached, else read from the store (and cached). None: no such user.
    pub async fn get(&self, accounts: &dyn AccountStore, id: Uuid) -> StoreResult<Option<Arc<User>>> {
        if let Some(u) = self.cached(id) {
            return Ok(Some(u));
        }
        let read_at = Instant::now();
        let forgets = self.shard(&id).forgets;
        let Some(user) = accounts.user_by_id(id).await? else {
            self.forget(id);
            return Ok(None);
        };
        let user = Arc::new(user);
        if !self.ttl.is_zero() {
            let mut shard = self.shard(&id);
            if shard.forgets == forgets {
                if shard.rows.len() > 100_000 {
                    // Bounded: drop what expired (a burst of one-off users).
                    let ttl = self.ttl;
                    shard.rows.retain(|_, (_, at)| read_at.duration_since(*at) < ttl);
                }
                shard.rows.insert(id, (user.clone(), read_at));
            }
        }
        Ok(Some(user))
    }

    /// Forgets a user's row (it changed on this node).
    pub fn forget(&self, id: Uuid) {
        let mut shard = self.shard(&id);
        shard.rows.remove(&id);
        shard.forgets += 1;
    }

    /// Forgets every row (plans or settings changed for everyone).
    pub fn clear(&self) {
        for s in &self.shards {
            let mut g = match s.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            g.rows.clear();
            g.forgets += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: Uuid) -> User {
        let now = chrono::Utc::now();
        User {
            id,
            email: "a@example.com".into(),
            hashed_password: "x".into(),
            full_name: None,
            is_active: true,
            is_verified: false,
            is_superuser: false,
            subscription_plan: crate::plans::Plan::Free,
            organization_id: None,
            preferences: serde_json::json!({}),
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn rows_expire_and_can_be_forgotten() {
        let id = Uuid::new_v4();
        let cache = UserCache::new(Duration::from_millis(50));
        cache.shard(&id).rows.insert(id, (Arc::new(user(id)), Instant::now()));
        assert!(cache.cached(id).is_some());
        cache.forget(id);
        assert!(cache.cached(id).is_none());
        cache
            .shard(&id)
            .rows
            .insert(id, (Arc::new(user(id)), Instant::now() - Duration::from_millis(60)));
        assert!(cache.cached(id).is_none(), "expired after the ttl");
        let none = UserCache::new(Duration::ZERO);
        none.shard(&id).rows.insert(id, (Arc::new(user(id)), Instant::now()));
        assert!(none.cached(id).is_none(), "a zero ttl caches nothing");
    }

    #[tokio::test]
    async fn a_row_read_before_a_forget_is_not_kept() {
        let accounts = Arc::new(crate::admission::fakes::Accounts::default());
        let id = accounts.add(crate::plans::Plan::Free);
        let cache = Arc::new(UserCache::new(Duration::from_secs(60)));
        // The row is changed (and forgotten) while it is being read.
        let during = cache.clone();
        if let Ok(mut hook) = accounts.during_read.lock() {
            *hook = Some(Box::new(move || during.forget(id)));
        }
        assert!(cache.get(accounts.as_ref(), id).await.ok().flatten().is_some());
        assert!(cache.cached(id).is_none(), "the stale row was not cached");
        if let Ok(mut hook) = accounts.during_read.lock() {
            *hook = None;
        }
        assert!(cache.get(accounts.as_ref(), id).await.ok().flatten().is_some());
        assert!(cache.cached(id).is_some());
    }
}
