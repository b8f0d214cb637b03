//! `ragchat bench chat`: chat over SciFact (requests/s and time to first token at
//! several concurrencies, with RAG and the model alone), memory per idle WebSocket.

use std::time::{Duration, Instant};

use ragchat::auth::PasswordHasher;
use ragchat::config::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::common::{bench_user, ms, rss_bytes, scratch_dir, scratch_stores, seed_corpus, serve, stats, timed, Served};

/// One streamed chat request on a fresh connection, as a client sees it.
struct ChatSample {
    first_token: Option<Duration>,
    total: Duration,
    tokens: usize,
    /// Prompt and answer tokens, from the `done` event.
    tokens_used: usize,
    ok: bool,
    /// The whole response (head and events).
    text: String,
}

/// The number after `"key":` in a response, if any.
fn number_after(text: &str, key: &str) -> Option<usize> {
    text.split(&format!("\"{key}\":"))
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
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
    let tokens_used = number_after(&text, "tokens_used").unwrap_or(0);
    Ok(ChatSample {
        first_token,
        total: t.elapsed(),
        tokens: text.matches("event: token").count(),
        tokens_used,
        ok: text.starts_with("HTTP/1.1 200") && text.contains("event: done"),
        text: text.into_owned(),
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
    /// Turns of one RAG conversation, answered with the prompt cache and
    /// without it (0: skip).
    #[arg(long, default_value_t = 5)]
    pub turns: usize,
}

/// One turn of a conversation as measured.
struct Turn {
    prompt: usize,
    cached: usize,
    first_token: Duration,
}

/// One RAG conversation through a fresh server (greedy answers, the prompt
/// cache at `cache_mb`): per turn the prompt tokens, those the cache held and
/// the time to first token.
async fn conversation(
    settings: &Settings,
    cache_mb: usize,
    questions: &[String],
    max_tokens: usize,
) -> anyhow::Result<Vec<Turn>> {
    let mut settings = settings.clone();
    settings.chat.temperature = 0.0;
    settings.models.prompt_cache_mb = cache_mb;
    let Served { state, port, handle } = serve(settings.clone()).await?;
    let hasher = PasswordHasher::new(settings.auth.argon2)?;
    let email = format!(
        "bench-conversation-{cache_mb}-{}@example.com",
        settings.chat.history_sources
    );
    let token = bench_user(&state, &hasher, &email, ragchat_actors::plans::Plan::Enterprise).await?;
    let mut session: Option<String> = None;
    let mut turns = Vec::new();
    for q in questions {
        let body = serde_json::json!({"message": q, "max_tokens": max_tokens, "enable_rag": true,
                                      "debug_mode": true, "session_id": session});
        let sample = chat_stream(port, &token, &body.to_string()).await?;
        anyhow::ensure!(
            sample.ok,
            "a conversation turn failed: {}",
            &sample.text[..sample.text.len().min(300)]
        );
        session = sample
            .text
            .split("\"session_id\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map(str::to_string);
        turns.push(Turn {
            prompt: number_after(&sample.text, "prompt_tokens").unwrap_or(0),
            cached: number_after(&sample.text, "cached_prompt_tokens").unwrap_or(0),
            first_token: sample.first_token.unwrap_or(sample.total),
        });
    }
    handle.stop(true).await;
    Ok(turns)
}

/// Chat over SciFact: requests/s and time to first token (SSE, fresh
/// connections) at each concurrency, with RAG and without it (the baseline: the
/// same questions answered by the model alone); then memory per idle WebSocket.
pub async fn run(mut settings: Settings, opts: ChatBench) -> anyhow::Result<()> {
    let dir = scratch_dir()?;
    scratch_stores(&mut settings, &dir);
    settings.rate_limits.chat.limit = 1_000_000;
    settings.chat.ws_ping_secs = 600;
    settings.chat.ws_timeout_secs = 1200;
    let max_clients = opts.clients.iter().copied().max().unwrap_or(1);
    settings.models.generate_queue = settings.models.generate_queue.max(max_clients * 2);
    let Served { state, port, handle } = serve(settings.clone()).await?;
    anyhow::ensure!(state.generator.is_some(), "the generation model is not loaded");

    let hasher = PasswordHasher::new(settings.auth.argon2)?;
    let ws_token = bench_user(
        &state,
        &hasher,
        "bench-ws@example.com",
        ragchat_actors::plans::Plan::Free,
    )
    .await?;
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
    let t = Instant::now();
    let seeded = seed_corpus(&state, &settings, &subset_path).await?;
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
        let email = format!("bench-chat-{i}@example.com");
        tokens.push(bench_user(&state, &hasher, &email, ragchat_actors::plans::Plan::Enterprise).await?);
    }

    // Warm up (first forward passes allocate).
    let warm = serde_json::json!({"message": queries[0], "max_tokens": 4}).to_string();
    chat_stream(port, &tokens[0], &warm).await?;

    println!(
        "generation: {}, max_active {}, answers of up to {} tokens; top_k {} sources; SSE on fresh connections",
        settings.models.generator_name, settings.models.max_active, opts.max_tokens, settings.chat.default_top_k
    );
    println!(
        "{:<16} {:>7} {:>9} {:>8} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "mode", "clients", "requests", "req/s", "TTFT p50", "TTFT p99", "total p50", "tok/s", "prompt", "refused"
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
            // Questions refused as not in the knowledge base (chat.refuse_below)
            // are answered without the model: left out of the latencies and
            // the prompt size (unless every one was), counted apart.
            let (refused, mut answered): (Vec<&ChatSample>, Vec<&ChatSample>) = samples
                .iter()
                .partition(|s| s.text.contains("\"response_type\":\"not_in_knowledge_base\""));
            if answered.is_empty() {
                answered = refused.clone();
            }
            let ttft = stats(answered.iter().map(|s| s.first_token.unwrap_or(s.total)).collect());
            let total = stats(answered.iter().map(|s| s.total).collect());
            let generated: usize = samples.iter().map(|s| s.tokens).sum();
            let prompt = answered
                .iter()
                .map(|s| s.tokens_used.saturating_sub(s.tokens))
                .sum::<usize>()
                / answered.len().max(1);
            println!(
                "{:<16} {:>7} {:>9} {:>8.2} {:>10.0} {:>10.0} {:>10.0} {:>8.1} {:>8} {:>8}",
                if rag { "rag (hybrid)" } else { "no rag (base)" },
                c,
                samples.len(),
                samples.len() as f64 / wall,
                ms(ttft.p50),
                ms(ttft.p99),
                ms(total.p50),
                generated as f64 / wall,
                prompt,
                refused.len()
            );
        }
    }

    handle.stop(true).await;

    // Prompt reuse: one conversation, answered by a server with the prompt cache
    // and by one without it (the same knowledge base, greedy answers), and by one
    // with the cache whose history leaves the past sources out
    // (`chat.history_sources = false`: shorter prompts, more of each prefilled).
    if opts.turns > 0 {
        let questions: Vec<String> = queries.iter().skip(100).take(opts.turns).cloned().collect();
        let cache_mb = settings.models.prompt_cache_mb.max(1);
        let with = conversation(&settings, cache_mb, &questions, opts.max_tokens).await?;
        let without = conversation(&settings, 0, &questions, opts.max_tokens).await?;
        let mut plain_settings = settings.clone();
        plain_settings.chat.history_sources = !settings.chat.history_sources;
        let plain = conversation(&plain_settings, cache_mb, &questions, opts.max_tokens).await?;
        println!(
            "conversation of {} RAG turns, one client, greedy; prompt cache {cache_mb} MiB against none; \
             past sources in the history: {} (last columns: {})",
            questions.len(),
            settings.chat.history_sources,
            plain_settings.chat.history_sources
        );
        println!(
            "{:<5} {:>7} {:>7} {:>10} {:>16} {:>16}   {:>7} {:>10} {:>16}",
            "turn",
            "prompt",
            "cached",
            "prefilled",
            "TTFT with cache",
            "TTFT without",
            "prompt",
            "prefilled",
            "TTFT with cache"
        );
        for (i, ((a, b), c)) in with.iter().zip(&without).zip(&plain).enumerate() {
            println!(
                "{:<5} {:>7} {:>7} {:>10} {:>13.0} ms {:>13.0} ms   {:>7} {:>10} {:>13.0} ms",
                i + 1,
                a.prompt,
                a.cached,
                a.prompt.saturating_sub(a.cached),
                ms(a.first_token),
                ms(b.first_token),
                c.prompt,
                c.prompt.saturating_sub(c.cached),
                ms(c.first_token)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
