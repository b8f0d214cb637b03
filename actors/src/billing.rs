//! Subscriptions, upgrades and invoices: the rules, over the stores.
//!
//! - A user without a subscription row gets one made from `users.subscription_plan`
//!   (never a silent "free").
//! - A period is billed at the price its plan had when it began (`period_base_cents`).
//!   An upgrade during the period adds the prorated difference for the time left
//!   (`plans::upgrade_charge_cents`) to the period's adjustments; the period's
//!   invoice is the base plus the adjustments, so the new plan's full price is never
//!   charged on top (it is the next period's base). A cycle change starts a new
//!   period carrying the old base: it pays the new price for the new period's time
//!   left minus the old price for the old period's time left.
//! - Self-service upgrades (a higher plan, or a cycle change that costs something)
//!   take one of two paths. With a payment provider (`PaymentProvider`) the prorated
//!   charge is taken first and the change applies only after it succeeded. Without
//!   one (the default) nothing is applied: the upgrade becomes an `UpgradeRequest`
//!   (at most one pending per user) that an administrator approves — then it applies
//!   with the proration of the time left at approval — or rejects; the user may
//!   cancel it.
//! - Downgrades and cancellations take effect at the period end, with no refund or
//!   credit for the rest of the period (its invoice stays base plus adjustments).
//!   Cycle changes that cost nothing apply now.
//! - Periods roll over lazily, whenever a subscription is read: each closed period
//!   gets one invoice (plan charge, prorated adjustments, usage, total).
//! - An admin's plan change (users.subscription_plan) is followed on the next read;
//!   it does not change what the period is billed at.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use crate::domain::{
    Invoice, Subscription, SubscriptionStatus, UpgradeDecision, UpgradeRequest, UpgradeStatus, User, UserPatch,
};
use crate::plans::Plan;
use crate::plans::PlanBook;
use crate::plans::{billing_period, month_of, upgrade_charge_cents, BillingCycle, Period, PlanLimits, Resource};
use crate::ports::{
    AccountStore, ChargeRequest, PaymentError, PaymentProvider, PaymentRef, StoreError, StoreResult, UsageStore,
};

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
    /// The provider's reference of the charge, when one was taken.
    pub payment: Option<PaymentRef>,
}

/// What a self-service plan change did.
#[derive(Debug, Clone)]
pub enum ChangeOutcome {
    /// Applied now (paid upgrades, changes that cost nothing) or scheduled for
    /// the period end (downgrades).
    Changed(PlanChange),
    /// An upgrade waiting for an administrator (no payment provider).
    Requested(UpgradeRequest),
}

/// How self-service upgrades are paid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradePath {
    /// Charged through the named payment provider, applied once paid.
    Payment(&'static str),
    /// Requested, applied when an administrator approves.
    Approval,
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("already on the {0} plan with this billing cycle")]
    NoChange(Plan),
    #[error("an upgrade request is already pending")]
    RequestPending,
    #[error("no such upgrade request")]
    RequestNotFound,
    #[error("the upgrade request is already {}", .0.as_str())]
    RequestClosed(UpgradeStatus),
    /// The request is no longer an upgrade (the plan changed since); it was closed
    /// as stale and nothing was applied.
    #[error("{0}")]
    RequestStale(String),
    /// The subscription changed while this change was being made (a concurrent
    /// change won); any charge taken was refunded.
    #[error("the subscription changed meanwhile; read it again and retry")]
    ChangedMeanwhile,
    #[error(transparent)]
    Payment(#[from] PaymentError),
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

/// What a requested plan and cycle are to the current subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Same,
    Downgrade,
    /// A higher plan (with or without a cycle change).
    Upgrade,
    /// The same plan on the other billing cycle.
    CycleChange,
}

fn kind(sub: &Subscription, plan: Plan, cycle: BillingCycle) -> Kind {
    if rank(plan) < rank(sub.plan) {
        Kind::Downgrade
    } else if rank(plan) > rank(sub.plan) {
        Kind::Upgrade
    } else if cycle != sub.billing_cycle {
        Kind::CycleChange
    } else {
        Kind::Same
    }
}

fn current_period(sub: &Subscription) -> Period {
    Period {
        start: sub.current_period_start,
        end: sub.current_period_end,
    }
}

pub struct Billing {
    accounts: Arc<dyn AccountStore>,
    usage: Arc<dyn UsageStore>,
    plans: Arc<PlanBook>,
    payments: Option<Arc<dyn PaymentProvider>>,
}

impl Billing {
    /// Billing without a payment provider: upgrades become requests.
    pub fn new(accounts: Arc<dyn AccountStore>, usage: Arc<dyn UsageStore>, plans: Arc<PlanBook>) -> Self {
        Billing {
            accounts,
            usage,
            plans,
            payments: None,
        }
    }

    /// Upgrades are paid through this provider (None: approved by an administrator).
    pub fn with_payments(mut self, provider: Option<Arc<dyn PaymentProvider>>) -> Self {
        self.payments = provider;
        self
    }

    pub fn upgrade_path(&self) -> UpgradePath {
        match &self.payments {
            Some(p) => UpgradePath::Payment(p.name()),
            None => UpgradePath::Approval,
        }
    }

    pub fn limits(&self, plan: Plan) -> PlanLimits {
        self.plans.current().get(plan).clone()
    }

    fn price(&self, plan: Plan, cycle: BillingCycle) -> u64 {
        self.plans.current().get(plan).price_cents(cycle)
    }

    fn fresh(&self, user_id: Uuid, plan: Plan, cycle: BillingCycle, now: DateTime<Utc>) -> Subscription {
        let period = billing_period(cycle, now, now);
        let price = self.price(plan, cycle);
        Subscription {
            user_id,
            plan,
            status: SubscriptionStatus::Active,
            billing_cycle: cycle,
            amount_cents: price,
            currency: CURRENCY.into(),
            started_at: now,
            current_period_start: period.start,
            current_period_end: period.end,
            auto_renew: true,
            pending_plan: None,
            period_adjustments_cents: 0,
            period_base_cents: price,
        }
    }

    /// The subscription after moving to `plan` on `cycle` at `now` (an upgrade or a
    /// cycle change), and the prorated charge that comes with it.
    fn upgraded(&self, sub: &Subscription, plan: Plan, cycle: BillingCycle, now: DateTime<Utc>) -> (Subscription, u64) {
        let old = current_period(sub);
        let new_period = if cycle == sub.billing_cycle {
            old
        } else {
            billing_period(cycle, now, now)
        };
        let charge = upgrade_charge_cents(
            self.price(sub.plan, sub.billing_cycle),
            &old,
            self.price(plan, cycle),
            &new_period,
            now,
        );
        let mut next = sub.clone();
        if cycle != sub.billing_cycle {
            // A new period; it carries the old one's base (see the module docs).
            next.started_at = now;
            next.current_period_start = new_period.start;
            next.current_period_end = new_period.end;
        }
        next.plan = plan;
        next.billing_cycle = cycle;
        next.amount_cents = self.price(plan, cycle);
        next.period_adjustments_cents = sub.period_adjustments_cents.saturating_add(charge);
        next.pending_plan = None;
        next.status = SubscriptionStatus::Active;
        next.auto_renew = true;
        (next, charge)
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
            sub.period_base_cents = sub.amount_cents;
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
                plan_charge_cents: sub.period_base_cents,
                adjustments_cents: sub.period_adjustments_cents,
                usage: serde_json::Value::Object(usage),
                total_cents: sub.period_base_cents.saturating_add(sub.period_adjustments_cents),
                currency: sub.currency.clone(),
                created_at: now,
            })
            .await
    }

    /// Changes plan and/or billing cycle (see the module docs for the rules):
    /// downgrades are scheduled for the period end, changes that cost nothing apply
    /// now, upgrades are paid through the provider or become a request.
    pub async fn change_plan(
        &self,
        user: &User,
        plan: Plan,
        cycle: BillingCycle,
        now: DateTime<Utc>,
    ) -> Result<ChangeOutcome, BillingError> {
        let sub = self.subscription(user, now).await?;
        match kind(&sub, plan, cycle) {
            Kind::Same => {
                if sub.pending_plan.is_none() && sub.status != SubscriptionStatus::Canceled {
                    return Err(BillingError::NoChange(plan));
                }
                // Re-choosing the current plan undoes a pending downgrade or cancellation.
                let mut next = sub.clone();
                next.pending_plan = None;
                next.status = SubscriptionStatus::Active;
                next.auto_renew = true;
                self.apply(&sub, next, 0, None).await.map(ChangeOutcome::Changed)
            }
            Kind::Downgrade => {
                let mut next = sub.clone();
                next.pending_plan = Some(plan);
                let mut change = self.apply(&sub, next, 0, None).await?;
                change.effective = Effective::PeriodEnd;
                Ok(ChangeOutcome::Changed(change))
            }
            k @ (Kind::Upgrade | Kind::CycleChange) => {
                let (next, charge) = self.upgraded(&sub, plan, cycle, now);
                if k == Kind::CycleChange && charge == 0 {
                    return self.apply(&sub, next, 0, None).await.map(ChangeOutcome::Changed);
                }
                match &self.payments {
                    Some(provider) => self
                        .pay_and_apply(provider.as_ref(), &sub, next, charge)
                        .await
                        .map(ChangeOutcome::Changed),
                    None => self
                        .request(&sub, plan, cycle, charge, now)
                        .await
                        .map(ChangeOutcome::Requested),
                }
            }
        }
    }

    /// Writes a change (and the user's plan) unless the subscription changed
    /// meanwhile: a concurrent change (an approval, a paid upgrade) is never
    /// overwritten by one made from an older read.
    async fn apply(
        &self,
        before: &Subscription,
        next: Subscription,
        charge: u64,
        payment: Option<PaymentRef>,
    ) -> Result<PlanChange, BillingError> {
        if !self.usage.commit_plan_change(before, &next, None).await? {
            return Err(BillingError::ChangedMeanwhile);
        }
        Ok(PlanChange {
            subscription: next,
            effective: Effective::Now,
            prorated_charge_cents: charge,
            payment,
        })
    }

    /// Charges the prorated amount, then applies the change; a change that cannot
    /// be applied after the charge gives the charge back.
    async fn pay_and_apply(
        &self,
        provider: &dyn PaymentProvider,
        before: &Subscription,
        next: Subscription,
        charge: u64,
    ) -> Result<PlanChange, BillingError> {
        let payment = if charge == 0 {
            None
        } else {
            let request = ChargeRequest {
                id: Uuid::new_v4(),
                user_id: before.user_id,
                amount_cents: charge,
                currency: before.currency.clone(),
                description: format!(
                    "Upgrade from {} ({}) to {} ({}), prorated to {}",
                    before.plan,
                    before.billing_cycle.as_str(),
                    next.plan,
                    next.billing_cycle.as_str(),
                    next.current_period_end.format("%Y-%m-%d")
                ),
            };
            Some(provider.charge(&request).await?)
        };
        let result = self.apply(before, next, charge, payment.clone()).await;
        if let (Err(e), Some(paid)) = (&result, &payment) {
            match provider.refund(paid).await {
                Ok(()) => tracing::warn!(user = %before.user_id, reference = %paid.reference, error = %e,
                    "plan change not applied after its charge: refunded"),
                Err(r) => {
                    tracing::error!(user = %before.user_id, provider = paid.provider, reference = %paid.reference,
                    error = %e, refund_error = %r, "plan change not applied after its charge and the refund failed: refund it by hand")
                }
            }
        }
        result
    }

    /// Stores an upgrade request (nothing is applied).
    async fn request(
        &self,
        sub: &Subscription,
        plan: Plan,
        cycle: BillingCycle,
        quoted: u64,
        now: DateTime<Utc>,
    ) -> Result<UpgradeRequest, BillingError> {
        let request = UpgradeRequest {
            id: Uuid::new_v4(),
            user_id: sub.user_id,
            plan,
            billing_cycle: cycle,
            from_plan: sub.plan,
            from_cycle: sub.billing_cycle,
            status: UpgradeStatus::Pending,
            quoted_cents: quoted,
            charged_cents: None,
            created_at: now,
            decided_at: None,
            decided_by: None,
            note: None,
        };
        match self.usage.insert_upgrade_request(&request).await {
            Ok(()) => Ok(request),
            Err(StoreError::Conflict(_)) => Err(BillingError::RequestPending),
            Err(e) => Err(e.into()),
        }
    }

    /// The user's newest upgrade request (pending or decided).
    pub async fn latest_request(&self, user: &User) -> StoreResult<Option<UpgradeRequest>> {
        self.usage.latest_upgrade_request(user.id).await
    }

    /// The user's pending upgrade request, if any.
    pub async fn pending_request(&self, user: &User) -> StoreResult<Option<UpgradeRequest>> {
        Ok(self
            .latest_request(user)
            .await?
            .filter(|r| r.status == UpgradeStatus::Pending))
    }

    /// Upgrade requests with a status (all when None), oldest first.
    pub async fn requests(
        &self,
        status: Option<UpgradeStatus>,
        page: crate::domain::Page,
    ) -> StoreResult<(Vec<UpgradeRequest>, u64)> {
        self.usage.upgrade_requests(status, page).await
    }

    /// Closes a pending request; `RequestNotFound` or `RequestClosed` otherwise.
    async fn close(&self, id: Uuid, decision: UpgradeDecision) -> Result<UpgradeRequest, BillingError> {
        if self.usage.close_upgrade_request(id, &decision).await? {
            return self
                .usage
                .upgrade_request(id)
                .await?
                .ok_or(BillingError::RequestNotFound);
        }
        match self.usage.upgrade_request(id).await? {
            None => Err(BillingError::RequestNotFound),
            Some(r) => Err(BillingError::RequestClosed(r.status)),
        }
    }

    /// The user withdraws their pending request.
    pub async fn cancel_request(&self, user: &User, now: DateTime<Utc>) -> Result<UpgradeRequest, BillingError> {
        let pending = self.pending_request(user).await?.ok_or(BillingError::RequestNotFound)?;
        self.close(
            pending.id,
            UpgradeDecision {
                status: UpgradeStatus::Cancelled,
                decided_at: now,
                decided_by: None,
                note: Some("cancelled by the user".into()),
                charged_cents: None,
            },
        )
        .await
    }

    /// An administrator rejects a pending request.
    pub async fn reject_request(
        &self,
        admin: &User,
        id: Uuid,
        note: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<UpgradeRequest, BillingError> {
        self.close(
            id,
            UpgradeDecision {
                status: UpgradeStatus::Rejected,
                decided_at: now,
                decided_by: Some(admin.id),
                note,
                charged_cents: None,
            },
        )
        .await
    }

    /// An administrator approves a pending request: the change applies now with the
    /// prorated charge for the time left now, recorded on the period's invoice. A
    /// request that is no longer an upgrade is closed as stale, nothing applied.
    pub async fn approve_request(
        &self,
        admin: &User,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<(UpgradeRequest, PlanChange), BillingError> {
        let request = self
            .usage
            .upgrade_request(id)
            .await?
            .ok_or(BillingError::RequestNotFound)?;
        if request.status != UpgradeStatus::Pending {
            return Err(BillingError::RequestClosed(request.status));
        }
        let user = self
            .accounts
            .user_by_id(request.user_id)
            .await?
            .ok_or(BillingError::RequestNotFound)?;
        let sub = self.subscription(&user, now).await?;
        let k = kind(&sub, request.plan, request.billing_cycle);
        if !matches!(k, Kind::Upgrade | Kind::CycleChange) {
            let why = format!(
                "The account is now on {} ({}): {} ({}) is no longer an upgrade",
                sub.plan,
                sub.billing_cycle.as_str(),
                request.plan,
                request.billing_cycle.as_str()
            );
            let decision = UpgradeDecision {
                status: UpgradeStatus::Stale,
                decided_at: now,
                decided_by: Some(admin.id),
                note: Some(why.clone()),
                charged_cents: None,
            };
            self.close(id, decision).await?;
            return Err(BillingError::RequestStale(why));
        }
        let (next, charge) = self.upgraded(&sub, request.plan, request.billing_cycle, now);
        let decision = UpgradeDecision {
            status: UpgradeStatus::Approved,
            decided_at: now,
            decided_by: Some(admin.id),
            note: None,
            charged_cents: Some(charge),
        };
        if !self
            .usage
            .commit_plan_change(&sub, &next, Some((id, &decision)))
            .await?
        {
            return match self.usage.upgrade_request(id).await? {
                None => Err(BillingError::RequestNotFound),
                Some(r) if r.status != UpgradeStatus::Pending => Err(BillingError::RequestClosed(r.status)),
                Some(_) => Err(BillingError::ChangedMeanwhile),
            };
        }
        let approved = self
            .usage
            .upgrade_request(id)
            .await?
            .ok_or(BillingError::RequestNotFound)?;
        Ok((
            approved,
            PlanChange {
                subscription: next,
                effective: Effective::Now,
                prorated_charge_cents: charge,
                payment: None,
            },
        ))
    }

    /// Cancels: the plan runs to the period end, then the user is on free. A
    /// pending upgrade request is withdrawn with it.
    pub async fn cancel(&self, user: &User, now: DateTime<Utc>) -> Result<Subscription, BillingError> {
        let mut sub = self.subscription(user, now).await?;
        if let Some(pending) = self.pending_request(user).await? {
            let decision = UpgradeDecision {
                status: UpgradeStatus::Cancelled,
                decided_at: now,
                decided_by: None,
                note: Some("the subscription was cancelled".into()),
                charged_cents: None,
            };
            // Already closed meanwhile is fine: nothing is pending any more.
            match self.close(pending.id, decision).await {
                Ok(_) | Err(BillingError::RequestClosed(_)) | Err(BillingError::RequestNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        if sub.plan != Plan::Free {
            let mut next = sub.clone();
            next.status = SubscriptionStatus::Canceled;
            next.auto_renew = false;
            next.pending_plan = Some(Plan::Free);
            sub = self.apply(&sub, next, 0, None).await?.subscription;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::admission::fakes::{Accounts, Usage};
    use crate::plans::{PlanCatalog, PlanLimits};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc))
            .expect("valid timestamp")
    }

    type Hook = Box<dyn Fn() + Send + Sync>;

    /// A provider that records its calls, declines when told to, and can run a
    /// hook while charging (to race a change against the charge).
    #[derive(Default)]
    struct TestProvider {
        decline: AtomicBool,
        charges: Mutex<Vec<ChargeRequest>>,
        refunds: Mutex<Vec<PaymentRef>>,
        during_charge: Mutex<Option<Hook>>,
    }

    impl TestProvider {
        fn charged(&self) -> Vec<u64> {
            self.charges
                .lock()
                .map(|c| c.iter().map(|c| c.amount_cents).collect())
                .unwrap_or_default()
        }
    }

    #[async_trait]
    impl PaymentProvider for TestProvider {
        fn name(&self) -> &'static str {
            "test"
        }
        async fn charge(&self, charge: &ChargeRequest) -> Result<PaymentRef, PaymentError> {
            if self.decline.load(Ordering::Relaxed) {
                return Err(PaymentError::Declined("card declined".into()));
            }
            if let Some(hook) = self.during_charge.lock().ok().as_ref().and_then(|h| h.as_ref()) {
                hook();
            }
            if let Ok(mut c) = self.charges.lock() {
                c.push(charge.clone());
            }
            Ok(PaymentRef {
                provider: "test",
                reference: charge.id.to_string(),
            })
        }
        async fn refund(&self, payment: &PaymentRef) -> Result<(), PaymentError> {
            if let Ok(mut r) = self.refunds.lock() {
                r.push(payment.clone());
            }
            Ok(())
        }
    }

    struct World {
        billing: Billing,
        accounts: Arc<Accounts>,
        usage: Arc<Usage>,
        provider: Arc<TestProvider>,
    }

    fn catalog() -> PlanCatalog {
        let l = |pm, py| PlanLimits {
            messages: 10,
            background_tasks: 10,
            api_calls: 10,
            storage_mb: 10,
            price_monthly_cents: pm,
            price_yearly_cents: py,
            features: vec![],
        };
        PlanCatalog {
            free: l(0, 0),
            pro: l(2900, 29000),
            enterprise: l(9900, 99000),
        }
    }

    /// Billing over the fakes, paying through the test provider or (`paid: false`)
    /// with upgrades approved by an administrator.
    fn world(paid: bool) -> World {
        let accounts = Arc::new(Accounts::default());
        let usage = Arc::new(Usage::default());
        let _ = usage.accounts.set(accounts.clone());
        let provider = Arc::new(TestProvider::default());
        let billing = Billing::new(accounts.clone(), usage.clone(), Arc::new(PlanBook::new(catalog())))
            .with_payments(paid.then(|| provider.clone() as Arc<dyn PaymentProvider>));
        World {
            billing,
            accounts,
            usage,
            provider,
        }
    }

    impl World {
        /// A user on `plan` whose subscription began at `t`.
        async fn user(&self, plan: Plan, t: DateTime<Utc>) -> User {
            let id = self.accounts.add(plan);
            let user = self.accounts.user_by_id(id).await.ok().flatten().expect("user");
            self.billing.subscription(&user, t).await.expect("subscription");
            user
        }

        fn stored(&self, user: &User) -> Subscription {
            self.usage
                .subscriptions
                .lock()
                .ok()
                .and_then(|s| s.get(&user.id).cloned())
                .expect("subscription")
        }

        fn plan_of(&self, user: &User) -> Plan {
            self.accounts
                .users
                .lock()
                .ok()
                .and_then(|u| u.get(&user.id).map(|u| u.subscription_plan))
                .expect("user")
        }

        /// The invoices once the period is over (read on the 1st of the next month).
        async fn invoices_at(&self, user: &User, t: &str) -> Vec<Invoice> {
            self.billing.invoices(user, at(t)).await.expect("invoices")
        }

        async fn change(&self, user: &User, plan: Plan, cycle: BillingCycle, t: &str) -> ChangeOutcome {
            self.billing
                .change_plan(user, plan, cycle, at(t))
                .await
                .expect("plan change")
        }
    }

    fn applied(outcome: ChangeOutcome) -> PlanChange {
        match outcome {
            ChangeOutcome::Changed(c) => c,
            ChangeOutcome::Requested(r) => panic!("expected a change, got a request: {r:?}"),
        }
    }

    fn requested(outcome: ChangeOutcome) -> UpgradeRequest {
        match outcome {
            ChangeOutcome::Requested(r) => r,
            ChangeOutcome::Changed(c) => panic!("expected a request, got a change: {c:?}"),
        }
    }

    fn admin() -> User {
        let mut a = User {
            id: Uuid::new_v4(),
            email: "admin@example.com".into(),
            hashed_password: String::new(),
            full_name: None,
            is_active: true,
            is_verified: true,
            is_superuser: true,
            subscription_plan: Plan::Enterprise,
            organization_id: None,
            preferences: json!({}),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        a.email = format!("{}@example.com", a.id);
        a
    }

    const APRIL: &str = "2026-04-01T00:00:00Z"; // 30 days
    const MAY: &str = "2026-05-01T00:00:00Z";

    #[tokio::test]
    async fn free_to_pro_half_way_through_april_charges_1450_and_the_invoice_adds_nothing_more() {
        let w = world(true);
        let user = w.user(Plan::Free, at(APRIL)).await;
        let change = applied(
            w.change(&user, Plan::Pro, BillingCycle::Monthly, "2026-04-16T00:00:00Z")
                .await,
        );
        assert_eq!((change.effective, change.prorated_charge_cents), (Effective::Now, 1450));
        assert!(change.payment.is_some());
        assert_eq!(
            w.provider.charged(),
            vec![1450],
            "the prorated difference, charged once"
        );
        let sub = w.stored(&user);
        assert_eq!(
            (
                sub.plan,
                sub.amount_cents,
                sub.period_base_cents,
                sub.period_adjustments_cents
            ),
            (Plan::Pro, 2900, 0, 1450)
        );
        assert_eq!(w.plan_of(&user), Plan::Pro);

        let invoices = w.invoices_at(&user, MAY).await;
        assert_eq!(invoices.len(), 1);
        let april = &invoices[0];
        assert_eq!(april.period_start, at(APRIL));
        assert_eq!(
            (
                april.plan,
                april.plan_charge_cents,
                april.adjustments_cents,
                april.total_cents
            ),
            (Plan::Pro, 0, 1450, 1450),
            "the period was billed at free: only the prorated 1450, not 2900 on top"
        );
        let may = w.stored(&user);
        assert_eq!(
            (
                may.current_period_start,
                may.period_base_cents,
                may.period_adjustments_cents
            ),
            (at(MAY), 2900, 0),
            "the next period is billed at the new price"
        );
    }

    #[tokio::test]
    async fn pro_to_enterprise_after_ten_days_charges_the_difference_for_the_twenty_left() {
        let w = world(true);
        let user = w.user(Plan::Pro, at(APRIL)).await;
        let change = applied(
            w.change(&user, Plan::Enterprise, BillingCycle::Monthly, "2026-04-11T00:00:00Z")
                .await,
        );
        // (9900 - 2900) x 20/30 = 4666.67
        assert_eq!(change.prorated_charge_cents, 4667);
        let invoices = w.invoices_at(&user, MAY).await;
        assert_eq!(
            (
                invoices[0].plan_charge_cents,
                invoices[0].adjustments_cents,
                invoices[0].total_cents
            ),
            (2900, 4667, 7567),
            "pro for 10 days (966.67) + enterprise for 20 (6600)"
        );
    }

    #[tokio::test]
    async fn two_upgrades_in_one_cycle_pay_each_plan_for_its_days() {
        let w = world(true);
        let user = w.user(Plan::Free, at(APRIL)).await;
        let first = applied(
            w.change(&user, Plan::Pro, BillingCycle::Monthly, "2026-04-16T00:00:00Z")
                .await,
        );
        let second = applied(
            w.change(&user, Plan::Enterprise, BillingCycle::Monthly, "2026-04-21T00:00:00Z")
                .await,
        );
        // 2900 x 15/30; then (9900 - 2900) x 10/30 = 2333.33
        assert_eq!(
            (first.prorated_charge_cents, second.prorated_charge_cents),
            (1450, 2333)
        );
        assert_eq!(w.provider.charged(), vec![1450, 2333]);
        let invoices = w.invoices_at(&user, MAY).await;
        assert_eq!(
            (invoices[0].plan_charge_cents, invoices[0].total_cents),
            (0, 3783),
            "free 15 days + pro 5 days (483.33) + enterprise 10 days (3300)"
        );
        assert_eq!(w.stored(&user).period_base_cents, 9900);
    }

    #[tokio::test]
    async fn a_downgrade_waits_for_the_period_end_with_no_refund_or_credit() {
        let w = world(true);
        let user = w.user(Plan::Enterprise, at(APRIL)).await;
        let change = applied(
            w.change(&user, Plan::Pro, BillingCycle::Monthly, "2026-04-16T00:00:00Z")
                .await,
        );
        assert_eq!(
            (change.effective, change.prorated_charge_cents, change.subscription.plan),
            (Effective::PeriodEnd, 0, Plan::Enterprise)
        );
        assert!(w.provider.charged().is_empty(), "nothing is charged");
        let invoices = w.invoices_at(&user, MAY).await;
        assert_eq!(
            (
                invoices[0].plan_charge_cents,
                invoices[0].adjustments_cents,
                invoices[0].total_cents
            ),
            (9900, 0, 9900),
            "the whole period at enterprise: no credit for the half after the downgrade"
        );
        let may = w.stored(&user);
        assert_eq!((may.plan, may.period_base_cents), (Plan::Pro, 2900));
        assert_eq!(w.plan_of(&user), Plan::Pro);
    }

    #[tokio::test]
    async fn a_cycle_change_carries_the_old_base_and_one_that_costs_nothing_applies_without_payment() {
        let w = world(true);
        let user = w.user(Plan::Pro, at(APRIL)).await;
        let change = applied(
            w.change(&user, Plan::Pro, BillingCycle::Yearly, "2026-04-16T00:00:00Z")
                .await,
        );
        // 29000 x 350/365 - 2900 x 15/30 = 26358.2
        assert_eq!(change.prorated_charge_cents, 26358);
        let sub = w.stored(&user);
        assert_eq!(
            (sub.current_period_start, sub.current_period_end),
            (at(APRIL), at("2027-04-01T00:00:00Z"))
        );
        let invoices = w.invoices_at(&user, "2027-04-01T00:00:00Z").await;
        assert_eq!(invoices.len(), 1, "April's monthly period became the yearly one");
        assert_eq!(
            (invoices[0].plan_charge_cents, invoices[0].total_cents),
            (2900, 29258),
            "pro monthly for half of April (1450) + pro yearly for 350 days (27808)"
        );

        // Free monthly -> free yearly costs nothing: applied at once, even without a provider.
        let w = world(false);
        let user = w.user(Plan::Free, at(APRIL)).await;
        let change = applied(
            w.change(&user, Plan::Free, BillingCycle::Yearly, "2026-04-16T00:00:00Z")
                .await,
        );
        assert_eq!((change.effective, change.prorated_charge_cents), (Effective::Now, 0));
        assert_eq!(w.stored(&user).billing_cycle, BillingCycle::Yearly);
    }

    #[tokio::test]
    async fn without_a_provider_an_upgrade_is_a_request_applied_only_when_approved() {
        let w = world(false);
        let user = w.user(Plan::Free, at(APRIL)).await;
        let request = requested(
            w.change(&user, Plan::Pro, BillingCycle::Monthly, "2026-04-16T00:00:00Z")
                .await,
        );
        assert_eq!(
            (request.status, request.quoted_cents, request.from_plan),
            (UpgradeStatus::Pending, 1450, Plan::Free)
        );
        assert_eq!(w.stored(&user).plan, Plan::Free, "nothing applied");
        assert_eq!(w.plan_of(&user), Plan::Free);
        let again = w
            .billing
            .change_plan(
                &user,
                Plan::Enterprise,
                BillingCycle::Monthly,
                at("2026-04-17T00:00:00Z"),
            )
            .await;
        assert!(matches!(again, Err(BillingError::RequestPending)), "{again:?}");

        // Approved five days later: charged for the 10 days left then.
        let admin = admin();
        let (approved, change) = w
            .billing
            .approve_request(&admin, request.id, at("2026-04-21T00:00:00Z"))
            .await
            .expect("approved");
        assert_eq!(
            (approved.status, approved.charged_cents, approved.decided_by),
            (UpgradeStatus::Approved, Some(967), Some(admin.id))
        );
        assert_eq!(change.prorated_charge_cents, 967);
        assert_eq!(w.plan_of(&user), Plan::Pro);
        let twice = w
            .billing
            .approve_request(&admin, request.id, at("2026-04-22T00:00:00Z"))
            .await;
        assert!(
            matches!(twice, Err(BillingError::RequestClosed(UpgradeStatus::Approved))),
            "{twice:?}"
        );
        assert_eq!(w.stored(&user).period_adjustments_cents, 967, "applied once");
        let invoices = w.invoices_at(&user, MAY).await;
        assert_eq!((invoices[0].plan_charge_cents, invoices[0].total_cents), (0, 967));
    }

    #[tokio::test]
    async fn rejected_cancelled_and_stale_requests_apply_nothing() {
        let w = world(false);
        let admin = admin();
        let user = w.user(Plan::Free, at(APRIL)).await;
        let t = "2026-04-16T00:00:00Z";

        let r = requested(w.change(&user, Plan::Pro, BillingCycle::Monthly, t).await);
        let rejected = w
            .billing
            .reject_request(&admin, r.id, Some("no".into()), at(t))
            .await
            .expect("rejected");
        assert_eq!(
            (rejected.status, rejected.note.as_deref()),
            (UpgradeStatus::Rejected, Some("no"))
        );
        let approve_rejected = w.billing.approve_request(&admin, r.id, at(t)).await;
        assert!(matches!(
            approve_rejected,
            Err(BillingError::RequestClosed(UpgradeStatus::Rejected))
        ));

        let r = requested(w.change(&user, Plan::Pro, BillingCycle::Monthly, t).await);
        let cancelled = w.billing.cancel_request(&user, at(t)).await.expect("cancelled");
        assert_eq!((cancelled.id, cancelled.status), (r.id, UpgradeStatus::Cancelled));
        assert!(matches!(
            w.billing.cancel_request(&user, at(t)).await,
            Err(BillingError::RequestNotFound)
        ));

        // Stale: an admin put the account on enterprise before the pro request was approved.
        let r = requested(w.change(&user, Plan::Pro, BillingCycle::Monthly, t).await);
        w.accounts
            .update_user(
                user.id,
                &UserPatch {
                    subscription_plan: Some(Plan::Enterprise),
                    ..Default::default()
                },
            )
            .await
            .expect("admin change");
        let stale = w.billing.approve_request(&admin, r.id, at(t)).await;
        assert!(matches!(stale, Err(BillingError::RequestStale(_))), "{stale:?}");
        let closed = w.usage.upgrade_request(r.id).await.ok().flatten().expect("request");
        assert_eq!(closed.status, UpgradeStatus::Stale);
        let sub = w.stored(&user);
        assert_eq!((sub.plan, sub.period_adjustments_cents), (Plan::Enterprise, 0));
        assert!(w.billing.pending_request(&user).await.expect("read").is_none());
        assert!(matches!(
            w.billing.approve_request(&admin, Uuid::new_v4(), at(t)).await,
            Err(BillingError::RequestNotFound)
        ));

        // Cancelling the subscription withdraws a pending request.
        let user = w.user(Plan::Pro, at(APRIL)).await;
        let r = requested(w.change(&user, Plan::Enterprise, BillingCycle::Monthly, t).await);
        w.billing.cancel(&user, at(t)).await.expect("cancel");
        let closed = w.usage.upgrade_request(r.id).await.ok().flatten().expect("request");
        assert_eq!(closed.status, UpgradeStatus::Cancelled);
    }

    #[tokio::test]
    async fn a_declined_charge_applies_nothing() {
        let w = world(true);
        w.provider.decline.store(true, Ordering::Relaxed);
        let user = w.user(Plan::Free, at(APRIL)).await;
        let result = w
            .billing
            .change_plan(&user, Plan::Pro, BillingCycle::Monthly, at("2026-04-16T00:00:00Z"))
            .await;
        assert!(
            matches!(result, Err(BillingError::Payment(PaymentError::Declined(_)))),
            "{result:?}"
        );
        let sub = w.stored(&user);
        assert_eq!((sub.plan, sub.period_adjustments_cents), (Plan::Free, 0));
        assert_eq!(w.plan_of(&user), Plan::Free);
        assert_eq!(w.invoices_at(&user, MAY).await[0].total_cents, 0);
    }

    #[tokio::test]
    async fn a_change_made_while_charging_wins_and_the_charge_is_given_back() {
        let w = world(true);
        let user = w.user(Plan::Free, at(APRIL)).await;
        let usage = w.usage.clone();
        let uid = user.id;
        if let Ok(mut h) = w.provider.during_charge.lock() {
            *h = Some(Box::new(move || {
                if let Ok(mut subs) = usage.subscriptions.lock() {
                    if let Some(s) = subs.get_mut(&uid) {
                        s.period_adjustments_cents += 1; // another upgrade landed meanwhile
                    }
                }
            }));
        }
        let result = w
            .billing
            .change_plan(&user, Plan::Pro, BillingCycle::Monthly, at("2026-04-16T00:00:00Z"))
            .await;
        assert!(matches!(result, Err(BillingError::ChangedMeanwhile)), "{result:?}");
        assert_eq!(w.provider.refunds.lock().map(|r| r.len()).unwrap_or(0), 1);
        assert_eq!(w.plan_of(&user), Plan::Free);
    }
}
