//! /admin: every route is guarded; user management is audit-logged.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{expect, TestApp};

/// Every /admin operation in the OpenAPI document, with path parameters filled in.
async fn admin_operations(app: &TestApp) -> Vec<(Method, String)> {
    let doc = expect(app.get("/openapi.json", None).await, StatusCode::OK).await;
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        if !path.starts_with("/admin") {
            continue;
        }
        let concrete = path
            .split('/')
            .map(|seg| {
                if seg.starts_with('{') {
                    uuid::Uuid::new_v4().to_string()
                } else {
                    seg.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in item.as_object().expect("operations").keys() {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            ops.push((m, concrete.clone()));
        }
    }
    ops
}

#[actix_web::test]
async fn every_admin_route_requires_a_token_and_a_superuser() {
    let app = TestApp::spawn().await;
    let (_, user_token) = app.user("plain@example.com").await;
    let ops = admin_operations(&app).await;
    assert!(ops.len() >= 3, "the OpenAPI document lists the admin routes: {ops:?}");
    for (method, path) in ops {
        let anon = app
            .client
            .request(method.clone(), app.url(&path))
            .json(&json!({}))
            .send()
            .await
            .expect("req");
        assert_eq!(
            anon.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path} without a token"
        );
        let user = app
            .client
            .request(method.clone(), app.url(&path))
            .bearer_auth(&user_token)
            .json(&json!({}))
            .send()
            .await
            .expect("req");
        assert_eq!(user.status(), StatusCode::FORBIDDEN, "{method} {path} as a non-admin");
        let body: Value = user.json().await.expect("json");
        assert_eq!(body["detail"], "Admin privileges required");
    }
}

#[actix_web::test]
async fn admins_list_users_by_email_and_plan_in_pages() {
    let app = TestApp::spawn().await;
    let admin = app.admin("root@example.com").await;
    for i in 0..3 {
        app.register(&format!("team{i}@acme.example"), "password-1234").await;
    }
    let page = expect(
        app.get("/admin/users?email=ACME&page_size=2", Some(&admin)).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (page["total"].as_u64(), page["items"].as_array().map(Vec::len)),
        (Some(3), Some(2))
    );
    assert!(page["items"][0].get("hashed_password").is_none());
    let page2 = expect(
        app.get("/admin/users?email=acme&page=2&page_size=2", Some(&admin))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(page2["items"].as_array().map(Vec::len), Some(1));
    let ent = expect(
        app.get("/admin/users?plan=enterprise", Some(&admin)).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(ent["total"], 1);
    assert_eq!(ent["items"][0]["email"], "root@example.com");
    for bad in ["plan=gold", "page=0", "page_size=1000", "page=abc"] {
        expect(
            app.get(&format!("/admin/users?{bad}"), Some(&admin)).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
}

#[actix_web::test]
async fn admin_changes_are_applied_and_audit_logged() {
    let app = TestApp::spawn().await;
    let admin = app.admin("auditor@example.com").await;
    let (id, token) = app.user("customer@example.com").await;
    let path = format!("/admin/users/{id}");

    let updated = expect(
        app.patch_json(&path, &json!({"subscription_plan": "pro"}), &admin)
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(updated["subscription_plan"], "pro");
    let me = expect(app.get("/auth/me", Some(&token)).await, StatusCode::OK).await;
    assert_eq!(me["subscription_plan"], "pro");
    expect(
        app.patch_json(&path, &json!({"is_superuser": true}), &admin).await,
        StatusCode::OK,
    )
    .await;
    // The promoted user can now use admin routes.
    expect(app.get("/admin/users", Some(&token)).await, StatusCode::OK).await;

    let audit = expect(app.get(&format!("{path}/audit"), Some(&admin)).await, StatusCode::OK).await;
    let entries = audit.as_array().expect("entries");
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["action"], "user.update");
    assert_eq!(entries[0]["details"]["actor_email"], "auditor@example.com");
    assert_eq!(
        entries[0]["details"]["changes"]["subscription_plan"],
        json!({"from": "free", "to": "pro"})
    );
    assert_eq!(
        entries[1]["details"]["changes"]["is_superuser"],
        json!({"from": false, "to": true})
    );
    assert!(entries[0]["created_at"].is_string());
}

#[actix_web::test]
async fn bad_admin_updates_are_refused_clearly() {
    let app = TestApp::spawn().await;
    let admin = app.admin("careful@example.com").await;
    let me = expect(app.get("/auth/me", Some(&admin)).await, StatusCode::OK).await;
    let self_path = format!("/admin/users/{}", me["id"].as_str().expect("id"));
    expect(
        app.patch_json(&self_path, &json!({"is_superuser": false}), &admin)
            .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    expect(
        app.patch_json(&self_path, &json!({"is_active": false}), &admin).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    let (id, _) = app.user("target@example.com").await;
    let path = format!("/admin/users/{id}");
    expect(
        app.patch_json(&path, &json!({"subscription_plan": "gold"}), &admin)
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    expect(
        app.patch_json(&path, &json!({}), &admin).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    expect(
        app.patch_json(&path, &json!({"hashed_password": "x"}), &admin).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let missing = format!("/admin/users/{}", uuid::Uuid::new_v4());
    expect(
        app.patch_json(&missing, &json!({"is_active": true}), &admin).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    expect(
        app.patch_json("/admin/users/not-a-uuid", &json!({"is_active": true}), &admin)
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
}
