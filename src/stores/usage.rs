//! Quota counters, usage ledger, subscriptions and invoices, written once for both
//! SQL backends (see accounts.rs for the approach).

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use ragchat_actors::domain::{Invoice, Subscription, UsageRecord};
use ragchat_actors::plans::Plan;
use ragchat_actors::plans::{Period, Resource};
use ragchat_actors::ports::{Reservation, StoreError, StoreResult, UsageStore};
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use super::store_error;

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn parse<T: std::str::FromStr>(s: &str) -> StoreResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>().map_err(|e| StoreError::Internal(e.to_string()))
}

const SUB_COLUMNS: &str = "user_id, plan_type, status, billing_cycle, amount_cents, currency, started_at, \
     current_period_start, current_period_end, auto_renew, pending_plan, period_adjustments_cents";
const INVOICE_COLUMNS: &str = "id, user_id, period_start, period_end, plan_type, plan_charge_cents, \
     adjustments_cents, usage, total_cents, currency, created_at";

macro_rules! sql_usage {
    ($store:ident, $db:ty, $row:ty) => {
        impl $store {
            fn subscription_row(row: &$row) -> StoreResult<Subscription> {
                let plan: String = row.try_get("plan_type").map_err(store_error)?;
                let status: String = row.try_get("status").map_err(store_error)?;
                let cycle: String = row.try_get("billing_cycle").map_err(store_error)?;
                let pending: Option<String> = row.try_get("pending_plan").map_err(store_error)?;
                Ok(Subscription {
                    user_id: row.try_get("user_id").map_err(store_error)?,
                    plan: parse(&plan)?,
                    status: parse(&status)?,
                    billing_cycle: parse(&cycle)?,
                    amount_cents: to_u64(row.try_get("amount_cents").map_err(store_error)?),
                    currency: row.try_get("currency").map_err(store_error)?,
                    started_at: row.try_get("started_at").map_err(store_error)?,
                    current_period_start: row.try_get("current_period_start").map_err(store_error)?,
                    current_period_end: row.try_get("current_period_end").map_err(store_error)?,
                    auto_renew: row.try_get("auto_renew").map_err(store_error)?,
                    pending_plan: pending.as_deref().map(parse::<Plan>).transpose()?,
                    period_adjustments_cents: to_u64(row.try_get("period_adjustments_cents").map_err(store_error)?),
                })
            }

            fn invoice_row(row: &$row) -> StoreResult<Invoice> {
                let plan: String = row.try_get("plan_type").map_err(store_error)?;
                let usage: Json<serde_json::Value> = row.try_get("usage").map_err(store_error)?;
                Ok(Invoice {
                    id: row.try_get("id").map_err(store_error)?,
                    user_id: row.try_get("user_id").map_err(store_error)?,
                    period_start: row.try_get("period_start").map_err(store_error)?,
                    period_end: row.try_get("period_end").map_err(store_error)?,
                    plan: parse(&plan)?,
                    plan_charge_cents: to_u64(row.try_get("plan_charge_cents").map_err(store_error)?),
                    adjustments_cents: to_u64(row.try_get("adjustments_cents").map_err(store_error)?),
                    usage: usage.0,
                    total_cents: to_u64(row.try_get("total_cents").map_err(store_error)?),
                    currency: row.try_get("currency").map_err(store_error)?,
                    created_at: row.try_get("created_at").map_err(store_error)?,
                })
            }

            /// Rows of (resource_type, n) as a map.
            fn per_resource(rows: &[$row]) -> StoreResult<BTreeMap<Resource, u64>> {
                rows.iter()
                    .map(|r| {
                        let name: String = r.try_get("resource_type").map_err(store_error)?;
                        let n: i64 = r.try_get("n").map_err(store_error)?;
                        Ok((parse::<Resource>(&name)?, to_u64(n)))
                    })
                    .collect()
            }

            async fn counter(&self, user_id: Uuid, resource: Resource, period_start: DateTime<Utc>) -> StoreResult<u64> {
                let used: Option<i64> = sqlx::query_scalar(
                    "SELECT used FROM quota_counters WHERE user_id = $1 AND resource_type = $2 AND period_start = $3",
                )
                .bind(user_id)
                .bind(resource.as_str())
                .bind(period_start)
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(used.map(to_u64).unwrap_or(0))
            }
        }

        #[async_trait]
        impl UsageStore for $store {
            async fn try_reserve(
                &self,
                user_id: Uuid,
                resource: Resource,
                period_start: DateTime<Utc>,
                cost: u64,
                limit: u64,
            ) -> StoreResult<Reservation> {
                if cost > limit {
                    return Ok(Reservation::Denied { used: self.counter(user_id, resource, period_start).await? });
                }
                // One statement: insert the counter or add to it only while the sum stays
                // within the limit. The row lock makes concurrent reservations (from any
                // number of processes) serialize here.
                let used: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO quota_counters (user_id, resource_type, period_start, used) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (user_id, resource_type, period_start) \
                     DO UPDATE SET used = quota_counters.used + excluded.used \
                     WHERE quota_counters.used + excluded.used <= $5 RETURNING used",
                )
                .bind(user_id)
                .bind(resource.as_str())
                .bind(period_start)
                .bind(to_i64(cost))
                .bind(to_i64(limit))
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
                match used {
                    Some(u) => Ok(Reservation::Granted { used: to_u64(u) }),
                    None => Ok(Reservation::Denied { used: self.counter(user_id, resource, period_start).await? }),
                }
            }

            async fn release(&self, user_id: Uuid, resource: Resource, period_start: DateTime<Utc>, cost: u64) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE quota_counters SET used = CASE WHEN used >= $4 THEN used - $4 ELSE 0 END \
                     WHERE user_id = $1 AND resource_type = $2 AND period_start = $3",
                )
                .bind(user_id)
                .bind(resource.as_str())
                .bind(period_start)
                .bind(to_i64(cost))
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(())
            }

            async fn force_add(&self, user_id: Uuid, resource: Resource, period_start: DateTime<Utc>, cost: u64) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO quota_counters (user_id, resource_type, period_start, used) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (user_id, resource_type, period_start) \
                     DO UPDATE SET used = quota_counters.used + excluded.used",
                )
                .bind(user_id)
                .bind(resource.as_str())
                .bind(period_start)
                .bind(to_i64(cost))
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(())
            }

            async fn counters(&self, user_id: Uuid, period_start: DateTime<Utc>) -> StoreResult<BTreeMap<Resource, u64>> {
                let rows = sqlx::query("SELECT resource_type, used AS n FROM quota_counters WHERE user_id = $1 AND period_start = $2")
                    .bind(user_id)
                    .bind(period_start)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(store_error)?;
                Self::per_resource(&rows)
            }

            async fn insert_usage(&self, records: &[UsageRecord]) -> StoreResult<u64> {
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                let mut inserted = 0;
                for r in records {
                    let done = sqlx::query(
                        "INSERT INTO usage_records (idempotency_key, user_id, resource_type, quantity, \
                         billing_period_start, billing_period_end, metadata, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (idempotency_key) DO NOTHING",
                    )
                    .bind(r.id)
                    .bind(r.user_id)
                    .bind(r.resource.as_str())
                    .bind(to_i64(r.quantity))
                    .bind(r.period.start)
                    .bind(r.period.end)
                    .bind(Json(&r.metadata))
                    .bind(r.created_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
                    inserted += done.rows_affected();
                }
                tx.commit().await.map_err(store_error)?;
                Ok(inserted)
            }

            async fn usage_totals(&self, user_id: Uuid, period: Period) -> StoreResult<BTreeMap<Resource, u64>> {
                let rows = sqlx::query(
                    "SELECT resource_type, CAST(SUM(quantity) AS BIGINT) AS n FROM usage_records \
                     WHERE user_id = $1 AND billing_period_start >= $2 AND billing_period_start < $3 \
                     GROUP BY resource_type",
                )
                .bind(user_id)
                .bind(period.start)
                .bind(period.end)
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
                Self::per_resource(&rows)
            }

            async fn usage_record_count(&self, user_id: Uuid) -> StoreResult<u64> {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(store_error)?;
                Ok(to_u64(n))
            }

            async fn subscription(&self, user_id: Uuid) -> StoreResult<Option<Subscription>> {
                let sql = format!("SELECT {SUB_COLUMNS} FROM subscriptions WHERE user_id = $1");
                let row = sqlx::query(&sql).bind(user_id).fetch_optional(&self.pool).await.map_err(store_error)?;
                row.as_ref().map(Self::subscription_row).transpose()
            }

            async fn put_subscription(&self, s: &Subscription) -> StoreResult<()> {
                let sql = format!(
                    "INSERT INTO subscriptions ({SUB_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                     ON CONFLICT (user_id) DO UPDATE SET plan_type = excluded.plan_type, status = excluded.status, \
                     billing_cycle = excluded.billing_cycle, amount_cents = excluded.amount_cents, \
                     currency = excluded.currency, started_at = excluded.started_at, \
                     current_period_start = excluded.current_period_start, \
                     current_period_end = excluded.current_period_end, auto_renew = excluded.auto_renew, \
                     pending_plan = excluded.pending_plan, period_adjustments_cents = excluded.period_adjustments_cents"
                );
                sqlx::query(&sql)
                    .bind(s.user_id)
                    .bind(s.plan.as_str())
                    .bind(s.status.as_str())
                    .bind(s.billing_cycle.as_str())
                    .bind(to_i64(s.amount_cents))
                    .bind(&s.currency)
                    .bind(s.started_at)
                    .bind(s.current_period_start)
                    .bind(s.current_period_end)
                    .bind(s.auto_renew)
                    .bind(s.pending_plan.map(|p| p.as_str()))
                    .bind(to_i64(s.period_adjustments_cents))
                    .execute(&self.pool)
                    .await
                    .map_err(store_error)?;
                Ok(())
            }

            async fn insert_invoice(&self, i: &Invoice) -> StoreResult<()> {
                let sql = format!(
                    "INSERT INTO invoices ({INVOICE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                     ON CONFLICT (user_id, period_start) DO NOTHING"
                );
                sqlx::query(&sql)
                    .bind(i.id)
                    .bind(i.user_id)
                    .bind(i.period_start)
                    .bind(i.period_end)
                    .bind(i.plan.as_str())
                    .bind(to_i64(i.plan_charge_cents))
                    .bind(to_i64(i.adjustments_cents))
                    .bind(Json(&i.usage))
                    .bind(to_i64(i.total_cents))
                    .bind(&i.currency)
                    .bind(i.created_at)
                    .execute(&self.pool)
                    .await
                    .map_err(store_error)?;
                Ok(())
            }

            async fn invoices(&self, user_id: Uuid) -> StoreResult<Vec<Invoice>> {
                let sql = format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE user_id = $1 ORDER BY period_start");
                let rows = sqlx::query(&sql).bind(user_id).fetch_all(&self.pool).await.map_err(store_error)?;
                rows.iter().map(Self::invoice_row).collect()
            }
        }
    };
}

pub use super::accounts::{PostgresAccountStore as PostgresStore, SqliteAccountStore as SqliteStore};

sql_usage!(SqliteStore, sqlx::Sqlite, sqlx::sqlite::SqliteRow);
sql_usage!(PostgresStore, sqlx::Postgres, sqlx::postgres::PgRow);
