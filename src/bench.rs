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
    Stats {
        p50: at(0.5),
        p95: at(0.95),
        p99: at(0.99),
        mean,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(name: &str, s: &Stats) -> String {
    format!(
        "{name:<34} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        ms(s.p50),
        ms(s.p95),
        ms(s.p99),
        ms(s.mean)
    )
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

/// Sentences of about 45 tokens for the embedding benchmark.
fn sentences(n: usize) -> Vec<String> {
    let base = [
        "Recent studies of the human gut microbiome suggest that dietary fiber intake changes the composition of bacterial communities within weeks",
        "The committee reviewed the proposal for the new railway line and asked the engineers to estimate the cost of the tunnel under the river",
        "Patients who received the combined therapy showed a lower rate of hospital readmission than those treated with the standard drug alone",
        "Volunteers planted more than three thousand trees along the northern edge of the park to reduce noise from the nearby highway traffic",
    ];
    (0..n)
        .map(|i| {
            format!(
                "{}, according to a report published last spring by the regional authority ({i}).",
                base[i % base.len()]
            )
        })
        .collect()
}

/// `ragchat bench models`: embeddings (sentences/s at batch 1, 8, 32) and
/// generation (prefill and decode tokens/s, aggregate decode with 8 streams, time to
/// first token with a 1,000-token prompt at 1 and 8 concurrent requests), printed
/// beside the reference figures of llama.cpp and sentence-transformers measured on
/// the development machine (their tools are not installed here).
pub async fn models(settings: Settings, seconds: f64) -> anyhow::Result<String> {
    use ragchat_actors::embed_worker::{EmbedConfig, EmbedWorker};
    use ragchat_actors::generate_worker::{GenEvent, GenerateConfig, GenerateRequest, GenerateWorker};
    use ragchat_actors::inference::{Embedder, SamplingParams};

    let m = &settings.models;
    let mut out = String::new();
    // Lines are printed as they are measured (the whole run takes minutes).
    fn emit(out: &mut String, line: String) {
        print!("{line}");
        out.push_str(&line);
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    emit(
        &mut out,
        format!(
            "machine: {threads} threads; models from {} and {}\n",
            m.embedding_dir, m.generator_path
        ),
    );

    // Embeddings, straight on the model (batch sizes exact), then through the worker.
    let mut bert =
        crate::inference::bert::BertEmbedder::load(std::path::Path::new(&m.embedding_dir), m.embedding_max_tokens)?;
    let texts = sentences(256);
    let tokens = bert.count_tokens(&texts[0])?;
    emit(&mut out, format!("\nembeddings (all-MiniLM-L6-v2, {tokens}-token sentences)   ragchat   sentence-transformers*   stock candle*\n"));
    for (batch, st, stock) in [(1usize, 51.0, 39.0), (8, 91.0, 53.0), (32, 107.0, 65.0)] {
        let mut done = 0usize;
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < seconds {
            let refs: Vec<&str> = texts.iter().skip(done % 128).take(batch).map(String::as_str).collect();
            bert.embed(&refs)?;
            done += batch;
        }
        let rate = done as f64 / started.elapsed().as_secs_f64();
        emit(&mut out, format!("  batch {batch:>2}: sentences/s                        {rate:>8.1}   {st:>8.1}                {stock:>8.1}\n"));
    }
    let worker = EmbedWorker::start(
        {
            let dir = std::path::PathBuf::from(&m.embedding_dir);
            let max = m.embedding_max_tokens;
            Box::new(move || {
                crate::inference::bert::BertEmbedder::load(&dir, max).map(|e| Box::new(e) as Box<dyn Embedder>)
            })
        },
        EmbedConfig {
            max_batch: m.embed_max_batch,
            max_wait: Duration::from_millis(m.embed_max_wait_ms),
            queue_capacity: 1024,
        },
    )?;
    let started = Instant::now();
    let calls = texts.iter().take(128).map(|t| worker.embed(vec![t.clone()]));
    futures_util::future::join_all(calls).await;
    let rate = 128.0 / started.elapsed().as_secs_f64();
    let batches = worker.stats.batches.load(std::sync::atomic::Ordering::Relaxed);
    emit(&mut out, format!("  128 concurrent single-sentence requests through EmbedWorker: {rate:.1} sentences/s in {batches} forwards\n"));

    // Generation.
    let (lm, tok) = crate::inference::gguf::load(
        std::path::Path::new(&m.generator_path),
        None,
        m.max_context,
        m.dense_prefill,
    )?;
    let filler = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the field. ";
    let mut prompt_text = String::new();
    while tok.encode(&prompt_text)?.len() < 1000 {
        prompt_text.push_str(filler);
    }
    let mut long_prompt = tok.encode(&prompt_text)?;
    long_prompt.truncate(1000);
    let short: Vec<u32> = long_prompt[..256].to_vec();

    let mut seq = lm.fork();
    let started = Instant::now();
    seq.forward(&short, 0)?;
    let prefill = short.len() as f64 / started.elapsed().as_secs_f64();
    let decode_n = 64;
    let started = Instant::now();
    for pos in short.len()..short.len() + decode_n {
        seq.forward(&[short[pos % short.len()]], pos)?;
    }
    let decode_after_prompt = decode_n as f64 / started.elapsed().as_secs_f64();
    // As llama-bench's tg64: 64 tokens from an empty context.
    let mut seq = lm.fork();
    let started = Instant::now();
    for pos in 0..decode_n {
        seq.forward(&[short[pos % short.len()]], pos)?;
    }
    let decode = decode_n as f64 / started.elapsed().as_secs_f64();
    let (lc_pp, lc_tg, lc_note) = match llama_bench(&m.generator_path) {
        Some((pp, tg)) => (pp, tg, "llama.cpp (measured now)"),
        None => (205.0, 90.0, "llama.cpp*"),
    };
    emit(
        &mut out,
        format!("\ngeneration (SmolLM2-135M-Instruct Q4_1)              ragchat   {lc_note}   stock candle*\n"),
    );
    emit(
        &mut out,
        format!(
            "  prefill tok/s (256-token prompt)                 {prefill:>8.1}   {lc_pp:>8.1}     {:>8.1}\n",
            67.0
        ),
    );
    emit(
        &mut out,
        format!(
            "  decode tok/s, 1 stream (tg64, empty context)     {decode:>8.1}   {lc_tg:>8.1}     {:>8.1}\n",
            50.0
        ),
    );
    emit(
        &mut out,
        format!(
            "  decode tok/s, 1 stream after a 256-token prompt  {decode_after_prompt:>8.1}   {:>8}     {:>8}\n",
            "n/a", "n/a"
        ),
    );

    // Eight sequences decoding together, straight on the model (what llama.cpp's
    // batched bench measures: decode only, prompts already in the caches).
    let mut seqs: Vec<Box<dyn ragchat_actors::inference::CausalLm>> = (0..8).map(|_| lm.fork()).collect();
    for s in seqs.iter_mut() {
        s.forward(&short[..32], 0)?;
    }
    let started = Instant::now();
    for step in 0..decode_n {
        let mut refs: Vec<&mut Box<dyn ragchat_actors::inference::CausalLm>> = seqs.iter_mut().collect();
        let toks: Vec<u32> = (0..8).map(|i| short[(step + i) % short.len()]).collect();
        lm.decode_batch(&mut refs, &toks, &[32 + step; 8])?;
    }
    let batched = (8 * decode_n) as f64 / started.elapsed().as_secs_f64();
    drop(seqs);
    let (lc_b8, lc_b8_note) = match llama_batched_bench(&m.generator_path) {
        Some(v) => (format!("{v:>8.1}"), "llama-batched-bench, measured now"),
        None => (format!("{:>8}", "n/a"), "llama-batched-bench not built"),
    };
    emit(
        &mut out,
        format!(
            "  decode tok/s, 8 sequences in one batch (model)   {batched:>8.1}   {lc_b8}     {:>8}   ({lc_b8_note})\n",
            "n/a"
        ),
    );

    let gen = GenerateWorker::start(
        Box::new(move || Ok(lm.fork())),
        tok.clone(),
        GenerateConfig {
            max_active: 8,
            queue_capacity: 64,
            // Whole prompts, as the figures in BENCHMARKS.md were measured.
            prefill_chunk: 0,
        },
    )?;
    let greedy = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
        seed: Some(1),
    };
    let run = |prompt: Vec<u32>, max_tokens: usize| {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let submitted = Instant::now();
        let ok = gen.submit(GenerateRequest {
            prompt_tokens: prompt,
            params: greedy.clone(),
            max_tokens,
            stop: vec![],
            events: tx,
        });
        async move {
            ok.map_err(|e| anyhow::anyhow!(e.to_string()))?;
            let mut first = None;
            let mut n = 0usize;
            while let Some(ev) = rx.recv().await {
                match ev {
                    GenEvent::Token { .. } => {
                        first.get_or_insert_with(|| submitted.elapsed());
                    }
                    GenEvent::Done { completion_tokens, .. } => {
                        n = completion_tokens;
                        break;
                    }
                    GenEvent::Error(e, _) => anyhow::bail!(e),
                }
            }
            Ok::<_, anyhow::Error>((first.unwrap_or_default(), n))
        }
    };
    let started = Instant::now();
    let streams = futures_util::future::join_all((0..8).map(|_| run(short[..32].to_vec(), 64))).await;
    let total: usize = streams.iter().filter_map(|r| r.as_ref().ok()).map(|r| r.1).sum();
    let aggregate = total as f64 / started.elapsed().as_secs_f64();
    let ttft1 = run(long_prompt.clone(), 1).await?.0;
    let ttft8: Vec<Duration> = futures_util::future::join_all((0..8).map(|_| run(long_prompt.clone(), 1)))
        .await
        .into_iter()
        .filter_map(|r| r.ok().map(|x| x.0))
        .collect();
    let ttft8_max = ttft8.iter().max().copied().unwrap_or_default();
    let ttft8_mean = ttft8.iter().sum::<Duration>() / u32::try_from(ttft8.len().max(1)).unwrap_or(1);

    emit(
        &mut out,
        format!(
            "  decode tok/s, 8 streams through GenerateWorker   {aggregate:>8.1}   {:>8.1}     {:>8}   (with their prefills)\n",
            122.0, "n/a"
        ),
    );
    emit(
        &mut out,
        format!(
            "  time to first token, 1000-token prompt: 1 request {:.0} ms; 8 concurrent mean {:.0} ms, max {:.0} ms\n",
            ms(ttft1),
            ms(ttft8_mean),
            ms(ttft8_max)
        ),
    );
    emit(&mut out, String::from("\n* reference figures from issue 5 (development machine), shown where the tool is not installed here; llama.cpp is measured now when scripts/build-llama-cpp has built it.\n"));
    Ok(out)
}

/// A llama.cpp tool built by scripts/build-llama-cpp, if it is there.
fn llama_cpp_bin(name: &str) -> Option<std::path::PathBuf> {
    let home = std::env::var("HOME").ok()?;
    Some(
        std::path::Path::new(&home)
            .join(".cache/ragchat-llama-cpp/bin")
            .join(name),
    )
    .filter(|p| p.exists())
}

/// llama.cpp's llama-batched-bench with 8 sequences of 32 + 64 tokens, 2 threads:
/// the aggregate decode rate (S_TG, tok/s), when it is installed.
fn llama_batched_bench(gguf: &str) -> Option<f64> {
    // LLAMA_BENCH naming a missing file turns both llama.cpp baselines off.
    if std::env::var("LLAMA_BENCH").is_ok_and(|v| !std::path::Path::new(&v).exists()) {
        return None;
    }
    let bin = llama_cpp_bin("llama-batched-bench")?;
    let out = std::process::Command::new(bin)
        .args([
            "-m", gguf, "-t", "2", "-c", "4096", "-npp", "32", "-ntg", "64", "-npl", "8",
        ])
        .output()
        .ok()?;
    // Table row: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let cells: Vec<&str> = l.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        (cells.len() >= 8 && cells[2] == "8")
            .then(|| cells[7].parse().ok())
            .flatten()
    })
}

/// Runs llama.cpp's llama-bench on the same GGUF with 2 threads when it is installed
/// (scripts/build-llama-cpp, or LLAMA_BENCH=path): (prefill pp256, decode tg64) tok/s.
fn llama_bench(gguf: &str) -> Option<(f64, f64)> {
    let bin = match std::env::var("LLAMA_BENCH") {
        Ok(path) => Some(std::path::PathBuf::from(path)).filter(|p| p.exists())?,
        Err(_) => llama_cpp_bin("llama-bench")?,
    };
    let out = std::process::Command::new(bin)
        .args(["-m", gguf, "-t", "2", "-p", "256", "-n", "64", "-r", "5", "-o", "json"])
        .output()
        .ok()?;
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let rate = |prompt: bool| {
        rows.as_array()?.iter().find_map(|r| {
            let is_prompt = r["n_prompt"].as_u64().unwrap_or(0) > 0 && r["n_gen"].as_u64().unwrap_or(0) == 0;
            (is_prompt == prompt).then(|| r["avg_ts"].as_f64()).flatten()
        })
    };
    Some((rate(true)?, rate(false)?))
}

/// One streamed chat request on a fresh connection, as a client sees it.
struct ChatSample {
    first_token: Option<Duration>,
    total: Duration,
    tokens: usize,
    /// Prompt and answer tokens, from the `done` event.
    tokens_used: usize,
    ok: bool,
}

/// POSTs to /chat/stream and reads the event stream to its end.
async fn chat_stream(port: u16, token: &str, body: &str) -> std::io::Result<ChatSample> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let req = format!(
        "POST /chat/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let t = Instant::now();
    stream.write_all(req.as_bytes()).await?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    let mut first_token = None;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let from = seen.len().saturating_sub(16);
        seen.extend_from_slice(&buf[..n]);
        let tail = String::from_utf8_lossy(&seen[from..]);
        if first_token.is_none() && tail.contains("event: token") {
            first_token = Some(t.elapsed());
        }
        if tail.contains("event: done") || tail.contains("event: error") {
            // The rest of the last event follows in the same chunk or the next.
            let _ = stream.read_to_end(&mut seen).await;
            break;
        }
    }
    let text = String::from_utf8_lossy(&seen);
    let tokens_used = text
        .split("\"tokens_used\":")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(ChatSample {
        first_token,
        total: t.elapsed(),
        tokens: text.matches("event: token").count(),
        tokens_used,
        ok: text.starts_with("HTTP/1.1 200") && text.contains("event: done"),
    })
}

/// Opens a WebSocket on /ws/chat and leaves it idle; the stream must stay open.
async fn idle_websocket(port: u16, token: &str) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let req = format!(
        "GET /ws/chat?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::other("closed during the handshake"));
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(std::io::Error::other(format!(
            "handshake refused: {}",
            String::from_utf8_lossy(&head[..head.len().min(40)])
        )));
    }
    Ok(stream)
}

#[derive(Debug, clap::Args)]
pub struct ChatBench {
    /// The BEIR folder (corpus.jsonl, queries.train.jsonl).
    #[arg(long, default_value = "../shared/data/scifact")]
    pub data: std::path::PathBuf,
    /// Documents of the corpus to index.
    #[arg(long, default_value_t = 1000)]
    pub docs: usize,
    /// Concurrent clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub clients: Vec<usize>,
    /// Requests per client at each level.
    #[arg(long, default_value_t = 2)]
    pub requests: usize,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Idle WebSocket connections to hold (0: skip).
    #[arg(long, default_value_t = 1000)]
    pub idle_websockets: usize,
}

/// Chat over SciFact: requests/s and time to first token (SSE, fresh
/// connections) at each concurrency, with RAG and without it (the baseline: the
/// same questions answered by the model alone); then memory per idle WebSocket.
pub async fn chat(mut settings: Settings, opts: ChatBench) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ragchat-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let file = |name: &str| dir.join(name).display().to_string();
    settings.database.url = format!("sqlite:{}", file("bench.db"));
    settings.knowledge.sqlite_url = format!("sqlite:{}", file("knowledge.db"));
    settings.knowledge.index_dir = String::new();
    settings.chat.sqlite_url = format!("sqlite:{}", file("chat.db"));
    settings.ledger.spool_path = file("spool.jsonl");
    settings.server.port = 0;
    settings.seed.demo_users = false;
    settings.rate_limits.chat.limit = 1_000_000;
    settings.chat.ws_ping_secs = 600;
    settings.chat.ws_timeout_secs = 1200;
    let max_clients = opts.clients.iter().copied().max().unwrap_or(1);
    settings.models.generate_queue = settings.models.generate_queue.max(max_clients * 2);
    let app = Application::build(settings.clone(), false).await?;
    let state = app.state().clone();
    let port = app.port();
    let server = app.into_server();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    let ingestor = state
        .ingestor
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the models are not loaded: run scripts/fetch-models"))?;
    anyhow::ensure!(state.generator.is_some(), "the generation model is not loaded");

    let hasher = PasswordHasher::new(settings.auth.argon2)?;
    let ws_user = crate::accounts::create_user(
        state.accounts.as_ref(),
        &hasher,
        crate::accounts::UserSpec {
            email: "bench-ws@example.com",
            password: "benchmark-password-123",
            plan: ragchat_actors::plans::Plan::Free,
            superuser: false,
        },
    )
    .await?;
    let ws_token = state.tokens.issue(ws_user.id)?;
    // Idle WebSockets first, while the heap holds little freed memory that new
    // connections could reuse unseen: the whole process's resident set (server
    // and client sides) before and after.
    if opts.idle_websockets > 0 {
        let mut held = Vec::with_capacity(opts.idle_websockets);
        for _ in 0..20 {
            held.push(idle_websocket(port, &ws_token).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_bytes();
        let t = Instant::now();
        for _ in 0..opts.idle_websockets {
            held.push(idle_websocket(port, &ws_token).await?);
        }
        let opened = t.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_bytes();
        let health = timed(port, 20, "GET", "/health", None, 200).await?;
        // Still open: a ping frame (masked, empty) on each is answered.
        let mut alive = 0;
        for s in held.iter_mut().skip(20) {
            if s.write_all(&[0x89, 0x80, 1, 2, 3, 4]).await.is_ok() {
                let mut pong = [0u8; 2];
                let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut pong)).await;
                if read.is_ok_and(|r| r.is_ok()) && pong == [0x8A, 0x00] {
                    alive += 1;
                }
            }
        }
        println!(
            "idle WebSockets: {} opened in {:.2} s, {} answered a ping afterwards; RSS {:.1} MiB before (baseline), \
             {:.1} MiB after: {:.1} KiB per connection (server and client side); GET /health p50 {:.2} ms while held",
            opts.idle_websockets,
            opened.as_secs_f64(),
            alive,
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            after.saturating_sub(before) as f64 / 1024.0 / opts.idle_websockets as f64,
            ms(health.p50)
        );
        drop(held);
    }
    // The knowledge base: the first `docs` documents of the corpus.
    let corpus = std::fs::read_to_string(opts.data.join("corpus.jsonl"))?;
    let subset: Vec<&str> = corpus
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(opts.docs)
        .collect();
    let subset_path = dir.join("corpus.jsonl");
    std::fs::write(&subset_path, subset.join("\n"))?;
    let status = state.seed.clone();
    crate::knowledge::seed::begin(&status, &subset_path, Default::default())?;
    let t = Instant::now();
    crate::knowledge::seed::run(
        &ingestor,
        &subset_path,
        Default::default(),
        settings.knowledge.max_document_bytes,
        status.clone(),
        &|_| {},
    )
    .await;
    let seeded = status
        .lock()
        .map(|s| (s.documents_created, s.chunks))
        .unwrap_or_default();
    println!(
        "knowledge base: {} SciFact documents, {} chunks, seeded in {:.1} s",
        seeded.0,
        seeded.1,
        t.elapsed().as_secs_f64()
    );
    let queries: Vec<String> = std::fs::read_to_string(opts.data.join("queries.train.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_string))
        .collect();
    anyhow::ensure!(!queries.is_empty(), "no queries in queries.train.jsonl");

    // One enterprise user per client (no quota in the way).
    let mut tokens = Vec::new();
    for i in 0..max_clients.max(1) {
        let user = crate::accounts::create_user(
            state.accounts.as_ref(),
            &hasher,
            crate::accounts::UserSpec {
                email: &format!("bench-chat-{i}@example.com"),
                password: "benchmark-password-123",
                plan: ragchat_actors::plans::Plan::Enterprise,
                superuser: false,
            },
        )
        .await?;
        tokens.push(state.tokens.issue(user.id)?);
    }

    // Warm up (first forward passes allocate).
    let warm = serde_json::json!({"message": queries[0], "max_tokens": 4}).to_string();
    chat_stream(port, &tokens[0], &warm).await?;

    println!(
        "generation: {}, max_active {}, answers of up to {} tokens; top_k {} sources; SSE on fresh connections",
        settings.models.generator_name, settings.models.max_active, opts.max_tokens, settings.chat.default_top_k
    );
    println!(
        "{:<16} {:>7} {:>9} {:>8} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "mode", "clients", "requests", "req/s", "TTFT p50", "TTFT p99", "total p50", "tok/s", "prompt"
    );
    let mut q = 0usize;
    for rag in [true, false] {
        for &c in &opts.clients {
            let mut tasks = Vec::new();
            let started = Instant::now();
            for client in 0..c {
                let token = tokens[client % tokens.len()].clone();
                let bodies: Vec<String> = (0..opts.requests)
                    .map(|_| {
                        q += 1;
                        serde_json::json!({"message": queries[q % queries.len()], "max_tokens": opts.max_tokens,
                                           "enable_rag": rag})
                        .to_string()
                    })
                    .collect();
                tasks.push(actix_web::rt::spawn(async move {
                    let mut out = Vec::new();
                    for b in bodies {
                        out.push(chat_stream(port, &token, &b).await);
                    }
                    out
                }));
            }
            let mut samples = Vec::new();
            for task in tasks {
                for s in task.await? {
                    samples.push(s?);
                }
            }
            let wall = started.elapsed().as_secs_f64();
            let failed = samples.iter().filter(|s| !s.ok).count();
            anyhow::ensure!(failed == 0, "{failed} of {} requests failed", samples.len());
            let ttft = stats(samples.iter().filter_map(|s| s.first_token).collect());
            let total = stats(samples.iter().map(|s| s.total).collect());
            let generated: usize = samples.iter().map(|s| s.tokens).sum();
            let prompt = samples
                .iter()
                .map(|s| s.tokens_used.saturating_sub(s.tokens))
                .sum::<usize>()
                / samples.len().max(1);
            println!(
                "{:<16} {:>7} {:>9} {:>8.2} {:>10.0} {:>10.0} {:>10.0} {:>8.1} {:>8}",
                if rag { "rag (hybrid)" } else { "no rag (base)" },
                c,
                samples.len(),
                samples.len() as f64 / wall,
                ms(ttft.p50),
                ms(ttft.p99),
                ms(total.p50),
                generated as f64 / wall,
                prompt
            );
        }
    }

    handle.stop(true).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
