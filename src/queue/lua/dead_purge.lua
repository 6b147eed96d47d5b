#!lua
-- gatehouse dead-letter purge: deletes up to ARGV[1] dead jobs (payload, metadata, entry).
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] dead, [2] data, [3] meta
-- Returns the number removed.
local ids = redis.call("zrange", KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #ids > 0 then
    redis.call("hdel", KEYS[2], unpack(ids))
    redis.call("hdel", KEYS[3], unpack(ids))
    redis.call("zrem", KEYS[1], unpack(ids))
end
return #ids
