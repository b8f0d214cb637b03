//! candle adapters for the model ports: a BERT sentence embedder and GGUF causal
//! LMs (llama family, Qwen3) with a tokenizer read from the GGUF metadata when no
//! tokenizer.json is given.

pub mod bert;
pub mod fast;
pub mod gguf;
pub mod llama;
pub mod pool;
pub mod qmat;

use ragchat_actors::inference::ModelError;

pub(crate) fn model_error(e: impl std::fmt::Display) -> ModelError {
    ModelError::Internal(e.to_string())
}
