//! Causal LMs from GGUF: the llama family (SmolLM2, the development default) and
//! Qwen3 (the production default), both on our forward ([`super::llama`]). The
//! tokenizer comes from tokenizer.json when given, else from the GGUF metadata
//! (tokens, merges: byte-level BPE). Both use the ChatML template.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use ragchat_actors::inference::{CausalLm, ChatTokenizer, ModelError};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::model_error;

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
    let mut file = File::open(path)
        .map_err(|e| ModelError::Unavailable(format!("{}: {e} (run scripts/fetch-models)", path.display())))?;
    let ct = gguf_file::Content::read(&mut file).map_err(model_error)?;
    let (arch, trained_ctx) = architecture(&ct)?;
    let chat_tokenizer = chat_tokenizer(&ct, tokenizer_json)?;
    let context_len = trained_ctx.min(max_context.max(16));
    let lm: Box<dyn CausalLm> = match arch.as_str() {
        "llama" | "qwen3" => {
            let w = super::llama::LlamaWeights::from_gguf(&ct, &mut file, context_len, dense_prefill)?;
            Box::new(super::llama::LlamaSeq::new(Arc::new(w)))
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
    use crate::inference::llama::tests::{argmax, cosine};
    use crate::inference::synthetic::{write_qwen3, Layout, Qwen3Shape, TINY};
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_qwen3;
    use ragchat_actors::generate_worker::{GenEvent, GenerateConfig, GenerateRequest, GenerateWorker};
    use ragchat_actors::inference::SamplingParams;

    #[test]
    fn a_tiny_qwen3_gguf_loads_tokenizes_and_generates() {
        let path = std::env::temp_dir().join(format!("tiny-qwen3-{}.gguf", uuid::Uuid::new_v4()));
        write_qwen3(&path, &TINY, Layout::F32, 1).expect("write tiny qwen3");
        let vocab = TINY.vocab;
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
            ..SamplingParams::default()
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

    /// candle's stock quantized Qwen3: the logits of the last prompt token and of
    /// one decode step after it.
    fn stock_qwen3(path: &Path, prompt: &[u32], next: u32) -> (Vec<f32>, Vec<f32>) {
        let mut f = File::open(path).expect("gguf");
        let ct = gguf_file::Content::read(&mut f).expect("read");
        let mut m = quantized_qwen3::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).expect("stock qwen3");
        let run = |m: &mut quantized_qwen3::ModelWeights, toks: &[u32], pos: usize| {
            let x = Tensor::new(toks, &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("input");
            m.forward(&x, pos)
                .and_then(|t| t.squeeze(0))
                .and_then(|t| t.to_vec1::<f32>())
                .expect("stock forward")
        };
        let a = run(&mut m, prompt, 0);
        let b = run(&mut m, &[next], prompt.len());
        (a, b)
    }

    /// Our forward on Qwen3 files (per-head q/k norms, NEOX RoPE, grouped-query
    /// attention, separate or tied output head, heads wider than the residual)
    /// against candle's stock quantized Qwen3, on the fast path (Q8_0 and the Q4_K /
    /// Q6_K mix of Q4_K_M files: the slice forward) and the tensor path (F32: no
    /// kernel of ours), with and without the
    /// f32 prefill copy: the same logits for a 12-token prefill and a decode step
    /// (F32 files: equal to 1e-4; Q8_0: cosine > 0.999 and the same argmax).
    #[test]
    fn our_qwen3_forward_matches_candles_stock_qwen3() {
        let wide = Qwen3Shape {
            head_dim: 16,
            tied: true,
            ..TINY
        };
        // k-quants come in super-blocks of 256 values: every width a multiple of it.
        let k_quant = Qwen3Shape {
            hidden: 256,
            head_dim: 64,
            ffn: 512,
            ..TINY
        };
        let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 256).collect();
        for (shape, layout) in [
            (TINY, Layout::F32),
            (TINY, Layout::Q8_0),
            (wide, Layout::Q8_0),
            (wide, Layout::F32),
            (k_quant, Layout::Q4KM),
        ] {
            let path = std::env::temp_dir().join(format!("qwen3-cmp-{}.gguf", uuid::Uuid::new_v4()));
            // Fixed weights: Q8_0 logits differ from candle's by its own rounding
            // (~1% of their spread), so random files would now and then flip a
            // near tie at the top.
            write_qwen3(&path, &shape, layout, 7).expect("write");
            let (stock_prefill, stock_decode) = stock_qwen3(&path, &prompt, 7);
            for dense in [false, true] {
                let (mut lm, _) = load(&path, None, 64, dense).expect("load");
                let fast = lm
                    .as_any_mut()
                    .and_then(|a| a.downcast_mut::<crate::inference::llama::LlamaSeq>())
                    .map(|s| s.uses_fast_path());
                assert_eq!(fast, Some(layout != Layout::F32), "{layout:?}: our kernels cover it");
                let ours_prefill = lm.forward(&prompt, 0).expect("prefill");
                let ours_decode = lm.forward(&[7], prompt.len()).expect("decode");
                let what = format!(
                    "{layout:?} head_dim {} tied {} dense {dense}",
                    shape.head_dim, shape.tied
                );
                for (ours, stock, step) in [
                    (&ours_prefill, &stock_prefill, "prefill"),
                    (&ours_decode, &stock_decode, "decode"),
                ] {
                    assert_eq!(ours.len(), shape.vocab, "{what} {step}");
                    let c = cosine(ours, stock);
                    assert!(c > 0.999, "{what} {step}: cosine {c}");
                    if layout == Layout::F32 {
                        // The same products in f32 on both sides: equal up to rounding.
                        let diff = ours
                            .iter()
                            .zip(stock.iter())
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(diff < 1e-4, "{what} {step}: logits differ by {diff}");
                    }
                    assert_eq!(argmax(ours), argmax(stock), "{what} {step}");
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }

    /// A five-turn conversation on SmolLM2 through the worker: the same greedy
    /// answers with the prompt cache and without it, and from the second turn
    /// on only what follows the cached prefix is prefilled.
    #[test]
    fn the_worker_reuses_a_conversations_prefix_and_prefills_only_the_rest() {
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
                    ..SamplingParams::default()
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
        // The first turn is the same computation in both; from the second on, the
        // cached run's history comes from decode steps and the plain run's from a
        // prefill, whose kernels sum in another float order (the int8 GEMM takes 16
        // rows or more), so a near-tie between two tokens may go either way and the
        // conversations part. The test below checks every turn's logits instead.
        assert_eq!(cached[0].0, plain[0].0, "turn 0: the same greedy answer");
        for (i, (c, p)) in cached.iter().zip(&plain).enumerate() {
            assert!(!c.0.trim().is_empty(), "turn {i}: an answer");
            assert_eq!(p.2, 0);
            if i > 0 {
                // All of the previous turn's prompt at least is reused.
                assert!(c.2 >= cached[i - 1].1, "turn {i}: {} cached of {}", c.2, c.1);
            }
        }
    }

    /// What the prompt cache does, at the model: each turn's prompt is the
    /// conversation so far; the sequence kept from the previous turn (its prompt
    /// and greedy answer) is cut to the longest common prefix and only the rest is
    /// prefilled. Per turn, those logits against a fresh prefill of the whole
    /// prompt: cosine > 0.999, and the same next token unless the fresh logits put
    /// the two within 0.05 of each other (a tie that the float order of the decode
    /// and prefill kernels may break either way).
    #[test]
    fn a_reused_prefix_gives_the_logits_of_a_fresh_prefill_every_turn() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("SKIPPED: {} missing; run scripts/fetch-models", path.display());
            return;
        }
        let (lm, tok) = load(&path, None, 2048, true).expect("load");
        let argmax = crate::inference::llama::tests::argmax;
        let mut messages = vec![("system".to_string(), "You are a helpful assistant.".to_string())];
        let mut kept = lm.fork();
        let mut fed: Vec<u32> = Vec::new();
        for q in [
            "What is the capital of France?",
            "And how many people live there?",
            "Name one famous museum in that city.",
            "What is displayed in it?",
            "Thank you. Summarize our talk in one sentence.",
        ] {
            messages.push(("user".into(), q.into()));
            let prompt = tok.encode(&tok.chat_prompt(&messages)).expect("prompt");
            let common = fed.iter().zip(&prompt).take_while(|(a, b)| a == b).count();
            let reuse = common.min(prompt.len() - 1);
            let mut seq = kept.fork_prefix(reuse).expect("prefix");
            let mut logits = seq.forward(&prompt[reuse..], reuse).expect("rest");
            let fresh = lm.fork().forward(&prompt, 0).expect("fresh");
            // The same prompt prefilled in two pieces split where the reuse splits it:
            // how far the prefill alone moves with its blocks.
            if reuse > 0 {
                let mut split = lm.fork();
                split.forward(&prompt[..reuse], 0).expect("first piece");
                let pieces = split.forward(&prompt[reuse..], reuse).expect("second piece");
                println!(
                    "  prefilled in two pieces at {reuse}: cosine {:.6} to whole",
                    crate::inference::llama::tests::cosine(&pieces, &fresh)
                );
            }
            let c = crate::inference::llama::tests::cosine(&logits, &fresh);
            let (ours, best) = (argmax(&logits), argmax(&fresh));
            println!(
                "prompt {} tokens, {reuse} reused: cosine {c:.6}, next {ours} vs {best} (margin {:.3})",
                prompt.len(),
                fresh[best] - fresh[ours]
            );
            assert!(reuse > 0 || fed.is_empty(), "the previous turn is reused");
            assert!(c > 0.999, "{q}: cosine {c}");
            assert!(fresh[best] - fresh[ours] < 0.05, "{q}: next token {ours}, fresh {best}");
            let mut answer = Vec::new();
            for pos in prompt.len()..prompt.len() + 24 {
                let t = argmax(&logits) as u32;
                if tok.stop_tokens().contains(&t) {
                    break;
                }
                answer.push(t);
                logits = seq.forward(&[t], pos).expect("decode");
            }
            fed = prompt.iter().chain(&answer).copied().collect();
            kept = seq;
            messages.push(("assistant".into(), tok.decode(&answer).expect("decode")));
        }
    }
}
