//! EmbedWorker: one model on a dedicated thread, fed by two bounded lanes.
//!
//! - The **interactive** lane holds requests someone is waiting on now (query
//!   vectors of search and chat, a short `/v1/embeddings` input). Requests waiting
//!   there are batched dynamically — up to `max_batch` texts or `max_wait` after
//!   the first arrived — sorted by token length to limit padding, one forward per
//!   batch. A full interactive lane answers "overloaded" at once.
//! - The **bulk** lane holds ingestion and seeding: each job is embedded
//!   `max_batch` texts at a time (texts ordered by length, so a forward pads
//!   little; bulk jobs take turns, a forward each), and before every forward the
//!   worker takes the interactive lane first. An interactive request therefore waits for at most one bulk forward,
//!   the one in flight. The bulk lane holds at most `bulk_capacity` jobs (being
//!   embedded or waiting); a caller finding it full waits for a place up to
//!   `bulk_wait` (backpressure: an upload takes longer rather than failing), then
//!   is answered "overloaded".
//!
//! With `lanes` off every request waits in one FIFO queue and a job runs whole
//! once started (the behaviour before lanes; the benchmark's baseline).
//!
//! A caller that went away is skipped before it costs a forward (a bulk job is
//! dropped at its next batch). A panic in the model fails the batch in flight —
//! the interactive requests of that forward, or the bulk job — with a 503 and the
//! model is loaded afresh (counted in `restarts`).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::inference::{Embedder, ModelError};

pub type EmbedderFactory = Box<dyn Fn() -> Result<Box<dyn Embedder>, ModelError> + Send>;

#[derive(Debug, Clone)]
pub struct EmbedConfig {
    /// Texts per forward (a bulk job is cut into forwards of this many).
    pub max_batch: usize,
    /// How long the first interactive request of a batch waits for company.
    pub max_wait: Duration,
    /// Interactive requests waiting beyond this are refused as overloaded.
    pub queue_capacity: usize,
    /// Bulk jobs in the bulk lane (being embedded or waiting) at most.
    pub bulk_capacity: usize,
    /// How long a bulk caller waits for a place in a full bulk lane before it is
    /// refused as overloaded.
    pub bulk_wait: Duration,
    /// Two lanes (interactive first); false: one FIFO queue, jobs run whole.
    pub lanes: bool,
}

/// Which lane a request waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Someone waits for the answer now: query vectors, a short single input.
    Interactive,
    /// Ingestion, seeding, many inputs at once: embedded a batch at a time behind
    /// interactive work.
    Bulk,
}

impl Lane {
    /// The lane of a `/v1/embeddings` request: a single input of at most
    /// `interactive_max_chars` characters is interactive (one short forward),
    /// anything more is bulk.
    pub fn for_inputs(texts: &[String], interactive_max_chars: usize) -> Lane {
        match texts {
            [one] if one.chars().count() <= interactive_max_chars => Lane::Interactive,
            _ => Lane::Bulk,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens consumed (after truncation), for usage accounting.
    pub tokens: usize,
}

type Reply = oneshot::Sender<Result<Embeddings, ModelError>>;

/// An interactive request (or, with lanes off, any request).
struct Job {
    texts: Vec<String>,
    reply: Reply,
}

/// A bulk job: embedded `max_batch` texts per step, in `order`.
struct BulkJob {
    texts: Vec<String>,
    /// Indices of `texts`, shortest first (by characters: a proxy for tokens
    /// that costs no tokenization), so each forward pads little.
    order: Vec<usize>,
    /// How much of `order` is embedded.
    done: usize,
    vectors: Vec<Vec<f32>>,
    tokens: usize,
    reply: Reply,
    /// Its place in the bulk lane, given back when the job ends.
    _place: OwnedSemaphorePermit,
}

impl BulkJob {
    fn new(texts: Vec<String>, reply: Reply, place: OwnedSemaphorePermit) -> Self {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        BulkJob {
            vectors: vec![Vec::new(); texts.len()],
            texts,
            order,
            done: 0,
            tokens: 0,
            reply,
            _place: place,
        }
    }
}

#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Forwards run, and texts embedded by them.
    pub batches: AtomicU64,
    pub items: AtomicU64,
    pub restarts: AtomicU64,
    /// Requests waiting in the interactive lane (with lanes off: in the one queue).
    pub queued_interactive: AtomicU64,
    /// Jobs in the bulk lane: being embedded or waiting.
    pub queued_bulk: AtomicU64,
    /// Bulk callers waiting for a place because the bulk lane is full.
    pub bulk_waiting: AtomicU64,
    /// Texts of bulk jobs not yet embedded.
    pub bulk_pending_texts: AtomicU64,
    pub last_batch_size: AtomicU64,
    /// The last crash or failed reload, with its time (for /admin/actors).
    pub last_error: crate::supervision::LastError,
    /// The thread has ended (its model could not be reloaded).
    pub stopped: AtomicBool,
}

impl WorkerStats {
    /// Requests in both lanes (the worker's mailbox depth).
    pub fn queued(&self) -> u64 {
        self.queued_interactive.load(Ordering::Relaxed) + self.queued_bulk.load(Ordering::Relaxed)
    }
}

/// What the callers and the thread share: both lanes under one lock.
struct Lanes {
    interactive: VecDeque<Job>,
    bulk: VecDeque<BulkJob>,
    /// Every handle is gone: the thread ends.
    closed: bool,
    /// The thread has ended: requests are refused.
    stopped: bool,
}

struct Shared {
    lanes: Mutex<Lanes>,
    /// Signalled when a request arrives or the last handle goes.
    wake: Condvar,
    /// Places in the bulk lane.
    bulk_places: Arc<Semaphore>,
}

impl Shared {
    /// The lanes; a poisoned lock is taken over (nothing panics while holding
    /// it, and the queues stay consistent whatever happened).
    fn lock(&self) -> MutexGuard<'_, Lanes> {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Closes the lanes when the last clone of the worker is dropped.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_all();
    }
}

/// Counts a bulk caller waiting for a place, until it has one or gives up.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Waiting(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone)]
pub struct EmbedWorker {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
    config: Arc<EmbedConfig>,
    dimensions: usize,
    pub stats: Arc<WorkerStats>,
    crash_next: Arc<AtomicBool>,
}

impl EmbedWorker {
    /// Loads the model (through `factory`, used again on restart) and starts the thread.
    pub fn start(factory: EmbedderFactory, mut config: EmbedConfig) -> Result<Self, ModelError> {
        config.max_batch = config.max_batch.max(1);
        config.queue_capacity = config.queue_capacity.max(1);
        config.bulk_capacity = config.bulk_capacity.max(1);
        let model = factory()?;
        let dimensions = model.dimensions();
        let shared = Arc::new(Shared {
            lanes: Mutex::new(Lanes {
                interactive: VecDeque::new(),
                bulk: VecDeque::new(),
                closed: false,
                stopped: false,
            }),
            wake: Condvar::new(),
            bulk_places: Arc::new(Semaphore::new(config.bulk_capacity)),
        });
        let stats = Arc::new(WorkerStats::default());
        let crash_next = Arc::new(AtomicBool::new(false));
        let config = Arc::new(config);
        let thread = Thread {
            model,
            factory,
            shared: shared.clone(),
            config: config.clone(),
            stats: stats.clone(),
            crash_next: crash_next.clone(),
            policy: crate::supervision::RestartPolicy::default(),
        };
        std::thread::Builder::new()
            .name("embed-worker".into())
            .spawn(move || thread.run())
            .map_err(|e| ModelError::Internal(format!("cannot start the embedding thread: {e}")))?;
        Ok(EmbedWorker {
            _closer: Arc::new(Closer(shared.clone())),
            shared,
            config,
            dimensions,
            stats,
            crash_next,
        })
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Whether interactive work goes ahead of bulk work (`models.embed_lanes`).
    pub fn lanes_enabled(&self) -> bool {
        self.config.lanes
    }

    /// Embeds `texts` in `lane`; the vectors come back in the order of `texts`.
    pub async fn embed(&self, lane: Lane, texts: Vec<String>) -> Result<Embeddings, ModelError> {
        if texts.is_empty() {
            return Ok(Embeddings {
                vectors: Vec::new(),
                tokens: 0,
            });
        }
        let (reply, rx) = oneshot::channel();
        if lane == Lane::Bulk && self.config.lanes {
            let place = self.bulk_place().await?;
            let job = BulkJob::new(texts, reply, place);
            let mut lanes = self.shared.lock();
            if lanes.stopped {
                return Err(ModelError::Unavailable("embedding worker stopped".into()));
            }
            self.stats.queued_bulk.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bulk_pending_texts
                .fetch_add(job.texts.len() as u64, Ordering::Relaxed);
            lanes.bulk.push_back(job);
        } else {
            let mut lanes = self.shared.lock();
            if lanes.stopped {
                return Err(ModelError::Unavailable("embedding worker stopped".into()));
            }
            if lanes.interactive.len() >= self.config.queue_capacity {
                return Err(ModelError::Overloaded("embedding worker overloaded".into()));
            }
            self.stats.queued_interactive.fetch_add(1, Ordering::Relaxed);
            lanes.interactive.push_back(Job { texts, reply });
        }
        self.shared.wake.notify_one();
        rx.await
            .unwrap_or_else(|_| Err(ModelError::Unavailable("embedding worker restarted; retry".into())))
    }

    /// A place in the bulk lane: at once when there is one, else after waiting
    /// (first come, first served) up to `bulk_wait`.
    async fn bulk_place(&self) -> Result<OwnedSemaphorePermit, ModelError> {
        let places = self.shared.bulk_places.clone();
        if let Ok(place) = places.clone().try_acquire_owned() {
            return Ok(place);
        }
        let _waiting = Waiting::new(&self.stats.bulk_waiting);
        match tokio::time::timeout(self.config.bulk_wait, places.acquire_owned()).await {
            Ok(Ok(place)) => Ok(place),
            Ok(Err(_)) => Err(ModelError::Unavailable("embedding worker stopped".into())),
            Err(_) => Err(ModelError::Overloaded(format!(
                "the embedding worker's bulk lane is full ({} jobs); waited {} ms for a place",
                self.config.bulk_capacity,
                self.config.bulk_wait.as_millis()
            ))),
        }
    }

    /// Fault injection: the next batch panics inside the worker (tests of supervision).
    pub fn inject_panic(&self) {
        self.crash_next.store(true, Ordering::SeqCst);
    }
}

/// What the thread does next.
enum Work {
    /// Interactive requests batched together (with lanes off: any requests).
    Requests(Vec<Job>),
    /// One forward of this bulk job (then it goes to the back of the lane).
    Bulk(BulkJob),
}

/// The worker thread's state.
struct Thread {
    model: Box<dyn Embedder>,
    factory: EmbedderFactory,
    shared: Arc<Shared>,
    config: Arc<EmbedConfig>,
    stats: Arc<WorkerStats>,
    crash_next: Arc<AtomicBool>,
    policy: crate::supervision::RestartPolicy,
}

impl Thread {
    fn run(mut self) {
        while let Some(work) = self.next_work() {
            let alive = match work {
                Work::Requests(jobs) => self.embed_requests(jobs),
                Work::Bulk(job) => self.bulk_step(job),
            };
            if !alive {
                break;
            }
        }
        // Ended (every handle gone, or the model cannot be reloaded): whoever is
        // still queued is answered "restarted; retry" as their replies drop.
        let mut lanes = self.shared.lock();
        lanes.stopped = true;
        lanes.interactive.clear();
        lanes.bulk.clear();
        drop(lanes);
        self.shared.bulk_places.close();
        self.stats.queued_interactive.store(0, Ordering::Relaxed);
        self.stats.queued_bulk.store(0, Ordering::Relaxed);
        self.stats.bulk_pending_texts.store(0, Ordering::Relaxed);
    }

    /// Waits for work: interactive requests first (with company for up to
    /// `max_wait`), then a forward of the bulk job whose turn it is.
    fn next_work(&mut self) -> Option<Work> {
        let max_batch = self.config.max_batch;
        let mut lanes = self.shared.lock();
        loop {
            if lanes.closed {
                return None;
            }
            if let Some(first) = lanes.interactive.pop_front() {
                let mut n = first.texts.len();
                let mut jobs = vec![first];
                let deadline = Instant::now() + self.config.max_wait;
                while n < max_batch {
                    if let Some(job) = lanes.interactive.pop_front() {
                        n += job.texts.len();
                        jobs.push(job);
                        continue;
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || lanes.closed {
                        break;
                    }
                    lanes = self
                        .shared
                        .wake
                        .wait_timeout(lanes, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                self.stats
                    .queued_interactive
                    .fetch_sub(jobs.len() as u64, Ordering::Relaxed);
                return Some(Work::Requests(jobs));
            }
            if let Some(job) = lanes.bulk.pop_front() {
                return Some(Work::Bulk(job));
            }
            lanes = self.shared.wake.wait(lanes).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Runs `step` on the model, catching a panic (and injecting one when asked).
    fn guarded<T>(&mut self, step: impl FnOnce(&mut dyn Embedder, &WorkerStats) -> T) -> std::thread::Result<T> {
        let (model, stats, crash_next) = (self.model.as_mut(), &*self.stats, &self.crash_next);
        catch_unwind(AssertUnwindSafe(|| {
            if crash_next.swap(false, Ordering::SeqCst) {
                #[allow(clippy::panic)]
                {
                    panic!("injected embedding worker fault");
                }
            }
            step(model, stats)
        }))
    }

    /// Embeds batched requests (each whole) and answers them. False: the thread ends.
    fn embed_requests(&mut self, mut jobs: Vec<Job>) -> bool {
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            return true;
        }
        let max_batch = self.config.max_batch;
        match self.guarded(|model, stats| embed_jobs(model, &jobs, max_batch, stats)) {
            Ok(Ok(per_job)) => {
                for (job, result) in jobs.into_iter().zip(per_job) {
                    let _ = job.reply.send(Ok(result));
                }
                true
            }
            Ok(Err(e)) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
                true
            }
            Err(payload) => {
                for job in jobs {
                    let _ = job.reply.send(Err(crashed()));
                }
                self.recover(payload.as_ref())
            }
        }
    }

    /// One forward of a bulk job, which then goes to the back of the lane (bulk
    /// jobs take turns, so a small upload is not stuck behind a large one);
    /// answers it when it is complete, fails it on an error, drops it when its
    /// caller went away. False: the thread ends.
    fn bulk_step(&mut self, mut job: BulkJob) -> bool {
        if job.reply.is_closed() {
            self.end_bulk(&job);
            return true;
        }
        let take = self.config.max_batch.min(job.order.len() - job.done);
        let picked: Vec<usize> = job.order[job.done..job.done + take].to_vec();
        let outcome = {
            let texts: Vec<&str> = picked.iter().map(|&i| job.texts[i].as_str()).collect();
            self.guarded(|model, stats| forward(model, &texts, stats))
        };
        match outcome {
            Ok(Ok((vectors, tokens))) => {
                for (&i, v) in picked.iter().zip(vectors) {
                    job.vectors[i] = v;
                }
                job.tokens += tokens;
                job.done += take;
                self.stats.bulk_pending_texts.fetch_sub(take as u64, Ordering::Relaxed);
                if job.done < job.order.len() {
                    self.shared.lock().bulk.push_back(job);
                } else {
                    self.end_bulk(&job);
                    let BulkJob {
                        vectors, tokens, reply, ..
                    } = job;
                    let _ = reply.send(Ok(Embeddings { vectors, tokens }));
                }
                true
            }
            Ok(Err(e)) => {
                self.end_bulk(&job);
                let _ = job.reply.send(Err(e));
                true
            }
            Err(payload) => {
                self.end_bulk(&job);
                let _ = job.reply.send(Err(crashed()));
                self.recover(payload.as_ref())
            }
        }
    }

    /// A bulk job leaves the lane (its place is given back as it drops).
    fn end_bulk(&self, job: &BulkJob) {
        self.stats.queued_bulk.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .bulk_pending_texts
            .fetch_sub((job.order.len() - job.done) as u64, Ordering::Relaxed);
    }

    /// After a panic: note it, wait as the restart policy says, load the model
    /// afresh. False when it cannot be loaded (the thread ends).
    fn recover(&mut self, payload: &(dyn std::any::Any + Send)) -> bool {
        self.stats
            .last_error
            .note(format!("panicked: {}", crate::generate_worker::panic_text(payload)));
        tracing::error!("embedding worker panicked; failing its batch and reloading the model");
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        self.policy.restart_blocking("embed-worker");
        match (self.factory)() {
            Ok(m) => {
                self.model = m;
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "embedding model reload failed; worker stops");
                self.stats.last_error.note(format!("model reload failed: {e}"));
                self.stats.stopped.store(true, Ordering::SeqCst);
                false
            }
        }
    }
}

fn crashed() -> ModelError {
    ModelError::Unavailable("embedding worker crashed; retry".into())
}

/// One forward: the texts' vectors (in their order) and the tokens they took.
fn forward(
    model: &mut dyn Embedder,
    texts: &[&str],
    stats: &WorkerStats,
) -> Result<(Vec<Vec<f32>>, usize), ModelError> {
    let mut tokens = 0;
    for t in texts {
        tokens += model.count_tokens(t)?;
    }
    let vectors = model.embed(texts)?;
    if vectors.len() != texts.len() {
        return Err(ModelError::Internal(format!(
            "{} vectors for {} texts",
            vectors.len(),
            texts.len()
        )));
    }
    record_forward(stats, texts.len());
    Ok((vectors, tokens))
}

fn record_forward(stats: &WorkerStats, n: usize) {
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.items.fetch_add(n as u64, Ordering::Relaxed);
    stats.last_batch_size.store(n as u64, Ordering::Relaxed);
    metrics::histogram!("embed_batch_size").record(n as f64);
}

/// Embeds every text of every job: sorted by length, in forwards of at most
/// `max_batch`, then put back in request order.
fn embed_jobs(
    model: &mut dyn Embedder,
    jobs: &[Job],
    max_batch: usize,
    stats: &WorkerStats,
) -> Result<Vec<Embeddings>, ModelError> {
    let mut items: Vec<(usize, usize, usize)> = Vec::new(); // (job, text, tokens)
    for (j, job) in jobs.iter().enumerate() {
        for (t, text) in job.texts.iter().enumerate() {
            items.push((j, t, model.count_tokens(text)?));
        }
    }
    items.sort_by_key(|&(_, _, len)| len);
    let mut out: Vec<Embeddings> = jobs
        .iter()
        .map(|j| Embeddings {
            vectors: vec![Vec::new(); j.texts.len()],
            tokens: 0,
        })
        .collect();
    for chunk in items.chunks(max_batch) {
        let texts: Vec<&str> = chunk.iter().map(|&(j, t, _)| jobs[j].texts[t].as_str()).collect();
        let vectors = model.embed(&texts)?;
        record_forward(stats, chunk.len());
        for (&(j, t, len), v) in chunk.iter().zip(vectors) {
            out[j].vectors[t] = v;
            out[j].tokens += len;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Lets the fake's forwards start one at a time when the test says so.
    #[derive(Default)]
    struct Gate {
        /// None: forwards run freely; Some(k): k more may run.
        allowed: Mutex<Option<usize>>,
        cv: Condvar,
        /// Forwards that have started (including one held at the gate).
        started: AtomicUsize,
    }

    impl Gate {
        fn closed() -> Arc<Self> {
            Arc::new(Gate {
                allowed: Mutex::new(Some(0)),
                ..Gate::default()
            })
        }
        fn pass(&self) {
            self.started.fetch_add(1, Ordering::SeqCst);
            let mut allowed = self.allowed.lock().expect("gate");
            while *allowed == Some(0) {
                allowed = self.cv.wait(allowed).expect("gate");
            }
            if let Some(k) = allowed.as_mut() {
                *k -= 1;
            }
        }
        fn allow(&self, k: usize) {
            if let Some(n) = self.allowed.lock().expect("gate").as_mut() {
                *n += k;
            }
            self.cv.notify_all();
        }
        fn open(&self) {
            *self.allowed.lock().expect("gate") = None;
            self.cv.notify_all();
        }
        fn started(&self) -> usize {
            self.started.load(Ordering::SeqCst)
        }
    }

    /// A fake embedder: the vector is [text length, batch size]; records each
    /// forward's texts, and waits at the gate before it returns.
    struct Fake {
        forwards: Arc<Mutex<Vec<Vec<String>>>>,
        gate: Arc<Gate>,
    }

    impl Embedder for Fake {
        fn dimensions(&self) -> usize {
            2
        }
        fn max_tokens(&self) -> usize {
            512
        }
        fn count_tokens(&self, text: &str) -> Result<usize, ModelError> {
            Ok(text.len())
        }
        fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
            if let Ok(mut f) = self.forwards.lock() {
                f.push(texts.iter().map(|t| t.to_string()).collect());
            }
            self.gate.pass();
            Ok(texts.iter().map(|t| vec![t.len() as f32, texts.len() as f32]).collect())
        }
    }

    type Forwards = Arc<Mutex<Vec<Vec<String>>>>;

    fn config(max_batch: usize) -> EmbedConfig {
        EmbedConfig {
            max_batch,
            max_wait: Duration::from_millis(20),
            queue_capacity: 64,
            bulk_capacity: 8,
            bulk_wait: Duration::from_secs(10),
            lanes: true,
        }
    }

    fn gated(config: EmbedConfig, gate: Arc<Gate>) -> (EmbedWorker, Forwards) {
        let forwards: Forwards = Arc::new(Mutex::new(Vec::new()));
        let f = forwards.clone();
        let w = EmbedWorker::start(
            Box::new(move || {
                Ok(Box::new(Fake {
                    forwards: f.clone(),
                    gate: gate.clone(),
                }) as Box<dyn Embedder>)
            }),
            config,
        )
        .expect("start");
        (w, forwards)
    }

    fn worker(max_batch: usize) -> (EmbedWorker, Forwards) {
        let gate = Arc::new(Gate::default());
        gated(config(max_batch), gate)
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt")
    }

    /// Polls `cond` (the worker runs on its own thread) for up to 10 s.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "timed out waiting for {what}");
    }

    fn forwards_of(f: &Forwards) -> Vec<Vec<String>> {
        f.lock().expect("forwards").clone()
    }

    /// Bulk texts of lengths that are not in order: "b" then 0 to 10 x's.
    fn bulk_texts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("b{}", "x".repeat(i * 7 % 11))).collect()
    }

    fn is_bulk(forward: &[String]) -> bool {
        forward.iter().all(|t| t.starts_with('b'))
    }

    #[test]
    fn concurrent_requests_share_forwards_sorted_by_length_and_answers_keep_their_order() {
        let rt = rt();
        let (w, forwards) = worker(8);
        let texts = ["ccc", "a", "bbbbb", "dd", "eeee", "f", "gggggg", "hh"];
        let results = rt.block_on(async {
            let calls = texts.iter().map(|t| w.embed(Lane::Interactive, vec![t.to_string()]));
            futures_util::future::join_all(calls).await
        });
        for (t, r) in texts.iter().zip(&results) {
            let e = r.as_ref().expect("embedded");
            assert_eq!(e.vectors[0][0], t.len() as f32, "answers go back to their request");
        }
        let seen: Vec<Vec<usize>> = forwards_of(&forwards)
            .iter()
            .map(|f| f.iter().map(|t| t.len()).collect())
            .collect();
        assert_eq!(seen.len(), 1, "one forward for all eight: {seen:?}");
        let mut sorted = seen[0].clone();
        sorted.sort();
        assert_eq!(seen[0], sorted, "sorted by length");
    }

    #[test]
    fn batches_never_exceed_max_batch_and_a_panic_fails_only_its_batch() {
        let rt = rt();
        let (w, forwards) = worker(3);
        let many: Vec<String> = (0..7).map(|i| "x".repeat(i + 1)).collect();
        let r = rt.block_on(w.embed(Lane::Interactive, many)).expect("embedded");
        assert_eq!(r.vectors.len(), 7);
        assert!(forwards_of(&forwards).iter().all(|b| b.len() <= 3));
        w.inject_panic();
        let failed = rt.block_on(w.embed(Lane::Interactive, vec!["boom".into()]));
        assert!(matches!(failed, Err(ModelError::Unavailable(_))), "{failed:?}");
        let again = rt
            .block_on(w.embed(Lane::Interactive, vec!["fine".into()]))
            .expect("the worker restarted");
        assert_eq!(again.vectors[0][0], 4.0);
        assert_eq!(w.stats.restarts.load(Ordering::Relaxed), 1);
    }

    /// Submits a 50-forward bulk job, then an interactive query while a bulk
    /// forward is held at the gate (three times with lanes, once without);
    /// returns every forward in the order run, and the bulk job's answer.
    fn queries_during_a_bulk_job(lanes: bool) -> (Vec<Vec<String>>, Result<Embeddings, ModelError>) {
        let rt = rt();
        let gate = Gate::closed();
        let (w, forwards) = gated(EmbedConfig { lanes, ..config(4) }, gate.clone());
        rt.block_on(async {
            let bulk = tokio::spawn({
                let w = w.clone();
                async move { w.embed(Lane::Bulk, bulk_texts(200)).await }
            });
            let mut queries = Vec::new();
            for round in 0..(if lanes { 3 } else { 1 }) {
                // A bulk forward is in flight (held at the gate) when the query comes.
                until("a bulk forward", || gate.started() == 2 * round + 1).await;
                queries.push(tokio::spawn({
                    let w = w.clone();
                    async move { w.embed(Lane::Interactive, vec![format!("query {round}")]).await }
                }));
                until("the query queued", || {
                    w.stats.queued_interactive.load(Ordering::SeqCst) == 1
                })
                .await;
                if lanes {
                    gate.allow(2); // the bulk forward in flight, then the next one
                }
            }
            gate.open();
            for (round, q) in queries.into_iter().enumerate() {
                let q = q.await.expect("join").expect("query embedded");
                assert_eq!(q.vectors[0][0], format!("query {round}").len() as f32);
            }
            let done = bulk.await.expect("join");
            (forwards_of(&forwards), done)
        })
    }

    #[test]
    fn an_interactive_request_waits_for_at_most_the_bulk_forward_in_flight() {
        let (forwards, bulk) = queries_during_a_bulk_job(true);
        // Each query ran right after the one bulk forward that was in flight.
        for (round, at) in [(0usize, 1usize), (1, 3), (2, 5)] {
            assert_eq!(forwards[at], vec![format!("query {round}")], "{forwards:?}");
            assert!(is_bulk(&forwards[at - 1]), "{forwards:?}");
        }
        let bulk_forwards: Vec<&Vec<String>> = forwards.iter().filter(|f| is_bulk(f)).collect();
        assert_eq!(bulk_forwards.len(), 50, "200 texts in forwards of 4");
        assert!(bulk_forwards.iter().all(|f| f.len() == 4));
        // Complete and in the order given, though embedded shortest first.
        let texts = bulk_texts(200);
        let out = bulk.expect("bulk embedded");
        assert_eq!(out.vectors.len(), 200);
        for (t, v) in texts.iter().zip(&out.vectors) {
            assert_eq!(v[0], t.len() as f32, "{t}");
        }
        assert_eq!(out.tokens, texts.iter().map(String::len).sum::<usize>());
        let lengths: Vec<usize> = bulk_forwards.iter().flat_map(|f| f.iter().map(String::len)).collect();
        assert!(lengths.windows(2).all(|p| p[0] <= p[1]), "shortest first: {lengths:?}");
    }

    #[test]
    fn without_lanes_an_interactive_request_waits_for_the_whole_bulk_job() {
        // The baseline (models.embed_lanes = false): the query queued during the
        // first bulk forward runs only after all 50 of them.
        let (forwards, bulk) = queries_during_a_bulk_job(false);
        assert_eq!(bulk.expect("bulk embedded").vectors.len(), 200);
        let query_at = forwards.iter().position(|f| !is_bulk(f)).expect("the query ran");
        assert_eq!(query_at, 50, "{} forwards", forwards.len());
    }

    #[test]
    fn bulk_jobs_take_turns_and_each_comes_back_complete_in_order() {
        let rt = rt();
        let gate = Gate::closed();
        let (w, forwards) = gated(config(4), gate.clone());
        let large = bulk_texts(40);
        let small: Vec<String> = (0..6).map(|i| format!("b{}", "y".repeat(6 - i))).collect();
        let (l, s) = rt.block_on(async {
            let l = tokio::spawn({
                let (w, t) = (w.clone(), large.clone());
                async move { w.embed(Lane::Bulk, t).await }
            });
            until("the large job's first forward", || gate.started() == 1).await;
            let s = tokio::spawn({
                let (w, t) = (w.clone(), small.clone());
                async move { w.embed(Lane::Bulk, t).await }
            });
            until("both in the lane", || w.stats.queued_bulk.load(Ordering::SeqCst) == 2).await;
            assert_eq!(w.stats.bulk_pending_texts.load(Ordering::SeqCst), 46);
            gate.open();
            (l.await.expect("join"), s.await.expect("join"))
        });
        for (texts, out) in [(&large, l), (&small, s)] {
            let out = out.expect("embedded");
            let got: Vec<f32> = out.vectors.iter().map(|v| v[0]).collect();
            let want: Vec<f32> = texts.iter().map(|t| t.len() as f32).collect();
            assert_eq!(got, want, "complete, in the order given");
        }
        // The small job (6 texts: two forwards) alternated with the large one.
        let forwards = forwards_of(&forwards);
        let small_at: Vec<usize> = forwards
            .iter()
            .enumerate()
            .filter(|(_, f)| f.iter().any(|t| t.contains('y')))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(small_at, vec![1, 3], "{forwards:?}");
        assert_eq!(forwards.len(), 12);
        assert_eq!(w.stats.queued_bulk.load(Ordering::SeqCst), 0);
        assert_eq!(w.stats.bulk_pending_texts.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn each_lane_holds_its_capacity() {
        let rt = rt();
        let gate = Gate::closed();
        let cfg = EmbedConfig {
            queue_capacity: 3,
            bulk_capacity: 2,
            bulk_wait: Duration::from_millis(50),
            ..config(4)
        };
        let (w, _) = gated(cfg, gate.clone());
        rt.block_on(async {
            let spawn = |lane: Lane, text: &str| {
                let (w, t) = (w.clone(), vec![text.to_string()]);
                tokio::spawn(async move { w.embed(lane, t).await })
            };
            // The worker is held in a forward; three more interactive requests wait.
            let first = spawn(Lane::Interactive, "q");
            until("the first forward", || gate.started() == 1).await;
            let waiting: Vec<_> = (0..3).map(|_| spawn(Lane::Interactive, "q")).collect();
            until("three queued", || {
                w.stats.queued_interactive.load(Ordering::SeqCst) == 3
            })
            .await;
            let refused = w.embed(Lane::Interactive, vec!["q".into()]).await;
            assert!(matches!(refused, Err(ModelError::Overloaded(_))), "{refused:?}");
            // Two bulk jobs fill the bulk lane; a third waits 50 ms for a place, then is refused.
            let bulk: Vec<_> = (0..2).map(|_| spawn(Lane::Bulk, "b")).collect();
            until("two bulk jobs", || w.stats.queued_bulk.load(Ordering::SeqCst) == 2).await;
            let third = spawn(Lane::Bulk, "b");
            until("the third waiting", || w.stats.bulk_waiting.load(Ordering::SeqCst) == 1).await;
            let refused = third.await.expect("join");
            assert!(
                matches!(&refused, Err(ModelError::Overloaded(m)) if m.contains("bulk lane is full")),
                "{refused:?}"
            );
            assert_eq!(w.stats.bulk_waiting.load(Ordering::SeqCst), 0);
            assert_eq!(
                w.stats.queued_bulk.load(Ordering::SeqCst),
                2,
                "the refused one never entered"
            );
            gate.open();
            for t in std::iter::once(first).chain(waiting).chain(bulk) {
                t.await.expect("join").expect("embedded");
            }
            assert_eq!(w.stats.queued(), 0);
        });
    }

    #[test]
    fn a_full_bulk_lane_makes_the_next_job_wait_for_a_place() {
        let rt = rt();
        let gate = Gate::closed();
        let cfg = EmbedConfig {
            bulk_capacity: 1,
            ..config(4)
        };
        let (w, forwards) = gated(cfg, gate.clone());
        rt.block_on(async {
            let first = tokio::spawn({
                let w = w.clone();
                async move { w.embed(Lane::Bulk, bulk_texts(8)).await }
            });
            until("its first forward", || gate.started() == 1).await;
            let second = tokio::spawn({
                let w = w.clone();
                async move { w.embed(Lane::Bulk, vec!["bsecond".into()]).await }
            });
            until("the second waiting", || {
                w.stats.bulk_waiting.load(Ordering::SeqCst) == 1
            })
            .await;
            assert_eq!(w.stats.queued_bulk.load(Ordering::SeqCst), 1);
            gate.open();
            assert_eq!(first.await.expect("join").expect("first").vectors.len(), 8);
            let second = second.await.expect("join").expect("second: waited, then embedded");
            assert_eq!(second.vectors[0][0], 7.0);
        });
        // Never two jobs in the lane at once: the second ran after both of the first's forwards.
        let forwards = forwards_of(&forwards);
        assert_eq!(forwards.len(), 3);
        assert_eq!(forwards[2], vec!["bsecond".to_string()]);
    }

    #[test]
    fn a_bulk_job_whose_caller_left_stops_costing_forwards() {
        let rt = rt();
        let gate = Gate::closed();
        let (w, forwards) = gated(config(4), gate.clone());
        rt.block_on(async {
            let bulk = tokio::spawn({
                let w = w.clone();
                async move { w.embed(Lane::Bulk, bulk_texts(200)).await }
            });
            until("its first forward", || gate.started() == 1).await;
            bulk.abort();
            assert!(bulk.await.is_err(), "cancelled");
            gate.open();
            until("the job dropped", || w.stats.queued_bulk.load(Ordering::SeqCst) == 0).await;
            assert_eq!(w.stats.bulk_pending_texts.load(Ordering::SeqCst), 0);
            // Its place is free again.
            let next = w.embed(Lane::Bulk, vec!["bnext".into()]).await.expect("embedded");
            assert_eq!(next.vectors.len(), 1);
        });
        assert_eq!(
            forwards_of(&forwards).len(),
            2,
            "the forward in flight, then the next job's"
        );
    }

    #[test]
    fn a_panic_fails_the_bulk_job_in_flight_and_the_worker_goes_on() {
        let rt = rt();
        let (w, _) = worker(4);
        w.inject_panic();
        let failed = rt.block_on(w.embed(Lane::Bulk, bulk_texts(20)));
        assert!(matches!(failed, Err(ModelError::Unavailable(_))), "{failed:?}");
        assert_eq!(w.stats.queued_bulk.load(Ordering::SeqCst), 0);
        let again = rt.block_on(w.embed(Lane::Bulk, bulk_texts(20))).expect("reloaded");
        assert_eq!(again.vectors.len(), 20);
        assert_eq!(w.stats.restarts.load(Ordering::Relaxed), 1);
        assert!(w.stats.last_error.get().is_some_and(|e| e.contains("injected")));
    }

    #[test]
    fn a_single_short_input_is_interactive_anything_more_is_bulk() {
        let one = |n: usize| vec!["x".repeat(n)];
        assert_eq!(Lane::for_inputs(&one(2000), 2000), Lane::Interactive);
        assert_eq!(Lane::for_inputs(&one(2001), 2000), Lane::Bulk);
        assert_eq!(Lane::for_inputs(&[one(1), one(1)].concat(), 2000), Lane::Bulk);
        assert_eq!(Lane::for_inputs(&[], 2000), Lane::Bulk);
    }
}
