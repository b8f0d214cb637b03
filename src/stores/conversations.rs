//! ConversationStore adapters: SQLite (the embedded default, its own database
//! file) and ScyllaDB/Cassandra through the scylla crate. Both pass the contract
//! tests in tests/api/conversation_store.rs.
//!
//! CQL layout (keyspace and tables created at start):
//! - `chat_messages`: partition (user_id, session_id), clustered by
//!   (created_at, message_id) newest first: a page of a conversation is one
//!   partition slice.
//! - `chat_sessions`: partition user_id, one row per session.
//! - `chat_session_counts`: message counters (CQL keeps counters in tables of their own).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use ragchat_actors::chat::records::{ChatRecord, ChatSession, Cursor, Role};
use ragchat_actors::domain::Page;
use ragchat_actors::ports::{ConversationStore, StoreError, StoreResult};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{Counter, CqlTimestamp};
use sqlx::{Row, SqlitePool};
use uuid::Uuid;

use super::store_error;

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn time(ms: i64) -> StoreResult<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .ok_or_else(|| StoreError::Internal(format!("stored time {ms} is out of range")))
}

fn role(s: &str) -> StoreResult<Role> {
    s.parse()
        .map_err(|_| StoreError::Internal(format!("stored role '{s}' is unknown")))
}

fn metadata(s: &str) -> StoreResult<serde_json::Value> {
    serde_json::from_str(s).map_err(|e| StoreError::Internal(format!("stored message metadata: {e}")))
}

pub struct SqliteConversationStore {
    pool: SqlitePool,
}

impl SqliteConversationStore {
    pub fn new(pool: SqlitePool) -> Self {
        SqliteConversationStore { pool }
    }
}

fn sqlite_session(row: &sqlx::sqlite::SqliteRow) -> StoreResult<ChatSession> {
    let count: i64 = row.try_get("message_count").map_err(store_error)?;
    Ok(ChatSession {
        id: row.try_get("id").map_err(store_error)?,
        user_id: row.try_get("user_id").map_err(store_error)?,
        title: row.try_get("title").map_err(store_error)?,
        created_at: time(row.try_get("created_at").map_err(store_error)?)?,
        updated_at: time(row.try_get("updated_at").map_err(store_error)?)?,
        message_count: u64::try_from(count).unwrap_or(0),
    })
}

#[async_trait]
impl ConversationStore for SqliteConversationStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(store_error)?;
        Ok(())
    }

    async fn create_session(&self, s: &ChatSession) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO chat_sessions (user_id, id, title, created_at, updated_at, message_count) \
             VALUES ($1, $2, $3, $4, $5, 0)",
        )
        .bind(s.user_id)
        .bind(s.id)
        .bind(&s.title)
        .bind(millis(s.created_at))
        .bind(millis(s.updated_at))
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn session(&self, user_id: Uuid, session_id: Uuid) -> StoreResult<Option<ChatSession>> {
        sqlx::query("SELECT * FROM chat_sessions WHERE user_id = $1 AND id = $2")
            .bind(user_id)
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?
            .as_ref()
            .map(sqlite_session)
            .transpose()
    }

    async fn sessions(&self, user_id: Uuid, page: Page) -> StoreResult<(Vec<ChatSession>, u64)> {
        let rows = sqlx::query(
            "SELECT * FROM chat_sessions WHERE user_id = $1 ORDER BY updated_at DESC, id DESC LIMIT $2 OFFSET $3",
        )
        .bind(user_id)
        .bind(i64::from(page.limit))
        .bind(i64::from(page.offset))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_sessions WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)?;
        let sessions = rows.iter().map(sqlite_session).collect::<StoreResult<Vec<_>>>()?;
        Ok((sessions, u64::try_from(total).unwrap_or(0)))
    }

    async fn append(&self, user_id: Uuid, session_id: Uuid, messages: &[ChatRecord]) -> StoreResult<()> {
        let Some(last) = messages.iter().map(|m| millis(m.created_at)).max() else {
            return Ok(());
        };
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let updated = sqlx::query(
            "UPDATE chat_sessions SET updated_at = MAX(updated_at, $1), message_count = message_count + $2 \
             WHERE user_id = $3 AND id = $4",
        )
        .bind(last)
        .bind(messages.len() as i64)
        .bind(user_id)
        .bind(session_id)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        for m in messages {
            sqlx::query(
                "INSERT INTO chat_messages (user_id, session_id, created_at, id, role, content, metadata) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(user_id)
            .bind(session_id)
            .bind(millis(m.created_at))
            .bind(m.id)
            .bind(m.role.as_str())
            .bind(&m.content)
            .bind(m.metadata.to_string())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        }
        tx.commit().await.map_err(store_error)
    }

    async fn messages(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        before: Option<Cursor>,
        limit: u32,
    ) -> StoreResult<Vec<ChatRecord>> {
        // Without a cursor: older than anything (the largest time, the largest id).
        let (at, id) = match before {
            Some(c) => (millis(c.at), c.id),
            None => (i64::MAX, Uuid::max()),
        };
        let rows = sqlx::query(
            "SELECT created_at, id, role, content, metadata FROM chat_messages \
             WHERE user_id = $1 AND session_id = $2 AND (created_at < $3 OR (created_at = $3 AND id < $4)) \
             ORDER BY created_at DESC, id DESC LIMIT $5",
        )
        .bind(user_id)
        .bind(session_id)
        .bind(at)
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter()
            .map(|r| {
                let role_s: String = r.try_get("role").map_err(store_error)?;
                let meta: String = r.try_get("metadata").map_err(store_error)?;
                Ok(ChatRecord {
                    id: r.try_get("id").map_err(store_error)?,
                    session_id,
                    role: role(&role_s)?,
                    content: r.try_get("content").map_err(store_error)?,
                    created_at: time(r.try_get("created_at").map_err(store_error)?)?,
                    metadata: metadata(&meta)?,
                })
            })
            .collect()
    }

    async fn delete_session(&self, user_id: Uuid, session_id: Uuid) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let gone = sqlx::query("DELETE FROM chat_sessions WHERE user_id = $1 AND id = $2")
            .bind(user_id)
            .bind(session_id)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        sqlx::query("DELETE FROM chat_messages WHERE user_id = $1 AND session_id = $2")
            .bind(user_id)
            .bind(session_id)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        Ok(gone.rows_affected() > 0)
    }
}

/// Driver failures: the cluster could not be reached or answer in time (503).
fn cql_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("cql: {e}"))
}

/// Rows that do not read as expected: a schema mismatch (500).
fn cql_rows(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("cql rows: {e}"))
}

pub struct ScyllaConversationStore {
    session: Session,
    insert_session: PreparedStatement,
    get_session: PreparedStatement,
    list_sessions: PreparedStatement,
    list_counts: PreparedStatement,
    get_count: PreparedStatement,
    touch_session: PreparedStatement,
    count_messages: PreparedStatement,
    insert_message: PreparedStatement,
    page_first: PreparedStatement,
    page_before: PreparedStatement,
    delete_session: PreparedStatement,
    delete_messages: PreparedStatement,
    delete_count: PreparedStatement,
}

/// Larger turns are not sent as one batch (Cassandra's default limit is 50 KiB).
const BATCH_MAX_BYTES: usize = 40 << 10;

/// A session row: title and created_at are None for a row that only an update wrote.
type SessionRow = (Uuid, Option<String>, Option<CqlTimestamp>, Option<CqlTimestamp>);

impl ScyllaConversationStore {
    /// Connects to the cluster (`nodes`: comma-separated host:port) and creates the
    /// keyspace and tables when missing. `replication` is the replication factor
    /// of a new keyspace (SimpleStrategy; create it yourself for production
    /// topologies, and this leaves it as it is).
    pub async fn connect(nodes: &str, keyspace: &str, replication: u32) -> StoreResult<Self> {
        if keyspace.is_empty() || !keyspace.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(StoreError::Internal(format!(
                "keyspace '{keyspace}': use letters, digits and _"
            )));
        }
        let profile = ExecutionProfile::builder()
            .request_timeout(Some(Duration::from_secs(10)))
            .build()
            .into_handle();
        let mut builder = SessionBuilder::new()
            .connection_timeout(Duration::from_secs(5))
            .default_execution_profile_handle(profile);
        for n in nodes.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            builder = builder.known_node(n);
        }
        let session = builder.build().await.map_err(cql_error)?;
        let ks = keyspace;
        let schema = [
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
                 {{'class': 'SimpleStrategy', 'replication_factor': {replication}}}"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.chat_sessions (user_id uuid, session_id uuid, title text, \
                 created_at timestamp, updated_at timestamp, PRIMARY KEY (user_id, session_id))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.chat_session_counts (user_id uuid, session_id uuid, \
                 messages counter, PRIMARY KEY (user_id, session_id))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.chat_messages (user_id uuid, session_id uuid, \
                 created_at timestamp, message_id uuid, role text, content text, metadata text, \
                 PRIMARY KEY ((user_id, session_id), created_at, message_id)) \
                 WITH CLUSTERING ORDER BY (created_at DESC, message_id DESC)"
            ),
        ];
        for stmt in schema {
            session.query_unpaged(stmt, &[]).await.map_err(cql_error)?;
        }
        session.await_schema_agreement().await.map_err(cql_error)?;
        let prepare = |q: String| {
            let session = &session;
            async move { session.prepare(q).await.map_err(cql_error) }
        };
        let msg_cols = "created_at, message_id, role, content, metadata";
        Ok(ScyllaConversationStore {
            insert_session: prepare(format!(
                "INSERT INTO {ks}.chat_sessions (user_id, session_id, title, created_at, updated_at) \
                 VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            get_session: prepare(format!(
                "SELECT session_id, title, created_at, updated_at FROM {ks}.chat_sessions \
                 WHERE user_id = ? AND session_id = ?"
            ))
            .await?,
            list_sessions: prepare(format!(
                "SELECT session_id, title, created_at, updated_at FROM {ks}.chat_sessions WHERE user_id = ?"
            ))
            .await?,
            list_counts: prepare(format!(
                "SELECT session_id, messages FROM {ks}.chat_session_counts WHERE user_id = ?"
            ))
            .await?,
            get_count: prepare(format!(
                "SELECT messages FROM {ks}.chat_session_counts WHERE user_id = ? AND session_id = ?"
            ))
            .await?,
            touch_session: prepare(format!(
                "UPDATE {ks}.chat_sessions SET updated_at = ? WHERE user_id = ? AND session_id = ?"
            ))
            .await?,
            count_messages: prepare(format!(
                "UPDATE {ks}.chat_session_counts SET messages = messages + ? WHERE user_id = ? AND session_id = ?"
            ))
            .await?,
            insert_message: prepare(format!(
                "INSERT INTO {ks}.chat_messages (user_id, session_id, {msg_cols}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            page_first: prepare(format!(
                "SELECT {msg_cols} FROM {ks}.chat_messages WHERE user_id = ? AND session_id = ? LIMIT ?"
            ))
            .await?,
            page_before: prepare(format!(
                "SELECT {msg_cols} FROM {ks}.chat_messages WHERE user_id = ? AND session_id = ? \
                 AND (created_at, message_id) < (?, ?) LIMIT ?"
            ))
            .await?,
            delete_session: prepare(format!(
                "DELETE FROM {ks}.chat_sessions WHERE user_id = ? AND session_id = ?"
            ))
            .await?,
            delete_messages: prepare(format!(
                "DELETE FROM {ks}.chat_messages WHERE user_id = ? AND session_id = ?"
            ))
            .await?,
            delete_count: prepare(format!(
                "DELETE FROM {ks}.chat_session_counts WHERE user_id = ? AND session_id = ?"
            ))
            .await?,
            session,
        })
    }

    fn to_session(user_id: Uuid, row: SessionRow, count: i64) -> Option<ChatSession> {
        let (id, title, created, updated) = row;
        let (title, created) = (title?, created?);
        let created_at = Utc.timestamp_millis_opt(created.0).single()?;
        let updated_at = updated
            .and_then(|u| Utc.timestamp_millis_opt(u.0).single())
            .unwrap_or(created_at);
        Some(ChatSession {
            id,
            user_id,
            title,
            created_at,
            updated_at,
            message_count: u64::try_from(count).unwrap_or(0),
        })
    }

    /// Removes a session's messages and its message count (not its row).
    async fn remove_contents(&self, user_id: Uuid, session_id: Uuid) -> StoreResult<()> {
        self.session
            .execute_unpaged(&self.delete_messages, (user_id, session_id))
            .await
            .map_err(cql_error)?;
        self.session
            .execute_unpaged(&self.delete_count, (user_id, session_id))
            .await
            .map_err(cql_error)?;
        Ok(())
    }

    async fn count_of(&self, user_id: Uuid, session_id: Uuid) -> StoreResult<i64> {
        let rows = self
            .session
            .execute_unpaged(&self.get_count, (user_id, session_id))
            .await
            .map_err(cql_error)?
            .into_rows_result()
            .map_err(cql_rows)?;
        Ok(rows
            .maybe_first_row::<(Option<Counter>,)>()
            .map_err(cql_rows)?
            .and_then(|(c,)| c)
            .map_or(0, |c| c.0))
    }
}

#[async_trait]
impl ConversationStore for ScyllaConversationStore {
    fn backend(&self) -> &'static str {
        "scylla"
    }

    async fn ping(&self) -> StoreResult<()> {
        self.session
            .query_unpaged("SELECT release_version FROM system.local", &[])
            .await
            .map_err(cql_error)?;
        Ok(())
    }

    async fn create_session(&self, s: &ChatSession) -> StoreResult<()> {
        self.session
            .execute_unpaged(
                &self.insert_session,
                (
                    s.user_id,
                    s.id,
                    &s.title,
                    CqlTimestamp(millis(s.created_at)),
                    CqlTimestamp(millis(s.updated_at)),
                ),
            )
            .await
            .map_err(cql_error)?;
        Ok(())
    }

    async fn session(&self, user_id: Uuid, session_id: Uuid) -> StoreResult<Option<ChatSession>> {
        let rows = self
            .session
            .execute_unpaged(&self.get_session, (user_id, session_id))
            .await
            .map_err(cql_error)?
            .into_rows_result()
            .map_err(cql_rows)?;
        let Some(row) = rows.maybe_first_row::<SessionRow>().map_err(cql_rows)? else {
            return Ok(None);
        };
        let count = self.count_of(user_id, session_id).await?;
        Ok(Self::to_session(user_id, row, count))
    }

    async fn sessions(&self, user_id: Uuid, page: Page) -> StoreResult<(Vec<ChatSession>, u64)> {
        let rows = self
            .session
            .execute_unpaged(&self.list_sessions, (user_id,))
            .await
            .map_err(cql_error)?
            .into_rows_result()
            .map_err(cql_rows)?;
        let counts = self
            .session
            .execute_unpaged(&self.list_counts, (user_id,))
            .await
            .map_err(cql_error)?
            .into_rows_result()
            .map_err(cql_rows)?;
        let counts: HashMap<Uuid, i64> = counts
            .rows::<(Uuid, Option<Counter>)>()
            .map_err(cql_rows)?
            .filter_map(Result::ok)
            .map(|(id, c)| (id, c.map_or(0, |c| c.0)))
            .collect();
        let mut all = Vec::new();
        for row in rows.rows::<SessionRow>().map_err(cql_rows)? {
            let row = row.map_err(cql_rows)?;
            let count = counts.get(&row.0).copied().unwrap_or(0);
            all.extend(Self::to_session(user_id, row, count));
        }
        all.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(b.id.cmp(&a.id)));
        let total = all.len() as u64;
        let page = all
            .into_iter()
            .skip(page.offset as usize)
            .take(page.limit as usize)
            .collect();
        Ok((page, total))
    }

    async fn append(&self, user_id: Uuid, session_id: Uuid, messages: &[ChatRecord]) -> StoreResult<()> {
        let Some(last) = messages.iter().map(|m| millis(m.created_at)).max() else {
            return Ok(());
        };
        let Some(current) = self.session(user_id, session_id).await? else {
            return Err(StoreError::NotFound);
        };
        // The messages of a turn share a partition: one batch, applied together
        // (within one partition an unlogged batch is atomic). Cassandra refuses
        // batches over 50 KiB by default; a larger turn is written one by one.
        let bytes: usize = messages
            .iter()
            .map(|m| m.content.len() + m.metadata.to_string().len())
            .sum();
        if bytes > BATCH_MAX_BYTES {
            for m in messages {
                self.session
                    .execute_unpaged(
                        &self.insert_message,
                        (
                            user_id,
                            session_id,
                            CqlTimestamp(millis(m.created_at)),
                            m.id,
                            m.role.as_str(),
                            m.content.as_str(),
                            m.metadata.to_string(),
                        ),
                    )
                    .await
                    .map_err(cql_error)?;
            }
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        let mut values = Vec::with_capacity(messages.len());
        for m in messages {
            batch.append_statement(self.insert_message.clone());
            values.push((
                user_id,
                session_id,
                CqlTimestamp(millis(m.created_at)),
                m.id,
                m.role.as_str(),
                m.content.as_str(),
                m.metadata.to_string(),
            ));
        }
        if bytes <= BATCH_MAX_BYTES {
            self.session.batch(&batch, values).await.map_err(cql_error)?;
        }
        let updated = last.max(millis(current.updated_at));
        self.session
            .execute_unpaged(&self.touch_session, (CqlTimestamp(updated), user_id, session_id))
            .await
            .map_err(cql_error)?;
        self.session
            .execute_unpaged(
                &self.count_messages,
                (Counter(messages.len() as i64), user_id, session_id),
            )
            .await
            .map_err(cql_error)?;
        // A delete may have run between the check above and these writes: then
        // what was just written belongs to no session. Look again and remove it
        // (together with `delete_session`'s second pass this leaves no orphans
        // whatever the interleaving).
        if self.session(user_id, session_id).await?.is_none() {
            self.remove_contents(user_id, session_id).await?;
            self.session
                .execute_unpaged(&self.delete_session, (user_id, session_id))
                .await
                .map_err(cql_error)?;
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn messages(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        before: Option<Cursor>,
        limit: u32,
    ) -> StoreResult<Vec<ChatRecord>> {
        let limit = i32::try_from(limit.max(1)).unwrap_or(i32::MAX);
        let result = match before {
            None => {
                self.session
                    .execute_unpaged(&self.page_first, (user_id, session_id, limit))
                    .await
            }
            Some(c) => {
                self.session
                    .execute_unpaged(
                        &self.page_before,
                        (user_id, session_id, CqlTimestamp(millis(c.at)), c.id, limit),
                    )
                    .await
            }
        };
        let rows = result.map_err(cql_error)?.into_rows_result().map_err(cql_rows)?;
        let mut out = Vec::new();
        for row in rows
            .rows::<(CqlTimestamp, Uuid, String, String, String)>()
            .map_err(cql_rows)?
        {
            let (at, id, r, content, meta) = row.map_err(cql_rows)?;
            out.push(ChatRecord {
                id,
                session_id,
                role: role(&r)?,
                content,
                created_at: time(at.0)?,
                metadata: metadata(&meta)?,
            });
        }
        Ok(out)
    }

    async fn delete_session(&self, user_id: Uuid, session_id: Uuid) -> StoreResult<bool> {
        if self.session(user_id, session_id).await?.is_none() {
            return Ok(false);
        }
        // Messages first: a failure part-way leaves the session listed, so the
        // delete can be retried; never messages without their session.
        self.remove_contents(user_id, session_id).await?;
        self.session
            .execute_unpaged(&self.delete_session, (user_id, session_id))
            .await
            .map_err(cql_error)?;
        // An append that read the session before it was deleted may have written
        // after the first pass: a second pass removes that; an append writing
        // later finds the session gone and removes its own writes.
        self.remove_contents(user_id, session_id).await?;
        Ok(true)
    }
}
