//! `ragchat bench …`: performance figures printed next to their baselines, one
//! file per benchmark (`scripts/bench-admission` is the admission benchmark, with wrk).

mod auth;
mod chat;
pub(super) mod common;
mod lanes;
mod models;
mod search;
mod sessions;
mod shape;

use ragchat::config::Settings;
use ragchat::knowledge::hnsw::HnswConfig;

#[derive(clap::Subcommand)]
pub enum BenchTarget {
    /// argon2id hash time and login latency (embedded store, in-process server).
    Auth {
        #[arg(long, default_value_t = 50)]
        iterations: usize,
    },
    /// Embedding and generation throughput, time to first token; with --shape,
    /// our forward on a random-weight GGUF of a real model's shape beside llama.cpp.
    Models {
        /// Seconds per embedding measurement.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// BEIR corpus.jsonl whose first 128 abstracts are the passages measured.
        #[arg(long, default_value = "../shared/data/scifact/corpus.jsonl")]
        passages: std::path::PathBuf,
        /// Measure the embeddings only.
        #[arg(long)]
        embeddings_only: bool,
        /// Measure a model shape (written once to ~/.cache/ragchat-bench) instead of
        /// the configured models.
        #[arg(long, value_enum)]
        shape: Option<shape::Shape>,
        /// The quantized layouts of the shape, comma-separated.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "q8_0,q4_k_m")]
        layouts: Vec<shape::LayoutArg>,
    },
    /// Search latency per route, ANN recall@10 and memory on synthetic chunks.
    Search {
        /// Index sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "20000,1000000")]
        chunks: Vec<usize>,
        #[arg(long, default_value_t = 200)]
        queries: usize,
        #[arg(long, default_value_t = 16)]
        m: usize,
        #[arg(long, default_value_t = 100)]
        ef_construction: usize,
        #[arg(long, default_value_t = 64)]
        ef_search: usize,
    },
    /// Chat over SciFact: requests/s and time to first token at several
    /// concurrencies (RAG and model-only baseline), memory per idle WebSocket.
    Chat(chat::ChatBench),
    /// Search latency alone and during a large upload, with the embedding
    /// worker's lanes off (the baseline) and on.
    Lanes(lanes::LanesBench),
    /// Memory per idle session actor.
    Sessions {
        #[arg(long, default_value_t = 100_000)]
        count: usize,
    },
}

pub async fn run(what: BenchTarget, settings: Settings) -> anyhow::Result<()> {
    match what {
        BenchTarget::Auth { iterations } => {
            print!("{}", auth::run(settings, iterations).await?);
        }
        BenchTarget::Models {
            shape: Some(shape),
            layouts,
            ..
        } => {
            tokio::task::spawn_blocking(move || shape::run(shape, &layouts)).await??;
        }
        BenchTarget::Models {
            seconds,
            passages,
            embeddings_only,
            ..
        } => {
            let opts = models::Options {
                seconds,
                passages,
                embeddings_only,
            };
            models::run(settings, opts).await?;
        }
        BenchTarget::Search {
            chunks,
            queries,
            m,
            ef_construction,
            ef_search,
        } => {
            let config = HnswConfig {
                m,
                ef_construction,
                ef_search,
            };
            for n in chunks {
                search::run(n, queries, config)?;
                println!();
            }
        }
        BenchTarget::Chat(opts) => {
            chat::run(settings, opts).await?;
        }
        BenchTarget::Lanes(opts) => {
            lanes::run(settings, opts).await?;
        }
        BenchTarget::Sessions { count } => {
            print!("{}", sessions::run(settings, count).await?);
        }
    }
    Ok(())
}
