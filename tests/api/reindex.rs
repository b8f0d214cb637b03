//! POST /knowledge/reindex: a background job that re-chunks and re-embeds the
//! caller's own documents with the current settings, replacing their chunks so
//! that a search sees the old chunks or the new ones, never neither nor both.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{expect, model_settings, models_dir, TestApp};
use crate::uploads::{accepted_job, jsonl, remaining, upload, wait_for_job};

/// About `sentences` × 12 tokens of prose about `topic`, every sentence distinct.
fn prose(topic: &str, sentences: usize) -> String {
    (0..sentences)
        .map(|i| {
            format!(
                "The {topic} report, part {i}, says tides follow the moon over harbour {}.",
                i * 3
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn store(app: &TestApp, token: &str, title: &str, content: &str) -> Uuid {
    let v = expect(
        app.post_json(
            "/knowledge/documents",
            &json!({"title": title, "content": content}),
            Some(token),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    v["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()).expect("id")
}

async fn chunk_ids(app: &TestApp, id: Uuid) -> Vec<Uuid> {
    app.state
        .documents
        .chunks(id)
        .await
        .expect("chunks")
        .into_iter()
        .map(|c| c.id)
        .collect()
}

async fn reindex(app: &TestApp, token: &str, body: Option<Value>) -> reqwest::Response {
    let req = app.client.post(app.url("/knowledge/reindex")).bearer_auth(token);
    match body {
        Some(b) => req.json(&b),
        None => req,
    }
    .send()
    .await
    .expect("request")
}

/// Hits of a text search over everything the caller sees: document id → chunk ids.
async fn hits(app: &TestApp, token: &str, query: &str) -> HashMap<Uuid, HashSet<Uuid>> {
    let v = expect(
        app.post_json(
            "/knowledge/search",
            &json!({"query": query, "route": "text", "top_k": 100}),
            Some(token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let mut out: HashMap<Uuid, HashSet<Uuid>> = HashMap::new();
    for h in v["results"].as_array().expect("results") {
        let id = |k: &str| h[k].as_str().and_then(|s| Uuid::parse_str(s).ok()).expect("uuid");
        out.entry(id("document_id")).or_default().insert(id("chunk_id"));
    }
    out
}

#[actix_web::test]
async fn reindexing_uses_the_current_chunk_size_and_searches_meanwhile_see_old_or_new_chunks() {
    let Some(dir) = models_dir() else { return };
    // Stored with 256-token chunks by one server…
    let mut settings = model_settings(&dir);
    settings.knowledge.chunk_tokens = 256;
    settings.knowledge.chunk_overlap = 32;
    settings.knowledge.index_dir = String::new();
    // Searches run in a loop while the job runs.
    settings.rate_limits.search.limit = 100_000;
    let first = TestApp::spawn_with(settings.clone()).await;
    // An enterprise account: the searches below are many.
    let token = first.admin("reindex@example.com").await;
    let mut docs = Vec::new();
    for (i, topic) in ["glacier", "orchard", "lantern", "canyon", "meadow", "falcon"]
        .iter()
        .enumerate()
    {
        let id = store(&first, &token, &format!("{topic} notes"), &prose(topic, 30 + i)).await;
        docs.push(id);
    }
    let mut old: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for id in &docs {
        old.insert(*id, chunk_ids(&first, *id).await);
    }
    let old_total: usize = old.values().map(Vec::len).sum();
    drop(first);

    // … re-indexed by the next one, started on the same stores with 64-token chunks.
    settings.knowledge.chunk_tokens = 64;
    settings.knowledge.chunk_overlap = 8;
    let app = TestApp::spawn_with(settings).await;
    let token = app.login("reindex@example.com", "admin-password-1234").await["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    let before = remaining(&app, &token).await;
    let resp = reindex(&app, &token, None).await;
    let (job, id) = accepted_job(resp).await;
    assert_eq!(
        (job["kind"].as_str(), job["documents_total"].as_u64()),
        (Some("reindex"), Some(6)),
        "{job}"
    );
    assert!(job.get("filename").is_none(), "{job}");

    // Searches while it runs: every document is found, each by its old chunks or
    // by its new ones, never by both.
    let old_sets: HashMap<Uuid, HashSet<Uuid>> = old.iter().map(|(d, c)| (*d, c.iter().copied().collect())).collect();
    let mut searches = 0;
    let done = loop {
        let found = hits(&app, &token, "tides moon harbour report").await;
        searches += 1;
        for d in &docs {
            let chunks = found
                .get(d)
                .unwrap_or_else(|| panic!("document {d} not found mid-reindex"));
            let from_old = chunks.intersection(&old_sets[d]).count();
            assert!(
                from_old == 0 || from_old == chunks.len(),
                "document {d}: {from_old} old and {} new chunks at once",
                chunks.len() - from_old
            );
        }
        let v = expect(
            app.get(&format!("/knowledge/jobs/{id}"), Some(&token)).await,
            StatusCode::OK,
        )
        .await;
        if !matches!(v["state"].as_str(), Some("queued" | "running")) {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(
        (done["documents_done"].as_u64(), done["documents_failed"].as_u64()),
        (Some(6), Some(0)),
        "{done}"
    );
    eprintln!("{searches} searches during the re-index");

    // The store and the index hold the new chunks only, more and smaller ones.
    let mut new_total = 0;
    let found = hits(&app, &token, "tides moon harbour report").await;
    for d in &docs {
        let now = chunk_ids(&app, *d).await;
        assert!(now.iter().all(|c| !old[d].contains(c)), "old chunks left in the store");
        assert!(
            now.len() > old[d].len(),
            "{} chunks, before {}",
            now.len(),
            old[d].len()
        );
        let v = expect(
            app.get(&format!("/knowledge/documents/{d}"), Some(&token)).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(v["chunk_count"].as_u64(), Some(now.len() as u64));
        assert!(
            found[d].iter().all(|c| now.contains(c)),
            "the index has chunks the store has not"
        );
        new_total += now.len();
    }
    assert!(
        new_total > old_total * 2,
        "{new_total} chunks after, {old_total} before"
    );
    let v = expect(
        app.post_json(
            "/knowledge/search",
            &json!({"query": "what does the falcon report say about the moon", "route": "hybrid", "top_k": 1}),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(v["results"][0]["title"], "falcon notes", "{v}");
    assert!(
        v["results"][0]["content"].as_str().is_some_and(|c| c.len() < 600),
        "{v}"
    );

    // One background task (searches count as api calls: not compared here).
    let after = remaining(&app, &token).await;
    assert_eq!(after.0, before.0 - 1, "before {before:?}, after {after:?}");
}

#[actix_web::test]
async fn reindexing_touches_only_the_callers_documents_and_is_bounded() {
    let Some(dir) = models_dir() else { return };
    let mut settings = model_settings(&dir);
    settings.knowledge.reindex_max_documents = 3;
    settings.knowledge.jobs_max_pending_per_user = 1;
    let app = TestApp::spawn_with(settings).await;
    let (_, alice) = app.user("alice-reindex@example.com").await;
    let (_, bob) = app.user("bob-reindex@example.com").await;
    let mine = store(&app, &alice, "Alice's notes", &prose("alice", 8)).await;
    let theirs = store(&app, &bob, "Bob's notes", &prose("bob", 8)).await;
    let (mine_before, theirs_before) = (chunk_ids(&app, mine).await, chunk_ids(&app, theirs).await);
    let before = remaining(&app, &alice).await;

    // Bob's document and one that does not exist: failed as not found, untouched.
    let v = expect(
        reindex(
            &app,
            &alice,
            Some(json!({"document_ids": [theirs, mine, Uuid::new_v4(), mine]})),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(v["documents_total"], 3, "duplicates count once: {v}");
    let done = wait_for_job(&app, &alice, v["id"].as_str().expect("id")).await;
    assert_eq!(
        (
            done["state"].as_str(),
            done["documents_done"].as_u64(),
            done["documents_failed"].as_u64()
        ),
        (Some("completed"), Some(1), Some(2)),
        "{done}"
    );
    let errors = done["errors"].as_array().expect("errors");
    assert!(
        errors
            .iter()
            .all(|e| e.as_str().is_some_and(|e| e.contains("not found"))),
        "{done}"
    );
    assert_eq!(
        chunk_ids(&app, theirs).await,
        theirs_before,
        "another user's document was re-indexed"
    );
    let now = chunk_ids(&app, mine).await;
    assert_eq!(now.len(), mine_before.len());
    assert!(now.iter().all(|c| !mine_before.contains(c)));
    // One background task, and no api call for the request itself.
    assert_eq!(remaining(&app, &alice).await, (before.0 - 1, before.1));

    // Only someone else's documents: nothing re-indexed, the unit given back.
    let v = expect(
        reindex(&app, &alice, Some(json!({"document_ids": [theirs]}))).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let done = wait_for_job(&app, &alice, v["id"].as_str().expect("id")).await;
    assert_eq!(
        (done["documents_done"].as_u64(), done["documents_failed"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(chunk_ids(&app, theirs).await, theirs_before);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(remaining(&app, &alice).await.0, before.0 - 1);
    // Bob cannot read Alice's job.
    expect(
        app.get(
            &format!("/knowledge/jobs/{}", v["id"].as_str().expect("id")),
            Some(&bob),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // Bad requests: a clear 4xx, no job.
    let too_many: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    for (body, status) in [
        (json!({"document_ids": too_many}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({"document_ids": []}), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"document_ids": ["not-a-uuid"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (json!({"documents": [mine]}), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let v = expect(reindex(&app, &alice, Some(body.clone())).await, status).await;
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}: {v}");
    }
    let v = expect(
        app.client
            .post(app.url("/knowledge/reindex"))
            .bearer_auth(&alice)
            .header("content-type", "application/json")
            .body("{\"document_ids\": [")
            .send()
            .await
            .expect("request"),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(v["code"], "malformed_json", "{v}");
    let huge = format!("{{\"document_ids\": [{}]}}", " ".repeat(1 << 20));
    expect(
        app.client
            .post(app.url("/knowledge/reindex"))
            .bearer_auth(&alice)
            .body(huge)
            .send()
            .await
            .expect("request"),
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    expect(reindex(&app, "not-a-token", None).await, StatusCode::UNAUTHORIZED).await;
    // A user with nothing stored.
    let (_, carol) = app.user("carol-reindex@example.com").await;
    expect(reindex(&app, &carol, None).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(
        expect(app.get("/knowledge/jobs", Some(&carol)).await, StatusCode::OK).await,
        json!([])
    );
}

#[actix_web::test]
async fn a_cancelled_reindex_keeps_what_it_did_and_jobs_and_quota_are_limited() {
    let Some(dir) = models_dir() else { return };
    let mut settings = model_settings(&dir);
    settings.knowledge.jobs_max_pending_per_user = 1;
    settings.knowledge.jobs_min_documents = 10_000;
    settings.knowledge.jobs_min_upload_bytes = 64 << 20;
    let app = TestApp::spawn_with(settings).await;
    let admin = app.admin("admin-reindex@example.com").await;
    expect(
        app.client
            .put(app.url("/admin/settings/subscription_limits"))
            .bearer_auth(&admin)
            .json(&json!({"free": {"background_tasks": 2}}))
            .send()
            .await
            .expect("request"),
        StatusCode::OK,
    )
    .await;
    let (_, token) = app.user("cancel-reindex@example.com").await;
    let v = expect(
        upload(&app, &token, "many.jsonl", jsonl("many", 40), &[]).await,
        StatusCode::CREATED,
    )
    .await;
    let ids: Vec<Uuid> = v["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .filter_map(|d| d["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()))
        .collect();
    assert_eq!(ids.len(), 40);
    let mut before = HashMap::new();
    for id in &ids {
        before.insert(*id, chunk_ids(&app, *id).await);
    }

    let quota = remaining(&app, &token).await.0;
    assert_eq!(quota, 2);
    let job = expect(reindex(&app, &token, None).await, StatusCode::ACCEPTED).await;
    let id = job["id"].as_str().expect("id").to_string();
    // A second unfinished job is one too many (its unit is given back).
    let v = expect(reindex(&app, &token, None).await, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(v["code"], "too_many_jobs", "{v}");
    // Cancelled: it stops between documents.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = expect(
        app.client
            .post(app.url(&format!("/knowledge/jobs/{id}/cancel")))
            .bearer_auth(&token)
            .send()
            .await
            .expect("cancel"),
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(v["cancel_requested"], true);
    let done = wait_for_job(&app, &token, &id).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    let n = done["documents_done"].as_u64().expect("done") as usize;
    assert!(n < 40, "{done}");
    assert_eq!(done["documents_failed"], 0, "{done}");
    // Exactly the documents it did have new chunks; the rest are as they were.
    let mut changed = 0;
    for id in &ids {
        let now = chunk_ids(&app, *id).await;
        if now != before[id] {
            assert!(
                now.iter().all(|c| !before[id].contains(c)),
                "a mix of old and new chunks"
            );
            changed += 1;
        }
    }
    assert_eq!(changed, n, "{done}");

    // The cancelled job spent its unit if it re-indexed anything; once the plan's
    // background tasks are spent, the next job is refused by the quota.
    let used = u64::from(n > 0);
    assert_eq!(remaining(&app, &token).await.0, quota - used);
    while remaining(&app, &token).await.0 > 0 {
        let v = expect(
            reindex(&app, &token, Some(json!({"document_ids": [ids[0]]}))).await,
            StatusCode::ACCEPTED,
        )
        .await;
        let done = wait_for_job(&app, &token, v["id"].as_str().expect("id")).await;
        assert_eq!(done["documents_done"], 1, "{done}");
    }
    let v = expect(reindex(&app, &token, None).await, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(v["code"], "quota_exceeded", "{v}");
    assert_eq!(v["detail"]["resource"], "background_tasks", "{v}");
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b)).max(f32::MIN_POSITIVE)
}

/// A knowledge base embedded by another model (the stored vectors of one
/// document replaced by an unrelated unit vector, as another model's would be:
/// same dimensions, another space) is found at the next start: that document is
/// re-embedded in the background, in store and index, and one embedded by the
/// model in use keeps its chunks.
#[actix_web::test]
async fn vectors_from_another_model_are_re_embedded_at_start_and_the_current_models_kept() {
    let Some(dir) = models_dir() else { return };
    let settings = model_settings(&dir);
    let app = TestApp::spawn_with(settings.clone()).await;
    let (_, token) = app.user("erin@example.com").await;
    let tides = store(&app, &token, "Harbour tides", &prose("harbour", 3)).await;
    let volcano = store(
        &app,
        &token,
        "Volcanoes",
        "Volcanoes erupt when magma rises through cracks in the crust.",
    )
    .await;
    let documents = app.state.documents.clone();
    let mut chunks = documents.chunks(tides).await.expect("chunks");
    let original = chunks[0].embedding.clone();
    for c in &mut chunks {
        c.id = Uuid::new_v4();
        c.embedding = (0..original.len()).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
    }
    assert!(documents.replace_chunks(tides, &chunks).await.expect("replace"));
    let volcano_chunks = chunk_ids(&app, volcano).await;
    drop(app);

    let app = TestApp::spawn_with(settings).await;
    let question = "Do the tides follow the moon over the harbour?";
    // The store, then the index, get the new vectors: the vector route then finds
    // the document as relevant (the foreign vector's cosine with any question is
    // about 0).
    let found = |v: &Value| {
        let top = &v["results"][0];
        top["document_id"] == json!(tides.to_string()) && top["relevance"].as_f64().is_some_and(|r| r > 0.5)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = app.state.documents.chunks(tides).await.expect("chunks");
        if now.first().is_some_and(|c| cosine(&c.embedding, &original) > 0.99) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the foreign vectors were not re-embedded in the store within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The index follows the store in the same step (a few searches: the free
    // plan has 20 calls).
    let mut last = Value::Null;
    for _ in 0..5 {
        last = expect(
            app.post_json(
                "/knowledge/search",
                &json!({"query": question, "route": "vector", "top_k": 5}),
                Some(&token),
            )
            .await,
            StatusCode::OK,
        )
        .await;
        if found(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(found(&last), "the index kept the foreign vectors: {last}");
    assert_eq!(
        chunk_ids(&app, volcano).await,
        volcano_chunks,
        "a document embedded by the model in use is not re-embedded"
    );
}
