-- gatehouse fetch: promote a bounded chunk of due retries, then move up to `batch` jobs from
-- the active list into this worker's inflight set. Replaces apalis-redis 1.0's fetch_next.lua,
-- which promotes every due id with one unpack() and fails past ~8,000.
-- Times are Redis server milliseconds, so hosts with skewed clocks agree.
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs):
--   [1] workers, [2] active, [3] inflight_of(worker), [4] data, [5] meta, [6] scheduled
-- ARGV[1]: batch size
-- ARGV[2]: worker name
-- ARGV[3]: most due jobs to promote in this call
-- Returns {payloads, metas}; each meta is {job_id, field, value, ...}.
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
        local fields = redis.call("hgetall", KEYS[5] .. ":" .. id)
        -- A job purged or vacuumed while its id was still listed is dropped, never handed
        -- to apalis half-formed (which would end the worker).
        if data and #fields > 0 then
            redis.call("sadd", KEYS[3], id)
            table.insert(fields, 1, id)
            table.insert(payloads, data)
            table.insert(metas, fields)
        end
    end
end
return {payloads, metas}
