//! The ledger loses nothing and counts nothing twice when PostgreSQL stops in the
//! middle of a run: records spool locally and are replayed when it is back. The
//! spool is bounded: when it is full, new work is refused until the store is back.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::fault_proxy::FaultProxy;
use crate::helpers::{
    expect, fresh_postgres_url, service_url, sign_up, temp_sqlite_url, test_settings, ServerProcess, TestApp,
};
use crate::metrics::{sample, scrape, SCRAPE_TOKEN};

/// A PostgreSQL server of this test's own (so stopping it disturbs no other test),
/// run by scripts/services.sh in a private directory and port.
struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
    url: String,
}

impl PrivatePostgres {
    fn services(&self, action: &str) -> std::process::Output {
        Command::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/services.sh"))
            .args([action, "postgres"])
            .env("SERVICES_DIR", &self.dir)
            .env("PG_PORT", self.port.to_string())
            .output()
            .expect("run scripts/services.sh")
    }

    fn start() -> PrivatePostgres {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let dir = std::env::temp_dir().join(format!("ragchat-pg-{}", Uuid::new_v4().simple()));
        let mut pg = PrivatePostgres {
            dir,
            port,
            url: String::new(),
        };
        let out = pg.services("start");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "private postgres: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.url = stdout
            .lines()
            .find_map(|l| l.strip_prefix("DATABASE_URL="))
            .expect("DATABASE_URL printed")
            .trim()
            .to_string();
        pg
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.services("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[actix_web::test]
async fn usage_survives_postgres_stopping_mid_run_and_is_counted_once() {
    // Runs wherever the real servers run (scripts/test, CI).
    if service_url("DATABASE_URL").is_none() {
        return;
    }
    let pg = PrivatePostgres::start();
    let mut settings = test_settings(&pg.url);
    // Records wait in the ledger's memory until the test flushes: a periodic
    // flush before PostgreSQL stops would store them first (CI: a loaded machine
    // took over a second for the 15 requests, and all 15 were written).
    settings.ledger.flush_interval_ms = 600_000;
    // The default `database.acquire_timeout_ms`: the 503 comes within a second.
    let app = TestApp::spawn_with(settings).await;
    let (id, token) = app.user("ledger@example.com").await;
    let uid = Uuid::parse_str(&id).expect("uuid");

    for _ in 0..15 {
        expect(
            app.post_json("/billing/probe/api", &json!({}), Some(&token)).await,
            StatusCode::OK,
        )
        .await;
    }
    let mut stats = app.state.ledger.stats().await.expect("ledger");
    for _ in 0..100 {
        if stats.buffered == 15 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        stats = app.state.ledger.stats().await.expect("ledger");
    }
    assert_eq!(stats.buffered, 15, "records in the ledger's memory: {stats:?}");
    // PostgreSQL goes away with the 15 records still in the ledger's memory.
    let out = pg.services("stop");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A flush cycle with the store down spools them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut stats = app.state.ledger.flush().await.expect("ledger");
    while stats.spooled != 15 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stats = app.state.ledger.flush().await.expect("ledger");
    }
    assert_eq!((stats.spooled, stats.buffered), (15, 0), "records spooled: {stats:?}");
    assert!(stats.store_down);

    // Meanwhile requests fail fast and cleanly.
    let started = std::time::Instant::now();
    let resp = app.post_json("/billing/probe/api", &json!({}), Some(&token)).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());

    let out = pg.services("start");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut count = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stats = app.state.ledger.flush().await.expect("ledger");
        count = app.state.usage.usage_record_count(uid).await.unwrap_or(0);
        if stats.spooled == 0 && count == 15 {
            break;
        }
    }
    assert_eq!(
        (count, stats.spooled),
        (15, 0),
        "every record replayed exactly once: {stats:?}"
    );
    // And service resumes where the quota stood.
    let body = expect(
        app.post_json("/billing/probe/api", &json!({}), Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(body["used"], 16);
}

#[actix_web::test]
async fn a_crashed_ledger_is_restarted_and_loses_no_record() {
    let mut settings = test_settings(&temp_sqlite_url());
    settings.ledger.flush_interval_ms = 600_000; // records stay in the ledger's memory
    let app = TestApp::spawn_with(settings).await;
    let admin = app.admin("ledger-admin@example.com").await;
    let (id, token) = app.user("crashy-ledger@example.com").await;
    let uid = Uuid::parse_str(&id).expect("uuid");
    for _ in 0..5 {
        expect(
            app.post_json("/billing/probe/api", &json!({}), Some(&token)).await,
            StatusCode::OK,
        )
        .await;
    }
    let mut stats = app.state.ledger.stats().await.expect("ledger");
    for _ in 0..100 {
        if stats.buffered == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = app.state.ledger.stats().await.expect("ledger");
    }
    assert_eq!(stats.buffered, 5, "records held in memory: {stats:?}");

    let sup = app.state.ledger.supervisor();
    sup.do_send(ragchat_actors::ledger::Crash);
    // Records sent right behind the crash land in the dying mailbox (or find it
    // closed): they are parked and go to the next instance.
    for _ in 0..20 {
        app.state.ledger.record(ragchat_actors::domain::UsageRecord {
            id: Uuid::new_v4(),
            user_id: uid,
            resource: ragchat_actors::plans::Resource::ApiCalls,
            quantity: 1,
            period: ragchat_actors::plans::month_of(chrono::Utc::now()),
            metadata: json!({}),
            created_at: chrono::Utc::now(),
        });
    }
    // Generous: with RUST_BACKTRACE=1 the first panic's backtrace takes seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(sup.child().restarts() == 1 && sup.addr().connected()) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sup.child().restarts(), 1, "restarted by its supervisor");
    // Requests keep being served and counted.
    for _ in 0..3 {
        expect(
            app.post_json("/billing/probe/api", &json!({}), Some(&token)).await,
            StatusCode::OK,
        )
        .await;
    }
    let mut count = 0;
    for _ in 0..100 {
        let _ = app.state.ledger.flush().await;
        count = app.state.usage.usage_record_count(uid).await.unwrap_or(0);
        if count == 28 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count, 28,
        "the 5 records it held were spooled and replayed, the 20 behind the crash parked and delivered"
    );
    assert_eq!(app.state.ledger.parked(), 0);

    let tree = expect(app.get("/admin/actors", Some(&admin)).await, StatusCode::OK).await;
    let node = tree["supervisors"]
        .as_array()
        .and_then(|s| s.iter().find(|n| n["name"] == "billing-ledger"))
        .cloned()
        .expect("ledger in the tree");
    assert_eq!(node["restarts"], 1, "{node}");
    assert_eq!(node["state"], "running", "{node}");
    assert!(
        node["last_error"].as_str().unwrap_or("").contains("crashed on request"),
        "{node}"
    );
    assert!(node["handled"].as_u64().unwrap_or(0) >= 3, "{node}");
}

/// Waits until a scrape of /metrics shows every `(gauge, value)`; returns the last
/// text. (The recorder is shared by every server of this test binary: another
/// test's scrape can set a gauge between ours's setting and rendering it.)
async fn metrics_show(app: &TestApp, want: &[(&str, f64)]) -> String {
    let mut text = String::new();
    for _ in 0..50 {
        let (status, body) = scrape(app, Some(SCRAPE_TOKEN)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        text = body;
        if want.iter().all(|(g, v)| sample(&text, g, &[]) == Some(*v)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (g, v) in want {
        assert_eq!(sample(&text, g, &[]), Some(*v), "{g}:\n{text}");
    }
    text
}

/// The usage store (PostgreSQL, behind a proxy that cuts it off) goes away while a
/// user works from the quota lease of their session: records spool up to
/// `ledger.max_spool_bytes`, then wait in memory while every metered route answers
/// 503 `usage_store_unavailable`; /metrics shows the spool's size and records. When
/// the store is back every record is stored exactly once and work resumes.
#[actix_web::test]
async fn a_full_spool_refuses_new_work_until_the_store_is_back_and_loses_nothing() {
    let Some(url) = fresh_postgres_url().await else {
        return;
    };
    // postgres://user:pass@host:port/db → the same through the proxy.
    let (credentials, rest) = url.rsplit_once('@').expect("user@host in DATABASE_URL");
    let (host_port, db) = rest.split_once('/').expect("a database path");
    let host_port = host_port.replace("localhost", "127.0.0.1");
    let proxy = FaultProxy::start(&host_port);
    let mut settings = test_settings(&format!("{credentials}@127.0.0.1:{}/{db}", proxy.port));
    // Room for a few records (one is about 330 bytes framed).
    settings.ledger.max_spool_bytes = 1500;
    settings.metrics.token = ragchat::config::Secret::new(SCRAPE_TOKEN);
    // While the store is away the user is known from the cache and admitted from
    // the session's lease: without the bound, work would go on unrecorded.
    settings.sessions.user_cache_ms = 600_000;
    settings.quota.lease_idle_ms = 600_000;
    // Nor is the token's login read again (on a loaded machine the spool can take
    // longer than the default second to fill: that read would answer 503 first).
    settings.auth.login_cache_ms = 600_000;
    let app = TestApp::spawn_with(settings).await;
    let email = format!("spool-full-{}@example.com", Uuid::new_v4().simple());
    let hasher = ragchat::auth::PasswordHasher::new(test_settings("sqlite::memory:").auth.argon2).expect("hasher");
    let user = ragchat::accounts::create_user(
        app.accounts.as_ref(),
        &hasher,
        ragchat::accounts::UserSpec {
            email: &email,
            password: "password-1234",
            plan: ragchat_actors::plans::Plan::Pro,
            superuser: false,
        },
    )
    .await
    .expect("create user");
    let token = app.login(&email, "password-1234").await["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    // The first call reserves a lease of units in the store.
    expect(
        app.post_json("/billing/probe/api", &json!({}), Some(&token)).await,
        StatusCode::OK,
    )
    .await;
    metrics_show(&app, &[("ledger_spool_bytes", 0.0), ("ledger_spool_full", 0.0)]).await;
    for _ in 0..100 {
        if app.state.usage.usage_record_count(user.id).await.unwrap_or(0) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    proxy.cut();
    let mut admitted = 1u64;
    let mut refusal = None;
    for _ in 0..25 {
        let resp = app.post_json("/billing/probe/api", &json!({}), Some(&token)).await;
        match resp.status() {
            StatusCode::OK => admitted += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                refusal = Some(resp.json::<serde_json::Value>().await.expect("json"));
                break;
            }
            other => panic!("unexpected {other}: {}", resp.text().await.unwrap_or_default()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refusal = refusal.expect("refused once the spool was full");
    assert_eq!(refusal["code"], "usage_store_unavailable", "{refusal}");
    assert_eq!(refusal["type"], "unavailable", "{refusal}");
    assert!(admitted >= 3, "work went on while the spool had room: {admitted}");

    // Once no write is under way, memory holds only what the spool had no room for.
    let mut stats = app.state.ledger.stats().await.expect("ledger");
    for _ in 0..100 {
        if stats.buffered == stats.held {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = app.state.ledger.stats().await.expect("ledger");
    }
    assert!(stats.held >= 1 && stats.spooled >= 1, "{stats:?}");
    assert!(stats.spool_bytes > 0 && stats.spool_bytes <= 1500, "bounded: {stats:?}");
    assert_eq!(
        (stats.spooled + stats.held) as u64,
        admitted - 1,
        "every record of the outage spooled or held: {stats:?}"
    );
    let on_disk = std::fs::metadata(&app.state.settings.ledger.spool_path).map(|m| m.len());
    assert_eq!(on_disk.ok(), Some(stats.spool_bytes));
    metrics_show(
        &app,
        &[
            ("ledger_spool_bytes", stats.spool_bytes as f64),
            ("ledger_spooled_records", stats.spooled as f64),
            ("ledger_held_records", stats.held as f64),
            ("ledger_spool_max_bytes", 1500.0),
            ("ledger_spool_full", 1.0),
        ],
    )
    .await;
    // Refused again, at once, without touching the store.
    let started = std::time::Instant::now();
    let again = expect(
        app.post_json("/billing/probe/api", &json!({}), Some(&token)).await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(again["code"], "usage_store_unavailable");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );

    proxy.restore();
    let mut count = 0;
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        count = app.state.usage.usage_record_count(user.id).await.unwrap_or(0);
        if count == admitted && !app.state.ledger.refusing() {
            break;
        }
    }
    assert_eq!(count, admitted, "every admitted call recorded exactly once");
    assert!(!app.state.ledger.refusing());
    metrics_show(
        &app,
        &[
            ("ledger_spool_bytes", 0.0),
            ("ledger_spooled_records", 0.0),
            ("ledger_held_records", 0.0),
            ("ledger_spool_full", 0.0),
        ],
    )
    .await;
    expect(
        app.post_json("/billing/probe/api", &json!({}), Some(&token)).await,
        StatusCode::OK,
    )
    .await;
}

/// Usage records in a SQLite accounts database.
async fn records_in(db: &str) -> i64 {
    let pool = sqlx::SqlitePool::connect(db).await.expect("sqlite");
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records")
        .fetch_one(&pool)
        .await
        .expect("count");
    pool.close().await;
    n
}

/// A server killed (SIGKILL) between two flushes loses no usage: the records the
/// ledger held in memory are in its journal, and the next start writes them.
#[actix_web::test]
async fn usage_admitted_before_a_sigkill_is_recorded_once_after_the_restart() {
    let dir = std::env::temp_dir().join(format!("ragchat-killed-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let sqlite = |name: &str| format!("sqlite:{}?mode=rwc", dir.join(name).display());
    let env = |flush_ms: &str| {
        vec![
            ("RAGCHAT__DATABASE__URL", sqlite("accounts.db")),
            ("RAGCHAT__KNOWLEDGE__SQLITE_URL", sqlite("knowledge.db")),
            ("RAGCHAT__CHAT__SQLITE_URL", sqlite("chat.db")),
            ("RAGCHAT__KNOWLEDGE__INDEX_DIR", dir.join("index").display().to_string()),
            (
                "RAGCHAT__LEDGER__SPOOL_PATH",
                dir.join("spool.bin").display().to_string(),
            ),
            ("RAGCHAT__LEDGER__FLUSH_INTERVAL_MS", flush_ms.to_string()),
            ("RAGCHAT__MODELS__ENABLED", "false".to_string()),
        ]
    };
    // Records stay in the ledger's memory: no flush for ten minutes.
    let mut first = ServerProcess::spawn(&env("600000"));
    let client = reqwest::Client::new();
    let token = sign_up(&client, &first.base, &first.base, "killed@example.com").await;
    for _ in 0..5 {
        let r = client
            .post(format!("{}/billing/probe/api", first.base))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
            .await
            .expect("probe");
        assert_eq!(r.status(), StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");
    let db = sqlite("accounts.db");
    assert_eq!(records_in(&db).await, 0, "nothing was flushed before the kill");

    let _second = ServerProcess::spawn(&env("200"));
    let mut n = 0;
    for _ in 0..100 {
        n = records_in(&db).await;
        if n >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!((n, records_in(&db).await), (5, 5), "each admitted unit recorded once");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node stopped with SIGTERM right after a burst of admitted requests leaves
/// nothing behind in PostgreSQL's terms: every admitted unit has its usage
/// record there (none left in the node's spool for a restart that may never
/// come: a scaled-down pod), and its quota counter holds exactly those units
/// (no lease units kept). At shutdown the pool's connections of the stopped
/// server workers fail once each; the hand-back and the last flush try again.
#[actix_web::test]
async fn a_node_stopped_with_sigterm_under_load_leaves_every_record_in_the_store() {
    let Some(pg) = fresh_postgres_url().await else { return };
    let dir = std::env::temp_dir().join(format!("ragchat-sigterm-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let env = vec![
        ("RAGCHAT__DATABASE__URL", pg.clone()),
        (
            "RAGCHAT__LEDGER__SPOOL_PATH",
            dir.join("spool.bin").display().to_string(),
        ),
        ("RAGCHAT__RATE_LIMITS__API__LIMIT", "1000000".to_string()),
        ("RAGCHAT__BILLING__PROBES", "true".to_string()),
        ("RAGCHAT__MODELS__ENABLED", "false".to_string()),
        ("RAGCHAT__SERVER__WORKERS", "2".to_string()),
    ];
    crate::helpers::create_enterprise_user(&pg, "sigterm@example.com");
    let mut node = ServerProcess::spawn(&env);
    let client = reqwest::Client::new();
    crate::helpers::wait_ready(&client, &node.base).await;
    let token = crate::helpers::log_in(&client, &node.base, "sigterm@example.com").await;
    // Sixteen clients at once, on both workers, for a second and a half and at
    // least 100 admitted requests (a loaded CI machine sheds many; 20 s at most).
    let started = std::time::Instant::now();
    let total = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let loops = (0..16).map(|_| {
        let (client, base, token, total) = (client.clone(), node.base.clone(), token.clone(), total.clone());
        async move {
            let mut ok = 0u64;
            let more = || {
                let elapsed = started.elapsed();
                elapsed < Duration::from_millis(1500)
                    || (total.load(std::sync::atomic::Ordering::Relaxed) < 100 && elapsed < Duration::from_secs(20))
            };
            while more() {
                let r = client
                    .post(format!("{base}/billing/probe/api"))
                    .bearer_auth(&token)
                    .json(&json!({}))
                    .send()
                    .await
                    .expect("probe");
                // A loaded machine may shed a request (503: a pooled connection
                // not had in time); it is not admitted, so not counted.
                match r.status() {
                    StatusCode::OK => {
                        ok += 1;
                        total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {}
                    status => panic!("a probe answered {status}: {}", r.text().await.unwrap_or_default()),
                }
            }
            ok
        }
    });
    let admitted: u64 = futures_util::future::join_all(loops).await.into_iter().sum();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let status = node.child.wait().expect("stopped");
    assert!(status.success(), "{status:?}");

    let pool = sqlx::PgPool::connect(&pg).await.expect("pg");
    let records: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE resource_type = 'api_calls'")
        .fetch_one(&pool)
        .await
        .expect("records");
    let counted: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(used), 0)::BIGINT FROM quota_counters WHERE resource_type = 'api_calls'",
    )
    .fetch_one(&pool)
    .await
    .expect("counters");
    pool.close().await;
    println!("{admitted} admitted; {records} records and {counted} units counted after SIGTERM");
    assert!(admitted > 0, "{admitted}");
    // What the node left on its disk, to tell a lost record from a spooled one.
    let left: Vec<(String, u64)> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        e.metadata().map(|m| m.len()).unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        (records as u64, counted as u64),
        (admitted, admitted),
        "records and counted units against admitted; files left beside the spool: {left:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
