-- Retention deletes expired rows in batches by their time column (src/retention.rs); these
-- indexes keep each batch from scanning the table. security_events is already indexed by
-- occurred_at.
CREATE INDEX processed_jobs_processed_at_idx ON processed_jobs (processed_at);
CREATE INDEX catalog_syncs_finished_at_idx ON catalog_syncs (finished_at);
CREATE INDEX outbox_sent_at_idx ON outbox (sent_at) WHERE sent_at IS NOT NULL;
