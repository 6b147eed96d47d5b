#!lua
-- gatehouse heartbeat and orphan recovery.
-- Keeps this process's workers alive, then hands the jobs of workers silent for longer than
-- the timeout back to the active list (at its head: they were taken first).
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
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
if #dead == 0 then
    return {0, 0}
end
local gone = {}
for _, worker in ipairs(dead) do
    gone[worker] = true
end
-- Every job held by a worker that is gone: declared dead now, or not registered at all (no
-- script leaves such an entry; a hand edit or a torn legacy move could).
local orphans = {}
local cursor = "0"
repeat
    local page = redis.call("hscan", KEYS[3], cursor, "COUNT", 1000)
    cursor = page[1]
    local entries = page[2]
    for i = 1, #entries, 2 do
        local holder = entries[i + 1]
        if gone[holder] or not redis.call("zscore", KEYS[1], holder) then
            table.insert(orphans, entries[i])
        end
    end
until cursor == "0"
for i = 1, #orphans, 500 do
    local chunk = {unpack(orphans, i, math.min(i + 499, #orphans))}
    redis.call("hdel", KEYS[3], unpack(chunk))
    redis.call("lpush", KEYS[2], unpack(chunk))
end
redis.call("zrem", KEYS[1], unpack(dead))
return {#orphans, #dead}
