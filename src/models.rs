//! Starting the model workers from settings: the embedding worker (BERT) and
//! the generation worker (GGUF), each left out with a warning when its files are
//! missing, so the server runs and the routes that need a model answer 503.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::inference::remote::{RemoteConfig, RemoteEmbedder, RemoteGenerator};

/// A remote server's settings from `[models]`.
fn remote_config(m: &crate::config::ModelSettings, url: &str, key: &str, model: &str) -> RemoteConfig {
    RemoteConfig {
        url: url.trim().to_string(),
        api_key: Some(key.trim().to_string()).filter(|k| !k.is_empty()),
        model: model.to_string(),
        timeout: Duration::from_millis(m.remote_timeout_ms.max(1)),
        retries: m.remote_retries,
        breaker_failures: m.remote_breaker_failures.max(1),
        breaker_open: Duration::from_secs(m.remote_breaker_secs),
        max_in_flight: m.remote_max_in_flight.max(1),
    }
}

/// Generation by the server at `generator_url`, with the model's tokenizer read
/// from its GGUF (metadata only) or tokenizer.json.
fn start_remote_generator(
    m: &crate::config::ModelSettings,
    path: &std::path::Path,
    tokenizer_json: Option<&std::path::Path>,
) -> Result<ragchat_actors::generate_worker::GenerateWorker, ragchat_actors::inference::ModelError> {
    use ragchat_actors::generate_worker::{GenerateWorker, RemoteGenerate};
    let (tokenizer, context) = crate::inference::gguf::load_tokenizer(path, tokenizer_json, m.max_context)?;
    let model = Some(m.generator_remote_model.trim())
        .filter(|s| !s.is_empty())
        .unwrap_or(&m.generator_name);
    let config = remote_config(m, &m.generator_url, &m.generator_api_key, model);
    let stats: Arc<ragchat_actors::generate_worker::GenStats> = Default::default();
    let generator: Arc<dyn RemoteGenerate> = Arc::new(RemoteGenerator::new(config, stats.clone())?);
    tracing::info!(url = %m.generator_url, model, context, "generation by a remote server");
    Ok(GenerateWorker::remote(generator, stats, tokenizer, context))
}

/// Starts the embedding worker (None, with a warning, when the model is missing).
pub fn start_embedder(m: &crate::config::ModelSettings) -> Option<ragchat_actors::embed_worker::EmbedWorker> {
    use ragchat_actors::embed_worker::EmbedWorker;
    use ragchat_actors::inference::Embedder;
    let dir = PathBuf::from(&m.embedding_dir);
    let max_tokens = m.embedding_max_tokens;
    let factory: ragchat_actors::embed_worker::EmbedderFactory = if m.embedder_url.trim().is_empty() {
        Box::new(move || {
            crate::inference::bert::BertEmbedder::load(&dir, max_tokens).map(|e| Box::new(e) as Box<dyn Embedder>)
        })
    } else {
        let model = Some(m.embedder_remote_model.trim())
            .filter(|s| !s.is_empty())
            .unwrap_or(&m.embedding_name);
        let config = remote_config(m, &m.embedder_url, &m.embedder_api_key, model);
        tracing::info!(url = %m.embedder_url, model, "embeddings by a remote server");
        Box::new(move || {
            let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).ok();
            RemoteEmbedder::connect(config.clone(), max_tokens, tokenizer).map(|e| Box::new(e) as Box<dyn Embedder>)
        })
    };
    EmbedWorker::start(factory, embed_config(m))
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
    if !m.generator_url.trim().is_empty() {
        let generator = start_remote_generator(m, &path, tok.as_deref())
            .map_err(|e| tracing::warn!(error = %e, "remote generation not set up"))
            .ok();
        return (embedder, generator);
    }
    let generator = crate::inference::gguf::load(&path, tok.as_deref(), m.max_context, m.dense_prefill)
        .and_then(|(template, tokenizer)| {
            GenerateWorker::start(
                Box::new(move || Ok(template.fork())),
                tokenizer,
                GenerateConfig {
                    max_active: m.max_active.max(1),
                    queue_capacity: m.generate_queue.max(1),
                    prefill_chunk: m.prefill_chunk,
                    prompt_cache_bytes: m.prompt_cache_mb << 20,
                },
            )
        })
        .map_err(|e| tracing::warn!(error = %e, "generation model not loaded"))
        .ok();
    (embedder, generator)
}
