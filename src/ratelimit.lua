#!lua
-- GCRA rate limit (see ratelimit.rs).
-- KEYS[1]: the limit's key
-- ARGV[1]: period in microseconds, ARGV[2]: emission interval in microseconds,
-- ARGV[3]: "hit" (count the attempt if allowed) or "peek" (count nothing)
-- Returns {allowed (1/0), remaining, retry_after_us, reset_us}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])

local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end

local new_tat = tat + interval
local allow_at = new_tat - period
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end

if ARGV[3] == 'hit' then
  local ttl_ms = math.ceil((new_tat - now) / 1000)
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', ttl_ms)
  tat = new_tat
end

-- attempts left after this one (hit) or including it (peek)
local remaining = math.floor((now + period - tat) / interval)
return {1, remaining, 0, tat - now}
