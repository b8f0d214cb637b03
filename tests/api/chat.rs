//! Chat: RAG answers over HTTP (JSON and SSE) and WebSocket, conversations,
//! and what a client leaving mid-answer costs. Real clients: reqwest reading
//! the event stream, tokio-tungstenite speaking WebSocket.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::fault_proxy::FaultProxy;
use crate::helpers::{expect, model_settings, models_dir, service_url, TestApp};

/// A server with models, three global documents (one about a made-up protocol
/// that only the knowledge base can know), an admin and a user.
async fn chat_app() -> Option<(TestApp, String, String, String)> {
    chat_app_with(|_| {}).await
}

async fn chat_app_with(
    change: impl FnOnce(&mut ragchat::config::Settings),
) -> Option<(TestApp, String, String, String)> {
    let dir = models_dir()?;
    let mut settings = model_settings(&dir);
    change(&mut settings);
    let app = TestApp::spawn_with(settings).await;
    let admin = app
        .admin(&format!("chat-admin-{}@example.com", Uuid::new_v4().simple()))
        .await;
    let docs = [
        ("Zorblax protocol", "The Zorblax protocol is a messaging protocol for weather balloons. It listens on port 7431 and signs every packet with a rotating key."),
        ("Baking bread", "Bread dough rises because yeast ferments sugars and releases carbon dioxide. Bake at 220 degrees for thirty minutes."),
        ("Tide pools", "Tide pools hold sea stars, anemones and small crabs between high and low tide along rocky shores."),
    ];
    for (title, content) in docs {
        expect(
            app.post_json(
                "/knowledge/documents",
                &json!({"title": title, "content": content, "visibility": "global"}),
                Some(&admin),
            )
            .await,
            StatusCode::CREATED,
        )
        .await;
    }
    let (user_id, token) = app.user(&format!("chat-{}@example.com", Uuid::new_v4().simple())).await;
    Some((app, admin, user_id, token))
}

fn ask(message: &str) -> Value {
    json!({"message": message, "max_tokens": 24})
}

/// Usage records of a user once the ledger has written them (polls until
/// `expected` appear, then checks no more arrive).
async fn usage_records(app: &TestApp, user_id: &str, expected: u64) -> u64 {
    let id: Uuid = user_id.parse().expect("user id");
    let mut n = 0;
    for _ in 0..100 {
        n = app.state.usage.usage_record_count(id).await.expect("count");
        if n >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.state.usage.usage_record_count(id).await.expect("count").max(n)
}

#[actix_web::test]
async fn messages_are_answered_from_the_knowledge_base_and_kept_per_user() {
    let Some((app, _admin, user_id, token)) = chat_app().await else {
        return;
    };
    let r = expect(
        app.post_json(
            "/chat/message",
            &json!({"message": "Which port does the Zorblax protocol listen on?", "max_tokens": 24, "route": "hybrid"}),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(r["response_type"], "rag_enhanced", "{r}");
    assert_eq!(r["context_used"], true);
    assert_eq!(
        r["sources"][0]["title"], "Zorblax protocol",
        "the best source first: {r}"
    );
    assert!(r["sources"][0]["excerpt"].as_str().expect("excerpt").contains("7431"));
    // Stored through the JSON route: its origin is the API.
    assert_eq!(r["sources"][0]["source_type"], "api", "{r}");
    assert!(r["answer"].as_str().is_some_and(|a| !a.is_empty()));
    // Calibrated relevance: the answering source above 0.5, the others below.
    let sources = r["sources"].as_array().expect("sources");
    assert!(
        sources[0]["relevance_score"]
            .as_f64()
            .is_some_and(|s| s > 0.5 && s <= 1.0),
        "{r}"
    );
    assert!(
        sources[1..]
            .iter()
            .all(|s| s["relevance_score"].as_f64().is_some_and(|s| (0.0..0.5).contains(&s))),
        "{r}"
    );
    // Confidence is groundedness (its computation: answers_carry_their_supporting_quotes…).
    assert!(
        r["confidence"].as_f64().is_some_and(|c| (0.0..=1.0).contains(&c)),
        "{r}"
    );
    assert_eq!(r["retrieval_route"], "hybrid");
    assert!(r["tokens_used"].as_u64().is_some_and(|t| t > 20));
    assert_eq!(r["subscription_plan"], "free");
    assert_eq!(r["usage_info"]["messages_used"], 1);
    assert_eq!(
        r["usage_info"]["messages_remaining"].as_u64().expect("remaining") + 1,
        r["usage_info"]["messages_limit"].as_u64().expect("limit")
    );
    assert!(r.get("debug_info").is_none(), "debug_info only with debug_mode");
    let session = r["session_id"].as_str().expect("session").to_string();

    // The same conversation, without retrieval, with debug information.
    let r2 = expect(
        app.post_json(
            "/chat/message",
            &json!({"message": "Thanks. And in one word?", "session_id": session, "enable_rag": false,
                    "debug_mode": true, "max_tokens": 8}),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(r2["session_id"], session.as_str());
    assert_eq!(r2["response_type"], "generation_only");
    assert_eq!(r2["sources"], json!([]));
    assert_eq!(r2["retrieval_route"], Value::Null);
    assert_eq!(r2["confidence"], 0.0);
    assert_eq!(r2["debug_info"]["history_messages_in_prompt"], 2, "{r2}");
    assert_eq!(r2["usage_info"]["messages_used"], 2);

    // The conversation, listed and paged.
    let list = expect(app.get("/chat/sessions", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(list["total"], 1);
    assert_eq!(list["sessions"][0]["session_id"], session.as_str());
    assert_eq!(list["sessions"][0]["message_count"], 4);
    assert_eq!(
        list["sessions"][0]["title"],
        "Which port does the Zorblax protocol listen on?"
    );
    let page = expect(
        app.get(&format!("/chat/sessions/{session}/messages?limit=3"), Some(&token))
            .await,
        StatusCode::OK,
    )
    .await;
    let roles: Vec<&str> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["role"].as_str().expect("role"))
        .collect();
    assert_eq!(
        roles,
        ["assistant", "user", "assistant"],
        "the newest three, oldest first"
    );
    assert_eq!(page["messages"][2]["message_id"], r2["message_id"]);
    assert_eq!(
        page["messages"][0]["metadata"]["sources"][0]["title"],
        "Zorblax protocol"
    );
    let before = page["next_before"].as_str().expect("cursor");
    let older = expect(
        app.get(
            &format!("/chat/sessions/{session}/messages?limit=3&before={before}"),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(older["messages"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        older["messages"][0]["content"],
        "Which port does the Zorblax protocol listen on?"
    );
    assert_eq!(older["next_before"], Value::Null);

    // Bad requests: clear 4xx, nothing counted.
    for (body, status) in [
        (json!({"message": "   "}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({"message": "hi", "top_k": 50}), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"message": "hi", "max_tokens": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"message": "hi", "route": "psychic"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"message": "hi", "colour": "blue"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"message": "hi", "session_id": Uuid::new_v4()}),
            StatusCode::NOT_FOUND,
        ),
        (json!({"message": "x".repeat(9000)}), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let got = expect(app.post_json("/chat/message", &body, Some(&token)).await, status).await;
        assert!(got["detail"].is_string(), "{got}");
    }
    let bad_cursor = app
        .get(
            &format!("/chat/sessions/{session}/messages?before=yesterday"),
            Some(&token),
        )
        .await;
    assert_eq!(bad_cursor.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(usage_records(&app, &user_id, 2).await, 2, "two answers, two records");

    // Another user sees nothing of it and cannot write to it or delete it.
    let (_, other) = app
        .user(&format!("chat-other-{}@example.com", Uuid::new_v4().simple()))
        .await;
    let theirs = expect(app.get("/chat/sessions", Some(&other)).await, StatusCode::OK).await;
    assert_eq!(theirs["total"], 0);
    let path = format!("/chat/sessions/{session}/messages");
    expect(app.get(&path, Some(&other)).await, StatusCode::NOT_FOUND).await;
    expect(
        app.delete(&format!("/chat/sessions/{session}"), &other).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let mut sneaky = ask("What did they ask?");
    sneaky["session_id"] = json!(session);
    expect(
        app.post_json("/chat/message", &sneaky, Some(&other)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    expect(
        app.post_json("/chat/message", &ask("hi"), None).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;

    // The owner deletes it.
    expect(
        app.delete(&format!("/chat/sessions/{session}"), &token).await,
        StatusCode::NO_CONTENT,
    )
    .await;
    expect(app.get(&path, Some(&token)).await, StatusCode::NOT_FOUND).await;
    let list = expect(app.get("/chat/sessions", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(list["total"], 0);
}

/// Server-sent events of one response: (event, data) pairs.
#[actix_web::test]
async fn a_follow_up_prefills_only_its_new_sources_and_question() {
    let Some((app, _admin, _user, token)) = chat_app_with(|s| s.chat.history_sources = true).await else {
        return;
    };
    let turn = |message: &str, session: Option<&str>| json!({"message": message, "session_id": session, "debug_mode": true, "max_tokens": 12});
    let first = expect(
        app.post_json(
            "/chat/message",
            &turn("Which port does the Zorblax protocol use?", None),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(first["response_type"], "rag_enhanced", "{first}");
    let session = first["session_id"].as_str().expect("session").to_string();
    let prompt = first["debug_info"]["prompt_tokens"].as_u64().expect("prompt tokens");
    let second = expect(
        app.post_json(
            "/chat/message",
            &turn("How long is bread baked?", Some(&session)),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let debug = &second["debug_info"];
    assert_eq!(debug["history_messages_in_prompt"], 2, "{second}");
    let cached = debug["cached_prompt_tokens"].as_u64().expect("cached");
    // The first question came back with its sources: the whole first prompt (and
    // its answer) was reused, only the new sources and question were prefilled.
    assert!(
        cached >= prompt,
        "the first prompt ({prompt} tokens) was reused: {second}"
    );
    assert!(debug["prompt_tokens"].as_u64().expect("prompt") > cached);

    // What the model read stays internal: the conversation shows the question.
    let page = expect(
        app.get(&format!("/chat/sessions/{session}/messages"), Some(&token))
            .await,
        StatusCode::OK,
    )
    .await;
    let messages = page["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 4, "{page}");
    assert_eq!(messages[0]["content"], "Which port does the Zorblax protocol use?");
    assert!(
        messages.iter().all(|m| m["metadata"].get("prompt_message").is_none()),
        "{page}"
    );
}

/// Characters `start..end` of `text` (offsets count characters).
fn chars_of(text: &str, start: u64, end: u64) -> String {
    text.chars().skip(start as usize).take((end - start) as usize).collect()
}

#[actix_web::test]
async fn answers_carry_their_supporting_quotes_and_a_confidence_from_them() {
    let Some((app, _admin, _user, token)) = chat_app_with(|s| s.chat.temperature = 0.0).await else {
        return;
    };
    let question = json!({"message": "Which port does the Zorblax protocol listen on?", "max_tokens": 32,
                          "debug_mode": true});
    let r = expect(
        app.post_json("/chat/message", &question, Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(r["response_type"], "rag_enhanced", "{r}");
    let sources = r["sources"].as_array().expect("sources");
    let grounding = &r["debug_info"]["grounding"];
    let support: Vec<f64> = grounding["support"]
        .as_array()
        .expect("support per answer sentence")
        .iter()
        .map(|s| s.as_f64().expect("support"))
        .collect();
    assert!(!support.is_empty(), "{r}");
    assert!(grounding["question_support"].as_f64().is_some_and(|s| s > 0.3), "{r}");
    // Confidence: the share of supported sentences (chat.support_threshold 0.5),
    // times (1 + the best relevance) / 2.
    let best = sources
        .iter()
        .map(|s| s["relevance_score"].as_f64().expect("relevance"))
        .fold(0.0, f64::max);
    let share = support.iter().filter(|s| **s >= 0.5).count() as f64 / support.len() as f64;
    let confidence = r["confidence"].as_f64().expect("confidence");
    assert!(
        (confidence - share * (0.5 + 0.5 * best)).abs() < 1e-3,
        "{confidence} vs {share} × {best}: {r}"
    );
    let unsupported = grounding["unsupported_sentences"].as_array().expect("unsupported");
    assert_eq!(unsupported.len(), support.iter().filter(|s| **s < 0.5).count(), "{r}");
    // Quotes: exact substrings of the passage at their character offsets (these
    // passages are shorter than the excerpt, so the excerpt is the passage).
    let mut quoted = 0;
    for s in sources {
        let excerpt = s["excerpt"].as_str().expect("excerpt");
        assert!(s["chunk_id"].is_string(), "{s}");
        for q in s["quotes"].as_array().expect("quotes") {
            let (start, end) = (q["start"].as_u64().expect("start"), q["end"].as_u64().expect("end"));
            assert_eq!(chars_of(excerpt, start, end), q["text"].as_str().expect("text"), "{q}");
            quoted += 1;
        }
    }
    // An answer that gives the port is supported by the sentence that says it.
    if r["answer"].as_str().expect("answer").contains("7431") {
        assert!(confidence > 0.0, "{r}");
        assert!(
            sources[0]["quotes"]
                .as_array()
                .expect("quotes")
                .iter()
                .any(|q| q["text"].as_str().is_some_and(|t| t.contains("7431"))),
            "a quote states the port: {r}"
        );
    }
    assert_eq!(quoted > 0, share > 0.0, "a supported sentence has its quote: {r}");

    // The stream's `done` carries the same fields.
    let resp = app.post_json("/chat/stream", &question, Some(&token)).await;
    let events = read_sse(resp, None).await;
    let (kind, done) = events.last().expect("done");
    assert_eq!(kind, "done");
    assert!(done["sources"][0]["quotes"].is_array(), "{done}");
    assert!(done["confidence"].is_number(), "{done}");

    // Nothing in the knowledge base names the Sistine Chapel: no invented
    // answer, the model is not asked, and the message counts like any answer.
    let r = expect(
        app.post_json(
            "/chat/message",
            &json!({"message": "Who painted the ceiling of the Sistine Chapel?", "max_tokens": 32, "debug_mode": true}),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(r["response_type"], "not_in_knowledge_base", "{r}");
    assert_eq!(
        r["answer"],
        "The knowledge base does not contain an answer to this question."
    );
    assert_eq!(r["sources"], json!([]));
    assert_eq!(r["context_used"], false);
    assert_eq!(r["confidence"], 0.0);
    assert_eq!(r["debug_info"]["completion_tokens"], 0);
    assert!(
        r["debug_info"]["grounding"]["question_support"]
            .as_f64()
            .is_some_and(|s| s < 0.3),
        "{r}"
    );
    assert!(!r["debug_info"]["grounding"]["nearest_sources"]
        .as_array()
        .expect("nearest")
        .is_empty());
    assert_eq!(r["usage_info"]["messages_used"], 3, "{r}");
    // A follow-up in that conversation is answered (it leans on the conversation).
    let follow = expect(
        app.post_json(
            "/chat/message",
            &json!({"message": "Then how long is bread baked?", "session_id": r["session_id"], "max_tokens": 8}),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(follow["response_type"], "rag_enhanced", "{follow}");
}

async fn read_sse(resp: reqwest::Response, stop_after_tokens: Option<usize>) -> Vec<(String, Value)> {
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream")));
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut events = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut event = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            events.push((event, serde_json::from_str(&data).expect("event data is JSON")));
            let tokens = events.iter().filter(|(e, _)| e == "token").count();
            if stop_after_tokens.is_some_and(|n| tokens >= n) {
                return events; // drops the body: the client goes away
            }
        }
    }
    events
}

#[actix_web::test]
async fn the_stream_sends_sources_then_tokens_then_the_whole_response() {
    let Some((app, _admin, user_id, token)) = chat_app().await else {
        return;
    };
    let resp = app
        .post_json(
            "/chat/stream",
            &ask("Tell me about the Zorblax protocol."),
            Some(&token),
        )
        .await;
    let events = read_sse(resp, None).await;
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"sources"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"done"), "{kinds:?}");
    assert!(
        kinds[1..kinds.len() - 1].iter().all(|k| *k == "token") && kinds.len() > 3,
        "{kinds:?}"
    );
    let head = &events[0].1;
    assert_eq!(head["sources"][0]["title"], "Zorblax protocol");
    let done = &events.last().expect("done").1;
    let streamed: String = events
        .iter()
        .filter(|(e, _)| e == "token")
        .map(|(_, d)| d["text"].as_str().expect("text"))
        .collect();
    assert_eq!(done["answer"], streamed.trim(), "the tokens add up to the answer");
    assert_eq!(done["session_id"], head["session_id"]);
    assert_eq!(done["message_id"], head["message_id"]);
    assert_eq!(done["usage_info"]["messages_used"], 1);
    // A refusal before the stream is a plain JSON error.
    let bad = app
        .post_json("/chat/stream", &json!({"message": ""}), Some(&token))
        .await;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(usage_records(&app, &user_id, 1).await, 1);
}

/// Waits until the generation worker has no sequence running and has counted
/// at least `cancelled` cancellations.
async fn slot_freed(app: &TestApp, cancelled: u64) -> bool {
    let stats = &app.state.generator.as_ref().expect("generator").stats;
    for _ in 0..200 {
        if stats.active.load(Ordering::Relaxed) == 0 && stats.cancelled.load(Ordering::Relaxed) >= cancelled {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[actix_web::test]
async fn a_client_that_leaves_mid_answer_frees_the_slot_and_is_counted_once() {
    let Some((app, _admin, user_id, token)) = chat_app().await else {
        return;
    };
    let long = json!({"message": "Write a very long story about a dragon who learns to bake bread.",
                      "max_tokens": 400, "enable_rag": false});
    let resp = app.post_json("/chat/stream", &long, Some(&token)).await;
    let events = read_sse(resp, Some(2)).await;
    let session = events[0].1["session_id"].as_str().expect("session").to_string();
    assert!(slot_freed(&app, 1).await, "the sequence left the batch");
    assert_eq!(usage_records(&app, &user_id, 1).await, 1, "counted once");
    let usage = expect(app.get("/billing/usage", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(usage["messages_this_month"], 1);
    // The question and the partial answer are in the conversation, marked.
    let page = expect(
        app.get(&format!("/chat/sessions/{session}/messages"), Some(&token))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(page["messages"][0]["role"], "user");
    assert_eq!(page["messages"][1]["metadata"]["cancelled"], true, "{page}");

    // The same over a WebSocket: the socket closes mid-answer.
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&app, Some(&token)))
        .await
        .expect("connect");
    let mut frame = long.clone();
    frame["type"] = json!("message");
    ws.send(Message::text(frame.to_string())).await.expect("send");
    let mut tokens = 0;
    while tokens < 2 {
        let f = next_json(&mut ws).await;
        if f["type"] == "token" {
            tokens += 1;
        }
    }
    drop(ws);
    assert!(slot_freed(&app, 2).await, "the WebSocket's sequence left the batch");
    assert_eq!(usage_records(&app, &user_id, 2).await, 2);

    // `cancel` on an open socket: stopped, stored and counted before the
    // next frame is read, so the conversation can go on at once.
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&app, Some(&token)))
        .await
        .expect("connect");
    frame["id"] = json!("long");
    ws.send(Message::text(frame.to_string())).await.expect("send");
    let mut session = Value::Null;
    let mut tokens = 0;
    while tokens < 2 {
        let f = next_json(&mut ws).await;
        if f["type"] == "sources" {
            session = f["session_id"].clone();
        }
        if f["type"] == "token" {
            tokens += 1;
        }
    }
    ws.send(Message::text(json!({"type": "cancel"}).to_string()))
        .await
        .expect("send");
    loop {
        let f = next_json(&mut ws).await;
        if f["type"] == "cancelled" {
            assert_eq!(f["id"], "long");
            break;
        }
    }
    ws.send(Message::text(
        json!({"type": "message", "id": "next", "message": "Shorter, please.", "session_id": session,
               "max_tokens": 8, "enable_rag": false})
        .to_string(),
    ))
    .await
    .expect("send");
    let frames = answer(&mut ws, "next").await;
    let done = frames.last().expect("end");
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["response"]["session_id"], session);
    assert!(slot_freed(&app, 3).await);
    assert_eq!(
        usage_records(&app, &user_id, 4).await,
        4,
        "three cancelled, one answered: each once"
    );
    let page = expect(
        app.get(
            &format!("/chat/sessions/{}/messages", session.as_str().expect("id")),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let cancelled: Vec<&Value> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| &m["metadata"]["cancelled"])
        .collect();
    assert_eq!(cancelled, [&Value::Null, &json!(true), &Value::Null, &Value::Null]);
}

#[actix_web::test]
async fn one_user_has_at_most_two_answers_in_progress_and_the_third_is_refused_free() {
    let Some(dir) = models_dir() else {
        return;
    };
    let mut settings = model_settings(&dir);
    settings.rate_limits.concurrent_chats = 2;
    let app = TestApp::spawn_with(settings).await;
    let (user_id, token) = app.user(&format!("busy-{}@example.com", Uuid::new_v4().simple())).await;
    let long = json!({"message": "Write a very long story about a dragon who learns to bake bread.",
                      "max_tokens": 400, "enable_rag": false});
    // Two streams admitted and generating (their bodies held, not read to the end).
    let mut open = Vec::new();
    for _ in 0..2 {
        let resp = app.post_json("/chat/stream", &long, Some(&token)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        open.push(resp.bytes_stream());
    }
    for body in &mut open {
        let mut seen = String::new();
        while !seen.contains("event: token") {
            let chunk = body.next().await.expect("an event").expect("chunk");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    // The third, on any transport, is refused at once with the reason.
    let resp = app.post_json("/chat/message", &ask("And a third?"), Some(&token)).await;
    assert_eq!(
        resp.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body = expect(resp, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(body["code"], "too_many_chats", "{body}");
    let resp = app
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
            Some(&token),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another user is not held up by it.
    let (_, other) = app
        .user(&format!("chat-other-{}@example.com", Uuid::new_v4().simple()))
        .await;
    expect(
        app.post_json("/chat/message", &ask("Hello?"), Some(&other)).await,
        StatusCode::OK,
    )
    .await;
    // Once the streams are gone, the user chats again.
    drop(open);
    assert!(slot_freed(&app, 2).await, "both sequences left the batch");
    // A turn holds its place until its usage is recorded (after the save).
    assert_eq!(usage_records(&app, &user_id, 2).await, 2);
    expect(
        app.post_json("/chat/message", &ask("Now?"), Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    // The refusals cost nothing: two streams (counted: tokens were sent) and one answer.
    assert_eq!(usage_records(&app, &user_id, 3).await, 3);
    let usage = expect(app.get("/billing/usage", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(usage["messages_this_month"], 3, "{usage}");
}

fn ws_url(app: &TestApp, token: Option<&str>) -> String {
    let base = app.address.replacen("http://", "ws://", 1);
    match token {
        Some(t) => format!("{base}/ws/chat?token={t}"),
        None => format!("{base}/ws/chat"),
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON text frame (WebSocket pings are answered by the client library).
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("a frame within 60 s")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).expect("JSON frame");
        }
    }
}

/// Frames until `done` or `error` for this id.
async fn answer(ws: &mut Ws, id: impl Into<Value>) -> Vec<Value> {
    let id = id.into();
    let mut frames = Vec::new();
    loop {
        let f = next_json(ws).await;
        let end = f["id"] == id && (f["type"] == "done" || f["type"] == "error");
        frames.push(f);
        if end {
            return frames;
        }
    }
}

#[actix_web::test]
async fn the_websocket_answers_several_questions_on_one_connection() {
    let Some((app, _admin, user_id, token)) = chat_app().await else {
        return;
    };
    // Authentication at connect: a header, ?token=, or the first frame (below).
    let refused = tokio_tungstenite::connect_async(ws_url(&app, Some("not-a-token"))).await;
    assert!(matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 401));
    let mut req = ws_url(&app, None).into_client_request().expect("request");
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect with a header");

    ws.send(Message::text(json!({"type": "ping", "id": 0}).to_string()))
        .await
        .expect("send");
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    ws.send(Message::text("not json")).await.expect("send");
    assert_eq!(next_json(&mut ws).await["status"], 400);
    ws.send(Message::text(
        json!({"type": "ping", "id": {"huge": "x".repeat(1000)}}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(
        next_json(&mut ws).await["status"],
        422,
        "ids are small numbers or strings"
    );
    ws.send(Message::text(
        json!({"type": "message", "id": 9, "message": ""}).to_string(),
    ))
    .await
    .expect("send");
    let f = next_json(&mut ws).await;
    assert_eq!(
        (f["type"].as_str(), f["id"].as_u64(), f["status"].as_u64()),
        (Some("error"), Some(9), Some(422))
    );

    // Two questions in one conversation; a third while one streams is refused.
    ws.send(Message::text(
        json!({"type": "message", "id": 1, "message": "Which port does the Zorblax protocol use?", "max_tokens": 24})
            .to_string(),
    ))
    .await
    .expect("send");
    ws.send(Message::text(
        json!({"type": "message", "id": 2, "message": "too soon"}).to_string(),
    ))
    .await
    .expect("send");
    let frames = answer(&mut ws, 1u64).await;
    let busy = frames
        .iter()
        .find(|f| f["id"] == 2)
        .expect("the early message is answered");
    assert_eq!(
        (busy["type"].as_str(), busy["status"].as_u64()),
        (Some("error"), Some(409))
    );
    let mine: Vec<&Value> = frames.iter().filter(|f| f["id"] == 1).collect();
    assert_eq!(mine[0]["type"], "sources");
    assert_eq!(mine[0]["sources"][0]["title"], "Zorblax protocol");
    let done = &mine.last().expect("done")["response"];
    let streamed: String = mine
        .iter()
        .filter(|f| f["type"] == "token")
        .map(|f| f["text"].as_str().expect("text"))
        .collect();
    assert_eq!(done["answer"], streamed.trim());
    let session = done["session_id"].clone();

    ws.send(Message::text(
        json!({"type": "message", "id": 3, "message": "Say it again.", "session_id": session, "max_tokens": 16})
            .to_string(),
    ))
    .await
    .expect("send");
    let frames = answer(&mut ws, 3u64).await;
    let done = &frames.last().expect("done")["response"];
    assert_eq!(done["session_id"], session);
    assert_eq!(done["usage_info"]["messages_used"], 2);
    ws.close(None).await.expect("close");

    let list = expect(app.get("/chat/sessions", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(list["sessions"][0]["message_count"], 4);
    assert_eq!(usage_records(&app, &user_id, 2).await, 2);
}

#[actix_web::test]
async fn answers_go_on_without_sources_history_or_saving_when_those_fail() {
    let Some((app, _admin, user_id, token)) = chat_app().await else {
        return;
    };
    let question = json!({"message": "Which port does the Zorblax protocol listen on?", "route": "hybrid",
                          "max_tokens": 8});
    let first = expect(
        app.post_json("/chat/message", &question, Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    assert!(first.get("warnings").is_none(), "{first}");
    let session = first["session_id"].clone();

    // Retrieval fails: the embedding model's next batch panics (its worker restarts).
    app.state.embedder.as_ref().expect("embedder").inject_panic();
    let r = expect(
        app.post_json("/chat/message", &question, Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(r["response_type"], "generation_only", "{r}");
    assert_eq!(r["sources"], json!([]));
    assert!(
        r["warnings"][0].as_str().is_some_and(|w| w.contains("knowledge base")),
        "{r}"
    );

    // The conversation store fails under the running server (its tables dropped).
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&app.state.settings.chat.sqlite_url)
            .await
            .expect("open the conversation store");
        for table in ["chat_messages", "chat_sessions"] {
            sqlx::query(&format!("DROP TABLE {table}"))
                .execute(&mut conn)
                .await
                .expect("drop");
        }
    }
    let mut again = question.clone();
    again["session_id"] = session.clone();
    let r = expect(
        app.post_json("/chat/message", &again, Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    let warnings: Vec<&str> = r["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(warnings.iter().any(|w| w.contains("history")), "{r}");
    assert!(warnings.iter().any(|w| w.contains("not saved")), "{r}");
    assert_eq!(r["session_id"], session);
    assert_eq!(r["response_type"], "rag_enhanced", "retrieval is back: {r}");
    assert!(r["answer"].as_str().is_some_and(|a| !a.is_empty()));
    assert_eq!(
        usage_records(&app, &user_id, 3).await,
        3,
        "three answers given, three counted"
    );
}

fn warnings_of(r: &Value) -> Vec<String> {
    r["warnings"]
        .as_array()
        .map(|w| w.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

/// MongoDB (FerretDB) and the CQL server (Cassandra) of scripts/services.sh go
/// away under a running server (through a proxy that cuts every connection, so
/// the shared servers stay up for other tests) and come back.
#[actix_web::test]
async fn chat_answers_with_mongodb_and_the_cql_server_down_and_recovers_when_they_are_back() {
    let (Some(mongo), Some(cql)) = (service_url("MONGODB_URL"), service_url("SCYLLA_URL")) else {
        return;
    };
    let Some(dir) = models_dir() else { return };
    let mongo_addr = mongo.trim_start_matches("mongodb://").trim_end_matches('/').to_string();
    let (mongo_proxy, cql_proxy) = (FaultProxy::start(&mongo_addr), FaultProxy::start(cql.trim()));
    let tag = Uuid::new_v4().simple().to_string();
    let mut settings = model_settings(&dir);
    settings.knowledge.mongodb_url = format!("mongodb://127.0.0.1:{}", mongo_proxy.port);
    settings.knowledge.mongodb_database = format!("faults_{tag}");
    settings.chat.scylla_nodes = format!("127.0.0.1:{}", cql_proxy.port);
    settings.chat.scylla_keyspace = format!("faults_{tag}");
    let app = TestApp::spawn_with(settings.clone()).await;
    let admin = app.admin(&format!("faults-admin-{tag}@example.com")).await;
    let zorblax = "The Zorblax protocol is a messaging protocol for weather balloons. It listens on port 7431.";
    expect(
        app.post_json(
            "/knowledge/documents",
            &json!({"title": "Zorblax protocol", "content": zorblax, "visibility": "global"}),
            Some(&admin),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let (user_id, token) = app.user(&format!("faults-{tag}@example.com")).await;
    let question = json!({"message": "Which port does the Zorblax protocol listen on?", "max_tokens": 8});
    let first = expect(
        app.post_json("/chat/message", &question, Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    assert!(warnings_of(&first).is_empty(), "{first}");
    assert_eq!(first["response_type"], "rag_enhanced", "{first}");
    let session = first["session_id"].clone();

    mongo_proxy.cut();
    cql_proxy.cut();
    // Readiness says which stores are down.
    let ready = app.get("/ready", None).await;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let ready: Value = ready.json().await.expect("json");
    assert_ne!(ready["stores"]["documents"]["status"], "ok", "{ready}");
    assert_ne!(ready["stores"]["conversations"]["status"], "ok", "{ready}");
    // Chat answers: without its history (and unsaved), and says so. Sources
    // still come: the search index lives in the server, not in MongoDB.
    let mut again = question.clone();
    again["session_id"] = session.clone();
    let r = expect(
        app.post_json("/chat/message", &again, Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    let w = warnings_of(&r);
    assert!(w.iter().any(|w| w.contains("history")), "{r}");
    assert!(w.iter().any(|w| w.contains("not saved")), "{r}");
    assert!(r["answer"].as_str().is_some_and(|a| !a.is_empty()), "{r}");
    assert_eq!(r["sources"][0]["title"], "Zorblax protocol", "{r}");
    // A new conversation too; and without RAG it is generation_only.
    let mut plain = question.clone();
    plain["enable_rag"] = json!(false);
    let r = expect(
        app.post_json("/chat/message", &plain, Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(r["response_type"], "generation_only", "{r}");
    assert!(warnings_of(&r).iter().any(|w| w.contains("not saved")), "{r}");
    // What needs the stores answers 503 with a reason, not 500.
    let resp = app.get("/chat/sessions", Some(&token)).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let resp = app
        .post_json(
            "/knowledge/documents",
            &json!({"title": "Later", "content": "Written while MongoDB is down."}),
            Some(&token),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.json::<Value>().await.expect("json")["detail"].is_string());

    // A server started while both are down starts (and says it is not ready).
    settings.knowledge.index_dir = std::env::temp_dir()
        .join("ragchat-tests")
        .join(format!("index-{tag}-second"))
        .display()
        .to_string();
    settings.ledger.spool_path = format!("{}.second", settings.ledger.spool_path);
    let second = TestApp::spawn_with(settings).await;
    assert_eq!(
        second.get("/ready", None).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let r = expect(
        second.post_json("/chat/message", &question, Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    assert!(warnings_of(&r).iter().any(|w| w.contains("not saved")), "{r}");
    assert_eq!(r["response_type"], "generation_only", "its index is still empty: {r}");

    // Back: history and saving resume.
    mongo_proxy.restore();
    cql_proxy.restore();
    // Readiness is polled first: each chat message below counts against the
    // free plan's monthly messages, so they must not be the poll.
    for _ in 0..120 {
        if app.get("/ready", None).await.status() == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut recovered = None;
    let mut answered = 4;
    for _ in 0..60 {
        let r = expect(
            app.post_json("/chat/message", &again, Some(&token)).await,
            StatusCode::OK,
        )
        .await;
        answered += 1;
        if warnings_of(&r).is_empty() {
            recovered = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = recovered.expect("the stores came back");
    assert_eq!(r["session_id"], session);
    let ready = app.get("/ready", None).await;
    assert_eq!(ready.status(), StatusCode::OK);
    // The second server connects to both and its index catches up from MongoDB.
    for _ in 0..120 {
        if second.get("/ready", None).await.status() == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut caught_up = None;
    for _ in 0..80 {
        let r = expect(
            second.post_json("/chat/message", &question, Some(&token)).await,
            StatusCode::OK,
        )
        .await;
        answered += 1;
        if warnings_of(&r).is_empty() && r["response_type"] == "rag_enhanced" {
            caught_up = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = caught_up.expect("the second server connected and caught up");
    assert_eq!(r["sources"][0]["title"], "Zorblax protocol", "{r}");
    assert_eq!(second.get("/ready", None).await.status(), StatusCode::OK);
    // Every answer was counted once, whether it was saved or not.
    assert_eq!(usage_records(&app, &user_id, answered).await, answered);
}

/// The JSON frames received and the close code, until the server closes the
/// connection or `secs` pass (then the code is None).
async fn until_closed(ws: &mut Ws, secs: u64) -> (Vec<Value>, Option<u16>) {
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) | Ok(None) | Ok(Some(Err(_))) => return (frames, None),
            Ok(Some(Ok(Message::Text(t)))) => frames.push(serde_json::from_str(t.as_str()).expect("JSON frame")),
            Ok(Some(Ok(Message::Close(c)))) => return (frames, c.map(|c| u16::from(c.code))),
            Ok(Some(Ok(_))) => {}
        }
    }
}

#[actix_web::test]
async fn a_websocket_closes_when_its_token_expires_unless_a_fresh_one_is_sent() {
    let mut settings = crate::helpers::test_settings(&crate::helpers::temp_sqlite_url());
    settings.auth.access_token_ttl_secs = 1; // valid for 1 s, plus the 5 s leeway
    settings.chat.ws_auth_check_secs = 1;
    let app = TestApp::spawn_with(settings).await;
    let (_, token) = app.user("ws-expiry@example.com").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&app, Some(&token)))
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    let (frames, code) = until_closed(&mut ws, 20).await;
    assert_eq!(code, Some(4401), "closed as unauthorized: {frames:?}");
    let last = frames.last().expect("an error frame first");
    assert_eq!(
        (last["type"].as_str(), last["status"].as_u64()),
        (Some("error"), Some(401))
    );
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    // A fresh token sent in time keeps the connection past the first one's life.
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&app, Some(&token_of(&app).await)))
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fresh = token_of(&app).await;
    ws.send(Message::text(
        json!({"type": "auth", "id": 1, "token": fresh}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    tokio::time::sleep(Duration::from_secs(5)).await; // past the first token's 6 s
    ws.send(Message::text(json!({"type": "ping", "id": 2}).to_string()))
        .await
        .expect("send");
    assert_eq!(
        next_json(&mut ws).await["type"],
        "pong",
        "still open on the fresh token"
    );
    let (_, code) = until_closed(&mut ws, 15).await;
    assert_eq!(code, Some(4401), "closed once the fresh token expired too");
}

#[actix_web::test]
async fn a_websocket_authenticates_by_its_first_frame_or_is_closed() {
    let mut settings = crate::helpers::test_settings(&crate::helpers::temp_sqlite_url());
    settings.chat.ws_auth_timeout_secs = 1;
    settings.chat.ws_max_per_user = 1;
    settings.chat.ws_max_unauthenticated = 2;
    let app = TestApp::spawn_with(settings).await;
    let (_, token) = app.user("ws-first-frame@example.com").await;
    let connect = || tokio_tungstenite::connect_async(ws_url(&app, None));

    // The token in the first frame, not the URL.
    let (mut ws, _) = connect().await.expect("connect without credentials");
    ws.send(Message::text(
        json!({"type": "auth", "id": "a", "token": token}).to_string(),
    ))
    .await
    .expect("send");
    let f = next_json(&mut ws).await;
    assert_eq!(
        (f["type"].as_str(), f["id"].as_str()),
        (Some("authenticated"), Some("a"))
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the first-frame limit
    ws.send(Message::text(json!({"type": "ping", "id": 2}).to_string()))
        .await
        .expect("send");
    assert_eq!(next_json(&mut ws).await["type"], "pong");

    // The user's socket cap holds for first-frame sockets too (4429).
    let (mut over, _) = connect().await.expect("connect");
    over.send(Message::text(json!({"type": "auth", "token": token}).to_string()))
        .await
        .expect("send");
    let (frames, code) = until_closed(&mut over, 5).await;
    assert_eq!(code, Some(4429), "{frames:?}");
    assert_eq!(frames.last().expect("error frame")["status"], 429);
    drop(ws);

    // Anything else first, a bad token, or silence: an error frame and 4401.
    let (mut ws, _) = connect().await.expect("connect");
    ws.send(Message::text(json!({"type": "ping"}).to_string()))
        .await
        .expect("send");
    let (frames, code) = until_closed(&mut ws, 5).await;
    assert_eq!(code, Some(4401), "{frames:?}");
    assert_eq!(frames.last().expect("error frame")["code"], "unauthenticated");
    let (mut ws, _) = connect().await.expect("connect");
    ws.send(Message::text(
        json!({"type": "auth", "token": "not-a-token"}).to_string(),
    ))
    .await
    .expect("send");
    let (_, code) = until_closed(&mut ws, 5).await;
    assert_eq!(code, Some(4401));
    let started = std::time::Instant::now();
    let (mut silent, _) = connect().await.expect("connect");
    let (frames, code) = until_closed(&mut silent, 10).await;
    assert_eq!(code, Some(4401), "{frames:?}");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());

    // At most ws_max_unauthenticated connections wait for their first frame.
    let (_a, _) = connect().await.expect("first waiting");
    let (_b, _) = connect().await.expect("second waiting");
    match connect().await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("a third waiting connection must be refused: {other:?}"),
    }
}

async fn token_of(app: &TestApp) -> String {
    app.login("ws-expiry@example.com", "password-1234").await["access_token"]
        .as_str()
        .expect("token")
        .to_string()
}

#[actix_web::test]
async fn websockets_are_capped_per_user_and_closed_when_the_account_is_deactivated() {
    let mut settings = crate::helpers::test_settings(&crate::helpers::temp_sqlite_url());
    settings.chat.ws_auth_check_secs = 1;
    settings.chat.ws_max_per_user = 2;
    let app = TestApp::spawn_with(settings).await;
    let admin = app.admin("ws-admin@example.com").await;
    let (id, token) = app.user("ws-cap@example.com").await;
    let connect = || tokio_tungstenite::connect_async(ws_url(&app, Some(&token)));
    let (first, _) = connect().await.expect("first");
    let (mut second, _) = connect().await.expect("second");
    match connect().await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 429),
        other => panic!("a third socket must be refused: {:?}", other.map(|_| ())),
    }
    // A closed socket frees its place.
    drop(first);
    let mut third = None;
    for _ in 0..50 {
        if let Ok((ws, _)) = connect().await {
            third = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut third = third.expect("a place freed by the closed socket");

    // Deactivated: every socket of the user gets an error frame and is closed.
    expect(
        app.patch_json(&format!("/admin/users/{id}"), &json!({"is_active": false}), &admin)
            .await,
        StatusCode::OK,
    )
    .await;
    for ws in [&mut second, &mut third] {
        let (frames, code) = until_closed(ws, 10).await;
        assert_eq!(code, Some(4403), "{frames:?}");
        assert_eq!(frames.last().map(|f| f["status"].clone()), Some(json!(403)));
    }
}

/// The socket is closed with `code` after an error frame with `status` and
/// `error_code`, within `secs`.
async fn closed_within(ws: &mut Ws, secs: u64, code: u16, status: u16, error_code: &str) {
    let started = std::time::Instant::now();
    let (frames, got) = until_closed(ws, secs + 1).await;
    assert_eq!(got, Some(code), "{frames:?} after {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(secs),
        "closed after {:?}",
        started.elapsed()
    );
    let last = frames.last().expect("an error frame first");
    assert_eq!(
        (last["type"].as_str(), last["status"].as_u64(), last["code"].as_str()),
        (Some("error"), Some(u64::from(status)), Some(error_code)),
        "{frames:?}"
    );
}

/// Still open: a ping is answered.
async fn still_open(ws: &mut Ws) {
    ws.send(Message::text(json!({"type": "ping", "id": "alive"}).to_string()))
        .await
        .expect("send");
    assert_eq!(next_json(ws).await["type"], "pong");
}

#[actix_web::test]
async fn logout_closes_the_websockets_of_that_login_within_five_seconds() {
    // chat.ws_auth_check_secs is 1 in config/test.toml.
    let app = TestApp::spawn().await;
    app.register("ws-logout@example.com", "password-1234").await;
    let first = app.login("ws-logout@example.com", "password-1234").await;
    let second = app.login("ws-logout@example.com", "password-1234").await;
    let access = |t: &Value| t["access_token"].as_str().expect("token").to_string();
    let (mut ended, _) = tokio_tungstenite::connect_async(ws_url(&app, Some(&access(&first))))
        .await
        .expect("connect");
    let (mut other, _) = tokio_tungstenite::connect_async(ws_url(&app, Some(&access(&second))))
        .await
        .expect("connect");
    still_open(&mut ended).await;

    expect(
        app.post_json("/auth/logout", &json!({"refresh_token": first["refresh_token"]}), None)
            .await,
        StatusCode::NO_CONTENT,
    )
    .await;
    closed_within(&mut ended, 5, 4401, 401, "token_revoked").await;
    // The login's access token stops on HTTP too; a refreshed one cannot be had.
    let body = expect(
        app.get("/auth/me", Some(&access(&first))).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(body["code"], "token_revoked", "{body}");
    expect(
        app.post_json("/auth/refresh", &json!({"refresh_token": first["refresh_token"]}), None)
            .await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    // Another login of the same user goes on.
    still_open(&mut other).await;
    expect(app.get("/auth/me", Some(&access(&second))).await, StatusCode::OK).await;
}

#[actix_web::test]
async fn a_logout_on_another_server_closes_the_socket_within_five_seconds() {
    // Two servers on one account database: the socket on one, the logout on the other.
    let url = crate::helpers::temp_sqlite_url();
    let one = TestApp::spawn_with(crate::helpers::test_settings(&url)).await;
    let two = TestApp::spawn_with(crate::helpers::test_settings(&url)).await;
    one.register("ws-nodes@example.com", "password-1234").await;
    let tokens = one.login("ws-nodes@example.com", "password-1234").await;
    let access = tokens["access_token"].as_str().expect("token");
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&two, Some(access)))
        .await
        .expect("connect");
    still_open(&mut ws).await;
    expect(two.get("/auth/me", Some(access)).await, StatusCode::OK).await;
    expect(
        one.post_json("/auth/logout", &json!({"refresh_token": tokens["refresh_token"]}), None)
            .await,
        StatusCode::NO_CONTENT,
    )
    .await;
    // Server two sees it within auth.login_cache_ms plus a recheck.
    closed_within(&mut ws, 5, 4401, 401, "token_revoked").await;
    expect(two.get("/auth/me", Some(access)).await, StatusCode::UNAUTHORIZED).await;
}

#[actix_web::test]
async fn websockets_opened_with_a_key_close_when_it_is_revoked_or_the_account_deactivated() {
    let app = TestApp::spawn().await;
    let admin = app.admin("ws-key-admin@example.com").await;
    let (id, token) = app.user("ws-key@example.com").await;
    let make_key = || async {
        expect(
            app.post_json(
                "/auth/api-keys",
                &json!({"name": "ws", "scopes": ["chat"]}),
                Some(&token),
            )
            .await,
            StatusCode::CREATED,
        )
        .await
    };
    let revoked = make_key().await;
    let kept = make_key().await;
    let key_of = |k: &Value| k["key"].as_str().expect("key").to_string();
    let (mut on_revoked, _) = tokio_tungstenite::connect_async(ws_url(&app, Some(&key_of(&revoked))))
        .await
        .expect("connect");
    let (mut on_kept, _) = tokio_tungstenite::connect_async(ws_url(&app, Some(&key_of(&kept))))
        .await
        .expect("connect");
    still_open(&mut on_revoked).await;

    let path = format!("/auth/api-keys/{}", revoked["id"].as_str().expect("id"));
    expect(app.delete(&path, &token).await, StatusCode::NO_CONTENT).await;
    closed_within(&mut on_revoked, 5, 4401, 401, "unauthenticated").await;
    still_open(&mut on_kept).await;

    expect(
        app.patch_json(&format!("/admin/users/{id}"), &json!({"is_active": false}), &admin)
            .await,
        StatusCode::OK,
    )
    .await;
    closed_within(&mut on_kept, 5, 4403, 403, "account_deactivated").await;
}
