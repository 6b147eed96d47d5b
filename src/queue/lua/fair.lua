#!lua
-- gatehouse tenant fairness: the part every script that moves a job between waiting and
-- running shares (prepended to fetch.lua, ack.lua, heartbeat.lua and release.lua).
--
-- A shard's jobs wait in `:ready`, a sorted set scored by each job's virtual start time: a new
-- arrival of tenant t starts one after the later of t's previous start and the shard's clock
-- (the start of the job taken last), so the set interleaves tenants one job each, whatever
-- their backlogs, and keeps each tenant's own jobs in arrival order (start-time fair queuing,
-- equal weights). With QUEUE_ORDER=fifo every arrival starts one after the previous arrival of
-- any tenant: one order for all.
--
-- A tenant at its cap (TENANT_MAX_IN_FLIGHT_{QUEUE}, or its override in `:caps`; 0 or absent:
-- none) has its jobs parked in `:parked` (score 0, members "tenant|start|id", so one tenant's
-- parked jobs are one lexicographic range, in start order) instead of being taken; a slot it
-- frees moves that many back to `:ready` with their start times. While a tenant has parked
-- jobs its new arrivals are parked behind them.
--
-- KEYS, by their QueueKeys method (the one layout: jobs/src/keys.rs), all in one shard's slot:
--   [1] meta, [2] ready, [3] parked, [4] clock, [5] vtime (tenant -> last start),
--   [6] backlog (tenant -> jobs in ready or parked), [7] running (tenant -> jobs in flight),
--   [8] capped (tenant -> parked jobs), [9] caps (tenant -> max in flight override),
--   then the script's own.
-- ARGV[1]: the queue's default max in flight per tenant (0: none)
-- ARGV[2]: "fair" or "fifo", then the script's own.
local META, READY, PARKED, CLOCK, VTIME = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local BACKLOG, RUNNING, CAPPED, CAPS = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local DEFAULT_CAP = tonumber(ARGV[1]) or 0
local FAIR = ARGV[2] ~= "fifo"
-- Most parked jobs one freed slot (or a removed cap) moves back at once.
local UNPARK_CHUNK = 100

local clock = tonumber(redis.call("get", CLOCK)) or 0
local clock_read = clock
-- Read once per call: most shards have no override and no parked job, and then no job needs
-- a per-tenant lookup of either.
local any_override = redis.call("exists", CAPS) == 1
local any_parked = redis.call("exists", CAPPED) == 1

-- A virtual time as Redis keeps it: all digits (Lua's own conversion rounds past 14).
local function num(n)
    return string.format("%.0f", n)
end

local function decode_meta(id)
    local raw = redis.call("hget", META, id)
    if not raw then
        return nil
    end
    local ok, meta = pcall(cjson.decode, raw)
    if ok and type(meta) == "table" then
        return meta
    end
    return nil
end

-- A job's tenant, as its metadata says ("-": none, one bucket for every tenantless job).
local function tenant_of(meta)
    local t = meta and meta.tenant
    if type(t) == "string" and t ~= "" then
        return t
    end
    return "-"
end

local function cap_of(t)
    if any_override then
        local override = tonumber(redis.call("hget", CAPS, t))
        if override then
            return override
        end
    end
    return DEFAULT_CAP
end

local function running(t)
    return tonumber(redis.call("hget", RUNNING, t)) or 0
end

local function at_cap(t)
    local cap = cap_of(t)
    return cap > 0 and running(t) >= cap
end

local function park(t, start, id)
    redis.call("zadd", PARKED, 0, t .. "|" .. string.format("%017.0f", start) .. "|" .. id)
    redis.call("hincrby", CAPPED, t, 1)
    any_parked = true
end

-- Queues job `id` of tenant `t` at virtual time `start`: ready, or parked behind the
-- tenant's parked jobs.
local function place(t, start, id)
    if any_parked and redis.call("hexists", CAPPED, t) == 1 then
        park(t, start, id)
    else
        redis.call("zadd", READY, num(start), id)
    end
end

-- A job arriving (new, a due retry, a dead letter retried): after the tenant's last.
local function admit(t, id)
    local field = FAIR and t or "*"
    local last = tonumber(redis.call("hget", VTIME, field)) or 0
    local start = math.max(last, clock) + 1
    redis.call("hset", VTIME, field, num(start))
    redis.call("hincrby", BACKLOG, t, 1)
    place(t, start, id)
end

-- A job handed back (released by a stopping worker, rescued from a dead one): at the head.
local function requeue(t, id)
    redis.call("hincrby", BACKLOG, t, 1)
    place(t, clock, id)
end

-- A job taken to run leaves its tenant's backlog.
local function leave_backlog(t)
    if redis.call("hincrby", BACKLOG, t, -1) <= 0 then
        redis.call("hdel", BACKLOG, t)
        if FAIR then
            redis.call("hdel", VTIME, t)
        end
    end
end

-- Moves as many of t's parked jobs back to ready as it has room for under its cap.
local function unpark(t)
    if not any_parked or redis.call("hexists", CAPPED, t) == 0 then
        return
    end
    local cap = cap_of(t)
    local room = UNPARK_CHUNK
    if cap > 0 then
        room = math.min(cap - running(t), UNPARK_CHUNK)
    end
    if room <= 0 then
        return
    end
    local members = redis.call("zrangebylex", PARKED, "[" .. t .. "|", "(" .. t .. "}", "LIMIT", 0, room)
    for _, member in ipairs(members) do
        local start, id = string.match(member, "^[^|]*|(%d+)|(.*)$")
        redis.call("zrem", PARKED, member)
        if id then
            redis.call("zadd", READY, start, id)
        end
    end
    if #members == 0 or redis.call("hincrby", CAPPED, t, -#members) <= 0 then
        redis.call("hdel", CAPPED, t)
    end
end

-- A job of t stopped running (acknowledged, released, rescued): its slot is free.
local function free_slot(t)
    if redis.call("hincrby", RUNNING, t, -1) <= 0 then
        redis.call("hdel", RUNNING, t)
    end
    unpark(t)
end

-- A job `id` held in `inflight` goes back (a stopping worker's release, orphan rescue): out of
-- the inflight hash, its tenant's slot freed, at the head of the order.
local function hand_back(inflight, id)
    redis.call("hdel", inflight, id)
    local meta = decode_meta(id)
    if meta then
        local tenant = tenant_of(meta)
        free_slot(tenant)
        requeue(tenant, id)
    end
end

-- Writes the clock back if it moved (an idle fetch writes nothing).
local function save_clock()
    if clock ~= clock_read then
        redis.call("set", CLOCK, num(clock))
    end
end
