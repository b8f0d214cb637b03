//! The llama forward on plain slices, for decode steps and short inputs: no
//! tensors, no allocation per operation, q/k/v and gate/up fused into one product
//! each, our quantized kernels ([`super::qmat`]) and one persistent thread pool
//! ([`super::pool`]). A step of B rows (one per sequence when decoding, or several
//! consecutive positions of one sequence) costs four products per layer plus the
//! output head. Used when every linear layer is Q4_1 or Q8_0 (the development
//! model); other GGUF types keep the tensor path in [`super::llama`].

use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};

use super::pool::{share, Pool, SyncPtr};
use super::qmat::{Kind, Q8Acts, QMat};

/// One layer's KV cache of one sequence, laid out [position][kv head][head dim]
/// so a step appends rows and reads each head with a fixed stride.
#[derive(Default, Clone)]
pub struct KvBuf {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct FastLayer {
    qkv: QMat,
    o: QMat,
    gate_up: QMat,
    down: QMat,
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
}

pub struct FastWeights {
    embed: QMat,
    /// None when the output head is tied to the embeddings.
    output: Option<QMat>,
    layers: Vec<FastLayer>,
    norm: Vec<f32>,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    eps: f32,
    /// RoPE tables, (position, head_dim / 2).
    cos: Vec<f32>,
    sin: Vec<f32>,
    pool: Pool,
}

/// The kernel for a GGUF tensor, if we have one.
pub fn qmat(t: &QTensor) -> Option<QMat> {
    let kind = match t.dtype() {
        GgmlDType::Q4_1 => Kind::Q41,
        GgmlDType::Q8_0 => Kind::Q80,
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
}

pub struct Shape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub context_len: usize,
    pub freq_base: f32,
}

impl FastWeights {
    pub fn new(
        embed: QMat,
        output: Option<QMat>,
        layers: Vec<LayerParts>,
        norm: Vec<f32>,
        shape: Shape,
        threads: usize,
    ) -> Option<Self> {
        let hd = shape.head_dim;
        if !hd.is_multiple_of(2) || shape.n_kv_head == 0 || !shape.n_head.is_multiple_of(shape.n_kv_head) {
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
        let layers = layers
            .into_iter()
            .map(|l| {
                Some(FastLayer {
                    qkv: QMat::stack(vec![l.q, l.k, l.v])?,
                    o: l.o,
                    gate_up: QMat::stack(vec![l.gate, l.up])?,
                    down: l.down,
                    attn_norm: l.attn_norm,
                    ffn_norm: l.ffn_norm,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(FastWeights {
            embed,
            output,
            layers,
            norm,
            n_head: shape.n_head,
            n_kv_head: shape.n_kv_head,
            head_dim: hd,
            eps: shape.eps,
            cos,
            sin,
            pool: Pool::new(threads),
        })
    }

    fn hidden(&self) -> usize {
        self.n_head * self.head_dim
    }

    fn rmsnorm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let h = self.hidden();
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(h) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            out.extend(row.iter().zip(w).map(|(v, g)| v * inv * g));
        }
        out
    }

    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = self.head_dim / 2;
        let (cos, sin) = (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
        for head in x.chunks_exact_mut(self.head_dim) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
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
        let h = self.hidden();
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
            l.qkv.matmul(&Q8Acts::quantize(&xn, h), &mut qkv, &self.pool);
            for (r, row) in qkv.chunks_exact_mut(qkv_w).enumerate() {
                let pos = positions[r];
                let (q, kv) = row.split_at_mut(h);
                let (k, v) = kv.split_at_mut(kv_row);
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
            let mut att = vec![0f32; b * h];
            {
                let bufs: Vec<&KvBuf> = seq_of.iter().map(|s| &caches[*s][li]).collect();
                let out = SyncPtr(att.as_mut_ptr());
                let items = b * self.n_head;
                let parts = self.pool.threads();
                self.pool.run(&|t| {
                    let mut scores = Vec::new();
                    for item in share(items, parts, t, 1) {
                        let (r, head) = (item / self.n_head, item % self.n_head);
                        let q = &qkv[r * qkv_w + head * self.head_dim..r * qkv_w + (head + 1) * self.head_dim];
                        // SAFETY: each (row, head) item writes its own head_dim floats of `att`.
                        let o = unsafe {
                            std::slice::from_raw_parts_mut(out.add(r * h + head * self.head_dim), self.head_dim)
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
            l.o.matmul(&Q8Acts::quantize(&att, h), &mut y, &self.pool);
            x.iter_mut().zip(&y).for_each(|(a, d)| *a += d);

            let xn = self.rmsnorm(&x, &l.ffn_norm);
            let ffn = l.down.cols();
            let mut gu = vec![0f32; b * 2 * ffn];
            l.gate_up.matmul(&Q8Acts::quantize(&xn, h), &mut gu, &self.pool);
            let act: Vec<f32> = gu
                .chunks_exact(2 * ffn)
                .flat_map(|row| {
                    let (g, u) = row.split_at(ffn);
                    g.iter().zip(u).map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                })
                .collect();
            l.down.matmul(&Q8Acts::quantize(&act, ffn), &mut y, &self.pool);
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
        head.matmul(&Q8Acts::quantize(&xn, h), &mut logits, &self.pool);
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
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
