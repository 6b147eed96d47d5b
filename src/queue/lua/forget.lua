#!lua
-- gatehouse forget: removes jobs for good (payload, metadata, entry) — the finished ones past
-- their retention (the vacuum) or the oldest dead ones (a purge) — bounded per call
-- (apalis-redis 1.0 never removes anything and its vacuum scripts walk every job). A removed job
-- whose dedupe claim has time left (`dedupe_until` in its metadata, ms) leaves its id in `:gone`,
-- scored by when the claim ends, so the enqueue script still finds the claim; tombstones whose
-- claim has ended are dropped here too (bounded per call).
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] done or dead (a zset of ids by time), [2] data, [3] meta, [4] gone
-- ARGV[1]: retention ms: finished ids older than it (the vacuum); -1: the oldest ids (a purge)
-- ARGV[2]: most ids
-- Returns the number removed.
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[2])
local ids
if tonumber(ARGV[1]) >= 0 then
    ids = redis.call("zrangebyscore", KEYS[1], "-inf", now - tonumber(ARGV[1]), "LIMIT", 0, limit)
else
    ids = redis.call("zrange", KEYS[1], 0, limit - 1)
end
if #ids > 0 then
    -- The claim's end, read as the enqueue script wrote it (digits in a string); no decoding.
    -- Whoever wrote the metadata last (the producer's `client::meta_prefix`, or `cjson` in a
    -- later script) escaped any `"` inside another value, so the name cannot match there.
    local find, sub = string.find, string.sub
    local tombstones = {}
    local metas = redis.call("hmget", KEYS[3], unpack(ids))
    for i = 1, #ids do
        local raw = metas[i]
        if raw then
            local _, at = find(raw, '"dedupe_until":"', 1, true)
            if at then
                local stop = find(raw, '"', at + 1, true)
                local untl = stop and tonumber(sub(raw, at + 1, stop - 1))
                if untl and untl > now then
                    tombstones[#tombstones + 1] = untl
                    tombstones[#tombstones + 1] = ids[i]
                end
            end
        end
    end
    if #tombstones > 0 then
        redis.call("zadd", KEYS[4], unpack(tombstones))
    end
    redis.call("hdel", KEYS[2], unpack(ids))
    redis.call("hdel", KEYS[3], unpack(ids))
    redis.call("zrem", KEYS[1], unpack(ids))
end
-- Tombstones whose claim ended, at most twice as many as a call can add (bounded like the rest:
-- after a long stop the backlog goes over the next calls; an ended one already claims nothing).
local ended = redis.call("zrangebyscore", KEYS[4], "-inf", now, "LIMIT", 0, 2 * limit)
if #ended > 0 then
    redis.call("zrem", KEYS[4], unpack(ended))
end
return #ids
