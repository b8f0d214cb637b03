//! Chat over HTTP: `POST /chat/message` answers in one JSON body, `POST
//! /chat/stream` streams server-sent events (`sources`, `token`…, then `done`
//! with the whole response, or `error`); `/ws/chat` (ws.rs) does the same over a
//! WebSocket. The turn itself (admission's ticket, retrieval, prompt,
//! generation, the stored conversation, usage once) is the core's
//! `ChatService`; this module parses, calls it and writes its events. The
//! conversations of the caller: list, page, delete.

use actix_web::{web, HttpResponse, HttpResponseBuilder};
use chrono::Utc;
use futures_util::stream;
use ragchat_actors::chat::records::{Cursor, Role, PROMPT_MESSAGE};
use ragchat_actors::chat::stream::Event;
use ragchat_actors::chat::turn::{ChatEvent, ChatRequest, ChatResponse, Turn};
use ragchat_actors::domain::Page;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::admission::{Admitted, ChatMessage};
use super::extractors::{access, Scoped};
use super::{sse, AppState};
use crate::error::{ApiError, ErrorBody, ErrorCode};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/chat/message").route(web::post().to(message)))
        .service(web::resource("/chat/stream").route(web::post().to(stream_message)))
        .service(web::resource("/chat/sessions").route(web::get().to(list_sessions)))
        .service(web::resource("/chat/sessions/{id}").route(web::delete().to(delete_session)))
        .service(web::resource("/chat/sessions/{id}/messages").route(web::get().to(session_messages)));
}

/// Answers a message with sources, in one JSON body.
#[utoipa::path(post, path = "/chat/message", tag = "chat", security(("bearer" = [])), request_body = ChatRequest,
    responses((status = 200, body = ChatResponse), (status = 400, body = ErrorBody, description = "Prompt too long"),
              (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `chat` scope (insufficient_scope), or a deactivated account"),
        (status = 404, body = ErrorBody, description = "Unknown session"),
              (status = 422, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn message(
    admitted: Admitted<ChatMessage>,
    state: web::Data<AppState>,
    body: web::Json<ChatRequest>,
) -> Result<HttpResponse, ApiError> {
    let (mut resp, turn) = start(admitted, &state, body.into_inner()).await?;
    Ok(resp.json(turn.answer().await?))
}

/// Starts the admitted turn; the response's head carries the RateLimit headers.
async fn start(
    admitted: Admitted<ChatMessage>,
    state: &AppState,
    req: ChatRequest,
) -> Result<(HttpResponseBuilder, Turn), ApiError> {
    let mut resp = HttpResponse::Ok();
    admitted.rate_headers(&mut resp);
    let reader = admitted.user.reader();
    let turn = state.chat.start(admitted.into_ticket(), reader, req).await?;
    Ok((resp, turn))
}

/// A chat event as a server-sent event; true for the last one.
fn sse_frame(ev: ChatEvent) -> (actix_web::web::Bytes, bool) {
    match ev {
        Event::Sources(head) => (sse::frame(Some("sources"), &head), false),
        Event::Token(text) => (sse::frame(Some("token"), &json!({ "text": text })), false),
        Event::Done(r) => (sse::frame(Some("done"), &json!(r)), true),
        Event::Error(e) => (sse::frame(Some("error"), &ApiError::from(e).body()), true),
    }
}

/// The same answer as server-sent events: `sources`, `token` ({"text"}) as they
/// are generated, then `done` (the whole response) or `error` ({"detail", "code"…}).
/// Refusals before the stream starts are plain JSON errors with their status.
#[utoipa::path(post, path = "/chat/stream", tag = "chat", security(("bearer" = [])), request_body = ChatRequest,
    responses((status = 200, description = "text/event-stream"), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `chat` scope (insufficient_scope), or a deactivated account"),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody),
              (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn stream_message(
    admitted: Admitted<ChatMessage>,
    state: web::Data<AppState>,
    body: web::Json<ChatRequest>,
) -> Result<HttpResponse, ApiError> {
    let (resp, turn) = start(admitted, &state, body.into_inner()).await?;
    // The turn travels with the body: a client that leaves drops it (the
    // answer is cancelled, stored and counted once).
    let frames = stream::unfold(Some(turn), |turn| async move {
        let mut turn = turn?;
        let (bytes, last) = sse_frame(turn.next().await?);
        Some((bytes, (!last).then_some(turn)))
    });
    Ok(sse::response(resp, frames))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionsQuery {
    #[serde(default)]
    pub offset: u32,
    #[serde(default = "default_limit")]
    pub limit: u32,
}

fn default_limit() -> u32 {
    20
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    pub session_id: Uuid,
    pub title: String,
    pub created_at: chrono::DateTime<Utc>,
    pub updated_at: chrono::DateTime<Utc>,
    pub message_count: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
    pub total: u64,
    pub offset: u32,
    pub limit: u32,
}

/// Your conversations, most recently active first.
#[utoipa::path(get, path = "/chat/sessions", tag = "chat", security(("bearer" = [])),
    params(("offset" = Option<u32>, Query), ("limit" = Option<u32>, Query, description = "1 to 100, default 20")),
    responses((status = 200, body = SessionList), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `chat` scope (insufficient_scope), or a deactivated account"),
        (status = 422, body = ErrorBody)))]
pub async fn list_sessions(
    current: Scoped<access::Chat>,
    state: web::Data<AppState>,
    query: web::Query<SessionsQuery>,
) -> Result<web::Json<SessionList>, ApiError> {
    let q = query.into_inner();
    if !(1..=100).contains(&q.limit) {
        return Err(ApiError::Unprocessable("limit must be 1 to 100".into()));
    }
    let (list, total) = state
        .conversations
        .sessions(
            current.user.id,
            Page {
                offset: q.offset,
                limit: q.limit,
            },
        )
        .await?;
    Ok(web::Json(SessionList {
        sessions: list
            .into_iter()
            .map(|s| SessionView {
                session_id: s.id,
                title: s.title,
                created_at: s.created_at,
                updated_at: s.updated_at,
                message_count: s.message_count,
            })
            .collect(),
        total,
        offset: q.offset,
        limit: q.limit,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MessagesQuery {
    /// `next_before` of the previous page: messages older than that.
    pub before: Option<String>,
    #[serde(default = "default_messages_limit")]
    pub limit: u32,
}

fn default_messages_limit() -> u32 {
    50
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    pub message_id: Uuid,
    #[schema(value_type = String)]
    pub role: Role,
    pub content: String,
    pub created_at: chrono::DateTime<Utc>,
    #[schema(value_type = Object)]
    pub metadata: Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    pub session_id: Uuid,
    /// Oldest first within the page.
    pub messages: Vec<MessageView>,
    /// Pass as `before` for the page of older messages; null at the start.
    pub next_before: Option<String>,
}

/// A message's metadata as shown: without the question as the model read it
/// (internal: the full text of its sources, replayed in later prompts).
fn without_prompt_message(mut metadata: Value) -> Value {
    if let Some(m) = metadata.as_object_mut() {
        m.remove(PROMPT_MESSAGE);
    }
    metadata
}

/// A page of a conversation: the newest messages, or those before a cursor.
#[utoipa::path(get, path = "/chat/sessions/{id}/messages", tag = "chat", security(("bearer" = [])),
    params(("before" = Option<String>, Query), ("limit" = Option<u32>, Query, description = "1 to 200, default 50")),
    responses((status = 200, body = MessagePage), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `chat` scope (insufficient_scope), or a deactivated account"),
        (status = 404, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
pub async fn session_messages(
    current: Scoped<access::Chat>,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
    query: web::Query<MessagesQuery>,
) -> Result<web::Json<MessagePage>, ApiError> {
    let q = query.into_inner();
    if !(1..=200).contains(&q.limit) {
        return Err(ApiError::Unprocessable("limit must be 1 to 200".into()));
    }
    let before = match q.before.as_deref() {
        None | Some("") => None,
        Some(c) => Some(
            c.parse::<Cursor>()
                .map_err(|()| ApiError::Unprocessable("before: not a cursor from next_before".into()))?,
        ),
    };
    let user_id = current.user.id;
    if state.conversations.session(user_id, *id).await?.is_none() {
        return Err(ApiError::NotFound("Chat session not found".into()).with_code(ErrorCode::SessionNotFound));
    }
    let mut page = state.conversations.messages(user_id, *id, before, q.limit).await?;
    let next_before = (page.len() == q.limit as usize)
        .then(|| page.last().map(|m| Cursor::of(m).to_string()))
        .flatten();
    page.reverse();
    Ok(web::Json(MessagePage {
        session_id: *id,
        messages: page
            .into_iter()
            .map(|m| MessageView {
                message_id: m.id,
                role: m.role,
                content: m.content,
                created_at: m.created_at,
                metadata: without_prompt_message(m.metadata),
            })
            .collect(),
        next_before,
    }))
}

/// Deletes a conversation and its messages.
#[utoipa::path(delete, path = "/chat/sessions/{id}", tag = "chat", security(("bearer" = [])),
    responses((status = 204), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `chat` scope (insufficient_scope), or a deactivated account"),
        (status = 404, body = ErrorBody)))]
pub async fn delete_session(
    current: Scoped<access::Chat>,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    if state.conversations.delete_session(current.user.id, *id).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::NotFound("Chat session not found".into()).with_code(ErrorCode::SessionNotFound))
    }
}
