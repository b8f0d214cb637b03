//! Store adapters implementing the core's ports.
//!
//! Accounts: one SQL implementation written once (`sql_accounts!`) and instantiated
//! for SQLite (the embedded default) and PostgreSQL. The SQL is the common subset of
//! both dialects ($N placeholders, RETURNING, COALESCE, LOWER/LIKE); column types
//! differ only in the migrations.

mod accounts;
mod conversations;
mod documents;
pub mod instrumented;
pub mod redis_limits;
mod usage;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ragchat_actors::ports::{AccountStore, ConversationStore, DocumentStore, StoreError, UsageStore};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

pub use accounts::{PostgresAccountStore, SqliteAccountStore};
pub use conversations::{ScyllaConversationStore, SqliteConversationStore};
pub use documents::{MongoDocumentStore, SqliteDocumentStore};

use crate::config::DatabaseSettings;

/// Maps a driver error to the core's store error. Connection-level failures become
/// `Unavailable` (the HTTP layer answers 503), constraint violations `Conflict`.
pub(crate) fn store_error(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(db.message().to_string()),
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        other => StoreError::Internal(other.to_string()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("unsupported database URL '{0}': expected sqlite:… or postgres://…")]
    UnsupportedUrl(String),
    #[error("cannot create the data directory {0}: {1}")]
    DataDir(String, std::io::Error),
    #[error("cannot connect to the database: {0}")]
    Connect(#[from] sqlx::Error),
    #[error("cannot open the store: {0}")]
    Store(String),
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The SQL database's ports: one connection pool serves both.
#[derive(Clone)]
pub struct SqlStores {
    pub accounts: Arc<dyn AccountStore>,
    pub usage: Arc<dyn UsageStore>,
}

impl SqlStores {
    /// Both ports of one SQL store, timed for /metrics.
    fn timed<S: AccountStore + UsageStore>(store: Arc<S>, backend: &'static str) -> SqlStores {
        SqlStores {
            accounts: Arc::new(instrumented::Accounts(store.clone())),
            usage: Arc::new(instrumented::Usage { inner: store, backend }),
        }
    }
}

/// Opens the account store named by the URL and brings its schema up to date.
pub async fn connect_accounts(settings: &DatabaseSettings) -> Result<Arc<dyn AccountStore>, ConnectError> {
    Ok(connect(settings).await?.accounts)
}

/// A pool on a SQLite file (created with its directory when missing).
pub(crate) async fn sqlite_pool(
    url: &str,
    max_connections: u32,
    acquire: Duration,
) -> Result<SqlitePool, ConnectError> {
    let opts = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // WAL + NORMAL: commits are atomic and survive a process crash; only an OS
        // crash or power cut can lose the last commits. FULL fsyncs every commit and
        // made each admitted request ~10× slower here.
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5));
    let path = opts.get_filename();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| ConnectError::DataDir(parent.display().to_string(), e))?;
    }
    Ok(SqlitePoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire)
        .connect_with(opts)
        .await?)
}

/// Opens the knowledge base's document store: MongoDB when `mongodb_url` is set,
/// otherwise the embedded SQLite file at `sqlite_url` (migrated). A MongoDB that
/// cannot be reached does not stop the server: the store answers `Unavailable`
/// while it is connected in the background.
pub async fn connect_documents(
    mongodb_url: Option<&str>,
    mongodb_database: &str,
    sqlite_url: &str,
) -> Result<Arc<dyn DocumentStore>, ConnectError> {
    let slot: Arc<instrumented::Slot<dyn DocumentStore>> = match mongodb_url {
        Some(url) => {
            let (url, db) = (url.to_string(), mongodb_database.to_string());
            in_background("mongodb", move || {
                let (url, db) = (url.clone(), db.clone());
                async move {
                    MongoDocumentStore::connect(&url, &db)
                        .await
                        .map(|s| Arc::new(s) as Arc<dyn DocumentStore>)
                }
            })
            .await?
        }
        None => {
            let pool = sqlite_pool(sqlite_url, 8, Duration::from_secs(5)).await?;
            sqlx::migrate!("./migrations/knowledge").run(&pool).await?;
            instrumented::Slot::ready("sqlite", Arc::new(SqliteDocumentStore::new(pool)))
        }
    };
    Ok(Arc::new(instrumented::Documents(slot)))
}

/// Connects now if it can. If the store is unreachable (not misconfigured:
/// that fails here), returns a pending slot and keeps trying in the background
/// (1 s, doubling to 30 s), logging each failure.
async fn in_background<S, F, Fut>(backend: &'static str, connect: F) -> Result<Arc<instrumented::Slot<S>>, ConnectError>
where
    S: ?Sized + Send + Sync + 'static,
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Arc<S>, StoreError>> + Send,
{
    let first = match connect().await {
        Ok(store) => return Ok(instrumented::Slot::ready(backend, store)),
        Err(StoreError::Unavailable(e)) => e,
        Err(e) => return Err(ConnectError::Store(e.to_string())),
    };
    tracing::error!(backend, error = %first, "store unreachable at start: serving without it, connecting in the background");
    let slot = instrumented::Slot::pending(backend, first);
    let filling = slot.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        filling.fill(ragchat_actors::supervision::retry_until_ok(backend, connect).await);
        tracing::info!(backend, "store connected");
    });
    Ok(slot)
}

/// Opens the conversation store: ScyllaDB/Cassandra when `scylla_nodes` is set
/// (keyspace and tables created when missing; connected in the background when
/// unreachable at start), otherwise the embedded SQLite file at `sqlite_url`
/// (migrated).
pub async fn connect_conversations(
    scylla_nodes: Option<&str>,
    keyspace: &str,
    replication: u32,
    sqlite_url: &str,
) -> Result<Arc<dyn ConversationStore>, ConnectError> {
    let slot: Arc<instrumented::Slot<dyn ConversationStore>> = match scylla_nodes {
        Some(nodes) => {
            let (nodes, ks) = (nodes.to_string(), keyspace.to_string());
            in_background("scylla", move || {
                let (nodes, ks) = (nodes.clone(), ks.clone());
                async move {
                    ScyllaConversationStore::connect(&nodes, &ks, replication)
                        .await
                        .map(|s| Arc::new(s) as Arc<dyn ConversationStore>)
                }
            })
            .await?
        }
        None => {
            let pool = sqlite_pool(sqlite_url, 8, Duration::from_secs(5)).await?;
            sqlx::migrate!("./migrations/chat").run(&pool).await?;
            instrumented::Slot::ready("sqlite", Arc::new(SqliteConversationStore::new(pool)))
        }
    };
    Ok(Arc::new(instrumented::Conversations(slot)))
}

/// Opens the SQL database named by the URL (migrating it) and returns its ports.
pub async fn connect(settings: &DatabaseSettings) -> Result<SqlStores, ConnectError> {
    let url = settings.url.as_str();
    let acquire = Duration::from_millis(settings.acquire_timeout_ms);
    if url.starts_with("sqlite:") {
        let pool = sqlite_pool(url, settings.max_connections, acquire).await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqlStores::timed(Arc::new(SqliteAccountStore::new(pool)), "sqlite"))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(acquire)
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(SqlStores::timed(Arc::new(PostgresAccountStore::new(pool)), "postgres"))
    } else {
        Err(ConnectError::UnsupportedUrl(url.to_string()))
    }
}
