//! GET /metrics: Prometheus text for superusers and the scrape token only, with
//! requests by route pattern, rejections and the components' gauges.

use ragchat::config::Secret;
use reqwest::StatusCode;
use uuid::Uuid;

use crate::helpers::{expect, temp_sqlite_url, test_settings, TestApp};

pub const SCRAPE_TOKEN: &str = "scrape-token-0123456789abcdef";

pub async fn scrape(app: &TestApp, token: Option<&str>) -> (StatusCode, String) {
    let mut req = app.client.get(app.url("/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    (status, resp.text().await.unwrap_or_default())
}

/// The value of the first sample whose line starts with `name{` and holds every label.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[actix_web::test]
async fn metrics_answer_admins_and_the_scrape_token_in_prometheus_text() {
    let mut settings = test_settings(&temp_sqlite_url());
    settings.metrics.token = Secret::new(SCRAPE_TOKEN);
    settings.rate_limits.chat.limit = 2;
    let app = TestApp::spawn_with(settings).await;
    let admin = app
        .admin(&format!("metrics-admin-{}@example.com", Uuid::new_v4().simple()))
        .await;
    let (_, user) = app
        .user(&format!("metrics-user-{}@example.com", Uuid::new_v4().simple()))
        .await;

    // Access: nobody, a plain user, a wrong token are refused.
    assert_eq!(scrape(&app, None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(scrape(&app, Some(&user)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        scrape(&app, Some("scrape-token-wrong-0123456789")).await.0,
        StatusCode::UNAUTHORIZED
    );

    // Some traffic: a route with an id, an unknown route, three chat probes
    // against a limit of two.
    expect(app.get("/health", None).await, StatusCode::OK).await;
    let doc = format!("/knowledge/documents/{}", Uuid::new_v4());
    expect(app.get(&doc, Some(&user)).await, StatusCode::NOT_FOUND).await;
    expect(app.get("/no/such/route", None).await, StatusCode::NOT_FOUND).await;
    expect(app.get("/chat/sessions", Some(&user)).await, StatusCode::OK).await;
    for want in [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS] {
        let resp = app
            .client
            .post(app.url("/billing/probe/chat"))
            .bearer_auth(&user)
            .send()
            .await
            .expect("probe");
        assert_eq!(resp.status(), want);
    }

    // The method label is a closed set: a client's own method strings are "other".
    for method in ["FOOBAR", "ZZQ-1", "BREW"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let resp = app.client.request(m, app.url("/health")).send().await.expect("sent");
        assert!(resp.status().is_client_error(), "{}", resp.status());
    }

    for token in [admin.as_str(), SCRAPE_TOKEN] {
        let (status, text) = scrape(&app, Some(token)).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        for method in ["FOOBAR", "ZZQ-1", "BREW"] {
            assert!(!text.contains(method), "{method} became a label");
        }
        assert!(
            sample(&text, "http_requests_total", &["method=\"other\""]).is_some(),
            "{text}"
        );
        let health = sample(&text, "http_requests_total", &["route=\"/health\"", "status=\"200\""]);
        assert!(health.is_some_and(|n| n >= 1.0), "{text}");
        // Route patterns, never raw paths: ids do not make new series.
        assert!(
            sample(
                &text,
                "http_requests_total",
                &["route=\"/knowledge/documents/{id}\"", "status=\"404\""]
            )
            .is_some(),
            "{text}"
        );
        assert!(!text.contains(&doc));
        assert!(sample(&text, "http_requests_total", &["route=\"unmatched\"", "status=\"404\""]).is_some());
        assert!(sample(
            &text,
            "http_request_duration_seconds_bucket",
            &["route=\"/health\"", "le=\"0.005\""]
        )
        .is_some());
        let limited = sample(
            &text,
            "admission_rejections_total",
            &["reason=\"rate_limited\"", "resource=\"chat\""],
        );
        assert!(limited.is_some_and(|n| n >= 1.0), "{text}");
        for gauge in [
            "sessions_active",
            "ledger_spooled_records",
            "ledger_spool_bytes",
            "ledger_spool_max_bytes",
            "ledger_held_records",
            "ledger_spool_full",
            "ledger_store_down",
            "ratelimit_redis_fallback_active",
        ] {
            assert!(sample(&text, gauge, &[]).is_some(), "{gauge} missing:\n{text}");
        }
        assert_eq!(sample(&text, "ratelimit_redis_fallback_active", &[]), Some(0.0));
        // Store calls, by store, backend and operation.
        for (store, op) in [
            ("conversations", "sessions"),
            ("documents", "document"),
            ("accounts", "user_by_email"),
            ("usage", "try_reserve"),
        ] {
            let timed = sample(
                &text,
                "store_operation_duration_seconds_count",
                &[
                    &format!("store=\"{store}\""),
                    "backend=\"sqlite\"",
                    &format!("op=\"{op}\""),
                ],
            );
            assert!(timed.is_some_and(|n| n >= 1.0), "{store}.{op} missing:\n{text}");
        }
        // Actors, by kind: mailbox depth, messages handled, waits and handling times.
        for kind in ["user-session", "billing-ledger", "retrieval"] {
            let label = format!("actor=\"{kind}\"");
            assert!(
                sample(&text, "actor_mailbox_depth", &[&label]).is_some(),
                "{kind} depth missing:\n{text}"
            );
            assert!(sample(&text, "actor_messages_handled_total", &[&label]).is_some());
        }
        let handled = sample(&text, "actor_messages_handled_total", &["actor=\"user-session\""]);
        assert!(handled.is_some_and(|n| n >= 3.0), "{text}");
        assert!(sample(
            &text,
            "actor_message_handling_seconds_count",
            &["actor=\"user-session\""]
        )
        .is_some_and(|n| n >= 3.0));
        assert!(sample(&text, "actor_mailbox_wait_seconds_count", &["actor=\"user-session\""]).is_some());
    }
}

#[actix_web::test]
async fn a_separate_metrics_address_serves_only_metrics_without_credentials() {
    let mut settings = test_settings(&temp_sqlite_url());
    settings.metrics.bind = "127.0.0.1:0".into();
    let app = TestApp::spawn_with(settings).await;
    let port = app.metrics_port.expect("metrics server started");
    assert_ne!(format!("http://127.0.0.1:{port}"), app.address);
    expect(app.get("/health", None).await, StatusCode::OK).await;

    let private = format!("http://127.0.0.1:{port}");
    let resp = app
        .client
        .get(format!("{private}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.expect("text");
    assert!(
        sample(&text, "http_requests_total", &["route=\"/health\""]).is_some(),
        "{text}"
    );
    // Nothing else is served there, and the public /metrics still wants credentials.
    let other = app
        .client
        .get(format!("{private}/health"))
        .send()
        .await
        .expect("request");
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    assert_eq!(scrape(&app, None).await.0, StatusCode::UNAUTHORIZED);
}
