//! `ragchat bench sessions`: memory per idle session actor.

use std::time::{Duration, Instant};

use ragchat::config::Settings;
use ragchat::startup::Application;

use super::common::{rss_bytes, scratch_dir};

/// Memory per idle session actor: starts `count` sessions and compares the
/// resident set before and after (baseline: the same process before any session).
pub async fn run(mut settings: Settings, count: usize) -> anyhow::Result<String> {
    let dir = scratch_dir()?;
    settings.database.url = format!("sqlite:{}", dir.join("bench.db").display());
    settings.ledger.spool_path = dir.join("spool.jsonl").display().to_string();
    settings.server.port = 0;
    settings.sessions.idle_timeout_secs = 3600;
    let app = Application::build(settings, false).await?;
    let registry = app.state().registry.clone();
    // Warm up allocator and arbiters with a few sessions first.
    for _ in 0..100 {
        registry.session(uuid::Uuid::new_v4());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes();
    let started = Instant::now();
    for _ in 0..count {
        registry.session(uuid::Uuid::new_v4());
    }
    // Let the arbiters start every actor.
    let mut settled = rss_bytes();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = rss_bytes();
        if now == settled {
            break;
        }
        settled = now;
    }
    let elapsed = started.elapsed();
    let stats = registry.stats();
    let _ = std::fs::remove_dir_all(&dir);
    let per = settled.saturating_sub(before) as f64 / count.max(1) as f64;
    Ok(format!(
        "idle sessions: {} active; RSS before {:.1} MiB (baseline), after {:.1} MiB; {:.0} bytes per session; \
         started in {:.2} s\n",
        stats.active,
        before as f64 / 1048576.0,
        settled as f64 / 1048576.0,
        per,
        elapsed.as_secs_f64()
    ))
}
