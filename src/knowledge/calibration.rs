//! Relevance people can read: a hit's score on a fixed 0–1 scale, the same for
//! every query, instead of the ranking score (reciprocal ranks or min–max
//! normalised values, which say where a chunk ranks among the candidates of
//! this query only: the single candidate of a query scores 0).
//!
//! A logistic model over two features of a query and a chunk: the cosine of
//! their embeddings (when the query has one) and `ln(1 + BM25)` (when the text
//! route scored it). Its weights are fitted by `ragchat eval beir --calibrate`
//! on SciFact's train queries with balanced classes: judged-relevant documents
//! against unjudged ones from the same queries' candidates (the top 100 of
//! either route). So 0.5 is where a chunk is as likely a judged answer as a
//! near miss retrieved for the same query; above it, more likely an answer.

use serde::Serialize;

/// `relevance = σ(cos · cos + text · ln(1 + bm25) + bias)`; an absent feature adds 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Logistic {
    pub cos: f64,
    pub text: f64,
    pub bias: f64,
}

/// The three models of one embedding model: the cosine's scale is the model's
/// own (bge-small's unrelated passages sit near a cosine of 0.6, MiniLM's near
/// 0.2), so each embedding model has its fitted weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Calibration {
    /// The vector route: the cosine alone.
    pub vector: Logistic,
    /// The text route (no query embedding): BM25 alone. BM25 depends on the
    /// corpus (a term's rarity): on a small knowledge base the same match scores
    /// lower than on SciFact's 5,183 abstracts.
    pub text: Logistic,
    /// Hybrid: both.
    pub hybrid: Logistic,
    /// How hybrid search orders its candidates with this model.
    pub ranking: Ranking,
}

/// The order of hybrid search's candidates, chosen per embedding model by
/// 5-fold cross-validation on SciFact's train queries (`ragchat eval beir
/// --folds 5 --levers`; BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Ranking {
    /// Convex fusion of the two lists' min–max normalised scores.
    Convex,
    /// The hybrid model's linear part (`cos · cosine + text · ln(1 + BM25)`)
    /// with its text weight times `text_scale`: the fitted weights separate
    /// answers from near misses; ordering answers wants more of the text.
    Logistic { text_scale: f64 },
}

/// The text route's model, the same for every embedding model (0.5 at a BM25 of 18.9).
const TEXT: Logistic = Logistic {
    cos: 0.0,
    text: 4.342,
    bias: -12.981,
};

// Fitted by `ragchat eval beir --data ../shared/data/scifact --split train
// --calibrate` (809 queries, the top 100 candidates of each route; BENCHMARKS.md
// "Calibrated relevance"), on the text route's one field of title and chunk.

/// all-MiniLM-L6-v2 (105,229 candidates, 883 judged relevant; AUC vector 0.919,
/// text 0.897, hybrid 0.945): 0.5 at a cosine of 0.46 on the vector route.
pub const MINILM_L6: Calibration = Calibration {
    vector: Logistic {
        cos: 14.721,
        text: 0.0,
        bias: -6.825,
    },
    text: TEXT,
    hybrid: Logistic {
        cos: 12.272,
        text: 0.878,
        bias: -7.687,
    },
    // Logistic ranking beat convex fusion in 3 of 5 folds only, within the spread.
    ranking: Ranking::Convex,
};

/// bge-small-en-v1.5 (106,093 candidates, 897 judged relevant; AUC vector 0.932,
/// hybrid 0.948): 0.5 at a cosine of 0.72 on the vector route.
pub const BGE_SMALL: Calibration = Calibration {
    vector: Logistic {
        cos: 36.818,
        text: 0.0,
        bias: -26.404,
    },
    text: TEXT,
    hybrid: Logistic {
        cos: 32.105,
        text: 0.667,
        bias: -24.439,
    },
    // nDCG@10 0.7784 ± 0.0217 against convex fusion's 0.7641, better in 5 of 5
    // folds and the cross-validated choice in each (2026-12-03).
    ranking: Ranking::Logistic { text_scale: 3.0 },
};

/// The fitted calibration of the embedding model `name` (`models.embedding_name`),
/// compared in any case; None for a model nobody fitted.
pub fn for_model(name: &str) -> Option<Calibration> {
    match name.to_ascii_lowercase().as_str() {
        "all-minilm-l6-v2" | "sentence-transformers/all-minilm-l6-v2" => Some(MINILM_L6),
        "bge-small-en-v1.5" | "baai/bge-small-en-v1.5" => Some(BGE_SMALL),
        _ => None,
    }
}

impl Logistic {
    /// The relevance of a chunk with these features (0–1).
    pub fn relevance(&self, cos: Option<f32>, bm25: Option<f32>) -> f32 {
        let z = self.bias
            + cos.map_or(0.0, |c| self.cos * f64::from(c))
            + bm25.map_or(0.0, |s| self.text * f64::from(s.max(0.0)).ln_1p());
        (1.0 / (1.0 + (-z).exp())) as f32
    }
}

/// One labelled example for `fit`: features as `relevance` takes them.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub cos: f32,
    pub bm25: f32,
    pub relevant: bool,
}

/// The ridge of `fit`, against a total sample weight of 1: small enough to leave
/// the fitted weights where the data puts them (1e-4 shrank a slope of 10 to 9.65),
/// large enough to keep separable data finite.
const RIDGE: f64 = 1e-6;

/// Fits a logistic model by Newton's method (iteratively reweighted least
/// squares) on the features chosen, each class weighted to half the total (a
/// prior of 0.5). A small ridge keeps separable data finite.
pub fn fit(samples: &[Sample], use_cos: bool, use_text: bool) -> Logistic {
    let features = |s: &Sample| -> Vec<f64> {
        let mut x = Vec::with_capacity(3);
        if use_cos {
            x.push(f64::from(s.cos));
        }
        if use_text {
            x.push(f64::from(s.bm25.max(0.0)).ln_1p());
        }
        x.push(1.0);
        x
    };
    let pos = samples.iter().filter(|s| s.relevant).count().max(1) as f64;
    let neg = samples.iter().filter(|s| !s.relevant).count().max(1) as f64;
    let n = usize::from(use_cos) + usize::from(use_text) + 1;
    let mut w = vec![0.0f64; n];
    for _ in 0..50 {
        let mut grad = vec![0.0f64; n];
        let mut hess = vec![vec![0.0f64; n]; n];
        for s in samples {
            let x = features(s);
            let z: f64 = x.iter().zip(&w).map(|(a, b)| a * b).sum();
            let p = 1.0 / (1.0 + (-z).exp());
            let (y, weight) = if s.relevant { (1.0, 0.5 / pos) } else { (0.0, 0.5 / neg) };
            let (g, h) = (weight * (p - y), weight * p * (1.0 - p));
            for (i, xi) in x.iter().enumerate() {
                grad[i] += g * xi;
                for (j, xj) in x.iter().enumerate() {
                    hess[i][j] += h * xi * xj;
                }
            }
        }
        for (i, (g, wi)) in grad.iter_mut().zip(&w).enumerate() {
            *g += RIDGE * wi;
            hess[i][i] += RIDGE;
        }
        let Some(step) = solve(hess, grad) else { break };
        let mut moved = 0.0f64;
        for (wi, si) in w.iter_mut().zip(&step) {
            *wi -= si;
            moved = moved.max(si.abs());
        }
        if moved < 1e-9 {
            break;
        }
    }
    let mut it = w.into_iter();
    let cos = if use_cos { it.next().unwrap_or(0.0) } else { 0.0 };
    let text = if use_text { it.next().unwrap_or(0.0) } else { 0.0 };
    Logistic {
        cos,
        text,
        bias: it.next().unwrap_or(0.0),
    }
}

/// Solves `a · x = b` by Gaussian elimination with partial pivoting; None if singular.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-15 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        let b_col = b[col];
        for (r, row) in lower.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (x, p) in row.iter_mut().zip(pivot_row).skip(col) {
                *x -= f * p;
            }
            b[col + 1 + r] -= f * b_col;
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}

/// Area under the ROC curve: the chance that a random relevant example scores
/// above a random other one (ties count half).
pub fn auc(scored: &[(f32, bool)]) -> f64 {
    let mut v: Vec<(f32, bool)> = scored.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut pos, mut i) = (0.0f64, 0usize, 0usize);
    while i < v.len() {
        let mut j = i;
        while j < v.len() && v[j].0 == v[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j share their mean.
        let mean_rank = (i + 1 + j) as f64 / 2.0;
        for x in &v[i..j] {
            if x.1 {
                rank_sum += mean_rank;
                pos += 1;
            }
        }
        i = j;
    }
    let neg = v.len() - pos;
    if pos == 0 || neg == 0 {
        return 0.5;
    }
    (rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos as f64 * neg as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_matches_hand_computed_values() {
        assert_eq!(auc(&[(0.9, true), (0.1, false)]), 1.0);
        assert_eq!(auc(&[(0.1, true), (0.9, false)]), 0.0);
        assert_eq!(auc(&[(0.5, true), (0.5, false)]), 0.5);
        // Pairs: (0.8 > 0.3 ✓), (0.8 > 0.6 ✓), (0.4 > 0.3 ✓), (0.4 > 0.6 ✗): 3 of 4.
        assert_eq!(auc(&[(0.8, true), (0.4, true), (0.3, false), (0.6, false)]), 0.75);
    }

    #[test]
    fn the_fit_recovers_the_weights_that_made_the_labels() {
        // Labels drawn from σ(10·cos − 4) over a grid of cosines, deterministically:
        // at each cosine, relevant in proportion to the model's probability.
        let truth = Logistic {
            cos: 10.0,
            text: 0.0,
            bias: -4.0,
        };
        let mut samples = Vec::new();
        for i in 0..=100 {
            let cos = i as f32 / 100.0;
            let p = truth.relevance(Some(cos), None);
            let k = (p * 100.0).round() as usize;
            for j in 0..100 {
                samples.push(Sample {
                    cos,
                    bm25: 0.0,
                    relevant: j < k,
                });
            }
        }
        // The classes are reweighted to a prior of 0.5: the bias moves by the
        // log of the class ratio, the slope stays.
        let fitted = fit(&samples, true, false);
        let pos = samples.iter().filter(|s| s.relevant).count() as f64;
        let neg = samples.len() as f64 - pos;
        assert!((fitted.cos - 10.0).abs() < 0.3, "{fitted:?}");
        assert!((fitted.bias - (-4.0 + (neg / pos).ln())).abs() < 0.2, "{fitted:?}");
        assert_eq!(fitted.text, 0.0);
        // Two features: the text weight is found beside the cosine's.
        let both: Vec<Sample> = (0..2000)
            .map(|i| {
                let cos = (i % 40) as f32 / 40.0;
                let bm25 = ((i / 40) % 50) as f32;
                let z = 6.0 * f64::from(cos) + 1.5 * f64::from(bm25).ln_1p() - 6.0;
                Sample {
                    cos,
                    bm25,
                    relevant: z > 0.0,
                }
            })
            .collect();
        let f = fit(&both, true, true);
        assert!(f.cos > 0.0 && f.text > 0.0, "{f:?}");
        let scored: Vec<(f32, bool)> = both
            .iter()
            .map(|s| (f.relevance(Some(s.cos), Some(s.bm25)), s.relevant))
            .collect();
        assert!(auc(&scored) > 0.99);
    }

    #[test]
    fn relevance_is_bounded_and_rises_with_each_feature() {
        for c in [MINILM_L6, BGE_SMALL] {
            for m in [c.vector, c.text, c.hybrid] {
                let low = m.relevance(Some(0.0), Some(0.0));
                let high = m.relevance(Some(0.9), Some(40.0));
                assert!((0.0..=1.0).contains(&low) && (0.0..=1.0).contains(&high));
                assert!(high > low, "{m:?}");
            }
            assert!(c.vector.relevance(None, None) < 0.5);
        }
        // Each model's own scale: a cosine of 0.6 is likely relevant for MiniLM,
        // a near miss for bge-small.
        assert!(MINILM_L6.vector.relevance(Some(0.6), None) > 0.5);
        assert!(BGE_SMALL.vector.relevance(Some(0.6), None) < 0.5);
        assert_eq!(for_model("BAAI/bge-small-en-v1.5"), Some(BGE_SMALL));
        assert_eq!(for_model("all-minilm-l6-v2"), Some(MINILM_L6));
        assert_eq!(for_model("my-own-model"), None);
    }
}
