-- Issue 16: what a period is billed at, upgrade requests, and the charges of the
-- `invoice` payment provider.

-- The price the current period is billed at (its plan's price when it began);
-- mid-period upgrades are prorated adjustments on top. Existing rows: their amount.
ALTER TABLE subscriptions ADD COLUMN period_base_cents BIGINT NOT NULL DEFAULT 0;
UPDATE subscriptions SET period_base_cents = amount_cents;

-- Self-service upgrades waiting for an administrator (no payment provider).
CREATE TABLE upgrade_requests (
    id            UUID PRIMARY KEY,
    user_id       UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    plan_type     TEXT NOT NULL,
    billing_cycle TEXT NOT NULL,
    from_plan     TEXT NOT NULL,
    from_cycle    TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'cancelled', 'stale')),
    quoted_cents  BIGINT NOT NULL,
    charged_cents BIGINT,
    created_at    TIMESTAMPTZ NOT NULL,
    decided_at    TIMESTAMPTZ,
    decided_by    UUID,
    note          TEXT
);
-- At most one pending request per user, whatever the number of server processes.
CREATE UNIQUE INDEX upgrade_requests_one_pending_idx ON upgrade_requests (user_id) WHERE status = 'pending';
CREATE INDEX upgrade_requests_user_idx ON upgrade_requests (user_id, created_at);
CREATE INDEX upgrade_requests_status_idx ON upgrade_requests (status, created_at);

-- Charges taken by the `invoice` payment provider (collected with the invoices),
-- and their sum per user and calendar month, held within billing.invoice_credit_limit_cents
-- by one conditional increment (as quota_counters).
CREATE TABLE payments (
    id           UUID PRIMARY KEY,
    user_id      UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    amount_cents BIGINT NOT NULL CHECK (amount_cents >= 0),
    currency     TEXT NOT NULL,
    description  TEXT NOT NULL,
    month_start  TIMESTAMPTZ NOT NULL,
    refunded     BOOLEAN NOT NULL DEFAULT FALSE,
    created_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX payments_user_idx ON payments (user_id, created_at);

CREATE TABLE payment_totals (
    user_id       UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    month_start   TIMESTAMPTZ NOT NULL,
    charged_cents BIGINT NOT NULL CHECK (charged_cents >= 0),
    PRIMARY KEY (user_id, month_start)
);
