//! Several nodes over one document store: each node's search index is reconciled
//! with the store every `knowledge.index_reconcile_secs`, so a document stored
//! through one node is found through the others, and a document deleted through
//! one is no longer found (or cited) through the others, within that time.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{expect, model_settings, models_dir, service_url, TestApp};

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
    settings.knowledge.index_reconcile_secs = 1;
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
    println!("reconciled within {seen:?} (period 1 s)");
    assert!(seen.iter().all(|d| *d < Duration::from_secs(5)), "{seen:?}");
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
