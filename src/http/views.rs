//! Response shapes shared by several route modules.

use chrono::{DateTime, Utc};
use ragchat_actors::domain::{UpgradeRequest, User};
use ragchat_actors::plans::Plan;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A user as the API shows it: every field except the password hash.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
    pub full_name: Option<String>,
    pub is_active: bool,
    pub is_verified: bool,
    pub is_superuser: bool,
    #[schema(value_type = String, example = "free")]
    pub subscription_plan: Plan,
    pub organization_id: Option<Uuid>,
    #[schema(value_type = Object)]
    pub preferences: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        UserView {
            id: u.id,
            email: u.email,
            full_name: u.full_name,
            is_active: u.is_active,
            is_verified: u.is_verified,
            is_superuser: u.is_superuser,
            subscription_plan: u.subscription_plan,
            organization_id: u.organization_id,
            preferences: u.preferences,
            created_at: u.created_at,
            updated_at: u.updated_at,
        }
    }
}

/// A self-service upgrade request (made when no payment provider is configured).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UpgradeRequestView {
    pub id: Uuid,
    pub user_id: Uuid,
    /// The plan and billing cycle asked for.
    #[schema(example = "pro")]
    pub plan_type: String,
    pub billing_cycle: String,
    /// The plan and billing cycle the account had when asking.
    pub from_plan: String,
    pub from_billing_cycle: String,
    /// pending, approved, rejected, cancelled or stale.
    #[schema(example = "pending")]
    pub status: String,
    /// The prorated charge had the change applied when it was asked for; an
    /// approval charges for the time left in the period then.
    pub quoted_charge_cents: u64,
    /// The prorated charge made at approval (on the period's invoice).
    pub charged_cents: Option<u64>,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    /// The administrator who approved or rejected it.
    pub decided_by: Option<Uuid>,
    /// The administrator's reason, or why it went stale or was cancelled.
    pub note: Option<String>,
}

impl From<UpgradeRequest> for UpgradeRequestView {
    fn from(r: UpgradeRequest) -> Self {
        UpgradeRequestView {
            id: r.id,
            user_id: r.user_id,
            plan_type: r.plan.as_str().into(),
            billing_cycle: r.billing_cycle.as_str().into(),
            from_plan: r.from_plan.as_str().into(),
            from_billing_cycle: r.from_cycle.as_str().into(),
            status: r.status.as_str().into(),
            quoted_charge_cents: r.quoted_cents,
            charged_cents: r.charged_cents,
            created_at: r.created_at,
            decided_at: r.decided_at,
            decided_by: r.decided_by,
            note: r.note,
        }
    }
}
