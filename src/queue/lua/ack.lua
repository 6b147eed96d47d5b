-- gatehouse ack: records how each job ended. Replaces apalis-redis 1.0's handle_results.lua
-- (linear retries up to a hard-coded 25, sets that never expire, and an error that ends the
-- worker when a job is no longer held).
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs):
--   [1] inflight_of(worker), [2] done, [3] dead, [4] scheduled, [5] meta
-- ARGV[1]: OUTAGE_MAX_WAIT_SECONDS in ms
-- then groups of 7: job id, outcome ("done" | "retry" | "dead" | "defer"), attempt, delay ms,
-- error, and what the attempt is if it counts ("retry" | "dead") with its delay ms.
-- "defer": the attempt failed for an outage or a transient fault: the job is rescheduled
-- after the delay with its attempt count unchanged, and `waiting_since` marks when it first
-- waited. Once it has waited longer than the maximum, deferrals count like any failure (the
-- fallback outcome), until an attempt that counts clears the mark.
-- Returns {jobs acknowledged, deferrals that counted because the wait ran out}. A job that
-- this worker no longer holds (orphan recovery gave it to another worker) is skipped: that
-- other run will record it.
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_wait = tonumber(ARGV[1])
local acked, expired = 0, 0
for i = 2, #ARGV, 7 do
    local id, outcome, attempt = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    local delay, err = tonumber(ARGV[i + 3]), ARGV[i + 4]
    if redis.call("srem", KEYS[1], id) == 1 then
        local meta = KEYS[5] .. ":" .. id
        if outcome == "defer" then
            local since = tonumber(redis.call("hget", meta, "waiting_since"))
            if since == nil or now - since <= max_wait then
                redis.call("zadd", KEYS[4], now + delay, id)
                redis.call("hset", meta, "status", "Pending", "attempts", attempt - 1,
                    "last_error", err, "retry_at", now + delay)
                if since == nil then
                    redis.call("hset", meta, "waiting_since", now)
                end
            else
                outcome, delay = ARGV[i + 5], tonumber(ARGV[i + 6])
                err = err .. " (counted: waited out outages past OUTAGE_MAX_WAIT_SECONDS)"
                expired = expired + 1
            end
        end
        if outcome == "done" then
            redis.call("zadd", KEYS[2], now, id)
            redis.call("hset", meta, "status", "Done", "attempts", attempt, "done_at", now)
        elseif outcome == "retry" then
            redis.call("zadd", KEYS[4], now + delay, id)
            redis.call("hset", meta, "status", "Pending", "attempts", attempt,
                "last_error", err, "retry_at", now + delay)
            -- An attempt that counted while not past the wait: the outage is over.
            if ARGV[i + 1] ~= "defer" then
                redis.call("hdel", meta, "waiting_since")
            end
        elseif outcome == "dead" then
            redis.call("zadd", KEYS[3], now, id)
            redis.call("hset", meta, "status", "Killed", "attempts", attempt,
                "last_error", err, "dead_at", now)
        end
        acked = acked + 1
    end
end
return {acked, expired}
