#!lua
-- gatehouse vacuum: removes finished jobs older than the retention, oldest first, bounded
-- per call (apalis-redis 1.0 never removes anything and its vacuum scripts walk every job).
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] done, [2] data, [3] meta
-- ARGV[1]: retention ms
-- ARGV[2]: most jobs to remove in this call
-- Returns the number removed.
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call("zrangebyscore", KEYS[1], "-inf", now - tonumber(ARGV[1]),
    "LIMIT", 0, tonumber(ARGV[2]))
if #ids > 0 then
    redis.call("hdel", KEYS[2], unpack(ids))
    redis.call("hdel", KEYS[3], unpack(ids))
    redis.call("zrem", KEYS[1], unpack(ids))
end
return #ids
