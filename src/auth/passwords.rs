//! Password hashing with argon2id. Verification of an unknown e-mail runs against a
//! dummy hash made with the same parameters, so "no such user" and "wrong password"
//! take the same time.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::config::Argon2Settings;

pub const MIN_PASSWORD_LEN: usize = 8;
/// Argon2 accepts any length; the cap keeps a request from making us hash megabytes.
pub const MAX_PASSWORD_LEN: usize = 256;

#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

#[derive(Clone)]
pub struct PasswordHasher {
    params: Params,
    dummy_hash: String,
}

impl PasswordHasher {
    pub fn new(settings: Argon2Settings) -> Result<Self, HashError> {
        let params = Params::new(settings.memory_kib, settings.iterations, settings.parallelism, None)
            .map_err(|e| HashError(e.to_string()))?;
        let mut hasher = PasswordHasher {
            params,
            dummy_hash: String::new(),
        };
        hasher.dummy_hash = hasher.hash("dummy password used to equalize login timing")?;
        Ok(hasher)
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`). CPU-bound: call off the
    /// async executor.
    pub fn hash(&self, password: &str) -> Result<String, HashError> {
        let salt = SaltString::generate(&mut OsRng);
        self.argon2()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| HashError(e.to_string()))
    }

    /// True when the password matches. With `stored = None` (unknown user) it
    /// verifies against the dummy hash and answers false, in the same time.
    pub fn verify(&self, password: &str, stored: Option<&str>) -> bool {
        let target = stored.unwrap_or(&self.dummy_hash);
        let Ok(parsed) = PasswordHash::new(target) else {
            return false;
        };
        // Parameters come from the stored hash, so old hashes keep verifying
        // after the configured parameters change.
        let ok = Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok();
        ok && stored.is_some()
    }
}

/// Password hashing off the async workers, at most `concurrency` at a time and
/// `max_waiting` queued: a flood of sign-ins cannot take every blocking thread
/// (nor all the memory argon2 takes per hash); past the queue, `Busy` at once.
pub struct HashPool {
    permits: tokio::sync::Semaphore,
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
}

/// The hashing queue is full.
#[derive(Debug, thiserror::Error)]
#[error("password hashing is busy")]
pub struct Busy;

impl HashPool {
    pub fn new(concurrency: usize, max_waiting: usize) -> Self {
        HashPool {
            permits: tokio::sync::Semaphore::new(concurrency.max(1)),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// Runs `work` (a hash or a verification) on the blocking pool when a slot
    /// is free; `Busy` when `max_waiting` calls already wait.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, Busy> {
        use std::sync::atomic::Ordering;
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy);
        }
        let permit = self.permits.acquire().await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        let _permit = permit.map_err(|_| Busy)?;
        tokio::task::spawn_blocking(work).await.map_err(|_| Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher() -> PasswordHasher {
        PasswordHasher::new(Argon2Settings {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        })
        .expect("valid params")
    }

    #[test]
    fn hashes_verify_and_are_salted() {
        let h = hasher();
        let a = h.hash("correct horse").expect("hash");
        let b = h.hash("correct horse").expect("hash");
        assert_ne!(a, b, "salt must differ");
        assert!(a.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"));
        assert!(h.verify("correct horse", Some(&a)));
        assert!(!h.verify("wrong horse", Some(&a)));
    }

    #[test]
    fn unknown_user_never_verifies() {
        let h = hasher();
        assert!(!h.verify("dummy password used to equalize login timing", None));
        assert!(!h.verify("anything", Some("not a phc string")));
    }

    #[tokio::test]
    async fn the_hash_pool_runs_a_bounded_number_and_refuses_past_its_queue() {
        let pool = std::sync::Arc::new(HashPool::new(1, 1));
        let slow = || std::thread::sleep(std::time::Duration::from_millis(300));
        let (a, b) = (pool.clone(), pool.clone());
        let first = tokio::spawn(async move { a.run(slow).await.is_ok() });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let second = tokio::spawn(async move { b.run(slow).await.is_ok() });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            pool.run(|| ()).await.is_err(),
            "one running, one waiting: the third is refused"
        );
        assert!(first.await.unwrap_or(false) && second.await.unwrap_or(false));
        assert!(pool.run(|| ()).await.is_ok(), "free again");
    }
}
