//! candle adapters for the model ports: a BERT sentence embedder and GGUF causal
//! LMs (llama family, Qwen3) with a tokenizer read from the GGUF metadata when no
//! tokenizer.json is given.

pub mod bert;
pub mod fast;
pub mod gguf;
pub mod llama;
pub mod pool;
pub mod qmat;
pub mod remote;
pub mod synthetic;

use ragchat_actors::inference::ModelError;

/// e^x for x ≤ 88, rel. error ~1e-7. Branch-free arithmetic on floats and
/// their bits (no `round`, no saturating casts), so loops over it vectorize.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    // min/max written as selects: `clamp` keeps NaN semantics that stay scalar.
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    // Round x·log2(e) to the nearest integer by adding 1.5·2^23: the integer
    // then sits in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let ni = t.to_bits() as i32 - SHIFT.to_bits() as i32;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    f32::from_bits(((ni + 127) as u32) << 23) * p
}

/// The largest of `x` (16 lanes, so it vectorizes).
#[inline(always)]
pub(crate) fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    for c in chunks {
        for l in 0..16 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().fold(tail, |m, v| m.max(*v))
}

/// x ← exp(x − max); returns the sum.
#[inline(always)]
pub(crate) fn exp_in_place(x: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact_mut(16);
    for c in chunks.by_ref() {
        for l in 0..16 {
            c[l] = fast_exp(c[l] - max);
            acc[l] += c[l];
        }
    }
    let mut tail = 0.0;
    for v in chunks.into_remainder() {
        *v = fast_exp(*v - max);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

pub(crate) fn model_error(e: impl std::fmt::Display) -> ModelError {
    ModelError::Internal(e.to_string())
}
