//! The actix-web application: one module per area, extractors, middleware.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod billing;
pub mod chat;
pub mod extractors;
pub mod knowledge;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod ops;
pub mod sse;
pub mod views;
pub mod webapp;
pub mod ws;

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpMessage};
use ragchat_actors::admission::registry::SessionRegistry;
use ragchat_actors::billing::Billing;
use ragchat_actors::ledger::Ledger;
use ragchat_actors::plans::PlanBook;
use ragchat_actors::ports::{AccountStore, UsageStore};
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::{PasswordHasher, TokenService};
use crate::config::Settings;
use crate::error::{json_error, path_error, query_error, ApiError};

/// Everything handlers share. Cheap to clone (all behind Arcs).
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub accounts: Arc<dyn AccountStore>,
    pub passwords: Arc<PasswordHasher>,
    /// Where hashes and verifications run, bounded (`auth.hash_concurrency`, `auth.hash_queue`).
    pub hash_pool: Arc<crate::auth::passwords::HashPool>,
    pub tokens: Arc<TokenService>,
    /// Logins that ended (logout), so their access tokens stop working too.
    pub logins: Arc<ragchat_actors::admission::logins::Logins>,
    pub usage: Arc<dyn UsageStore>,
    pub plans: Arc<PlanBook>,
    pub billing: Arc<Billing>,
    pub registry: Arc<SessionRegistry>,
    /// Sign-in and registration throttles (Redis when configured).
    pub throttle: Arc<ragchat_actors::admission::throttle::Throttle>,
    pub ledger: Ledger,
    /// The Redis rate limiter, when configured (its breaker state is reported).
    pub redis_limits: Option<Arc<crate::stores::redis_limits::RedisRateLimits>>,
    /// Model workers; None when the model files are missing or models are disabled.
    pub embedder: Option<ragchat_actors::embed_worker::EmbedWorker>,
    pub generator: Option<ragchat_actors::generate_worker::GenerateWorker>,
    /// The knowledge base: documents and chunks, ingestion (None without the
    /// embedding model), retrieval (the supervised actor and the query
    /// embedding) and the state of the last seed.
    pub documents: Arc<dyn ragchat_actors::ports::DocumentStore>,
    pub ingestor: Option<crate::knowledge::ingest::Ingestor>,
    pub retrieval: ragchat_actors::retrieval::Retriever,
    pub seed: Arc<std::sync::Mutex<crate::knowledge::seed::SeedStatus>>,
    /// Background upload jobs of this process.
    pub jobs: Arc<crate::knowledge::jobs::JobBoard>,
    /// Chat sessions and their messages.
    pub conversations: Arc<dyn ragchat_actors::ports::ConversationStore>,
    /// The chat turn (conversations, retrieval and the model behind it).
    pub chat: ragchat_actors::chat::turn::ChatService,
    /// Open WebSockets per user (for `chat.ws_max_per_user`).
    pub sockets: Arc<ws::Sockets>,
    /// Set on SIGTERM: `/health` and `/ready` answer 503 for `server.drain_secs` so
    /// that load balancers stop sending requests, then the server stops.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The id of the current request, also sent back as `x-request-id`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// A client-supplied id is kept when it is short and plain; otherwise a new one is made.
fn request_id_of(req: &ServiceRequest) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
        .map(str::to_string)
        .unwrap_or_else(|| Uuid::new_v4().to_string())
}

/// Gives every request an id, logs it with method, path, status and latency in a
/// tracing span, and echoes the id in the response.
pub async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody + 'static>, actix_web::Error> {
    let id = request_id_of(&req);
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.path());
    let started = Instant::now();
    async move {
        // Handler errors are already responses here; middleware errors (the admin
        // guard) are turned into responses where they arise, so all carry the id.
        let mut resp = next.call(req).await?;
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert(REQUEST_ID, v);
        }
        let seconds = started.elapsed().as_secs_f64();
        let route = resp.request().match_pattern().unwrap_or_else(|| "unmatched".into());
        crate::telemetry::record_request(
            resp.request().method().as_str(),
            &route,
            resp.status().as_u16(),
            seconds,
        );
        let elapsed_ms = seconds * 1000.0;
        tracing::info!(status = resp.status().as_u16(), elapsed_ms, "handled");
        Ok(resp)
    }
    .instrument(span)
    .await
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("Not Found".into()))
}

/// Registers every route, the shared state and the extractor configs.
pub fn configure(state: AppState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg: &mut web::ServiceConfig| {
        let json_limit = state.settings.server.json_limit_bytes;
        let max_document = state.settings.knowledge.max_document_bytes;
        let probes = state.settings.billing.probes;
        if state.settings.server.web_app {
            cfg.configure(webapp::routes);
        }
        cfg.app_data(web::Data::new(state))
            .app_data(web::JsonConfig::default().limit(json_limit).error_handler(json_error))
            .app_data(web::QueryConfig::default().error_handler(query_error))
            .app_data(web::PathConfig::default().error_handler(path_error))
            .configure(ops::routes)
            .configure(metrics::routes)
            .configure(auth::routes)
            .configure(billing::routes(probes))
            .configure(openai::routes)
            .configure(chat::routes)
            .configure(ws::routes)
            .configure(knowledge::routes(max_document))
            .service(
                web::scope("/admin")
                    .wrap(from_fn(extractors::require_admin))
                    .configure(admin::routes),
            )
            .configure(openapi::routes)
            .default_service(web::to(not_found));
    }
}
