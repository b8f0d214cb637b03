//! `ragchat serve`: the HTTP server until SIGTERM or SIGINT.

use ragchat::config::Settings;
use ragchat::startup::Application;

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let env = settings.environment();
    let app = Application::build(settings, true).await?;
    tracing::info!(port = app.port(), environment = env.as_str(), "ragchat listening");
    app.run_until_stopped().await?;
    tracing::info!("ragchat stopped");
    Ok(())
}
