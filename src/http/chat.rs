//! Chat: answers from the knowledge base, with sources, in a conversation.
//!
//! `POST /chat/message` answers in one JSON body, `POST /chat/stream` streams
//! server-sent events (`sources`, `token`…, then `done` with the whole response,
//! or `error`), and `/ws/chat` (http/ws.rs) does the same over a WebSocket. All
//! three run one pipeline: admit one `messages` unit under the chat rate limit,
//! retrieve (vector, text, hybrid or auto), build the prompt (system prompt,
//! numbered sources, then recent turns within the model's context), generate on
//! the GenerateWorker, store the question and the answer in the conversation,
//! record usage.
//!
//! Usage is recorded exactly once per admitted message:
//! - an answer that completes counts once;
//! - an answer whose client leaves mid-stream also counts once: the question
//!   and the partial answer (marked `cancelled`) are kept in the conversation,
//!   and the generation stops at the next step, freeing its slot;
//! - a request refused before generation (bad input, unknown session, prompt
//!   too long, model overloaded) or failed by the model (crash) gives its unit back.
//!
//! Stores that fail degrade the answer instead of refusing it: no history, no
//! sources or not saved, each said in `warnings`.

use std::time::Instant;

use actix_web::web::Bytes;
use actix_web::{web, HttpResponse};
use chrono::{Duration, Utc};
use futures_util::{stream, StreamExt};
use ragchat_actors::chat::{
    build_prompt, title_of, to_millis, ChatRecord, ChatSession, Cursor, Passage, Role, DEFAULT_SYSTEM_PROMPT,
};
use ragchat_actors::domain::Page;
use ragchat_actors::generate_worker::{FinishReason, GenEvent, GenerateRequest};
use ragchat_actors::inference::{ModelError, SamplingParams};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use utoipa::ToSchema;
use uuid::Uuid;

use super::admission::{Admitted, ChatMessage};
use super::extractors::CurrentUser;
use super::openai::model_error;
use super::AppState;
use crate::error::ApiError;
use crate::knowledge::index::{Filters, Route};
use crate::knowledge::retrieval::Search;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/chat/message").route(web::post().to(message)))
        .service(web::resource("/chat/stream").route(web::post().to(stream_message)))
        .service(web::resource("/chat/sessions").route(web::get().to(list_sessions)))
        .service(web::resource("/chat/sessions/{id}").route(web::delete().to(delete_session)))
        .service(web::resource("/chat/sessions/{id}/messages").route(web::get().to(session_messages)))
        .service(web::resource("/ws/chat").route(web::get().to(super::ws::ws_chat)));
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub message: String,
    /// Continue this conversation (404 if it is not yours); a new one otherwise.
    pub session_id: Option<Uuid>,
    /// Answer from the knowledge base (default) or from the model alone.
    #[serde(default = "yes")]
    pub enable_rag: bool,
    /// Sources to retrieve, 1 to 20 (default `chat.default_top_k`).
    pub top_k: Option<usize>,
    #[serde(default)]
    pub route: Route,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub filters: Filters,
    #[serde(default)]
    pub debug_mode: bool,
    /// Longest answer in tokens (default `models.default_max_tokens`, at most 2048).
    pub max_tokens: Option<usize>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SourceView {
    pub document_id: Uuid,
    pub title: String,
    pub excerpt: String,
    pub relevance_score: f32,
    /// Where the document came from (its `source`: upload, seed file, …).
    pub source_type: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageInfo {
    pub messages_used: u64,
    pub messages_limit: u64,
    pub messages_remaining: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatResponse {
    pub session_id: Uuid,
    pub message_id: Uuid,
    pub answer: String,
    /// The best source's relevance (0 to 1); 0 when no source was used.
    pub confidence: f32,
    /// "rag_enhanced" when sources went into the prompt, else "generation_only".
    pub response_type: String,
    pub context_used: bool,
    pub sources: Vec<SourceView>,
    /// The route that ran ("auto" resolved); null without retrieval.
    pub retrieval_route: Option<Route>,
    pub response_time_ms: u64,
    /// Prompt and answer tokens.
    pub tokens_used: u64,
    pub subscription_plan: String,
    pub usage_info: UsageInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub debug_info: Option<Value>,
    /// Present when the answer had to do without something: the knowledge base,
    /// the conversation history, or saving to the conversation.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A message on its way: retrieved, prompted and queued on the model.
pub struct Prepared {
    session: ChatSession,
    is_new: bool,
    question: ChatRecord,
    answer_id: Uuid,
    sources: Vec<SourceView>,
    route: Option<Route>,
    started: Instant,
    debug: Option<Value>,
    /// What the answer had to do without (a store or the index was down).
    warnings: Vec<String>,
}

impl Prepared {
    /// The first streamed event: where the answer will come from.
    pub fn head(&self) -> Value {
        json!({
            "session_id": self.session.id,
            "message_id": self.answer_id,
            "sources": self.sources,
            "retrieval_route": self.route,
            "context_used": !self.sources.is_empty(),
            "warnings": self.warnings,
        })
    }
}

pub(crate) fn route_name(r: Route) -> &'static str {
    match r {
        Route::Vector => "vector",
        Route::Text => "text",
        Route::Hybrid => "hybrid",
        Route::Auto => "auto",
    }
}

fn max_tokens_of(state: &AppState, req: &ChatRequest) -> Result<usize, ApiError> {
    let n = req.max_tokens.unwrap_or(state.settings.models.default_max_tokens);
    if !(1..=2048).contains(&n) {
        return Err(ApiError::Unprocessable("max_tokens must be 1 to 2048".into()));
    }
    Ok(n)
}

fn excerpt(text: &str, chars: usize) -> String {
    let t = text.trim();
    if t.chars().count() <= chars {
        return t.to_string();
    }
    let cut: String = t.chars().take(chars).collect();
    format!("{}…", cut.trim_end())
}

const HISTORY_UNAVAILABLE: &str = "The conversation history is unavailable right now: this answer was made without it";
const KNOWLEDGE_UNAVAILABLE: &str = "The knowledge base is unavailable right now: this answer was made without sources";
const NOT_SAVED: &str = "The conversation store is unavailable: this answer was not saved to the conversation";

/// Query embedding and search.
async fn retrieve(
    state: &AppState,
    user: &CurrentUser,
    req: &ChatRequest,
    question: &str,
    route: Route,
    top_k: usize,
) -> Result<Vec<crate::knowledge::index::Hit>, String> {
    let retrieval = state.retrieval.as_ref().ok_or("the search index is not running")?;
    let embedding = match (&state.embedder, route) {
        (Some(e), Route::Vector | Route::Hybrid) => e
            .embed(vec![question.to_string()])
            .await
            .map_err(|e| e.to_string())?
            .vectors
            .pop(),
        _ => None,
    };
    retrieval
        .send(Search {
            query: question.to_string(),
            embedding,
            route,
            reader: super::knowledge::reader_of(user),
            filters: req.filters.clone(),
            top_k,
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Validates the request, reads the conversation, retrieves, builds the prompt
/// and queues it on the model; returns the message and its generation events.
/// Nothing is stored yet.
pub async fn prepare(
    state: &AppState,
    user: &CurrentUser,
    req: ChatRequest,
) -> Result<(Prepared, UnboundedReceiver<GenEvent>), ApiError> {
    let started = Instant::now();
    let cfg = &state.settings.chat;
    let question = req.message.trim().to_string();
    if question.is_empty() || question.chars().count() > cfg.max_message_chars {
        return Err(ApiError::Unprocessable(format!(
            "message must be 1 to {} characters",
            cfg.max_message_chars
        )));
    }
    let top_k = req.top_k.unwrap_or(cfg.default_top_k);
    if !(1..=20).contains(&top_k) {
        return Err(ApiError::Unprocessable("top_k must be 1 to 20".into()));
    }
    if let Some((field, _)) = req.filters.iter().find(|(_, c)| !c.is_valid()) {
        return Err(ApiError::Unprocessable(format!(
            "filter on '{field}': a range needs gt, gte, lt or lte"
        )));
    }
    let max_tokens = max_tokens_of(state, &req)?;
    let worker = state.generator.clone().ok_or_else(|| {
        ApiError::Unavailable("The generation model is not loaded on this server (run scripts/fetch-models)".into())
    })?;
    let user_id = user.user.id;
    let now = to_millis(Utc::now());

    // The conversation: yours, or a new one. A store that fails is not a
    // reason to refuse an answer: it comes without history, and says so.
    let mut warnings = Vec::new();
    let fresh = |id: Uuid| ChatSession {
        id,
        user_id,
        title: title_of(&question),
        created_at: now,
        updated_at: now,
        message_count: 0,
    };
    let (session, is_new, history) = match req.session_id {
        Some(id) => match state.conversations.session(user_id, id).await {
            Ok(Some(s)) => match state
                .conversations
                .messages(user_id, id, None, cfg.history_messages)
                .await
            {
                Ok(mut past) => {
                    past.reverse();
                    let history: Vec<(Role, String)> = past
                        .into_iter()
                        .filter(|m| !m.content.trim().is_empty())
                        .map(|m| (m.role, m.content))
                        .collect();
                    (s, false, history)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "conversation history unavailable");
                    warnings.push(HISTORY_UNAVAILABLE.to_string());
                    (s, false, Vec::new())
                }
            },
            Ok(None) => return Err(ApiError::NotFound("Chat session not found".into())),
            Err(e) => {
                // Whose session it is cannot be checked: nothing of it is read, and
                // the answer is saved only if the store takes it as this user's.
                tracing::warn!(error = %e, "conversation store unavailable");
                warnings.push(HISTORY_UNAVAILABLE.to_string());
                (fresh(id), false, Vec::new())
            }
        },
        None => (fresh(Uuid::new_v4()), true, Vec::new()),
    };

    // Retrieval.
    let retrieval_started = Instant::now();
    let mut route = None;
    let mut hits = Vec::new();
    if req.enable_rag {
        {
            let mut r = req.route.resolve(&question);
            if state.embedder.is_none() {
                r = Route::Text;
            }
            match retrieve(state, user, &req, &question, r, top_k).await {
                Ok(found) => {
                    hits = found;
                    route = Some(r);
                    super::metrics::record_retrieval(route_name(r), retrieval_started.elapsed().as_secs_f64());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retrieval failed: answering without sources");
                    warnings.push(KNOWLEDGE_UNAVAILABLE.to_string());
                }
            }
        }
    }
    let retrieval_ms = retrieval_started.elapsed().as_secs_f64() * 1000.0;

    // The prompt, within the context (tokenizing is CPU work: off the HTTP thread).
    let passages: Vec<Passage> = hits
        .iter()
        .map(|h| Passage {
            title: h.title.clone(),
            text: h.content.clone(),
        })
        .collect();
    let system = if cfg.system_prompt.trim().is_empty() {
        DEFAULT_SYSTEM_PROMPT.to_string()
    } else {
        cfg.system_prompt.clone()
    };
    let budget = worker
        .context_len()
        .saturating_sub(max_tokens.min(worker.context_len() / 2));
    let tok = worker.tokenizer().clone();
    let (q, history_len) = (question.clone(), history.len());
    let prompt = web::block(move || build_prompt(tok.as_ref(), &system, &passages, &history, &q, budget))
        .await
        .map_err(ApiError::internal)?
        .map_err(model_error)?;
    let sources: Vec<SourceView> = hits
        .iter()
        .take(prompt.sources_used)
        .map(|h| SourceView {
            document_id: h.document_id,
            title: h.title.clone(),
            excerpt: excerpt(&h.content, cfg.excerpt_chars),
            relevance_score: h.score,
            source_type: h.source.clone(),
        })
        .collect();
    let debug = req.debug_mode.then(|| {
        json!({
            "sources_retrieved": hits.len(),
            "sources_in_prompt": prompt.sources_used,
            "history_messages_read": history_len,
            "history_messages_in_prompt": prompt.history_used,
            "prompt_tokens": prompt.tokens.len(),
            "prompt_budget_tokens": budget,
            "retrieval_ms": retrieval_ms,
            "top_k": top_k,
            "model": state.settings.models.generator_name,
        })
    });

    let (tx, events) = unbounded_channel();
    worker
        .submit(GenerateRequest {
            prompt_tokens: prompt.tokens,
            params: SamplingParams {
                temperature: 0.3,
                ..SamplingParams::default()
            },
            max_tokens,
            stop: Vec::new(),
            events: tx,
        })
        .map_err(model_error)?;
    let prepared = Prepared {
        question: ChatRecord {
            id: Uuid::new_v4(),
            session_id: session.id,
            role: Role::User,
            content: question,
            created_at: now,
            metadata: json!({}),
        },
        session,
        is_new,
        answer_id: Uuid::new_v4(),
        sources,
        route,
        started,
        debug,
        warnings,
    };
    Ok((prepared, events))
}

/// The end of a generation.
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub first_token_ms: f64,
}

/// One admitted message from its prompt to its stored answer. Dropped before
/// `finish` or `fail` (the client went away), it records the partial answer and
/// its usage, once, in a task of its own.
pub struct Turn {
    state: AppState,
    admitted: Option<Admitted<ChatMessage>>,
    meta: Option<Prepared>,
    text: String,
}

impl Turn {
    pub fn new(state: AppState, admitted: Admitted<ChatMessage>, prepared: Prepared) -> Turn {
        Turn {
            state,
            admitted: Some(admitted),
            meta: Some(prepared),
            text: String::new(),
        }
    }

    /// Adds streamed text.
    pub fn push(&mut self, text: &str) {
        self.text.push_str(text);
    }

    fn answer_record(p: &Prepared, text: &str, metadata: Value) -> ChatRecord {
        // Strictly after the question, so the two never tie in the store's order.
        let at = to_millis(Utc::now()).max(p.question.created_at + Duration::milliseconds(1));
        ChatRecord {
            id: p.answer_id,
            session_id: p.session.id,
            role: Role::Assistant,
            content: text.to_string(),
            created_at: at,
            metadata,
        }
    }

    /// Stores the question and the answer (creating the conversation if new).
    async fn save(state: &AppState, p: &Prepared, answer: ChatRecord) -> Result<(), ApiError> {
        let user_id = p.session.user_id;
        if p.is_new {
            state.conversations.create_session(&p.session).await?;
        }
        state
            .conversations
            .append(user_id, p.session.id, &[p.question.clone(), answer])
            .await?;
        Ok(())
    }

    /// The answer is complete: store it, then count it. If the store fails the
    /// answer is still given (and counted), with a warning that it was not
    /// saved. The work runs in a task of its own, so a client leaving meanwhile
    /// cannot cut it in half.
    pub async fn finish(mut self, done: Finish) -> Result<ChatResponse, ApiError> {
        let (Some(p), Some(admitted)) = (self.meta.take(), self.admitted.take()) else {
            return Err(ApiError::internal("chat turn finished twice"));
        };
        let state = self.state.clone();
        let text = std::mem::take(&mut self.text);
        actix_web::rt::spawn(async move { Self::complete(state, p, admitted, text, done).await })
            .await
            .map_err(ApiError::internal)?
    }

    async fn complete(
        state: AppState,
        p: Prepared,
        admitted: Admitted<ChatMessage>,
        text: String,
        done: Finish,
    ) -> Result<ChatResponse, ApiError> {
        let confidence = p.sources.first().map_or(0.0, |s| s.relevance_score.clamp(0.0, 1.0));
        let context_used = !p.sources.is_empty();
        let response_type = if context_used {
            "rag_enhanced"
        } else {
            "generation_only"
        };
        let answer = Self::answer_record(
            &p,
            &text,
            json!({
                "sources": p.sources,
                "retrieval_route": p.route,
                "response_type": response_type,
                "confidence": confidence,
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": done.completion_tokens,
                "finish_reason": done.reason.as_str(),
            }),
        );
        let mut warnings = p.warnings.clone();
        if let Err(e) = Self::save(&state, &p, answer).await {
            // The answer exists and is delivered: it counts, and says it was not kept.
            tracing::warn!(error = %e, session = %p.session.id, "the answer could not be saved");
            warnings.push(NOT_SAVED.to_string());
        }
        metrics::counter!("chat_answers_total", "response_type" => response_type, "outcome" => "completed")
            .increment(1);
        metrics::histogram!("chat_time_to_first_token_seconds").record(done.first_token_ms / 1000.0);
        let plan = admitted.permit().map(|permit| permit.plan);
        let permit = admitted.complete(json!({
            "endpoint": "/chat",
            "session_id": p.session.id,
            "message_id": p.answer_id,
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
        }));
        let (used, limit) = permit.as_ref().map_or((0, 0), |p| (p.used, p.limit));
        let debug_info = p.debug.map(|mut d| {
            d["completion_tokens"] = json!(done.completion_tokens);
            d["finish_reason"] = json!(done.reason.as_str());
            d["first_token_ms"] = json!(done.first_token_ms);
            d
        });
        Ok(ChatResponse {
            session_id: p.session.id,
            message_id: p.answer_id,
            answer: text.trim().to_string(),
            confidence,
            response_type: response_type.into(),
            context_used,
            sources: p.sources,
            retrieval_route: p.route,
            response_time_ms: p.started.elapsed().as_millis() as u64,
            tokens_used: (done.prompt_tokens + done.completion_tokens) as u64,
            subscription_plan: plan.map(|p| p.as_str().to_string()).unwrap_or_default(),
            usage_info: UsageInfo {
                messages_used: used,
                messages_limit: limit,
                messages_remaining: limit.saturating_sub(used),
            },
            debug_info,
            warnings,
        })
    }

    /// The server failed the answer: nothing stored, the unit given back.
    pub fn fail(mut self) {
        self.meta = None;
        if let Some(a) = self.admitted.take() {
            a.release();
        }
    }

    /// The client stopped the answer: the generation ends (its events are
    /// dropped by the caller), the question and the partial answer are stored,
    /// then the unit counted. Returns once that is done, so a next message sees
    /// the conversation whole.
    pub async fn cancel(mut self) {
        if let Some(task) = self.cancel_task() {
            let _ = task.await;
        }
    }

    /// Starts recording a cancelled answer (once); None if already finished.
    fn cancel_task(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let (p, admitted) = (self.meta.take()?, self.admitted.take()?);
        let state = self.state.clone();
        let text = std::mem::take(&mut self.text);
        Some(actix_web::rt::spawn(async move {
            let answer = Self::answer_record(
                &p,
                &text,
                json!({"sources": p.sources, "retrieval_route": p.route, "cancelled": true}),
            );
            if let Err(e) = Self::save(&state, &p, answer).await {
                // Nothing kept, nothing counted (as any failed save).
                tracing::warn!(error = %e, session = %p.session.id, "a cancelled answer could not be saved");
                admitted.release();
                return;
            }
            metrics::counter!("chat_answers_total", "response_type" => "cancelled", "outcome" => "cancelled")
                .increment(1);
            admitted.complete(json!({
                "endpoint": "/chat",
                "session_id": p.session.id,
                "message_id": p.answer_id,
                "cancelled": true,
                "answer_chars": text.len(),
            }));
        }))
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // The client left mid-answer (the HTTP body or the socket was dropped):
        // the generation stops with the dropped receiver; the rest is recorded
        // in the background.
        let _ = self.cancel_task();
    }
}

/// What a generation event means for a turn.
pub enum Step {
    Text(String),
    Done(Finish),
    Failed(ApiError),
}

pub fn step(ev: Option<GenEvent>) -> Step {
    match ev {
        Some(GenEvent::Token { text }) => Step::Text(text),
        Some(GenEvent::Done {
            finish_reason,
            prompt_tokens,
            completion_tokens,
            first_token_ms,
        }) => Step::Done(Finish {
            reason: finish_reason,
            prompt_tokens,
            completion_tokens,
            first_token_ms,
        }),
        Some(GenEvent::Error(m, true)) => Step::Failed(ApiError::BadRequest(m)),
        Some(GenEvent::Error(m, false)) => Step::Failed(model_error(ModelError::Unavailable(m))),
        None => Step::Failed(model_error(ModelError::Unavailable(
            "generation ended without an answer".into(),
        ))),
    }
}

/// Answers a message with sources, in one JSON body.
#[utoipa::path(post, path = "/chat/message", tag = "chat", security(("bearer" = [])), request_body = ChatRequest,
    responses((status = 200, body = ChatResponse), (status = 404, description = "Unknown session"),
              (status = 422), (status = 429), (status = 503)))]
pub async fn message(
    admitted: Admitted<ChatMessage>,
    state: web::Data<AppState>,
    body: web::Json<ChatRequest>,
) -> Result<HttpResponse, ApiError> {
    let (prepared, mut events) = prepare(&state, &admitted.user, body.into_inner()).await?;
    let mut headers = HttpResponse::Ok();
    admitted.rate_headers(&mut headers);
    let mut turn = Turn::new(state.get_ref().clone(), admitted, prepared);
    loop {
        match step(events.recv().await) {
            Step::Text(t) => turn.push(&t),
            Step::Done(done) => return Ok(headers.json(turn.finish(done).await?)),
            Step::Failed(e) => {
                turn.fail();
                return Err(e);
            }
        }
    }
}

fn sse(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// The same answer as server-sent events: `sources`, `token` ({"text"}) as they
/// are generated, then `done` (the whole response) or `error` ({"detail"}).
#[utoipa::path(post, path = "/chat/stream", tag = "chat", security(("bearer" = [])), request_body = ChatRequest,
    responses((status = 200, description = "text/event-stream"), (status = 404), (status = 422), (status = 429), (status = 503)))]
pub async fn stream_message(
    admitted: Admitted<ChatMessage>,
    state: web::Data<AppState>,
    body: web::Json<ChatRequest>,
) -> Result<HttpResponse, ApiError> {
    let (prepared, events) = prepare(&state, &admitted.user, body.into_inner()).await?;
    let mut resp = HttpResponse::Ok();
    admitted.rate_headers(&mut resp);
    let head = sse("sources", &prepared.head());
    let turn = Turn::new(state.get_ref().clone(), admitted, prepared);
    let body = stream::once(async move { Ok::<Bytes, actix_web::Error>(head) }).chain(stream::unfold(
        Some((turn, events)),
        |st| async move {
            let (mut turn, mut events) = st?;
            match step(events.recv().await) {
                Step::Text(t) if t.is_empty() => Some((Ok(Bytes::new()), Some((turn, events)))),
                Step::Text(t) => {
                    turn.push(&t);
                    Some((Ok(sse("token", &json!({ "text": t }))), Some((turn, events))))
                }
                Step::Done(done) => {
                    let out = match turn.finish(done).await {
                        Ok(r) => sse("done", &json!(r)),
                        Err(e) => sse("error", &json!({ "detail": e.detail() })),
                    };
                    Some((Ok(out), None))
                }
                Step::Failed(e) => {
                    turn.fail();
                    Some((Ok(sse("error", &json!({ "detail": e.detail() }))), None))
                }
            }
        },
    ));
    Ok(resp
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
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
    responses((status = 200, body = SessionList), (status = 422)))]
pub async fn list_sessions(
    current: CurrentUser,
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

/// A page of a conversation: the newest messages, or those before a cursor.
#[utoipa::path(get, path = "/chat/sessions/{id}/messages", tag = "chat", security(("bearer" = [])),
    params(("before" = Option<String>, Query), ("limit" = Option<u32>, Query, description = "1 to 200, default 50")),
    responses((status = 200, body = MessagePage), (status = 404), (status = 422)))]
pub async fn session_messages(
    current: CurrentUser,
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
        return Err(ApiError::NotFound("Chat session not found".into()));
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
                metadata: m.metadata,
            })
            .collect(),
        next_before,
    }))
}

/// Deletes a conversation and its messages.
#[utoipa::path(delete, path = "/chat/sessions/{id}", tag = "chat", security(("bearer" = [])),
    responses((status = 204), (status = 404)))]
pub async fn delete_session(
    current: CurrentUser,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    if state.conversations.delete_session(current.user.id, *id).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::NotFound("Chat session not found".into()))
    }
}
