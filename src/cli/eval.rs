//! `ragchat eval …`: retrieval quality.

use ragchat::config::Settings;

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
    },
}

pub async fn run(what: EvalTarget, settings: Settings) -> anyhow::Result<()> {
    match what {
        EvalTarget::Beir {
            data,
            split,
            max_queries,
            cache,
            fusion_grid,
        } => {
            let opts = ragchat::knowledge::eval::EvalOptions {
                max_queries,
                cache,
                fusion_grid,
            };
            ragchat::knowledge::eval::beir(&settings, &data, &split, opts).await?;
        }
    }
    Ok(())
}
