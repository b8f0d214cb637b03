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
}
