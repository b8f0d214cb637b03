//! Model ports and sampling. The candle adapters (src/inference) implement
//! `Embedder` and `CausalLm`; the workers (embed_worker.rs, generate_worker.rs)
//! batch and schedule over them. Sampling is here: pure arithmetic on logits.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// The input cannot be processed: a 4xx.
    #[error("{0}")]
    Invalid(String),
    /// The prompt does not fit the model's context: a 4xx.
    #[error("{0}")]
    TooLong(String),
    /// The worker's queue is full: a 503 worth retrying soon.
    #[error("{0}")]
    Overloaded(String),
    /// The worker crashed, stopped or is not loaded: a 503.
    #[error("{0}")]
    Unavailable(String),
    #[error("model error: {0}")]
    Internal(String),
}

/// A sentence embedder: texts in, L2-normalized vectors out. Runs on the worker
/// thread (blocking).
pub trait Embedder: Send + 'static {
    fn dimensions(&self) -> usize;
    fn max_tokens(&self) -> usize;
    /// Tokens a text would take (truncated at `max_tokens`): for batching by length.
    fn count_tokens(&self, text: &str) -> Result<usize, ModelError>;
    /// One forward for the whole batch.
    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError>;
}

/// A text tokenizer with a chat template.
pub trait ChatTokenizer: Send + Sync + 'static {
    fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError>;
    fn decode(&self, ids: &[u32]) -> Result<String, ModelError>;
    /// Tokens that end generation (end of sequence, end of turn).
    fn stop_tokens(&self) -> &[u32];
    /// The prompt for a conversation (ChatML), ending with the assistant's turn opened.
    fn chat_prompt(&self, messages: &[(String, String)]) -> String {
        let mut p = String::new();
        for (role, content) in messages {
            p.push_str("<|im_start|>");
            p.push_str(role);
            p.push('\n');
            p.push_str(content);
            p.push_str("<|im_end|>\n");
        }
        p.push_str("<|im_start|>assistant\n");
        p
    }
}

/// One sequence of a causal language model: its own KV cache over shared weights.
pub trait CausalLm: Send + 'static {
    /// Feeds `tokens` at positions `pos..pos + tokens.len()` and returns the logits
    /// for the next token.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError>;
    /// A fresh sequence sharing this one's weights (empty cache).
    fn fork(&self) -> Box<dyn CausalLm>;
    fn context_len(&self) -> usize;

    /// Decodes one token for each of several sequences forked from this model, at
    /// their positions, and returns each one's logits. Models that can run the
    /// sequences as one batch override it; the default runs one forward each.
    fn decode_batch(
        &self,
        seqs: &mut [&mut Box<dyn CausalLm>],
        tokens: &[u32],
        positions: &[usize],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        seqs.iter_mut()
            .zip(tokens.iter().zip(positions))
            .map(|(s, (&t, &p))| s.forward(&[t], p))
            .collect()
    }

    /// For `decode_batch` overrides to reach their own type.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }

    /// Bytes its KV cache holds. `None`: this model cannot resume a sequence
    /// from a cached prefix (the prompt cache passes it by).
    fn kv_bytes(&self) -> Option<usize> {
        None
    }

    /// A new sequence holding a copy of this one's first `len` cached
    /// positions, to be continued with `forward(rest, len)`; `None` when this
    /// model cannot (see `kv_bytes`) or holds fewer positions.
    fn fork_prefix(&self, _len: usize) -> Option<Box<dyn CausalLm>> {
        None
    }
}

/// Per-request sampling settings (OpenAI-style).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    /// 1.0 = none; > 1 discourages tokens already in the sequence.
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            top_p: 0.95,
            top_k: 40,
            repetition_penalty: 1.1,
            seed: None,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Sampler { params, rng }
    }

    /// Picks the next token from `logits`, given the tokens so far (`context`,
    /// for the repetition penalty).
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in context {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l >= 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, cut by top-k, softmax at temperature, cut by top-p.
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        let k = if p.top_k == 0 {
            idx.len()
        } else {
            p.top_k.min(idx.len())
        };
        if k < idx.len() {
            idx.select_nth_unstable_by(k, |&a, &b| logits[b].total_cmp(&logits[a]));
            idx.truncate(k);
        }
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let Some(&first) = idx.first() else { return 0 };
        let max = logits[first];
        let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i] - max) / p.temperature).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut keep = probs.len();
        if p.top_p > 0.0 && p.top_p < 1.0 {
            let mut acc = 0.0;
            for (n, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = n + 1;
                    break;
                }
            }
        }
        let mass: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.gen::<f32>() * mass;
        for (n, q) in probs[..keep].iter().enumerate() {
            if r < *q {
                return idx[n] as u32;
            }
            r -= q;
        }
        idx[keep - 1] as u32
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            repetition_penalty: 1.0,
            seed: Some(seed),
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(params(0.0, 0, 1.0, 1));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let mut s = Sampler::new(params(1.0, 1, 1.0, 7));
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, 2.8], &[]), 1);
        }
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..32)
                .map(|_| s.sample(&mut [1.0, 1.0, 1.0, 1.0], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn top_p_never_picks_outside_the_nucleus() {
        let mut s = Sampler::new(params(1.0, 0, 0.5, 11));
        for _ in 0..200 {
            // Token 0 alone holds > 50% of the mass.
            assert_eq!(s.sample(&mut [5.0, 1.0, 1.0, 1.0], &[]), 0);
        }
    }

    #[test]
    fn repetition_penalty_pushes_seen_tokens_down() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 2.0,
            seed: Some(1),
        });
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0]), 1, "3.0 / 2 < 2.0");
    }
}
