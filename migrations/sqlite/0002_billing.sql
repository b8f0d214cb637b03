-- Quota counters, the usage ledger, subscriptions and invoices (SQLite types: see 0001).
CREATE TABLE quota_counters (
    user_id       BLOB NOT NULL,
    resource_type TEXT NOT NULL,
    period_start  TEXT NOT NULL,
    used          INTEGER NOT NULL CHECK (used >= 0),
    PRIMARY KEY (user_id, resource_type, period_start)
);

CREATE TABLE usage_records (
    idempotency_key      BLOB PRIMARY KEY,
    user_id              BLOB NOT NULL,
    resource_type        TEXT NOT NULL,
    quantity             INTEGER NOT NULL,
    billing_period_start TEXT NOT NULL,
    billing_period_end   TEXT NOT NULL,
    metadata             TEXT NOT NULL,
    created_at           TEXT NOT NULL
);
CREATE INDEX usage_records_user_period_idx ON usage_records (user_id, billing_period_start);

CREATE TABLE subscriptions (
    user_id                  BLOB PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    plan_type                TEXT NOT NULL,
    status                   TEXT NOT NULL,
    billing_cycle            TEXT NOT NULL,
    amount_cents             INTEGER NOT NULL,
    currency                 TEXT NOT NULL,
    started_at               TEXT NOT NULL,
    current_period_start     TEXT NOT NULL,
    current_period_end       TEXT NOT NULL,
    auto_renew               INTEGER NOT NULL,
    pending_plan             TEXT,
    period_adjustments_cents INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE invoices (
    id                BLOB PRIMARY KEY,
    user_id           BLOB NOT NULL,
    period_start      TEXT NOT NULL,
    period_end        TEXT NOT NULL,
    plan_type         TEXT NOT NULL,
    plan_charge_cents INTEGER NOT NULL,
    adjustments_cents INTEGER NOT NULL,
    usage             TEXT NOT NULL,
    total_cents       INTEGER NOT NULL,
    currency          TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    UNIQUE (user_id, period_start)
);
