//! Ports: what the core needs from the outside world. Adapters (SQLite, PostgreSQL,
//! and later MongoDB, Redis, ScyllaDB, candle models) live in the `ragchat` crate.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::chat::records::{ChatRecord, ChatSession, Cursor};
use crate::domain::{
    ApiKey, AuditEntry, Invoice, NewUser, Organization, Page, Payment, RefreshOutcome, RefreshToken, Subscription,
    UpgradeDecision, UpgradeRequest, UpgradeStatus, UsageRecord, User, UserFilter, UserPatch,
};
use crate::knowledge::{Chunk, Document, Owner, Reader};
use crate::plans::{Period, Resource};

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
    /// The live key with this hash; last_used_at is refreshed when older than a minute.
    async fn use_api_key(&self, key_hash: &str) -> StoreResult<Option<ApiKey>>;

    async fn insert_refresh_token(&self, token: &RefreshToken) -> StoreResult<()>;
    /// Atomically marks a live token used. A token presented twice (or after its
    /// family was revoked) revokes every token of its family.
    async fn consume_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<RefreshOutcome>;
    /// Revokes every live token of the family of this token (logout): the family's
    /// id, None when the token is unknown.
    async fn revoke_refresh_family_of(&self, token_hash: &str) -> StoreResult<Option<Uuid>>;
    /// True when the family (one login and its rotations) was revoked: by logout,
    /// or because one of its refresh tokens was presented twice. Access tokens of
    /// that login stop working with it.
    async fn refresh_family_revoked(&self, family_id: Uuid) -> StoreResult<bool>;

    async fn get_setting(&self, key: &str) -> StoreResult<Option<serde_json::Value>>;
    async fn put_setting(&self, key: &str, value: &serde_json::Value) -> StoreResult<()>;

    async fn record_audit(&self, entry: &AuditEntry) -> StoreResult<()>;
    /// Audit entries about a target, oldest first.
    async fn audit_for(&self, target_id: Uuid) -> StoreResult<Vec<AuditEntry>>;
}

/// Outcome of asking for quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Granted; the counter now stands at `used`.
    Granted { used: u64 },
    /// Would exceed the limit; the counter stands at `used`, unchanged.
    Denied { used: u64 },
}

/// Quota counters, the usage ledger, subscriptions and invoices. Shares the
/// account database (SQLite or PostgreSQL).
#[async_trait]
pub trait UsageStore: Send + Sync + 'static {
    /// A user's storage epoch: it grows with every storage hold released. Read it
    /// before reading the user's stored bytes and pass it to `hold_storage`.
    async fn storage_epoch(&self, user_id: Uuid) -> StoreResult<u64>;
    /// Holds `bytes` of storage for upload `id` when `stored` (the user's bytes in
    /// the document store, read after `epoch`) plus the user's holds plus `bytes`
    /// stay within `limit`. Holds that count: those not released (made after
    /// `expire_before`) and those released after `epoch` (their documents may be
    /// missing from `stored`). Serialized per user across processes.
    #[allow(clippy::too_many_arguments)]
    async fn hold_storage(
        &self,
        user_id: Uuid,
        id: Uuid,
        bytes: u64,
        stored: u64,
        epoch: u64,
        limit: u64,
        expire_before: DateTime<Utc>,
    ) -> StoreResult<Reservation>;
    /// Releases a storage hold once its upload's documents are stored (or not):
    /// moves the user's epoch on and marks the hold released at it.
    async fn release_storage(&self, user_id: Uuid, id: Uuid) -> StoreResult<()>;
    /// Atomically adds `cost` to the (user, resource, period) counter when the sum
    /// stays within `limit`. This single conditional write is what keeps several
    /// server processes from over-admitting.
    async fn try_reserve(
        &self,
        user_id: Uuid,
        resource: Resource,
        period_start: DateTime<Utc>,
        cost: u64,
        limit: u64,
    ) -> StoreResult<Reservation>;
    /// Gives back units reserved for work that did not happen.
    async fn release(
        &self,
        user_id: Uuid,
        resource: Resource,
        period_start: DateTime<Utc>,
        cost: u64,
    ) -> StoreResult<()>;
    /// Adds units unconditionally (reconciling work admitted while the store was down).
    async fn force_add(
        &self,
        user_id: Uuid,
        resource: Resource,
        period_start: DateTime<Utc>,
        cost: u64,
    ) -> StoreResult<()>;
    /// Counter values of a user for a period.
    async fn counters(&self, user_id: Uuid, period_start: DateTime<Utc>) -> StoreResult<BTreeMap<Resource, u64>>;

    /// Writes usage records; records whose id is already stored are skipped.
    /// Returns how many were new.
    async fn insert_usage(&self, records: &[UsageRecord]) -> StoreResult<u64>;
    /// Sum of recorded quantities per resource of the quota months within `period`.
    async fn usage_totals(&self, user_id: Uuid, period: Period) -> StoreResult<BTreeMap<Resource, u64>>;
    /// Number of usage records of a user (all time): for audits and tests.
    async fn usage_record_count(&self, user_id: Uuid) -> StoreResult<u64>;

    async fn subscription(&self, user_id: Uuid) -> StoreResult<Option<Subscription>>;
    async fn put_subscription(&self, sub: &Subscription) -> StoreResult<()>;
    /// Stores an invoice unless one exists for the same user and period start.
    async fn insert_invoice(&self, invoice: &Invoice) -> StoreResult<()>;
    /// A user's invoices, oldest period first.
    async fn invoices(&self, user_id: Uuid) -> StoreResult<Vec<Invoice>>;

    /// Applies a plan change in one transaction: writes `sub` only while the stored
    /// subscription still has `expected`'s plan, billing cycle and adjustments (a
    /// change made meanwhile wins: false, nothing written), sets the user's
    /// `subscription_plan` to `sub.plan`, and, when `request` is given, closes that
    /// upgrade request with the decision — only while it is pending (false
    /// otherwise, nothing written).
    async fn commit_plan_change(
        &self,
        expected: &Subscription,
        sub: &Subscription,
        request: Option<(Uuid, &UpgradeDecision)>,
    ) -> StoreResult<bool>;
    /// Stores a new pending upgrade request; `Conflict` when the user already has
    /// a pending one.
    async fn insert_upgrade_request(&self, request: &UpgradeRequest) -> StoreResult<()>;
    async fn upgrade_request(&self, id: Uuid) -> StoreResult<Option<UpgradeRequest>>;
    /// The user's newest upgrade request, whatever its status (a pending one is
    /// always the newest: there is at most one and no other can be made meanwhile).
    async fn latest_upgrade_request(&self, user_id: Uuid) -> StoreResult<Option<UpgradeRequest>>;
    /// Upgrade requests with this status (all when None), oldest first, and their total.
    async fn upgrade_requests(
        &self,
        status: Option<UpgradeStatus>,
        page: Page,
    ) -> StoreResult<(Vec<UpgradeRequest>, u64)>;
    /// Closes a pending request with the decision; false when it was not pending.
    async fn close_upgrade_request(&self, id: Uuid, decision: &UpgradeDecision) -> StoreResult<bool>;

    /// Records a charge of the `invoice` payment provider unless the user's charges
    /// (not refunded) of `payment.month_start`'s month, with this one, would pass
    /// `limit_cents`: false then, nothing written. The check is one conditional
    /// increment (as `try_reserve`), so concurrent charges cannot pass the limit.
    /// A payment id already recorded is not charged again (true).
    async fn record_payment(&self, payment: &Payment, limit_cents: u64) -> StoreResult<bool>;
    /// Marks a recorded charge refunded (and gives its amount back to the month's
    /// credit); false when there was none to refund.
    async fn refund_payment(&self, id: Uuid) -> StoreResult<bool>;
    /// A user's recorded charges, oldest first.
    async fn payments(&self, user_id: Uuid) -> StoreResult<Vec<Payment>>;
}

/// A charge to make through a [`PaymentProvider`].
#[derive(Debug, Clone, PartialEq)]
pub struct ChargeRequest {
    /// The idempotency key: the same key charges once.
    pub id: Uuid,
    pub user_id: Uuid,
    pub amount_cents: u64,
    pub currency: String,
    /// What the charge is for, as the customer's statement shows it.
    pub description: String,
}

/// The provider's reference of a successful charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRef {
    /// The provider's name (`billing.payment_provider`).
    pub provider: &'static str,
    pub reference: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PaymentError {
    /// The provider refused the charge (card declined, credit limit reached):
    /// nothing was charged.
    #[error("payment declined: {0}")]
    Declined(String),
    /// The provider could not be reached or timed out: worth retrying later.
    #[error("payment provider unavailable: {0}")]
    Unavailable(String),
    #[error("payment error: {0}")]
    Internal(String),
}

impl From<StoreError> for PaymentError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => PaymentError::Unavailable(m),
            other => PaymentError::Internal(other.to_string()),
        }
    }
}

/// Takes payments for self-service plan changes. Without one (the default,
/// `billing.payment_provider = "none"`) an upgrade becomes a request an
/// administrator approves. Adapters: `src/payments.rs`.
#[async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    /// The provider's name, as configured.
    fn name(&self) -> &'static str;
    /// Charges the amount, once per `charge.id`; `Declined` when refused.
    async fn charge(&self, charge: &ChargeRequest) -> Result<PaymentRef, PaymentError>;
    /// Gives a successful charge back whole (the change it paid for could not be applied).
    async fn refund(&self, payment: &PaymentRef) -> Result<(), PaymentError>;
}

/// Shared rate-limit state (Redis). Each check is one atomic operation on the
/// server. `Unavailable` means the caller should fall back to local state.
#[async_trait]
pub trait RateLimitStore: Send + Sync + 'static {
    async fn check(
        &self,
        key: &str,
        quota: crate::admission::ratelimit::Quota,
        cost: u32,
    ) -> StoreResult<crate::admission::ratelimit::Decision>;
}

/// The knowledge base's documents and chunks. Implemented for SQLite (embedded
/// default) and MongoDB; both pass the same contract tests
/// (tests/api/document_store.rs). Search indexes are built from it in process.
#[async_trait]
pub trait DocumentStore: Send + Sync + 'static {
    fn backend(&self) -> &'static str;
    async fn ping(&self) -> StoreResult<()>;

    /// Stores a document and its chunks, all or nothing. `Conflict` when the owner
    /// already has a document with the same content hash.
    async fn insert_document(&self, doc: &Document, chunks: &[Chunk]) -> StoreResult<()>;
    async fn document(&self, id: Uuid) -> StoreResult<Option<Document>>;
    async fn document_by_hash(&self, owner: &Owner, content_hash: &str) -> StoreResult<Option<Document>>;
    /// Documents the reader may see, newest first, and their total.
    async fn list_documents(&self, reader: &Reader, page: Page) -> StoreResult<(Vec<Document>, u64)>;
    /// The chunks of a document, in order.
    async fn chunks(&self, document_id: Uuid) -> StoreResult<Vec<Chunk>>;
    /// The documents of `ids` that exist, each with its chunks in order (any
    /// order of documents): what the index catch-up reads, many at a time. A
    /// store with round trips worth saving reads them in a few queries.
    async fn documents_with_chunks(&self, ids: &[Uuid]) -> StoreResult<Vec<(Document, Vec<Chunk>)>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(doc) = self.document(*id).await? {
                let chunks = self.chunks(*id).await?;
                out.push((doc, chunks));
            }
        }
        Ok(out)
    }
    /// Every document id, or those of one owner, oldest first (to rebuild the
    /// search indexes at start; to clear seeded documents).
    async fn document_ids(&self, owner: Option<&Owner>) -> StoreResult<Vec<Uuid>>;
    /// Replaces a document's chunks (and its `chunk_count`) with these: a reader
    /// of `chunks` sees the old set or the new one, never a mix or none. False
    /// when there is no such document (nothing is written).
    async fn replace_chunks(&self, document_id: Uuid, chunks: &[Chunk]) -> StoreResult<bool>;
    /// Deletes a document and its chunks; false when there was none.
    async fn delete_document(&self, id: Uuid) -> StoreResult<bool>;
    /// Bytes of text an owner has stored.
    async fn stored_bytes(&self, owner: &Owner) -> StoreResult<u64>;

    /// Up to `limit` entries of the change feed after sequence number `after`, in
    /// sequence order. Every write above (insert, re-chunking, delete) adds one
    /// entry; numbers grow but a number may show up after a higher one (writers
    /// on other nodes) or never (a writer that died between its write and its
    /// entry): followers wait a while for gaps, and reconcile periodically.
    async fn changes_after(&self, after: u64, limit: u32) -> StoreResult<Vec<DocumentChange>>;
    /// The highest sequence number in the feed (0 when it is empty).
    async fn last_change(&self) -> StoreResult<u64>;
    /// Deletes feed entries written before `before`; how many.
    async fn prune_changes(&self, before: DateTime<Utc>) -> StoreResult<u64>;
}

/// What happened to a document, as the change feed tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Stored,
    /// Its chunks were replaced (re-indexing).
    Rechunked,
    Deleted,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Stored => "stored",
            ChangeKind::Rechunked => "rechunked",
            ChangeKind::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [ChangeKind::Stored, ChangeKind::Rechunked, ChangeKind::Deleted]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// One entry of the document change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocumentChange {
    pub seq: u64,
    pub document_id: Uuid,
    pub kind: ChangeKind,
}

/// Conversations: sessions by user, messages by (user, session) in time order.
/// Implemented for SQLite (embedded default) and ScyllaDB/Cassandra; both pass
/// the same contract tests (tests/api/conversation_store.rs). Every call names
/// the user: a session of another user is simply not there.
#[async_trait]
pub trait ConversationStore: Send + Sync + 'static {
    fn backend(&self) -> &'static str;
    async fn ping(&self) -> StoreResult<()>;

    /// Creates a session; `Conflict` if this user already has one with this id.
    async fn create_session(&self, session: &ChatSession) -> StoreResult<()>;
    async fn session(&self, user_id: Uuid, session_id: Uuid) -> StoreResult<Option<ChatSession>>;
    /// A user's sessions, most recently active first, and their total.
    async fn sessions(&self, user_id: Uuid, page: Page) -> StoreResult<(Vec<ChatSession>, u64)>;
    /// Appends messages (a question and its answer) to a session of this user and
    /// moves its `updated_at` to the last of them.
    async fn append(&self, user_id: Uuid, session_id: Uuid, messages: &[ChatRecord]) -> StoreResult<()>;
    /// Up to `limit` messages older than `before` (all when None), newest first.
    async fn messages(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        before: Option<Cursor>,
        limit: u32,
    ) -> StoreResult<Vec<ChatRecord>>;
    /// Deletes a session and its messages; false when this user has no such session.
    async fn delete_session(&self, user_id: Uuid, session_id: Uuid) -> StoreResult<bool>;
}
