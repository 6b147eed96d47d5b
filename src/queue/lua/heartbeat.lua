-- gatehouse heartbeat and orphan recovery.
-- Keeps this process's workers alive, then hands the jobs of workers silent for longer than
-- the timeout back to the active list (at its head: they were taken first). Bounded per call.
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs):
--   [1] workers, [2] active, [3] inflight
-- ARGV[1]: timeout ms (a worker silent this long is dead)
-- ARGV[2]: most dead workers to recover in this call
-- ARGV[3]: "strict" name: must be registered (error otherwise), or "" for none
-- ARGV[4..]: names to keep alive if registered
-- Returns {jobs recovered, workers declared dead}.
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] ~= "" then
    if not redis.call("zscore", KEYS[1], ARGV[3]) then
        return redis.error_reply("gatehouse: worker " .. ARGV[3] .. " is not registered (declared dead?)")
    end
    redis.call("zadd", KEYS[1], now, ARGV[3])
end
for i = 4, #ARGV do
    redis.call("zadd", KEYS[1], "XX", now, ARGV[i])
end
local dead = redis.call("zrangebyscore", KEYS[1], "-inf", now - tonumber(ARGV[1]),
    "LIMIT", 0, tonumber(ARGV[2]))
local recovered = 0
for _, worker in ipairs(dead) do
    local inflight = KEYS[3] .. ":" .. worker
    while true do
        local jobs = redis.call("spop", inflight, 500)
        if #jobs == 0 then
            break
        end
        redis.call("lpush", KEYS[2], unpack(jobs))
        recovered = recovered + #jobs
    end
    redis.call("zrem", KEYS[1], worker)
end
return {recovered, #dead}
