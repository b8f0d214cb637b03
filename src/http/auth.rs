//! /auth: registration, login, token refresh and logout, the current user, API keys.

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Duration, Utc};
use ragchat_actors::admission::ratelimit::Quota;
use ragchat_actors::domain::{ApiKey, Email, NewUser, RefreshOutcome, RefreshToken, Scope, Scopes};
use ragchat_actors::plans::Plan;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::extractors::{access, client_address, CurrentUser, PasswordSession, Scoped};
use super::views::UserView;
use super::AppState;
use crate::auth::passwords::{Busy, MAX_PASSWORD_LEN, MIN_PASSWORD_LEN};
use crate::auth::{new_api_key, new_refresh_token, token_digest};
use crate::config::RateLimit;
use crate::error::{ApiError, ErrorBody, ErrorCode};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/auth/register").route(web::post().to(register)))
        .service(web::resource("/auth/login").route(web::post().to(login)))
        .service(web::resource("/auth/refresh").route(web::post().to(refresh)))
        .service(web::resource("/auth/logout").route(web::post().to(logout)))
        .service(web::resource("/auth/me").route(web::get().to(me)))
        .service(
            web::resource("/auth/api-keys")
                .route(web::post().to(create_api_key))
                .route(web::get().to(list_api_keys)),
        )
        .service(web::resource("/auth/api-keys/{key_id}").route(web::delete().to(delete_api_key)));
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterRequest {
    #[schema(example = "alice@example.com")]
    pub email: String,
    #[schema(example = "a long passphrase")]
    pub password: String,
    pub full_name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    #[schema(example = "bearer")]
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    pub refresh_token: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateApiKeyRequest {
    #[schema(example = "CI pipeline")]
    pub name: String,
    /// What the key may do: `chat` (/chat/*, /ws/chat, /v1/chat/completions),
    /// `search` (/knowledge/search, /v1/embeddings, reading documents), `ingest`
    /// (adding and deleting documents), `admin` (/admin/*, /metrics; superusers
    /// only). Default: `["chat", "search"]`.
    #[schema(example = json!(["chat", "search"]))]
    pub scopes: Option<Vec<String>>,
}

/// An API key as listed: never the key itself.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyView {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    /// What the key may do.
    pub scopes: Vec<Scope>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A new API key: `key` is shown this once and cannot be recovered.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedApiKey {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub key: String,
    pub scopes: Vec<Scope>,
    pub created_at: DateTime<Utc>,
}

impl From<ApiKey> for ApiKeyView {
    fn from(k: ApiKey) -> Self {
        ApiKeyView {
            id: k.id,
            name: k.name,
            prefix: k.prefix,
            scopes: k.scopes.iter().collect(),
            created_at: k.created_at,
            last_used_at: k.last_used_at,
        }
    }
}

fn check_password(password: &str) -> Result<(), ApiError> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_LEN {
        return Err(ApiError::Unprocessable(format!(
            "Password must be at least {MIN_PASSWORD_LEN} characters"
        )));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(ApiError::Unprocessable(format!(
            "Password must be at most {MAX_PASSWORD_LEN} bytes"
        )));
    }
    Ok(())
}

/// Creates a user account on the free plan.
#[utoipa::path(post, path = "/auth/register", tag = "auth", request_body = RegisterRequest,
    responses((status = 201, body = UserView),
        (status = 409, body = ErrorBody, description = "Email already registered"),
              (status = 422, body = ErrorBody, description = "Invalid e-mail or password"),
              (status = 429, body = ErrorBody, description = "Too many registrations from this address"),
              (status = 503, body = ErrorBody, description = "Password hashing is busy")))]
pub async fn register(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<RegisterRequest>,
) -> Result<HttpResponse, ApiError> {
    let address = client_address(&req, &state.settings.server.client_ip_header);
    let limit = state.settings.auth.register_per_address;
    throttle(
        &state,
        format!("register:ip:{address}"),
        limit,
        "registrations from this address",
    )
    .await?;
    let body = body.into_inner();
    let email = Email::parse(&body.email).map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    check_password(&body.password)?;
    let full_name = body.full_name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
    if full_name.as_ref().is_some_and(|n| n.chars().count() > 200) {
        return Err(ApiError::Unprocessable(
            "full_name must be at most 200 characters".into(),
        ));
    }
    let hashed_password = hash_password(&state, body.password).await?;
    let user = state
        .accounts
        .create_user(NewUser {
            email,
            hashed_password,
            full_name,
            is_superuser: false,
            is_verified: false,
            subscription_plan: Plan::Free,
            organization_id: None,
        })
        .await
        .map_err(|e| match e {
            ragchat_actors::ports::StoreError::Conflict(_) => {
                ApiError::Conflict("Email already registered".into()).with_code(ErrorCode::EmailTaken)
            }
            other => other.into(),
        })?;
    Ok(HttpResponse::Created().json(UserView::from(user)))
}

/// Hashes off the async executor: argon2 takes tens of milliseconds of CPU.
pub async fn hash_password(state: &AppState, password: String) -> Result<String, ApiError> {
    let hasher = state.passwords.clone();
    state
        .hash_pool
        .run(move || hasher.hash(&password))
        .await
        .map_err(hashing_busy)?
        .map_err(ApiError::internal)
}

/// The hashing queue is full: try again in a moment.
fn hashing_busy(_: Busy) -> ApiError {
    ApiError::Unavailable("Too many sign-ins at once: retry in a moment".into())
}

/// A new pair for the login `family_id`: the access token carries it (`sid`), so
/// it stops working when that login ends.
async fn issue_tokens(state: &AppState, user_id: Uuid, family_id: Uuid) -> Result<TokenResponse, ApiError> {
    let access_token = state.tokens.issue(user_id, family_id).map_err(ApiError::internal)?;
    let refresh_token = new_refresh_token();
    let now = Utc::now();
    let ttl = i64::try_from(state.tokens.refresh_ttl_secs).unwrap_or(i64::MAX / 4);
    state
        .accounts
        .insert_refresh_token(&RefreshToken {
            id: Uuid::new_v4(),
            user_id,
            family_id,
            token_hash: token_digest(&refresh_token),
            issued_at: now,
            expires_at: now + Duration::seconds(ttl),
        })
        .await?;
    Ok(TokenResponse {
        access_token,
        token_type: "bearer".into(),
        expires_in: state.tokens.access_ttl_secs,
        refresh_token,
    })
}

/// Exchanges e-mail and password for an access token and a refresh token.
///
/// An unknown e-mail and a wrong password get the same answer in about the same time.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = TokenResponse),
        (status = 401, body = ErrorBody, description = "Incorrect email or password"),
              (status = 403, body = ErrorBody, description = "User account is deactivated"),
              (status = 429, body = ErrorBody, description = "Too many sign-in attempts (account or address)"),
              (status = 503, body = ErrorBody, description = "Password hashing is busy")))]
pub async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<LoginRequest>,
) -> Result<web::Json<TokenResponse>, ApiError> {
    let LoginRequest { email, password } = body.into_inner();
    // Attempts are counted before any password is checked: a throttled account is
    // refused even with the right one, and costs no hashing.
    let a = &state.settings.auth;
    let address = client_address(&req, &state.settings.server.client_ip_header);
    throttle(
        &state,
        format!("login:ip:{address}"),
        a.login_per_address,
        "sign-in attempts from this address",
    )
    .await?;
    let account: String = email.trim().to_lowercase().chars().take(254).collect();
    throttle(
        &state,
        format!("login:acct:{account}"),
        a.login_per_account,
        "sign-in attempts for this account",
    )
    .await?;
    let user = if email.len() <= 254 {
        state.accounts.user_by_email(&email).await?
    } else {
        None
    };
    let hasher = state.passwords.clone();
    let stored = user.as_ref().map(|u| u.hashed_password.clone());
    // Over-long passwords are refused after the same amount of work as a wrong one.
    let password = if password.len() > MAX_PASSWORD_LEN {
        String::new()
    } else {
        password
    };
    let ok = state
        .hash_pool
        .run(move || hasher.verify(&password, stored.as_deref()))
        .await
        .map_err(hashing_busy)?;
    let user = match user {
        Some(u) if ok => u,
        _ => {
            return Err(
                ApiError::Unauthorized("Incorrect email or password".into()).with_code(ErrorCode::InvalidCredentials)
            )
        }
    };
    if !user.is_active {
        return Err(ApiError::Forbidden("User account is deactivated".into()).with_code(ErrorCode::AccountDeactivated));
    }
    Ok(web::Json(issue_tokens(&state, user.id, Uuid::new_v4()).await?))
}

/// One attempt under a throttle key; 429 with Retry-After when there were too many.
async fn throttle(state: &AppState, key: String, limit: RateLimit, what: &str) -> Result<(), ApiError> {
    let quota = Quota {
        limit: limit.limit,
        period_ms: limit.period_secs.saturating_mul(1000),
    };
    let d = state.throttle.check(&key, quota).await;
    if d.allowed {
        return Ok(());
    }
    crate::telemetry::record_throttled(&key);
    let retry = d.retry_after_ms.div_ceil(1000).max(1);
    Err(ApiError::TooManyRequests {
        detail: json!(format!("Too many {what}: retry in {retry} seconds")),
        headers: vec![("Retry-After", retry.to_string())],
    })
}

fn invalid_refresh(detail: &str) -> ApiError {
    ApiError::Unauthorized(detail.into()).with_code(ErrorCode::InvalidRefreshToken)
}

/// Rotates a refresh token: the old one is spent, a new pair is returned.
///
/// Presenting a spent token again revokes every token of that login (its family).
#[utoipa::path(post, path = "/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = TokenResponse),
        (status = 401, body = ErrorBody, description = "Invalid, expired or reused refresh token")))]
pub async fn refresh(
    state: web::Data<AppState>,
    body: web::Json<RefreshRequest>,
) -> Result<web::Json<TokenResponse>, ApiError> {
    let outcome = state
        .accounts
        .consume_refresh_token(&token_digest(&body.refresh_token), Utc::now())
        .await?;
    let (user_id, family_id) = match outcome {
        RefreshOutcome::Rotated { user_id, family_id } => (user_id, family_id),
        RefreshOutcome::Reused { family_id } => {
            tracing::warn!(%family_id, "refresh token reuse: family revoked");
            state.logins.end(family_id);
            return Err(ApiError::Unauthorized(
                "Refresh token already used: all sessions of this login were revoked, please log in again".into(),
            )
            .with_code(ErrorCode::InvalidRefreshToken));
        }
        RefreshOutcome::Expired => return Err(invalid_refresh("Refresh token has expired")),
        RefreshOutcome::Unknown => return Err(invalid_refresh("Invalid refresh token")),
    };
    let user = state
        .accounts
        .user_by_id(user_id)
        .await?
        .ok_or_else(|| invalid_refresh("Invalid refresh token"))?;
    if !user.is_active {
        return Err(ApiError::Forbidden("User account is deactivated".into()).with_code(ErrorCode::AccountDeactivated));
    }
    Ok(web::Json(issue_tokens(&state, user.id, family_id).await?))
}

/// Ends the login: revokes the refresh token and every token rotated from it,
/// and the login's access tokens stop working (at once on this server, within
/// `auth.login_cache_ms` on others; its WebSockets close within
/// `chat.ws_auth_check_secs`). Always 204, so it cannot be used to probe tokens.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", request_body = RefreshRequest,
    responses((status = 204, description = "Logged out")))]
pub async fn logout(state: web::Data<AppState>, body: web::Json<RefreshRequest>) -> Result<HttpResponse, ApiError> {
    if let Some(family_id) = state
        .accounts
        .revoke_refresh_family_of(&token_digest(&body.refresh_token))
        .await?
    {
        state.logins.end(family_id);
    }
    Ok(HttpResponse::NoContent().finish())
}

/// The authenticated user.
#[utoipa::path(get, path = "/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "A deactivated account")))]
pub async fn me(current: Scoped<access::Account>) -> web::Json<UserView> {
    web::Json(current.into_inner().user.into())
}

/// Creates an API key with the scopes asked for (default `chat` and `search`).
/// The key is in this response only; store it now.
#[utoipa::path(post, path = "/auth/api-keys", tag = "auth", security(("bearer" = [])), request_body = CreateApiKeyRequest,
    responses((status = 201, body = CreatedApiKey), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Called with an API key, or the `admin` scope asked for by a non-superuser"),
        (status = 422, body = ErrorBody, description = "Bad name, or an unknown or empty list of scopes")))]
pub async fn create_api_key(
    PasswordSession(current): PasswordSession,
    state: web::Data<AppState>,
    body: web::Json<CreateApiKeyRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let name = body.name.trim().to_string();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::Unprocessable("name must be 1 to 100 characters".into()));
    }
    let scopes = requested_scopes(&current, body.scopes)?;
    let key = new_api_key();
    let record = ApiKey {
        id: Uuid::new_v4(),
        user_id: current.user.id,
        name,
        prefix: key.chars().take(12).collect(),
        key_hash: token_digest(&key),
        scopes,
        created_at: Utc::now(),
        last_used_at: None,
        revoked_at: None,
    };
    state.accounts.insert_api_key(&record).await?;
    Ok(HttpResponse::Created().json(CreatedApiKey {
        id: record.id,
        name: record.name,
        prefix: record.prefix,
        key,
        scopes: record.scopes.iter().collect(),
        created_at: record.created_at,
    }))
}

/// The scopes a new key asks for: known names, at least one, and `admin` only
/// for a superuser.
fn requested_scopes(current: &CurrentUser, asked: Option<Vec<String>>) -> Result<Scopes, ApiError> {
    let Some(names) = asked else {
        return Ok(Scopes::NEW_KEY_DEFAULT);
    };
    let known = || Scope::ALL.map(Scope::as_str).join(", ");
    let mut scopes = Scopes::NONE;
    for name in &names {
        let scope = name.parse::<Scope>().map_err(|_| {
            let shown: String = name.chars().take(40).collect();
            ApiError::Unprocessable(format!("Unknown scope '{shown}': scopes are {}", known()))
        })?;
        scopes = scopes.with(scope);
    }
    if scopes.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "scopes must name at least one of {} (or leave it out for chat and search)",
            known()
        )));
    }
    if scopes.contains(Scope::Admin) && !current.user.is_superuser {
        return Err(
            ApiError::Forbidden("Only superusers can create keys with the 'admin' scope".into())
                .with_code(ErrorCode::AdminRequired),
        );
    }
    Ok(scopes)
}

/// The caller's live API keys (without the keys themselves).
#[utoipa::path(get, path = "/auth/api-keys", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = Vec<ApiKeyView>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Called with an API key")))]
pub async fn list_api_keys(
    PasswordSession(current): PasswordSession,
    state: web::Data<AppState>,
) -> Result<web::Json<Vec<ApiKeyView>>, ApiError> {
    let keys = state.accounts.list_api_keys(current.user.id).await?;
    Ok(web::Json(keys.into_iter().map(ApiKeyView::from).collect()))
}

/// Revokes one of the caller's API keys.
#[utoipa::path(delete, path = "/auth/api-keys/{key_id}", tag = "auth", security(("bearer" = [])),
    params(("key_id" = Uuid, Path, description = "API key id")),
    responses((status = 204), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Called with an API key"),
        (status = 404, body = ErrorBody, description = "No such key")))]
pub async fn delete_api_key(
    PasswordSession(current): PasswordSession,
    state: web::Data<AppState>,
    key_id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    if state
        .accounts
        .revoke_api_key(current.user.id, key_id.into_inner())
        .await?
    {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::NotFound("API key not found".into()).with_code(ErrorCode::ApiKeyNotFound))
    }
}
