//! Seeding the knowledge base with global documents from a corpus: a directory of
//! files (.txt, .md, .html, .pdf, .jsonl; walked recursively, hidden entries
//! skipped) or one file such as a BEIR corpus.jsonl. Used by POST
//! /admin/seed-enhanced (in the background, progress in GET /admin/seed-status)
//! and by `ragchat seed PATH` (with a progress bar).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use ragchat_actors::knowledge::Owner;
use serde::Serialize;
use utoipa::ToSchema;

use super::formats::{self, Extracted, Format, FormatLimits};
use super::ingest::{validate, DocLimits, IngestError, Ingestor, NewDoc, Outcome};
use ragchat_actors::retrieval::RemoveDocument;

/// Documents per ingestion batch (one embedding pass, one index commit).
const BATCH: usize = 32;
/// Errors kept in the status (the counts keep going).
const MAX_ERRORS: usize = 50;

#[derive(Debug, Clone, Copy, Serialize, ToSchema, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SeedState {
    #[default]
    Idle,
    Running,
    Completed,
    Failed,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SeedOptions {
    /// Remove the global documents first.
    pub clear_existing: bool,
    /// Read, check and chunk everything; store nothing.
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema, Default)]
pub struct SeedStatus {
    pub state: SeedState,
    pub source: Option<String>,
    pub dry_run: bool,
    pub clear_existing: bool,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Files read (a .jsonl file counts once).
    pub files: usize,
    pub documents_total: usize,
    pub documents_processed: usize,
    pub documents_created: usize,
    /// Already stored with the same text (or repeated in the corpus).
    pub documents_duplicate: usize,
    pub documents_failed: usize,
    /// Global documents removed by `clear_existing` (to be removed, in a dry run).
    pub documents_removed: usize,
    /// Chunks created (would be created, in a dry run).
    pub chunks: usize,
    pub bytes: u64,
    pub elapsed_s: f64,
    pub documents_per_s: f64,
    /// The first errors, each naming its file or document.
    pub errors: Vec<String>,
}

impl SeedStatus {
    fn error(&mut self, e: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{0}")]
    Source(String),
    #[error("a seed is already running")]
    Busy,
}

fn hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The files of a corpus, sorted; a file path is its own corpus.
pub fn corpus_files(path: &Path) -> Result<Vec<PathBuf>, SeedError> {
    let meta = std::fs::metadata(path).map_err(|e| SeedError::Source(format!("{}: {e}", path.display())))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| SeedError::Source(format!("{}: {e}", dir.display())))?;
        for entry in entries.flatten() {
            let p = entry.path();
            if hidden(&p) {
                continue;
            }
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the documents of a corpus; files that cannot be read are reported in
/// `status` and skipped. Files of other types in a directory are ignored.
pub fn read_corpus(
    path: &Path,
    max_file_bytes: usize,
    limits: &FormatLimits,
    status: &Mutex<SeedStatus>,
) -> Result<Vec<Extracted>, SeedError> {
    let files = corpus_files(path)?;
    let single = files.len() == 1 && path.is_file();
    let mut docs = Vec::new();
    for f in files {
        let name = f.display().to_string();
        let format = match Format::detect(&name, None) {
            Ok(fmt) => fmt,
            Err(e) if single => return Err(SeedError::Source(e.to_string())),
            Err(_) => continue,
        };
        let read = std::fs::metadata(&f)
            .map_err(|e| format!("{name}: {e}"))
            .and_then(|m| {
                if m.len() as usize > max_file_bytes && format != Format::JsonLines {
                    Err(format!(
                        "{name}: {} bytes is over the limit of {max_file_bytes}",
                        m.len()
                    ))
                } else {
                    std::fs::read(&f).map_err(|e| format!("{name}: {e}"))
                }
            })
            .and_then(|bytes| formats::extract(&name, format, &bytes, limits).map_err(|e| e.to_string()));
        let mut s = lock(status);
        s.files += 1;
        match read {
            Ok(mut found) => {
                s.documents_total += found.len();
                docs.append(&mut found);
            }
            Err(e) => {
                s.documents_failed += 1;
                s.error(e);
            }
        }
    }
    Ok(docs)
}

fn lock(m: &Mutex<SeedStatus>) -> std::sync::MutexGuard<'_, SeedStatus> {
    // A panic while holding it cannot leave the counters inconsistent enough to matter.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks a seed as started; refuses while another one runs.
pub fn begin(status: &Mutex<SeedStatus>, source: &Path, opts: SeedOptions) -> Result<(), SeedError> {
    let mut s = lock(status);
    if s.state == SeedState::Running {
        return Err(SeedError::Busy);
    }
    *s = SeedStatus {
        state: SeedState::Running,
        source: Some(source.display().to_string()),
        dry_run: opts.dry_run,
        clear_existing: opts.clear_existing,
        started_at: Some(Utc::now()),
        ..SeedStatus::default()
    };
    Ok(())
}

/// Runs a seed that `begin` started: reads the corpus, clears global documents
/// when asked, then ingests in batches. `progress` is called after each step.
pub async fn run(
    ingestor: &Ingestor,
    source: &Path,
    opts: SeedOptions,
    limits: (DocLimits, FormatLimits),
    status: Arc<Mutex<SeedStatus>>,
    progress: &(dyn Fn(&SeedStatus) + Sync),
) {
    let started = Instant::now();
    let outcome = seed(ingestor, source, opts, limits, &status, progress, started).await;
    let mut s = lock(&status);
    s.elapsed_s = started.elapsed().as_secs_f64();
    s.finished_at = Some(Utc::now());
    match outcome {
        Ok(()) => s.state = SeedState::Completed,
        Err(e) => {
            s.state = SeedState::Failed;
            s.error(e.to_string());
        }
    }
    progress(&s);
}

async fn seed(
    ingestor: &Ingestor,
    source: &Path,
    opts: SeedOptions,
    (limits, mut formats): (DocLimits, FormatLimits),
    status: &Arc<Mutex<SeedStatus>>,
    progress: &(dyn Fn(&SeedStatus) + Sync),
    started: Instant,
) -> Result<(), SeedError> {
    let path = source.to_path_buf();
    let max_file = limits.max_bytes.saturating_mul(4);
    // A corpus is one file of many documents, read by an administrator.
    formats.max_documents = usize::MAX;
    // Reading (PDFs above all) is blocking work: keep it off the async workers.
    let reading = status.clone();
    let docs = tokio::task::spawn_blocking(move || read_corpus(&path, max_file, &formats, &reading))
        .await
        .map_err(|e| SeedError::Source(format!("reading stopped: {e}")))??;
    progress(&lock(status));
    if opts.clear_existing {
        let ids = ingestor
            .documents
            .document_ids(Some(&Owner::Global))
            .await
            .map_err(|e| SeedError::Source(format!("listing global documents: {e}")))?;
        for id in ids.iter().filter(|_| !opts.dry_run) {
            ingestor
                .documents
                .delete_document(*id)
                .await
                .map_err(|e| SeedError::Source(format!("removing document {id}: {e}")))?;
            if let Some(r) = &ingestor.retrieval {
                let _ = r.send(RemoveDocument(*id)).await;
            }
        }
        lock(status).documents_removed = ids.len();
    }
    for batch in docs.chunks(BATCH) {
        let mut valid = Vec::with_capacity(batch.len());
        for e in batch {
            let mut d = NewDoc {
                owner: Owner::Global,
                title: e.title.clone(),
                content: e.content.clone(),
                source: e.source.clone(),
                origin: "seed".into(),
                metadata: e.metadata.clone(),
            };
            match validate(&mut d, limits) {
                Ok(()) => valid.push(d),
                Err(err) => {
                    let mut s = lock(status);
                    s.documents_failed += 1;
                    s.documents_processed += 1;
                    s.error(format!("{}: {err}", e.source));
                }
            }
        }
        let n = valid.len();
        let result = if opts.dry_run {
            dry_run(ingestor, valid).await
        } else {
            match store(ingestor, valid.clone()).await {
                // One bad document must not cost the others of its batch: one by one.
                Err(e) if n > 1 => {
                    tracing::warn!(error = %e, "seed batch failed; storing its documents one by one");
                    let mut c = Counts::default();
                    for d in valid {
                        let source = d.source.clone();
                        match store(ingestor, vec![d]).await {
                            Ok(one) => c.add(one),
                            Err(e) => {
                                let mut s = lock(status);
                                s.documents_failed += 1;
                                s.error(format!("{source}: {e}"));
                            }
                        }
                    }
                    Ok(c)
                }
                other => other,
            }
        };
        {
            let mut s = lock(status);
            s.documents_processed += n;
            match result {
                Ok(c) => {
                    s.documents_created += c.created;
                    s.documents_duplicate += c.duplicate;
                    s.chunks += c.chunks;
                    s.bytes += c.bytes;
                }
                Err(e) => {
                    s.documents_failed += n;
                    let first = batch.first().map(|d| d.source.as_str()).unwrap_or("");
                    s.error(format!("batch from {first}: {e}"));
                }
            }
            s.elapsed_s = started.elapsed().as_secs_f64();
            s.documents_per_s = s.documents_processed as f64 / s.elapsed_s.max(1e-9);
            progress(&s);
        }
    }
    Ok(())
}

#[derive(Default)]
struct Counts {
    created: usize,
    duplicate: usize,
    chunks: usize,
    bytes: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.created += o.created;
        self.duplicate += o.duplicate;
        self.chunks += o.chunks;
        self.bytes += o.bytes;
    }
}

async fn store(ingestor: &Ingestor, docs: Vec<NewDoc>) -> Result<Counts, IngestError> {
    let triage = ingestor.triage(docs).await?;
    let mut c = Counts::default();
    for o in ingestor.store(triage).await? {
        match o {
            Outcome::Created(d) => {
                c.created += 1;
                c.chunks += d.chunk_count as usize;
                c.bytes += d.size_bytes;
            }
            Outcome::Duplicate(_) => c.duplicate += 1,
        }
    }
    Ok(c)
}

/// What `store` would do, without embedding or writing.
async fn dry_run(ingestor: &Ingestor, docs: Vec<NewDoc>) -> Result<Counts, IngestError> {
    let triage = ingestor.triage(docs).await?;
    let mut c = Counts {
        duplicate: triage.duplicates(),
        ..Counts::default()
    };
    let chunker = ingestor.chunker.clone();
    let texts: Vec<String> = triage.new_texts().map(str::to_string).collect();
    let chunks = tokio::task::spawn_blocking(move || texts.iter().map(|t| chunker.split(t).len()).sum::<usize>())
        .await
        .map_err(|e| IngestError::Index(format!("chunking stopped: {e}")))?;
    c.created = triage.new_count();
    c.chunks = chunks;
    c.bytes = triage.new_texts().map(|t| t.len() as u64).sum();
    Ok(c)
}

/// `ragchat seed PATH`: seeds the configured store with a progress bar.
pub async fn cli(settings: &crate::config::Settings, path: &Path, opts: SeedOptions) -> anyhow::Result<()> {
    let k = &settings.knowledge;
    let documents = crate::stores::connect_documents(
        Some(k.mongodb_url.trim()).filter(|u| !u.is_empty()),
        &k.mongodb_database,
        &k.sqlite_url,
    )
    .await?;
    let embedder = crate::models::start_embedder(&settings.models)
        .ok_or_else(|| anyhow::anyhow!("the embedding model is not loaded (run scripts/fetch-models)"))?;
    let tokenizer = Path::new(&settings.models.embedding_dir).join("tokenizer.json");
    let chunker =
        super::chunking::Chunker::load(&tokenizer, k.chunk_tokens, k.chunk_overlap).map_err(anyhow::Error::msg)?;
    let ingestor = Ingestor {
        documents,
        chunker: Arc::new(chunker),
        embedder,
        retrieval: None,
    };
    let status = Arc::new(Mutex::new(SeedStatus::default()));
    begin(&status, path, opts)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} documents {per_sec} eta {eta} {msg}")
            .map_err(|e| anyhow::anyhow!("progress bar: {e}"))?,
    );
    let progress = |s: &SeedStatus| {
        bar.set_length(s.documents_total as u64);
        bar.set_position(s.documents_processed as u64);
        bar.set_message(format!(
            "{} new, {} already stored, {} failed",
            s.documents_created, s.documents_duplicate, s.documents_failed
        ));
    };
    let limits = (DocLimits::of(k), FormatLimits::of(k));
    run(&ingestor, path, opts, limits, status.clone(), &progress).await;
    bar.finish();
    let s = lock(&status).clone();
    println!(
        "{}{}: {} files, {} documents: {} new ({} chunks, {:.1} MB), {} already stored, {} failed{} in {:.1} s ({:.1} documents/s)",
        if opts.dry_run { "dry run, " } else { "" },
        path.display(),
        s.files,
        s.documents_total,
        s.documents_created,
        s.chunks,
        s.bytes as f64 / (1 << 20) as f64,
        s.documents_duplicate,
        s.documents_failed,
        if opts.clear_existing { format!(", {} global documents removed first", s.documents_removed) } else { String::new() },
        s.elapsed_s,
        s.documents_total as f64 / s.elapsed_s.max(1e-9),
    );
    for e in &s.errors {
        eprintln!("  {e}");
    }
    if s.state == SeedState::Failed {
        anyhow::bail!("seeding failed");
    }
    Ok(())
}
