//! EmbedWorker: one model on a dedicated thread, fed by a bounded queue; requests
//! waiting in the queue are batched dynamically — up to `max_batch` texts or
//! `max_wait` after the first arrived — sorted by token length to limit padding,
//! one forward per batch. A full queue answers "overloaded" at once; a caller that
//! went away is skipped before it costs a forward. A panic in the model fails the
//! batch in flight (503) and the model is loaded afresh (counted in `restarts`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::inference::{Embedder, ModelError};

pub type EmbedderFactory = Box<dyn Fn() -> Result<Box<dyn Embedder>, ModelError> + Send>;

#[derive(Debug, Clone)]
pub struct EmbedConfig {
    /// Texts per forward.
    pub max_batch: usize,
    /// How long the first request of a batch waits for company.
    pub max_wait: Duration,
    /// Requests waiting beyond this are refused as overloaded.
    pub queue_capacity: usize,
}

#[derive(Debug, Clone)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens consumed (after truncation), for usage accounting.
    pub tokens: usize,
}

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Embeddings, ModelError>>,
}

#[derive(Debug, Default)]
pub struct WorkerStats {
    pub batches: AtomicU64,
    pub items: AtomicU64,
    pub restarts: AtomicU64,
    pub queued: AtomicU64,
    pub last_batch_size: AtomicU64,
    /// The last crash or failed reload, with its time (for /admin/actors).
    pub last_error: crate::supervision::LastError,
    /// The thread has ended (its model could not be reloaded).
    pub stopped: AtomicBool,
}

#[derive(Clone)]
pub struct EmbedWorker {
    tx: SyncSender<Job>,
    dimensions: usize,
    pub stats: Arc<WorkerStats>,
    crash_next: Arc<AtomicBool>,
}

impl EmbedWorker {
    /// Loads the model (through `factory`, used again on restart) and starts the thread.
    pub fn start(factory: EmbedderFactory, config: EmbedConfig) -> Result<Self, ModelError> {
        let model = factory()?;
        let dimensions = model.dimensions();
        let (tx, rx) = mpsc::sync_channel::<Job>(config.queue_capacity.max(1));
        let stats = Arc::new(WorkerStats::default());
        let crash_next = Arc::new(AtomicBool::new(false));
        let (s, c) = (stats.clone(), crash_next.clone());
        std::thread::Builder::new()
            .name("embed-worker".into())
            .spawn(move || run(model, factory, rx, config, s, c))
            .map_err(|e| ModelError::Internal(format!("cannot start the embedding thread: {e}")))?;
        Ok(EmbedWorker {
            tx,
            dimensions,
            stats,
            crash_next,
        })
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    pub async fn embed(&self, texts: Vec<String>) -> Result<Embeddings, ModelError> {
        if texts.is_empty() {
            return Ok(Embeddings {
                vectors: Vec::new(),
                tokens: 0,
            });
        }
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { texts, reply }) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => return Err(ModelError::Overloaded("embedding worker overloaded".into())),
            Err(TrySendError::Disconnected(_)) => {
                return Err(ModelError::Unavailable("embedding worker stopped".into()))
            }
        }
        rx.await
            .unwrap_or_else(|_| Err(ModelError::Unavailable("embedding worker restarted; retry".into())))
    }

    /// Fault injection: the next batch panics inside the worker (tests of supervision).
    pub fn inject_panic(&self) {
        self.crash_next.store(true, Ordering::SeqCst);
    }
}

fn run(
    mut model: Box<dyn Embedder>,
    factory: EmbedderFactory,
    rx: mpsc::Receiver<Job>,
    config: EmbedConfig,
    stats: Arc<WorkerStats>,
    crash_next: Arc<AtomicBool>,
) {
    let max_batch = config.max_batch.max(1);
    let mut policy = crate::supervision::RestartPolicy::default();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut n = jobs[0].texts.len();
        let deadline = Instant::now() + config.max_wait;
        while n < max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(job) => {
                    n += job.texts.len();
                    jobs.push(job);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        stats.queued.fetch_sub(jobs.len() as u64, Ordering::Relaxed);
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            if crash_next.swap(false, Ordering::SeqCst) {
                #[allow(clippy::panic)]
                {
                    panic!("injected embedding worker fault");
                }
            }
            embed_jobs(model.as_mut(), &jobs, max_batch, &stats)
        }));
        match outcome {
            Ok(Ok(per_job)) => {
                for (job, result) in jobs.into_iter().zip(per_job) {
                    let _ = job.reply.send(Ok(result));
                }
            }
            Ok(Err(e)) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
            Err(payload) => {
                stats.last_error.note(format!(
                    "panicked: {}",
                    crate::generate_worker::panic_text(payload.as_ref())
                ));
                tracing::error!("embedding worker panicked; failing its batch and reloading the model");
                for job in jobs {
                    let _ = job
                        .reply
                        .send(Err(ModelError::Unavailable("embedding worker crashed; retry".into())));
                }
                stats.restarts.fetch_add(1, Ordering::Relaxed);
                policy.restart_blocking("embed-worker");
                match factory() {
                    Ok(m) => model = m,
                    Err(e) => {
                        tracing::error!(error = %e, "embedding model reload failed; worker stops");
                        stats.last_error.note(format!("model reload failed: {e}"));
                        stats.stopped.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }
    }
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
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.items.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        stats.last_batch_size.store(chunk.len() as u64, Ordering::Relaxed);
        metrics::histogram!("embed_batch_size").record(chunk.len() as f64);
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
    use std::sync::Mutex;

    /// A fake embedder: the vector is [text length, batch size]; records batch sizes.
    struct Fake {
        batches: Arc<Mutex<Vec<Vec<usize>>>>,
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
            if let Ok(mut b) = self.batches.lock() {
                b.push(texts.iter().map(|t| t.len()).collect());
            }
            Ok(texts.iter().map(|t| vec![t.len() as f32, texts.len() as f32]).collect())
        }
    }

    fn worker(max_batch: usize) -> (EmbedWorker, Arc<Mutex<Vec<Vec<usize>>>>) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let b = batches.clone();
        let w = EmbedWorker::start(
            Box::new(move || Ok(Box::new(Fake { batches: b.clone() }) as Box<dyn Embedder>)),
            EmbedConfig {
                max_batch,
                max_wait: Duration::from_millis(50),
                queue_capacity: 64,
            },
        )
        .expect("start");
        (w, batches)
    }

    #[test]
    fn concurrent_requests_share_forwards_sorted_by_length_and_answers_keep_their_order() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let (w, batches) = worker(8);
        let texts = ["ccc", "a", "bbbbb", "dd", "eeee", "f", "gggggg", "hh"];
        let results = rt.block_on(async {
            let calls = texts.iter().map(|t| w.embed(vec![t.to_string()]));
            futures_util::future::join_all(calls).await
        });
        for (t, r) in texts.iter().zip(&results) {
            let e = r.as_ref().expect("embedded");
            assert_eq!(e.vectors[0][0], t.len() as f32, "answers go back to their request");
        }
        let seen = batches.lock().expect("lock").clone();
        assert_eq!(seen.len(), 1, "one forward for all eight: {seen:?}");
        let mut sorted = seen[0].clone();
        sorted.sort();
        assert_eq!(seen[0], sorted, "sorted by length");
    }

    #[test]
    fn batches_never_exceed_max_batch_and_a_panic_fails_only_its_batch() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let (w, batches) = worker(3);
        let many: Vec<String> = (0..7).map(|i| "x".repeat(i + 1)).collect();
        let r = rt.block_on(w.embed(many)).expect("embedded");
        assert_eq!(r.vectors.len(), 7);
        assert!(batches.lock().expect("lock").iter().all(|b| b.len() <= 3));
        w.inject_panic();
        let failed = rt.block_on(w.embed(vec!["boom".into()]));
        assert!(matches!(failed, Err(ModelError::Unavailable(_))), "{failed:?}");
        let again = rt.block_on(w.embed(vec!["fine".into()])).expect("the worker restarted");
        assert_eq!(again.vectors[0][0], 4.0);
        assert_eq!(w.stats.restarts.load(Ordering::Relaxed), 1);
    }
}
