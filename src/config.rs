//! Layered settings: config/default.toml < config/{env}.toml < RAGCHAT__SECTION__KEY
//! environment variables. The environment is chosen by RAGCHAT_ENV (development
//! by default).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Test,
    Production,
}

impl Environment {
    pub fn from_env() -> Result<Self, ConfigError> {
        match std::env::var("RAGCHAT_ENV") {
            Ok(v) => v.parse(),
            Err(_) => Ok(Environment::Development),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Test => "test",
            Environment::Production => "production",
        }
    }
}

impl std::str::FromStr for Environment {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "development" | "dev" | "local" => Ok(Environment::Development),
            "test" => Ok(Environment::Test),
            "production" | "prod" => Ok(Environment::Production),
            other => Err(ConfigError::Invalid(format!(
                "RAGCHAT_ENV='{other}': expected development, test or production"
            ))),
        }
    }
}

/// A secret that never prints.
#[derive(Clone, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub logging: LoggingSettings,
    #[serde(default)]
    pub seed: SeedSettings,
    pub rate_limits: RateLimitSettings,
    pub sessions: SessionSettings,
    pub quota: QuotaSettings,
    pub ledger: LedgerSettings,
    pub redis: RedisSettings,
    pub billing: BillingSettings,
    pub models: ModelSettings,
    pub knowledge: KnowledgeSettings,
    pub chat: ChatSettings,
    #[serde(default)]
    pub metrics: MetricsSettings,
    pub memory: MemorySettings,
    #[serde(skip)]
    pub environment: Option<Environment>,
}

/// The allocator (glibc malloc on Linux; elsewhere ignored): set at start so that
/// memory follows what is stored (`src/memory.rs`). 0 leaves glibc's default.
#[derive(Debug, Clone, Deserialize)]
pub struct MemorySettings {
    /// Malloc arenas (glibc's default: 8 per core, each keeping what it freed).
    pub malloc_arena_max: usize,
    /// Blocks at least this large are mapped on their own and unmapped when freed
    /// (a fixed value: glibc otherwise raises it up to 32 MiB).
    pub malloc_mmap_threshold: usize,
    /// Free memory at the top of a heap beyond this is returned at once.
    pub malloc_trim_threshold: usize,
}

/// The knowledge base: where documents live and how they are cut.
#[derive(Debug, Clone, Deserialize)]
pub struct KnowledgeSettings {
    /// The embedded document store (used when `mongodb_url` is empty).
    pub sqlite_url: String,
    /// MongoDB for documents, chunks and embeddings (production).
    #[serde(default)]
    pub mongodb_url: String,
    pub mongodb_database: String,
    /// Chunk size and overlap in tokens of the embedding model.
    pub chunk_tokens: usize,
    pub chunk_overlap: usize,
    /// Largest document accepted, in bytes of text.
    pub max_document_bytes: usize,
    /// Largest `metadata` of a document, in bytes of JSON (it is kept with every
    /// chunk in the index and every search hit).
    pub max_metadata_bytes: usize,
    /// Where the search index keeps its snapshot (empty: memory only, rebuilt
    /// from the store at every start).
    #[serde(default)]
    pub index_dir: String,
    /// Every this many seconds the index is reconciled with the document store, so
    /// that documents other nodes added or deleted are found (or dropped) here within
    /// it. 0: only at start.
    #[serde(default = "default_index_reconcile_secs")]
    pub index_reconcile_secs: u64,
    /// The document change feed is read this often (milliseconds): documents
    /// stored, re-chunked or deleted through other nodes reach this node's index
    /// within about this. 0: off (the reconciliation alone).
    #[serde(default = "default_change_feed_poll_ms")]
    pub change_feed_poll_ms: u64,
    /// A feed number missing this long is given up on (its writer died between
    /// its write and the entry); the reconciliation repairs what it leaves.
    #[serde(default = "default_change_feed_gap_secs")]
    pub change_feed_gap_secs: u64,
    /// Feed entries older than this are pruned.
    #[serde(default = "default_change_feed_retention_secs")]
    pub change_feed_retention_secs: u64,
    /// Largest uploaded file (multipart), in bytes.
    pub max_upload_bytes: usize,
    /// The most documents one uploaded file (JSON Lines) may hold.
    pub max_upload_documents: usize,
    /// Largest HTML file, in bytes (its parse tree is several times its size).
    pub max_html_bytes: usize,
    /// PDFs are read by a child process (this binary's hidden `__extract-pdf`
    /// subcommand) under these limits, killed past them. `pdf_extractor`: the
    /// program to run (empty: this executable).
    #[serde(default)]
    pub pdf_extractor: String,
    pub pdf_max_memory_mb: u64,
    pub pdf_max_cpu_secs: u64,
    pub pdf_timeout_secs: u64,
    /// PDF readers running at once in this process (others wait up to the timeout).
    pub pdf_max_concurrent: usize,
    /// Uploads that run as background jobs (202, `GET /knowledge/jobs/{id}`): files
    /// over `jobs_min_upload_bytes`, files of at least `jobs_min_documents`
    /// documents, or any upload with the form field `background=true`.
    pub jobs_min_upload_bytes: usize,
    pub jobs_min_documents: usize,
    /// Documents a job stores per batch (cancelling takes effect between batches).
    pub jobs_batch_documents: usize,
    /// Jobs not yet finished in this process, and per user; jobs storing at once.
    pub jobs_max_pending: usize,
    pub jobs_max_pending_per_user: usize,
    pub jobs_max_running: usize,
    /// How long a finished job can still be read.
    pub jobs_retention_secs: u64,
    /// POST /knowledge/reindex: the most `document_ids` one request may name
    /// (without them, all of the caller's documents are re-indexed).
    pub reindex_max_documents: usize,
    /// At start, this many stored documents (spread over the store) have their
    /// first chunk embedded again: when one's stored vector came from another
    /// embedding model, every such document is re-embedded in the background
    /// (`knowledge::model_change`). 0: no check.
    #[serde(default = "default_embedding_check_sample")]
    pub embedding_check_sample: usize,
    /// Where POST /admin/seed-enhanced may read corpora: its `path` is relative
    /// to this directory and cannot leave it.
    pub seed_root: String,
    /// POST /knowledge/search: results when the request does not say, the most
    /// a request may ask for, and the longest query in characters.
    pub search_default_top_k: usize,
    pub search_max_top_k: usize,
    pub max_query_chars: usize,
}

/// GET /metrics access: a superuser's credentials, or this token (for a
/// Prometheus scraper; empty: no token, superusers only).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct MetricsSettings {
    #[serde(default)]
    pub token: Secret,
    /// A separate host:port serving only /metrics, without credentials (keep it
    /// private to the network). Empty: none.
    #[serde(default)]
    pub bind: String,
}

/// Chat: where conversations live and how answers are made.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatSettings {
    /// The embedded conversation store (used when `scylla_nodes` is empty).
    pub sqlite_url: String,
    /// ScyllaDB/Cassandra contact points, comma-separated host:port (production).
    #[serde(default)]
    pub scylla_nodes: String,
    pub scylla_keyspace: String,
    /// Replication factor of the keyspace when ragchat creates it.
    pub scylla_replication: u32,
    /// The system prompt; empty: the built-in one.
    #[serde(default)]
    pub system_prompt: String,
    /// Sources retrieved when a request does not say (`top_k`).
    pub default_top_k: usize,
    /// Characters of each source shown in `sources[].excerpt`.
    pub excerpt_chars: usize,
    /// Past messages read for the prompt (then cut to the context budget).
    pub history_messages: u32,
    /// Past questions are replayed with the sources they were answered from, so a
    /// turn's prompt begins with the whole previous one (the prompt cache then
    /// prefills only the new sources and question).
    pub history_sources: bool,
    /// The history in the prompt comes in windows of at most this many tokens
    /// (0: the context's room), so its start changes only when one fills up.
    pub history_tokens: usize,
    /// An answer sentence counts as supported when its support (best cosine
    /// with a source sentence, times the squared share of its numbers and names
    /// found in that sentence's passage) reaches this.
    pub support_threshold: f32,
    /// When the question's best cosine with a source sentence is below this, the
    /// answer is that the knowledge base does not contain it (0: never).
    pub refuse_below: f32,
    /// Supporting quotes per source.
    pub quotes_per_source: usize,
    /// Sentences embedded for grounding, per answer and for the sources together
    /// (0: no grounding, no quotes; confidence is then the best relevance).
    pub grounding_sentences: usize,
    /// The prompt gives the model only this many sentences of the retrieved
    /// passages, those that best match the question (0: the whole passages).
    pub evidence_sentences: usize,
    /// Longest accepted message, in characters.
    pub max_message_chars: usize,
    /// The most sources a request may ask for (`top_k`).
    pub max_top_k: usize,
    /// The longest answer a request may ask for (`max_tokens`), in tokens.
    pub max_answer_tokens: usize,
    /// Sampling temperature of chat answers.
    pub temperature: f32,
    /// The repetition penalty of chat answers counts the prompt's tokens too
    /// (the sources among them), not only the answer's own.
    pub penalize_prompt: bool,
    /// Added to the logits of the tokens of the sources in the prompt, so that
    /// a small model copies a number or a name rather than inventing one (0:
    /// none). Chat only; the OpenAI-compatible routes never get it.
    pub copy_bonus: f32,
    /// WebSocket: largest accepted frame in bytes, longest frame `id` in characters.
    pub ws_max_frame_bytes: usize,
    pub ws_max_id_chars: usize,
    /// WebSocket: the connection's credentials are checked again this often
    /// (expired token, ended login, revoked key, deactivated account close it).
    pub ws_auth_check_secs: u64,
    /// WebSocket: open connections per user.
    pub ws_max_per_user: usize,
    /// Without credentials at the handshake, the first frame must authenticate
    /// within this many seconds; at most `ws_max_unauthenticated` such connections
    /// wait at once (beyond: 503 at the handshake).
    #[serde(default = "default_ws_auth_timeout_secs")]
    pub ws_auth_timeout_secs: u64,
    #[serde(default = "default_ws_max_unauthenticated")]
    pub ws_max_unauthenticated: usize,
    /// WebSocket: a ping this often; a connection silent for `ws_timeout_secs` is closed.
    pub ws_ping_secs: u64,
    pub ws_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    /// Actix worker threads; 0 means one per CPU.
    pub workers: usize,
    /// Largest accepted request body for JSON routes.
    pub json_limit_bytes: usize,
    /// Seconds given to in-flight requests on SIGTERM/SIGINT.
    pub shutdown_timeout_secs: u64,
    /// On SIGTERM/SIGINT, `/health` and `/ready` answer 503 this many seconds
    /// before the server stops taking requests (a load balancer's health check
    /// takes the node out of rotation meanwhile).
    #[serde(default)]
    pub drain_secs: u64,
    /// An idle keep-alive connection is closed after this many seconds. Longer
    /// than a load balancer's idle timeout (60 s on the common ones), so the
    /// balancer, not the server, closes idle connections: a server closing one
    /// just as the balancer reuses it fails that request.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// Behind a load balancer: the header it sets with the client's address (for
    /// example `X-Forwarded-For`; its last entry is taken). Empty: the peer address.
    #[serde(default)]
    pub client_ip_header: String,
    /// Serve the web app at `/` (assets embedded in the binary). Off: the server is
    /// only the API, and `/` answers 404.
    #[serde(default = "default_true")]
    pub web_app: bool,
}

fn default_true() -> bool {
    true
}

fn default_keep_alive_secs() -> u64 {
    75
}

fn default_embedding_check_sample() -> usize {
    8
}

fn default_index_reconcile_secs() -> u64 {
    300
}

fn default_change_feed_poll_ms() -> u64 {
    250
}

fn default_change_feed_gap_secs() -> u64 {
    5
}

fn default_change_feed_retention_secs() -> u64 {
    86_400
}

fn default_ws_auth_timeout_secs() -> u64 {
    5
}

fn default_ws_max_unauthenticated() -> usize {
    256
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    /// `sqlite:data/ragchat.db` (embedded default) or `postgres://…`.
    pub url: String,
    pub max_connections: u32,
    /// How long a request waits for a connection before answering 503.
    pub acquire_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuthSettings {
    /// HS256 signing key. Required (≥ 32 bytes) in production; development and test
    /// configs carry throwaway keys.
    #[serde(default)]
    pub jwt_secret: Secret,
    pub issuer: String,
    pub audience: String,
    pub access_token_ttl_secs: u64,
    pub refresh_token_ttl_secs: u64,
    pub argon2: Argon2Settings,
    /// Sign-in attempts (right or wrong) per account and per client address, and
    /// registrations per client address (GCRA, as `rate_limits`).
    pub login_per_account: RateLimit,
    pub login_per_address: RateLimit,
    pub register_per_address: RateLimit,
    /// Password hashes computed at once, and how many may wait (beyond: 503).
    pub hash_concurrency: usize,
    pub hash_queue: usize,
    /// Whether an access token's login has ended (logout) is read from the store
    /// at most this often per login: a logout on another node is seen within it
    /// (on this node at once). 0: read on every request.
    pub login_cache_ms: u64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Argon2Settings {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LoggingSettings {
    /// `pretty` or `json`.
    pub format: String,
    /// tracing EnvFilter directive; RUST_LOG overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct SeedSettings {
    /// Create the demo users of the original design at start. Ignored in production.
    #[serde(default)]
    pub demo_users: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct RateLimit {
    pub limit: u32,
    pub period_secs: u64,
}

/// Per-user rate limits by bucket (GCRA: `limit` calls per `period_secs`, bursts up to `limit`).
#[derive(Debug, Clone, Deserialize)]
pub struct RateLimitSettings {
    pub chat: RateLimit,
    pub search: RateLimit,
    pub api: RateLimit,
    /// Chat answers one user may have in progress at once on a node (0: no cap).
    pub concurrent_chats: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SessionSettings {
    /// A session with no request for this long stops (its state is in the stores).
    pub idle_timeout_secs: u64,
    /// Dedicated threads the session actors run on.
    pub threads: usize,
    /// How long a request waits for its session before answering 503.
    pub send_timeout_ms: u64,
    /// User rows (active, plan, superuser) are read from the account store at
    /// most this often per user; a change made on another node is seen within
    /// this time (0: read on every request).
    pub user_cache_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QuotaSettings {
    /// `fail_closed` (503 while the quota store is down) or `fail_open`.
    pub store_down: String,
    /// Units per resource a session may admit while the store is down (fail_open).
    pub offline_allowance: u64,
    /// The most units a session reserves from the store at a time; near the
    /// limit it reserves one at a time (1: every unit is its own store write).
    pub max_lease: u64,
    /// Reserved units unused for this long go back to the store.
    pub lease_idle_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LedgerSettings {
    pub flush_interval_ms: u64,
    pub max_batch: usize,
    /// Append-only file holding usage records while the store is unreachable.
    pub spool_path: String,
    /// The spool's bound: past it, records wait in memory and admission
    /// refuses new work (503 `usage_store_unavailable`) until the store is back.
    pub max_spool_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RedisSettings {
    /// Empty: rate limits are kept in memory by each process.
    pub url: String,
    /// A Redis call slower than this counts as a failure.
    pub timeout_ms: u64,
    /// After a failure, Redis is not tried again for this long.
    pub breaker_cooldown_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BillingSettings {
    /// Plans file, relative to the config directory.
    pub plans_file: String,
    /// Serve /billing/probe/* (no-op routes that consume a unit, for the
    /// admission benchmark and client tests; `open` needs no credentials).
    pub probes: bool,
    /// How self-service upgrades are paid (src/payments.rs): `none` — not at all:
    /// an upgrade becomes a request an administrator approves or rejects; `invoice` —
    /// the prorated charge goes on the account (recorded, collected with the
    /// invoices) within `invoice_credit_limit_cents`, and the upgrade applies at once.
    pub payment_provider: String,
    /// `invoice` provider: the most one account may be charged in a calendar month
    /// (UTC), in cents; a charge past it is declined (402).
    pub invoice_credit_limit_cents: u64,
    /// The longest reason (characters) an administrator may give when rejecting an
    /// upgrade request.
    pub max_note_chars: usize,
}

/// The values `billing.payment_provider` may take.
pub const PAYMENT_PROVIDERS: [&str; 2] = ["none", "invoice"];

#[derive(Debug, Clone, Deserialize)]
pub struct ModelSettings {
    /// Load the models at start. Without their files the server still starts and
    /// the model routes answer 503.
    pub enabled: bool,
    pub embedding_name: String,
    /// Other names /v1 accepts for the embedding model (the Hugging Face id);
    /// names are compared in any case.
    pub embedding_aliases: Vec<String>,
    /// Folder with model.safetensors, config.json, tokenizer.json.
    pub embedding_dir: String,
    pub embedding_max_tokens: usize,
    /// Put before a question when it is embedded to search (not before the
    /// chunks): the instruction some retrieval models were trained with.
    #[serde(default)]
    pub embedding_query_prefix: String,
    /// POST /v1/chat/completions: the most messages in one request, and the most
    /// characters they hold together.
    pub max_completion_messages: usize,
    pub max_completion_chars: usize,
    /// POST /v1/embeddings: the most texts in one request, the longest text.
    pub max_embed_inputs: usize,
    pub max_embed_input_chars: usize,
    /// Texts per forward; a bulk job is embedded this many at a time.
    pub embed_max_batch: usize,
    pub embed_max_wait_ms: u64,
    /// The interactive lane (query vectors, a short single /v1/embeddings
    /// input): requests waiting beyond this answer 503 overloaded.
    pub embed_queue: usize,
    /// Interactive work ahead of bulk work; false: one FIFO queue where a job
    /// runs whole once started (the behaviour before lanes).
    pub embed_lanes: bool,
    /// The bulk lane (ingestion, seeding, multi-input /v1/embeddings): jobs
    /// embedding or waiting.
    pub embed_bulk_queue: usize,
    /// A bulk job finding its lane full waits this long for a place, then 503.
    pub embed_bulk_wait_ms: u64,
    /// /v1/embeddings: a single input of at most this many characters is interactive.
    pub embed_interactive_max_chars: usize,
    pub generator_name: String,
    /// Other names /v1 accepts for the generator (the Hugging Face id).
    pub generator_aliases: Vec<String>,
    /// A GGUF file (llama family or Qwen3).
    pub generator_path: String,
    /// Optional tokenizer.json; empty = built from the GGUF metadata.
    pub generator_tokenizer: String,
    /// Context cap per sequence (memory: the KV cache grows with it).
    pub max_context: usize,
    /// Keep an f32 copy of llama weights for prefill (≈5× faster prompts, 4 bytes
    /// per weight of memory).
    pub dense_prefill: bool,
    /// Sequences decoding together.
    pub max_active: usize,
    pub generate_queue: usize,
    pub default_max_tokens: usize,
    /// Prompt tokens prefilled per step (0: whole prompts at once); running
    /// answers decode a token between pieces.
    #[serde(default)]
    pub prefill_chunk: usize,
    /// MiB of KV cache the generation worker keeps from finished answers: a
    /// prompt that begins with one (the next turn of a conversation) prefills
    /// only the rest. 0: off.
    pub prompt_cache_mb: usize,
    /// Generation by an OpenAI-compatible server at this base URL instead of in
    /// process (empty: in process). `generator_path` (or `generator_tokenizer`)
    /// still names the same model, for its tokenizer.
    #[serde(default)]
    pub generator_url: String,
    #[serde(default)]
    pub generator_api_key: String,
    /// The `model` the server is asked for (empty: `generator_name`).
    #[serde(default)]
    pub generator_remote_model: String,
    /// Embeddings by an OpenAI-compatible server at this base URL (empty: in
    /// process); `embedding_dir`'s tokenizer.json, when there, sizes batches.
    #[serde(default)]
    pub embedder_url: String,
    #[serde(default)]
    pub embedder_api_key: String,
    /// The `model` the embedding server is asked for (empty: `embedding_name`).
    #[serde(default)]
    pub embedder_remote_model: String,
    /// Remote calls: to the response head and between stream chunks.
    #[serde(default = "default_remote_timeout_ms")]
    pub remote_timeout_ms: u64,
    /// Retries (with backoff) of a call that got no answer: an embedding, or a
    /// completion before its first token.
    #[serde(default = "default_remote_retries")]
    pub remote_retries: u32,
    /// Failures in a row that open the circuit breaker, and how long it stays open
    /// (calls answer 503 at once meanwhile).
    #[serde(default = "default_remote_breaker_failures")]
    pub remote_breaker_failures: u32,
    #[serde(default = "default_remote_breaker_secs")]
    pub remote_breaker_secs: u64,
    /// Answers in progress on the generation server at once; more: 503 overloaded.
    #[serde(default = "default_remote_max_in_flight")]
    pub remote_max_in_flight: usize,
}

fn default_remote_timeout_ms() -> u64 {
    30_000
}

fn default_remote_retries() -> u32 {
    2
}

fn default_remote_breaker_failures() -> u32 {
    5
}

fn default_remote_breaker_secs() -> u64 {
    10
}

fn default_remote_max_in_flight() -> usize {
    64
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {0}")]
    Invalid(String),
}

/// The directory holding the TOML files: RAGCHAT_CONFIG_DIR, else ./config, else
/// the config/ folder of the source tree this binary was built from.
pub fn config_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("RAGCHAT_CONFIG_DIR") {
        return PathBuf::from(dir);
    }
    let local = Path::new("config");
    if local.join("default.toml").exists() {
        return local.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

impl Settings {
    /// Loads the layered settings for the environment named by RAGCHAT_ENV.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_for(Environment::from_env()?)
    }

    pub fn load_for(env: Environment) -> Result<Self, ConfigError> {
        let dir = config_dir();
        let built = config::Config::builder()
            .add_source(config::File::from(dir.join("default.toml")))
            .add_source(config::File::from(dir.join(format!("{}.toml", env.as_str()))).required(false))
            .add_source(
                config::Environment::with_prefix("RAGCHAT")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?;
        let mut settings: Settings = built.try_deserialize()?;
        settings.environment = Some(env);
        settings.validate()?;
        Ok(settings)
    }

    pub fn environment(&self) -> Environment {
        self.environment.unwrap_or(Environment::Development)
    }

    /// Why serving on the configured addresses would be unsafe: outside
    /// production, a published development secret or demo users may only be
    /// reached from this machine. None when it is safe.
    pub fn unsafe_bind(&self) -> Option<String> {
        if self.environment() == Environment::Production {
            return None;
        }
        let secret = self.auth.jwt_secret.expose();
        let published = secret.starts_with("dev-only") || secret.starts_with("test-only");
        let why = match (published, self.seed.demo_users) {
            (true, true) => "a published development JWT secret and demo users",
            (true, false) => "a published development JWT secret",
            (false, true) => "demo users",
            (false, false) => return None,
        };
        let loopback = |host: &str| {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        };
        // server.host is a host; metrics.bind is host:port.
        let bind = self.metrics.bind.trim();
        let bind_host = match bind.parse::<std::net::SocketAddr>() {
            Ok(a) => a.ip().to_string(),
            Err(_) => bind.rsplit_once(':').map_or(bind, |(h, _)| h).to_string(),
        };
        let mut checks = vec![(self.server.host.clone(), self.server.host.clone())];
        if !bind.is_empty() {
            checks.push((bind.to_string(), bind_host));
        }
        checks.into_iter().find(|(_, host)| !loopback(host)).map(|(a, _)| {
            format!(
                "refusing to serve on {a}: the {} settings use {why}, which only bind to loopback \
                 (127.0.0.1 or ::1). Set RAGCHAT_ENV=production with RAGCHAT__AUTH__JWT_SECRET, \
                 or bind to 127.0.0.1.",
                self.environment().as_str()
            )
        })
    }

    /// Refuses settings the server must not run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let metrics_token = self.metrics.token.expose();
        if !metrics_token.is_empty() && metrics_token.len() < 24 {
            return Err(ConfigError::Invalid(
                "metrics.token must be at least 24 characters (or empty: superusers only)".into(),
            ));
        }
        let secret = self.auth.jwt_secret.expose();
        if self.environment() == Environment::Production {
            if secret.len() < 32 {
                return Err(ConfigError::Invalid(
                    "production requires auth.jwt_secret of at least 32 bytes: set RAGCHAT__AUTH__JWT_SECRET".into(),
                ));
            }
            if secret.starts_with("dev-only") || secret.starts_with("test-only") {
                return Err(ConfigError::Invalid(
                    "auth.jwt_secret is a development key: set RAGCHAT__AUTH__JWT_SECRET for production".into(),
                ));
            }
        } else if secret.is_empty() {
            return Err(ConfigError::Invalid("auth.jwt_secret is empty".into()));
        }
        let a = self.auth.argon2;
        if a.memory_kib < 8 * a.parallelism.max(1) || a.iterations == 0 || a.parallelism == 0 {
            return Err(ConfigError::Invalid("auth.argon2 parameters out of range".into()));
        }
        if !matches!(self.quota.store_down.as_str(), "fail_closed" | "fail_open") {
            return Err(ConfigError::Invalid(format!(
                "quota.store_down = '{}': expected fail_closed or fail_open",
                self.quota.store_down
            )));
        }
        for (name, rl) in [
            ("chat", self.rate_limits.chat),
            ("search", self.rate_limits.search),
            ("api", self.rate_limits.api),
        ] {
            if rl.limit == 0 || rl.period_secs == 0 {
                return Err(ConfigError::Invalid(format!(
                    "rate_limits.{name}: limit and period_secs must be positive"
                )));
            }
        }
        if !PAYMENT_PROVIDERS.contains(&self.billing.payment_provider.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "billing.payment_provider = '{}': expected {}",
                self.billing.payment_provider,
                PAYMENT_PROVIDERS.join(" or ")
            )));
        }
        if self.auth.access_token_ttl_secs == 0 || self.auth.refresh_token_ttl_secs == 0 {
            return Err(ConfigError::Invalid("auth token lifetimes must be positive".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_settings_only_serve_on_loopback() {
        let mut dev = Settings::load_for(Environment::Development).expect("development settings");
        assert_eq!(dev.unsafe_bind(), None, "127.0.0.1 by default");
        for host in ["0.0.0.0", "10.1.2.3", "example.com"] {
            dev.server.host = host.into();
            let why = dev.unsafe_bind().expect("refused");
            assert!(why.contains(host) && why.contains("RAGCHAT_ENV=production"), "{why}");
        }
        for host in ["localhost", "::1", "[::1]", "127.0.0.2"] {
            dev.server.host = host.into();
            assert_eq!(dev.unsafe_bind(), None, "{host}");
        }
        dev.server.host = "127.0.0.1".into();
        dev.metrics.bind = "0.0.0.0:9100".into();
        assert!(dev.unsafe_bind().is_some_and(|w| w.contains("0.0.0.0:9100")));
        dev.metrics.bind = "127.0.0.1:9100".into();
        assert_eq!(dev.unsafe_bind(), None);
    }

    #[test]
    fn upgrades_wait_for_approval_unless_a_known_payment_provider_is_configured() {
        let mut s = Settings::load_for(Environment::Development).expect("development settings");
        assert_eq!(s.billing.payment_provider, "none", "no provider by default");
        s.billing.payment_provider = "invoice".into();
        assert!(s.validate().is_ok());
        s.billing.payment_provider = "stripe".into();
        let why = s.validate().expect_err("unknown provider refused").to_string();
        assert!(why.contains("none or invoice"), "{why}");
    }
}
