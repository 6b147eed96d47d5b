-- Keyset paging of security events (GET /v1/admin/security-events and the dashboard): newest
-- first, ties broken by id, so a page boundary never skips or repeats an event. It covers every
-- query the time-only index served, which it replaces.
CREATE INDEX security_events_time_id_idx ON security_events (occurred_at DESC, id DESC);
DROP INDEX IF EXISTS security_events_time_idx;
