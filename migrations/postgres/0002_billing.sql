-- Quota counters, the usage ledger, subscriptions and invoices.
CREATE TABLE quota_counters (
    user_id       UUID NOT NULL,
    resource_type TEXT NOT NULL,
    period_start  TIMESTAMPTZ NOT NULL,
    used          BIGINT NOT NULL CHECK (used >= 0),
    PRIMARY KEY (user_id, resource_type, period_start)
);

CREATE TABLE usage_records (
    idempotency_key      UUID PRIMARY KEY,
    user_id              UUID NOT NULL,
    resource_type        TEXT NOT NULL,
    quantity             BIGINT NOT NULL,
    billing_period_start TIMESTAMPTZ NOT NULL,
    billing_period_end   TIMESTAMPTZ NOT NULL,
    metadata             JSONB NOT NULL,
    created_at           TIMESTAMPTZ NOT NULL
);
CREATE INDEX usage_records_user_period_idx ON usage_records (user_id, billing_period_start);

CREATE TABLE subscriptions (
    user_id                  UUID PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    plan_type                TEXT NOT NULL,
    status                   TEXT NOT NULL,
    billing_cycle            TEXT NOT NULL,
    amount_cents             BIGINT NOT NULL,
    currency                 TEXT NOT NULL,
    started_at               TIMESTAMPTZ NOT NULL,
    current_period_start     TIMESTAMPTZ NOT NULL,
    current_period_end       TIMESTAMPTZ NOT NULL,
    auto_renew               BOOLEAN NOT NULL,
    pending_plan             TEXT,
    period_adjustments_cents BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE invoices (
    id                UUID PRIMARY KEY,
    user_id           UUID NOT NULL,
    period_start      TIMESTAMPTZ NOT NULL,
    period_end        TIMESTAMPTZ NOT NULL,
    plan_type         TEXT NOT NULL,
    plan_charge_cents BIGINT NOT NULL,
    adjustments_cents BIGINT NOT NULL,
    usage             JSONB NOT NULL,
    total_cents       BIGINT NOT NULL,
    currency          TEXT NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    UNIQUE (user_id, period_start)
);
