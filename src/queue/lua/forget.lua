#!lua
-- gatehouse forget: removes the given jobs (payload, metadata, entry) that are still in the
-- zset, and leaves a tombstone for each removed job whose dedupe claim has time left: its
-- purpose's key holds the job id until `dedupe_until`, so the purpose stays claimed after
-- the job is gone (what `jobs/lua/enqueue.lua` reads). A key already there is kept.
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] done or dead, [2] data, [3] meta, [4..] dedupe(purpose) of each claim, in order
-- ARGV[1]: the number of claims; then, for each claim: job id, until (ms); then the job ids
-- Returns the number of jobs removed.
local claims = tonumber(ARGV[1])
local removed = {}
local ids = {}
for i = 2 + 2 * claims, #ARGV do
    local id = ARGV[i]
    if redis.call("zscore", KEYS[1], id) then
        ids[#ids + 1] = id
        removed[id] = true
    end
end
if #ids > 0 then
    redis.call("hdel", KEYS[2], unpack(ids))
    redis.call("hdel", KEYS[3], unpack(ids))
    redis.call("zrem", KEYS[1], unpack(ids))
end
if claims > 0 then
    local t = redis.call("time")
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    for c = 1, claims do
        local id, untl = ARGV[2 * c], tonumber(ARGV[2 * c + 1])
        if removed[id] and untl and untl > now then
            redis.call("set", KEYS[3 + c], id, "PX", untl - now, "NX")
        end
    end
end
return #ids
