-- The pages of a catalog sync attempt, written as they arrive (one short statement per page),
-- so a worker holds one page in memory instead of the whole listing; the attempt's final
-- transaction, under the tenant's row lock, applies them to `products` and deletes them.
-- Rows are keyed by the attempt (a fresh id per attempt, never the job id), so nothing of a
-- failed or abandoned attempt can reach another one. A failed attempt deletes its rows; rows
-- of an attempt whose worker died are swept once far older than any attempt's deadline.
--
-- UNLOGGED: staging is scratch space (no WAL, not replicated). If a crash or failover empties
-- it under a running attempt, the attempt notices (it counts what it staged before applying)
-- and fails as retryable.
CREATE UNLOGGED TABLE catalog_sync_staging (
    attempt_id   uuid NOT NULL,
    tenant_id    uuid NOT NULL,
    external_id  text NOT NULL,
    -- NULL: the store listed this id but its row was rejected; a full sync keeps the product
    -- (it is not "vanished") and does not upsert it.
    name         text,
    sku          text,
    description  text,
    price_cents  bigint,
    currency     text,
    in_stock     boolean,
    url          text,
    staged_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (attempt_id, external_id)
);
CREATE INDEX catalog_sync_staging_staged_at_idx ON catalog_sync_staging (staged_at);
