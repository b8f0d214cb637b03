//! Domain types shared by the core and the edges. Types validate on construction
//! (`Email::parse`, `Plan::from_str`) so handlers do not scatter checks.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::plans::Plan;

/// A syntactically plausible, normalized (trimmed, lower-cased) e-mail address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Email(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a valid e-mail address")]
pub struct InvalidEmail(pub String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, InvalidEmail> {
        let s = raw.trim().to_ascii_lowercase();
        let valid = s.len() <= 254
            && !s.chars().any(|c| c.is_whitespace() || c.is_control())
            && match s.split_once('@') {
                Some((local, domain)) => {
                    !local.is_empty()
                        && local.len() <= 64
                        && !domain.contains('@')
                        && domain.contains('.')
                        && !domain.starts_with('.')
                        && !domain.ends_with('.')
                        && !domain.contains("..")
                }
                None => false,
            };
        if valid {
            Ok(Email(s))
        } else {
            Err(InvalidEmail(raw.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Organization {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// A user as stored. `hashed_password` never leaves the server: HTTP views are
/// built from this type field by field.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub hashed_password: String,
    pub full_name: Option<String>,
    pub is_active: bool,
    pub is_verified: bool,
    pub is_superuser: bool,
    pub subscription_plan: Plan,
    pub organization_id: Option<Uuid>,
    pub preferences: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What is needed to create a user; the store fills id and timestamps.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: Email,
    pub hashed_password: String,
    pub full_name: Option<String>,
    pub is_superuser: bool,
    pub is_verified: bool,
    pub subscription_plan: Plan,
    pub organization_id: Option<Uuid>,
}

/// Fields an admin may change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserPatch {
    pub subscription_plan: Option<Plan>,
    pub is_active: Option<bool>,
    pub is_superuser: Option<bool>,
}

impl UserPatch {
    pub fn is_empty(&self) -> bool {
        self.subscription_plan.is_none() && self.is_active.is_none() && self.is_superuser.is_none()
    }
}

#[derive(Debug, Clone, Default)]
pub struct UserFilter {
    /// Case-insensitive substring of the e-mail address.
    pub email: Option<String>,
    pub plan: Option<Plan>,
}

#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub offset: u32,
    pub limit: u32,
}

/// What an API key may do. A password session (a JWT) is not limited by scopes:
/// it may do whatever its user may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Chat: `/chat/*`, `/ws/chat`, `/v1/chat/completions`.
    Chat,
    /// Reading the knowledge base: `/knowledge/search`, `/v1/embeddings`, listing documents.
    Search,
    /// Writing the knowledge base: adding, uploading and deleting documents.
    Ingest,
    /// `/admin/*` and `/metrics`; only keys of superusers may have it.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Chat, Scope::Search, Scope::Ingest, Scope::Admin];

    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Chat => "chat",
            Scope::Search => "search",
            Scope::Ingest => "ingest",
            Scope::Admin => "admin",
        }
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope")]
pub struct UnknownScope;

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s).ok_or(UnknownScope)
    }
}

/// A set of scopes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    pub const NONE: Scopes = Scopes(0);
    /// Everything: what a password session may do (admin still needs a superuser).
    pub const ALL: Scopes = Scopes::of(&Scope::ALL);
    /// A new key when its creator names no scopes.
    pub const NEW_KEY_DEFAULT: Scopes = Scopes::of(&[Scope::Chat, Scope::Search]);
    /// Keys made before keys had scopes (the migration's column default): what
    /// they could do then, less the admin routes.
    pub const LEGACY_KEY: Scopes = Scopes::of(&[Scope::Chat, Scope::Search, Scope::Ingest]);

    pub const fn of(scopes: &[Scope]) -> Scopes {
        let mut bits = 0;
        let mut i = 0;
        while i < scopes.len() {
            bits |= scopes[i].bit();
            i += 1;
        }
        Scopes(bits)
    }

    pub const fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// True when the two sets share a scope.
    pub const fn intersects(self, other: Scopes) -> bool {
        self.0 & other.0 != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn with(self, scope: Scope) -> Scopes {
        Scopes(self.0 | scope.bit())
    }

    /// The scopes in the set, in `Scope::ALL` order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    /// As stored (`"chat search"`): names separated by spaces, like OAuth scopes.
    pub fn to_stored(self) -> String {
        self.iter().map(Scope::as_str).collect::<Vec<_>>().join(" ")
    }

    /// From the stored form. A name this version does not know grants nothing
    /// (a key written by a newer version keeps only the scopes known here).
    pub fn from_stored(s: &str) -> Scopes {
        s.split_whitespace()
            .filter_map(|n| n.parse::<Scope>().ok())
            .fold(Scopes::NONE, Scopes::with)
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.iter().map(Scope::as_str).collect::<Vec<_>>().join(", "))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    /// The first characters of the key, shown so users can tell keys apart.
    pub prefix: String,
    pub key_hash: String,
    /// What the key may do (never more than its user may).
    pub scopes: Scopes,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RefreshToken {
    pub id: Uuid,
    pub user_id: Uuid,
    pub family_id: Uuid,
    pub token_hash: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Outcome of presenting a refresh token.
#[derive(Debug, Clone, PartialEq)]
pub enum RefreshOutcome {
    /// The token was live; it is now used and may not be presented again.
    Rotated {
        user_id: Uuid,
        family_id: Uuid,
    },
    /// The token had already been used or revoked: a sign it was stolen.
    /// The store has revoked the whole family.
    Reused {
        family_id: Uuid,
    },
    Expired,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub id: Uuid,
    pub actor_id: Uuid,
    pub action: String,
    pub target_id: Option<Uuid>,
    pub details: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalized_and_checked() {
        assert_eq!(
            Email::parse("  Alice@Example.COM ").map(|e| e.to_string()),
            Ok("alice@example.com".to_string())
        );
        for bad in [
            "",
            "alice",
            "@example.com",
            "a@b",
            "a@@b.com",
            "a b@c.com",
            "a@.com",
            "a@b..com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn plans_parse_case_insensitively_and_reject_unknown() {
        assert_eq!("PRO".parse::<Plan>(), Ok(Plan::Pro));
        assert!("gold".parse::<Plan>().is_err());
        for p in Plan::ALL {
            assert_eq!(p.as_str().parse::<Plan>(), Ok(p));
        }
    }

    #[test]
    fn scopes_round_trip_through_their_stored_form_and_unknown_names_grant_nothing() {
        for s in Scope::ALL {
            assert_eq!(s.as_str().parse::<Scope>(), Ok(s));
            assert_eq!(serde_json::to_value(s).ok(), Some(serde_json::json!(s.as_str())));
        }
        assert!("Chat".parse::<Scope>().is_err() && "".parse::<Scope>().is_err());
        assert_eq!(Scopes::NEW_KEY_DEFAULT.to_stored(), "chat search");
        assert_eq!(Scopes::LEGACY_KEY.to_stored(), "chat search ingest");
        assert_eq!(Scopes::from_stored(&Scopes::ALL.to_stored()), Scopes::ALL);
        assert_eq!(
            Scopes::from_stored("  ingest  billing chat "),
            Scopes::of(&[Scope::Chat, Scope::Ingest])
        );
        assert!(Scopes::from_stored("").is_empty());
        let chat = Scopes::of(&[Scope::Chat]);
        assert!(chat.contains(Scope::Chat) && !chat.contains(Scope::Admin));
        assert!(chat.intersects(Scopes::NEW_KEY_DEFAULT));
        assert!(!chat.intersects(Scopes::of(&[Scope::Search, Scope::Ingest])));
    }
}

/// One unit of accounting sent to the ledger. `id` is the idempotency key: the
/// permit that admitted the work, so a replayed or retried write counts once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub id: Uuid,
    pub user_id: Uuid,
    pub resource: crate::plans::Resource,
    pub quantity: u64,
    pub period: crate::plans::Period,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Active,
    /// Will not renew; ends (falls back to free) at the period end.
    Canceled,
}

impl SubscriptionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Canceled => "canceled",
        }
    }
}

impl FromStr for SubscriptionStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(SubscriptionStatus::Active),
            "canceled" => Ok(SubscriptionStatus::Canceled),
            other => Err(format!("unknown subscription status '{other}'")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    pub user_id: Uuid,
    pub plan: Plan,
    pub status: SubscriptionStatus,
    pub billing_cycle: crate::plans::BillingCycle,
    pub amount_cents: u64,
    pub currency: String,
    pub started_at: DateTime<Utc>,
    pub current_period_start: DateTime<Utc>,
    pub current_period_end: DateTime<Utc>,
    pub auto_renew: bool,
    /// A downgrade waiting for the period end.
    pub pending_plan: Option<Plan>,
    /// Prorated upgrade charges made during the current period.
    pub period_adjustments_cents: u64,
    /// The price the current period is billed at: the plan's price when the period
    /// began. Mid-period upgrades leave it alone (they are charged as prorated
    /// adjustments), so the period's invoice is this plus the adjustments.
    pub period_base_cents: u64,
}

/// Where a self-service upgrade request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeStatus {
    /// Waiting for an administrator (a user has at most one).
    Pending,
    /// Approved: the plan change was applied with its prorated charge.
    Approved,
    Rejected,
    /// Withdrawn by the user (or by cancelling the subscription).
    Cancelled,
    /// Found no longer to be an upgrade when an administrator tried to approve it
    /// (the plan changed meanwhile); nothing was applied.
    Stale,
}

impl UpgradeStatus {
    pub const ALL: [UpgradeStatus; 5] = [
        UpgradeStatus::Pending,
        UpgradeStatus::Approved,
        UpgradeStatus::Rejected,
        UpgradeStatus::Cancelled,
        UpgradeStatus::Stale,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeStatus::Pending => "pending",
            UpgradeStatus::Approved => "approved",
            UpgradeStatus::Rejected => "rejected",
            UpgradeStatus::Cancelled => "cancelled",
            UpgradeStatus::Stale => "stale",
        }
    }
}

impl FromStr for UpgradeStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UpgradeStatus::ALL.into_iter().find(|u| u.as_str() == s).ok_or_else(|| {
            format!("unknown upgrade request status '{s}': expected pending, approved, rejected, cancelled or stale")
        })
    }
}

/// A self-service upgrade waiting for approval (no payment provider configured).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeRequest {
    pub id: Uuid,
    pub user_id: Uuid,
    /// What the user asked for.
    pub plan: Plan,
    pub billing_cycle: crate::plans::BillingCycle,
    /// What the user had when asking.
    pub from_plan: Plan,
    pub from_cycle: crate::plans::BillingCycle,
    pub status: UpgradeStatus,
    /// The prorated charge had the change applied when it was asked for; approval
    /// charges for the time left then.
    pub quoted_cents: u64,
    /// The prorated charge made at approval.
    pub charged_cents: Option<u64>,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    /// The administrator who approved or rejected it.
    pub decided_by: Option<Uuid>,
    /// The administrator's reason, or why it went stale.
    pub note: Option<String>,
}

/// How a pending upgrade request is closed.
#[derive(Debug, Clone, PartialEq)]
pub struct UpgradeDecision {
    pub status: UpgradeStatus,
    pub decided_at: DateTime<Utc>,
    pub decided_by: Option<Uuid>,
    pub note: Option<String>,
    pub charged_cents: Option<u64>,
}

/// A charge recorded by the `invoice` payment provider: collected with the
/// account's invoices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payment {
    /// The charge's idempotency key.
    pub id: Uuid,
    pub user_id: Uuid,
    pub amount_cents: u64,
    pub currency: String,
    pub description: String,
    /// The first instant of the calendar month (UTC) whose credit limit the charge
    /// counts against.
    pub month_start: DateTime<Utc>,
    pub refunded: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invoice {
    pub id: Uuid,
    pub user_id: Uuid,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub plan: Plan,
    pub plan_charge_cents: u64,
    pub adjustments_cents: u64,
    pub usage: serde_json::Value,
    pub total_cents: u64,
    pub currency: String,
    pub created_at: DateTime<Utc>,
}
