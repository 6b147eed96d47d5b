#!lua
-- gatehouse deregistration on a clean stop: the name leaves the workers set only when it
-- holds no job; otherwise orphan recovery hands its jobs on after the timeout.
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] workers, [2] inflight
-- ARGV[1]: worker name
local holder = ARGV[1]
local cursor = "0"
repeat
    local page = redis.call("hscan", KEYS[2], cursor, "COUNT", 1000)
    cursor = page[1]
    local entries = page[2]
    for i = 2, #entries, 2 do
        if entries[i] == holder then
            return 0
        end
    end
until cursor == "0"
redis.call("zrem", KEYS[1], holder)
return 1
