-- Which form each blind index was computed in, so `gatehouse keys reindex` can skip rows that
-- are already current and resume after a crash:
--   NULL       the un-tenanted v1 form (HMAC keyed from some SECRET_KEY), as every row
--              written before per-tenant blind indexes holds;
--   'v2:<id>'  the per-tenant form under the SECRET_KEY whose non-secret id is <id>;
--   'retired'  (conversations) a duplicate conversation whose customer already has another:
--              its index is its own id, which no lookup computes.
-- Expand-only: the previous release ignores these columns and writes NULL.
ALTER TABLE conversations ADD COLUMN customer_number_index_form text;
ALTER TABLE messages ADD COLUMN from_number_index_form text;
