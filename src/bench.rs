//! `ragchat bench auth`: argon2id cost and login latency, printed next to their
//! baselines from the same run (the raw hash for login, GET /health for HTTP).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::PasswordHasher;
use crate::config::Settings;
use crate::startup::Application;

struct Stats {
    p50: Duration,
    p95: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    let mean = v.iter().sum::<Duration>() / u32::try_from(v.len()).unwrap_or(u32::MAX).max(1);
    Stats { p50: at(0.5), p95: at(0.95), p99: at(0.99), mean }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(name: &str, s: &Stats) -> String {
    format!("{name:<34} {:>8.2} {:>8.2} {:>8.2} {:>8.2}", ms(s.p50), ms(s.p95), ms(s.p99), ms(s.mean))
}

/// One HTTP/1.1 request on a fresh connection; returns the status code.
async fn request(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    let head = String::from_utf8_lossy(&buf[..buf.len().min(16)]).to_string();
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {head}")))
}

async fn timed(port: u16, n: usize, method: &str, path: &str, body: Option<&str>, want: u16) -> anyhow::Result<Stats> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let status = request(port, method, path, body).await?;
        samples.push(t.elapsed());
        anyhow::ensure!(status == want, "{method} {path}: got {status}, expected {want}");
    }
    Ok(stats(samples))
}

pub async fn auth(mut settings: Settings, iterations: usize) -> anyhow::Result<String> {
    let n = iterations.max(5);
    let a = settings.auth.argon2;
    let hasher = PasswordHasher::new(a)?;
    let mut hashes = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        hasher.hash("benchmark-password-123")?;
        hashes.push(t.elapsed());
    }

    let dir = std::env::temp_dir().join(format!("ragchat-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    settings.database.url = format!("sqlite:{}", dir.join("bench.db").display());
    settings.server.port = 0;
    settings.seed.demo_users = false;
    let app = Application::build(settings, false).await?;
    let port = app.port();
    let server = app.into_server();
    let handle = server.handle();
    actix_web::rt::spawn(server);

    let creds = r#"{"email":"bench@example.com","password":"benchmark-password-123"}"#;
    anyhow::ensure!(request(port, "POST", "/auth/register", Some(creds)).await? == 201, "register failed");
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
    out.push_str(&format!("{:<34} {:>8} {:>8} {:>8} {:>8}\n", "ms", "p50", "p95", "p99", "mean"));
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

fn rss_bytes() -> u64 {
    // /proc/self/statm: size resident ... in pages.
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Memory per idle session actor: starts `count` sessions and compares the
/// resident set before and after (baseline: the same process before any session).
pub async fn sessions(mut settings: Settings, count: usize) -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("ragchat-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
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
