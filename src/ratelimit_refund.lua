#!lua
-- Gives back one attempt of a GCRA limit (see ratelimit.rs): the counterpart of a "hit"
-- whose attempt turned out not to count (a reserved login that succeeded).
-- KEYS[1]: the limit's key
-- ARGV[1]: emission interval in microseconds
-- Returns 1 when something was given back, 0 when the limit was already full.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])

local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat <= now then
  return 0
end

-- never below now: a refund cannot bank attempts beyond the limit's burst
local new_tat = tat - interval
if new_tat <= now then
  redis.call('DEL', KEYS[1])
else
  local ttl_ms = math.ceil((new_tat - now) / 1000)
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', ttl_ms)
end
return 1
