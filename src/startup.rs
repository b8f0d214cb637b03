//! Builds the application from settings: stores, credentials, the HTTP server bound
//! to its listener. Tests bind port 0 and read the port back.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;
use std::path::PathBuf;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer};
use ragchat_actors::admission::logins::Logins;
use ragchat_actors::admission::ratelimit::Quota;
use ragchat_actors::admission::registry::SessionRegistry;
use ragchat_actors::admission::session::{Bucket, SessionConfig, SessionDeps, StoreDownPolicy};
use ragchat_actors::admission::throttle::Throttle;
use ragchat_actors::admission::users::UserCache;
use ragchat_actors::billing::Billing;
use ragchat_actors::chat::turn::{ChatLimits, ChatService};
use ragchat_actors::ledger::{Ledger, LedgerConfig, LedgerStats};
use ragchat_actors::plans::PlanBook;
use ragchat_actors::plans::PlanCatalog;
use ragchat_actors::ports::RateLimitStore;
use ragchat_actors::retrieval::{catch_up_in_background, Retrieval, Retriever};
use ragchat_actors::supervision::RestartPolicy;

use crate::auth::{PasswordHasher, TokenService};
use crate::config::{config_dir, Environment, RateLimit, Settings};
use crate::http::{self, AppState};
use crate::stores;
use crate::stores::redis_limits::RedisRateLimits;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Connect(#[from] stores::ConnectError),
    #[error("cannot bind {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("{0}")]
    Other(String),
}

pub struct Application {
    port: u16,
    server: Server,
    state: AppState,
    /// The `metrics.bind` server (already running) and its port.
    metrics: Option<(u16, actix_web::dev::ServerHandle)>,
}

impl Application {
    /// Connects the stores (running migrations), seeds demo users where the
    /// environment allows it, and binds the listener. `handle_signals` installs
    /// SIGTERM/SIGINT handlers for graceful shutdown (the binary; not tests).
    pub async fn build(settings: Settings, handle_signals: bool) -> Result<Self, StartupError> {
        if let Some(why) = settings.unsafe_bind() {
            return Err(StartupError::Other(why));
        }
        let settings = Arc::new(settings);
        let sql = stores::connect(&settings.database).await?;
        let accounts = sql.accounts.clone();
        let passwords =
            Arc::new(PasswordHasher::new(settings.auth.argon2).map_err(|e| StartupError::Other(e.to_string()))?);
        if settings.seed.demo_users && settings.environment() != Environment::Production {
            let n = crate::accounts::seed_demo_users(accounts.as_ref(), &passwords)
                .await
                .map_err(|e| StartupError::Other(format!("seeding demo users: {e}")))?;
            if n > 0 {
                tracing::info!(created = n, "seeded demo users");
            }
        }
        let plans = Arc::new(PlanBook::new(load_plans(&settings)?));
        let overrides = accounts
            .get_setting(ragchat_actors::plans::SUBSCRIPTION_LIMITS_KEY)
            .await
            .map_err(|e| e.to_string());
        if let Err(e) = overrides.and_then(|o| plans.apply(o.as_ref())) {
            tracing::error!(error = %e, "subscription_limits override ignored");
        }
        let ledger_config = LedgerConfig {
            flush_interval: Duration::from_millis(settings.ledger.flush_interval_ms.max(10)),
            max_batch: settings.ledger.max_batch.max(1),
            spool_path: PathBuf::from(&settings.ledger.spool_path),
            max_spool_bytes: settings.ledger.max_spool_bytes,
        };
        let usage = sql.usage.clone();
        let ledger = Ledger::start(usage, ledger_config, RestartPolicy::default()).map_err(StartupError::Other)?;
        let redis_limits = if settings.redis.url.trim().is_empty() {
            None
        } else {
            Some(Arc::new(
                RedisRateLimits::new(
                    &settings.redis.url,
                    Duration::from_millis(settings.redis.timeout_ms),
                    Duration::from_millis(settings.redis.breaker_cooldown_ms),
                )
                .map_err(|e| StartupError::Other(format!("redis.url: {e}")))?,
            ))
        };
        let quota = |r: RateLimit| Quota {
            limit: r.limit,
            period_ms: r.period_secs.saturating_mul(1000),
        };
        let rl = &settings.rate_limits;
        let session_config = SessionConfig {
            rate_limits: BTreeMap::from([
                (Bucket::Chat, quota(rl.chat)),
                (Bucket::Search, quota(rl.search)),
                (Bucket::Api, quota(rl.api)),
            ]),
            idle_timeout: Duration::from_secs(settings.sessions.idle_timeout_secs.max(1)),
            store_down: if settings.quota.store_down == "fail_open" {
                StoreDownPolicy::FailOpen {
                    allowance: settings.quota.offline_allowance,
                }
            } else {
                StoreDownPolicy::FailClosed
            },
            max_lease: settings.quota.max_lease.max(1),
            lease_idle: Duration::from_millis(settings.quota.lease_idle_ms),
            max_concurrent_chats: rl.concurrent_chats,
        };
        let limiter = redis_limits.clone().map(|r| {
            Arc::new(crate::stores::instrumented::RateLimits {
                inner: r,
                backend: "redis",
            }) as Arc<dyn RateLimitStore>
        });
        let throttle = Arc::new(Throttle::new(limiter.clone()));
        let deps = SessionDeps {
            accounts: accounts.clone(),
            usage: sql.usage.clone(),
            limiter,
            ledger: ledger.clone(),
            plans: plans.clone(),
            users: Arc::new(UserCache::new(Duration::from_millis(settings.sessions.user_cache_ms))),
            config: Arc::new(session_config),
        };
        let registry = SessionRegistry::new(
            deps,
            settings.sessions.threads,
            Duration::from_millis(settings.sessions.send_timeout_ms.max(1)),
        );
        // The metrics recorder, before anything records.
        let _ = crate::telemetry::handle();
        let (embedder, generator) = crate::models::start_models(&settings.models);
        let k = &settings.knowledge;
        let documents = stores::connect_documents(
            Some(k.mongodb_url.trim()).filter(|u| !u.is_empty()),
            &k.mongodb_database,
            &k.sqlite_url,
        )
        .await?;
        let c = &settings.chat;
        let conversations = stores::connect_conversations(
            Some(c.scylla_nodes.trim()).filter(|n| !n.is_empty()),
            &c.scylla_keyspace,
            c.scylla_replication,
            &c.sqlite_url,
        )
        .await?;
        let index_dir = Some(k.index_dir.trim()).filter(|d| !d.is_empty()).map(PathBuf::from);
        let started = std::time::Instant::now();
        let name = &settings.models.embedding_name;
        let calibration = crate::knowledge::calibration::for_model(name).unwrap_or_else(|| {
            tracing::warn!(
                model = %name,
                "no relevance calibration fitted for this embedding model: all-MiniLM-L6-v2's is used \
                 (fit one with `ragchat eval beir --calibrate`)"
            );
            crate::knowledge::calibration::MINILM_L6
        });
        let source = Arc::new(crate::knowledge::retrieval::IndexFolder {
            dir: index_dir,
            calibration,
        });
        let retrieval = Retrieval::supervised(source, documents.clone()).map_err(StartupError::Other)?;
        // The index comes from its snapshot, then catches up with the store; a
        // store unreachable now is caught up with once it answers. The change
        // feed is followed from its number before the catch-up, so a change made
        // meanwhile is applied (again: applying is idempotent).
        let feed_start = match k.change_feed_poll_ms {
            0 => None,
            _ => documents.last_change().await.ok(),
        };
        match ragchat_actors::retrieval::sync(documents.as_ref(), &retrieval.addr()).await {
            Ok(synced) => tracing::info!(
                kept = synced.kept,
                added = synced.added,
                removed = synced.removed,
                seconds = started.elapsed().as_secs_f64(),
                backend = documents.backend(),
                "search index ready"
            ),
            Err(e) => {
                tracing::error!(error = %e, "search index not caught up with the document store: retrying in the background");
                catch_up_in_background(documents.clone(), retrieval.addr());
            }
        }
        if k.change_feed_poll_ms > 0 {
            ragchat_actors::index_feed::follow(
                documents.clone(),
                retrieval.clone(),
                feed_start,
                ragchat_actors::index_feed::FollowConfig {
                    poll: std::time::Duration::from_millis(k.change_feed_poll_ms),
                    gap_wait: std::time::Duration::from_secs(k.change_feed_gap_secs),
                    retention: std::time::Duration::from_secs(k.change_feed_retention_secs),
                },
            );
        }
        if k.index_reconcile_secs > 0 {
            ragchat_actors::retrieval::reconcile_every(
                documents.clone(),
                retrieval.clone(),
                std::time::Duration::from_secs(k.index_reconcile_secs),
            );
        }
        let ingestor = embedder.clone().and_then(|embedder| {
            let path = std::path::Path::new(&settings.models.embedding_dir).join("tokenizer.json");
            match crate::knowledge::chunking::Chunker::load(&path, k.chunk_tokens, k.chunk_overlap) {
                Ok(c) => Some(crate::knowledge::ingest::Ingestor {
                    documents: documents.clone(),
                    chunker: Arc::new(c),
                    embedder,
                    retrieval: Some(retrieval.clone()),
                }),
                Err(e) => {
                    tracing::error!(error = %e, "chunker unavailable: ingestion is off");
                    None
                }
            }
        });
        if let (Some(ingestor), sample @ 1..) = (ingestor.clone(), k.embedding_check_sample) {
            // In the background: the server answers meanwhile (with the old
            // vectors until each document is re-embedded).
            actix_web::rt::spawn(async move {
                if let Err(e) = crate::knowledge::model_change::check(&ingestor, sample).await {
                    tracing::error!(error = %e, "checking the stored vectors against the embedding model failed");
                }
            });
        }
        let retrieval = Retriever::new(Some(retrieval), embedder.clone())
            .with_query_prefix(&settings.models.embedding_query_prefix);
        let chat = ChatService {
            conversations: conversations.clone(),
            retriever: retrieval.clone(),
            generator: generator.clone(),
            limits: Arc::new(chat_limits(&settings)),
        };
        let state = AppState {
            chat,
            sockets: Default::default(),
            draining: Default::default(),
            conversations,
            documents,
            ingestor,
            retrieval,
            seed: Default::default(),
            jobs: crate::knowledge::jobs::JobBoard::new(crate::knowledge::jobs::JobLimits::of(&settings.knowledge)),
            embedder,
            generator,
            tokens: Arc::new(TokenService::new(&settings.auth)),
            logins: Arc::new(Logins::new(
                Duration::from_millis(settings.auth.login_cache_ms),
                // An ended login is remembered while any of its access tokens
                // could still pass (their life plus the verifier's leeway).
                Duration::from_secs(settings.auth.access_token_ttl_secs.saturating_add(60)),
            )),
            settings: settings.clone(),
            billing: Arc::new(
                Billing::new(accounts.clone(), sql.usage.clone(), plans.clone())
                    .with_payments(crate::payments::provider(&settings.billing, sql.usage.clone())),
            ),
            accounts,
            passwords,
            hash_pool: Arc::new(crate::auth::passwords::HashPool::new(
                settings.auth.hash_concurrency,
                settings.auth.hash_queue,
            )),
            usage: sql.usage,
            plans,
            registry,
            throttle,
            ledger,
            redis_limits,
        };
        let addr = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = TcpListener::bind(&addr).map_err(|e| StartupError::Bind(addr.clone(), e))?;
        let port = listener.local_addr().map_err(|e| StartupError::Bind(addr, e))?.port();

        let app_state = state.clone();
        let mut server = HttpServer::new(move || {
            App::new()
                .wrap(from_fn(http::request_context))
                .configure(http::configure(app_state.clone()))
        })
        .shutdown_timeout(settings.server.shutdown_timeout_secs)
        .client_request_timeout(Duration::from_secs(30))
        .keep_alive(Duration::from_secs(settings.server.keep_alive_secs.max(1)));
        if settings.server.workers > 0 {
            server = server.workers(settings.server.workers);
        }
        // Signals are ours: SIGTERM drains first (see `drain_on_signals`).
        server = server.disable_signals();
        let server = server
            .listen(listener)
            .map_err(|e| StartupError::Other(e.to_string()))?
            .run();
        if handle_signals {
            drain_on_signals(
                server.handle(),
                state.draining.clone(),
                Duration::from_secs(settings.server.drain_secs),
            );
        }
        let metrics = metrics_server(&settings, &state)?;
        Ok(Application {
            port,
            server,
            state,
            metrics,
        })
    }

    /// The port of the `metrics.bind` server, when one is configured.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics.as_ref().map(|(p, _)| *p)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The server future plus a handle to stop it.
    pub fn into_server(self) -> Server {
        self.server
    }

    /// Runs until stopped (SIGTERM/SIGINT when signals are handled): in-flight
    /// requests get `server.shutdown_timeout_secs` to finish, then the sessions
    /// hand their unused quota leases back and the ledger writes (or spools)
    /// every usage record still in memory.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let ledger = self.state.ledger.clone();
        let registry = self.state.registry.clone();
        let result = self.server.await;
        // Quota units reserved and not used go back before the process ends.
        registry.return_all_leases().await;
        if let Some((_, metrics)) = &self.metrics {
            metrics.stop(true).await;
        }
        let stats = flush_ledger(&ledger).await;
        tracing::info!(
            written = stats.written,
            spooled = stats.spooled,
            buffered = stats.buffered,
            "ledger flushed"
        );
        result
    }
}

/// On SIGTERM or SIGINT: `/health` and `/ready` answer 503 for `drain`, so that a
/// load balancer takes the node out of rotation while it still answers, then the
/// server stops gracefully (in-flight requests and streams get
/// `server.shutdown_timeout_secs`). A second signal stops it at once.
fn drain_on_signals(
    handle: actix_web::dev::ServerHandle,
    draining: Arc<std::sync::atomic::AtomicBool>,
    drain: Duration,
) {
    actix_web::rt::spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            tracing::error!("cannot listen for SIGTERM");
            return;
        };
        let signal = async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            }
        };
        let which = signal.await;
        draining.store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(
            signal = which,
            drain_secs = drain.as_secs(),
            "draining: health answers 503, then stopping"
        );
        tokio::select! {
            _ = tokio::time::sleep(drain) => handle.stop(true).await,
            _ = term.recv() => handle.stop(false).await,
            _ = tokio::signal::ctrl_c() => handle.stop(false).await,
        }
    });
}

/// Starts the `metrics.bind` server (one worker, `GET /metrics` only, no
/// credentials) when configured.
fn metrics_server(
    settings: &Settings,
    state: &AppState,
) -> Result<Option<(u16, actix_web::dev::ServerHandle)>, StartupError> {
    let addr = settings.metrics.bind.trim();
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(addr).map_err(|e| StartupError::Bind(addr.to_string(), e))?;
    let port = listener
        .local_addr()
        .map_err(|e| StartupError::Bind(addr.to_string(), e))?
        .port();
    let data = actix_web::web::Data::new(state.clone());
    let server = HttpServer::new(move || {
        App::new().app_data(data.clone()).route(
            "/metrics",
            actix_web::web::get().to(http::metrics::metrics_on_private_address),
        )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .map_err(|e| StartupError::Other(e.to_string()))?
    .run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    tracing::info!(
        address = addr,
        port,
        "metrics served without credentials on a separate address"
    );
    Ok(Some((port, handle)))
}

/// Flushes the ledger until nothing is left in memory or in the spool, for at
/// most `SHUTDOWN_FLUSH` (then what is left stays in the spool for the next
/// start). A flush that finds a periodic cycle running waits for it; a write
/// that failed at shutdown (a pooled connection of a stopped server worker
/// fails once) left records in the spool, and further flushes replay them
/// through fresh connections, so a node that is not started again (scaled
/// down) leaves nothing behind while the store is up.
pub async fn flush_ledger(ledger: &Ledger) -> LedgerStats {
    let deadline = std::time::Instant::now() + SHUTDOWN_FLUSH;
    let mut last = LedgerStats::default();
    loop {
        let pause = match ledger.flush().await {
            Ok(stats) => {
                last = stats;
                let in_memory = stats.buffered > 0 || ledger.parked() > 0;
                if !in_memory && stats.spooled == 0 {
                    break;
                }
                Duration::from_millis(if in_memory { 20 } else { 200 })
            }
            // The ledger is being restarted by its supervisor.
            Err(_) => Duration::from_millis(50),
        };
        if std::time::Instant::now() + pause >= deadline {
            break;
        }
        tokio::time::sleep(pause).await;
    }
    last
}

/// How long a stopping server keeps flushing usage to the store: well within a
/// pod's grace period (30 s by default) after the drain.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(10);

/// The limits and defaults of a chat turn, from `[chat]` and `[models]`.
fn chat_limits(settings: &Settings) -> ChatLimits {
    let c = &settings.chat;
    ChatLimits {
        max_message_chars: c.max_message_chars,
        default_top_k: c.default_top_k,
        max_top_k: c.max_top_k,
        default_max_tokens: settings.models.default_max_tokens,
        max_answer_tokens: c.max_answer_tokens,
        temperature: c.temperature,
        penalize_prompt: c.penalize_prompt,
        copy_bonus: c.copy_bonus,
        excerpt_chars: c.excerpt_chars,
        history_messages: c.history_messages,
        history_sources: c.history_sources,
        history_tokens: c.history_tokens,
        system_prompt: c.system_prompt.clone(),
        model_name: settings.models.generator_name.clone(),
        grounding: ragchat_actors::chat::turn::GroundingLimits {
            support_threshold: c.support_threshold,
            refuse_below: c.refuse_below,
            quotes_per_source: c.quotes_per_source,
            max_sentences: c.grounding_sentences,
            evidence_sentences: c.evidence_sentences,
        },
    }
}

/// The plan catalog from config/{billing.plans_file}.
fn load_plans(settings: &Settings) -> Result<PlanCatalog, StartupError> {
    let path = config_dir().join(&settings.billing.plans_file);
    config::Config::builder()
        .add_source(config::File::from(path.clone()))
        .build()
        .and_then(|c| c.try_deserialize::<PlanCatalog>())
        .map_err(|e| StartupError::Other(format!("plans file {}: {e}", path.display())))
}
