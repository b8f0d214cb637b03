//! The account store, written once for both SQL backends.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use ragchat_actors::domain::{
    ApiKey, AuditEntry, NewUser, Organization, Page, RefreshOutcome, RefreshToken, Scopes, User, UserFilter, UserPatch,
};
use ragchat_actors::plans::Plan;
use ragchat_actors::ports::{AccountStore, StoreError, StoreResult};
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use super::store_error;

const USER_COLUMNS: &str = "id, email, hashed_password, full_name, is_active, is_verified, is_superuser, \
     subscription_plan, organization_id, preferences, created_at, updated_at";
const KEY_COLUMNS: &str = "id, user_id, name, prefix, key_hash, scopes, created_at, last_used_at, revoked_at";

/// Escapes LIKE wildcards so a filter matches literally (used with ESCAPE '\').
fn like_pattern(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('%');
    for c in s.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

macro_rules! sql_accounts {
    ($store:ident, $db:ty, $row:ty, $backend:literal) => {
        #[derive(Clone)]
        pub struct $store {
            pub(super) pool: sqlx::Pool<$db>,
        }

        impl $store {
            pub fn new(pool: sqlx::Pool<$db>) -> Self {
                Self { pool }
            }

            pub fn pool(&self) -> &sqlx::Pool<$db> {
                &self.pool
            }

            fn user(row: &$row) -> StoreResult<User> {
                let plan: String = row.try_get("subscription_plan").map_err(store_error)?;
                let preferences: Json<serde_json::Value> = row.try_get("preferences").map_err(store_error)?;
                Ok(User {
                    id: row.try_get("id").map_err(store_error)?,
                    email: row.try_get("email").map_err(store_error)?,
                    hashed_password: row.try_get("hashed_password").map_err(store_error)?,
                    full_name: row.try_get("full_name").map_err(store_error)?,
                    is_active: row.try_get("is_active").map_err(store_error)?,
                    is_verified: row.try_get("is_verified").map_err(store_error)?,
                    is_superuser: row.try_get("is_superuser").map_err(store_error)?,
                    subscription_plan: plan.parse::<Plan>().map_err(|e| StoreError::Internal(e.to_string()))?,
                    organization_id: row.try_get("organization_id").map_err(store_error)?,
                    preferences: preferences.0,
                    created_at: row.try_get("created_at").map_err(store_error)?,
                    updated_at: row.try_get("updated_at").map_err(store_error)?,
                })
            }

            fn api_key(row: &$row) -> StoreResult<ApiKey> {
                Ok(ApiKey {
                    id: row.try_get("id").map_err(store_error)?,
                    user_id: row.try_get("user_id").map_err(store_error)?,
                    name: row.try_get("name").map_err(store_error)?,
                    prefix: row.try_get("prefix").map_err(store_error)?,
                    key_hash: row.try_get("key_hash").map_err(store_error)?,
                    scopes: Scopes::from_stored(&row.try_get::<String, _>("scopes").map_err(store_error)?),
                    created_at: row.try_get("created_at").map_err(store_error)?,
                    last_used_at: row.try_get("last_used_at").map_err(store_error)?,
                    revoked_at: row.try_get("revoked_at").map_err(store_error)?,
                })
            }

            fn audit(row: &$row) -> StoreResult<AuditEntry> {
                let details: Json<serde_json::Value> = row.try_get("details").map_err(store_error)?;
                Ok(AuditEntry {
                    id: row.try_get("id").map_err(store_error)?,
                    actor_id: row.try_get("actor_id").map_err(store_error)?,
                    action: row.try_get("action").map_err(store_error)?,
                    target_id: row.try_get("target_id").map_err(store_error)?,
                    details: details.0,
                    created_at: row.try_get("created_at").map_err(store_error)?,
                })
            }
        }

        #[async_trait]
        impl AccountStore for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn ping(&self) -> StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await.map_err(store_error)?;
                Ok(())
            }

            async fn create_organization(&self, name: &str) -> StoreResult<Organization> {
                let org = Organization { id: Uuid::new_v4(), name: name.to_string(), created_at: Utc::now() };
                sqlx::query("INSERT INTO organizations (id, name, created_at) VALUES ($1, $2, $3)")
                    .bind(org.id)
                    .bind(&org.name)
                    .bind(org.created_at)
                    .execute(&self.pool)
                    .await
                    .map_err(store_error)?;
                Ok(org)
            }

            async fn organization(&self, id: Uuid) -> StoreResult<Option<Organization>> {
                let row = sqlx::query("SELECT id, name, created_at FROM organizations WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(store_error)?;
                row.map(|r| {
                    Ok(Organization {
                        id: r.try_get("id").map_err(store_error)?,
                        name: r.try_get("name").map_err(store_error)?,
                        created_at: r.try_get("created_at").map_err(store_error)?,
                    })
                })
                .transpose()
            }

            async fn create_user(&self, user: NewUser) -> StoreResult<User> {
                let now = Utc::now();
                let sql = format!(
                    "INSERT INTO users (id, email, hashed_password, full_name, is_active, is_verified, is_superuser, \
                     subscription_plan, organization_id, preferences, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, TRUE, $5, $6, $7, $8, $9, $10, $10) RETURNING {USER_COLUMNS}"
                );
                let row = sqlx::query(&sql)
                    .bind(Uuid::new_v4())
                    .bind(user.email.as_str())
                    .bind(&user.hashed_password)
                    .bind(&user.full_name)
                    .bind(user.is_verified)
                    .bind(user.is_superuser)
                    .bind(user.subscription_plan.as_str())
                    .bind(user.organization_id)
                    .bind(Json(serde_json::json!({})))
                    .bind(now)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| match store_error(e) {
                        StoreError::Conflict(_) => StoreError::Conflict("email already registered".into()),
                        other => other,
                    })?;
                Self::user(&row)
            }

            async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>> {
                let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
                let row = sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await.map_err(store_error)?;
                row.as_ref().map(Self::user).transpose()
            }

            async fn user_by_email(&self, email: &str) -> StoreResult<Option<User>> {
                let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE email = $1");
                let row = sqlx::query(&sql)
                    .bind(email.trim().to_lowercase())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(store_error)?;
                row.as_ref().map(Self::user).transpose()
            }

            async fn list_users(&self, filter: &UserFilter, page: Page) -> StoreResult<(Vec<User>, u64)> {
                let pattern = filter.email.as_deref().map(like_pattern);
                let plan = filter.plan.map(|p| p.as_str());
                let cond = "($1 IS NULL OR LOWER(email) LIKE $1 ESCAPE '\\') AND ($2 IS NULL OR subscription_plan = $2)";
                let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM users WHERE {cond}"))
                    .bind(&pattern)
                    .bind(plan)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(store_error)?;
                let sql = format!(
                    "SELECT {USER_COLUMNS} FROM users WHERE {cond} ORDER BY created_at, id LIMIT $3 OFFSET $4"
                );
                let rows = sqlx::query(&sql)
                    .bind(&pattern)
                    .bind(plan)
                    .bind(i64::from(page.limit))
                    .bind(i64::from(page.offset))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(store_error)?;
                let users = rows.iter().map(Self::user).collect::<StoreResult<Vec<_>>>()?;
                Ok((users, u64::try_from(total).unwrap_or(0)))
            }

            async fn update_user(&self, id: Uuid, patch: &UserPatch) -> StoreResult<User> {
                let sql = format!(
                    "UPDATE users SET subscription_plan = COALESCE($2, subscription_plan), \
                     is_active = COALESCE($3, is_active), is_superuser = COALESCE($4, is_superuser), \
                     updated_at = $5 WHERE id = $1 RETURNING {USER_COLUMNS}"
                );
                let row = sqlx::query(&sql)
                    .bind(id)
                    .bind(patch.subscription_plan.map(|p| p.as_str()))
                    .bind(patch.is_active)
                    .bind(patch.is_superuser)
                    .bind(Utc::now())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(store_error)?;
                match row {
                    Some(r) => Self::user(&r),
                    None => Err(StoreError::NotFound),
                }
            }

            async fn insert_api_key(&self, key: &ApiKey) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, scopes, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(key.id)
                .bind(key.user_id)
                .bind(&key.name)
                .bind(&key.prefix)
                .bind(&key.key_hash)
                .bind(key.scopes.to_stored())
                .bind(key.created_at)
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(())
            }

            async fn list_api_keys(&self, user_id: Uuid) -> StoreResult<Vec<ApiKey>> {
                let sql = format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL \
                     ORDER BY created_at DESC, id"
                );
                let rows = sqlx::query(&sql).bind(user_id).fetch_all(&self.pool).await.map_err(store_error)?;
                rows.iter().map(Self::api_key).collect()
            }

            async fn revoke_api_key(&self, user_id: Uuid, key_id: Uuid) -> StoreResult<bool> {
                let done = sqlx::query(
                    "UPDATE api_keys SET revoked_at = $3 WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
                )
                .bind(key_id)
                .bind(user_id)
                .bind(Utc::now())
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(done.rows_affected() > 0)
            }

            async fn use_api_key(&self, key_hash: &str) -> StoreResult<Option<ApiKey>> {
                let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL");
                let row = sqlx::query(&sql).bind(key_hash).fetch_optional(&self.pool).await.map_err(store_error)?;
                let Some(mut key) = row.as_ref().map(Self::api_key).transpose()? else { return Ok(None) };
                // Authentication is a hot path: last_used_at is written at most once a
                // minute per key, not on every request.
                let now = Utc::now();
                if key.last_used_at.is_none_or(|t| now - t > chrono::Duration::seconds(60)) {
                    sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
                        .bind(key.id)
                        .bind(now)
                        .execute(&self.pool)
                        .await
                        .map_err(store_error)?;
                    key.last_used_at = Some(now);
                }
                Ok(Some(key))
            }

            async fn insert_refresh_token(&self, t: &RefreshToken) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO refresh_tokens (id, user_id, family_id, token_hash, issued_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(t.id)
                .bind(t.user_id)
                .bind(t.family_id)
                .bind(&t.token_hash)
                .bind(t.issued_at)
                .bind(t.expires_at)
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(())
            }

            async fn consume_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<RefreshOutcome> {
                // The conditional UPDATE is the atomic step: of two concurrent refreshes
                // with the same token exactly one sees the row still unused.
                let consumed = sqlx::query(
                    "UPDATE refresh_tokens SET used_at = $2 \
                     WHERE token_hash = $1 AND used_at IS NULL AND revoked_at IS NULL \
                     RETURNING user_id, family_id, expires_at",
                )
                .bind(token_hash)
                .bind(now)
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
                if let Some(row) = consumed {
                    let expires_at: DateTime<Utc> = row.try_get("expires_at").map_err(store_error)?;
                    if expires_at <= now {
                        return Ok(RefreshOutcome::Expired);
                    }
                    return Ok(RefreshOutcome::Rotated {
                        user_id: row.try_get("user_id").map_err(store_error)?,
                        family_id: row.try_get("family_id").map_err(store_error)?,
                    });
                }
                let known = sqlx::query("SELECT family_id FROM refresh_tokens WHERE token_hash = $1")
                    .bind(token_hash)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(store_error)?;
                let Some(row) = known else { return Ok(RefreshOutcome::Unknown) };
                let family_id: Uuid = row.try_get("family_id").map_err(store_error)?;
                sqlx::query("UPDATE refresh_tokens SET revoked_at = $2 WHERE family_id = $1 AND revoked_at IS NULL")
                    .bind(family_id)
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(store_error)?;
                Ok(RefreshOutcome::Reused { family_id })
            }

            async fn revoke_refresh_family_of(&self, token_hash: &str) -> StoreResult<Option<Uuid>> {
                let family: Option<Uuid> =
                    sqlx::query_scalar("SELECT family_id FROM refresh_tokens WHERE token_hash = $1")
                        .bind(token_hash)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(store_error)?;
                let Some(family_id) = family else { return Ok(None) };
                sqlx::query("UPDATE refresh_tokens SET revoked_at = $2 WHERE family_id = $1 AND revoked_at IS NULL")
                    .bind(family_id)
                    .bind(Utc::now())
                    .execute(&self.pool)
                    .await
                    .map_err(store_error)?;
                Ok(Some(family_id))
            }

            async fn refresh_family_revoked(&self, family_id: Uuid) -> StoreResult<bool> {
                // Logout and reuse revoke every token of the family at once, so one
                // revoked row is enough (refresh_tokens_family_idx serves it).
                let revoked: Option<i32> = sqlx::query_scalar(
                    "SELECT 1 FROM refresh_tokens WHERE family_id = $1 AND revoked_at IS NOT NULL LIMIT 1",
                )
                .bind(family_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(revoked.is_some())
            }

            async fn get_setting(&self, key: &str) -> StoreResult<Option<serde_json::Value>> {
                let value: Option<Json<serde_json::Value>> =
                    sqlx::query_scalar("SELECT value FROM system_settings WHERE key = $1")
                        .bind(key)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(store_error)?;
                Ok(value.map(|v| v.0))
            }

            async fn put_setting(&self, key: &str, value: &serde_json::Value) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO system_settings (key, value, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                )
                .bind(key)
                .bind(Json(value))
                .bind(Utc::now())
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(())
            }

            async fn record_audit(&self, e: &AuditEntry) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO audit_log (id, actor_id, action, target_id, details, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(e.id)
                .bind(e.actor_id)
                .bind(&e.action)
                .bind(e.target_id)
                .bind(Json(&e.details))
                .bind(e.created_at)
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(())
            }

            async fn audit_for(&self, target_id: Uuid) -> StoreResult<Vec<AuditEntry>> {
                let rows = sqlx::query(
                    "SELECT id, actor_id, action, target_id, details, created_at FROM audit_log \
                     WHERE target_id = $1 ORDER BY created_at, id",
                )
                .bind(target_id)
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
                rows.iter().map(Self::audit).collect()
            }
        }
    };
}

sql_accounts!(SqliteAccountStore, sqlx::Sqlite, sqlx::sqlite::SqliteRow, "sqlite");
sql_accounts!(PostgresAccountStore, sqlx::Postgres, sqlx::postgres::PgRow, "postgres");
