//! The retrieval actor: owns the search index on its own arbiter, so indexing and
//! searches are serialised through its mailbox while HTTP workers stay free.

use actix::prelude::*;
use ragchat_actors::knowledge::{Chunk, Document, Reader};
use ragchat_actors::ports::DocumentStore;
use uuid::Uuid;

use super::index::{Filters, Hit, IndexError, Route, SearchIndex};

pub struct Retrieval {
    index: SearchIndex,
}

impl Actor for Retrieval {
    type Context = Context<Self>;
}

impl Retrieval {
    /// Starts the actor on a new arbiter with an empty index.
    pub fn start() -> Result<Addr<Retrieval>, IndexError> {
        let index = SearchIndex::new()?;
        Ok(Retrieval::start_in_arbiter(&Arbiter::new().handle(), move |_| {
            Retrieval { index }
        }))
    }
}

/// Adds (or replaces) documents with their chunks; one commit for the batch.
#[derive(Message)]
#[rtype(result = "Result<(), IndexError>")]
pub struct IndexDocuments(pub Vec<(Document, Vec<Chunk>)>);

impl Handler<IndexDocuments> for Retrieval {
    type Result = Result<(), IndexError>;
    fn handle(&mut self, msg: IndexDocuments, _: &mut Self::Context) -> Self::Result {
        for (d, c) in &msg.0 {
            self.index.add(d, c)?;
        }
        self.index.commit()
    }
}

#[derive(Message)]
#[rtype(result = "Result<(), IndexError>")]
pub struct RemoveDocument(pub Uuid);

impl Handler<RemoveDocument> for Retrieval {
    type Result = Result<(), IndexError>;
    fn handle(&mut self, msg: RemoveDocument, _: &mut Self::Context) -> Self::Result {
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

/// Loads every stored document into the index (at start), in batches.
pub async fn load_all(store: &dyn DocumentStore, retrieval: &Addr<Retrieval>) -> Result<usize, String> {
    let ids = store.document_ids(None).await.map_err(|e| e.to_string())?;
    let mut batch = Vec::new();
    for id in &ids {
        let Some(doc) = store.document(*id).await.map_err(|e| e.to_string())? else {
            continue;
        };
        let chunks = store.chunks(*id).await.map_err(|e| e.to_string())?;
        batch.push((doc, chunks));
        if batch.len() == 256 {
            retrieval
                .send(IndexDocuments(std::mem::take(&mut batch)))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
    }
    retrieval
        .send(IndexDocuments(batch))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(ids.len())
}
