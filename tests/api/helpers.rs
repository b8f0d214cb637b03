//! TestApp: the real server on port 0 with its own database, and typed helpers.

use std::sync::Arc;

use ragchat::config::{Environment, Settings};
use ragchat::startup::Application;
use ragchat_actors::ports::AccountStore;
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

/// Where the per-test SQLite files go.
pub fn temp_sqlite_url() -> String {
    let dir = std::env::temp_dir().join("ragchat-tests");
    let _ = std::fs::create_dir_all(&dir);
    format!("sqlite:{}", dir.join(format!("{}.db", Uuid::new_v4())).display())
}

#[path = "../common/services.rs"]
mod services;
pub use services::service_url;

/// A fresh, empty PostgreSQL database on the server named by DATABASE_URL.
pub async fn fresh_postgres_url() -> Option<String> {
    let base = service_url("DATABASE_URL")?;
    let name = format!("ragchat_test_{}", Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&base).await.expect("connect to DATABASE_URL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    let (prefix, rest) = base.rsplit_once('/').expect("DATABASE_URL has a database path");
    let query = rest.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    Some(format!("{prefix}/{name}{query}"))
}

pub fn test_settings(database_url: &str) -> Settings {
    let mut s = Settings::load_for(Environment::Test).expect("test settings load");
    s.server.port = 0;
    s.server.workers = 2;
    s.database.url = database_url.to_string();
    let dir = std::env::temp_dir().join("ragchat-tests");
    s.ledger.spool_path = dir
        .join(format!("spool-{}.jsonl", Uuid::new_v4()))
        .display()
        .to_string();
    s.ledger.flush_interval_ms = 50;
    s.knowledge.sqlite_url = format!(
        "sqlite:{}",
        dir.join(format!("knowledge-{}.db", Uuid::new_v4())).display()
    );
    s.chat.sqlite_url = format!("sqlite:{}", dir.join(format!("chat-{}.db", Uuid::new_v4())).display());
    s.knowledge.index_dir = dir.join(format!("index-{}", Uuid::new_v4())).display().to_string();
    // PDFs are read by the ragchat binary's child process (not this test binary).
    s.knowledge.pdf_extractor = env!("CARGO_BIN_EXE_ragchat").to_string();
    // Models cost ~200 MB per server: only the model tests turn them on.
    s.models.enabled = false;
    s
}

/// The repository's models folder (scripts/fetch-models), or None (skipped with a
/// message; a failure under RAGCHAT_REQUIRE_SERVICES=1).
pub fn models_dir() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    if dir.join("all-minilm-l6-v2/model.safetensors").exists()
        && dir
            .join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
            .exists()
    {
        return Some(dir);
    }
    if std::env::var("RAGCHAT_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
        panic!(
            "models missing under {} but RAGCHAT_REQUIRE_SERVICES=1: run scripts/fetch-models",
            dir.display()
        );
    }
    eprintln!("SKIPPED: models missing; run scripts/fetch-models");
    None
}

/// Settings with the models of `models_dir()` turned on.
pub fn model_settings(dir: &std::path::Path) -> Settings {
    let mut s = test_settings(&temp_sqlite_url());
    s.models.enabled = true;
    s.models.embedding_dir = dir.join("all-minilm-l6-v2").display().to_string();
    s.models.generator_path = dir
        .join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        .display()
        .to_string();
    s
}

pub struct TestApp {
    pub address: String,
    pub client: Client,
    pub accounts: Arc<dyn AccountStore>,
    pub state: ragchat::http::AppState,
    /// The `metrics.bind` server's port, when configured.
    pub metrics_port: Option<u16>,
    handle: actix_web::dev::ServerHandle,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        actix_web::rt::spawn(async move { handle.stop(false).await });
    }
}

impl TestApp {
    /// The server on the embedded default (a new SQLite file).
    pub async fn spawn() -> TestApp {
        Self::spawn_with(test_settings(&temp_sqlite_url())).await
    }

    /// The server on a fresh PostgreSQL database, or None when DATABASE_URL is unset.
    pub async fn spawn_postgres() -> Option<TestApp> {
        let url = fresh_postgres_url().await?;
        Some(Self::spawn_with(test_settings(&url)).await)
    }

    pub async fn spawn_with(settings: Settings) -> TestApp {
        let app = Application::build(settings, false).await.expect("application builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let accounts = app.state().accounts.clone();
        let state = app.state().clone();
        let metrics_port = app.metrics_port();
        let server = app.into_server();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        TestApp {
            address,
            client: Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                // Idle connections are dropped well before the server's 5 s
                // keep-alive closes them: reusing one the server is closing
                // fails the request (IncompleteMessage) after a pause in a test.
                .pool_idle_timeout(std::time::Duration::from_secs(2))
                .build()
                .expect("client"),
            accounts,
            state,
            metrics_port,
            handle,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn post_json(&self, path: &str, body: &Value, token: Option<&str>) -> Response {
        let mut req = self.client.post(self.url(path)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("request")
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        let mut req = self.client.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("request")
    }

    pub async fn patch_json(&self, path: &str, body: &Value, token: &str) -> Response {
        self.client
            .patch(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    pub async fn delete(&self, path: &str, token: &str) -> Response {
        self.client
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    pub async fn register(&self, email: &str, password: &str) -> Value {
        let resp = self
            .post_json("/auth/register", &json!({"email": email, "password": password}), None)
            .await;
        assert_eq!(resp.status(), StatusCode::CREATED, "register {email}");
        resp.json().await.expect("json")
    }

    /// Logs in and returns the whole token response.
    pub async fn login(&self, email: &str, password: &str) -> Value {
        let resp = self
            .post_json("/auth/login", &json!({"email": email, "password": password}), None)
            .await;
        assert_eq!(resp.status(), StatusCode::OK, "login {email}");
        resp.json().await.expect("json")
    }

    /// Registers a user and returns (user id, access token).
    pub async fn user(&self, email: &str) -> (String, String) {
        let user = self.register(email, "password-1234").await;
        let tokens = self.login(email, "password-1234").await;
        (
            user["id"].as_str().expect("id").to_string(),
            tokens["access_token"].as_str().expect("token").to_string(),
        )
    }

    /// Creates a superuser directly in the store and returns its access token.
    pub async fn admin(&self, email: &str) -> String {
        let hasher = ragchat::auth::PasswordHasher::new(test_settings("sqlite::memory:").auth.argon2).expect("hasher");
        ragchat::accounts::create_user(
            self.accounts.as_ref(),
            &hasher,
            ragchat::accounts::UserSpec {
                email,
                password: "admin-password-1234",
                plan: ragchat_actors::plans::Plan::Enterprise,
                superuser: true,
            },
        )
        .await
        .expect("create admin");
        self.login(email, "admin-password-1234").await["access_token"]
            .as_str()
            .expect("token")
            .to_string()
    }
}

/// Asserts the status and returns the JSON body.
pub async fn expect(resp: Response, status: StatusCode) -> Value {
    let got = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(got, status, "unexpected status; body: {text}");
    if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }
}

/// A `ragchat serve` child process: the test profile on a free port with a spool
/// of its own, `env` on top. Killed on drop.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub base: String,
}

impl ServerProcess {
    pub fn spawn(env: &[(&str, String)]) -> ServerProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let spool = std::env::temp_dir()
            .join("ragchat-tests")
            .join(format!("spool-{}.jsonl", Uuid::new_v4()));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ragchat"));
        cmd.arg("serve")
            .env("RAGCHAT_ENV", "test")
            .env("RUST_LOG", "warn")
            .env("RAGCHAT__SERVER__PORT", port.to_string())
            .env("RAGCHAT__LEDGER__SPOOL_PATH", spool)
            .stdout(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn ragchat serve");
        // Up to two minutes: the CI machine runs many servers and models at once.
        let mut up = false;
        for _ in 0..2400 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                up = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(up, "ragchat serve did not listen on port {port} within 120 s");
        ServerProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Its resident memory in bytes (0 when it cannot be read).
    pub fn rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kb| kb << 10)
            .unwrap_or(0)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Registers `email` on the server at `register_at` and signs in on `login_at` (the
/// same server or another sharing its database): the access token.
pub async fn sign_up(client: &Client, register_at: &str, login_at: &str, email: &str) -> String {
    let creds = json!({"email": email, "password": "password-1234"});
    let resp = client
        .post(format!("{register_at}/auth/register"))
        .json(&creds)
        .send()
        .await
        .expect("register");
    assert_eq!(resp.status(), StatusCode::CREATED);
    log_in(client, login_at, email).await
}

/// Signs `email` (password `password-1234`) in on the server at `base`: the access token.
pub async fn log_in(client: &Client, base: &str, email: &str) -> String {
    let login = || {
        client
            .post(format!("{base}/auth/login"))
            .json(&json!({"email": email, "password": "password-1234"}))
            .send()
    };
    // A pooled connection the server closed while the test waited (its keep-alive
    // ran out) fails the request before it is sent: once more on a new one.
    let sent = match login().await {
        Err(e) if e.is_request() => login().await,
        other => other,
    };
    let tokens: Value = sent.expect("login").json().await.expect("json");
    tokens["access_token"].as_str().expect("token").to_string()
}

/// Waits (up to 60 s) until `base` answers /ready with 200.
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    let started = std::time::Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await {
            if r.status() == StatusCode::OK {
                return;
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{base} not ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Creates an enterprise account `email` (password "password-1234") in the SQL
/// store at `database_url` with the `create-user` command.
pub fn create_enterprise_user(database_url: &str, email: &str) {
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_ragchat"))
        .args(["create-user", "--email", email, "--plan", "enterprise"])
        .env("RAGCHAT_ENV", "test")
        .env("RAGCHAT__DATABASE__URL", database_url)
        .env("RAGCHAT_NEW_USER_PASSWORD", "password-1234")
        .output()
        .expect("create-user");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
}

/// The environment naming the models of `models` (scripts/fetch-models) for a
/// `ragchat serve` child process.
pub fn model_env(models: &std::path::Path) -> [(&'static str, String); 2] {
    [
        (
            "RAGCHAT__MODELS__EMBEDDING_DIR",
            models.join("all-minilm-l6-v2").display().to_string(),
        ),
        (
            "RAGCHAT__MODELS__GENERATOR_PATH",
            models
                .join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
                .display()
                .to_string(),
        ),
    ]
}
