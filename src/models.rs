//! Starting the model workers from settings: the embedding worker (BERT) and
//! the generation worker (GGUF), each left out with a warning when its files are
//! missing, so the server runs and the routes that need a model answer 503.

use std::path::PathBuf;
use std::time::Duration;

/// Starts the embedding worker (None, with a warning, when the model is missing).
pub fn start_embedder(m: &crate::config::ModelSettings) -> Option<ragchat_actors::embed_worker::EmbedWorker> {
    use ragchat_actors::embed_worker::EmbedWorker;
    use ragchat_actors::inference::Embedder;
    let dir = PathBuf::from(&m.embedding_dir);
    let max_tokens = m.embedding_max_tokens;
    EmbedWorker::start(
        Box::new(move || {
            crate::inference::bert::BertEmbedder::load(&dir, max_tokens).map(|e| Box::new(e) as Box<dyn Embedder>)
        }),
        embed_config(m),
    )
    .map_err(|e| tracing::warn!(error = %e, "embedding model not loaded"))
    .ok()
}

/// The embedding worker's batching and lanes, from `[models]`.
pub fn embed_config(m: &crate::config::ModelSettings) -> ragchat_actors::embed_worker::EmbedConfig {
    ragchat_actors::embed_worker::EmbedConfig {
        max_batch: m.embed_max_batch.max(1),
        max_wait: Duration::from_millis(m.embed_max_wait_ms),
        queue_capacity: m.embed_queue.max(1),
        bulk_capacity: m.embed_bulk_queue.max(1),
        bulk_wait: Duration::from_millis(m.embed_bulk_wait_ms),
        lanes: m.embed_lanes,
    }
}

/// Starts the model workers. A model whose files are missing (or that fails to
/// load) is left out with a warning: the server runs, its routes answer 503.
pub fn start_models(
    m: &crate::config::ModelSettings,
) -> (
    Option<ragchat_actors::embed_worker::EmbedWorker>,
    Option<ragchat_actors::generate_worker::GenerateWorker>,
) {
    use ragchat_actors::generate_worker::{GenerateConfig, GenerateWorker};
    if !m.enabled {
        return (None, None);
    }
    let embedder = start_embedder(m);
    let path = PathBuf::from(&m.generator_path);
    let tok = (!m.generator_tokenizer.trim().is_empty()).then(|| PathBuf::from(&m.generator_tokenizer));
    let generator = crate::inference::gguf::load(&path, tok.as_deref(), m.max_context, m.dense_prefill)
        .and_then(|(template, tokenizer)| {
            GenerateWorker::start(
                Box::new(move || Ok(template.fork())),
                tokenizer,
                GenerateConfig {
                    max_active: m.max_active.max(1),
                    queue_capacity: m.generate_queue.max(1),
                    prefill_chunk: m.prefill_chunk,
                },
            )
        })
        .map_err(|e| tracing::warn!(error = %e, "generation model not loaded"))
        .ok();
    (embedder, generator)
}
