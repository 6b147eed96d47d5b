//! Retention of PostgreSQL rows (SPEC "Hostile traffic"): `security_events` older than
//! `SECURITY_EVENT_RETENTION_DAYS`, `processed_jobs` and finished `catalog_syncs` older than
//! `PROCESSED_JOB_RETENTION_DAYS`, and `outbox` rows sent more than 7 days ago are deleted in
//! bounded batches. Every worker process runs a round about once a minute
//! ([`Retention::every`]); a round deletes at most `batch_size × batches_per_round` rows per
//! table, so a huge backlog drains over rounds and never holds a connection for long.
//! Batches pick their rows `FOR UPDATE SKIP LOCKED`, so processes running rounds at the same
//! time share the work instead of waiting on each other. Ages are PostgreSQL's `now()`.

use std::time::Duration;

use sqlx::PgPool;

use crate::config::Config;

/// How long a sent outbox row is kept (the relay's own record of what it pushed).
pub const OUTBOX_SENT_RETENTION: Duration = Duration::from_secs(7 * 86_400);

/// What a round deletes, and how much at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub security_events: Duration,
    /// `processed_jobs`, and `catalog_syncs` (the record of a sync job) by `finished_at`.
    pub processed_jobs: Duration,
    pub outbox_sent: Duration,
    /// Rows per `DELETE`.
    pub batch_size: u32,
    /// `DELETE`s per table per round.
    pub batches_per_round: u32,
    /// How often a worker process runs a round.
    pub every: Duration,
}

impl Retention {
    pub fn from_config(config: &Config) -> Self {
        Self {
            security_events: Duration::from_secs(
                config.security_event_retention_days.saturating_mul(86_400),
            ),
            processed_jobs: Duration::from_secs(
                config.processed_job_retention_days.saturating_mul(86_400),
            ),
            outbox_sent: OUTBOX_SENT_RETENTION,
            batch_size: 1000,
            batches_per_round: 5,
            every: Duration::from_secs(60),
        }
    }
}

/// Rows one round deleted, per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub security_events: u64,
    pub processed_jobs: u64,
    pub catalog_syncs: u64,
    pub outbox: u64,
}

impl Deleted {
    pub fn total(&self) -> u64 {
        self.security_events + self.processed_jobs + self.catalog_syncs + self.outbox
    }
}

// One batch each: rows older than `$1` seconds, at most `$2` of them, skipping rows another
// process's batch holds. Each time column is indexed (see the migrations).
const SECURITY_EVENTS: &str = "DELETE FROM security_events WHERE id IN (
       SELECT id FROM security_events
        WHERE occurred_at < now() - make_interval(secs => $1)
        LIMIT $2 FOR UPDATE SKIP LOCKED)";
const PROCESSED_JOBS: &str = "DELETE FROM processed_jobs WHERE job_id IN (
       SELECT job_id FROM processed_jobs
        WHERE processed_at < now() - make_interval(secs => $1)
        LIMIT $2 FOR UPDATE SKIP LOCKED)";
const CATALOG_SYNCS: &str = "DELETE FROM catalog_syncs WHERE job_id IN (
       SELECT job_id FROM catalog_syncs
        WHERE finished_at < now() - make_interval(secs => $1)
        LIMIT $2 FOR UPDATE SKIP LOCKED)";
const OUTBOX: &str = "DELETE FROM outbox WHERE id IN (
       SELECT id FROM outbox
        WHERE sent_at IS NOT NULL AND sent_at < now() - make_interval(secs => $1)
        LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// Deletes up to `batches_per_round` batches of expired rows from each table, stopping a
/// table early once a batch comes back short.
pub async fn run_round(pool: &PgPool, retention: &Retention) -> Result<Deleted, sqlx::Error> {
    let deleted = Deleted {
        security_events: purge(pool, retention, SECURITY_EVENTS, retention.security_events).await?,
        processed_jobs: purge(pool, retention, PROCESSED_JOBS, retention.processed_jobs).await?,
        catalog_syncs: purge(pool, retention, CATALOG_SYNCS, retention.processed_jobs).await?,
        outbox: purge(pool, retention, OUTBOX, retention.outbox_sent).await?,
    };
    for (table, n) in [
        ("security_events", deleted.security_events),
        ("processed_jobs", deleted.processed_jobs),
        ("catalog_syncs", deleted.catalog_syncs),
        ("outbox", deleted.outbox),
    ] {
        if n > 0 {
            ::metrics::counter!("gatehouse_retention_deleted_total", "table" => table).increment(n);
        }
    }
    if deleted.total() > 0 {
        tracing::info!(
            deleted.security_events = deleted.security_events,
            deleted.processed_jobs = deleted.processed_jobs,
            deleted.catalog_syncs = deleted.catalog_syncs,
            deleted.outbox = deleted.outbox,
            "retention deleted expired rows"
        );
    }
    Ok(deleted)
}

async fn purge(
    pool: &PgPool,
    retention: &Retention,
    sql: &'static str,
    older_than: Duration,
) -> Result<u64, sqlx::Error> {
    let batch = retention.batch_size.max(1);
    let mut total = 0;
    for _ in 0..retention.batches_per_round {
        let n = sqlx::query(sql)
            .bind(older_than.as_secs_f64())
            .bind(i64::from(batch))
            .execute(pool)
            .await?
            .rows_affected();
        total += n;
        if n < u64::from(batch) {
            break;
        }
    }
    Ok(total)
}

/// Runs a round every `retention.every`, for ever (the worker aborts it at shutdown). A round
/// that fails (PostgreSQL unavailable) is logged and tried again next time.
///
/// A PostgreSQL outage is noted on `postgres` (logged once, for the whole process) instead of
/// a warning per round, and no round runs while it lasts.
pub async fn run(pool: PgPool, retention: Retention, postgres: crate::fault::Reachability) {
    let mut ticker = tokio::time::interval(retention.every.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if postgres.is_down() {
            continue;
        }
        if let Err(error) = run_round(&pool, &retention).await {
            if let crate::fault::Fault::Outage(_) = crate::fault::postgres(&error) {
                postgres.outage(&error);
            } else {
                tracing::warn!(%error, "retention round failed; will retry");
            }
        }
    }
}
