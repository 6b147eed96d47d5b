//! The outbox relay: jobs committed with a database write (an approved key rotation) are
//! pushed to their Redis queue and marked sent.
//!
//! A row is pushed with the job id it was committed with, and the enqueue script refuses a
//! job id it already holds (`HSETNX` on the queue's data hash), so pushing a row twice — two
//! relays racing, or a crash between the push and the `sent_at` update — enqueues it once.
//! Redis unreachable: the row stays pending (its `attempts` and `last_error` say why) and the
//! next pass pushes it. Nothing is locked while Redis is called (no slow I/O inside a
//! transaction); the idempotent push is what makes concurrent relays safe.
//!
//! Who runs it: every worker process, once a second (`worker::maintenance`), because a job is only
//! useful where workers run and they are the processes that must notice Redis coming back;
//! the ingress also makes one attempt right after the approval commits, so a rotation
//! normally starts without waiting for the next pass.

use gatehouse_jobs::client::{Enqueue, Queues};
use redis::aio::ConnectionLike;
use sqlx::PgPool;

/// Rows pushed per pass.
pub const RELAY_BATCH: i64 = 100;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayOutcome {
    /// Rows pushed and marked sent (including rows whose job id Redis already held).
    pub sent: u64,
    /// Rows left pending because Redis refused or could not be reached.
    pub failed: u64,
}

/// Pushes up to [`RELAY_BATCH`] pending rows, oldest first. Database errors are returned;
/// Redis errors are recorded on the row and counted in `failed` (the first one ends the
/// pass: Redis is likely down for the rest too).
pub async fn relay<C: ConnectionLike>(
    pool: &PgPool,
    redis: &mut C,
    queues: &Queues,
) -> Result<RelayOutcome, sqlx::Error> {
    let rows: Vec<(i64, String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT id, queue, job_id, payload FROM outbox
         WHERE sent_at IS NULL ORDER BY id LIMIT $1",
    )
    .bind(RELAY_BATCH)
    .fetch_all(pool)
    .await?;
    let mut outcome = RelayOutcome::default();
    for (id, queue, job_id, payload) in rows {
        // The row holds the payload as it rests in Redis (sealed with its job id when its
        // queue seals): pushed as it is, never sealed again.
        let pushed = queues
            .enqueue_at_rest(
                redis,
                &queue,
                &job_id,
                &payload.to_string(),
                Enqueue::default(),
            )
            .await;
        match pushed {
            Ok(enqueued) => {
                sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = $1 AND sent_at IS NULL")
                    .bind(id)
                    .execute(pool)
                    .await?;
                tracing::info!(outbox.id = id, job.id = %job_id, job.queue = %queue, created = enqueued.created, "outbox entry relayed");
                outcome.sent += 1;
            }
            Err(error) => {
                tracing::warn!(outbox.id = id, job.id = %job_id, job.queue = %queue, %error, "cannot relay outbox entry; will retry");
                sqlx::query(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = $2
                     WHERE id = $1 AND sent_at IS NULL",
                )
                .bind(id)
                .bind(error.to_string())
                .execute(pool)
                .await?;
                outcome.failed += 1;
                break;
            }
        }
    }
    Ok(outcome)
}
