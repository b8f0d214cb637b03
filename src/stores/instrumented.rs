//! Store calls timed and counted for /metrics: `store_operation_duration_seconds`
//! and `store_errors_total` by store, backend and operation. Wraps every store:
//! accounts and usage (SQL), rate limits (Redis), documents, conversations.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use ragchat_actors::chat::records::{ChatRecord, ChatSession, Cursor};
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ragchat_actors::admission::ratelimit::{Decision, Quota};
use ragchat_actors::domain::{
    ApiKey, AuditEntry, Invoice, NewUser, Organization, Page, Payment, RefreshOutcome, RefreshToken, Subscription,
    UpgradeDecision, UpgradeRequest, UpgradeStatus, UsageRecord, User, UserFilter, UserPatch,
};
use ragchat_actors::knowledge::{Chunk, Document, Owner, Reader};
use ragchat_actors::plans::{Period, Resource};
use ragchat_actors::ports::{
    AccountStore, ConversationStore, DocumentChange, DocumentStore, RateLimitStore, Reservation, StoreError,
    StoreResult, UsageStore,
};
use uuid::Uuid;

async fn timed<T>(
    store: &'static str,
    backend: &'static str,
    op: &'static str,
    call: impl Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    let started = Instant::now();
    let result = call.await;
    metrics::histogram!("store_operation_duration_seconds", "store" => store, "backend" => backend, "op" => op)
        .record(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        let kind = match e {
            StoreError::NotFound => "not_found",
            StoreError::Conflict(_) => "conflict",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Internal(_) => "internal",
        };
        metrics::counter!("store_errors_total", "store" => store, "backend" => backend, "op" => op, "kind" => kind)
            .increment(1);
    }
    result
}

/// A store that may not be connected yet: its calls answer `Unavailable` until
/// a connection made in the background fills it (a store unreachable when the
/// server starts does not keep the server from starting).
pub struct Slot<S: ?Sized> {
    pub backend: &'static str,
    store: std::sync::OnceLock<Arc<S>>,
    /// Why it was not connected at start.
    why: String,
}

impl<S: ?Sized> Slot<S> {
    pub fn ready(backend: &'static str, store: Arc<S>) -> Arc<Self> {
        let slot = Self::pending(backend, String::new());
        let _ = slot.store.set(store);
        slot
    }

    pub fn pending(backend: &'static str, why: String) -> Arc<Self> {
        Arc::new(Slot {
            backend,
            store: std::sync::OnceLock::new(),
            why,
        })
    }

    pub fn get(&self) -> StoreResult<&Arc<S>> {
        self.store
            .get()
            .ok_or_else(|| StoreError::Unavailable(format!("{} is not connected yet: {}", self.backend, self.why)))
    }

    pub fn fill(&self, store: Arc<S>) {
        let _ = self.store.set(store);
    }
}

/// As `timed_store!`, for a store behind a [`Slot`].
macro_rules! timed_slot_store {
    ($wrapper:ident, $trait:ident, $store:literal; $(fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        pub struct $wrapper(pub Arc<Slot<dyn $trait>>);

        #[async_trait]
        impl $trait for $wrapper {
            fn backend(&self) -> &'static str {
                self.0.backend
            }
            $(async fn $name(&self $(, $arg: $ty)*) -> $ret {
                timed($store, self.0.backend, stringify!($name), async { self.0.get()?.$name($($arg),*).await }).await
            })*
        }
    };
}

timed_slot_store!(Conversations, ConversationStore, "conversations";
    fn ping(&self) -> StoreResult<()>;
    fn create_session(&self, session: &ChatSession) -> StoreResult<()>;
    fn session(&self, user_id: Uuid, session_id: Uuid) -> StoreResult<Option<ChatSession>>;
    fn sessions(&self, user_id: Uuid, page: Page) -> StoreResult<(Vec<ChatSession>, u64)>;
    fn append(&self, user_id: Uuid, session_id: Uuid, messages: &[ChatRecord]) -> StoreResult<()>;
    fn messages(&self, user_id: Uuid, session_id: Uuid, before: Option<Cursor>, limit: u32) -> StoreResult<Vec<ChatRecord>>;
    fn delete_session(&self, user_id: Uuid, session_id: Uuid) -> StoreResult<bool>;
);

timed_slot_store!(Documents, DocumentStore, "documents";
    fn ping(&self) -> StoreResult<()>;
    fn insert_document(&self, doc: &Document, chunks: &[Chunk]) -> StoreResult<()>;
    fn document(&self, id: Uuid) -> StoreResult<Option<Document>>;
    fn document_by_hash(&self, owner: &Owner, content_hash: &str) -> StoreResult<Option<Document>>;
    fn list_documents(&self, reader: &Reader, page: Page) -> StoreResult<(Vec<Document>, u64)>;
    fn chunks(&self, document_id: Uuid) -> StoreResult<Vec<Chunk>>;
    fn documents_with_chunks(&self, ids: &[Uuid]) -> StoreResult<Vec<(Document, Vec<Chunk>)>>;
    fn document_ids(&self, owner: Option<&Owner>) -> StoreResult<Vec<Uuid>>;
    fn replace_chunks(&self, document_id: Uuid, chunks: &[Chunk]) -> StoreResult<bool>;
    fn delete_document(&self, id: Uuid) -> StoreResult<bool>;
    fn stored_bytes(&self, owner: &Owner) -> StoreResult<u64>;
    fn changes_after(&self, after: u64, limit: u32) -> StoreResult<Vec<DocumentChange>>;
    fn last_change(&self) -> StoreResult<u64>;
    fn prune_changes(&self, before: DateTime<Utc>) -> StoreResult<u64>;
);

/// A store of a trait whose methods all answer `StoreResult`, timed method by
/// method: `timed_store!(Wrapper, Trait, "store"; fn name(&self, arg: Type) -> Ret; ...)`.
/// The wrapper holds `inner` and the `backend` label.
macro_rules! timed_store {
    ($wrapper:ident, $trait:ident, $store:literal; $(fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        pub struct $wrapper {
            pub inner: Arc<dyn $trait>,
            pub backend: &'static str,
        }

        #[async_trait]
        impl $trait for $wrapper {
            $(async fn $name(&self $(, $arg: $ty)*) -> $ret {
                timed($store, self.backend, stringify!($name), self.inner.$name($($arg),*)).await
            })*
        }
    };
}

timed_store!(Usage, UsageStore, "usage";
    fn storage_epoch(&self, user_id: Uuid) -> StoreResult<u64>;
    fn hold_storage(&self, user_id: Uuid, id: Uuid, bytes: u64, stored: u64, epoch: u64, limit: u64, expire_before: DateTime<Utc>) -> StoreResult<Reservation>;
    fn release_storage(&self, user_id: Uuid, id: Uuid) -> StoreResult<()>;
    fn try_reserve(&self, user_id: Uuid, resource: Resource, period_start: DateTime<Utc>, cost: u64, limit: u64) -> StoreResult<Reservation>;
    fn release(&self, user_id: Uuid, resource: Resource, period_start: DateTime<Utc>, cost: u64) -> StoreResult<()>;
    fn force_add(&self, user_id: Uuid, resource: Resource, period_start: DateTime<Utc>, cost: u64) -> StoreResult<()>;
    fn counters(&self, user_id: Uuid, period_start: DateTime<Utc>) -> StoreResult<BTreeMap<Resource, u64>>;
    fn insert_usage(&self, records: &[UsageRecord]) -> StoreResult<u64>;
    fn usage_totals(&self, user_id: Uuid, period: Period) -> StoreResult<BTreeMap<Resource, u64>>;
    fn usage_record_count(&self, user_id: Uuid) -> StoreResult<u64>;
    fn subscription(&self, user_id: Uuid) -> StoreResult<Option<Subscription>>;
    fn put_subscription(&self, sub: &Subscription) -> StoreResult<()>;
    fn insert_invoice(&self, invoice: &Invoice) -> StoreResult<()>;
    fn invoices(&self, user_id: Uuid) -> StoreResult<Vec<Invoice>>;
    fn commit_plan_change(&self, expected: &Subscription, sub: &Subscription, request: Option<(Uuid, &UpgradeDecision)>) -> StoreResult<bool>;
    fn insert_upgrade_request(&self, request: &UpgradeRequest) -> StoreResult<()>;
    fn upgrade_request(&self, id: Uuid) -> StoreResult<Option<UpgradeRequest>>;
    fn latest_upgrade_request(&self, user_id: Uuid) -> StoreResult<Option<UpgradeRequest>>;
    fn upgrade_requests(&self, status: Option<UpgradeStatus>, page: Page) -> StoreResult<(Vec<UpgradeRequest>, u64)>;
    fn close_upgrade_request(&self, id: Uuid, decision: &UpgradeDecision) -> StoreResult<bool>;
    fn record_payment(&self, payment: &Payment, limit_cents: u64) -> StoreResult<bool>;
    fn refund_payment(&self, id: Uuid) -> StoreResult<bool>;
    fn payments(&self, user_id: Uuid) -> StoreResult<Vec<Payment>>;
);

timed_store!(RateLimits, RateLimitStore, "ratelimit";
    fn check(&self, key: &str, quota: Quota, cost: u32) -> StoreResult<Decision>;
);

/// Accounts, timed (as `timed_store!`, plus the untimed `backend`).
pub struct Accounts(pub Arc<dyn AccountStore>);

macro_rules! timed_accounts {
    ($(fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        #[async_trait]
        impl AccountStore for Accounts {
            fn backend(&self) -> &'static str {
                self.0.backend()
            }
            $(async fn $name(&self $(, $arg: $ty)*) -> $ret {
                timed("accounts", self.0.backend(), stringify!($name), self.0.$name($($arg),*)).await
            })*
        }
    };
}

timed_accounts!(
    fn ping(&self) -> StoreResult<()>;
    fn create_organization(&self, name: &str) -> StoreResult<Organization>;
    fn organization(&self, id: Uuid) -> StoreResult<Option<Organization>>;
    fn create_user(&self, user: NewUser) -> StoreResult<User>;
    fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>>;
    fn user_by_email(&self, email: &str) -> StoreResult<Option<User>>;
    fn list_users(&self, filter: &UserFilter, page: Page) -> StoreResult<(Vec<User>, u64)>;
    fn update_user(&self, id: Uuid, patch: &UserPatch) -> StoreResult<User>;
    fn insert_api_key(&self, key: &ApiKey) -> StoreResult<()>;
    fn list_api_keys(&self, user_id: Uuid) -> StoreResult<Vec<ApiKey>>;
    fn revoke_api_key(&self, user_id: Uuid, key_id: Uuid) -> StoreResult<bool>;
    fn use_api_key(&self, key_hash: &str) -> StoreResult<Option<ApiKey>>;
    fn insert_refresh_token(&self, token: &RefreshToken) -> StoreResult<()>;
    fn consume_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<RefreshOutcome>;
    fn revoke_refresh_family_of(&self, token_hash: &str) -> StoreResult<Option<Uuid>>;
    fn refresh_family_revoked(&self, family_id: Uuid) -> StoreResult<bool>;
    fn get_setting(&self, key: &str) -> StoreResult<Option<serde_json::Value>>;
    fn put_setting(&self, key: &str, value: &serde_json::Value) -> StoreResult<()>;
    fn record_audit(&self, entry: &AuditEntry) -> StoreResult<()>;
    fn audit_for(&self, target_id: Uuid) -> StoreResult<Vec<AuditEntry>>;
);
