//! API key scopes: a key does only what its scopes allow (403
//! `insufficient_scope` otherwise); password sessions are not limited; the
//! `admin` scope is for superusers' keys only; keys made before scopes keep
//! chat, search and ingest.

use reqwest::multipart::{Form, Part};
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{expect, model_settings, models_dir, TestApp};

/// Makes a key with these scopes (None: the default) and returns the key.
async fn key(app: &TestApp, token: &str, scopes: Option<Value>) -> String {
    let mut body = json!({"name": "scoped"});
    if let Some(s) = scopes {
        body["scopes"] = s;
    }
    let created = expect(
        app.post_json("/auth/api-keys", &body, Some(token)).await,
        StatusCode::CREATED,
    )
    .await;
    created["key"].as_str().expect("key").to_string()
}

/// The answer is 403 `insufficient_scope` naming `scope`.
async fn refused(resp: Response, scope: &str) {
    let url = resp.url().to_string();
    let body = expect(resp, StatusCode::FORBIDDEN).await;
    assert_eq!(body["code"], "insufficient_scope", "{url}: {body}");
    assert_eq!(body["type"], "auth", "{body}");
    assert_eq!(body["link"], "docs/errors.md#insufficient_scope", "{body}");
    let detail = body["detail"].as_str().expect("detail");
    assert!(detail.contains(&format!("'{scope}'")), "{url}: {detail}");
}

fn upload_form() -> Form {
    Form::new().part(
        "file",
        Part::bytes(b"Scoped keys upload documents too.".to_vec()).file_name("note.txt"),
    )
}

async fn upload(app: &TestApp, key: &str) -> Response {
    app.client
        .post(app.url("/knowledge/documents"))
        .bearer_auth(key)
        .multipart(upload_form())
        .send()
        .await
        .expect("upload")
}

fn ws_url(app: &TestApp, token: &str) -> String {
    format!("{}/ws/chat?token={token}", app.address.replacen("http://", "ws://", 1))
}

/// The status of a WebSocket handshake (101 when it was accepted).
async fn handshake(app: &TestApp, token: &str) -> u16 {
    match tokio_tungstenite::connect_async(ws_url(app, token)).await {
        Ok((_, resp)) => resp.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("handshake: {e}"),
    }
}

/// The close code of a WebSocket authenticated by its first frame with `token`.
async fn first_frame_close(app: &TestApp, token: &str) -> Option<u16> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let url = format!("{}/ws/chat", app.address.replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    ws.send(Message::text(json!({"type": "auth", "token": token}).to_string()))
        .await
        .expect("send");
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(c)))) => return c.map(|c| u16::from(c.code)),
            Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains("\"authenticated\"") => return None,
            Ok(Some(Ok(_))) => {}
            _ => return None,
        }
    }
}

#[actix_web::test]
async fn a_chat_only_key_chats_and_is_refused_search_ingest_and_admin() {
    let app = TestApp::spawn().await;
    let (_, token) = app.user("scoped@example.com").await;
    let chat = key(&app, &token, Some(json!(["chat"]))).await;
    let doc = json!({"title": "T", "content": "Some text."});
    let nowhere = format!("/knowledge/documents/{}", Uuid::new_v4());

    // Allowed: chat routes, and reading its own account.
    expect(
        app.post_json("/billing/probe/chat", &json!({}), Some(&chat)).await,
        StatusCode::OK,
    )
    .await;
    expect(app.get("/chat/sessions", Some(&chat)).await, StatusCode::OK).await;
    assert_eq!(handshake(&app, &chat).await, 101, "the WebSocket chat");
    expect(app.get("/auth/me", Some(&chat)).await, StatusCode::OK).await;
    expect(app.get("/billing/usage", Some(&chat)).await, StatusCode::OK).await;

    // Refused, each before any work: search, ingestion, embeddings.
    refused(
        app.post_json("/knowledge/search", &json!({"query": "text"}), Some(&chat))
            .await,
        "search",
    )
    .await;
    refused(
        app.post_json("/billing/probe/search", &json!({}), Some(&chat)).await,
        "search",
    )
    .await;
    refused(
        app.post_json("/v1/embeddings", &json!({"input": "text"}), Some(&chat))
            .await,
        "search",
    )
    .await;
    refused(app.post_json("/knowledge/documents", &doc, Some(&chat)).await, "ingest").await;
    refused(upload(&app, &chat).await, "ingest").await;
    refused(app.delete(&nowhere, &chat).await, "ingest").await;
    refused(app.get("/knowledge/documents", Some(&chat)).await, "search").await;
    refused(app.get(&nowhere, Some(&chat)).await, "ingest").await;
    // Admin: the user is no superuser.
    let body = expect(app.get("/admin/users", Some(&chat)).await, StatusCode::FORBIDDEN).await;
    assert_eq!(body["code"], "admin_required", "{body}");
    // Nothing refused was counted.
    let usage = expect(app.get("/billing/usage", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(usage["api_calls_this_month"], 0, "{usage}");

    // The same user's password session is not limited by scopes.
    expect(
        app.post_json("/billing/probe/search", &json!({}), Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    expect(app.get("/knowledge/documents", Some(&token)).await, StatusCode::OK).await;
}

#[actix_web::test]
async fn search_and_ingest_keys_reach_their_routes_only() {
    let app = TestApp::spawn().await;
    let (_, token) = app.user("scopes-two@example.com").await;
    let search = key(&app, &token, Some(json!(["search"]))).await;
    let ingest = key(&app, &token, Some(json!(["ingest"]))).await;
    let nowhere = format!("/knowledge/documents/{}", Uuid::new_v4());

    expect(
        app.post_json("/billing/probe/search", &json!({}), Some(&search)).await,
        StatusCode::OK,
    )
    .await;
    expect(app.get("/knowledge/documents", Some(&search)).await, StatusCode::OK).await;
    refused(
        app.post_json("/billing/probe/chat", &json!({}), Some(&search)).await,
        "chat",
    )
    .await;
    refused(app.get("/chat/sessions", Some(&search)).await, "chat").await;
    assert_eq!(handshake(&app, &search).await, 403, "no chat scope, no WebSocket");
    assert_eq!(
        first_frame_close(&app, &search).await,
        Some(4403),
        "nor by the first frame"
    );
    refused(app.delete(&nowhere, &search).await, "ingest").await;

    // Ingest: adding (the api_calls unit) and deleting documents, and listing them.
    expect(
        app.post_json("/billing/probe/api", &json!({}), Some(&ingest)).await,
        StatusCode::OK,
    )
    .await;
    expect(app.get("/knowledge/documents", Some(&ingest)).await, StatusCode::OK).await;
    expect(app.delete(&nowhere, &ingest).await, StatusCode::NOT_FOUND).await;
    // Past the scope check: without the embedding model this server cannot ingest.
    let body = expect(upload(&app, &ingest).await, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["code"], "model_not_loaded", "{body}");
    refused(
        app.post_json("/knowledge/search", &json!({"query": "text"}), Some(&ingest))
            .await,
        "search",
    )
    .await;
    refused(
        app.post_json("/billing/probe/api", &json!({}), Some(&search)).await,
        "ingest",
    )
    .await;
}

#[actix_web::test]
async fn keys_are_made_with_known_scopes_listed_with_them_and_admin_only_for_superusers() {
    let app = TestApp::spawn().await;
    let (_, token) = app.user("minter@example.com").await;
    // The default: chat and search.
    let created = expect(
        app.post_json("/auth/api-keys", &json!({"name": "default"}), Some(&token))
            .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(created["scopes"], json!(["chat", "search"]));
    let created = expect(
        app.post_json(
            "/auth/api-keys",
            &json!({"name": "pipeline", "scopes": ["ingest", "search", "ingest"]}),
            Some(&token),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(created["scopes"], json!(["search", "ingest"]), "deduplicated, in order");

    // Refused: an admin key for a non-superuser; unknown, empty, or not a list.
    let body = expect(
        app.post_json(
            "/auth/api-keys",
            &json!({"name": "escalate", "scopes": ["chat", "admin"]}),
            Some(&token),
        )
        .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(body["code"], "admin_required", "{body}");
    let body = expect(
        app.post_json(
            "/auth/api-keys",
            &json!({"name": "typo", "scopes": ["chat", "serach"]}),
            Some(&token),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let detail = body["detail"].as_str().expect("detail");
    assert!(
        detail.contains("'serach'") && detail.contains("chat, search, ingest, admin"),
        "{detail}"
    );
    let long = "x".repeat(100_000);
    let body = expect(
        app.post_json(
            "/auth/api-keys",
            &json!({"name": "long", "scopes": [long]}),
            Some(&token),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        body["detail"].as_str().is_some_and(|d| d.len() < 200),
        "an unknown name is not echoed whole: {body}"
    );
    for bad in [json!([]), json!("chat"), json!([1]), json!(["CHAT"])] {
        expect(
            app.post_json("/auth/api-keys", &json!({"name": "bad", "scopes": bad}), Some(&token))
                .await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    // Only the two good keys were made; the list shows each one's scopes.
    let listed = expect(app.get("/auth/api-keys", Some(&token)).await, StatusCode::OK).await;
    let mut scopes: Vec<Value> = listed
        .as_array()
        .expect("list")
        .iter()
        .map(|k| k["scopes"].clone())
        .collect();
    scopes.sort_by_key(|s| s.to_string());
    assert_eq!(scopes, [json!(["chat", "search"]), json!(["search", "ingest"])]);
}

#[actix_web::test]
async fn admin_powers_through_a_key_need_a_superuser_and_the_admin_scope() {
    let app = TestApp::spawn().await;
    let admin = app.admin("scope-root@example.com").await;
    let plain = key(&app, &admin, None).await;
    let root = key(&app, &admin, Some(json!(["admin"]))).await;
    let listed = expect(app.get("/auth/api-keys", Some(&admin)).await, StatusCode::OK).await;
    assert!(listed.to_string().contains(r#"["admin"]"#), "{listed}");

    // A superuser's key without the admin scope is no admin key.
    refused(app.get("/admin/users", Some(&plain)).await, "admin").await;
    refused(app.get("/admin/actors", Some(&plain)).await, "admin").await;
    refused(app.get("/metrics", Some(&plain)).await, "admin").await;
    expect(app.get("/admin/users", Some(&root)).await, StatusCode::OK).await;
    assert_eq!(app.get("/metrics", Some(&root)).await.status(), StatusCode::OK);
    // … and the admin scope alone does not chat.
    refused(
        app.post_json("/billing/probe/chat", &json!({}), Some(&root)).await,
        "chat",
    )
    .await;
    expect(app.get("/admin/users", Some(&admin)).await, StatusCode::OK).await;

    // A superuser demoted keeps the key but loses what it was for.
    let other = app.admin("scope-other-root@example.com").await;
    let me = expect(app.get("/auth/me", Some(&root)).await, StatusCode::OK).await;
    let id = me["id"].as_str().expect("id");
    expect(
        app.patch_json(&format!("/admin/users/{id}"), &json!({"is_superuser": false}), &other)
            .await,
        StatusCode::OK,
    )
    .await;
    let body = expect(app.get("/admin/users", Some(&root)).await, StatusCode::FORBIDDEN).await;
    assert_eq!(body["code"], "admin_required", "{body}");
}

#[actix_web::test]
async fn keys_from_before_scopes_keep_chat_search_and_ingest_but_not_admin() {
    let app = TestApp::spawn().await;
    let admin = app.admin("legacy-root@example.com").await;
    let me = expect(app.get("/auth/me", Some(&admin)).await, StatusCode::OK).await;
    let user_id: Uuid = me["id"].as_str().expect("id").parse().expect("uuid");
    // A key row as the previous version wrote it: no scopes column.
    let key = format!("rck_{}", "ab".repeat(32));
    let url = &app.state.settings.database.url;
    let pool = sqlx::SqlitePool::connect(url).await.expect("the test database");
    sqlx::query(
        "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, created_at) VALUES ($1, $2, 'old', $3, $4, $5)",
    )
    .bind(Uuid::new_v4())
    .bind(user_id)
    .bind(&key[..12])
    .bind(ragchat::auth::token_digest(&key))
    .bind(chrono::Utc::now())
    .execute(&pool)
    .await
    .expect("insert");
    pool.close().await;

    let listed = expect(app.get("/auth/api-keys", Some(&admin)).await, StatusCode::OK).await;
    assert_eq!(listed[0]["scopes"], json!(["chat", "search", "ingest"]), "{listed}");
    for probe in ["chat", "search", "api"] {
        expect(
            app.post_json(&format!("/billing/probe/{probe}"), &json!({}), Some(&key))
                .await,
            StatusCode::OK,
        )
        .await;
    }
    // Its user is a superuser, but the admin routes need a key made with that scope.
    refused(app.get("/admin/users", Some(&key)).await, "admin").await;
}

#[actix_web::test]
async fn every_authenticated_operation_documents_its_403() {
    let app = TestApp::spawn().await;
    let doc = expect(app.get("/openapi.json", None).await, StatusCode::OK).await;
    let mut secured = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("operations") {
            if op.get("security").is_none() {
                continue;
            }
            secured += 1;
            let forbidden = &op["responses"]["403"];
            assert!(forbidden.is_object(), "{method} {path} documents no 403");
            assert_eq!(
                forbidden["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/ErrorBody",
                "{method} {path}"
            );
        }
    }
    assert!(secured > 30, "{secured} secured operations");
    for (path, method, scope) in [
        ("/chat/message", "post", "`chat`"),
        ("/knowledge/search", "post", "`search`"),
        ("/knowledge/documents", "post", "`ingest`"),
        ("/admin/users", "get", "`admin`"),
    ] {
        let text = doc["paths"][path][method]["responses"]["403"]["description"].to_string();
        assert!(text.contains(scope), "{method} {path}: {text}");
    }
}

/// With the models: an ingest key stores documents (JSON and a file), a search
/// key finds them, a chat key gets answers; each is refused the others' work.
#[actix_web::test]
async fn scoped_keys_ingest_search_and_chat_with_the_models() {
    let Some(dir) = models_dir() else { return };
    let app = TestApp::spawn_with(model_settings(&dir)).await;
    let (_, token) = app.user("scoped-models@example.com").await;
    let ingest = key(&app, &token, Some(json!(["ingest"]))).await;
    let search = key(&app, &token, Some(json!(["search"]))).await;
    let chat = key(&app, &token, Some(json!(["chat"]))).await;

    let doc = json!({"title": "Quokka facts", "content": "Quokkas are small marsupials living on Rottnest Island."});
    expect(
        app.post_json("/knowledge/documents", &doc, Some(&ingest)).await,
        StatusCode::CREATED,
    )
    .await;
    let uploaded = expect(upload(&app, &ingest).await, StatusCode::CREATED).await;
    assert_eq!(uploaded["created"], 1, "{uploaded}");
    refused(upload(&app, &chat).await, "ingest").await;

    let found = expect(
        app.post_json(
            "/knowledge/search",
            &json!({"query": "quokka marsupials", "route": "text"}),
            Some(&search),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(found["results"][0]["title"], "Quokka facts", "{found}");
    expect(
        app.post_json("/v1/embeddings", &json!({"input": "quokka"}), Some(&search))
            .await,
        StatusCode::OK,
    )
    .await;

    let answer = expect(
        app.post_json(
            "/chat/message",
            &json!({"message": "Where do quokkas live?", "max_tokens": 8}),
            Some(&chat),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert!(answer["answer"].is_string(), "{answer}");
    refused(
        app.post_json("/chat/message", &json!({"message": "hi"}), Some(&search))
            .await,
        "chat",
    )
    .await;
    refused(
        app.post_json(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
            Some(&ingest),
        )
        .await,
        "chat",
    )
    .await;
}
