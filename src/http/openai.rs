//! OpenAI-compatible API: /v1/models, /v1/embeddings, /v1/chat/completions (plain
//! JSON or SSE `data:` chunks ending with `[DONE]`). Authenticated like every route
//! (JWT or API key) and admitted by the user's session: completions count as
//! `messages`, embeddings as `api_calls`; usage is recorded with token counts.
//! A streamed completion whose client disconnects leaves the batch at the next
//! step; it counts once a token was sent, and is given back if none was (the
//! same rule as the chat routes).

use actix_web::web::Bytes;
use actix_web::{web, HttpResponse};
use chrono::Utc;
use futures_util::{stream, StreamExt};
use ragchat_actors::chat::stream::{Generation, Step};
use ragchat_actors::embed_worker::Lane;
use ragchat_actors::generate_worker::{GenerateRequest, GenerateWorker};
use ragchat_actors::inference::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::unbounded_channel;
use utoipa::ToSchema;
use uuid::Uuid;

use super::admission::{Admitted, ChatMessage, EmbedCall};
use super::extractors::{access, Scoped};
use super::{sse, AppState};
use crate::error::{ApiError, ErrorBody, ErrorCode};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/models").route(web::get().to(models)))
        .service(web::resource("/v1/embeddings").route(web::post().to(embeddings)))
        .service(web::resource("/v1/chat/completions").route(web::post().to(chat_completions)));
}

/// A request may name the model: the served name or one of its aliases (the
/// Hugging Face id), in any case.
fn check_model(requested: Option<&str>, served: &str, aliases: &[String]) -> Result<(), ApiError> {
    match requested {
        Some(m) if !names_model(m, served, aliases) => Err(ApiError::NotFound(format!(
            "Model '{m}' not found: this server runs '{served}'"
        ))
        .with_code(ErrorCode::ModelNotFound)),
        _ => Ok(()),
    }
}

fn names_model(requested: &str, served: &str, aliases: &[String]) -> bool {
    let requested = requested.trim();
    std::iter::once(served)
        .chain(aliases.iter().map(String::as_str))
        .any(|name| name.eq_ignore_ascii_case(requested))
}

fn not_loaded(what: &str) -> ApiError {
    ApiError::Unavailable(format!(
        "The {what} model is not loaded on this server (run scripts/fetch-models)"
    ))
    .with_code(ErrorCode::ModelNotLoaded)
}

/// The models this server runs.
#[utoipa::path(get, path = "/v1/models", tag = "openai", security(("bearer" = [])),
    responses((status = 200), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "A deactivated account")))]
pub async fn models(_user: Scoped<access::Account>, state: web::Data<AppState>) -> web::Json<Value> {
    let m = &state.settings.models;
    let mut data = Vec::new();
    if state.generator.is_some() {
        data.push(json!({"id": m.generator_name, "object": "model", "created": 0, "owned_by": "ragchat"}));
    }
    if state.embedder.is_some() {
        data.push(json!({"id": m.embedding_name, "object": "model", "created": 0, "owned_by": "ragchat"}));
    }
    web::Json(json!({"object": "list", "data": data}))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    pub input: EmbeddingInput,
    pub model: Option<String>,
    /// "float" (default) or "base64" (little-endian f32 bytes, as OpenAI's clients request).
    pub encoding_format: Option<String>,
}

/// Embeds one text or a list (all-MiniLM-L6-v2: 384 dimensions, unit length).
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai", security(("bearer" = [])), request_body = EmbeddingRequest,
    responses((status = 200), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `search` scope (insufficient_scope), or a deactivated account"),
              (status = 404, body = ErrorBody, description = "Unknown model"), (status = 422, body = ErrorBody),
              (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn embeddings(
    admitted: Admitted<EmbedCall>,
    state: web::Data<AppState>,
    body: web::Json<EmbeddingRequest>,
) -> Result<HttpResponse, ApiError> {
    let worker = state.embedder.clone().ok_or_else(|| not_loaded("embedding"))?;
    let name = state.settings.models.embedding_name.clone();
    let body = body.into_inner();
    check_model(body.model.as_deref(), &name, &state.settings.models.embedding_aliases)?;
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::Unprocessable(format!(
                "encoding_format '{other}': expected \"float\" or \"base64\""
            )))
        }
    };
    let texts = match body.input {
        EmbeddingInput::One(s) => vec![s],
        EmbeddingInput::Many(v) => v,
    };
    let m = &state.settings.models;
    if texts.is_empty() || texts.len() > m.max_embed_inputs {
        return Err(ApiError::Unprocessable(format!(
            "input must hold 1 to {} texts",
            m.max_embed_inputs
        )));
    }
    if texts
        .iter()
        .any(|t| t.is_empty() || t.chars().count() > m.max_embed_input_chars)
    {
        return Err(ApiError::Unprocessable(format!(
            "each input must be 1 to {} characters",
            m.max_embed_input_chars
        )));
    }
    // One short input is interactive; a batch of them waits behind search and chat.
    let lane = Lane::for_inputs(&texts, m.embed_interactive_max_chars);
    let out = worker.embed(lane, texts).await?;
    let data: Vec<Value> = out
        .vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                use base64::Engine as _;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let mut resp = HttpResponse::Ok();
    admitted.rate_headers(&mut resp);
    admitted.complete(json!({"endpoint": "/v1/embeddings", "tokens": out.tokens}));
    Ok(resp.json(json!({
        "object": "list",
        "data": data,
        "model": name,
        "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens},
    })))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopIn {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub stream: bool,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopIn>,
}

fn sampling(req: &ChatCompletionRequest) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let p = SamplingParams {
        temperature: req.temperature.unwrap_or(d.temperature),
        top_p: req.top_p.unwrap_or(d.top_p),
        top_k: req.top_k.unwrap_or(d.top_k),
        repetition_penalty: req.repetition_penalty.unwrap_or(d.repetition_penalty),
        seed: req.seed,
        ..SamplingParams::default()
    };
    if !(0.0..=2.0).contains(&p.temperature) {
        return Err(ApiError::Unprocessable("temperature must be between 0 and 2".into()));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return Err(ApiError::Unprocessable("top_p must be in (0, 1]".into()));
    }
    if !(p.repetition_penalty > 0.0 && p.repetition_penalty <= 10.0) {
        return Err(ApiError::Unprocessable("repetition_penalty must be in (0, 10]".into()));
    }
    Ok(p)
}

/// Validates the request and queues it on the generation worker.
async fn start_generation(
    state: &AppState,
    worker: &GenerateWorker,
    req: &ChatCompletionRequest,
    user: uuid::Uuid,
) -> Result<Generation, ApiError> {
    let m = &state.settings.models;
    if req.messages.is_empty() || req.messages.len() > m.max_completion_messages {
        return Err(ApiError::Unprocessable(format!(
            "messages must hold 1 to {} messages",
            m.max_completion_messages
        )));
    }
    let chars: usize = req.messages.iter().map(|x| x.content.chars().count()).sum();
    if chars > m.max_completion_chars {
        return Err(ApiError::Unprocessable(format!(
            "the messages hold {chars} characters: at most {}",
            m.max_completion_chars
        )));
    }
    let mut turns = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::Unprocessable(format!(
                "unknown role '{}': expected system, user or assistant",
                m.role
            )));
        }
        turns.push((m.role.clone(), m.content.clone()));
    }
    let stop = match &req.stop {
        None => Vec::new(),
        Some(StopIn::One(s)) => vec![s.clone()],
        Some(StopIn::Many(v)) if v.len() <= 4 => v.clone(),
        Some(StopIn::Many(_)) => return Err(ApiError::Unprocessable("at most 4 stop strings".into())),
    };
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(state.settings.models.default_max_tokens);
    let cap = state.settings.chat.max_answer_tokens;
    if !(1..=cap).contains(&max_tokens) {
        return Err(ApiError::Unprocessable(format!("max_tokens must be 1 to {cap}")));
    }
    let params = sampling(req)?;
    // Tokenizing is CPU work: on the blocking pool, not the HTTP worker's thread.
    let tok = worker.tokenizer().clone();
    let prompt_tokens = web::block(move || tok.encode(&tok.chat_prompt(&turns)))
        .await
        .map_err(ApiError::internal)??;
    let (tx, rx) = unbounded_channel();
    worker.submit(GenerateRequest {
        prompt_tokens,
        params,
        max_tokens,
        stop,
        events: tx,
        cache_scope: Some(user),
    })?;
    Ok(Generation::new(rx))
}

/// The admitted unit of a streamed completion: completed on `Done`; ended
/// early (dropped), it counts once a token was sent and goes back otherwise:
/// the usage rule of every transport.
struct Streamed {
    admitted: Option<Admitted<ChatMessage>>,
    sent: bool,
}

impl Streamed {
    fn new(admitted: Admitted<ChatMessage>) -> Self {
        Streamed {
            admitted: Some(admitted),
            sent: false,
        }
    }

    fn complete(&mut self, metadata: Value) {
        if let Some(a) = self.admitted.take() {
            a.complete(metadata);
        }
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        if self.sent {
            self.complete(json!({"endpoint": "/v1/chat/completions", "stream": true, "ended_early": true}));
        }
        // Otherwise the admitted unit is dropped unused: given back.
    }
}

/// Chat completion with the configured model (ChatML), plain or streamed (SSE).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", security(("bearer" = [])), request_body = ChatCompletionRequest,
    responses((status = 200), (status = 400, body = ErrorBody, description = "Prompt longer than the context"),
              (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `chat` scope (insufficient_scope), or a deactivated account"),
        (status = 404, body = ErrorBody, description = "Unknown model"),
              (status = 422, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn chat_completions(
    admitted: Admitted<ChatMessage>,
    state: web::Data<AppState>,
    body: web::Json<ChatCompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let worker = state.generator.clone().ok_or_else(|| not_loaded("generation"))?;
    let name = state.settings.models.generator_name.clone();
    let req = body.into_inner();
    check_model(req.model.as_deref(), &name, &state.settings.models.generator_aliases)?;
    let mut generation = start_generation(&state, &worker, &req, admitted.user.user.id).await?;
    let id = format!("chatcmpl-{}", Uuid::new_v4().simple());
    let created = Utc::now().timestamp();
    if !req.stream {
        let mut text = String::new();
        loop {
            match generation.next().await {
                Step::Text(t) => text.push_str(&t),
                Step::Done(done) => {
                    let mut resp = HttpResponse::Ok();
                    admitted.rate_headers(&mut resp);
                    admitted.complete(
                        json!({"endpoint": "/v1/chat/completions", "prompt_tokens": done.prompt_tokens,
                                             "completion_tokens": done.completion_tokens}),
                    );
                    return Ok(resp.json(json!({
                        "id": id, "object": "chat.completion", "created": created, "model": name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": done.reason.as_str()}],
                        "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                                  "total_tokens": done.prompt_tokens + done.completion_tokens,
                                  "prompt_tokens_details": {"cached_tokens": done.cached_tokens}},
                    })));
                }
                Step::Failed(e) => return Err(e.into()),
            }
        }
    }

    // Streaming: the permit travels with the stream (`Streamed`): completed on
    // `Done`; if the stream ends early (the client went away, or the model
    // failed), counted once a token was sent and given back otherwise.
    let chunk = move |delta: Value, finish: Option<&str>| {
        let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        sse::frame(None, &c)
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None);
    let st = Some((generation, Streamed::new(admitted), chunk));
    let rest = stream::unfold(st, |st| async move {
        let (mut generation, mut permit, chunk) = st?;
        Some(match generation.next().await {
            Step::Text(text) => {
                permit.sent = true;
                (chunk(json!({"content": text}), None), Some((generation, permit, chunk)))
            }
            Step::Done(done) => {
                permit.complete(json!({"endpoint": "/v1/chat/completions", "stream": true,
                                       "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}));
                let mut out = chunk(json!({}), Some(done.reason.as_str())).to_vec();
                let usage = json!({"object": "chat.completion.chunk", "choices": [],
                                   "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                                             "total_tokens": done.prompt_tokens + done.completion_tokens,
                                             "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}});
                out.extend_from_slice(&sse::frame(None, &usage));
                out.extend_from_slice(&sse::frame(None, &"[DONE]"));
                (Bytes::from(out), None)
            }
            Step::Failed(e) => {
                let mut out = sse::frame(
                    None,
                    &json!({"error": {"message": e.to_string(), "type": "server_error"}}),
                )
                .to_vec();
                out.extend_from_slice(&sse::frame(None, &"[DONE]"));
                (Bytes::from(out), None)
            }
        })
    });
    Ok(sse::response(HttpResponse::Ok(), stream::iter([first]).chain(rest)))
}

#[cfg(test)]
mod tests {
    use super::names_model;

    #[test]
    fn a_model_is_named_by_its_name_or_an_alias_in_any_case() {
        let aliases = vec!["Qwen/Qwen3-1.7B".to_string()];
        for name in [
            "qwen3-1.7b",
            "Qwen3-1.7B",
            "Qwen/Qwen3-1.7B",
            "qwen/qwen3-1.7b",
            " QWEN3-1.7B ",
        ] {
            assert!(names_model(name, "qwen3-1.7b", &aliases), "{name}");
        }
        for name in ["qwen3", "Qwen/Qwen3-8B", "other/qwen3-1.7b", ""] {
            assert!(!names_model(name, "qwen3-1.7b", &aliases), "{name}");
        }
    }
}
