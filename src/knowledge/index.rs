//! The in-process search index over every chunk: vector search (cosine on
//! unit-length embeddings: exact up to `EXACT_MAX` chunks, HNSW beyond) and
//! BM25 with tantivy over each chunk and its document's title as one field
//! (English stemming), fused with the vector route for `hybrid` (see `Fusion`).
//! Visibility and metadata filters are applied to every route before ranking is
//! cut to top_k.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ragchat_actors::knowledge::{Chunk, Document, Owner, Reader};
use ragchat_actors::retrieval::{Filters, Hit, IndexError, Route};
use serde::Deserialize;
use serde_json::Value;
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, BoostQuery, Occur, PhraseQuery, Query, TermQuery, TermSetQuery};
use tantivy::schema::{IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED, STRING};
use tantivy::tokenizer::TextAnalyzer;
use tantivy::{doc, Index, IndexReader, IndexWriter, TantivyDocument, Term};
use uuid::Uuid;

use super::calibration;
use super::hnsw::{Hnsw, HnswConfig};

/// Reciprocal rank fusion constant (Cormack et al.; the usual 60).
pub const RRF_K: f32 = 60.0;
/// The default of `Fusion::Convex`'s `depth`: each route of `hybrid` gives at
/// least this many candidates, and each list is scaled by its best score and
/// its score at this rank. A deeper list (a larger top_k) adds candidates
/// below, but does not change how the ones above are scored, so the first
/// results of a search are the same whatever top_k it asks for. 300 rather
/// than 100: nDCG@10 +0.003 on SciFact's train split in 4 of 5 folds, hybrid
/// p99 at 1M chunks 1.2× (BENCHMARKS.md, "Fusion that does not depend on top_k").
pub const FUSION_DEPTH: usize = 300;
/// Candidates each route gives at least for the other fusions.
const MIN_CANDIDATES: usize = 100;
/// Distinct query terms the text route scores (a longer question's rest is
/// left out: each term is a posting list to walk).
pub const MAX_QUERY_TERMS: usize = 256;
/// Up to this many live chunks the vector route scans them all (exact, and
/// fast enough: ~1 ms); beyond, it searches the HNSW graph.
pub const EXACT_MAX: usize = 20_000;
/// Rebuild the graph when deleted nodes outnumber live ones (and are many).
const REBUILD_DELETED: usize = 10_000;
/// Rebuild the whole index (slots, text index, graph) from its live chunks when
/// removed ones outnumber them and are at least this many: a removed chunk
/// otherwise keeps its slot, its text in tantivy's segments and its graph node.
const COMPACT_REMOVED: usize = 256;
const NO_NODE: u32 = u32::MAX;
/// Version of the snapshot `save` writes.
const SNAPSHOT_FORMAT: u32 = 2;

/// How `hybrid` merges the vector and text rankings (each `depth` long).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fusion {
    /// Reciprocal rank fusion: Σ weight / (k + rank), text weighted `text_weight`.
    Rrf { k: f32, text_weight: f32 },
    /// alpha · vector + (1 − alpha) · text, each score min-max normalized
    /// between its list's best and its `depth`-th (absent from a list or below
    /// that rank: 0). Each route gives at least `depth` candidates.
    Convex { alpha: f32, depth: usize },
    /// `cos · cosine + text · ln(1 + BM25)` on the absolute features (the
    /// calibrated relevance's linear part): a candidate of the text list alone
    /// has its cosine computed, one of the vector list alone a BM25 of 0.
    Logistic { cos: f32, text: f32 },
}

/// Pseudo-relevance feedback on the vector route (Rocchio): the query's vector
/// moved toward the mean of its `docs` best chunks by `weight`, then searched again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prf {
    pub docs: usize,
    pub weight: f32,
}

/// Term proximity for the text route: each pair of neighbouring question words
/// also counts as a phrase (the two in order, at most `slop` words between
/// them in the chunk), its BM25 weighed `weight`, beside the words alone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Proximity {
    pub weight: f32,
    pub slop: u32,
}

/// Tuned on SciFact's train split (`ragchat eval beir --fusion-grid --folds 5`):
/// nDCG@10 0.734 against 0.716 for reciprocal rank fusion with k = 60, with
/// all-MiniLM-L6-v2. Each embedding model's own is `Fusion::ranking_of`.
impl Default for Fusion {
    fn default() -> Self {
        Fusion::Convex {
            alpha: 0.5,
            depth: FUSION_DEPTH,
        }
    }
}

impl Fusion {
    /// The fusion an embedding model's calibration ranks with.
    pub fn ranking_of(c: &calibration::Calibration) -> Fusion {
        match c.ranking {
            calibration::Ranking::Convex => Fusion::default(),
            calibration::Ranking::Logistic { text_scale } => Fusion::Logistic {
                cos: c.hybrid.cos as f32,
                text: (c.hybrid.text * text_scale) as f32,
            },
        }
    }

    /// Candidates each route gives at least (and fetches when top_k·10 is less).
    fn depth(self) -> usize {
        match self {
            Fusion::Convex { depth, .. } => depth.max(1),
            _ => MIN_CANDIDATES,
        }
    }

    /// `cosine` gives a slot's cosine with the query (for `Logistic`).
    fn fuse(self, vector: &[(usize, f32)], text: &[(usize, f32)], cosine: impl Fn(usize) -> f32) -> Vec<(usize, f32)> {
        let mut fused: HashMap<usize, f32> = HashMap::new();
        match self {
            Fusion::Logistic { cos, text: w } => {
                for (slot, c) in vector {
                    fused.insert(*slot, cos * c);
                }
                for (slot, bm25) in text {
                    let base = match fused.get(slot) {
                        Some(v) => *v,
                        None => cos * cosine(*slot),
                    };
                    fused.insert(*slot, base + w * bm25.max(0.0).ln_1p());
                }
            }
            Fusion::Rrf { k, text_weight } => {
                for (list, w) in [(vector, 1.0), (text, text_weight)] {
                    for (rank, (slot, _)) in list.iter().enumerate() {
                        *fused.entry(*slot).or_default() += w / (k + rank as f32 + 1.0);
                    }
                }
            }
            Fusion::Convex { alpha, depth } => {
                // Below both lists' `depth`-th the fused score is 0: those
                // are ordered after every other by their unclamped sum (≤ 0).
                let mut below: HashMap<usize, f32> = HashMap::new();
                for (list, w) in [(vector, alpha), (text, 1.0 - alpha)] {
                    // Lists come best first: the lowest of the first `depth` is
                    // the score at that rank (or the list's last).
                    let hi = list.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
                    let lo = list
                        .iter()
                        .take(depth.max(1))
                        .map(|x| x.1)
                        .fold(f32::INFINITY, f32::min);
                    let span = (hi - lo).max(1e-9);
                    for (slot, score) in list {
                        let x = w * (score - lo) / span;
                        *fused.entry(*slot).or_default() += x.max(0.0);
                        *below.entry(*slot).or_default() += x.min(0.0);
                    }
                }
                for (slot, score) in fused.iter_mut() {
                    if *score <= 0.0 {
                        *score = below.get(slot).copied().unwrap_or(0.0);
                    }
                }
            }
        }
        fused.into_iter().collect()
    }
}

/// What the chunks of one document share, held once per document.
struct DocInfo {
    id: Uuid,
    owner: Owner,
    title: String,
    source: String,
    origin: String,
    metadata: serde_json::Map<String, Value>,
}

struct Entry {
    chunk_id: Uuid,
    doc: Arc<DocInfo>,
    content: String,
    /// Its vector in the graph (NO_NODE until committed or without a vector).
    node: u32,
    /// Its sentences' vectors, one after another (`set_sentences`; empty: none).
    sentences: Vec<f32>,
}

pub struct HybridIndex {
    slots: Vec<Option<Entry>>,
    /// Vectors live in the graph only (one copy), exact scans included.
    graph: Option<Hnsw>,
    hnsw: HnswConfig,
    slot_of_node: Vec<u32>,
    /// Vectors added since the last commit: (slot, vector).
    pending: Vec<(usize, Vec<f32>)>,
    exact_max: usize,
    fusion: Fusion,
    prf: Option<Prf>,
    /// Phrase pairs in the text route (None: words alone).
    proximity: Option<Proximity>,
    /// How a hit's relevance is computed (the embedding model's fitted weights).
    calibration: calibration::Calibration,
    /// Weight of the sentence part in hybrid ranking (None: off).
    sentence_part: Option<f32>,
    by_document: HashMap<Uuid, Vec<usize>>,
    writer: IndexWriter,
    reader: IndexReader,
    key: tantivy::schema::Field,
    /// The document's title and the chunk, one BM25 field (a separate title
    /// field with its own length norm ranked worse: see BENCHMARKS.md).
    text: tantivy::schema::Field,
    /// The chunk's owner key (`user:…`, `org:…`, `global`): the text route asks
    /// only for what the reader may see, before ranking is cut.
    owner: tantivy::schema::Field,
    /// The text field's analyzer, for the query's terms.
    analyzer: TextAnalyzer,
    dirty: bool,
    /// Slots emptied by `remove` since the last compaction.
    removed: usize,
}

fn index_error(e: impl std::fmt::Display) -> IndexError {
    IndexError::of(e)
}

impl HybridIndex {
    pub fn new() -> Result<Self, IndexError> {
        let mut sb = Schema::builder();
        let key = sb.add_u64_field("key", INDEXED | FAST);
        let text = TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("en_stem")
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        );
        let text = sb.add_text_field("text", text);
        let owner = sb.add_text_field("owner", STRING);
        let index = Index::create_in_ram(sb.build());
        let writer = index.writer_with_num_threads(1, 32 << 20).map_err(index_error)?;
        let reader = index.reader().map_err(index_error)?;
        let analyzer = index.tokenizer_for_field(text).map_err(index_error)?;
        Ok(HybridIndex {
            slots: Vec::new(),
            graph: None,
            hnsw: HnswConfig::default(),
            slot_of_node: Vec::new(),
            pending: Vec::new(),
            exact_max: EXACT_MAX,
            fusion: Fusion::default(),
            prf: None,
            proximity: None,
            calibration: calibration::MINILM_L6,
            sentence_part: None,
            by_document: HashMap::new(),
            writer,
            reader,
            key,
            text,
            owner,
            analyzer,
            dirty: false,
            removed: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a document's chunks (replacing any it had). Call `commit` after a batch.
    pub fn add(&mut self, doc: &Document, chunks: &[Chunk]) -> Result<(), IndexError> {
        self.remove(doc.id);
        let owner_key = doc.owner.to_string();
        let info = Arc::new(DocInfo {
            id: doc.id,
            owner: doc.owner,
            title: doc.title.clone(),
            source: doc.source.clone(),
            origin: doc.origin.clone(),
            metadata: doc.metadata.clone(),
        });
        let mut slots = Vec::with_capacity(chunks.len());
        for c in chunks {
            let slot = self.slots.len();
            self.writer
                .add_document(self.text_doc(slot, &doc.title, &c.content, &owner_key))
                .map_err(index_error)?;
            self.slots.push(Some(Entry {
                chunk_id: c.id,
                doc: info.clone(),
                content: c.content.clone(),
                node: NO_NODE,
                sentences: Vec::new(),
            }));
            if !c.embedding.is_empty() {
                self.pending.push((slot, c.embedding.clone()));
            }
            slots.push(slot);
        }
        self.by_document.insert(doc.id, slots);
        self.dirty = true;
        Ok(())
    }

    pub fn remove(&mut self, document_id: Uuid) {
        if let Some(slots) = self.by_document.remove(&document_id) {
            self.removed += slots.len();
            for s in slots {
                self.writer.delete_term(Term::from_field_u64(self.key, s as u64));
                if let Some(e) = self.slots[s].take() {
                    if let (Some(g), true) = (self.graph.as_mut(), e.node != NO_NODE) {
                        g.remove(e.node);
                    }
                }
            }
            self.pending.retain(|(slot, _)| self.slots[*slot].is_some());
            self.dirty = true;
        }
    }

    /// Sets when the vector route switches from exact scans to the graph, and
    /// the graph's parameters (benchmarks and tests).
    pub fn with_vector_search(mut self, exact_max: usize, hnsw: HnswConfig) -> Self {
        self.exact_max = exact_max;
        self.hnsw = hnsw;
        self
    }

    /// What the text route indexes for a chunk.
    fn text_doc(&self, slot: usize, title: &str, content: &str, owner_key: &str) -> TantivyDocument {
        doc!(self.key => slot as u64, self.text => format!("{title}\n{content}"), self.owner => owner_key)
    }

    /// How `hybrid` fuses its two rankings.
    pub fn set_fusion(&mut self, fusion: Fusion) {
        self.fusion = fusion;
    }

    /// Pseudo-relevance feedback for the vector part of a search (None: off).
    pub fn set_prf(&mut self, prf: Option<Prf>) {
        self.prf = prf;
    }

    /// The relevance model of the embedding model in use (all-MiniLM-L6-v2's
    /// by default), and the fusion it ranks with (`Fusion::ranking_of`; a later
    /// `set_fusion` overrides it).
    pub fn set_calibration(&mut self, calibration: calibration::Calibration) {
        self.calibration = calibration;
        self.fusion = Fusion::ranking_of(&calibration);
    }

    /// Term proximity for the text route (None: off). Measured by
    /// `ragchat eval beir --levers`.
    pub fn set_proximity(&mut self, proximity: Option<Proximity>) {
        self.proximity = proximity;
    }

    /// The sentence part of hybrid ranking: each fused candidate's best cosine
    /// among its chunk's sentences (`set_sentences`; its chunk's cosine when it
    /// has none), min-max normalized over the candidates, weighs `weight` and the
    /// fusion `1 − weight`. None: off. Measured by `ragchat eval beir --sentences`.
    pub fn set_sentence_part(&mut self, weight: Option<f32>) {
        self.sentence_part = weight.map(|w| w.clamp(0.0, 1.0));
    }

    /// Sets the sentence vectors of a document's chunks: `per_chunk[i]` holds
    /// those of its i-th chunk (in the order `add` got them), each `dim` long,
    /// one after another. Not in snapshots: for measurements (`eval beir`).
    pub fn set_sentences(&mut self, document_id: Uuid, per_chunk: Vec<Vec<f32>>) -> Result<(), IndexError> {
        let slots = self
            .by_document
            .get(&document_id)
            .ok_or_else(|| IndexError("no such document in the index".into()))?;
        let dim = self.graph.as_ref().map(Hnsw::dim);
        if slots.len() != per_chunk.len() {
            return Err(IndexError(format!(
                "{} chunks, {} sets of sentence vectors",
                slots.len(),
                per_chunk.len()
            )));
        }
        if let Some(v) = per_chunk
            .iter()
            .find(|v| dim.is_some_and(|d| !v.len().is_multiple_of(d)))
        {
            return Err(IndexError(format!(
                "{} values is not a whole number of vectors",
                v.len()
            )));
        }
        for (slot, v) in slots.clone().into_iter().zip(per_chunk) {
            if let Some(e) = self.slots[slot].as_mut() {
                e.sentences = v;
            }
        }
        Ok(())
    }

    /// Mixes the sentence part into fused scores (see `set_sentence_part`): of
    /// the candidates fusion did not score below 0 (within either list's
    /// fusion depth), so the top results do not depend on top_k either.
    fn add_sentence_part(&self, fused: &mut [(usize, f32)], query: &[f32], weight: f32) {
        let best = |slot: usize| -> f32 {
            match self.slots.get(slot).and_then(Option::as_ref) {
                Some(e) if !e.sentences.is_empty() && e.sentences.len().is_multiple_of(query.len()) => e
                    .sentences
                    .chunks_exact(query.len())
                    .map(|s| crate::inference::fast::dot(query, s))
                    .fold(f32::NEG_INFINITY, f32::max),
                _ => self.cosine(slot, query).unwrap_or(0.0),
            }
        };
        let scored: Vec<(usize, f32)> = fused
            .iter()
            .enumerate()
            .filter(|(_, (_, score))| *score >= 0.0)
            .map(|(i, (slot, _))| (i, best(*slot)))
            .collect();
        let hi = scored.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
        let lo = scored.iter().map(|x| x.1).fold(f32::INFINITY, f32::min);
        let span = (hi - lo).max(1e-9);
        for (i, b) in scored {
            let score = &mut fused[i].1;
            *score = (1.0 - weight) * *score + weight * (b - lo) / span;
        }
    }

    /// The query vector moved toward its best chunks (`Prf`), unit length; the
    /// query itself when feedback is off or nothing was found.
    fn feedback(&self, query: &[f32], reader: &Reader, filters: &Filters) -> Option<Vec<f32>> {
        let prf = self.prf?;
        let graph = self.graph.as_ref()?;
        let top = self.vector_search(query, reader, filters, prf.docs);
        let nodes: Vec<u32> = top
            .iter()
            .filter_map(|(slot, _)| self.slots.get(*slot)?.as_ref())
            .map(|e| e.node)
            .filter(|n| *n != NO_NODE)
            .collect();
        if nodes.is_empty() {
            return None;
        }
        let share = prf.weight / nodes.len() as f32;
        let mut moved = query.to_vec();
        for n in nodes {
            for (m, x) in moved.iter_mut().zip(graph.vector(n)) {
                *m += share * x;
            }
        }
        let norm = moved.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        moved.iter_mut().for_each(|x| *x /= norm);
        Some(moved)
    }

    /// Bytes held by the vectors and the graph.
    pub fn vector_memory_bytes(&self) -> usize {
        self.graph.as_ref().map_or(0, Hnsw::memory_bytes)
    }

    /// Puts pending vectors into the graph (in parallel rounds when many).
    fn insert_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let Some(dim) = pending.first().map(|(_, v)| v.len()) else {
            return;
        };
        let graph = self.graph.get_or_insert_with(|| Hnsw::new(dim, self.hnsw));
        // A vector of another size (the model changed) cannot be compared: it is
        // left out of the vector route, still found by text.
        let (slots, vectors): (Vec<usize>, Vec<Vec<f32>>) =
            pending.into_iter().filter(|(_, v)| v.len() == graph.dim()).unzip();
        let first = graph.insert_many(&vectors);
        for (i, slot) in slots.into_iter().enumerate() {
            let node = first + i as u32;
            self.slot_of_node.push(slot as u32);
            if let Some(e) = self.slots[slot].as_mut() {
                e.node = node;
            }
        }
        let deleted = graph.len() - graph.live();
        if deleted > REBUILD_DELETED && deleted > graph.live() {
            self.rebuild_graph();
        }
    }

    /// A new graph from the live vectors only.
    fn rebuild_graph(&mut self) {
        let Some(old) = self.graph.take() else { return };
        let mut slots = Vec::new();
        let mut vectors = Vec::new();
        for (slot, e) in self.slots.iter().enumerate() {
            if let Some(e) = e.as_ref().filter(|e| e.node != NO_NODE) {
                slots.push(slot);
                vectors.push(old.vector(e.node).to_vec());
            }
        }
        let mut graph = Hnsw::new(old.dim(), self.hnsw);
        drop(old);
        graph.insert_many(&vectors);
        self.slot_of_node = slots.iter().map(|s| *s as u32).collect();
        for (node, slot) in slots.into_iter().enumerate() {
            if let Some(e) = self.slots[slot].as_mut() {
                e.node = node as u32;
            }
        }
        self.graph = Some(graph);
    }

    /// Ids of the documents in the index.
    pub fn document_ids(&self) -> Vec<Uuid> {
        self.by_document.keys().copied().collect()
    }

    pub fn has_document(&self, id: Uuid) -> bool {
        self.by_document.contains_key(&id)
    }

    /// Writes the index to `dir`: a new snapshot folder with the entries, the
    /// graph and a manifest, then the `current` file is switched to it by a
    /// rename (a crash leaves the previous snapshot in use), then older
    /// snapshots are removed. BM25 is rebuilt from the entries when loaded.
    pub fn save(&mut self, dir: &std::path::Path) -> Result<(), IndexError> {
        use std::io::Write;
        self.commit()?;
        let name = format!("snapshot-{}", Uuid::new_v4().simple());
        let snap = dir.join(&name);
        std::fs::create_dir_all(&snap).map_err(index_error)?;
        let mut entries =
            std::io::BufWriter::new(std::fs::File::create(snap.join("entries.jsonl")).map_err(index_error)?);
        let mut count = 0usize;
        for e in self.slots.iter().flatten() {
            let line = serde_json::json!({
                "c": e.chunk_id, "d": e.doc.id, "o": e.doc.owner.to_string(), "t": e.doc.title,
                "s": e.doc.source, "g": e.doc.origin, "x": e.content, "m": e.doc.metadata, "n": e.node,
            });
            serde_json::to_writer(&mut entries, &line).map_err(index_error)?;
            entries.write_all(b"\n").map_err(index_error)?;
            count += 1;
        }
        // On disk before `current` points at it (the old snapshot is removed after).
        entries
            .into_inner()
            .map_err(index_error)?
            .sync_all()
            .map_err(index_error)?;
        if let Some(g) = &self.graph {
            let mut graph =
                std::io::BufWriter::new(std::fs::File::create(snap.join("graph.bin")).map_err(index_error)?);
            g.write_to(&mut graph).map_err(index_error)?;
            graph
                .into_inner()
                .map_err(index_error)?
                .sync_all()
                .map_err(index_error)?;
        }
        let manifest = serde_json::json!({"format": SNAPSHOT_FORMAT, "entries": count, "graph": self.graph.is_some()});
        std::fs::write(snap.join("manifest.json"), manifest.to_string()).map_err(index_error)?;
        std::fs::write(dir.join("current.tmp"), &name).map_err(index_error)?;
        std::fs::rename(dir.join("current.tmp"), dir.join("current")).map_err(index_error)?;
        if let Ok(list) = std::fs::read_dir(dir) {
            for old in list.flatten() {
                let n = old.file_name().to_string_lossy().to_string();
                if n.starts_with("snapshot-") && n != name {
                    let _ = std::fs::remove_dir_all(old.path());
                }
            }
        }
        Ok(())
    }

    /// Reads an index written by `save`; None when there is none or it does not
    /// read back whole (the caller rebuilds from the store).
    pub fn load(dir: &std::path::Path) -> Result<Option<HybridIndex>, IndexError> {
        let Ok(current) = std::fs::read_to_string(dir.join("current")) else {
            return Ok(None);
        };
        let current = current.trim();
        if !current.starts_with("snapshot-") || current.contains(['/', '\\']) {
            return Ok(None);
        }
        let dir = dir.join(current);
        let Ok(manifest) = std::fs::read_to_string(dir.join("manifest.json")) else {
            return Ok(None);
        };
        let Ok(manifest) = serde_json::from_str::<Value>(&manifest) else {
            return Ok(None);
        };
        if manifest["format"] != SNAPSHOT_FORMAT {
            return Ok(None);
        }
        let mut index = HybridIndex::new()?;
        if manifest["graph"] == true {
            let Ok(file) = std::fs::File::open(dir.join("graph.bin")) else {
                return Ok(None);
            };
            match Hnsw::read_from(&mut std::io::BufReader::new(file)) {
                Ok(Some(g)) => {
                    index.slot_of_node = vec![NO_NODE; g.len()];
                    index.hnsw = g.config();
                    index.graph = Some(g);
                }
                _ => return Ok(None),
            }
        }
        let Ok(text) = std::fs::read_to_string(dir.join("entries.jsonl")) else {
            return Ok(None);
        };
        #[derive(Deserialize)]
        struct Saved {
            c: Uuid,
            d: Uuid,
            o: String,
            t: String,
            s: String,
            g: String,
            x: String,
            m: serde_json::Map<String, Value>,
            n: u32,
        }
        let nodes = index.slot_of_node.len();
        let mut infos: HashMap<Uuid, Arc<DocInfo>> = HashMap::new();
        for line in text.lines() {
            let Ok(e) = serde_json::from_str::<Saved>(line) else {
                return Ok(None);
            };
            let (Ok(owner), true) = (e.o.parse::<Owner>(), e.n == NO_NODE || (e.n as usize) < nodes) else {
                return Ok(None);
            };
            let slot = index.slots.len();
            let text = index.text_doc(slot, &e.t, &e.x, &e.o);
            index.writer.add_document(text).map_err(index_error)?;
            if e.n != NO_NODE {
                index.slot_of_node[e.n as usize] = slot as u32;
            }
            index.by_document.entry(e.d).or_default().push(slot);
            // The document's fields are on each of its lines: kept once.
            let doc = infos
                .entry(e.d)
                .or_insert_with(|| {
                    Arc::new(DocInfo {
                        id: e.d,
                        owner,
                        title: e.t,
                        source: e.s,
                        origin: e.g,
                        metadata: e.m,
                    })
                })
                .clone();
            index.slots.push(Some(Entry {
                chunk_id: e.c,
                doc,
                content: e.x,
                node: e.n,
                sentences: Vec::new(),
            }));
        }
        if manifest["entries"].as_u64() != Some(index.slots.len() as u64) {
            return Ok(None);
        }
        index.dirty = true;
        index.commit()?;
        Ok(Some(index))
    }

    pub fn commit(&mut self) -> Result<(), IndexError> {
        self.insert_pending();
        if self.removed >= COMPACT_REMOVED && self.removed > self.slots.len() - self.removed {
            return self.compact();
        }
        if self.dirty {
            self.writer.commit().map_err(index_error)?;
            self.reader.reload().map_err(index_error)?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Rebuilds the index from its live chunks: slots numbered afresh, a new text
    /// index (tantivy keeps deleted documents in its segments until a merge) and
    /// a new graph (removed nodes stay in one). Memory then follows what is live.
    fn compact(&mut self) -> Result<(), IndexError> {
        let mut fresh = HybridIndex::new()?;
        fresh.hnsw = self.hnsw;
        fresh.exact_max = self.exact_max;
        fresh.fusion = self.fusion;
        fresh.prf = self.prf;
        fresh.proximity = self.proximity;
        fresh.calibration = self.calibration;
        fresh.sentence_part = self.sentence_part;
        // Copies: should anything fail, this index stays as it was.
        for e in self.slots.iter().flatten() {
            let slot = fresh.slots.len();
            let owner_key = e.doc.owner.to_string();
            let text = fresh.text_doc(slot, &e.doc.title, &e.content, &owner_key);
            fresh.writer.add_document(text).map_err(index_error)?;
            if let (Some(g), true) = (self.graph.as_ref(), e.node != NO_NODE) {
                fresh.pending.push((slot, g.vector(e.node).to_vec()));
            }
            fresh.by_document.entry(e.doc.id).or_default().push(slot);
            fresh.slots.push(Some(Entry {
                chunk_id: e.chunk_id,
                doc: e.doc.clone(),
                content: e.content.clone(),
                node: NO_NODE,
                sentences: e.sentences.clone(),
            }));
        }
        fresh.dirty = true;
        fresh.commit()?;
        *self = fresh;
        Ok(())
    }

    fn allowed(&self, slot: usize, reader: &Reader, filters: &Filters) -> Option<&Entry> {
        let e = self.slots.get(slot)?.as_ref()?;
        (reader.may_see(&e.doc.owner) && filters.iter().all(|(k, c)| c.matches(e.doc.metadata.get(k)))).then_some(e)
    }

    /// Slots by cosine similarity (embeddings are unit length), best first:
    /// exact for small indexes, else the graph with a candidate list that grows
    /// when filters leave too few, and an exact scan when even that is short.
    pub fn vector_search(&self, query: &[f32], reader: &Reader, filters: &Filters, n: usize) -> Vec<(usize, f32)> {
        let Some(graph) = self.graph.as_ref().filter(|g| g.dim() == query.len()) else {
            return Vec::new();
        };
        if graph.live() > self.exact_max {
            let accept = |node: u32| {
                let slot = self.slot_of_node[node as usize] as usize;
                self.allowed(slot, reader, filters).is_some()
            };
            // The share of chunks the filters let through, from a sample: the
            // candidate list grows by its inverse; under 2% a scan is cheaper.
            let step = (self.slots.len() / 512).max(1);
            let (mut live, mut pass) = (0usize, 0usize);
            for slot in (0..self.slots.len()).step_by(step) {
                if self.slots[slot].is_some() {
                    live += 1;
                    pass += usize::from(self.allowed(slot, reader, filters).is_some());
                }
            }
            let share = pass as f64 / live.max(1) as f64;
            if share < 0.02 {
                return self.vector_exact(graph, query, reader, filters, n);
            }
            let mut ef = ((((2 * n).max(self.hnsw.ef_search)) as f64 / share) as usize).min(4096);
            for _ in 0..2 {
                let found = graph.search(query, n, ef, &accept);
                if found.len() == n {
                    return found
                        .into_iter()
                        .map(|(node, s)| (self.slot_of_node[node as usize] as usize, s))
                        .collect();
                }
                ef = (ef * 8).min(4096);
            }
        }
        self.vector_exact(graph, query, reader, filters, n)
    }

    /// Every visible chunk scored; the n best.
    pub fn vector_exact_search(
        &self,
        query: &[f32],
        reader: &Reader,
        filters: &Filters,
        n: usize,
    ) -> Vec<(usize, f32)> {
        match self.graph.as_ref().filter(|g| g.dim() == query.len()) {
            Some(g) => self.vector_exact(g, query, reader, filters, n),
            None => Vec::new(),
        }
    }

    fn vector_exact(
        &self,
        graph: &Hnsw,
        query: &[f32],
        reader: &Reader,
        filters: &Filters,
        n: usize,
    ) -> Vec<(usize, f32)> {
        let mut scored: Vec<(usize, f32)> = (0..self.slots.len())
            .filter_map(|s| {
                let e = self.allowed(s, reader, filters)?;
                (e.node != NO_NODE).then(|| (s, crate::inference::fast::dot(query, graph.vector(e.node))))
            })
            .collect();
        top(&mut scored, n);
        scored
    }

    /// Slots by BM25, best first.
    fn text(&self, query: &str, reader: &Reader, filters: &Filters, n: usize) -> Result<Vec<(usize, f32)>, IndexError> {
        // The question's words, analyzed as the chunks were, each term once
        // weighted by its count: no query syntax (a claim's "-", ":" or quotes
        // are words here, not operators).
        let mut counts: HashMap<String, f32> = HashMap::new();
        // Neighbouring words, for proximity.
        let mut pairs: HashSet<(String, String)> = HashSet::new();
        let mut last: Option<String> = None;
        let mut analyzer = self.analyzer.clone();
        let mut tokens = analyzer.token_stream(query);
        while let Some(t) = tokens.next() {
            if let Some(n) = counts.get_mut(&t.text) {
                *n += 1.0;
            } else if counts.len() < MAX_QUERY_TERMS {
                counts.insert(t.text.clone(), 1.0);
            }
            if self.proximity.is_some() {
                if let Some(word) = last.take() {
                    if pairs.len() < MAX_QUERY_TERMS {
                        pairs.insert((word, t.text.clone()));
                    }
                }
                last = Some(t.text.clone());
            }
        }
        if counts.is_empty() {
            return Ok(Vec::new());
        }
        let phrases = self.proximity.into_iter().flat_map(|p| {
            pairs.iter().map(move |(a, b)| {
                let mut q = PhraseQuery::new(vec![
                    Term::from_field_text(self.text, a),
                    Term::from_field_text(self.text, b),
                ]);
                q.set_slop(p.slop);
                let q: Box<dyn Query> = Box::new(BoostQuery::new(Box::new(q), p.weight));
                (Occur::Should, q)
            })
        });
        let terms: Vec<(Occur, Box<dyn Query>)> = counts
            .into_iter()
            .map(|(w, n)| {
                let q = TermQuery::new(Term::from_field_text(self.text, &w), IndexRecordOption::WithFreqs);
                let q: Box<dyn Query> = if n > 1.0 {
                    Box::new(BoostQuery::new(Box::new(q), n))
                } else {
                    Box::new(q)
                };
                (Occur::Should, q)
            })
            .chain(phrases)
            .collect();
        let q: Box<dyn Query> = Box::new(BooleanQuery::new(terms));
        // Only what the reader may see is ranked: another tenant's documents
        // cannot crowd the reader's out of the candidates.
        let visible = TermSetQuery::new(
            reader
                .owners()
                .iter()
                .map(|o| Term::from_field_text(self.owner, &o.to_string())),
        );
        let q = BooleanQuery::new(vec![(Occur::Must, q), (Occur::Must, Box::new(visible))]);
        let searcher = self.reader.searcher();
        // Fetch more than asked: hits the metadata filters reject are dropped after.
        let want = (n * 4).max(100);
        let found = searcher
            .search(&q, &TopDocs::with_limit(want).order_by_score())
            .map_err(index_error)?;
        let mut out = Vec::with_capacity(n);
        // The slot from the key's fast field (a column read, not a stored document).
        let mut columns = HashMap::new();
        for (score, addr) in found {
            let column = match columns.entry(addr.segment_ord) {
                std::collections::hash_map::Entry::Occupied(c) => c.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(
                    searcher
                        .segment_reader(addr.segment_ord)
                        .fast_fields()
                        .u64("key")
                        .map_err(index_error)?,
                ),
            };
            let Some(slot) = column.first(addr.doc_id) else {
                continue;
            };
            let slot = slot as usize;
            if self.allowed(slot, reader, filters).is_some() {
                out.push((slot, score));
                if out.len() == n {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The `top_k` chunks for a query. `embedding` is needed for vector and hybrid.
    pub fn search(
        &self,
        query: &str,
        embedding: Option<&[f32]>,
        route: Route,
        reader: &Reader,
        filters: &Filters,
        top_k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        // BM25 of the chunks the text route scored (for calibrated relevance).
        let mut bm25: Option<HashMap<usize, f32>> = None;
        let ranked = match (route.resolve(query), embedding) {
            (Route::Text, _) => {
                let text = self.text(query, reader, filters, top_k)?;
                bm25 = Some(text.iter().copied().collect());
                text
            }
            (Route::Vector, Some(e)) => {
                let moved = self.feedback(e, reader, filters);
                self.vector_search(moved.as_deref().unwrap_or(e), reader, filters, top_k)
            }
            (Route::Hybrid, Some(e)) => {
                let depth = (top_k * 10).max(self.fusion.depth());
                let moved = self.feedback(e, reader, filters);
                let e = moved.as_deref().unwrap_or(e);
                let vector = self.vector_search(e, reader, filters, depth);
                let text = self.text(query, reader, filters, depth)?;
                let mut v = self
                    .fusion
                    .fuse(&vector, &text, |slot| self.cosine(slot, e).unwrap_or(0.0));
                if let Some(w) = self.sentence_part {
                    self.add_sentence_part(&mut v, e, w);
                }
                bm25 = Some(text.into_iter().collect());
                top(&mut v, top_k);
                v
            }
            _ => return Err(IndexError("this route needs the query's embedding".into())),
        };
        let model = match (embedding.is_some(), bm25.is_some()) {
            (true, true) => self.calibration.hybrid,
            (true, false) => self.calibration.vector,
            _ => self.calibration.text,
        };
        Ok(ranked
            .into_iter()
            .filter_map(|(slot, score)| {
                let e = self.slots.get(slot)?.as_ref()?;
                let cos = embedding.and_then(|q| self.cosine(slot, q));
                // Absent from the text route's candidates: no term weight to speak of.
                let text = bm25.as_ref().map(|m| m.get(&slot).copied().unwrap_or(0.0));
                Some(Hit {
                    document_id: e.doc.id,
                    chunk_id: e.chunk_id,
                    title: e.doc.title.clone(),
                    content: e.content.clone(),
                    score,
                    relevance: model.relevance(cos, text),
                    source: e.doc.source.clone(),
                    source_type: e.doc.origin.clone(),
                    metadata: e.doc.metadata.clone(),
                })
            })
            .collect())
    }

    /// The cosine of a chunk's embedding with the query's (None without one).
    fn cosine(&self, slot: usize, query: &[f32]) -> Option<f32> {
        let e = self.slots.get(slot)?.as_ref()?;
        let graph = self.graph.as_ref().filter(|g| g.dim() == query.len())?;
        (e.node != NO_NODE).then(|| crate::inference::fast::dot(query, graph.vector(e.node)))
    }

    /// The features of calibrated relevance for the candidates of a query (the
    /// `depth` best of each route), per document (its best chunk on each):
    /// (document, cosine, BM25 or 0 when the text route did not find it).
    /// For fitting the calibration (`ragchat eval beir --calibrate`).
    pub fn candidate_features(
        &self,
        query: &str,
        embedding: &[f32],
        reader: &Reader,
        filters: &Filters,
        depth: usize,
    ) -> Result<Vec<(Uuid, f32, f32)>, IndexError> {
        let vector = self.vector_search(embedding, reader, filters, depth);
        let text = self.text(query, reader, filters, depth)?;
        let bm25: HashMap<usize, f32> = text.iter().copied().collect();
        let mut per_doc: HashMap<Uuid, (f32, f32)> = HashMap::new();
        for slot in vector.iter().chain(&text).map(|x| x.0) {
            let Some(e) = self.slots.get(slot).and_then(Option::as_ref) else {
                continue;
            };
            let cos = self.cosine(slot, embedding).unwrap_or(0.0);
            let s = bm25.get(&slot).copied().unwrap_or(0.0);
            let best = per_doc.entry(e.doc.id).or_insert((f32::NEG_INFINITY, 0.0));
            best.0 = best.0.max(cos);
            best.1 = best.1.max(s);
        }
        Ok(per_doc.into_iter().map(|(d, (c, s))| (d, c, s)).collect())
    }
}

/// Keeps the n best (highest score) in order; ties by slot for stable results.
fn top(v: &mut Vec<(usize, f32)>, n: usize) {
    let cmp = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if v.len() > n && n > 0 {
        v.select_nth_unstable_by(n - 1, cmp);
        v.truncate(n);
    }
    v.sort_unstable_by(cmp);
    v.truncate(n);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn doc_with(
        owner: Owner,
        title: &str,
        texts: &[(&str, Vec<f32>)],
        meta: Value,
    ) -> (Document, Vec<Chunk>) {
        let id = Uuid::new_v4();
        let chunks = texts
            .iter()
            .enumerate()
            .map(|(i, (t, e))| Chunk {
                id: Uuid::new_v4(),
                document_id: id,
                ordinal: i as u32,
                content: t.to_string(),
                embedding: e.clone(),
            })
            .collect::<Vec<_>>();
        let d = Document {
            id,
            owner,
            title: title.into(),
            source: "t".into(),
            origin: "api".into(),
            content_hash: id.to_string(),
            size_bytes: 1,
            metadata: meta.as_object().cloned().unwrap_or_default(),
            chunk_count: chunks.len() as u32,
            created_at: chrono::Utc::now(),
        };
        (d, chunks)
    }

    #[test]
    fn each_embedding_model_ranks_with_the_fusion_chosen_for_it_and_compaction_keeps_it() {
        let mut ix = HybridIndex::new().expect("index");
        assert_eq!(ix.fusion, Fusion::default());
        ix.set_calibration(calibration::BGE_SMALL);
        let h = calibration::BGE_SMALL.hybrid;
        let bge = Fusion::Logistic {
            cos: h.cos as f32,
            text: (h.text * 3.0) as f32,
        };
        assert_eq!(ix.fusion, bge);
        ix.compact().expect("compact");
        assert_eq!(ix.fusion, bge);
        ix.set_calibration(calibration::MINILM_L6);
        assert_eq!(ix.fusion, Fusion::default());
    }

    #[test]
    fn feedback_moves_the_query_toward_its_best_chunk_and_logistic_fusion_weighs_absolute_scores() {
        let me = Reader {
            user_id: Uuid::new_v4(),
            organization_id: None,
        };
        let mut ix = HybridIndex::new().expect("index");
        let docs: Vec<(Document, Vec<Chunk>)> = [
            ("One", "alpha", vec![0.8, 0.6, 0.0]),
            ("Two", "beta", vec![0.6, 0.0, 0.8]),
            ("Three", "gamma harbour", vec![0.5, 0.866, 0.0]),
        ]
        .into_iter()
        .map(|(t, x, v)| doc_with(Owner::Global, t, &[(x, v)], json!({})))
        .collect();
        for (d, c) in &docs {
            ix.add(d, c).expect("add");
        }
        ix.commit().expect("commit");
        let q = [1.0, 0.0, 0.0];
        let order = |ix: &HybridIndex, route: Route| -> Vec<String> {
            ix.search("harbour", Some(&q), route, &me, &Filters::default(), 3)
                .expect("search")
                .into_iter()
                .map(|h| h.title)
                .collect()
        };
        // Cosines 0.8, 0.6, 0.5.
        assert_eq!(order(&ix, Route::Vector), ["One", "Two", "Three"]);
        // Toward "One" (0.8, 0.6, 0): "Three" (0.75) passes "Two" (0.57).
        ix.set_prf(Some(Prf { docs: 1, weight: 1.0 }));
        assert_eq!(order(&ix, Route::Vector), ["One", "Three", "Two"]);
        ix.set_prf(None);
        // Only "Three" matches the words: text weighed heavily puts it first,
        // the cosine alone keeps the vector order.
        ix.set_fusion(Fusion::Logistic { cos: 1.0, text: 100.0 });
        assert_eq!(order(&ix, Route::Hybrid)[0], "Three");
        ix.set_fusion(Fusion::Logistic { cos: 1.0, text: 0.0 });
        assert_eq!(order(&ix, Route::Hybrid), ["One", "Two", "Three"]);
    }

    #[test]
    fn the_first_results_do_not_depend_on_top_k() {
        let me = Reader {
            user_id: Uuid::new_v4(),
            organization_id: None,
        };
        let mut ix = HybridIndex::new().expect("index");
        // 400 chunks whose cosine and BM25 orders disagree: deeper lists (a
        // larger top_k) reach further down both.
        for i in 0..400u32 {
            let angle = (i as f32 * 0.7361).rem_euclid(1.5);
            let words = ["harbour"; 9][..(i % 9) as usize + 1].join(" ");
            let filler = ["quay"; 13][..(i * 7 % 13) as usize].join(" ");
            let (d, c) = doc_with(
                Owner::Global,
                &format!("d{i}"),
                &[(&format!("{words} {filler}"), vec![angle.cos(), angle.sin(), 0.0])],
                json!({}),
            );
            ix.add(&d, &c).expect("add");
        }
        ix.commit().expect("commit");
        let q = [1.0, 0.0, 0.0];
        let titles = |ix: &HybridIndex, top_k: usize| -> Vec<String> {
            ix.search("harbour", Some(&q), Route::Hybrid, &me, &Filters::default(), top_k)
                .expect("search")
                .into_iter()
                .map(|h| h.title)
                .collect()
        };
        for depth in [100, FUSION_DEPTH] {
            ix.set_fusion(Fusion::Convex { alpha: 0.5, depth });
            let few = titles(&ix, 10);
            assert_eq!(few.len(), 10);
            for top_k in [20, 50, 100] {
                assert_eq!(titles(&ix, top_k)[..10], few[..], "depth {depth}, top_k {top_k}");
            }
        }
    }

    #[test]
    fn the_sentence_part_ranks_a_chunk_by_its_best_sentence_and_survives_compaction() {
        let me = Reader {
            user_id: Uuid::new_v4(),
            organization_id: None,
        };
        let mut ix = HybridIndex::new().expect("index");
        // Both match the word once; "Whole" has the better chunk vector, "Part"
        // a sentence on the query's very direction.
        let (a, ac) = doc_with(
            Owner::Global,
            "Whole",
            &[("harbour one", vec![0.8, 0.6, 0.0])],
            json!({}),
        );
        let (b, bc) = doc_with(
            Owner::Global,
            "Part",
            &[("harbour two", vec![0.6, 0.0, 0.8])],
            json!({}),
        );
        for (d, c) in [(&a, &ac), (&b, &bc)] {
            ix.add(d, c).expect("add");
        }
        ix.commit().expect("commit");
        ix.set_sentences(b.id, vec![vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
            .expect("sentences");
        // Wrong count of chunks, a partial vector, an unknown document: refused.
        assert!(ix.set_sentences(b.id, vec![]).is_err());
        assert!(ix.set_sentences(b.id, vec![vec![1.0, 0.0]]).is_err());
        assert!(ix.set_sentences(Uuid::new_v4(), vec![vec![]]).is_err());
        let q = [1.0, 0.0, 0.0];
        let order = |ix: &HybridIndex| -> Vec<String> {
            ix.search("harbour", Some(&q), Route::Hybrid, &me, &Filters::default(), 2)
                .expect("search")
                .into_iter()
                .map(|h| h.title)
                .collect()
        };
        assert_eq!(order(&ix), ["Whole", "Part"]);
        // "Part"'s best sentence (cosine 1) beats "Whole"'s chunk (0.8, its
        // stand-in without sentences).
        ix.set_sentence_part(Some(0.6));
        assert_eq!(order(&ix), ["Part", "Whole"]);
        // Compaction (after many removals) keeps the sentences.
        for i in 0..COMPACT_REMOVED {
            let (d, c) = doc_with(
                Owner::Global,
                &format!("gone {i}"),
                &[("x", vec![0.0, 1.0, 0.0])],
                json!({}),
            );
            ix.add(&d, &c).expect("add");
            ix.remove(d.id);
        }
        ix.commit().expect("compact");
        assert_eq!(ix.len(), 2);
        assert_eq!(order(&ix), ["Part", "Whole"]);
        ix.set_sentence_part(None);
        assert_eq!(order(&ix), ["Whole", "Part"]);
    }

    #[test]
    fn routes_rank_visible_chunks_and_filters_apply() {
        // Exact scans, and the graph (forced on from the first chunk).
        routes_rank_visible_chunks_and_filters_apply_with(EXACT_MAX);
        routes_rank_visible_chunks_and_filters_apply_with(0);
    }

    fn routes_rank_visible_chunks_and_filters_apply_with(exact_max: usize) {
        let me = Reader {
            user_id: Uuid::new_v4(),
            organization_id: None,
        };
        let mut ix = HybridIndex::new()
            .expect("index")
            .with_vector_search(exact_max, HnswConfig::default());
        let (a, ac) = doc_with(
            Owner::Global,
            "Cats",
            &[
                ("Cats purr when they are content", vec![1.0, 0.0]),
                ("Kittens sleep a lot", vec![0.8, 0.6]),
            ],
            json!({"year": 2020, "lang": "en"}),
        );
        let (b, bc) = doc_with(
            Owner::User(me.user_id),
            "Dogs",
            &[("Dogs bark at strangers", vec![0.0, 1.0])],
            json!({"year": 2023, "lang": "de"}),
        );
        let (c, cc) = doc_with(
            Owner::User(Uuid::new_v4()),
            "Secret cats",
            &[("Cats purring secretly", vec![1.0, 0.0])],
            json!({}),
        );
        for (d, ch) in [(&a, &ac), (&b, &bc), (&c, &cc)] {
            ix.add(d, ch).expect("add");
        }
        ix.commit().expect("commit");
        let none = Filters::new();
        let hits = ix
            .search("purring cats", None, Route::Text, &me, &none, 5)
            .expect("text");
        assert_eq!(
            hits[0].content, "Cats purr when they are content",
            "stemming matches purr/purring"
        );
        assert!(
            hits.iter().all(|h| h.document_id != c.id),
            "another user's document is invisible"
        );
        let hits = ix
            .search("q", Some(&[0.0, 1.0]), Route::Vector, &me, &none, 2)
            .expect("vector");
        assert_eq!(hits[0].content, "Dogs bark at strangers");
        assert!((hits[0].score - 1.0).abs() < 1e-6);
        assert_eq!(hits[1].content, "Kittens sleep a lot");
        let hits = ix
            .search("cats content", Some(&[1.0, 0.0]), Route::Hybrid, &me, &none, 3)
            .expect("hybrid");
        assert_eq!(hits[0].content, "Cats purr when they are content");
        // Filters: equality, in, range.
        let f: Filters = serde_json::from_value(json!({"year": {"gte": 2021}})).expect("filters");
        let hits = ix
            .search("q", Some(&[1.0, 0.0]), Route::Vector, &me, &f, 5)
            .expect("range");
        assert_eq!(hits.iter().map(|h| h.document_id).collect::<Vec<_>>(), vec![b.id]);
        let f: Filters = serde_json::from_value(json!({"lang": {"in": ["en", "fr"]}})).expect("filters");
        let hits = ix
            .search("q", Some(&[1.0, 0.0]), Route::Vector, &me, &f, 5)
            .expect("in");
        assert!(hits.iter().all(|h| h.document_id == a.id) && hits.len() == 2);
        let f: Filters = serde_json::from_value(json!({"lang": "de"})).expect("filters");
        assert_eq!(ix.search("dogs", None, Route::Text, &me, &f, 5).expect("eq").len(), 1);
        // Removal.
        ix.remove(a.id);
        ix.commit().expect("commit");
        assert!(ix
            .search("cats", None, Route::Text, &me, &none, 5)
            .expect("text")
            .is_empty());
        assert_eq!(ix.len(), 2);
    }

    #[test]
    fn another_tenants_documents_cannot_crowd_a_readers_out_of_the_text_route() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let reader = |id| Reader {
            user_id: id,
            organization_id: None,
        };
        let mut ix = HybridIndex::new().expect("index");
        // Tenant A: 1,000 short chunks that BM25 ranks first for "protein".
        for i in 0..1000 {
            let (d, c) = doc_with(
                Owner::User(a),
                &format!("A{i}"),
                &[("protein protein", vec![1.0, 0.0])],
                json!({}),
            );
            ix.add(&d, &c).expect("add");
        }
        // Tenant B: three long chunks that mention it once.
        let mut mine = Vec::new();
        for i in 0..3 {
            let text = format!("a long note {i} about many other things, among them one protein and more words");
            let (d, c) = doc_with(
                Owner::User(b),
                &format!("B{i}"),
                &[(text.as_str(), vec![0.0, 1.0])],
                json!({}),
            );
            ix.add(&d, &c).expect("add");
            mine.push(d.id);
        }
        ix.commit().expect("commit");
        let hits = ix
            .search("protein", None, Route::Text, &reader(b), &Filters::new(), 3)
            .expect("search");
        let mut found: Vec<Uuid> = hits.iter().map(|h| h.document_id).collect();
        found.sort();
        mine.sort();
        assert_eq!(found, mine, "B sees its three documents");
        // A still sees only its own.
        let hits = ix
            .search("protein", None, Route::Text, &reader(a), &Filters::new(), 5)
            .expect("search");
        assert!(hits.iter().all(|h| h.title.starts_with('A')) && hits.len() == 5);
        // After a save and load, the owner field is rebuilt from the snapshot.
        let dir = std::env::temp_dir().join(format!("ragchat-index-{}", Uuid::new_v4()));
        ix.save(&dir).expect("save");
        let back = HybridIndex::load(&dir).expect("load").expect("snapshot");
        let hits = back
            .search("protein", None, Route::Text, &reader(b), &Filters::new(), 3)
            .expect("search");
        assert_eq!(hits.len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn removed_chunks_are_compacted_away_once_they_outnumber_live_ones() {
        let me = Reader {
            user_id: Uuid::new_v4(),
            organization_id: None,
        };
        // The graph from the first vector, so that removal leaves nodes behind.
        let mut ix = HybridIndex::new()
            .expect("index")
            .with_vector_search(0, HnswConfig::default());
        let meta = json!({"notes": "m".repeat(4096)});
        let mut docs = Vec::new();
        for i in 0..60 {
            let texts: Vec<(String, Vec<f32>)> = (0..8)
                .map(|j| {
                    let a = (i * 8 + j) as f32 / 50.0;
                    (format!("glacier report {i} part {j}"), vec![a.cos(), a.sin(), 0.1])
                })
                .collect();
            let texts: Vec<(&str, Vec<f32>)> = texts.iter().map(|(t, v)| (t.as_str(), v.clone())).collect();
            let (d, c) = doc_with(Owner::User(me.user_id), &format!("Doc {i}"), &texts, meta.clone());
            ix.add(&d, &c).expect("add");
            docs.push((d, c));
        }
        ix.commit().expect("commit");
        assert_eq!((ix.slots.len(), ix.len()), (480, 480));
        // One copy of a document's metadata for its 8 chunks.
        assert_eq!(Arc::strong_count(&ix.slots[0].as_ref().expect("entry").doc), 8);
        // 31 of 60 removed (248 chunks): below the threshold, slots stay.
        for (d, _) in &docs[..31] {
            ix.remove(d.id);
        }
        ix.commit().expect("commit");
        assert_eq!((ix.slots.len(), ix.len()), (480, 232));
        // Two more: 264 removed, more than the 216 live: compacted.
        for (d, _) in &docs[31..33] {
            ix.remove(d.id);
        }
        ix.commit().expect("commit");
        assert_eq!((ix.slots.len(), ix.len(), ix.removed), (216, 216, 0));
        let graph = ix.graph.as_ref().expect("graph");
        assert_eq!((graph.len(), graph.live()), (216, 216));
        // Every route still finds the live chunks, and only those.
        let (kept, chunks) = &docs[40];
        let q = chunks[3].embedding.clone();
        for route in [Route::Text, Route::Vector, Route::Hybrid] {
            let hits = ix
                .search("glacier report 40 part 3", Some(&q), route, &me, &Filters::default(), 5)
                .expect("search");
            assert_eq!(hits[0].chunk_id, chunks[3].id, "{route:?}");
            assert_eq!(hits[0].document_id, kept.id);
            assert!(hits
                .iter()
                .all(|h| docs[..33].iter().all(|(d, _)| d.id != h.document_id)));
        }
        // Removing and adding keep working on the compacted index.
        ix.remove(kept.id);
        let (d, c) = doc_with(
            Owner::User(me.user_id),
            "New",
            &[("fresh text", vec![0.0, 0.0, 1.0])],
            json!({}),
        );
        ix.add(&d, &c).expect("add");
        ix.commit().expect("commit");
        let hits = ix
            .search("fresh", None, Route::Text, &me, &Filters::default(), 5)
            .expect("search");
        assert_eq!(hits.first().map(|h| h.document_id), Some(d.id));
        assert_eq!(ix.len(), 209);
    }

    #[test]
    fn a_saved_index_loads_back_and_answers_the_same() {
        let dir = std::env::temp_dir().join(format!("ragchat-index-{}", Uuid::new_v4()));
        assert!(HybridIndex::load(&dir).expect("load").is_none(), "no snapshot yet");
        let me = Reader {
            user_id: Uuid::new_v4(),
            organization_id: None,
        };
        let mut ix = HybridIndex::new()
            .expect("index")
            .with_vector_search(0, HnswConfig::default());
        let mut docs = Vec::new();
        for i in 0..40 {
            let angle = i as f32 / 7.0;
            let (d, c) = doc_with(
                if i % 2 == 0 {
                    Owner::Global
                } else {
                    Owner::User(me.user_id)
                },
                &format!("Title {i}"),
                &[(
                    &format!("chunk {i} about topic{}", i % 5),
                    vec![angle.cos(), angle.sin()],
                )],
                json!({"i": i}),
            );
            ix.add(&d, &c).expect("add");
            docs.push(d);
        }
        ix.remove(docs[3].id);
        ix.save(&dir).expect("save");
        ix.remove(docs[4].id);
        ix.save(&dir).expect("save again");
        let snapshots = std::fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("snapshot-"))
            .count();
        assert_eq!(snapshots, 1, "older snapshots are removed");
        let back = HybridIndex::load(&dir).expect("load").expect("a snapshot");
        assert_eq!(back.len(), 38);
        let none = Filters::new();
        for (q, v) in [("topic1", [1.0, 0.0]), ("topic3 chunk", [0.0, 1.0])] {
            for route in [Route::Text, Route::Vector, Route::Hybrid] {
                let a = ix.search(q, Some(&v), route, &me, &none, 5).expect("search");
                let b = back.search(q, Some(&v), route, &me, &none, 5).expect("search");
                let ids = |h: &[Hit]| h.iter().map(|x| x.chunk_id).collect::<Vec<_>>();
                assert_eq!(ids(&a), ids(&b), "{q} {route:?}");
            }
        }
        assert!(back.document_ids().contains(&docs[5].id) && !back.document_ids().contains(&docs[4].id));
        // A broken snapshot is not used (the caller rebuilds from the store).
        std::fs::write(dir.join("current"), "snapshot-missing").expect("write");
        assert!(HybridIndex::load(&dir).expect("load").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_text_route_reads_a_question_as_words_with_the_title_in_the_same_field() {
        let me = Reader {
            user_id: Uuid::new_v4(),
            organization_id: None,
        };
        let mut ix = HybridIndex::new().expect("index");
        for (title, text) in [
            ("Metformin trial", "lowering in adults"),
            ("Harbour notes", "glucose tides"),
            ("Harbour plans", "insulin tides"),
        ] {
            let (d, c) = doc_with(Owner::Global, title, &[(text, vec![])], json!({}));
            ix.add(&d, &c).expect("add");
        }
        ix.commit().expect("commit");
        let titles = |q: &str| -> Vec<String> {
            ix.search(q, None, Route::Text, &me, &Filters::default(), 3)
                .expect("search")
                .into_iter()
                .map(|h| h.title)
                .collect()
        };
        // A title's words are found like the chunk's (stemmed: "trials").
        assert_eq!(titles("metformin trials"), ["Metformin trial"]);
        // Query syntax is not read: "-" does not exclude, "title:" names no
        // field, quotes and parentheses are not a phrase or a group.
        assert_eq!(
            titles("-metformin AND \"adults lowering\" title:(trial"),
            ["Metformin trial"]
        );
        // A repeated word weighs its count.
        assert_eq!(titles("glucose glucose insulin")[0], "Harbour notes");
        assert_eq!(titles("glucose insulin insulin")[0], "Harbour plans");
        // No words: nothing, not every chunk and not an error.
        assert!(titles("?! -- ()").is_empty());
        // A question of many words is cut to MAX_QUERY_TERMS distinct terms.
        let long: String = (0..5 * MAX_QUERY_TERMS).map(|i| format!("w{i} ")).collect();
        assert!(titles(&(long + "metformin")).is_empty());
    }

    #[test]
    fn proximity_ranks_a_chunk_with_the_question_words_side_by_side_first() {
        let me = Reader {
            user_id: Uuid::new_v4(),
            organization_id: None,
        };
        let mut ix = HybridIndex::new().expect("index");
        // The same words, the same length: only their order differs.
        for (title, text) in [
            ("Apart", "glucose levels rise after blood insulin therapy"),
            ("Together", "blood glucose levels rise after insulin therapy"),
        ] {
            let (d, c) = doc_with(Owner::Global, title, &[(text, vec![])], json!({}));
            ix.add(&d, &c).expect("add");
        }
        ix.commit().expect("commit");
        let scores = |ix: &HybridIndex, q: &str| -> HashMap<String, f32> {
            ix.search(q, None, Route::Text, &me, &Filters::default(), 2)
                .expect("search")
                .into_iter()
                .map(|h| (h.title, h.score))
                .collect()
        };
        let off = scores(&ix, "the blood glucose");
        assert_eq!(off.len(), 2);
        assert!((off["Apart"] - off["Together"]).abs() < 1e-6, "{off:?}");
        ix.set_proximity(Some(Proximity { weight: 0.5, slop: 0 }));
        let on = scores(&ix, "the blood glucose");
        assert!(on["Together"] > on["Apart"] + 0.1, "{on:?}");
        // The words alone still count: a chunk without the pair is found.
        assert!((on["Apart"] - off["Apart"]).abs() < 1e-6, "{on:?}");
        // "blood levels": one word between them in "Together", so the pair
        // counts with a slop of 1, not of 0.
        let exact = scores(&ix, "blood levels");
        assert!((exact["Apart"] - exact["Together"]).abs() < 1e-6, "{exact:?}");
        ix.set_proximity(Some(Proximity { weight: 0.5, slop: 1 }));
        let near = scores(&ix, "blood levels");
        assert!(near["Together"] > near["Apart"] + 0.1, "{near:?}");
        ix.set_proximity(None);
        let back = scores(&ix, "the blood glucose");
        assert!((back["Apart"] - back["Together"]).abs() < 1e-6, "{back:?}");
    }

    #[test]
    fn auto_picks_text_for_short_queries() {
        assert_eq!(Route::Auto.resolve("BRCA1"), Route::Text);
        assert_eq!(Route::Auto.resolve("what lowers blood pressure"), Route::Hybrid);
        assert_eq!(Route::Vector.resolve("x"), Route::Vector);
    }
}
