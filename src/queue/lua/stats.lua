-- gatehouse stats: one consistent snapshot of a queue's counts, for /metrics and /admin.
--
-- KEYS[1]: {queue}:active     (list of job ids waiting)
-- KEYS[2]: {queue}:scheduled  (zset of retries waiting for their time)
-- KEYS[3]: {queue}:workers    (zset worker name -> last heartbeat ms)
-- KEYS[4]: {queue}:inflight   (prefix of per-worker inflight sets)
-- KEYS[5]: {queue}:dead       (zset)
-- KEYS[6]: {queue}:done       (zset)
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
