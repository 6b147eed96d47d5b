#!lua
-- gatehouse removable (read only): the next jobs the vacuum or a purge removes, and which of
-- them still hold a dedupe claim (their metadata's `dedupe` purpose and `dedupe_until`, ms),
-- so `forget.lua` can leave a tombstone for each (its key must be declared: the caller builds
-- it). apalis-redis 1.0 never removes anything and its vacuum scripts walk every job.
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] done or dead (a zset of ids by time), [2] meta
-- ARGV[1]: retention ms: ids older than it (the vacuum); -1: the oldest ids (a purge)
-- ARGV[2]: most ids
-- Returns {ids, {id, purpose, until, ...}}.
local limit = tonumber(ARGV[2])
local ids
if tonumber(ARGV[1]) >= 0 then
    local t = redis.call("time")
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    ids = redis.call("zrangebyscore", KEYS[1], "-inf", now - tonumber(ARGV[1]), "LIMIT", 0, limit)
else
    ids = redis.call("zrange", KEYS[1], 0, limit - 1)
end
local claims = {}
if #ids > 0 then
    local metas = redis.call("hmget", KEYS[2], unpack(ids))
    for i = 1, #ids do
        local raw = metas[i]
        -- Only a job enqueued with a purpose has one (no decoding for the rest).
        if raw and string.find(raw, '"dedupe"', 1, true) then
            local ok, meta = pcall(cjson.decode, raw)
            if ok and type(meta) == "table" and type(meta.dedupe) == "string" and meta.dedupe_until then
                claims[#claims + 1] = ids[i]
                claims[#claims + 1] = meta.dedupe
                claims[#claims + 1] = tostring(meta.dedupe_until)
            end
        end
    end
end
return {ids, claims}
