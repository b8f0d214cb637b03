//! Store calls timed and counted for /metrics: `store_operation_duration_seconds`
//! and `store_errors_total` by store, backend and operation. Wraps the
//! conversation and document stores.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use ragchat_actors::chat::{ChatRecord, ChatSession, Cursor};
use ragchat_actors::domain::Page;
use ragchat_actors::knowledge::{Chunk, Document, Owner, Reader};
use ragchat_actors::ports::{ConversationStore, DocumentStore, StoreError, StoreResult};
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

pub struct Conversations(pub Arc<dyn ConversationStore>);

#[async_trait]
impl ConversationStore for Conversations {
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    async fn ping(&self) -> StoreResult<()> {
        timed("conversations", self.backend(), "ping", self.0.ping()).await
    }
    async fn create_session(&self, session: &ChatSession) -> StoreResult<()> {
        timed(
            "conversations",
            self.backend(),
            "create_session",
            self.0.create_session(session),
        )
        .await
    }
    async fn session(&self, user_id: Uuid, session_id: Uuid) -> StoreResult<Option<ChatSession>> {
        timed(
            "conversations",
            self.backend(),
            "session",
            self.0.session(user_id, session_id),
        )
        .await
    }
    async fn sessions(&self, user_id: Uuid, page: Page) -> StoreResult<(Vec<ChatSession>, u64)> {
        timed(
            "conversations",
            self.backend(),
            "sessions",
            self.0.sessions(user_id, page),
        )
        .await
    }
    async fn append(&self, user_id: Uuid, session_id: Uuid, messages: &[ChatRecord]) -> StoreResult<()> {
        timed(
            "conversations",
            self.backend(),
            "append",
            self.0.append(user_id, session_id, messages),
        )
        .await
    }
    async fn messages(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        before: Option<Cursor>,
        limit: u32,
    ) -> StoreResult<Vec<ChatRecord>> {
        timed(
            "conversations",
            self.backend(),
            "messages",
            self.0.messages(user_id, session_id, before, limit),
        )
        .await
    }
    async fn delete_session(&self, user_id: Uuid, session_id: Uuid) -> StoreResult<bool> {
        timed(
            "conversations",
            self.backend(),
            "delete_session",
            self.0.delete_session(user_id, session_id),
        )
        .await
    }
}

pub struct Documents(pub Arc<dyn DocumentStore>);

#[async_trait]
impl DocumentStore for Documents {
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    async fn ping(&self) -> StoreResult<()> {
        timed("documents", self.backend(), "ping", self.0.ping()).await
    }
    async fn insert_document(&self, doc: &Document, chunks: &[Chunk]) -> StoreResult<()> {
        timed(
            "documents",
            self.backend(),
            "insert_document",
            self.0.insert_document(doc, chunks),
        )
        .await
    }
    async fn document(&self, id: Uuid) -> StoreResult<Option<Document>> {
        timed("documents", self.backend(), "document", self.0.document(id)).await
    }
    async fn document_by_hash(&self, owner: &Owner, content_hash: &str) -> StoreResult<Option<Document>> {
        timed(
            "documents",
            self.backend(),
            "document_by_hash",
            self.0.document_by_hash(owner, content_hash),
        )
        .await
    }
    async fn list_documents(&self, reader: &Reader, page: Page) -> StoreResult<(Vec<Document>, u64)> {
        timed(
            "documents",
            self.backend(),
            "list_documents",
            self.0.list_documents(reader, page),
        )
        .await
    }
    async fn chunks(&self, document_id: Uuid) -> StoreResult<Vec<Chunk>> {
        timed("documents", self.backend(), "chunks", self.0.chunks(document_id)).await
    }
    async fn document_ids(&self, owner: Option<&Owner>) -> StoreResult<Vec<Uuid>> {
        timed("documents", self.backend(), "document_ids", self.0.document_ids(owner)).await
    }
    async fn delete_document(&self, id: Uuid) -> StoreResult<bool> {
        timed(
            "documents",
            self.backend(),
            "delete_document",
            self.0.delete_document(id),
        )
        .await
    }
    async fn stored_bytes(&self, owner: &Owner) -> StoreResult<u64> {
        timed("documents", self.backend(), "stored_bytes", self.0.stored_bytes(owner)).await
    }
}
