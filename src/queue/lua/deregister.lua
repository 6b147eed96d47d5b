-- gatehouse deregistration on a clean stop: the name leaves the workers set only when it
-- holds no job; otherwise orphan recovery hands its jobs on after the timeout.
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs):
--   [1] workers, [2] inflight_of(worker)
-- ARGV[1]: worker name
if redis.call("scard", KEYS[2]) == 0 then
    redis.call("zrem", KEYS[1], ARGV[1])
    return 1
end
return 0
