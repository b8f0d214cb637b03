//! Background jobs: large uploads (and many-document files) are stored, and
//! re-indexing (`POST /knowledge/reindex`) runs, in a task of its own while the
//! client polls `GET /knowledge/jobs/{id}`. The board keeps
//! each job's progress, bounds how many exist (in all, and running per user), lets
//! the owner cancel between batches, and forgets finished jobs after a while.
//!
//! Jobs live in this process: a job is visible on the node that took the upload,
//! and one that was running when the process stopped is gone (what its finished
//! batches stored stays stored and counted).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Semaphore;
use utoipa::ToSchema;
use uuid::Uuid;

/// Errors kept per job (the first ones; the count of failed documents is exact).
const MAX_ERRORS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a free runner.
    Queued,
    Running,
    /// Every batch was tried (some documents may have failed: see `errors`).
    Completed,
    /// Stopped early by an error that would fail every batch after it.
    Failed,
    /// Stopped by its owner between batches; what was stored stays.
    Cancelled,
}

impl JobState {
    pub fn finished(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed | JobState::Cancelled)
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Stores the documents of an uploaded file.
    Upload,
    /// Re-chunks and re-embeds stored documents (`POST /knowledge/reindex`).
    Reindex,
}

/// A job as its owner sees it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub kind: JobKind,
    pub state: JobState,
    /// The uploaded file's name (upload jobs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    pub documents_total: usize,
    /// Documents finished without an error: stored or found already stored
    /// (uploads), re-indexed (re-indexing).
    pub documents_done: usize,
    /// Documents stored so far (new ones).
    pub documents_created: usize,
    /// Documents that were already stored (same text, same owner).
    pub documents_duplicate: usize,
    pub documents_failed: usize,
    /// What went wrong, batch by batch (at most 20).
    pub errors: Vec<String>,
    /// Set when its owner asked to cancel it.
    pub cancel_requested: bool,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Limits of the board (`knowledge.jobs_*` in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct JobLimits {
    /// Jobs not yet finished, in all (each holds its documents in memory).
    pub max_pending: usize,
    /// Jobs not yet finished, per user.
    pub max_pending_per_user: usize,
    /// Jobs storing at once (others wait, queued).
    pub max_running: usize,
    /// How long a finished job stays visible.
    pub retention: Duration,
}

impl JobLimits {
    pub fn of(k: &crate::config::KnowledgeSettings) -> Self {
        JobLimits {
            max_pending: k.jobs_max_pending,
            max_pending_per_user: k.jobs_max_pending_per_user,
            max_running: k.jobs_max_running,
            retention: Duration::from_secs(k.jobs_retention_secs),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This user has `max_pending_per_user` unfinished jobs.
    UserBusy(usize),
    /// The server holds `max_pending` unfinished jobs.
    Full,
}

struct Entry {
    user_id: Uuid,
    view: Mutex<JobView>,
    cancel: AtomicBool,
}

/// A job's handle for the task that runs it.
#[derive(Clone)]
pub struct Job {
    entry: Arc<Entry>,
    board: Arc<JobBoard>,
}

pub struct JobBoard {
    limits: JobLimits,
    jobs: Mutex<HashMap<Uuid, Arc<Entry>>>,
    runners: Semaphore,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobBoard {
    pub fn new(limits: JobLimits) -> Arc<JobBoard> {
        Arc::new(JobBoard {
            limits,
            jobs: Mutex::new(HashMap::new()),
            runners: Semaphore::new(limits.max_running.max(1)),
        })
    }

    /// Registers a queued job, or refuses when the user or the server has too
    /// many unfinished ones. Finished jobs past their retention are dropped here.
    pub fn create(
        self: &Arc<Self>,
        user_id: Uuid,
        kind: JobKind,
        filename: Option<&str>,
        documents_total: usize,
    ) -> Result<Job, Refusal> {
        let now = Utc::now();
        let mut jobs = lock(&self.jobs);
        let retention = chrono::Duration::from_std(self.limits.retention).unwrap_or(chrono::Duration::hours(1));
        jobs.retain(|_, e| lock(&e.view).finished_at.is_none_or(|t| now - t < retention));
        let pending = |e: &&Arc<Entry>| !lock(&e.view).state.finished();
        let mine = jobs.values().filter(|e| e.user_id == user_id).filter(pending).count();
        if mine >= self.limits.max_pending_per_user {
            return Err(Refusal::UserBusy(self.limits.max_pending_per_user));
        }
        if jobs.values().filter(pending).count() >= self.limits.max_pending {
            return Err(Refusal::Full);
        }
        let id = Uuid::new_v4();
        let entry = Arc::new(Entry {
            user_id,
            view: Mutex::new(JobView {
                id,
                kind,
                state: JobState::Queued,
                filename: filename.map(|f| f.chars().take(255).collect()),
                documents_total,
                documents_done: 0,
                documents_created: 0,
                documents_duplicate: 0,
                documents_failed: 0,
                errors: Vec::new(),
                cancel_requested: false,
                created_at: now,
                finished_at: None,
            }),
            cancel: AtomicBool::new(false),
        });
        jobs.insert(id, entry.clone());
        Ok(Job {
            entry,
            board: self.clone(),
        })
    }

    /// The job if it is this user's (someone else's reads as missing).
    pub fn get(&self, user_id: Uuid, id: Uuid) -> Option<JobView> {
        let jobs = lock(&self.jobs);
        let e = jobs.get(&id).filter(|e| e.user_id == user_id)?;
        let view = lock(&e.view).clone();
        Some(view)
    }

    /// This user's jobs, newest first.
    pub fn list(&self, user_id: Uuid) -> Vec<JobView> {
        let jobs = lock(&self.jobs);
        let mut out: Vec<JobView> = jobs
            .values()
            .filter(|e| e.user_id == user_id)
            .map(|e| lock(&e.view).clone())
            .collect();
        out.sort_by_key(|v| std::cmp::Reverse(v.created_at));
        out
    }

    /// Asks a job to stop after its current batch. `Ok(view)` when asked (or
    /// already asked), `Err(Some(state))` when it has finished, `Err(None)` when
    /// the user has no such job.
    pub fn cancel(&self, user_id: Uuid, id: Uuid) -> Result<JobView, Option<JobState>> {
        let jobs = lock(&self.jobs);
        let e = jobs.get(&id).filter(|e| e.user_id == user_id).ok_or(None)?;
        let mut view = lock(&e.view);
        if view.state.finished() {
            return Err(Some(view.state));
        }
        e.cancel.store(true, Ordering::SeqCst);
        view.cancel_requested = true;
        Ok(view.clone())
    }
}

/// A batch's outcome, for [`Job::record`].
pub enum Batch {
    Stored {
        created: usize,
        duplicate: usize,
    },
    /// Documents re-indexed.
    Reindexed(usize),
    /// The batch stored nothing; the job goes on with the next one.
    Failed {
        documents: usize,
        error: String,
    },
}

impl Job {
    pub fn id(&self) -> Uuid {
        self.entry.view.lock().map(|v| v.id).unwrap_or_default()
    }

    pub fn view(&self) -> JobView {
        lock(&self.entry.view).clone()
    }

    /// Waits for a free runner, then marks the job running. `None` when it was
    /// cancelled while it waited.
    pub async fn start(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let permit = self.board.runners.acquire().await.ok()?;
        if self.cancelled() {
            return None;
        }
        lock(&self.entry.view).state = JobState::Running;
        Some(permit)
    }

    pub fn cancelled(&self) -> bool {
        self.entry.cancel.load(Ordering::SeqCst)
    }

    pub fn record(&self, batch: Batch) {
        let mut v = lock(&self.entry.view);
        match batch {
            Batch::Stored { created, duplicate } => {
                v.documents_created += created;
                v.documents_duplicate += duplicate;
                v.documents_done += created + duplicate;
            }
            Batch::Reindexed(n) => v.documents_done += n,
            Batch::Failed { documents, error } => {
                v.documents_failed += documents;
                if v.errors.len() < MAX_ERRORS {
                    v.errors.push(error);
                }
            }
        }
    }

    /// Ends the job: cancelled if its owner asked, failed when `fatal` (the rest
    /// counted as failed), otherwise completed.
    pub fn finish(&self, fatal: Option<String>) -> JobView {
        let mut v = lock(&self.entry.view);
        let left = v.documents_total.saturating_sub(v.documents_done + v.documents_failed);
        v.state = if let Some(error) = fatal {
            v.documents_failed += left;
            if v.errors.len() < MAX_ERRORS {
                v.errors.push(error);
            }
            JobState::Failed
        } else if self.cancelled() && left > 0 {
            JobState::Cancelled
        } else {
            JobState::Completed
        };
        v.finished_at = Some(Utc::now());
        v.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(per_user: usize, pending: usize) -> Arc<JobBoard> {
        JobBoard::new(JobLimits {
            max_pending: pending,
            max_pending_per_user: per_user,
            max_running: 1,
            retention: Duration::from_secs(3600),
        })
    }

    #[test]
    fn unfinished_jobs_are_bounded_per_user_and_in_all() {
        let b = board(2, 3);
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a1 = b.create(alice, JobKind::Upload, Some("a.jsonl"), 10).expect("first");
        b.create(alice, JobKind::Upload, Some("b.jsonl"), 10).expect("second");
        assert_eq!(
            b.create(alice, JobKind::Upload, Some("c.jsonl"), 10).err(),
            Some(Refusal::UserBusy(2))
        );
        b.create(bob, JobKind::Upload, Some("d.jsonl"), 10)
            .expect("bob's first");
        assert_eq!(
            b.create(bob, JobKind::Upload, Some("e.jsonl"), 10).err(),
            Some(Refusal::Full)
        );
        // A finished job frees its place.
        a1.finish(None);
        b.create(alice, JobKind::Upload, Some("c.jsonl"), 10)
            .expect("after one finished");
    }

    #[test]
    fn jobs_are_seen_and_cancelled_by_their_owner_only() {
        let b = board(2, 10);
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let job = b.create(alice, JobKind::Upload, Some("a.jsonl"), 4).expect("job");
        let id = job.id();
        assert!(b.get(bob, id).is_none());
        assert!(matches!(b.cancel(bob, id), Err(None)));
        assert_eq!(b.list(alice).len(), 1);
        assert!(b.list(bob).is_empty());
        let v = b.cancel(alice, id).expect("cancel");
        assert!(v.cancel_requested && job.cancelled());
        job.record(Batch::Stored {
            created: 2,
            duplicate: 0,
        });
        let done = job.finish(None);
        assert_eq!((done.state, done.documents_created), (JobState::Cancelled, 2));
        assert_eq!(b.cancel(alice, id).err(), Some(Some(JobState::Cancelled)));
    }

    #[test]
    fn progress_and_endings_add_up() {
        let b = board(5, 10);
        let u = Uuid::new_v4();
        let job = b.create(u, JobKind::Upload, Some("x.jsonl"), 10).expect("job");
        job.record(Batch::Stored {
            created: 3,
            duplicate: 1,
        });
        job.record(Batch::Failed {
            documents: 2,
            error: "batch 2: bad".into(),
        });
        let v = job.finish(Some("storage quota exceeded".into()));
        assert_eq!(v.state, JobState::Failed);
        assert_eq!(
            (v.documents_created, v.documents_duplicate, v.documents_failed),
            (3, 1, 6)
        );
        assert_eq!(v.errors.len(), 2);
        // A job cancelled after its last batch simply completed.
        let job = b.create(u, JobKind::Upload, Some("y.jsonl"), 2).expect("job");
        job.record(Batch::Stored {
            created: 2,
            duplicate: 0,
        });
        b.cancel(u, job.id()).expect("cancel");
        assert_eq!(job.finish(None).state, JobState::Completed);
    }

    #[test]
    fn finished_jobs_are_forgotten_after_their_retention() {
        let b = JobBoard::new(JobLimits {
            max_pending: 10,
            max_pending_per_user: 10,
            max_running: 1,
            retention: Duration::ZERO,
        });
        let u = Uuid::new_v4();
        let job = b.create(u, JobKind::Upload, Some("a.jsonl"), 1).expect("job");
        job.finish(None);
        b.create(u, JobKind::Upload, Some("b.jsonl"), 1).expect("second");
        assert_eq!(b.list(u).len(), 1);
    }
}
