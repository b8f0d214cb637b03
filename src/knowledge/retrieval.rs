//! The search index as the core's `SearchIndex` port: the hybrid index
//! (index.rs) with its snapshot folder, and the `IndexSource` that makes
//! instances of it for the retrieval actor (from the last snapshot, or empty).

use std::path::PathBuf;

use ragchat_actors::knowledge::{Chunk, Document, Reader};
use ragchat_actors::retrieval::{Filters, Hit, IndexError, IndexSource, Route, SearchIndex};
use uuid::Uuid;

use super::calibration::Calibration;
use super::index::HybridIndex;

/// The hybrid index and the folder its snapshots go to (none: in memory only).
pub struct SnapshotIndex {
    pub index: HybridIndex,
    pub dir: Option<PathBuf>,
}

impl SearchIndex for SnapshotIndex {
    fn add(&mut self, doc: &Document, chunks: &[Chunk]) -> Result<(), IndexError> {
        self.index.add(doc, chunks)
    }

    fn remove(&mut self, document_id: Uuid) {
        self.index.remove(document_id)
    }

    fn commit(&mut self) -> Result<(), IndexError> {
        self.index.commit()
    }

    fn search(
        &self,
        query: &str,
        embedding: Option<&[f32]>,
        route: Route,
        reader: &Reader,
        filters: &Filters,
        top_k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        self.index.search(query, embedding, route, reader, filters, top_k)
    }

    fn document_ids(&self) -> Vec<Uuid> {
        self.index.document_ids()
    }

    fn has_document(&self, id: Uuid) -> bool {
        self.index.has_document(id)
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn save(&mut self) -> Result<(), IndexError> {
        match &self.dir {
            Some(dir) => self.index.save(dir),
            None => Ok(()),
        }
    }
}

/// Instances of the hybrid index, read from the snapshot in `dir` when one
/// reads back whole.
pub struct IndexFolder {
    pub dir: Option<PathBuf>,
    /// The embedding model's relevance model, set on every instance.
    pub calibration: Calibration,
}

impl IndexSource for IndexFolder {
    fn load(&self) -> Result<Box<dyn SearchIndex>, IndexError> {
        let loaded = match &self.dir {
            Some(d) => HybridIndex::load(d)?,
            None => None,
        };
        if let (Some(d), Some(ix)) = (&self.dir, &loaded) {
            tracing::info!(dir = %d.display(), chunks = ix.len(), "search index snapshot loaded");
        }
        let mut index = match loaded {
            Some(ix) => ix,
            None => HybridIndex::new()?,
        };
        index.set_calibration(self.calibration);
        Ok(Box::new(SnapshotIndex {
            index,
            dir: self.dir.clone(),
        }))
    }

    fn empty(&self) -> Result<Box<dyn SearchIndex>, IndexError> {
        let mut index = HybridIndex::new()?;
        index.set_calibration(self.calibration);
        Ok(Box::new(SnapshotIndex {
            index,
            dir: self.dir.clone(),
        }))
    }

    fn persistent(&self) -> bool {
        self.dir.is_some()
    }
}

#[cfg(test)]
mod tests {
    use actix::Actor;
    use ragchat_actors::knowledge::Owner;
    use ragchat_actors::retrieval::{IndexDocuments, IndexedDocuments, RemoveDocument, Retrieval};
    use serde_json::json;

    use super::*;
    use crate::knowledge::index::tests::doc_with;

    #[actix::test]
    async fn a_document_removed_meanwhile_is_not_indexed_again_by_a_late_catch_up() {
        let index = IndexFolder {
            dir: None,
            calibration: crate::knowledge::calibration::MINILM_L6,
        }
        .load()
        .expect("index");
        let addr = Retrieval::new(index, false).start();
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
