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
    /// The repetition penalty counts the prompt's tokens too (else only the
    /// answer's own: a RAG answer should be free to repeat its sources).
    pub penalize_prompt: bool,
    /// Copying from `bonus_tokens` (a chat answer's sources, in order): the
    /// tokens that follow, in them, the longest end of the answer found there
    /// (up to `COPY_MATCH` tokens) get this added to their logits (0: none), so
    /// that a small model that has begun a source's sentence goes on with its
    /// number or name rather than inventing one.
    pub bonus: f32,
    pub bonus_tokens: std::sync::Arc<[u32]>,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            top_p: 0.95,
            top_k: 40,
            repetition_penalty: 1.1,
            penalize_prompt: true,
            bonus: 0.0,
            bonus_tokens: std::sync::Arc::from(Vec::new()),
            seed: None,
        }
    }
}

/// The longest end of an answer looked up in the copy source, in tokens.
pub const COPY_MATCH: usize = 8;

/// The tokens that follow, in `source`, the longest end of `answer` (at most
/// `COPY_MATCH` tokens) that occurs in it; none when even its last token does
/// not occur.
pub fn continuations(source: &[u32], answer: &[u32]) -> Vec<u32> {
    let Some(&last) = answer.last() else {
        return Vec::new();
    };
    // Positions after an occurrence of the last token, then kept while longer
    // ends still match.
    let mut ends: Vec<usize> = (0..source.len().saturating_sub(1))
        .filter(|&i| source[i] == last)
        .collect();
    let mut k = 1;
    while k < COPY_MATCH.min(answer.len()) {
        let want = answer[answer.len() - 1 - k];
        let longer: Vec<usize> = ends
            .iter()
            .copied()
            .filter(|&i| i >= k && source[i - k] == want)
            .collect();
        if longer.is_empty() {
            break;
        }
        ends = longer;
        k += 1;
    }
    let mut next: Vec<u32> = ends.iter().map(|&i| source[i + 1]).collect();
    next.sort_unstable();
    next.dedup();
    next
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

    /// Picks the next token from `logits`, given the tokens so far: `context`
    /// (prompt and answer), of which the last `generated` are the answer's
    /// (for the repetition penalty).
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32], generated: usize) -> u32 {
        let p = &self.params;
        if p.bonus != 0.0 && !p.bonus_tokens.is_empty() {
            let answer = &context[context.len().saturating_sub(generated)..];
            for t in continuations(&p.bonus_tokens, answer) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l += p.bonus;
                }
            }
        }
        if p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0 {
            let mut seen = std::collections::HashSet::new();
            let counted = if p.penalize_prompt {
                context
            } else {
                &context[context.len().saturating_sub(generated)..]
            };
            for &t in counted {
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
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(params(0.0, 0, 1.0, 1));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[], 0), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let mut s = Sampler::new(params(1.0, 1, 1.0, 7));
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, 2.8], &[], 0), 1);
        }
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..32)
                .map(|_| s.sample(&mut [1.0, 1.0, 1.0, 1.0], &[], 0))
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
            assert_eq!(s.sample(&mut [5.0, 1.0, 1.0, 1.0], &[], 0), 0);
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
            ..SamplingParams::default()
        });
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0], 1), 1, "3.0 / 2 < 2.0");
        // Over the prompt too (by default), or over the answer only.
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0], 0), 1, "the prompt's token 0 counts");
        let mut answer_only = Sampler::new(SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            penalize_prompt: false,
            ..SamplingParams::default()
        });
        assert_eq!(
            answer_only.sample(&mut [3.0, 2.0], &[0], 0),
            0,
            "token 0 is the prompt's"
        );
        assert_eq!(
            answer_only.sample(&mut [3.0, 2.0], &[1, 0], 1),
            1,
            "token 0 is the answer's"
        );
    }

    #[test]
    fn continuations_follow_the_longest_end_of_the_answer_found_in_the_source() {
        // "the year 7 7 9 0 . the bridge 4 1": words as numbers.
        let source = [10, 11, 7, 7, 9, 0, 5, 10, 12, 4, 1];
        assert_eq!(continuations(&source, &[]), Vec::<u32>::new());
        assert_eq!(continuations(&source, &[99]), Vec::<u32>::new(), "nothing to copy");
        // "the" alone: both continuations; "the year": only one.
        assert_eq!(continuations(&source, &[10]), [11, 12]);
        assert_eq!(continuations(&source, &[3, 10, 11]), [7]);
        assert_eq!(continuations(&source, &[10, 11, 7]), [7]);
        assert_eq!(continuations(&source, &[11, 7, 7]), [9]);
        // "7" alone continues with 7 or 9; after "year 7", only 7.
        assert_eq!(continuations(&source, &[7]), [7, 9]);
        // The source's last token has no continuation.
        assert_eq!(continuations(&source, &[1]), Vec::<u32>::new());
    }

    #[test]
    fn the_copy_bonus_lifts_what_continues_the_source() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repetition_penalty: 1.0,
            bonus: 1.5,
            bonus_tokens: std::sync::Arc::from(vec![0, 2, 1]),
            ..SamplingParams::default()
        });
        // The answer so far ends with 0: the source goes on with 2.
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0], &[0], 1), 2, "2.0 + 1.5 > 3.0");
        let mut logits = [0.0, 3.0, 1.0];
        assert_eq!(s.sample(&mut logits, &[0], 1), 1, "1.0 + 1.5 < 3.0");
        assert_eq!(logits[2], 2.5);
        // The prompt's 0 is not the answer's: no bonus.
        let mut logits = [0.0, 3.0, 2.0];
        assert_eq!(s.sample(&mut logits, &[0], 0), 1);
        assert_eq!(logits[2], 2.0);
    }
}
