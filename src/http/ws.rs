//! `/ws/chat`: the chat over a WebSocket, several questions per connection.
//!
//! Authentication at connect: `Authorization: Bearer <JWT or API key>`; or, for
//! clients that cannot set headers (browsers), by the first frame,
//! `{"type": "auth", "token": "…"}`, sent within `chat.ws_auth_timeout_secs`
//! (answered `authenticated`; refused with an `error` frame and close code 4401
//! for missing or bad credentials, 4403 for a key without the `chat` scope or a
//! deactivated account, 4429 past the user's socket cap), which keeps tokens out
//! of URLs; or `?token=`. At most `chat.ws_max_unauthenticated` connections may
//! wait for their first frame at once (beyond: 503 at the handshake). A refused
//! handshake answers 401/403 like any route, and 429 past `chat.ws_max_per_user`
//! open connections of the user. The account is checked again for every message
//! (a deactivated user gets an error frame, 403), and the credentials every
//! `chat.ws_auth_check_secs`: an expired token, a token whose login ended
//! (logout) or a revoked key closes the connection with code 4401, a
//! deactivated account with 4403, each after an `error` frame. An API key
//! needs the `chat` scope (403 at the handshake). A client keeps a connection
//! beyond its token's life by sending `{"type": "auth", "token": "<fresh JWT>"}`
//! (answered `authenticated`).
//!
//! Frames are JSON text both ways. From the client:
//! - `{"type": "message", "id"?: any, ...the body of POST /chat/message}`
//! - `{"type": "cancel"}`: stops the answer in progress (it counts as a cancelled answer)
//! - `{"type": "ping"}` (answered `{"type": "pong"}`); WebSocket pings are answered too
//! - `{"type": "auth", "token": "…"}`: a fresh token of the same user
//!
//! From the server, each carrying the `id` of the message it answers:
//! `sources` (session_id, message_id, sources, retrieval_route), `token`
//! ({"text"}), `done` ({"response": the ChatResponse}), `error` ({"status", "detail", "code", …; "retry_after" in seconds on a 429 that has one}).
//!
//! One answer at a time per connection: a message while one streams gets an
//! error frame (409) and the stream goes on. Sending waits while the client's
//! buffer is full (backpressure: the connection's queue is bounded); a client
//! that reads nothing for `chat.ws_timeout_secs` is disconnected. The server
//! pings every `chat.ws_ping_secs` and closes a connection silent for
//! `chat.ws_timeout_secs`. Frame `id`s are numbers or strings of at most 128
//! characters. Closing the socket mid-answer cancels it like an SSE
//! client leaving: the slot is freed and the message is counted once.

use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Session};
use futures_util::StreamExt;
use ragchat_actors::chat::stream::Event;
use ragchat_actors::chat::turn::{ChatEvent, ChatRequest, Turn};
use serde_json::{json, Value};

use super::admission::{Admitted, ChatMessage};
use super::extractors::{access, authorize, bearer, CurrentUser};
use super::AppState;
use crate::error::{ApiError, ErrorBody};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/ws/chat").route(web::get().to(ws_chat)));
}

/// Open WebSockets per user, and connections waiting for their first frame.
#[derive(Default)]
pub struct Sockets(
    std::sync::Mutex<std::collections::HashMap<uuid::Uuid, usize>>,
    std::sync::atomic::AtomicUsize,
);

/// A connection waiting for its `auth` frame; dropped when it has one (or ends).
struct Unauthenticated(std::sync::Arc<Sockets>);

impl Unauthenticated {
    fn wait(sockets: &std::sync::Arc<Sockets>, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        let waiting = &sockets.1;
        let mut n = waiting.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return None;
            }
            match waiting.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Unauthenticated(sockets.clone())),
                Err(now) => n = now,
            }
        }
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.0 .1.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One open WebSocket of a user; dropped when the connection ends.
struct SocketSlot {
    sockets: std::sync::Arc<Sockets>,
    user_id: uuid::Uuid,
}

impl Sockets {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<uuid::Uuid, usize>> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A slot for one more socket of the user, unless `max` are open.
    fn open(sockets: &std::sync::Arc<Sockets>, user_id: uuid::Uuid, max: usize) -> Option<SocketSlot> {
        let mut open = sockets.lock();
        let n = open.entry(user_id).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SocketSlot {
            sockets: sockets.clone(),
            user_id,
        })
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut open = self.sockets.lock();
        if let Some(n) = open.get_mut(&self.user_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user_id);
            }
        }
    }
}

/// Close codes of a connection whose credentials no longer hold.
const CLOSE_UNAUTHORIZED: u16 = 4401;
const CLOSE_FORBIDDEN: u16 = 4403;
/// The user has `chat.ws_max_per_user` sockets open (first-frame authentication).
const CLOSE_TOO_MANY: u16 = 4429;

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Upgrades to a WebSocket after authenticating the caller.
#[utoipa::path(get, path = "/ws/chat", tag = "chat", security(("bearer" = [])),
    params(("token" = Option<String>, Query, description = "JWT or API key, when no Authorization header can be sent")),
    responses((status = 101, description = "Switching to the WebSocket protocol"), (status = 400, body = ErrorBody),
               (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `chat` scope (insufficient_scope), or a deactivated account"),
               (status = 429, body = ErrorBody, description = "Too many open WebSockets for this user")))]
pub async fn ws_chat(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let token = match bearer(&req) {
        Ok(t) => Some(t),
        Err(_) => web::Query::<TokenQuery>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.into_inner().token)
            .filter(|t| !t.trim().is_empty()),
    };
    let Some(token) = token.map(|t| t.trim().to_string()) else {
        // No credentials yet: they come in the first frame.
        let waiting = Unauthenticated::wait(&state.sockets, state.settings.chat.ws_max_unauthenticated)
            .ok_or_else(|| ApiError::Unavailable("Too many connections are authenticating; retry shortly".into()))?;
        let (response, session, messages) =
            actix_ws::handle(&req, body).map_err(|e| ApiError::BadRequest(format!("WebSocket handshake: {e}")))?;
        let messages = messages
            .max_frame_size(state.settings.chat.ws_max_frame_bytes)
            .aggregate_continuations();
        actix_web::rt::spawn(first_frame(state.get_ref().clone(), waiting, session, messages));
        return Ok(response);
    };
    let user = authorize::<access::Chat>(&state, &token).await?;
    let max = state.settings.chat.ws_max_per_user;
    let slot = Sockets::open(&state.sockets, user.user.id, max).ok_or_else(|| ApiError::TooManyRequests {
        detail: json!(format!("Too many open WebSockets for this user (at most {max})")),
        headers: Vec::new(),
    })?;
    let (response, session, messages) =
        actix_ws::handle(&req, body).map_err(|e| ApiError::BadRequest(format!("WebSocket handshake: {e}")))?;
    let messages = messages
        .max_frame_size(state.settings.chat.ws_max_frame_bytes)
        .aggregate_continuations();
    actix_web::rt::spawn(run(state.get_ref().clone(), user, token, slot, session, messages));
    Ok(response)
}

/// Authenticates a connection by its first frame, then runs it.
async fn first_frame(
    state: AppState,
    waiting: Unauthenticated,
    mut session: Session,
    mut messages: actix_ws::AggregatedMessageStream,
) {
    let limit = Duration::from_secs(state.settings.chat.ws_auth_timeout_secs.max(1));
    let first = tokio::time::timeout(limit, async {
        loop {
            match messages.next().await {
                Some(Ok(AggregatedMessage::Ping(b))) => {
                    let _ = session.pong(&b).await;
                }
                Some(Ok(AggregatedMessage::Pong(_))) => {}
                Some(Ok(AggregatedMessage::Text(text))) => return Some(text),
                _ => return None,
            }
        }
    })
    .await;
    let Ok(Some(text)) = first else {
        // Silent past the limit (or gone, or not text).
        let e = ApiError::Unauthorized(format!(
            "Send {{\"type\": \"auth\", \"token\": …}} first, within {} s",
            limit.as_secs()
        ));
        return refuse(session, &Value::Null, &e, CLOSE_UNAUTHORIZED).await;
    };
    let frame_value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let id = frame_value
        .get("id")
        .cloned()
        .filter(|id| id_ok(id, state.settings.chat.ws_max_id_chars))
        .unwrap_or(Value::Null);
    let token = match (frame_value["type"].as_str(), frame_value["token"].as_str()) {
        (Some("auth"), Some(t)) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let e = ApiError::Unauthorized("The first frame must be {\"type\": \"auth\", \"token\": …}".into());
            return refuse(session, &id, &e, CLOSE_UNAUTHORIZED).await;
        }
    };
    let user = match authorize::<access::Chat>(&state, &token).await {
        Ok(u) => u,
        Err(e) => {
            let code = if e.status() == 403 {
                CLOSE_FORBIDDEN
            } else {
                CLOSE_UNAUTHORIZED
            };
            return refuse(session, &id, &e, code).await;
        }
    };
    let max = state.settings.chat.ws_max_per_user;
    let Some(slot) = Sockets::open(&state.sockets, user.user.id, max) else {
        let e = ApiError::TooManyRequests {
            detail: json!(format!("Too many open WebSockets for this user (at most {max})")),
            headers: Vec::new(),
        };
        return refuse(session, &id, &e, CLOSE_TOO_MANY).await;
    };
    drop(waiting);
    let ok = frame("authenticated", &id, json!({}));
    if !send(&mut session, ok, limit).await {
        return;
    }
    run(state, user, token, slot, session, messages).await;
}

/// An error frame, then the close code.
async fn refuse(mut session: Session, id: &Value, e: &ApiError, code: u16) {
    let _ = tokio::time::timeout(Duration::from_secs(2), session.text(error_frame(id, e))).await;
    let reason = CloseReason {
        code: CloseCode::Other(code),
        description: None,
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), session.close(Some(reason))).await;
}

/// The answer in progress on a connection.
struct Current {
    id: Value,
    turn: Turn,
}

async fn next_event(current: &mut Option<Current>) -> Option<ChatEvent> {
    match current {
        Some(c) => c.turn.next().await,
        None => std::future::pending().await,
    }
}

fn frame(kind: &str, id: &Value, mut body: Value) -> String {
    body["type"] = json!(kind);
    body["id"] = id.clone();
    body.to_string()
}

/// Sends a text frame; false when the connection is gone or the client has not
/// read for `limit` (its queue stayed full): the caller closes the connection.
async fn send(session: &mut Session, text: String, limit: Duration) -> bool {
    matches!(tokio::time::timeout(limit, session.text(text)).await, Ok(Ok(())))
}

/// A chat event as a frame carrying the message's id.
fn event_frame(id: &Value, ev: ChatEvent) -> String {
    match ev {
        Event::Sources(head) => frame("sources", id, head),
        Event::Token(text) => frame("token", id, json!({ "text": text })),
        Event::Done(r) => frame("done", id, json!({ "response": r })),
        Event::Error(e) => error_frame(id, &ApiError::from(e)),
    }
}

fn error_frame(id: &Value, e: &ApiError) -> String {
    let mut body = e.body();
    body["status"] = json!(e.status());
    if let Some(secs) = e.retry_after() {
        body["retry_after"] = json!(secs);
    }
    frame("error", id, body)
}

async fn run(
    state: AppState,
    user: CurrentUser,
    mut token: String,
    _slot: SocketSlot,
    mut session: Session,
    mut messages: actix_ws::AggregatedMessageStream,
) {
    let cfg = &state.settings.chat;
    let every = Duration::from_secs(cfg.ws_ping_secs.max(1));
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = Duration::from_secs(cfg.ws_timeout_secs.max(cfg.ws_ping_secs + 1));
    let mut heard = Instant::now();
    let mut current: Option<Current> = None;
    let every = Duration::from_secs(cfg.ws_auth_check_secs.max(1));
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let close = loop {
        tokio::select! {
            msg = messages.next() => {
                heard = Instant::now();
                let reply = match msg {
                    None | Some(Err(_)) => break None,
                    Some(Ok(AggregatedMessage::Close(_))) => break Some(CloseCode::Normal),
                    Some(Ok(AggregatedMessage::Ping(b))) => {
                        if !matches!(tokio::time::timeout(timeout, session.pong(&b)).await, Ok(Ok(()))) {
                            break None;
                        }
                        continue;
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => continue,
                    Some(Ok(AggregatedMessage::Binary(_))) => Some(error_frame(
                        &Value::Null,
                        &ApiError::Unprocessable("send JSON text frames".into()),
                    )),
                    Some(Ok(AggregatedMessage::Text(text))) => {
                        let reply = on_frame(&state, &user, &mut token, &text, &mut current).await;
                        heard = Instant::now(); // the client was not the slow one
                        reply
                    }
                };
                if let Some(r) = reply {
                    if !send(&mut session, r, timeout).await {
                        break None;
                    }
                }
            }
            ev = next_event(&mut current) => {
                let Some(c) = current.as_mut() else { continue };
                let (out, last) = match ev {
                    Some(ev) => {
                        let last = matches!(ev, Event::Done(_) | Event::Error(_));
                        (event_frame(&c.id, ev), last)
                    }
                    None => (String::new(), true),
                };
                if last {
                    // The answer is over: the connection takes the next message.
                    current = None;
                    heard = Instant::now();
                    if out.is_empty() {
                        continue;
                    }
                }
                // Waits while the client's queue is full: the answer is read at
                // the pace of the client, up to the timeout.
                if !send(&mut session, out, timeout).await {
                    break None;
                }
            }
            _ = recheck.tick() => {
                // The credentials must still hold: an expired token, an ended
                // login (logout), a revoked key or a deactivated account closes
                // the connection (with an error frame first). A store that
                // cannot answer closes nothing.
                let refused = match authorize::<access::Chat>(&state, &token).await {
                    Ok(u) if u.user.id == user.user.id => None,
                    Ok(_) => Some(ApiError::Forbidden("the token belongs to another user".into())),
                    Err(e) if matches!(e.status(), 401 | 403) => Some(e),
                    Err(_) => None,
                };
                if let Some(e) = refused {
                    let code = if e.status() == 401 { CLOSE_UNAUTHORIZED } else { CLOSE_FORBIDDEN };
                    let _ = send(&mut session, error_frame(&Value::Null, &e), timeout).await;
                    break Some(CloseCode::Other(code));
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > timeout {
                    break Some(CloseCode::Policy);
                }
                if !matches!(tokio::time::timeout(timeout, session.ping(b"")).await, Ok(Ok(()))) {
                    break None;
                }
            }
        }
    };
    // A turn still running is cancelled by its drop (counted once, slot freed).
    drop(current);
    if let Some(code) = close {
        let _ = session
            .close(Some(CloseReason {
                code,
                description: None,
            }))
            .await;
    }
}

/// The connection's user as the store has it now.
async fn fresh(state: &AppState, user: &CurrentUser) -> Result<CurrentUser, ApiError> {
    let now = state
        .accounts
        .user_by_id(user.user.id)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("Could not validate credentials".into()))?;
    if !now.is_active {
        return Err(ApiError::Forbidden("User account is deactivated".into()));
    }
    Ok(CurrentUser {
        user: now,
        method: user.method,
        scopes: user.scopes,
    })
}

/// A frame id echoed back: null, a number or a string of at most `max` characters.
fn id_ok(id: &Value, max: usize) -> bool {
    match id {
        Value::Null | Value::Number(_) => true,
        Value::String(s) => s.len() <= max,
        _ => false,
    }
}

/// Handles one client frame; returns the frame to send back, if any.
async fn on_frame(
    state: &AppState,
    user: &CurrentUser,
    token: &mut String,
    text: &str,
    current: &mut Option<Current>,
) -> Option<String> {
    let mut value: Value = match serde_json::from_str(text) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return Some(error_frame(
                &Value::Null,
                &ApiError::BadRequest("frames are JSON objects with a \"type\"".into()),
            ))
        }
    };
    let obj = value.as_object_mut()?;
    let id = obj.remove("id").unwrap_or(Value::Null);
    // The id is echoed in every frame of the answer: keep it small.
    if !id_ok(&id, state.settings.chat.ws_max_id_chars) {
        return Some(error_frame(
            &Value::Null,
            &ApiError::Unprocessable(format!(
                "id must be a number or a string of at most {} characters",
                state.settings.chat.ws_max_id_chars
            )),
        ));
    }
    let kind = obj.remove("type").and_then(|t| t.as_str().map(str::to_string));
    match kind.as_deref() {
        Some("ping") => Some(frame("pong", &id, json!({}))),
        // A fresh token (before the current one expires) keeps the connection open.
        Some("auth") => {
            let fresh = obj
                .get("token")
                .and_then(Value::as_str)
                .map(str::trim)
                .unwrap_or_default()
                .to_string();
            match authorize::<access::Chat>(state, &fresh).await {
                Ok(u) if u.user.id == user.user.id => {
                    *token = fresh;
                    Some(frame("authenticated", &id, json!({})))
                }
                Ok(_) => Some(error_frame(
                    &id,
                    &ApiError::Forbidden("a connection keeps the user it was opened for".into()),
                )),
                Err(e) => Some(error_frame(&id, &e)),
            }
        }
        Some("cancel") => match current.take() {
            // The events are dropped first (the model stops), then the partial
            // answer is stored and counted before the next frame is read.
            Some(Current { id, turn }) => match turn.cancel().await {
                None => Some(frame("cancelled", &id, json!({}))),
                // It had completed meanwhile: its answer, not a cancellation.
                Some(ev) => Some(event_frame(&id, ev)),
            },
            None => Some(error_frame(&id, &ApiError::Conflict("no answer is in progress".into()))),
        },
        Some("message") => {
            if current.is_some() {
                return Some(error_frame(
                    &id,
                    &ApiError::Conflict("an answer is in progress: wait for done, or send cancel".into()),
                ));
            }
            let req: ChatRequest = match serde_json::from_value(value) {
                Ok(r) => r,
                Err(e) => {
                    return Some(error_frame(
                        &id,
                        &ApiError::Unprocessable(format!("Invalid message: {e}")),
                    ))
                }
            };
            // The token was checked at connect; the account is checked again for
            // every message (deactivated, or moved to another organization).
            let user = match fresh(state, user).await {
                Ok(u) => u,
                Err(e) => return Some(error_frame(&id, &e)),
            };
            let admitted = match Admitted::<ChatMessage>::admit(state, user.clone()).await {
                Ok(a) => a,
                Err(e) => return Some(error_frame(&id, &e)),
            };
            let reader = user.reader();
            match state.chat.start(admitted.into_ticket(), reader, req).await {
                Ok(turn) => {
                    *current = Some(Current { id, turn });
                    None
                }
                Err(e) => Some(error_frame(&id, &ApiError::from(e))),
            }
        }
        _ => Some(error_frame(
            &id,
            &ApiError::Unprocessable("type must be message, cancel, auth or ping".into()),
        )),
    }
}
