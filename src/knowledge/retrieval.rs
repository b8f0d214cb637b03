//! The retrieval actor: owns the search index on its own arbiter, so indexing and
//! searches are serialised through its mailbox while HTTP workers stay free.
//! With an index folder it keeps a snapshot on disk (written after changes, at
//! most every `SAVE_EVERY`), so a restart reads it and only catches up with
//! what the store gained or lost meanwhile.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use ragchat_actors::knowledge::{Chunk, Document, Reader};
use ragchat_actors::ports::DocumentStore;
use ragchat_actors::supervision::{retry_until_ok, Child, Mailbox, RestartPolicy, SendTracked, Supervised};
use uuid::Uuid;

use super::index::{Filters, Hit, IndexError, Route, SearchIndex};

const SAVE_EVERY: Duration = Duration::from_secs(30);

pub struct Retrieval {
    index: SearchIndex,
    dir: Option<PathBuf>,
    /// Changed since the last snapshot.
    unsaved: bool,
    child: Option<Arc<Child>>,
    /// Documents removed while this instance runs: a catch-up `sync` that read
    /// one before its deletion must not index it again.
    removed: HashSet<Uuid>,
}

pub static RETRIEVAL_MAILBOX: Mailbox = Mailbox::new("retrieval");
ragchat_actors::tracked_mailbox!(Retrieval, RETRIEVAL_MAILBOX;
    SaveIndex, IndexedDocuments, IndexDocuments, RemoveDocument, Search, IndexedChunks, Crash);

impl Actor for Retrieval {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.dir.is_some() {
            ctx.run_interval(SAVE_EVERY, |act, _| {
                if let Err(e) = act.save() {
                    tracing::error!(error = %e, "could not write the search index snapshot");
                }
            });
        }
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        // After a panic the index may be half-changed: the last snapshot stays.
        if !std::thread::panicking() {
            if let Err(e) = self.save() {
                tracing::error!(error = %e, "could not write the search index snapshot");
            }
        }
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if let Some(child) = &self.child {
            child.exited();
        }
    }
}

impl Retrieval {
    /// Starts the actor on an arbiter of its own under a supervisor: with
    /// `dir`, from the snapshot there when one reads back whole, otherwise with
    /// an empty index. After a restart (the actor died) the new instance starts
    /// from the snapshot and catches up with `documents` in the background.
    /// The first instance is brought in line by the caller (`sync`).
    pub fn supervised(
        dir: Option<PathBuf>,
        documents: Arc<dyn DocumentStore>,
    ) -> Result<Arc<Supervised<Retrieval>>, String> {
        let arbiter = Arbiter::new().handle();
        let first = std::sync::atomic::AtomicBool::new(true);
        let on_restart =
            Box::new(move |addr: &Addr<Retrieval>| catch_up_in_background(documents.clone(), addr.clone()));
        Supervised::start(
            "retrieval",
            RestartPolicy::default(),
            move |child| {
                if !first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    // A restart: the snapshot is read on the retrieval arbiter, not
                    // on the supervisor's; unreadable, the index starts empty and
                    // the catch-up fills it from the store.
                    let empty = Retrieval::load(None).map_err(|e| e.to_string())?;
                    let dir = dir.clone();
                    return Ok(Retrieval::start_in_arbiter(&arbiter, move |_| {
                        let mut r = match Retrieval::load(dir.clone()) {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::error!(error = %e, "search index snapshot unreadable: starting empty");
                                Retrieval { dir, ..empty }
                            }
                        };
                        r.child = Some(child);
                        r
                    }));
                }
                let mut r = Retrieval::load(dir.clone()).map_err(|e| e.to_string())?;
                r.child = Some(child);
                Ok(Retrieval::start_in_arbiter(&arbiter, move |_| r))
            },
            Some(on_restart),
        )
    }

    /// An instance (not started): from the snapshot in `dir` when one reads back.
    fn load(dir: Option<PathBuf>) -> Result<Retrieval, IndexError> {
        let loaded = match &dir {
            Some(d) => SearchIndex::load(d)?,
            None => None,
        };
        if let (Some(d), Some(ix)) = (&dir, &loaded) {
            tracing::info!(dir = %d.display(), chunks = ix.len(), "search index snapshot loaded");
        }
        let index = match loaded {
            Some(ix) => ix,
            None => SearchIndex::new()?,
        };
        Ok(Retrieval {
            index,
            dir,
            unsaved: false,
            child: None,
            removed: HashSet::new(),
        })
    }

    fn save(&mut self) -> Result<(), IndexError> {
        if let (Some(dir), true) = (&self.dir, self.unsaved) {
            self.index.save(dir)?;
            self.unsaved = false;
        }
        Ok(())
    }
}

/// Writes the snapshot now if anything changed (no-op without an index folder).
#[derive(Message)]
#[rtype(result = "Result<(), IndexError>")]
pub struct SaveIndex;

impl Handler<SaveIndex> for Retrieval {
    type Result = Result<(), IndexError>;
    fn handle(&mut self, _: SaveIndex, _: &mut Self::Context) -> Self::Result {
        self.save()
    }
}

/// Ids of the documents in the index.
#[derive(Message)]
#[rtype(result = "Vec<Uuid>")]
pub struct IndexedDocuments;

impl Handler<IndexedDocuments> for Retrieval {
    type Result = Vec<Uuid>;
    fn handle(&mut self, _: IndexedDocuments, _: &mut Self::Context) -> Vec<Uuid> {
        self.index.document_ids()
    }
}

/// Adds (or replaces) documents with their chunks; one commit for the batch.
#[derive(Message)]
#[rtype(result = "Result<(), IndexError>")]
pub struct IndexDocuments(pub Vec<(Document, Vec<Chunk>)>);

impl Handler<IndexDocuments> for Retrieval {
    type Result = Result<(), IndexError>;
    fn handle(&mut self, mut msg: IndexDocuments, _: &mut Self::Context) -> Self::Result {
        msg.0.retain(|(d, _)| !self.removed.contains(&d.id));
        self.unsaved |= !msg.0.is_empty();
        let added = msg.0.iter().try_for_each(|(d, c)| self.index.add(d, c));
        let result = added.and_then(|()| self.index.commit());
        if result.is_err() {
            // All of the batch or none of it: the caller removes it from the store.
            for (d, _) in &msg.0 {
                self.index.remove(d.id);
            }
            let _ = self.index.commit();
        }
        result
    }
}

#[derive(Message)]
#[rtype(result = "Result<(), IndexError>")]
pub struct RemoveDocument(pub Uuid);

impl Handler<RemoveDocument> for Retrieval {
    type Result = Result<(), IndexError>;
    fn handle(&mut self, msg: RemoveDocument, _: &mut Self::Context) -> Self::Result {
        self.unsaved = true;
        self.removed.insert(msg.0);
        self.index.remove(msg.0);
        self.index.commit()
    }
}

#[derive(Message)]
#[rtype(result = "Result<Vec<Hit>, IndexError>")]
pub struct Search {
    pub query: String,
    pub embedding: Option<Vec<f32>>,
    pub route: Route,
    pub reader: Reader,
    pub filters: Filters,
    pub top_k: usize,
}

impl Handler<Search> for Retrieval {
    type Result = Result<Vec<Hit>, IndexError>;
    fn handle(&mut self, m: Search, _: &mut Self::Context) -> Self::Result {
        self.index.search(
            &m.query,
            m.embedding.as_deref(),
            m.route,
            &m.reader,
            &m.filters,
            m.top_k,
        )
    }
}

/// Makes the actor panic (fault tests of its supervision).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash;

impl Handler<Crash> for Retrieval {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        #[allow(clippy::panic)]
        {
            panic!("retrieval crashed on request");
        }
    }
}

/// Chunks indexed.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct IndexedChunks;

impl Handler<IndexedChunks> for Retrieval {
    type Result = usize;
    fn handle(&mut self, _: IndexedChunks, _: &mut Self::Context) -> usize {
        self.index.len()
    }
}

/// Brings the index in line with the store in the background, retrying (with
/// backoff) until the store answers or this instance is gone: after a
/// restart, or when the store was down at start.
pub fn catch_up_in_background(documents: Arc<dyn DocumentStore>, retrieval: Addr<Retrieval>) {
    actix::spawn(async move {
        let (documents, retrieval) = (&documents, &retrieval);
        let done = retry_until_ok("search index catch-up", || async move {
            // An instance that died meanwhile is caught up by its successor's hook.
            if !retrieval.connected() {
                return Ok(None);
            }
            sync(documents.as_ref(), retrieval).await.map(Some)
        })
        .await;
        if let Some(s) = done {
            tracing::info!(
                added = s.added,
                removed = s.removed,
                "search index caught up with the store"
            );
        }
    });
}

/// What `sync` did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Synced {
    /// Documents the index already had (from its snapshot).
    pub kept: usize,
    pub added: usize,
    pub removed: usize,
}

/// Brings the index in line with the store (at start): documents the index has
/// but the store lost are removed, documents the store has but the index lacks
/// are read and added in batches; then a snapshot is written.
pub async fn sync(store: &dyn DocumentStore, retrieval: &Addr<Retrieval>) -> Result<Synced, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let indexed: HashSet<Uuid> = retrieval
        .send_tracked(IndexedDocuments)
        .await
        .map_err(|x| e(&x))?
        .into_iter()
        .collect();
    let stored = store.document_ids(None).await.map_err(|x| e(&x))?;
    let stored_set: HashSet<Uuid> = stored.iter().copied().collect();
    let mut out = Synced::default();
    for gone in indexed.difference(&stored_set) {
        retrieval
            .send_tracked(RemoveDocument(*gone))
            .await
            .map_err(|x| e(&x))?
            .map_err(|x| e(&x))?;
        out.removed += 1;
    }
    let mut batch = Vec::new();
    for id in stored.iter().filter(|id| !indexed.contains(id)) {
        let Some(doc) = store.document(*id).await.map_err(|x| e(&x))? else {
            continue;
        };
        let chunks = store.chunks(*id).await.map_err(|x| e(&x))?;
        batch.push((doc, chunks));
        out.added += 1;
        if batch.len() == 256 {
            let docs = std::mem::take(&mut batch);
            retrieval
                .send_tracked(IndexDocuments(docs))
                .await
                .map_err(|x| e(&x))?
                .map_err(|x| e(&x))?;
        }
    }
    retrieval
        .send_tracked(IndexDocuments(batch))
        .await
        .map_err(|x| e(&x))?
        .map_err(|x| e(&x))?;
    out.kept = stored.len() - out.added;
    retrieval
        .send_tracked(SaveIndex)
        .await
        .map_err(|x| e(&x))?
        .map_err(|x| e(&x))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use ragchat_actors::knowledge::Owner;
    use serde_json::json;

    use super::*;
    use crate::knowledge::index::tests::doc_with;

    #[actix::test]
    async fn a_document_removed_meanwhile_is_not_indexed_again_by_a_late_catch_up() {
        let addr = Retrieval::load(None).expect("index").start();
        let (gone, gone_chunks) = doc_with(Owner::Global, "Gone", &[("deleted text", vec![1.0, 0.0])], json!({}));
        let (kept, kept_chunks) = doc_with(Owner::Global, "Kept", &[("kept text", vec![0.0, 1.0])], json!({}));
        // A catch-up read both; one was deleted before its batch reached the index.
        addr.send(RemoveDocument(gone.id))
            .await
            .expect("alive")
            .expect("removed");
        addr.send(IndexDocuments(vec![(gone, gone_chunks), (kept.clone(), kept_chunks)]))
            .await
            .expect("alive")
            .expect("indexed");
        assert_eq!(addr.send(IndexedDocuments).await.expect("alive"), vec![kept.id]);
    }
}
