//! `GET /metrics`: Prometheus text format, through the `metrics` facade and the
//! Prometheus recorder (installed once per process).
//!
//! Recorded as things happen: HTTP requests by route pattern and status with
//! latency histograms; admission rejections by reason and resource; retrieval
//! latency by route; chat answers and time to first token; model worker queue
//! waits and batch sizes. Read from the components at each scrape: sessions,
//! model workers, the ledger (backlog, spool, store down, parked records), the
//! Redis fallback, the search index size, and per actor kind the mailbox depth
//! and messages handled (`actor_mailbox_depth`, `actor_messages_handled_total`;
//! waits and handling times are histograms recorded as messages are handled).
//! Restarts of every supervised child: `supervisor_restarts_total{child}`.
//!
//! Access: `Authorization: Bearer <metrics.token>` when `metrics.token` is set
//! (for a Prometheus scraper), or a superuser's JWT / API key. Or, with
//! `metrics.bind` set, without credentials on that separate address (serving
//! /metrics only), which the network must keep private.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sha2::{Digest, Sha256};

use super::extractors::{bearer, user_for_token};
use super::AppState;
use crate::error::{ApiError, ErrorBody, ErrorCode};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/metrics").route(web::get().to(metrics)));
}

/// Latency buckets in seconds: 1 ms to 2 minutes (chat answers are long).
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder: installed on first use (None if another
/// recorder was installed first). Histogram buffers are drained every few
/// seconds by a thread of its own.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZES))
                .and_then(|b| b.install_recorder());
            match built {
                Ok(h) => {
                    let upkeep = h.clone();
                    let _ = std::thread::Builder::new()
                        .name("metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(Duration::from_secs(5));
                            upkeep.run_upkeep();
                        });
                    Some(h)
                }
                Err(e) => {
                    tracing::error!(error = %e, "metrics recorder not installed: /metrics answers 503");
                    None
                }
            }
        })
        .as_ref()
}

/// Records one HTTP request (called by the request middleware).
pub fn record_request(method: &str, route: &str, status: u16, seconds: f64) {
    let labels = [
        ("method", method.to_string()),
        ("route", route.to_string()),
        ("status", status.to_string()),
    ];
    counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!(
        "http_request_duration_seconds",
        "method" => method.to_string(),
        "route" => route.to_string()
    )
    .record(seconds);
}

/// Records a refused admission: the reason and the resource or bucket.
pub fn record_rejection(r: &ragchat_actors::session::Rejection, resource: &str) {
    use ragchat_actors::session::Rejection as R;
    let (reason, what) = match r {
        R::RateLimited { bucket, .. } => ("rate_limited", bucket.as_str().to_string()),
        R::QuotaExceeded { resource, .. } => ("quota_exceeded", resource.as_str().to_string()),
        R::StorageExceeded { .. } => ("storage_exceeded", "storage_mb".to_string()),
        R::UnknownUser => ("unknown_user", resource.to_string()),
        R::Unavailable(_) => ("unavailable", resource.to_string()),
    };
    counter!("admission_rejections_total", "reason" => reason, "resource" => what).increment(1);
}

/// Records one retrieval (query embedding and search) on a route.
pub fn record_retrieval(route: &str, seconds: f64) {
    metrics::histogram!("retrieval_duration_seconds", "route" => route.to_string()).record(seconds);
}

fn same(a: &str, b: &str) -> bool {
    // Digests first: the comparison takes the same time wherever they differ.
    Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes())
}

async fn allowed(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let token = bearer(req)?;
    let configured = state.settings.metrics.token.expose();
    if !configured.is_empty() && same(&token, configured) {
        return Ok(());
    }
    let user = user_for_token(state, &token).await?;
    if user.user.is_superuser {
        Ok(())
    } else {
        Err(
            ApiError::Forbidden("Admin privileges or the metrics token required".into())
                .with_code(ErrorCode::AdminRequired),
        )
    }
}

/// Sets the gauges read from the components.
async fn sample(state: &AppState) {
    let s = state.registry.stats();
    gauge!("sessions_active").set(s.active as f64);
    counter!("sessions_created_total").absolute(s.created);
    counter!("sessions_evicted_total").absolute(s.evicted);
    counter!("sessions_restarted_total").absolute(s.restarted);
    if let Some(g) = &state.generator {
        let st = &g.stats;
        gauge!("generate_active_sequences").set(st.active.load(Ordering::Relaxed) as f64);
        gauge!("generate_queued_requests").set(st.queued.load(Ordering::Relaxed) as f64);
        gauge!("actor_mailbox_depth", "actor" => "generate-worker").set(st.queued.load(Ordering::Relaxed) as f64);
        counter!("generate_steps_total").absolute(st.steps.load(Ordering::Relaxed));
        counter!("generate_tokens_total").absolute(st.tokens.load(Ordering::Relaxed));
        counter!("generate_cancelled_total").absolute(st.cancelled.load(Ordering::Relaxed));
        counter!("model_worker_restarts_total", "worker" => "generate").absolute(st.restarts.load(Ordering::Relaxed));
    }
    if let Some(e) = &state.embedder {
        let st = &e.stats;
        gauge!("embed_queued_requests").set(st.queued.load(Ordering::Relaxed) as f64);
        gauge!("actor_mailbox_depth", "actor" => "embed-worker").set(st.queued.load(Ordering::Relaxed) as f64);
        counter!("embed_batches_total").absolute(st.batches.load(Ordering::Relaxed));
        counter!("embed_texts_total").absolute(st.items.load(Ordering::Relaxed));
        counter!("model_worker_restarts_total", "worker" => "embed").absolute(st.restarts.load(Ordering::Relaxed));
    }
    if let Ok(Ok(l)) = tokio::time::timeout(Duration::from_millis(500), state.ledger.stats()).await {
        gauge!("ledger_buffered_records").set(l.buffered as f64);
        gauge!("ledger_spooled_records").set(l.spooled as f64);
        counter!("ledger_written_records_total").absolute(l.written);
        counter!("ledger_failed_flushes_total").absolute(l.failed_flushes);
        gauge!("ledger_store_down").set(if l.store_down { 1.0 } else { 0.0 });
    }
    gauge!("ledger_parked_records").set(state.ledger.parked() as f64);
    for m in [
        &ragchat_actors::session::SESSION_MAILBOX,
        &ragchat_actors::ledger::LEDGER_MAILBOX,
        &crate::knowledge::retrieval::RETRIEVAL_MAILBOX,
    ] {
        gauge!("actor_mailbox_depth", "actor" => m.kind).set(m.depth() as f64);
        counter!("actor_messages_handled_total", "actor" => m.kind).absolute(m.handled());
    }
    let fallback = state.redis_limits.as_ref().is_some_and(|r| r.fallback_active());
    gauge!("ratelimit_redis_fallback_active").set(if fallback { 1.0 } else { 0.0 });
    if let Some(r) = &state.retrieval {
        if let Ok(Ok(n)) = tokio::time::timeout(
            Duration::from_millis(500),
            r.send(crate::knowledge::retrieval::IndexedChunks),
        )
        .await
        {
            gauge!("retrieval_indexed_chunks").set(n as f64);
        }
    }
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "ops", security(("bearer" = [])),
    responses((status = 200, description = "Prometheus text format"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    allowed(&req, &state).await?;
    render(&state).await
}

/// `/metrics` on the separate `metrics.bind` address: no credentials.
pub async fn metrics_on_private_address(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    render(&state).await
}

async fn render(state: &AppState) -> Result<HttpResponse, ApiError> {
    let handle = handle().ok_or_else(|| ApiError::Unavailable("metrics are not recorded in this process".into()))?;
    sample(state).await;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(handle.render()))
}
