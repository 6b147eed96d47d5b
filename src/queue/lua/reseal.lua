-- gatehouse reseal: a key rotation's compare-and-set of re-sealed payloads. A payload is
-- replaced only if it is still exactly what the rotation read and its job is not held by a
-- worker (in some registered worker's inflight set): a job a worker took meanwhile is left
-- alone, as is one that was retried, purged or vacuumed; the rotation's next pass sees it again.
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs):
--   [1] data, [2] workers, [3] inflight (prefix of the per-worker sets)
-- ARGV: triples of job id, the payload as read, the re-sealed payload
-- Returns {payloads replaced, payloads left alone}.
local workers = redis.call("zrange", KEYS[2], 0, -1)
local replaced, left = 0, 0
for i = 1, #ARGV, 3 do
    local id = ARGV[i]
    local held = false
    for _, worker in ipairs(workers) do
        if redis.call("sismember", KEYS[3] .. ":" .. worker, id) == 1 then
            held = true
            break
        end
    end
    if not held and redis.call("hget", KEYS[1], id) == ARGV[i + 1] then
        redis.call("hset", KEYS[1], id, ARGV[i + 2])
        replaced = replaced + 1
    else
        left = left + 1
    end
end
return {replaced, left}
