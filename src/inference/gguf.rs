//! Causal LMs from GGUF with candle's quantized tensors: the llama family
//! (SmolLM2, the development default) and Qwen3 (the production default). The
//! tokenizer comes from tokenizer.json when given, else from the GGUF metadata
//! (tokens, merges: byte-level BPE). Both use the ChatML template.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen3};
use ragchat_actors::inference::{CausalLm, ChatTokenizer, ModelError};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::model_error;

#[derive(Clone)]
enum Weights {
    Llama(quantized_llama::ModelWeights),
    Qwen3(quantized_qwen3::ModelWeights),
}

/// One sequence over shared quantized weights (clones share the tensors; each
/// has its own KV cache).
#[derive(Clone)]
pub struct GgufLm {
    weights: Weights,
    device: Device,
    context_len: usize,
}

impl CausalLm for GgufLm {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        if pos + tokens.len() > self.context_len {
            return Err(ModelError::Invalid(format!("sequence longer than the context ({})", self.context_len)));
        }
        let input = Tensor::new(tokens, &self.device).and_then(|t| t.unsqueeze(0)).map_err(model_error)?;
        let logits = match &mut self.weights {
            Weights::Llama(m) => m.forward(&input, pos),
            Weights::Qwen3(m) => m.forward(&input, pos),
        }
        .map_err(model_error)?;
        logits.squeeze(0).and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.to_vec1::<f32>()).map_err(model_error)
    }

    fn fork(&self) -> Box<dyn CausalLm> {
        let mut s = self.clone();
        match &mut s.weights {
            Weights::Llama(m) => m.clear_kv_cache(),
            Weights::Qwen3(m) => m.clear_kv_cache(),
        }
        Box::new(s)
    }

    fn context_len(&self) -> usize {
        self.context_len
    }
}

pub struct HfChatTokenizer {
    inner: Tokenizer,
    stop: Vec<u32>,
}

impl ChatTokenizer for HfChatTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        Ok(self.inner.encode(text, false).map_err(model_error)?.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, true).map_err(model_error)
    }

    fn stop_tokens(&self) -> &[u32] {
        &self.stop
    }
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, ModelError> {
    ct.metadata.get(key).ok_or_else(|| ModelError::Internal(format!("GGUF metadata lacks {key}")))
}

/// Byte-level BPE from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`;
/// control and user-defined tokens (token_type 3, 4) become special tokens.
pub fn tokenizer_from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer, ModelError> {
    let model = meta(ct, "tokenizer.ggml.model")?.to_string().map_err(model_error)?;
    if model != "gpt2" {
        return Err(ModelError::Internal(format!("GGUF tokenizer '{model}' not supported: give a tokenizer.json")));
    }
    let tokens: Vec<String> = meta(ct, "tokenizer.ggml.tokens")?
        .to_vec()
        .map_err(model_error)?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<Result<_, _>>()
        .map_err(model_error)?;
    let merges: Vec<(String, String)> = meta(ct, "tokenizer.ggml.merges")?
        .to_vec()
        .map_err(model_error)?
        .iter()
        .filter_map(|v| v.to_string().ok().and_then(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string()))))
        .collect();
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec().map_err(model_error)?.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
        None => Vec::new(),
    };
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(model_error)?;
    let mut tk = Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(tok, _)| AddedToken::from(tok.clone(), true))
        .collect();
    tk.add_special_tokens(special).map_err(model_error)?;
    Ok(tk)
}

/// Loads a GGUF causal LM. `max_context` caps the context (memory per sequence).
pub fn load(path: &Path, tokenizer_json: Option<&Path>, max_context: usize) -> Result<(GgufLm, Arc<dyn ChatTokenizer>), ModelError> {
    let device = Device::Cpu;
    let mut file = File::open(path)
        .map_err(|e| ModelError::Unavailable(format!("{}: {e} (run scripts/fetch-models)", path.display())))?;
    let ct = gguf_file::Content::read(&mut file).map_err(model_error)?;
    let arch = meta(&ct, "general.architecture")?.to_string().map_err(model_error)?.clone();
    let trained_ctx = ct
        .metadata
        .get(&format!("{arch}.context_length"))
        .and_then(|v| v.to_u32().ok())
        .map(|v| v as usize)
        .unwrap_or(2048);
    let tokenizer = match tokenizer_json {
        Some(p) => Tokenizer::from_file(p).map_err(model_error)?,
        None => tokenizer_from_gguf(&ct)?,
    };
    let mut stop: Vec<u32> = ["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| tokenizer.token_to_id(t)).collect();
    if let Some(eos) = ct.metadata.get("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()) {
        if !stop.contains(&eos) {
            stop.push(eos);
        }
    }
    let weights = match arch.as_str() {
        "llama" => Weights::Llama(quantized_llama::ModelWeights::from_gguf(ct, &mut file, &device).map_err(model_error)?),
        "qwen3" => Weights::Qwen3(quantized_qwen3::ModelWeights::from_gguf(ct, &mut file, &device).map_err(model_error)?),
        other => return Err(ModelError::Internal(format!("GGUF architecture '{other}' not supported (llama, qwen3)"))),
    };
    let lm = GgufLm { weights, device, context_len: trained_ctx.min(max_context.max(16)) };
    Ok((lm, Arc::new(HfChatTokenizer { inner: tokenizer, stop })))
}
