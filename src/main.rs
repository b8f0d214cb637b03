//! The ragchat command line: serve, migrate, create-user.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ragchat::accounts::{create_user, UserSpec};
use ragchat::auth::PasswordHasher;
use ragchat::config::Settings;
use ragchat::startup::Application;
use ragchat::{stores, telemetry};
use ragchat_actors::plans::Plan;

#[derive(Parser)]
#[command(
    name = "ragchat",
    version,
    about = "RAG chatbot server with accounts, plans, quotas and billing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server (settings from config/ and RAGCHAT__… variables).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Measure and print performance figures next to their baselines.
    Bench {
        #[command(subcommand)]
        what: BenchTarget,
    },
    /// Measure retrieval quality.
    Eval {
        #[command(subcommand)]
        what: EvalTarget,
    },
    /// Load a corpus into the knowledge base as global documents: a directory of
    /// .txt/.md/.html/.pdf/.jsonl files or one file (e.g. a BEIR corpus.jsonl).
    /// A running server indexes them at its next start (or use POST /admin/seed-enhanced).
    Seed {
        path: std::path::PathBuf,
        /// Remove every global document first.
        #[arg(long)]
        clear_existing: bool,
        /// Read, check and chunk; store nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Create a user account.
    CreateUser {
        #[arg(long)]
        email: String,
        #[arg(long, env = "RAGCHAT_NEW_USER_PASSWORD", hide_env_values = true)]
        password: String,
        #[arg(long, default_value = "free")]
        plan: Plan,
        #[arg(long)]
        superuser: bool,
    },
}

#[derive(Subcommand)]
enum EvalTarget {
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

#[derive(Subcommand)]
enum BenchTarget {
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
    Chat(ragchat::bench::ChatBench),
    /// Memory per idle session actor.
    Sessions {
        #[arg(long, default_value_t = 100_000)]
        count: usize,
    },
}

#[actix_web::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ragchat: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.logging);
    match run(cli.command, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "fatal");
            eprintln!("ragchat: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let env = settings.environment();
            let app = Application::build(settings, true).await?;
            tracing::info!(port = app.port(), environment = env.as_str(), "ragchat listening");
            app.run_until_stopped().await?;
            tracing::info!("ragchat stopped");
        }
        Command::Migrate => {
            let store = stores::connect_accounts(&settings.database).await?;
            println!("migrations applied ({})", store.backend());
        }
        Command::Bench {
            what: BenchTarget::Auth { iterations },
        } => {
            print!("{}", ragchat::bench::auth(settings, iterations).await?);
        }
        Command::Bench {
            what: BenchTarget::Models { seconds },
        } => {
            ragchat::bench::models(settings, seconds).await?;
        }
        Command::Eval {
            what:
                EvalTarget::Beir {
                    data,
                    split,
                    max_queries,
                    cache,
                    fusion_grid,
                },
        } => {
            let opts = ragchat::knowledge::eval::EvalOptions {
                max_queries,
                cache,
                fusion_grid,
            };
            ragchat::knowledge::eval::beir(&settings, &data, &split, opts).await?;
        }
        Command::Bench {
            what:
                BenchTarget::Search {
                    chunks,
                    queries,
                    m,
                    ef_construction,
                    ef_search,
                },
        } => {
            let config = ragchat::knowledge::hnsw::HnswConfig {
                m,
                ef_construction,
                ef_search,
            };
            for n in chunks {
                ragchat::knowledge::bench::run(n, queries, config)?;
                println!();
            }
        }
        Command::Bench {
            what: BenchTarget::Chat(opts),
        } => {
            ragchat::bench::chat(settings, opts).await?;
        }
        Command::Bench {
            what: BenchTarget::Sessions { count },
        } => {
            print!("{}", ragchat::bench::sessions(settings, count).await?);
        }
        Command::Seed {
            path,
            clear_existing,
            dry_run,
        } => {
            let opts = ragchat::knowledge::seed::SeedOptions {
                clear_existing,
                dry_run,
            };
            ragchat::knowledge::seed::cli(&settings, &path, opts).await?;
        }
        Command::CreateUser {
            email,
            password,
            plan,
            superuser,
        } => {
            let store = stores::connect_accounts(&settings.database).await?;
            let hasher = PasswordHasher::new(settings.auth.argon2)?;
            let user = create_user(
                store.as_ref(),
                &hasher,
                UserSpec {
                    email: &email,
                    password: &password,
                    plan,
                    superuser,
                },
            )
            .await?;
            println!(
                "created user {} ({}, plan {}{})",
                user.email,
                user.id,
                user.subscription_plan,
                if superuser { ", superuser" } else { "" }
            );
        }
    }
    Ok(())
}
