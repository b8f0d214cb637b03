//! Qwen3 GGUF files with random weights and a real model's exact shape: the tiny
//! one the tests compare our forward on, and Qwen3-1.7B's for `ragchat bench
//! models --shape` (speed depends on the shape and the block types, not on the
//! values). The tokenizer in the metadata is a byte-level BPE: the 256 byte
//! tokens, one merge ("h e"), filler tokens up to the vocabulary size and the
//! ChatML special tokens last.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use gguf_file::Value;
use ragchat_actors::inference::ModelError;

use super::model_error;

/// The dimensions of a Qwen3 model.
#[derive(Clone, Copy, Debug)]
pub struct Qwen3Shape {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub layers: usize,
    pub context: usize,
    /// The output head is the token embeddings (no output.weight).
    pub tied: bool,
}

/// The tests' model: two layers, four query heads sharing two kv heads.
pub const TINY: Qwen3Shape = Qwen3Shape {
    vocab: 260,
    hidden: 32,
    heads: 4,
    kv_heads: 2,
    head_dim: 8,
    ffn: 64,
    layers: 2,
    context: 128,
    tied: false,
};

/// Qwen/Qwen3-1.7B (config.json of the release: tied embeddings, 28 layers).
pub const QWEN3_1_7B: Qwen3Shape = Qwen3Shape {
    vocab: 151_936,
    hidden: 2048,
    heads: 16,
    kv_heads: 8,
    head_dim: 128,
    ffn: 6144,
    layers: 28,
    context: 40_960,
    tied: true,
};

/// The block types of the weight matrices (norms stay f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    F32,
    /// Every matrix Q8_0, as in the official Qwen3 GGUFs.
    Q8_0,
    /// llama.cpp's Q4_K_M mix: Q6_K for attn_v, ffn_down and the embeddings
    /// (here also the output head), Q4_K for the rest.
    Q4KM,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::F32 => "f32",
            Layout::Q8_0 => "q8_0",
            Layout::Q4KM => "q4_k_m",
        }
    }

    fn dtype(self, tensor: &str) -> GgmlDType {
        match self {
            Layout::F32 => GgmlDType::F32,
            Layout::Q8_0 => GgmlDType::Q8_0,
            Layout::Q4KM => {
                let heavy = ["attn_v", "ffn_down", "token_embd", "output."];
                if heavy.iter().any(|h| tensor.contains(h)) {
                    GgmlDType::Q6K
                } else {
                    GgmlDType::Q4K
                }
            }
        }
    }

    /// GGUF's `general.file_type` (llama.cpp's LLAMA_FTYPE_*).
    fn file_type(self) -> u32 {
        match self {
            Layout::F32 => 0,
            Layout::Q8_0 => 7,
            Layout::Q4KM => 15,
        }
    }
}

/// GPT-2's byte-to-character table: printable bytes map to themselves, the rest
/// to code points from 256 on.
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

/// Normal samples from a seeded generator (splitmix64, Box-Muller), so a file is
/// the same every time it is written.
struct Normal {
    state: u64,
}

impl Normal {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 1.0) / (1u64 << 24) as f32
    }

    fn fill(&mut self, n: usize, std: f32) -> Vec<f32> {
        let mut v = Vec::with_capacity(n + 1);
        while v.len() < n {
            let (u1, u2) = (self.unit(), self.unit());
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let a = std::f32::consts::TAU * u2;
            v.push(r * a.cos());
            v.push(r * a.sin());
        }
        v.truncate(n);
        v
    }
}

const SPECIALS: [&str; 3] = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];

/// Writes a random-weight Qwen3 GGUF of `shape` in `layout` to `path` (through a
/// `.partial` file renamed at the end, so an interrupted write leaves no file that
/// looks whole). Weights are N(0, 0.2²) for the tiny shapes, N(0, 0.02²) from
/// 1024 wide on (as initialized models are), drawn from `seed`; norm weights are ones.
pub fn write_qwen3(path: &Path, shape: &Qwen3Shape, layout: Layout, seed: u64) -> Result<(), ModelError> {
    let base = byte_chars().len() + 1 + SPECIALS.len();
    if shape.vocab < base {
        return Err(ModelError::Invalid(format!("a vocabulary of at least {base} tokens")));
    }
    let mut tokens = byte_chars();
    tokens.push("he".into());
    let fillers = shape.vocab - base;
    tokens.extend((0..fillers).map(|i| format!("<filler{i}>")));
    let mut types = vec![1i32; tokens.len()];
    for s in SPECIALS {
        tokens.push(s.into());
        types.push(3);
    }
    let dev = Device::Cpu;
    let std = if shape.hidden >= 1024 { 0.02f32 } else { 0.2 };
    let mut rng = Normal { state: seed };
    let mut weight = |name: &str, rows: usize, cols: usize| -> Result<QTensor, ModelError> {
        let t = Tensor::from_vec(rng.fill(rows * cols, std), (rows, cols), &dev).map_err(model_error)?;
        QTensor::quantize(&t, layout.dtype(name)).map_err(model_error)
    };
    let ones = |n: usize| -> Result<QTensor, ModelError> {
        let t = Tensor::ones(n, DType::F32, &dev).map_err(model_error)?;
        QTensor::quantize(&t, GgmlDType::F32).map_err(model_error)
    };
    let s = shape;
    let (q_width, kv_width) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let mut named: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), weight("token_embd", s.vocab, s.hidden)?),
        ("output_norm.weight".into(), ones(s.hidden)?),
    ];
    if !s.tied {
        named.push(("output.weight".into(), weight("output.", s.vocab, s.hidden)?));
    }
    for i in 0..s.layers {
        let p = format!("blk.{i}");
        for (n, rows, cols) in [
            ("attn_q", q_width, s.hidden),
            ("attn_k", kv_width, s.hidden),
            ("attn_v", kv_width, s.hidden),
            ("attn_output", s.hidden, q_width),
            ("ffn_gate", s.ffn, s.hidden),
            ("ffn_up", s.ffn, s.hidden),
            ("ffn_down", s.hidden, s.ffn),
        ] {
            named.push((format!("{p}.{n}.weight"), weight(n, rows, cols)?));
        }
        named.push((format!("{p}.attn_q_norm.weight"), ones(s.head_dim)?));
        named.push((format!("{p}.attn_k_norm.weight"), ones(s.head_dim)?));
        named.push((format!("{p}.attn_norm.weight"), ones(s.hidden)?));
        named.push((format!("{p}.ffn_norm.weight"), ones(s.hidden)?));
    }
    let u = |v: usize| Value::U32(v as u32);
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("qwen3".into())),
        ("general.name", Value::String("random-weight Qwen3".into())),
        ("general.file_type", Value::U32(layout.file_type())),
        // candle's stock Qwen3 computes in this type (0: f32; it assumes f16 without it).
        ("general.dtype", Value::U32(0)),
        ("qwen3.attention.head_count", u(s.heads)),
        ("qwen3.attention.head_count_kv", u(s.kv_heads)),
        ("qwen3.attention.key_length", u(s.head_dim)),
        ("qwen3.attention.value_length", u(s.head_dim)),
        ("qwen3.block_count", u(s.layers)),
        ("qwen3.embedding_length", u(s.hidden)),
        ("qwen3.feed_forward_length", u(s.ffn)),
        ("qwen3.context_length", u(s.context)),
        ("qwen3.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("qwen3.rope.freq_base", Value::F32(1_000_000.0)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("qwen2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.merges", Value::Array(vec![Value::String("h e".into())])),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.eos_token_id", u(s.vocab - 1)),
        ("tokenizer.ggml.padding_token_id", u(s.vocab - 1)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let partial = path.with_extension("partial");
    let mut f = File::create(&partial).map_err(model_error)?;
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).map_err(model_error)?;
    f.sync_all().map_err(model_error)?;
    std::fs::rename(&partial, path).map_err(model_error)
}
