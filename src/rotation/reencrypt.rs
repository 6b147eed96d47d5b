//! The re-encryption runner of the `rotate_keys` job: batches, progress, unreadable values,
//! `run` and its `finish`.
//!
//! Re-encryption, and how several jobs for one rotation cooperate. Each batch is one
//! transaction: `SELECT … FOR UPDATE SKIP LOCKED` of values whose envelope key id is not the
//! current key (and that this rotation has not already recorded as unreadable), open, seal
//! under the current key, `UPDATE`, and add the batch's counts to the rotation row in SQL
//! (`done = done + n`) in the same transaction. So a value is counted exactly when the
//! transaction that re-sealed it commits: a killed worker's batch rolls back with its
//! counts, a redelivered or concurrent job never counts a value twice (a re-sealed value no
//! longer matches the selection, a locked one is skipped), and several workers — or two
//! jobs for the same rotation — share the work. A value that does not open is left
//! untouched, recorded once in `key_rotation_failures` (primary key: rotation, cell), counted
//! in `failed` and reported as an `encryption_error` event; later batches skip it.
//!
//! `total` is the number of values not under the target key when the first job moves the
//! rotation from `queued` to `running` (a plain count; only that job's conditional update
//! writes it, so later or concurrent jobs do not reset it). Values sealed under an old key
//! after that moment (a process still running the previous configuration) are re-sealed
//! too; completion then raises `total` to `done + failed`, so progress never reads above
//! 100 %. A job that finds nothing left to lock but values still pending (another worker's
//! batch in flight) waits for that batch rather than declaring the rotation complete; if
//! that worker dies its locks go with its connection and the survivor takes the rows.
//!
//! Then the job payloads Redis holds (SPEC "Customer data in Redis"): every payload not under
//! the current key — queued, scheduled, dead or retained — is opened and sealed again
//! (`crate::queue::at_rest::reseal_pass`) with a compare-and-set per job, so one that a worker
//! holds, or that moved meanwhile, is left alone; passes repeat until Redis holds nothing under
//! an old key, waiting for held jobs (a job holds its payload for one attempt) up to the stall
//! limit, past which the job is retried and the next run carries on. The rotation is complete
//! only then. A payload no configured key opens is recorded once in
//! `key_rotation_job_failures`, counted in `failed` and reported as an `encryption_error`
//! event naming its queue and job id. The payloads' counts join `done` after their
//! compare-and-set (not in one transaction with Redis: a run killed between the two undercounts
//! `done`, never re-seals twice).
//!
//! Re-sealing does not change a value, so the ingress's webhook key cache (which holds opened
//! keys) stays correct and `tenants.keys_version` is not bumped; a web request that reads a
//! row meanwhile sees the old envelope (its key is still configured as old) or the new one.

use std::time::Duration;

use gatehouse_jobs::{Job, RotateKeys};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::{RotationError, SEALED_COLUMNS, SealedColumn, get};
use crate::events::{EventType, SecurityEvent, SecurityLog};
use crate::queue::at_rest;
use crate::security::keyring::{KeyId, Keyring, aad};

/// How a run of the `rotate_keys` job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// This run finished the rotation (`completed`, or `failed` when values did not open).
    Finished {
        status: String,
        total: i64,
        done: i64,
        failed: i64,
    },
    /// Another run finished it first, or it had already finished.
    AlreadyFinished { status: String },
}

/// What a run needs besides the pool.
#[derive(Debug, Clone, Copy)]
pub struct RunContext<'a> {
    pub keyring: &'a Keyring,
    /// Where `key_rotation_*` and `encryption_error` events go.
    pub events: &'a SecurityLog,
    pub job_id: &'a str,
    pub worker: &'a str,
    pub batch_size: usize,
    /// Where the job payloads to re-seal are (`REDIS_URL`, `QUEUE_NAMESPACE`).
    pub redis: &'a crate::redis_conn::RedisConn,
    pub layout: &'a gatehouse_jobs::keys::Layout,
    /// How long the run waits, without re-sealing anything, for values other transactions
    /// hold locked before it gives up with [`RotationError::Stalled`] (retryable: the job is
    /// retried later and resumes, and its worker slot is free meanwhile).
    pub stall_limit: Duration,
}

/// The worker's [`RunContext::stall_limit`].
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// SQL: the value is not under the current key (`$1`) and the rotation (`$2`) has not
/// recorded it as unreadable.
fn pending_filter(col: &SealedColumn, alias: &str) -> String {
    format!(
        "{alias}.{c} IS NOT NULL AND substring({alias}.{c} from 2 for 8) <> $1
         AND NOT EXISTS (SELECT 1 FROM key_rotation_failures f
                         WHERE f.rotation_id = $2 AND f.table_name = '{t}'
                           AND f.column_name = '{c}' AND f.row_id = {alias}.id)",
        c = col.column,
        t = col.table,
    )
}

/// Values still to re-seal (not locked: rows in another worker's open batch count), every
/// sealed column in one statement.
async fn remaining<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    current: &[u8],
    rotation_id: Uuid,
) -> Result<i64, sqlx::Error> {
    let counts: Vec<String> = SEALED_COLUMNS
        .iter()
        .map(|col| {
            format!(
                "(SELECT count(*) FROM {t} x WHERE {filter})",
                t = col.table,
                filter = pending_filter(col, "x"),
            )
        })
        .collect();
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT ({})::int8",
        counts.join(" + ")
    )))
    .bind(current)
    .bind(rotation_id)
    .fetch_one(conn)
    .await
}

/// The statements one batch runs, shared with the benchmark's SQL-only floor (figure 6), so
/// the floor times exactly what the job sends.
#[derive(Debug, Clone)]
pub struct BatchStatements {
    /// `$1` the current key id (8 bytes), `$2` the rotation, `$3` the last id of the previous
    /// batch, `$4` the batch size: `(id, sealed)` rows, locked, `SKIP LOCKED`.
    pub select: String,
    /// `$1` ids, `$2` their new envelopes, `$3` the rotation, `$4` values this batch found
    /// unreadable: writes the new envelopes and adds the batch's counts to the rotation row,
    /// in one statement; returns how many values it re-sealed.
    pub update: String,
}

impl BatchStatements {
    pub fn of(col: &SealedColumn) -> Self {
        Self {
            select: format!(
                "SELECT x.id, x.{c} FROM {t} x
                 WHERE {filter} AND x.id > $3
                 ORDER BY x.id LIMIT $4 FOR UPDATE SKIP LOCKED",
                c = col.column,
                t = col.table,
                filter = pending_filter(col, "x"),
            ),
            update: format!(
                "WITH moved AS (
                     UPDATE {t} x SET {c} = v.val
                     FROM unnest($1::uuid[], $2::bytea[]) AS v(id, val) WHERE x.id = v.id
                     RETURNING 1),
                 n AS (SELECT count(*) AS done FROM moved)
                 UPDATE key_rotations k SET done = k.done + n.done, failed = k.failed + $4
                 FROM n WHERE k.id = $3
                 RETURNING n.done",
                c = col.column,
                t = col.table,
            ),
        }
    }
}

/// What a sweep does to each value: its new envelope, or why it could not be opened (a reason
/// that names the key id or the check that failed, never the value).
pub type Reseal<'a> = dyn Fn(&SealedColumn, Uuid, &[u8]) -> Result<Vec<u8>, String> + Sync + 'a;

/// What one batch did.
struct Batch {
    rows: usize,
    last_id: Option<Uuid>,
    /// Values this batch recorded as unreadable (to be reported).
    failures: usize,
}

/// One batch of one column, one transaction on the sweep's connection: the pending values
/// after `after` locked (`SKIP LOCKED`), their new envelopes, then the envelopes, the
/// unreadable values and the batch's counts written and committed together.
async fn batch(
    conn: &mut sqlx::PgConnection,
    sweep: &Sweep<'_>,
    col: &SealedColumn,
    statements: &BatchStatements,
    after: Uuid,
) -> Result<Batch, sqlx::Error> {
    use sqlx::Connection as _;
    let mut tx = conn.begin().await?;
    let rows: Vec<(Uuid, Vec<u8>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(statements.select.as_str()))
            .bind(&sweep.current.0[..])
            .bind(sweep.rotation_id)
            .bind(after)
            .bind(sweep.batch_size as i64)
            .fetch_all(&mut *tx)
            .await?;
    let count = rows.len();
    let last_id = rows.last().map(|(id, _)| *id);
    let mut ids = Vec::with_capacity(count);
    let mut values = Vec::with_capacity(count);
    let mut failed_ids = Vec::new();
    let mut reasons = Vec::new();
    for (id, sealed) in rows {
        match (sweep.reseal)(col, id, &sealed) {
            Ok(value) => {
                ids.push(id);
                values.push(value);
            }
            Err(reason) => {
                failed_ids.push(id);
                reasons.push(reason);
            }
        }
    }
    let failures: Vec<(Uuid,)> = if failed_ids.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(
            "INSERT INTO key_rotation_failures (rotation_id, table_name, column_name, row_id, reason)
             SELECT $1, $2, $3, u.id, u.reason FROM unnest($4::uuid[], $5::text[]) AS u(id, reason)
             ON CONFLICT DO NOTHING
             RETURNING row_id",
        )
        .bind(sweep.rotation_id)
        .bind(col.table)
        .bind(col.column)
        .bind(&failed_ids)
        .bind(&reasons)
        .fetch_all(&mut *tx)
        .await?
    };
    if !ids.is_empty() || !failures.is_empty() {
        sqlx::query(sqlx::AssertSqlSafe(statements.update.as_str()))
            .bind(&ids)
            .bind(&values)
            .bind(sweep.rotation_id)
            .bind(failures.len() as i64)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Batch {
        rows: count,
        last_id,
        failures: failures.len(),
    })
}

/// The PostgreSQL part of a rotation: every sealed column in batches until nothing is left
/// to re-seal (module documentation). [`run`] sweeps with the keyring; the benchmark's SQL-only
/// floor (figure 6) sweeps with envelopes sealed beforehand, so it times exactly the job's
/// statements.
pub struct Sweep<'a> {
    pub rotation_id: Uuid,
    /// Values under this key are done.
    pub current: KeyId,
    pub batch_size: usize,
    /// See [`RunContext::stall_limit`].
    pub stall_limit: Duration,
    /// Where unreadable values are reported.
    pub events: &'a SecurityLog,
    pub reseal: &'a Reseal<'a>,
}

impl Sweep<'_> {
    /// Sweeps every column, a batch at a time, until the final count finds nothing left.
    /// (Keeping two batches in flight, the next one read and re-sealed on a second connection
    /// while this one is written, measured no faster here: PostgreSQL's own work is the floor,
    /// BENCHMARKS.md figure 6.)
    pub async fn run(&self, pool: &PgPool) -> Result<(), RotationError> {
        let current = self.current.0;
        let rotation_id = self.rotation_id;
        // What a run that died between a batch's commit and its reports left unreported.
        report_failures(pool, self.events, rotation_id).await?;
        let statements: Vec<BatchStatements> =
            SEALED_COLUMNS.iter().map(BatchStatements::of).collect();
        // One connection for the sweep: its statements stay prepared on it, and no batch waits
        // for the pool.
        let mut conn = pool.acquire().await?;
        let mut last_progress = std::time::Instant::now();
        loop {
            let mut progressed = false;
            for (col, statements) in SEALED_COLUMNS.iter().zip(&statements) {
                let mut after = Uuid::nil();
                loop {
                    let batch = batch(&mut conn, self, col, statements, after).await?;
                    if batch.failures > 0 {
                        report_failures(pool, self.events, rotation_id).await?;
                    }
                    match batch.last_id {
                        Some(last) if batch.rows > 0 => {
                            after = last;
                            progressed = true;
                        }
                        _ => break,
                    }
                }
            }
            if remaining(&mut *conn, &current, rotation_id).await? == 0 {
                return Ok(());
            }
            if progressed {
                last_progress = std::time::Instant::now();
            } else {
                // Everything left is locked by another transaction (another worker's batch,
                // or a request): wait for it to commit or release the rows, but not forever.
                if last_progress.elapsed() >= self.stall_limit {
                    return Err(RotationError::Stalled {
                        seconds: self.stall_limit.as_secs(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Ends a rotation that will not run again (its job's last attempt failed, or failed for
/// good) as `failed` with the reason; a rotation already finished is left as it is.
pub async fn mark_failed(
    pool: &PgPool,
    rotation_id: Uuid,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE key_rotations SET status = 'failed', completed_at = now(), last_error = $2
         WHERE id = $1 AND status IN ('queued', 'running')",
    )
    .bind(rotation_id)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Reports the rotation's unreadable values not reported yet, each as an `encryption_error`
/// event naming where it is, never what it holds, then marks them reported. At least once:
/// the rows stay locked (`SKIP LOCKED` for a concurrent run) until the marks commit, so a run
/// that dies before that leaves them for the next run to report again.
async fn report_failures(
    pool: &PgPool,
    events: &SecurityLog,
    rotation_id: Uuid,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let pending: Vec<(String, String, Uuid, String)> = sqlx::query_as(
        "SELECT table_name, column_name, row_id, reason FROM key_rotation_failures
         WHERE rotation_id = $1 AND reported_at IS NULL
         FOR UPDATE SKIP LOCKED",
    )
    .bind(rotation_id)
    .fetch_all(&mut *tx)
    .await?;
    if pending.is_empty() {
        return Ok(());
    }
    for (table, column, row_id, reason) in &pending {
        let mut event = SecurityEvent::new(EventType::EncryptionError);
        if table == "tenants" {
            event.tenant_id = Some(*row_id);
        }
        event.details = json!({
            "operation": "rotate_keys",
            "rotation_id": rotation_id,
            "table": table,
            "column": column,
            "row_id": row_id,
            "reason": reason,
        });
        events.record(event).await;
    }
    sqlx::query(
        "UPDATE key_rotation_failures SET reported_at = now()
         WHERE rotation_id = $1 AND reported_at IS NULL
           AND (table_name, column_name, row_id) IN
               (SELECT * FROM unnest($2::text[], $3::text[], $4::uuid[]))",
    )
    .bind(rotation_id)
    .bind(pending.iter().map(|p| p.0.clone()).collect::<Vec<_>>())
    .bind(pending.iter().map(|p| p.1.clone()).collect::<Vec<_>>())
    .bind(pending.iter().map(|p| p.2).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Runs (or resumes, or joins) an approved rotation until nothing is left to re-seal, then
/// finishes it. Idempotent: a run of a finished rotation changes nothing.
pub async fn run(
    pool: &PgPool,
    ctx: &RunContext<'_>,
    rotation_id: Uuid,
) -> Result<RunOutcome, RotationError> {
    let rotation = get(pool, rotation_id)
        .await?
        .ok_or(RotationError::NotFound)?;
    match rotation.status.as_str() {
        "queued" | "running" => {}
        "completed" | "failed" => {
            return Ok(RunOutcome::AlreadyFinished {
                status: rotation.status,
            });
        }
        _ => return Err(RotationError::NotApproved(rotation.status)),
    }
    let current_id = ctx.keyring.current_id();
    if current_id.to_hex() != rotation.target_key_id {
        return Err(RotationError::WrongKey {
            current: current_id.to_hex(),
            target: rotation.target_key_id,
        });
    }
    let current = current_id.0;
    let mut started_event = None;
    if rotation.status == "queued" {
        let mut redis = ctx.redis.clone();
        let in_redis = at_rest::census(&mut redis, ctx.layout)
            .await?
            .iter()
            .filter(|c| c.needs_reseal(current_id))
            .map(|c| c.count as i64)
            .sum::<i64>();
        let total = remaining(pool, &current, rotation_id).await? + in_redis;
        let started = sqlx::query(
            "UPDATE key_rotations SET status = 'running', started_at = now(), total = $2
             WHERE id = $1 AND status = 'queued'",
        )
        .bind(rotation_id)
        .bind(total)
        .execute(pool)
        .await?
        .rows_affected();
        if started == 1 {
            let mut event = SecurityEvent::new(EventType::KeyRotationStarted);
            event.user_id = rotation.approved_by;
            event.details = json!({
                "rotation_id": rotation_id,
                "target_key_id": rotation.target_key_id,
                "initiated_by": rotation.initiated_by,
                "approved_by": rotation.approved_by,
                "total": total,
                "job_id": ctx.job_id,
                "worker": ctx.worker,
            });
            started_event = Some(event);
        }
    }
    let keyring = ctx.keyring;
    let reseal = move |col: &SealedColumn, id: Uuid, sealed: &[u8]| {
        let cell = aad(col.table, col.column, &id.to_string());
        keyring
            .open(sealed, &cell)
            .map(|plain| keyring.seal(&plain, &cell))
            // Names the key id or the check that failed; never the value.
            .map_err(|error| error.to_string())
    };
    let sweep = Sweep {
        rotation_id,
        current: current_id,
        batch_size: ctx.batch_size,
        stall_limit: ctx.stall_limit,
        events: ctx.events,
        reseal: &reseal,
    };
    // The started event is written (its own pool, maybe a new connection) while the first
    // batches run; it carries its own timestamp.
    let record_started = async {
        if let Some(event) = started_event {
            ctx.events.record(event).await;
        }
    };
    let ((), swept) = tokio::join!(record_started, sweep.run(pool));
    swept?;
    reseal_redis(pool, ctx, rotation_id).await?;
    finish(pool, ctx, rotation_id).await
}

/// Re-seals the job payloads Redis holds until none is left under an old key (see the module
/// documentation), recording the ones no key opens.
async fn reseal_redis(
    pool: &PgPool,
    ctx: &RunContext<'_>,
    rotation_id: Uuid,
) -> Result<(), RotationError> {
    let mut redis = ctx.redis.clone();
    let mut last_progress = std::time::Instant::now();
    loop {
        let recorded: std::collections::HashSet<(String, String)> = sqlx::query_as(
            "SELECT queue, job_id FROM key_rotation_job_failures WHERE rotation_id = $1",
        )
        .bind(rotation_id)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        let skip =
            |queue: &str, job_id: &str| recorded.contains(&(queue.to_owned(), job_id.to_owned()));
        let pass = at_rest::reseal_pass(&mut redis, ctx.layout, ctx.keyring, ctx.batch_size, &skip)
            .await?;
        let mut newly_failed = Vec::new();
        for failure in &pass.unreadable {
            let inserted = sqlx::query(
                "INSERT INTO key_rotation_job_failures (rotation_id, queue, job_id, reason)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(rotation_id)
            .bind(failure.queue)
            .bind(&failure.job_id)
            .bind(&failure.error)
            .execute(pool)
            .await?
            .rows_affected();
            if inserted == 1 {
                newly_failed.push(failure);
            }
        }
        if pass.resealed > 0 || !newly_failed.is_empty() {
            sqlx::query(
                "UPDATE key_rotations SET done = done + $2, failed = failed + $3 WHERE id = $1",
            )
            .bind(rotation_id)
            .bind(pass.resealed as i64)
            .bind(newly_failed.len() as i64)
            .execute(pool)
            .await?;
        }
        for failure in newly_failed {
            let mut event = SecurityEvent::new(EventType::EncryptionError);
            event.details = json!({
                "operation": "rotate_keys",
                "rotation_id": rotation_id,
                "queue": failure.queue,
                "job_id": failure.job_id,
                "reason": failure.error,
            });
            ctx.events.record(event).await;
        }
        if pass.left == 0 {
            return Ok(());
        }
        if pass.resealed > 0 {
            last_progress = std::time::Instant::now();
        } else if last_progress.elapsed() >= ctx.stall_limit {
            // Held by workers the whole time: the job is retried and its next run re-seals them.
            return Err(RotationError::Stalled {
                seconds: ctx.stall_limit.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn finish(
    pool: &PgPool,
    ctx: &RunContext<'_>,
    rotation_id: Uuid,
) -> Result<RunOutcome, RotationError> {
    let mut tx = pool.begin().await?;
    let finished: Option<(String, i64, i64, i64, Option<Uuid>, String)> = sqlx::query_as(
        "UPDATE key_rotations SET
             status = CASE WHEN failed = 0 THEN 'completed' ELSE 'failed' END,
             completed_at = now(),
             total = GREATEST(total, done + failed),
             last_error = CASE WHEN failed = 0 THEN NULL
                          ELSE failed || ' value(s) could not be opened and were left untouched' END
         WHERE id = $1 AND status = 'running'
         RETURNING status, total, done, failed, approved_by, target_key_id",
    )
    .bind(rotation_id)
    .fetch_optional(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO processed_jobs (job_id, queue, worker) VALUES ($1, $2, $3)
         ON CONFLICT (job_id) DO NOTHING",
    )
    .bind(ctx.job_id)
    .bind(RotateKeys::QUEUE)
    .bind(ctx.worker)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let Some((status, total, done, failed, approved_by, target)) = finished else {
        let status = get(pool, rotation_id)
            .await?
            .map(|r| r.status)
            .unwrap_or_default();
        return Ok(RunOutcome::AlreadyFinished { status });
    };
    let mut event = SecurityEvent::new(EventType::KeyRotationCompleted);
    event.user_id = approved_by;
    event.details = json!({
        "rotation_id": rotation_id,
        "status": status,
        "target_key_id": target,
        "total": total,
        "done": done,
        "failed": failed,
        "job_id": ctx.job_id,
        "worker": ctx.worker,
    });
    ctx.events.record(event).await;
    Ok(RunOutcome::Finished {
        status,
        total,
        done,
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pending_filter_names_its_cell_and_binds_the_key_and_rotation() {
        let column = SEALED_COLUMNS
            .iter()
            .find(|c| c.column == "customer_number")
            .expect("conversations.customer_number is sealed");
        let sql = pending_filter(column, "x");
        assert!(sql.contains("x.customer_number IS NOT NULL"), "{sql}");
        assert!(sql.contains("substring(x.customer_number from 2 for 8) <> $1"));
        assert!(sql.contains("f.rotation_id = $2 AND f.table_name = 'conversations'"));
    }
}
