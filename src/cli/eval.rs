//! `ragchat eval …`: retrieval quality (`eval answers`: answer checks, in
//! `eval_answers`). `ragchat eval beir`: on a BEIR-style dataset
//! (corpus.jsonl, queries, qrels) for every route: nDCG@10, Recall@100 and MRR@10
//! over documents (a document ranks where its best chunk ranks).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use chrono::Utc;
use ragchat::config::Settings;
use ragchat::knowledge::calibration::{self, Sample};
use ragchat::knowledge::chunking::Chunker;
use ragchat::knowledge::index::{Fusion, HybridIndex, Prf, Proximity, FUSION_DEPTH, RRF_K};
use ragchat::knowledge::ingest::embedding_text;
use ragchat_actors::chat::grounding::sentences;
use ragchat_actors::inference::Embedder;
use ragchat_actors::knowledge::{Chunk, Document, Owner, Reader};
use ragchat_actors::retrieval::{Filters, Hit, Route};
use serde::Deserialize;
use uuid::Uuid;

#[derive(clap::Subcommand)]
pub enum EvalTarget {
    /// nDCG@10, Recall@100 and MRR@10 per route on a BEIR-style dataset
    /// (corpus.jsonl; queries.SPLIT.jsonl or queries.jsonl; qrels.SPLIT.tsv or qrels/SPLIT.tsv).
    Beir {
        #[arg(long)]
        data: std::path::PathBuf,
        #[arg(long, default_value = "test")]
        split: String,
        /// Evaluate only the first N judged queries.
        #[arg(long)]
        max_queries: Option<usize>,
        /// Keep the chunk vectors in this file between runs (same model and chunks).
        #[arg(long)]
        cache: Option<std::path::PathBuf>,
        /// Also score hybrid under a grid of fusion settings (tuning).
        #[arg(long)]
        fusion_grid: bool,
        /// Also fit the calibrated relevance (logistic weights per route) on
        /// these queries and report how well it separates relevant documents.
        #[arg(long)]
        calibrate: bool,
        /// Also score ranking levers (logistic fusion, pseudo-relevance feedback).
        #[arg(long)]
        levers: bool,
        /// Also embed each chunk's sentences and score hybrid with a sentence
        /// part (each candidate's best sentence cosine) at several weights.
        #[arg(long)]
        sentences: bool,
        /// Split the queries into this many folds (query i in fold i mod N): each
        /// run's nDCG@10 per fold, and a cross-validated choice among the runs.
        #[arg(long, default_value_t = 0)]
        folds: usize,
    },
    /// Fact-in-answer, quote hit rate, confidence AUC and refusals on a set of
    /// invented facts, before and after grounding, in the same run.
    Answers(super::eval_answers::AnswersEval),
}

pub async fn run(what: EvalTarget, settings: Settings) -> anyhow::Result<()> {
    match what {
        EvalTarget::Answers(opts) => super::eval_answers::run(settings, opts).await?,
        EvalTarget::Beir {
            data,
            split,
            max_queries,
            cache,
            fusion_grid,
            calibrate,
            levers,
            sentences,
            folds,
        } => {
            let opts = EvalOptions {
                max_queries,
                cache,
                fusion_grid,
                calibrate,
                levers,
                sentences,
                folds,
            };
            beir(&settings, &data, &split, opts).await?;
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct CorpusDoc {
    #[serde(rename = "_id")]
    id: String,
    #[serde(default)]
    title: String,
    text: String,
}

#[derive(Deserialize)]
struct Query {
    #[serde(rename = "_id")]
    id: String,
    text: String,
}

/// nDCG@k with binary or graded relevance (qrels gains), ideal from the qrels.
pub fn ndcg_at(ranked: &[String], rel: &HashMap<String, f64>, k: usize) -> f64 {
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, d)| rel.get(d).copied().unwrap_or(0.0) / ((i + 2) as f64).log2())
        .sum();
    let mut gains: Vec<f64> = rel.values().copied().filter(|g| *g > 0.0).collect();
    gains.sort_by(|a, b| b.total_cmp(a));
    let ideal: f64 = gains
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, g)| g / ((i + 2) as f64).log2())
        .sum();
    if ideal > 0.0 {
        dcg / ideal
    } else {
        0.0
    }
}

pub fn recall_at(ranked: &[String], rel: &HashMap<String, f64>, k: usize) -> f64 {
    let relevant = rel.values().filter(|g| **g > 0.0).count();
    if relevant == 0 {
        return 0.0;
    }
    let found = ranked
        .iter()
        .take(k)
        .filter(|d| rel.get(*d).is_some_and(|g| *g > 0.0))
        .count();
    found as f64 / relevant as f64
}

pub fn mrr_at(ranked: &[String], rel: &HashMap<String, f64>, k: usize) -> f64 {
    ranked
        .iter()
        .take(k)
        .position(|d| rel.get(d).is_some_and(|g| *g > 0.0))
        .map_or(0.0, |i| 1.0 / (i + 1) as f64)
}

fn read_lines<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1)))
        .collect()
}

/// The first of the candidate paths that exists (BEIR's layout, or flat files).
fn first_existing(dir: &Path, names: &[String]) -> anyhow::Result<std::path::PathBuf> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("none of {names:?} in {}", dir.display()))
}

/// Chunk vectors saved by an earlier run with the same model and chunks.
fn read_vectors(path: &Path, key: &str, n: usize) -> Option<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).ok()?;
    let (head, body) = bytes.split_at_checked(72)?;
    if &head[..64] != key.as_bytes() {
        return None;
    }
    let dim = u64::from_le_bytes(head[64..72].try_into().ok()?) as usize;
    if dim == 0 || body.len() != n * dim * 4 {
        return None;
    }
    Some(
        body.chunks_exact(dim * 4)
            .map(|v| {
                v.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            })
            .collect(),
    )
}

fn write_vectors(path: &Path, key: &str, vectors: &[Vec<f32>]) -> anyhow::Result<()> {
    let dim = vectors.first().map_or(0, Vec::len);
    let mut out = Vec::with_capacity(72 + vectors.len() * dim * 4);
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&(dim as u64).to_le_bytes());
    for v in vectors {
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(path, out).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The hex SHA-256 of `first`, then each text ended by a 0 byte: what a cache
/// of vectors is keyed by.
fn cache_key<'a>(first: &str, texts: impl IntoIterator<Item = &'a str>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(first.as_bytes());
    for t in texts {
        h.update(t.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

/// Sentences embedded per chunk for the sentence part (a longer chunk's rest is left out).
const MAX_SENTENCES: usize = 64;

/// The vectors of each chunk's sentences, one after another (in order:
/// documents, their chunks), embedded shortest first in batches, or read from
/// `cache` with ".sentences" appended when it holds them.
fn embed_sentences(
    bert: &mut ragchat::inference::bert::BertEmbedder,
    docs: &[(Document, Vec<String>)],
    chunks_key: &str,
    cache: Option<&Path>,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let per_chunk: Vec<Vec<&str>> = docs
        .iter()
        .flat_map(|(_, pieces)| pieces)
        .map(|p| {
            sentences(p, MAX_SENTENCES)
                .into_iter()
                .map(|s| &p[s.start..s.end])
                .collect()
        })
        .collect();
    let texts: Vec<&str> = per_chunk.iter().flatten().copied().collect();
    let key = cache_key(chunks_key, texts.iter().copied());
    let path = cache.map(|p| {
        let mut name = p.as_os_str().to_owned();
        name.push(".sentences");
        std::path::PathBuf::from(name)
    });
    let vectors = match path.as_deref().and_then(|p| read_vectors(p, &key, texts.len())) {
        Some(v) => {
            eprintln!("  {} sentence vectors read from the cache", v.len());
            v
        }
        None => {
            let v = embed_shortest_first(bert, &texts)?;
            if let Some(p) = path.as_deref() {
                write_vectors(p, &key, &v)?;
            }
            v
        }
    };
    let mut vectors = vectors.into_iter();
    Ok(per_chunk
        .iter()
        .map(|s| vectors.by_ref().take(s.len()).flatten().collect())
        .collect())
}

/// Embeds `texts` in batches of similar length, shortest first; vectors in the
/// texts' order.
fn embed_shortest_first(
    bert: &mut ragchat::inference::bert::BertEmbedder,
    texts: &[&str],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let started = Instant::now();
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let mut vectors = vec![Vec::new(); texts.len()];
    for (b, batch) in order.chunks(64).enumerate() {
        if b % 100 == 0 {
            eprintln!(
                "  embedded {} of {} texts ({:.0} s)",
                b * 64,
                texts.len(),
                started.elapsed().as_secs_f64()
            );
        }
        let refs: Vec<&str> = batch.iter().map(|&i| texts[i]).collect();
        for (&i, v) in batch.iter().zip(bert.embed(&refs)?) {
            vectors[i] = v;
        }
    }
    Ok(vectors)
}

/// Options of `ragchat eval beir`.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    pub max_queries: Option<usize>,
    /// Keep chunk vectors here between runs (same model and chunks only).
    pub cache: Option<std::path::PathBuf>,
    /// Also score hybrid with other fusion settings.
    pub fusion_grid: bool,
    /// Also fit the relevance calibration (see `knowledge::calibration`).
    pub calibrate: bool,
    /// Also score logistic fusion and pseudo-relevance feedback.
    pub levers: bool,
    /// Also score the sentence part of hybrid (`HybridIndex::set_sentence_part`).
    pub sentences: bool,
    /// Folds for per-fold figures and a cross-validated choice (0, 1: none).
    pub folds: usize,
}

/// One ranking measured by `eval beir`: a route and the levers set for it.
struct Run {
    name: String,
    route: Route,
    fusion: Fusion,
    prf: Option<Prf>,
    /// Weight of the sentence part (`HybridIndex::set_sentence_part`).
    sentence_part: Option<f32>,
    proximity: Option<Proximity>,
    /// A document's score: its best chunk's plus this times its other chunks'
    /// among the hits (0: its best chunk alone, as chat ranks sources).
    more_chunks: f32,
}

impl Run {
    /// A run of `route` with `fusion` and no lever.
    fn new(name: String, route: Route, fusion: Fusion) -> Self {
        Run {
            name,
            route,
            fusion,
            prf: None,
            sentence_part: None,
            proximity: None,
            more_chunks: 0.0,
        }
    }
}

/// The corpus ids of the hits' documents, best first: each scored by its best
/// chunk plus `more_chunks` times the scores of its other chunks among the hits.
fn documents_ranked(hits: &[Hit], corpus_of: &HashMap<Uuid, String>, more_chunks: f32) -> Vec<String> {
    let mut docs: Vec<(&String, f32)> = Vec::new();
    let mut at: HashMap<&String, usize> = HashMap::new();
    for h in hits {
        let Some(d) = corpus_of.get(&h.document_id) else {
            continue;
        };
        match at.get(d) {
            Some(&i) => docs[i].1 += more_chunks * h.score,
            None => {
                at.insert(d, docs.len());
                docs.push((d, h.score));
            }
        }
    }
    // Stable: with more_chunks 0, the hits' order stays.
    if more_chunks != 0.0 {
        docs.sort_by(|a, b| b.1.total_cmp(&a.1));
    }
    docs.into_iter().map(|(d, _)| d.clone()).collect()
}

pub async fn beir(settings: &Settings, data: &Path, split: &str, opts: EvalOptions) -> anyhow::Result<String> {
    let (max_queries, cache) = (opts.max_queries, opts.cache.as_deref());
    let mut out = String::new();
    let corpus: Vec<CorpusDoc> = read_lines(&data.join("corpus.jsonl"))?;
    let queries: Vec<Query> = read_lines(&first_existing(
        data,
        &[format!("queries.{split}.jsonl"), "queries.jsonl".to_string()],
    )?)?;
    let qrels_path = first_existing(data, &[format!("qrels.{split}.tsv"), format!("qrels/{split}.tsv")])?;
    let mut qrels: HashMap<String, HashMap<String, f64>> = HashMap::new();
    for line in std::fs::read_to_string(&qrels_path)?.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if let [q, d, score, ..] = cols[..] {
            qrels
                .entry(q.to_string())
                .or_default()
                .insert(d.to_string(), score.trim().parse().unwrap_or(0.0));
        }
    }

    let m = &settings.models;
    let dir = Path::new(&m.embedding_dir);
    let mut bert = ragchat::inference::bert::BertEmbedder::load(dir, m.embedding_max_tokens)?;
    let k = &settings.knowledge;
    let chunker =
        Chunker::load(&dir.join("tokenizer.json"), k.chunk_tokens, k.chunk_overlap).map_err(anyhow::Error::msg)?;
    let mut index = HybridIndex::new()?;
    let calibrated = calibration::for_model(&m.embedding_name).unwrap_or(calibration::MINILM_L6);
    index.set_calibration(calibrated);
    // The model's own ranking, as the server searches: the base of every run.
    let ranking = Fusion::ranking_of(&calibrated);
    let started = Instant::now();
    let mut corpus_of: HashMap<Uuid, String> = HashMap::new();
    let mut chunks_total = 0usize;
    // Title and abstract as one text, as sentence-transformers' BEIR evaluation does.
    let docs: Vec<(Document, Vec<String>)> = corpus
        .iter()
        .map(|c| {
            let id = Uuid::new_v4();
            corpus_of.insert(id, c.id.clone());
            let pieces = chunker.split(&c.text);
            let doc = Document {
                id,
                owner: Owner::Global,
                title: c.title.clone(),
                source: c.id.clone(),
                origin: "seed".into(),
                content_hash: String::new(),
                size_bytes: c.text.len() as u64,
                metadata: serde_json::Map::new(),
                chunk_count: pieces.len() as u32,
                created_at: Utc::now(),
            };
            (doc, pieces)
        })
        .collect();
    let texts: Vec<String> = docs
        .iter()
        .flat_map(|(d, pieces)| pieces.iter().map(move |p| embedding_text(&d.title, p)))
        .collect();
    let key = cache_key(&settings.models.embedding_dir, texts.iter().map(String::as_str));
    let cached = cache.and_then(|p| read_vectors(p, &key, texts.len()));
    let vectors = match cached {
        Some(v) => {
            eprintln!("  {} chunk vectors read from the cache", v.len());
            v
        }
        None => {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let vectors = embed_shortest_first(&mut bert, &refs)?;
            if let Some(p) = cache {
                write_vectors(p, &key, &vectors)?;
            }
            vectors
        }
    };
    let mut vectors = vectors.into_iter();
    let mut sentence_vectors = match opts.sentences {
        true => embed_sentences(&mut bert, &docs, &key, cache)?.into_iter(),
        false => Vec::new().into_iter(),
    };
    for (d, pieces) in &docs {
        let chunks: Vec<Chunk> = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| Chunk {
                id: Uuid::new_v4(),
                document_id: d.id,
                ordinal: i as u32,
                content: p.clone(),
                embedding: vectors.next().unwrap_or_default(),
            })
            .collect();
        chunks_total += chunks.len();
        index.add(d, &chunks)?;
        if opts.sentences {
            let per_chunk: Vec<Vec<f32>> = sentence_vectors.by_ref().take(pieces.len()).collect();
            index.set_sentences(d.id, per_chunk)?;
        }
    }
    index.commit()?;
    let secs = started.elapsed().as_secs_f64();
    out.push_str(&format!(
        "{}: {} documents, {chunks_total} chunks indexed in {secs:.1} s ({:.1} documents/s, chunking + embedding + indexing)\n",
        data.display(),
        corpus.len(),
        corpus.len() as f64 / secs
    ));
    print!("{out}");

    let reader = Reader {
        user_id: Uuid::nil(),
        organization_id: None,
    };
    let judged: Vec<&Query> = queries
        .iter()
        .filter(|q| qrels.contains_key(&q.id))
        .take(max_queries.unwrap_or(usize::MAX))
        .collect();
    let mut line = format!(
        "\n{:<5} queries ({split} split)       nDCG@10   Recall@100   MRR@10   ms/query\n",
        judged.len()
    );
    print!("{line}");
    out.push_str(&line);
    let prefix = &settings.models.embedding_query_prefix;
    let texts: Vec<String> = judged.iter().map(|q| format!("{prefix}{}", q.text)).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut q_vectors = Vec::with_capacity(texts.len());
    for batch in texts.chunks(32) {
        q_vectors.extend(bert.embed(batch)?);
    }
    let mut runs: Vec<Run> = [Route::Text, Route::Vector, Route::Hybrid, Route::Auto]
        .into_iter()
        .map(|route| Run::new(format!("{route:?}").to_lowercase(), route, ranking))
        .collect();
    if opts.sentences {
        for (w, alpha) in [(0.3, 0.5), (0.4, 0.5), (0.5, 0.5), (0.3, 0.4), (0.4, 0.4), (0.5, 0.4)] {
            runs.push(Run {
                fusion: Fusion::Convex {
                    alpha,
                    depth: FUSION_DEPTH,
                },
                sentence_part: Some(w),
                ..Run::new(format!("hybrid α={alpha} + sentences {w}"), Route::Hybrid, ranking)
            });
        }
    }
    if opts.levers {
        for weight in [0.1, 0.25, 0.5] {
            for slop in [0, 2, 6] {
                let p = Some(Proximity { weight, slop });
                for route in [Route::Text, Route::Hybrid] {
                    let name = format!("{route:?} + proximity {weight} slop {slop}").to_lowercase();
                    runs.push(Run {
                        proximity: p,
                        ..Run::new(name, route, ranking)
                    });
                }
            }
        }
        for lambda in [0.1, 0.2, 0.4] {
            runs.push(Run {
                more_chunks: lambda,
                ..Run::new(format!("hybrid + other chunks ×{lambda}"), Route::Hybrid, ranking)
            });
        }
        if ranking != Fusion::default() {
            runs.push(Run {
                fusion: Fusion::default(),
                ..Run::new("hybrid, convex fusion".to_string(), Route::Hybrid, ranking)
            });
        }
        let h = calibrated.hybrid;
        for w in [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0] {
            runs.push(Run {
                fusion: Fusion::Logistic {
                    cos: h.cos as f32,
                    text: (h.text * w) as f32,
                },
                ..Run::new(format!("logistic text×{w}"), Route::Hybrid, ranking)
            });
        }
        for (docs, weight) in [(3, 0.3), (3, 0.6), (5, 0.3), (5, 0.6), (10, 0.5)] {
            for (route, label) in [(Route::Vector, "vector"), (Route::Hybrid, "hybrid")] {
                runs.push(Run {
                    prf: Some(Prf { docs, weight }),
                    ..Run::new(format!("{label} + prf {docs}×{weight}"), route, ranking)
                });
            }
        }
    }
    if opts.fusion_grid {
        for k in [10.0, 30.0, RRF_K, 100.0] {
            for w in [0.7, 1.0, 1.4] {
                runs.push(Run {
                    fusion: Fusion::Rrf { k, text_weight: w },
                    ..Run::new(format!("rrf k={k} text×{w}"), Route::Hybrid, ranking)
                });
            }
        }
        for (alpha, depth) in
            [0.3, 0.4, 0.5, 0.6, 0.7]
                .into_iter()
                .map(|a| (a, FUSION_DEPTH))
                .chain([(0.5, 100), (0.5, 200), (0.5, 500)])
        {
            runs.push(Run {
                fusion: Fusion::Convex { alpha, depth },
                ..Run::new(format!("convex α={alpha} depth {depth}"), Route::Hybrid, ranking)
            });
        }
    }
    // Per run: its name and each query's nDCG@10 (for the folds).
    let mut per_query: Vec<(String, Vec<f64>)> = Vec::new();
    for run in runs {
        index.set_fusion(run.fusion);
        index.set_prf(run.prf);
        index.set_proximity(run.proximity);
        index.set_sentence_part(run.sentence_part);
        let name = run.name;
        let mut each = Vec::with_capacity(judged.len());
        let (mut ndcg, mut recall, mut mrr) = (0.0, 0.0, 0.0);
        let started = Instant::now();
        for (q, v) in judged.iter().zip(&q_vectors) {
            let hits = index.search(&q.text, Some(v), run.route, &reader, &Filters::new(), 200)?;
            let ranked = documents_ranked(&hits, &corpus_of, run.more_chunks);
            let rel = &qrels[&q.id];
            let n10 = ndcg_at(&ranked, rel, 10);
            each.push(n10);
            ndcg += n10;
            recall += recall_at(&ranked, rel, 100);
            mrr += mrr_at(&ranked, rel, 10);
        }
        let n = judged.len().max(1) as f64;
        let ms = started.elapsed().as_secs_f64() * 1000.0 / n;
        line = format!(
            "  {name:<28}   {:.3}     {:.3}       {:.3}    {ms:.2}\n",
            ndcg / n,
            recall / n,
            mrr / n
        );
        print!("{line}");
        out.push_str(&line);
        per_query.push((name, each));
    }
    index.set_prf(None);
    index.set_proximity(None);
    index.set_sentence_part(None);
    if opts.folds > 1 {
        line = folds_report(&per_query, opts.folds);
        print!("{line}");
        out.push_str(&line);
    }
    if opts.calibrate {
        index.set_fusion(Fusion::default());
        let mut samples = Vec::new();
        for (q, v) in judged.iter().zip(&q_vectors) {
            let rel = &qrels[&q.id];
            for (doc, cos, bm25) in index.candidate_features(&q.text, v, &reader, &Filters::new(), 100)? {
                let relevant = corpus_of.get(&doc).and_then(|d| rel.get(d)).is_some_and(|&g| g > 0.0);
                samples.push(Sample { cos, bm25, relevant });
            }
        }
        let text_only: Vec<Sample> = samples.iter().copied().filter(|s| s.bm25 > 0.0).collect();
        let positives = samples.iter().filter(|s| s.relevant).count();
        line = format!(
            "\ncalibration: {} candidates (top 100 of each route), {positives} judged relevant\n\
             {:<8} {:>8} {:>8} {:>8}   {:>6} {:>9} {:>9}\n",
            samples.len(),
            "model",
            "cos",
            "ln1p(bm25)",
            "bias",
            "AUC",
            "rel>0.5",
            "other<0.5"
        );
        for (name, set, current, use_cos, use_text) in [
            ("vector", &samples, calibrated.vector, true, false),
            ("text", &text_only, calibrated.text, false, true),
            ("hybrid", &samples, calibrated.hybrid, true, true),
        ] {
            let fitted = calibration::fit(set, use_cos, use_text);
            for (which, m) in [("fitted", fitted), ("in use", current)] {
                let scored: Vec<(f32, bool)> = set
                    .iter()
                    .map(|s| {
                        let cos = use_cos.then_some(s.cos);
                        let bm25 = use_text.then_some(s.bm25);
                        (m.relevance(cos, bm25), s.relevant)
                    })
                    .collect();
                let share = |want: bool, above: bool| {
                    let of: Vec<f32> = scored.iter().filter(|x| x.1 == want).map(|x| x.0).collect();
                    of.iter().filter(|&&r| (r > 0.5) == above).count() as f64 / of.len().max(1) as f64
                };
                line.push_str(&format!(
                    "{:<8} {:>8.3} {:>8.3} {:>8.3}   {:>6.3} {:>9.3} {:>9.3}   ({which})\n",
                    name,
                    m.cos,
                    m.text,
                    m.bias,
                    calibration::auc(&scored),
                    share(true, true),
                    share(false, false)
                ));
            }
        }
        print!("{line}");
        out.push_str(&line);
    }
    Ok(out)
}

/// Mean of the values of fold `f` of `k` (query i in fold i mod k), or of all
/// the other folds when `held_out`.
fn fold_mean(values: &[f64], k: usize, f: usize, held_out: bool) -> f64 {
    let (sum, n) = values
        .iter()
        .enumerate()
        .filter(|(i, _)| (i % k == f) != held_out)
        .fold((0.0, 0usize), |(s, n), (_, v)| (s + v, n + 1));
    sum / n.max(1) as f64
}

/// Per run: nDCG@10 on each of `k` folds, their mean and spread, and in how many
/// folds it beats `hybrid` (the default). Then the cross-validated choice: for
/// each fold, the run best on the other folds, scored on that fold.
pub fn folds_report(per_query: &[(String, Vec<f64>)], k: usize) -> String {
    let base = per_query.iter().find(|(n, _)| n == "hybrid").map(|(_, v)| v.clone());
    let mut out = format!(
        "
nDCG@10 over {k} folds (query i in fold i mod {k})
"
    );
    for (name, v) in per_query {
        let per: Vec<f64> = (0..k).map(|f| fold_mean(v, k, f, false)).collect();
        let mean = per.iter().sum::<f64>() / k as f64;
        let sd = (per.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (k as f64 - 1.0).max(1.0)).sqrt();
        let wins = base.as_ref().map_or(0, |b| {
            (0..k)
                .filter(|&f| fold_mean(v, k, f, false) > fold_mean(b, k, f, false))
                .count()
        });
        let folds: Vec<String> = per.iter().map(|x| format!("{x:.3}")).collect();
        out.push_str(&format!(
            "  {name:<28} {}   mean {mean:.4} ± {sd:.4}   beats hybrid in {wins}/{k}
",
            folds.join(" ")
        ));
    }
    let mut held = Vec::with_capacity(k);
    for f in 0..k {
        let best = per_query
            .iter()
            .filter(|(n, _)| n != "auto")
            .max_by(|a, b| fold_mean(&a.1, k, f, true).total_cmp(&fold_mean(&b.1, k, f, true)));
        if let Some((name, v)) = best {
            let score = fold_mean(v, k, f, false);
            out.push_str(&format!(
                "  fold {}: chosen on the others: {name} → {score:.4}
",
                f + 1
            ));
            held.push(score);
        }
    }
    let mean = held.iter().sum::<f64>() / held.len().max(1) as f64;
    out.push_str(&format!(
        "  cross-validated nDCG@10 of the choice: {mean:.4}
"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(pairs: &[(&str, f64)]) -> HashMap<String, f64> {
        pairs.iter().map(|(d, g)| (d.to_string(), *g)).collect()
    }

    fn docs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn folds_score_each_part_and_the_choice_is_scored_on_the_fold_it_did_not_see() {
        let runs = vec![
            ("hybrid".to_string(), vec![0.5, 0.5, 0.5, 0.5]),
            // Perfect on fold 1 (queries 0, 2), useless on fold 2 (queries 1, 3).
            ("lucky".to_string(), vec![1.0, 0.0, 1.0, 0.0]),
        ];
        assert_eq!(fold_mean(&runs[1].1, 2, 0, false), 1.0);
        assert_eq!(fold_mean(&runs[1].1, 2, 0, true), 0.0);
        let r = folds_report(&runs, 2);
        assert!(r.contains("lucky") && r.contains("beats hybrid in 1/2"), "{r}");
        // Fold 1 is chosen on fold 2 (hybrid: 0.5); fold 2 on fold 1 (lucky: 0.0).
        assert!(r.contains("fold 1: chosen on the others: hybrid → 0.5000"), "{r}");
        assert!(r.contains("fold 2: chosen on the others: lucky → 0.0000"), "{r}");
        assert!(r.contains("cross-validated nDCG@10 of the choice: 0.2500"), "{r}");
    }

    #[test]
    fn metrics_match_hand_computed_values() {
        let r = rel(&[("a", 1.0), ("b", 1.0)]);
        let ranked = docs(&["x", "a", "y", "b"]);
        // DCG = 1/log2(3) + 1/log2(5); IDCG = 1 + 1/log2(3).
        let want = (1.0 / 3f64.log2() + 1.0 / 5f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!((ndcg_at(&ranked, &r, 10) - want).abs() < 1e-12);
        assert_eq!(ndcg_at(&docs(&["a", "b"]), &r, 10), 1.0);
        assert_eq!(recall_at(&ranked, &r, 2), 0.5);
        assert_eq!(recall_at(&ranked, &r, 100), 1.0);
        assert_eq!(mrr_at(&ranked, &r, 10), 0.5);
        assert_eq!(mrr_at(&docs(&["x"]), &r, 10), 0.0);
        assert_eq!(ndcg_at(&ranked, &rel(&[]), 10), 0.0);
    }
}
