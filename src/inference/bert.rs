//! all-MiniLM-L6-v2 (BERT, 384 dimensions) as sentence-transformers runs it: mean
//! pooling over the attention mask, then L2 normalization.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use ragchat_actors::inference::{Embedder, ModelError};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::model_error;

pub struct BertEmbedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dimensions: usize,
    max_tokens: usize,
}

impl BertEmbedder {
    /// Loads model.safetensors, config.json and tokenizer.json from `dir`.
    /// Inputs are truncated at `max_tokens` (sentence-transformers uses 256 for this model).
    pub fn load(dir: &Path, max_tokens: usize) -> Result<Self, ModelError> {
        let device = Device::Cpu;
        let config_text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| {
            ModelError::Unavailable(format!(
                "{}: {e} (run scripts/fetch-models)",
                dir.join("config.json").display()
            ))
        })?;
        let config: Config = serde_json::from_str(&config_text).map_err(model_error)?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(model_error)?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(model_error)?;
        // SAFETY: the weights file is memory-mapped read-only; nothing writes it while we run.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &device) }
            .map_err(model_error)?;
        let model = BertModel::load(vb, &config).map_err(model_error)?;
        Ok(BertEmbedder {
            model,
            tokenizer,
            device,
            dimensions: config.hidden_size,
            max_tokens,
        })
    }
}

impl Embedder for BertEmbedder {
    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn count_tokens(&self, text: &str) -> Result<usize, ModelError> {
        let enc = self.tokenizer.encode(text, true).map_err(model_error)?;
        Ok(enc.get_ids().len().min(self.max_tokens))
    }

    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(model_error)?;
        let rows = |f: &dyn Fn(&tokenizers::Encoding) -> Vec<u32>| -> Result<Tensor, ModelError> {
            let data: Vec<Tensor> = encodings
                .iter()
                .map(|e| Tensor::new(f(e).as_slice(), &self.device))
                .collect::<Result<_, _>>()
                .map_err(model_error)?;
            Tensor::stack(&data, 0).map_err(model_error)
        };
        let ids = rows(&|e| e.get_ids().to_vec())?;
        let type_ids = rows(&|e| e.get_type_ids().to_vec())?;
        let mask = rows(&|e| e.get_attention_mask().to_vec())?;
        let hidden = self.model.forward(&ids, &type_ids, Some(&mask)).map_err(model_error)?;
        // Mean over the real tokens, then unit length.
        let mask = mask
            .to_dtype(DType::F32)
            .map_err(model_error)?
            .unsqueeze(2)
            .map_err(model_error)?;
        let summed = hidden
            .broadcast_mul(&mask)
            .and_then(|t| t.sum(1))
            .map_err(model_error)?;
        let counts = mask.sum(1).map_err(model_error)?;
        let mean = summed.broadcast_div(&counts).map_err(model_error)?;
        let norm = mean
            .sqr()
            .and_then(|t| t.sum_keepdim(D::Minus1))
            .and_then(|t| t.sqrt())
            .map_err(model_error)?;
        let unit = mean.broadcast_div(&norm).map_err(model_error)?;
        unit.to_vec2::<f32>().map_err(model_error)
    }
}
