//! Credentials: password hashing (argon2id), access tokens (JWT, HS256), opaque
//! refresh tokens and API keys (random, stored as SHA-256 digests).

pub mod passwords;
pub mod tokens;

pub use passwords::PasswordHasher;
pub use tokens::{AccessClaims, TokenError, TokenService};

use rand::RngCore;
use sha2::{Digest, Sha256};

/// API keys start with this, so the auth layer can tell them from JWTs and
/// secret scanners can find leaked ones.
pub const API_KEY_PREFIX: &str = "rck_";
const REFRESH_PREFIX: &str = "rrt_";

/// 256 random bits, hex-encoded, behind a prefix.
fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

pub fn new_api_key() -> String {
    random_token(API_KEY_PREFIX)
}

pub fn new_refresh_token() -> String {
    random_token(REFRESH_PREFIX)
}

/// Digest under which opaque tokens are stored. A plain hash is enough: the tokens
/// carry 256 random bits, so there is nothing to brute-force (unlike passwords).
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_unique_prefixed_and_hash_stably() {
        let a = new_api_key();
        let b = new_api_key();
        assert_ne!(a, b);
        assert!(a.starts_with(API_KEY_PREFIX) && a.len() == API_KEY_PREFIX.len() + 64);
        assert_eq!(token_digest(&a), token_digest(&a));
        assert_ne!(token_digest(&a), token_digest(&b));
        assert!(new_refresh_token().starts_with(REFRESH_PREFIX));
    }
}
