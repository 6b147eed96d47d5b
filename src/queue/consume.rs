//! The consuming side of a queue as plain async functions over a Redis connection: register,
//! fetch, acknowledge, release, heartbeat (with orphan rescue), deregister and vacuum. The
//! worker edge's apalis adapter (`worker::backend`) calls these from apalis's `Persistence`
//! hooks; the maintenance loop calls [`heartbeat`] and [`vacuum`] on its own schedule.
//!
//! Keys are [`QueueKeys`]; the scripts are [`super::scripts`]. Delivery is at-least-once: a
//! job is acknowledged after its handler returns, so a crash in between runs it again.
//!
//! Tenant fairness (`lua/fair.lua`): arrivals (`:active`) are admitted by the fetch into one
//! order per shard that takes the tenants with waiting jobs in turn, one job each, and keeps
//! each tenant's jobs first in, first out; a tenant at its cap of jobs in flight
//! ([`Fairness::max_in_flight`], or its override in `:caps`) has its jobs parked until a slot
//! of its frees. The slots are counted in Redis by the same scripts that hand jobs out and take
//! them back (fetch, ack, release, orphan rescue), so the cap holds across every worker
//! process.

use std::time::Duration;

use redis::aio::ConnectionLike;

use super::keys::{Layout, MAX_SHARDS, QueueKeys};
use super::scripts::{ACK, DEREGISTER, FETCH, FORGET, HEARTBEAT, REGISTER, RELEASE};
pub use crate::config::QueueOrder;

/// Due retries admitted per fetch: far below Lua's ~8,000 `unpack` limit, and enough that a
/// burst of 20,000 due retries drains in a few dozen fetches.
pub const PROMOTE_CHUNK: usize = 1000;
/// Arrivals admitted into the fair order per fetch: a burst of 50,000 is in order after 100
/// fetches, and one call stays short (a few milliseconds of Redis time at most).
pub const ADMIT_CHUNK: usize = 500;
/// Parked jobs one fetch may pass over (each is parked once, then left alone until its tenant
/// has room) before it answers with what it has.
pub const PASS_LIMIT: usize = 200;

/// How a queue hands out its tenants' jobs: `QUEUE_ORDER` and `TENANT_MAX_IN_FLIGHT_{QUEUE}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fairness {
    pub order: QueueOrder,
    /// The most jobs of one tenant in flight at once, across every worker process (`None`: no
    /// cap), unless the tenant's override (`tenants set-limits`) says otherwise.
    pub max_in_flight: Option<u32>,
}

impl Fairness {
    /// `queue`'s, from the configuration.
    pub fn of(config: &crate::config::Config, queue: &str) -> Self {
        Self {
            order: config.queue_order,
            max_in_flight: config.tenant_max_in_flight(queue),
        }
    }
}

/// A fairness script's invocation with `fair.lua`'s keys and arguments in place.
fn fair_invocation<'a>(
    script: &'a redis::Script,
    keys: &QueueKeys,
    fairness: Fairness,
) -> redis::ScriptInvocation<'a> {
    let mut invocation = script.prepare_invoke();
    invocation
        .key(keys.meta())
        .key(keys.ready())
        .key(keys.parked())
        .key(keys.clock())
        .key(keys.vtime())
        .key(keys.backlog())
        .key(keys.running())
        .key(keys.capped())
        .key(keys.caps())
        .arg(fairness.max_in_flight.unwrap_or(0))
        .arg(fairness.order.as_str());
    invocation
}
/// Dead workers recovered per heartbeat call.
const RECOVER_CHUNK: usize = 100;
/// Longest error text kept with a job (the cause, never a payload).
pub const MAX_ERROR_CHARS: usize = 500;

/// Where a finished attempt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Finished: into `:done` (until the vacuum).
    Done,
    /// Failed, retried after a delay: into `:scheduled`, the attempt counted.
    Retry,
    /// Failed for good: into `:dead`.
    Dead,
    /// Failed for an outage or a transient fault: rescheduled without counting the attempt.
    Defer,
}

impl Outcome {
    /// The word `ack.lua` reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Retry => "retry",
            Self::Dead => "dead",
            Self::Defer => "defer",
        }
    }
}

/// One job's acknowledgement.
#[derive(Debug, Clone)]
pub struct Ack {
    pub id: String,
    pub outcome: Outcome,
    /// The attempt that ended (1-based).
    pub attempt: usize,
    /// Before it runs again (retry, defer).
    pub delay: Duration,
    /// The error, bounded to [`MAX_ERROR_CHARS`] by the caller; empty on success.
    pub error: String,
    /// What the attempt is if it counts (a deferral whose job waited out outages for longer
    /// than the maximum counts): the outcome itself, or for a deferral `Retry`/`Dead`.
    pub counted: Outcome,
    /// The delay of `counted`.
    pub counted_delay: Duration,
}

impl Ack {
    /// An attempt (the first) that ended as `outcome`, `Done` or `Dead`, with nothing to retry.
    pub fn settled(id: impl Into<String>, outcome: Outcome, error: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            outcome,
            attempt: 1,
            delay: Duration::ZERO,
            error: error.into(),
            counted: outcome,
            counted_delay: Duration::ZERO,
        }
    }
}

/// What one acknowledgement call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// Jobs acknowledged (those the worker still held).
    pub acked: usize,
    /// Deferrals that counted because their wait ran out.
    pub expired: usize,
}

/// The shards a worker of `queue` reads: the layout's, then any shard past them that still
/// holds jobs (queued, scheduled or dead) — left by a larger `QUEUE_SHARDS_{QUEUE}` before it
/// was lowered, so they drain instead of waiting forever. Probed once, at start (one
/// `EXISTS` per possible shard); a probe that fails leaves the layout's shards.
pub async fn shards_to_read<C: ConnectionLike>(
    conn: &mut C,
    layout: &Layout,
    queue: &str,
) -> Vec<QueueKeys> {
    let mut shards = layout.all(queue);
    for shard in layout.shards(queue)..MAX_SHARDS {
        let keys = layout.shard(queue, shard);
        let present: Result<u64, _> = redis::cmd("EXISTS")
            .arg(keys.data())
            .query_async(conn)
            .await;
        match present {
            Ok(0) => {}
            Ok(_) => {
                tracing::warn!(
                    queue,
                    shard,
                    shards = layout.shards(queue),
                    "a shard past QUEUE_SHARDS_* still holds jobs; reading it until it drains"
                );
                shards.push(keys);
            }
            Err(error) => {
                tracing::debug!(queue, %error, "cannot probe for shards to drain");
                break;
            }
        }
    }
    shards
}

/// Whether the node serving each queue shard answers (a keyed `EXISTS` per shard, routed by
/// its slot). On a Redis Cluster a `PING` can succeed while one shard's primary is gone and not
/// yet replaced: this is what readiness asks there.
pub async fn every_shard_answers<C: ConnectionLike>(conn: &mut C, layout: &Layout) -> bool {
    for spec in super::table::QUEUE_SPECS.iter() {
        for keys in layout.all(spec.name) {
            let answered: Result<u64, _> = redis::cmd("EXISTS")
                .arg(keys.signal())
                .query_async(conn)
                .await;
            if answered.is_err() {
                return false;
            }
        }
    }
    true
}

/// Registers `worker` in the queue shard's workers set.
pub async fn register<C: ConnectionLike>(
    conn: &mut C,
    keys: &QueueKeys,
    worker: &str,
) -> Result<(), redis::RedisError> {
    let _: i64 = REGISTER
        .key(keys.workers())
        .arg(worker)
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// Admits up to [`PROMOTE_CHUNK`] due retries and [`ADMIT_CHUNK`] arrivals into the fair
/// order, then moves up to `batch` jobs from it into the inflight hash under `worker`'s name
/// (parking those of tenants at their cap). Returns the raw reply (payloads and metadata in
/// apalis-redis's layout).
pub async fn fetch<C: ConnectionLike>(
    conn: &mut C,
    keys: &QueueKeys,
    fairness: Fairness,
    worker: &str,
    batch: usize,
) -> Result<Vec<redis::Value>, redis::RedisError> {
    let mut invocation = fair_invocation(&FETCH, keys, fairness);
    invocation
        .key(keys.workers())
        .key(keys.active())
        .key(keys.inflight())
        .key(keys.data())
        .key(keys.scheduled())
        .arg(batch)
        .arg(worker)
        .arg(PROMOTE_CHUNK)
        .arg(ADMIT_CHUNK)
        .arg(PASS_LIMIT);
    invocation.invoke_async(conn).await
}

/// Records how each job of `acks` ended, freeing its tenant's slot; a job `worker` no longer
/// holds is skipped. `max_wait`: `OUTAGE_MAX_WAIT_SECONDS`.
pub async fn ack<C: ConnectionLike>(
    conn: &mut C,
    keys: &QueueKeys,
    fairness: Fairness,
    worker: &str,
    max_wait: Duration,
    acks: &[Ack],
) -> Result<Acked, redis::RedisError> {
    let mut invocation = fair_invocation(&ACK, keys, fairness);
    invocation
        .key(keys.inflight())
        .key(keys.done())
        .key(keys.dead())
        .key(keys.scheduled())
        .arg(max_wait.as_millis() as u64)
        .arg(worker);
    for ack in acks {
        invocation
            .arg(&ack.id)
            .arg(ack.outcome.as_str())
            .arg(ack.attempt)
            .arg(ack.delay.as_millis() as u64)
            .arg(&ack.error)
            .arg(ack.counted.as_str())
            .arg(ack.counted_delay.as_millis() as u64);
    }
    let (acked, expired): (usize, usize) = invocation.invoke_async(conn).await?;
    Ok(Acked { acked, expired })
}

/// Gives jobs `worker` fetched but did not start back to the head of the fair order, freeing
/// their tenants' slots; returns how many.
pub async fn release<C: ConnectionLike>(
    conn: &mut C,
    keys: &QueueKeys,
    fairness: Fairness,
    worker: &str,
    ids: &[String],
) -> Result<u64, redis::RedisError> {
    let mut invocation = fair_invocation(&RELEASE, keys, fairness);
    invocation.key(keys.inflight()).arg(worker);
    for id in ids {
        invocation.arg(id);
    }
    invocation.invoke_async(conn).await
}

/// One heartbeat round for a queue: keeps `names` alive (and `strict`, which must still be
/// registered), moves back the parked jobs of a few tenants that have room again (a cap raised
/// or removed), then rescues the jobs of dead workers (orphans), freeing their tenants' slots.
/// Returns (jobs recovered, dead workers).
pub async fn heartbeat<C: ConnectionLike>(
    conn: &mut C,
    keys: &QueueKeys,
    fairness: Fairness,
    orphan_timeout: Duration,
    strict: Option<&str>,
    names: &[String],
) -> Result<(u64, u64), redis::RedisError> {
    let mut invocation = fair_invocation(&HEARTBEAT, keys, fairness);
    invocation
        .key(keys.workers())
        .key(keys.inflight())
        .arg(orphan_timeout.as_millis() as u64)
        .arg(RECOVER_CHUNK)
        .arg(strict.unwrap_or(""));
    for name in names {
        invocation.arg(name);
    }
    invocation.invoke_async(conn).await
}

/// Removes `worker` from the workers set on a clean stop, if it holds no job (otherwise orphan
/// rescue hands its jobs on after the timeout).
pub async fn deregister<C: ConnectionLike>(
    conn: &mut C,
    keys: &QueueKeys,
    worker: &str,
) -> Result<(), redis::RedisError> {
    let _: i64 = DEREGISTER
        .key(keys.workers())
        .key(keys.inflight())
        .arg(worker)
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// Removes up to `limit` finished jobs older than `retention`; returns how many.
pub async fn vacuum<C: ConnectionLike>(
    conn: &mut C,
    keys: &QueueKeys,
    retention: Duration,
    limit: usize,
) -> Result<u64, redis::RedisError> {
    let retention = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    remove(conn, keys, &keys.done(), retention, limit).await
}

/// Removes up to `limit` jobs of `zset` (the shard's `:done` or `:dead`): those older than
/// `retention` ms, or the oldest when it is negative; each whose dedupe claim has time left
/// leaves a tombstone in `:gone`. Returns how many were removed.
pub(crate) async fn remove<C: ConnectionLike>(
    conn: &mut C,
    keys: &QueueKeys,
    zset: &str,
    retention: i64,
    limit: usize,
) -> Result<u64, redis::RedisError> {
    FORGET
        .key(zset)
        .key(keys.data())
        .key(keys.meta())
        .key(keys.gone())
        .arg(retention)
        .arg(limit)
        .invoke_async(conn)
        .await
}
