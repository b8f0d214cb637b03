//! Adapters of the core's `PaymentProvider` port, chosen by `billing.payment_provider`:
//!
//! - `none` (the default): no provider. Self-service upgrades are not applied: they
//!   become requests an administrator approves or rejects (`ragchat_actors::billing`).
//! - `invoice`: charges go on the account. Each is recorded in the `payments` table
//!   (through `UsageStore::record_payment`) and collected with the account's invoices
//!   (bank transfer, purchase order), within a monthly credit limit per account
//!   (`billing.invoice_credit_limit_cents`): a charge past it is declined, and the
//!   upgrade it was for is not applied (402). A refund gives the amount back to the
//!   month's credit.
//!
//! A card processor would be another adapter of the same port.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use ragchat_actors::domain::Payment;
use ragchat_actors::plans::month_of;
use ragchat_actors::ports::{ChargeRequest, PaymentError, PaymentProvider, PaymentRef, UsageStore};
use uuid::Uuid;

use crate::config::BillingSettings;

/// Charges on account, within a monthly credit limit.
pub struct InvoiceProvider {
    usage: Arc<dyn UsageStore>,
    credit_limit_cents: u64,
}

impl InvoiceProvider {
    pub const NAME: &'static str = "invoice";

    pub fn new(usage: Arc<dyn UsageStore>, credit_limit_cents: u64) -> Self {
        InvoiceProvider {
            usage,
            credit_limit_cents,
        }
    }
}

#[async_trait]
impl PaymentProvider for InvoiceProvider {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    async fn charge(&self, charge: &ChargeRequest) -> Result<PaymentRef, PaymentError> {
        let now = Utc::now();
        let payment = Payment {
            id: charge.id,
            user_id: charge.user_id,
            amount_cents: charge.amount_cents,
            currency: charge.currency.clone(),
            description: charge.description.clone(),
            month_start: month_of(now).start,
            refunded: false,
            created_at: now,
        };
        if !self.usage.record_payment(&payment, self.credit_limit_cents).await? {
            return Err(PaymentError::Declined(format!(
                "a charge of {} cents would take this account past its monthly credit limit of {} cents",
                charge.amount_cents, self.credit_limit_cents
            )));
        }
        Ok(PaymentRef {
            provider: Self::NAME,
            reference: charge.id.to_string(),
        })
    }

    async fn refund(&self, payment: &PaymentRef) -> Result<(), PaymentError> {
        let id = Uuid::parse_str(&payment.reference)
            .map_err(|e| PaymentError::Internal(format!("not an invoice charge '{}': {e}", payment.reference)))?;
        if !self.usage.refund_payment(id).await? {
            tracing::warn!(reference = %payment.reference, "refund of a charge that is not recorded or already refunded");
        }
        Ok(())
    }
}

/// The configured provider; None for `none` (upgrades are approved by an
/// administrator). `Settings::validate` has refused any other name.
pub fn provider(settings: &BillingSettings, usage: Arc<dyn UsageStore>) -> Option<Arc<dyn PaymentProvider>> {
    match settings.payment_provider.as_str() {
        InvoiceProvider::NAME => Some(Arc::new(InvoiceProvider::new(
            usage,
            settings.invoice_credit_limit_cents,
        ))),
        _ => None,
    }
}
