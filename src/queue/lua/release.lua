#!lua
-- gatehouse release: jobs this worker fetched but did not start (it is stopping) go back to
-- the head of the active list.
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] inflight, [2] active
-- ARGV[1]: worker name; ARGV[2..]: job ids
local released = 0
for i = #ARGV, 2, -1 do
    if redis.call("hget", KEYS[1], ARGV[i]) == ARGV[1] then
        redis.call("hdel", KEYS[1], ARGV[i])
        redis.call("lpush", KEYS[2], ARGV[i])
        released = released + 1
    end
end
return released
