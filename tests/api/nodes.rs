//! Several nodes over one document store: each node follows the store's
//! document change feed (`knowledge.change_feed_poll_ms`), so a document stored
//! through one node is found through the others, and a document deleted through
//! one is no longer found (or cited) through the others, within about a poll; a
//! node that was down catches up with everything it missed when it starts.
//! Conversations live in the shared conversation store.

use std::time::{Duration, Instant};

use ragchat_actors::knowledge::{Chunk, Document, Owner};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{
    expect, fresh_postgres_url, log_in, model_settings, models_dir, service_url, wait_ready, ServerProcess, TestApp,
};

/// Whether a text search through `app` finds a document titled `title`.
async fn finds(app: &TestApp, token: &str, query: &str, title: &str) -> bool {
    let v = expect(
        app.post_json(
            "/knowledge/search",
            &json!({"query": query, "route": "text", "top_k": 5}),
            Some(token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    v["results"]
        .as_array()
        .is_some_and(|r| r.iter().any(|h| h["title"] == title))
}

/// Polls until `finds` is `want`; the time it took.
async fn until(app: &TestApp, token: &str, query: &str, title: &str, want: bool) -> Duration {
    let started = Instant::now();
    while finds(app, token, query, title).await != want {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{title}: still {} after 15 s",
            if want { "missing" } else { "found" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[actix_web::test]
async fn documents_stored_or_deleted_through_one_node_reach_the_others_index() {
    let Some(mongo) = service_url("MONGODB_URL") else {
        return;
    };
    let Some(dir) = models_dir() else { return };
    let mut settings = model_settings(&dir);
    settings.knowledge.mongodb_url = mongo;
    settings.knowledge.mongodb_database = format!("nodes_{}", Uuid::new_v4().simple());
    // The feed alone (no periodic reconciliation).
    settings.knowledge.index_reconcile_secs = 0;
    // The test polls the search route.
    settings.rate_limits.search.limit = 100_000;
    let a = TestApp::spawn_with(settings.clone()).await;
    // The second node: the same stores, an index of its own.
    settings.knowledge.index_dir = format!("{}-b", settings.knowledge.index_dir);
    let b = TestApp::spawn_with(settings).await;
    let token = a.admin("nodes@example.com").await; // enterprise: many searches

    let mut seen = Vec::new();
    for i in 0..3 {
        let title = format!("Quorvane report {i}");
        let body = json!({"title": title, "content": format!("The quorvane{i} estuary floods every spring tide.")});
        let doc = expect(
            a.post_json("/knowledge/documents", &body, Some(&token)).await,
            StatusCode::CREATED,
        )
        .await;
        // Found at once on the node that stored it, within the period on the other.
        assert!(finds(&a, &token, &format!("quorvane{i} estuary"), &title).await);
        seen.push(until(&b, &token, &format!("quorvane{i} estuary"), &title, true).await);

        // Deleted through the other node: gone there at once, and from the first
        // node's index within the period.
        let id = doc["id"].as_str().expect("id");
        let resp = b.delete(&format!("/knowledge/documents/{id}"), &token).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert!(!finds(&b, &token, &format!("quorvane{i} estuary"), &title).await);
        seen.push(until(&a, &token, &format!("quorvane{i} estuary"), &title, false).await);
    }
    println!("seen through the other node within {seen:?} (feed read every 250 ms)");
    assert!(seen.iter().all(|d| *d < Duration::from_secs(2)), "{seen:?}");
}

/// Conversations live in the shared conversation store (ScyllaDB), not in a node:
/// one started through one node continues through another with its history, and
/// a delete through either ends it everywhere.
#[actix_web::test]
async fn a_conversation_started_on_one_node_continues_on_another_and_ends_on_all() {
    let (Some(mongo), Some(cql)) = (service_url("MONGODB_URL"), service_url("SCYLLA_URL")) else {
        return;
    };
    let Some(dir) = models_dir() else { return };
    let tag = Uuid::new_v4().simple().to_string();
    let mut settings = model_settings(&dir);
    settings.knowledge.mongodb_url = mongo;
    settings.knowledge.mongodb_database = format!("nodes_{tag}");
    settings.chat.scylla_nodes = cql.trim().to_string();
    settings.chat.scylla_keyspace = format!("nodes_{tag}");
    let a = TestApp::spawn_with(settings.clone()).await;
    settings.knowledge.index_dir = format!("{}-b", settings.knowledge.index_dir);
    let b = TestApp::spawn_with(settings).await;
    let token = a.admin(&format!("conversations-{tag}@example.com")).await;

    let ask = |message: &str, session: Option<&Value>| {
        let mut body = json!({"message": message, "enable_rag": false, "max_tokens": 4});
        if let Some(s) = session {
            body["session_id"] = s.clone();
        }
        body
    };
    let first = expect(
        a.post_json("/chat/message", &ask("My name is Orlaith.", None), Some(&token))
            .await,
        StatusCode::OK,
    )
    .await;
    let session = first["session_id"].clone();
    // Continued through the other node: the same conversation, its history there.
    let second = expect(
        b.post_json("/chat/message", &ask("What is my name?", Some(&session)), Some(&token))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(second["session_id"], session);
    let history = format!("/chat/sessions/{}/messages", session.as_str().expect("id"));
    let v = expect(a.get(&history, Some(&token)).await, StatusCode::OK).await;
    let contents: Vec<&str> = v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(contents.len(), 4, "{v}");
    assert_eq!((contents[0], contents[2]), ("My name is Orlaith.", "What is my name?"));
    let listed = expect(a.get("/chat/sessions", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(listed["sessions"][0]["message_count"], 4, "{listed}");

    // Deleted through the second node: gone on both.
    let path = format!("/chat/sessions/{}", session.as_str().expect("id"));
    assert_eq!(b.delete(&path, &token).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(a.get(&history, Some(&token)).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(b.get(&history, Some(&token)).await.status(), StatusCode::NOT_FOUND);
    let refused = a
        .post_json("/chat/message", &ask("Still there?", Some(&session)), Some(&token))
        .await;
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);
}

/// A word no other test document has, for document `i`.
fn word(i: usize) -> String {
    let letters: String = (0..4)
        .map(|k| char::from(b'a' + ((i / 26usize.pow(k)) % 26) as u8))
        .collect();
    format!("zembrak{letters}")
}

/// Whether a text search for `word` through the node at `base` finds its document.
async fn node_finds(client: &reqwest::Client, base: &str, token: &str, word: &str) -> bool {
    let resp = client
        .post(format!("{base}/knowledge/search"))
        .bearer_auth(token)
        .json(&json!({"query": word, "route": "text", "top_k": 3}))
        .send()
        .await
        .expect("search");
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.expect("json");
    v["results"]
        .as_array()
        .is_some_and(|r| r.iter().any(|h| h["title"] == format!("Feed {word}")))
}

/// Two `ragchat serve` processes over PostgreSQL and MongoDB, following the
/// change feed only (no periodic reconciliation): a document stored or deleted
/// through one is found (or gone) through the other within 2 s, every time
/// (30 changes: the p99 is their maximum). Then one node is killed (SIGKILL),
/// 1,000 documents are stored and 300 of them deleted in the store while it is
/// down; the running node follows all of it through the feed, and the killed
/// node, started again on its old snapshot, answers exactly like it.
#[actix_web::test]
async fn a_change_reaches_the_other_node_within_2_s_and_a_stopped_node_catches_up() {
    let (Some(pg), Some(mongo)) = (service_url("DATABASE_URL"), service_url("MONGODB_URL")) else {
        return;
    };
    let Some(models) = models_dir() else { return };
    let tag = Uuid::new_v4().simple().to_string();
    let database = format!("feed_{tag}");
    let dir = std::env::temp_dir().join(format!("ragchat-feed-{tag}"));
    let path = |p: std::path::PathBuf| p.display().to_string();
    let node = |i: usize| {
        ServerProcess::spawn(
            &[
                ("RAGCHAT__DATABASE__URL", pg.clone()),
                ("RAGCHAT__KNOWLEDGE__MONGODB_URL", mongo.clone()),
                ("RAGCHAT__KNOWLEDGE__MONGODB_DATABASE", database.clone()),
                ("RAGCHAT__KNOWLEDGE__INDEX_DIR", path(dir.join(format!("index-{i}")))),
                ("RAGCHAT__KNOWLEDGE__INDEX_RECONCILE_SECS", "0".into()),
                ("RAGCHAT__RATE_LIMITS__SEARCH__LIMIT", "100000".into()),
                ("RAGCHAT__METRICS__TOKEN", crate::metrics::SCRAPE_TOKEN.into()),
            ]
            .into_iter()
            .chain(crate::helpers::model_env(&models))
            .collect::<Vec<_>>(),
        )
    };
    let client = reqwest::Client::new();
    let a = node(1);
    wait_ready(&client, &a.base).await;
    let mut b = node(2);
    wait_ready(&client, &b.base).await;
    let email = format!("feed-{tag}@example.com");
    crate::helpers::create_enterprise_user(&pg, &email);
    let token = log_in(&client, &a.base, &email).await;

    // Live: stored through one node, found through the other; deleted, gone.
    let mut waits = Vec::new();
    let wait_for = |base: String, w: String, want: bool| {
        let (client, token) = (client.clone(), token.clone());
        async move {
            let started = Instant::now();
            while node_finds(&client, &base, &token, &w).await != want {
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "{w} on {base}: not {want} after 15 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            started.elapsed()
        }
    };
    for i in 0..15 {
        let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let w = word(100_000 + i);
        let stored = client
            .post(format!("{}/knowledge/documents", from.base))
            .bearer_auth(&token)
            .json(&json!({"title": format!("Feed {w}"), "content": format!("The {w} record was written through one node.")}))
            .send()
            .await
            .expect("store");
        assert_eq!(stored.status(), StatusCode::CREATED);
        let id = stored.json::<Value>().await.expect("json")["id"]
            .as_str()
            .expect("id")
            .to_string();
        waits.push(wait_for(to.base.clone(), w.clone(), true).await);
        let gone = client
            .delete(format!("{}/knowledge/documents/{id}", to.base))
            .bearer_auth(&token)
            .send()
            .await
            .expect("delete");
        assert_eq!(gone.status(), StatusCode::NO_CONTENT);
        waits.push(wait_for(from.base.clone(), w, false).await);
    }
    waits.sort();
    let p50 = waits[waits.len() / 2];
    let max = waits[waits.len() - 1];
    println!(
        "a change seen through the other node: p50 {} ms, max (p99 of {}) {} ms",
        p50.as_millis(),
        waits.len(),
        max.as_millis()
    );
    assert!(max < Duration::from_secs(2), "{waits:?}");

    // Down: node b killed, 1,000 stored and 300 deleted meanwhile (in the store,
    // as any node would), then started again.
    let _ = b.child.kill();
    let _ = b.child.wait();
    let store = ragchat::stores::connect_documents(Some(&mongo), &database, "unused")
        .await
        .expect("store");
    let deleted = |i: usize| i % 10 < 3;
    let mut ids = Vec::new();
    for i in 0..1000 {
        let w = word(i);
        let id = Uuid::new_v4();
        let content = format!("The {w} entry was written while a node was down.");
        let embedding: Vec<f32> = (0..384).map(|k| if k == i % 384 { 1.0 } else { 0.0 }).collect();
        let doc = Document {
            id,
            owner: Owner::Global,
            title: format!("Feed {w}"),
            source: "feed-test".into(),
            origin: "api".into(),
            content_hash: format!("feed-{tag}-{i}"),
            size_bytes: content.len() as u64,
            metadata: Default::default(),
            chunk_count: 1,
            created_at: chrono::Utc::now(),
        };
        let chunk = Chunk {
            id: Uuid::new_v4(),
            document_id: id,
            ordinal: 0,
            content,
            embedding,
        };
        store.insert_document(&doc, &[chunk]).await.expect("insert");
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| deleted(*i)) {
        assert!(store.delete_document(*id).await.expect("delete"), "{i}");
    }
    let restarted = Instant::now();
    let b = node(2);
    wait_ready(&client, &b.base).await;
    println!(
        "node b started and caught up with 700 documents in {} ms",
        restarted.elapsed().as_millis()
    );
    // Node a followed the feed to its last entry (its position, on /metrics: a
    // node that has found the last document stored may still be applying the
    // deletes after it); node b caught up at start. Both answer alike, as the
    // store says, for every tenth document and for those on either side.
    let last = store.last_change().await.expect("last change");
    let started = Instant::now();
    loop {
        let text = client
            .get(format!("{}/metrics", a.base))
            .bearer_auth(crate::metrics::SCRAPE_TOKEN)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let position = crate::metrics::sample(&text, "search_index_feed_position", &[]);
        if position.is_some_and(|p| p >= last as f64) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "node a did not follow the feed to {last}: at {position:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "node a at the feed's last entry {} ms after node b was ready",
        started.elapsed().as_millis()
    );
    let mut checked = 0;
    for i in (0..1000).filter(|i| i % 10 == 0 || i % 10 == 2 || i % 10 == 3 || i % 10 == 9) {
        let w = word(i);
        let on_a = node_finds(&client, &a.base, &token, &w).await;
        let on_b = node_finds(&client, &b.base, &token, &w).await;
        assert_eq!((on_a, on_b), (!deleted(i), !deleted(i)), "document {i} ({w})");
        checked += 1;
    }
    println!("{checked} documents answered alike on both nodes after the catch-up");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Storage held for uploads in progress lives in the shared SQL store: six
/// concurrent 300 KiB uploads of one user against a 1 MiB plan, two through
/// each of three nodes, create exactly three (held per node, each node would
/// have let two through: six).
#[actix_web::test]
async fn six_uploads_through_three_nodes_against_a_1_mib_plan_create_exactly_three() {
    let (Some(mongo), Some(pg)) = (service_url("MONGODB_URL"), fresh_postgres_url().await) else {
        return;
    };
    let Some(dir) = models_dir() else { return };
    let mut settings = model_settings(&dir);
    settings.database.url = pg;
    settings.knowledge.mongodb_url = mongo;
    settings.knowledge.mongodb_database = format!("storage_{}", Uuid::new_v4().simple());
    settings.knowledge.max_document_bytes = 400 << 10;
    let a = TestApp::spawn_with(settings.clone()).await;
    let admin = a.admin("storage-admin@example.com").await;
    expect(
        a.client
            .put(a.url("/admin/settings/subscription_limits"))
            .bearer_auth(&admin)
            .json(&json!({"free": {"storage_mb": 1, "api_calls": 1000}}))
            .send()
            .await
            .expect("request"),
        StatusCode::OK,
    )
    .await;
    // The other nodes read the limits at start.
    let mut nodes = vec![a];
    for i in 1..3 {
        let mut s = settings.clone();
        s.knowledge.index_dir = format!("{}-{i}", settings.knowledge.index_dir);
        nodes.push(TestApp::spawn_with(s).await);
    }
    let (_, bob) = nodes[0].user("storage-bob@example.com").await;
    // 300 KiB each (mostly blank, so cheap to embed): three fit in 1 MiB, four do not.
    let doc =
        |i: usize| json!({"title": format!("Doc {i}"), "content": format!("note {i}{}end", " ".repeat(300 << 10))});
    let requests = (0..6).map(|i| {
        let (node, bob, body) = (&nodes[i % 3], &bob, doc(i));
        async move { node.post_json("/knowledge/documents", &body, Some(bob)).await.status() }
    });
    let statuses = futures_util::future::join_all(requests).await;
    let created = statuses.iter().filter(|s| **s == StatusCode::CREATED).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::PAYLOAD_TOO_LARGE).count();
    assert_eq!((created, refused), (3, 3), "{statuses:?}");
    let listed = expect(
        nodes[1].get("/knowledge/documents?limit=100", Some(&bob)).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(listed["total"], 3, "{listed}");
    // The holds were handed back: a small document still fits, through any node.
    let small = json!({"title": "Small", "content": "a small note"});
    expect(
        nodes[2].post_json("/knowledge/documents", &small, Some(&bob)).await,
        StatusCode::CREATED,
    )
    .await;
}

/// An SSE answer whose node dies mid-stream (SIGKILL) is resumed through another
/// node by sending the same request again (same `request_id`): it is answered
/// there, the usage ledger records the message once (the dead node never
/// recorded its unfinished answer), and the same request once more gets the
/// stored answer back, without a new record and without a second conversation.
#[actix_web::test]
async fn a_stream_cut_by_a_killed_node_is_resumed_on_another_and_counted_once() {
    let (Some(mongo), Some(cql), Some(pg)) = (
        service_url("MONGODB_URL"),
        service_url("SCYLLA_URL"),
        fresh_postgres_url().await,
    ) else {
        return;
    };
    let Some(models) = models_dir() else { return };
    let tag = Uuid::new_v4().simple().to_string();
    let dir = std::env::temp_dir().join(format!("ragchat-resume-{tag}"));
    let path = |p: std::path::PathBuf| p.display().to_string();
    let node = |i: usize| {
        ServerProcess::spawn(
            &[
                ("RAGCHAT__DATABASE__URL", pg.clone()),
                ("RAGCHAT__KNOWLEDGE__MONGODB_URL", mongo.clone()),
                ("RAGCHAT__KNOWLEDGE__MONGODB_DATABASE", format!("resume_{tag}")),
                ("RAGCHAT__KNOWLEDGE__INDEX_DIR", path(dir.join(format!("index-{i}")))),
                ("RAGCHAT__CHAT__SCYLLA_NODES", cql.trim().to_string()),
                ("RAGCHAT__CHAT__SCYLLA_KEYSPACE", format!("resume_{tag}")),
            ]
            .into_iter()
            .chain(crate::helpers::model_env(&models))
            .collect::<Vec<_>>(),
        )
    };
    let client = reqwest::Client::new();
    let mut a = node(1);
    wait_ready(&client, &a.base).await;
    let b = node(2);
    wait_ready(&client, &b.base).await;
    let email = format!("resume-{tag}@example.com");
    crate::helpers::create_enterprise_user(&pg, &email);
    let token = log_in(&client, &b.base, &email).await;
    let me: Value = client
        .get(format!("{}/auth/me", b.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("json");
    let user_id = Uuid::parse_str(me["id"].as_str().expect("id")).expect("uuid");
    let usage = ragchat::stores::connect(&ragchat::config::DatabaseSettings {
        url: pg.clone(),
        max_connections: 2,
        acquire_timeout_ms: 5000,
    })
    .await
    .expect("usage store")
    .usage;

    let request_id = Uuid::new_v4();
    let body = json!({"message": "Tell me a long story about a lighthouse keeper.", "enable_rag": false,
                      "max_tokens": 300, "request_id": request_id});
    // Through node a until its first token; then node a dies.
    let resp = client
        .post(format!("{}/chat/stream", a.base))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("event: token") {
        let chunk = futures_util::StreamExt::next(&mut stream)
            .await
            .expect("a token before the end")
            .expect("chunk");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let _ = a.child.kill();
    let _ = a.child.wait();
    drop(stream);

    // The client reconnects through node b with the same request, on a new
    // connection as a client whose connection broke does.
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{}/chat/stream", b.base))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .expect("resume");
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.expect("body");
    let done: Value = text
        .split("\n\n")
        .find_map(|e| e.strip_prefix("event: done\ndata: "))
        .map(|d| serde_json::from_str(d).expect("done json"))
        .unwrap_or_else(|| panic!("no done event in {text}"));
    let answer = done["answer"].as_str().expect("answer").to_string();
    assert!(!answer.is_empty(), "{done}");
    let session = done["session_id"].as_str().expect("session").to_string();
    assert_eq!(session, Uuid::new_v5(&user_id, request_id.as_bytes()).to_string());

    // One record for the message: the answer node b made.
    let started = Instant::now();
    while usage.usage_record_count(user_id).await.expect("count") == 0 {
        assert!(started.elapsed() < Duration::from_secs(15), "no usage recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(usage.usage_record_count(user_id).await.expect("count"), 1);

    // The same request once more: the stored answer, not a new one.
    let again: Value = client
        .post(format!("{}/chat/message", b.base))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .expect("again")
        .json()
        .await
        .expect("json");
    assert_eq!(again["answer"].as_str(), Some(answer.trim()), "{again}");
    assert_eq!(again["message_id"], done["message_id"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(usage.usage_record_count(user_id).await.expect("count"), 1);
    let history: Value = client
        .get(format!("{}/chat/sessions/{session}/messages", b.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("history")
        .json()
        .await
        .expect("json");
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(2), "{history}");
    let _ = std::fs::remove_dir_all(&dir);
}
