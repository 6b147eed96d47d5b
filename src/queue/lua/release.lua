-- gatehouse release: jobs this worker fetched but did not start (it is stopping) go back to
-- the head of the active list.
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs):
--   [1] inflight_of(worker), [2] active
-- ARGV: job ids
local released = 0
for i = #ARGV, 1, -1 do
    if redis.call("srem", KEYS[1], ARGV[i]) == 1 then
        redis.call("lpush", KEYS[2], ARGV[i])
        released = released + 1
    end
end
return released
