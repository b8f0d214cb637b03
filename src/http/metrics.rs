//! `GET /metrics`: Prometheus text format, through the `metrics` facade and the
//! Prometheus recorder (installed once per process).
//!
//! Recorded as things happen: HTTP requests by route pattern and status with
//! latency histograms; admission rejections by reason and resource; retrieval
//! latency by route; chat answers and time to first token; model worker queue
//! waits and batch sizes. Read from the components at each scrape: sessions,
//! model workers, the ledger (backlog, spool size and records, records held
//! past the spool's bound, store down, parked records), the
//! Redis fallback, the search index size, and per actor kind the mailbox depth
//! and messages handled (`actor_mailbox_depth`, `actor_messages_handled_total`;
//! waits and handling times are histograms recorded as messages are handled).
//! Restarts of every supervised child: `supervisor_restarts_total{child}`.
//!
//! Access: `Authorization: Bearer <metrics.token>` when `metrics.token` is set
//! (for a Prometheus scraper), or a superuser's JWT / API key (with the `admin` scope). Or, with
//! `metrics.bind` set, without credentials on that separate address (serving
//! /metrics only), which the network must keep private.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use metrics::{counter, gauge};
use sha2::{Digest, Sha256};

use super::extractors::{authorize_admin, bearer};
use super::AppState;
use crate::error::{ApiError, ErrorBody, ErrorCode};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/metrics").route(web::get().to(metrics)));
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
    match authorize_admin(state, &token).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == ErrorCode::AdminRequired => Err(ApiError::Forbidden(
            "Admin privileges or the metrics token required".into(),
        )
        .with_code(ErrorCode::AdminRequired)),
        Err(e) => Err(e),
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
        gauge!("embed_queued_requests").set(st.queued() as f64);
        gauge!("embed_lane_queued_requests", "lane" => "interactive")
            .set(st.queued_interactive.load(Ordering::Relaxed) as f64);
        gauge!("embed_lane_queued_requests", "lane" => "bulk").set(st.queued_bulk.load(Ordering::Relaxed) as f64);
        gauge!("embed_bulk_waiting_requests").set(st.bulk_waiting.load(Ordering::Relaxed) as f64);
        gauge!("embed_bulk_pending_texts").set(st.bulk_pending_texts.load(Ordering::Relaxed) as f64);
        gauge!("actor_mailbox_depth", "actor" => "embed-worker").set(st.queued() as f64);
        counter!("embed_batches_total").absolute(st.batches.load(Ordering::Relaxed));
        counter!("embed_texts_total").absolute(st.items.load(Ordering::Relaxed));
        counter!("model_worker_restarts_total", "worker" => "embed").absolute(st.restarts.load(Ordering::Relaxed));
    }
    // The spool's figures are shared atomics: right even when the ledger is busy.
    let spool = state.ledger.spool();
    gauge!("ledger_spooled_records").set(spool.records as f64);
    gauge!("ledger_spool_bytes").set(spool.bytes as f64);
    gauge!("ledger_spool_max_bytes").set(spool.max_bytes as f64);
    gauge!("ledger_held_records").set(spool.held as f64);
    gauge!("ledger_spool_full").set(if spool.full() { 1.0 } else { 0.0 });
    counter!("ledger_spool_read_records_total").absolute(spool.records_read);
    if let Ok(Ok(l)) = tokio::time::timeout(Duration::from_millis(500), state.ledger.stats()).await {
        gauge!("ledger_buffered_records").set(l.buffered as f64);
        counter!("ledger_written_records_total").absolute(l.written);
        counter!("ledger_failed_flushes_total").absolute(l.failed_flushes);
        gauge!("ledger_store_down").set(if l.store_down { 1.0 } else { 0.0 });
    }
    gauge!("ledger_parked_records").set(state.ledger.parked() as f64);
    for m in [
        &ragchat_actors::admission::session::SESSION_MAILBOX,
        &ragchat_actors::ledger::LEDGER_MAILBOX,
        &ragchat_actors::retrieval::RETRIEVAL_MAILBOX,
    ] {
        gauge!("actor_mailbox_depth", "actor" => m.kind).set(m.depth() as f64);
        counter!("actor_messages_handled_total", "actor" => m.kind).absolute(m.handled());
    }
    let fallback = state.redis_limits.as_ref().is_some_and(|r| r.fallback_active());
    gauge!("ratelimit_redis_fallback_active").set(if fallback { 1.0 } else { 0.0 });
    if let Some(r) = state.retrieval.actor() {
        if let Ok(Ok(n)) = tokio::time::timeout(
            Duration::from_millis(500),
            r.send(ragchat_actors::retrieval::IndexedChunks),
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
        (status = 403, body = ErrorBody, description = "Not a superuser, or an API key without the `admin` scope"),
        (status = 503, body = ErrorBody)))]
pub async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    allowed(&req, &state).await?;
    render(&state).await
}

/// `/metrics` on the separate `metrics.bind` address: no credentials.
pub async fn metrics_on_private_address(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    render(&state).await
}

async fn render(state: &AppState) -> Result<HttpResponse, ApiError> {
    let handle = crate::telemetry::handle()
        .ok_or_else(|| ApiError::Unavailable("metrics are not recorded in this process".into()))?;
    sample(state).await;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(handle.render()))
}
