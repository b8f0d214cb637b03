//! Errors are {"detail": ...} with the right status; every response has a request id.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{expect, TestApp};

#[actix_web::test]
async fn malformed_json_is_400_and_wrong_shapes_are_422_with_a_readable_detail() {
    let app = TestApp::spawn().await;
    let resp = app
        .client
        .post(app.url("/auth/login"))
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .expect("req");
    let body = expect(resp, StatusCode::BAD_REQUEST).await;
    assert!(
        body["detail"].as_str().is_some_and(|d| d.starts_with("Malformed JSON")),
        "{body}"
    );

    let body = expect(
        app.post_json("/auth/login", &json!({"email": 42}), None).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Invalid request body")),
        "{body}"
    );

    let resp = app
        .client
        .post(app.url("/auth/login"))
        .body("email=a")
        .send()
        .await
        .expect("req");
    let body = expect(resp, StatusCode::BAD_REQUEST).await;
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("application/json")));
}

#[actix_web::test]
async fn oversized_bodies_are_413() {
    let app = TestApp::spawn().await;
    let huge = "x".repeat(2 * 1024 * 1024);
    let resp = app
        .post_json("/auth/register", &json!({"email": "a@b.co", "password": huge}), None)
        .await;
    let body = expect(resp, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("too large")));
}

#[actix_web::test]
async fn unknown_routes_are_404_in_the_same_shape() {
    let app = TestApp::spawn().await;
    let body = expect(app.get("/no/such/route", None).await, StatusCode::NOT_FOUND).await;
    assert_eq!(body, json!({"detail": "Not Found"}));
}

#[actix_web::test]
async fn every_response_carries_a_request_id_and_keeps_a_given_one() {
    let app = TestApp::spawn().await;
    for resp in [
        app.get("/health", None).await,
        app.get("/auth/me", None).await,
        app.get("/nope", None).await,
    ] {
        let id = resp
            .headers()
            .get("x-request-id")
            .expect("request id")
            .to_str()
            .expect("ascii");
        assert_eq!(id.len(), 36, "a fresh uuid: {id}");
    }
    let resp = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "trace-123")
        .send()
        .await
        .expect("req");
    assert_eq!(resp.headers()["x-request-id"], "trace-123");
    let resp = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "bad id\t!")
        .send()
        .await
        .expect("req");
    assert_ne!(resp.headers()["x-request-id"], "bad id\t!");
}

#[actix_web::test]
async fn health_ready_openapi_and_docs_are_served() {
    let app = TestApp::spawn().await;
    let health = expect(app.get("/health", None).await, StatusCode::OK).await;
    assert_eq!(health["status"], "healthy");
    let ready = expect(app.get("/ready", None).await, StatusCode::OK).await;
    assert_eq!(
        ready["stores"]["accounts"],
        json!({"backend": "sqlite", "status": "ok"})
    );
    let doc: Value = expect(app.get("/openapi.json", None).await, StatusCode::OK).await;
    for path in [
        "/auth/login",
        "/auth/register",
        "/auth/refresh",
        "/auth/api-keys",
        "/admin/users",
        "/ready",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} documented");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let docs = app.get("/docs/", None).await;
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.expect("html").contains("swagger"));
    assert_eq!(app.get("/docs", None).await.status(), StatusCode::PERMANENT_REDIRECT);
}
