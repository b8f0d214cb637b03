//! Vectors from another embedding model. A knowledge base embedded by one model
//! and searched with another ranks by noise, and nothing fails: our models all
//! have 384 dimensions (production moved from all-MiniLM-L6-v2 to
//! bge-small-en-v1.5). At start, a sample of stored documents spread over the
//! store has its first chunk embedded again and compared with the stored
//! vector; when one differs, every document is checked the same way in the
//! background and each that differs is re-chunked and re-embedded
//! (`Ingestor::reindex`). A document already done (by another node, or before a
//! restart) passes its check, so the pass can be repeated and resumed.

use ragchat_actors::chat::grounding::cosine;
use ragchat_actors::embed_worker::Lane;
use ragchat_actors::knowledge::Document;
use uuid::Uuid;

use super::ingest::{embedding_text, IngestError, Ingestor};

/// The same model on the same text gives a cosine of 1 up to rounding; another
/// model's vectors of the same text sit far below (MiniLM's against
/// bge-small's are unrelated spaces).
pub const SAME_MODEL: f32 = 0.98;

/// What the background pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reembedded {
    pub checked: usize,
    pub reembedded: usize,
    pub failed: usize,
}

/// Up to `n` of `len` positions spread evenly from the first.
fn spread(len: usize, n: usize) -> Vec<usize> {
    let n = n.min(len);
    (0..n).map(|i| i * len / n).collect()
}

/// Document `id`, and whether its first stored chunk is the current model's
/// vector of its text. None when the document is gone or has no chunk.
async fn agrees(ingestor: &Ingestor, id: Uuid) -> Result<Option<(Document, bool)>, IngestError> {
    let Some(doc) = ingestor.documents.document(id).await? else {
        return Ok(None);
    };
    let chunks = ingestor.documents.chunks(id).await?;
    let Some(first) = chunks.iter().min_by_key(|c| c.ordinal) else {
        return Ok(None);
    };
    let now = ingestor
        .embedder
        .embed(Lane::Bulk, vec![embedding_text(&doc.title, &first.content)])
        .await
        .map_err(IngestError::Model)?
        .vectors;
    let same = now
        .first()
        .is_some_and(|v| v.len() == first.embedding.len() && cosine(v, &first.embedding) >= SAME_MODEL);
    Ok(Some((doc, same)))
}

/// Checks `sample` documents spread over the store; when any was embedded by
/// another model, re-embeds every document that was (see the module's text).
/// None when the sample agreed (or the store is empty).
pub async fn check(ingestor: &Ingestor, sample: usize) -> Result<Option<Reembedded>, IngestError> {
    let ids = ingestor.documents.document_ids(None).await?;
    let mut differ = 0usize;
    for i in spread(ids.len(), sample) {
        if matches!(agrees(ingestor, ids[i]).await?, Some((_, false))) {
            differ += 1;
        }
    }
    if differ == 0 {
        return Ok(None);
    }
    tracing::warn!(
        sampled = sample.min(ids.len()),
        differ,
        documents = ids.len(),
        "stored vectors were made by another embedding model than models.embedding_dir's: \
         re-embedding the documents whose vectors differ, in the background"
    );
    let mut done = Reembedded::default();
    for id in ids {
        done.checked += 1;
        let outcome = match agrees(ingestor, id).await {
            Ok(Some((doc, false))) => ingestor.reindex(&doc).await.map(|d| d.is_some()),
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(true) => done.reembedded += 1,
            Ok(false) => {}
            Err(e) => {
                done.failed += 1;
                tracing::error!(document = %id, error = %e, "re-embedding a document failed");
            }
        }
        if done.checked % 500 == 0 {
            tracing::info!(
                checked = done.checked,
                reembedded = done.reembedded,
                "re-embedding the knowledge base"
            );
        }
    }
    tracing::info!(
        checked = done.checked,
        reembedded = done.reembedded,
        failed = done.failed,
        "knowledge base re-embedded with the current model"
    );
    Ok(Some(done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_spreads_over_the_store_and_never_leaves_it() {
        assert_eq!(spread(0, 8), Vec::<usize>::new());
        assert_eq!(spread(3, 8), vec![0, 1, 2]);
        assert_eq!(spread(100, 4), vec![0, 25, 50, 75]);
    }
}
