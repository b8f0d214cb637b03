//! GenerateWorker: a causal LM on a dedicated thread with continuous batching.
//! New requests join the running set between decode steps (their prompt is
//! prefilled, then they decode with everyone else), each sequence has its own KV
//! cache over the shared weights, and a sequence leaves as soon as it finishes or
//! its client is gone (its event channel closed). Tokens stream out through one
//! channel per request as they are produced.
//!
//! Each step runs at most one piece of prefill (`prefill_chunk` prompt tokens:
//! the next piece of the oldest prompt still prefilling, or the first piece of
//! one new request), then advances every running sequence by one token in one
//! batched forward, so a long prompt delays the others by one piece at a time.
//! With no sequence decoding, a prompt is prefilled whole (pieces cost more).
//! A panic inside a step fails every sequence in flight with `Unavailable` (503)
//! and reloads the model (backing off when crashes repeat); the queue behind it
//! is served by the new one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::inference::{CausalLm, ChatTokenizer, ModelError, Sampler, SamplingParams};

pub type LmFactory = Box<dyn Fn() -> Result<Box<dyn CausalLm>, ModelError> + Send>;

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// Sequences decoding together.
    pub max_active: usize,
    /// Requests waiting beyond this are refused as overloaded.
    pub queue_capacity: usize,
    /// Longest piece of a prompt prefilled in one step (0: the whole prompt at
    /// once). Between pieces the running sequences decode a token, so a long
    /// prompt stalls them for one piece at a time instead of all of it.
    pub prefill_chunk: usize,
    /// Bytes of KV cache kept from finished sequences, so that a prompt that
    /// begins with one of them (the next turn of a conversation, the same
    /// system prompt) prefills only what follows (0: off).
    pub prompt_cache_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// max_tokens or the context was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// New text (may be empty while a multi-byte character or a possible stop
    /// string is held back).
    Token { text: String },
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        first_token_ms: f64,
        /// Prompt tokens whose KV came from the prompt cache (not prefilled).
        cached_tokens: usize,
    },
    /// The request failed: `Invalid`/`TooLong` (the client's), else `Unavailable`.
    Error(ModelError),
}

pub struct GenerateRequest {
    pub prompt_tokens: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub events: UnboundedSender<GenEvent>,
    /// Whose prompt cache it may use and add to (the user): a prefix cached
    /// for one scope is never reused for another, whose time to first token
    /// would tell that someone else sent that prompt. `None`: no cache.
    pub cache_scope: Option<uuid::Uuid>,
}

#[derive(Debug, Default)]
pub struct GenStats {
    pub active: AtomicU64,
    pub queued: AtomicU64,
    pub steps: AtomicU64,
    pub tokens: AtomicU64,
    pub restarts: AtomicU64,
    pub cancelled: AtomicU64,
    /// Sequences in the last batched decode.
    pub last_batch: AtomicU64,
    /// The last crash or failed reload, with its time (for /admin/actors).
    pub last_error: crate::supervision::LastError,
    /// The thread has ended (its model could not be reloaded).
    pub stopped: AtomicBool,
}

/// The text of a caught panic.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Where a worker's requests go.
#[derive(Clone)]
enum Backend {
    /// The in-process model thread.
    Local(SyncSender<(GenerateRequest, Instant)>),
    /// An inference server (an adapter of `RemoteGenerate`).
    Remote(Arc<dyn RemoteGenerate>),
}

/// A generation server elsewhere (OpenAI-compatible: llama.cpp's llama-server,
/// vLLM, TGI), behind the same submit/events contract as the local thread: the
/// request's events carry its tokens and a `Done` with the server's token counts;
/// a closed event channel (the client left) aborts the remote request.
pub trait RemoteGenerate: Send + Sync + 'static {
    /// Starts a request; `Overloaded`/`Unavailable` when it cannot start now.
    fn submit(&self, req: GenerateRequest) -> Result<(), ModelError>;
}

#[derive(Clone)]
pub struct GenerateWorker {
    backend: Backend,
    tokenizer: Arc<dyn ChatTokenizer>,
    context_len: usize,
    pub stats: Arc<GenStats>,
    crash_next: Arc<AtomicBool>,
}

impl GenerateWorker {
    pub fn start(
        factory: LmFactory,
        tokenizer: Arc<dyn ChatTokenizer>,
        config: GenerateConfig,
    ) -> Result<Self, ModelError> {
        let model = factory()?;
        let context_len = model.context_len();
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity.max(1));
        let stats = Arc::new(GenStats::default());
        let crash_next = Arc::new(AtomicBool::new(false));
        let (s, c, t) = (stats.clone(), crash_next.clone(), tokenizer.clone());
        std::thread::Builder::new()
            .name("generate-worker".into())
            .spawn(move || run(model, factory, t, rx, config, s, c))
            .map_err(|e| ModelError::Internal(format!("cannot start the generation thread: {e}")))?;
        Ok(GenerateWorker {
            backend: Backend::Local(tx),
            tokenizer,
            context_len,
            stats,
            crash_next,
        })
    }

    /// A worker whose requests go to an inference server; `context_len` is the
    /// server model's context, `tokenizer` the same model's (prompts are sent as
    /// token ids, so both sides count alike); `stats`, those the client keeps.
    pub fn remote(
        remote: Arc<dyn RemoteGenerate>,
        stats: Arc<GenStats>,
        tokenizer: Arc<dyn ChatTokenizer>,
        context_len: usize,
    ) -> Self {
        GenerateWorker {
            backend: Backend::Remote(remote),
            tokenizer,
            context_len,
            stats,
            crash_next: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether requests go to an inference server.
    pub fn is_remote(&self) -> bool {
        matches!(self.backend, Backend::Remote(_))
    }

    pub fn tokenizer(&self) -> &Arc<dyn ChatTokenizer> {
        &self.tokenizer
    }

    pub fn context_len(&self) -> usize {
        self.context_len
    }

    /// Queues a request. A prompt that leaves no room in the context is refused
    /// here (`TooLong`, a 4xx); a full queue is `Overloaded` (a 503).
    pub fn submit(&self, mut req: GenerateRequest) -> Result<(), ModelError> {
        let n = req.prompt_tokens.len();
        if n == 0 {
            return Err(ModelError::Invalid("the prompt is empty".into()));
        }
        if n >= self.context_len {
            return Err(ModelError::TooLong(format!(
                "the prompt is {n} tokens but the model's context holds {}: shorten the conversation",
                self.context_len
            )));
        }
        req.max_tokens = req.max_tokens.clamp(1, self.context_len - n);
        let tx = match &self.backend {
            Backend::Local(tx) => tx,
            Backend::Remote(remote) => return remote.submit(req),
        };
        match tx.try_send((req, Instant::now())) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(ModelError::Overloaded("generation worker overloaded".into())),
            Err(TrySendError::Disconnected(_)) => Err(ModelError::Unavailable("generation worker stopped".into())),
        }
    }

    /// Fault injection: the next step panics inside the worker (supervision tests).
    pub fn inject_panic(&self) {
        self.crash_next.store(true, Ordering::SeqCst);
    }
}

struct Seq {
    model: Box<dyn CausalLm>,
    sampler: Sampler,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Prompt tokens already fed to the model (below `prompt_len`: prefilling).
    prefilled: usize,
    /// Logits waiting to be sampled (after prefill or the last forward).
    logits: Option<Vec<f32>>,
    max_tokens: usize,
    stop: Vec<String>,
    /// Bytes of decoded completion already sent.
    sent: usize,
    events: UnboundedSender<GenEvent>,
    queued_at: Instant,
    first_token_ms: Option<f64>,
    /// The batched forward failed for it (already told).
    failed: bool,
    /// Prompt tokens taken from the prompt cache.
    cached: usize,
    cache_scope: Option<uuid::Uuid>,
}

impl Seq {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    fn prefilling(&self) -> bool {
        self.prefilled < self.prompt_len
    }

    /// Feeds the next piece of the prompt; logits when the prompt is complete.
    fn prefill_step(&mut self, chunk: usize) -> Result<(), ModelError> {
        let end = if chunk == 0 {
            self.prompt_len
        } else {
            (self.prefilled + chunk).min(self.prompt_len)
        };
        let logits = self.model.forward(&self.tokens[self.prefilled..end], self.prefilled)?;
        self.prefilled = end;
        if !self.prefilling() {
            self.logits = Some(logits);
        }
        Ok(())
    }
}

/// What happened to a sequence in one step.
enum Outcome {
    Continue,
    Finished(FinishReason),
    Gone,
}

fn run(
    mut template: Box<dyn CausalLm>,
    factory: LmFactory,
    tokenizer: Arc<dyn ChatTokenizer>,
    rx: mpsc::Receiver<(GenerateRequest, Instant)>,
    config: GenerateConfig,
    stats: Arc<GenStats>,
    crash_next: Arc<AtomicBool>,
) {
    let mut active: Vec<Seq> = Vec::new();
    let mut cache = PromptCache::new(config.prompt_cache_bytes);
    let max_active = config.max_active.max(1);
    let mut policy = crate::supervision::RestartPolicy::default();
    loop {
        // Join: block when idle, otherwise take what is waiting (up to max_active).
        let mut incoming = Vec::new();
        if active.is_empty() {
            match rx.recv() {
                Ok(r) => incoming.push(r),
                Err(_) => return,
            }
        }
        // One piece of prefill per step: a long prompt must not hold back the
        // decoding of the running sequences. A prompt still prefilling goes first
        // (first come, first served); otherwise one new request joins.
        let prefilling = active
            .iter()
            .any(|s| s.prefilling() && !s.failed && !s.events.is_closed());
        while active.len() + incoming.len() < max_active && incoming.is_empty() && !prefilling {
            match rx.try_recv() {
                Ok(r) => incoming.push(r),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if active.is_empty() && incoming.is_empty() {
                        return;
                    }
                    break;
                }
            }
        }
        stats.queued.fetch_sub(incoming.len() as u64, Ordering::Relaxed);
        let step = catch_unwind(AssertUnwindSafe(|| {
            if crash_next.swap(false, Ordering::SeqCst) {
                #[allow(clippy::panic)]
                {
                    panic!("injected generation worker fault");
                }
            }
            for (req, queued_at) in incoming.drain(..) {
                metrics::histogram!("generate_queue_wait_seconds").record(queued_at.elapsed().as_secs_f64());
                if req.events.is_closed() {
                    stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let (model, cached) = match cache.take(req.cache_scope, &req.prompt_tokens) {
                    Some((model, len)) => (model, len),
                    None => (template.fork(), 0),
                };
                let mut seq = Seq {
                    model,
                    sampler: Sampler::new(req.params),
                    prompt_len: req.prompt_tokens.len(),
                    prefilled: cached,
                    tokens: req.prompt_tokens,
                    logits: None,
                    max_tokens: req.max_tokens,
                    stop: req.stop,
                    sent: 0,
                    events: req.events,
                    queued_at,
                    first_token_ms: None,
                    failed: false,
                    cached,
                    cache_scope: req.cache_scope,
                };
                // The first piece now; the rest one piece per step (below). With
                // nobody decoding there is no one to make way for: all at once.
                let chunk = if decoding(&active) { config.prefill_chunk } else { 0 };
                match seq.prefill_step(chunk) {
                    Ok(()) => active.push(seq),
                    Err(e) => {
                        let e = match e {
                            ModelError::Invalid(_) | ModelError::TooLong(_) => e,
                            other => ModelError::Unavailable(other.to_string()),
                        };
                        let _ = seq.events.send(GenEvent::Error(e));
                    }
                }
            }
            // Or one more piece of the oldest prompt still prefilling.
            if prefilling {
                let chunk = if decoding(&active) { config.prefill_chunk } else { 0 };
                if let Some(s) = active
                    .iter_mut()
                    .find(|s| s.prefilling() && !s.failed && !s.events.is_closed())
                {
                    if let Err(e) = s.prefill_step(chunk) {
                        let _ = s.events.send(GenEvent::Error(ModelError::Unavailable(e.to_string())));
                        s.failed = true;
                    }
                }
            }
            stats.steps.fetch_add(1, Ordering::Relaxed);
            // One batched forward for every running sequence that needs one.
            let (mut need, mut toks, mut poss): (Vec<&mut Box<dyn CausalLm>>, Vec<u32>, Vec<usize>) =
                (Vec::new(), Vec::new(), Vec::new());
            let mut idx = Vec::new();
            for (n, s) in active.iter_mut().enumerate() {
                if s.logits.is_none() && !s.prefilling() && !s.failed && !s.events.is_closed() {
                    let pos = s.tokens.len() - 1;
                    toks.push(s.tokens[pos]);
                    poss.push(pos);
                    idx.push(n);
                    need.push(&mut s.model);
                }
            }
            if !need.is_empty() {
                let batch = need.len() as u64;
                match template.decode_batch(&mut need, &toks, &poss) {
                    Ok(all) => {
                        drop(need);
                        stats.last_batch.store(batch, Ordering::Relaxed);
                        metrics::histogram!("generate_batch_size").record(batch as f64);
                        for (n, logits) in idx.into_iter().zip(all) {
                            active[n].logits = Some(logits);
                        }
                    }
                    Err(e) => {
                        drop(need);
                        for n in idx {
                            let _ = active[n]
                                .events
                                .send(GenEvent::Error(ModelError::Unavailable(e.to_string())));
                            active[n].failed = true;
                        }
                    }
                }
            }
            let mut i = 0;
            while i < active.len() {
                match advance(&mut active[i], tokenizer.as_ref(), &stats) {
                    Outcome::Continue => i += 1,
                    Outcome::Finished(reason) => {
                        let s = active.swap_remove(i);
                        let _ = s.events.send(GenEvent::Done {
                            finish_reason: reason,
                            prompt_tokens: s.prompt_len,
                            completion_tokens: s.generated().len(),
                            first_token_ms: s.first_token_ms.unwrap_or(0.0),
                            cached_tokens: s.cached,
                        });
                        // Every token but the last sampled one went through the model.
                        let fed = s.tokens.len() - 1;
                        if let Some(scope) = s.cache_scope {
                            cache.keep(scope, s.tokens[..fed].to_vec(), s.model);
                        }
                    }
                    Outcome::Gone => {
                        stats.cancelled.fetch_add(1, Ordering::Relaxed);
                        active.swap_remove(i);
                    }
                }
            }
            stats.active.store(active.len() as u64, Ordering::Relaxed);
        }));
        if let Err(payload) = &step {
            stats
                .last_error
                .note(format!("panicked: {}", panic_text(payload.as_ref())));
            tracing::error!(
                in_flight = active.len(),
                "generation worker panicked; failing its sequences and reloading the model"
            );
            for s in active.drain(..) {
                let _ = s.events.send(GenEvent::Error(ModelError::Unavailable(
                    "generation worker crashed; retry".into(),
                )));
            }
            for (req, _) in incoming.drain(..) {
                let _ = req.events.send(GenEvent::Error(ModelError::Unavailable(
                    "generation worker crashed; retry".into(),
                )));
            }
            stats.active.store(0, Ordering::Relaxed);
            stats.restarts.fetch_add(1, Ordering::Relaxed);
            cache = PromptCache::new(config.prompt_cache_bytes);
            // Waits first when crashes come in a row (the queue waits meanwhile).
            policy.restart_blocking("generate-worker");
            match factory() {
                Ok(m) => template = m,
                Err(e) => {
                    tracing::error!(error = %e, "model reload failed; generation worker stops");
                    stats.last_error.note(format!("model reload failed: {e}"));
                    stats.stopped.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

/// KV caches of finished sequences, kept within a byte budget (least recently
/// used dropped first). A new prompt starting with one of them (at least
/// `MIN_REUSE` tokens in common, and not all of it: the last prompt token must
/// be fed to get logits) starts from a copy of that prefix.
struct PromptCache {
    budget: usize,
    used: usize,
    clock: u64,
    entries: Vec<Cached>,
}

struct Cached {
    scope: uuid::Uuid,
    tokens: Vec<u32>,
    model: Box<dyn CausalLm>,
    bytes: usize,
    used_at: u64,
}

/// Fewer tokens in common than this are prefilled again (not worth a copy).
const MIN_REUSE: usize = 16;

impl PromptCache {
    fn new(budget: usize) -> Self {
        PromptCache {
            budget,
            used: 0,
            clock: 0,
            entries: Vec::new(),
        }
    }

    /// A sequence holding the longest prefix of `prompt` cached in `scope`, and its length.
    fn take(&mut self, scope: Option<uuid::Uuid>, prompt: &[u32]) -> Option<(Box<dyn CausalLm>, usize)> {
        let scope = scope?;
        let common = |t: &[u32]| t.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let (i, len) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.scope == scope)
            .map(|(i, e)| (i, common(&e.tokens).min(prompt.len().saturating_sub(1))))
            .max_by_key(|&(_, len)| len)?;
        if len < MIN_REUSE {
            return None;
        }
        self.clock += 1;
        let e = &mut self.entries[i];
        e.used_at = self.clock;
        let model = e.model.fork_prefix(len)?;
        metrics::counter!("generate_prompt_cache_tokens_total").increment(len as u64);
        Some((model, len))
    }

    /// Keeps a finished sequence whose KV holds `tokens`; entries it extends
    /// (the same conversation's earlier turn) go, then the least recently used
    /// while over the budget.
    fn keep(&mut self, scope: uuid::Uuid, tokens: Vec<u32>, model: Box<dyn CausalLm>) {
        let Some(bytes) = model.kv_bytes() else { return };
        if self.budget == 0 || bytes > self.budget || tokens.len() < MIN_REUSE {
            return;
        }
        self.entries.retain(|e| {
            let extended = e.scope == scope && e.tokens.len() <= tokens.len() && tokens.starts_with(&e.tokens);
            if extended {
                self.used -= e.bytes;
            }
            !extended
        });
        self.clock += 1;
        self.used += bytes;
        self.entries.push(Cached {
            scope,
            tokens,
            model,
            bytes,
            used_at: self.clock,
        });
        while self.used > self.budget {
            let Some((oldest, _)) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.used_at) else {
                break;
            };
            let e = self.entries.swap_remove(oldest);
            self.used -= e.bytes;
        }
        metrics::gauge!("generate_prompt_cache_bytes").set(self.used as f64);
    }
}

/// Whether any sequence is decoding (and would wait for a prefill).
fn decoding(active: &[Seq]) -> bool {
    active
        .iter()
        .any(|s| !s.prefilling() && !s.failed && !s.events.is_closed())
}

/// Samples one token for a sequence, streams its text, and runs the next forward.
fn advance(s: &mut Seq, tok: &dyn ChatTokenizer, stats: &GenStats) -> Outcome {
    if s.events.is_closed() || s.failed {
        return Outcome::Gone;
    }
    if s.prefilling() {
        return Outcome::Continue;
    }
    let Some(mut logits) = s.logits.take() else {
        return Outcome::Gone;
    };
    let generated = s.tokens.len() - s.prompt_len;
    let token = s.sampler.sample(&mut logits, &s.tokens, generated);
    stats.tokens.fetch_add(1, Ordering::Relaxed);
    if s.first_token_ms.is_none() {
        s.first_token_ms = Some(s.queued_at.elapsed().as_secs_f64() * 1000.0);
    }
    if tok.stop_tokens().contains(&token) {
        flush_text(s, tok, None);
        return Outcome::Finished(FinishReason::Stop);
    }
    s.tokens.push(token);
    let text = match tok.decode(s.generated()) {
        Ok(t) => t,
        Err(e) => {
            let _ = s.events.send(GenEvent::Error(ModelError::Unavailable(e.to_string())));
            return Outcome::Gone;
        }
    };
    if let Some(at) = s
        .stop
        .iter()
        .filter(|x| !x.is_empty())
        .filter_map(|x| text.find(x.as_str()))
        .min()
    {
        flush_text(s, tok, Some(at));
        return Outcome::Finished(FinishReason::Stop);
    }
    // Hold back an incomplete character and anything that could begin a stop string.
    let hold = s.stop.iter().map(|x| x.len().saturating_sub(1)).max().unwrap_or(0);
    let mut safe = text.len().saturating_sub(hold);
    if text.ends_with('\u{FFFD}') {
        safe = safe.min(text.len() - '\u{FFFD}'.len_utf8());
    }
    while safe > s.sent && !text.is_char_boundary(safe) {
        safe -= 1;
    }
    if safe > s.sent {
        let piece = text[s.sent..safe].to_string();
        s.sent = safe;
        if s.events.send(GenEvent::Token { text: piece }).is_err() {
            return Outcome::Gone;
        }
    }
    if s.generated().len() >= s.max_tokens || s.tokens.len() >= s.model.context_len() {
        flush_text(s, tok, None);
        return Outcome::Finished(FinishReason::Length);
    }
    Outcome::Continue
}

/// Sends what was held back, up to `end` bytes of the completion when a stop
/// string was found.
fn flush_text(s: &mut Seq, tok: &dyn ChatTokenizer, end: Option<usize>) {
    let Ok(text) = tok.decode(s.generated()) else {
        return;
    };
    let mut end = end.unwrap_or(text.len()).min(text.len());
    while end > s.sent && !text.is_char_boundary(end) {
        end -= 1;
    }
    if end > s.sent {
        let _ = s.events.send(GenEvent::Token {
            text: text[s.sent..end].to_string(),
        });
        s.sent = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::unbounded_channel;

    /// A fake model over a 4-token vocabulary that always predicts (last + 1) % 4;
    /// token 3 is the end of turn.
    #[derive(Clone)]
    struct Counter {
        ctx: usize,
    }
    impl CausalLm for Counter {
        fn forward(&mut self, tokens: &[u32], _pos: usize) -> Result<Vec<f32>, ModelError> {
            let last = *tokens.last().unwrap_or(&0);
            let mut l = vec![0.0; 4];
            l[((last + 1) % 4) as usize] = 10.0;
            Ok(l)
        }
        fn fork(&self) -> Box<dyn CausalLm> {
            Box::new(self.clone())
        }
        fn context_len(&self) -> usize {
            self.ctx
        }
    }
    /// A fake model with a real cache: it keeps every token fed (truncated at
    /// `pos`, as a KV cache is) and predicts from all of them, so an answer
    /// depends on the whole prompt; `fed` counts the tokens it was fed.
    struct Recorder {
        seen: Vec<u32>,
        fed: Arc<AtomicU64>,
    }
    impl CausalLm for Recorder {
        fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
            if self.seen.len() < pos {
                return Err(ModelError::Internal(format!(
                    "{} cached, fed at {pos}",
                    self.seen.len()
                )));
            }
            self.seen.truncate(pos);
            self.seen.extend_from_slice(tokens);
            self.fed.fetch_add(tokens.len() as u64, Ordering::Relaxed);
            let sum: u32 = self.seen.iter().enumerate().map(|(i, &t)| t * (i as u32 % 5 + 1)).sum();
            let mut l = vec![0.0; 4];
            l[(sum % 3) as usize] = 10.0;
            Ok(l)
        }
        fn fork(&self) -> Box<dyn CausalLm> {
            Box::new(Recorder {
                seen: Vec::new(),
                fed: self.fed.clone(),
            })
        }
        fn context_len(&self) -> usize {
            1024
        }
        fn kv_bytes(&self) -> Option<usize> {
            Some(self.seen.len() * 4)
        }
        fn fork_prefix(&self, len: usize) -> Option<Box<dyn CausalLm>> {
            (len <= self.seen.len()).then(|| {
                Box::new(Recorder {
                    seen: self.seen[..len].to_vec(),
                    fed: self.fed.clone(),
                }) as Box<dyn CausalLm>
            })
        }
    }

    fn recorder(cache_bytes: usize) -> (GenerateWorker, Arc<AtomicU64>) {
        let fed = Arc::new(AtomicU64::new(0));
        let f = fed.clone();
        let w = GenerateWorker::start(
            Box::new(move || {
                Ok(Box::new(Recorder {
                    seen: Vec::new(),
                    fed: f.clone(),
                }) as Box<dyn CausalLm>)
            }),
            Arc::new(Letters),
            GenerateConfig {
                max_active: 4,
                queue_capacity: 8,
                prefill_chunk: 0,
                prompt_cache_bytes: cache_bytes,
            },
        )
        .expect("start");
        (w, fed)
    }

    /// Runs a conversation of `turns` turns (each prompt: the last one, its
    /// answer, 20 new tokens); per turn the answer, cached tokens and tokens fed.
    async fn conversation(w: &GenerateWorker, fed: &AtomicU64, turns: usize) -> Vec<(String, usize, u64)> {
        let mut prompt: Vec<u32> = (0..40).map(|i| i % 3).collect();
        let mut out = Vec::new();
        for turn in 0..turns {
            let before = fed.load(Ordering::Relaxed);
            let (text, done) = collect(submit(w, prompt.clone(), 8, vec![])).await;
            let Some(GenEvent::Done {
                cached_tokens,
                completion_tokens: 8,
                ..
            }) = done
            else {
                panic!("turn {turn}: {done:?}");
            };
            out.push((text.clone(), cached_tokens, fed.load(Ordering::Relaxed) - before));
            prompt.extend(Letters.encode(&text).expect("encode"));
            prompt.extend((0..20).map(|i| (i + turn as u32) % 3));
        }
        out
    }

    #[tokio::test]
    async fn a_next_turn_prefills_only_what_follows_the_cached_prefix_and_answers_the_same() {
        let (w, fed) = recorder(1 << 20);
        let cached = conversation(&w, &fed, 5).await;
        let (w, fed) = recorder(0);
        let plain = conversation(&w, &fed, 5).await;
        for (turn, (c, p)) in cached.iter().zip(&plain).enumerate() {
            assert_eq!(c.0, p.0, "turn {turn}: the same greedy answer");
            assert_eq!(p.1, 0);
            if turn == 0 {
                assert_eq!(c.1, 0);
                continue;
            }
            // The previous prompt and its answer but the last token were cached:
            // fed are that token, the 20 new ones and the 7 decode steps.
            let prompt_len = 40 + turn * 28;
            assert_eq!(c.1, prompt_len - 21, "turn {turn}");
            assert_eq!(c.2, 21 + 7, "turn {turn}");
            assert_eq!(p.2 as usize, prompt_len + 7, "turn {turn}");
        }
    }

    #[tokio::test]
    async fn a_prefix_cached_for_one_user_is_not_reused_for_another() {
        let (w, _) = recorder(1 << 20);
        let prompt: Vec<u32> = (0..40).map(|i| i % 3).collect();
        let (alice, bob) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        for (scope, want) in [
            (Some(alice), 0),
            (Some(bob), 0),
            (Some(alice), 39),
            (None, 0),
            (Some(bob), 39),
        ] {
            let (tx, rx) = unbounded_channel();
            w.submit(GenerateRequest {
                prompt_tokens: prompt.clone(),
                params: greedy(),
                max_tokens: 8,
                stop: vec![],
                events: tx,
                cache_scope: scope,
            })
            .expect("submit");
            let (_, done) = collect(rx).await;
            let Some(GenEvent::Done { cached_tokens, .. }) = done else {
                panic!("{done:?}")
            };
            assert_eq!(cached_tokens, want, "{scope:?}");
        }
    }

    #[tokio::test]
    async fn the_prompt_cache_keeps_to_its_budget_least_recently_used_first() {
        // Room for one finished sequence of 48 tokens (4 bytes each), not two.
        let (w, fed) = recorder(300);
        let a: Vec<u32> = (0..40).map(|i| i % 3).collect();
        let b: Vec<u32> = (0..40).map(|i| (i + 1) % 3).collect();
        for (prompt, want) in [(&a, 0), (&a, 39), (&b, 0), (&a, 0)] {
            let (_, done) = collect(submit(&w, prompt.clone(), 8, vec![])).await;
            let Some(GenEvent::Done { cached_tokens, .. }) = done else {
                panic!("{done:?}")
            };
            assert_eq!(cached_tokens, want);
        }
        assert!(fed.load(Ordering::Relaxed) > 0);
    }

    struct Letters;
    impl ChatTokenizer for Letters {
        fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
            Ok(text.bytes().map(|b| u32::from(b - b'a')).collect())
        }
        fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
            Ok(ids.iter().map(|&i| (b'a' + i as u8) as char).collect())
        }
        fn stop_tokens(&self) -> &[u32] {
            &[3]
        }
    }

    fn worker(ctx: usize) -> GenerateWorker {
        GenerateWorker::start(
            Box::new(move || Ok(Box::new(Counter { ctx }) as Box<dyn CausalLm>)),
            Arc::new(Letters),
            GenerateConfig {
                max_active: 4,
                queue_capacity: 8,
                prefill_chunk: 2,
                prompt_cache_bytes: 1 << 20,
            },
        )
        .expect("start")
    }

    /// Queues a greedy request and returns its event stream.
    fn submit(
        w: &GenerateWorker,
        prompt: Vec<u32>,
        max_tokens: usize,
        stop: Vec<String>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<GenEvent> {
        let (tx, rx) = unbounded_channel();
        w.submit(GenerateRequest {
            prompt_tokens: prompt,
            params: greedy(),
            max_tokens,
            stop,
            events: tx,
            cache_scope: Some(uuid::Uuid::nil()),
        })
        .expect("submit");
        rx
    }

    fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: Some(1),
            ..SamplingParams::default()
        }
    }

    async fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>) -> (String, Option<GenEvent>) {
        let mut text = String::new();
        while let Some(e) = rx.recv().await {
            match e {
                GenEvent::Token { text: t } => text.push_str(&t),
                other => return (text, Some(other)),
            }
        }
        (text, None)
    }

    #[tokio::test]
    async fn tokens_stream_until_the_end_of_turn_token() {
        let w = worker(64);
        let rx = submit(&w, vec![0], 50, vec![]);
        let (text, done) = collect(rx).await;
        assert_eq!(text, "bc", "a → b → c → end of turn");
        assert!(
            matches!(
                done,
                Some(GenEvent::Done {
                    finish_reason: FinishReason::Stop,
                    completion_tokens: 2,
                    prompt_tokens: 1,
                    ..
                })
            ),
            "{done:?}"
        );
    }

    #[tokio::test]
    async fn max_tokens_stop_strings_and_context_limits_hold() {
        let w = worker(64);
        let rx = submit(&w, vec![3], 2, vec![]);
        let (text, done) = collect(rx).await;
        assert_eq!(text, "ab");
        assert!(matches!(
            done,
            Some(GenEvent::Done {
                finish_reason: FinishReason::Length,
                ..
            })
        ));

        let rx = submit(&w, vec![3], 50, vec!["bc".into()]);
        let (text, done) = collect(rx).await;
        assert_eq!(text, "a", "text stops before the stop string");
        assert!(matches!(
            done,
            Some(GenEvent::Done {
                finish_reason: FinishReason::Stop,
                ..
            })
        ));

        let (tx, _rx) = unbounded_channel();
        let too_long = w.submit(GenerateRequest {
            prompt_tokens: vec![0; 64],
            params: greedy(),
            max_tokens: 5,
            stop: vec![],
            events: tx,
            cache_scope: None,
        });
        assert!(matches!(too_long, Err(ModelError::TooLong(_))));
    }

    #[tokio::test]
    async fn long_prompts_are_prefilled_in_pieces_while_others_decode() {
        // Pieces of 2 tokens: a 9-token prompt takes 5 steps of prefill.
        let w = worker(64);
        let short = submit(&w, vec![0], 50, vec![]);
        let long = submit(&w, vec![1, 2, 0, 1, 2, 0, 1, 2, 0], 50, vec![]);
        let (a, b) = tokio::join!(collect(short), collect(long));
        assert_eq!(a.0, "bc");
        assert_eq!(b.0, "bc", "the whole prompt was fed: the last token decides");
        assert!(
            matches!(
                b.1,
                Some(GenEvent::Done {
                    prompt_tokens: 9,
                    completion_tokens: 2,
                    ..
                })
            ),
            "{b:?}"
        );
        assert!(w.stats.steps.load(Ordering::Relaxed) >= 5);
    }

    #[tokio::test]
    async fn a_panic_fails_the_sequences_in_flight_and_the_worker_recovers() {
        let w = worker(64);
        w.inject_panic();
        let rx = submit(&w, vec![0], 5, vec![]);
        let (_, end) = collect(rx).await;
        assert!(
            matches!(end, Some(GenEvent::Error(ModelError::Unavailable(_)))),
            "{end:?}"
        );
        let rx = submit(&w, vec![0], 5, vec![]);
        assert_eq!(collect(rx).await.0, "bc");
        assert_eq!(w.stats.restarts.load(Ordering::Relaxed), 1);
    }
}
