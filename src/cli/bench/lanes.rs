//! `ragchat bench lanes`: search latency alone and while a large upload is being
//! embedded, with the embedding worker's lanes off (one FIFO queue: the
//! baseline, as before issue 16) and on (queries ahead of bulk forwards), in the
//! same run. Real models, the server in-process on port 0, SciFact documents
//! uploaded as `.jsonl` files over HTTP while searches arrive at a fixed pace
//! (open loop: a search is sent on schedule whether or not the last one has
//! been answered, so waiting shows in the latencies instead of being hidden).

use std::time::{Duration, Instant};

use ragchat::auth::PasswordHasher;
use ragchat::config::Settings;
use ragchat_actors::embed_worker::Lane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::common::{bench_user, ms, scratch_dir, scratch_stores, seed_corpus, serve, stats, Served};

#[derive(Debug, clap::Args)]
pub struct LanesBench {
    /// The BEIR folder (corpus.jsonl, queries.train.jsonl).
    #[arg(long, default_value = "../shared/data/scifact")]
    pub data: std::path::PathBuf,
    /// Documents uploaded during the measurement (in `.jsonl` files of
    /// `knowledge.max_upload_documents`, sent together).
    #[arg(long, default_value_t = 2000)]
    pub docs: usize,
    /// Documents indexed before, so that searches find something.
    #[arg(long, default_value_t = 100)]
    pub preload: usize,
    /// Searches measured alone (before the upload).
    #[arg(long, default_value_t = 40)]
    pub alone: usize,
    /// A search is sent every this many milliseconds.
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// Modes to run, in order: `off` (one FIFO queue), `on` (lanes).
    #[arg(long, value_delimiter = ',', default_value = "off,on")]
    pub modes: Vec<String>,
}

/// One request on a fresh connection: its status and body.
async fn post(port: u16, path: &str, token: &str, content_type: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {}", text.chars().take(40).collect::<String>())))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits for the upload job that a 202 answered `accepted` with to end: the
/// documents it created.
async fn job_created(port: u16, token: &str, accepted: &str) -> anyhow::Result<u64> {
    let job: serde_json::Value = serde_json::from_str(accepted)?;
    let id = job["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("a 202 without a job id: {accepted}"))?;
    let client = reqwest::Client::new();
    loop {
        let view: serde_json::Value = client
            .get(format!("http://127.0.0.1:{port}/knowledge/jobs/{id}"))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        match view["state"].as_str() {
            Some("queued" | "running") => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => return Ok(view["documents_created"].as_u64().unwrap_or(0)),
        }
    }
}

/// A `multipart/form-data` body with one file field.
fn multipart(filename: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    let boundary = format!("ragchat-bench-{}", uuid::Uuid::new_v4().simple());
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: application/jsonl\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// One search as the client saw it.
struct Sample {
    latency: Duration,
    status: u16,
}

/// Sends a search every `interval` until `stop(searches sent)`; returns every
/// answer, waited for.
async fn searches(
    port: u16,
    token: &str,
    queries: &[String],
    interval: Duration,
    stop: impl Fn(usize) -> bool,
) -> Vec<Sample> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0.. {
        if stop(i) {
            break;
        }
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
        let body = serde_json::json!({"query": queries[i % queries.len()], "route": "hybrid", "top_k": 5}).to_string();
        let token = token.to_string();
        tasks.push(actix_web::rt::spawn(async move {
            let t = Instant::now();
            let status = post(port, "/knowledge/search", &token, "application/json", body.as_bytes())
                .await
                .map_or(0, |(s, _)| s);
            Sample {
                latency: t.elapsed(),
                status,
            }
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(s) = t.await {
            out.push(s);
        }
    }
    out
}

fn line(mode: &str, phase: &str, samples: &[Sample]) {
    let ok: Vec<Duration> = samples.iter().filter(|s| s.status == 200).map(|s| s.latency).collect();
    let refused = samples.iter().filter(|s| s.status == 503).count();
    let other = samples.len() - ok.len() - refused;
    if ok.is_empty() {
        println!(
            "{mode:<6} {phase:<16} {:>8} {:>9} {:>10} {:>10} {:>10} {:>8}",
            samples.len(),
            0,
            "-",
            "-",
            "-",
            refused
        );
        return;
    }
    let max = ok.iter().max().copied().unwrap_or_default();
    let s = stats(ok.clone());
    println!(
        "{mode:<6} {phase:<16} {:>8} {:>9} {:>10.0} {:>10.0} {:>10.0} {:>8}{}",
        samples.len(),
        ok.len(),
        ms(s.p50),
        ms(s.p99),
        ms(max),
        refused,
        if other > 0 {
            format!("  ({other} other failures)")
        } else {
            String::new()
        }
    );
}

pub async fn run(settings: Settings, opts: LanesBench) -> anyhow::Result<()> {
    let corpus = std::fs::read_to_string(opts.data.join("corpus.jsonl"))?;
    let lines: Vec<&str> = corpus.lines().filter(|l| !l.trim().is_empty()).collect();
    anyhow::ensure!(
        lines.len() >= opts.preload + opts.docs,
        "the corpus has {} documents; {} needed",
        lines.len(),
        opts.preload + opts.docs
    );
    let queries: Vec<String> = std::fs::read_to_string(opts.data.join("queries.train.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_string))
        .collect();
    anyhow::ensure!(!queries.is_empty(), "no queries in queries.train.jsonl");
    let per_file = settings.knowledge.max_upload_documents.max(1);
    let files: Vec<Vec<u8>> = lines[opts.preload..opts.preload + opts.docs]
        .chunks(per_file)
        .map(|c| c.join("\n").into_bytes())
        .collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "machine: {threads} threads; embedding model {} (embed_max_batch {}); {} SciFact documents uploaded as {} .jsonl files \
         sent together, after {} preloaded; a hybrid search every {} ms (open loop), fresh connections",
        settings.models.embedding_dir,
        settings.models.embed_max_batch,
        opts.docs,
        files.len(),
        opts.preload,
        opts.interval_ms
    );
    println!(
        "{:<6} {:<16} {:>8} {:>9} {:>10} {:>10} {:>10} {:>8}",
        "lanes", "searches", "sent", "answered", "p50 ms", "p99 ms", "max ms", "503"
    );
    let interval = Duration::from_millis(opts.interval_ms.max(1));
    let mut notes = Vec::new();
    for mode in &opts.modes {
        let lanes = match mode.as_str() {
            "on" => true,
            "off" => false,
            other => anyhow::bail!("--modes: '{other}' is neither on nor off"),
        };
        let dir = scratch_dir()?;
        let file = |name: &str| dir.join(name).display().to_string();
        let mut s = settings.clone();
        scratch_stores(&mut s, &dir);
        s.rate_limits.search.limit = 1_000_000;
        s.rate_limits.api.limit = 1_000_000;
        s.models.embed_lanes = lanes;
        // The generation model is not needed here (and would take memory).
        s.models.generator_path = file("no-generator.gguf");
        let Served { state, port, handle } = serve(s.clone()).await?;
        let embedder = state
            .embedder
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the embedding model is not loaded"))?;

        // Preload (not measured), through the seeding path.
        let preload_path = dir.join("preload.jsonl");
        std::fs::write(&preload_path, lines[..opts.preload].join("\n"))?;
        seed_corpus(&state, &s, &preload_path).await?;

        let hasher = PasswordHasher::new(s.auth.argon2)?;
        let token = bench_user(
            &state,
            &hasher,
            "bench-lanes@example.com",
            ragchat_actors::plans::Plan::Enterprise,
        )
        .await?;

        let alone = searches(port, &token, &queries, interval, |sent| sent >= opts.alone).await;
        line(mode, "alone", &alone);

        // One bulk forward, the unit a search waits for with lanes on: the first
        // `embed_max_batch` documents of the upload as ingestion embeds them
        // (title, newline, text; the model reads the first 256 tokens), three
        // times, the median.
        let batch: Vec<String> = lines[opts.preload..]
            .iter()
            .take(s.models.embed_max_batch.max(1))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                ragchat::knowledge::ingest::embedding_text(
                    v["title"].as_str().unwrap_or_default(),
                    v["text"].as_str().unwrap_or_default(),
                )
            })
            .collect();
        let mut forward_times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            embedder.embed(Lane::Bulk, batch.clone()).await?;
            forward_times.push(t.elapsed());
        }
        forward_times.sort();
        let forward = forward_times[1];

        // The upload: every file at once; searches keep coming until it is done.
        let forwards_before = embedder.stats.batches.load(std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        let upload = {
            let files = files.clone();
            let token = token.clone();
            actix_web::rt::spawn(async move {
                let sends = files.iter().enumerate().map(|(i, f)| {
                    let (content_type, body) = multipart(&format!("part-{i}.jsonl"), f);
                    let token = token.clone();
                    async move { post(port, "/knowledge/documents", &token, &content_type, &body).await }
                });
                let mut created = 0u64;
                for r in futures_util::future::join_all(sends).await {
                    match r {
                        Ok((201, body)) => {
                            created += serde_json::from_str::<serde_json::Value>(&body)
                                .ok()
                                .and_then(|v| v["created"].as_u64())
                                .unwrap_or(0)
                        }
                        // A large upload is a job (202): the upload lasts until it ends.
                        Ok((202, body)) => match job_created(port, &token, &body).await {
                            Ok(n) => created += n,
                            Err(e) => eprintln!("upload job: {e}"),
                        },
                        Ok((status, body)) => {
                            eprintln!("upload: {status} {}", body.chars().take(200).collect::<String>())
                        }
                        Err(e) => eprintln!("upload: {e}"),
                    }
                }
                (created, started.elapsed())
            })
        };
        let during = searches(port, &token, &queries, interval, |_| upload.is_finished()).await;
        let (created, took) = upload.await.unwrap_or_default();
        let forwards = embedder.stats.batches.load(std::sync::atomic::Ordering::Relaxed) - forwards_before;
        line(mode, "during upload", &during);
        notes.push(format!(
            "{mode:<6} upload: {created} documents stored in {:.1} s; {forwards} forwards in all (bulk and searches); \
             one bulk forward of {} texts alone: {:.0} ms",
            took.as_secs_f64(),
            batch.len(),
            ms(forward)
        ));
        handle.stop(true).await;
        drop(state);
        let _ = std::fs::remove_dir_all(&dir);
    }
    for n in notes {
        println!("{n}");
    }
    Ok(())
}
