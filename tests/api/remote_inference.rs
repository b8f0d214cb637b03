//! Inference on another server: ragchat with `models.generator_url` and
//! `models.embedder_url` pointing at llama.cpp's llama-server (built from the
//! llama-cpp-python sdist by scripts/build-llama-cpp, cached outside the clone)
//! serving the same SmolLM2 GGUF. Admission, streaming and usage stay ragchat's;
//! token counts come from the server; a client that leaves stops the server's
//! work; a server that is down is a 503 naming it, and the breaker opens.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{expect, model_settings, models_dir, TestApp};

/// llama-server from scripts/build-llama-cpp, or None (skipped; a failure under
/// RAGCHAT_REQUIRE_SERVICES=1, where scripts/test builds it first).
fn llama_server_binary() -> Option<PathBuf> {
    let dir = std::env::var("LLAMA_CPP_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/ragchat-llama-cpp"));
    let bin = dir.join("bin/llama-server");
    if bin.exists() {
        return Some(bin);
    }
    if std::env::var("RAGCHAT_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
        panic!(
            "{} missing but RAGCHAT_REQUIRE_SERVICES=1: run scripts/build-llama-cpp",
            bin.display()
        );
    }
    eprintln!("SKIPPED: {} missing; run scripts/build-llama-cpp", bin.display());
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn gguf(models: &std::path::Path) -> PathBuf {
    models.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A llama-server child process, killed on drop.
struct LlamaServer {
    child: std::process::Child,
    base: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LlamaServer {
    async fn start(binary: &std::path::Path, model: &std::path::Path, extra: &[&str]) -> LlamaServer {
        let port = free_port();
        let child = std::process::Command::new(binary)
            .args([
                "-m",
                &model.display().to_string(),
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args(["-c", "4096", "-np", "2", "-t", "2", "--metrics"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn llama-server");
        let server = LlamaServer {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/health", server.base)).send().await {
                if r.status() == StatusCode::OK {
                    return server;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "llama-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A figure of its Prometheus metrics (`llamacpp:<name>`).
    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.base))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("llamacpp:{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no llamacpp:{name} in {text}"))
    }
}

fn chat(stream: bool, max_tokens: u32, question: &str) -> Value {
    json!({"model": "smollm2-135m-instruct", "stream": stream, "temperature": 0, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": question}]})
}

async fn admin(app: &TestApp) -> String {
    app.admin(&format!("remote-{}@example.com", uuid::Uuid::new_v4().simple()))
        .await
}

#[actix_web::test]
async fn answers_come_from_the_remote_server_streamed_and_counted_by_it() {
    let (Some(models), Some(bin)) = (models_dir(), llama_server_binary()) else {
        return;
    };
    let server = LlamaServer::start(&bin, &gguf(&models), &[]).await;
    let mut settings = model_settings(&models);
    settings.models.generator_url = server.base.clone();
    let app = TestApp::spawn_with(settings).await;
    assert!(app.state.generator.as_ref().is_some_and(|g| g.is_remote()));
    let token = admin(&app).await;

    let plain = expect(
        app.post_json(
            "/v1/chat/completions",
            &chat(false, 24, "What is the capital of France?"),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let answer = plain["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    assert!(answer.contains("Paris"), "{answer}");
    // The usage is the server's count.
    let predicted = server.metric("tokens_predicted_total").await;
    let prompt = server.metric("prompt_tokens_total").await;
    assert_eq!(plain["usage"]["completion_tokens"].as_f64(), Some(predicted), "{plain}");
    assert_eq!(plain["usage"]["prompt_tokens"].as_f64(), Some(prompt), "{plain}");

    // Streamed: the same greedy answer, chunk by chunk.
    let resp = app
        .post_json(
            "/v1/chat/completions",
            &chat(true, 24, "What is the capital of France?"),
            Some(&token),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.expect("body");
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).expect("json chunk"))
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, answer);
    assert!(chunks.len() > 3, "streamed in pieces: {}", chunks.len());

    // A RAG chat turn through the remote model, admitted and recorded like any.
    let turn = expect(
        app.post_json(
            "/chat/message",
            &json!({"message": "Say hello.", "enable_rag": false, "max_tokens": 8}),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert!(!turn["answer"].as_str().unwrap_or_default().is_empty(), "{turn}");
    let mut counted = Value::Null;
    for _ in 0..50 {
        let usage = expect(app.get("/billing/usage", Some(&token)).await, StatusCode::OK).await;
        counted = usage["messages_this_month"].clone();
        if counted == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counted, 3);
}

#[actix_web::test]
async fn a_client_that_leaves_stops_the_remote_generation() {
    let (Some(models), Some(bin)) = (models_dir(), llama_server_binary()) else {
        return;
    };
    let server = LlamaServer::start(&bin, &gguf(&models), &[]).await;
    let mut settings = model_settings(&models);
    settings.models.generator_url = server.base.clone();
    let app = TestApp::spawn_with(settings).await;
    let token = admin(&app).await;
    let mut req = chat(true, 1500, "Write a very long story about a dragon and a city.");
    req["temperature"] = json!(0.8);
    req["seed"] = json!(7);
    let resp = app.post_json("/v1/chat/completions", &req, Some(&token)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    let mut seen = 0;
    while let Some(chunk) = body.next().await {
        seen += chunk.expect("chunk").len();
        if seen > 600 {
            break;
        }
    }
    assert_eq!(server.metric("requests_processing").await, 1.0);
    drop(body); // the client goes away mid-answer
    let started = Instant::now();
    while server.metric("requests_processing").await > 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the server still generates 5 s after the client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let predicted = server.metric("tokens_predicted_total").await;
    println!(
        "stopped {} ms after the client left, {predicted} tokens generated of 1500",
        started.elapsed().as_millis()
    );
    assert!(predicted < 750.0, "{predicted}");
}

#[actix_web::test]
async fn a_server_that_is_down_is_a_503_naming_it_and_the_breaker_opens() {
    let Some(models) = models_dir() else { return };
    let mut settings = model_settings(&models);
    // Nothing listens there.
    let url = format!("http://127.0.0.1:{}", free_port());
    settings.models.generator_url = url.clone();
    settings.models.remote_retries = 1;
    settings.models.remote_breaker_failures = 4;
    settings.models.remote_breaker_secs = 60;
    let app = TestApp::spawn_with(settings).await;
    let token = admin(&app).await;
    for _ in 0..2 {
        let v = expect(
            app.post_json("/v1/chat/completions", &chat(false, 8, "hi"), Some(&token))
                .await,
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .await;
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(&format!("the generation server at {url} is not answering")),
            "{v}"
        );
    }
    // Four failures (two calls, each tried twice): the breaker answers at once.
    let started = Instant::now();
    let v = expect(
        app.post_json("/v1/chat/completions", &chat(false, 8, "hi"), Some(&token))
            .await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("failed 4 times in a row"),
        "{v}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    // Chat over SSE says so too, and nothing was charged.
    let resp = app
        .post_json(
            "/chat/stream",
            &json!({"message": "hello", "enable_rag": false}),
            Some(&token),
        )
        .await;
    assert_eq!(
        resp.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        resp.text().await
    );
    let usage = expect(app.get("/billing/usage", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(usage["messages_this_month"], 0, "{usage}");
}

#[actix_web::test]
async fn embeddings_come_from_the_remote_server() {
    let (Some(models), Some(bin)) = (models_dir(), llama_server_binary()) else {
        return;
    };
    let server = LlamaServer::start(&bin, &gguf(&models), &["--embeddings", "--pooling", "mean"]).await;
    let mut settings = model_settings(&models);
    settings.models.embedder_url = server.base.clone();
    let app = TestApp::spawn_with(settings).await;
    let token = admin(&app).await;
    let texts = ["The cat sat on the mat.", "A cat was sitting on a mat."];
    let ours = expect(
        app.post_json("/v1/embeddings", &json!({"input": texts}), Some(&token))
            .await,
        StatusCode::OK,
    )
    .await;
    let theirs: Value = reqwest::Client::new()
        .post(format!("{}/v1/embeddings", server.base))
        .json(&json!({"input": texts}))
        .send()
        .await
        .expect("direct")
        .json()
        .await
        .expect("json");
    for i in 0..2 {
        let a: Vec<f64> = ours["data"][i]["embedding"]
            .as_array()
            .expect("ours")
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        let b: Vec<f64> = theirs["data"][i]["embedding"]
            .as_array()
            .expect("theirs")
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        assert_eq!(a.len(), b.len());
        assert!(a.len() > 100, "{}", a.len());
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cos = a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>() / (norm(&a) * norm(&b));
        assert!((norm(&a) - 1.0).abs() < 1e-3 && cos > 0.999, "cos {cos}");
    }
    // Documents are embedded remotely too, and found by vector search.
    expect(
        app.post_json(
            "/knowledge/documents",
            &json!({"title": "Mats", "content": "The cat sat on the mat all afternoon."}),
            Some(&token),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let found = expect(
        app.post_json(
            "/knowledge/search",
            &json!({"query": "where did the cat sit", "route": "vector", "top_k": 3}),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(found["results"][0]["title"], "Mats", "{found}");
}
