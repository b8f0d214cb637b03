//! /admin: user management, upgrade requests, knowledge-base seeding and the supervision tree. The scope is wrapped in `require_admin`; handlers also
//! take `AdminUser`, so each one states its guard in its signature.

use actix_web::web;
use chrono::Utc;
use ragchat_actors::domain::{AuditEntry, Page, UpgradeStatus, UserFilter, UserPatch};
use ragchat_actors::plans::Plan;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::extractors::AdminUser;
use super::views::{UpgradeRequestView, UserView};
use super::AppState;
use crate::error::{ApiError, ErrorBody, ErrorCode};

/// Routes relative to the /admin scope.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/users").route(web::get().to(list_users)))
        .service(web::resource("/users/{user_id}").route(web::patch().to(update_user)))
        .service(web::resource("/users/{user_id}/audit").route(web::get().to(user_audit)))
        .service(web::resource("/upgrade-requests").route(web::get().to(list_upgrade_requests)))
        .service(web::resource("/upgrade-requests/{request_id}/approve").route(web::post().to(approve_upgrade_request)))
        .service(web::resource("/upgrade-requests/{request_id}/reject").route(web::post().to(reject_upgrade_request)))
        .service(web::resource("/seed-enhanced").route(web::post().to(seed_enhanced)))
        .service(web::resource("/seed-status").route(web::get().to(seed_status)))
        .service(web::resource("/actors").route(web::get().to(actors)))
        .service(
            web::resource("/settings/subscription_limits")
                .route(web::get().to(get_subscription_limits))
                .route(web::put().to(put_subscription_limits)),
        );
}

pub const MAX_PAGE_SIZE: u32 = 100;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UserQuery {
    /// Case-insensitive substring of the e-mail address.
    pub email: Option<String>,
    /// free, pro or enterprise.
    pub plan: Option<String>,
    /// 1-based page number (default 1).
    pub page: Option<u32>,
    /// Items per page, 1 to 100 (default 20).
    pub page_size: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserPageView {
    pub items: Vec<UserView>,
    pub total: u64,
    pub page: u32,
    pub page_size: u32,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserRequest {
    #[schema(value_type = Option<String>, example = "pro")]
    pub subscription_plan: Option<String>,
    pub is_active: Option<bool>,
    pub is_superuser: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditView {
    pub id: Uuid,
    pub actor_id: Uuid,
    pub action: String,
    pub target_id: Option<Uuid>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    pub created_at: chrono::DateTime<Utc>,
}

fn parse_plan(raw: &str) -> Result<Plan, ApiError> {
    raw.parse::<Plan>().map_err(|e| ApiError::Unprocessable(e.to_string()))
}

/// A 1-based page and its size (1 to MAX_PAGE_SIZE, default 20) as a store page.
fn page_of(page: Option<u32>, page_size: Option<u32>) -> Result<(u32, u32, Page), ApiError> {
    let page = page.unwrap_or(1);
    let page_size = page_size.unwrap_or(20);
    if page == 0 {
        return Err(ApiError::Unprocessable("page starts at 1".into()));
    }
    if page_size == 0 || page_size > MAX_PAGE_SIZE {
        return Err(ApiError::Unprocessable(format!(
            "page_size must be between 1 and {MAX_PAGE_SIZE}"
        )));
    }
    let offset = (page - 1).saturating_mul(page_size);
    Ok((
        page,
        page_size,
        Page {
            offset,
            limit: page_size,
        },
    ))
}

/// Lists users, filtered by e-mail substring and plan, paged.
#[utoipa::path(get, path = "/admin/users", tag = "admin", security(("bearer" = [])), params(UserQuery),
    responses((status = 200, body = UserPageView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Not a superuser, or an API key without the `admin` scope")))]
pub async fn list_users(
    _admin: AdminUser,
    state: web::Data<AppState>,
    query: web::Query<UserQuery>,
) -> Result<web::Json<UserPageView>, ApiError> {
    let q = query.into_inner();
    let (page, page_size, store_page) = page_of(q.page, q.page_size)?;
    let filter = UserFilter {
        email: q.email.filter(|e| !e.trim().is_empty()).map(|e| e.trim().to_string()),
        plan: q.plan.as_deref().map(parse_plan).transpose()?,
    };
    let (users, total) = state.accounts.list_users(&filter, store_page).await?;
    Ok(web::Json(UserPageView {
        items: users.into_iter().map(UserView::from).collect(),
        total,
        page,
        page_size,
    }))
}

/// Changes a user's plan, active flag or superuser flag. Each change is written to
/// the audit log with who made it and when.
#[utoipa::path(patch, path = "/admin/users/{user_id}", tag = "admin", security(("bearer" = [])),
    params(("user_id" = Uuid, Path, description = "User id")), request_body = UpdateUserRequest,
    responses((status = 200, body = UserView),
        (status = 400, body = ErrorBody, description = "Admins cannot demote or deactivate themselves"),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Not a superuser, or an API key without the `admin` scope"),
        (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn update_user(
    admin: AdminUser,
    state: web::Data<AppState>,
    user_id: web::Path<Uuid>,
    body: web::Json<UpdateUserRequest>,
) -> Result<web::Json<UserView>, ApiError> {
    let user_id = user_id.into_inner();
    let body = body.into_inner();
    let patch = UserPatch {
        subscription_plan: body.subscription_plan.as_deref().map(parse_plan).transpose()?,
        is_active: body.is_active,
        is_superuser: body.is_superuser,
    };
    if patch.is_empty() {
        return Err(ApiError::Unprocessable(
            "Nothing to change: give subscription_plan, is_active or is_superuser".into(),
        ));
    }
    let actor = &admin.0.user;
    if actor.id == user_id && (patch.is_active == Some(false) || patch.is_superuser == Some(false)) {
        return Err(ApiError::BadRequest(
            "Admins cannot deactivate or demote themselves".into(),
        ));
    }
    let before = state
        .accounts
        .user_by_id(user_id)
        .await?
        .ok_or_else(|| ApiError::NotFound("User not found".into()).with_code(ErrorCode::UserNotFound))?;
    let after = state.accounts.update_user(user_id, &patch).await?;
    let mut changes = serde_json::Map::new();
    if before.subscription_plan != after.subscription_plan {
        changes.insert(
            "subscription_plan".into(),
            json!({"from": before.subscription_plan, "to": after.subscription_plan}),
        );
    }
    if before.is_active != after.is_active {
        changes.insert(
            "is_active".into(),
            json!({"from": before.is_active, "to": after.is_active}),
        );
    }
    if before.is_superuser != after.is_superuser {
        changes.insert(
            "is_superuser".into(),
            json!({"from": before.is_superuser, "to": after.is_superuser}),
        );
    }
    if !changes.is_empty() {
        state
            .accounts
            .record_audit(&AuditEntry {
                id: Uuid::new_v4(),
                actor_id: actor.id,
                action: "user.update".into(),
                target_id: Some(user_id),
                details: json!({ "actor_email": actor.email, "changes": changes }),
                created_at: Utc::now(),
            })
            .await?;
        tracing::info!(actor = %actor.id, target = %user_id, ?changes, "admin changed user");
        // Cached plan and limits of the user's session are now stale.
        state.registry.invalidate(user_id);
    }
    Ok(web::Json(after.into()))
}

/// The audit log of changes made to one user, oldest first.
#[utoipa::path(get, path = "/admin/users/{user_id}/audit", tag = "admin", security(("bearer" = [])),
    params(("user_id" = Uuid, Path, description = "User id")),
    responses((status = 200, body = Vec<AuditView>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Not a superuser, or an API key without the `admin` scope")))]
pub async fn user_audit(
    _admin: AdminUser,
    state: web::Data<AppState>,
    user_id: web::Path<Uuid>,
) -> Result<web::Json<Vec<AuditView>>, ApiError> {
    let entries = state.accounts.audit_for(user_id.into_inner()).await?;
    Ok(web::Json(
        entries
            .into_iter()
            .map(|e| AuditView {
                id: e.id,
                actor_id: e.actor_id,
                action: e.action,
                target_id: e.target_id,
                details: e.details,
                created_at: e.created_at,
            })
            .collect(),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UpgradeRequestQuery {
    /// pending (default), approved, rejected, cancelled, stale, or all.
    pub status: Option<String>,
    /// 1-based page number (default 1).
    pub page: Option<u32>,
    /// Items per page, 1 to 100 (default 20).
    pub page_size: Option<u32>,
}

/// An upgrade request with the e-mail address of its account.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdminUpgradeRequestView {
    #[serde(flatten)]
    pub request: UpgradeRequestView,
    /// The account's e-mail address (null if the account is gone).
    pub email: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UpgradeRequestPageView {
    pub items: Vec<AdminUpgradeRequestView>,
    pub total: u64,
    pub page: u32,
    pub page_size: u32,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectUpgradeRequest {
    /// Why, shown to the user (at most `billing.max_note_chars` characters).
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApprovedUpgradeView {
    pub upgrade_request: UpgradeRequestView,
    /// The account's plan and cycle now.
    pub plan_type: String,
    pub billing_cycle: String,
    /// The prorated charge for the time left in the period, on the period's invoice.
    pub prorated_charge_cents: u64,
    pub current_period_start: chrono::DateTime<Utc>,
    pub current_period_end: chrono::DateTime<Utc>,
}

/// Upgrade requests (made when no payment provider is configured), oldest first:
/// by default the pending ones, the queue to decide.
#[utoipa::path(get, path = "/admin/upgrade-requests", tag = "admin", security(("bearer" = [])), params(UpgradeRequestQuery),
    responses((status = 200, body = UpgradeRequestPageView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn list_upgrade_requests(
    _admin: AdminUser,
    state: web::Data<AppState>,
    query: web::Query<UpgradeRequestQuery>,
) -> Result<web::Json<UpgradeRequestPageView>, ApiError> {
    let q = query.into_inner();
    let (page, page_size, store_page) = page_of(q.page, q.page_size)?;
    let status = match q.status.as_deref().unwrap_or("pending") {
        "all" => None,
        other => Some(
            other
                .parse::<UpgradeStatus>()
                .map_err(|e| ApiError::Unprocessable(format!("{e}, or all")))?,
        ),
    };
    let (requests, total) = state.billing.requests(status, store_page).await?;
    let mut items = Vec::with_capacity(requests.len());
    for r in requests {
        let email = state.accounts.user_by_id(r.user_id).await?.map(|u| u.email);
        items.push(AdminUpgradeRequestView {
            request: r.into(),
            email,
        });
    }
    Ok(web::Json(UpgradeRequestPageView {
        items,
        total,
        page,
        page_size,
    }))
}

/// Approves a pending upgrade request: the plan change applies now, with the
/// prorated charge for the time left in the period (on the period's invoice).
/// A request that is no longer an upgrade (the plan changed since) is closed as
/// stale and nothing is applied (409). Audit-logged.
#[utoipa::path(post, path = "/admin/upgrade-requests/{request_id}/approve", tag = "admin", security(("bearer" = [])),
    params(("request_id" = Uuid, Path, description = "Upgrade request id")),
    responses((status = 200, body = ApprovedUpgradeView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "Already decided or cancelled, stale, or the subscription changed meanwhile")))]
pub async fn approve_upgrade_request(
    admin: AdminUser,
    state: web::Data<AppState>,
    request_id: web::Path<Uuid>,
) -> Result<web::Json<ApprovedUpgradeView>, ApiError> {
    let actor = &admin.0.user;
    let (request, change) = state
        .billing
        .approve_request(actor, request_id.into_inner(), Utc::now())
        .await?;
    state.registry.invalidate(request.user_id);
    state
        .accounts
        .record_audit(&AuditEntry {
            id: Uuid::new_v4(),
            actor_id: actor.id,
            action: "upgrade_request.approve".into(),
            target_id: Some(request.user_id),
            details: json!({
                "actor_email": actor.email,
                "request_id": request.id,
                "from": {"plan": request.from_plan, "billing_cycle": request.from_cycle},
                "to": {"plan": request.plan, "billing_cycle": request.billing_cycle},
                "prorated_charge_cents": change.prorated_charge_cents,
            }),
            created_at: Utc::now(),
        })
        .await?;
    tracing::info!(actor = %actor.id, request = %request.id, user = %request.user_id,
        charge = change.prorated_charge_cents, "upgrade request approved");
    let sub = change.subscription;
    Ok(web::Json(ApprovedUpgradeView {
        upgrade_request: request.into(),
        plan_type: sub.plan.as_str().into(),
        billing_cycle: sub.billing_cycle.as_str().into(),
        prorated_charge_cents: change.prorated_charge_cents,
        current_period_start: sub.current_period_start,
        current_period_end: sub.current_period_end,
    }))
}

/// Rejects a pending upgrade request, with an optional reason the user sees.
/// Audit-logged.
#[utoipa::path(post, path = "/admin/upgrade-requests/{request_id}/reject", tag = "admin", security(("bearer" = [])),
    params(("request_id" = Uuid, Path, description = "Upgrade request id")), request_body = RejectUpgradeRequest,
    responses((status = 200, body = UpgradeRequestView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Already decided or cancelled"),
        (status = 422, body = ErrorBody)))]
pub async fn reject_upgrade_request(
    admin: AdminUser,
    state: web::Data<AppState>,
    request_id: web::Path<Uuid>,
    body: web::Json<RejectUpgradeRequest>,
) -> Result<web::Json<UpgradeRequestView>, ApiError> {
    let actor = &admin.0.user;
    let reason = body
        .into_inner()
        .reason
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty());
    let max = state.settings.billing.max_note_chars;
    if reason.as_ref().is_some_and(|r| r.chars().count() > max) {
        return Err(ApiError::Unprocessable(format!("reason: at most {max} characters")));
    }
    let request = state
        .billing
        .reject_request(actor, request_id.into_inner(), reason, Utc::now())
        .await?;
    state
        .accounts
        .record_audit(&AuditEntry {
            id: Uuid::new_v4(),
            actor_id: actor.id,
            action: "upgrade_request.reject".into(),
            target_id: Some(request.user_id),
            details: json!({
                "actor_email": actor.email,
                "request_id": request.id,
                "to": {"plan": request.plan, "billing_cycle": request.billing_cycle},
                "reason": request.note,
            }),
            created_at: Utc::now(),
        })
        .await?;
    Ok(web::Json(request.into()))
}

/// The `subscription_limits` override currently stored (null when none) and the
/// effective catalog.
#[utoipa::path(get, path = "/admin/settings/subscription_limits", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "{override, effective}"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Not a superuser, or an API key without the `admin` scope")))]
pub async fn get_subscription_limits(
    _admin: AdminUser,
    state: web::Data<AppState>,
) -> Result<web::Json<serde_json::Value>, ApiError> {
    let stored = state
        .accounts
        .get_setting(ragchat_actors::plans::SUBSCRIPTION_LIMITS_KEY)
        .await?;
    Ok(web::Json(
        json!({ "override": stored, "effective": *state.plans.current() }),
    ))
}

/// Replaces the `subscription_limits` override (any subset of plan fields, e.g.
/// `{"free": {"messages": 20}}`). Takes effect at once for every session.
#[utoipa::path(put, path = "/admin/settings/subscription_limits", tag = "admin", security(("bearer" = [])),
    request_body(content = Object, description = "Overrides keyed by plan"),
    responses((status = 200, description = "{override, effective}"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Not a superuser, or an API key without the `admin` scope"),
        (status = 422, body = ErrorBody)))]
pub async fn put_subscription_limits(
    admin: AdminUser,
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<web::Json<serde_json::Value>, ApiError> {
    let overrides = body.into_inner();
    let effective = state
        .plans
        .base()
        .with_overrides(&overrides)
        .map_err(ApiError::Unprocessable)?;
    let key = ragchat_actors::plans::SUBSCRIPTION_LIMITS_KEY;
    state.accounts.put_setting(key, &overrides).await?;
    state.plans.apply(Some(&overrides)).map_err(ApiError::internal)?;
    state.registry.invalidate_all();
    state
        .accounts
        .record_audit(&AuditEntry {
            id: Uuid::new_v4(),
            actor_id: admin.0.user.id,
            action: "settings.subscription_limits".into(),
            target_id: None,
            details: json!({ "actor_email": admin.0.user.email, "override": overrides }),
            created_at: Utc::now(),
        })
        .await?;
    Ok(web::Json(json!({ "override": overrides, "effective": effective })))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SeedRequest {
    /// A directory (walked recursively) or one file (.txt, .md, .html, .pdf,
    /// .jsonl such as a BEIR corpus.jsonl), relative to `knowledge.seed_root`;
    /// the root itself when absent.
    pub path: Option<String>,
    /// Remove every global document first.
    #[serde(default)]
    pub clear_existing: bool,
    /// Read, check and chunk the corpus; store nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Answer at once (202) and seed in the background (the default), or wait
    /// for the end (200).
    #[serde(default = "default_true")]
    pub background: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SeedStatusView {
    #[serde(flatten)]
    pub status: crate::knowledge::seed::SeedStatus,
    /// Chunks in the search index now.
    pub indexed_chunks: Option<usize>,
}

async fn seed_view(state: &AppState) -> SeedStatusView {
    let status = state
        .seed
        .lock()
        .map(|s| s.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    let indexed_chunks = match state.retrieval.actor() {
        Some(r) => r.send(ragchat_actors::retrieval::IndexedChunks).await.ok(),
        None => None,
    };
    SeedStatusView { status, indexed_chunks }
}

/// The corpus path of a request: under the seed root, never outside it.
fn seed_path(root: &str, requested: Option<&str>) -> Result<std::path::PathBuf, ApiError> {
    let root = std::fs::canonicalize(root)
        .map_err(|e| ApiError::Unprocessable(format!("The seed root '{root}' is not readable: {e}")))?;
    let wanted = root.join(requested.unwrap_or(""));
    let path = std::fs::canonicalize(&wanted)
        .map_err(|_| ApiError::NotFound(format!("No corpus at '{}'", requested.unwrap_or(""))))?;
    if !path.starts_with(&root) {
        return Err(ApiError::Forbidden(
            "The corpus path must be inside the seed root".into(),
        ));
    }
    Ok(path)
}

/// Seeds the knowledge base with global documents from a corpus on the server.
#[utoipa::path(post, path = "/admin/seed-enhanced", tag = "admin", security(("bearer" = [])),
    request_body = SeedRequest,
    responses((status = 202, body = SeedStatusView, description = "Started in the background"),
        (status = 200, body = SeedStatusView, description = "Finished (background: false)"),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Not a superuser, or an API key without the `admin` scope"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "A seed is running"), (status = 422, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn seed_enhanced(
    _admin: AdminUser,
    state: web::Data<AppState>,
    body: web::Json<SeedRequest>,
) -> Result<actix_web::HttpResponse, ApiError> {
    use crate::knowledge::ingest::DocLimits;
    use crate::knowledge::seed::{self, SeedError, SeedOptions};
    let body = body.into_inner();
    let k = &state.settings.knowledge;
    let path = seed_path(&k.seed_root, body.path.as_deref())?;
    let ingestor = state.ingestor.clone().ok_or_else(|| {
        ApiError::Unavailable("The embedding model is not loaded (run scripts/fetch-models)".into())
            .with_code(ErrorCode::ModelNotLoaded)
    })?;
    let opts = SeedOptions {
        clear_existing: body.clear_existing,
        dry_run: body.dry_run,
    };
    seed::begin(&state.seed, &path, opts).map_err(|e| match e {
        SeedError::Busy => ApiError::Conflict("A seed is already running: see GET /admin/seed-status".into())
            .with_code(ErrorCode::SeedInProgress),
        other => ApiError::Unprocessable(other.to_string()),
    })?;
    let max = (DocLimits::of(k), crate::knowledge::formats::FormatLimits::of(k));
    let status = state.seed.clone();
    let job = async move { seed::run(&ingestor, &path, opts, max, status, &|_| {}).await };
    // Always its own task: a waiting client that leaves does not stop the seed
    // halfway (nor leave its state "running" for ever).
    let handle = actix_web::rt::spawn(job);
    if body.background {
        Ok(actix_web::HttpResponse::Accepted().json(seed_view(&state).await))
    } else {
        handle.await.map_err(ApiError::internal)?;
        Ok(actix_web::HttpResponse::Ok().json(seed_view(&state).await))
    }
}

/// Progress of the running seed, or the result of the last one.
#[utoipa::path(get, path = "/admin/seed-status", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = SeedStatusView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Not a superuser, or an API key without the `admin` scope")))]
pub async fn seed_status(_admin: AdminUser, state: web::Data<AppState>) -> web::Json<SeedStatusView> {
    web::Json(seed_view(&state).await)
}

/// The supervision tree as operators see it: each supervisor, what it
/// supervises, its state, restarts and last error, and its queue.
#[utoipa::path(get, path = "/admin/actors", tag = "admin", security(("bearer" = [])),
    responses((status = 200), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Not a superuser, or an API key without the `admin` scope")))]
pub async fn actors(_admin: AdminUser, state: web::Data<AppState>) -> web::Json<serde_json::Value> {
    use ragchat_actors::supervision::Child;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;
    let r = state.registry.stats();
    let sessions = &ragchat_actors::admission::session::SESSION_MAILBOX;
    let mut tree = vec![json!({
        "name": "session-registry",
        "supervises": "UserSession actors, one per active user, sharded over dedicated arbiters",
        "strategy": "a session that stopped or panicked is started again on the user's next request, its state reloaded from the stores",
        "state": "running",
        "restarts": r.restarted,
        "mailbox": sessions.depth(), "handled": sessions.handled(),
        "children": {"kind": "UserSession", "active": r.active, "created": r.created, "evicted_idle": r.evicted},
        "threads": state.settings.sessions.threads,
    })];
    let supervised = |c: &Child, mailbox: &ragchat_actors::supervision::Mailbox| {
        json!({
            "name": c.name, "state": c.state(), "restarts": c.restarts(), "last_error": c.last_error.get(),
            "mailbox": mailbox.depth(), "handled": mailbox.handled(),
            "strategy": "restarted when it stops or panics: at once, then with a doubling backoff (250 ms to 30 s) while it keeps failing within a minute",
        })
    };
    let mut node = supervised(
        state.ledger.supervisor().child(),
        &ragchat_actors::ledger::LEDGER_MAILBOX,
    );
    node["supervises"] = json!(
        "usage records: batched writes, a local spool while the store is down; what it holds is spooled if it dies"
    );
    node["parked"] = json!(state.ledger.parked());
    match tokio::time::timeout(Duration::from_millis(500), state.ledger.stats()).await {
        Ok(Ok(l)) => {
            if l.held > 0 {
                node["state"] = json!("degraded: store down, spool full, refusing new work");
            } else if l.store_down {
                node["state"] = json!("degraded: store down, spooling");
            }
            node["buffered"] = json!(l.buffered);
            node["spooled"] = json!(l.spooled);
            node["spool_bytes"] = json!(l.spool_bytes);
            node["held"] = json!(l.held);
            node["written"] = json!(l.written);
            node["failed_flushes"] = json!(l.failed_flushes);
        }
        Ok(Err(e)) => node["error"] = json!(e.to_string()),
        Err(_) => node["error"] = json!("not answering within 500 ms"),
    }
    tree.push(node);
    tree.push(match state.retrieval.actor() {
        Some(sup) => {
            let mut node = supervised(sup.child(), &ragchat_actors::retrieval::RETRIEVAL_MAILBOX);
            node["supervises"] = json!("the search index (snapshot on disk); a restart reloads the snapshot and catches up with the document store");
            match tokio::time::timeout(
                Duration::from_millis(500),
                sup.send(ragchat_actors::retrieval::IndexedChunks),
            )
            .await
            {
                Ok(Ok(n)) => node["indexed_chunks"] = json!(n),
                Ok(Err(e)) => node["error"] = json!(e.to_string()),
                Err(_) => node["error"] = json!("busy: not answering within 500 ms"),
            }
            node
        }
        None => json!({"name": "retrieval", "state": "not started"}),
    });
    tree.push(match &state.generator {
        Some(g) => {
            let s = &g.stats;
            json!({
                "name": "generate-worker", "supervises": "the causal LM thread (continuous batching)",
                "strategy": "a panic fails the sequences in flight (503) and reloads the model",
                "state": if s.stopped.load(Relaxed) { "stopped" } else { "running" },
                "restarts": s.restarts.load(Relaxed), "last_error": s.last_error.get(),
                "mailbox": s.queued.load(Relaxed), "active_sequences": s.active.load(Relaxed),
                "last_batch": s.last_batch.load(Relaxed), "tokens": s.tokens.load(Relaxed),
                "cancelled": s.cancelled.load(Relaxed),
            })
        }
        None => json!({"name": "generate-worker", "state": "not loaded"}),
    });
    tree.push(match &state.embedder {
        Some(e) => {
            let s = &e.stats;
            json!({
                "name": "embed-worker", "supervises": "the embedding model thread (dynamic batching)",
                "strategy": "a panic fails the batch in flight (503) and reloads the model",
                "state": if s.stopped.load(Relaxed) { "stopped" } else { "running" },
                "restarts": s.restarts.load(Relaxed), "last_error": s.last_error.get(),
                "mailbox": s.queued(), "batches": s.batches.load(Relaxed),
                "last_batch": s.last_batch_size.load(Relaxed),
                "lanes": {
                    "enabled": e.lanes_enabled(),
                    "interactive": s.queued_interactive.load(Relaxed),
                    "bulk": s.queued_bulk.load(Relaxed),
                    "bulk_waiting": s.bulk_waiting.load(Relaxed),
                    "bulk_pending_texts": s.bulk_pending_texts.load(Relaxed),
                },
            })
        }
        None => json!({"name": "embed-worker", "state": "not loaded"}),
    });
    web::Json(json!({ "supervisors": tree }))
}
