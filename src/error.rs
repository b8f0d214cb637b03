//! The HTTP layer's one error type, mapped once to a status code and a body
//! `{"detail": ..., "code": ..., "type": ..., "link": ...}`: `detail` as in FastAPI
//! (a string, or an object for quota refusals), a stable machine-readable `code`,
//! its coarse `type` and a `link` to its section in docs/errors.md. 5xx bodies never
//! carry internal error text: the text is logged with the request id instead.
//!
//! Every variant has a default code (`ApiError::code`); a call site gives a more
//! specific one with `with_code`:
//! `ApiError::NotFound("Document not found".into()).with_code(ErrorCode::DocumentNotFound)`.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use ragchat_actors::billing::BillingError;
use ragchat_actors::chat::turn::ChatError;
use ragchat_actors::inference::ModelError;
use ragchat_actors::ports::{PaymentError, StoreError};
use ragchat_actors::retrieval::RetrievalError;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

/// The coarse kind of an error: what sort of thing went wrong, for clients that
/// handle errors by kind rather than by code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// The request is wrong: fix it before sending it again.
    InvalidRequest,
    /// Credentials are missing, wrong, expired, or not enough for this route.
    Auth,
    /// A monthly quota or the storage quota is used up.
    Quota,
    /// Too many requests in a short time: retry after `Retry-After` seconds.
    RateLimit,
    /// A payment was refused: nothing was charged or changed.
    Payment,
    /// A dependency (store, model, index) is down or busy: retry later.
    Unavailable,
    /// A bug or an unexpected failure on the server.
    Internal,
}

impl ErrorType {
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorType::InvalidRequest => "invalid_request",
            ErrorType::Auth => "auth",
            ErrorType::Quota => "quota",
            ErrorType::RateLimit => "rate_limit",
            ErrorType::Payment => "payment",
            ErrorType::Unavailable => "unavailable",
            ErrorType::Internal => "internal",
        }
    }
}

/// Declares `ErrorCode` with each code's string, type and docs link in one list,
/// and `ErrorCode::ALL`, so none can be forgotten.
macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = $name:literal, $kind:ident;)*) => {
        /// A stable, machine-readable error code: the `code` of every error body.
        /// Each has a section in docs/errors.md (its `link`).
        ///
        /// Serialized in snake_case: the `as_str` names must be those (a unit test checks).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $name,)*
                }
            }

            pub const fn error_type(self) -> ErrorType {
                match self {
                    $(ErrorCode::$variant => ErrorType::$kind,)*
                }
            }

            /// Its section in the error reference: `docs/errors.md#<code>`.
            pub const fn link(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => concat!("docs/errors.md#", $name),)*
                }
            }
        }
    };
}

error_codes! {
    /// A field or parameter is invalid (400 or 422).
    InvalidRequest = "invalid_request", InvalidRequest;
    /// The body is not well-formed JSON (400).
    MalformedJson = "malformed_json", InvalidRequest;
    /// The body or upload is over the size limit (413).
    PayloadTooLarge = "payload_too_large", InvalidRequest;
    /// The upload's format is not supported (415).
    UnsupportedMediaType = "unsupported_media_type", InvalidRequest;
    /// The prompt or conversation does not fit the model's context (400).
    PromptTooLong = "prompt_too_long", InvalidRequest;
    /// No such route or resource (404).
    NotFound = "not_found", InvalidRequest;
    /// No such document, or not one the caller may see (404).
    DocumentNotFound = "document_not_found", InvalidRequest;
    /// No such background job of the caller (404).
    JobNotFound = "job_not_found", InvalidRequest;
    /// No such user (404).
    UserNotFound = "user_not_found", InvalidRequest;
    /// No such chat session of the caller (404).
    SessionNotFound = "session_not_found", InvalidRequest;
    /// No such API key of the caller (404).
    ApiKeyNotFound = "api_key_not_found", InvalidRequest;
    /// The request names a model this server does not run (404).
    ModelNotFound = "model_not_found", InvalidRequest;
    /// The request conflicts with the current state (409).
    Conflict = "conflict", InvalidRequest;
    /// The e-mail address is already registered (409).
    EmailTaken = "email_taken", InvalidRequest;
    /// Already on that plan with that billing cycle (409).
    PlanUnchanged = "plan_unchanged", InvalidRequest;
    /// A seed is already running (409).
    SeedInProgress = "seed_in_progress", InvalidRequest;
    /// The account already has an upgrade request waiting for approval (409).
    UpgradeRequestPending = "upgrade_request_pending", InvalidRequest;
    /// No such upgrade request (404).
    UpgradeRequestNotFound = "upgrade_request_not_found", InvalidRequest;
    /// The upgrade request was already approved, rejected, cancelled or found stale (409).
    UpgradeRequestClosed = "upgrade_request_closed", InvalidRequest;
    /// The upgrade request is no longer an upgrade of the account's plan (409).
    UpgradeRequestStale = "upgrade_request_stale", InvalidRequest;
    /// No credentials, or credentials that are not valid (401).
    Unauthenticated = "unauthenticated", Auth;
    /// Wrong e-mail or password (401).
    InvalidCredentials = "invalid_credentials", Auth;
    /// The access token has expired: refresh it (401).
    TokenExpired = "token_expired", Auth;
    /// The access token's login has ended (logout, or a reused refresh token): sign in again (401).
    TokenRevoked = "token_revoked", Auth;
    /// The refresh token is unknown, expired or already used (401).
    InvalidRefreshToken = "invalid_refresh_token", Auth;
    /// The account is deactivated (403).
    AccountDeactivated = "account_deactivated", Auth;
    /// The route needs a superuser (403).
    AdminRequired = "admin_required", Auth;
    PasswordSessionRequired = "password_session_required", Auth;
    /// The API key lacks the scope the route needs (403).
    InsufficientScope = "insufficient_scope", Auth;
    /// The caller may not do this (403).
    Forbidden = "forbidden", Auth;
    /// A monthly quota of the plan is used up (429).
    QuotaExceeded = "quota_exceeded", Quota;
    /// The storage quota of the plan is used up (413).
    StorageQuotaExceeded = "storage_quota_exceeded", Quota;
    /// Too many calls in the rate-limit window (429).
    RateLimited = "rate_limited", RateLimit;
    /// The caller's background jobs that have not finished are at their limit (429).
    TooManyJobs = "too_many_jobs", RateLimit;
    /// The caller already has as many chat answers in progress as allowed (429).
    TooManyChats = "too_many_chats", RateLimit;
    /// The payment provider refused the charge; nothing was applied (402).
    PaymentDeclined = "payment_declined", Payment;
    /// The model worker's queue is full (503).
    ModelOverloaded = "model_overloaded", Unavailable;
    /// The model is not loaded on this server (503).
    ModelNotLoaded = "model_not_loaded", Unavailable;
    /// A store, the index or a model is temporarily unavailable (503).
    ServiceUnavailable = "service_unavailable", Unavailable;
    /// Usage cannot be recorded: the usage store is down and the server's
    /// spool is full, so no new metered work is admitted (503).
    UsageStoreUnavailable = "usage_store_unavailable", Unavailable;
    /// An unexpected server error (500).
    Internal = "internal", Internal;
}

/// The body of every error response (see docs/errors.md), as `ApiError::body` makes it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for people: a string, or an object for quota refusals
    /// (`{error, resource, current_usage, limit, upgrade_to, upgrade_url}`).
    pub detail: serde_json::Value,
    pub code: ErrorCode,
    #[serde(rename = "type")]
    pub kind: ErrorType,
    /// The code's section in the error reference, e.g. `docs/errors.md#quota_exceeded`.
    #[schema(example = "docs/errors.md#invalid_request")]
    pub link: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unprocessable(String),
    /// 402: a charge was refused.
    #[error("{0}")]
    PaymentRequired(String),
    /// 429 with a string or object detail and the headers that go with it
    /// (Retry-After, RateLimit-*).
    #[error("too many requests")]
    TooManyRequests {
        detail: serde_json::Value,
        headers: Vec<(&'static str, String)>,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// Another variant with a more specific code than its default: made by
    /// `with_code`; status, detail and headers are the inner error's.
    #[error("{error}")]
    Coded { code: ErrorCode, error: Box<ApiError> },
}

impl ApiError {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal(e.to_string())
    }

    /// The same error (status, detail, headers) with a more specific code.
    pub fn with_code(self, code: ErrorCode) -> Self {
        match self {
            ApiError::Coded { error, .. } => ApiError::Coded { code, error },
            other => ApiError::Coded {
                code,
                error: Box::new(other),
            },
        }
    }

    /// The error without its code: the variant that sets status, detail and headers.
    fn base(&self) -> &ApiError {
        match self {
            ApiError::Coded { error, .. } => error.base(),
            other => other,
        }
    }

    /// The code of the body: the one given by `with_code`, else the variant's default.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::BadRequest(_) | ApiError::Unprocessable(_) => ErrorCode::InvalidRequest,
            ApiError::Unauthorized(_) => ErrorCode::Unauthenticated,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::Conflict(_) => ErrorCode::Conflict,
            ApiError::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            ApiError::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            ApiError::TooManyRequests { .. } => ErrorCode::RateLimited,
            ApiError::PaymentRequired(_) => ErrorCode::PaymentDeclined,
            ApiError::Unavailable(_) => ErrorCode::ServiceUnavailable,
            ApiError::Internal(_) => ErrorCode::Internal,
            ApiError::Coded { code, .. } => *code,
        }
    }

    /// The whole error body, `{detail, code, type, link}`: what HTTP responses
    /// carry, for other transports (SSE error events, WebSocket error frames) too.
    pub fn body(&self) -> serde_json::Value {
        let code = self.code();
        json!({
            "detail": self.detail(),
            "code": code.as_str(),
            "type": code.error_type().as_str(),
            "link": code.link(),
        })
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound("Not found".into()),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "store unavailable");
                ApiError::Unavailable("Service temporarily unavailable, please retry".into())
            }
            StoreError::Internal(m) => ApiError::Internal(m),
        }
    }
}

/// A model worker's error: invalid input is a 400 (`prompt_too_long` when it does
/// not fit the context), a worker that cannot take it a 503 (`model_overloaded`
/// when its queue is full).
impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Invalid(m) => ApiError::BadRequest(m),
            ModelError::TooLong(m) => ApiError::BadRequest(m).with_code(ErrorCode::PromptTooLong),
            ModelError::Overloaded(m) => {
                tracing::warn!(reason = %m, "model overloaded");
                ApiError::Unavailable(format!("Model temporarily unavailable: {m}"))
                    .with_code(ErrorCode::ModelOverloaded)
            }
            ModelError::Unavailable(m) => {
                tracing::warn!(reason = %m, "model unavailable");
                ApiError::Unavailable(format!("Model temporarily unavailable: {m}"))
                    .with_code(ErrorCode::ServiceUnavailable)
            }
            ModelError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<RetrievalError> for ApiError {
    fn from(e: RetrievalError) -> Self {
        match e {
            RetrievalError::NotRunning => ApiError::Unavailable("The search index is not running".into()),
            RetrievalError::NoEmbedder => {
                ApiError::Unavailable("The embedding model is not loaded; use route \"text\"".into())
                    .with_code(ErrorCode::ModelNotLoaded)
            }
            RetrievalError::Model(e) => e.into(),
            RetrievalError::Index(e) => ApiError::Internal(e.to_string()),
            RetrievalError::Mailbox(m) => ApiError::Internal(format!("search index: {m}")),
        }
    }
}

/// A payment provider's refusal is a 402 (`payment_declined`); a provider that
/// cannot be reached a 503.
impl From<PaymentError> for ApiError {
    fn from(e: PaymentError) -> Self {
        match e {
            PaymentError::Declined(m) => ApiError::PaymentRequired(format!("Payment declined: {m}")),
            PaymentError::Unavailable(m) => {
                tracing::warn!(error = %m, "payment provider unavailable");
                ApiError::Unavailable("The payment provider is temporarily unavailable, please retry".into())
            }
            PaymentError::Internal(m) => ApiError::Internal(format!("payment: {m}")),
        }
    }
}

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        match e {
            BillingError::NoChange(p) => ApiError::Conflict(format!("Already on the {p} plan with this billing cycle"))
                .with_code(ErrorCode::PlanUnchanged),
            BillingError::RequestPending => ApiError::Conflict(
                "An upgrade request is already pending: cancel it (DELETE /billing/upgrade-request) or wait for the decision"
                    .into(),
            )
            .with_code(ErrorCode::UpgradeRequestPending),
            BillingError::RequestNotFound => ApiError::NotFound("Upgrade request not found".into())
                .with_code(ErrorCode::UpgradeRequestNotFound),
            BillingError::RequestClosed(status) => {
                ApiError::Conflict(format!("The upgrade request is already {}", status.as_str()))
                    .with_code(ErrorCode::UpgradeRequestClosed)
            }
            BillingError::RequestStale(why) => ApiError::Conflict(format!(
                "{why}; the request was closed as stale and nothing was applied"
            ))
            .with_code(ErrorCode::UpgradeRequestStale),
            BillingError::ChangedMeanwhile => ApiError::Conflict(e.to_string()),
            BillingError::Payment(p) => p.into(),
            BillingError::Store(s) => s.into(),
        }
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        match e {
            ChatError::Invalid(m) => ApiError::Unprocessable(m),
            ChatError::SessionNotFound => {
                ApiError::NotFound("Chat session not found".into()).with_code(ErrorCode::SessionNotFound)
            }
            ChatError::NoModel => ApiError::Unavailable(e.to_string()).with_code(ErrorCode::ModelNotLoaded),
            ChatError::Model(e) => e.into(),
            ChatError::Store(e) => e.into(),
            ChatError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<crate::knowledge::ingest::IngestError> for ApiError {
    fn from(e: crate::knowledge::ingest::IngestError) -> Self {
        use crate::knowledge::ingest::IngestError as E;
        match e {
            E::Invalid(m) => ApiError::Unprocessable(m),
            E::TooLarge(m) => ApiError::PayloadTooLarge(m),
            E::Store(e) => e.into(),
            E::Model(e) => e.into(),
            E::Index(m) => ApiError::Internal(format!("search index: {m}")),
        }
    }
}

impl From<crate::knowledge::formats::FormatError> for ApiError {
    fn from(e: crate::knowledge::formats::FormatError) -> Self {
        use crate::knowledge::formats::FormatError as E;
        match e {
            E::Unsupported(m) => ApiError::UnsupportedMediaType(m),
            E::Invalid(m) => ApiError::Unprocessable(m),
            E::TooLarge(m) => ApiError::PayloadTooLarge(m),
            E::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self.base() {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PaymentRequired(_) => StatusCode::PAYMENT_REQUIRED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) | ApiError::Coded { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        match self.base() {
            ApiError::Unauthorized(_) => {
                resp.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            ApiError::TooManyRequests { headers, .. } => {
                for (name, value) in headers {
                    resp.insert_header((*name, value.as_str()));
                }
            }
            _ => {}
        }
        resp.json(self.body())
    }
}

impl ApiError {
    /// Seconds to wait before trying again, when the refusal says so (`Retry-After`;
    /// also `retry_after` in WebSocket error frames, which have no headers).
    pub fn retry_after(&self) -> Option<u64> {
        match self.base() {
            ApiError::TooManyRequests { headers, .. } => headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("retry-after"))
                .and_then(|(_, v)| v.parse().ok()),
            _ => None,
        }
    }

    /// The HTTP status as a number (also in WebSocket error frames).
    pub fn status(&self) -> u16 {
        self.status_code().as_u16()
    }

    /// What the client is told (`detail`): never the text of an internal error,
    /// which is logged here instead.
    pub fn detail(&self) -> serde_json::Value {
        match self.base() {
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                json!("Internal server error")
            }
            ApiError::TooManyRequests { detail, .. } => detail.clone(),
            ApiError::BadRequest(m)
            | ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::PayloadTooLarge(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::Unprocessable(m)
            | ApiError::PaymentRequired(m)
            | ApiError::Unavailable(m) => json!(m),
            // `base` never returns a Coded error.
            ApiError::Coded { error, .. } => error.detail(),
        }
    }
}

/// Maps actix's JSON extractor failures to readable 4xx answers.
pub fn json_error(err: actix_web::error::JsonPayloadError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as E;
    let api = match &err {
        E::Overflow { limit } | E::OverflowKnownLength { limit, .. } => {
            ApiError::PayloadTooLarge(format!("Request body too large: the limit is {limit} bytes"))
        }
        E::ContentType => ApiError::BadRequest("Expected a JSON body with Content-Type: application/json".into()),
        E::Deserialize(e) if e.is_data() => ApiError::Unprocessable(format!("Invalid request body: {e}")),
        E::Deserialize(e) => ApiError::BadRequest(format!("Malformed JSON: {e}")).with_code(ErrorCode::MalformedJson),
        other => ApiError::BadRequest(format!("Cannot read the request body: {other}")),
    };
    api.into()
}

pub fn query_error(err: actix_web::error::QueryPayloadError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::Unprocessable(format!("Invalid query parameters: {err}")).into()
}

pub fn path_error(err: actix_web::error::PathError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::Unprocessable(format!("Invalid path parameter: {err}")).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_code_keeps_the_status_detail_and_headers() {
        let e = ApiError::TooManyRequests {
            detail: json!({"error": "Quota exceeded"}),
            headers: vec![("Retry-After", "7".into())],
        }
        .with_code(ErrorCode::RateLimited)
        .with_code(ErrorCode::QuotaExceeded);
        assert_eq!(e.status_code(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            e.body(),
            json!({"detail": {"error": "Quota exceeded"}, "code": "quota_exceeded", "type": "quota",
                   "link": "docs/errors.md#quota_exceeded"})
        );
        let resp = e.error_response();
        assert_eq!(resp.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"7"[..]));
        assert!(matches!(e, ApiError::Coded { ref error, .. } if !matches!(**error, ApiError::Coded { .. })));
    }

    #[test]
    fn every_variant_has_a_default_code_and_internal_text_stays_inside() {
        let e = ApiError::Unauthorized("Not authenticated".into());
        assert_eq!(e.code(), ErrorCode::Unauthenticated);
        assert!(e.error_response().headers().contains_key(header::WWW_AUTHENTICATE));
        let e = ApiError::internal("db password is hunter2");
        assert_eq!(
            e.body(),
            json!({"detail": "Internal server error", "code": "internal", "type": "internal",
                   "link": "docs/errors.md#internal"})
        );
        let e = ApiError::internal("boom").with_code(ErrorCode::ServiceUnavailable);
        assert_eq!(e.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.detail(), json!("Internal server error"));
    }

    #[test]
    fn bodies_match_the_documented_schema_and_codes_are_their_serde_names() {
        for &code in ErrorCode::ALL {
            let body = ApiError::BadRequest("x".into()).with_code(code).body();
            let parsed: ErrorBody = serde_json::from_value(body.clone()).expect("an ErrorBody");
            assert_eq!(parsed.code, code);
            assert_eq!(parsed.kind, code.error_type());
            assert_eq!(parsed.link, format!("docs/errors.md#{}", code.as_str()));
            assert_eq!(serde_json::to_value(code).expect("json"), json!(code.as_str()));
            assert_eq!(
                serde_json::to_value(code.error_type()).expect("json"),
                json!(code.error_type().as_str())
            );
        }
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len(), "codes are unique");
    }

    #[test]
    fn model_errors_say_whether_the_worker_is_overloaded_or_the_prompt_too_long() {
        let cases = [
            (
                ModelError::Overloaded("embedding worker overloaded".into()),
                ErrorCode::ModelOverloaded,
            ),
            (
                ModelError::Unavailable("embedding worker crashed; retry".into()),
                ErrorCode::ServiceUnavailable,
            ),
            (
                ModelError::TooLong("the prompt is 9000 tokens but the model's context holds 4096".into()),
                ErrorCode::PromptTooLong,
            ),
            (
                ModelError::Invalid("the prompt is empty".into()),
                ErrorCode::InvalidRequest,
            ),
            (ModelError::Internal("nan".into()), ErrorCode::Internal),
        ];
        for (e, code) in cases {
            let api = ApiError::from(e.clone());
            assert_eq!(api.code(), code, "{e:?}");
        }
        let e = ApiError::from(ModelError::Overloaded("generation worker overloaded".into()));
        assert_eq!(e.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            e.detail(),
            json!("Model temporarily unavailable: generation worker overloaded")
        );
    }
}
