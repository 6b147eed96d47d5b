-- gatehouse stats: one consistent snapshot of a queue's counts, for /metrics and /admin.
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs):
--   [1] active, [2] scheduled, [3] workers, [4] inflight, [5] dead, [6] done
-- Returns {pending, scheduled, in_flight, dead, done, workers}.
local workers = redis.call("zrange", KEYS[3], 0, -1)
local in_flight = 0
for _, worker in ipairs(workers) do
    in_flight = in_flight + redis.call("scard", KEYS[4] .. ":" .. worker)
end
return {
    redis.call("llen", KEYS[1]),
    redis.call("zcard", KEYS[2]),
    in_flight,
    redis.call("zcard", KEYS[5]),
    redis.call("zcard", KEYS[6]),
    #workers,
}
