#!lua
-- gatehouse dead-letter retry: a dead job goes back to the active list with a fresh attempt
-- budget. Returns 1, or 0 when the job is not dead (unknown, already retried or purged).
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] dead, [2] active, [3] meta, [4] data
-- ARGV[1]: job id
local id = ARGV[1]
if not redis.call("zscore", KEYS[1], id) then
    return 0
end
redis.call("zrem", KEYS[1], id)
local raw = redis.call("hget", KEYS[3], id)
local ok, meta = pcall(cjson.decode, raw or "")
if redis.call("hexists", KEYS[4], id) == 0 or not ok or type(meta) ~= "table" then
    redis.call("hdel", KEYS[3], id)
    redis.call("hdel", KEYS[4], id)
    return 0
end
meta.status, meta.attempts = "Pending", "0"
meta.dead_at, meta.waiting_since = nil, nil
redis.call("hset", KEYS[3], id, cjson.encode(meta))
redis.call("rpush", KEYS[2], id)
return 1
