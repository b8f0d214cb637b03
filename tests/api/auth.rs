//! /auth: registration, login, JWT validation, refresh rotation, logout, API keys.

use std::time::{Duration, Instant};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{expect, test_settings, TestApp};

#[actix_web::test]
async fn register_then_login_then_me_never_shows_the_hash() {
    let app = TestApp::spawn().await;
    let user = app.register("Alice@Example.com", "correct-horse-battery").await;
    assert_eq!(user["email"], "alice@example.com");
    assert_eq!(user["subscription_plan"], "free");
    assert_eq!(user["is_active"], true);
    assert!(user.get("hashed_password").is_none());

    let tokens = app.login("alice@example.com", "correct-horse-battery").await;
    assert_eq!(tokens["token_type"], "bearer");
    assert_eq!(tokens["expires_in"], 1800);
    assert!(tokens["refresh_token"].as_str().is_some_and(|t| t.len() > 40));
    let me = expect(
        app.get("/auth/me", tokens["access_token"].as_str()).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(me["id"], user["id"]);
    assert!(me.get("hashed_password").is_none());
    assert!(!me.to_string().contains("argon2"));
}

#[actix_web::test]
async fn registration_rejects_duplicates_bad_emails_and_short_passwords() {
    let app = TestApp::spawn().await;
    app.register("dup@example.com", "password-1234").await;
    let body = expect(
        app.post_json(
            "/auth/register",
            &json!({"email": "DUP@example.com", "password": "password-1234"}),
            None,
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(body["detail"], "Email already registered");
    let body = expect(
        app.post_json(
            "/auth/register",
            &json!({"email": "not-an-email", "password": "password-1234"}),
            None,
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("e-mail")));
    expect(
        app.post_json(
            "/auth/register",
            &json!({"email": "short@example.com", "password": "short"}),
            None,
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
}

async fn timed_login(app: &TestApp, email: &str, password: &str) -> (StatusCode, Value, Duration) {
    let started = Instant::now();
    let resp = app
        .post_json("/auth/login", &json!({"email": email, "password": password}), None)
        .await;
    let elapsed = started.elapsed();
    let status = resp.status();
    (status, resp.json().await.expect("json"), elapsed)
}

/// The fastest of several tries: the least disturbed by other tests running on
/// the same cores, and still ≥ one argon2 verification when one is done.
fn fastest(v: Vec<Duration>) -> Duration {
    v.into_iter().min().unwrap_or_default()
}

#[actix_web::test]
async fn unknown_email_and_wrong_password_answer_the_same_in_about_the_same_time() {
    let app = TestApp::spawn().await;
    app.register("known@example.com", "password-1234").await;
    let (mut unknown, mut wrong) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let (s1, b1, t1) = timed_login(&app, "nobody@example.com", "password-1234").await;
        let (s2, b2, t2) = timed_login(&app, "known@example.com", "wrong-password").await;
        assert_eq!((s1, s2), (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED));
        assert_eq!(b1, b2);
        assert_eq!(b1["detail"], "Incorrect email or password");
        unknown.push(t1);
        wrong.push(t2);
    }
    let (u, w) = (fastest(unknown), fastest(wrong));
    // Both paths run one argon2 verification (≈ tens of ms); without the dummy hash
    // the unknown-email path would be ~1 ms, far outside this band.
    let ratio = u.as_secs_f64() / w.as_secs_f64();
    assert!((0.33..3.0).contains(&ratio), "unknown {u:?} vs wrong password {w:?}");
}

fn claims(overrides: Value) -> Value {
    let now = chrono::Utc::now().timestamp();
    let mut c = json!({
        "sub": uuid::Uuid::new_v4(), "exp": now + 600, "iat": now, "nbf": now,
        "iss": "ragchat", "aud": "ragchat-api", "jti": uuid::Uuid::new_v4(),
    });
    if let (Some(map), Some(o)) = (c.as_object_mut(), overrides.as_object()) {
        for (k, v) in o {
            if v.is_null() {
                map.remove(k);
            } else {
                map.insert(k.clone(), v.clone());
            }
        }
    }
    c
}

fn sign(alg: Algorithm, claims: &Value) -> String {
    let secret = test_settings("sqlite::memory:").auth.jwt_secret.expose().to_string();
    encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret.as_bytes())).expect("sign")
}

fn b64(v: &Value) -> String {
    use base64_url::encode as enc;
    enc(&v.to_string())
}

mod base64_url {
    /// Unpadded base64url, enough to hand-craft JWT segments.
    pub fn encode(s: &str) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &x)| acc | (u32::from(x) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

#[actix_web::test]
async fn tokens_with_another_algorithm_or_bad_claims_are_refused() {
    let app = TestApp::spawn().await;
    let (id, good) = app.user("jwt@example.com").await;
    expect(app.get("/auth/me", Some(&good)).await, StatusCode::OK).await;
    let sub = json!({"sub": id});

    let none_token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(sub.clone()))
    );
    let now = chrono::Utc::now().timestamp();
    let cases = [
        ("alg none", none_token),
        (
            "HS512 with the right secret",
            sign(Algorithm::HS512, &claims(sub.clone())),
        ),
        (
            "HS384 with the right secret",
            sign(Algorithm::HS384, &claims(sub.clone())),
        ),
        (
            "wrong issuer",
            sign(Algorithm::HS256, &claims(json!({"sub": id, "iss": "evil"}))),
        ),
        (
            "wrong audience",
            sign(Algorithm::HS256, &claims(json!({"sub": id, "aud": "other"}))),
        ),
        (
            "expired",
            sign(Algorithm::HS256, &claims(json!({"sub": id, "exp": now - 120}))),
        ),
        (
            "not yet valid",
            sign(Algorithm::HS256, &claims(json!({"sub": id, "nbf": now + 600}))),
        ),
        (
            "no exp",
            sign(Algorithm::HS256, &claims(json!({"sub": id, "exp": null}))),
        ),
        (
            "no iat",
            sign(Algorithm::HS256, &claims(json!({"sub": id, "iat": null}))),
        ),
        ("garbage", "not.a.jwt".to_string()),
        ("tampered payload", {
            let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
            parts[1] = b64(&claims(json!({"sub": uuid::Uuid::new_v4()})));
            parts.join(".")
        }),
    ];
    for (what, token) in cases {
        let resp = app.get("/auth/me", Some(&token)).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(
            resp.headers().get("www-authenticate").map(|v| v.as_bytes()),
            Some(&b"Bearer"[..]),
            "{what}"
        );
    }
    let control = sign(Algorithm::HS256, &claims(sub));
    expect(app.get("/auth/me", Some(&control)).await, StatusCode::OK).await;
}

#[actix_web::test]
async fn missing_or_malformed_authorization_is_401_with_www_authenticate() {
    let app = TestApp::spawn().await;
    let resp = app.get("/auth/me", None).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    assert_eq!(resp.json::<Value>().await.expect("json")["detail"], "Not authenticated");
    let resp = app
        .client
        .get(app.url("/auth/me"))
        .header("Authorization", "Basic abc")
        .send()
        .await
        .expect("req");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[actix_web::test]
async fn refresh_rotates_and_reusing_an_old_token_revokes_the_login() {
    let app = TestApp::spawn().await;
    app.register("rotate@example.com", "password-1234").await;
    let first = app.login("rotate@example.com", "password-1234").await;
    let rt1 = first["refresh_token"].clone();

    let second = expect(
        app.post_json("/auth/refresh", &json!({"refresh_token": rt1}), None)
            .await,
        StatusCode::OK,
    )
    .await;
    let rt2 = second["refresh_token"].clone();
    assert_ne!(rt1, rt2);
    expect(
        app.get("/auth/me", second["access_token"].as_str()).await,
        StatusCode::OK,
    )
    .await;

    // rt1 again: theft suspected, the whole family dies — including rt2.
    let body = expect(
        app.post_json("/auth/refresh", &json!({"refresh_token": rt1}), None)
            .await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("already used")));
    expect(
        app.post_json("/auth/refresh", &json!({"refresh_token": rt2}), None)
            .await,
        StatusCode::UNAUTHORIZED,
    )
    .await;

    // Another login is a separate family and unaffected.
    let other = app.login("rotate@example.com", "password-1234").await;
    expect(
        app.post_json("/auth/refresh", &json!({"refresh_token": other["refresh_token"]}), None)
            .await,
        StatusCode::OK,
    )
    .await;
    expect(
        app.post_json("/auth/refresh", &json!({"refresh_token": "rrt_forged"}), None)
            .await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
}

#[actix_web::test]
async fn logout_revokes_the_refresh_token() {
    let app = TestApp::spawn().await;
    app.register("bye@example.com", "password-1234").await;
    let tokens = app.login("bye@example.com", "password-1234").await;
    let rt = tokens["refresh_token"].clone();
    expect(
        app.post_json("/auth/logout", &json!({"refresh_token": rt}), None).await,
        StatusCode::NO_CONTENT,
    )
    .await;
    expect(
        app.post_json("/auth/refresh", &json!({"refresh_token": rt}), None)
            .await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    // Unknown tokens log out quietly too.
    expect(
        app.post_json("/auth/logout", &json!({"refresh_token": "rrt_x"}), None)
            .await,
        StatusCode::NO_CONTENT,
    )
    .await;
}

#[actix_web::test]
async fn deactivated_users_are_refused_with_403() {
    let app = TestApp::spawn().await;
    let admin = app.admin("boss@example.com").await;
    let (id, token) = app.user("leaver@example.com").await;
    let tokens = app.login("leaver@example.com", "password-1234").await;
    let key = expect(
        app.post_json("/auth/api-keys", &json!({"name": "k"}), Some(&token))
            .await,
        StatusCode::CREATED,
    )
    .await;
    expect(
        app.patch_json(&format!("/admin/users/{id}"), &json!({"is_active": false}), &admin)
            .await,
        StatusCode::OK,
    )
    .await;

    for resp in [
        app.get("/auth/me", Some(&token)).await,
        app.get("/auth/me", key["key"].as_str()).await,
        app.post_json(
            "/auth/login",
            &json!({"email": "leaver@example.com", "password": "password-1234"}),
            None,
        )
        .await,
        app.post_json(
            "/auth/refresh",
            &json!({"refresh_token": tokens["refresh_token"]}),
            None,
        )
        .await,
    ] {
        let body = expect(resp, StatusCode::FORBIDDEN).await;
        assert_eq!(body["detail"], "User account is deactivated");
    }
    // A wrong password still says only that the credentials are wrong.
    expect(
        app.post_json(
            "/auth/login",
            &json!({"email": "leaver@example.com", "password": "nope-nope-nope"}),
            None,
        )
        .await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
}

#[actix_web::test]
async fn api_keys_are_shown_once_authenticate_and_can_be_revoked() {
    let app = TestApp::spawn().await;
    let (_, token) = app.user("dev@example.com").await;
    let (_, other_token) = app.user("other@example.com").await;
    let created = expect(
        app.post_json("/auth/api-keys", &json!({"name": "ci"}), Some(&token))
            .await,
        StatusCode::CREATED,
    )
    .await;
    let key = created["key"].as_str().expect("key shown").to_string();
    assert!(key.starts_with("rck_") && key.starts_with(created["prefix"].as_str().expect("prefix")));

    let listed = expect(app.get("/auth/api-keys", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert!(listed[0].get("key").is_none());
    assert!(!listed.to_string().contains(&key), "the key is never shown again");

    let me = expect(app.get("/auth/me", Some(&key)).await, StatusCode::OK).await;
    assert_eq!(me["email"], "dev@example.com");
    let listed = expect(app.get("/auth/api-keys", Some(&token)).await, StatusCode::OK).await;
    assert!(listed[0]["last_used_at"].is_string());
    // A key cannot manage keys or the subscription: that needs a password session.
    for resp in [
        app.get("/auth/api-keys", Some(&key)).await,
        app.post_json("/auth/api-keys", &json!({"name": "more"}), Some(&key))
            .await,
        app.post_json("/billing/subscription", &json!({"plan": "enterprise"}), Some(&key))
            .await,
        app.post_json("/billing/subscription/cancel", &json!({}), Some(&key))
            .await,
    ] {
        let body = expect(resp, StatusCode::FORBIDDEN).await;
        assert_eq!(body["code"], "password_session_required", "{body}");
    }
    let keys = expect(app.get("/auth/api-keys", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(keys.as_array().map(Vec::len), Some(1), "no key was made with a key");

    let path = format!("/auth/api-keys/{}", created["id"].as_str().expect("id"));
    expect(app.delete(&path, &other_token).await, StatusCode::NOT_FOUND).await;
    expect(app.delete(&path, &token).await, StatusCode::NO_CONTENT).await;
    expect(app.get("/auth/me", Some(&key)).await, StatusCode::UNAUTHORIZED).await;
    expect(app.delete(&path, &token).await, StatusCode::NOT_FOUND).await;
    expect(
        app.post_json("/auth/api-keys", &json!({"name": "  "}), Some(&token))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    expect(app.get("/auth/me", Some("rck_0000")).await, StatusCode::UNAUTHORIZED).await;
}

#[actix_web::test]
async fn the_auth_flow_works_on_postgres_too() {
    let Some(app) = TestApp::spawn_postgres().await else {
        return;
    };
    let (_, token) = app.user("pg@example.com").await;
    expect(app.get("/auth/me", Some(&token)).await, StatusCode::OK).await;
    let tokens = app.login("pg@example.com", "password-1234").await;
    let rotated = expect(
        app.post_json(
            "/auth/refresh",
            &json!({"refresh_token": tokens["refresh_token"]}),
            None,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    expect(
        app.get("/auth/me", rotated["access_token"].as_str()).await,
        StatusCode::OK,
    )
    .await;
    let key = expect(
        app.post_json("/auth/api-keys", &json!({"name": "pg"}), Some(&token))
            .await,
        StatusCode::CREATED,
    )
    .await;
    expect(app.get("/auth/me", key["key"].as_str()).await, StatusCode::OK).await;
    let admin = app.admin("pgadmin@example.com").await;
    let page = expect(app.get("/admin/users?plan=free", Some(&admin)).await, StatusCode::OK).await;
    assert_eq!(page["total"], 1);
}

fn throttled_settings(account: u32, address: u32, register: u32) -> ragchat::config::Settings {
    let mut settings = test_settings(&crate::helpers::temp_sqlite_url());
    let per = |limit| ragchat::config::RateLimit {
        limit,
        period_secs: 300,
    };
    settings.auth.login_per_account = per(account);
    settings.auth.login_per_address = per(address);
    settings.auth.register_per_address = per(register);
    settings
}

async fn login_status(app: &TestApp, email: &str, password: &str, forwarded: Option<&str>) -> reqwest::Response {
    let mut req = app
        .client
        .post(app.url("/auth/login"))
        .json(&json!({"email": email, "password": password}));
    if let Some(f) = forwarded {
        req = req.header("X-Forwarded-For", f);
    }
    req.send().await.expect("login")
}

#[actix_web::test]
async fn sign_in_is_throttled_per_account_and_the_right_password_is_refused_meanwhile() {
    let app = TestApp::spawn_with(throttled_settings(3, 1000, 1000)).await;
    app.register("victim@example.com", "correct-horse-battery").await;
    for _ in 0..3 {
        let resp = login_status(&app, "victim@example.com", "guess-123456", None).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    // The fourth attempt within the window is refused before the password is checked.
    let resp = login_status(&app, "Victim@Example.com", "correct-horse-battery", None).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("secs");
    assert!((1..=100).contains(&retry), "one attempt back every 100 s: {retry}");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["code"], "rate_limited");
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("this account")),
        "{body}"
    );
    // Another account from the same address is not affected.
    app.register("bystander@example.com", "correct-horse-battery").await;
    let resp = login_status(&app, "bystander@example.com", "correct-horse-battery", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[actix_web::test]
async fn sign_in_and_registration_are_throttled_per_client_address() {
    let app = TestApp::spawn_with(throttled_settings(1000, 4, 2)).await;
    for i in 0..4 {
        let resp = login_status(&app, &format!("nobody{i}@example.com"), "guess-123456", None).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let resp = login_status(&app, "nobody9@example.com", "guess-123456", None).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("this address")),
        "{body}"
    );

    let creds = |i: u32| json!({"email": format!("new{i}@example.com"), "password": "correct-horse-battery"});
    for i in 0..2 {
        expect(
            app.post_json("/auth/register", &creds(i), None).await,
            StatusCode::CREATED,
        )
        .await;
    }
    let body = expect(
        app.post_json("/auth/register", &creds(2), None).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert_eq!(body["code"], "rate_limited");
}

#[actix_web::test]
async fn behind_a_load_balancer_the_configured_header_names_the_client() {
    let mut settings = throttled_settings(1000, 1, 1000);
    settings.server.client_ip_header = "X-Forwarded-For".into();
    let app = TestApp::spawn_with(settings).await;
    let first = login_status(&app, "a@example.com", "guess-123456", Some("10.9.9.9, 203.0.113.5")).await;
    assert_eq!(first.status(), StatusCode::UNAUTHORIZED);
    let again = login_status(&app, "b@example.com", "guess-123456", Some("203.0.113.5")).await;
    assert_eq!(
        again.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the last entry is the client"
    );
    let other = login_status(&app, "c@example.com", "guess-123456", Some("10.9.9.9, 203.0.113.6")).await;
    assert_eq!(
        other.status(),
        StatusCode::UNAUTHORIZED,
        "another client is not affected"
    );
}
