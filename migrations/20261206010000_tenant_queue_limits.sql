-- Per-tenant overrides of a queue's TENANT_MAX_IN_FLIGHT_{QUEUE} (`gatehouse tenants
-- set-limits`). The workers enforce them from Redis (the `:caps` hash of each shard of the
-- queue), which `set-limits` writes and every worker start and maintenance round copies this
-- table into again, so a Redis that lost them gets them back.
CREATE TABLE tenant_queue_limits (
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    queue text NOT NULL,
    -- 0: no cap for this tenant, whatever the queue's default.
    max_in_flight integer NOT NULL CHECK (max_in_flight BETWEEN 0 AND 100000),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, queue)
);
