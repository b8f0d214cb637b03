//! Three `ragchat serve` processes over the shared stores of scripts/services.sh
//! (PostgreSQL, Redis, MongoDB, the CQL server) behind nginx running
//! deploy/nginx.conf (round robin): sign-in, knowledge, SSE and WebSocket chat
//! through the proxy, and a node killed (SIGKILL) while the others keep answering.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::helpers::{models_dir, service_url, wait_ready, ServerProcess};

/// nginx with deploy/nginx.conf, its upstream servers and port replaced.
struct Nginx {
    child: std::process::Child,
    dir: std::path::PathBuf,
    base: String,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would leave them running).
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nginx_binary() -> Option<std::path::PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// An nginx site of deploy/ with its upstream servers replaced by `servers` and
/// its `listen 8080` by `listen 127.0.0.1:<port>`.
fn site_with(conf: &str, servers: &str, port: u16) -> String {
    let mut site = String::new();
    let mut in_upstream = false;
    for line in conf.lines() {
        let t = line.trim();
        if t.starts_with("upstream ragchat") {
            in_upstream = true;
            site.push_str(line);
            site.push('\n');
            site.push_str(servers);
            continue;
        }
        if in_upstream && t.starts_with("server ") {
            continue;
        }
        if t == "}" {
            in_upstream = false;
        }
        if t == "listen 8080;" {
            site.push_str(&format!("    listen 127.0.0.1:{port};\n"));
            continue;
        }
        site.push_str(line);
        site.push('\n');
    }
    site
}

/// docker-compose's balancer is the site tested here with the compose replicas as
/// its upstream: the two files must not drift apart, and the compose file must
/// run two replicas behind it.
#[test]
fn the_compose_balancer_is_the_tested_site_in_front_of_two_replicas() {
    let read = |f: &str| std::fs::read_to_string(format!("{}/{f}", env!("CARGO_MANIFEST_DIR"))).expect(f);
    let without_comments = |s: String| -> Vec<String> {
        s.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    let (tested, compose) = (read("deploy/nginx.conf"), read("deploy/nginx-compose.conf"));
    let servers = "    server node:1;\n";
    assert_eq!(
        without_comments(site_with(&compose, servers, 1)),
        without_comments(site_with(&tested, servers, 1)),
        "deploy/nginx-compose.conf differs from deploy/nginx.conf beyond its upstream"
    );
    for replica in ["app1", "app2"] {
        assert!(
            compose.contains(&format!("server {replica}:8000 ")),
            "no upstream line for {replica}"
        );
    }
    let yml = read("docker-compose.yml");
    for needle in [
        "\n  app1: &app\n",
        "\n  app2:\n    <<: *app\n",
        "./deploy/nginx-compose.conf:/etc/nginx/conf.d/default.conf:ro",
        "\"127.0.0.1:8000:8080\"",
        "RAGCHAT__SERVER__CLIENT_IP_HEADER: X-Forwarded-For",
    ] {
        assert!(yml.contains(needle), "docker-compose.yml lacks {needle:?}");
    }
}

impl Nginx {
    fn start(binary: &std::path::Path, nodes: &[&ServerProcess]) -> Nginx {
        let conf = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
            .expect("deploy/nginx.conf");
        let port = free_port();
        let servers: String = nodes
            .iter()
            .map(|n| {
                format!(
                    "    server {} max_fails=1 fail_timeout=5s;\n",
                    n.base.trim_start_matches("http://")
                )
            })
            .collect();
        // The documented file, with this test's nodes and port.
        let site = site_with(&conf, &servers, port);
        assert!(
            site.contains(&format!("listen 127.0.0.1:{port}")),
            "deploy/nginx.conf lost its listen line"
        );
        let dir = std::env::temp_dir().join(format!("ragchat-nginx-{}", Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("logs")).expect("dir");
        std::fs::write(dir.join("ragchat.conf"), site).expect("site");
        let main = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log warn;\n\
             events {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
             scgi_temp_path {d}/scgi;\n  include {d}/ragchat.conf;\n}}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), main).expect("nginx.conf");
        let child = std::process::Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nginx");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Nginx {
            child,
            dir,
            base: format!("http://127.0.0.1:{port}"),
        }
    }
}

#[actix_web::test]
async fn three_nodes_behind_nginx_serve_http_sse_and_websockets_and_survive_a_killed_node() {
    let (Some(pg), Some(redis), Some(mongo), Some(cql)) = (
        service_url("DATABASE_URL"),
        service_url("REDIS_URL"),
        service_url("MONGODB_URL"),
        service_url("SCYLLA_URL"),
    ) else {
        return;
    };
    let Some(models) = models_dir() else { return };
    let Some(nginx) = nginx_binary() else {
        assert!(
            std::env::var("RAGCHAT_REQUIRE_SERVICES").is_err(),
            "nginx is not installed (scripts/test installs it)"
        );
        println!("SKIPPED: nginx is not installed");
        return;
    };
    let tag = Uuid::new_v4().simple().to_string();
    let dir = std::env::temp_dir().join(format!("ragchat-balancer-{tag}"));
    let path = |p: std::path::PathBuf| p.display().to_string();
    let node = |i: usize| {
        ServerProcess::spawn(
            &[
                ("RAGCHAT__SERVER__WORKERS", "2".into()),
                ("RAGCHAT__SERVER__CLIENT_IP_HEADER", "X-Forwarded-For".into()),
                ("RAGCHAT__DATABASE__URL", pg.clone()),
                ("RAGCHAT__REDIS__URL", redis.clone()),
                ("RAGCHAT__KNOWLEDGE__MONGODB_URL", mongo.clone()),
                ("RAGCHAT__KNOWLEDGE__MONGODB_DATABASE", format!("balancer_{tag}")),
                ("RAGCHAT__KNOWLEDGE__INDEX_DIR", path(dir.join(format!("index-{i}")))),
                ("RAGCHAT__KNOWLEDGE__INDEX_RECONCILE_SECS", "1".into()),
                ("RAGCHAT__CHAT__SCYLLA_NODES", cql.trim().to_string()),
                ("RAGCHAT__CHAT__SCYLLA_KEYSPACE", format!("balancer_{tag}")),
            ]
            .into_iter()
            .chain(crate::helpers::model_env(&models))
            .collect::<Vec<_>>(),
        )
    };
    // One node first (it creates the keyspace and collections), then the others.
    let mut one = node(1);
    let client = reqwest::Client::new();
    wait_ready(&client, &one.base).await;
    let (two, three) = (node(2), node(3));
    wait_ready(&client, &two.base).await;
    wait_ready(&client, &three.base).await;
    let lb = Nginx::start(&nginx, &[&one, &two, &three]);
    let base = lb.base.clone();

    // Sign-in through the balancer; the token works on every node.
    let email = format!("balancer-{tag}@example.com");
    // An enterprise account (the test searches and chats more than a free plan allows).
    crate::helpers::create_enterprise_user(&pg, &email);
    let token = crate::helpers::log_in(&client, &base, &email).await;
    for n in [&one, &two, &three] {
        let me = client
            .get(format!("{}/auth/me", n.base))
            .bearer_auth(&token)
            .send()
            .await
            .expect("me");
        assert_eq!(me.status(), StatusCode::OK, "{}", n.base);
    }

    // A document stored through one node is found through all (round robin).
    let doc = json!({"title": "Velmoran tides", "content": "The Velmoran harbour has three tides a day; the third is called the silver tide."});
    let stored = client
        .post(format!("{base}/knowledge/documents"))
        .bearer_auth(&token)
        .json(&doc)
        .send()
        .await
        .expect("store");
    assert_eq!(stored.status(), StatusCode::CREATED);
    let started = Instant::now();
    let mut found_in_a_row = 0;
    while found_in_a_row < 6 {
        let v: Value = client
            .post(format!("{base}/knowledge/search"))
            .bearer_auth(&token)
            .json(&json!({"query": "Velmoran silver tide", "route": "text"}))
            .send()
            .await
            .expect("search")
            .json()
            .await
            .expect("json");
        let hit = v["results"][0]["title"] == "Velmoran tides";
        found_in_a_row = if hit { found_in_a_row + 1 } else { 0 };
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "not found on every node: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SSE through the proxy: tokens arrive as they are generated (the config turns
    // buffering off, and /chat/stream also says `X-Accel-Buffering: no`).
    let resp = client
        .post(format!("{base}/chat/stream"))
        .bearer_auth(&token)
        .json(&json!({"message": "What is the third Velmoran tide called?", "max_tokens": 48}))
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    let (mut reads, mut token_reads_before_done, mut text) = (0, 0, String::new());
    while let Some(chunk) = body.next().await {
        let chunk = String::from_utf8_lossy(&chunk.expect("chunk")).to_string();
        reads += 1;
        if chunk.contains("event: token") && !chunk.contains("event: done") {
            token_reads_before_done += 1;
        }
        text.push_str(&chunk);
    }
    assert!(text.contains("event: done"), "{text}");
    assert!(
        token_reads_before_done >= 2,
        "tokens were held back by the proxy: {reads} reads\n{text}"
    );

    // A WebSocket through the proxy, authenticated by its first frame.
    let ws_url = format!("{}/ws/chat", base.replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("websocket through nginx");
    ws.send(Message::text(json!({"type": "auth", "token": token}).to_string()))
        .await
        .expect("send");
    ws.send(Message::text(
        json!({"type": "message", "id": 1, "message": "Say hi.", "enable_rag": false, "max_tokens": 8}).to_string(),
    ))
    .await
    .expect("send");
    let mut kinds = Vec::new();
    while !kinds.iter().any(|k| k == "done" || k == "error") {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("a frame")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = msg {
            let f: Value = serde_json::from_str(t.as_str()).expect("json");
            kinds.push(f["type"].as_str().unwrap_or_default().to_string());
        }
    }
    assert_eq!(kinds.first().map(String::as_str), Some("authenticated"), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("done"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "token"), "{kinds:?}");

    // One node killed: every request through the balancer still gets an answer.
    let _ = one.child.kill();
    let _ = one.child.wait();
    for i in 0..9 {
        let me = client
            .get(format!("{base}/auth/me"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("me");
        assert_eq!(me.status(), StatusCode::OK, "request {i} after the kill");
    }
    let answer = client
        .post(format!("{base}/chat/message"))
        .bearer_auth(&token)
        .json(&json!({"message": "And now?", "enable_rag": false, "max_tokens": 4}))
        .send()
        .await
        .expect("chat");
    assert_eq!(answer.status(), StatusCode::OK);
    drop(lb);
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM drains a node: `/health` and `/ready` answer 503 at once (a balancer
/// takes the node out of rotation), a stream in flight finishes, and the process
/// stops after `server.drain_secs`.
#[actix_web::test]
async fn sigterm_drains_a_node_health_first_and_in_flight_streams_finish() {
    let Some(models) = models_dir() else { return };
    let dir = std::env::temp_dir().join(format!("ragchat-drain-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let sqlite = |name: &str| format!("sqlite:{}?mode=rwc", dir.join(name).display());
    let path = |p: std::path::PathBuf| p.display().to_string();
    let mut server = ServerProcess::spawn(
        &[
            ("RAGCHAT__SERVER__DRAIN_SECS", "3".into()),
            // The answer in flight must end within the graceful stop, on a
            // machine loaded by the other tests too.
            ("RAGCHAT__SERVER__SHUTDOWN_TIMEOUT_SECS", "120".into()),
            ("RAGCHAT__DATABASE__URL", sqlite("accounts.db")),
            ("RAGCHAT__KNOWLEDGE__SQLITE_URL", sqlite("knowledge.db")),
            ("RAGCHAT__CHAT__SQLITE_URL", sqlite("chat.db")),
            ("RAGCHAT__KNOWLEDGE__INDEX_DIR", path(dir.join("index"))),
        ]
        .into_iter()
        .chain(crate::helpers::model_env(&models))
        .collect::<Vec<_>>(),
    );
    let client = reqwest::Client::new();
    wait_ready(&client, &server.base).await;
    let token = crate::helpers::sign_up(&client, &server.base, &server.base, "drain@example.com").await;
    let resp = client
        .post(format!("{}/chat/stream", server.base))
        .bearer_auth(&token)
        .json(&json!({"message": "Tell a long story about a lighthouse.", "enable_rag": false, "max_tokens": 160}))
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first event").expect("bytes");
    assert!(!first.is_empty());

    let signalled = Instant::now();
    let killed = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(server.child.id().to_string())
        .status()
        .expect("kill");
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = client
        .get(format!("{}/health", server.base))
        .send()
        .await
        .expect("health while draining");
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    let v: Value = health.json().await.expect("json");
    assert_eq!(v["status"], "draining");
    let ready = client
        .get(format!("{}/ready", server.base))
        .send()
        .await
        .expect("ready while draining");
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    // The answer in flight comes to its end.
    let mut text = String::from_utf8_lossy(&first).to_string();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
    assert!(text.contains("event: done"), "the stream was cut: {text}");

    // Then the process stops by itself, after the drain.
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "still running after the drain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(3),
        "stopped before the drain ended"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
