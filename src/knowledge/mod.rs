//! The knowledge base: chunking, the in-process search index, and the retrieval
//! actor that owns it.

pub mod calibration;
pub mod chunking;
pub mod formats;
pub mod hnsw;
pub mod index;
pub mod ingest;
pub mod jobs;
pub mod model_change;
pub mod pdf;
pub mod retrieval;
pub mod seed;
