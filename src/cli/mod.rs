//! The ragchat command line: the clap definitions and the dispatch to one module per
//! command (serve, migrate, create-user, seed, eval, bench). The benchmarks and the
//! evaluation live here, in the binary; the server library never imports them.

mod bench;
mod create_user;
mod eval;
mod eval_answers;
mod migrate;
mod seed;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ragchat::config::Settings;
use ragchat::telemetry;

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
        what: bench::BenchTarget,
    },
    /// Measure retrieval quality.
    Eval {
        #[command(subcommand)]
        what: eval::EvalTarget,
    },
    /// Load a corpus into the knowledge base as global documents: a directory of
    /// .txt/.md/.html/.pdf/.jsonl files or one file (e.g. a BEIR corpus.jsonl).
    /// A running server indexes them at its next start (or use POST /admin/seed-enhanced).
    Seed(seed::SeedArgs),
    /// Create a user account.
    CreateUser(create_user::CreateUserArgs),
}

/// Parses the command line, loads the settings, starts logging and runs the command.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ragchat: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.logging);
    ragchat::memory::configure(&settings.memory);
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
        Command::Serve => serve::run(settings).await,
        Command::Migrate => migrate::run(settings).await,
        Command::Bench { what } => bench::run(what, settings).await,
        Command::Eval { what } => eval::run(what, settings).await,
        Command::Seed(args) => seed::run(args, settings).await,
        Command::CreateUser(args) => create_user::run(args, settings).await,
    }
}
