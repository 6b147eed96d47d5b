//! Moves what a release before the cluster-safe layout (issue 18) left in Redis into shard 0 of
//! the current layout, so an upgrade loses no job: the workers' maintenance round calls
//! [`relay`] for every queue until the old keys are empty.
//!
//! The old layout ([`LegacyKeys`]: `{namespace}:{queue}:…`, a hash per job's metadata, a set
//! per worker) only ever lived on a single Redis, where one script may touch keys of several
//! slots; on a Redis Cluster there is nothing to move and [`relay`] is not called.
//!
//! While old and new releases run side by side (a rolling deploy), old producers keep pushing
//! to the old keys and old workers keep taking from them: each round moves the jobs that wait
//! (queued, scheduled, dead and retained ones), never one an old worker holds; its
//! acknowledgement lands in the old keys and the next round moves it. The jobs of an old
//! worker that stopped without handing them back (it was killed or its release removed) go
//! back to the old active list once its heartbeat is older than the orphan timeout, as its own
//! release would have done, and move from there. Dedupe keys are not moved: they expire (a
//! retried webhook in the minutes of the upgrade may be enqueued twice; handlers are
//! idempotent).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionLike;

use super::keys::{LegacyKeys, QueueKeys};

/// Jobs moved per script call.
const CHUNK: usize = 200;

/// What one [`relay`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Jobs moved into the current layout.
    pub moved: u64,
    /// Jobs of dead old workers handed back to the old active list (moved by a later call).
    pub recovered: u64,
}

/// Hands a dead old worker's jobs back to the old active list (its release's orphan rescue).
/// KEYS: [1] old workers, [2] old active, [3] the old worker's inflight set.
/// ARGV: [1] worker name, [2] the heartbeat before which it is dead (ms).
static RECOVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
local score = redis.call("zscore", KEYS[1], ARGV[1])
if score and tonumber(score) > tonumber(ARGV[2]) then
    return 0
end
local recovered = 0
while true do
    local jobs = redis.call("spop", KEYS[3], 500)
    if #jobs == 0 then
        break
    end
    redis.call("lpush", KEYS[2], unpack(jobs))
    recovered = recovered + #jobs
end
redis.call("zrem", KEYS[1], ARGV[1])
return recovered
"#,
    )
});

/// Moves listed jobs, each with its payload and metadata, from the old layout to the new one.
/// KEYS: [1] old data, [2] old active, [3] old scheduled, [4] old dead, [5] old done,
///   [6] data, [7] active, [8] scheduled, [9] dead, [10] done, [11] meta, [12] signal,
///   then one old metadata hash per id, in ARGV's order.
/// ARGV: job ids. Returns how many moved. A job no longer in any old list (an old worker took
/// it) stays where it is.
static MOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
local moved = 0
for i, id in ipairs(ARGV) do
    local meta_key = KEYS[12 + i]
    local where, score = nil, nil
    if redis.call("lrem", KEYS[2], 1, id) > 0 then
        where = 7
    else
        for _, k in ipairs({3, 4, 5}) do
            score = redis.call("zscore", KEYS[k], id)
            if score then
                redis.call("zrem", KEYS[k], id)
                where = k + 5
                break
            end
        end
    end
    if where then
        local data = redis.call("hget", KEYS[1], id)
        if data then
            local flat = redis.call("hgetall", meta_key)
            local meta = {}
            for j = 1, #flat, 2 do
                meta[flat[j]] = flat[j + 1]
            end
            if meta.attempts == nil then
                meta.attempts, meta.status = "0", "Pending"
            end
            if meta.max_attempts == nil then
                meta.max_attempts = "1"
            end
            redis.call("hset", KEYS[6], id, data)
            redis.call("hset", KEYS[11], id, cjson.encode(meta))
            if where == 7 then
                redis.call("rpush", KEYS[7], id)
            else
                redis.call("zadd", KEYS[where], score, id)
            end
            moved = moved + 1
        end
        redis.call("hdel", KEYS[1], id)
        redis.call("del", meta_key)
    end
end
if moved > 0 then
    redis.call("del", KEYS[12])
    redis.call("lpush", KEYS[12], 1)
end
return moved
"#,
    )
});

/// One round for `queue`: hands the jobs of dead old workers back, then moves up to `limit`
/// waiting jobs from the old layout into shard 0 of the current one. Cheap when there is
/// nothing: one `EXISTS`.
pub async fn relay<C: ConnectionLike>(
    conn: &mut C,
    namespace: &str,
    queue: &str,
    orphan_timeout: Duration,
    limit: usize,
) -> Result<Relayed, redis::RedisError> {
    let old = LegacyKeys::new(namespace, queue);
    let new = QueueKeys::new(namespace, queue);
    let mut relayed = Relayed::default();
    let present: u64 = redis::cmd("EXISTS")
        .arg(old.key("data"))
        .arg(old.key("workers"))
        .query_async(conn)
        .await?;
    if present == 0 {
        return Ok(relayed);
    }
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    let now_ms = seconds * 1000 + micros / 1000;
    let before = now_ms.saturating_sub(orphan_timeout.as_millis() as u64);
    let dead: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(old.key("workers"))
        .arg("-inf")
        .arg(before)
        .query_async(conn)
        .await?;
    for worker in dead {
        let recovered: u64 = RECOVER
            .key(old.key("workers"))
            .key(old.key("active"))
            .key(old.inflight_of(&worker))
            .arg(&worker)
            .arg(before)
            .invoke_async(conn)
            .await?;
        relayed.recovered += recovered;
    }
    while (relayed.moved as usize) < limit {
        let take = CHUNK.min(limit - relayed.moved as usize);
        let mut ids: Vec<String> = redis::cmd("LRANGE")
            .arg(old.key("active"))
            .arg(0)
            .arg(take - 1)
            .query_async(conn)
            .await?;
        for set in ["scheduled", "dead", "done"] {
            if ids.len() >= take {
                break;
            }
            let more: Vec<String> = redis::cmd("ZRANGE")
                .arg(old.key(set))
                .arg(0)
                .arg(take - ids.len() - 1)
                .query_async(conn)
                .await?;
            ids.extend(more);
        }
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert(id.clone()));
        if ids.is_empty() {
            break;
        }
        let mut call = MOVE.prepare_invoke();
        for suffix in ["data", "active", "scheduled", "dead", "done"] {
            call.key(old.key(suffix));
        }
        call.key(new.data())
            .key(new.active())
            .key(new.scheduled())
            .key(new.dead())
            .key(new.done())
            .key(new.meta())
            .key(new.signal());
        for id in &ids {
            call.key(old.meta_of(id));
        }
        for id in &ids {
            call.arg(id);
        }
        let moved: u64 = call.invoke_async(conn).await?;
        relayed.moved += moved;
        if moved == 0 {
            break;
        }
    }
    Ok(relayed)
}
