-- gatehouse dead-letter purge: deletes up to ARGV[1] dead jobs (payload, metadata, entry).
-- KEYS[1]: {queue}:dead
-- KEYS[2]: {queue}:data
-- KEYS[3]: {queue}:meta (prefix)
-- Returns the number removed.
local ids = redis.call("zrange", KEYS[1], 0, tonumber(ARGV[1]) - 1)
for _, id in ipairs(ids) do
    redis.call("hdel", KEYS[2], id)
    redis.call("del", KEYS[3] .. ":" .. id)
end
if #ids > 0 then
    redis.call("zrem", KEYS[1], unpack(ids))
end
return #ids
