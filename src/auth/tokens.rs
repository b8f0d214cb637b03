//! Access tokens: JWT signed with HS256. The algorithm is pinned: a token whose
//! header names any other algorithm (including "none") is rejected, and exp, nbf,
//! iat, iss, aud and sub are all required.

use chrono::Utc;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::AuthSettings;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccessClaims {
    pub sub: Uuid,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub iss: String,
    pub aud: String,
    pub jti: Uuid,
    /// The login this token belongs to (its refresh-token family): when that login
    /// ends (logout, or a refresh token presented twice) the token stops working
    /// too. Tokens issued before this claim existed have none and run to `exp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<Uuid>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token has expired")]
    Expired,
    #[error("invalid token")]
    Invalid,
    #[error("token signing failed: {0}")]
    Signing(String),
}

#[derive(Clone)]
pub struct TokenService {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    pub access_ttl_secs: u64,
    pub refresh_ttl_secs: u64,
}

impl TokenService {
    pub fn new(settings: &AuthSettings) -> Self {
        let secret = settings.jwt_secret.expose().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 5;
        TokenService {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            access_ttl_secs: settings.access_token_ttl_secs,
            refresh_ttl_secs: settings.refresh_token_ttl_secs,
        }
    }

    /// An access token of `user_id` for the login `sid` (its refresh-token family).
    pub fn issue(&self, user_id: Uuid, sid: Uuid) -> Result<String, TokenError> {
        let now = Utc::now().timestamp();
        let claims = AccessClaims {
            sub: user_id,
            exp: now + i64::try_from(self.access_ttl_secs).unwrap_or(i64::MAX / 2),
            iat: now,
            nbf: now,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            jti: Uuid::new_v4(),
            sid: Some(sid),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).map_err(|e| TokenError::Signing(e.to_string()))
    }

    pub fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        decode::<AccessClaims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })
    }
}
