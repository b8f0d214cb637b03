//! Storage reservations: room for new private documents under the plan's
//! `storage_mb`, reserved before an upload is stored. A user's reservations
//! are checked one at a time (in the session's mailbox), and bytes reserved by
//! uploads still being stored count as used, so two concurrent uploads cannot
//! both fit into the last megabyte.

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

/// A reservation that does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub used_bytes: u64,
    pub requested_bytes: u64,
    pub limit_bytes: u64,
}

/// Whether `requested` more bytes fit: `stored` bytes in the store plus
/// `reserved` bytes of uploads in progress, against `limit_bytes`.
pub fn check(stored: u64, reserved: u64, requested: u64, limit_bytes: u64) -> Result<(), Exceeded> {
    let used_bytes = stored.saturating_add(reserved);
    if used_bytes.saturating_add(requested) > limit_bytes {
        return Err(Exceeded {
            used_bytes,
            requested_bytes: requested,
            limit_bytes,
        });
    }
    Ok(())
}

/// The grants of one user's uploads still being stored.
#[derive(Debug, Default)]
pub struct Holds {
    grants: Vec<(StorageGrant, Instant)>,
}

impl Holds {
    /// Bytes held by live grants (expired ones are dropped first).
    pub fn reserved(&mut self, now: Instant) -> u64 {
        self.expire(now);
        self.grants.iter().map(|(g, _)| g.bytes).sum()
    }

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
    fn reserved_bytes_count_as_used_until_released_or_expired() {
        let mb = 1u64 << 20;
        assert!(check(0, 0, mb, mb).is_ok(), "exactly the limit fits");
        assert!(matches!(
            check(mb / 2, mb / 2, 1, mb),
            Err(Exceeded { used_bytes, requested_bytes: 1, .. }) if used_bytes == mb
        ));
        let now = Instant::now();
        let mut holds = Holds::default();
        let g = StorageGrant {
            id: Uuid::new_v4(),
            bytes: mb,
        };
        holds.hold(g, now);
        assert_eq!(holds.reserved(now), mb);
        assert!(
            check(0, holds.reserved(now), 1, mb).is_err(),
            "a second upload does not fit meanwhile"
        );
        holds.release(g.id);
        assert_eq!(holds.reserved(now), 0);
        holds.hold(g, now);
        assert_eq!(holds.reserved(now + STORAGE_HOLD), 0, "a forgotten grant expires");
        assert!(holds.is_empty());
    }
}
