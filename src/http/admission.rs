//! Admission as an extractor: a route that consumes a resource takes
//! `Admitted<R>`, which authenticates the caller, refuses an API key without the
//! scope `R` needs, and asks the user's session to admit one unit (rate limit,
//! then quota). The handler calls `complete` when the
//! work is done (usage recorded once); if it returns early or fails, dropping the
//! permit gives the quota back.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest, HttpResponseBuilder};
use ragchat_actors::admission::registry::Ticket;
use ragchat_actors::admission::session::{Admit, Bucket, Permit, RateInfo, Rejection};
use ragchat_actors::domain::{Scope, Scopes};
use ragchat_actors::plans::{PlanCatalog, Resource};
use serde_json::json;

use super::extractors::{authenticate, Access, CurrentUser};
use super::AppState;
use crate::error::ApiError;

/// What a route consumes: its rate-limit bucket and its quota resource; and,
/// as `Access`, the scopes an API key needs for it.
pub trait Consumes: Access {
    const BUCKET: Option<Bucket>;
    const RESOURCE: Resource;
}

/// A chat message: the chat rate limit and the `messages` quota; the `chat` scope.
pub struct ChatMessage;
impl Consumes for ChatMessage {
    const BUCKET: Option<Bucket> = Some(Bucket::Chat);
    const RESOURCE: Resource = Resource::Messages;
}
impl Access for ChatMessage {
    const ANY_OF: Option<Scopes> = Some(Scopes::of(&[Scope::Chat]));
}

/// A search: the search rate limit and the `api_calls` quota; the `search` scope.
pub struct SearchCall;
impl Consumes for SearchCall {
    const BUCKET: Option<Bucket> = Some(Bucket::Search);
    const RESOURCE: Resource = Resource::ApiCalls;
}
impl Access for SearchCall {
    const ANY_OF: Option<Scopes> = Some(Scopes::of(&[Scope::Search]));
}

/// Embeddings (`/v1/embeddings`): the api rate limit and the `api_calls` quota;
/// the `search` scope (vectors to search with).
pub struct EmbedCall;
impl Consumes for EmbedCall {
    const BUCKET: Option<Bucket> = Some(Bucket::Api);
    const RESOURCE: Resource = Resource::ApiCalls;
}
impl Access for EmbedCall {
    const ANY_OF: Option<Scopes> = Some(Scopes::of(&[Scope::Search]));
}

/// Adding documents: the api rate limit and the `api_calls` quota; the `ingest` scope.
pub struct IngestCall;
impl Consumes for IngestCall {
    const BUCKET: Option<Bucket> = Some(Bucket::Api);
    const RESOURCE: Resource = Resource::ApiCalls;
}
impl Access for IngestCall {
    const ANY_OF: Option<Scopes> = Some(Scopes::of(&[Scope::Ingest]));
}

/// A background task (seeding, ingestion jobs): the `background_tasks` quota;
/// the `ingest` scope.
pub struct BackgroundTask;
impl Consumes for BackgroundTask {
    const BUCKET: Option<Bucket> = Some(Bucket::Api);
    const RESOURCE: Resource = Resource::BackgroundTasks;
}
impl Access for BackgroundTask {
    const ANY_OF: Option<Scopes> = Some(Scopes::of(&[Scope::Ingest]));
}

pub struct Admitted<R: Consumes> {
    pub user: CurrentUser,
    ticket: Ticket,
    _r: PhantomData<R>,
}

impl<R: Consumes> Admitted<R> {
    pub fn permit(&self) -> Option<&Permit> {
        self.ticket.permit()
    }

    /// The work happened: record its usage (once).
    pub fn complete(self, metadata: serde_json::Value) -> Option<Permit> {
        self.ticket.complete(metadata)
    }

    /// Gives the unit back now (the work did not happen).
    pub fn release(self) {
        self.ticket.release()
    }

    /// The admitted unit, for a service that completes or releases it itself.
    pub fn into_ticket(self) -> Ticket {
        self.ticket
    }

    /// Adds RateLimit-* headers to a response.
    pub fn rate_headers(&self, resp: &mut HttpResponseBuilder) {
        if let Some(info) = self.permit().and_then(|p| p.rate) {
            add_rate_headers(resp, info);
        }
    }
}

pub fn add_rate_headers(resp: &mut HttpResponseBuilder, info: RateInfo) {
    resp.insert_header(("RateLimit-Limit", info.limit.to_string()))
        .insert_header(("RateLimit-Remaining", info.remaining.to_string()))
        .insert_header(("RateLimit-Reset", info.reset_secs.to_string()));
}

/// Maps a session's refusal to the HTTP answer of the original design.
pub fn rejection_error(r: Rejection) -> ApiError {
    use crate::error::ErrorCode;
    match r {
        Rejection::RateLimited {
            limit,
            period_secs,
            retry_after_ms,
            reset_ms,
            ..
        } => {
            let retry = retry_after_ms.div_ceil(1000).max(1);
            ApiError::TooManyRequests {
                detail: json!(format!(
                    "Rate limit exceeded. Max {limit} calls per {period_secs} seconds"
                )),
                headers: vec![
                    ("Retry-After", retry.to_string()),
                    ("RateLimit-Limit", limit.to_string()),
                    ("RateLimit-Remaining", "0".into()),
                    ("RateLimit-Reset", reset_ms.div_ceil(1000).to_string()),
                ],
            }
            .with_code(ErrorCode::RateLimited)
        }
        Rejection::QuotaExceeded {
            resource,
            used,
            limit,
            plan,
        } => {
            let now = chrono::Utc::now();
            let reset = (ragchat_actors::plans::month_of(now).end - now).num_seconds().max(1);
            ApiError::TooManyRequests {
                detail: json!({
                    "error": "Quota exceeded",
                    "resource": resource.as_str(),
                    "current_usage": used,
                    "limit": limit,
                    "upgrade_to": PlanCatalog::upgrade_from(plan).as_str(),
                    "upgrade_url": "/billing/plans",
                }),
                headers: vec![("Retry-After", reset.to_string())],
            }
            .with_code(ErrorCode::QuotaExceeded)
        }
        Rejection::StorageExceeded {
            used_bytes,
            requested_bytes,
            limit_bytes,
        } => {
            let mb = |b: u64| b as f64 / (1 << 20) as f64;
            ApiError::PayloadTooLarge(format!(
                "Storage quota exceeded: {:.1} of {:.0} MB used, this upload needs {:.2} MB",
                mb(used_bytes),
                mb(limit_bytes),
                mb(requested_bytes)
            ))
            .with_code(ErrorCode::StorageQuotaExceeded)
        }
        Rejection::Busy { limit, .. } => ApiError::TooManyRequests {
            detail: json!(format!(
                "You already have {limit} chat answer(s) in progress: wait for one to finish (or stop it)"
            )),
            headers: vec![("Retry-After", "1".into())],
        }
        .with_code(ErrorCode::TooManyChats),
        Rejection::UnknownUser => ApiError::Unauthorized("Could not validate credentials".into()),
        Rejection::Unavailable(why) => {
            tracing::warn!(reason = %why, "admission unavailable");
            ApiError::Unavailable("Service temporarily unavailable, please retry".into())
        }
        Rejection::UsageUnrecordable => ApiError::Unavailable(
            "Usage cannot be recorded right now (the usage store is down and the local spool is full); retry later"
                .into(),
        )
        .with_code(ErrorCode::UsageStoreUnavailable),
    }
}

impl<R: Consumes> Admitted<R> {
    /// Asks the user's session to admit one unit (for callers that are not an
    /// HTTP request of their own, such as a WebSocket message), once the
    /// credential is found to allow it (`R`'s scopes).
    pub async fn admit(state: &AppState, user: CurrentUser) -> Result<Self, ApiError> {
        user.require::<R>()?;
        let ticket = Ticket::admit(
            state.registry.clone(),
            user.user.id,
            Admit {
                bucket: R::BUCKET,
                resource: R::RESOURCE,
                cost: 1,
            },
        )
        .await
        .map_err(|r| {
            crate::telemetry::record_rejection(&r, R::RESOURCE.as_str());
            rejection_error(r)
        })?;
        Ok(Admitted {
            user,
            ticket,
            _r: PhantomData,
        })
    }
}

impl<R: Consumes> FromRequest for Admitted<R> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let user = authenticate(req.clone());
        let state = req.app_data::<web::Data<AppState>>().cloned();
        Box::pin(async move {
            let user = user.await?;
            let state = state.ok_or_else(|| ApiError::internal("application state missing"))?;
            Admitted::admit(&state, user).await
        })
    }
}
