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
                let mut seq = Seq {
                    model: template.fork(),
                    sampler: Sampler::new(req.params),
                    prompt_len: req.prompt_tokens.len(),
                    prefilled: 0,
                    tokens: req.prompt_tokens,
                    logits: None,
                    max_tokens: req.max_tokens,
                    stop: req.stop,
                    sent: 0,
                    events: req.events,
                    queued_at,
                    first_token_ms: None,
                    failed: false,
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
                        });
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
    let token = s.sampler.sample(&mut logits, &s.tokens);
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
