//! The HTTP layer's one error type, mapped once to a status code and a FastAPI-style
//! body `{"detail": ...}`. 5xx bodies never carry internal error text: the text is
//! logged with the request id instead.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use ragchat_actors::chat::turn::ChatError;
use ragchat_actors::inference::ModelError;
use ragchat_actors::ports::StoreError;
use ragchat_actors::retrieval::RetrievalError;
use serde_json::json;

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
}

impl ApiError {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal(e.to_string())
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

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Invalid(m) => ApiError::BadRequest(m),
            ModelError::Unavailable(m) => {
                tracing::warn!(reason = %m, "model unavailable");
                ApiError::Unavailable(format!("Model temporarily unavailable: {m}"))
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
            }
            RetrievalError::Model(e) => e.into(),
            RetrievalError::Index(e) => ApiError::Internal(e.to_string()),
            RetrievalError::Mailbox(m) => ApiError::Internal(format!("search index: {m}")),
        }
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        match e {
            ChatError::Invalid(m) => ApiError::Unprocessable(m),
            ChatError::SessionNotFound => ApiError::NotFound("Chat session not found".into()),
            ChatError::NoModel => ApiError::Unavailable(e.to_string()),
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
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        match self {
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
    /// The HTTP status as a number (also in WebSocket error frames).
    pub fn status(&self) -> u16 {
        self.status_code().as_u16()
    }

    /// The JSON body of the error, for every transport (HTTP, SSE, WebSocket).
    pub fn body(&self) -> serde_json::Value {
        json!({ "detail": self.detail() })
    }

    /// What the client is told (`detail`): never the text of an internal error,
    /// which is logged here instead.
    pub fn detail(&self) -> serde_json::Value {
        match self {
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
            | ApiError::Unavailable(m) => json!(m),
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
        E::Deserialize(e) => ApiError::BadRequest(format!("Malformed JSON: {e}")),
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
