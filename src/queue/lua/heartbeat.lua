-- gatehouse heartbeat and orphan recovery (after fair.lua).
-- Keeps this process's workers alive, then hands the jobs of workers silent for longer than
-- the timeout back to the fair order (at its head: they were taken first), each freeing its
-- tenant's slot. Then settles a few tenants with parked jobs (a cap raised or removed since
-- they were parked: their jobs move back without waiting for a slot to free).
--
-- KEYS after fair.lua's nine: [10] workers, [11] inflight
-- ARGV after fair.lua's two: [3] timeout ms (a worker silent this long is dead),
--   [4] most dead workers to recover in this call,
--   [5] "strict" name: must be registered (error otherwise), or "" for none,
--   [6..] names to keep alive if registered
-- Returns {jobs recovered, workers declared dead}.
local WORKERS, INFLIGHT = KEYS[10], KEYS[11]
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[5] ~= "" then
    if not redis.call("zscore", WORKERS, ARGV[5]) then
        return redis.error_reply("gatehouse: worker " .. ARGV[5] .. " is not registered (declared dead?)")
    end
    redis.call("zadd", WORKERS, now, ARGV[5])
end
for i = 6, #ARGV do
    redis.call("zadd", WORKERS, "XX", now, ARGV[i])
end
for _, tenant in ipairs(redis.call("hrandfield", CAPPED, 10)) do
    unpark(tenant)
end
local dead = redis.call("zrangebyscore", WORKERS, "-inf", now - tonumber(ARGV[3]),
    "LIMIT", 0, tonumber(ARGV[4]))
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
    local page = redis.call("hscan", INFLIGHT, cursor, "COUNT", 1000)
    cursor = page[1]
    local entries = page[2]
    for i = 1, #entries, 2 do
        local holder = entries[i + 1]
        if gone[holder] or not redis.call("zscore", WORKERS, holder) then
            table.insert(orphans, entries[i])
        end
    end
until cursor == "0"
-- Each onto the head (at the clock: among themselves, by id).
for i = #orphans, 1, -1 do
    hand_back(INFLIGHT, orphans[i])
end
redis.call("zrem", WORKERS, unpack(dead))
return {#orphans, #dead}
