//! Our quantized matrix products for the llama forward (and, in Q8_0 tiles made
//! from f32 at load, for the embedding model's linear layers), for the two GGUF
//! block types of the development model: Q4_1 (every linear layer of SmolLM2 Q4_1)
//! and Q8_0 (its token embeddings, tied to the output head). candle 0.11 has no
//! SIMD path for Q4_1 (its `vec_dot` is the scalar reference) and runs every
//! product through its tensor machinery, which costs more than the product at
//! one row. Here, as in ggml: activations are quantized to Q8 blocks once per
//! product, each weight block is expanded once and multiplied with the matching
//! block of up to eight activation rows (the batched decode step), using AVX2
//! integer multiply-adds (`maddubs`: u8 × i8 → i16 pairs → i32), and output rows are
//! shared among the threads of a [`Pool`].
//!
//! Block layouts (32 values):
//! - Q4_1: f16 d, f16 m, 16 bytes of nibbles (low nibble = value j, high = value
//!   j + 16); value = q·d + m.
//! - Q8_0: f16 d, 32 i8; value = q·d.
//! - Q8 activations: f32 d and s = d·Σq per block, 32 i8.
//!
//! Dot of a Q4_1 block with an activation block = d4·d8·Σ(q4·q8) + m4·s8; of a
//! Q8_0 block = d·d8·Σ(q·q8).
//!
//! And the two k-quant types of llama.cpp's Q4_K_M files, in super-blocks of 256
//! values, against activations quantized per 256 values too (one scale d8, and
//! the integer sum of each 32), so a super-block sums in integers:
//! - Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of eight 6-bit (scale, min)
//!   pairs, 128 bytes of nibbles (per 64 values: 32 bytes, low nibbles the first
//!   32, high nibbles the next 32); value = d·sc·q − dmin·m. Dot of a super-block
//!   = d·d8·Σᵢ sc_i·Σ(q·q8) − dmin·d8·Σᵢ m_i·Σq8ᵢ.
//! - Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high bit pairs, 16
//!   i8 scales (one per 16 values), f16 d; value = d·sc·(q − 32). Dot of a
//!   super-block = d·d8·Σ_g sc_g·Σ₁₆((q − 32)·q8).

use half::f16;

use super::pool::{share, Pool, SyncPtr};

const BLOCK: usize = 32;
/// Activation rows handled per pass over a weight row.
const GROUP: usize = 4;
/// How far ahead of the current weight block to prefetch, in bytes.
const PREFETCH: usize = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Q41,
    Q80,
    Q4K,
    Q6K,
}

/// Values per k-quant super-block.
const SUPER: usize = 256;

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q41 => 20,
            Kind::Q80 => 34,
            Kind::Q4K => 144,
            Kind::Q6K => 210,
        }
    }

    fn block_values(self) -> usize {
        match self {
            Kind::Q41 | Kind::Q80 => BLOCK,
            Kind::Q4K | Kind::Q6K => SUPER,
        }
    }
}

/// Q4_K's eight (scale, min) pairs from their 12 packed bytes (6 bits each).
fn q4k_scales(p: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        if j < 4 {
            sc[j] = p[j] & 63;
            m[j] = p[j + 4] & 63;
        } else {
            sc[j] = (p[j + 4] & 0x0F) | ((p[j - 4] >> 6) << 4);
            m[j] = (p[j + 4] >> 4) | ((p[j] >> 6) << 4);
        }
    }
    (sc, m)
}

/// Q4_K super-block values 0..15, in order.
fn q4k_values(blk: &[u8]) -> [u8; SUPER] {
    let mut q = [0u8; SUPER];
    let qs = &blk[16..144];
    for j in 0..4 {
        for l in 0..32 {
            q[j * 64 + l] = qs[j * 32 + l] & 0x0F;
            q[j * 64 + 32 + l] = qs[j * 32 + l] >> 4;
        }
    }
    q
}

/// Q6_K super-block values −32..31, in order.
fn q6k_values(blk: &[u8]) -> [i8; SUPER] {
    let mut q = [0i8; SUPER];
    let (ql, qh) = (&blk[..128], &blk[128..192]);
    for n in 0..2 {
        let (ql, qh) = (&ql[n * 64..], &qh[n * 32..]);
        let out = &mut q[n * 128..];
        for l in 0..32 {
            out[l] = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
            out[l + 32] = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            out[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            out[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    q
}

/// A row-major f32 matrix (its width a multiple of 32) in Q8_0 blocks, GGUF
/// layout: per 32 values an f16 scale d (the largest magnitude maps to 127) and
/// the 32 values round(v / d) as i8.
pub fn quantize_q8_0(w: &[f32]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(w.len() / BLOCK * Kind::Q80.block_bytes());
    for blk in w.chunks_exact(BLOCK) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / 127.0);
        let id = if d.to_f32() > 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        raw.extend_from_slice(&d.to_le_bytes());
        raw.extend(
            blk.iter()
                .map(|v| (v * id).round_ties_even().clamp(-127.0, 127.0) as i8 as u8),
        );
    }
    raw
}

/// Where a product's parts run.
#[derive(Clone, Copy)]
pub enum On<'a> {
    /// The spinning pool (a decode step, a query's embedding).
    Pool(&'a Pool),
    /// Rayon's threads, which sleep while they wait (bulk batches).
    Rayon,
    /// The calling thread alone (small products).
    Caller,
}

/// A quantized (rows, cols) matrix, row-major, in GGUF block layout.
pub struct QMat {
    kind: Kind,
    raw: Vec<u8>,
    rows: usize,
    cols: usize,
    /// The same weights repacked for the int8 GEMM ([`QMat::tile`]), if built.
    tiles: Option<Vec<u8>>,
}

/// The scale of a block of activations (its largest magnitude maps to 127) and
/// its inverse.
fn scale_of(values: &[f32]) -> (f32, f32) {
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

/// `values` quantized with inverse scale `id` into `out`; returns their sum.
/// Rounds half to even (`nearbyint`, as ggml): unlike `round`, that is one
/// vector instruction, so the loop vectorizes.
fn quantize_block(values: &[f32], id: f32, out: &mut [i8]) -> i32 {
    let mut sum = 0i32;
    for (o, v) in out.iter_mut().zip(values) {
        let q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
        sum += q;
        *o = q as i8;
    }
    sum
}

/// The Q8 blocks of `x` into `d`, `s` and `q`, as the scalar loop of
/// [`quantize_rows`] computes them (the same scale, its inverse, and rounding
/// half to even: `vcvtps2dq` under the default rounding mode), one block of 32
/// per pair of registers. The scalar loop's max is a serial chain the compiler
/// does not vectorize; it cost as much as the int8 GEMM it feeds.
///
/// # Safety
/// AVX-512 F and BW; d and s hold a value, q 32, per block of x.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_blocks_avx512(x: &[f32], d: &mut [f32], s: &mut [f32], q: &mut [i8]) {
    use std::arch::x86_64::*;
    let n = x.len() / BLOCK;
    assert!(d.len() >= n && s.len() >= n && q.len() >= n * BLOCK, "block counts");
    let out = q.as_mut_ptr();
    let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
    for b in 0..n {
        let p = x.as_ptr().add(b * BLOCK);
        let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let bd = amax / 127.0;
        let id = _mm512_set1_ps(if bd > 0.0 { 1.0 / bd } else { 0.0 });
        let q0 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), lo), hi);
        let q1 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, id)), lo), hi);
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        _mm_storeu_si128(out.add(b * BLOCK) as *mut __m128i, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(out.add(b * BLOCK + 16) as *mut __m128i, _mm512_cvtepi32_epi8(q1));
        d[b] = bd;
        s[b] = bd * sum as f32;
    }
}

/// Some consecutive rows of a [`Q8Acts`], to be written.
struct RowsMut<'a> {
    d: &'a mut [f32],
    s: &'a mut [f32],
    q: &'a mut [i8],
    kd: &'a mut [f32],
    ks: &'a mut [i32],
    kq: &'a mut [i8],
}

/// A range of rows and its writable view.
type Part<'a> = (std::ops::Range<usize>, RowsMut<'a>);

/// `x` (whole rows) quantized into `out` (the same rows).
fn quantize_rows(x: &[f32], out: RowsMut<'_>) {
    if int8_gemm() {
        // SAFETY: int8_gemm() implies AVX-512 F and BW; the slices hold x's rows.
        unsafe { quantize_blocks_avx512(x, out.d, out.s, out.q) };
    } else {
        for (i, blk) in x.chunks_exact(BLOCK).enumerate() {
            let (d, id) = scale_of(blk);
            let sum = quantize_block(blk, id, &mut out.q[i * BLOCK..(i + 1) * BLOCK]);
            out.d[i] = d;
            out.s[i] = d * sum as f32;
        }
    }
    if !out.kd.is_empty() {
        for (i, sb) in x.chunks_exact(SUPER).enumerate() {
            let (d, id) = scale_of(sb);
            for (j, blk) in sb.chunks_exact(BLOCK).enumerate() {
                let k = i * SUPER / BLOCK + j;
                out.ks[k] = quantize_block(blk, id, &mut out.kq[k * BLOCK..(k + 1) * BLOCK]);
            }
            out.kd[i] = d;
        }
    }
}

/// `b` activation rows in Q8 blocks; when the width allows, also in blocks of
/// 256 with one scale each (as ggml's Q8_K), for the k-quant kernels: they then
/// sum a whole super-block in integers and convert once.
pub struct Q8Acts {
    b: usize,
    nb: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    q: Vec<i8>,
    /// Per 256 values: the scale; per 32: the sum of the values (Q4_K's mins).
    kd: Vec<f32>,
    ks: Vec<i32>,
    kq: Vec<i8>,
}

impl Q8Acts {
    /// `x`: b rows of `cols` values (cols a multiple of 32); the 256-value blocks
    /// too when `k_blocks` (a k-quant matrix will read them).
    pub fn quantize(x: &[f32], cols: usize, k_blocks: bool) -> Q8Acts {
        Self::quantize_on(x, cols, k_blocks, None)
    }

    /// As [`Q8Acts::quantize`], with the rows shared among `pool`'s threads when
    /// there are many (a prompt's rows: serial, this cost an eighth of a prefill).
    pub fn quantize_on(x: &[f32], cols: usize, k_blocks: bool, pool: Option<&Pool>) -> Q8Acts {
        let mut a = Self::zeroed(x.len() / cols, cols, k_blocks);
        let parts = pool.map_or(1, Pool::threads);
        match pool {
            Some(pool) if parts > 1 && a.b >= 2 * TILE => {
                let slots: Vec<std::sync::Mutex<Option<Part<'_>>>> = a
                    .split(parts)
                    .into_iter()
                    .map(|p| std::sync::Mutex::new(Some(p)))
                    .collect();
                pool.run(&|t| {
                    let part = slots[t].lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some((rows, out)) = part {
                        quantize_rows(&x[rows.start * cols..rows.end * cols], out);
                    }
                });
            }
            _ => {
                let b = a.b;
                for (rows, out) in a.split(1) {
                    debug_assert_eq!(rows, 0..b);
                    quantize_rows(&x[..b * cols], out);
                }
            }
        }
        a
    }

    /// As [`Q8Acts::quantize`], the rows shared among rayon's threads (bulk
    /// batches, which run off the spinning pool).
    pub fn quantize_rayon(x: &[f32], cols: usize, k_blocks: bool) -> Q8Acts {
        use rayon::prelude::*;
        let parts = rayon::current_num_threads();
        let mut a = Self::zeroed(x.len() / cols, cols, k_blocks);
        let parts = if a.b >= 2 * TILE { parts } else { 1 };
        a.split(parts)
            .into_par_iter()
            .for_each(|(rows, out)| quantize_rows(&x[rows.start * cols..rows.end * cols], out));
        a
    }

    /// Room for `b` rows of `cols` values, all zero.
    fn zeroed(b: usize, cols: usize, k_blocks: bool) -> Q8Acts {
        let nb = cols / BLOCK;
        let k = k_blocks && cols.is_multiple_of(SUPER);
        Q8Acts {
            b,
            nb,
            d: vec![0.0; b * nb],
            s: vec![0.0; b * nb],
            q: vec![0; b * cols],
            kd: vec![0.0; if k { b * cols / SUPER } else { 0 }],
            ks: vec![0; if k { b * nb } else { 0 }],
            kq: vec![0; if k { b * cols } else { 0 }],
        }
    }

    /// The rows in `parts` consecutive ranges (as [`share`] deals them), each
    /// with its own writable view.
    fn split(&mut self, parts: usize) -> Vec<Part<'_>> {
        let (b, nb) = (self.b, self.nb);
        let cols = nb * BLOCK;
        let nk = if self.kd.is_empty() { 0 } else { cols / SUPER };
        let kb = if self.kd.is_empty() { 0 } else { nb };
        let kc = if self.kd.is_empty() { 0 } else { cols };
        let (mut d, mut s, mut q) = (&mut self.d[..], &mut self.s[..], &mut self.q[..]);
        let (mut kd, mut ks, mut kq) = (&mut self.kd[..], &mut self.ks[..], &mut self.kq[..]);
        let mut out = Vec::with_capacity(parts);
        for t in 0..parts.max(1) {
            let rows = share(b, parts.max(1), t, 1);
            let n = rows.len();
            let (d0, d1) = std::mem::take(&mut d).split_at_mut(n * nb);
            let (s0, s1) = std::mem::take(&mut s).split_at_mut(n * nb);
            let (q0, q1) = std::mem::take(&mut q).split_at_mut(n * cols);
            let (kd0, kd1) = std::mem::take(&mut kd).split_at_mut(n * nk);
            let (ks0, ks1) = std::mem::take(&mut ks).split_at_mut(n * kb);
            let (kq0, kq1) = std::mem::take(&mut kq).split_at_mut(n * kc);
            (d, s, q, kd, ks, kq) = (d1, s1, q1, kd1, ks1, kq1);
            out.push((
                rows,
                RowsMut {
                    d: d0,
                    s: s0,
                    q: q0,
                    kd: kd0,
                    ks: ks0,
                    kq: kq0,
                },
            ));
        }
        out
    }

    fn row(&self, i: usize) -> ActRow<'_> {
        let nk = if self.kd.is_empty() { 0 } else { self.nb * BLOCK / SUPER };
        ActRow {
            d: &self.d[i * self.nb..(i + 1) * self.nb],
            s: &self.s[i * self.nb..(i + 1) * self.nb],
            q: &self.q[i * self.nb * BLOCK..(i + 1) * self.nb * BLOCK],
            kd: &self.kd[i * nk..(i + 1) * nk],
            ks: if nk == 0 {
                &[]
            } else {
                &self.ks[i * self.nb..(i + 1) * self.nb]
            },
            kq: if nk == 0 {
                &[]
            } else {
                &self.kq[i * self.nb * BLOCK..(i + 1) * self.nb * BLOCK]
            },
        }
    }
}

#[derive(Clone, Copy)]
struct ActRow<'a> {
    d: &'a [f32],
    s: &'a [f32],
    q: &'a [i8],
    /// The 256-value blocks (empty when the width is not a multiple of 256).
    kd: &'a [f32],
    ks: &'a [i32],
    kq: &'a [i8],
}

impl QMat {
    /// `raw`: GGUF data of a (rows, cols) matrix of `kind` blocks.
    pub fn new(kind: Kind, raw: Vec<u8>, rows: usize, cols: usize) -> Option<Self> {
        let per = kind.block_values();
        (cols.is_multiple_of(per) && raw.len() == rows * cols / per * kind.block_bytes()).then_some(QMat {
            kind,
            raw,
            rows,
            cols,
            tiles: None,
        })
    }

    /// Stacks matrices of the same kind and width (e.g. q, k and v into one product).
    pub fn stack(parts: Vec<QMat>) -> Option<QMat> {
        let first = parts.first()?;
        let (kind, cols) = (first.kind, first.cols);
        if parts.iter().any(|p| p.kind != kind || p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let raw = parts.into_iter().flat_map(|p| p.raw).collect();
        QMat::new(kind, raw, rows, cols)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether its products read the activations in 256-value blocks.
    pub fn k_blocks(&self) -> bool {
        matches!(self.kind, Kind::Q4K | Kind::Q6K)
    }

    fn stride(&self) -> usize {
        self.cols / self.kind.block_values() * self.kind.block_bytes()
    }

    /// Row `r` in f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let stride = self.stride();
        let row = &self.raw[r * stride..(r + 1) * stride];
        for (blk, o) in row
            .chunks_exact(self.kind.block_bytes())
            .zip(out.chunks_exact_mut(self.kind.block_values()))
        {
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            match self.kind {
                Kind::Q4K => {
                    let dmin = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    let (sc, m) = q4k_scales(&blk[4..16]);
                    for (i, (v, q)) in o.iter_mut().zip(q4k_values(blk)).enumerate() {
                        let j = i / BLOCK;
                        *v = d * f32::from(sc[j]) * f32::from(q) - dmin * f32::from(m[j]);
                    }
                }
                Kind::Q6K => {
                    let d = f16::from_le_bytes([blk[208], blk[209]]).to_f32();
                    for (i, (v, q)) in o.iter_mut().zip(q6k_values(blk)).enumerate() {
                        *v = d * f32::from(blk[192 + i / 16] as i8) * f32::from(q);
                    }
                }
                Kind::Q41 => {
                    let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    for j in 0..16 {
                        o[j] = f32::from(blk[4 + j] & 0x0F) * d + m;
                        o[j + 16] = f32::from(blk[4 + j] >> 4) * d + m;
                    }
                }
                Kind::Q80 => {
                    for (v, q) in o.iter_mut().zip(&blk[2..]) {
                        *v = f32::from(*q as i8) * d;
                    }
                }
            }
        }
    }

    /// `out` (b × rows) = x · selfᵀ, output rows shared among the pool's threads.
    pub fn matmul(&self, x: &Q8Acts, out: &mut [f32], pool: &Pool) {
        self.product(x, out, None, On::Pool(pool));
    }

    /// `out` (b × rows) = x · selfᵀ (+ `bias`, one value per row of self), on
    /// the threads `on` names.
    pub fn product(&self, x: &Q8Acts, out: &mut [f32], bias: Option<&[f32]>, on: On<'_>) {
        assert_eq!(x.nb * BLOCK, self.cols, "activation width");
        assert!(
            !self.k_blocks() || !x.kd.is_empty(),
            "k-quant products need 256-value blocks"
        );
        assert_eq!(out.len(), x.b * self.rows, "output size");
        assert!(bias.is_none_or(|b| b.len() == self.rows), "bias size");
        let ptr = SyncPtr(out.as_mut_ptr());
        let parts = match on {
            On::Pool(pool) => pool.threads(),
            On::Rayon => rayon::current_num_threads(),
            On::Caller => 1,
        };
        let part = |t: usize| {
            let range = share(self.rows, parts, t, 16);
            // SAFETY: each part writes only the columns of its own range of weight rows.
            unsafe { self.rows_into(x, range, ptr, bias) }
        };
        match on {
            On::Pool(pool) => pool.run(&part),
            On::Rayon => {
                use rayon::prelude::*;
                (0..parts).into_par_iter().for_each(part);
            }
            On::Caller => part(0),
        }
    }

    /// # Safety
    /// `out` must point to b × rows floats that no one else writes in `range`'s columns.
    unsafe fn rows_into(&self, x: &Q8Acts, range: std::ops::Range<usize>, out: SyncPtr, bias: Option<&[f32]>) {
        if let Some(tiles) = &self.tiles {
            // Without its GGUF copy (dropped in `tile`), a matrix has only the tiles.
            if (x.b >= tile_min_rows() || self.raw.is_empty())
                && range.start.is_multiple_of(TILE)
                && range.end.is_multiple_of(TILE)
            {
                return self.tiles_into(tiles, x, range, out, bias);
            }
        }
        let stride = self.stride();
        let simd = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let mut dots = [0f32; GROUP];
        for r in range {
            let row = &self.raw[r * stride..(r + 1) * stride];
            let add = bias.map_or(0.0, |b| b[r]);
            let mut g0 = 0;
            while g0 < x.b {
                let n = (x.b - g0).min(GROUP);
                let mut ys = [x.row(g0); GROUP];
                for (i, y) in ys.iter_mut().enumerate().take(n) {
                    *y = x.row(g0 + i);
                }
                if simd {
                    dot_avx2(self.kind, row, x.nb, &ys[..n], &mut dots);
                } else {
                    dot_scalar(self.kind, row, x.nb, &ys[..n], &mut dots);
                }
                for (i, v) in dots.iter().enumerate().take(n) {
                    *out.add((g0 + i) * self.rows + r) = *v + add;
                }
                g0 += n;
            }
        }
    }

    /// Whether products of many rows run on the int8 GEMM.
    pub fn tiled(&self) -> bool {
        self.tiles.is_some()
    }

    /// Builds the repacked copy of the weights that products of at least
    /// [`tile_min_rows`] activation rows run on (an int8 GEMM with AVX-512 VNNI),
    /// when the CPU has it and the rows come in whole tiles. Returns whether it did.
    ///
    /// Per tile of 16 weight rows and per 32-value block (`tile_bytes`): the 16
    /// scales d and 16 offsets m as f32, then the 32 values of each row as
    /// unsigned bytes in groups of four, interleaved by row: 64 bytes hold values
    /// 4g..4g+4 of all 16 rows, so one `vpdpbusd` with four activation bytes
    /// broadcast adds a four-value dot product to each row's lane. Q4_1 keeps its
    /// nibbles (group g in the low nibbles of the same bytes whose high nibbles are
    /// group g + 4). Q8_0's signed values are stored plus 128, and the 128·Σq8 that
    /// adds is taken off through the offset: m = −128·d (its term is m·s8, as
    /// Q4_1's). The k-quants: per tile and super-block of 256 values, see
    /// [`pack_q4k`] and [`pack_q6k`].
    pub fn tile(&mut self) -> bool {
        if !int8_gemm() || !self.rows.is_multiple_of(TILE) {
            return false;
        }
        let (nb, bb, stride, tb) = (
            self.cols / self.kind.block_values(),
            self.kind.block_bytes(),
            self.stride(),
            tile_bytes(self.kind),
        );
        let mut data = vec![0u8; self.rows / TILE * nb * tb];
        for (t, tile) in data.chunks_exact_mut(nb * tb).enumerate() {
            for (k, out) in tile.chunks_exact_mut(tb).enumerate() {
                for r in 0..TILE {
                    let at = (t * TILE + r) * stride + k * bb;
                    let blk = &self.raw[at..at + bb];
                    match self.kind {
                        Kind::Q41 | Kind::Q80 => pack_block(self.kind, blk, r, out),
                        Kind::Q4K => pack_q4k(blk, r, out),
                        Kind::Q6K => pack_q6k(blk, r, out),
                    }
                }
            }
        }
        self.tiles = Some(data);
        // Every product takes the tiles (the default): the GGUF copy is not read again.
        if tile_min_rows() <= 1 {
            self.raw = Vec::new();
        }
        true
    }

    /// # Safety
    /// As [`QMat::rows_into`]; `range` in whole tiles; the CPU has AVX-512 VNNI.
    unsafe fn tiles_into(
        &self,
        tiles: &[u8],
        x: &Q8Acts,
        range: std::ops::Range<usize>,
        out: SyncPtr,
        bias: Option<&[f32]>,
    ) {
        let blocks = self.cols / self.kind.block_values();
        let per_tile = blocks * tile_bytes(self.kind);
        // Activation rows in chunks that stay in L2 while every tile of the range
        // passes over them (a prompt or a batch of passages has thousands of rows:
        // streamed from memory once per tile, they cost as much as the arithmetic).
        let chunk = (CHUNK_BYTES / self.cols.max(1)).max(TILE_ROWS) / TILE_ROWS * TILE_ROWS;
        for c0 in (0..x.b).step_by(chunk) {
            let c1 = (c0 + chunk).min(x.b);
            let ys: Vec<ActRow<'_>> = (c0..c1).map(|i| x.row(i)).collect();
            for t in (range.start / TILE)..(range.end / TILE) {
                let tile = tiles[t * per_tile..(t + 1) * per_tile].as_ptr();
                let b = bias.map_or(std::ptr::null(), |b| b[t * TILE..(t + 1) * TILE].as_ptr());
                let mut g0 = c0;
                while g0 < c1 {
                    let n = (c1 - g0).min(TILE_ROWS);
                    let ys = &ys[g0 - c0..g0 - c0 + n];
                    let o = SyncPtr(out.add(g0 * self.rows + t * TILE));
                    macro_rules! by_rows {
                    ($f:ident $(, $c:expr)?) => {
                        match n {
                            1 => $f::<1 $(, { $c })?>(tile, blocks, ys, o, self.rows, b),
                            2 => $f::<2 $(, { $c })?>(tile, blocks, ys, o, self.rows, b),
                            3 => $f::<3 $(, { $c })?>(tile, blocks, ys, o, self.rows, b),
                            4 => $f::<4 $(, { $c })?>(tile, blocks, ys, o, self.rows, b),
                            5 => $f::<5 $(, { $c })?>(tile, blocks, ys, o, self.rows, b),
                            6 => $f::<6 $(, { $c })?>(tile, blocks, ys, o, self.rows, b),
                            7 => $f::<7 $(, { $c })?>(tile, blocks, ys, o, self.rows, b),
                            _ => $f::<8 $(, { $c })?>(tile, blocks, ys, o, self.rows, b),
                        }
                    };
                }
                    match self.kind {
                        Kind::Q41 => by_rows!(tile_dot, true),
                        Kind::Q80 => by_rows!(tile_dot, false),
                        Kind::Q4K => by_rows!(tile_dot_q4k),
                        Kind::Q6K => by_rows!(tile_dot_q6k),
                    }
                    g0 += n;
                }
            }
        }
    }
}

/// Bytes of quantized activation rows per chunk of [`QMat::tiles_into`].
const CHUNK_BYTES: usize = 256 << 10;

/// A tile's accumulator at the start: its 16 bias values, or zeros (null).
///
/// # Safety
/// AVX-512 F; `bias` null or 16 readable floats.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn start(bias: *const f32) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    if bias.is_null() {
        _mm512_setzero_ps()
    } else {
        _mm512_loadu_ps(bias)
    }
}

/// Row `r`'s Q4_1 or Q8_0 block in its tile block `out` (see [`QMat::tile`]).
fn pack_block(kind: Kind, blk: &[u8], r: usize, out: &mut [u8]) {
    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
    let mut q = [0u8; BLOCK];
    let m = if kind == Kind::Q41 {
        for j in 0..16 {
            q[j] = blk[4 + j] & 0x0F;
            q[j + 16] = blk[4 + j] >> 4;
        }
        f16::from_le_bytes([blk[2], blk[3]]).to_f32()
    } else {
        for (o, v) in q.iter_mut().zip(&blk[2..]) {
            *o = (*v as i8 as i16 + 128) as u8;
        }
        -128.0 * d
    };
    out[4 * r..4 * r + 4].copy_from_slice(&d.to_le_bytes());
    out[64 + 4 * r..64 + 4 * r + 4].copy_from_slice(&m.to_le_bytes());
    if kind == Kind::Q41 {
        put_nibbles(&q, r, &mut out[128..384]);
    } else {
        put_bytes(&q, r, &mut out[128..640]);
    }
}

/// 32 values 0..15 of row `r` into 256 bytes: byte 64j + 4r + i holds value
/// 4j + i in its low nibble and 4(j + 4) + i in its high one.
fn put_nibbles(q: &[u8], r: usize, out: &mut [u8]) {
    for j in 0..4 {
        for i in 0..4 {
            out[64 * j + 4 * r + i] = q[4 * j + i] | (q[4 * (j + 4) + i] << 4);
        }
    }
}

/// 32 bytes of row `r` into 512: byte 64g + 4r + i holds value 4g + i.
fn put_bytes(q: &[u8], r: usize, out: &mut [u8]) {
    for g in 0..8 {
        for i in 0..4 {
            out[64 * g + 4 * r + i] = q[4 * g + i];
        }
    }
}

/// Row `r`'s Q4_K super-block in its tile block `out` (Q4K_TILE bytes): 16 d and
/// 16 dmin as f32, the eight 6-bit scales and mins as bytes ([j][row], 128 bytes
/// each), then each 32-value sub-block's nibbles as Q4_1's (256 bytes each).
fn pack_q4k(blk: &[u8], r: usize, out: &mut [u8]) {
    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
    let dmin = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
    let (sc, m) = q4k_scales(&blk[4..16]);
    out[4 * r..4 * r + 4].copy_from_slice(&d.to_le_bytes());
    out[64 + 4 * r..64 + 4 * r + 4].copy_from_slice(&dmin.to_le_bytes());
    for j in 0..8 {
        out[128 + 16 * j + r] = sc[j];
        out[256 + 16 * j + r] = m[j];
    }
    let q = q4k_values(blk);
    for (j, sub) in q.chunks_exact(BLOCK).enumerate() {
        put_nibbles(sub, r, &mut out[384 + 256 * j..384 + 256 * (j + 1)]);
    }
}

/// Row `r`'s Q6_K super-block in its tile block `out` (Q6K_TILE bytes): 16 d as
/// f32, 16 corrections C as i32, the sixteen i8 scales ([group][row], 256 bytes),
/// then each 32-value sub-block's values q − 32 as signed bytes (512 bytes each).
/// The kernel multiplies them by the activations plus 128 (`vpdpbusd` takes one
/// unsigned operand), which adds 128·Σ(q − 32) per group: C = 128·Σ_g sc_g·Σ(q − 32)
/// is taken off once per super-block.
fn pack_q6k(blk: &[u8], r: usize, out: &mut [u8]) {
    let d = f16::from_le_bytes([blk[208], blk[209]]).to_f32();
    let q = q6k_values(blk);
    let mut c = 0i32;
    for g in 0..SUPER / 16 {
        let sc = blk[192 + g] as i8;
        out[128 + 16 * g + r] = sc as u8;
        let sum: i32 = q[16 * g..16 * (g + 1)].iter().map(|v| i32::from(*v)).sum();
        c += 128 * i32::from(sc) * sum;
    }
    out[4 * r..4 * r + 4].copy_from_slice(&d.to_le_bytes());
    out[64 + 4 * r..64 + 4 * r + 4].copy_from_slice(&c.to_le_bytes());
    for (j, sub) in q.chunks_exact(BLOCK).enumerate() {
        let bytes: Vec<u8> = sub.iter().map(|v| *v as u8).collect();
        put_bytes(&bytes, r, &mut out[384 + 512 * j..384 + 512 * (j + 1)]);
    }
}

/// Weight rows per tile of the int8 GEMM (one AVX-512 register of i32 / f32 lanes).
const TILE: usize = 16;
/// Activation rows per pass over a tile (their accumulators stay in registers).
const TILE_ROWS: usize = 8;

/// Bytes per tile and block (32 values; 256 for the k-quants).
const fn tile_bytes(kind: Kind) -> usize {
    match kind {
        // 16 scales, 16 offsets, the values.
        Kind::Q41 => 128 + 256,
        Kind::Q80 => 128 + 512,
        Kind::Q4K => Q4K_TILE,
        Kind::Q6K => Q6K_TILE,
    }
}

/// Bytes per tile and Q4_K super-block: d, dmin, scales, mins, 8 × 256 of nibbles.
const Q4K_TILE: usize = 384 + 8 * 256;
/// Bytes per tile and Q6_K super-block: d, C, 16 × 16 scales, 8 × 512 of bytes.
const Q6K_TILE: usize = 384 + 8 * 512;

/// Whether the int8 GEMM runs here: AVX-512 with VNNI, and not turned off
/// (RAGCHAT_INT8_GEMM=0, for measurements).
pub fn int8_gemm() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("RAGCHAT_INT8_GEMM").map_or(true, |v| v != "0")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// From this many activation rows on, a tiled matrix uses the int8 GEMM; fewer
/// rows read the GGUF layout with the AVX2 kernels. 1 by default: the tiles
/// measured faster for every batch, single-stream decode included (SmolLM2 Q4_1:
/// 80 → 115 tok/s for 1 sequence, 176 → 330 for 8), so the GGUF copy is dropped.
/// RAGCHAT_TILE_MIN_ROWS overrides it, for measurements (above 1 the copy is kept).
fn tile_min_rows() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("RAGCHAT_TILE_MIN_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
    })
}

/// One tile (16 weight rows) against `R` activation rows: per block, eight
/// `vpdpbusd` per row sum the block in integers, then one conversion and two
/// multiply-adds in f32 (d·d8·Σ and m·s8). Writes R rows of 16 outputs,
/// `stride` apart.
///
/// # Safety
/// AVX-512 F, BW and VNNI; `tile` holds `nb` blocks; `ys` has R rows; `out`
/// has room for R rows of 16 at `stride`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_dot<const R: usize, const NIB: bool>(
    tile: *const u8,
    nb: usize,
    ys: &[ActRow<'_>],
    out: SyncPtr,
    stride: usize,
    bias: *const f32,
) {
    use std::arch::x86_64::*;
    debug_assert!(ys.len() >= R);
    let tb = tile_bytes(if NIB { Kind::Q41 } else { Kind::Q80 });
    let mut acc = [start(bias); R];
    for k in 0..nb {
        let base = tile.add(k * tb);
        let dw = _mm512_loadu_ps(base as *const f32);
        let mw = _mm512_loadu_ps(base.add(64) as *const f32);
        let mut w = [_mm512_setzero_si512(); 8];
        if NIB {
            w = unpack_nibbles(base.add(128));
        } else {
            for (g, wg) in w.iter_mut().enumerate() {
                *wg = _mm512_loadu_si512(base.add(128 + 64 * g) as *const __m512i);
            }
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let y = ys.get_unchecked(r);
            let q = y.q.as_ptr().add(k * BLOCK) as *const i32;
            let mut isum = _mm512_setzero_si512();
            for (g, wg) in w.iter().enumerate() {
                isum = _mm512_dpbusd_epi32(isum, *wg, _mm512_set1_epi32(q.add(g).read_unaligned()));
            }
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*y.d.get_unchecked(k)));
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *a);
            *a = _mm512_fmadd_ps(mw, _mm512_set1_ps(*y.s.get_unchecked(k)), *a);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add(r * stride), *a);
    }
}

/// Eight vectors of 64 unsigned bytes from 256 bytes of nibbles (see [`put_nibbles`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_nibbles(p: *const u8) -> [std::arch::x86_64::__m512i; 8] {
    use std::arch::x86_64::*;
    let mask = _mm512_set1_epi8(0x0F);
    let mut w = [_mm512_setzero_si512(); 8];
    for j in 0..4 {
        let v = _mm512_loadu_si512(p.add(64 * j) as *const __m512i);
        w[j] = _mm512_and_si512(v, mask);
        w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    }
    w
}

/// One tile against `R` activation rows for Q4_K, `nsb` super-blocks: per
/// 32-value sub-block eight `vpdpbusd` per row, the sum times the sub-block's
/// scale added in integers (and the mins' dot with the activations' sums per 32),
/// one conversion per super-block: d·d8·Σ − dmin·d8·Σmins.
///
/// # Safety
/// As [`tile_dot`]; the activations carry their 256-value blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_dot_q4k<const R: usize>(
    tile: *const u8,
    nsb: usize,
    ys: &[ActRow<'_>],
    out: SyncPtr,
    stride: usize,
    bias: *const f32,
) {
    use std::arch::x86_64::*;
    debug_assert!(ys.len() >= R);
    let mut acc = [start(bias); R];
    for sb in 0..nsb {
        let base = tile.add(sb * Q4K_TILE);
        let mut isum = [_mm512_setzero_si512(); R];
        let mut msum = [_mm512_setzero_si512(); R];
        for j in 0..8 {
            let sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(base.add(128 + 16 * j) as *const __m128i));
            let mn = _mm512_cvtepu8_epi32(_mm_loadu_si128(base.add(256 + 16 * j) as *const __m128i));
            let w = unpack_nibbles(base.add(384 + 256 * j));
            for r in 0..R {
                let y = ys.get_unchecked(r);
                let q = y.kq.as_ptr().add(sb * SUPER + j * BLOCK) as *const i32;
                let mut s = _mm512_setzero_si512();
                for (g, wg) in w.iter().enumerate() {
                    s = _mm512_dpbusd_epi32(s, *wg, _mm512_set1_epi32(q.add(g).read_unaligned()));
                }
                isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(s, sc));
                let ysum = _mm512_set1_epi32(*y.ks.get_unchecked(sb * 8 + j));
                msum[r] = _mm512_add_epi32(msum[r], _mm512_mullo_epi32(mn, ysum));
            }
        }
        let d = _mm512_loadu_ps(base as *const f32);
        let dmin = _mm512_loadu_ps(base.add(64) as *const f32);
        for r in 0..R {
            let d8 = _mm512_set1_ps(*ys.get_unchecked(r).kd.get_unchecked(sb));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_mul_ps(d, d8), acc[r]);
            acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[r]), _mm512_mul_ps(dmin, d8), acc[r]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add(r * stride), *a);
    }
}

/// One tile against `R` activation rows for Q6_K: the values q − 32 as the
/// signed operand, the activations plus 128 (their sign bit flipped) as the
/// unsigned one; per 16-value group its own sum times its scale, added in
/// integers; less the packed correction C, one conversion per super-block.
///
/// # Safety
/// As [`tile_dot`]; the activations carry their 256-value blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_dot_q6k<const R: usize>(
    tile: *const u8,
    nsb: usize,
    ys: &[ActRow<'_>],
    out: SyncPtr,
    stride: usize,
    bias: *const f32,
) {
    use std::arch::x86_64::*;
    debug_assert!(ys.len() >= R);
    const FLIP: i32 = 0x8080_8080_u32 as i32;
    let mut acc = [start(bias); R];
    for sb in 0..nsb {
        let base = tile.add(sb * Q6K_TILE);
        let mut isum = [_mm512_setzero_si512(); R];
        for j in 0..8 {
            let sa = _mm512_cvtepi8_epi32(_mm_loadu_si128(base.add(128 + 32 * j) as *const __m128i));
            let sb16 = _mm512_cvtepi8_epi32(_mm_loadu_si128(base.add(144 + 32 * j) as *const __m128i));
            let mut w = [_mm512_setzero_si512(); 8];
            for (g, wg) in w.iter_mut().enumerate() {
                *wg = _mm512_loadu_si512(base.add(384 + 512 * j + 64 * g) as *const __m512i);
            }
            for (r, acc_r) in isum.iter_mut().enumerate() {
                let y = ys.get_unchecked(r);
                let q = y.kq.as_ptr().add(sb * SUPER + j * BLOCK) as *const i32;
                let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for g in 0..4 {
                    s0 = _mm512_dpbusd_epi32(s0, _mm512_set1_epi32(q.add(g).read_unaligned() ^ FLIP), w[g]);
                    s1 = _mm512_dpbusd_epi32(s1, _mm512_set1_epi32(q.add(g + 4).read_unaligned() ^ FLIP), w[g + 4]);
                }
                let both = _mm512_add_epi32(_mm512_mullo_epi32(s0, sa), _mm512_mullo_epi32(s1, sb16));
                *acc_r = _mm512_add_epi32(*acc_r, both);
            }
        }
        let d = _mm512_loadu_ps(base as *const f32);
        let c = _mm512_loadu_si512(base.add(64) as *const __m512i);
        for r in 0..R {
            let d8 = _mm512_set1_ps(*ys.get_unchecked(r).kd.get_unchecked(sb));
            let total = _mm512_cvtepi32_ps(_mm512_sub_epi32(isum[r], c));
            acc[r] = _mm512_fmadd_ps(total, _mm512_mul_ps(d, d8), acc[r]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add(r * stride), *a);
    }
}

fn dot_scalar(kind: Kind, row: &[u8], nb: usize, ys: &[ActRow<'_>], out: &mut [f32]) {
    let bb = kind.block_bytes();
    if matches!(kind, Kind::Q4K | Kind::Q6K) {
        return dot_scalar_k(kind, row, nb, ys, out);
    }
    for (y, o) in ys.iter().zip(out.iter_mut()) {
        let mut total = 0f32;
        for k in 0..nb {
            let blk = &row[k * bb..(k + 1) * bb];
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let qy = &y.q[k * BLOCK..(k + 1) * BLOCK];
            let mut isum = 0i32;
            match kind {
                Kind::Q41 => {
                    for j in 0..16 {
                        isum += i32::from(blk[4 + j] & 0x0F) * i32::from(qy[j]);
                        isum += i32::from(blk[4 + j] >> 4) * i32::from(qy[j + 16]);
                    }
                    let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    total += m * y.s[k];
                }
                Kind::Q80 => {
                    for j in 0..BLOCK {
                        isum += i32::from(blk[2 + j] as i8) * i32::from(qy[j]);
                    }
                }
                Kind::Q4K | Kind::Q6K => {}
            }
            total += d * y.d[k] * isum as f32;
        }
        *o = total;
    }
}

/// The scalar reference for the k-quants (`nb` activation blocks of 32), on the
/// 256-value activation blocks: integer sums per super-block, one conversion.
fn dot_scalar_k(kind: Kind, row: &[u8], nb: usize, ys: &[ActRow<'_>], out: &mut [f32]) {
    let bb = kind.block_bytes();
    let per = SUPER / BLOCK;
    for (y, o) in ys.iter().zip(out.iter_mut()) {
        let mut total = 0f32;
        for sb in 0..nb / per {
            let blk = &row[sb * bb..(sb + 1) * bb];
            let qy = &y.kq[sb * SUPER..(sb + 1) * SUPER];
            let d8 = y.kd[sb];
            match kind {
                Kind::Q4K => {
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    let dmin = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    let (sc, m) = q4k_scales(&blk[4..16]);
                    let q = q4k_values(blk);
                    let (mut isum, mut msum) = (0i32, 0i32);
                    for i in 0..per {
                        let dot: i32 = (0..BLOCK)
                            .map(|j| i32::from(q[i * BLOCK + j]) * i32::from(qy[i * BLOCK + j]))
                            .sum();
                        isum += i32::from(sc[i]) * dot;
                        msum += i32::from(m[i]) * y.ks[sb * per + i];
                    }
                    total += d * d8 * isum as f32 - dmin * d8 * msum as f32;
                }
                _ => {
                    let d = f16::from_le_bytes([blk[208], blk[209]]).to_f32();
                    let q = q6k_values(blk);
                    let isum: i32 = (0..SUPER / 16)
                        .map(|g| {
                            let dot: i32 = (0..16)
                                .map(|j| i32::from(q[g * 16 + j]) * i32::from(qy[g * 16 + j]))
                                .sum();
                            dot * i32::from(blk[192 + g] as i8)
                        })
                        .sum();
                    total += d * d8 * isum as f32;
                }
            }
        }
        *o = total;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    _mm_cvtss_f32(s1)
}

/// Dot products of one weight row with `N` activation rows. The accumulators
/// stay in registers (N is a constant); with one or two rows, even and odd blocks
/// go to separate accumulators so that consecutive blocks do not wait on each
/// other's multiply-add.
macro_rules! dot_kernel {
    ($name:ident, $bytes:expr, |$blk:ident, $y:ident, $k:ident| $block:expr) => {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $name<const N: usize>(row: &[u8], nb: usize, ys: &[ActRow<'_>], out: &mut [f32]) {
            use std::arch::x86_64::*;
            debug_assert!(ys.len() >= N && out.len() >= N && row.len() >= nb * $bytes);
            let mut acc0 = [_mm256_setzero_ps(); N];
            let mut acc1 = [_mm256_setzero_ps(); N];
            let mut mins0 = [0f32; N];
            let mut mins1 = [0f32; N];
            macro_rules! step {
                ($kk:expr, $acc:ident, $mins:ident) => {{
                    let $k = $kk;
                    let $blk = row.as_ptr().add($k * $bytes);
                    _mm_prefetch::<_MM_HINT_T0>($blk.wrapping_add(PREFETCH) as *const i8);
                    for i in 0..N {
                        let $y = ys.get_unchecked(i);
                        let (v, m): (__m256, f32) = $block;
                        $acc[i] = _mm256_add_ps($acc[i], v);
                        $mins[i] += m;
                    }
                }};
            }
            let mut k = 0;
            if N <= 2 {
                while k + 1 < nb {
                    step!(k, acc0, mins0);
                    step!(k + 1, acc1, mins1);
                    k += 2;
                }
            }
            while k < nb {
                step!(k, acc0, mins0);
                k += 1;
            }
            for i in 0..N {
                out[i] = hsum(_mm256_add_ps(acc0[i], acc1[i])) + mins0[i] + mins1[i];
            }
        }
    };
}

// Q4_1: 16 bytes of nibbles → 32 bytes (values 0..15 in the low lane, 16..31 in
// the high), d·d8·Σ(q4·q8) as a vector and m·s8 as the scalar part.
dot_kernel!(q41_dot_avx2, 20, |blk, y, k| {
    let d = f16::from_le_bytes([*blk, *blk.add(1)]).to_f32();
    let m = f16::from_le_bytes([*blk.add(2), *blk.add(3)]).to_f32();
    let packed = _mm_loadu_si128(blk.add(4) as *const __m128i);
    let q4 = _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
        _mm256_set1_epi8(0x0F),
    );
    let qy = _mm256_loadu_si256(y.q.as_ptr().add(k * BLOCK) as *const __m256i);
    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q4, qy), _mm256_set1_epi16(1)));
    (
        _mm256_mul_ps(_mm256_set1_ps(d * *y.d.get_unchecked(k)), sums),
        m * *y.s.get_unchecked(k),
    )
});

// Q8_0: maddubs multiplies unsigned by signed, so the weights' signs move onto y.
dot_kernel!(q80_dot_avx2, 34, |blk, y, k| {
    let d = f16::from_le_bytes([*blk, *blk.add(1)]).to_f32();
    let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
    let qy = _mm256_loadu_si256(y.q.as_ptr().add(k * BLOCK) as *const __m256i);
    let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(qy, w));
    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    (_mm256_mul_ps(_mm256_set1_ps(d * *y.d.get_unchecked(k)), sums), 0.0)
});

// Q4_K against 256-value activation blocks: per 64 values, 32 bytes of nibbles
// (the low nibbles are sub-block 2j, the high 2j + 1); each sub-block's pair sums
// are weighted by its 6-bit scale in the same `madd` and summed as integers over
// the super-block, converted once; the mins (an integer dot of the eight mins with
// the activations' sums per 32) go to the scalar part.
dot_kernel!(q4k_dot_avx2, 144, |blk, y, k| {
    let d = f16::from_le_bytes([*blk, *blk.add(1)]).to_f32();
    let dmin = f16::from_le_bytes([*blk.add(2), *blk.add(3)]).to_f32();
    let (sc, m) = q4k_scales(std::slice::from_raw_parts(blk.add(4), 12));
    let d8 = *y.kd.get_unchecked(k);
    let qy = y.kq.as_ptr().add(k * SUPER);
    let mask = _mm256_set1_epi8(0x0F);
    let mut isum = _mm256_setzero_si256();
    for j in 0..4 {
        let packed = _mm256_loadu_si256(blk.add(16 + j * 32) as *const __m256i);
        let lo = _mm256_and_si256(packed, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
        let y0 = _mm256_loadu_si256(qy.add(j * 64) as *const __m256i);
        let y1 = _mm256_loadu_si256(qy.add(j * 64 + 32) as *const __m256i);
        let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), _mm256_set1_epi16(i16::from(sc[2 * j])));
        let p1 = _mm256_madd_epi16(
            _mm256_maddubs_epi16(hi, y1),
            _mm256_set1_epi16(i16::from(sc[2 * j + 1])),
        );
        isum = _mm256_add_epi32(isum, _mm256_add_epi32(p0, p1));
    }
    let sums = y.ks.get_unchecked(k * 8..k * 8 + 8);
    let mins: i32 = m.iter().zip(sums).map(|(m, s)| i32::from(*m) * s).sum();
    (
        _mm256_mul_ps(_mm256_set1_ps(d * d8), _mm256_cvtepi32_ps(isum)),
        -dmin * d8 * mins as f32,
    )
});

// Q6_K against 256-value activation blocks: per 128 values, 64 bytes of low
// nibbles and 32 of high bit pairs make four 32-value blocks of 6-bit values; less
// 32 they are signed, and the sign trick of Q8_0 applies. Each 16 values have their
// own scale: `madd` with a vector of the two (the low 128 bits hold the first 16
// values' pair sums); integer sums over the super-block, converted once.
dot_kernel!(q6k_dot_avx2, 210, |blk, y, k| {
    let d = f16::from_le_bytes([*blk.add(208), *blk.add(209)]).to_f32();
    let d8 = *y.kd.get_unchecked(k);
    let qy = y.kq.as_ptr().add(k * SUPER);
    let mask = _mm256_set1_epi8(0x0F);
    let three = _mm256_set1_epi8(3);
    let m32 = _mm256_set1_epi8(32);
    let mut isum = _mm256_setzero_si256();
    for n in 0..2 {
        let ql0 = _mm256_loadu_si256(blk.add(n * 64) as *const __m256i);
        let ql1 = _mm256_loadu_si256(blk.add(n * 64 + 32) as *const __m256i);
        let qh = _mm256_loadu_si256(blk.add(128 + n * 32) as *const __m256i);
        // Bit pairs 0-1, 2-3, 4-5, 6-7 of qh, moved to bits 4-5.
        let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, three), 4);
        let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), three), 4);
        let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), three), 4);
        let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), three), 4);
        let quads = [
            _mm256_or_si256(_mm256_and_si256(ql0, mask), h0),
            _mm256_or_si256(_mm256_and_si256(ql1, mask), h1),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), mask), h2),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), mask), h3),
        ];
        for (i, q) in quads.into_iter().enumerate() {
            let b = n * 4 + i;
            let w = _mm256_sub_epi8(q, m32);
            let yv = _mm256_loadu_si256(qy.add(b * BLOCK) as *const __m256i);
            let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(yv, w));
            let sa = i16::from(*blk.add(192 + 2 * b) as i8);
            let sb = i16::from(*blk.add(192 + 2 * b + 1) as i8);
            let scales = _mm256_set_m128i(_mm_set1_epi16(sb), _mm_set1_epi16(sa));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(pairs, scales));
        }
    }
    (_mm256_mul_ps(_mm256_set1_ps(d * d8), _mm256_cvtepi32_ps(isum)), 0.0)
});

/// # Safety
/// AVX2 and FMA must be available; `ys.len()` and `out.len()` at most GROUP.
unsafe fn dot_avx2(kind: Kind, row: &[u8], nb: usize, ys: &[ActRow<'_>], out: &mut [f32]) {
    macro_rules! by_rows {
        ($f:ident, $nb:expr) => {
            match ys.len() {
                1 => $f::<1>(row, $nb, ys, out),
                2 => $f::<2>(row, $nb, ys, out),
                3 => $f::<3>(row, $nb, ys, out),
                _ => $f::<4>(row, $nb, ys, out),
            }
        };
    }
    match kind {
        Kind::Q41 => by_rows!(q41_dot_avx2, nb),
        Kind::Q80 => by_rows!(q80_dot_avx2, nb),
        // The k-quant kernels step over super-blocks.
        Kind::Q4K => by_rows!(q4k_dot_avx2, nb / (SUPER / BLOCK)),
        Kind::Q6K => by_rows!(q6k_dot_avx2, nb / (SUPER / BLOCK)),
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

    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect()
    }

    /// `m`'s products against its dequantized weights `deq`, for 1, 3, 8 and 11
    /// activation rows on 1 and 3 threads: within 2% of `size(want, Σ|terms|)`.
    fn assert_products_match(m: &QMat, deq: &[f32], size: impl Fn(f32, f32) -> f32) {
        let (rows, cols) = (m.rows(), m.cols());
        for threads in [1, 3] {
            let pool = Pool::new(threads);
            for b in [1, 3, 8, 11] {
                let x: Vec<f32> = (0..b * cols).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
                let mut y = vec![0f32; b * rows];
                m.matmul(&Q8Acts::quantize(&x, cols, true), &mut y, &pool);
                for bi in 0..b {
                    for r in 0..rows {
                        let terms = (0..cols).map(|k| deq[r * cols + k] * x[bi * cols + k]);
                        let want: f32 = terms.clone().sum();
                        let got = y[bi * rows + r];
                        // Q8 activations: ~1% error, as in ggml.
                        let size = size(want, terms.map(f32::abs).sum());
                        assert!(
                            (want - got).abs() < 0.02 * (1.0 + size),
                            "{:?} b={b} ({bi},{r}): {got} vs {want}",
                            m.kind()
                        );
                    }
                }
            }
        }
    }

    /// The AVX-512 activation quantizer gives the scalar loop's blocks bit for bit
    /// (zeros, ties, outliers), and the pool and rayon split the rows the same.
    #[test]
    fn vector_quantizer_equals_the_scalar_loop() {
        if !int8_gemm() {
            eprintln!("no AVX-512 here: the scalar loop is the only quantizer");
            return;
        }
        let cols = 96;
        let mut x: Vec<f32> = (0..70 * cols)
            .map(|i| (((i * 7919) % 1013) as f32 / 37.0 - 13.0) * if i % 97 == 0 { 50.0 } else { 1.0 })
            .collect();
        x[..BLOCK].fill(0.0);
        x[BLOCK..2 * BLOCK]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32 - 15.5);
        let got = Q8Acts::quantize(&x, cols, false);
        let (mut d, mut sums, mut q) = (Vec::new(), Vec::new(), Vec::new());
        for blk in x.chunks_exact(BLOCK) {
            let (bd, id) = scale_of(blk);
            let mut qb = [0i8; BLOCK];
            let sum = quantize_block(blk, id, &mut qb);
            q.extend(qb);
            d.push(bd);
            sums.push(bd * sum as f32);
        }
        assert_eq!((&got.d, &got.s, &got.q), (&d, &sums, &q));
        for other in [
            Q8Acts::quantize_on(&x, cols, false, Some(&Pool::new(3))),
            Q8Acts::quantize_rayon(&x, cols, false),
        ] {
            assert_eq!((other.b, &other.d, &other.s, &other.q), (70, &d, &sums, &q));
        }
        // With the 256-value blocks (k-quants): every split gives the same rows.
        let cols = 512;
        let x: Vec<f32> = (0..40 * cols)
            .map(|i| ((i * 7919) % 1013) as f32 / 37.0 - 13.0)
            .collect();
        let x = &x[..];
        let one = Q8Acts::quantize(x, cols, true);
        assert_eq!((one.kd.len(), one.ks.len(), one.kq.len()), (80, 640, x.len()));
        for other in [
            Q8Acts::quantize_on(x, cols, true, Some(&Pool::new(3))),
            Q8Acts::quantize_rayon(x, cols, true),
        ] {
            assert_eq!(
                (&other.d, &other.s, &other.q, &other.kd, &other.ks, &other.kq),
                (&one.d, &one.s, &one.q, &one.kd, &one.ks, &one.kq)
            );
        }
    }

    #[test]
    fn products_match_the_dequantized_weights_for_any_batch_and_thread_count() {
        let (rows, cols) = (70, 96);
        let w = weights(rows, cols);
        for kind in [Kind::Q41, Kind::Q80] {
            let raw: Vec<u8> = w
                .chunks(cols)
                .flat_map(|r| match kind {
                    Kind::Q41 => quantize_q4_1(r),
                    Kind::Q80 => quantize_q8_0(r),
                    other => panic!("{other:?}: see the k-quant test"),
                })
                .collect();
            let m = QMat::new(kind, raw, rows, cols).expect("shape");
            let mut deq = vec![0f32; rows * cols];
            for (r, out) in deq.chunks_mut(cols).enumerate() {
                m.dequantize_row(r, out);
            }
            assert_products_match(&m, &deq, |want, _| want.abs());
        }
    }

    /// A product of more activation rows than one chunk of the int8 GEMM holds,
    /// with a bias, on every kind of thread: the GGUF-layout kernels' result plus
    /// the bias.
    #[test]
    fn biased_products_over_many_rows_equal_the_row_kernels() {
        if !int8_gemm() {
            eprintln!("no AVX-512 VNNI here: the int8 GEMM is not used");
            return;
        }
        let (rows, cols, b) = (48, 1024, 300);
        assert!(b > CHUNK_BYTES / cols, "more than one chunk");
        let raw = quantize_q8_0(&weights(rows, cols));
        let plain = QMat::new(Kind::Q80, raw.clone(), rows, cols).expect("shape");
        let mut tiled = QMat::new(Kind::Q80, raw, rows, cols).expect("shape");
        assert!(tiled.tile());
        let x: Vec<f32> = (0..b * cols).map(|i| ((i * 37) % 23) as f32 / 11.0 - 1.0).collect();
        let bias: Vec<f32> = (0..rows).map(|r| r as f32 - 20.0).collect();
        let acts = Q8Acts::quantize(&x, cols, false);
        let mut want = vec![0f32; b * rows];
        plain.product(&acts, &mut want, None, On::Caller);
        want.chunks_exact_mut(rows)
            .for_each(|r| r.iter_mut().zip(&bias).for_each(|(v, b)| *v += b));
        let pool = Pool::new(3);
        for on in [On::Caller, On::Rayon, On::Pool(&pool)] {
            let mut got = vec![f32::NAN; b * rows];
            tiled.product(&acts, &mut got, Some(&bias), on);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-3 * (1.0 + w.abs()), "at {i}: {g} vs {w}");
            }
        }
    }

    /// The int8 GEMM on the repacked tiles gives the products of the GGUF-layout
    /// kernels (same integer sums, so equal up to float rounding) for every count
    /// of activation rows in and around a pass (1..=19) and 1 to 3 threads.
    #[test]
    fn tiled_products_equal_the_row_kernels_for_any_batch_and_thread_count() {
        if !int8_gemm() {
            eprintln!("no AVX-512 VNNI here: the int8 GEMM is not used");
            return;
        }
        for kind in [Kind::Q41, Kind::Q80, Kind::Q4K, Kind::Q6K] {
            let k = matches!(kind, Kind::Q4K | Kind::Q6K);
            let (rows, cols) = (48, if k { 512 } else { 96 });
            let w = weights(rows, cols);
            let raw: Vec<u8> = match kind {
                Kind::Q41 => w.chunks(cols).flat_map(quantize_q4_1).collect(),
                Kind::Q80 => w.chunks(cols).flat_map(quantize_q8_0).collect(),
                _ => k_quantized(kind, &w, rows, cols).0,
            };
            let plain = QMat::new(kind, raw.clone(), rows, cols).expect("shape");
            let mut tiled = QMat::new(kind, raw, rows, cols).expect("shape");
            assert!(tiled.tile(), "{kind:?} tiles");
            assert!(!plain.tiled() && tiled.tiled());
            for threads in [1, 2, 3] {
                let pool = Pool::new(threads);
                for b in 1..20 {
                    let x: Vec<f32> = (0..b * cols).map(|i| ((i * 37) % 23) as f32 / 11.0 - 1.0).collect();
                    let acts = Q8Acts::quantize(&x, cols, k);
                    let mut want = vec![0f32; b * rows];
                    plain.matmul(&acts, &mut want, &pool);
                    let mut got = vec![f32::NAN; b * rows];
                    let ptr = SyncPtr(got.as_mut_ptr());
                    let tiles = tiled.tiles.as_deref().expect("tiles");
                    pool.run(&|t| {
                        let range = share(rows, threads, t, TILE);
                        // SAFETY: VNNI checked above; each thread writes its own tiles' columns.
                        unsafe { tiled.tiles_into(tiles, &acts, range, ptr, None) }
                    });
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                            "{kind:?} threads={threads} b={b} at {i}: {g} vs {w}"
                        );
                    }
                    // And through `matmul`, which takes the tiles from 16 rows on.
                    let mut again = vec![0f32; b * rows];
                    tiled.matmul(&acts, &mut again, &pool);
                    if b >= tile_min_rows() {
                        assert_eq!(again, got, "{kind:?} threads={threads} b={b}: matmul took the tiles");
                    }
                }
            }
        }
    }

    #[test]
    fn a_matrix_is_tiled_only_in_the_layouts_and_shapes_the_kernel_takes() {
        let cols = 64;
        let w = weights(40, cols);
        let q41 = |rows: usize| {
            w[..rows * cols]
                .chunks(cols)
                .flat_map(quantize_q4_1)
                .collect::<Vec<u8>>()
        };
        // 40 rows are not whole tiles of 16.
        assert!(!QMat::new(Kind::Q41, q41(40), 40, cols).expect("shape").tile());
        assert_eq!(
            QMat::new(Kind::Q41, q41(32), 32, cols).expect("shape").tile(),
            int8_gemm()
        );
    }

    #[test]
    fn simd_and_scalar_paths_agree() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let cols = 128;
        let w: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let x: Vec<f32> = (0..GROUP * cols).map(|i| (i as f32 * 0.11).cos()).collect();
        let acts = Q8Acts::quantize(&x, cols, true);
        let ys: Vec<ActRow<'_>> = (0..GROUP).map(|i| acts.row(i)).collect();
        for n in 1..=GROUP {
            let ys = &ys[..n];
            for (kind, row) in [(Kind::Q41, quantize_q4_1(&w)), (Kind::Q80, quantize_q8_0(&w))] {
                let (mut a, mut b) = ([0f32; GROUP], [0f32; GROUP]);
                dot_scalar(kind, &row, cols / BLOCK, ys, &mut a);
                // SAFETY: checked above.
                unsafe { dot_avx2(kind, &row, cols / BLOCK, ys, &mut b) };
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() < 1e-4 * (1.0 + x.abs()), "{kind:?} n={n}: {x} vs {y}");
                }
            }
        }
    }

    /// Q4_K / Q6_K bytes as candle (ggml's reference quantizer) writes them, and
    /// candle's dequantization of them.
    fn k_quantized(kind: Kind, w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let dtype = match kind {
            Kind::Q4K => GgmlDType::Q4K,
            _ => GgmlDType::Q6K,
        };
        let t = Tensor::from_vec(w.to_vec(), (rows, cols), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        let deq = q
            .dequantize(&Device::Cpu)
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.to_vec1::<f32>())
            .expect("dequantize");
        (q.data().expect("data").into_owned(), deq)
    }

    /// The k-quants: our reading of the blocks equals candle's, and products at
    /// any batch and thread count, SIMD and scalar, match the dequantized weights.
    #[test]
    fn k_quant_products_match_candles_dequantized_weights() {
        let (rows, cols) = (37, 512);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32) * 0.7331).sin() * (1.0 + (i % 7) as f32))
            .collect();
        for kind in [Kind::Q4K, Kind::Q6K] {
            let (raw, want_deq) = k_quantized(kind, &w, rows, cols);
            let m = QMat::new(kind, raw.clone(), rows, cols).expect("shape");
            let mut deq = vec![0f32; rows * cols];
            for (r, out) in deq.chunks_mut(cols).enumerate() {
                m.dequantize_row(r, out);
            }
            for (i, (a, b)) in deq.iter().zip(&want_deq).enumerate() {
                assert!(
                    (a - b).abs() < 1e-5 * (1.0 + b.abs()),
                    "{kind:?} value {i}: {a} vs candle {b}"
                );
            }
            // Wider blocks of activations (one scale per 256): the error is relative
            // to the sum of the terms' sizes.
            assert_products_match(&m, &deq, |_, terms| terms);
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                let x: Vec<f32> = (0..GROUP * cols).map(|i| (i as f32 * 0.11).cos()).collect();
                let acts = Q8Acts::quantize(&x, cols, true);
                let ys: Vec<ActRow<'_>> = (0..GROUP).map(|i| acts.row(i)).collect();
                let row = &raw[..m.stride()];
                for n in 1..=GROUP {
                    let (mut a, mut b) = ([0f32; GROUP], [0f32; GROUP]);
                    dot_scalar(kind, row, cols / BLOCK, &ys[..n], &mut a);
                    // SAFETY: checked above.
                    unsafe { dot_avx2(kind, row, cols / BLOCK, &ys[..n], &mut b) };
                    for (x, y) in a.iter().zip(&b) {
                        assert!((x - y).abs() < 1e-4 * (1.0 + x.abs()), "{kind:?} n={n}: {x} vs {y}");
                    }
                }
            }
        }
    }

    #[test]
    fn stacking_keeps_rows_in_order() {
        let cols = 64;
        let a = QMat::new(Kind::Q80, quantize_q8_0(&weights(2, cols)), 2, cols).expect("a");
        let b = QMat::new(Kind::Q80, quantize_q8_0(&weights(3, cols)[..cols]), 1, cols).expect("b");
        let s = QMat::stack(vec![a, b]).expect("stack");
        assert_eq!(s.rows(), 3);
        let (mut r0, mut r2) = (vec![0f32; cols], vec![0f32; cols]);
        s.dequantize_row(0, &mut r0);
        s.dequantize_row(2, &mut r2);
        assert_eq!(r0, r2, "row 2 is b's first row, the same weights as a's first");
        assert!(QMat::stack(vec![]).is_none());
    }
}
