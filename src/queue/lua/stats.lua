#!lua
-- gatehouse stats: one consistent snapshot of a queue shard's counts, for /metrics and /admin.
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] active, [2] scheduled, [3] workers, [4] inflight, [5] dead, [6] done, [7] ready,
--   [8] parked, [9] backlog, [10] capped
-- Returns {pending, scheduled, in_flight, dead, done, workers, tenants with jobs waiting,
-- tenants with jobs parked at their cap}. Pending counts arrivals not yet in the fair order,
-- ready jobs and parked ones.
return {
    redis.call("llen", KEYS[1]) + redis.call("zcard", KEYS[7]) + redis.call("zcard", KEYS[8]),
    redis.call("zcard", KEYS[2]),
    redis.call("hlen", KEYS[4]),
    redis.call("zcard", KEYS[5]),
    redis.call("zcard", KEYS[6]),
    redis.call("zcard", KEYS[3]),
    redis.call("hlen", KEYS[9]),
    redis.call("hlen", KEYS[10]),
}
