//! Causal LMs from GGUF with candle's quantized tensors: the llama family
//! (SmolLM2, the development default) and Qwen3 (the production default). The
//! tokenizer comes from tokenizer.json when given, else from the GGUF metadata
//! (tokens, merges: byte-level BPE). Both use the ChatML template.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_qwen3;
use ragchat_actors::inference::{CausalLm, ChatTokenizer, ModelError};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::model_error;

/// A Qwen3 sequence on candle's stock quantized model (clones share the
/// tensors; each has its own KV cache).
#[derive(Clone)]
pub struct GgufLm {
    weights: quantized_qwen3::ModelWeights,
    device: Device,
    context_len: usize,
}

impl CausalLm for GgufLm {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        if pos + tokens.len() > self.context_len {
            return Err(ModelError::Invalid(format!(
                "sequence longer than the context ({})",
                self.context_len
            )));
        }
        let input = Tensor::new(tokens, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(model_error)?;
        let logits = self.weights.forward(&input, pos).map_err(model_error)?;
        logits
            .squeeze(0)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(model_error)
    }

    fn fork(&self) -> Box<dyn CausalLm> {
        let mut s = self.clone();
        s.weights.clear_kv_cache();
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
    ct.metadata
        .get(key)
        .ok_or_else(|| ModelError::Internal(format!("GGUF metadata lacks {key}")))
}

/// Byte-level BPE from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`;
/// control and user-defined tokens (token_type 3, 4) become special tokens.
pub fn tokenizer_from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer, ModelError> {
    let model = meta(ct, "tokenizer.ggml.model")?.to_string().map_err(model_error)?;
    if model != "gpt2" {
        return Err(ModelError::Internal(format!(
            "GGUF tokenizer '{model}' not supported: give a tokenizer.json"
        )));
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
        .filter_map(|v| {
            v.to_string()
                .ok()
                .and_then(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
        })
        .collect();
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(model_error)?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => Vec::new(),
    };
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(model_error)?;
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

/// A loaded model (the template sequences fork from) and its tokenizer.
pub type LoadedLm = (Box<dyn CausalLm>, Arc<dyn ChatTokenizer>);

/// Loads a GGUF causal LM. `max_context` caps the context (memory per sequence);
/// `dense_prefill` keeps an f32 copy of the llama weights for prefill.
pub fn load(
    path: &Path,
    tokenizer_json: Option<&Path>,
    max_context: usize,
    dense_prefill: bool,
) -> Result<LoadedLm, ModelError> {
    let device = Device::Cpu;
    let mut file = File::open(path)
        .map_err(|e| ModelError::Unavailable(format!("{}: {e} (run scripts/fetch-models)", path.display())))?;
    let ct = gguf_file::Content::read(&mut file).map_err(model_error)?;
    let (arch, trained_ctx) = architecture(&ct)?;
    let chat_tokenizer = chat_tokenizer(&ct, tokenizer_json)?;
    let context_len = trained_ctx.min(max_context.max(16));
    let lm: Box<dyn CausalLm> = match arch.as_str() {
        "llama" => {
            let w = super::llama::LlamaWeights::from_gguf(&ct, &mut file, context_len, dense_prefill)?;
            Box::new(super::llama::LlamaSeq::new(Arc::new(w)))
        }
        "qwen3" => {
            let weights = quantized_qwen3::ModelWeights::from_gguf(ct, &mut file, &device).map_err(model_error)?;
            Box::new(GgufLm {
                weights,
                device,
                context_len,
            })
        }
        other => {
            return Err(ModelError::Internal(format!(
                "GGUF architecture '{other}' not supported (llama, qwen3)"
            )))
        }
    };
    Ok((lm, Arc::new(chat_tokenizer)))
}

/// The model's architecture and the context it was trained for (2048 when the
/// metadata does not say).
fn architecture(ct: &gguf_file::Content) -> Result<(String, usize), ModelError> {
    let arch = meta(ct, "general.architecture")?
        .to_string()
        .map_err(model_error)?
        .clone();
    let trained_ctx = ct
        .metadata
        .get(&format!("{arch}.context_length"))
        .and_then(|v| v.to_u32().ok())
        .map(|v| v as usize)
        .unwrap_or(2048);
    Ok((arch, trained_ctx))
}

/// The tokenizer (tokenizer.json, else the GGUF metadata) and its stop tokens.
fn chat_tokenizer(ct: &gguf_file::Content, tokenizer_json: Option<&Path>) -> Result<HfChatTokenizer, ModelError> {
    let tokenizer = match tokenizer_json {
        Some(p) => Tokenizer::from_file(p).map_err(model_error)?,
        None => tokenizer_from_gguf(ct)?,
    };
    let mut stop: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| tokenizer.token_to_id(t))
        .collect();
    if let Some(eos) = ct
        .metadata
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.to_u32().ok())
    {
        if !stop.contains(&eos) {
            stop.push(eos);
        }
    }
    Ok(HfChatTokenizer { inner: tokenizer, stop })
}

/// Only the tokenizer of a GGUF model (its metadata is read, not its weights),
/// for a model served elsewhere: the tokenizer and the context, capped at
/// `max_context`.
pub fn load_tokenizer(
    path: &Path,
    tokenizer_json: Option<&Path>,
    max_context: usize,
) -> Result<(Arc<dyn ChatTokenizer>, usize), ModelError> {
    let mut file = File::open(path)
        .map_err(|e| ModelError::Unavailable(format!("{}: {e} (the tokenizer of the remote model)", path.display())))?;
    let ct = gguf_file::Content::read(&mut file).map_err(model_error)?;
    let (_, trained_ctx) = architecture(&ct)?;
    Ok((
        Arc::new(chat_tokenizer(&ct, tokenizer_json)?),
        trained_ctx.min(max_context.max(16)),
    ))
}

#[cfg(test)]
mod tests {
    //! The Qwen3 path, run on a tiny random-weight Qwen3 GGUF written here, so it
    //! is exercised without the 1.7B weights.
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use gguf_file::Value;
    use ragchat_actors::generate_worker::{GenEvent, GenerateConfig, GenerateRequest, GenerateWorker};
    use ragchat_actors::inference::SamplingParams;

    /// GPT-2's byte-to-character table: printable bytes map to themselves, the
    /// rest to code points from 256 on.
    fn byte_chars() -> Vec<String> {
        let mut n = 0;
        (0u32..256)
            .map(|b| {
                let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
                let c = if printable {
                    b
                } else {
                    n += 1;
                    255 + n
                };
                char::from_u32(c).map(String::from).unwrap_or_default()
            })
            .collect()
    }

    fn write_tiny_qwen3(path: &Path) -> usize {
        let mut tokens = byte_chars();
        tokens.push("he".into());
        let specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];
        let mut types = vec![1i32; tokens.len()];
        for s in specials {
            tokens.push(s.into());
            types.push(3);
        }
        let vocab = tokens.len();
        let (hidden, heads, kv, head_dim, ffn, layers) = (32usize, 4usize, 2usize, 8usize, 64usize, 2usize);
        let dev = Device::Cpu;
        let q = |shape: &[usize]| -> QTensor {
            let t = Tensor::randn(0f32, 0.2, shape, &dev).expect("randn");
            QTensor::quantize(&t, GgmlDType::F32).expect("quantize")
        };
        let ones =
            |n: usize| QTensor::quantize(&Tensor::ones(n, DType::F32, &dev).expect("ones"), GgmlDType::F32).expect("q");
        let mut named: Vec<(String, QTensor)> = vec![
            ("token_embd.weight".into(), q(&[vocab, hidden])),
            ("output_norm.weight".into(), ones(hidden)),
            ("output.weight".into(), q(&[vocab, hidden])),
        ];
        for i in 0..layers {
            let p = format!("blk.{i}");
            named.push((format!("{p}.attn_q.weight"), q(&[heads * head_dim, hidden])));
            named.push((format!("{p}.attn_k.weight"), q(&[kv * head_dim, hidden])));
            named.push((format!("{p}.attn_v.weight"), q(&[kv * head_dim, hidden])));
            named.push((format!("{p}.attn_output.weight"), q(&[hidden, heads * head_dim])));
            named.push((format!("{p}.attn_q_norm.weight"), ones(head_dim)));
            named.push((format!("{p}.attn_k_norm.weight"), ones(head_dim)));
            named.push((format!("{p}.attn_norm.weight"), ones(hidden)));
            named.push((format!("{p}.ffn_norm.weight"), ones(hidden)));
            named.push((format!("{p}.ffn_gate.weight"), q(&[ffn, hidden])));
            named.push((format!("{p}.ffn_up.weight"), q(&[ffn, hidden])));
            named.push((format!("{p}.ffn_down.weight"), q(&[hidden, ffn])));
        }
        let u = |v: usize| Value::U32(v as u32);
        let meta: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("qwen3".into())),
            ("general.dtype", Value::U32(0)),
            ("qwen3.attention.head_count", u(heads)),
            ("qwen3.attention.head_count_kv", u(kv)),
            ("qwen3.attention.key_length", u(head_dim)),
            ("qwen3.block_count", u(layers)),
            ("qwen3.embedding_length", u(hidden)),
            ("qwen3.context_length", u(128)),
            ("qwen3.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
            ("qwen3.rope.freq_base", Value::F32(10000.0)),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
            ),
            ("tokenizer.ggml.merges", Value::Array(vec![Value::String("h e".into())])),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.eos_token_id", u(vocab - 1)),
        ];
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = File::create(path).expect("create gguf");
        gguf_file::write(&mut f, &meta_refs, &tensor_refs).expect("write gguf");
        vocab
    }

    #[test]
    fn a_tiny_qwen3_gguf_loads_tokenizes_and_generates() {
        let path = std::env::temp_dir().join(format!("tiny-qwen3-{}.gguf", uuid::Uuid::new_v4()));
        let vocab = write_tiny_qwen3(&path);
        let (mut lm, tok) = load(&path, None, 64, false).expect("load tiny qwen3");
        assert_eq!(lm.context_len(), 64, "capped by max_context");

        // Tokenizer from metadata: byte-level round trip, one merge, special tokens whole.
        let text = "hello, wörld! 👋";
        let ids = tok.encode(text).expect("encode");
        assert_eq!(tok.decode(&ids).expect("decode"), text);
        assert_eq!(tok.encode("he").expect("encode").len(), 1, "the merge applies");
        let im_end = tok.encode("<|im_end|>").expect("encode");
        assert_eq!(im_end.len(), 1);
        assert!(tok.stop_tokens().contains(&im_end[0]));

        let prompt = tok
            .encode(&tok.chat_prompt(&[("user".into(), "hi".into())]))
            .expect("prompt");
        let logits = lm.forward(&prompt, 0).expect("prefill");
        assert_eq!(logits.len(), vocab);
        assert!(logits.iter().all(|l| l.is_finite()));
        let next = lm.forward(&[1], prompt.len()).expect("decode step");
        assert_eq!(next.len(), vocab);

        // Through the worker, with its own KV cache per sequence.
        let worker = GenerateWorker::start(
            Box::new(move || Ok(lm.fork())),
            tok,
            GenerateConfig {
                max_active: 2,
                queue_capacity: 4,
                // Pieces of three tokens: the prompt is prefilled over several steps.
                prefill_chunk: 3,
                prompt_cache_bytes: 0,
            },
        )
        .expect("worker");
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let params = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: Some(1),
        };
        worker
            .submit(GenerateRequest {
                prompt_tokens: prompt,
                params,
                max_tokens: 8,
                stop: vec![],
                events: tx,
                cache_scope: None,
            })
            .expect("submit");
        let done = rt.block_on(async {
            while let Some(ev) = rx.recv().await {
                if let GenEvent::Done { completion_tokens, .. } = ev {
                    return Some(completion_tokens);
                }
                if let GenEvent::Error(e) = ev {
                    panic!("generation failed: {e}");
                }
            }
            None
        });
        assert!(done.is_some_and(|n| (1..=8).contains(&n)), "{done:?}");
        let _ = std::fs::remove_file(&path);
    }

    /// A five-turn conversation on SmolLM2 through the worker: the same greedy
    /// answers with the prompt cache and without it, and from the second turn
    /// on only what follows the cached prefix is prefilled.
    #[test]
    fn a_conversation_answers_the_same_with_and_without_the_prompt_cache() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("SKIPPED: {} missing; run scripts/fetch-models", path.display());
            return;
        }
        let questions = [
            "What is the capital of France?",
            "And how many people live there?",
            "Name one famous museum in that city.",
            "What is displayed in it?",
            "Thank you. Summarize our talk in one sentence.",
        ];
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let talk = |cache_bytes: usize| {
            let (lm, tok) = load(&path, None, 2048, true).expect("load");
            let worker = GenerateWorker::start(
                Box::new(move || Ok(lm.fork())),
                tok.clone(),
                GenerateConfig {
                    max_active: 2,
                    queue_capacity: 4,
                    prefill_chunk: 0,
                    prompt_cache_bytes: cache_bytes,
                },
            )
            .expect("worker");
            let mut messages = vec![("system".to_string(), "You are a helpful assistant.".to_string())];
            let mut turns = Vec::new();
            for q in questions {
                messages.push(("user".into(), q.into()));
                let prompt = tok.encode(&tok.chat_prompt(&messages)).expect("prompt");
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let params = SamplingParams {
                    temperature: 0.0,
                    top_p: 1.0,
                    top_k: 0,
                    repetition_penalty: 1.0,
                    seed: Some(1),
                };
                let len = prompt.len();
                worker
                    .submit(GenerateRequest {
                        prompt_tokens: prompt,
                        params,
                        max_tokens: 32,
                        stop: vec![],
                        events: tx,
                        cache_scope: Some(uuid::Uuid::nil()),
                    })
                    .expect("submit");
                let (text, cached) = rt.block_on(async {
                    let mut text = String::new();
                    while let Some(ev) = rx.recv().await {
                        match ev {
                            GenEvent::Token { text: t } => text.push_str(&t),
                            GenEvent::Done { cached_tokens, .. } => return (text, cached_tokens),
                            GenEvent::Error(e) => panic!("generation failed: {e}"),
                        }
                    }
                    panic!("no end");
                });
                println!(
                    "cache {cache_bytes}: prompt {len} tokens, {cached} cached, {} prefilled",
                    len - cached
                );
                messages.push(("assistant".into(), text.clone()));
                turns.push((text, len, cached));
            }
            turns
        };
        let cached = talk(64 << 20);
        let plain = talk(0);
        for (i, (c, p)) in cached.iter().zip(&plain).enumerate() {
            assert_eq!(c.0, p.0, "turn {i}: the same greedy answer");
            assert_eq!(p.2, 0);
            if i > 0 {
                // All of the previous turn's prompt at least is reused.
                assert!(c.2 >= cached[i - 1].1, "turn {i}: {} cached of {}", c.2, c.1);
            }
        }
    }
}
