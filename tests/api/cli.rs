//! The binary: layered config, production safety, create-user, demo seeding,
//! graceful shutdown on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ragchat::config::{Environment, Secret};
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{expect, test_settings, TestApp};

fn temp_db() -> String {
    let dir = std::env::temp_dir().join("ragchat-tests");
    let _ = std::fs::create_dir_all(&dir);
    format!("sqlite:{}", dir.join(format!("{}.db", Uuid::new_v4())).display())
}

fn ragchat(env: &str, db: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ragchat"));
    cmd.env("RAGCHAT_ENV", env)
        .env("RAGCHAT__DATABASE__URL", db)
        .env_remove("RAGCHAT__AUTH__JWT_SECRET")
        .env("RUST_LOG", "warn");
    cmd
}

#[test]
fn production_refuses_to_start_without_its_own_jwt_secret() {
    let out = ragchat("production", &temp_db()).arg("serve").output().expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("RAGCHAT__AUTH__JWT_SECRET"), "{stderr}");

    // A development key does not count as a production secret.
    let out = ragchat("production", &temp_db())
        .env(
            "RAGCHAT__AUTH__JWT_SECRET",
            "dev-only-secret-not-for-production-use-0123456789",
        )
        .arg("migrate")
        .output()
        .expect("run");
    assert!(!out.status.success());

    let out = ragchat("production", &temp_db())
        .env(
            "RAGCHAT__AUTH__JWT_SECRET",
            "a-real-production-secret-of-48-random-characters",
        )
        .arg("migrate")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn without_an_environment_the_server_serves_on_loopback_only() {
    // RAGCHAT_ENV unset is the development profile: its JWT secret is published.
    let out = ragchat("development", &temp_db())
        .env_remove("RAGCHAT_ENV")
        .env("RAGCHAT__SERVER__HOST", "0.0.0.0")
        .env("RAGCHAT__SERVER__PORT", "0")
        .env("RAGCHAT__MODELS__ENABLED", "false")
        .arg("serve")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve on 0.0.0.0") && stderr.contains("RAGCHAT_ENV=production"),
        "{stderr}"
    );
}

#[actix_web::test]
async fn create_user_command_makes_a_user_who_can_log_in() {
    let db = temp_db();
    let out = ragchat("test", &db)
        .args([
            "create-user",
            "--email",
            "Ops@Example.com",
            "--password",
            "ops-password-1",
            "--plan",
            "pro",
            "--superuser",
        ])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = ragchat("test", &db)
        .args([
            "create-user",
            "--email",
            "ops@example.com",
            "--password",
            "ops-password-1",
        ])
        .output()
        .expect("run");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let bad = ragchat("test", &db)
        .args([
            "create-user",
            "--email",
            "x@example.com",
            "--password",
            "pw",
            "--plan",
            "gold",
        ])
        .output()
        .expect("run");
    assert!(!bad.status.success());

    let app = TestApp::spawn_with(test_settings(&db)).await;
    let tokens = app.login("ops@example.com", "ops-password-1").await;
    let me = expect(
        app.get("/auth/me", tokens["access_token"].as_str()).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (me["subscription_plan"].as_str(), me["is_superuser"].as_bool()),
        (Some("pro"), Some(true))
    );
}

#[actix_web::test]
async fn demo_users_are_seeded_in_development_only() {
    let mut dev = test_settings(&temp_db());
    dev.environment = Some(Environment::Development);
    dev.seed.demo_users = true;
    let app = TestApp::spawn_with(dev).await;
    for (email, password, plan) in [
        ("admin@example.com", "adminpassword123", "enterprise"),
        ("test@example.com", "testpassword123", "pro"),
        ("free@example.com", "freepassword123", "free"),
    ] {
        let tokens = app.login(email, password).await;
        let me = expect(
            app.get("/auth/me", tokens["access_token"].as_str()).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(me["subscription_plan"], plan);
        assert_eq!(me["is_superuser"], email == "admin@example.com");
    }

    let mut prod = test_settings(&temp_db());
    prod.environment = Some(Environment::Production);
    prod.auth.jwt_secret = Secret::new("a-real-production-secret-of-48-random-characters");
    prod.seed.demo_users = true;
    let app = TestApp::spawn_with(prod).await;
    let resp = app
        .post_json(
            "/auth/login",
            &json!({"email": "admin@example.com", "password": "adminpassword123"}),
            None,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[test]
fn serve_stops_gracefully_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut child = ragchat("test", &temp_db())
        .env("RAGCHAT__SERVER__PORT", port.to_string())
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    // Up means answering HTTP (the port is bound a moment before the server
    // runs and takes over SIGTERM; a signal in between would kill it outright).
    let healthy = || -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 12];
        s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .is_ok()
            && s.read_exact(&mut buf).is_ok()
            && buf.starts_with(b"HTTP/1.1 200")
    };
    let up = loop {
        if healthy() {
            std::thread::sleep(Duration::from_millis(200));
            break true;
        }
        if started.elapsed() > Duration::from_secs(30) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !up {
        let _ = child.kill();
        panic!("server did not come up on port {port}");
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "exit status {status:?}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("server did not stop within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
