//! Storage grants: room for new private documents under the plan's
//! `storage_mb`, held before an upload is stored. The hold itself is a row in
//! the SQL store (`UsageStore::hold_storage`), so uploads through every node
//! count against each other; the session keeps its own grants only to know it
//! is not idle while one is out.

use std::time::{Duration, Instant};

use uuid::Uuid;

/// A grant nobody handed back (its request vanished) stops counting after this.
pub const STORAGE_HOLD: Duration = Duration::from_secs(30 * 60);

/// Room reserved for one upload; handed back with `ReleaseStorage` once its
/// documents are stored (or not).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StorageGrant {
    pub id: Uuid,
    pub bytes: u64,
}

/// The grants of one user's uploads still being stored.
#[derive(Debug, Default)]
pub struct Holds {
    grants: Vec<(StorageGrant, Instant)>,
}

impl Holds {
    pub fn hold(&mut self, grant: StorageGrant, now: Instant) {
        self.grants.push((grant, now));
    }

    pub fn release(&mut self, id: Uuid) {
        self.grants.retain(|(g, _)| g.id != id);
    }

    pub fn expire(&mut self, now: Instant) {
        self.grants
            .retain(|(_, at)| now.saturating_duration_since(*at) < STORAGE_HOLD);
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_held_until_released_or_expired() {
        let now = Instant::now();
        let mut holds = Holds::default();
        let g = StorageGrant {
            id: Uuid::new_v4(),
            bytes: 1 << 20,
        };
        holds.hold(g, now);
        assert!(!holds.is_empty());
        holds.release(g.id);
        assert!(holds.is_empty());
        holds.hold(g, now);
        holds.expire(now + STORAGE_HOLD - std::time::Duration::from_secs(1));
        assert!(!holds.is_empty());
        holds.expire(now + STORAGE_HOLD);
        assert!(holds.is_empty(), "a forgotten grant expires");
    }
}
