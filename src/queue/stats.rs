//! Queue statistics: how many jobs of a queue wait, wait for a retry, run, are dead or done,
//! read in one Redis script so the numbers are one consistent snapshot. Used by `/metrics`
//! and the operator dashboard; reads only ids and counts, never a payload.

use redis::aio::ConnectionLike;

use super::keys::Layout;
use super::scripts::STATS;

/// One queue's counts at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    pub queue: String,
    /// Waiting to be fetched.
    pub pending: u64,
    /// Failed and scheduled for a retry (waiting for their backoff to pass).
    pub retrying: u64,
    /// Held by a worker right now.
    pub in_flight: u64,
    /// Dead letters.
    pub dead: u64,
    /// Finished and not yet vacuumed.
    pub done: u64,
    /// Registered worker instances.
    pub workers: u64,
    /// Tenants with jobs waiting in the fair order (ready or parked), summed over shards.
    pub tenants_waiting: u64,
    /// Tenants with jobs parked at their cap of jobs in flight, summed over shards.
    pub tenants_capped: u64,
}

/// The counts of `queue`, summed over its shards (each shard read in one script, so its
/// numbers are one snapshot). `workers`: the most registered on one shard (every worker
/// process registers on each shard).
pub async fn queue_stats<C: ConnectionLike>(
    conn: &mut C,
    layout: &Layout,
    queue: &str,
) -> Result<QueueStats, redis::RedisError> {
    let mut total = QueueStats {
        queue: queue.to_owned(),
        ..QueueStats::default()
    };
    for keys in layout.all(queue) {
        let counts: Vec<u64> = STATS
            .key(keys.active())
            .key(keys.scheduled())
            .key(keys.workers())
            .key(keys.inflight())
            .key(keys.dead())
            .key(keys.done())
            .key(keys.ready())
            .key(keys.parked())
            .key(keys.backlog())
            .key(keys.capped())
            .invoke_async(conn)
            .await?;
        let at = |i: usize| counts.get(i).copied().unwrap_or(0);
        total.pending += at(0);
        total.retrying += at(1);
        total.in_flight += at(2);
        total.dead += at(3);
        total.done += at(4);
        total.workers = total.workers.max(at(5));
        total.tenants_waiting += at(6);
        total.tenants_capped += at(7);
    }
    Ok(total)
}

/// The counts of every queue in `queues`, in that order.
pub async fn all_queue_stats<C: ConnectionLike>(
    conn: &mut C,
    layout: &Layout,
    queues: &[&str],
) -> Result<Vec<QueueStats>, redis::RedisError> {
    let mut out = Vec::with_capacity(queues.len());
    for queue in queues {
        out.push(queue_stats(conn, layout, queue).await?);
    }
    Ok(out)
}
