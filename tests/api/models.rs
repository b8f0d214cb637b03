//! The OpenAI-compatible API over the real models (all-MiniLM-L6-v2, SmolLM2-135M).

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{expect, model_settings, models_dir, TestApp};

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn vector(v: &Value) -> Vec<f64> {
    v["embedding"]
        .as_array()
        .expect("embedding")
        .iter()
        .map(|x| x.as_f64().expect("float"))
        .collect()
}

async fn model_app() -> Option<(TestApp, String)> {
    let dir = models_dir()?;
    let app = TestApp::spawn_with(model_settings(&dir)).await;
    let admin = app
        .admin(&format!("models-{}@example.com", uuid::Uuid::new_v4().simple()))
        .await;
    Some((app, admin))
}

#[actix_web::test]
async fn embeddings_are_unit_vectors_that_put_similar_sentences_close() {
    let Some((app, token)) = model_app().await else {
        return;
    };
    let texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market fell sharply on Monday.",
    ];
    let body = expect(
        app.post_json(
            "/v1/embeddings",
            &json!({"input": texts, "model": "all-minilm-l6-v2"}),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 3);
    let v: Vec<Vec<f64>> = data.iter().map(vector).collect();
    for x in &v {
        assert_eq!(x.len(), 384);
        assert!((cosine(x, x) - 1.0).abs() < 1e-4, "unit length");
    }
    let (close, far) = (cosine(&v[0], &v[1]), cosine(&v[0], &v[2]));
    assert!(
        close > 0.5 && far < 0.2 && close > far + 0.4,
        "close {close}, far {far}"
    );
    assert!(body["usage"]["prompt_tokens"].as_u64().is_some_and(|n| n >= 20));

    // Batching and padding do not change a vector: alone equals inside a batch.
    let alone = expect(
        app.post_json("/v1/embeddings", &json!({"input": texts[0]}), Some(&token))
            .await,
        StatusCode::OK,
    )
    .await;
    assert!(cosine(&vector(&alone["data"][0]), &v[0]) > 0.9999);

    expect(
        app.post_json("/v1/embeddings", &json!({"input": "x", "model": "gpt-9"}), Some(&token))
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    expect(
        app.post_json("/v1/embeddings", &json!({"input": []}), Some(&token))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    expect(
        app.post_json("/v1/embeddings", &json!({"input": "x"}), None).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
}

fn chat(stream: bool) -> Value {
    json!({"model": "smollm2-135m-instruct", "stream": stream, "temperature": 0, "max_tokens": 24,
           "messages": [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": "What is the capital of France?"}]})
}

/// Reads an SSE body into its `data:` payloads.
async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.expect("body");
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[actix_web::test]
async fn chat_completions_answer_plain_and_streamed_identically() {
    let Some((app, token)) = model_app().await else {
        return;
    };
    let plain = expect(
        app.post_json("/v1/chat/completions", &chat(false), Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    let answer = plain["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    assert!(!answer.trim().is_empty());
    assert!(answer.contains("Paris"), "{answer}");
    assert!(matches!(
        plain["choices"][0]["finish_reason"].as_str(),
        Some("stop" | "length")
    ));
    let usage = &plain["usage"];
    assert!(usage["prompt_tokens"].as_u64().is_some_and(|n| n > 10));
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap_or(0) + usage["completion_tokens"].as_u64().unwrap_or(0))
    );

    let resp = app.post_json("/v1/chat/completions", &chat(true), Some(&token)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/event-stream"));
    let events = sse_events(resp).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json chunk"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, answer, "greedy stream = greedy answer");
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"].is_string()));
    assert_eq!(
        chunks.last().map(|c| c["usage"]["completion_tokens"].clone()),
        Some(usage["completion_tokens"].clone())
    );

    let models = expect(app.get("/v1/models", Some(&token)).await, StatusCode::OK).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["smollm2-135m-instruct", "all-minilm-l6-v2"]);

    // Both completions were admitted as messages and recorded with their tokens.
    let usage = expect(app.get("/billing/usage", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(usage["messages_this_month"], 2);
}

#[actix_web::test]
async fn bad_completion_requests_are_clear_4xx() {
    let Some(dir) = models_dir() else { return };
    let mut settings = model_settings(&dir);
    settings.models.max_context = 64;
    let app = TestApp::spawn_with(settings).await;
    let token = app.admin("ctx@example.com").await;
    let long = json!({"messages": [{"role": "user", "content": "word ".repeat(200)}]});
    let body = expect(
        app.post_json("/v1/chat/completions", &long, Some(&token)).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("context")), "{body}");
    for bad in [
        json!({"messages": []}),
        json!({"messages": [{"role": "wizard", "content": "hi"}]}),
        json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2049}),
        json!({"messages": [{"role": "user", "content": "x".repeat(65_537)}]}),
        json!({"messages": vec![json!({"role": "user", "content": "hi"}); 257]}),
    ] {
        expect(
            app.post_json("/v1/chat/completions", &bad, Some(&token)).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    expect(
        app.post_json(
            "/v1/chat/completions",
            &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}),
            Some(&token),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    // Refused requests gave their unit back.
    let usage = expect(app.get("/billing/usage", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(usage["messages_this_month"], 0);
}

#[actix_web::test]
async fn hugging_face_ids_and_names_in_any_case_name_the_served_models() {
    let Some((app, token)) = model_app().await else {
        return;
    };
    for name in [
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "huggingfacetb/smollm2-135m-instruct",
        "SmolLM2-135M-Instruct",
    ] {
        let mut req = chat(false);
        req["model"] = json!(name);
        req["max_tokens"] = json!(2);
        let body = expect(
            app.post_json("/v1/chat/completions", &req, Some(&token)).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(body["model"], "smollm2-135m-instruct", "{name}");
    }
    for name in ["sentence-transformers/all-MiniLM-L6-v2", "ALL-MINILM-L6-V2"] {
        let req = json!({"model": name, "input": "hello"});
        let body = expect(
            app.post_json("/v1/embeddings", &req, Some(&token)).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(body["model"], "all-minilm-l6-v2", "{name}");
    }
    // Another model's id, or the served model under another organisation, is not it.
    for (route, name) in [
        ("/v1/chat/completions", "Qwen/Qwen3-1.7B"),
        ("/v1/chat/completions", "someone/SmolLM2-135M-Instruct"),
        ("/v1/embeddings", "sentence-transformers/all-mpnet-base-v2"),
    ] {
        let mut req = chat(false);
        req["model"] = json!(name);
        req["input"] = json!("hello");
        let body = expect(app.post_json(route, &req, Some(&token)).await, StatusCode::NOT_FOUND).await;
        assert_eq!(body["code"], "model_not_found", "{name}: {body}");
    }
}

#[actix_web::test]
async fn a_follow_up_reuses_the_users_cached_prompt_and_no_one_elses() {
    let Some((app, token)) = model_app().await else {
        return;
    };
    let other = app
        .admin(&format!("cache-{}@example.com", uuid::Uuid::new_v4().simple()))
        .await;
    let first = chat(false);
    let body = expect(
        app.post_json("/v1/chat/completions", &first, Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{body}");
    let answer = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("answer")
        .to_string();
    let mut next = first.clone();
    let messages = next["messages"].as_array_mut().expect("messages");
    messages.push(json!({"role": "assistant", "content": answer}));
    messages.push(json!({"role": "user", "content": "And of Germany?"}));
    // Another user sending the same conversation starts from nothing.
    let theirs = expect(
        app.post_json("/v1/chat/completions", &next, Some(&other)).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(theirs["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{theirs}");
    let mine = expect(
        app.post_json("/v1/chat/completions", &next, Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    let cached = mine["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached");
    let prompt = body["usage"]["prompt_tokens"].as_u64().expect("prompt");
    assert!(
        cached >= prompt,
        "the first prompt ({prompt} tokens) was reused: {mine}"
    );
    // Not compared word for word with the answer from nothing: the reused prefix
    // holds the first answer's KV from decode steps, the fresh prefill computes it
    // in blocks, in another float order, and a near-tie between two tokens may
    // go either way. That a reused prefix gives a fresh prefill's logits is
    // checked at the model (`inference::gguf::tests::
    // a_reused_prefix_gives_the_logits_of_a_fresh_prefill_every_turn`).
    let text = |v: &Value| v["choices"][0]["message"]["content"].as_str().map(str::to_owned);
    assert!(
        text(&mine).is_some_and(|t| !t.trim().is_empty()),
        "an answer from the cache: {mine}"
    );
    assert_eq!(
        mine["usage"]["prompt_tokens"], theirs["usage"]["prompt_tokens"],
        "the same prompt"
    );
}

#[actix_web::test]
async fn a_client_that_disconnects_mid_stream_frees_its_slot_and_is_charged_once() {
    let Some((app, token)) = model_app().await else {
        return;
    };
    let worker = app.state.generator.clone().expect("generator loaded");
    let mut req = chat(true);
    req["max_tokens"] = json!(400);
    req["messages"][1]["content"] = json!("Write a very long story about a dragon.");
    req["temperature"] = json!(0.8);
    req["seed"] = json!(1);
    req["stop"] = json!([]);
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
    drop(body); // the client goes away mid-answer
    let mut freed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = &worker.stats;
        if s.active.load(std::sync::atomic::Ordering::Relaxed) == 0
            && s.cancelled.load(std::sync::atomic::Ordering::Relaxed) >= 1
        {
            freed = true;
            break;
        }
    }
    assert!(freed, "the sequence left the batch");
    // Tokens were sent before the client left: the unit counts (once).
    let mut counted = Value::Null;
    for _ in 0..50 {
        let usage = expect(app.get("/billing/usage", Some(&token)).await, StatusCode::OK).await;
        counted = usage["messages_this_month"].clone();
        if counted == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counted, 1, "an answer left after its first tokens counts once");
}

#[actix_web::test]
async fn a_model_worker_panic_fails_in_flight_requests_with_503_and_the_next_succeed() {
    let Some((app, token)) = model_app().await else {
        return;
    };
    let generator = app.state.generator.clone().expect("generator");
    generator.inject_panic();
    expect(
        app.post_json("/v1/chat/completions", &chat(false), Some(&token)).await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    expect(
        app.post_json("/v1/chat/completions", &chat(false), Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    let embedder = app.state.embedder.clone().expect("embedder");
    embedder.inject_panic();
    expect(
        app.post_json("/v1/embeddings", &json!({"input": "hello"}), Some(&token))
            .await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    expect(
        app.post_json("/v1/embeddings", &json!({"input": "hello"}), Some(&token))
            .await,
        StatusCode::OK,
    )
    .await;
    // Operators see both restarts and why, in the supervision tree.
    let tree = expect(app.get("/admin/actors", Some(&token)).await, StatusCode::OK).await;
    let node = |name: &str| {
        tree["supervisors"]
            .as_array()
            .expect("supervisors")
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
            .expect("node")
    };
    for name in ["generate-worker", "embed-worker"] {
        let n = node(name);
        assert_eq!(
            (n["state"].as_str(), n["restarts"].as_u64()),
            (Some("running"), Some(1)),
            "{n}"
        );
        assert!(n["last_error"].as_str().is_some_and(|e| e.contains("injected")), "{n}");
    }
    for name in ["session-registry", "billing-ledger", "retrieval"] {
        assert_eq!(node(name)["state"], "running", "{tree}");
    }
    // And in the metrics (the recorder is shared by every server of this process: at least one each).
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for child in ["generate-worker", "embed-worker"] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with("supervisor_restarts_total{") && l.contains(&format!("child=\"{child}\"")))
            .unwrap_or_else(|| panic!("no restarts of {child} in:\n{metrics}"));
        let n: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("value");
        assert!(n >= 1.0, "{line}");
    }
}

#[actix_web::test]
async fn the_official_openai_python_client_works_against_the_api() {
    let Some((app, token)) = model_app().await else {
        return;
    };
    let has_client = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_client {
        if std::env::var("RAGCHAT_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
            panic!("the openai Python package is missing but RAGCHAT_REQUIRE_SERVICES=1 (scripts/test installs it)");
        }
        eprintln!("SKIPPED: the openai Python package is not installed (pip install openai)");
        return;
    }
    // An API key, as API clients use.
    let key = expect(
        app.post_json("/auth/api-keys", &json!({"name": "openai-client"}), Some(&token))
            .await,
        StatusCode::CREATED,
    )
    .await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_client.py");
    let address = app.address.clone();
    let key = key["key"].as_str().expect("key").to_string();
    // The client blocks; run it off this test's single-threaded runtime.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .arg(address)
            .arg(key)
            .output()
    })
    .await
    .expect("join")
    .expect("run python3");
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK"));
}

#[actix_web::test]
async fn a_long_prompt_prefilled_in_pieces_gives_the_same_answer() {
    let Some(dir) = models_dir() else {
        return;
    };
    let long = "The lighthouse keeper wrote in her log every evening. ".repeat(30)
        + "In one sentence: what did the lighthouse keeper do every evening?";
    let body = json!({"messages": [{"role": "user", "content": long}], "max_tokens": 16,
                      "temperature": 0.0, "seed": 1});
    let mut answers = Vec::new();
    for chunk in [0, 64] {
        let mut settings = model_settings(&dir);
        settings.models.prefill_chunk = chunk;
        let app = TestApp::spawn_with(settings).await;
        let token = app
            .admin(&format!("chunks-{}@example.com", uuid::Uuid::new_v4().simple()))
            .await;
        let r = expect(
            app.post_json("/v1/chat/completions", &body, Some(&token)).await,
            StatusCode::OK,
        )
        .await;
        assert!(r["usage"]["prompt_tokens"].as_u64().is_some_and(|n| n > 300), "{r}");
        answers.push(r["choices"][0]["message"]["content"].clone());
    }
    assert_eq!(answers[0], answers[1], "whole prompt vs pieces of 64 tokens (greedy)");
}
