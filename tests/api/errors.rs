//! Errors are {"detail", "code", "type", "link"} with the right status, every code is
//! documented in docs/errors.md and every route's error responses are in the OpenAPI
//! document; every response has a request id.

use std::collections::BTreeMap;

use ragchat::error::ErrorCode;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{expect, TestApp};

/// docs/errors.md's sections: `## <code>` heading → the section's text.
fn documented_codes() -> BTreeMap<String, String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/errors.md");
    let text = std::fs::read_to_string(path).expect("docs/errors.md");
    let mut sections = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            if let Some((code, body)) = current.take() {
                sections.insert(code, body);
            }
            current = Some((heading.trim().to_string(), String::new()));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    if let Some((code, body)) = current {
        sections.insert(code, body);
    }
    sections
}

/// Asserts an error body's code, type and link, and that the link is a section of
/// docs/errors.md.
fn assert_error(body: &Value, code: &str, kind: &str) {
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["type"], kind, "{body}");
    let link = body["link"].as_str().expect("a link");
    let anchor = link.strip_prefix("docs/errors.md#").expect("a docs/errors.md anchor");
    assert!(
        documented_codes().contains_key(anchor),
        "{link} is a section of docs/errors.md"
    );
    assert!(body.get("detail").is_some(), "detail is kept: {body}");
}

#[test]
fn every_error_code_is_documented_with_its_type_and_nothing_else_is() {
    let docs = documented_codes();
    for code in ErrorCode::ALL {
        let section = docs
            .get(code.as_str())
            .unwrap_or_else(|| panic!("docs/errors.md has no '## {}' section", code.as_str()));
        let kind = format!("type `{}`", code.error_type().as_str());
        assert!(section.contains(&kind), "the section of {} says {kind}", code.as_str());
        assert!(
            section.contains("Status "),
            "the section of {} gives its status",
            code.as_str()
        );
        assert_eq!(code.link(), format!("docs/errors.md#{}", code.as_str()));
    }
    let known: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    for heading in docs.keys() {
        assert!(
            known.contains(&heading.as_str()),
            "docs/errors.md documents an unknown code '{heading}'"
        );
    }
}

/// Error responses that are deliberately not an ErrorBody.
const NOT_ERROR_BODIES: &[&str] = &[
    // /ready's 503 is the readiness report ({status, stores}), not an error;
    // /health's is its status while the node drains ({status: "draining"}).
    "GET /ready 503",
    "GET /health 503",
];

#[test]
fn every_route_documents_its_errors_with_the_error_body() {
    use utoipa::OpenApi;
    let doc = serde_json::to_value(ragchat::http::openapi::ApiDoc::openapi()).expect("json");
    let schema = &doc["components"]["schemas"]["ErrorBody"];
    for field in ["detail", "code", "type", "link"] {
        assert!(
            schema["properties"].get(field).is_some(),
            "ErrorBody has {field}: {schema}"
        );
    }
    let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
    for code in ErrorCode::ALL {
        assert!(
            codes.as_array().is_some_and(|a| a.contains(&json!(code.as_str()))),
            "the ErrorCode schema lists {}: {codes}",
            code.as_str()
        );
    }
    let mut failures: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("operations") {
            let route = format!("{} {path}", method.to_uppercase());
            let mut problems = Vec::new();
            let responses = op["responses"].as_object().expect("responses");
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
            if secured && !responses.contains_key("401") {
                problems.push("needs a token but does not list 401".to_string());
            }
            // What actix answers before the handler runs (schemathesis checks these).
            if op["requestBody"]["content"].get("application/json").is_some() {
                for status in ["400", "413", "422"] {
                    if !responses.contains_key(status) {
                        problems.push(format!("takes JSON but does not list {status}"));
                    }
                }
            }
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            if params.iter().any(|p| p["in"] == "path" || p["in"] == "query") && !responses.contains_key("422") {
                problems.push("has parameters but does not list 422".to_string());
            }
            for (status, resp) in responses {
                let is_error = status.parse::<u16>().is_ok_and(|s| s >= 400);
                if !is_error || NOT_ERROR_BODIES.contains(&format!("{route} {status}").as_str()) {
                    continue;
                }
                let reference = &resp["content"]["application/json"]["schema"]["$ref"];
                if reference != "#/components/schemas/ErrorBody" {
                    problems.push(format!("{status} is not an ErrorBody"));
                }
            }
            if !problems.is_empty() {
                failures.insert(route, problems);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "routes whose errors are not documented: {failures:#?}"
    );
}

#[actix_web::test]
async fn error_bodies_carry_a_documented_code_type_and_link() {
    let app = TestApp::spawn().await;
    let body = expect(app.get("/auth/me", None).await, StatusCode::UNAUTHORIZED).await;
    assert_error(&body, "unauthenticated", "auth");
    assert_eq!(body["detail"], "Not authenticated");

    let body = expect(
        app.post_json("/auth/login", &json!({"email": 42}), None).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_error(&body, "invalid_request", "invalid_request");
    let body = expect(
        app.post_json(
            "/auth/login",
            &json!({"email": "nobody@example.com", "password": "x"}),
            None,
        )
        .await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_error(&body, "invalid_credentials", "auth");

    let (_, token) = app.user("coded@example.com").await;
    let missing = format!("/knowledge/documents/{}", uuid::Uuid::new_v4());
    let body = expect(app.get(&missing, Some(&token)).await, StatusCode::NOT_FOUND).await;
    assert_error(&body, "document_not_found", "invalid_request");
    assert_eq!(body["detail"], "Document not found");
    let body = expect(app.get("/admin/users", Some(&token)).await, StatusCode::FORBIDDEN).await;
    assert_error(&body, "admin_required", "auth");
    let body = expect(
        app.post_json(
            "/auth/register",
            &json!({"email": "coded@example.com", "password": "password-1234"}),
            None,
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_error(&body, "email_taken", "invalid_request");

    // The free plan's ten messages, then the quota refusal with its object detail.
    for _ in 0..10 {
        expect(
            app.post_json("/billing/probe/chat", &json!({}), Some(&token)).await,
            StatusCode::OK,
        )
        .await;
    }
    let resp = app.post_json("/billing/probe/chat", &json!({}), Some(&token)).await;
    assert!(resp.headers().contains_key("retry-after"));
    let body = expect(resp, StatusCode::TOO_MANY_REQUESTS).await;
    assert_error(&body, "quota_exceeded", "quota");
    assert_eq!(body["detail"]["resource"], "messages");
}

#[actix_web::test]
async fn a_rate_limit_refusal_is_rate_limited_and_keeps_its_headers() {
    let app = TestApp::spawn().await;
    let admin = app.admin("coded-admin@example.com").await;
    let (id, token) = app.user("coded-chatty@example.com").await;
    expect(
        app.patch_json(
            &format!("/admin/users/{id}"),
            &json!({"subscription_plan": "pro"}),
            &admin,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let mut refused = None;
    for _ in 0..40 {
        let resp = app.post_json("/billing/probe/chat", &json!({}), Some(&token)).await;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(resp);
            break;
        }
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let resp = refused.expect("the chat rate limit refuses within 40 calls");
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(resp.headers()["ratelimit-remaining"], "0");
    let body = expect(resp, StatusCode::TOO_MANY_REQUESTS).await;
    assert_error(&body, "rate_limited", "rate_limit");
    assert!(body["detail"]
        .as_str()
        .is_some_and(|d| d.starts_with("Rate limit exceeded")));
}

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
    assert_error(&body, "malformed_json", "invalid_request");

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
    assert_error(&body, "payload_too_large", "invalid_request");
}

#[actix_web::test]
async fn unknown_routes_are_404_in_the_same_shape() {
    let app = TestApp::spawn().await;
    let body = expect(app.get("/no/such/route", None).await, StatusCode::NOT_FOUND).await;
    assert_eq!(
        body,
        json!({"detail": "Not Found", "code": "not_found", "type": "invalid_request",
               "link": "docs/errors.md#not_found"})
    );
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

/// One request over a raw connection: its status line, after the whole response
/// (headers and `Content-Length` body) was read. None: the server closed it.
async fn request_on(conn: &mut tokio::net::TcpStream, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    conn.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return head.lines().next().map(str::to_string);
            }
        }
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An idle keep-alive connection stays open for `server.keep_alive_secs` (75 s by
/// default, above a load balancer's usual 60 s idle timeout), so a pooled
/// connection reused after a few idle seconds is answered, not cut; a short
/// setting closes it.
#[actix_web::test]
async fn idle_keep_alive_connections_last_as_configured() {
    let app = TestApp::spawn().await;
    let addr = app.address.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let first = request_on(&mut conn, "/health").await.expect("first answer");
    assert!(first.contains("200"), "{first}");
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    let again = request_on(&mut conn, "/health").await;
    assert!(
        again.as_deref().is_some_and(|l| l.contains("200")),
        "a connection idle for 6 s was closed: {again:?}"
    );

    let mut settings = crate::helpers::test_settings(&crate::helpers::temp_sqlite_url());
    settings.server.keep_alive_secs = 1;
    let short = TestApp::spawn_with(settings).await;
    let addr = short.address.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    assert!(request_on(&mut conn, "/health").await.is_some());
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let after = request_on(&mut conn, "/health").await;
    assert_eq!(after, None, "keep_alive_secs = 1 kept the connection 3 s");
}
