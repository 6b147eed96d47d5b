-- gatehouse ack: records how each job ended. Replaces apalis-redis 1.0's handle_results.lua
-- (linear retries up to a hard-coded 25, sets that never expire, and an error that ends the
-- worker when a job is no longer held).
--
-- KEYS[1]: {queue}:inflight:{worker}
-- KEYS[2]: {queue}:done       (zset job id -> finished ms; the vacuum's index)
-- KEYS[3]: {queue}:dead       (zset job id -> dead-lettered ms)
-- KEYS[4]: {queue}:scheduled  (zset job id -> due ms)
-- KEYS[5]: {queue}:meta       (prefix)
-- ARGV: groups of 5: job id, outcome ("done" | "retry" | "dead"), attempt, delay ms, error
-- Returns the number of jobs acknowledged. A job that this worker no longer holds (orphan
-- recovery gave it to another worker) is skipped: that other run will record it.
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local acked = 0
for i = 1, #ARGV, 5 do
    local id, outcome, attempt = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local delay, err = tonumber(ARGV[i + 3]), ARGV[i + 4]
    if redis.call("srem", KEYS[1], id) == 1 then
        local meta = KEYS[5] .. ":" .. id
        if outcome == "done" then
            redis.call("zadd", KEYS[2], now, id)
            redis.call("hset", meta, "status", "Done", "attempts", attempt, "done_at", now)
        elseif outcome == "retry" then
            redis.call("zadd", KEYS[4], now + delay, id)
            redis.call("hset", meta, "status", "Pending", "attempts", attempt,
                "last_error", err, "retry_at", now + delay)
        else
            redis.call("zadd", KEYS[3], now, id)
            redis.call("hset", meta, "status", "Killed", "attempts", attempt,
                "last_error", err, "dead_at", now)
        end
        acked = acked + 1
    end
end
return acked
