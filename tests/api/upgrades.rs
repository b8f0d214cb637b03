//! Upgrades (issue 16): without a payment provider an upgrade is a request an
//! administrator approves or rejects; with the `invoice` provider it is charged
//! first and applied only when the charge went through. Invoices bill a period at
//! its base price plus the prorated adjustments, never the new price on top.

use chrono::{Duration, Utc};
use futures_util::future::join_all;
use ragchat_actors::domain::{Page, UpgradeStatus};
use ragchat_actors::plans::{month_of, Period};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{expect, temp_sqlite_url, test_settings, TestApp};

async fn change(app: &TestApp, token: &str, body: Value) -> reqwest::Response {
    app.post_json("/billing/subscription", &body, Some(token)).await
}

async fn approve(app: &TestApp, token: &str, id: &str) -> reqwest::Response {
    app.post_json(
        &format!("/admin/upgrade-requests/{id}/approve"),
        &json!({}),
        Some(token),
    )
    .await
}

async fn reject(app: &TestApp, token: &str, id: &str, body: Value) -> reqwest::Response {
    app.post_json(&format!("/admin/upgrade-requests/{id}/reject"), &body, Some(token))
        .await
}

/// What moving from `from` to `to` cents a month costs now: the difference for the
/// rest of this month.
fn prorated_now(from: u64, to: u64) -> i64 {
    let now = Utc::now();
    ((to - from) as f64 * month_of(now).remaining_fraction(now)).round() as i64
}

fn cents(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("cents: {v}"))
}

/// Moves the user's current period into the past (last month), so that the next
/// read closes and invoices it: the invoice shows what that period was billed.
async fn close_the_period(app: &TestApp, user_id: Uuid) {
    let mut sub = app
        .state
        .usage
        .subscription(user_id)
        .await
        .expect("read")
        .expect("a subscription");
    let last_month = month_of(month_of(Utc::now()).start - Duration::days(1));
    sub.started_at = last_month.start;
    sub.current_period_start = last_month.start;
    sub.current_period_end = last_month.end;
    app.state.usage.put_subscription(&sub).await.expect("write");
}

/// The request flow on any backend: request (202, nothing applied), one pending
/// at a time, admin approval applies it with the proration, the period's invoice
/// holds only that proration.
async fn request_approve_and_invoice(app: &TestApp) {
    let admin = app
        .admin(&format!("admin-{}@example.com", Uuid::new_v4().simple()))
        .await;
    let email = format!("asks-{}@example.com", Uuid::new_v4().simple());
    let (id, token) = app.user(&email).await;
    let uid = Uuid::parse_str(&id).expect("uuid");

    let expected = prorated_now(0, 2900);
    let request = expect(change(app, &token, json!({"plan": "pro"})).await, StatusCode::ACCEPTED).await;
    assert_eq!(
        (
            request["status"].as_str(),
            request["plan_type"].as_str(),
            request["from_plan"].as_str()
        ),
        (Some("pending"), Some("pro"), Some("free"))
    );
    assert!(
        (cents(&request["quoted_charge_cents"]) - expected).abs() <= 1,
        "{request}"
    );
    let rid = request["id"].as_str().expect("id").to_string();

    // Nothing applied: the account stays on free, with free limits.
    let me = expect(app.get("/auth/me", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(me["subscription_plan"], "free");
    let sub = expect(app.get("/billing/subscription", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(
        (sub["plan_type"].as_str(), sub["limits"]["messages"].as_u64()),
        (Some("free"), Some(10))
    );
    assert_eq!(sub["upgrade_path"], "approval");
    assert_eq!(sub["upgrade_request"]["id"], rid.as_str());
    let mine = expect(app.get("/billing/upgrade-request", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(
        (mine["id"].as_str(), mine["status"].as_str()),
        (Some(rid.as_str()), Some("pending"))
    );

    // One pending request per account.
    let dup = expect(
        change(app, &token, json!({"plan": "enterprise"})).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(dup["code"], "upgrade_request_pending");

    let queue = expect(app.get("/admin/upgrade-requests", Some(&admin)).await, StatusCode::OK).await;
    let listed = queue["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["id"] == rid.as_str()).cloned())
        .expect("the request is in the admin queue");
    assert_eq!(
        (listed["email"].as_str(), listed["status"].as_str()),
        (Some(email.as_str()), Some("pending"))
    );

    let approved = expect(approve(app, &admin, &rid).await, StatusCode::OK).await;
    let charged = cents(&approved["prorated_charge_cents"]);
    assert!(
        (charged - expected).abs() <= 1,
        "charged {charged}, expected {expected}"
    );
    assert_eq!(approved["plan_type"], "pro");
    assert_eq!(approved["upgrade_request"]["status"], "approved");
    assert_eq!(cents(&approved["upgrade_request"]["charged_cents"]), charged);
    let me = expect(app.get("/auth/me", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(me["subscription_plan"], "pro");
    let sub = expect(app.get("/billing/subscription", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(sub["limits"]["messages"], 100);
    assert!(sub["upgrade_request"].is_null(), "nothing pending any more: {sub}");

    // Approving twice applies once.
    let again = expect(approve(app, &admin, &rid).await, StatusCode::CONFLICT).await;
    assert_eq!(again["code"], "upgrade_request_closed");
    let mine = expect(app.get("/billing/upgrade-request", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(
        (mine["status"].as_str(), mine["charged_cents"].as_i64()),
        (Some("approved"), Some(charged))
    );

    // The period's invoice: billed at free (0) plus the proration, not 2900 on top.
    close_the_period(app, uid).await;
    let invoices = expect(app.get("/billing/invoices", Some(&token)).await, StatusCode::OK).await;
    let first = &invoices[0];
    assert_eq!(
        (first["plan_type"].as_str(), first["plan_charge_cents"].as_i64()),
        (Some("pro"), Some(0))
    );
    assert_eq!(cents(&first["prorated_adjustments_cents"]), charged);
    assert_eq!(cents(&first["total_cents"]), charged);
    let stored = app.state.usage.subscription(uid).await.expect("read").expect("sub");
    assert_eq!(
        (stored.period_base_cents, stored.period_adjustments_cents),
        (2900, 0),
        "the next period is billed at pro"
    );
    // The admin's decision is in the user's audit log.
    let audit = expect(
        app.get(&format!("/admin/users/{id}/audit"), Some(&admin)).await,
        StatusCode::OK,
    )
    .await;
    assert!(
        audit
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["action"] == "upgrade_request.approve")),
        "{audit}"
    );
}

#[actix_web::test]
async fn without_a_provider_an_upgrade_waits_for_an_admin_and_applies_prorated_on_approval() {
    let app = TestApp::spawn().await;
    request_approve_and_invoice(&app).await;
}

#[actix_web::test]
async fn the_request_flow_works_the_same_on_postgres() {
    let Some(app) = TestApp::spawn_postgres().await else {
        return;
    };
    request_approve_and_invoice(&app).await;
}

#[actix_web::test]
async fn only_admins_decide_and_rejected_or_cancelled_requests_apply_nothing() {
    let app = TestApp::spawn().await;
    let admin = app.admin("decider@example.com").await;
    let (_, token) = app.user("hopeful@example.com").await;
    let (_, other) = app.user("bystander@example.com").await;
    let request = expect(
        change(&app, &token, json!({"plan": "enterprise"})).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let rid = request["id"].as_str().expect("id").to_string();

    // Users cannot decide, not even their own request.
    for who in [&token, &other] {
        let body = expect(approve(&app, who, &rid).await, StatusCode::FORBIDDEN).await;
        assert_eq!(body["code"], "admin_required");
        expect(reject(&app, who, &rid, json!({})).await, StatusCode::FORBIDDEN).await;
        expect(
            app.get("/admin/upgrade-requests", Some(who)).await,
            StatusCode::FORBIDDEN,
        )
        .await;
    }
    let me = expect(app.get("/auth/me", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(me["subscription_plan"], "free");

    // Rejected with a reason the user sees.
    let long = "x".repeat(app.state.settings.billing.max_note_chars + 1);
    expect(
        reject(&app, &admin, &rid, json!({"reason": long})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let rejected = expect(
        reject(&app, &admin, &rid, json!({"reason": "Talk to sales first"})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(rejected["status"], "rejected");
    let mine = expect(app.get("/billing/upgrade-request", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(
        (mine["status"].as_str(), mine["note"].as_str()),
        (Some("rejected"), Some("Talk to sales first"))
    );
    let me = expect(app.get("/auth/me", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(me["subscription_plan"], "free");
    for resp in [
        approve(&app, &admin, &rid).await,
        reject(&app, &admin, &rid, json!({})).await,
    ] {
        let body = expect(resp, StatusCode::CONFLICT).await;
        assert_eq!(body["code"], "upgrade_request_closed");
    }
    let missing = expect(
        approve(&app, &admin, &Uuid::new_v4().to_string()).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(missing["code"], "upgrade_request_not_found");

    // A new request may follow; the user withdraws it (with a password session only).
    let request = expect(change(&app, &token, json!({"plan": "pro"})).await, StatusCode::ACCEPTED).await;
    let rid = request["id"].as_str().expect("id").to_string();
    let key = expect(
        app.post_json("/auth/api-keys", &json!({"name": "ci"}), Some(&token))
            .await,
        StatusCode::CREATED,
    )
    .await;
    let key = key["key"].as_str().expect("key").to_string();
    let by_key = expect(
        app.delete("/billing/upgrade-request", &key).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(by_key["code"], "password_session_required");
    let cancelled = expect(app.delete("/billing/upgrade-request", &token).await, StatusCode::OK).await;
    assert_eq!(
        (cancelled["id"].as_str(), cancelled["status"].as_str()),
        (Some(rid.as_str()), Some("cancelled"))
    );
    let none = expect(
        app.delete("/billing/upgrade-request", &token).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(none["code"], "upgrade_request_not_found");
    let late = expect(approve(&app, &admin, &rid).await, StatusCode::CONFLICT).await;
    assert_eq!(late["code"], "upgrade_request_closed");
    let me = expect(app.get("/auth/me", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(me["subscription_plan"], "free");

    // Cancelling the subscription withdraws a pending request too.
    let (pro_id, pro) = app.user("pro-then-cancels@example.com").await;
    expect(
        app.patch_json(
            &format!("/admin/users/{pro_id}"),
            &json!({"subscription_plan": "pro"}),
            &admin,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let request = expect(
        change(&app, &pro, json!({"plan": "enterprise"})).await,
        StatusCode::ACCEPTED,
    )
    .await;
    expect(
        app.post_json("/billing/subscription/cancel", &json!({}), Some(&pro))
            .await,
        StatusCode::OK,
    )
    .await;
    let mine = expect(app.get("/billing/upgrade-request", Some(&pro)).await, StatusCode::OK).await;
    assert_eq!(
        (mine["id"].clone(), mine["status"].as_str()),
        (request["id"].clone(), Some("cancelled"))
    );
}

#[actix_web::test]
async fn approving_a_stale_request_applies_nothing() {
    let app = TestApp::spawn().await;
    let admin = app.admin("stale-admin@example.com").await;
    let (id, token) = app.user("overtaken@example.com").await;
    let request = expect(change(&app, &token, json!({"plan": "pro"})).await, StatusCode::ACCEPTED).await;
    let rid = request["id"].as_str().expect("id").to_string();
    // Meanwhile an admin puts the account on enterprise directly.
    expect(
        app.patch_json(
            &format!("/admin/users/{id}"),
            &json!({"subscription_plan": "enterprise"}),
            &admin,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let stale = expect(approve(&app, &admin, &rid).await, StatusCode::CONFLICT).await;
    assert_eq!(stale["code"], "upgrade_request_stale");
    assert!(
        stale["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no longer an upgrade")),
        "{stale}"
    );
    let mine = expect(app.get("/billing/upgrade-request", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(mine["status"], "stale");
    let me = expect(app.get("/auth/me", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(me["subscription_plan"], "enterprise", "not moved down to pro");
    let sub = app
        .state
        .usage
        .subscription(Uuid::parse_str(&id).expect("uuid"))
        .await
        .expect("read")
        .expect("sub");
    assert_eq!(sub.period_adjustments_cents, 0, "nothing charged");
    let queue = expect(
        app.get("/admin/upgrade-requests?status=stale", Some(&admin)).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(queue["total"], 1);
}

#[actix_web::test]
async fn request_spam_leaves_one_pending_request_and_bad_plans_are_refused() {
    let app = TestApp::spawn().await;
    let admin = app.admin("spam-admin@example.com").await;
    let (id, token) = app.user("spammer@example.com").await;
    let uid = Uuid::parse_str(&id).expect("uuid");
    // 30 concurrent upgrade requests, to both plans: one is stored, the rest 409.
    let attempts = (0..30).map(|i| {
        let plan = if i % 2 == 0 { "pro" } else { "enterprise" };
        change(&app, &token, json!({"plan": plan}))
    });
    let statuses: Vec<StatusCode> = join_all(attempts).await.iter().map(|r| r.status()).collect();
    let accepted = statuses.iter().filter(|s| **s == StatusCode::ACCEPTED).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::CONFLICT).count();
    assert_eq!((accepted, refused), (1, 29), "{statuses:?}");
    let (all, total) = app
        .state
        .usage
        .upgrade_requests(None, Page { offset: 0, limit: 100 })
        .await
        .expect("list");
    assert_eq!(total, 1);
    assert!(all
        .iter()
        .all(|r| r.user_id == uid && r.status == UpgradeStatus::Pending));

    let (_, other) = app.user("bad-plans@example.com").await;
    for bad in [
        json!({"plan": "gold"}),
        json!({"plan": ""}),
        json!({"plan": "pro", "billing_cycle": "weekly"}),
        json!({"plan": "pro", "x": 1}),
        json!({"plan": 7}),
    ] {
        let body = expect(
            change(&app, &other, bad.clone()).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(body["code"], "invalid_request", "{bad}");
    }
    let none = expect(
        app.get("/billing/upgrade-request", Some(&other)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(none["code"], "upgrade_request_not_found");
    for bad in ["?status=bogus", "?page=0", "?page_size=1000"] {
        expect(
            app.get(&format!("/admin/upgrade-requests{bad}"), Some(&admin)).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    expect(
        app.post_json("/admin/upgrade-requests/not-a-uuid/approve", &json!({}), Some(&admin))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
}

#[actix_web::test]
async fn a_downgrade_needs_no_approval_and_earns_no_credit() {
    let app = TestApp::spawn().await;
    let admin = app.admin("down-admin@example.com").await;
    let (id, token) = app.user("downsizer@example.com").await;
    expect(
        app.patch_json(
            &format!("/admin/users/{id}"),
            &json!({"subscription_plan": "enterprise"}),
            &admin,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let down = expect(change(&app, &token, json!({"plan": "pro"})).await, StatusCode::OK).await;
    assert_eq!(
        (down["effective"].as_str(), down["prorated_charge_cents"].as_i64()),
        (Some("period_end"), Some(0))
    );
    assert_eq!(down["subscription"]["pending_plan"], "pro");
    let uid = Uuid::parse_str(&id).expect("uuid");
    close_the_period(&app, uid).await;
    let invoices = expect(app.get("/billing/invoices", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(
        (
            invoices[0]["plan_charge_cents"].as_i64(),
            invoices[0]["total_cents"].as_i64()
        ),
        (Some(9900), Some(9900)),
        "the period stays billed at enterprise"
    );
    let sub = expect(app.get("/billing/subscription", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(
        (sub["plan_type"].as_str(), sub["amount_cents"].as_i64()),
        (Some("pro"), Some(2900))
    );
}

fn invoice_settings(credit_limit_cents: u64) -> ragchat::config::Settings {
    let mut settings = test_settings(&temp_sqlite_url());
    settings.billing.payment_provider = "invoice".into();
    settings.billing.invoice_credit_limit_cents = credit_limit_cents;
    settings
}

#[actix_web::test]
async fn with_the_invoice_provider_upgrades_are_charged_then_applied() {
    let app = TestApp::spawn_with(invoice_settings(100_000)).await;
    let (id, token) = app.user("pays@example.com").await;
    let uid = Uuid::parse_str(&id).expect("uuid");
    let sub = expect(app.get("/billing/subscription", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(
        (sub["upgrade_path"].as_str(), sub["payment_provider"].as_str()),
        (Some("payment"), Some("invoice"))
    );
    let expected = prorated_now(0, 2900);
    let paid = expect(change(&app, &token, json!({"plan": "pro"})).await, StatusCode::OK).await;
    let charged = cents(&paid["prorated_charge_cents"]);
    assert!(
        (charged - expected).abs() <= 1,
        "charged {charged}, expected {expected}"
    );
    assert_eq!(paid["effective"], "now");
    let payments = app.state.usage.payments(uid).await.expect("payments");
    assert_eq!(payments.len(), 1, "charged once");
    assert_eq!(payments[0].amount_cents as i64, charged);
    assert_eq!(paid["payment_reference"], payments[0].id.to_string().as_str());
    assert!(
        payments[0].description.contains("to pro"),
        "{}",
        payments[0].description
    );
    let me = expect(app.get("/auth/me", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(me["subscription_plan"], "pro");
    expect(
        app.get("/billing/upgrade-request", Some(&token)).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    close_the_period(&app, uid).await;
    let invoices = expect(app.get("/billing/invoices", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(
        (
            invoices[0]["plan_charge_cents"].as_i64(),
            invoices[0]["total_cents"].as_i64()
        ),
        (Some(0), Some(charged)),
        "the proration once, not the full price on top"
    );
}

#[actix_web::test]
async fn a_declined_charge_answers_402_and_applies_nothing() {
    // A credit limit of one cent: any real charge is past it.
    let app = TestApp::spawn_with(invoice_settings(1)).await;
    let (id, token) = app.user("declined@example.com").await;
    let uid = Uuid::parse_str(&id).expect("uuid");
    let body = expect(
        change(&app, &token, json!({"plan": "enterprise"})).await,
        StatusCode::PAYMENT_REQUIRED,
    )
    .await;
    assert_eq!(
        (body["code"].as_str(), body["type"].as_str()),
        (Some("payment_declined"), Some("payment"))
    );
    assert_eq!(body["link"], "docs/errors.md#payment_declined");
    let me = expect(app.get("/auth/me", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(me["subscription_plan"], "free");
    let sub = app.state.usage.subscription(uid).await.expect("read").expect("sub");
    assert_eq!((sub.period_adjustments_cents, sub.plan.as_str()), (0, "free"));
    assert!(app.state.usage.payments(uid).await.expect("payments").is_empty());
    expect(
        app.get("/billing/upgrade-request", Some(&token)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
}

/// The store's conditional writes, on SQLite and PostgreSQL: a charge past the
/// month's credit is refused even when charges race, a refund gives credit back.
async fn credit_is_held_by_the_store(app: &TestApp) {
    let (id, _) = app
        .user(&format!("credit-{}@example.com", Uuid::new_v4().simple()))
        .await;
    let uid = Uuid::parse_str(&id).expect("uuid");
    let month = month_of(Utc::now());
    let payment = |amount: u64| ragchat_actors::domain::Payment {
        id: Uuid::new_v4(),
        user_id: uid,
        amount_cents: amount,
        currency: "usd".into(),
        description: "test".into(),
        month_start: month.start,
        refunded: false,
        created_at: Utc::now(),
    };
    let usage = app.state.usage.clone();
    let charges: Vec<_> = (0..10).map(|_| payment(300)).collect();
    // A loaded machine can time out waiting for a pooled connection (nothing was
    // written then): such a charge is tried again, still racing the others.
    let charge = |p| {
        let usage = usage.clone();
        async move {
            for _ in 0..10 {
                match usage.record_payment(p, 1000).await {
                    Err(ragchat_actors::ports::StoreError::Unavailable(_)) => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await
                    }
                    other => return other,
                }
            }
            usage.record_payment(p, 1000).await
        }
    };
    let results = join_all(charges.iter().map(charge)).await;
    let granted = results.iter().filter(|r| matches!(r, Ok(true))).count();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(granted, 3, "3 x 300 fit within 1000, a fourth does not");
    let taken: Vec<_> = usage.payments(uid).await.expect("payments");
    assert_eq!(taken.len(), 3);
    assert!(usage.refund_payment(taken[0].id).await.expect("refund"));
    assert!(
        !usage.refund_payment(taken[0].id).await.expect("refund twice"),
        "refunded once"
    );
    assert!(
        usage.record_payment(&payment(300), 1000).await.expect("charge"),
        "the refund gave 300 back"
    );
    assert!(!usage.record_payment(&payment(101), 1000).await.expect("charge"));
    let next_month = Period {
        start: month.end,
        end: month.end + Duration::days(28),
    };
    let mut later = payment(1000);
    later.month_start = next_month.start;
    assert!(
        usage.record_payment(&later, 1000).await.expect("charge"),
        "each month has its own credit"
    );
}

#[actix_web::test]
async fn the_invoice_credit_limit_holds_under_concurrent_charges_on_sqlite_and_postgres() {
    credit_is_held_by_the_store(&TestApp::spawn().await).await;
    if let Some(app) = TestApp::spawn_postgres().await {
        credit_is_held_by_the_store(&app).await;
    }
}
