//! all-MiniLM-L6-v2 (BERT, 384 dimensions) as sentence-transformers runs it: mean
//! pooling over the tokens, then L2 normalization.
//!
//! The forward is ours, on plain slices, because at these sizes (a sentence is
//! ~40 tokens × 384) the cost of candle's per-operation machinery exceeds the
//! arithmetic. Differences from candle's `BertModel` that matter for speed:
//! - no padding: the tokens of all sentences in a batch are packed into one
//!   matrix for every linear layer (bigger products, no wasted rows), and
//!   attention runs per sentence over its own length;
//! - q, k and v are one product; biases are added by the GEMM (it accumulates
//!   into the output), residual + LayerNorm and bias + GELU are fused;
//! - GELU (the exact, erf form) and softmax use polynomial exp/erf that the
//!   compiler vectorizes (libm's scalar erff dominated candle's profile).
//!
//! Where the CPU has AVX-512 VNNI (and RAGCHAT_INT8_GEMM is not 0), the linear
//! layers run on our int8 GEMM ([`super::qmat`]): the weights are quantized at
//! load to Q8_0 (one scale per 32 values), the activations per 32 values before
//! each product. The vectors keep the f32 forward's direction (cosine ≥ 0.9995 in
//! the test) at 1.25–3× its speed on 2 cores. Elsewhere, and for attention, GEMMs
//! are the `gemm` crate's (candle's own), with its AVX-512 kernels chosen at run
//! time where the CPU has them. A test checks the f32 forward against candle's
//! `BertModel` on the same weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use ragchat_actors::inference::{Embedder, ModelError};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

use super::fast::dot;
use super::pool::{share, Pool, SyncPtr};
use super::qmat::{int8_gemm, quantize_q8_0, Kind, On, Q8Acts, QMat};
use super::{exp_in_place, fast_exp, lane_max, model_error};
use rayon::prelude::*;

#[derive(Deserialize)]
struct Config {
    hidden_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    intermediate_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-12
}

/// y = x·Wᵀ + b for row-major x (rows × inp) and W (out × inp).
struct Dense {
    w: Vec<f32>,
    b: Vec<f32>,
    out: usize,
    inp: usize,
    /// W in Q8_0 tiles for the int8 GEMM, when the CPU has it (then `w` is empty).
    q: Option<QMat>,
}

/// Products below this many multiply-adds run on the calling thread; above it
/// the output columns are shared among the pool's threads (the pool spins between
/// the products of a forward, so even one sentence's ~18M-MAC products gain).
const PARALLEL_MIN: usize = 1 << 20;
/// Without the pool (bulk batches, see [`BertEmbedder`]): products from this many
/// multiply-adds, and attention, GELU and norms of that size, run on rayon, which
/// sleeps rather than spins while it waits.
const RAYON_MIN: usize = 32 << 20;

impl Dense {
    fn new(w: Vec<f32>, b: Vec<f32>, out: usize, inp: usize) -> Dense {
        Dense {
            w,
            b,
            out,
            inp,
            q: None,
        }
    }

    /// Moves W to Q8_0 tiles for the int8 GEMM (AVX-512 VNNI); false, with W
    /// left in f32, where the CPU lacks it or the shape does not tile.
    fn quantize(&mut self) -> bool {
        let Some(mut q) = QMat::new(Kind::Q80, quantize_q8_0(&self.w), self.out, self.inp) else {
            return false;
        };
        if !q.tile() {
            return false;
        }
        self.q = Some(q);
        self.w = Vec::new();
        true
    }

    /// y ← x·wᵀ + b, reusing y's memory (fresh pages of large buffers cost
    /// page faults on every layer otherwise).
    fn forward_into(&self, x: &[f32], rows: usize, y: &mut Vec<f32>, pool: &Pool) {
        if let Some(q) = &self.q {
            let x = &x[..rows * self.inp];
            // Every value is written by the product: no clearing (a memset of every
            // output cost 5% of a batch of passages).
            y.resize(rows * self.out, 0.0);
            let macs = rows * self.out * self.inp;
            let b = Some(self.b.as_slice());
            if pool.threads() == 1 && macs >= RAYON_MIN {
                q.product(&Q8Acts::quantize_rayon(x, self.inp, false), y, b, On::Rayon);
            } else if macs >= PARALLEL_MIN {
                q.product(
                    &Q8Acts::quantize_on(x, self.inp, false, Some(pool)),
                    y,
                    b,
                    On::Pool(pool),
                );
            } else {
                q.product(&Q8Acts::quantize(x, self.inp, false), y, b, On::Caller);
            }
            return;
        }
        y.clear();
        y.reserve(rows * self.out);
        for _ in 0..rows {
            y.extend_from_slice(&self.b);
        }
        assert!(x.len() >= rows * self.inp && y.len() == rows * self.out, "dense shapes");
        let macs = rows * self.out * self.inp;
        let threads = if macs >= PARALLEL_MIN { pool.threads() } else { 1 };
        let rayon = pool.threads() == 1 && macs >= RAYON_MIN;
        let out = SyncPtr(y.as_mut_ptr());
        let part = |i: usize| {
            let cols = share(self.out, threads, i, 16);
            if cols.is_empty() {
                return;
            }
            // SAFETY: x holds rows × inp, w out × inp and y rows × out values
            // (asserted above); this part writes columns `cols` of y only, and the
            // strides describe those row-major layouts.
            unsafe {
                gemm::gemm(
                    rows,
                    cols.len(),
                    self.inp,
                    out.add(cols.start),
                    1,
                    self.out as isize,
                    true,
                    x.as_ptr(),
                    1,
                    self.inp as isize,
                    self.w.as_ptr().add(cols.start * self.inp),
                    self.inp as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    if rayon {
                        gemm::Parallelism::Rayon(0)
                    } else {
                        gemm::Parallelism::None
                    },
                );
            }
        };
        if threads == 1 {
            part(0);
        } else {
            pool.run(&part);
        }
    }
}

struct Norm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

impl Norm {
    /// x ← LayerNorm(x + add), row by row (the rows shared among the pool's
    /// threads when there are many).
    fn apply(&self, x: &mut [f32], add: Option<&[f32]>, pool: &Pool) {
        let h = self.w.len();
        let rows = x.len() / h;
        if pool.threads() == 1 && x.len() >= RAYON_MIN / 32 {
            const BLOCK: usize = 256;
            x.par_chunks_mut(BLOCK * h).enumerate().for_each(|(b, part)| {
                self.apply_rows(part, add.map(|a| &a[b * BLOCK * h..(b * BLOCK * h + part.len())]))
            });
            return;
        }
        if rows < 64 || pool.threads() == 1 {
            return self.apply_rows(x, add);
        }
        let (threads, base) = (pool.threads(), SyncPtr(x.as_mut_ptr()));
        pool.run(&|i| {
            let part = share(rows, threads, i, 1);
            // SAFETY: each thread takes its own rows of x.
            let mine = unsafe { std::slice::from_raw_parts_mut(base.add(part.start * h), part.len() * h) };
            self.apply_rows(mine, add.map(|a| &a[part.start * h..part.end * h]));
        });
    }

    fn apply_rows(&self, x: &mut [f32], add: Option<&[f32]>) {
        norm_rows(&self.w, &self.b, self.eps, x, add);
    }
}

/// Whether the AVX-512 builds of the elementwise loops ([`wide!`]) run here
/// (RAGCHAT_WIDE=0 turns them off, for measurements).
fn wide() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("RAGCHAT_WIDE").map_or(true, |v| v != "0")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
    })
}

/// A function whose body is compiled twice: for the build's target (x86-64-v3:
/// the compiler vectorizes with 8 lanes) and for AVX-512 (16 lanes), the second
/// chosen at run time where the CPU has it. The loops it wraps (softmax, GELU,
/// LayerNorm) took a fifth of a batch of passages in 8 lanes.
macro_rules! wide {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn plain($($a: $t),*) $(-> $r)? $body
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
            unsafe fn fast($($a: $t),*) $(-> $r)? {
                plain($($a),*)
            }
            if wide() {
                // SAFETY: wide() checked the features `fast` is compiled for.
                unsafe { fast($($a),*) }
            } else {
                plain($($a),*)
            }
        }
    };
}

wide! {
    /// x ← LayerNorm(x + add) with weights w and biases b, row by row.
    fn norm_rows(w: &[f32], b: &[f32], eps: f32, x: &mut [f32], add: Option<&[f32]>) {
        let h = w.len();
        for (r, row) in x.chunks_exact_mut(h).enumerate() {
            if let Some(a) = add {
                row.iter_mut().zip(&a[r * h..(r + 1) * h]).for_each(|(v, d)| *v += d);
            }
            let mean = lane_sum(row, |v| v) / h as f32;
            let var = lane_sum(row, |v| (v - mean) * (v - mean)) / h as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(w).zip(b) {
                *v = (*v - mean) * inv * g + b;
            }
        }
    }
}

wide! {
    /// v ← GELU(v).
    fn gelu_all(v: &mut [f32]) {
        for x in v.iter_mut() {
            *x = gelu(*x);
        }
    }
}

wide! {
    /// Each row of `len` scores ← its softmax.
    fn softmax_rows(scores: &mut [f32], len: usize) {
        for r in scores.chunks_exact_mut(len) {
            let inv = 1.0 / exp_in_place(r, lane_max(r));
            r.iter_mut().for_each(|s| *s *= inv);
        }
    }
}

struct Layer {
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    inter: Dense,
    out: Dense,
    out_norm: Norm,
}

struct Weights {
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    max_positions: usize,
    /// The first token's state ([CLS]) is the sentence's, instead of the mean.
    cls: bool,
}

/// sentence-transformers' pooling file (`1_Pooling/config.json`): only the
/// choice between the [CLS] token and the mean of the tokens is read.
#[derive(Deserialize, Default)]
struct Pooling {
    #[serde(default)]
    pooling_mode_cls_token: bool,
}

// Reductions in 16 independent lanes: a plain sum or max over f32 is a serial
// chain the compiler may not reorder (so it does not vectorize); on 256-token
// attention rows that chain cost more than the exponentials.

#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| f(*v)).sum();
    for c in chunks {
        for l in 0..16 {
            acc[l] += f(c[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// erf(x), Abramowitz & Stegun 7.1.26 (abs. error < 1.5e-7).
#[inline(always)]
fn fast_erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * fast_exp(-a * a);
    y.copysign(x)
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl Weights {
    /// With `int8`, the linear layers run on the int8 GEMM where the CPU has it.
    fn load(dir: &Path, config: &Config, int8: bool) -> Result<Self, ModelError> {
        let pooling: Pooling = match std::fs::read_to_string(dir.join("1_Pooling").join("config.json")) {
            Ok(text) => serde_json::from_str(&text).map_err(model_error)?,
            Err(_) => Pooling::default(),
        };
        let path = dir.join("model.safetensors");
        let tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(&path, &Device::Cpu).map_err(model_error)?;
        let get = |name: &str| -> Result<Vec<f32>, ModelError> {
            let t = tensors
                .get(name)
                .or_else(|| tensors.get(&format!("bert.{name}")))
                .ok_or_else(|| ModelError::Internal(format!("{}: no tensor {name}", path.display())))?;
            t.to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(model_error)
        };
        let eps = config.layer_norm_eps as f32;
        let norm = |p: &str| -> Result<Norm, ModelError> {
            Ok(Norm {
                w: get(&format!("{p}.weight"))?,
                b: get(&format!("{p}.bias"))?,
                eps,
            })
        };
        let h = config.hidden_size;
        let dense = |p: &str, out: usize, inp: usize| -> Result<Dense, ModelError> {
            let d = Dense::new(get(&format!("{p}.weight"))?, get(&format!("{p}.bias"))?, out, inp);
            if d.w.len() != out * inp || d.b.len() != out {
                return Err(ModelError::Internal(format!("{p}: unexpected shape")));
            }
            Ok(d)
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let (q, k, v) = (
                dense(&format!("{p}.attention.self.query"), h, h)?,
                dense(&format!("{p}.attention.self.key"), h, h)?,
                dense(&format!("{p}.attention.self.value"), h, h)?,
            );
            let qkv = Dense::new([q.w, k.w, v.w].concat(), [q.b, k.b, v.b].concat(), 3 * h, h);
            let mut layer = Layer {
                qkv,
                attn_out: dense(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                inter: dense(&format!("{p}.intermediate.dense"), config.intermediate_size, h)?,
                out: dense(&format!("{p}.output.dense"), h, config.intermediate_size)?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            };
            if int8 {
                for d in [&mut layer.qkv, &mut layer.attn_out, &mut layer.inter, &mut layer.out] {
                    d.quantize();
                }
            }
            layers.push(layer);
        }
        let position = get("embeddings.position_embeddings.weight")?;
        Ok(Weights {
            word: get("embeddings.word_embeddings.weight")?,
            max_positions: position.len() / h,
            position,
            token_type: get("embeddings.token_type_embeddings.weight")?,
            embed_norm: norm("embeddings.LayerNorm")?,
            layers,
            hidden: h,
            heads: config.num_attention_heads,
            cls: pooling.pooling_mode_cls_token,
        })
    }

    /// Sentence embeddings (mean-pooled, or the [CLS] token's; unit length) of
    /// tokenized sentences.
    fn embed(&self, seqs: &[(Vec<u32>, Vec<u32>)], pool: &Pool) -> Result<Vec<Vec<f32>>, ModelError> {
        let h = self.hidden;
        let vocab = self.word.len() / h;
        let types = self.token_type.len() / h;
        let mut spans = Vec::with_capacity(seqs.len());
        let mut x = Vec::new();
        for (ids, type_ids) in seqs {
            if ids.is_empty() || ids.len() > self.max_positions {
                return Err(ModelError::Invalid(format!(
                    "a sentence of {} tokens (1 to {} allowed)",
                    ids.len(),
                    self.max_positions
                )));
            }
            spans.push((x.len() / h, ids.len()));
            for (pos, (id, ty)) in ids.iter().zip(type_ids).enumerate() {
                let (id, ty) = (*id as usize, *ty as usize);
                if id >= vocab || ty >= types {
                    return Err(ModelError::Invalid(format!("token {id} is outside the vocabulary")));
                }
                let (w, p, t) = (
                    &self.word[id * h..(id + 1) * h],
                    &self.position[pos * h..(pos + 1) * h],
                    &self.token_type[ty * h..(ty + 1) * h],
                );
                x.extend(w.iter().zip(p).zip(t).map(|((a, b), c)| a + b + c));
            }
        }
        let rows = x.len() / h;
        self.embed_norm.apply(&mut x, None, pool);
        let (mut qkv, mut ctx, mut a, mut inter, mut o) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for l in &self.layers {
            l.qkv.forward_into(&x, rows, &mut qkv, pool);
            self.attention(&qkv, &spans, rows, &mut ctx, pool);
            l.attn_out.forward_into(&ctx, rows, &mut a, pool);
            l.attn_norm.apply(&mut x, Some(&a), pool);
            l.inter.forward_into(&x, rows, &mut inter, pool);
            if pool.threads() == 1 && inter.len() >= 1 << 20 {
                inter.par_chunks_mut(1 << 16).for_each(gelu_all);
            } else if inter.len() >= 1 << 14 && pool.threads() > 1 {
                let (n, threads, base) = (inter.len(), pool.threads(), SyncPtr(inter.as_mut_ptr()));
                pool.run(&|i| {
                    let part = share(n, threads, i, 16);
                    // SAFETY: each thread takes its own values of inter.
                    let mine = unsafe { std::slice::from_raw_parts_mut(base.add(part.start), part.len()) };
                    gelu_all(mine);
                });
            } else {
                gelu_all(&mut inter);
            }
            l.out.forward_into(&inter, rows, &mut o, pool);
            l.out_norm.apply(&mut x, Some(&o), pool);
        }
        Ok(spans
            .iter()
            .map(|&(start, len)| {
                let mut mean = vec![0f32; h];
                let rows = if self.cls { 1 } else { len };
                for row in x[start * h..(start + rows) * h].chunks_exact(h) {
                    mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
                }
                let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                mean.iter_mut().for_each(|v| *v /= norm);
                mean
            })
            .collect())
    }

    /// Self-attention of each sentence over its own tokens, head by head.
    fn attention(&self, qkv: &[f32], spans: &[(usize, usize)], rows: usize, ctx: &mut Vec<f32>, pool: &Pool) {
        let h = self.hidden;
        let hd = h / self.heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let one = |&(start, len): &(usize, usize), head: usize| -> Vec<f32> {
            let mut out = vec![0f32; len * hd];
            if len >= GEMM_ATTENTION_MIN {
                return attention_gemm(qkv, h, hd, start, len, head, scale, out);
            }
            // This head's keys and values, contiguous (len × hd).
            let part = |p: usize| -> Vec<f32> {
                (0..len)
                    .flat_map(|i| qkv[(start + i) * 3 * h + p * h + head * hd..][..hd].iter().copied())
                    .collect()
            };
            let (keys, values) = (part(1), part(2));
            let mut scores = vec![0f32; len];
            for (i, o) in out.chunks_exact_mut(hd).enumerate() {
                let q = &qkv[(start + i) * 3 * h + head * hd..][..hd];
                let mut max = f32::NEG_INFINITY;
                for (s, k) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
                    *s = dot(q, k) * scale;
                    max = max.max(*s);
                }
                let inv = 1.0 / exp_in_place(&mut scores, max);
                for (p, v) in scores.iter().zip(values.chunks_exact(hd)) {
                    let p = p * inv;
                    o.iter_mut().zip(v).for_each(|(a, v)| *a = p.mul_add(*v, *a));
                }
            }
            out
        };
        let work: usize = spans.iter().map(|s| s.1 * s.1).sum::<usize>() * h;
        let jobs: Vec<(usize, usize)> = (0..spans.len())
            .flat_map(|s| (0..self.heads).map(move |head| (s, head)))
            .collect();
        let results: Vec<Vec<f32>> = if pool.threads() == 1 && work >= RAYON_MIN / 4 {
            jobs.par_iter().map(|&(s, head)| one(&spans[s], head)).collect()
        } else if work >= PARALLEL_MIN / 4 && pool.threads() > 1 && jobs.len() > 1 {
            // Jobs dealt out in turn (sentences differ in length); each thread
            // keeps its results in a slot of its own.
            let threads = pool.threads();
            type Done = Vec<(usize, Vec<f32>)>;
            let slots: Vec<std::sync::Mutex<Done>> = (0..threads).map(|_| std::sync::Mutex::new(Vec::new())).collect();
            pool.run(&|t| {
                let mine: Vec<(usize, Vec<f32>)> = (t..jobs.len())
                    .step_by(threads)
                    .map(|j| (j, one(&spans[jobs[j].0], jobs[j].1)))
                    .collect();
                *slots[t].lock().unwrap_or_else(|p| p.into_inner()) = mine;
            });
            let mut all: Vec<(usize, Vec<f32>)> = slots
                .into_iter()
                .flat_map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
                .collect();
            all.sort_unstable_by_key(|(j, _)| *j);
            all.into_iter().map(|(_, r)| r).collect()
        } else {
            jobs.iter().map(|&(s, head)| one(&spans[s], head)).collect()
        };
        // Every value is overwritten below (each row by each head).
        ctx.resize(rows * h, 0.0);
        for (&(s, head), out) in jobs.iter().zip(&results) {
            let (start, len) = spans[s];
            for i in 0..len {
                ctx[(start + i) * h + head * hd..][..hd].copy_from_slice(&out[i * hd..(i + 1) * hd]);
            }
        }
    }
}

/// From this sentence length on, a head's attention is two GEMMs (scores, then
/// the weighted values) rather than row-by-row loops.
const GEMM_ATTENTION_MIN: usize = 64;

/// One head's attention over one sentence with two GEMMs reading q, k and v in
/// place from the packed qkv rows (row stride 3h): scores = q·kᵀ·scale, softmax
/// by row, out = scores·v.
#[allow(clippy::too_many_arguments)]
fn attention_gemm(
    qkv: &[f32],
    h: usize,
    hd: usize,
    start: usize,
    len: usize,
    head: usize,
    scale: f32,
    mut out: Vec<f32>,
) -> Vec<f32> {
    let base = start * 3 * h + head * hd;
    assert!(
        qkv.len() >= (start + len) * 3 * h && out.len() == len * hd,
        "attention shapes"
    );
    let row = (3 * h) as isize;
    let mut scores = vec![0f32; len * len];
    // SAFETY: q, k and v of rows start..start+len lie inside qkv (asserted above);
    // scores is len × len and out len × hd, both row-major as the strides say.
    unsafe {
        gemm::gemm(
            len,
            len,
            hd,
            scores.as_mut_ptr(),
            1,
            len as isize,
            false,
            qkv.as_ptr().add(base),
            1,
            row,
            qkv.as_ptr().add(base + h),
            row,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    softmax_rows(&mut scores, len);
    // SAFETY: as above.
    unsafe {
        gemm::gemm(
            len,
            hd,
            len,
            out.as_mut_ptr(),
            1,
            hd as isize,
            false,
            scores.as_ptr(),
            1,
            len as isize,
            qkv.as_ptr().add(base + 2 * h),
            1,
            row,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    out
}

/// Batches up to this many texts run on the pool (RAGCHAT_EMBED_POOL_MAX_BATCH,
/// for measurements; 0: never).
fn pool_max_batch() -> usize {
    std::env::var("RAGCHAT_EMBED_POOL_MAX_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

pub struct BertEmbedder {
    weights: Weights,
    /// Threads for the products, attention and norms (spinning between them), for
    /// batches up to `pool_max_batch` texts: queries, which wait on their vector.
    /// Larger batches (ingestion) run on the calling thread with rayon for large
    /// products: spinning threads on a machine whose other cores are busy chunking
    /// and indexing waste the cores they wait on.
    pool: Pool,
    solo: Pool,
    pool_max_batch: usize,
    tokenizer: Tokenizer,
    max_tokens: usize,
}

impl BertEmbedder {
    /// Loads model.safetensors, config.json and tokenizer.json from `dir`.
    /// Inputs are truncated at `max_tokens` (sentence-transformers uses 256 for this model).
    pub fn load(dir: &Path, max_tokens: usize) -> Result<Self, ModelError> {
        Self::load_with(dir, max_tokens, int8_gemm())
    }

    /// As [`BertEmbedder::load`]; `int8` chooses the int8 GEMM for the linear
    /// layers (where the CPU has AVX-512 VNNI) over f32.
    pub fn load_with(dir: &Path, max_tokens: usize, int8: bool) -> Result<Self, ModelError> {
        let config_text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| {
            ModelError::Unavailable(format!(
                "{}: {e} (run scripts/fetch-models)",
                dir.join("config.json").display()
            ))
        })?;
        let config: Config = serde_json::from_str(&config_text).map_err(model_error)?;
        if config.hidden_act.as_deref().is_some_and(|a| a != "gelu")
            || config.num_attention_heads == 0
            || !config.hidden_size.is_multiple_of(config.num_attention_heads)
        {
            return Err(ModelError::Internal("unsupported BERT configuration".into()));
        }
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(model_error)?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(model_error)?;
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Ok(BertEmbedder {
            weights: Weights::load(dir, &config, int8)?,
            pool: Pool::new(threads),
            solo: Pool::new(1),
            pool_max_batch: pool_max_batch(),
            tokenizer,
            max_tokens,
        })
    }
}

impl Embedder for BertEmbedder {
    fn dimensions(&self) -> usize {
        self.weights.hidden
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
        let seqs: Vec<(Vec<u32>, Vec<u32>)> = encodings
            .iter()
            .map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec()))
            .collect();
        let pool = if seqs.len() <= self.pool_max_batch {
            &self.pool
        } else {
            &self.solo
        };
        self.weights.embed(&seqs, pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarBuilder;
    use candle_transformers::models::bert::{BertModel, Config as CandleConfig};

    #[test]
    fn fast_exp_and_erf_are_accurate() {
        for i in -800..=800 {
            let x = i as f32 / 10.0;
            let (e, want) = (fast_exp(x), x.exp());
            assert!((e - want).abs() <= 2e-6 * want, "exp({x}) = {e}, want {want}");
        }
        // Reference in f64: the Maclaurin series for |x| ≤ 3, the asymptotic
        // series of erfc beyond (both far more precise than f32 there).
        let erf = |x: f64| {
            let a = x.abs();
            if a > 3.0 {
                let z = 1.0 / (a * a);
                let erfc = (-a * a).exp() / (a * std::f64::consts::PI.sqrt())
                    * (1.0 - z / 2.0 + 3.0 * z * z / 4.0 - 15.0 * z * z * z / 8.0);
                return x.signum() * (1.0 - erfc);
            }
            let (mut sum, mut term) = (0f64, x);
            for n in 0..80 {
                sum += term / (2 * n + 1) as f64;
                term *= -x * x / (n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        for i in -600..=600 {
            let x = i as f32 / 100.0;
            let want = erf(f64::from(x)) as f32;
            assert!(
                (fast_erf(x) - want).abs() < 5e-7,
                "erf({x}) = {}, want {want}",
                fast_erf(x)
            );
        }
    }

    /// The int8 GEMM's embeddings against the f32 forward's: the same direction
    /// within quantization error, the same vector for a sentence alone or in a
    /// batch, and the same on the pool (small batches) and on rayon (large ones).
    #[test]
    fn int8_embeddings_match_the_f32_forward() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2");
        if !dir.join("model.safetensors").exists() || !int8_gemm() {
            eprintln!("SKIPPED: model missing (scripts/fetch-models) or no AVX-512 VNNI here");
            return;
        }
        let mut exact = BertEmbedder::load_with(&dir, 256, false).expect("load f32");
        let mut int8 = BertEmbedder::load_with(&dir, 256, true).expect("load int8");
        assert!(int8
            .weights
            .layers
            .iter()
            .all(|l| l.qkv.q.is_some() && l.out.q.is_some()));
        let corpus = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("readme");
        // Sentences of every length up to the 256-token cap, more than one pool batch.
        let texts: Vec<String> = corpus
            .split(". ")
            .filter(|t| !t.trim().is_empty())
            .take(40)
            .enumerate()
            .map(|(i, t)| t.repeat(1 + i % 7))
            .collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let want = exact.embed(&texts).expect("f32");
        let got = int8.embed(&texts).expect("int8");
        let mut worst = 1f32;
        for (w, g) in want.iter().zip(&got) {
            worst = worst.min(w.iter().zip(g).map(|(a, b)| a * b).sum());
        }
        eprintln!("int8 against f32 over {} texts: worst cosine {worst}", texts.len());
        assert!(worst > 0.995, "int8 against f32: worst cosine {worst}");
        for (t, g) in texts.iter().zip(&got).take(12) {
            let alone = int8.embed(&[t]).expect("embed one");
            let d: f32 = alone[0].iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(d < 1e-5, "{t}: {d}");
        }
    }

    /// `cargo test --release --lib embed_profile -- --ignored --nocapture` (for
    /// perf): ours alone on the bench's shapes, int8 and f32, for SECONDS each.
    #[test]
    #[ignore]
    fn embed_profile() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("models/all-minilm-l6-v2");
        let corpus = std::fs::read_to_string(root.join("../shared/data/scifact/corpus.jsonl")).expect("scifact");
        let passages: Vec<String> = corpus
            .lines()
            .take(128)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["text"].as_str().map(str::to_owned))
            .collect();
        let sentence = "The quick brown fox jumps over the lazy dog near the river bank while the \
                        children watch from the old stone bridge and the sun sets slowly behind the hills.";
        let seconds: f64 = std::env::var("SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3.0);
        let only = std::env::var("ONLY").unwrap_or_default();
        // PRECISION: int8 or f32 alone (both by default).
        let precision = std::env::var("PRECISION").unwrap_or_default();
        for int8 in [true, false] {
            if precision == if int8 { "f32" } else { "int8" } {
                continue;
            }
            let mut m = BertEmbedder::load_with(&dir, 256, int8).expect("load");
            // As the bench: batches of 32 of the first 128 abstracts in turn.
            for (name, texts, batch) in [
                ("batch 1", vec![sentence; 1], 1),
                ("batch 8", vec![sentence; 8], 8),
                ("batch 32", vec![sentence; 32], 32),
                ("passages", passages.iter().map(String::as_str).collect(), 32),
            ] {
                if !only.is_empty() && !name.contains(&only) {
                    continue;
                }
                let part = |i: usize| -> Vec<&str> { (0..batch).map(|j| texts[(i + j) % texts.len()]).collect() };
                m.embed(&part(0)).expect("warm-up");
                let (started, mut n) = (std::time::Instant::now(), 0);
                while started.elapsed().as_secs_f64() < seconds {
                    m.embed(&part(n)).expect("embed");
                    n += batch;
                }
                eprintln!(
                    "int8 {int8}: {name}: {:.1}/s",
                    n as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
    }

    /// Our forward against candle's BertModel with padding and an attention mask:
    /// all-MiniLM-L6-v2 (mean of the tokens) and bge-small-en-v1.5 (converted
    /// from ONNX by scripts/onnx-bert-to-safetensors; its [CLS] token).
    #[test]
    fn embeddings_match_candles_bert_model() {
        matches_candle("models/all-minilm-l6-v2", false);
    }

    #[test]
    fn the_converted_bge_model_pools_its_cls_token_as_candle_computes_it() {
        matches_candle("models/bge-small-en-v1.5", true);
    }

    fn matches_candle(model: &str, cls: bool) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(model);
        if !dir.join("model.safetensors").exists() {
            eprintln!("SKIPPED: {} missing; run scripts/fetch-models", dir.display());
            return;
        }
        let texts = [
            "A man is playing a guitar on the stage.",
            "Short one.",
            "The committee postponed the vote on the new budget until the next quarterly meeting, citing missing figures.",
            // Over GEMM_ATTENTION_MIN tokens: the GEMM attention path.
            "Long sentence about rivers, mountains, forests and the people who live near them; it goes on with more words \
             about weather, seasons, harvests, markets, roads, bridges, schools, hospitals and the small towns that grow \
             along the valleys where trade has always followed the water down to the sea.",
        ];
        let mut ours = BertEmbedder::load_with(&dir, 256, false).expect("load");
        let got = ours.embed(&texts).expect("embed");
        // One at a time gives the same vectors (no padding, no cross-talk).
        for (t, g) in texts.iter().zip(&got) {
            let alone = ours.embed(&[t]).expect("embed one");
            let d: f32 = alone[0].iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(d < 1e-5, "{t}: {d}");
        }

        let cfg: CandleConfig =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config")).expect("json");
        // SAFETY: read-only map of a file nobody writes during the test.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], candle_core::DType::F32, &Device::Cpu)
        }
        .expect("vb");
        let model = BertModel::load(vb, &cfg).expect("candle bert");
        let mut tok = Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
        tok.with_padding(Some(tokenizers::PaddingParams::default()));
        let enc = tok.encode_batch(texts.to_vec(), true).expect("encode");
        let stack = |f: &dyn Fn(&tokenizers::Encoding) -> Vec<u32>| {
            let rows: Vec<Tensor> = enc
                .iter()
                .map(|e| Tensor::new(f(e).as_slice(), &Device::Cpu).expect("row"))
                .collect();
            Tensor::stack(&rows, 0).expect("stack")
        };
        let mask = stack(&|e| e.get_attention_mask().to_vec());
        let hidden = model
            .forward(
                &stack(&|e| e.get_ids().to_vec()),
                &stack(&|e| e.get_type_ids().to_vec()),
                Some(&mask),
            )
            .expect("forward")
            .to_vec3::<f32>()
            .expect("vec");
        assert_eq!(ours.weights.cls, cls, "pooling read from 1_Pooling/config.json");
        for (i, e) in enc.iter().enumerate() {
            let m = e.get_attention_mask();
            let mut mean = vec![0f32; 384];
            for (t, (row, keep)) in hidden[i].iter().zip(m).enumerate() {
                if *keep == 1 && (!cls || t == 0) {
                    mean.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                }
            }
            let n = mean.iter().map(|v| v * v).sum::<f32>().sqrt();
            let cos: f32 = mean.iter().zip(&got[i]).map(|(a, b)| a / n * b).sum();
            assert!(cos > 0.99999, "sentence {i}: cosine {cos}");
        }
    }
}
