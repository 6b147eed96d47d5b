-- gatehouse release (after fair.lua): jobs this worker fetched but did not start (it is
-- stopping) go back to the head of the fair order, each freeing its tenant's slot.
-- KEYS after fair.lua's nine: [10] inflight
-- ARGV after fair.lua's two: [3] worker name, [4..] job ids
local INFLIGHT = KEYS[10]
local released = 0
for i = #ARGV, 4, -1 do
    local id = ARGV[i]
    if redis.call("hget", INFLIGHT, id) == ARGV[3] then
        hand_back(INFLIGHT, id)
        released = released + 1
    end
end
return released
