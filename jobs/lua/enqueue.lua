#!lua
-- gatehouse enqueue: one or more jobs of one queue shard straight onto its active list (never
-- the scheduled set, whose promotion in apalis-redis 1.0 unpacks every due id at once and
-- fails past ~8k). Several jobs in one call (a coalesced group:
-- `gatehouse_jobs::client::Queues::enqueue_prepared`) are each what one job alone would be:
-- checked, written and listed in order, with one wake-up signal for all of them.
--
-- A job with a dedupe purpose has the id the purpose fixes (`client::dedupe_job_id`): writing
-- it (HSETNX) is the claim, and a second job of the purpose finds the first's id there. Its
-- metadata keeps when the claim ends (`dedupe_until`, ms), so the vacuum or a purge that removes
-- the job sooner leaves its id in `:gone` until then, which this script also looks in. A webhook
-- costs Redis no key of its own.
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] data, [2] active, [3] signal, [4] meta, [5] gone
-- ARGV[1]: the number of jobs; then, for each job:
--   job id, payload JSON, dedupe TTL in seconds (0: no dedupe purpose), and its metadata as
--   JSON text without the closing brace (`client::meta_prefix`: every value a string), which
--   this script closes, adding `dedupe_until` when there is a purpose. Building a table and
--   `cjson.encode` per job cost Redis ~2 µs a job (BENCHMARKS.md §16).
-- Returns, for each job in order, 1 when it was enqueued, or the id of the job already there
-- (its own id: the id was found, or its tombstone).
-- Every call ends with a write (the wake-up signal), even when nothing was enqueued: a `WAIT`
-- after it (REDIS_MIN_REPLICA_ACKS) then also covers the earlier write of a job it found,
-- which replicas receive in order before this one.
local results = {}
local now
for j = 1, tonumber(ARGV[1]) do
    local at = 4 * j - 2
    local job_id, payload, ttl = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
    local result
    if ttl > 0 then
        if not now then
            local t = redis.call("time")
            now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        end
        local gone = redis.call("zscore", KEYS[5], job_id)
        if gone and tonumber(gone) > now then
            result = job_id
        end
    end
    if not result and redis.call("hsetnx", KEYS[1], job_id, payload) == 0 then
        result = job_id
    end
    if not result then
        local meta = ARGV[at + 3]
        if ttl > 0 then
            meta = meta .. ',"dedupe_until":"' .. string.format("%d", now + ttl * 1000) .. '"}'
        else
            meta = meta .. "}"
        end
        redis.call("hset", KEYS[4], job_id, meta)
        redis.call("rpush", KEYS[2], job_id)
        result = 1
    end
    results[j] = result
end
redis.call("del", KEYS[3])
redis.call("lpush", KEYS[3], 1)
return results
