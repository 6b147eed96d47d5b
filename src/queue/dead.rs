//! Dead letters: jobs that failed permanently or ran out of attempts. Listing shows ids,
//! queues, attempts, the last error and the time, never a payload; retry puts a job back on
//! its queue with a fresh attempt budget; purge deletes dead jobs for good.

use redis::aio::ConnectionLike;

use super::keys::{JobMeta, Layout};
use super::scripts::DEAD_RETRY;

/// Dead jobs deleted per purge script call.
const PURGE_CHUNK: usize = 1000;

/// One dead job, as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadJob {
    pub id: String,
    pub queue: String,
    pub attempts: u32,
    /// The last error (bounded, control characters removed); empty if none was recorded.
    pub last_error: String,
    /// When it was dead-lettered, milliseconds since the Unix epoch (Redis server time).
    pub dead_at_ms: u64,
}

fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(super::consume::MAX_ERROR_CHARS)
        .collect()
}

/// The newest `limit` dead jobs of each shard of `queues`, newest first overall.
pub async fn list<C: ConnectionLike>(
    conn: &mut C,
    layout: &Layout,
    queues: &[&str],
    limit: usize,
) -> Result<Vec<DeadJob>, redis::RedisError> {
    let mut jobs = Vec::new();
    for keys in queues.iter().flat_map(|queue| layout.all(queue)) {
        let queue = &keys.queue;
        let entries: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
            .arg(keys.dead())
            .arg(0)
            .arg(limit.saturating_sub(1))
            .arg("WITHSCORES")
            .query_async(conn)
            .await?;
        let metas: Vec<Option<String>> = if entries.is_empty() {
            Vec::new()
        } else {
            let mut hmget = redis::cmd("HMGET");
            hmget.arg(keys.meta());
            for (id, _) in &entries {
                hmget.arg(id);
            }
            hmget.query_async(conn).await?
        };
        for ((id, score), meta) in entries.into_iter().zip(metas) {
            let meta = JobMeta::parse(meta.as_deref());
            jobs.push(DeadJob {
                id,
                queue: queue.clone(),
                attempts: meta
                    .get("attempts")
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(0),
                last_error: printable(meta.get("last_error").unwrap_or("")),
                dead_at_ms: score.max(0.0) as u64,
            });
        }
    }
    jobs.sort_by(|a, b| b.dead_at_ms.cmp(&a.dead_at_ms).then(a.id.cmp(&b.id)));
    jobs.truncate(limit);
    Ok(jobs)
}

/// Puts dead job `id` back on its queue; returns the queue, or `None` when no queue has
/// such a dead job.
pub async fn retry<C: ConnectionLike>(
    conn: &mut C,
    layout: &Layout,
    queues: &[&str],
    id: &str,
) -> Result<Option<String>, redis::RedisError> {
    for keys in queues.iter().flat_map(|queue| layout.all(queue)) {
        let moved: i64 = DEAD_RETRY
            .key(keys.dead())
            .key(keys.active())
            .key(keys.meta())
            .key(keys.data())
            .arg(id)
            .invoke_async(conn)
            .await?;
        if moved == 1 {
            return Ok(Some(keys.queue));
        }
    }
    Ok(None)
}

/// Deletes every dead job of `queues` (payload, metadata and entry); returns how many.
pub async fn purge<C: ConnectionLike>(
    conn: &mut C,
    layout: &Layout,
    queues: &[&str],
) -> Result<u64, redis::RedisError> {
    let mut total = 0;
    for keys in queues.iter().flat_map(|queue| layout.all(queue)) {
        loop {
            let removed =
                super::consume::remove(conn, &keys, &keys.dead(), -1, PURGE_CHUNK).await?;
            total += removed;
            if removed < PURGE_CHUNK as u64 {
                break;
            }
        }
    }
    Ok(total)
}
