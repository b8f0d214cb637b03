//! /billing: plans, the caller's subscription, usage and invoices, plan changes and
//! upgrade requests; and /billing/probe/*, protected no-op endpoints that consume one unit of a
//! resource exactly like the real routes (for client integration tests and the
//! admission benchmark).

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use ragchat_actors::billing::{ChangeOutcome, Effective, UpgradePath};
use ragchat_actors::domain::{Invoice, Subscription, User};
use ragchat_actors::plans::Plan;
use ragchat_actors::plans::{BillingCycle, PlanLimits, Resource};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::admission::{Admitted, ChatMessage, Consumes, IngestCall, SearchCall};
use super::extractors::{access, PasswordSession, Scoped};
use super::views::UpgradeRequestView;
use super::AppState;
use crate::error::{ApiError, ErrorBody};

/// The billing routes; the probes only when `billing.probes` is on.
pub fn routes(probes: bool) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        configure(cfg);
        if probes {
            cfg.service(web::resource("/billing/probe/chat").route(web::post().to(probe_chat)))
                .service(web::resource("/billing/probe/search").route(web::post().to(probe_search)))
                .service(web::resource("/billing/probe/api").route(web::post().to(probe_api)))
                .service(web::resource("/billing/probe/open").route(web::post().to(probe_open)));
        }
    }
}

fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/billing/plans").route(web::get().to(plans)))
        .service(
            web::resource("/billing/subscription")
                .route(web::get().to(subscription))
                .route(web::post().to(change_subscription)),
        )
        .service(web::resource("/billing/subscription/cancel").route(web::post().to(cancel_subscription)))
        .service(
            web::resource("/billing/upgrade-request")
                .route(web::get().to(upgrade_request))
                .route(web::delete().to(cancel_upgrade_request)),
        )
        .service(web::resource("/billing/usage").route(web::get().to(usage)))
        .service(web::resource("/billing/invoices").route(web::get().to(invoices)));
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LimitsView {
    pub messages: u64,
    pub background_tasks: u64,
    pub api_calls: u64,
    pub storage_mb: u64,
}

impl From<&PlanLimits> for LimitsView {
    fn from(l: &PlanLimits) -> Self {
        LimitsView {
            messages: l.messages,
            background_tasks: l.background_tasks,
            api_calls: l.api_calls,
            storage_mb: l.storage_mb,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PlanView {
    pub plan_type: String,
    pub price_monthly_cents: u64,
    pub price_yearly_cents: u64,
    pub currency: String,
    pub limits: LimitsView,
    pub features: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscriptionView {
    pub plan_type: String,
    pub status: String,
    pub billing_cycle: String,
    pub amount_cents: u64,
    pub currency: String,
    pub started_at: DateTime<Utc>,
    pub current_period_start: DateTime<Utc>,
    pub current_period_end: DateTime<Utc>,
    pub auto_renew: bool,
    /// A downgrade or cancellation taking effect at the period end.
    pub pending_plan: Option<String>,
    pub limits: LimitsView,
    /// How an upgrade is made: "payment" (charged through `payment_provider`, applied
    /// at once) or "approval" (a request an administrator approves).
    #[schema(example = "approval")]
    pub upgrade_path: String,
    pub payment_provider: Option<String>,
    /// The caller's upgrade request waiting for approval, if any.
    pub upgrade_request: Option<UpgradeRequestView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UsageView {
    pub plan_type: String,
    pub messages_this_month: u64,
    pub background_tasks_this_month: u64,
    pub api_calls_this_month: u64,
    pub storage_mb_used: u64,
    #[schema(value_type = Object)]
    pub quota_remaining: serde_json::Value,
    pub limits: LimitsView,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InvoiceView {
    pub id: uuid::Uuid,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub plan_type: String,
    pub plan_charge_cents: u64,
    pub prorated_adjustments_cents: u64,
    #[schema(value_type = Object)]
    pub usage: serde_json::Value,
    pub total_cents: u64,
    pub currency: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePlanRequest {
    #[schema(example = "pro")]
    pub plan: String,
    /// monthly (default) or yearly.
    pub billing_cycle: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChangePlanResponse {
    pub subscription: SubscriptionView,
    /// "now" (upgrades) or "period_end" (downgrades).
    pub effective: String,
    pub prorated_charge_cents: u64,
    /// The payment provider's reference of the charge, when one was taken.
    pub payment_reference: Option<String>,
}

/// The subscription as shown, with the upgrade path and the pending request.
async fn subscription_view(state: &AppState, user: &User, s: &Subscription) -> Result<SubscriptionView, ApiError> {
    let pending = state.billing.pending_request(user).await?;
    let (upgrade_path, payment_provider) = match state.billing.upgrade_path() {
        UpgradePath::Payment(name) => ("payment", Some(name.to_string())),
        UpgradePath::Approval => ("approval", None),
    };
    Ok(SubscriptionView {
        plan_type: s.plan.as_str().into(),
        status: s.status.as_str().into(),
        billing_cycle: s.billing_cycle.as_str().into(),
        amount_cents: s.amount_cents,
        currency: s.currency.clone(),
        started_at: s.started_at,
        current_period_start: s.current_period_start,
        current_period_end: s.current_period_end,
        auto_renew: s.auto_renew,
        pending_plan: s.pending_plan.map(|p| p.as_str().to_string()),
        limits: (&state.billing.limits(s.plan)).into(),
        upgrade_path: upgrade_path.into(),
        payment_provider,
        upgrade_request: pending.map(UpgradeRequestView::from),
    })
}

fn invoice_view(i: Invoice) -> InvoiceView {
    InvoiceView {
        id: i.id,
        period_start: i.period_start,
        period_end: i.period_end,
        plan_type: i.plan.as_str().into(),
        plan_charge_cents: i.plan_charge_cents,
        prorated_adjustments_cents: i.adjustments_cents,
        usage: i.usage,
        total_cents: i.total_cents,
        currency: i.currency,
    }
}

/// The plans with their monthly limits, prices and features.
#[utoipa::path(get, path = "/billing/plans", tag = "billing", responses((status = 200, body = Vec<PlanView>)))]
pub async fn plans(state: web::Data<AppState>) -> web::Json<Vec<PlanView>> {
    let catalog = state.plans.current();
    web::Json(
        Plan::ALL
            .iter()
            .map(|&p| {
                let l = catalog.get(p);
                PlanView {
                    plan_type: p.as_str().into(),
                    price_monthly_cents: l.price_monthly_cents,
                    price_yearly_cents: l.price_yearly_cents,
                    currency: ragchat_actors::billing::CURRENCY.into(),
                    limits: l.into(),
                    features: l.features.clone(),
                }
            })
            .collect(),
    )
}

/// The caller's subscription (made from the account's plan if it has none yet),
/// how upgrades are made and the pending upgrade request.
#[utoipa::path(get, path = "/billing/subscription", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = SubscriptionView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "A deactivated account")))]
pub async fn subscription(
    current: Scoped<access::Account>,
    state: web::Data<AppState>,
) -> Result<web::Json<SubscriptionView>, ApiError> {
    let sub = state.billing.subscription(&current.user, Utc::now()).await?;
    Ok(web::Json(subscription_view(&state, &current.user, &sub).await?))
}

/// Changes plan or billing cycle. Downgrades apply at the end of the period;
/// changes that cost nothing apply now. An upgrade (a higher plan, or a cycle change
/// that costs something) is charged its prorated amount through the payment
/// provider and applied once paid (200); without a provider it is not applied but
/// becomes an upgrade request for an administrator (202), at most one pending.
#[utoipa::path(post, path = "/billing/subscription", tag = "billing", security(("bearer" = [])), request_body = ChangePlanRequest,
    responses((status = 200, body = ChangePlanResponse, description = "Applied now, or at the period end"),
        (status = 202, body = UpgradeRequestView, description = "No payment provider: an upgrade request waiting for approval"),
        (status = 401, body = ErrorBody),
        (status = 402, body = ErrorBody, description = "The payment provider declined the charge; nothing applied"),
        (status = 403, body = ErrorBody, description = "Called with an API key"),
        (status = 409, body = ErrorBody, description = "Already on that plan, an upgrade request already pending, or the subscription changed meanwhile"),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn change_subscription(
    PasswordSession(current): PasswordSession,
    state: web::Data<AppState>,
    body: web::Json<ChangePlanRequest>,
) -> Result<HttpResponse, ApiError> {
    let plan: Plan = body
        .plan
        .parse()
        .map_err(|e: ragchat_actors::plans::UnknownPlan| ApiError::Unprocessable(e.to_string()))?;
    let cycle: BillingCycle = match body.billing_cycle.as_deref() {
        None => BillingCycle::Monthly,
        Some(c) => c.parse().map_err(ApiError::Unprocessable)?,
    };
    let change = match state
        .billing
        .change_plan(&current.user, plan, cycle, Utc::now())
        .await?
    {
        ChangeOutcome::Requested(request) => {
            tracing::info!(user = %current.user.id, request = %request.id, plan = %plan, "upgrade requested");
            return Ok(HttpResponse::Accepted().json(UpgradeRequestView::from(request)));
        }
        ChangeOutcome::Changed(change) => change,
    };
    state.registry.invalidate(current.user.id);
    Ok(HttpResponse::Ok().json(ChangePlanResponse {
        subscription: subscription_view(&state, &current.user, &change.subscription).await?,
        effective: match change.effective {
            Effective::Now => "now".into(),
            Effective::PeriodEnd => "period_end".into(),
        },
        prorated_charge_cents: change.prorated_charge_cents,
        payment_reference: change.payment.map(|p| p.reference),
    }))
}

/// Cancels: the plan runs until the period end, then the account is on free. A
/// pending upgrade request is cancelled with it.
#[utoipa::path(post, path = "/billing/subscription/cancel", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = SubscriptionView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Called with an API key")))]
pub async fn cancel_subscription(
    PasswordSession(current): PasswordSession,
    state: web::Data<AppState>,
) -> Result<web::Json<SubscriptionView>, ApiError> {
    let sub = state.billing.cancel(&current.user, Utc::now()).await?;
    Ok(web::Json(subscription_view(&state, &current.user, &sub).await?))
}

/// The caller's newest upgrade request: pending, or how it was decided (approved
/// with its charge, rejected with the reason, cancelled, stale).
#[utoipa::path(get, path = "/billing/upgrade-request", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = UpgradeRequestView), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "The caller never asked for an upgrade")))]
pub async fn upgrade_request(
    current: Scoped<access::Account>,
    state: web::Data<AppState>,
) -> Result<web::Json<UpgradeRequestView>, ApiError> {
    let latest = state
        .billing
        .latest_request(&current.user)
        .await?
        .ok_or(ragchat_actors::billing::BillingError::RequestNotFound)?;
    Ok(web::Json(latest.into()))
}

/// Withdraws the caller's pending upgrade request.
#[utoipa::path(delete, path = "/billing/upgrade-request", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = UpgradeRequestView, description = "The request, now cancelled"),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Called with an API key"),
        (status = 404, body = ErrorBody, description = "No pending upgrade request")))]
pub async fn cancel_upgrade_request(
    PasswordSession(current): PasswordSession,
    state: web::Data<AppState>,
) -> Result<web::Json<UpgradeRequestView>, ApiError> {
    let cancelled = state.billing.cancel_request(&current.user, Utc::now()).await?;
    Ok(web::Json(cancelled.into()))
}

/// This month's usage against the plan's limits.
#[utoipa::path(get, path = "/billing/usage", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = UsageView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "A deactivated account")))]
pub async fn usage(
    current: Scoped<access::Account>,
    state: web::Data<AppState>,
) -> Result<web::Json<UsageView>, ApiError> {
    // Units this node holds in leases go back first: the counters then read what was admitted.
    state.registry.return_leases(current.user.id).await;
    let s = state.billing.usage_summary(&current.user, Utc::now()).await?;
    let used = |r: Resource| s.used.get(&r).copied().unwrap_or(0);
    let remaining: serde_json::Map<String, serde_json::Value> = Resource::ALL
        .iter()
        .map(|&r| (r.as_str().to_string(), json!(s.limits.limit(r).saturating_sub(used(r)))))
        .collect();
    Ok(web::Json(UsageView {
        plan_type: s.plan.as_str().into(),
        messages_this_month: used(Resource::Messages),
        background_tasks_this_month: used(Resource::BackgroundTasks),
        api_calls_this_month: used(Resource::ApiCalls),
        storage_mb_used: used(Resource::StorageMb),
        quota_remaining: serde_json::Value::Object(remaining),
        limits: (&s.limits).into(),
        period_start: s.period.start,
        period_end: s.period.end,
    }))
}

/// Invoices of closed periods, oldest first.
#[utoipa::path(get, path = "/billing/invoices", tag = "billing", security(("bearer" = [])),
    responses((status = 200, body = Vec<InvoiceView>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "A deactivated account")))]
pub async fn invoices(
    current: Scoped<access::Account>,
    state: web::Data<AppState>,
) -> Result<web::Json<Vec<InvoiceView>>, ApiError> {
    let list = state.billing.invoices(&current.user, Utc::now()).await?;
    Ok(web::Json(list.into_iter().map(invoice_view).collect()))
}

async fn probe<R: Consumes>(admitted: Admitted<R>) -> HttpResponse {
    let mut resp = HttpResponse::Ok();
    admitted.rate_headers(&mut resp);
    let resource = R::RESOURCE.as_str();
    match admitted.complete(json!({"route": "probe"})) {
        Some(p) => resp.json(json!({"resource": resource, "used": p.used, "limit": p.limit})),
        None => resp.json(json!({"resource": resource})),
    }
}

/// Consumes one chat message (chat rate limit, `messages` quota) and does nothing else.
#[utoipa::path(post, path = "/billing/probe/chat", tag = "billing", security(("bearer" = [])),
    responses((status = 200, description = "Admitted and recorded"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `chat` scope (insufficient_scope), or a deactivated account"),
              (status = 429, body = ErrorBody, description = "Rate limit or quota exceeded")))]
pub async fn probe_chat(admitted: Admitted<ChatMessage>) -> HttpResponse {
    probe(admitted).await
}

/// Consumes one search (search rate limit, `api_calls` quota) and does nothing else.
#[utoipa::path(post, path = "/billing/probe/search", tag = "billing", security(("bearer" = [])),
    responses((status = 200, description = "Admitted and recorded"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `search` scope (insufficient_scope), or a deactivated account"),
              (status = 429, body = ErrorBody, description = "Rate limit or quota exceeded")))]
pub async fn probe_search(admitted: Admitted<SearchCall>) -> HttpResponse {
    probe(admitted).await
}

/// Consumes one API call (api rate limit, `api_calls` quota; with a key, the `ingest` scope) and does nothing else.
#[utoipa::path(post, path = "/billing/probe/api", tag = "billing", security(("bearer" = [])),
    responses((status = 200, description = "Admitted and recorded"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "An API key without the `ingest` scope (insufficient_scope), or a deactivated account"),
              (status = 429, body = ErrorBody, description = "Rate limit or quota exceeded")))]
pub async fn probe_api(admitted: Admitted<IngestCall>) -> HttpResponse {
    probe(admitted).await
}

/// The same no-op without authentication or admission: the baseline the
/// admission benchmark compares against.
#[utoipa::path(post, path = "/billing/probe/open", tag = "billing", responses((status = 200, description = "Nothing admitted")))]
pub async fn probe_open() -> HttpResponse {
    HttpResponse::Ok().json(json!({"resource": null}))
}
