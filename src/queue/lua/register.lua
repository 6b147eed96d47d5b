#!lua
-- gatehouse worker registration: names are unique per process and restart, so there is no
-- "still active" refusal to trip over (apalis-redis 1.0 refuses a name seen within the
-- threshold and deregisters the wrong member).
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs):
--   [1] workers
-- ARGV[1]: worker name
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("zadd", KEYS[1], now, ARGV[1])
return 1
