//! `ragchat seed`: load a corpus into the knowledge base as global documents.

use ragchat::config::Settings;
use ragchat::knowledge::seed::{self, SeedOptions};

// No doc comment here: the subcommand's help is the one on `Command::Seed`.
#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    path: std::path::PathBuf,
    /// Remove every global document first.
    #[arg(long)]
    clear_existing: bool,
    /// Read, check and chunk; store nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(args: SeedArgs, settings: Settings) -> anyhow::Result<()> {
    let opts = SeedOptions {
        clear_existing: args.clear_existing,
        dry_run: args.dry_run,
    };
    seed::cli(&settings, &args.path, opts).await?;
    Ok(())
}
