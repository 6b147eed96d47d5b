-- gatehouse dead-letter retry: a dead job goes back to the active list with a fresh attempt
-- budget. Returns 1, or 0 when the job is not dead (unknown, already retried or purged).
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs):
--   [1] dead, [2] active, [3] meta, [4] data
-- ARGV[1]: job id
local id = ARGV[1]
if not redis.call("zscore", KEYS[1], id) then
    return 0
end
redis.call("zrem", KEYS[1], id)
if redis.call("hexists", KEYS[4], id) == 0 then
    redis.call("del", KEYS[3] .. ":" .. id)
    return 0
end
redis.call("hset", KEYS[3] .. ":" .. id, "status", "Pending", "attempts", 0)
redis.call("hdel", KEYS[3] .. ":" .. id, "dead_at", "waiting_since")
redis.call("rpush", KEYS[2], id)
return 1
