//! Ingestion, shared by the JSON and upload routes, admin seeding and `ragchat
//! seed`: documents are checked, told apart from ones already stored (same text,
//! same owner), chunked by tokens, embedded in one pass through the EmbedWorker,
//! stored, then indexed. A batch is stored whole or not at all.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use ragchat_actors::embed_worker::{EmbedWorker, Lane};
use ragchat_actors::inference::ModelError;
use ragchat_actors::knowledge::{Chunk, Document, Owner};
use ragchat_actors::ports::{DocumentStore, StoreError};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::chunking::Chunker;
use ragchat_actors::retrieval::{IndexDocuments, Retrieval};
use ragchat_actors::supervision::Supervised;

/// A document to store.
#[derive(Debug, Clone)]
pub struct NewDoc {
    pub owner: Owner,
    pub title: String,
    pub content: String,
    pub source: String,
    /// `api`, `upload:<format>` or `seed` (see `Document::origin`).
    pub origin: String,
    pub metadata: Map<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("embedding: {0}")]
    Model(ModelError),
    #[error("search index: {0}")]
    Index(String),
}

/// What happened to one document of a batch.
#[derive(Debug, Clone)]
pub enum Outcome {
    Created(Document),
    /// The owner already had this text (or it came twice in the batch).
    Duplicate(Document),
}

impl Outcome {
    pub fn document(&self) -> &Document {
        match self {
            Outcome::Created(d) | Outcome::Duplicate(d) => d,
        }
    }
}

/// Trims the title and checks the sizes.
/// How large a document may be: its text, and its metadata as JSON.
#[derive(Debug, Clone, Copy)]
pub struct DocLimits {
    pub max_bytes: usize,
    pub max_metadata_bytes: usize,
}

impl DocLimits {
    pub fn of(k: &crate::config::KnowledgeSettings) -> Self {
        DocLimits {
            max_bytes: k.max_document_bytes,
            max_metadata_bytes: k.max_metadata_bytes,
        }
    }
}

pub fn validate(doc: &mut NewDoc, limits: DocLimits) -> Result<(), IngestError> {
    let max_bytes = limits.max_bytes;
    doc.title = doc.title.trim().to_string();
    if doc.title.is_empty() || doc.title.chars().count() > 500 {
        return Err(IngestError::Invalid("title must be 1 to 500 characters".into()));
    }
    if doc.content.trim().is_empty() {
        return Err(IngestError::Invalid("content is empty".into()));
    }
    if doc.content.len() > max_bytes {
        return Err(IngestError::TooLarge(format!(
            "Document of {} bytes exceeds the limit of {max_bytes} bytes",
            doc.content.len()
        )));
    }
    // Metadata goes with every chunk into the index and every search hit: bounded.
    let metadata_bytes = serde_json::to_string(&doc.metadata).map_or(usize::MAX, |m| m.len());
    if metadata_bytes > limits.max_metadata_bytes {
        return Err(IngestError::TooLarge(format!(
            "metadata of {metadata_bytes} bytes (as JSON) exceeds the limit of {} bytes",
            limits.max_metadata_bytes
        )));
    }
    Ok(())
}

pub fn content_hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The text a chunk is embedded as: its document's title, then the chunk (the
/// title is context every chunk shares; the stored chunk is the text alone).
pub fn embedding_text(title: &str, chunk: &str) -> String {
    // A long title would push the chunk's end past the model's 256 tokens.
    let title = match title.char_indices().nth(TITLE_CHARS) {
        Some((cut, _)) => &title[..cut],
        None => title,
    };
    if title.is_empty() {
        chunk.to_string()
    } else {
        format!("{title}\n{chunk}")
    }
}

/// At most this much of a title goes in front of each chunk (~40 tokens).
const TITLE_CHARS: usize = 200;

/// A document's text rebuilt from its chunks (the store keeps no other copy):
/// where a chunk begins with the end of the one before (the chunker's overlap),
/// the overlap is kept once; elsewhere the chunks are joined by one space (the
/// chunker trimmed the whitespace between them).
pub fn text_of(chunks: &[Chunk]) -> String {
    let mut text = String::with_capacity(chunks.iter().map(|c| c.content.len() + 1).sum());
    let mut before = "";
    for c in chunks {
        let piece = c.content.as_str();
        let skip = overlap(before, piece);
        if skip == 0 && !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&piece[skip..]);
        before = piece;
    }
    text
}

/// Bytes at the start of `next` that repeat the end of `before`: the longest
/// such prefix that begins a word in `before` (an overlap starts where the
/// chunker may cut) and ends a word in `next`; 0 when none.
fn overlap(before: &str, next: &str) -> usize {
    let longest = before.len().min(next.len());
    (1..=longest)
        .rev()
        .find(|&k| {
            let start = before.len() - k;
            next.is_char_boundary(k)
                && before.is_char_boundary(start)
                && (start == 0 || before[..start].ends_with(char::is_whitespace))
                && next[k..].chars().next().is_none_or(|c| !c.is_alphanumeric())
                && before[start..] == next[..k]
        })
        .unwrap_or(0)
}

/// What one document of a batch turned out to be.
enum Place {
    /// New: its index in `Triage::new`.
    New(usize),
    /// Already stored.
    Stored(Box<Document>),
    /// The same text as the new document at this index of `Triage::new`.
    Repeat(usize),
}

/// A batch told apart: documents new to their owner, and those already stored.
pub struct Triage {
    new: Vec<(NewDoc, String)>,
    /// One per document of the batch, in its order.
    places: Vec<Place>,
}

impl Triage {
    /// Bytes of text the batch would add to `owner`.
    pub fn new_bytes(&self, owner: &Owner) -> u64 {
        self.new
            .iter()
            .filter(|(d, _)| d.owner == *owner)
            .map(|(d, _)| d.content.len() as u64)
            .sum()
    }

    pub fn new_count(&self) -> usize {
        self.new.len()
    }

    pub fn duplicates(&self) -> usize {
        self.places.len() - self.new.len()
    }

    pub fn new_texts(&self) -> impl Iterator<Item = &str> {
        self.new.iter().map(|(d, _)| d.content.as_str())
    }
}

#[derive(Clone)]
pub struct Ingestor {
    pub documents: Arc<dyn DocumentStore>,
    pub chunker: Arc<Chunker>,
    pub embedder: EmbedWorker,
    /// None for `ragchat seed`: the server's index is rebuilt from the store at start.
    pub retrieval: Option<Arc<Supervised<Retrieval>>>,
}

impl Ingestor {
    /// Finds which documents are already stored (or repeat an earlier one of the batch).
    pub async fn triage(&self, docs: Vec<NewDoc>) -> Result<Triage, IngestError> {
        let mut t = Triage {
            new: Vec::new(),
            places: Vec::with_capacity(docs.len()),
        };
        let mut seen: HashMap<(Owner, String), usize> = HashMap::new();
        for d in docs {
            let hash = content_hash(&d.content);
            let place = if let Some(&earlier) = seen.get(&(d.owner, hash.clone())) {
                Place::Repeat(earlier)
            } else if let Some(existing) = self.documents.document_by_hash(&d.owner, &hash).await? {
                Place::Stored(Box::new(existing))
            } else {
                seen.insert((d.owner, hash.clone()), t.new.len());
                t.new.push((d, hash));
                Place::New(t.new.len() - 1)
            };
            t.places.push(place);
        }
        Ok(t)
    }

    /// Chunks and embeds the new documents of a triaged batch, stores them, and
    /// indexes them. If any store or the index fails, what this call stored is
    /// deleted again. Outcomes come back in the batch's order.
    pub async fn store(&self, triage: Triage) -> Result<Vec<Outcome>, IngestError> {
        let Triage { new, places } = triage;
        let chunker = self.chunker.clone();
        let texts: Vec<String> = new.iter().map(|(d, _)| d.content.clone()).collect();
        let pieces: Vec<Vec<String>> =
            tokio::task::spawn_blocking(move || texts.iter().map(|t| chunker.split(t)).collect())
                .await
                .map_err(|e| IngestError::Index(format!("chunking stopped: {e}")))?;
        if let Some(((d, _), _)) = new.iter().zip(&pieces).find(|(_, p)| p.is_empty()) {
            return Err(IngestError::Invalid(format!("'{}' has no text to index", d.title)));
        }
        let inputs: Vec<String> = new
            .iter()
            .zip(&pieces)
            .flat_map(|((d, _), ps)| ps.iter().map(|p| embedding_text(&d.title, p)))
            .collect();
        let mut vectors = self
            .embedder
            .embed(Lane::Bulk, inputs)
            .await
            .map_err(IngestError::Model)?
            .vectors
            .into_iter();

        let mut created: Vec<(Document, Vec<Chunk>)> = Vec::with_capacity(new.len());
        let mut new_outcomes: Vec<Outcome> = Vec::with_capacity(new.len());
        for ((d, hash), ps) in new.into_iter().zip(pieces) {
            let id = Uuid::new_v4();
            let mut chunks = Vec::with_capacity(ps.len());
            for (i, content) in ps.into_iter().enumerate() {
                let embedding = vectors
                    .next()
                    .ok_or_else(|| IngestError::Model(ModelError::Internal("fewer vectors than chunks".into())))?;
                chunks.push(Chunk {
                    id: Uuid::new_v4(),
                    document_id: id,
                    ordinal: i as u32,
                    content,
                    embedding,
                });
            }
            let doc = Document {
                id,
                owner: d.owner,
                title: d.title,
                source: d.source,
                origin: d.origin,
                content_hash: hash.clone(),
                size_bytes: d.content.len() as u64,
                metadata: d.metadata,
                chunk_count: chunks.len() as u32,
                created_at: Utc::now(),
            };
            match self.documents.insert_document(&doc, &chunks).await {
                Ok(()) => {
                    new_outcomes.push(Outcome::Created(doc.clone()));
                    created.push((doc, chunks));
                }
                // The same text arrived at once through another request: that one stored it.
                Err(StoreError::Conflict(_)) => match self.documents.document_by_hash(&doc.owner, &hash).await {
                    Ok(Some(existing)) => new_outcomes.push(Outcome::Duplicate(existing)),
                    Ok(None) => {
                        self.undo(&created).await;
                        return Err(StoreError::Conflict("document is being stored by another request".into()).into());
                    }
                    Err(e) => {
                        self.undo(&created).await;
                        return Err(e.into());
                    }
                },
                Err(e) => {
                    self.undo(&created).await;
                    return Err(e.into());
                }
            }
        }
        if let Some(retrieval) = &self.retrieval {
            if !created.is_empty() {
                let sent = retrieval.send(IndexDocuments(created.clone())).await;
                let failed = match sent {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(e) = failed {
                    self.undo(&created).await;
                    return Err(IngestError::Index(e));
                }
            }
        }
        // Back into the batch's order.
        Ok(places
            .into_iter()
            .filter_map(|p| match p {
                Place::New(j) => new_outcomes.get(j).cloned(),
                Place::Stored(d) => Some(Outcome::Duplicate(*d)),
                Place::Repeat(j) => new_outcomes.get(j).map(|o| Outcome::Duplicate(o.document().clone())),
            })
            .collect())
    }

    /// Re-chunks a stored document's text with the current chunker and re-embeds
    /// it (bulk lane), then replaces its chunks: in the store in one step
    /// (`replace_chunks`), then in the index in one message (the retrieval actor
    /// answers searches between messages, so a search sees the old chunks or the
    /// new ones). The text is rebuilt from the stored chunks (`text_of`). `None`
    /// when the document was deleted meanwhile (nothing written).
    pub async fn reindex(&self, doc: &Document) -> Result<Option<Document>, IngestError> {
        let old = self.documents.chunks(doc.id).await?;
        let chunker = self.chunker.clone();
        let pieces = tokio::task::spawn_blocking(move || chunker.split(&text_of(&old)))
            .await
            .map_err(|e| IngestError::Index(format!("chunking stopped: {e}")))?;
        if pieces.is_empty() {
            return Err(IngestError::Invalid(format!(
                "'{}' has no stored text to index",
                doc.title
            )));
        }
        let inputs: Vec<String> = pieces.iter().map(|p| embedding_text(&doc.title, p)).collect();
        let vectors = self
            .embedder
            .embed(Lane::Bulk, inputs)
            .await
            .map_err(IngestError::Model)?
            .vectors;
        if vectors.len() != pieces.len() {
            return Err(IngestError::Model(ModelError::Internal(
                "fewer vectors than chunks".into(),
            )));
        }
        let chunks: Vec<Chunk> = pieces
            .into_iter()
            .zip(vectors)
            .enumerate()
            .map(|(i, (content, embedding))| Chunk {
                id: Uuid::new_v4(),
                document_id: doc.id,
                ordinal: i as u32,
                content,
                embedding,
            })
            .collect();
        if !self.documents.replace_chunks(doc.id, &chunks).await? {
            return Ok(None);
        }
        let mut doc = doc.clone();
        doc.chunk_count = chunks.len() as u32;
        if let Some(retrieval) = &self.retrieval {
            // A failure here takes the document out of the index (the store has the
            // new chunks: the next start's catch-up indexes them again).
            match retrieval.send(IndexDocuments(vec![(doc.clone(), chunks)])).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(IngestError::Index(e.to_string())),
                Err(e) => return Err(IngestError::Index(e.to_string())),
            }
        }
        Ok(Some(doc))
    }

    /// Deletes what a failed batch stored, from the index too (best effort:
    /// logged when it fails).
    async fn undo(&self, created: &[(Document, Vec<Chunk>)]) {
        for (d, _) in created {
            if let Err(e) = self.documents.delete_document(d.id).await {
                tracing::error!(document = %d.id, error = %e, "could not remove a document of a failed batch");
            }
            if let Some(r) = &self.retrieval {
                let _ = r.send(ragchat_actors::retrieval::RemoveDocument(d.id)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&str]) -> Vec<Chunk> {
        parts
            .iter()
            .enumerate()
            .map(|(i, p)| Chunk {
                id: Uuid::new_v4(),
                document_id: Uuid::nil(),
                ordinal: i as u32,
                content: p.to_string(),
                embedding: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn text_is_rebuilt_from_overlapping_chunks() {
        assert_eq!(
            text_of(&chunks(&[
                "The tide rises. The moon",
                "The moon pulls the sea.",
                "Rivers carve."
            ])),
            "The tide rises. The moon pulls the sea. Rivers carve."
        );
        // A chunk that merely starts with the previous one's last letters mid-word
        // is not an overlap.
        assert_eq!(text_of(&chunks(&["a cat", "at home"])), "a cat at home");
        assert_eq!(text_of(&[]), "");
    }

    #[test]
    fn the_chunkers_pieces_give_back_its_text() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2/tokenizer.json");
        if !path.exists() {
            eprintln!("SKIPPED: {} missing; run scripts/fetch-models", path.display());
            return;
        }
        let chunker = Chunker::load(&path, 48, 12).expect("chunker");
        let text = (0..80)
            .map(|i| format!("Sentence {i} says that tides follow the moon, item {}.", i * 7))
            .collect::<Vec<_>>()
            .join(" ");
        let pieces = chunker.split(&text);
        assert!(pieces.len() > 5, "{}", pieces.len());
        let parts: Vec<&str> = pieces.iter().map(String::as_str).collect();
        assert_eq!(text_of(&chunks(&parts)), text);
    }
}
