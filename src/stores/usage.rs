//! Quota counters, usage ledger, subscriptions and invoices, written once for both
//! SQL backends (see accounts.rs for the approach).

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use ragchat_actors::domain::{
    Invoice, Page, Payment, Subscription, UpgradeDecision, UpgradeRequest, UpgradeStatus, UsageRecord,
};
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
     current_period_start, current_period_end, auto_renew, pending_plan, period_adjustments_cents, period_base_cents";
const INVOICE_COLUMNS: &str = "id, user_id, period_start, period_end, plan_type, plan_charge_cents, \
     adjustments_cents, usage, total_cents, currency, created_at";
const REQUEST_COLUMNS: &str = "id, user_id, plan_type, billing_cycle, from_plan, from_cycle, status, quoted_cents, \
     charged_cents, created_at, decided_at, decided_by, note";
const PAYMENT_COLUMNS: &str = "id, user_id, amount_cents, currency, description, month_start, refunded, created_at";

macro_rules! sql_usage {
    ($store:ident, $db:ty, $row:ty) => {
        impl $store {
            /// Binds a subscription's columns as $1…$13, in `SUB_COLUMNS` order.
            fn bind_subscription<'q>(
                q: sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>,
                s: &'q Subscription,
            ) -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>> {
                q.bind(s.user_id)
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
                    .bind(to_i64(s.period_base_cents))
            }

            /// Closes a pending upgrade request with its decision (no row: it was not pending).
            fn close_request<'q>(
                id: Uuid,
                d: &'q UpgradeDecision,
            ) -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>> {
                sqlx::query(
                    "UPDATE upgrade_requests SET status = $2, decided_at = $3, decided_by = $4, note = $5, \
                     charged_cents = $6 WHERE id = $1 AND status = 'pending'",
                )
                .bind(id)
                .bind(d.status.as_str())
                .bind(d.decided_at)
                .bind(d.decided_by)
                .bind(d.note.as_deref())
                .bind(d.charged_cents.map(to_i64))
            }

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
                    period_base_cents: to_u64(row.try_get("period_base_cents").map_err(store_error)?),
                })
            }

            fn request_row(row: &$row) -> StoreResult<UpgradeRequest> {
                let text = |c: &str| -> StoreResult<String> { row.try_get(c).map_err(store_error) };
                let charged: Option<i64> = row.try_get("charged_cents").map_err(store_error)?;
                Ok(UpgradeRequest {
                    id: row.try_get("id").map_err(store_error)?,
                    user_id: row.try_get("user_id").map_err(store_error)?,
                    plan: parse(&text("plan_type")?)?,
                    billing_cycle: parse(&text("billing_cycle")?)?,
                    from_plan: parse(&text("from_plan")?)?,
                    from_cycle: parse(&text("from_cycle")?)?,
                    status: parse(&text("status")?)?,
                    quoted_cents: to_u64(row.try_get("quoted_cents").map_err(store_error)?),
                    charged_cents: charged.map(to_u64),
                    created_at: row.try_get("created_at").map_err(store_error)?,
                    decided_at: row.try_get("decided_at").map_err(store_error)?,
                    decided_by: row.try_get("decided_by").map_err(store_error)?,
                    note: row.try_get("note").map_err(store_error)?,
                })
            }

            fn payment_row(row: &$row) -> StoreResult<Payment> {
                Ok(Payment {
                    id: row.try_get("id").map_err(store_error)?,
                    user_id: row.try_get("user_id").map_err(store_error)?,
                    amount_cents: to_u64(row.try_get("amount_cents").map_err(store_error)?),
                    currency: row.try_get("currency").map_err(store_error)?,
                    description: row.try_get("description").map_err(store_error)?,
                    month_start: row.try_get("month_start").map_err(store_error)?,
                    refunded: row.try_get("refunded").map_err(store_error)?,
                    created_at: row.try_get("created_at").map_err(store_error)?,
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
            async fn storage_epoch(&self, user_id: Uuid) -> StoreResult<u64> {
                let epoch: Option<i64> = sqlx::query_scalar("SELECT epoch FROM storage_epochs WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(store_error)?;
                Ok(epoch.map(to_u64).unwrap_or(0))
            }

            async fn hold_storage(
                &self,
                user_id: Uuid,
                id: Uuid,
                bytes: u64,
                stored: u64,
                epoch: u64,
                limit: u64,
                expire_before: DateTime<Utc>,
            ) -> StoreResult<Reservation> {
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                // The user's epoch row, written first: its lock (PostgreSQL: the row;
                // SQLite: the database) serializes the user's holds until commit.
                sqlx::query(
                    "INSERT INTO storage_epochs (user_id, epoch) VALUES ($1, 0) \
                     ON CONFLICT (user_id) DO UPDATE SET epoch = storage_epochs.epoch",
                )
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
                // Holds nobody released (their node died) and long-released ones go.
                sqlx::query(
                    "DELETE FROM storage_holds WHERE user_id = $1 AND \
                     ((released_at IS NULL AND created_at < $2) OR released_at < $3)",
                )
                .bind(user_id)
                .bind(expire_before)
                .bind(Utc::now() - chrono::Duration::hours(1))
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
                let held: i64 = sqlx::query_scalar(
                    "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM storage_holds \
                     WHERE user_id = $1 AND (released_epoch IS NULL OR released_epoch > $2)",
                )
                .bind(user_id)
                .bind(to_i64(epoch))
                .fetch_one(&mut *tx)
                .await
                .map_err(store_error)?;
                let used = stored.saturating_add(to_u64(held));
                if used.saturating_add(bytes) > limit {
                    return Ok(Reservation::Denied { used });
                }
                sqlx::query("INSERT INTO storage_holds (id, user_id, bytes, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(id)
                    .bind(user_id)
                    .bind(to_i64(bytes))
                    .bind(Utc::now())
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
                tx.commit().await.map_err(store_error)?;
                Ok(Reservation::Granted { used: used.saturating_add(bytes) })
            }

            async fn release_storage(&self, user_id: Uuid, id: Uuid) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                let epoch: Option<i64> = sqlx::query_scalar(
                    "UPDATE storage_epochs SET epoch = epoch + 1 WHERE user_id = $1 RETURNING epoch",
                )
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(store_error)?;
                let Some(epoch) = epoch else {
                    return Ok(());
                };
                sqlx::query(
                    "UPDATE storage_holds SET released_epoch = $3, released_at = $4 \
                     WHERE id = $1 AND user_id = $2 AND released_epoch IS NULL",
                )
                .bind(id)
                .bind(user_id)
                .bind(epoch)
                .bind(Utc::now())
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
                tx.commit().await.map_err(store_error)
            }

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
                    "INSERT INTO subscriptions ({SUB_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                     ON CONFLICT (user_id) DO UPDATE SET plan_type = excluded.plan_type, status = excluded.status, \
                     billing_cycle = excluded.billing_cycle, amount_cents = excluded.amount_cents, \
                     currency = excluded.currency, started_at = excluded.started_at, \
                     current_period_start = excluded.current_period_start, \
                     current_period_end = excluded.current_period_end, auto_renew = excluded.auto_renew, \
                     pending_plan = excluded.pending_plan, period_adjustments_cents = excluded.period_adjustments_cents, \
                     period_base_cents = excluded.period_base_cents"
                );
                Self::bind_subscription(sqlx::query(&sql), s)
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

            async fn commit_plan_change(
                &self,
                expected: &Subscription,
                s: &Subscription,
                request: Option<(Uuid, &UpgradeDecision)>,
            ) -> StoreResult<bool> {
                // Every statement writes, the first one included: SQLite takes its write
                // lock at once, PostgreSQL re-checks each WHERE on the row it waited for.
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                if let Some((id, d)) = request {
                    let closed = Self::close_request(id, d)
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
                    if closed.rows_affected() == 0 {
                        return Ok(false);
                    }
                }
                let written = Self::bind_subscription(
                    sqlx::query(
                        "UPDATE subscriptions SET plan_type = $2, status = $3, billing_cycle = $4, amount_cents = $5, \
                         currency = $6, started_at = $7, current_period_start = $8, current_period_end = $9, \
                         auto_renew = $10, pending_plan = $11, period_adjustments_cents = $12, period_base_cents = $13 \
                         WHERE user_id = $1 AND plan_type = $14 AND billing_cycle = $15 AND period_adjustments_cents = $16",
                    ),
                    s,
                )
                .bind(expected.plan.as_str())
                .bind(expected.billing_cycle.as_str())
                .bind(to_i64(expected.period_adjustments_cents))
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
                if written.rows_affected() == 0 {
                    return Ok(false);
                }
                sqlx::query("UPDATE users SET subscription_plan = $2, updated_at = $3 WHERE id = $1")
                    .bind(s.user_id)
                    .bind(s.plan.as_str())
                    .bind(Utc::now())
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
                tx.commit().await.map_err(store_error)?;
                Ok(true)
            }

            async fn insert_upgrade_request(&self, r: &UpgradeRequest) -> StoreResult<()> {
                let sql = format!(
                    "INSERT INTO upgrade_requests ({REQUEST_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                );
                sqlx::query(&sql)
                    .bind(r.id)
                    .bind(r.user_id)
                    .bind(r.plan.as_str())
                    .bind(r.billing_cycle.as_str())
                    .bind(r.from_plan.as_str())
                    .bind(r.from_cycle.as_str())
                    .bind(r.status.as_str())
                    .bind(to_i64(r.quoted_cents))
                    .bind(r.charged_cents.map(to_i64))
                    .bind(r.created_at)
                    .bind(r.decided_at)
                    .bind(r.decided_by)
                    .bind(r.note.as_deref())
                    .execute(&self.pool)
                    .await
                    .map_err(store_error)?;
                Ok(())
            }

            async fn upgrade_request(&self, id: Uuid) -> StoreResult<Option<UpgradeRequest>> {
                let sql = format!("SELECT {REQUEST_COLUMNS} FROM upgrade_requests WHERE id = $1");
                let row = sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await.map_err(store_error)?;
                row.as_ref().map(Self::request_row).transpose()
            }

            async fn latest_upgrade_request(&self, user_id: Uuid) -> StoreResult<Option<UpgradeRequest>> {
                let sql = format!(
                    "SELECT {REQUEST_COLUMNS} FROM upgrade_requests WHERE user_id = $1 \
                     ORDER BY CASE WHEN status = 'pending' THEN 0 ELSE 1 END, created_at DESC LIMIT 1"
                );
                let row = sqlx::query(&sql).bind(user_id).fetch_optional(&self.pool).await.map_err(store_error)?;
                row.as_ref().map(Self::request_row).transpose()
            }

            async fn upgrade_requests(&self, status: Option<UpgradeStatus>, page: Page) -> StoreResult<(Vec<UpgradeRequest>, u64)> {
                let status = status.map(|s| s.as_str());
                let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM upgrade_requests WHERE ($1 IS NULL OR status = $1)")
                    .bind(status)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(store_error)?;
                let sql = format!(
                    "SELECT {REQUEST_COLUMNS} FROM upgrade_requests WHERE ($1 IS NULL OR status = $1) \
                     ORDER BY created_at, id LIMIT $2 OFFSET $3"
                );
                let rows = sqlx::query(&sql)
                    .bind(status)
                    .bind(i64::from(page.limit))
                    .bind(i64::from(page.offset))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(store_error)?;
                let items = rows.iter().map(Self::request_row).collect::<StoreResult<Vec<_>>>()?;
                Ok((items, to_u64(total)))
            }

            async fn close_upgrade_request(&self, id: Uuid, d: &UpgradeDecision) -> StoreResult<bool> {
                let done = Self::close_request(id, d)
                .execute(&self.pool)
                .await
                .map_err(store_error)?;
                Ok(done.rows_affected() == 1)
            }

            async fn record_payment(&self, p: &Payment, limit_cents: u64) -> StoreResult<bool> {
                if p.amount_cents > limit_cents {
                    return Ok(false);
                }
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                let sql = format!(
                    "INSERT INTO payments ({PAYMENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (id) DO NOTHING"
                );
                let inserted = sqlx::query(&sql)
                    .bind(p.id)
                    .bind(p.user_id)
                    .bind(to_i64(p.amount_cents))
                    .bind(&p.currency)
                    .bind(&p.description)
                    .bind(p.month_start)
                    .bind(p.refunded)
                    .bind(p.created_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(store_error)?;
                if inserted.rows_affected() == 0 {
                    // The same charge again: it was taken once.
                    return Ok(true);
                }
                let total: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO payment_totals (user_id, month_start, charged_cents) VALUES ($1, $2, $3) \
                     ON CONFLICT (user_id, month_start) \
                     DO UPDATE SET charged_cents = payment_totals.charged_cents + excluded.charged_cents \
                     WHERE payment_totals.charged_cents + excluded.charged_cents <= $4 RETURNING charged_cents",
                )
                .bind(p.user_id)
                .bind(p.month_start)
                .bind(to_i64(p.amount_cents))
                .bind(to_i64(limit_cents))
                .fetch_optional(&mut *tx)
                .await
                .map_err(store_error)?;
                if total.is_none() {
                    return Ok(false); // over the limit: the transaction rolls back
                }
                tx.commit().await.map_err(store_error)?;
                Ok(true)
            }

            async fn refund_payment(&self, id: Uuid) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await.map_err(store_error)?;
                let row = sqlx::query(
                    "UPDATE payments SET refunded = $2 WHERE id = $1 AND refunded = $3 \
                     RETURNING user_id, month_start, amount_cents",
                )
                .bind(id)
                .bind(true)
                .bind(false)
                .fetch_optional(&mut *tx)
                .await
                .map_err(store_error)?;
                let Some(row) = row else {
                    return Ok(false);
                };
                let user_id: Uuid = row.try_get("user_id").map_err(store_error)?;
                let month_start: DateTime<Utc> = row.try_get("month_start").map_err(store_error)?;
                let amount: i64 = row.try_get("amount_cents").map_err(store_error)?;
                sqlx::query(
                    "UPDATE payment_totals SET charged_cents = CASE WHEN charged_cents >= $3 THEN charged_cents - $3 ELSE 0 END \
                     WHERE user_id = $1 AND month_start = $2",
                )
                .bind(user_id)
                .bind(month_start)
                .bind(amount)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
                tx.commit().await.map_err(store_error)?;
                Ok(true)
            }

            async fn payments(&self, user_id: Uuid) -> StoreResult<Vec<Payment>> {
                let sql = format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE user_id = $1 ORDER BY created_at");
                let rows = sqlx::query(&sql).bind(user_id).fetch_all(&self.pool).await.map_err(store_error)?;
                rows.iter().map(Self::payment_row).collect()
            }
        }
    };
}

pub use super::accounts::{PostgresAccountStore as PostgresStore, SqliteAccountStore as SqliteStore};

sql_usage!(SqliteStore, sqlx::Sqlite, sqlx::sqlite::SqliteRow);
sql_usage!(PostgresStore, sqlx::Postgres, sqlx::postgres::PgRow);
