//! The llama forward on plain slices, for decode steps and short inputs: no
//! tensors, no allocation per operation, q/k/v and gate/up fused into one product
//! each, our quantized kernels ([`super::qmat`]) and one persistent thread pool
//! ([`super::pool`]). A step of B rows (one per sequence when decoding, or several
//! consecutive positions of one sequence) costs four products per layer plus the
//! output head. Used when every linear layer is Q4_1, Q8_0, Q4_K or Q6_K (the
//! development model, the official Qwen3 GGUFs, Q4_K_M files); other GGUF types keep the tensor path in
//! [`super::llama`]. Qwen3's extras: an RMSNorm over each query and key head
//! before RoPE, heads whose total width differs from the residual width, and the
//! NEOX rotation (dimension i with i + head_dim/2, not 2i with 2i + 1).

use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};

use super::pool::{Pool, SyncPtr};
use super::qmat::{Kind, Q8Acts, QMat};
use super::{exp_in_place, lane_max};

/// One layer's KV cache of one sequence, laid out [position][kv head][head dim]
/// so a step appends rows and reads each head with a fixed stride.
#[derive(Default, Clone)]
pub struct KvBuf {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Projections computed as one product: stacked into one matrix when their
/// block types agree, else run one after the other into the same output rows
/// (Q4_K_M files keep attn_v in Q6_K beside Q4_K q and k).
enum Fused {
    One(QMat),
    Parts(Vec<QMat>),
}

impl Fused {
    fn new(parts: Vec<QMat>) -> Option<Fused> {
        let first = parts.first()?;
        let cols = first.cols();
        if parts.iter().any(|p| p.cols() != cols) {
            return None;
        }
        if parts.iter().all(|p| p.kind() == first.kind()) {
            QMat::stack(parts).map(Fused::One)
        } else {
            Some(Fused::Parts(parts))
        }
    }

    /// Repacks for the int8 GEMM ([`QMat::tile`]); whether every part was.
    fn tile(&mut self) -> bool {
        match self {
            Fused::One(m) => m.tile(),
            Fused::Parts(ps) => {
                let mut all = true;
                for p in ps {
                    all &= p.tile();
                }
                all
            }
        }
    }

    fn k_blocks(&self) -> bool {
        match self {
            Fused::One(m) => m.k_blocks(),
            Fused::Parts(ps) => ps.iter().any(QMat::k_blocks),
        }
    }

    fn rows(&self) -> usize {
        match self {
            Fused::One(m) => m.rows(),
            Fused::Parts(ps) => ps.iter().map(QMat::rows).sum(),
        }
    }

    fn matmul(&self, x: &Q8Acts, out: &mut [f32], pool: &Pool) {
        match self {
            Fused::One(m) => m.matmul(x, out, pool),
            Fused::Parts(ps) => {
                let total = self.rows();
                let b = out.len() / total;
                let mut at = 0;
                for p in ps {
                    let n = p.rows();
                    let mut part = vec![0f32; b * n];
                    p.matmul(x, &mut part, pool);
                    for (r, src) in part.chunks_exact(n).enumerate() {
                        out[r * total + at..r * total + at + n].copy_from_slice(src);
                    }
                    at += n;
                }
            }
        }
    }
}

pub struct FastLayer {
    qkv: Fused,
    o: QMat,
    gate_up: Fused,
    down: QMat,
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
}

pub struct FastWeights {
    embed: QMat,
    /// None when the output head is tied to the embeddings.
    output: Option<QMat>,
    layers: Vec<FastLayer>,
    norm: Vec<f32>,
    /// The residual width.
    hidden: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    eps: f32,
    neox: bool,
    /// RoPE tables, (position, head_dim / 2).
    cos: Vec<f32>,
    sin: Vec<f32>,
    pool: Pool,
    /// Every layer's products of many rows run on the int8 GEMM, so prefill is
    /// fastest here rather than on f32 copies of the weights.
    int8_prefill: bool,
}

/// The kernel for a GGUF tensor, if we have one.
pub fn qmat(t: &QTensor) -> Option<QMat> {
    let kind = match t.dtype() {
        GgmlDType::Q4_1 => Kind::Q41,
        GgmlDType::Q8_0 => Kind::Q80,
        GgmlDType::Q4K => Kind::Q4K,
        GgmlDType::Q6K => Kind::Q6K,
        _ => return None,
    };
    match t.shape().dims() {
        &[rows, cols] => QMat::new(kind, t.data().ok()?.into_owned(), rows, cols),
        _ => None,
    }
}

pub fn f32_vec(t: &QTensor) -> Option<Vec<f32>> {
    t.dequantize(&candle_core::Device::Cpu)
        .and_then(|x| x.flatten_all())
        .and_then(|x| x.to_vec1::<f32>())
        .ok()
}

/// The tensors of one layer, as read from the GGUF.
pub struct LayerParts {
    pub q: QMat,
    pub k: QMat,
    pub v: QMat,
    pub o: QMat,
    pub gate: QMat,
    pub up: QMat,
    pub down: QMat,
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    /// Qwen3's per-head norms (head_dim weights each).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
}

pub struct Shape {
    /// The residual width (embedding length).
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub context_len: usize,
    pub freq_base: f32,
    /// Rotate halves (Qwen3) rather than adjacent pairs (llama GGUFs).
    pub neox: bool,
}

impl FastWeights {
    pub fn new(
        embed: QMat,
        output: Option<QMat>,
        layers: Vec<LayerParts>,
        norm: Vec<f32>,
        shape: Shape,
        threads: usize,
        int8: bool,
    ) -> Option<Self> {
        let hd = shape.head_dim;
        if !hd.is_multiple_of(2) || shape.n_kv_head == 0 || !shape.n_head.is_multiple_of(shape.n_kv_head) {
            return None;
        }
        // Rows of activations are quantized in blocks of 32.
        if !shape.hidden.is_multiple_of(32) || !(shape.n_head * hd).is_multiple_of(32) {
            return None;
        }
        let norm_ok = |n: &Option<Vec<f32>>| n.as_ref().is_none_or(|v| v.len() == hd);
        if layers.iter().any(|l| {
            !norm_ok(&l.q_norm)
                || !norm_ok(&l.k_norm)
                || l.q_norm.is_some() != l.k_norm.is_some()
                || l.q.cols() != shape.hidden
                || l.q.rows() != shape.n_head * hd
                || l.k.rows() != shape.n_kv_head * hd
                || l.v.rows() != shape.n_kv_head * hd
                || l.o.cols() != shape.n_head * hd
                || l.o.rows() != shape.hidden
        }) {
            return None;
        }
        let half = hd / 2;
        let mut cos = Vec::with_capacity(shape.context_len * half);
        let mut sin = Vec::with_capacity(shape.context_len * half);
        for p in 0..shape.context_len {
            for i in 0..half {
                let theta = 1.0 / shape.freq_base.powf((2 * i) as f32 / hd as f32);
                let a = p as f32 * theta;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let mut layers = layers
            .into_iter()
            .map(|l| {
                Some(FastLayer {
                    qkv: Fused::new(vec![l.q, l.k, l.v])?,
                    o: l.o,
                    gate_up: Fused::new(vec![l.gate, l.up])?,
                    down: l.down,
                    attn_norm: l.attn_norm,
                    ffn_norm: l.ffn_norm,
                    q_norm: l.q_norm,
                    k_norm: l.k_norm,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let int8_prefill = int8
            && layers.iter_mut().fold(true, |all, l| {
                let tiled = l.qkv.tile() & l.o.tile() & l.gate_up.tile() & l.down.tile();
                tiled && all
            });
        Some(FastWeights {
            embed,
            output,
            layers,
            norm,
            hidden: shape.hidden,
            n_head: shape.n_head,
            n_kv_head: shape.n_kv_head,
            head_dim: hd,
            eps: shape.eps,
            neox: shape.neox,
            cos,
            sin,
            pool: Pool::new(threads),
            int8_prefill,
        })
    }

    /// Whether prompts prefill fastest on this forward (the int8 GEMM, with
    /// AVX-512 VNNI) rather than on the tensor path's f32 copies.
    pub fn int8_prefill(&self) -> bool {
        self.int8_prefill
    }

    /// The width of all query heads together (the residual width for llama, not
    /// always for Qwen3).
    fn q_width(&self) -> usize {
        self.n_head * self.head_dim
    }

    fn rmsnorm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let mut out = x.to_vec();
        rmsnorm_rows(&mut out, w, self.eps);
        out
    }

    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = self.head_dim / 2;
        let (cos, sin) = (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
        for head in x.chunks_exact_mut(self.head_dim) {
            if self.neox {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = a * sin[i] + b * cos[i];
                }
            } else {
                for i in 0..half {
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * cos[i] - b * sin[i];
                    head[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            }
        }
    }

    /// Attention of query head `head` for consecutive positions of one sequence
    /// (rows `rows` of `qkv`, the first at position `first`), as two f32 GEMMs
    /// over the cache: scores = Q·Kᵀ against the keys up to the block's last
    /// position, a causal softmax per row, then P·V into `out` (the `att` rows).
    /// A prompt's attention is quadratic in its length; row by row it cost more
    /// than all of the prompt's products on the int8 GEMM.
    ///
    /// # Safety
    /// `out` must hold the rows' q_width floats each, written by no one else in
    /// this head's columns; `kv` must hold positions up to the block's last.
    #[allow(clippy::too_many_arguments)]
    unsafe fn attend_block(
        &self,
        qkv: &[f32],
        qkv_w: usize,
        rows: Range<usize>,
        head: usize,
        kv: &KvBuf,
        first: usize,
        scores: &mut Vec<f32>,
        out: SyncPtr,
    ) {
        let (hd, m) = (self.head_dim, rows.len());
        let row = self.n_kv_head * hd;
        let g = head / (self.n_head / self.n_kv_head);
        let len = first + m;
        assert!(
            kv.k.len() >= len * row && kv.v.len() >= len * row && qkv.len() >= rows.end * qkv_w,
            "attention shapes"
        );
        scores.clear();
        scores.resize(m * len, 0.0);
        // SAFETY: q rows, keys and values lie inside qkv and the cache (asserted
        // above); scores is m × len, row-major.
        gemm::gemm(
            m,
            len,
            hd,
            scores.as_mut_ptr(),
            1,
            len as isize,
            false,
            qkv.as_ptr().add(rows.start * qkv_w + head * hd),
            1,
            qkv_w as isize,
            kv.k.as_ptr().add(g * hd),
            row as isize,
            1,
            0.0,
            1.0 / (hd as f32).sqrt(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
        for (i, s) in scores.chunks_exact_mut(len).enumerate() {
            // Row i sees positions up to first + i.
            let (seen, ahead) = s.split_at_mut(first + i + 1);
            let inv = 1.0 / exp_in_place(seen, lane_max(seen));
            seen.iter_mut().for_each(|p| *p *= inv);
            ahead.fill(0.0);
        }
        let qw = self.q_width();
        // SAFETY: as above; the output rows are the caller's (see # Safety).
        gemm::gemm(
            m,
            hd,
            len,
            out.add(rows.start * qw + head * hd),
            1,
            qw as isize,
            false,
            scores.as_ptr(),
            1,
            len as isize,
            kv.v.as_ptr().add(g * hd),
            1,
            row as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }

    /// One step over `tokens[r]` at `positions[r]` of sequence `seq_of[r]` (rows of
    /// one sequence must come in position order). Fills the caches and returns the
    /// logits of the rows in `want`.
    pub fn forward(
        &self,
        caches: &mut [&mut Vec<KvBuf>],
        seq_of: &[usize],
        tokens: &[u32],
        positions: &[usize],
        want: &[usize],
    ) -> Result<Vec<Vec<f32>>, String> {
        let b = tokens.len();
        let h = self.hidden;
        let qw = self.q_width();
        let kv_row = self.n_kv_head * self.head_dim;
        let mut x = vec![0f32; b * h];
        for (r, t) in tokens.iter().enumerate() {
            if *t as usize >= self.embed.rows() {
                return Err(format!("token {t} is outside the vocabulary"));
            }
            if positions[r] >= self.cos.len() / (self.head_dim / 2) {
                return Err(format!("position {} is outside the context", positions[r]));
            }
            self.embed.dequantize_row(*t as usize, &mut x[r * h..(r + 1) * h]);
        }
        for (li, l) in self.layers.iter().enumerate() {
            let xn = self.rmsnorm(&x, &l.attn_norm);
            let qkv_w = l.qkv.rows();
            let mut qkv = vec![0f32; b * qkv_w];
            l.qkv.matmul(
                &Q8Acts::quantize_on(&xn, h, l.qkv.k_blocks(), Some(&self.pool)),
                &mut qkv,
                &self.pool,
            );
            for (r, row) in qkv.chunks_exact_mut(qkv_w).enumerate() {
                let pos = positions[r];
                let (q, kv) = row.split_at_mut(qw);
                let (k, v) = kv.split_at_mut(kv_row);
                if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                    rmsnorm_rows(q, qn, self.eps);
                    rmsnorm_rows(k, kn, self.eps);
                }
                self.rope(q, pos);
                self.rope(k, pos);
                let buf = &mut caches[seq_of[r]][li];
                buf.k.truncate(pos * kv_row);
                buf.v.truncate(pos * kv_row);
                if buf.k.len() != pos * kv_row {
                    return Err(format!(
                        "KV cache holds {} positions, expected {pos}",
                        buf.k.len() / kv_row
                    ));
                }
                buf.k.extend_from_slice(k);
                buf.v.extend_from_slice(v);
            }
            let mut att = vec![0f32; b * qw];
            {
                let bufs: Vec<&KvBuf> = seq_of.iter().map(|s| &caches[*s][li]).collect();
                let out = SyncPtr(att.as_mut_ptr());
                let items: Vec<(Range<usize>, usize)> = query_blocks(seq_of, positions)
                    .into_iter()
                    .flat_map(|rows| (0..self.n_head).map(move |head| (rows.clone(), head)))
                    .collect();
                let parts = self.pool.threads();
                self.pool.run(&|t| {
                    let mut scores = Vec::new();
                    // Every parts-th item: blocks late in a prompt cost more than early ones.
                    for (rows, head) in items.iter().skip(t).step_by(parts) {
                        let (r, head) = (rows.start, *head);
                        if rows.len() > 1 {
                            // SAFETY: the block writes its own rows' head_dim floats of `att`.
                            unsafe {
                                self.attend_block(
                                    &qkv,
                                    qkv_w,
                                    rows.clone(),
                                    head,
                                    bufs[r],
                                    positions[r],
                                    &mut scores,
                                    out,
                                )
                            };
                            continue;
                        }
                        let q = &qkv[r * qkv_w + head * self.head_dim..r * qkv_w + (head + 1) * self.head_dim];
                        // SAFETY: each (row, head) item writes its own head_dim floats of `att`.
                        let o = unsafe {
                            std::slice::from_raw_parts_mut(out.add(r * qw + head * self.head_dim), self.head_dim)
                        };
                        attend_head(
                            q,
                            head,
                            self.n_head,
                            self.n_kv_head,
                            bufs[r],
                            positions[r] + 1,
                            &mut scores,
                            o,
                        );
                    }
                });
            }
            let mut y = vec![0f32; b * h];
            l.o.matmul(
                &Q8Acts::quantize_on(&att, qw, l.o.k_blocks(), Some(&self.pool)),
                &mut y,
                &self.pool,
            );
            x.iter_mut().zip(&y).for_each(|(a, d)| *a += d);

            let xn = self.rmsnorm(&x, &l.ffn_norm);
            let ffn = l.down.cols();
            let mut gu = vec![0f32; b * 2 * ffn];
            l.gate_up.matmul(
                &Q8Acts::quantize_on(&xn, h, l.gate_up.k_blocks(), Some(&self.pool)),
                &mut gu,
                &self.pool,
            );
            let mut act = vec![0f32; b * ffn];
            for (row, a) in gu.chunks_exact(2 * ffn).zip(act.chunks_exact_mut(ffn)) {
                let (g, u) = row.split_at(ffn);
                for ((a, g), u) in a.iter_mut().zip(g).zip(u) {
                    *a = g / (1.0 + super::fast_exp(-g)) * u;
                }
            }
            l.down.matmul(
                &Q8Acts::quantize_on(&act, ffn, l.down.k_blocks(), Some(&self.pool)),
                &mut y,
                &self.pool,
            );
            x.iter_mut().zip(&y).for_each(|(a, d)| *a += d);
        }
        let picked: Vec<f32> = want
            .iter()
            .flat_map(|r| x[r * h..(r + 1) * h].iter().copied())
            .collect();
        let xn = self.rmsnorm(&picked, &self.norm);
        let head = self.output.as_ref().unwrap_or(&self.embed);
        let vocab = head.rows();
        let mut logits = vec![0f32; want.len() * vocab];
        head.matmul(&Q8Acts::quantize(&xn, h, head.k_blocks()), &mut logits, &self.pool);
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }
}

/// Query rows per attention block (a prompt's rows go to the GEMMs in blocks
/// this long, so the keys past a block's last position are few).
const QUERY_BLOCK: usize = 64;

/// The rows of a step in blocks for attention: runs of consecutive positions of
/// one sequence (a prefill, or a piece of one), at most [`QUERY_BLOCK`] long;
/// a decode step's rows are blocks of one.
fn query_blocks(seq_of: &[usize], positions: &[usize]) -> Vec<Range<usize>> {
    let mut blocks: Vec<Range<usize>> = Vec::new();
    for r in 0..seq_of.len() {
        match blocks.last_mut() {
            Some(b) if b.len() < QUERY_BLOCK && seq_of[r] == seq_of[r - 1] && positions[r] == positions[r - 1] + 1 => {
                b.end = r + 1
            }
            _ => blocks.push(r..r + 1),
        }
    }
    blocks
}

/// RMSNorm of each `w.len()`-wide row of `x`, in place.
fn rmsnorm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for row in x.chunks_exact_mut(n) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        row.iter_mut().zip(w).for_each(|(v, g)| *v = *v * inv * g);
    }
}

/// A dot product in 16 independent lanes (a plain sum of products is a serial
/// chain the compiler may not reorder, so it would not vectorize).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Query head `head` against the first `len` cached positions of its kv head
/// (grouped-query attention: `n_head / n_kv_head` query heads share one).
#[allow(clippy::too_many_arguments)]
pub fn attend_head(
    q: &[f32],
    head: usize,
    n_head: usize,
    n_kv_head: usize,
    kv: &KvBuf,
    len: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len();
    let row = n_kv_head * hd;
    let g = head / (n_head / n_kv_head);
    let scale = 1.0 / (hd as f32).sqrt();
    let at = |t: usize| -> Range<usize> { t * row + g * hd..t * row + (g + 1) * hd };
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for t in 0..len {
        let s = dot(q, &kv.k[at(t)]) * scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = super::fast_exp(*s - max);
        total += *s;
    }
    out.fill(0.0);
    for (t, p) in scores.iter().enumerate() {
        let p = p / total;
        for (o, v) in out.iter_mut().zip(&kv.v[at(t)]) {
            *o = p.mul_add(*v, *o);
        }
    }
}
