-- gatehouse ack (after fair.lua): records how each job ended. Replaces apalis-redis 1.0's handle_results.lua
-- (linear retries up to a hard-coded 25, sets that never expire, and an error that ends the
-- worker when a job is no longer held).
--
-- KEYS after fair.lua's nine: [10] inflight, [11] done, [12] dead, [13] scheduled
-- ARGV after fair.lua's two: [3] OUTAGE_MAX_WAIT_SECONDS in ms, [4] worker name,
-- then groups of 7: job id, outcome ("done" | "retry" | "dead" | "defer"), attempt, delay ms,
-- error, and what the attempt is if it counts ("retry" | "dead") with its delay ms.
-- "defer": the attempt failed for an outage or a transient fault: the job is rescheduled
-- after the delay with its attempt count unchanged, and `waiting_since` marks when it first
-- waited. Once it has waited longer than the maximum, deferrals count like any failure (the
-- fallback outcome), until an attempt that counts clears the mark.
-- Returns {jobs acknowledged, deferrals that counted because the wait ran out}. A job that
-- this worker no longer holds (orphan recovery gave it to another worker) is skipped: that
-- other run will record it. Each job acknowledged frees its tenant's slot.
local INFLIGHT, DONE, DEAD, SCHEDULED = KEYS[10], KEYS[11], KEYS[12], KEYS[13]
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_wait = tonumber(ARGV[3])
local worker = ARGV[4]
local acked, expired = 0, 0
for i = 5, #ARGV, 7 do
    local id, outcome, attempt = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    local delay, err = tonumber(ARGV[i + 3]), ARGV[i + 4]
    if redis.call("hget", INFLIGHT, id) == worker then
        redis.call("hdel", INFLIGHT, id)
        local meta = decode_meta(id) or {}
        free_slot(tenant_of(meta))
        if outcome == "defer" then
            local since = tonumber(meta.waiting_since)
            if since == nil or now - since <= max_wait then
                redis.call("zadd", SCHEDULED, now + delay, id)
                meta.status, meta.attempts = "Pending", tostring(attempt - 1)
                meta.last_error, meta.retry_at = err, tostring(now + delay)
                if since == nil then
                    meta.waiting_since = tostring(now)
                end
            else
                outcome, delay = ARGV[i + 5], tonumber(ARGV[i + 6])
                err = err .. " (counted: waited out outages past OUTAGE_MAX_WAIT_SECONDS)"
                expired = expired + 1
            end
        end
        if outcome == "done" then
            redis.call("zadd", DONE, now, id)
            meta.status, meta.attempts, meta.done_at = "Done", tostring(attempt), tostring(now)
        elseif outcome == "retry" then
            redis.call("zadd", SCHEDULED, now + delay, id)
            meta.status, meta.attempts = "Pending", tostring(attempt)
            meta.last_error, meta.retry_at = err, tostring(now + delay)
            -- An attempt that counted while not past the wait: the outage is over.
            if ARGV[i + 1] ~= "defer" then
                meta.waiting_since = nil
            end
        elseif outcome == "dead" then
            redis.call("zadd", DEAD, now, id)
            meta.status, meta.attempts = "Killed", tostring(attempt)
            meta.last_error, meta.dead_at = err, tostring(now)
        end
        redis.call("hset", META, id, cjson.encode(meta))
        acked = acked + 1
    end
end
return {acked, expired}
