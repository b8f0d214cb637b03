//! Our Q4_1 matrix product for decode (opt-in: RAGCHAT_Q41_KERNEL=1). candle 0.11
//! has no SIMD path for Q4_1 (its `vec_dot` for Q4_1 is the scalar reference).
//! End to end this kernel is not yet faster than candle's path (BENCHMARKS.md):
//! the next step is profiling the decode step as a whole. Here, as in ggml: activations are quantized to
//! Q8_1 blocks, each Q4_1 weight block is expanded once and multiplied with the
//! matching block of *every* activation row (the batched decode step), using AVX2
//! integer multiply-adds (`maddubs`: 4-bit × 8-bit → 16-bit pairs → 32-bit).
//!
//! Block layouts (32 values): Q4_1 = f16 d, f16 m, 16 bytes of nibbles (low nibble
//! = value j, high = value j + 16), value = q·d + m. Q8_1 = f32 d, f32 s = d·Σq,
//! 32 i8. Dot = d4·d8·Σ(q4·q8) + m4·s8.

use half::f16;
use rayon::prelude::*;

const BLOCK: usize = 32;
const BLOCK_BYTES: usize = 20;
/// Activation rows handled per pass over a weight row.
const GROUP: usize = 8;

pub struct Q41Matrix {
    raw: Vec<u8>,
    rows: usize,
    cols: usize,
}

/// One activation row in Q8_1 blocks.
struct Q8Row {
    d: Vec<f32>,
    s: Vec<f32>,
    q: Vec<i8>,
}

fn quantize_q8_1(x: &[f32]) -> Q8Row {
    let nb = x.len() / BLOCK;
    let mut row = Q8Row {
        d: Vec::with_capacity(nb),
        s: Vec::with_capacity(nb),
        q: Vec::with_capacity(x.len()),
    };
    for blk in x.chunks_exact(BLOCK) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for v in blk {
            let q = (v * id).round().clamp(-127.0, 127.0) as i8;
            sum += i32::from(q);
            row.q.push(q);
        }
        row.d.push(d);
        row.s.push(d * sum as f32);
    }
    row
}

impl Q41Matrix {
    /// `raw`: GGUF Q4_1 data of a (rows, cols) matrix, row-major.
    pub fn new(raw: Vec<u8>, rows: usize, cols: usize) -> Option<Self> {
        (cols.is_multiple_of(BLOCK) && raw.len() == rows * cols / BLOCK * BLOCK_BYTES).then_some(Q41Matrix {
            raw,
            rows,
            cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x`: b rows of `cols` values; returns b rows of `rows` values.
    pub fn matmul(&self, x: &[f32], b: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let nb = cols / BLOCK;
        let stride = nb * BLOCK_BYTES;
        let q8: Vec<Q8Row> = (0..b).map(|i| quantize_q8_1(&x[i * cols..(i + 1) * cols])).collect();
        let simd = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let mut out_t = vec![0f32; rows * b]; // (rows, b)
                                              // One task per thread: the matrices are small and waking threads is not free.
        let per_task = rows.div_ceil(rayon::current_num_threads().max(1)).max(1);
        out_t
            .par_chunks_mut(per_task * b)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (r, out) in chunk.chunks_mut(b).enumerate() {
                    let row_i = task * per_task + r;
                    let row = &self.raw[row_i * stride..(row_i + 1) * stride];
                    for (g, ys) in q8.chunks(GROUP).enumerate() {
                        let dst = &mut out[g * GROUP..g * GROUP + ys.len()];
                        if simd {
                            // SAFETY: AVX2 and FMA were detected at run time just above.
                            unsafe { row_dot_avx2(row, nb, ys, dst) }
                        } else {
                            row_dot_scalar(row, nb, ys, dst)
                        }
                    }
                }
            });
        let mut y = vec![0f32; b * rows];
        for r in 0..rows {
            for bi in 0..b {
                y[bi * rows + r] = out_t[r * b + bi];
            }
        }
        y
    }
}

fn row_dot_scalar(row: &[u8], nb: usize, ys: &[Q8Row], out: &mut [f32]) {
    for (y, o) in ys.iter().zip(out.iter_mut()) {
        let mut total = 0f32;
        for k in 0..nb {
            let blk = &row[k * BLOCK_BYTES..(k + 1) * BLOCK_BYTES];
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
            let qy = &y.q[k * BLOCK..(k + 1) * BLOCK];
            let mut isum = 0i32;
            for j in 0..16 {
                isum += i32::from(blk[4 + j] & 0x0F) * i32::from(qy[j]);
                isum += i32::from(blk[4 + j] >> 4) * i32::from(qy[j + 16]);
            }
            total += d * y.d[k] * isum as f32 + m * y.s[k];
        }
        *o = total;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn row_dot_avx2(row: &[u8], nb: usize, ys: &[Q8Row], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = ys.len().min(GROUP);
    let mut acc = [_mm256_setzero_ps(); GROUP];
    let mut mins = [0f32; GROUP];
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for k in 0..nb {
        let blk = row.as_ptr().add(k * BLOCK_BYTES);
        let d = f16::from_le_bytes([*blk, *blk.add(1)]).to_f32();
        let m = f16::from_le_bytes([*blk.add(2), *blk.add(3)]).to_f32();
        // 16 bytes of nibbles → 32 bytes: values 0..15 in the low lane, 16..31 in the high.
        let packed = _mm_loadu_si128(blk.add(4) as *const __m128i);
        let q4 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
        for i in 0..n {
            let y = &ys[i];
            let qy = _mm256_loadu_si256(y.q.as_ptr().add(k * BLOCK) as *const __m256i);
            let pairs = _mm256_maddubs_epi16(q4, qy);
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * *y.d.get_unchecked(k)), sums, acc[i]);
            mins[i] += m * *y.s.get_unchecked(k);
        }
    }
    for i in 0..n {
        let v = acc[i];
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        out[i] = _mm_cvtss_f32(s1) + mins[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantize_q4_1(w: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for blk in w.chunks(BLOCK) {
            let min = blk.iter().cloned().fold(f32::INFINITY, f32::min);
            let max = blk.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
            for j in 0..16 {
                let q0 = (((blk[j] - min) * inv).round() as u8).min(15);
                let q1 = (((blk[j + 16] - min) * inv).round() as u8).min(15);
                out.push(q0 | (q1 << 4));
            }
        }
        out
    }

    fn dequantize(raw: &[u8]) -> Vec<f32> {
        raw.chunks_exact(BLOCK_BYTES)
            .flat_map(|blk| {
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                let mut v = [0f32; BLOCK];
                for j in 0..16 {
                    v[j] = f32::from(blk[4 + j] & 0x0F) * d + m;
                    v[j + 16] = f32::from(blk[4 + j] >> 4) * d + m;
                }
                v
            })
            .collect()
    }

    #[test]
    fn the_product_matches_the_dequantized_weights_for_any_batch() {
        let (rows, cols) = (70, 96);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let raw: Vec<u8> = w.chunks(cols).flat_map(quantize_q4_1).collect();
        let deq = dequantize(&raw);
        let m = Q41Matrix::new(raw, rows, cols).expect("shape");
        for b in [1, 3, 8, 11] {
            let x: Vec<f32> = (0..b * cols).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
            let y = m.matmul(&x, b);
            for bi in 0..b {
                for r in 0..rows {
                    let want: f32 = (0..cols).map(|k| deq[r * cols + k] * x[bi * cols + k]).sum();
                    let got = y[bi * rows + r];
                    // Q8 activations: ~1% error, as in ggml.
                    assert!(
                        (want - got).abs() < 0.02 * (1.0 + want.abs()),
                        "b={b} ({bi},{r}): {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_and_scalar_paths_agree() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let cols = 128;
        let w: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let row = quantize_q4_1(&w);
        let ys: Vec<Q8Row> = (0..5)
            .map(|s| quantize_q8_1(&(0..cols).map(|i| ((i + s) as f32 * 0.11).cos()).collect::<Vec<_>>()))
            .collect();
        let (mut a, mut b) = (vec![0f32; 5], vec![0f32; 5]);
        row_dot_scalar(&row, cols / BLOCK, &ys, &mut a);
        // SAFETY: checked above.
        unsafe { row_dot_avx2(&row, cols / BLOCK, &ys, &mut b) };
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4 * (1.0 + x.abs()), "{x} vs {y}");
        }
    }
}
