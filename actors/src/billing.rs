//! Subscriptions and invoices: the rules, over the stores.
//!
//! - A user without a subscription row gets one made from `users.subscription_plan`
//!   (never a silent "free").
//! - Upgrades take effect now: the charge is the new plan's price for the time left
//!   in the period minus the old plan's price for the same time (never negative).
//! - Downgrades and cancellations take effect at the period end.
//! - Periods roll over lazily, whenever a subscription is read: each closed period
//!   gets one invoice (plan charge, prorated adjustments, usage, total).
//! - An admin's plan change (users.subscription_plan) is followed on the next read.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use crate::domain::{Invoice, Subscription, SubscriptionStatus, User, UserPatch};
use crate::plans::Plan;
use crate::plans::PlanBook;
use crate::plans::{billing_period, month_of, BillingCycle, Period, PlanLimits, Resource};
use crate::ports::{AccountStore, StoreError, StoreResult, UsageStore};

pub const CURRENCY: &str = "usd";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effective {
    Now,
    PeriodEnd,
}

#[derive(Debug, Clone)]
pub struct PlanChange {
    pub subscription: Subscription,
    pub effective: Effective,
    pub prorated_charge_cents: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("already on the {0} plan with this billing cycle")]
    NoChange(Plan),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone)]
pub struct UsageSummary {
    pub plan: Plan,
    pub period: Period,
    pub used: std::collections::BTreeMap<Resource, u64>,
    pub limits: PlanLimits,
}

fn rank(p: Plan) -> u8 {
    match p {
        Plan::Free => 0,
        Plan::Pro => 1,
        Plan::Enterprise => 2,
    }
}

pub struct Billing {
    accounts: Arc<dyn AccountStore>,
    usage: Arc<dyn UsageStore>,
    plans: Arc<PlanBook>,
}

impl Billing {
    pub fn new(accounts: Arc<dyn AccountStore>, usage: Arc<dyn UsageStore>, plans: Arc<PlanBook>) -> Self {
        Billing { accounts, usage, plans }
    }

    pub fn limits(&self, plan: Plan) -> PlanLimits {
        self.plans.current().get(plan).clone()
    }

    fn price(&self, plan: Plan, cycle: BillingCycle) -> u64 {
        self.plans.current().get(plan).price_cents(cycle)
    }

    fn fresh(&self, user_id: Uuid, plan: Plan, cycle: BillingCycle, now: DateTime<Utc>) -> Subscription {
        let period = billing_period(cycle, now, now);
        Subscription {
            user_id,
            plan,
            status: SubscriptionStatus::Active,
            billing_cycle: cycle,
            amount_cents: self.price(plan, cycle),
            currency: CURRENCY.into(),
            started_at: now,
            current_period_start: period.start,
            current_period_end: period.end,
            auto_renew: true,
            pending_plan: None,
            period_adjustments_cents: 0,
        }
    }

    /// The user's subscription, created or brought up to date (closed periods
    /// invoiced, pending changes applied, admin plan changes followed).
    pub async fn subscription(&self, user: &User, now: DateTime<Utc>) -> StoreResult<Subscription> {
        let mut sub = match self.usage.subscription(user.id).await? {
            Some(s) => s,
            None => {
                let s = self.fresh(user.id, user.subscription_plan, BillingCycle::Monthly, now);
                self.usage.put_subscription(&s).await?;
                return Ok(s);
            }
        };
        let mut changed = false;
        while now >= sub.current_period_end {
            self.close_period(&sub, now).await?;
            let mut next_plan = sub.pending_plan.take().unwrap_or(sub.plan);
            if sub.status == SubscriptionStatus::Canceled || !sub.auto_renew {
                next_plan = Plan::Free;
                sub.status = SubscriptionStatus::Active;
                sub.auto_renew = true;
            }
            if next_plan != sub.plan {
                self.accounts
                    .update_user(
                        user.id,
                        &UserPatch {
                            subscription_plan: Some(next_plan),
                            ..Default::default()
                        },
                    )
                    .await?;
                sub.plan = next_plan;
            }
            sub.amount_cents = self.price(sub.plan, sub.billing_cycle);
            let next = billing_period(sub.billing_cycle, sub.started_at, sub.current_period_end);
            sub.current_period_start = next.start;
            sub.current_period_end = next.end;
            sub.period_adjustments_cents = 0;
            changed = true;
        }
        // An admin changed the plan directly: follow it.
        let user_plan = self
            .accounts
            .user_by_id(user.id)
            .await?
            .map(|u| u.subscription_plan)
            .unwrap_or(user.subscription_plan);
        if user_plan != sub.plan {
            sub.plan = user_plan;
            sub.amount_cents = self.price(user_plan, sub.billing_cycle);
            sub.pending_plan = None;
            changed = true;
        }
        if changed {
            self.usage.put_subscription(&sub).await?;
        }
        Ok(sub)
    }

    async fn close_period(&self, sub: &Subscription, now: DateTime<Utc>) -> StoreResult<()> {
        let period = Period {
            start: sub.current_period_start,
            end: sub.current_period_end,
        };
        let totals = self.usage.usage_totals(sub.user_id, period).await?;
        let usage: serde_json::Map<String, serde_json::Value> = Resource::ALL
            .iter()
            .map(|r| (r.as_str().to_string(), json!(totals.get(r).copied().unwrap_or(0))))
            .collect();
        self.usage
            .insert_invoice(&Invoice {
                id: Uuid::new_v4(),
                user_id: sub.user_id,
                period_start: period.start,
                period_end: period.end,
                plan: sub.plan,
                plan_charge_cents: sub.amount_cents,
                adjustments_cents: sub.period_adjustments_cents,
                usage: serde_json::Value::Object(usage),
                total_cents: sub.amount_cents + sub.period_adjustments_cents,
                currency: sub.currency.clone(),
                created_at: now,
            })
            .await
    }

    /// Changes plan and/or billing cycle (see the module docs for the rules).
    pub async fn change_plan(
        &self,
        user: &User,
        plan: Plan,
        cycle: BillingCycle,
        now: DateTime<Utc>,
    ) -> Result<PlanChange, BillingError> {
        let mut sub = self.subscription(user, now).await?;
        if plan == sub.plan && cycle == sub.billing_cycle {
            if sub.pending_plan.is_some() || sub.status == SubscriptionStatus::Canceled {
                // Re-choosing the current plan undoes a pending downgrade or cancellation.
                sub.pending_plan = None;
                sub.status = SubscriptionStatus::Active;
                sub.auto_renew = true;
                self.usage.put_subscription(&sub).await?;
                return Ok(PlanChange {
                    subscription: sub,
                    effective: Effective::Now,
                    prorated_charge_cents: 0,
                });
            }
            return Err(BillingError::NoChange(plan));
        }
        if rank(plan) < rank(sub.plan) {
            sub.pending_plan = Some(plan);
            self.usage.put_subscription(&sub).await?;
            return Ok(PlanChange {
                subscription: sub,
                effective: Effective::PeriodEnd,
                prorated_charge_cents: 0,
            });
        }
        // Upgrade (or a cycle change): now, prorated.
        let old = Period {
            start: sub.current_period_start,
            end: sub.current_period_end,
        };
        let credit = self.price(sub.plan, sub.billing_cycle) as f64 * old.remaining_fraction(now);
        let new_period = if cycle == sub.billing_cycle {
            old
        } else {
            billing_period(cycle, now, now)
        };
        let cost = self.price(plan, cycle) as f64 * new_period.remaining_fraction(now);
        let charge = (cost - credit).max(0.0).round() as u64;
        if cycle != sub.billing_cycle {
            sub.started_at = now;
            sub.current_period_start = new_period.start;
            sub.current_period_end = new_period.end;
        }
        sub.plan = plan;
        sub.billing_cycle = cycle;
        sub.amount_cents = self.price(plan, cycle);
        sub.period_adjustments_cents += charge;
        sub.pending_plan = None;
        sub.status = SubscriptionStatus::Active;
        sub.auto_renew = true;
        self.accounts
            .update_user(
                user.id,
                &UserPatch {
                    subscription_plan: Some(plan),
                    ..Default::default()
                },
            )
            .await?;
        self.usage.put_subscription(&sub).await?;
        Ok(PlanChange {
            subscription: sub,
            effective: Effective::Now,
            prorated_charge_cents: charge,
        })
    }

    /// Cancels: the plan runs to the period end, then the user is on free.
    pub async fn cancel(&self, user: &User, now: DateTime<Utc>) -> StoreResult<Subscription> {
        let mut sub = self.subscription(user, now).await?;
        if sub.plan != Plan::Free {
            sub.status = SubscriptionStatus::Canceled;
            sub.auto_renew = false;
            sub.pending_plan = Some(Plan::Free);
            self.usage.put_subscription(&sub).await?;
        }
        Ok(sub)
    }

    pub async fn invoices(&self, user: &User, now: DateTime<Utc>) -> StoreResult<Vec<Invoice>> {
        self.subscription(user, now).await?;
        self.usage.invoices(user.id).await
    }

    /// This month's counters against the plan's limits.
    pub async fn usage_summary(&self, user: &User, now: DateTime<Utc>) -> StoreResult<UsageSummary> {
        let sub = self.subscription(user, now).await?;
        let period = month_of(now);
        let used = self.usage.counters(user.id, period.start).await?;
        Ok(UsageSummary {
            plan: sub.plan,
            period,
            used,
            limits: self.limits(sub.plan),
        })
    }
}
