#!lua
-- gatehouse enqueue: one job straight onto the active list (never the scheduled set, whose
-- promotion in apalis-redis 1.0 unpacks every due id at once and fails past ~8k), with an
-- optional dedupe key claimed atomically in the same script.
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] data, [2] active, [3] signal, [4] meta, [5] dedupe(purpose), only when deduplicating
-- ARGV[1]: job id
-- ARGV[2]: payload JSON
-- ARGV[3]: max attempts
-- ARGV[4]: dedupe TTL in seconds
-- ARGV[5..]: metadata field/value pairs
-- Returns {1, job_id} when enqueued, {0, existing_job_id} when the dedupe key was taken.
-- Every call ends with a write (the wake-up signal), even when nothing was enqueued: a `WAIT`
-- after it (REDIS_MIN_REPLICA_ACKS) then also covers the earlier write of the job it found,
-- which replicas receive in order before this one.
local function signal()
    redis.call("del", KEYS[3])
    redis.call("lpush", KEYS[3], 1)
end
local job_id = ARGV[1]
if KEYS[5] and not redis.call("set", KEYS[5], job_id, "NX", "EX", tonumber(ARGV[4])) then
    -- Claimed already: one call for a new job (the webhook's hot path), two for a duplicate.
    signal()
    return {0, redis.call("get", KEYS[5])}
end
if redis.call("hsetnx", KEYS[1], job_id, ARGV[2]) == 0 then
    signal()
    return {0, job_id}
end
local meta = {attempts = "0", max_attempts = ARGV[3], status = "Pending", idempotency_key = ""}
for i = 5, #ARGV, 2 do
    meta[ARGV[i]] = ARGV[i + 1]
end
redis.call("hset", KEYS[4], job_id, cjson.encode(meta))
redis.call("rpush", KEYS[2], job_id)
signal()
return {1, job_id}
