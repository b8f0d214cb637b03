//! The chat turn: one admitted message from its question to its stored answer.
//!
//! `ChatService::start` validates the request, reads the conversation,
//! retrieves (through the `Retriever`), builds the prompt within the context,
//! and queues it on the GenerateWorker; the `Turn` it returns is read event by
//! event (`sources`, `token`…, then `done` with the whole response or `error`)
//! by every transport.
//!
//! Usage is recorded exactly once per admitted message, by one rule for every
//! transport: **once a token has been sent the unit counts; work that produced
//! nothing is given back**.
//! - an answer that completes counts once;
//! - an answer whose client leaves (the `Turn` is dropped) or cancels, or that
//!   the model fails, after its first token counts once: the question and the
//!   partial answer (marked `cancelled` or `failed`) are kept in the
//!   conversation (a store that cannot keep them does not change the count),
//!   and the generation stops at the next step, freeing its slot;
//! - the same before the first token, and a request refused before generation
//!   (bad input, unknown session, prompt too long, model overloaded), gives its
//!   unit back and keeps nothing.
//!
//! Stores that fail degrade the answer instead of refusing it: no history, no
//! sources or not saved, each said in `warnings`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use chrono::{Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc::unbounded_channel;
use uuid::Uuid;

use super::grounding::{evidence, ground, question_support, sentences, Quote, SourceSentences};
use super::prompt::{build_prompt, Passage, DEFAULT_SYSTEM_PROMPT};
use super::records::{title_of, to_millis, ChatRecord, ChatSession, Role, PROMPT_MESSAGE};
use super::stream::{Event, Finish, Generation, Step};
use crate::admission::registry::Ticket;
use crate::embed_worker::{EmbedWorker, Lane};
use crate::generate_worker::{FinishReason, GenEvent, GenerateRequest, GenerateWorker};
use crate::inference::{ModelError, SamplingParams};
use crate::knowledge::Reader;
use crate::ports::{ConversationStore, StoreError};
use crate::retrieval::{invalid_filter, text_within, top_k_within, Filters, Query, Retriever, Route};

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub message: String,
    /// Continue this conversation (404 if it is not yours); a new one otherwise.
    pub session_id: Option<Uuid>,
    /// Answer from the knowledge base (default) or from the model alone.
    #[serde(default = "yes")]
    pub enable_rag: bool,
    /// Sources to retrieve, 1 to `chat.max_top_k` (default `chat.default_top_k`).
    pub top_k: Option<usize>,
    #[serde(default)]
    pub route: Route,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub filters: Filters,
    #[serde(default)]
    pub debug_mode: bool,
    /// Longest answer in tokens (default `models.default_max_tokens`, at most
    /// `chat.max_answer_tokens`).
    pub max_tokens: Option<usize>,
    /// The client's id for this message, to resume it: the same request sent
    /// again with the same id (a reconnect, through any node) gets the answer
    /// stored for it without counting again, or, when none was stored (the node
    /// that had it died), is answered then, once. Without a `session_id` the new
    /// conversation's id is derived from it, so a retry continues the same one.
    pub request_id: Option<Uuid>,
}

/// The records a resumable request (`request_id`) writes under: the same ids
/// on every node and every attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resumable {
    pub question: Uuid,
    pub answer: Uuid,
    /// The conversation, when the request names none.
    pub session: Uuid,
}

impl Resumable {
    pub fn of(user_id: Uuid, request_id: Uuid) -> Self {
        Resumable {
            question: Uuid::new_v5(&request_id, b"question"),
            answer: Uuid::new_v5(&request_id, b"answer"),
            session: Uuid::new_v5(&user_id, request_id.as_bytes()),
        }
    }
}

/// How far back in a conversation a resumed request looks for its answer.
const RESUME_LOOKBACK: u32 = 200;

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SourceView {
    pub document_id: Uuid,
    pub title: String,
    pub excerpt: String,
    /// How likely the source answers the question, 0–1 on one scale for every
    /// question (calibrated relevance; docs/ARCHITECTURE.md, "Relevance").
    pub relevance_score: f32,
    /// How the document reached the knowledge base: `api`, `upload:<format>`
    /// (`upload:pdf`, …) or `seed`.
    pub source_type: String,
    /// The document's own source (a file name, a URL, a corpus id).
    #[serde(default)]
    pub source: String,
    /// The passage (chunk) of the document the answer was given.
    #[serde(default)]
    pub chunk_id: Option<Uuid>,
    /// The sentences of the passage that support the answer, best first: exact
    /// substrings of the passage (trimmed), at character offsets into it, so
    /// the `excerpt` shows those that start within it at the same offsets.
    #[serde(default)]
    pub quotes: Vec<Quote>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UsageInfo {
    pub messages_used: u64,
    pub messages_limit: u64,
    pub messages_remaining: u64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ChatResponse {
    pub session_id: Uuid,
    pub message_id: Uuid,
    pub answer: String,
    /// How much of the answer its sources support, 0 to 1: the share of its
    /// sentences that a source sentence supports (`chat.support_threshold`),
    /// times (1 + the best source's relevance) / 2; 0 without sources
    /// (docs/ARCHITECTURE.md, "Grounding").
    pub confidence: f32,
    /// "rag_enhanced" when sources went into the prompt, "not_in_knowledge_base"
    /// when no source supports the question (the answer says so; the model
    /// was not asked), else "generation_only".
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

/// Why a turn was refused or failed; mapped to HTTP once, in the `ragchat` crate.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The request breaks a limit or is malformed (422).
    #[error("{0}")]
    Invalid(String),
    /// The session is unknown or not the caller's (404).
    #[error("Chat session not found")]
    SessionNotFound,
    /// The generation model is not loaded on this server (503).
    #[error("The generation model is not loaded on this server (run scripts/fetch-models)")]
    NoModel,
    /// The model refused (prompt too long: 400) or is unavailable (503).
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

/// The limits and defaults of a turn (from `[chat]` and `[models]` in config).
#[derive(Debug, Clone)]
pub struct ChatLimits {
    pub max_message_chars: usize,
    pub default_top_k: usize,
    pub max_top_k: usize,
    pub default_max_tokens: usize,
    pub max_answer_tokens: usize,
    pub temperature: f32,
    /// The repetition penalty counts the prompt's tokens (`chat.penalize_prompt`).
    pub penalize_prompt: bool,
    /// Logit bonus of the tokens of the sources in the prompt (`chat.copy_bonus`; 0: none).
    pub copy_bonus: f32,
    pub excerpt_chars: usize,
    pub history_messages: u32,
    /// Past questions come back with their sources (`chat.history_sources`).
    pub history_sources: bool,
    /// Window of the history in the prompt, in tokens (`chat.history_tokens`).
    pub history_tokens: usize,
    /// Empty: the built-in system prompt.
    pub system_prompt: String,
    /// The generation model's name (in debug_info).
    pub model_name: String,
    pub grounding: GroundingLimits,
}

/// How answers are checked against their sources (`[chat]` in config).
#[derive(Debug, Clone)]
pub struct GroundingLimits {
    /// The support an answer sentence needs to count as supported (`chat.support_threshold`).
    pub support_threshold: f32,
    /// Below this question support (its best cosine with a source sentence, times
    /// the share of its names and numbers the sources have) the answer to a
    /// conversation's first question is that the knowledge base does not contain
    /// it (`chat.refuse_below`; 0: never).
    pub refuse_below: f32,
    /// Quotes per source (`chat.quotes_per_source`).
    pub quotes_per_source: usize,
    /// Sentences embedded per answer, and for all sources together (`chat.grounding_sentences`).
    pub max_sentences: usize,
    /// The prompt gives the model only this many sentences of the sources, those
    /// that best match the question (`chat.evidence_sentences`; 0: whole passages).
    pub evidence_sentences: usize,
}

impl GroundingLimits {
    /// No grounding: the tests of other behaviour.
    pub fn off() -> Self {
        GroundingLimits {
            support_threshold: 0.5,
            refuse_below: 0.0,
            quotes_per_source: 0,
            max_sentences: 0,
            evidence_sentences: 0,
        }
    }
}

/// The answer when no source supports the question.
pub const NOT_IN_KNOWLEDGE_BASE: &str = "The knowledge base does not contain an answer to this question.";

pub const HISTORY_UNAVAILABLE: &str =
    "The conversation history is unavailable right now: this answer was made without it";
pub const KNOWLEDGE_UNAVAILABLE: &str =
    "The knowledge base is unavailable right now: this answer was made without sources";
pub const NOT_SAVED: &str = "The conversation store is unavailable: this answer was not saved to the conversation";

/// What a chat turn needs: the conversations, retrieval and the model.
#[derive(Clone)]
pub struct ChatService {
    pub conversations: Arc<dyn ConversationStore>,
    pub retriever: Retriever,
    pub generator: Option<GenerateWorker>,
    pub limits: Arc<ChatLimits>,
}

/// A chat event: the head (sources), tokens, then the response or the error.
pub type ChatEvent = Event<Box<ChatResponse>, ChatError>;

fn excerpt(text: &str, chars: usize) -> String {
    let t = text.trim();
    if t.chars().count() <= chars {
        return t.to_string();
    }
    let cut: String = t.chars().take(chars).collect();
    format!("{}…", cut.trim_end())
}

/// The checked numbers of a request.
struct Checked {
    question: String,
    top_k: usize,
    max_tokens: usize,
}

impl ChatLimits {
    fn check(&self, req: &ChatRequest) -> Result<Checked, ChatError> {
        let question = text_within(&req.message, "message", self.max_message_chars).map_err(ChatError::Invalid)?;
        let top_k = top_k_within(req.top_k, self.default_top_k, self.max_top_k).map_err(ChatError::Invalid)?;
        if let Some(m) = invalid_filter(&req.filters) {
            return Err(ChatError::Invalid(m));
        }
        let max_tokens = req.max_tokens.unwrap_or(self.default_max_tokens);
        if !(1..=self.max_answer_tokens).contains(&max_tokens) {
            return Err(ChatError::Invalid(format!(
                "max_tokens must be 1 to {}",
                self.max_answer_tokens
            )));
        }
        Ok(Checked {
            question,
            top_k,
            max_tokens,
        })
    }
}

impl ChatService {
    /// Validates the request, reads the conversation, retrieves, builds the
    /// prompt and queues it on the model. Nothing is stored yet; a refusal
    /// drops the ticket, which gives its unit back.
    pub async fn start(&self, ticket: Ticket, reader: Reader, req: ChatRequest) -> Result<Turn, ChatError> {
        let started = Instant::now();
        let limits = &self.limits;
        let Checked {
            question,
            top_k,
            max_tokens,
        } = limits.check(&req)?;
        let worker = self.generator.clone().ok_or(ChatError::NoModel)?;
        let user_id = reader.user_id;
        let now = to_millis(Utc::now());

        // A resumed request whose answer is stored gets it again, free.
        let resumable = req.request_id.map(|id| Resumable::of(user_id, id));
        if let Some(ids) = &resumable {
            let session_id = req.session_id.unwrap_or(ids.session);
            match self.stored_answer(user_id, session_id, ids.answer).await {
                Ok(Some(record)) => return Ok(Turn::replayed(self.conversations.clone(), ticket, record)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not look for the stored answer of a resumed request; answering it")
                }
            }
        }

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
            Some(id) => match self.conversations.session(user_id, id).await {
                Ok(Some(s)) => match self
                    .conversations
                    .messages(user_id, id, None, limits.history_messages)
                    .await
                {
                    Ok(mut past) => {
                        past.reverse();
                        let history: Vec<(Role, String)> = past
                            .into_iter()
                            .filter(|m| !m.content.trim().is_empty())
                            .map(|m| {
                                // The question as the model read it, sources included.
                                let asked = match (limits.history_sources, m.metadata.get(PROMPT_MESSAGE)) {
                                    (true, Some(Value::String(s))) if m.role == Role::User => Some(s.clone()),
                                    _ => None,
                                };
                                (m.role, asked.unwrap_or(m.content))
                            })
                            .collect();
                        (s, false, history)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "conversation history unavailable");
                        warnings.push(HISTORY_UNAVAILABLE.to_string());
                        (s, false, Vec::new())
                    }
                },
                Ok(None) => return Err(ChatError::SessionNotFound),
                Err(e) => {
                    // Whose session it is cannot be checked: nothing of it is read, and
                    // the answer is saved only if the store takes it as this user's.
                    tracing::warn!(error = %e, "conversation store unavailable");
                    warnings.push(HISTORY_UNAVAILABLE.to_string());
                    (fresh(id), false, Vec::new())
                }
            },
            None => match &resumable {
                // A retry of a request that started a conversation continues it.
                Some(ids) => match self.conversations.session(user_id, ids.session).await {
                    Ok(Some(s)) => (s, false, Vec::new()),
                    _ => (fresh(ids.session), true, Vec::new()),
                },
                None => (fresh(Uuid::new_v4()), true, Vec::new()),
            },
        };

        // Retrieval: without sources (and a warning) when it fails.
        let retrieval_started = Instant::now();
        let mut route = None;
        let mut hits = Vec::new();
        if req.enable_rag {
            let query = Query {
                text: question.clone(),
                route: req.route,
                reader,
                filters: req.filters.clone(),
                top_k,
                text_without_embedder: true,
            };
            match self.retriever.search(query).await {
                Ok(found) => {
                    hits = found.hits;
                    route = Some(found.route);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retrieval failed: answering without sources");
                    warnings.push(KNOWLEDGE_UNAVAILABLE.to_string());
                }
            }
        }
        let retrieval_ms = retrieval_started.elapsed().as_secs_f64() * 1000.0;

        // Grounding: the sentences of the retrieved passages and the question,
        // embedded once. When no source sentence supports the question, the
        // answer is that the knowledge base does not contain it, and the model
        // is not asked. Otherwise the prompt may give the model only the
        // sentences that best match the question (`chat.evidence_sentences`),
        // and the answer's sentences are matched to the passages when it is done.
        let mut grounding = match self.retriever.embedder() {
            Some(embedder) if limits.grounding.max_sentences > 0 && !hits.is_empty() => {
                let passages: Vec<(String, f32)> = hits
                    .iter()
                    .map(|h| (h.content.trim().to_string(), h.relevance))
                    .collect();
                prepare_grounding(embedder, &question, passages, limits.grounding.max_sentences).await
            }
            _ => None,
        };
        // Only a conversation's first question: a follow-up ("and when?") leans
        // on the conversation, not on words a source shares with it.
        let refused = history.is_empty()
            && grounding.as_ref().is_some_and(|g| {
                limits.grounding.refuse_below > 0.0 && g.question_support < limits.grounding.refuse_below
            });
        // Which hits go into the prompt, in rank order, with the text they show.
        let chosen: Vec<(usize, String)> = match &grounding {
            _ if refused => Vec::new(),
            Some(g) if limits.grounding.evidence_sentences > 0 => evidence(
                &question,
                &g.question_vector,
                &g.sources,
                limits.grounding.evidence_sentences,
            )
            .into_iter()
            .map(|(i, picked)| {
                let s = &g.sources[i];
                let text: Vec<&str> = picked.iter().map(|k| s.spans[*k].of(&s.text)).collect();
                (i, text.join(" "))
            })
            .collect(),
            _ => hits.iter().enumerate().map(|(i, h)| (i, h.content.clone())).collect(),
        };

        // The prompt, within the context (tokenizing is CPU work: off the caller's thread).
        let passages: Vec<Passage> = chosen
            .iter()
            .map(|(i, text)| Passage {
                title: hits[*i].title.clone(),
                text: text.clone(),
            })
            .collect();
        let system = if limits.system_prompt.trim().is_empty() {
            DEFAULT_SYSTEM_PROMPT.to_string()
        } else {
            limits.system_prompt.clone()
        };
        let budget = worker
            .context_len()
            .saturating_sub(max_tokens.min(worker.context_len() / 2));
        let tok = worker.tokenizer().clone();
        let (q, history_len) = (question.clone(), history.len());
        let window = limits.history_tokens;
        let bonus = limits.copy_bonus;
        let (prompt, bonus_tokens) = off_thread(move || {
            let prompt = build_prompt(tok.as_ref(), &system, &passages, &history, &q, budget, window)?;
            // The sources the model reads, as tokens, for the copy bonus.
            let mut favoured = Vec::new();
            if bonus != 0.0 {
                for p in passages.iter().take(prompt.sources_used) {
                    favoured.extend(tok.encode(&format!("{}\n{}\n", p.title.trim(), p.text.trim()))?);
                }
            }
            Ok::<_, ModelError>((prompt, favoured))
        })
        .await??;
        let view = |h: &crate::retrieval::Hit| SourceView {
            document_id: h.document_id,
            title: h.title.clone(),
            excerpt: excerpt(&h.content, limits.excerpt_chars),
            relevance_score: h.relevance,
            source_type: h.source_type.clone(),
            source: h.source.clone(),
            chunk_id: Some(h.chunk_id),
            quotes: Vec::new(),
        };
        let used: Vec<usize> = chosen.iter().take(prompt.sources_used).map(|(i, _)| *i).collect();
        let sources: Vec<SourceView> = used.iter().map(|i| view(&hits[*i])).collect();
        let mut debug_grounding = grounding
            .as_ref()
            .map(|g| json!({"question_support": g.question_support}));
        if refused {
            if let Some(d) = debug_grounding.as_mut() {
                d["nearest_sources"] = json!(hits.iter().map(view).collect::<Vec<_>>());
            }
            grounding = None;
        }
        // The answer is grounded in the passages it was given (all their sentences).
        if let Some(g) = grounding.as_mut() {
            let mut all: Vec<Option<SourceSentences>> = std::mem::take(&mut g.sources).into_iter().map(Some).collect();
            g.sources = used
                .iter()
                .filter_map(|i| all.get_mut(*i).and_then(Option::take))
                .collect();
        }
        let debug = req.debug_mode.then(|| {
            json!({
                "grounding": debug_grounding,
                "sources_retrieved": hits.len(),
                "sources_in_prompt": prompt.sources_used,
                "history_messages_read": history_len,
                "history_messages_in_prompt": prompt.history_used,
                "prompt_tokens": prompt.tokens.len(),
                "prompt_budget_tokens": budget,
                "retrieval_ms": retrieval_ms,
                "top_k": top_k,
                "model": limits.model_name,
            })
        });

        let (tx, events) = unbounded_channel();
        if refused {
            // Sent before anyone reads: the receiver is held by the turn.
            let _ = tx.send(GenEvent::Token {
                text: NOT_IN_KNOWLEDGE_BASE.to_string(),
            });
            let _ = tx.send(GenEvent::Done {
                finish_reason: FinishReason::Stop,
                prompt_tokens: 0,
                completion_tokens: 0,
                first_token_ms: started.elapsed().as_secs_f64() * 1000.0,
                cached_tokens: 0,
            });
        } else {
            worker.submit(GenerateRequest {
                prompt_tokens: prompt.tokens,
                params: SamplingParams {
                    temperature: limits.temperature,
                    penalize_prompt: limits.penalize_prompt,
                    bonus: limits.copy_bonus,
                    bonus_tokens: Arc::from(bonus_tokens),
                    ..SamplingParams::default()
                },
                max_tokens,
                stop: Vec::new(),
                events: tx,
                cache_scope: Some(user_id),
            })?;
        }
        let meta = Meta {
            question: ChatRecord {
                id: resumable.map_or_else(Uuid::new_v4, |ids| ids.question),
                session_id: session.id,
                role: Role::User,
                content: question,
                created_at: now,
                // With sources and `chat.history_sources`, the question as the model
                // read it (for the next turns' prompts; not shown in the
                // conversation's messages).
                metadata: if prompt.sources_used > 0 && limits.history_sources && !refused {
                    json!({ PROMPT_MESSAGE: prompt.question_message })
                } else {
                    json!({})
                },
            },
            session,
            is_new,
            answer_id: resumable.map_or_else(Uuid::new_v4, |ids| ids.answer),
            sources,
            route,
            started,
            debug,
            warnings,
            grounding,
            refused,
            grounding_limits: limits.grounding.clone(),
        };
        Ok(Turn {
            conversations: self.conversations.clone(),
            ticket: Some(ticket),
            meta: Some(meta),
            generation: Some(Generation::new(events)),
            finishing: None,
            tokens_sent: false,
            head_sent: false,
            text: String::new(),
            queued: VecDeque::new(),
        })
    }

    /// The answer stored under `answer_id` in a conversation of this user, if
    /// any (among its last `RESUME_LOOKBACK` messages).
    async fn stored_answer(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        answer_id: Uuid,
    ) -> Result<Option<ChatRecord>, StoreError> {
        if self.conversations.session(user_id, session_id).await?.is_none() {
            return Ok(None);
        }
        let recent = self
            .conversations
            .messages(user_id, session_id, None, RESUME_LOOKBACK)
            .await?;
        Ok(recent
            .into_iter()
            .find(|m| m.id == answer_id && m.role == Role::Assistant))
    }
}

/// The sources' sentences and the question, embedded for grounding.
struct Prepared {
    embedder: EmbedWorker,
    question: String,
    question_vector: Vec<f32>,
    sources: Vec<SourceSentences>,
    /// The best cosine of the question with a source sentence.
    question_support: f32,
}

/// Splits the passages (text, relevance) into sentences (at most `max` in all,
/// shared in turn so every passage has its first ones) and embeds them with the
/// question. None when the embedder fails: the answer comes without quotes.
async fn prepare_grounding(
    embedder: &EmbedWorker,
    question: &str,
    passages: Vec<(String, f32)>,
    max: usize,
) -> Option<Prepared> {
    let all: Vec<Vec<super::grounding::Span>> = passages.iter().map(|(t, _)| sentences(t, max)).collect();
    // Round-robin: the first sentence of each passage, then the second…
    let mut keep = vec![0usize; all.len()];
    let mut left = max;
    'fill: loop {
        let mut took = false;
        for (i, spans) in all.iter().enumerate() {
            if left == 0 {
                break 'fill;
            }
            if keep[i] < spans.len() {
                keep[i] += 1;
                left -= 1;
                took = true;
            }
        }
        if !took {
            break;
        }
    }
    let mut texts = vec![question.to_string()];
    for ((text, _), (spans, n)) in passages.iter().zip(all.iter().zip(&keep)) {
        texts.extend(spans[..*n].iter().map(|s| s.of(text).to_string()));
    }
    let mut vectors = match embedder.embed(Lane::Interactive, texts).await {
        Ok(e) => e.vectors.into_iter(),
        Err(e) => {
            tracing::warn!(error = %e, "grounding unavailable: the sources' sentences could not be embedded");
            return None;
        }
    };
    let q = vectors.next()?;
    let sources: Vec<SourceSentences> = passages
        .into_iter()
        .zip(all.into_iter().zip(keep))
        .map(|((text, relevance), (mut spans, n))| {
            spans.truncate(n);
            SourceSentences {
                vectors: vectors.by_ref().take(n).collect(),
                text,
                spans,
                relevance,
            }
        })
        .collect();
    Some(Prepared {
        embedder: embedder.clone(),
        question: question.to_string(),
        question_support: question_support(question, &q, &sources),
        question_vector: q,
        sources,
    })
}

/// Runs CPU work on the blocking pool and waits for it.
async fn off_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, ChatError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ChatError::Internal(format!("the prompt builder stopped: {e}")))
}

/// Runs `work` as a task of its own (so a caller that goes away cannot cut it
/// in half); its result comes on the receiver.
fn detached<T: 'static>(work: impl std::future::Future<Output = T> + 'static) -> tokio::sync::oneshot::Receiver<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    actix::spawn(async move {
        let _ = tx.send(work.await);
    });
    rx
}

/// How an answer ended before the model's `Done`.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Cancelled,
    Failed,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Ending::Cancelled => "cancelled",
            Ending::Failed => "failed",
        }
    }
}

/// A message on its way: retrieved, prompted and queued on the model.
struct Meta {
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
    /// The sources' sentences, to ground the answer in when it is done.
    grounding: Option<Prepared>,
    /// No source supports the question: the answer says so.
    refused: bool,
    grounding_limits: GroundingLimits,
}

impl Meta {
    /// The first event: where the answer will come from.
    fn head(&self) -> Value {
        json!({
            "session_id": self.session.id,
            "message_id": self.answer_id,
            "sources": self.sources,
            "retrieval_route": self.route,
            "context_used": !self.sources.is_empty(),
            "warnings": self.warnings,
        })
    }

    fn answer_record(&self, text: &str, metadata: Value) -> ChatRecord {
        // Strictly after the question, so the two never tie in the store's order.
        let at = to_millis(Utc::now()).max(self.question.created_at + Duration::milliseconds(1));
        ChatRecord {
            id: self.answer_id,
            session_id: self.session.id,
            role: Role::Assistant,
            content: text.to_string(),
            created_at: at,
            metadata,
        }
    }

    /// Stores the question and the answer (creating the conversation if new).
    async fn save(&self, conversations: &dyn ConversationStore, answer: ChatRecord) -> Result<(), StoreError> {
        if self.is_new {
            conversations.create_session(&self.session).await?;
        }
        conversations
            .append(self.session.user_id, self.session.id, &[self.question.clone(), answer])
            .await
    }
}

/// One admitted message from its prompt to its stored answer, read with
/// `next`. Dropped before its end (the client went away), it records the
/// partial answer and its usage, once, in a task of its own.
pub struct Turn {
    conversations: Arc<dyn ConversationStore>,
    ticket: Option<Ticket>,
    meta: Option<Meta>,
    generation: Option<Generation>,
    /// The answer being saved and counted (after the model's `Done`).
    finishing: Option<tokio::sync::oneshot::Receiver<ChatResponse>>,
    /// A token was handed to the transport: from then on the unit counts.
    tokens_sent: bool,
    head_sent: bool,
    text: String,
    /// Events made in advance (a replayed answer), given before anything else.
    queued: VecDeque<ChatEvent>,
}

impl Turn {
    /// The next event: the head first, then tokens, then the response or the
    /// error; None after that. Cancel-safe: a caller may drop the future (a
    /// `select!` on other input) and call again; nothing is lost.
    pub async fn next(&mut self) -> Option<ChatEvent> {
        if let Some(ev) = self.queued.pop_front() {
            return Some(ev);
        }
        if !self.head_sent {
            self.head_sent = true;
            return self.meta.as_ref().map(|m| Event::Sources(m.head()));
        }
        if let Some(rx) = self.finishing.as_mut() {
            let done = rx.await;
            self.finishing = None;
            return Some(match done {
                Ok(r) => Event::Done(Box::new(r)),
                Err(_) => Event::Error(ChatError::Internal("the chat turn's task stopped".into())),
            });
        }
        let step = self.generation.as_mut()?.next().await;
        match step {
            Step::Text(t) => {
                self.text.push_str(&t);
                self.tokens_sent = true;
                Some(Event::Token(t))
            }
            Step::Done(done) => {
                // The answer is complete: it is stored, then counted, in a task of
                // its own (a client leaving meanwhile cannot cut that in half).
                // If the store fails the answer is still given and counted, with a
                // warning that it was not saved.
                self.generation = None;
                let (Some(meta), Some(ticket)) = (self.meta.take(), self.ticket.take()) else {
                    return Some(Event::Error(ChatError::Internal("chat turn finished twice".into())));
                };
                let text = std::mem::take(&mut self.text);
                self.finishing = Some(detached(complete(self.conversations.clone(), meta, ticket, text, done)));
                Box::pin(self.next()).await
            }
            Step::Failed(e) => {
                // The model failed the answer: given back if nothing was sent,
                // else counted and kept as far as it went (see `end_early`).
                if let Some(done) = self.end_early(Ending::Failed) {
                    let _ = done.await;
                }
                Some(Event::Error(ChatError::Model(e)))
            }
        }
    }

    /// A resumed request's stored answer, as events: its head, its text, its
    /// response. The ticket is released: a replay is not a new answer.
    fn replayed(conversations: Arc<dyn ConversationStore>, ticket: Ticket, record: ChatRecord) -> Turn {
        let m = &record.metadata;
        let sources: Vec<SourceView> = serde_json::from_value(m["sources"].clone()).unwrap_or_default();
        let route: Option<Route> = serde_json::from_value(m["retrieval_route"].clone()).unwrap_or(None);
        let context_used = !sources.is_empty();
        let response_type = m["response_type"]
            .as_str()
            .unwrap_or(if context_used {
                "rag_enhanced"
            } else {
                "generation_only"
            })
            .to_string();
        let warnings: Vec<String> = [Ending::Cancelled, Ending::Failed]
            .into_iter()
            .filter(|how| m[how.as_str()] == json!(true))
            .map(|how| {
                format!(
                    "This answer was cut short ({}) when it was first made; it is given as it was stored",
                    how.as_str()
                )
            })
            .collect();
        let (plan, used, limit) = ticket.permit().map_or((String::new(), 0, 0), |p| {
            (p.plan.as_str().to_string(), p.used.saturating_sub(1), p.limit)
        });
        ticket.release();
        metrics::counter!("chat_answers_total", "response_type" => "replayed", "outcome" => "replayed").increment(1);
        let tokens = m["prompt_tokens"].as_u64().unwrap_or(0) + m["completion_tokens"].as_u64().unwrap_or(0);
        let head = json!({
            "session_id": record.session_id,
            "message_id": record.id,
            "sources": sources,
            "retrieval_route": route,
            "context_used": context_used,
            "warnings": warnings,
            "replayed": true,
        });
        let response = ChatResponse {
            session_id: record.session_id,
            message_id: record.id,
            answer: record.content.trim().to_string(),
            confidence: m["confidence"].as_f64().unwrap_or(0.0) as f32,
            response_type,
            context_used,
            sources,
            retrieval_route: route,
            response_time_ms: 0,
            tokens_used: tokens,
            subscription_plan: plan,
            usage_info: UsageInfo {
                messages_used: used,
                messages_limit: limit,
                messages_remaining: limit.saturating_sub(used),
            },
            debug_info: None,
            warnings,
        };
        let mut queued = VecDeque::from([Event::Sources(head)]);
        if !record.content.is_empty() {
            queued.push_back(Event::Token(record.content.clone()));
        }
        queued.push_back(Event::Done(Box::new(response)));
        Turn {
            conversations,
            ticket: None,
            meta: None,
            generation: None,
            finishing: None,
            tokens_sent: false,
            head_sent: true,
            text: String::new(),
            queued,
        }
    }

    /// Reads the turn to its end: the response, or the error.
    pub async fn answer(mut self) -> Result<ChatResponse, ChatError> {
        loop {
            match self.next().await {
                Some(Event::Done(r)) => return Ok(*r),
                Some(Event::Error(e)) => return Err(e),
                Some(_) => continue,
                None => return Err(ChatError::Internal("the chat turn ended without an answer".into())),
            }
        }
    }

    /// The client stopped the answer: the generation ends, the question and
    /// the partial answer are stored, then the unit counted. Returns once that
    /// is done, so a next message sees the conversation whole: None, or the
    /// answer's last event when it had already completed (it is not cancelled).
    pub async fn cancel(mut self) -> Option<ChatEvent> {
        self.generation = None;
        if self.finishing.is_some() {
            return self.next().await;
        }
        if let Some(task) = self.cancel_task() {
            let _ = task.await;
        }
        None
    }

    /// Starts recording a cancelled answer (once); None if already finished.
    fn cancel_task(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.end_early(Ending::Cancelled)
    }

    /// Ends an answer before the model's `Done` (the client left or cancelled,
    /// or the model failed), once. The usage rule of every transport: an answer
    /// of which nothing was sent gives its unit back and is not kept; once a
    /// token was sent the unit counts, and the question and the partial answer
    /// are kept in the conversation, marked (`cancelled` or `failed`). A store
    /// that cannot keep them does not change what counts. Returns a receiver
    /// that answers once that is done; None if the turn had already ended.
    fn end_early(&mut self, how: Ending) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let (meta, ticket) = (self.meta.take()?, self.ticket.take()?);
        self.generation = None;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.tokens_sent {
            ticket.release();
            metrics::counter!("chat_answers_total", "response_type" => "none", "outcome" => how.as_str()).increment(1);
            let _ = tx.send(());
            return Some(rx);
        }
        let conversations = self.conversations.clone();
        let text = std::mem::take(&mut self.text);
        actix::spawn(async move {
            let answer = meta.answer_record(
                &text,
                json!({"sources": meta.sources, "retrieval_route": meta.route, how.as_str(): true}),
            );
            if let Err(e) = meta.save(conversations.as_ref(), answer).await {
                tracing::warn!(error = %e, session = %meta.session.id, "an answer ended early could not be saved");
            }
            metrics::counter!("chat_answers_total", "response_type" => "partial", "outcome" => how.as_str())
                .increment(1);
            ticket.complete(json!({
                "endpoint": "/chat",
                "session_id": meta.session.id,
                "message_id": meta.answer_id,
                how.as_str(): true,
                "answer_chars": text.len(),
            }));
            let _ = tx.send(());
        });
        Some(rx)
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // The client left mid-answer: the generation stops with the dropped
        // receiver; the rest is recorded in the background.
        self.generation = None;
        let _ = self.cancel_task();
    }
}

async fn complete(
    conversations: Arc<dyn ConversationStore>,
    meta: Meta,
    ticket: Ticket,
    text: String,
    done: Finish,
) -> ChatResponse {
    let mut meta = meta;
    // Without grounding (no embedder, or it failed) the best relevance stands
    // for the confidence.
    let mut confidence = meta
        .sources
        .iter()
        .map(|s| s.relevance_score.clamp(0.0, 1.0))
        .fold(0.0f32, f32::max);
    let mut grounding_debug = None;
    if let Some(g) = meta.grounding.take() {
        let lim = &meta.grounding_limits;
        let spans = sentences(&text, lim.max_sentences);
        let texts: Vec<String> = spans.iter().map(|s| s.of(&text).to_string()).collect();
        match g.embedder.embed(Lane::Interactive, texts).await {
            Ok(e) => {
                let found = ground(
                    &g.question,
                    &text,
                    &spans,
                    &e.vectors,
                    &g.sources,
                    lim.support_threshold,
                    lim.quotes_per_source,
                );
                for (view, quotes) in meta.sources.iter_mut().zip(&found.quotes) {
                    view.quotes = quotes.clone();
                }
                confidence = found.confidence;
                grounding_debug = Some(json!({
                    "question_support": g.question_support,
                    "support": found.support.iter().map(|(_, s)| s).collect::<Vec<_>>(),
                    "unsupported_sentences": found.unsupported(lim.support_threshold),
                }));
            }
            Err(e) => tracing::warn!(error = %e, "grounding unavailable: the answer could not be embedded"),
        }
    }
    let context_used = !meta.sources.is_empty();
    let response_type = if meta.refused {
        confidence = 0.0;
        "not_in_knowledge_base"
    } else if context_used {
        "rag_enhanced"
    } else {
        "generation_only"
    };
    let answer = meta.answer_record(
        &text,
        json!({
            "sources": meta.sources,
            "retrieval_route": meta.route,
            "response_type": response_type,
            "confidence": confidence,
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "finish_reason": done.reason.as_str(),
        }),
    );
    let mut warnings = meta.warnings.clone();
    if let Err(e) = meta.save(conversations.as_ref(), answer).await {
        // The answer exists and is delivered: it counts, and says it was not kept.
        tracing::warn!(error = %e, session = %meta.session.id, "the answer could not be saved");
        warnings.push(NOT_SAVED.to_string());
    }
    metrics::counter!("chat_answers_total", "response_type" => response_type, "outcome" => "completed").increment(1);
    metrics::histogram!("chat_time_to_first_token_seconds").record(done.first_token_ms / 1000.0);
    let plan = ticket.permit().map(|permit| permit.plan);
    let permit = ticket.complete(json!({
        "endpoint": "/chat",
        "session_id": meta.session.id,
        "message_id": meta.answer_id,
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
    }));
    let (used, limit) = permit.as_ref().map_or((0, 0), |p| (p.used, p.limit));
    let debug_info = meta.debug.map(|mut d| {
        d["completion_tokens"] = json!(done.completion_tokens);
        d["finish_reason"] = json!(done.reason.as_str());
        d["first_token_ms"] = json!(done.first_token_ms);
        d["cached_prompt_tokens"] = json!(done.cached_tokens);
        if let Some(g) = grounding_debug {
            d["grounding"] = g;
        }
        d
    });
    ChatResponse {
        session_id: meta.session.id,
        message_id: meta.answer_id,
        answer: text.trim().to_string(),
        confidence,
        response_type: response_type.into(),
        context_used,
        sources: meta.sources,
        retrieval_route: meta.route,
        response_time_ms: meta.started.elapsed().as_millis() as u64,
        tokens_used: (done.prompt_tokens + done.completion_tokens) as u64,
        subscription_plan: plan.map(|p| p.as_str().to_string()).unwrap_or_default(),
        usage_info: UsageInfo {
            messages_used: used,
            messages_limit: limit,
            messages_remaining: limit.saturating_sub(used),
        },
        debug_info,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ChatLimits {
        ChatLimits {
            max_message_chars: 10,
            default_top_k: 3,
            max_top_k: 20,
            default_max_tokens: 256,
            max_answer_tokens: 2048,
            temperature: 0.3,
            penalize_prompt: false,
            copy_bonus: 0.0,
            excerpt_chars: 20,
            history_messages: 10,
            history_sources: true,
            history_tokens: 0,
            system_prompt: String::new(),
            model_name: "m".into(),
            grounding: GroundingLimits::off(),
        }
    }

    fn req(message: &str) -> ChatRequest {
        ChatRequest {
            message: message.into(),
            session_id: None,
            enable_rag: true,
            top_k: None,
            route: Route::Auto,
            filters: Filters::new(),
            debug_mode: false,
            max_tokens: None,
            request_id: None,
        }
    }

    #[test]
    fn requests_are_checked_against_the_configured_limits() {
        let l = limits();
        let ok = l.check(&req("  hello  ")).map(|c| (c.question, c.top_k, c.max_tokens));
        assert_eq!(ok.ok(), Some(("hello".to_string(), 3, 256)));
        assert!(matches!(l.check(&req("   ")), Err(ChatError::Invalid(_))));
        assert!(matches!(l.check(&req("eleven chars")), Err(ChatError::Invalid(m)) if m.contains("1 to 10")));
        let mut r = req("hi");
        r.top_k = Some(21);
        assert!(matches!(l.check(&r), Err(ChatError::Invalid(m)) if m == "top_k must be 1 to 20"));
        r.top_k = Some(20);
        r.max_tokens = Some(2049);
        assert!(matches!(l.check(&r), Err(ChatError::Invalid(m)) if m == "max_tokens must be 1 to 2048"));
        r.max_tokens = Some(0);
        assert!(l.check(&r).is_err());
    }

    /// Conversations that take a while to save (`Slow`) or cannot save (`Broken`).
    enum Conversations {
        Slow,
        Broken,
    }

    #[async_trait::async_trait]
    impl ConversationStore for Conversations {
        fn backend(&self) -> &'static str {
            "fake"
        }
        async fn ping(&self) -> crate::ports::StoreResult<()> {
            Ok(())
        }
        async fn create_session(&self, _: &ChatSession) -> crate::ports::StoreResult<()> {
            self.save().await
        }
        async fn session(&self, _: Uuid, _: Uuid) -> crate::ports::StoreResult<Option<ChatSession>> {
            Ok(None)
        }
        async fn sessions(
            &self,
            _: Uuid,
            _: crate::domain::Page,
        ) -> crate::ports::StoreResult<(Vec<ChatSession>, u64)> {
            Ok((Vec::new(), 0))
        }
        async fn append(&self, _: Uuid, _: Uuid, _: &[ChatRecord]) -> crate::ports::StoreResult<()> {
            self.save().await
        }
        async fn messages(
            &self,
            _: Uuid,
            _: Uuid,
            _: Option<super::super::records::Cursor>,
            _: u32,
        ) -> crate::ports::StoreResult<Vec<ChatRecord>> {
            Ok(Vec::new())
        }
        async fn delete_session(&self, _: Uuid, _: Uuid) -> crate::ports::StoreResult<bool> {
            Ok(false)
        }
    }

    impl Conversations {
        async fn save(&self) -> crate::ports::StoreResult<()> {
            match self {
                Conversations::Slow => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    Ok(())
                }
                Conversations::Broken => Err(StoreError::Unavailable("down".into())),
            }
        }
    }

    /// An admitted turn over `conversations`, its model events sent by hand.
    async fn turn_over(
        w: &crate::admission::fakes::World,
        conversations: Arc<dyn ConversationStore>,
    ) -> (
        Turn,
        tokio::sync::mpsc::UnboundedSender<crate::generate_worker::GenEvent>,
        Uuid,
    ) {
        use crate::admission::session::Admit;
        use crate::plans::{Plan, Resource};
        let user = w.accounts.add(Plan::Free);
        let admit = Admit {
            bucket: None,
            resource: Resource::Messages,
            cost: 1,
        };
        let ticket = Ticket::admit(w.registry.clone(), user, admit).await.expect("admitted");
        let now = to_millis(Utc::now());
        let session = ChatSession {
            id: Uuid::new_v4(),
            user_id: user,
            title: "t".into(),
            created_at: now,
            updated_at: now,
            message_count: 0,
        };
        let meta = Meta {
            question: ChatRecord {
                id: Uuid::new_v4(),
                session_id: session.id,
                role: Role::User,
                content: "q".into(),
                created_at: now,
                metadata: json!({}),
            },
            session,
            is_new: true,
            answer_id: Uuid::new_v4(),
            sources: Vec::new(),
            route: None,
            started: Instant::now(),
            debug: None,
            warnings: Vec::new(),
            grounding: None,
            refused: false,
            grounding_limits: GroundingLimits::off(),
        };
        let (tx, rx) = unbounded_channel();
        let turn = Turn {
            conversations,
            ticket: Some(ticket),
            meta: Some(meta),
            generation: Some(Generation::new(rx)),
            finishing: None,
            tokens_sent: false,
            head_sent: false,
            text: String::new(),
            queued: VecDeque::new(),
        };
        (turn, tx, user)
    }

    fn world() -> crate::admission::fakes::World {
        // Leases of one unit: the store's counter is exact at every moment.
        crate::admission::fakes::world(1, std::time::Duration::from_secs(60), Default::default())
    }

    /// The user's messages this month (the store's counter, the ledger's records),
    /// once the ledger had time.
    async fn counted(w: &crate::admission::fakes::World, user: Uuid) -> (u64, u64) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // A unit given back sits in the session's lease until handed back.
        w.registry.return_leases(user).await;
        let month = crate::plans::month_of(Utc::now()).start;
        (
            w.usage.counter(user, crate::plans::Resource::Messages, month),
            w.usage.recorded(user),
        )
    }

    fn done() -> crate::generate_worker::GenEvent {
        crate::generate_worker::GenEvent::Done {
            finish_reason: crate::generate_worker::FinishReason::Stop,
            prompt_tokens: 3,
            completion_tokens: 2,
            first_token_ms: 1.0,
            cached_tokens: 0,
        }
    }

    fn token(t: &str) -> crate::generate_worker::GenEvent {
        crate::generate_worker::GenEvent::Token { text: t.into() }
    }

    #[actix::test]
    async fn a_caller_that_stops_waiting_while_the_answer_is_saved_still_gets_it_counted_once() {
        let w = world();
        let (mut turn, tx, user) = turn_over(&w, Arc::new(Conversations::Slow)).await;
        let _ = tx.send(token("an answer"));
        let _ = tx.send(done());
        assert!(matches!(turn.next().await, Some(Event::Sources(_))));
        assert!(matches!(turn.next().await, Some(Event::Token(t)) if t == "an answer"));
        // A WebSocket's select! drops the future while the answer is being saved…
        let dropped = tokio::time::timeout(std::time::Duration::from_millis(20), turn.next()).await;
        assert!(dropped.is_err(), "still saving");
        // … and asks again: the answer comes, not a silent end.
        match turn.next().await {
            Some(Event::Done(r)) => assert_eq!((r.answer.as_str(), r.tokens_used), ("an answer", 5)),
            other => panic!("expected the answer, got {other:?}"),
        }
        assert!(turn.next().await.is_none());
        drop(turn);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        assert_eq!(counted(&w, user).await, (1, 1), "counted once");
    }

    #[actix::test]
    async fn an_answer_left_before_its_first_token_is_given_back() {
        let w = world();
        let (mut turn, _tx, user) = turn_over(&w, Arc::new(Conversations::Slow)).await;
        assert!(matches!(turn.next().await, Some(Event::Sources(_))));
        drop(turn); // the client left while the prompt was prefilled
        assert_eq!(counted(&w, user).await, (0, 0));
        // Cancelled the same way: given back, and said so (None: not an answer).
        let (mut turn, _tx, user) = turn_over(&w, Arc::new(Conversations::Slow)).await;
        assert!(matches!(turn.next().await, Some(Event::Sources(_))));
        assert!(turn.cancel().await.is_none());
        assert_eq!(counted(&w, user).await, (0, 0));
    }

    #[actix::test]
    async fn once_a_token_was_sent_the_unit_counts_even_when_nothing_can_be_saved() {
        let w = world();
        // The client leaves after a token; the conversation store is down (or the
        // session was deleted meanwhile): still counted once.
        let (mut turn, tx, user) = turn_over(&w, Arc::new(Conversations::Broken)).await;
        let _ = tx.send(token("partial"));
        assert!(matches!(turn.next().await, Some(Event::Sources(_))));
        assert!(matches!(turn.next().await, Some(Event::Token(_))));
        assert!(turn.cancel().await.is_none());
        assert_eq!(counted(&w, user).await, (1, 1));
        // The model fails after a token: the error is told, the unit counts.
        let (mut turn, tx, user) = turn_over(&w, Arc::new(Conversations::Slow)).await;
        let _ = tx.send(token("partial"));
        let _ = tx.send(crate::generate_worker::GenEvent::Error(ModelError::Unavailable(
            "crashed".into(),
        )));
        assert!(matches!(turn.next().await, Some(Event::Sources(_))));
        assert!(matches!(turn.next().await, Some(Event::Token(_))));
        assert!(matches!(turn.next().await, Some(Event::Error(ChatError::Model(_)))));
        assert_eq!(counted(&w, user).await, (1, 1));
        // The model fails before any token: given back.
        let (mut turn, tx, user) = turn_over(&w, Arc::new(Conversations::Slow)).await;
        let _ = tx.send(crate::generate_worker::GenEvent::Error(ModelError::Unavailable(
            "crashed".into(),
        )));
        assert!(matches!(turn.next().await, Some(Event::Sources(_))));
        assert!(matches!(turn.next().await, Some(Event::Error(_))));
        assert_eq!(counted(&w, user).await, (0, 0));
    }

    #[test]
    fn excerpts_are_cut_on_characters() {
        assert_eq!(excerpt("  short ", 20), "short");
        assert_eq!(excerpt("ééééé ééééé", 6), "ééééé…");
    }
}
