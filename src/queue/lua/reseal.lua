#!lua
-- gatehouse reseal: a key rotation's compare-and-set of re-sealed payloads. A payload is
-- replaced only if it is still exactly what the rotation read and its job is not held by a
-- worker (in the inflight hash under a registered worker's name): a job a worker took
-- meanwhile is left alone, as is one that was retried, purged or vacuumed; the rotation's next
-- pass sees it again.
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] data, [2] workers, [3] inflight
-- ARGV: triples of job id, the payload as read, the re-sealed payload
-- Returns {payloads replaced, payloads left alone}.
local replaced, left = 0, 0
for i = 1, #ARGV, 3 do
    local id = ARGV[i]
    local holder = redis.call("hget", KEYS[3], id)
    local held = holder and redis.call("zscore", KEYS[2], holder)
    if not held and redis.call("hget", KEYS[1], id) == ARGV[i + 1] then
        redis.call("hset", KEYS[1], id, ARGV[i + 2])
        replaced = replaced + 1
    else
        left = left + 1
    end
end
return {replaced, left}
