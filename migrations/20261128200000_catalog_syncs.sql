-- One row per committed catalog sync, written in the sync's own transaction: what the store
-- sent, what was applied, and which rows were rejected (position, field and rule only; the
-- store's values are untrusted and never stored raw).
CREATE TABLE catalog_syncs (
    job_id        text PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    requested_by  uuid NOT NULL,
    mode          text NOT NULL CHECK (mode IN ('full', 'incremental')),
    pages         integer NOT NULL CHECK (pages >= 0),
    fetched       integer NOT NULL CHECK (fetched >= 0),
    upserted      integer NOT NULL CHECK (upserted >= 0),
    deleted       integer NOT NULL CHECK (deleted >= 0),
    rejected      integer NOT NULL CHECK (rejected >= 0),
    -- at most 100 entries of {"index": n, "field": "...", "reason": "..."}
    rejections    jsonb NOT NULL DEFAULT '[]'::jsonb,
    finished_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX catalog_syncs_tenant_idx ON catalog_syncs (tenant_id, finished_at DESC);
