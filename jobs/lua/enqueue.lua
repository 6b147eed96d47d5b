-- gatehouse enqueue: one job straight onto the active list (never the scheduled set, whose
-- promotion in apalis-redis 1.0 unpacks every due id at once and fails past ~8k), with an
-- optional dedupe key claimed atomically in the same script.
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs):
--   [1] data, [2] active, [3] signal, [4] meta, [5] dedupe key, or "" for none
-- ARGV[1]: job id
-- ARGV[2]: payload JSON
-- ARGV[3]: max attempts
-- ARGV[4]: dedupe TTL in seconds
-- ARGV[5..]: metadata field/value pairs
-- Returns {1, job_id} when enqueued, {0, existing_job_id} when the dedupe key was taken.
local job_id = ARGV[1]
if KEYS[5] ~= "" then
    local existing = redis.call("get", KEYS[5])
    if existing then
        return {0, existing}
    end
    redis.call("set", KEYS[5], job_id, "EX", tonumber(ARGV[4]))
end
if redis.call("hsetnx", KEYS[1], job_id, ARGV[2]) == 0 then
    return {0, job_id}
end
local meta = {"attempts", 0, "max_attempts", tonumber(ARGV[3]), "status", "Pending",
              "idempotency_key", ""}
for i = 5, #ARGV, 2 do
    table.insert(meta, ARGV[i])
    table.insert(meta, ARGV[i + 1])
end
redis.call("hset", KEYS[4] .. ":" .. job_id, unpack(meta))
redis.call("rpush", KEYS[2], job_id)
redis.call("del", KEYS[3])
redis.call("lpush", KEYS[3], 1)
return {1, job_id}
