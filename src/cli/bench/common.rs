//! What the benchmarks share: latency statistics, plain HTTP/1.1 requests on fresh
//! connections, the process's resident set, a scratch folder and benchmark users.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Stats {
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub mean: Duration,
}

pub fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    let mean = v.iter().sum::<Duration>() / u32::try_from(v.len()).unwrap_or(u32::MAX).max(1);
    Stats {
        p50: at(0.5),
        p95: at(0.95),
        p99: at(0.99),
        mean,
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One HTTP/1.1 request on a fresh connection; returns the status code.
pub async fn request(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<u16> {
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

pub async fn timed(
    port: u16,
    n: usize,
    method: &str,
    path: &str,
    body: Option<&str>,
    want: u16,
) -> anyhow::Result<Stats> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let status = request(port, method, path, body).await?;
        samples.push(t.elapsed());
        anyhow::ensure!(status == want, "{method} {path}: got {status}, expected {want}");
    }
    Ok(stats(samples))
}

pub fn rss_bytes() -> u64 {
    // /proc/self/statm: size resident ... in pages.
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// A fresh folder under the system's temporary directory for one run's files.
pub fn scratch_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("ragchat-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A benchmark user created in the server's store, with an access token of a login
/// of its own that has no refresh token (nothing can end it).
pub async fn bench_user(
    state: &ragchat::http::AppState,
    hasher: &ragchat::auth::PasswordHasher,
    email: &str,
    plan: ragchat_actors::plans::Plan,
) -> anyhow::Result<String> {
    let user = ragchat::accounts::create_user(
        state.accounts.as_ref(),
        hasher,
        ragchat::accounts::UserSpec {
            email,
            password: "benchmark-password-123",
            plan,
            superuser: false,
        },
    )
    .await?;
    Ok(state.tokens.issue(user.id, uuid::Uuid::new_v4())?)
}

/// A server started in this process for a benchmark: its state, its port and the
/// handle that stops it.
pub struct Served {
    pub state: ragchat::http::AppState,
    pub port: u16,
    pub handle: actix_web::dev::ServerHandle,
}

pub async fn serve(settings: ragchat::config::Settings) -> anyhow::Result<Served> {
    let app = ragchat::startup::Application::build(settings, false).await?;
    let (state, port) = (app.state().clone(), app.port());
    let server = app.into_server();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    Ok(Served { state, port, handle })
}

/// Seeds a JSONL corpus into the served knowledge base through the path of
/// `ragchat seed`: (documents created, chunks).
pub async fn seed_corpus(
    state: &ragchat::http::AppState,
    settings: &ragchat::config::Settings,
    corpus: &std::path::Path,
) -> anyhow::Result<(usize, usize)> {
    let ingestor = state
        .ingestor
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the embedding model is not loaded: run scripts/fetch-models"))?;
    let status = state.seed.clone();
    ragchat::knowledge::seed::begin(&status, corpus, Default::default())?;
    ragchat::knowledge::seed::run(
        &ingestor,
        corpus,
        Default::default(),
        (
            ragchat::knowledge::ingest::DocLimits::of(&settings.knowledge),
            ragchat::knowledge::formats::FormatLimits::of(&settings.knowledge),
        ),
        status.clone(),
        &|_| {},
    )
    .await;
    let seeded = status
        .lock()
        .map(|s| (s.documents_created, s.chunks))
        .unwrap_or_default();
    Ok(seeded)
}

/// Points `settings` at embedded stores in the scratch folder `dir` (SQLite
/// files, an in-memory index, a spool there), on port 0, without demo users.
pub fn scratch_stores(settings: &mut ragchat::config::Settings, dir: &std::path::Path) {
    let file = |name: &str| dir.join(name).display().to_string();
    settings.database.url = format!("sqlite:{}", file("bench.db"));
    settings.knowledge.sqlite_url = format!("sqlite:{}", file("knowledge.db"));
    settings.knowledge.index_dir = String::new();
    settings.chat.sqlite_url = format!("sqlite:{}", file("chat.db"));
    settings.ledger.spool_path = file("spool.jsonl");
    settings.server.port = 0;
    settings.seed.demo_users = false;
}
