//! `ragchat migrate`: apply the database migrations and exit.

use ragchat::config::Settings;
use ragchat::stores;

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let store = stores::connect_accounts(&settings.database).await?;
    println!("migrations applied ({})", store.backend());
    Ok(())
}
