//! `ragchat bench search`: search latency per route and ANN recall at scale, on
//! synthetic chunks shaped like real ones: 384-dimensional unit vectors around
//! topics (about 0.7 cosine from their topic, as sentence embeddings of one
//! subject are), and text mixing a topic's keywords with common words.
//! Baselines in the same run: the exact vector scan (for recall@10 and time).

use std::time::{Duration, Instant};

use chrono::Utc;
use ragchat::knowledge::calibration;
use ragchat::knowledge::hnsw::HnswConfig;
use ragchat::knowledge::index::{Fusion, HybridIndex, EXACT_MAX, FUSION_DEPTH};
use ragchat_actors::knowledge::{Chunk, Document, Owner, Reader};
use ragchat_actors::retrieval::{Condition, Filters, Route};
use serde_json::json;
use uuid::Uuid;

const DIM: usize = 384;

/// One timed query: its text and its vector.
type QueryFn<'a> = dyn FnMut(&(String, Vec<f32>)) -> anyhow::Result<()> + 'a;
const VOCABULARY: usize = 30_000;

/// A small deterministic generator (the figures must be reproducible).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn uniform(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32
    }
    /// Roughly normal (sum of four uniforms).
    fn normal(&mut self) -> f32 {
        (self.uniform() + self.uniform() + self.uniform() + self.uniform() - 2.0) * 1.732
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() as usize) % n.max(1)
    }
    /// Zipf-like rank: common words often, rare words rarely.
    fn zipf(&mut self, n: usize) -> usize {
        let u = self.uniform().max(1e-9);
        ((n as f32).powf(u) as usize).saturating_sub(1).min(n - 1)
    }
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

fn word(i: usize) -> String {
    // Pronounceable, distinct, unaffected by stemming: consonant-vowel syllables.
    const C: &[u8] = b"bdfgklmnprstvz";
    const V: &[u8] = b"aeiou";
    let mut s = String::new();
    let mut x = i + 1;
    while x > 0 {
        s.push(C[x % C.len()] as char);
        x /= C.len();
        s.push(V[x % V.len()] as char);
        x /= V.len();
    }
    s.push('x');
    s
}

struct Topic {
    center: Vec<f32>,
    keywords: Vec<usize>,
}

fn topics(n: usize, rng: &mut Rng) -> Vec<Topic> {
    (0..n)
        .map(|_| Topic {
            center: unit((0..DIM).map(|_| rng.normal()).collect()),
            keywords: (0..12).map(|_| rng.below(VOCABULARY)).collect(),
        })
        .collect()
}

/// A point about 0.7 cosine from the topic's center.
fn around(center: &[f32], rng: &mut Rng) -> Vec<f32> {
    let noise: Vec<f32> = unit((0..DIM).map(|_| rng.normal()).collect());
    unit(center.iter().zip(noise).map(|(c, n)| c + n).collect())
}

fn pct(mut v: Vec<Duration>, q: f64) -> f64 {
    v.sort();
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0.0, |pages| (pages * 4096) as f64 / (1 << 20) as f64)
}

/// Builds an index of `chunks` synthetic chunks and measures every route.
pub fn run(chunks: usize, queries: usize, hnsw: HnswConfig) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut say = |line: String| {
        println!("{line}");
        out.push_str(&line);
        out.push('\n');
    };
    let mut rng = Rng(42);
    let n_topics = (chunks / 100).max(10);
    let topics = topics(n_topics, &mut rng);
    let rss_before = rss_mb();
    let started = Instant::now();
    let mut index = HybridIndex::new()?.with_vector_search(EXACT_MAX, hnsw);
    let per_doc = 4;
    let mut made = 0;
    while made < chunks {
        let t = &topics[rng.below(n_topics)];
        let id = Uuid::new_v4();
        let n = per_doc.min(chunks - made);
        let doc_chunks: Vec<Chunk> = (0..n)
            .map(|i| {
                let words: Vec<String> = (0..60)
                    .map(|_| {
                        if rng.below(3) == 0 {
                            word(t.keywords[rng.below(t.keywords.len())])
                        } else {
                            word(rng.zipf(VOCABULARY))
                        }
                    })
                    .collect();
                Chunk {
                    id: Uuid::new_v4(),
                    document_id: id,
                    ordinal: i as u32,
                    content: words.join(" "),
                    embedding: around(&t.center, &mut rng),
                }
            })
            .collect();
        let doc = Document {
            id,
            owner: Owner::Global,
            title: word(t.keywords[0]),
            source: String::new(),
            origin: "seed".into(),
            content_hash: String::new(),
            size_bytes: 0,
            metadata: json!({"bucket": made / per_doc % 10})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            chunk_count: n as u32,
            created_at: Utc::now(),
        };
        index.add(&doc, &doc_chunks)?;
        made += n;
        if made % 100_000 < per_doc {
            eprintln!("  {made} chunks generated ({:.0} s)", started.elapsed().as_secs_f64());
        }
    }
    let generated = started.elapsed().as_secs_f64();
    let commit_start = Instant::now();
    index.commit()?;
    let built = commit_start.elapsed().as_secs_f64();
    let rss_after = rss_mb();
    say(format!(
        "{chunks} chunks ({n_topics} topics): generated and added in {generated:.1} s, committed (BM25 + HNSW M={} ef_construction={}) in {built:.1} s; resident memory +{:.0} MB ({:.0} MB vectors and graph)",
        hnsw.m,
        hnsw.ef_construction,
        rss_after - rss_before,
        index.vector_memory_bytes() as f64 / (1 << 20) as f64
    ));

    let reader = Reader {
        user_id: Uuid::nil(),
        organization_id: None,
    };
    let none = Filters::new();
    let bucket: Filters = [("bucket".to_string(), Condition::Equals(json!(3)))]
        .into_iter()
        .collect();
    let qs: Vec<(String, Vec<f32>)> = (0..queries)
        .map(|_| {
            let t = &topics[rng.below(n_topics)];
            let words: Vec<String> = (0..4)
                .map(|i| {
                    if i < 3 {
                        word(t.keywords[rng.below(t.keywords.len())])
                    } else {
                        word(rng.zipf(VOCABULARY))
                    }
                })
                .collect();
            (words.join(" "), around(&t.center, &mut rng))
        })
        .collect();
    say(format!(
        "{:<44} {:>8} {:>8}   (top_k 10, {queries} queries, one thread)",
        "route", "p50 ms", "p99 ms"
    ));
    let mut time = |name: &str, f: &mut QueryFn| -> anyhow::Result<()> {
        let mut samples = Vec::with_capacity(qs.len());
        for q in &qs {
            let t = Instant::now();
            f(q)?;
            samples.push(t.elapsed());
        }
        say(format!(
            "{name:<44} {:>8.2} {:>8.2}",
            pct(samples.clone(), 0.5),
            pct(samples, 0.99)
        ));
        Ok(())
    };
    let ann = chunks > EXACT_MAX;
    // Hybrid with its default fusion (lists scaled at, and fetched to, rank
    // FUSION_DEPTH), then at rank 100 (the default until 2026-12-02).
    let shallow = Fusion::Convex { alpha: 0.5, depth: 100 };
    let default_name = format!("hybrid (fusion of vector and text, depth {FUSION_DEPTH})");
    // bge-small's ranking (production's model): its calibrated scores' sum.
    let logistic = Fusion::ranking_of(&calibration::BGE_SMALL);
    for (name, route, fusion) in [
        ("text (BM25)", Route::Text, Fusion::default()),
        (default_name.as_str(), Route::Hybrid, Fusion::default()),
        ("hybrid (fusion depth 100)", Route::Hybrid, shallow),
        ("hybrid (logistic, bge-small)", Route::Hybrid, logistic),
    ] {
        index.set_fusion(fusion);
        time(name, &mut |(text, v)| {
            index.search(text, Some(v), route, &reader, &none, 10)?;
            Ok(())
        })?;
    }
    index.set_fusion(Fusion::default());
    time(
        if ann {
            "vector (HNSW)"
        } else {
            "vector (exact: under the HNSW threshold)"
        },
        &mut |(_, v)| {
            index.vector_search(v, &reader, &none, 10);
            Ok(())
        },
    )?;
    time(
        if ann {
            "vector (HNSW), filter keeping 10%"
        } else {
            "vector (exact), filter keeping 10%"
        },
        &mut |(_, v)| {
            index.vector_search(v, &reader, &bucket, 10);
            Ok(())
        },
    )?;
    time("baseline: vector, exact scan", &mut |(_, v)| {
        index.vector_exact_search(v, &reader, &none, 10);
        Ok(())
    })?;
    // Recall@10 of the vector route against the exact scan.
    let (mut hit, mut hit_filtered) = (0usize, 0usize);
    for (_, v) in &qs {
        let exact: Vec<usize> = index
            .vector_exact_search(v, &reader, &none, 10)
            .into_iter()
            .map(|x| x.0)
            .collect();
        hit += index
            .vector_search(v, &reader, &none, 10)
            .iter()
            .filter(|x| exact.contains(&x.0))
            .count();
        let exact: Vec<usize> = index
            .vector_exact_search(v, &reader, &bucket, 10)
            .into_iter()
            .map(|x| x.0)
            .collect();
        hit_filtered += index
            .vector_search(v, &reader, &bucket, 10)
            .iter()
            .filter(|x| exact.contains(&x.0))
            .count();
    }
    say(format!(
        "recall@10 of the vector route against the exact scan: {:.3} (with the 10% filter: {:.3})",
        hit as f64 / (qs.len() * 10) as f64,
        hit_filtered as f64 / (qs.len() * 10) as f64
    ));
    // The on-disk snapshot: written, then read back (a restart's cost).
    let dir = std::env::temp_dir().join(format!("ragchat-bench-index-{}", Uuid::new_v4()));
    let t = Instant::now();
    index.save(&dir)?;
    let saved = t.elapsed().as_secs_f64();
    let bytes: u64 = walk_size(&dir);
    drop(index);
    let t = Instant::now();
    let back = HybridIndex::load(&dir)?.ok_or_else(|| anyhow::anyhow!("the snapshot did not read back"))?;
    let loaded = t.elapsed().as_secs_f64();
    say(format!(
        "snapshot: written in {saved:.1} s ({:.0} MB), read back with BM25 re-indexed in {loaded:.1} s ({} chunks)",
        bytes as f64 / (1 << 20) as f64,
        back.len()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

fn walk_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk_size(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    })
}
