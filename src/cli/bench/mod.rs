//! `ragchat bench …`: performance figures printed next to their baselines, one
//! file per benchmark (`scripts/bench-admission` is the admission benchmark, with wrk).

mod auth;
mod chat;
mod common;
mod lanes;
mod models;
mod search;
mod sessions;

use ragchat::config::Settings;
use ragchat::knowledge::hnsw::HnswConfig;

#[derive(clap::Subcommand)]
pub enum BenchTarget {
    /// argon2id hash time and login latency (embedded store, in-process server).
    Auth {
        #[arg(long, default_value_t = 50)]
        iterations: usize,
    },
    /// Embedding and generation throughput, time to first token.
    Models {
        /// Seconds per embedding measurement.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
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
        BenchTarget::Models { seconds } => {
            models::run(settings, seconds).await?;
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
