//! `ragchat bench auth`: argon2id cost and login latency, printed next to their
//! baselines from the same run (the raw hash for login, GET /health for HTTP).

use std::time::Instant;

use ragchat::auth::PasswordHasher;
use ragchat::config::Settings;

use super::common::{ms, request, scratch_dir, serve, stats, timed, Served, Stats};

fn row(name: &str, s: &Stats) -> String {
    format!(
        "{name:<34} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        ms(s.p50),
        ms(s.p95),
        ms(s.p99),
        ms(s.mean)
    )
}

pub async fn run(mut settings: Settings, iterations: usize) -> anyhow::Result<String> {
    let n = iterations.max(5);
    let a = settings.auth.argon2;
    let hasher = PasswordHasher::new(a)?;
    let mut hashes = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        hasher.hash("benchmark-password-123")?;
        hashes.push(t.elapsed());
    }

    let dir = scratch_dir()?;
    settings.database.url = format!("sqlite:{}", dir.join("bench.db").display());
    settings.server.port = 0;
    settings.seed.demo_users = false;
    let Served { port, handle, .. } = serve(settings).await?;

    let creds = r#"{"email":"bench@example.com","password":"benchmark-password-123"}"#;
    anyhow::ensure!(
        request(port, "POST", "/auth/register", Some(creds)).await? == 201,
        "register failed"
    );
    let health = timed(port, n, "GET", "/health", None, 200).await?;
    let login = timed(port, n, "POST", "/auth/login", Some(creds), 200).await?;
    let unknown = r#"{"email":"nobody@example.com","password":"benchmark-password-123"}"#;
    let login_unknown = timed(port, n, "POST", "/auth/login", Some(unknown), 401).await?;
    handle.stop(true).await;
    let _ = std::fs::remove_dir_all(&dir);

    let hash = stats(hashes);
    let mut out = String::new();
    out.push_str(&format!(
        "argon2id m={} KiB t={} p={}, {n} iterations, sequential requests on fresh connections\n",
        a.memory_kib, a.iterations, a.parallelism
    ));
    out.push_str(&format!(
        "{:<34} {:>8} {:>8} {:>8} {:>8}\n",
        "ms", "p50", "p95", "p99", "mean"
    ));
    out.push_str(&(row("argon2id hash (baseline for login)", &hash) + "\n"));
    out.push_str(&(row("POST /auth/login (valid)", &login) + "\n"));
    out.push_str(&(row("POST /auth/login (unknown email)", &login_unknown) + "\n"));
    out.push_str(&(row("GET /health (HTTP baseline)", &health) + "\n"));
    out.push_str(&format!(
        "login overhead over hash + HTTP baseline: {:.2} ms (p50); unknown/valid login p50 ratio {:.2}\n",
        ms(login.p50) - ms(hash.p50) - ms(health.p50),
        ms(login_unknown.p50) / ms(login.p50)
    ));
    Ok(out)
}
