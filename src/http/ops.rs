//! Liveness and readiness.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/health").route(web::get().to(health)))
        .service(web::resource("/ready").route(web::get().to(ready)));
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// Liveness: the process answers HTTP. Touches no store.
#[utoipa::path(get, path = "/health", tag = "ops",
    responses((status = 200, body = Health), (status = 503, body = Health, description = "Draining after SIGTERM")))]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let draining = state.draining.load(std::sync::atomic::Ordering::Relaxed);
    let body = Health {
        status: if draining { "draining" } else { "healthy" }.into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    if draining {
        HttpResponse::ServiceUnavailable().json(body)
    } else {
        HttpResponse::Ok().json(body)
    }
}

/// How long /ready waits for each store before calling it down.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Readiness: every configured store answers. 503 with the failing store otherwise.
#[utoipa::path(get, path = "/ready", tag = "ops",
    responses((status = 200, description = "All stores answer"), (status = 503, description = "A store is down")))]
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return HttpResponse::ServiceUnavailable().json(json!({"status": "draining"}));
    }
    let status =
        |r: Result<Result<(), ragchat_actors::ports::StoreError>, tokio::time::error::Elapsed>, what: &str| match r {
            Ok(Ok(())) => "ok".to_string(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, store = what, "readiness: store down");
                "unavailable".to_string()
            }
            Err(_) => "timeout".to_string(),
        };
    let accounts = status(
        tokio::time::timeout(READY_TIMEOUT, state.accounts.ping()).await,
        "accounts",
    );
    let documents = status(
        tokio::time::timeout(READY_TIMEOUT, state.documents.ping()).await,
        "documents",
    );
    let conversations = status(
        tokio::time::timeout(READY_TIMEOUT, state.conversations.ping()).await,
        "conversations",
    );
    let ok = accounts == "ok" && documents == "ok" && conversations == "ok";
    let body = json!({
        "status": if ok { "ready" } else { "unavailable" },
        "stores": {
            "accounts": { "backend": state.accounts.backend(), "status": accounts },
            "documents": { "backend": state.documents.backend(), "status": documents },
            "conversations": { "backend": state.conversations.backend(), "status": conversations },
        },
    });
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
