//! Ports: what the core needs from the outside world. Adapters (SQLite, PostgreSQL,
//! and later MongoDB, Redis, ScyllaDB, candle models) live in the `ragchat` crate.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::{
    ApiKey, AuditEntry, NewUser, Organization, Page, RefreshOutcome, RefreshToken, User, UserFilter,
    UserPatch,
};

/// Errors any store may answer. Adapters map driver errors into these; the HTTP
/// layer maps these to status codes once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    /// The backend could not be reached or timed out: worth retrying later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Internal(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Accounts: users, organizations, API keys, refresh tokens, settings and the
/// admin audit log. Implemented for SQLite (embedded default) and PostgreSQL;
/// both pass the same contract tests (tests/api/account_store.rs).
#[async_trait]
pub trait AccountStore: Send + Sync + 'static {
    /// Name of the backend, for /ready and logs.
    fn backend(&self) -> &'static str;
    /// A cheap round trip proving the store answers.
    async fn ping(&self) -> StoreResult<()>;

    async fn create_organization(&self, name: &str) -> StoreResult<Organization>;
    async fn organization(&self, id: Uuid) -> StoreResult<Option<Organization>>;

    /// Creates a user; `Conflict` when the e-mail is taken.
    async fn create_user(&self, user: NewUser) -> StoreResult<User>;
    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>>;
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<User>>;
    /// Users matching the filter, oldest first, and the total count of matches.
    async fn list_users(&self, filter: &UserFilter, page: Page) -> StoreResult<(Vec<User>, u64)>;
    /// Applies the patch and returns the updated user; `NotFound` when absent.
    async fn update_user(&self, id: Uuid, patch: &UserPatch) -> StoreResult<User>;

    async fn insert_api_key(&self, key: &ApiKey) -> StoreResult<()>;
    /// Keys of a user that are not revoked, newest first.
    async fn list_api_keys(&self, user_id: Uuid) -> StoreResult<Vec<ApiKey>>;
    /// Revokes a key of this user; false when no live key of this user has that id.
    async fn revoke_api_key(&self, user_id: Uuid, key_id: Uuid) -> StoreResult<bool>;
    /// The live key with this hash, its last_used_at updated.
    async fn use_api_key(&self, key_hash: &str) -> StoreResult<Option<ApiKey>>;

    async fn insert_refresh_token(&self, token: &RefreshToken) -> StoreResult<()>;
    /// Atomically marks a live token used. A token presented twice (or after its
    /// family was revoked) revokes every token of its family.
    async fn consume_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<RefreshOutcome>;
    /// Revokes every live token of the family of this token (logout). False if unknown.
    async fn revoke_refresh_family_of(&self, token_hash: &str) -> StoreResult<bool>;

    async fn get_setting(&self, key: &str) -> StoreResult<Option<serde_json::Value>>;
    async fn put_setting(&self, key: &str, value: &serde_json::Value) -> StoreResult<()>;

    async fn record_audit(&self, entry: &AuditEntry) -> StoreResult<()>;
    /// Audit entries about a target, oldest first.
    async fn audit_for(&self, target_id: Uuid) -> StoreResult<Vec<AuditEntry>>;
}
