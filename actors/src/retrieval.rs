//! Retrieval: the query types (route, filters, hits), the `SearchIndex` port,
//! the retrieval actor that owns an index on its own arbiter (indexing and
//! searches serialised through its mailbox, HTTP workers stay free), and the
//! `Retriever`, the one path from a question to its hits: it asks the embed
//! worker for the query vector, then the actor for the ranking.
//!
//! The index itself (tantivy BM25 + HNSW vectors, snapshots on disk) is an
//! adapter in the `ragchat` crate; with a snapshot folder the actor writes it
//! after changes (at most every `SAVE_EVERY`), so a restart reads it and only
//! catches up with what the store gained or lost meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::embed_worker::{EmbedWorker, Lane};
use crate::inference::ModelError;
use crate::knowledge::{Chunk, Document, Reader};
use crate::ports::DocumentStore;
use crate::supervision::{retry_until_ok, Child, Mailbox, RestartPolicy, SendTracked, Supervised};

const SAVE_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    Vector,
    Text,
    Hybrid,
    /// `text` for queries of one or two words (names, codes: exact terms matter
    /// most), `hybrid` otherwise.
    #[default]
    Auto,
}

impl Route {
    pub fn resolve(self, query: &str) -> Route {
        match self {
            Route::Auto if query.split_whitespace().count() <= 2 => Route::Text,
            Route::Auto => Route::Hybrid,
            r => r,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Vector => "vector",
            Route::Text => "text",
            Route::Hybrid => "hybrid",
            Route::Auto => "auto",
        }
    }

    /// Whether the route needs the query's embedding.
    pub fn needs_vector(self) -> bool {
        matches!(self, Route::Vector | Route::Hybrid)
    }
}

/// A metadata condition: a value (equality), {"in": [...]}, or a range with any
/// of gt, gte, lt, lte (numbers or strings).
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Condition {
    Range(Box<Range>),
    In(In),
    Equals(Value),
}

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Range {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gt: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gte: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lt: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lte: Option<Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct In {
    #[serde(rename = "in")]
    values: Vec<Value>,
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

impl Condition {
    /// A range needs at least one bound (an empty object would match everything).
    pub fn is_valid(&self) -> bool {
        match self {
            Condition::Range(r) => r.gt.is_some() || r.gte.is_some() || r.lt.is_some() || r.lte.is_some(),
            _ => true,
        }
    }

    pub fn matches(&self, v: Option<&Value>) -> bool {
        use std::cmp::Ordering::*;
        let Some(v) = v else { return false };
        match self {
            Condition::Equals(want) => v == want || matches!(v, Value::Array(items) if items.contains(want)),
            Condition::In(In { values }) => values.iter().any(|w| w == v),
            Condition::Range(r) => {
                let Range { gt, gte, lt, lte } = r.as_ref();
                let ok = |bound: &Option<Value>, allowed: &[std::cmp::Ordering]| {
                    bound
                        .as_ref()
                        .is_none_or(|b| compare(v, b).is_some_and(|o| allowed.contains(&o)))
                };
                ok(gt, &[Greater]) && ok(gte, &[Greater, Equal]) && ok(lt, &[Less]) && ok(lte, &[Less, Equal])
            }
        }
    }
}

pub type Filters = HashMap<String, Condition>;

/// `n` (or `default` when not given) when it is 1 to `max`; else what is wrong.
pub fn top_k_within(n: Option<usize>, default: usize, max: usize) -> Result<usize, String> {
    let n = n.unwrap_or(default);
    if (1..=max).contains(&n) {
        Ok(n)
    } else {
        Err(format!("top_k must be 1 to {max}"))
    }
}

/// The text, trimmed, when it is 1 to `max` characters; else what is wrong.
pub fn text_within(text: &str, what: &str, max: usize) -> Result<String, String> {
    let t = text.trim();
    if t.is_empty() || t.chars().count() > max {
        Err(format!("{what} must be 1 to {max} characters"))
    } else {
        Ok(t.to_string())
    }
}

/// The first filter that cannot match anything sensible, as a message.
pub fn invalid_filter(filters: &Filters) -> Option<String> {
    filters
        .iter()
        .find(|(_, c)| !c.is_valid())
        .map(|(field, _)| format!("filter on '{field}': a range needs gt, gte, lt or lte"))
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Hit {
    pub document_id: Uuid,
    pub chunk_id: Uuid,
    pub title: String,
    pub content: String,
    /// The ranking score of the route (BM25, cosine, or the fused value):
    /// comparable only among the hits of one query.
    pub score: f32,
    /// How likely the chunk answers the query, 0–1 on the same scale for every
    /// query (calibrated; above 0.5: more likely an answer than a near miss).
    pub relevance: f32,
    pub source: String,
    /// How its document reached the knowledge base (`api`, `upload:<format>`, `seed`).
    pub source_type: String,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("search index: {0}")]
pub struct IndexError(pub String);

impl IndexError {
    pub fn of(e: impl std::fmt::Display) -> Self {
        IndexError(e.to_string())
    }
}

/// The port to a search index over chunks (implemented in the `ragchat` crate:
/// BM25 with tantivy, vectors exact or HNSW, snapshots on disk).
pub trait SearchIndex: Send + 'static {
    /// Adds (or replaces) a document's chunks; visible after `commit`.
    fn add(&mut self, doc: &Document, chunks: &[Chunk]) -> Result<(), IndexError>;
    fn remove(&mut self, document_id: Uuid);
    fn commit(&mut self) -> Result<(), IndexError>;
    /// The `top_k` chunks for a query; `embedding` is needed for vector and hybrid.
    fn search(
        &self,
        query: &str,
        embedding: Option<&[f32]>,
        route: Route,
        reader: &Reader,
        filters: &Filters,
        top_k: usize,
    ) -> Result<Vec<Hit>, IndexError>;
    fn document_ids(&self) -> Vec<Uuid>;
    fn has_document(&self, id: Uuid) -> bool {
        self.document_ids().contains(&id)
    }
    /// Chunks indexed.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes a snapshot where the index keeps one (a no-op otherwise).
    fn save(&mut self) -> Result<(), IndexError>;
}

/// Where instances of an index come from: the last snapshot, or empty.
pub trait IndexSource: Send + Sync + 'static {
    /// The index as last saved; empty when there is no snapshot.
    fn load(&self) -> Result<Box<dyn SearchIndex>, IndexError>;
    fn empty(&self) -> Result<Box<dyn SearchIndex>, IndexError>;
    /// Whether `save` writes anything (the actor saves on a timer only then).
    fn persistent(&self) -> bool;
}

pub struct Retrieval {
    index: Box<dyn SearchIndex>,
    persistent: bool,
    /// Changed since the last snapshot.
    unsaved: bool,
    child: Option<Arc<Child>>,
    /// Documents removed while this instance runs: a catch-up `sync` that read
    /// one before its deletion must not index it again.
    removed: HashSet<Uuid>,
}

pub static RETRIEVAL_MAILBOX: Mailbox = Mailbox::new("retrieval");
crate::tracked_mailbox!(Retrieval, RETRIEVAL_MAILBOX;
    SaveIndex, IndexedDocuments, HasDocuments, IndexDocuments, RemoveDocument, Search, IndexedChunks, Crash);

impl Actor for Retrieval {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.persistent {
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
    /// An instance over `index` (not started).
    pub fn new(index: Box<dyn SearchIndex>, persistent: bool) -> Retrieval {
        Retrieval {
            index,
            persistent,
            unsaved: false,
            child: None,
            removed: HashSet::new(),
        }
    }

    /// Starts the actor on an arbiter of its own under a supervisor, from the
    /// source's snapshot. After a restart (the actor died) the new instance
    /// starts from the snapshot (empty if it does not read back) and catches up
    /// with `documents` in the background. The first instance is brought in
    /// line by the caller (`sync`).
    pub fn supervised(
        source: Arc<dyn IndexSource>,
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
                let persistent = source.persistent();
                if !first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    // A restart: the snapshot is read on the retrieval arbiter, not
                    // on the supervisor's; unreadable, the index starts empty and
                    // the catch-up fills it from the store.
                    let source = source.clone();
                    return Ok(Retrieval::start_in_arbiter(&arbiter, move |_| {
                        let index = source.load().or_else(|e| {
                            tracing::error!(error = %e, "search index snapshot unreadable: starting empty");
                            source.empty()
                        });
                        let index = match index {
                            Ok(ix) => ix,
                            Err(e) => {
                                // Nothing to run on: this instance stops and is restarted later.
                                tracing::error!(error = %e, "no search index could be made");
                                Box::new(NoIndex)
                            }
                        };
                        let mut r = Retrieval::new(index, persistent);
                        r.child = Some(child);
                        r
                    }));
                }
                let mut r = Retrieval::new(source.load().map_err(|e| e.to_string())?, persistent);
                r.child = Some(child);
                Ok(Retrieval::start_in_arbiter(&arbiter, move |_| r))
            },
            Some(on_restart),
        )
    }

    fn save(&mut self) -> Result<(), IndexError> {
        if self.unsaved {
            self.index.save()?;
            self.unsaved = false;
        }
        Ok(())
    }
}

/// An index that holds nothing and refuses changes (when none could be made).
struct NoIndex;

impl SearchIndex for NoIndex {
    fn add(&mut self, _: &Document, _: &[Chunk]) -> Result<(), IndexError> {
        Err(IndexError("no search index".into()))
    }
    fn remove(&mut self, _: Uuid) {}
    fn commit(&mut self) -> Result<(), IndexError> {
        Ok(())
    }
    fn search(
        &self,
        _: &str,
        _: Option<&[f32]>,
        _: Route,
        _: &Reader,
        _: &Filters,
        _: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        Err(IndexError("no search index".into()))
    }
    fn document_ids(&self) -> Vec<Uuid> {
        Vec::new()
    }
    fn len(&self) -> usize {
        0
    }
    fn save(&mut self) -> Result<(), IndexError> {
        Ok(())
    }
}

/// Writes the snapshot now if anything changed (no-op without a snapshot folder).
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

/// Which of these documents the index has.
#[derive(Message)]
#[rtype(result = "Vec<Uuid>")]
pub struct HasDocuments(pub Vec<Uuid>);

impl Handler<HasDocuments> for Retrieval {
    type Result = Vec<Uuid>;
    fn handle(&mut self, msg: HasDocuments, _: &mut Self::Context) -> Vec<Uuid> {
        msg.0.into_iter().filter(|id| self.index.has_document(*id)).collect()
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

/// A ranking by an index (the query's embedding already made).
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

/// How many documents a catch-up reads from the store at once.
const SYNC_READS: usize = 64;

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
    // The missing documents are read SYNC_READS at a time, in one bulk read
    // each: one by one, a node that was down while a few thousand documents
    // arrived spent its start waiting on round trips (four per document on MongoDB).
    let missing: Vec<Uuid> = stored.iter().copied().filter(|id| !indexed.contains(id)).collect();
    let mut batch = Vec::new();
    for ids in missing.chunks(SYNC_READS) {
        let read = store.documents_with_chunks(ids).await.map_err(|x| e(&x))?;
        out.added += read.len();
        batch.extend(read);
        if batch.len() >= 256 {
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
    if out.added + out.removed > 0 {
        retrieval
            .send_tracked(SaveIndex)
            .await
            .map_err(|x| e(&x))?
            .map_err(|x| e(&x))?;
    }
    Ok(out)
}

/// Reconciles the index with the store every `every`, so that documents other
/// nodes sharing the store added or deleted are found (or no longer cited) here
/// within that time; a reconciliation that fails (the store is down) is tried at
/// the next tick. Each tick lists the store's document ids (one query) and reads
/// only the documents this index lacks. Not seen: chunks replaced in place
/// (re-indexing on another node) and visibility changes of a kept document.
pub fn reconcile_every(documents: Arc<dyn DocumentStore>, retrieval: Arc<Supervised<Retrieval>>, every: Duration) {
    actix::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match sync(documents.as_ref(), &retrieval.addr()).await {
                Ok(s) if s.added + s.removed > 0 => {
                    metrics::counter!("search_index_reconciled_total", "change" => "added").increment(s.added as u64);
                    metrics::counter!("search_index_reconciled_total", "change" => "removed")
                        .increment(s.removed as u64);
                    tracing::info!(
                        added = s.added,
                        removed = s.removed,
                        "search index reconciled with the store"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "search index reconciliation failed; trying again later"),
            }
        }
    });
}

/// A search request, as chat and /knowledge/search make it.
#[derive(Debug, Clone)]
pub struct Query {
    pub text: String,
    pub route: Route,
    pub reader: Reader,
    pub filters: Filters,
    pub top_k: usize,
    /// Without the embedding model: search by text (chat, which must answer)
    /// instead of refusing a route that needs vectors (search, which must not
    /// silently answer something else).
    pub text_without_embedder: bool,
}

/// What a search found, and the route that ran (`auto` resolved).
#[derive(Debug, Clone)]
pub struct Found {
    pub route: Route,
    pub hits: Vec<Hit>,
}

#[derive(Debug, thiserror::Error)]
pub enum RetrievalError {
    #[error("the search index is not running")]
    NotRunning,
    #[error("the embedding model is not loaded; use route \"text\"")]
    NoEmbedder,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("the search index did not answer: {0}")]
    Mailbox(String),
}

/// The one way from a question to its hits: the query's embedding from the
/// embed worker (for routes that need it), then the ranking from the retrieval
/// actor; its time recorded in `retrieval_duration_seconds{route}`.
#[derive(Clone)]
pub struct Retriever {
    actor: Option<Arc<Supervised<Retrieval>>>,
    embedder: Option<EmbedWorker>,
    /// Put before a question when it is embedded (the model's query instruction).
    query_prefix: Arc<str>,
}

impl Retriever {
    pub fn new(actor: Option<Arc<Supervised<Retrieval>>>, embedder: Option<EmbedWorker>) -> Self {
        Retriever {
            actor,
            embedder,
            query_prefix: Arc::from(""),
        }
    }

    /// Questions are embedded with `prefix` before them (chunks are not).
    pub fn with_query_prefix(mut self, prefix: &str) -> Self {
        self.query_prefix = Arc::from(prefix);
        self
    }

    /// The supervised actor (for indexing, stats and fault tests).
    pub fn actor(&self) -> Option<&Arc<Supervised<Retrieval>>> {
        self.actor.as_ref()
    }

    pub fn has_embedder(&self) -> bool {
        self.embedder.is_some()
    }

    /// The embedding model retrieval uses (chat grounds answers with it too).
    pub fn embedder(&self) -> Option<&EmbedWorker> {
        self.embedder.as_ref()
    }

    /// The route a query runs on.
    pub fn route_for(&self, q: &Query) -> Result<Route, RetrievalError> {
        let route = q.route.resolve(&q.text);
        match (route.needs_vector(), &self.embedder) {
            (true, None) if q.text_without_embedder => Ok(Route::Text),
            (true, None) => Err(RetrievalError::NoEmbedder),
            _ => Ok(route),
        }
    }

    pub async fn search(&self, q: Query) -> Result<Found, RetrievalError> {
        let started = Instant::now();
        let actor = self.actor.as_ref().ok_or(RetrievalError::NotRunning)?;
        let route = self.route_for(&q)?;
        let embedding = match (&self.embedder, route.needs_vector()) {
            (Some(e), true) => {
                let text = format!("{}{}", self.query_prefix, q.text);
                e.embed(Lane::Interactive, vec![text]).await?.vectors.pop()
            }
            _ => None,
        };
        let hits = actor
            .send(Search {
                query: q.text,
                embedding,
                route,
                reader: q.reader,
                filters: q.filters,
                top_k: q.top_k,
            })
            .await
            .map_err(|e| RetrievalError::Mailbox(e.to_string()))??;
        metrics::histogram!("retrieval_duration_seconds", "route" => route.as_str())
            .record(started.elapsed().as_secs_f64());
        Ok(Found { route, hits })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_text_for_short_queries_and_hybrid_otherwise() {
        assert_eq!(Route::Auto.resolve("BRCA1"), Route::Text);
        assert_eq!(Route::Auto.resolve("two words"), Route::Text);
        assert_eq!(Route::Auto.resolve("what causes the flu"), Route::Hybrid);
        assert_eq!(Route::Vector.resolve("x"), Route::Vector);
    }

    #[test]
    fn without_an_embedder_chat_falls_back_to_text_and_search_refuses() {
        let r = Retriever::new(None, None);
        let mut q = Query {
            text: "what causes the flu".into(),
            route: Route::Auto,
            reader: Reader {
                user_id: Uuid::nil(),
                organization_id: None,
            },
            filters: Filters::new(),
            top_k: 3,
            text_without_embedder: true,
        };
        assert_eq!(r.route_for(&q).ok(), Some(Route::Text));
        q.text_without_embedder = false;
        assert!(matches!(r.route_for(&q), Err(RetrievalError::NoEmbedder)));
        q.route = Route::Text;
        assert_eq!(r.route_for(&q).ok(), Some(Route::Text));
    }

    #[test]
    fn a_range_without_bounds_is_refused() {
        let f: Filters = serde_json::from_value(serde_json::json!({"year": {}, "kind": "paper"})).unwrap_or_default();
        assert_eq!(
            invalid_filter(&f).as_deref(),
            Some("filter on 'year': a range needs gt, gte, lt or lte")
        );
    }
}
