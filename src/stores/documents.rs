//! DocumentStore adapters: SQLite (the embedded default, in its own database file)
//! and MongoDB (documents, chunks and embeddings collections, indexes created at
//! start). Both pass the contract tests in tests/api/document_store.rs.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mongodb::bson::{doc, spec::BinarySubtype, Binary, Bson, Document as BsonDoc};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use ragchat_actors::domain::Page;
use ragchat_actors::knowledge::{embedding_from_bytes, embedding_to_bytes, Chunk, Document, Owner, Reader};
use ragchat_actors::ports::{ChangeKind, DocumentChange, DocumentStore, StoreError, StoreResult};
use sqlx::types::Json;
use sqlx::{Row, SqlitePool};
use std::collections::HashMap;
use uuid::Uuid;

use super::store_error;

/// How often a chunk read follows a re-index's switch before giving up.
const CHUNK_READ_TRIES: usize = 8;

fn bad_row(what: &str) -> StoreError {
    StoreError::Internal(format!("stored {what} is malformed"))
}

pub struct SqliteDocumentStore {
    pool: SqlitePool,
}

impl SqliteDocumentStore {
    pub fn new(pool: SqlitePool) -> Self {
        SqliteDocumentStore { pool }
    }

    /// The document a query selects, if any.
    async fn one<'q>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    ) -> StoreResult<Option<Document>> {
        q.fetch_optional(&self.pool)
            .await
            .map_err(store_error)?
            .as_ref()
            .map(sqlite_document)
            .transpose()
    }
}

const DOC_COLUMNS: &str =
    "id, owner, title, source, content_hash, size_bytes, metadata, chunk_count, created_at, origin";

fn sqlite_document(row: &sqlx::sqlite::SqliteRow) -> StoreResult<Document> {
    let owner: String = row.try_get("owner").map_err(store_error)?;
    let metadata: Json<serde_json::Map<String, serde_json::Value>> = row.try_get("metadata").map_err(store_error)?;
    let size: i64 = row.try_get("size_bytes").map_err(store_error)?;
    let chunks: i64 = row.try_get("chunk_count").map_err(store_error)?;
    Ok(Document {
        id: row.try_get("id").map_err(store_error)?,
        owner: owner.parse().map_err(|_| bad_row("owner"))?,
        title: row.try_get("title").map_err(store_error)?,
        source: row.try_get("source").map_err(store_error)?,
        origin: row.try_get("origin").map_err(store_error)?,
        content_hash: row.try_get("content_hash").map_err(store_error)?,
        size_bytes: u64::try_from(size).map_err(|_| bad_row("size"))?,
        metadata: metadata.0,
        chunk_count: u32::try_from(chunks).map_err(|_| bad_row("chunk count"))?,
        created_at: row.try_get("created_at").map_err(store_error)?,
    })
}

/// `$1, $2, …` from `start` for `n` values.
fn placeholders(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes a document's chunks inside the caller's transaction.
async fn insert_chunks(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    document_id: Uuid,
    chunks: &[Chunk],
) -> StoreResult<()> {
    for c in chunks {
        sqlx::query("INSERT INTO chunks (id, document_id, ordinal, content, embedding) VALUES ($1, $2, $3, $4, $5)")
            .bind(c.id)
            .bind(document_id)
            .bind(i64::from(c.ordinal))
            .bind(&c.content)
            .bind(embedding_to_bytes(&c.embedding))
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
    }
    Ok(())
}

/// Adds a change-feed entry inside the caller's transaction.
async fn record_change(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    document_id: Uuid,
    kind: ChangeKind,
) -> StoreResult<()> {
    sqlx::query("INSERT INTO document_changes (document_id, kind, at) VALUES ($1, $2, $3)")
        .bind(document_id)
        .bind(kind.as_str())
        .bind(Utc::now())
        .execute(&mut **tx)
        .await
        .map_err(store_error)?;
    Ok(())
}

#[async_trait]
impl DocumentStore for SqliteDocumentStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(store_error)?;
        Ok(())
    }

    async fn insert_document(&self, d: &Document, chunks: &[Chunk]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        sqlx::query(&format!(
            "INSERT INTO documents ({DOC_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(d.id)
        .bind(d.owner.to_string())
        .bind(&d.title)
        .bind(&d.source)
        .bind(&d.content_hash)
        .bind(i64::try_from(d.size_bytes).map_err(|_| StoreError::Internal("document too large".into()))?)
        .bind(Json(&d.metadata))
        .bind(i64::from(d.chunk_count))
        .bind(d.created_at)
        .bind(&d.origin)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        insert_chunks(&mut tx, d.id, chunks).await?;
        record_change(&mut tx, d.id, ChangeKind::Stored).await?;
        tx.commit().await.map_err(store_error)
    }

    async fn document(&self, id: Uuid) -> StoreResult<Option<Document>> {
        let sql = format!("SELECT {DOC_COLUMNS} FROM documents WHERE id = $1");
        self.one(sqlx::query(&sql).bind(id)).await
    }

    async fn document_by_hash(&self, owner: &Owner, content_hash: &str) -> StoreResult<Option<Document>> {
        let sql = format!("SELECT {DOC_COLUMNS} FROM documents WHERE owner = $1 AND content_hash = $2");
        self.one(sqlx::query(&sql).bind(owner.to_string()).bind(content_hash))
            .await
    }

    async fn list_documents(&self, reader: &Reader, page: Page) -> StoreResult<(Vec<Document>, u64)> {
        let owners: Vec<String> = reader.owners().iter().map(Owner::to_string).collect();
        let within = placeholders(1, owners.len());
        let count_sql = format!("SELECT COUNT(*) AS n FROM documents WHERE owner IN ({within})");
        let mut count = sqlx::query(&count_sql);
        for o in &owners {
            count = count.bind(o);
        }
        let total: i64 = count
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)?
            .try_get("n")
            .map_err(store_error)?;
        let n = owners.len();
        let list_sql = format!(
            "SELECT {DOC_COLUMNS} FROM documents WHERE owner IN ({within})
             ORDER BY created_at DESC, id DESC LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let mut q = sqlx::query(&list_sql);
        for o in &owners {
            q = q.bind(o);
        }
        let rows = q
            .bind(i64::from(page.limit))
            .bind(i64::from(page.offset))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        let docs = rows.iter().map(sqlite_document).collect::<StoreResult<Vec<_>>>()?;
        Ok((docs, u64::try_from(total).unwrap_or(0)))
    }

    async fn chunks(&self, document_id: Uuid) -> StoreResult<Vec<Chunk>> {
        let rows = sqlx::query(
            "SELECT id, document_id, ordinal, content, embedding FROM chunks WHERE document_id = $1 ORDER BY ordinal",
        )
        .bind(document_id)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter()
            .map(|row| {
                let ordinal: i64 = row.try_get("ordinal").map_err(store_error)?;
                let emb: Vec<u8> = row.try_get("embedding").map_err(store_error)?;
                Ok(Chunk {
                    id: row.try_get("id").map_err(store_error)?,
                    document_id: row.try_get("document_id").map_err(store_error)?,
                    ordinal: u32::try_from(ordinal).map_err(|_| bad_row("ordinal"))?,
                    content: row.try_get("content").map_err(store_error)?,
                    embedding: embedding_from_bytes(&emb).ok_or_else(|| bad_row("embedding"))?,
                })
            })
            .collect()
    }

    async fn document_ids(&self, owner: Option<&Owner>) -> StoreResult<Vec<Uuid>> {
        let rows = match owner {
            None => sqlx::query("SELECT id FROM documents ORDER BY created_at, id"),
            Some(o) => {
                sqlx::query("SELECT id FROM documents WHERE owner = $1 ORDER BY created_at, id").bind(o.to_string())
            }
        }
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(|r| r.try_get("id").map_err(store_error)).collect()
    }

    async fn replace_chunks(&self, document_id: Uuid, chunks: &[Chunk]) -> StoreResult<bool> {
        // One transaction: other connections see the old chunks until it commits.
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let count = u32::try_from(chunks.len()).map_err(|_| StoreError::Internal("too many chunks".into()))?;
        let found = sqlx::query("UPDATE documents SET chunk_count = $1 WHERE id = $2")
            .bind(i64::from(count))
            .bind(document_id)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        if found.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM chunks WHERE document_id = $1")
            .bind(document_id)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        insert_chunks(&mut tx, document_id, chunks).await?;
        record_change(&mut tx, document_id, ChangeKind::Rechunked).await?;
        tx.commit().await.map_err(store_error)?;
        Ok(true)
    }

    async fn delete_document(&self, id: Uuid) -> StoreResult<bool> {
        // Chunks go with it (ON DELETE CASCADE; foreign keys are on for every connection).
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let done = sqlx::query("DELETE FROM documents WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        record_change(&mut tx, id, ChangeKind::Deleted).await?;
        tx.commit().await.map_err(store_error)?;
        Ok(true)
    }

    async fn changes_after(&self, after: u64, limit: u32) -> StoreResult<Vec<DocumentChange>> {
        let rows =
            sqlx::query("SELECT seq, document_id, kind FROM document_changes WHERE seq > $1 ORDER BY seq LIMIT $2")
                .bind(i64::try_from(after).unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.try_get("seq").map_err(store_error)?;
                let kind: String = row.try_get("kind").map_err(store_error)?;
                Ok(DocumentChange {
                    seq: u64::try_from(seq).map_err(|_| bad_row("change number"))?,
                    document_id: row.try_get("document_id").map_err(store_error)?,
                    kind: ChangeKind::parse(&kind).ok_or_else(|| bad_row("change kind"))?,
                })
            })
            .collect()
    }

    async fn last_change(&self) -> StoreResult<u64> {
        // The last number handed out (AUTOINCREMENT keeps it after a prune).
        let n: i64 =
            sqlx::query("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'document_changes'), 0) AS n")
                .fetch_one(&self.pool)
                .await
                .map_err(store_error)?
                .try_get("n")
                .map_err(store_error)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn prune_changes(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM document_changes WHERE at < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(done.rows_affected())
    }

    async fn stored_bytes(&self, owner: &Owner) -> StoreResult<u64> {
        let n: i64 = sqlx::query("SELECT COALESCE(SUM(size_bytes), 0) AS n FROM documents WHERE owner = $1")
            .bind(owner.to_string())
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)?
            .try_get("n")
            .map_err(store_error)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// MongoDB: `documents`, `chunks` (text) and `embeddings` (one vector per chunk,
/// `_id` the chunk's id) collections; ids are UUID strings.
///
/// A document's chunks carry its id in `document_id` until they are replaced
/// (re-indexing): the new ones are written under a fresh chunk-set id (and the
/// document's id in `doc`), then the document's `chunk_set` is switched to it in
/// one write, then the old set is deleted. Without multi-document transactions
/// this keeps `chunks` on one whole set; a set left behind by a crash before the
/// switch is referenced by nothing and goes when the document is deleted.
pub struct MongoDocumentStore {
    db: mongodb::Database,
    documents: Collection<BsonDoc>,
    chunks: Collection<BsonDoc>,
    embeddings: Collection<BsonDoc>,
    /// The change feed: `_id` its sequence number, from `counters`.
    changes: Collection<BsonDoc>,
    counters: Collection<BsonDoc>,
}

/// Every document of `collection` that `filter` selects.
async fn find_all(collection: &Collection<BsonDoc>, filter: BsonDoc) -> StoreResult<Vec<BsonDoc>> {
    use futures_util::TryStreamExt;
    collection
        .find(filter)
        .await
        .map_err(mongo_error)?
        .try_collect()
        .await
        .map_err(mongo_error)
}

fn mongo_error(e: mongodb::error::Error) -> StoreError {
    use mongodb::error::{ErrorKind, WriteFailure};
    match *e.kind {
        ErrorKind::Write(WriteFailure::WriteError(ref w)) if w.code == 11000 => StoreError::Conflict(w.message.clone()),
        ErrorKind::InsertMany(ref m)
            if m.write_errors
                .as_ref()
                .is_some_and(|ws| ws.iter().any(|w| w.code == 11000)) =>
        {
            StoreError::Conflict("duplicate key".into())
        }
        ErrorKind::ServerSelection { .. } | ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. } => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

impl MongoDocumentStore {
    /// Adds a change-feed entry after a write: a number from the counter, then
    /// the entry. Without transactions the write is not undone when this fails
    /// (the write happened); the entry is lost and the followers' periodic
    /// reconciliation finds the change instead.
    async fn record_change(&self, document_id: Uuid, kind: ChangeKind) {
        let written = async {
            let counter = self
                .counters
                .find_one_and_update(doc! {"_id": "document_changes"}, doc! {"$inc": {"seq": 1_i64}})
                .upsert(true)
                .return_document(mongodb::options::ReturnDocument::After)
                .await?;
            let seq = counter
                .and_then(|c| c.get_i64("seq").ok())
                .ok_or_else(|| mongodb::error::Error::custom("the change counter answered no number".to_string()))?;
            self.changes
                .insert_one(doc! {
                    "_id": seq,
                    "document_id": document_id.to_string(),
                    "kind": kind.as_str(),
                    "at": mongodb::bson::DateTime::now(),
                })
                .await
                .map(|_| ())
        }
        .await;
        if let Err(e) = written {
            metrics::counter!("document_changes_lost_total").increment(1);
            tracing::warn!(error = %e, document = %document_id, kind = kind.as_str(), "change feed entry not written; other nodes see the change at their next reconciliation");
        }
    }

    /// Removes the chunks and vectors of a chunk set that could not be stored
    /// whole (best effort: nothing points at them).
    async fn remove_parts(&self, set: Uuid) {
        for parts in [&self.chunks, &self.embeddings] {
            let _ = parts.delete_many(doc! {"document_id": set.to_string()}).await;
        }
    }

    /// Writes chunks and their vectors as chunk set `set` of document `document`.
    async fn write_parts(&self, set: Uuid, document: Uuid, chunks: &[Chunk]) -> mongodb::error::Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let (set, document) = (set.to_string(), document.to_string());
        let texts: Vec<BsonDoc> = chunks
            .iter()
            .map(|c| {
                doc! {
                    "_id": c.id.to_string(),
                    "document_id": &set,
                    "doc": &document,
                    "ordinal": i64::from(c.ordinal),
                    "content": &c.content,
                }
            })
            .collect();
        let vectors: Vec<BsonDoc> = chunks
            .iter()
            .map(|c| {
                doc! {
                    "_id": c.id.to_string(),
                    "document_id": &set,
                    "doc": &document,
                    "vector": Binary { subtype: BinarySubtype::Generic, bytes: embedding_to_bytes(&c.embedding) },
                }
            })
            .collect();
        self.chunks.insert_many(texts).await?;
        self.embeddings.insert_many(vectors).await?;
        Ok(())
    }

    /// The chunk set a document's chunks are stored under (its own id until
    /// re-indexed) and how many there are.
    async fn chunk_set(&self, id: Uuid) -> StoreResult<Option<(Uuid, usize)>> {
        let found = self
            .documents
            .find_one(doc! {"_id": id.to_string()})
            .projection(doc! {"chunk_set": 1, "chunk_count": 1})
            .await
            .map_err(mongo_error)?;
        Ok(found.map(|d| {
            let set = match d.get_str("chunk_set").ok().map(Uuid::parse_str) {
                Some(Ok(set)) => set,
                _ => id,
            };
            let count = d.get_i64("chunk_count").ok().and_then(|n| usize::try_from(n).ok());
            (set, count.unwrap_or(0))
        }))
    }

    /// The chunks of chunk sets (document id, set id), in order, by document;
    /// `None` for a set that was being deleted while it was read (a chunk came
    /// back without its embedding). Two queries for all of them.
    async fn chunks_of_sets(&self, sets: &[(Uuid, Uuid)]) -> StoreResult<HashMap<Uuid, Option<Vec<Chunk>>>> {
        let document_of: HashMap<String, Uuid> = sets.iter().map(|(d, set)| (set.to_string(), *d)).collect();
        let keys: Vec<&String> = document_of.keys().collect();
        let filter = doc! {"document_id": {"$in": &keys}};
        let found = find_all(&self.chunks, filter.clone()).await?;
        let vectors = find_all(&self.embeddings, filter).await?;
        let mut by_chunk: HashMap<&str, Vec<f32>> = HashMap::new();
        for v in &vectors {
            let (Ok(id), Some(Bson::Binary(bin))) = (v.get_str("_id"), v.get("vector")) else {
                return Err(bad_row("embedding"));
            };
            by_chunk.insert(
                id,
                embedding_from_bytes(&bin.bytes).ok_or_else(|| bad_row("embedding"))?,
            );
        }
        let mut out: HashMap<Uuid, Option<Vec<Chunk>>> = sets.iter().map(|(d, _)| (*d, Some(Vec::new()))).collect();
        for b in &found {
            let set = b.get_str("document_id").map_err(|_| bad_row("document_id"))?;
            let Some(&document_id) = document_of.get(set) else {
                continue;
            };
            // Chunks and embeddings are two reads: a re-index that deleted the
            // set in between leaves chunks without embeddings.
            let Some(embedding) = b.get_str("_id").ok().and_then(|id| by_chunk.remove(id)) else {
                out.insert(document_id, None);
                continue;
            };
            if let Some(Some(list)) = out.get_mut(&document_id) {
                list.push(Chunk {
                    id: uuid_field(b, "_id")?,
                    document_id,
                    ordinal: b
                        .get_i64("ordinal")
                        .ok()
                        .and_then(|o| u32::try_from(o).ok())
                        .ok_or_else(|| bad_row("ordinal"))?,
                    content: b.get_str("content").map_err(|_| bad_row("content"))?.to_string(),
                    embedding,
                });
            }
        }
        for list in out.values_mut().flatten() {
            list.sort_by_key(|c| c.ordinal);
        }
        Ok(out)
    }

    /// Connects and creates the indexes (idempotent).
    pub async fn connect(url: &str, database: &str) -> StoreResult<Self> {
        let mut opts = mongodb::options::ClientOptions::parse(url).await.map_err(mongo_error)?;
        opts.server_selection_timeout = Some(std::time::Duration::from_secs(5));
        opts.app_name = Some("ragchat".into());
        let client = mongodb::Client::with_options(opts).map_err(mongo_error)?;
        let db = client.database(database);
        let store = MongoDocumentStore {
            documents: db.collection("documents"),
            chunks: db.collection("chunks"),
            embeddings: db.collection("embeddings"),
            changes: db.collection("document_changes"),
            counters: db.collection("counters"),
            db,
        };
        let unique = |keys: BsonDoc| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().unique(true).build())
                .build()
        };
        store
            .documents
            .create_index(unique(doc! {"owner": 1, "content_hash": 1}))
            .await
            .map_err(mongo_error)?;
        store
            .documents
            .create_index(IndexModel::builder().keys(doc! {"owner": 1, "created_at": -1}).build())
            .await
            .map_err(mongo_error)?;
        store
            .chunks
            .create_index(unique(doc! {"document_id": 1, "ordinal": 1}))
            .await
            .map_err(mongo_error)?;
        for parts in [&store.chunks, &store.embeddings] {
            parts
                .create_index(IndexModel::builder().keys(doc! {"doc": 1}).build())
                .await
                .map_err(mongo_error)?;
        }
        store
            .embeddings
            .create_index(IndexModel::builder().keys(doc! {"document_id": 1}).build())
            .await
            .map_err(mongo_error)?;
        store
            .changes
            .create_index(IndexModel::builder().keys(doc! {"at": 1}).build())
            .await
            .map_err(mongo_error)?;
        Ok(store)
    }
}

impl MongoDocumentStore {
    /// The document a filter selects, if any.
    async fn one(&self, filter: BsonDoc) -> StoreResult<Option<Document>> {
        self.documents
            .find_one(filter)
            .await
            .map_err(mongo_error)?
            .as_ref()
            .map(from_bson_doc)
            .transpose()
    }
}

fn to_bson_doc(d: &Document) -> StoreResult<BsonDoc> {
    let metadata = mongodb::bson::to_document(&d.metadata).map_err(|e| StoreError::Internal(e.to_string()))?;
    Ok(doc! {
        "_id": d.id.to_string(),
        "owner": d.owner.to_string(),
        "title": &d.title,
        "source": &d.source,
        "origin": &d.origin,
        "content_hash": &d.content_hash,
        "size_bytes": i64::try_from(d.size_bytes).map_err(|_| StoreError::Internal("document too large".into()))?,
        "metadata": metadata,
        "chunk_count": i64::from(d.chunk_count),
        "created_at": mongodb::bson::DateTime::from_millis(d.created_at.timestamp_millis()),
        // Microseconds, so that ordering and round trips keep sub-millisecond times.
        "created_us": d.created_at.timestamp_micros(),
    })
}

fn uuid_field(b: &BsonDoc, key: &str) -> StoreResult<Uuid> {
    b.get_str(key)
        .ok()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| bad_row(key))
}

fn from_bson_doc(b: &BsonDoc) -> StoreResult<Document> {
    let text = |k: &str| b.get_str(k).map(str::to_string).map_err(|_| bad_row(k));
    let int = |k: &str| b.get_i64(k).map_err(|_| bad_row(k));
    let metadata = match b.get("metadata") {
        Some(Bson::Document(m)) => match Bson::Document(m.clone()).into_relaxed_extjson() {
            serde_json::Value::Object(o) => o,
            _ => return Err(bad_row("metadata")),
        },
        _ => serde_json::Map::new(),
    };
    Ok(Document {
        id: uuid_field(b, "_id")?,
        owner: text("owner")?.parse().map_err(|_| bad_row("owner"))?,
        title: text("title")?,
        source: text("source")?,
        // Absent on documents stored before origins were recorded.
        origin: b.get_str("origin").unwrap_or_default().to_string(),
        content_hash: text("content_hash")?,
        size_bytes: u64::try_from(int("size_bytes")?).map_err(|_| bad_row("size"))?,
        metadata,
        chunk_count: u32::try_from(int("chunk_count")?).map_err(|_| bad_row("chunk count"))?,
        created_at: DateTime::<Utc>::from_timestamp_micros(int("created_us")?).ok_or_else(|| bad_row("created_at"))?,
    })
}

#[async_trait]
impl DocumentStore for MongoDocumentStore {
    fn backend(&self) -> &'static str {
        "mongodb"
    }

    async fn ping(&self) -> StoreResult<()> {
        self.db.run_command(doc! {"ping": 1}).await.map_err(mongo_error)?;
        Ok(())
    }

    /// Without multi-document transactions (FerretDB has none): chunks first, then the
    /// document that makes them visible; if the document cannot be written, the
    /// chunks are removed again.
    async fn insert_document(&self, d: &Document, chunks: &[Chunk]) -> StoreResult<()> {
        let record = to_bson_doc(d)?;
        if let Err(e) = self.write_parts(d.id, d.id, chunks).await {
            self.remove_parts(d.id).await;
            return Err(mongo_error(e));
        }
        if let Err(e) = self.documents.insert_one(record).await {
            self.remove_parts(d.id).await;
            return Err(mongo_error(e));
        }
        self.record_change(d.id, ChangeKind::Stored).await;
        Ok(())
    }

    async fn document(&self, id: Uuid) -> StoreResult<Option<Document>> {
        self.one(doc! {"_id": id.to_string()}).await
    }

    async fn document_by_hash(&self, owner: &Owner, content_hash: &str) -> StoreResult<Option<Document>> {
        self.one(doc! {"owner": owner.to_string(), "content_hash": content_hash})
            .await
    }

    async fn list_documents(&self, reader: &Reader, page: Page) -> StoreResult<(Vec<Document>, u64)> {
        use futures_util::TryStreamExt;
        let owners: Vec<String> = reader.owners().iter().map(Owner::to_string).collect();
        let filter = doc! {"owner": {"$in": owners}};
        let total = self
            .documents
            .count_documents(filter.clone())
            .await
            .map_err(mongo_error)?;
        let found: Vec<BsonDoc> = self
            .documents
            .find(filter)
            .sort(doc! {"created_us": -1, "_id": -1})
            .skip(u64::from(page.offset))
            .limit(i64::from(page.limit))
            .await
            .map_err(mongo_error)?
            .try_collect()
            .await
            .map_err(mongo_error)?;
        let docs = found.iter().map(from_bson_doc).collect::<StoreResult<Vec<_>>>()?;
        Ok((docs, total))
    }

    async fn chunks(&self, document_id: Uuid) -> StoreResult<Vec<Chunk>> {
        // A set read just as a re-index deleted it comes back short or without
        // embeddings: read the document's current set again. Each retry follows
        // a newer switch, so this ends unless re-indexes never stop.
        for _ in 0..CHUNK_READ_TRIES {
            let Some((set, count)) = self.chunk_set(document_id).await? else {
                return Ok(Vec::new());
            };
            match self.chunks_of_sets(&[(document_id, set)]).await?.remove(&document_id) {
                Some(Some(chunks)) if chunks.len() == count => return Ok(chunks),
                _ => {}
            }
        }
        Err(StoreError::Unavailable(
            "the document's chunks kept changing while they were read".into(),
        ))
    }

    /// Three queries for all of `ids` (documents, chunks, embeddings). A
    /// document whose set was re-indexed between them is read again alone.
    async fn documents_with_chunks(&self, ids: &[Uuid]) -> StoreResult<Vec<(Document, Vec<Chunk>)>> {
        let keys: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let mut docs = Vec::new();
        for b in find_all(&self.documents, doc! {"_id": {"$in": &keys}}).await? {
            let d = from_bson_doc(&b)?;
            let set = match b.get_str("chunk_set").ok().map(Uuid::parse_str) {
                Some(Ok(set)) => set,
                _ => d.id,
            };
            docs.push((d, set));
        }
        let sets: Vec<(Uuid, Uuid)> = docs.iter().map(|(d, set)| (d.id, *set)).collect();
        let mut chunks = self.chunks_of_sets(&sets).await?;
        let mut out = Vec::with_capacity(docs.len());
        for (d, _) in docs {
            match chunks.remove(&d.id) {
                Some(Some(list)) if list.len() == d.chunk_count as usize => out.push((d, list)),
                // Re-indexed or deleted between the reads: as `chunks` does.
                _ => {
                    if let Some(current) = self.document(d.id).await? {
                        let list = self.chunks(d.id).await?;
                        out.push((current, list));
                    }
                }
            }
        }
        Ok(out)
    }

    async fn document_ids(&self, owner: Option<&Owner>) -> StoreResult<Vec<Uuid>> {
        use futures_util::TryStreamExt;
        let filter = match owner {
            None => doc! {},
            Some(o) => doc! {"owner": o.to_string()},
        };
        let found: Vec<BsonDoc> = self
            .documents
            .find(filter)
            .projection(doc! {"_id": 1, "created_us": 1})
            .sort(doc! {"created_us": 1, "_id": 1})
            .await
            .map_err(mongo_error)?
            .try_collect()
            .await
            .map_err(mongo_error)?;
        found.iter().map(|b| uuid_field(b, "_id")).collect()
    }

    async fn replace_chunks(&self, document_id: Uuid, chunks: &[Chunk]) -> StoreResult<bool> {
        let Some((old, _)) = self.chunk_set(document_id).await? else {
            return Ok(false);
        };
        let set = Uuid::new_v4();
        if let Err(e) = self.write_parts(set, document_id, chunks).await {
            self.remove_parts(set).await;
            return Err(mongo_error(e));
        }
        let count = i64::try_from(chunks.len()).map_err(|_| StoreError::Internal("too many chunks".into()))?;
        let switched = self
            .documents
            .update_one(
                doc! {"_id": document_id.to_string()},
                doc! {"$set": {"chunk_set": set.to_string(), "chunk_count": count}},
            )
            .await;
        match switched {
            Ok(r) if r.matched_count > 0 => {}
            Ok(_) => {
                // Deleted meanwhile.
                self.remove_parts(set).await;
                return Ok(false);
            }
            Err(e) => {
                self.remove_parts(set).await;
                return Err(mongo_error(e));
            }
        }
        self.record_change(document_id, ChangeKind::Rechunked).await;
        for parts in [&self.chunks, &self.embeddings] {
            parts
                .delete_many(doc! {"document_id": old.to_string()})
                .await
                .map_err(mongo_error)?;
        }
        Ok(true)
    }

    async fn delete_document(&self, id: Uuid) -> StoreResult<bool> {
        let gone = self
            .documents
            .delete_one(doc! {"_id": id.to_string()})
            .await
            .map_err(mongo_error)?;
        if gone.deleted_count > 0 {
            self.record_change(id, ChangeKind::Deleted).await;
        }
        // Every chunk set of the document: the first (under its id) and any later one.
        for parts in [&self.chunks, &self.embeddings] {
            for filter in [doc! {"document_id": id.to_string()}, doc! {"doc": id.to_string()}] {
                parts.delete_many(filter).await.map_err(mongo_error)?;
            }
        }
        Ok(gone.deleted_count > 0)
    }

    async fn stored_bytes(&self, owner: &Owner) -> StoreResult<u64> {
        use futures_util::TryStreamExt;
        let rows: Vec<BsonDoc> = self
            .documents
            .aggregate(vec![
                doc! {"$match": {"owner": owner.to_string()}},
                doc! {"$group": {"_id": Bson::Null, "n": {"$sum": "$size_bytes"}}},
            ])
            .await
            .map_err(mongo_error)?
            .try_collect()
            .await
            .map_err(mongo_error)?;
        let n = match rows.first().and_then(|r| r.get("n")) {
            Some(Bson::Int64(n)) => *n,
            Some(Bson::Int32(n)) => i64::from(*n),
            Some(Bson::Double(n)) => *n as i64,
            _ => 0,
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn changes_after(&self, after: u64, limit: u32) -> StoreResult<Vec<DocumentChange>> {
        use futures_util::TryStreamExt;
        let found: Vec<BsonDoc> = self
            .changes
            .find(doc! {"_id": {"$gt": i64::try_from(after).unwrap_or(i64::MAX)}})
            .sort(doc! {"_id": 1})
            .limit(i64::from(limit))
            .await
            .map_err(mongo_error)?
            .try_collect()
            .await
            .map_err(mongo_error)?;
        found
            .iter()
            .map(|b| {
                Ok(DocumentChange {
                    seq: b
                        .get_i64("_id")
                        .ok()
                        .and_then(|n| u64::try_from(n).ok())
                        .ok_or_else(|| bad_row("change number"))?,
                    document_id: uuid_field(b, "document_id")?,
                    kind: b
                        .get_str("kind")
                        .ok()
                        .and_then(ChangeKind::parse)
                        .ok_or_else(|| bad_row("change kind"))?,
                })
            })
            .collect()
    }

    async fn last_change(&self) -> StoreResult<u64> {
        // The last number handed out (entries may be pruned, or still being written).
        let last = self
            .counters
            .find_one(doc! {"_id": "document_changes"})
            .await
            .map_err(mongo_error)?;
        Ok(last
            .and_then(|b| b.get_i64("seq").ok())
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0))
    }

    async fn prune_changes(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let done = self
            .changes
            .delete_many(doc! {"at": {"$lt": mongodb::bson::DateTime::from_millis(before.timestamp_millis())}})
            .await
            .map_err(mongo_error)?;
        Ok(done.deleted_count)
    }
}
