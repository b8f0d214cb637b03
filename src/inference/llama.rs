//! Our forward for the llama family over GGUF weights: llama itself (SmolLM2, the
//! development model) and Qwen3 (the production model), which adds an RMSNorm of
//! each query and key head before RoPE, a head width of its own
//! (`attention.key_length`) and the NEOX rotation (halves, not pairs). It differs
//! from candle's stock `quantized_llama` / `quantized_qwen3` in two ways that
//! matter for serving:
//!
//! - Weights are shared (`Arc`) and each sequence owns only its KV cache, so a new
//!   sequence costs nothing to start.
//! - Every linear layer keeps the quantized weights for decode (one row: memory
//!   bound, the quantized kernel wins) and, optionally, a dequantized f32 copy for
//!   prefill (many rows: compute bound, f32 GEMM wins). Measured on the 2-core dev
//!   machine with SmolLM2-135M Q4_1: prefill 52 tok/s quantized vs 261 tok/s f32;
//!   decode 29.5 tok/s quantized vs 13.7 f32. The copy costs 4 bytes per weight.

use std::sync::Arc;

use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;
use ragchat_actors::inference::{CausalLm, ModelError};

use super::fast::{attend_head, FastWeights, KvBuf, LayerParts};
use super::model_error;

/// From this many rows on, a linear layer uses its f32 copy (RAGCHAT_DENSE_MIN_ROWS
/// overrides it, for measurements).
fn dense_min_rows() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("RAGCHAT_DENSE_MIN_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8)
    })
}

struct Linear {
    /// candle's quantized product; None when the fast path serves every small input.
    q: Option<QMatMul>,
    dense: Option<Tensor>,
}

impl Linear {
    fn new(t: QTensor, dense: bool, quantized: bool) -> candle_core::Result<Self> {
        let d = if dense { Some(t.dequantize(&Device::Cpu)?) } else { None };
        Ok(Linear {
            q: if quantized {
                Some(QMatMul::from_qtensor(t)?)
            } else {
                None
            },
            dense: d,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let rows = x.elem_count() / x.dim(D::Minus1)?;
        if let Some(q) = &self.q {
            if rows < dense_min_rows() || self.dense.is_none() {
                return q.forward(x);
            }
        }
        let Some(w) = &self.dense else {
            candle_core::bail!("linear layer without weights for the tensor path")
        };
        let w = match *x.dims() {
            [b, _, _] => w.broadcast_left(b)?.t()?,
            _ => w.t()?,
        };
        x.matmul(&w)
    }
}

struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    /// Qwen3: RMSNorm over each query / key head, before RoPE.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
}

pub struct LlamaWeights {
    /// f32 embeddings for the tensor path; None when the fast path serves every
    /// input (no f32 copy: Qwen3-1.7B's would take 1.2 GB).
    embed: Option<Embedding>,
    vocab: usize,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// Qwen3's rotation of halves (`rope`) instead of llama's pairs (`rope_i`).
    neox: bool,
    cos: Tensor,
    sin: Tensor,
    context_len: usize,
    /// The slice forward for decode steps and short inputs, when every linear
    /// layer has one of our kernels (RAGCHAT_FAST_DECODE=0 turns it off, for
    /// measurements).
    fast: Option<FastWeights>,
}

fn fast_enabled() -> bool {
    std::env::var("RAGCHAT_FAST_DECODE").map_or(true, |v| v != "0")
}

/// The products of each layer, by GGUF tensor name.
const LAYER_PRODUCTS: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// Whether the int8 GEMM covers every layer's products: Q4_1, Q8_0, Q4_K or
/// Q6_K, rows in whole tiles of 16 ([`super::qmat::QMat::tile`]).
fn int8_covers(ct: &gguf_file::Content, n_layer: usize) -> bool {
    use candle_core::quantized::GgmlDType;
    (0..n_layer).all(|i| {
        LAYER_PRODUCTS.iter().all(|n| {
            ct.tensor_infos.get(&format!("blk.{i}.{n}.weight")).is_some_and(|t| {
                matches!(
                    t.ggml_dtype,
                    GgmlDType::Q4_1 | GgmlDType::Q8_0 | GgmlDType::Q4K | GgmlDType::Q6K
                ) && t.shape.dims().first().is_some_and(|rows| rows.is_multiple_of(16))
            })
        })
    })
}

/// Whether our kernels cover every product of the model: each linear layer and
/// the output head (or the embeddings it is tied to) in Q4_1, Q8_0, Q4_K or Q6_K.
fn fast_covers(ct: &gguf_file::Content, n_layer: usize) -> bool {
    use candle_core::quantized::GgmlDType;
    let ok = |name: &str| {
        ct.tensor_infos.get(name).is_some_and(|t| {
            matches!(
                t.ggml_dtype,
                GgmlDType::Q4_1 | GgmlDType::Q8_0 | GgmlDType::Q4K | GgmlDType::Q6K
            )
        })
    };
    let head = if ct.tensor_infos.contains_key("output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    ok("token_embd.weight")
        && ok(head)
        && (0..n_layer).all(|i| LAYER_PRODUCTS.iter().all(|n| ok(&format!("blk.{i}.{n}.weight"))))
}

impl LlamaWeights {
    /// The weights from a GGUF file. `dense_prefill`: prefill on an f32 copy of
    /// the weights, unless the int8 GEMM covers the model here (AVX-512 VNNI,
    /// Q4_1, Q8_0, Q4_K or Q6_K layers), which is faster and needs no copy.
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        context_len: usize,
        dense_prefill: bool,
    ) -> Result<Self, ModelError> {
        Self::from_gguf_with(ct, r, context_len, dense_prefill, true)
    }

    /// As [`LlamaWeights::from_gguf`]; `int8`: whether the int8 GEMM may be used
    /// (tests compare it with the f32 prefill).
    pub fn from_gguf_with<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        context_len: usize,
        dense_prefill: bool,
        int8: bool,
    ) -> Result<Self, ModelError> {
        let dev = Device::Cpu;
        let md = |k: &str| {
            ct.metadata
                .get(k)
                .ok_or_else(|| ModelError::Internal(format!("GGUF metadata lacks {k}")))
        };
        let arch = md("general.architecture")?.to_string().map_err(model_error)?.clone();
        let neox = match arch.as_str() {
            "llama" => false,
            "qwen3" => true,
            other => {
                return Err(ModelError::Internal(format!(
                    "GGUF architecture '{other}' not supported (llama, qwen3)"
                )))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| -> Result<usize, ModelError> { Ok(md(&key(k))?.to_u32().map_err(model_error)? as usize) };
        let opt_u = |k: &str| {
            ct.metadata
                .get(&key(k))
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize)
        };
        let n_head = u("attention.head_count")?;
        let n_kv_head = u("attention.head_count_kv")?;
        let n_layer = u("block_count")?;
        let hidden = u("embedding_length")?;
        if n_head == 0 || n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
            return Err(ModelError::Internal(format!(
                "GGUF heads {n_head} / kv heads {n_kv_head} are not grouped-query attention"
            )));
        }
        let head_dim = opt_u("attention.key_length").unwrap_or(hidden / n_head);
        let rope_dim = opt_u("rope.dimension_count").unwrap_or(head_dim);
        if rope_dim != head_dim {
            return Err(ModelError::Internal(format!(
                "partial RoPE ({rope_dim} of {head_dim} dimensions) is not supported"
            )));
        }
        let eps = f64::from(
            md(&key("attention.layer_norm_rms_epsilon"))?
                .to_f32()
                .map_err(model_error)?,
        );
        let freq_base = ct
            .metadata
            .get(&key("rope.freq_base"))
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10000.0);
        let use_fast = fast_enabled() && fast_covers(ct, n_layer);
        let int8 = int8 && use_fast && super::qmat::int8_gemm() && int8_covers(ct, n_layer);
        let dense_prefill = dense_prefill && !int8;
        // With the fast path, candle's quantized products are not needed: small
        // inputs go to ours, large ones to the f32 copy (or ours, without one).
        let keep_q = !use_fast;
        let mut t = |name: &str| ct.tensor(r, name, &dev).map_err(model_error);
        let fast_of = |q: &QTensor| {
            super::fast::qmat(q).ok_or_else(|| ModelError::Internal("no kernel for a fast-path tensor".into()))
        };
        let vec_of = |q: &QTensor| {
            super::fast::f32_vec(q).ok_or_else(|| ModelError::Internal("cannot read a norm vector".into()))
        };
        let embed_q = t("token_embd.weight")?;
        let vocab = embed_q.shape().dims().first().copied().unwrap_or(0);
        let fast_embed = if use_fast { Some(fast_of(&embed_q)?) } else { None };
        // The tensor path runs when there is no fast path, or for prefill with the f32 copy.
        let embed = if !use_fast || dense_prefill {
            Some(Embedding::new(embed_q.dequantize(&dev).map_err(model_error)?, hidden))
        } else {
            None
        };
        let norm_q = t("output_norm.weight")?;
        let fast_norm = if use_fast { Some(vec_of(&norm_q)?) } else { None };
        let norm = RmsNorm::from_qtensor(norm_q, eps).map_err(model_error)?;
        let (output, tied) = match t("output.weight") {
            Ok(w) => (w, false),
            Err(_) => (embed_q, true),
        };
        let fast_output = if use_fast && !tied {
            Some(fast_of(&output)?)
        } else {
            None
        };
        let output = Linear::new(output, dense_prefill, keep_q).map_err(model_error)?;
        let mut layers = Vec::with_capacity(n_layer);
        let mut fast_layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = format!("blk.{i}");
            let mut parts = Vec::with_capacity(7);
            let mut lin = |n: &str| -> Result<Linear, ModelError> {
                let q = t(&format!("{p}.{n}.weight"))?;
                if use_fast {
                    parts.push(fast_of(&q)?);
                }
                Linear::new(q, dense_prefill, keep_q).map_err(model_error)
            };
            let (wq, wk, wv, wo) = (lin("attn_q")?, lin("attn_k")?, lin("attn_v")?, lin("attn_output")?);
            let (gate, up, down) = (lin("ffn_gate")?, lin("ffn_up")?, lin("ffn_down")?);
            let attn_norm_q = t(&format!("{p}.attn_norm.weight"))?;
            let ffn_norm_q = t(&format!("{p}.ffn_norm.weight"))?;
            let (q_norm_q, k_norm_q) = if neox {
                (
                    Some(t(&format!("{p}.attn_q_norm.weight"))?),
                    Some(t(&format!("{p}.attn_k_norm.weight"))?),
                )
            } else {
                (None, None)
            };
            let opt_vec = |q: &Option<QTensor>| q.as_ref().map(vec_of).transpose();
            if use_fast {
                let mut it = parts.into_iter();
                let mut next = || it.next().ok_or_else(|| ModelError::Internal("layer parts".into()));
                fast_layers.push(LayerParts {
                    q: next()?,
                    k: next()?,
                    v: next()?,
                    o: next()?,
                    gate: next()?,
                    up: next()?,
                    down: next()?,
                    attn_norm: vec_of(&attn_norm_q)?,
                    ffn_norm: vec_of(&ffn_norm_q)?,
                    q_norm: opt_vec(&q_norm_q)?,
                    k_norm: opt_vec(&k_norm_q)?,
                });
            }
            let norm_of = |q: Option<QTensor>| {
                q.map(|q| RmsNorm::from_qtensor(q, eps))
                    .transpose()
                    .map_err(model_error)
            };
            let (q_norm, k_norm) = (norm_of(q_norm_q)?, norm_of(k_norm_q)?);
            let attn_norm = RmsNorm::from_qtensor(attn_norm_q, eps).map_err(model_error)?;
            let ffn_norm = RmsNorm::from_qtensor(ffn_norm_q, eps).map_err(model_error)?;
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo,
                gate,
                up,
                down,
                attn_norm,
                ffn_norm,
                q_norm,
                k_norm,
            });
        }
        let fast = match (fast_embed, fast_norm) {
            (Some(e), Some(n)) => FastWeights::new(
                e,
                fast_output,
                fast_layers,
                n,
                super::fast::Shape {
                    hidden,
                    n_head,
                    n_kv_head,
                    head_dim,
                    eps: eps as f32,
                    context_len,
                    freq_base,
                    neox,
                },
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                int8,
            ),
            _ => None,
        };
        if use_fast && fast.is_none() {
            return Err(ModelError::Internal("the fast path rejected the model's shape".into()));
        }
        // RoPE tables (GGUF llama weights use the interleaved convention, Qwen3 the
        // NEOX one; the angles are the same).
        let theta: Vec<f32> = (0..rope_dim)
            .step_by(2)
            .map(|i| 1.0 / freq_base.powf(i as f32 / rope_dim as f32))
            .collect();
        let n_theta = theta.len();
        let angles = Tensor::arange(0u32, context_len as u32, &dev)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.reshape((context_len, 1)))
            .and_then(|t| t.matmul(&Tensor::new(theta.as_slice(), &dev)?.reshape((1, n_theta))?))
            .map_err(model_error)?;
        let cos = angles.cos().map_err(model_error)?;
        let sin = angles.sin().map_err(model_error)?;
        Ok(LlamaWeights {
            embed,
            vocab,
            layers,
            norm,
            output,
            n_head,
            n_kv_head,
            head_dim,
            neox,
            cos,
            sin,
            context_len,
            fast,
        })
    }
}

impl LlamaWeights {
    fn embedding(&self) -> candle_core::Result<&Embedding> {
        self.embed
            .as_ref()
            .ok_or_else(|| candle_core::Error::msg("no f32 embeddings for the tensor path"))
    }
}

/// One sequence: shared weights, its own KV cache.
pub struct LlamaSeq {
    w: Arc<LlamaWeights>,
    cache: Vec<KvBuf>,
}

/// Decode attention for one new position, on plain slices (for models that
/// take the tensor path; the fast path does the same inside its step).
fn attend_one(q: &[f32], kv: &KvBuf, n_head: usize, n_kv_head: usize, hd: usize) -> Vec<f32> {
    let len = kv.k.len() / (n_kv_head * hd);
    let mut out = vec![0f32; n_head * hd];
    let mut scores = Vec::with_capacity(len);
    for (h, o) in out.chunks_exact_mut(hd).enumerate() {
        attend_head(&q[h * hd..(h + 1) * hd], h, n_head, n_kv_head, kv, len, &mut scores, o);
    }
    out
}

impl LlamaSeq {
    /// Whether decode steps and short inputs run on our slice forward.
    pub fn uses_fast_path(&self) -> bool {
        self.w.fast.is_some()
    }

    pub fn new(w: Arc<LlamaWeights>) -> Self {
        let n = w.layers.len();
        LlamaSeq {
            w,
            cache: vec![KvBuf::default(); n],
        }
    }

    /// Attention of layer `i` for this sequence, given its projected q, k, v of
    /// shape (1, n, heads × head_dim): RoPE at `pos`, the KV cache, softmax.
    /// Returns (1, n, hidden) before the output projection.
    fn attend(
        &mut self,
        i: usize,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos: usize,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let w = &self.w;
        let (b, n, _) = q.dims3()?;
        let shape = |t: Tensor, heads: usize| t.reshape((b, n, heads, w.head_dim))?.transpose(1, 2)?.contiguous();
        let q = shape(q, w.n_head)?;
        let k = shape(k, w.n_kv_head)?;
        let v = shape(v, w.n_kv_head)?;
        // Qwen3: each head normalized over its own dimensions.
        let per_head = |t: Tensor, norm: &Option<RmsNorm>| match norm {
            Some(m) => {
                let dims = t.dims().to_vec();
                m.forward(&t.flatten(0, 2)?)?.reshape(dims)
            }
            None => Ok(t),
        };
        let l = &w.layers[i];
        let q = per_head(q, &l.q_norm)?;
        let k = per_head(k, &l.k_norm)?;
        let cos = w.cos.narrow(0, pos, n)?;
        let sin = w.sin.narrow(0, pos, n)?;
        let rope = if w.neox {
            candle_nn::rotary_emb::rope
        } else {
            candle_nn::rotary_emb::rope_i
        };
        let q = rope(&q, &cos, &sin)?;
        let k = rope(&k, &cos, &sin)?;
        // Append the new keys and values ([pos][kv head][dim] rows) to the cache.
        let rows_of = |t: &Tensor| t.transpose(1, 2)?.contiguous()?.flatten_all()?.to_vec1::<f32>();
        let row = w.n_kv_head * w.head_dim;
        let buf = &mut self.cache[i];
        buf.k.truncate(pos * row);
        buf.v.truncate(pos * row);
        if buf.k.len() != pos * row {
            candle_core::bail!("KV cache holds {} positions, expected {pos}", buf.k.len() / row);
        }
        buf.k.extend(rows_of(&k)?);
        buf.v.extend(rows_of(&v)?);
        if n == 1 {
            let qv = q.flatten_all()?.to_vec1::<f32>()?;
            let out = attend_one(&qv, buf, w.n_head, w.n_kv_head, w.head_dim);
            return Tensor::from_vec(out, (1, 1, w.n_head * w.head_dim), &Device::Cpu);
        }
        let (k, v) = if pos > 0 {
            let all = |data: &[f32]| {
                Tensor::from_slice(data, (1, pos + n, w.n_kv_head, w.head_dim), &Device::Cpu)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            (all(&buf.k)?, all(&buf.v)?)
        } else {
            (k, v)
        };
        let rep = w.n_head / w.n_kv_head;
        let k = candle_transformers::utils::repeat_kv(k, rep)?;
        let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
        let mut att = (q.matmul(&k.t()?)? / (w.head_dim as f64).sqrt())?;
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, w.n_head * w.head_dim))
    }

    fn run(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        let dev = Device::Cpu;
        let n = tokens.len();
        let w = self.w.clone();
        if let Some(fast) = &w.fast {
            // With the int8 GEMM there is no f32 copy (`from_gguf_with`), so every input comes here.
            if n < dense_min_rows() || w.output.dense.is_none() {
                let positions: Vec<usize> = (pos..pos + n).collect();
                let mut logits = fast
                    .forward(&mut [&mut self.cache], &vec![0; n], tokens, &positions, &[n - 1])
                    .map_err(candle_core::Error::msg)?;
                return logits.pop().ok_or_else(|| candle_core::Error::msg("no logits"));
            }
        }
        let input = Tensor::new(tokens, &dev)?.unsqueeze(0)?;
        let mut h = w.embedding()?.forward(&input)?;
        // Additive causal mask over (new tokens) × (cached + new tokens).
        let mask = if n > 1 {
            let total = pos + n;
            let m: Vec<f32> = (0..n)
                .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            Some(Tensor::from_vec(m, (n, total), &dev)?)
        } else {
            None
        };
        for (i, l) in w.layers.iter().enumerate() {
            let x = l.attn_norm.forward(&h)?;
            let y = self.attend(
                i,
                l.wq.forward(&x)?,
                l.wk.forward(&x)?,
                l.wv.forward(&x)?,
                pos,
                mask.as_ref(),
            )?;
            h = (l.wo.forward(&y)? + &h)?;
            let x = l.ffn_norm.forward(&h)?;
            let m = l
                .down
                .forward(&(candle_nn::ops::silu(&l.gate.forward(&x)?)? * l.up.forward(&x)?)?)?;
            h = (m + &h)?;
        }
        let last = w.norm.forward(&h)?.i((.., n - 1, ..))?;
        w.output
            .forward(&last)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()
    }
}

fn decode_rows(
    w: &Arc<LlamaWeights>,
    seqs: &mut [&mut LlamaSeq],
    tokens: &[u32],
    positions: &[usize],
) -> candle_core::Result<Vec<Vec<f32>>> {
    let b = seqs.len();
    if let Some(fast) = &w.fast {
        let mut caches: Vec<&mut Vec<KvBuf>> = seqs.iter_mut().map(|s| &mut s.cache).collect();
        let rows: Vec<usize> = (0..b).collect();
        return fast
            .forward(&mut caches, &rows, tokens, positions, &rows)
            .map_err(candle_core::Error::msg);
    }
    let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(1)?; // (B, 1)
    let mut h = w.embedding()?.forward(&input)?; // (B, 1, hidden)
    for (i, l) in w.layers.iter().enumerate() {
        let x = l.attn_norm.forward(&h)?;
        let (q, k, v) = (l.wq.forward(&x)?, l.wk.forward(&x)?, l.wv.forward(&x)?);
        let mut ys = Vec::with_capacity(b);
        for (r, s) in seqs.iter_mut().enumerate() {
            ys.push(s.attend(
                i,
                q.narrow(0, r, 1)?,
                k.narrow(0, r, 1)?,
                v.narrow(0, r, 1)?,
                positions[r],
                None,
            )?);
        }
        h = (l.wo.forward(&Tensor::cat(&ys, 0)?)? + &h)?;
        let x = l.ffn_norm.forward(&h)?;
        let m = l
            .down
            .forward(&(candle_nn::ops::silu(&l.gate.forward(&x)?)? * l.up.forward(&x)?)?)?;
        h = (m + &h)?;
    }
    let last = w.norm.forward(&h)?.squeeze(1)?; // (B, hidden)
    w.output.forward(&last)?.to_dtype(DType::F32)?.to_vec2::<f32>()
}

impl CausalLm for LlamaSeq {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() || pos + tokens.len() > self.w.context_len {
            return Err(ModelError::TooLong(format!(
                "sequence longer than the context ({})",
                self.w.context_len
            )));
        }
        self.run(tokens, pos).map_err(model_error)
    }

    fn fork(&self) -> Box<dyn CausalLm> {
        Box::new(LlamaSeq::new(self.w.clone()))
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn kv_bytes(&self) -> Option<usize> {
        let floats: usize = self.cache.iter().map(|b| b.k.capacity() + b.v.capacity()).sum();
        Some(floats * std::mem::size_of::<f32>())
    }

    fn fork_prefix(&self, len: usize) -> Option<Box<dyn CausalLm>> {
        let row = self.w.n_kv_head * self.w.head_dim;
        let mut cache = Vec::with_capacity(self.cache.len());
        for b in &self.cache {
            if b.k.len() < len * row || b.v.len() < len * row {
                return None;
            }
            cache.push(KvBuf {
                k: b.k[..len * row].to_vec(),
                v: b.v[..len * row].to_vec(),
            });
        }
        Some(Box::new(LlamaSeq {
            w: self.w.clone(),
            cache,
        }))
    }

    /// All sequences in one pass through the linear layers (one row each: with
    /// enough rows the f32 copy serves them all in one GEMM); attention stays per
    /// sequence (each has its own cache and position).
    fn decode_batch(
        &self,
        seqs: &mut [&mut Box<dyn CausalLm>],
        tokens: &[u32],
        positions: &[usize],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut mine: Vec<&mut LlamaSeq> = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            match s.as_any_mut().and_then(|a| a.downcast_mut::<LlamaSeq>()) {
                Some(l) if Arc::ptr_eq(&l.w, &self.w) => mine.push(l),
                _ => {
                    return Err(ModelError::Internal(
                        "decode_batch over sequences of another model".into(),
                    ))
                }
            }
        }
        for (t, p) in tokens.iter().zip(positions) {
            if p + 1 > self.w.context_len || (*t as usize) >= self.w.vocab {
                return Err(ModelError::Invalid(format!("token {t} at {p} is outside the model")));
            }
        }
        decode_rows(&self.w, &mut mine, tokens, positions).map_err(model_error)
    }

    fn context_len(&self) -> usize {
        self.w.context_len
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Our forward against candle's stock quantized llama on the real SmolLM2 GGUF.
    use super::*;
    use candle_transformers::models::quantized_llama;

    fn logits_stock(path: &std::path::Path, tokens: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let mut f = std::fs::File::open(path).expect("gguf");
        let ct = gguf_file::Content::read(&mut f).expect("read");
        let mut m = quantized_llama::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).expect("stock model");
        let x = Tensor::new(tokens, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("input");
        let prefill = m
            .forward(&x, 0)
            .and_then(|t| t.squeeze(0))
            .and_then(|t| t.to_vec1::<f32>())
            .expect("prefill");
        let y = Tensor::new(&[tokens[0]], &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("input");
        let decode = m
            .forward(&y, tokens.len())
            .and_then(|t| t.squeeze(0))
            .and_then(|t| t.to_vec1::<f32>())
            .expect("decode");
        (prefill, decode)
    }

    fn logits_ours(path: &std::path::Path, tokens: &[u32], dense: bool) -> (Vec<f32>, Vec<f32>) {
        let mut f = std::fs::File::open(path).expect("gguf");
        let ct = gguf_file::Content::read(&mut f).expect("read");
        let w = LlamaWeights::from_gguf(&ct, &mut f, 256, dense).expect("our model");
        let mut s = LlamaSeq::new(Arc::new(w));
        let prefill = s.forward(tokens, 0).expect("prefill");
        let decode = s.forward(&[tokens[0]], tokens.len()).expect("decode");
        (prefill, decode)
    }

    pub(crate) fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (n(a) * n(b))
    }

    pub(crate) fn argmax(v: &[f32]) -> usize {
        v.iter()
            .enumerate()
            .fold(0, |best, (i, x)| if *x > v[best] { i } else { best })
    }

    #[test]
    fn our_forward_matches_candles_stock_llama_in_both_modes() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("SKIPPED: {} missing; run scripts/fetch-models", path.display());
            return;
        }
        // 40 rows: the prompt's products take the int8 GEMM where the CPU has it
        // (from 16 rows), its attention the block GEMMs.
        let tokens: Vec<u32> = (0..40).map(|i| 100 + i * 37).collect();
        let (stock_prefill, stock) = logits_stock(&path, &tokens);
        for dense in [false, true] {
            let (prefill, ours) = logits_ours(&path, &tokens, dense);
            assert_eq!(ours.len(), stock.len());
            for (what, a, b) in [("prefill", &prefill, &stock_prefill), ("decode", &ours, &stock)] {
                let c = cosine(a, b);
                assert!(c > 0.999, "dense={dense} {what}: cosine {c}");
                assert_eq!(argmax(a), argmax(b), "dense={dense} {what}");
            }
        }
    }

    fn smollm2(dense: bool, int8: bool) -> Option<Arc<LlamaWeights>> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("SKIPPED: {} missing; run scripts/fetch-models", path.display());
            return None;
        }
        let mut f = std::fs::File::open(&path).expect("gguf");
        let ct = gguf_file::Content::read(&mut f).expect("read");
        let w = LlamaWeights::from_gguf_with(&ct, &mut f, 512, dense, int8).expect("our model");
        Some(Arc::new(w))
    }

    /// `n` greedy tokens after `prompt`, prefilled in pieces of `chunk`.
    fn greedy(w: &Arc<LlamaWeights>, prompt: &[u32], chunk: usize, n: usize) -> (Vec<f32>, Vec<u32>) {
        let mut s = LlamaSeq::new(w.clone());
        let mut logits = Vec::new();
        let mut pos = 0;
        for piece in prompt.chunks(chunk) {
            logits = s.forward(piece, pos).expect("prefill");
            pos += piece.len();
        }
        let first = logits.clone();
        let mut out = Vec::new();
        for _ in 0..n {
            let t = argmax(&logits) as u32;
            out.push(t);
            logits = s.forward(&[t], pos).expect("decode");
            pos += 1;
        }
        (first, out)
    }

    /// The int8 prefill (AVX-512 VNNI) against the f32 one on the same weights, and
    /// a prompt prefilled whole against in pieces of 16 and 7 (the attention
    /// blocks then start past position 0): logits within cosine 0.999, and the same
    /// greedy answer.
    #[test]
    fn int8_and_f32_prefill_and_prefill_in_pieces_give_the_same_answer() {
        let (Some(int8), Some(f32_path)) = (smollm2(true, true), smollm2(true, false)) else {
            return;
        };
        if !int8.fast.as_ref().is_some_and(FastWeights::int8_prefill) {
            eprintln!("no AVX-512 VNNI here: only the f32 prefill runs");
        }
        let prompt: Vec<u32> = (0..150).map(|i| 200 + (i * 53) % 9000).collect();
        let (want_logits, want) = greedy(&f32_path, &prompt, prompt.len(), 12);
        for (label, w, chunk) in [
            ("int8 whole", &int8, prompt.len()),
            ("int8 pieces of 16", &int8, 16),
            ("int8 pieces of 7", &int8, 7),
            ("f32 pieces of 16", &f32_path, 16),
        ] {
            let (logits, got) = greedy(w, &prompt, chunk, 12);
            let c = cosine(&logits, &want_logits);
            assert!(c > 0.999, "{label}: cosine {c}");
            assert_eq!(got, want, "{label}: greedy answer");
        }
    }

    #[test]
    fn a_batched_decode_step_equals_separate_steps() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("SKIPPED: {} missing; run scripts/fetch-models", path.display());
            return;
        }
        let mut f = std::fs::File::open(&path).expect("gguf");
        let ct = gguf_file::Content::read(&mut f).expect("read");
        let template = LlamaSeq::new(Arc::new(
            LlamaWeights::from_gguf(&ct, &mut f, 128, true).expect("model"),
        ));
        let prompts: [&[u32]; 3] = [&[1, 2, 3, 4, 5], &[9, 8, 7], &[42, 43, 44, 45, 46, 47, 48]];
        let next = [11u32, 12, 13];
        // Separately.
        let mut alone = Vec::new();
        for (p, t) in prompts.iter().zip(next) {
            let mut s = template.fork();
            s.forward(p, 0).expect("prefill");
            alone.push(s.forward(&[t], p.len()).expect("decode"));
        }
        // Together.
        let mut seqs: Vec<Box<dyn CausalLm>> = prompts
            .iter()
            .map(|p| {
                let mut s = template.fork();
                s.forward(p, 0).expect("prefill");
                s
            })
            .collect();
        let mut refs: Vec<&mut Box<dyn CausalLm>> = seqs.iter_mut().collect();
        let positions: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let together = template.decode_batch(&mut refs, &next, &positions).expect("batch");
        for (a, b) in alone.iter().zip(&together) {
            assert!(cosine(a, b) > 0.9999, "{}", cosine(a, b));
            assert_eq!(argmax(a), argmax(b));
        }
    }
}

#[cfg(test)]
mod profile {
    //! `cargo test --release --lib decode_profile -- --ignored --nocapture` (for perf).
    use super::tests::argmax;
    use super::*;

    #[test]
    #[ignore]
    fn decode_profile() {
        // MODEL: another GGUF file (for instance one `ragchat bench models --shape` wrote).
        let path = std::env::var("MODEL")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
        let mut f = std::fs::File::open(&path).expect("gguf");
        let ct = gguf_file::Content::read(&mut f).expect("read");
        let w = Arc::new(LlamaWeights::from_gguf(&ct, &mut f, 2048, true).expect("model"));
        let n: usize = std::env::var("STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
        for b in [1usize, 8] {
            let template = LlamaSeq::new(w.clone());
            let mut seqs: Vec<Box<dyn CausalLm>> = (0..b).map(|_| template.fork()).collect();
            let prompt: Vec<u32> = (0..32).map(|i| 100 + i).collect();
            for s in seqs.iter_mut() {
                s.forward(&prompt, 0).expect("prefill");
            }
            let started = std::time::Instant::now();
            for step in 0..n / b {
                let mut refs: Vec<&mut Box<dyn CausalLm>> = seqs.iter_mut().collect();
                let toks = vec![7u32; b];
                let pos = vec![32 + step; b];
                template.decode_batch(&mut refs, &toks, &pos).expect("step");
            }
            let rate = (n / b * b) as f64 / started.elapsed().as_secs_f64();
            eprintln!("batch {b}: {rate:.1} tok/s");
        }
    }

    /// Prefill of one prompt whole and in pieces (`models.prefill_chunk`):
    /// `cargo test --release --lib prefill_profile -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn prefill_profile() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        let mut f = std::fs::File::open(&path).expect("gguf");
        let ct = gguf_file::Content::read(&mut f).expect("read");
        let w = Arc::new(LlamaWeights::from_gguf(&ct, &mut f, 2048, true).expect("model"));
        let n: usize = std::env::var("PROMPT").ok().and_then(|v| v.parse().ok()).unwrap_or(832);
        let prompt: Vec<u32> = (0..n as u32).map(|i| 100 + (i * 37) % 5000).collect();
        let chunks: Vec<usize> = match std::env::var("CHUNKS") {
            Ok(v) => v.split(',').filter_map(|c| c.parse().ok()).collect(),
            Err(_) => vec![n, 512, 256, 128, 64],
        };
        for chunk in chunks {
            let mut best = f64::MAX;
            let mut logits = Vec::new();
            for _ in 0..2 {
                let mut s = LlamaSeq::new(w.clone());
                let started = std::time::Instant::now();
                let mut pos = 0;
                for piece in prompt.chunks(chunk) {
                    logits = s.forward(piece, pos).expect("prefill");
                    pos += piece.len();
                }
                best = best.min(started.elapsed().as_secs_f64());
            }
            eprintln!(
                "chunk {chunk}: {:.0} ms, {:.1} tok/s, argmax {}",
                best * 1e3,
                n as f64 / best,
                argmax(&logits)
            );
        }
    }
}
