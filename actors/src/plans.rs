//! Plans, limits and billing periods: pure rules, unit-tested here.
//!
//! Limits come from config/plans.toml and may be overridden at run time by the
//! system_settings row `subscription_limits` (same shape, any subset of fields).
//! Quota periods are calendar months in UTC: [first of the month 00:00, first of
//! the next month 00:00).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// A subscription plan. Limits per plan live in config/plans.toml (billing issue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    #[default]
    Free,
    Pro,
    Enterprise,
}

impl Plan {
    pub const ALL: [Plan; 3] = [Plan::Free, Plan::Pro, Plan::Enterprise];

    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Pro => "pro",
            Plan::Enterprise => "enterprise",
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown subscription plan '{0}': expected free, pro or enterprise")]
pub struct UnknownPlan(pub String);

impl FromStr for Plan {
    type Err = UnknownPlan;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "free" => Ok(Plan::Free),
            "pro" => Ok(Plan::Pro),
            "enterprise" => Ok(Plan::Enterprise),
            _ => Err(UnknownPlan(s.to_string())),
        }
    }
}

/// What a plan limits per month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    Messages,
    BackgroundTasks,
    ApiCalls,
    StorageMb,
}

impl Resource {
    pub const ALL: [Resource; 4] = [
        Resource::Messages,
        Resource::BackgroundTasks,
        Resource::ApiCalls,
        Resource::StorageMb,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Messages => "messages",
            Resource::BackgroundTasks => "background_tasks",
            Resource::ApiCalls => "api_calls",
            Resource::StorageMb => "storage_mb",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Resource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Resource::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown resource '{s}'"))
    }
}

/// One plan's monthly limits, prices and features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanLimits {
    pub messages: u64,
    pub background_tasks: u64,
    pub api_calls: u64,
    pub storage_mb: u64,
    pub price_monthly_cents: u64,
    pub price_yearly_cents: u64,
    #[serde(default)]
    pub features: Vec<String>,
}

impl PlanLimits {
    pub fn limit(&self, r: Resource) -> u64 {
        match r {
            Resource::Messages => self.messages,
            Resource::BackgroundTasks => self.background_tasks,
            Resource::ApiCalls => self.api_calls,
            Resource::StorageMb => self.storage_mb,
        }
    }

    pub fn price_cents(&self, cycle: BillingCycle) -> u64 {
        match cycle {
            BillingCycle::Monthly => self.price_monthly_cents,
            BillingCycle::Yearly => self.price_yearly_cents,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BillingCycle {
    #[default]
    Monthly,
    Yearly,
}

impl BillingCycle {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingCycle::Monthly => "monthly",
            BillingCycle::Yearly => "yearly",
        }
    }
}

impl FromStr for BillingCycle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "monthly" => Ok(BillingCycle::Monthly),
            "yearly" => Ok(BillingCycle::Yearly),
            other => Err(format!("unknown billing cycle '{other}': expected monthly or yearly")),
        }
    }
}

/// Limits of every plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanCatalog {
    pub free: PlanLimits,
    pub pro: PlanLimits,
    pub enterprise: PlanLimits,
}

impl PlanCatalog {
    pub fn get(&self, plan: Plan) -> &PlanLimits {
        match plan {
            Plan::Free => &self.free,
            Plan::Pro => &self.pro,
            Plan::Enterprise => &self.enterprise,
        }
    }

    /// The catalog with the fields of a `subscription_limits` override applied.
    /// Unknown plans or fields, and values of the wrong type, are refused.
    pub fn with_overrides(&self, overrides: &serde_json::Value) -> Result<PlanCatalog, String> {
        let mut base = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let Some(plans) = overrides.as_object() else {
            return Err("subscription_limits must be an object keyed by plan".into());
        };
        for (plan, fields) in plans {
            let target = base
                .get_mut(plan.as_str())
                .ok_or_else(|| format!("unknown plan '{plan}'"))?;
            let fields = fields
                .as_object()
                .ok_or_else(|| format!("limits of '{plan}' must be an object"))?;
            for (k, v) in fields {
                let slot = target
                    .get_mut(k.as_str())
                    .ok_or_else(|| format!("unknown field '{plan}.{k}'"))?;
                *slot = v.clone();
            }
        }
        serde_json::from_value(base).map_err(|e| format!("invalid subscription_limits: {e}"))
    }

    /// The next plan up, suggested when a quota is exhausted.
    pub fn upgrade_from(plan: Plan) -> Plan {
        match plan {
            Plan::Free => Plan::Pro,
            Plan::Pro | Plan::Enterprise => Plan::Enterprise,
        }
    }
}

/// A half-open period [start, end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Period {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Period {
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && t < self.end
    }

    /// The fraction of the period still ahead at `t`, in [0, 1].
    pub fn remaining_fraction(&self, t: DateTime<Utc>) -> f64 {
        let total = (self.end - self.start).num_milliseconds() as f64;
        let left = (self.end - t).num_milliseconds() as f64;
        if total <= 0.0 {
            0.0
        } else {
            (left / total).clamp(0.0, 1.0)
        }
    }
}

fn month_start(year: i32, month: u32) -> DateTime<Utc> {
    // Always valid: day 1, midnight, month 1..=12, year in chrono's range.
    Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn add_months(year: i32, month: u32, n: u32) -> (i32, u32) {
    let idx = i64::from(year) * 12 + i64::from(month - 1) + i64::from(n);
    (
        i32::try_from(idx.div_euclid(12)).unwrap_or(i32::MAX),
        u32::try_from(idx.rem_euclid(12)).unwrap_or(0) + 1,
    )
}

/// The calendar month (UTC) containing `t`: the quota period.
pub fn month_of(t: DateTime<Utc>) -> Period {
    let (y, m) = (t.year(), t.month());
    let (ny, nm) = add_months(y, m, 1);
    Period {
        start: month_start(y, m),
        end: month_start(ny, nm),
    }
}

/// The billing period of a subscription cycle that contains `t`, anchored on
/// calendar months: a month, or twelve months from the anchor's month.
pub fn billing_period(cycle: BillingCycle, anchor: DateTime<Utc>, t: DateTime<Utc>) -> Period {
    match cycle {
        BillingCycle::Monthly => month_of(t),
        BillingCycle::Yearly => {
            let months_since = (t.year() - anchor.year()) * 12 + t.month() as i32 - anchor.month() as i32;
            let years = months_since.max(0) / 12;
            let (sy, sm) = add_months(anchor.year(), anchor.month(), u32::try_from(years * 12).unwrap_or(0));
            let (ey, em) = add_months(sy, sm, 12);
            Period {
                start: month_start(sy, sm),
                end: month_start(ey, em),
            }
        }
    }
}

/// Prorated charge for moving from `from` to a pricier `to` at `t` within `period`:
/// the price difference times the fraction of the period left, rounded to a cent.
pub fn proration_cents(from_price: u64, to_price: u64, period: &Period, t: DateTime<Utc>) -> u64 {
    let diff = to_price.saturating_sub(from_price) as f64;
    (diff * period.remaining_fraction(t)).round() as u64
}

/// What moving from `from_price` over `old` to `to_price` over `new` costs at `t`:
/// the new price for the time left in the new period minus the old price for the
/// time left in the old one, rounded to a cent, never negative (unused time is not
/// refunded). Within one period this is [`proration_cents`]. The period's own price
/// (the subscription's `period_base_cents`) is charged by its invoice as before: the
/// two together pay the old plan up to `t` and the new plan after it.
pub fn upgrade_charge_cents(from_price: u64, old: &Period, to_price: u64, new: &Period, t: DateTime<Utc>) -> u64 {
    if old == new {
        return proration_cents(from_price, to_price, old, t);
    }
    let cost = to_price as f64 * new.remaining_fraction(t);
    let credit = from_price as f64 * old.remaining_fraction(t);
    (cost - credit).max(0.0).round() as u64
}

/// The current plan catalog: the base from config/plans.toml with the
/// `subscription_limits` override applied; swapped whole when it changes.
pub struct PlanBook {
    base: PlanCatalog,
    current: std::sync::RwLock<Arc<PlanCatalog>>,
}

pub const SUBSCRIPTION_LIMITS_KEY: &str = "subscription_limits";

impl PlanBook {
    pub fn new(base: PlanCatalog) -> Self {
        PlanBook {
            current: std::sync::RwLock::new(Arc::new(base.clone())),
            base,
        }
    }

    pub fn current(&self) -> Arc<PlanCatalog> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn base(&self) -> &PlanCatalog {
        &self.base
    }

    /// Applies the `subscription_limits` override row (None: the base alone);
    /// an invalid override is refused and the last good catalog stays.
    pub fn apply(&self, overrides: Option<&serde_json::Value>) -> Result<(), String> {
        let catalog = match overrides {
            Some(v) => self.base.with_overrides(v)?,
            None => self.base.clone(),
        };
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(catalog),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(catalog),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc))
            .expect("valid timestamp")
    }

    #[test]
    fn months_have_the_right_boundaries_for_every_length() {
        let cases = [
            (
                "2026-01-31T23:59:59.999Z",
                "2026-01-01T00:00:00Z",
                "2026-02-01T00:00:00Z",
            ),
            ("2026-02-15T12:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"),
            ("2028-02-29T08:00:00Z", "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"),
            ("2026-04-30T23:00:00Z", "2026-04-01T00:00:00Z", "2026-05-01T00:00:00Z"),
            ("2026-12-31T23:59:59Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
            ("2027-01-01T00:00:00Z", "2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z"),
        ];
        for (t, start, end) in cases {
            let p = month_of(at(t));
            assert_eq!((p.start, p.end), (at(start), at(end)), "{t}");
            assert!(p.contains(at(t)));
            assert!(!p.contains(p.end));
        }
        assert_eq!(
            (month_of(at("2028-02-10T00:00:00Z")).end - month_of(at("2028-02-10T00:00:00Z")).start).num_days(),
            29
        );
    }

    #[test]
    fn yearly_periods_run_twelve_months_from_the_anchor_month() {
        let anchor = at("2026-03-15T10:00:00Z");
        let p = billing_period(BillingCycle::Yearly, anchor, at("2027-02-28T00:00:00Z"));
        assert_eq!(
            (p.start, p.end),
            (at("2026-03-01T00:00:00Z"), at("2027-03-01T00:00:00Z"))
        );
        let p = billing_period(BillingCycle::Yearly, anchor, at("2027-03-01T00:00:00Z"));
        assert_eq!(p.start, at("2027-03-01T00:00:00Z"));
    }

    #[test]
    fn proration_charges_the_difference_for_the_time_left() {
        let p = month_of(at("2026-04-01T00:00:00Z")); // 30 days
        assert_eq!(proration_cents(0, 2900, &p, at("2026-04-16T00:00:00Z")), 1450);
        assert_eq!(proration_cents(0, 2900, &p, p.start), 2900);
        assert_eq!(
            proration_cents(9900, 2900, &p, p.start),
            0,
            "downgrades are not charged"
        );
    }

    #[test]
    fn a_cycle_change_charges_the_new_period_left_minus_the_old_period_left() {
        let april = month_of(at("2026-04-01T00:00:00Z")); // 30 days
        let year = billing_period(
            BillingCycle::Yearly,
            at("2026-04-16T00:00:00Z"),
            at("2026-04-16T00:00:00Z"),
        );
        assert_eq!((year.start, year.end), (april.start, at("2027-04-01T00:00:00Z")));
        let t = at("2026-04-16T00:00:00Z");
        // pro monthly -> pro yearly half-way through April: 29000 x 350/365 - 2900 x 1/2.
        let expected = (29000.0 * 350.0 / 365.0 - 1450.0_f64).round() as u64;
        assert_eq!(upgrade_charge_cents(2900, &april, 29000, &year, t), expected);
        // The same period: the prorated difference.
        assert_eq!(upgrade_charge_cents(0, &april, 2900, &april, t), 1450);
        // pro yearly -> pro monthly: the unused year is worth more than the month: nothing, no refund.
        assert_eq!(upgrade_charge_cents(29000, &year, 2900, &april, t), 0);
    }

    fn catalog() -> PlanCatalog {
        let l = |m, b, a, s, pm, py| PlanLimits {
            messages: m,
            background_tasks: b,
            api_calls: a,
            storage_mb: s,
            price_monthly_cents: pm,
            price_yearly_cents: py,
            features: vec![],
        };
        PlanCatalog {
            free: l(10, 5, 20, 100, 0, 0),
            pro: l(100, 50, 500, 1000, 2900, 29000),
            enterprise: l(10000, 1000, 50000, 10000, 9900, 99000),
        }
    }

    #[test]
    fn overrides_change_only_the_named_fields_and_refuse_unknown_ones() {
        let c = catalog()
            .with_overrides(&serde_json::json!({"free": {"messages": 3}}))
            .expect("valid");
        assert_eq!(c.free.messages, 3);
        assert_eq!(c.free.api_calls, 20);
        assert_eq!(c.pro, catalog().pro);
        assert!(catalog()
            .with_overrides(&serde_json::json!({"gold": {"messages": 1}}))
            .is_err());
        assert!(catalog()
            .with_overrides(&serde_json::json!({"free": {"tokens": 1}}))
            .is_err());
        assert!(catalog()
            .with_overrides(&serde_json::json!({"free": {"messages": "many"}}))
            .is_err());
    }
}
