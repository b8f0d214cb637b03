//! AccountStore contract: the same checks against SQLite (always) and PostgreSQL
//! (when DATABASE_URL is set).

use std::sync::Arc;

use chrono::{Duration, Utc};
use ragchat::config::DatabaseSettings;
use ragchat::stores::connect_accounts;
use ragchat_actors::domain::{
    ApiKey, AuditEntry, Email, NewUser, Page, RefreshOutcome, RefreshToken, Scope, Scopes, UserFilter, UserPatch,
};
use ragchat_actors::plans::Plan;
use ragchat_actors::ports::{AccountStore, StoreError};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::fresh_postgres_url;

async fn sqlite() -> Arc<dyn AccountStore> {
    let dir = std::env::temp_dir().join("ragchat-tests");
    let _ = std::fs::create_dir_all(&dir);
    let url = format!("sqlite:{}", dir.join(format!("{}.db", Uuid::new_v4())).display());
    connect(&url).await
}

async fn connect(url: &str) -> Arc<dyn AccountStore> {
    connect_accounts(&DatabaseSettings {
        url: url.to_string(),
        max_connections: 8,
        acquire_timeout_ms: 5000,
    })
    .await
    .expect("store connects and migrates")
}

async fn postgres() -> Option<Arc<dyn AccountStore>> {
    Some(connect(&fresh_postgres_url().await?).await)
}

fn new_user(email: &str) -> NewUser {
    NewUser {
        email: Email::parse(email).expect("valid email"),
        hashed_password: "$argon2id$not-a-real-hash".into(),
        full_name: Some("Test User".into()),
        is_superuser: false,
        is_verified: false,
        subscription_plan: Plan::Free,
        organization_id: None,
    }
}

/// Runs each contract against both backends.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(#[actix_web::test] async fn $name() { super::$name(super::sqlite().await).await; })*
        }
        mod postgres_backend {
            $(#[actix_web::test] async fn $name() {
                if let Some(store) = super::postgres().await { super::$name(store).await; }
            })*
        }
    };
}

contract!(
    users_are_created_found_and_unique_by_email,
    users_are_patched_field_by_field,
    users_are_listed_filtered_and_paged,
    api_keys_are_listed_used_and_revoked,
    refresh_tokens_rotate_once_and_reuse_revokes_the_family,
    concurrent_refreshes_of_one_token_rotate_exactly_once,
    settings_and_audit_entries_round_trip,
    organizations_round_trip,
);

async fn users_are_created_found_and_unique_by_email(store: Arc<dyn AccountStore>) {
    store.ping().await.expect("ping");
    let user = store.create_user(new_user("Alice@Example.com")).await.expect("create");
    assert_eq!(user.email, "alice@example.com");
    assert!(user.is_active && !user.is_superuser && !user.is_verified);
    assert_eq!(user.subscription_plan, Plan::Free);
    assert_eq!(user.preferences, json!({}));

    let by_id = store.user_by_id(user.id).await.expect("by id").expect("found");
    assert_eq!(by_id.id, user.id);
    assert_eq!(by_id.email, user.email);
    assert_eq!(by_id.full_name.as_deref(), Some("Test User"));
    let by_email = store
        .user_by_email("ALICE@example.com ")
        .await
        .expect("by email")
        .expect("found");
    assert_eq!(by_email.id, user.id);
    assert!(store.user_by_id(Uuid::new_v4()).await.expect("query").is_none());

    match store.create_user(new_user("alice@example.com")).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("duplicate email must conflict, got {other:?}"),
    }
}

async fn users_are_patched_field_by_field(store: Arc<dyn AccountStore>) {
    let user = store.create_user(new_user("bob@example.com")).await.expect("create");
    let patched = store
        .update_user(
            user.id,
            &UserPatch {
                subscription_plan: Some(Plan::Pro),
                ..Default::default()
            },
        )
        .await
        .expect("patch");
    assert_eq!(patched.subscription_plan, Plan::Pro);
    assert!(patched.is_active, "untouched fields keep their value");
    assert!(patched.updated_at >= user.updated_at);
    let patched = store
        .update_user(
            user.id,
            &UserPatch {
                is_active: Some(false),
                is_superuser: Some(true),
                ..Default::default()
            },
        )
        .await
        .expect("patch");
    assert!(!patched.is_active && patched.is_superuser);
    assert_eq!(patched.subscription_plan, Plan::Pro);
    assert!(matches!(
        store
            .update_user(
                Uuid::new_v4(),
                &UserPatch {
                    is_active: Some(true),
                    ..Default::default()
                }
            )
            .await,
        Err(StoreError::NotFound)
    ));
}

async fn users_are_listed_filtered_and_paged(store: Arc<dyn AccountStore>) {
    for i in 0..5 {
        let mut u = new_user(&format!("user{i}@corp.example"));
        if i % 2 == 0 {
            u.subscription_plan = Plan::Pro;
        }
        store.create_user(u).await.expect("create");
    }
    store
        .create_user(new_user("odd_one%@other.example"))
        .await
        .expect("create");

    let all = UserFilter::default();
    let (page, total) = store
        .list_users(&all, Page { offset: 0, limit: 4 })
        .await
        .expect("list");
    assert_eq!((page.len(), total), (4, 6));
    let (rest, _) = store
        .list_users(&all, Page { offset: 4, limit: 4 })
        .await
        .expect("list");
    assert_eq!(rest.len(), 2);
    let mut ids: Vec<_> = page.iter().chain(rest.iter()).map(|u| u.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 6, "pages do not overlap");

    let pro = UserFilter {
        plan: Some(Plan::Pro),
        ..Default::default()
    };
    let (users, total) = store
        .list_users(&pro, Page { offset: 0, limit: 10 })
        .await
        .expect("list");
    assert_eq!(total, 3);
    assert!(users.iter().all(|u| u.subscription_plan == Plan::Pro));

    let corp = UserFilter {
        email: Some("CORP.example".into()),
        plan: Some(Plan::Free),
    };
    let (_, total) = store
        .list_users(&corp, Page { offset: 0, limit: 10 })
        .await
        .expect("list");
    assert_eq!(total, 2);

    // LIKE wildcards in the filter match literally.
    let wildcard = UserFilter {
        email: Some("%".into()),
        ..Default::default()
    };
    let (users, total) = store
        .list_users(&wildcard, Page { offset: 0, limit: 10 })
        .await
        .expect("list");
    assert_eq!(total, 1);
    assert_eq!(users[0].email, "odd_one%@other.example");
}

fn api_key(user_id: Uuid, hash: &str) -> ApiKey {
    ApiKey {
        id: Uuid::new_v4(),
        user_id,
        name: "ci".into(),
        prefix: "rck_0123".into(),
        key_hash: hash.into(),
        scopes: Scopes::NEW_KEY_DEFAULT,
        created_at: Utc::now(),
        last_used_at: None,
        revoked_at: None,
    }
}

async fn api_keys_are_listed_used_and_revoked(store: Arc<dyn AccountStore>) {
    let owner = store.create_user(new_user("keys@example.com")).await.expect("create");
    let other = store.create_user(new_user("other@example.com")).await.expect("create");
    let key = ApiKey {
        scopes: Scopes::of(&[Scope::Ingest, Scope::Admin]),
        ..api_key(owner.id, "hash-1")
    };
    store.insert_api_key(&key).await.expect("insert");
    store
        .insert_api_key(&api_key(owner.id, "hash-2"))
        .await
        .expect("insert");
    assert_eq!(store.list_api_keys(owner.id).await.expect("list").len(), 2);
    assert!(store.list_api_keys(other.id).await.expect("list").is_empty());

    let used = store.use_api_key("hash-1").await.expect("use").expect("live key");
    assert_eq!(used.user_id, owner.id);
    assert_eq!(used.scopes, key.scopes, "the scopes are kept");
    let mut listed: Vec<Scopes> = store
        .list_api_keys(owner.id)
        .await
        .expect("list")
        .iter()
        .map(|k| k.scopes)
        .collect();
    listed.sort_by_key(|s| s.to_stored());
    assert_eq!(listed, vec![Scopes::NEW_KEY_DEFAULT, key.scopes]);
    assert!(used.last_used_at.is_some());
    assert!(store.use_api_key("no-such-hash").await.expect("use").is_none());

    assert!(
        !store.revoke_api_key(other.id, key.id).await.expect("revoke"),
        "only the owner revokes"
    );
    assert!(store.revoke_api_key(owner.id, key.id).await.expect("revoke"));
    assert!(
        !store.revoke_api_key(owner.id, key.id).await.expect("revoke"),
        "revoking twice is a no-op"
    );
    assert!(
        store.use_api_key("hash-1").await.expect("use").is_none(),
        "revoked keys stop working"
    );
    assert_eq!(store.list_api_keys(owner.id).await.expect("list").len(), 1);
}

fn refresh(user_id: Uuid, family_id: Uuid, hash: &str, ttl_secs: i64) -> RefreshToken {
    let now = Utc::now();
    RefreshToken {
        id: Uuid::new_v4(),
        user_id,
        family_id,
        token_hash: hash.into(),
        issued_at: now,
        expires_at: now + Duration::seconds(ttl_secs),
    }
}

async fn refresh_tokens_rotate_once_and_reuse_revokes_the_family(store: Arc<dyn AccountStore>) {
    let user = store.create_user(new_user("rt@example.com")).await.expect("create");
    let family = Uuid::new_v4();
    store
        .insert_refresh_token(&refresh(user.id, family, "t1", 3600))
        .await
        .expect("insert");
    assert_eq!(
        store.consume_refresh_token("t1", Utc::now()).await.expect("consume"),
        RefreshOutcome::Rotated {
            user_id: user.id,
            family_id: family
        }
    );
    // The rotated successor is live until t1 is presented again.
    store
        .insert_refresh_token(&refresh(user.id, family, "t2", 3600))
        .await
        .expect("insert");
    assert_eq!(
        store.consume_refresh_token("t1", Utc::now()).await.expect("consume"),
        RefreshOutcome::Reused { family_id: family }
    );
    assert_eq!(
        store.consume_refresh_token("t2", Utc::now()).await.expect("consume"),
        RefreshOutcome::Reused { family_id: family },
        "reuse revokes the whole family"
    );
    assert!(
        store.refresh_family_revoked(family).await.expect("read"),
        "the login ended"
    );
    assert_eq!(
        store.consume_refresh_token("nope", Utc::now()).await.expect("consume"),
        RefreshOutcome::Unknown
    );

    store
        .insert_refresh_token(&refresh(user.id, Uuid::new_v4(), "old", -10))
        .await
        .expect("insert");
    assert_eq!(
        store.consume_refresh_token("old", Utc::now()).await.expect("consume"),
        RefreshOutcome::Expired
    );

    let other_family = Uuid::new_v4();
    store
        .insert_refresh_token(&refresh(user.id, other_family, "t3", 3600))
        .await
        .expect("insert");
    store
        .insert_refresh_token(&refresh(user.id, other_family, "t4", 3600))
        .await
        .expect("insert");
    assert!(
        !store.refresh_family_revoked(other_family).await.expect("read"),
        "a login going on"
    );
    assert_eq!(
        store.revoke_refresh_family_of("t3").await.expect("logout"),
        Some(other_family)
    );
    assert!(store.refresh_family_revoked(other_family).await.expect("read"));
    assert_eq!(store.revoke_refresh_family_of("nope").await.expect("logout"), None);
    assert!(!store.refresh_family_revoked(Uuid::new_v4()).await.expect("read"));
    assert!(matches!(
        store.consume_refresh_token("t3", Utc::now()).await.expect("consume"),
        RefreshOutcome::Reused { .. }
    ));
}

async fn concurrent_refreshes_of_one_token_rotate_exactly_once(store: Arc<dyn AccountStore>) {
    let user = store.create_user(new_user("race@example.com")).await.expect("create");
    store
        .insert_refresh_token(&refresh(user.id, Uuid::new_v4(), "race", 3600))
        .await
        .expect("insert");
    let attempts = (0..16).map(|_| {
        let store = store.clone();
        async move { store.consume_refresh_token("race", Utc::now()).await.expect("consume") }
    });
    let outcomes = futures_util::future::join_all(attempts).await;
    let rotated = outcomes
        .iter()
        .filter(|o| matches!(o, RefreshOutcome::Rotated { .. }))
        .count();
    assert_eq!(rotated, 1, "{outcomes:?}");
}

async fn settings_and_audit_entries_round_trip(store: Arc<dyn AccountStore>) {
    assert!(store.get_setting("subscription_limits").await.expect("get").is_none());
    store
        .put_setting("subscription_limits", &json!({"free": {"messages": 10}}))
        .await
        .expect("put");
    store
        .put_setting("subscription_limits", &json!({"free": {"messages": 12}}))
        .await
        .expect("overwrite");
    assert_eq!(
        store.get_setting("subscription_limits").await.expect("get"),
        Some(json!({"free": {"messages": 12}}))
    );

    let actor = Uuid::new_v4();
    let target = Uuid::new_v4();
    for action in ["user.update", "user.deactivate"] {
        store
            .record_audit(&AuditEntry {
                id: Uuid::new_v4(),
                actor_id: actor,
                action: action.into(),
                target_id: Some(target),
                details: json!({"changes": {"is_active": {"from": true, "to": false}}}),
                created_at: Utc::now(),
            })
            .await
            .expect("audit");
    }
    let entries = store.audit_for(target).await.expect("audit list");
    assert_eq!(
        entries.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["user.update", "user.deactivate"]
    );
    assert_eq!(entries[0].actor_id, actor);
    assert_eq!(entries[0].details["changes"]["is_active"]["to"], json!(false));
}

async fn organizations_round_trip(store: Arc<dyn AccountStore>) {
    let org = store.create_organization("Acme").await.expect("org");
    let found = store.organization(org.id).await.expect("get").expect("found");
    assert_eq!(found.name, "Acme");
    let mut u = new_user("member@acme.example");
    u.organization_id = Some(org.id);
    let member = store.create_user(u).await.expect("create");
    assert_eq!(member.organization_id, Some(org.id));
}

/// A database whose API keys were made before keys had scopes: after the
/// migration they may do what they could before, less the admin routes.
async fn keys_made_before_scopes_keep_chat_search_and_ingest(url: String, backend: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    let mut before = sqlx::migrate::Migrator::new(dir).await.expect("migrations");
    let all = before.migrations.len();
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| !m.description.contains("api key scopes"))
        .cloned()
        .collect::<Vec<_>>()
        .into();
    assert_eq!(before.migrations.len(), all - 1, "the scopes migration is one file");
    let (user_id, key_id) = (Uuid::new_v4(), Uuid::new_v4());
    let now = Utc::now();
    // The rows as the previous version wrote them.
    let user_sql = "INSERT INTO users (id, email, hashed_password, subscription_plan, created_at, updated_at) \
                    VALUES ($1, 'old@example.com', 'x', 'pro', $2, $2)";
    let key_sql = "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, created_at) \
                   VALUES ($1, $2, 'old', 'rck_0ld', 'old-hash', $3)";
    if backend == "postgres" {
        let pool = sqlx::PgPool::connect(&url).await.expect("connect");
        before.run(&pool).await.expect("old migrations");
        sqlx::query(user_sql)
            .bind(user_id)
            .bind(now)
            .execute(&pool)
            .await
            .expect("user");
        sqlx::query(key_sql)
            .bind(key_id)
            .bind(user_id)
            .bind(now)
            .execute(&pool)
            .await
            .expect("key");
        pool.close().await;
    } else {
        let options = url
            .parse::<sqlx::sqlite::SqliteConnectOptions>()
            .expect("url")
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.expect("connect");
        before.run(&pool).await.expect("old migrations");
        sqlx::query(user_sql)
            .bind(user_id)
            .bind(now)
            .execute(&pool)
            .await
            .expect("user");
        sqlx::query(key_sql)
            .bind(key_id)
            .bind(user_id)
            .bind(now)
            .execute(&pool)
            .await
            .expect("key");
        pool.close().await;
    }
    // Starting the new version migrates the database.
    let store = connect(&url).await;
    let key = store
        .use_api_key("old-hash")
        .await
        .expect("use")
        .expect("the key still works");
    assert_eq!(key.id, key_id);
    assert_eq!(key.scopes, Scopes::LEGACY_KEY);
    assert!(!key.scopes.contains(Scope::Admin));
    assert_eq!(
        store.list_api_keys(user_id).await.expect("list")[0].scopes,
        Scopes::LEGACY_KEY
    );
}

#[actix_web::test]
async fn keys_made_before_scopes_keep_chat_search_and_ingest_on_sqlite() {
    let dir = std::env::temp_dir().join("ragchat-tests");
    let _ = std::fs::create_dir_all(&dir);
    let url = format!("sqlite:{}", dir.join(format!("{}.db", Uuid::new_v4())).display());
    keys_made_before_scopes_keep_chat_search_and_ingest(url, "sqlite").await;
}

#[actix_web::test]
async fn keys_made_before_scopes_keep_chat_search_and_ingest_on_postgres() {
    if let Some(url) = fresh_postgres_url().await {
        keys_made_before_scopes_keep_chat_search_and_ingest(url, "postgres").await;
    }
}
