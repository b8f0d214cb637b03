//! Sessions, rate limits, quotas, the ledger and the billing API.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use futures_util::future::join_all;
use ragchat_actors::admission::session::Crash;
use ragchat_actors::domain::{Subscription, SubscriptionStatus, UsageRecord};
use ragchat_actors::plans::Plan;
use ragchat_actors::plans::{BillingCycle, Period, Resource};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{
    expect, fresh_postgres_url, service_url, sign_up, temp_sqlite_url, test_settings, ServerProcess, TestApp,
};

async fn probe(app: &TestApp, kind: &str, token: &str) -> reqwest::Response {
    app.post_json(&format!("/billing/probe/{kind}"), &json!({}), Some(token))
        .await
}

/// Waits until the ledger has written `n` records of the user.
async fn wait_for_records(app: &TestApp, user_id: Uuid, n: u64) -> u64 {
    let mut got = 0;
    for _ in 0..100 {
        got = app.state.usage.usage_record_count(user_id).await.expect("count");
        if got >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    got
}

async fn set_plan(app: &TestApp, admin: &str, user_id: &str, plan: &str) {
    expect(
        app.patch_json(
            &format!("/admin/users/{user_id}"),
            &json!({"subscription_plan": plan}),
            admin,
        )
        .await,
        StatusCode::OK,
    )
    .await;
}

#[actix_web::test]
async fn free_user_is_refused_the_eleventh_message() {
    let app = TestApp::spawn().await;
    let (id, token) = app.user("free@example.com").await;
    for i in 1..=10 {
        let body = expect(probe(&app, "chat", &token).await, StatusCode::OK).await;
        assert_eq!(body["used"], i);
    }
    let resp = probe(&app, "chat", &token).await;
    assert!(resp.headers().contains_key("retry-after"));
    let body = expect(resp, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(
        body["detail"],
        json!({"error": "Quota exceeded", "resource": "messages", "current_usage": 10, "limit": 10,
               "upgrade_to": "pro", "upgrade_url": "/billing/plans"})
    );
    // Exactly the ten admitted messages reach the ledger, once each.
    let uid = Uuid::parse_str(&id).expect("uuid");
    assert_eq!(wait_for_records(&app, uid, 10).await, 10);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.state.usage.usage_record_count(uid).await.expect("count"), 10);
    let usage = expect(app.get("/billing/usage", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(usage["messages_this_month"], 10);
    assert_eq!(usage["quota_remaining"]["messages"], 0);
    assert_eq!(usage["quota_remaining"]["api_calls"], 20);
}

#[actix_web::test]
async fn concurrent_requests_of_one_user_admit_exactly_the_quota() {
    let app = TestApp::spawn().await;
    let (id, token) = app.user("burst@example.com").await;
    let attempts = (0..80).map(|_| probe(&app, "api", &token));
    let statuses: Vec<StatusCode> = join_all(attempts).await.into_iter().map(|r| r.status()).collect();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((ok, refused), (20, 60), "{statuses:?}");
    let uid = Uuid::parse_str(&id).expect("uuid");
    assert_eq!(wait_for_records(&app, uid, 20).await, 20);
}

#[actix_web::test]
async fn the_chat_rate_limit_refuses_the_31st_call_in_a_minute_with_headers() {
    let app = TestApp::spawn().await;
    let admin = app.admin("rl-admin@example.com").await;
    let (id, token) = app.user("chatty@example.com").await;
    set_plan(&app, &admin, &id, "pro").await;
    let mut last_remaining = u32::MAX;
    for _ in 0..30 {
        let resp = probe(&app, "chat", &token).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["ratelimit-limit"], "30");
        let remaining: u32 = resp.headers()["ratelimit-remaining"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("number");
        assert!(remaining < last_remaining);
        last_remaining = remaining;
    }
    assert_eq!(last_remaining, 0);
    let resp = probe(&app, "chat", &token).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("secs");
    assert!((1..=2).contains(&retry), "one call refills every 2 s: {retry}");
    assert_eq!(resp.headers()["ratelimit-remaining"], "0");
    assert_eq!(resp.headers()["ratelimit-limit"], "30");
    assert!(resp.headers().contains_key("ratelimit-reset"));
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["detail"], "Rate limit exceeded. Max 30 calls per 60 seconds");
    // Other buckets are separate.
    expect(probe(&app, "search", &token).await, StatusCode::OK).await;
    // A refused call is not counted against the quota.
    let usage = expect(app.get("/billing/usage", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(usage["messages_this_month"], 30);
}

#[actix_web::test]
async fn an_unreachable_redis_falls_back_to_local_limits_without_errors() {
    let mut settings = test_settings(&temp_sqlite_url());
    settings.redis.url = "redis://127.0.0.1:1".into(); // nothing listens there
    let app = TestApp::spawn_with(settings).await;
    let admin = app.admin("fb-admin@example.com").await;
    let (id, token) = app.user("fallback@example.com").await;
    set_plan(&app, &admin, &id, "pro").await;
    let started = std::time::Instant::now();
    for i in 0..30 {
        let resp = probe(&app, "chat", &token).await;
        assert_eq!(resp.status(), StatusCode::OK, "call {i}");
    }
    expect(probe(&app, "chat", &token).await, StatusCode::TOO_MANY_REQUESTS).await;
    assert!(app.state.redis_limits.as_ref().is_some_and(|r| r.fallback_active()));
    // The breaker means only the first check waits for Redis at all.
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

#[actix_web::test]
async fn two_servers_sharing_postgres_and_redis_share_limits_and_quotas() {
    let Some(db) = fresh_postgres_url().await else {
        return;
    };
    let Some(redis) = service_url("REDIS_URL") else {
        return;
    };
    let mut a_settings = test_settings(&db);
    a_settings.redis.url = redis.clone();
    a_settings.redis.timeout_ms = 1000;
    let mut b_settings = test_settings(&db);
    b_settings.redis.url = redis;
    b_settings.redis.timeout_ms = 1000;
    let a = TestApp::spawn_with(a_settings).await;
    let b = TestApp::spawn_with(b_settings).await;

    // Quota: a free user has 20 api_calls; 60 concurrent calls split over both servers.
    let (_, token) = a.user(&format!("shared-{}@example.com", Uuid::new_v4().simple())).await;
    let calls = (0..60).map(|i| probe(if i % 2 == 0 { &a } else { &b }, "api", &token));
    let ok = join_all(calls)
        .await
        .iter()
        .filter(|r| r.status() == StatusCode::OK)
        .count();
    assert_eq!(ok, 20);

    // Rate limit: a pro user's 30 chat calls a minute hold across both servers.
    let admin = a.admin(&format!("admin-{}@example.com", Uuid::new_v4().simple())).await;
    let (id, token) = a.user(&format!("pro-{}@example.com", Uuid::new_v4().simple())).await;
    set_plan(&a, &admin, &id, "pro").await;
    let mut ok = 0;
    for i in 0..40 {
        let r = probe(if i % 2 == 0 { &a } else { &b }, "chat", &token).await;
        assert!(
            r.status() == StatusCode::OK || r.status() == StatusCode::TOO_MANY_REQUESTS,
            "{}",
            r.status()
        );
        ok += usize::from(r.status() == StatusCode::OK);
    }
    assert_eq!(ok, 30);
}

#[actix_web::test]
async fn plans_are_listed_with_limits_prices_and_features() {
    let app = TestApp::spawn().await;
    let plans = expect(app.get("/billing/plans", None).await, StatusCode::OK).await;
    let by_name = |n: &str| {
        plans
            .as_array()
            .and_then(|a| a.iter().find(|p| p["plan_type"] == n))
            .cloned()
            .expect("plan")
    };
    let free = by_name("free");
    assert_eq!(
        free["limits"],
        json!({"messages": 10, "background_tasks": 5, "api_calls": 20, "storage_mb": 100})
    );
    assert_eq!(free["price_monthly_cents"], 0);
    let pro = by_name("pro");
    assert_eq!(
        pro["limits"],
        json!({"messages": 100, "background_tasks": 50, "api_calls": 500, "storage_mb": 1000})
    );
    assert_eq!(
        (pro["price_monthly_cents"].as_u64(), pro["price_yearly_cents"].as_u64()),
        (Some(2900), Some(29000))
    );
    let ent = by_name("enterprise");
    assert_eq!(
        ent["limits"],
        json!({"messages": 10000, "background_tasks": 1000, "api_calls": 50000, "storage_mb": 10000})
    );
    assert_eq!(
        (ent["price_monthly_cents"].as_u64(), ent["price_yearly_cents"].as_u64()),
        (Some(9900), Some(99000))
    );
    assert!(ent["features"].as_array().is_some_and(|f| !f.is_empty()));
}

#[actix_web::test]
async fn a_subscription_is_made_from_the_account_plan_never_a_silent_free() {
    let app = TestApp::spawn().await;
    let admin = app.admin("sub-admin@example.com").await;
    let (id, token) = app.user("paying@example.com").await;
    set_plan(&app, &admin, &id, "enterprise").await;
    let sub = expect(app.get("/billing/subscription", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(sub["plan_type"], "enterprise");
    assert_eq!(sub["status"], "active");
    assert_eq!(sub["billing_cycle"], "monthly");
    assert_eq!(sub["amount_cents"], 9900);
    assert_eq!(sub["limits"]["messages"], 10000);
    let start =
        chrono::DateTime::parse_from_rfc3339(sub["current_period_start"].as_str().expect("start")).expect("date");
    assert_eq!(
        start.format("%d %H:%M:%S").to_string(),
        "01 00:00:00",
        "periods are calendar months"
    );
}

#[actix_web::test]
async fn paid_upgrades_apply_now_with_proration_and_downgrades_at_period_end() {
    // With a payment provider (without one an upgrade waits for approval: tests/api/upgrades.rs).
    let mut settings = test_settings(&temp_sqlite_url());
    settings.billing.payment_provider = "invoice".into();
    let app = TestApp::spawn_with(settings).await;
    let (_, token) = app.user("upgrader@example.com").await;
    for _ in 0..10 {
        expect(probe(&app, "chat", &token).await, StatusCode::OK).await;
    }
    expect(probe(&app, "chat", &token).await, StatusCode::TOO_MANY_REQUESTS).await;

    let now = Utc::now();
    let change = expect(
        app.post_json(
            "/billing/subscription",
            &json!({"plan": "pro", "billing_cycle": "monthly"}),
            Some(&token),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(change["effective"], "now");
    let period = ragchat_actors::plans::month_of(now);
    let expected = (2900.0 * period.remaining_fraction(now)).round() as i64;
    let charged = change["prorated_charge_cents"].as_i64().expect("cents");
    assert!(
        (charged - expected).abs() <= 1,
        "charged {charged}, expected {expected}"
    );
    assert_eq!(change["subscription"]["plan_type"], "pro");
    // The session's cached limits were invalidated: the 11th message now passes.
    expect(probe(&app, "chat", &token).await, StatusCode::OK).await;
    let me = expect(app.get("/auth/me", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(me["subscription_plan"], "pro");

    expect(
        app.post_json("/billing/subscription", &json!({"plan": "pro"}), Some(&token))
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    let down = expect(
        app.post_json("/billing/subscription", &json!({"plan": "free"}), Some(&token))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(down["effective"], "period_end");
    assert_eq!(down["prorated_charge_cents"], 0);
    assert_eq!(down["subscription"]["plan_type"], "pro");
    assert_eq!(down["subscription"]["pending_plan"], "free");

    let cancelled = expect(
        app.post_json("/billing/subscription/cancel", &json!({}), Some(&token))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (cancelled["status"].as_str(), cancelled["auto_renew"].as_bool()),
        (Some("canceled"), Some(false))
    );
    for bad in [
        json!({"plan": "gold"}),
        json!({"plan": "pro", "billing_cycle": "weekly"}),
        json!({"plan": "pro", "x": 1}),
    ] {
        expect(
            app.post_json("/billing/subscription", &bad, Some(&token)).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
}

#[actix_web::test]
async fn closed_periods_are_invoiced_once_with_usage_and_pending_downgrades_apply() {
    let app = TestApp::spawn().await;
    let (id, token) = app.user("invoiced@example.com").await;
    let uid = Uuid::parse_str(&id).expect("uuid");
    let at = |y, m| Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().expect("date");
    let october = Period {
        start: at(2026, 10),
        end: at(2026, 11),
    };
    app.state
        .usage
        .put_subscription(&Subscription {
            user_id: uid,
            plan: Plan::Pro,
            status: SubscriptionStatus::Active,
            billing_cycle: BillingCycle::Monthly,
            amount_cents: 2900,
            currency: "usd".into(),
            started_at: october.start,
            current_period_start: october.start,
            current_period_end: october.end,
            auto_renew: true,
            pending_plan: Some(Plan::Free),
            period_adjustments_cents: 150,
            period_base_cents: 2900,
        })
        .await
        .expect("subscription");
    let records: Vec<UsageRecord> = (0..3)
        .map(|_| UsageRecord {
            id: Uuid::new_v4(),
            user_id: uid,
            resource: Resource::Messages,
            quantity: 1,
            period: october,
            metadata: json!({}),
            created_at: october.start,
        })
        .collect();
    app.state.usage.insert_usage(&records).await.expect("usage");
    assert_eq!(
        app.state.usage.insert_usage(&records).await.expect("replay"),
        0,
        "idempotent by key"
    );

    let invoices = expect(app.get("/billing/invoices", Some(&token)).await, StatusCode::OK).await;
    let list = invoices.as_array().expect("list");
    assert!(!list.is_empty());
    let oct = &list[0];
    assert_eq!(oct["period_start"], json!(october.start));
    assert_eq!(
        (oct["plan_type"].as_str(), oct["plan_charge_cents"].as_u64()),
        (Some("pro"), Some(2900))
    );
    assert_eq!(oct["prorated_adjustments_cents"], 150);
    assert_eq!(oct["total_cents"], 3050);
    assert_eq!(oct["usage"]["messages"], 3);
    // November (closed too, on the free plan the downgrade switched to) if today is later.
    let again = expect(app.get("/billing/invoices", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(
        again.as_array().map(Vec::len),
        Some(list.len()),
        "invoices are made once"
    );
    let sub = expect(app.get("/billing/subscription", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(
        sub["plan_type"], "free",
        "the pending downgrade applied at the period end"
    );
    assert!(sub["pending_plan"].is_null());
    let me = expect(app.get("/auth/me", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(me["subscription_plan"], "free");
}

#[actix_web::test]
async fn admin_plan_changes_and_limit_overrides_take_effect_at_once() {
    let app = TestApp::spawn().await;
    let admin = app.admin("limits-admin@example.com").await;
    let (id, token) = app.user("limited@example.com").await;
    for _ in 0..10 {
        expect(probe(&app, "chat", &token).await, StatusCode::OK).await;
    }
    expect(probe(&app, "chat", &token).await, StatusCode::TOO_MANY_REQUESTS).await;
    set_plan(&app, &admin, &id, "pro").await;
    expect(probe(&app, "chat", &token).await, StatusCode::OK).await;

    let (_, other) = app.user("other-free@example.com").await;
    let put = app
        .client
        .put(app.url("/admin/settings/subscription_limits"))
        .bearer_auth(&admin);
    let body = expect(
        put.json(&json!({"free": {"messages": 2}})).send().await.expect("req"),
        StatusCode::OK,
    )
    .await;
    assert_eq!(body["effective"]["free"]["messages"], 2);
    expect(probe(&app, "chat", &other).await, StatusCode::OK).await;
    expect(probe(&app, "chat", &other).await, StatusCode::OK).await;
    let refused = expect(probe(&app, "chat", &other).await, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(refused["detail"]["limit"], 2);
    let plans = expect(app.get("/billing/plans", None).await, StatusCode::OK).await;
    assert_eq!(plans[0]["limits"]["messages"], 2);
    let bad = app
        .client
        .put(app.url("/admin/settings/subscription_limits"))
        .bearer_auth(&admin);
    expect(
        bad.json(&json!({"free": {"tokens": 1}})).send().await.expect("req"),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
}

#[actix_web::test]
async fn a_crashed_session_is_restarted_with_its_state_reloaded() {
    let app = TestApp::spawn().await;
    let (id, token) = app.user("crashy@example.com").await;
    let uid = Uuid::parse_str(&id).expect("uuid");
    for _ in 0..3 {
        expect(probe(&app, "chat", &token).await, StatusCode::OK).await;
    }
    let session = app.state.registry.existing(uid).expect("session running");
    session.do_send(Crash);
    // The panic hook runs before the actor is torn down: with RUST_BACKTRACE=1
    // (CI) the first backtrace of this large binary takes seconds to resolve.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while session.connected() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!session.connected(), "the session died");
    let body = expect(probe(&app, "chat", &token).await, StatusCode::OK).await;
    assert_eq!(body["used"], 4, "quota state survived the crash");
    let stats = app.state.registry.stats();
    assert_eq!(stats.restarted, 1);
    assert_eq!(stats.active, 1);
}

#[actix_web::test]
async fn idle_sessions_are_stopped_and_come_back_on_demand() {
    let mut settings = test_settings(&temp_sqlite_url());
    settings.sessions.idle_timeout_secs = 1;
    let app = TestApp::spawn_with(settings).await;
    let (_, token) = app.user("idle@example.com").await;
    expect(probe(&app, "chat", &token).await, StatusCode::OK).await;
    assert_eq!(app.state.registry.stats().active, 1);
    let mut stats = app.state.registry.stats();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stats = app.state.registry.stats();
        if stats.active == 0 {
            break;
        }
    }
    assert_eq!((stats.active, stats.evicted), (0, 1));
    let body = expect(probe(&app, "chat", &token).await, StatusCode::OK).await;
    assert_eq!(body["used"], 2);
}

#[actix_web::test]
async fn two_server_processes_sharing_postgres_admit_exactly_the_quota() {
    let Some(db) = fresh_postgres_url().await else {
        return;
    };
    let Some(redis) = service_url("REDIS_URL") else {
        return;
    };
    let env = [
        ("RAGCHAT__DATABASE__URL", db.clone()),
        ("RAGCHAT__REDIS__URL", redis.clone()),
        ("RAGCHAT__REDIS__TIMEOUT_MS", "1000".to_string()),
        // Exact admission is the subject here, not overload: on a loaded machine 60 calls
        // can wait longer than the default 750 ms for a connection and get 503.
        ("RAGCHAT__DATABASE__ACQUIRE_TIMEOUT_MS", "30000".to_string()),
    ];
    let a = ServerProcess::spawn(&env);
    let b = ServerProcess::spawn(&env);
    let client = reqwest::Client::new();
    let token = sign_up(&client, &a.base, &b.base, "two-procs@example.com").await;
    // A free user has 20 api_calls a month; 60 concurrent calls, half to each process.
    let calls = (0..60).map(|i| {
        let url = format!("{}/billing/probe/api", if i % 2 == 0 { &a.base } else { &b.base });
        client.post(url).bearer_auth(&token).json(&json!({})).send()
    });
    let statuses: Vec<StatusCode> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("response").status())
        .collect();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((ok, refused), (20, 40), "{statuses:?}");
}

#[actix_web::test]
async fn rate_limits_fall_back_when_redis_stops_and_return_to_it_when_it_is_back() {
    if service_url("REDIS_URL").is_none() {
        return;
    }
    // A Redis of this test's own, so stopping it disturbs no other test.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let dir = std::env::temp_dir().join(format!("ragchat-redis-{}", Uuid::new_v4().simple()));
    let services = |action: &str| {
        std::process::Command::new(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/services.sh"))
            .args([action, "redis"])
            .env("SERVICES_DIR", &dir)
            .env("REDIS_PORT", port.to_string())
            .output()
            .expect("scripts/services.sh")
    };
    assert!(services("start").status.success());
    let mut settings = test_settings(&temp_sqlite_url());
    settings.redis.url = format!("redis://127.0.0.1:{port}");
    settings.redis.timeout_ms = 200;
    settings.redis.breaker_cooldown_ms = 300;
    settings.rate_limits.chat.limit = 20; // per minute
    let app = TestApp::spawn_with(settings).await;
    let admin = app.admin("redis-admin@example.com").await;
    let (id, token) = app.user("redis-user@example.com").await;
    set_plan(&app, &admin, &id, "pro").await;
    let limiter = app.state.redis_limits.clone().expect("redis configured");

    for _ in 0..5 {
        expect(probe(&app, "chat", &token).await, StatusCode::OK).await;
    }
    assert!(!limiter.fallback_active());
    let key = format!("rl:{id}:chat");
    let redis_client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
    let mut conn = redis_client.get_multiplexed_async_connection().await.expect("connect");
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.expect("pttl");
    assert!(ttl > 0, "the limit lives in Redis with an expiry");

    // Killed under load: four clients keep calling while Redis goes away.
    let redis_pid: String = std::fs::read_to_string(dir.join("run/redis.pid")).unwrap_or_default();
    let killer = {
        let pid = redis_pid.trim().to_string();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::process::Command::new("kill").args(["-9", &pid]).status()
        })
    };
    let clients = (0..4).map(|_| async {
        let mut seen = Vec::new();
        for _ in 0..10 {
            seen.push(probe(&app, "chat", &token).await.status());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    });
    let statuses: Vec<StatusCode> = futures_util::future::join_all(clients)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(
        killer.join().expect("kill").is_ok_and(|s| s.success()),
        "redis killed (pid {redis_pid:?})"
    );
    assert!(limiter.fallback_active(), "on the in-memory limits");
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::TOO_MANY_REQUESTS),
        "no 5xx while Redis is down: {statuses:?}"
    );
    // The limit held across the switch: 5 admitted before, 15 more, then refusals.
    let admitted = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(admitted, 15, "{statuses:?}");
    expect(probe(&app, "chat", &token).await, StatusCode::TOO_MANY_REQUESTS).await;

    // Redis restarted (empty: it keeps no data): checks go back to it.
    assert!(services("start").status.success());
    tokio::time::sleep(Duration::from_millis(400)).await; // the breaker's cooldown
    let mut back = false;
    for _ in 0..30 {
        let status = probe(&app, "chat", &token).await.status();
        assert!(
            status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
            "{status}"
        );
        if !limiter.fallback_active() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(back, "back on Redis after it recovered");
    let mut conn = redis_client
        .get_multiplexed_async_connection()
        .await
        .expect("reconnect");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("exists");
    assert_eq!(exists, 1, "checks are made in Redis again");
    let _ = services("stop");
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_web::test]
async fn the_probe_routes_exist_only_when_configured() {
    let mut settings = test_settings(&temp_sqlite_url());
    settings.billing.probes = false;
    let app = TestApp::spawn_with(settings).await;
    let (_, token) = app.user("no-probes@example.com").await;
    for route in ["open", "api", "chat", "search"] {
        let resp = app
            .client
            .post(app.url(&format!("/billing/probe/{route}")))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "/billing/probe/{route}");
    }
    // The test profile turns them on (the admission tests and the benchmark use them).
    let on = TestApp::spawn().await;
    let resp = on
        .client
        .post(on.url("/billing/probe/open"))
        .json(&json!({}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
}
