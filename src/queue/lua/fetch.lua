#!lua
-- gatehouse fetch: promote a bounded chunk of due retries, then move up to `batch` jobs from
-- the active list into the inflight hash under this worker's name. Replaces apalis-redis 1.0's
-- fetch_next.lua, which promotes every due id with one unpack() and fails past ~8,000.
-- Times are Redis server milliseconds, so hosts with skewed clocks agree.
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] workers, [2] active, [3] inflight, [4] data, [5] meta, [6] scheduled
-- ARGV[1]: batch size
-- ARGV[2]: worker name
-- ARGV[3]: most due jobs to promote in this call
-- Returns {payloads, metas}; each meta is {job_id, field, value, ...} (apalis-redis's shape).
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not redis.call("zscore", KEYS[1], ARGV[2]) then
    return redis.error_reply("gatehouse: worker " .. ARGV[2] .. " is not registered (declared dead?)")
end
local due = redis.call("zrangebyscore", KEYS[6], "-inf", now, "LIMIT", 0, tonumber(ARGV[3]))
if #due > 0 then
    redis.call("rpush", KEYS[2], unpack(due))
    redis.call("zrem", KEYS[6], unpack(due))
end
local ids = redis.call("lrange", KEYS[2], 0, tonumber(ARGV[1]) - 1)
local payloads, metas = {}, {}
if #ids > 0 then
    redis.call("ltrim", KEYS[2], #ids, -1)
    for _, id in ipairs(ids) do
        local data = redis.call("hget", KEYS[4], id)
        local meta = redis.call("hget", KEYS[5], id)
        -- A job purged or vacuumed while its id was still listed is dropped, never handed
        -- to apalis half-formed (which would end the worker).
        if data and meta then
            local ok, decoded = pcall(cjson.decode, meta)
            if ok and type(decoded) == "table" then
                local fields = {id}
                for field, value in pairs(decoded) do
                    table.insert(fields, field)
                    table.insert(fields, tostring(value))
                end
                redis.call("hset", KEYS[3], id, ARGV[2])
                table.insert(payloads, data)
                table.insert(metas, fields)
            end
        end
    end
end
return {payloads, metas}
