//! One job attempt, from start to settlement, the same for every queue: [`guarded`] runs it
//! unless PostgreSQL is down and bounds it in time, [`settle`] decides by the failure's fault
//! (`crate::fault`) whether it is deferred without counting, retried or dead-lettered (logging
//! it once), and [`observed`] runs it in its span and records its duration and outcome.

use std::future::Future;
use std::time::Duration;

use apalis::prelude::{AbortError, BoxDynError};
use sqlx::PgPool;
use tracing::Instrument;

use super::outage;
use crate::config::RetryPolicy;

/// An attempt that ended without its job's fault: PostgreSQL was down when it started, or it
/// ran past its time limit while PostgreSQL stopped answering.
#[derive(Debug, thiserror::Error)]
enum NotRun {
    #[error("postgres is down; the job was given back without running")]
    Paused,
    #[error("the attempt ran past {0:?} and postgres does not answer (a hung connection)")]
    Hung(Duration),
    #[error("the attempt ran past its time limit of {0:?}")]
    TimedOut(Duration),
}

/// Settles a failed attempt by where its failure belongs (`crate::fault`): an outage or a
/// transient fault is deferred — rescheduled without counting the attempt, the PostgreSQL
/// outage noted so the process stops fetching — and anything else goes to [`job_failed`].
pub(super) fn settle(
    at: &Attempted<'_>,
    fault: crate::fault::Fault,
    error: impl std::error::Error + Send + Sync + 'static,
) -> BoxDynError {
    use crate::fault::{Dependency, Fault};
    let Attempted {
        queue,
        job_id,
        attempt,
        policy,
        outages,
    } = *at;
    match fault {
        Fault::Outage(_) | Fault::Transient => {
            if fault == Fault::Outage(Dependency::Postgres) {
                outages.postgres.outage(&error);
            }
            let delay = outages.delay(fault, rand::random::<f64>());
            outages.deferrals.defer(job_id, delay);
            ::metrics::counter!("gatehouse_jobs_total", "queue" => queue, "outcome" => "deferred")
                .increment(1);
            let cause = match fault {
                Fault::Outage(dependency) => dependency.as_str(),
                _ => "transient",
            };
            tracing::debug!(job.id = %job_id, job.queue = queue, job.attempt = attempt, cause, delay_ms = delay.as_millis() as u64, %error, "job deferred without using an attempt");
            error.into()
        }
        Fault::Retry | Fault::Permanent => {
            job_failed(queue, job_id, attempt, policy, fault == Fault::Retry, error)
        }
    }
}

/// One job attempt, as [`settle`] needs it.
#[derive(Clone, Copy)]
pub(super) struct Attempted<'a> {
    pub queue: &'static str,
    pub job_id: &'a str,
    pub attempt: usize,
    pub policy: &'a RetryPolicy,
    pub outages: &'a outage::Outages,
}

/// Runs one attempt unless PostgreSQL is down (then the job is given back at once), bounded by
/// `limit` (`None`: unbounded): an attempt past it is cancelled — its transaction never
/// commits — and counts as PostgreSQL's outage if a quick probe gets no answer either. An
/// attempt that did not run to its end is settled here (the `Err`); one that did returns its
/// own result.
pub(super) async fn guarded<T, E>(
    at: &Attempted<'_>,
    pool: &PgPool,
    limit: Option<Duration>,
    attempt: impl Future<Output = Result<T, E>>,
) -> Result<Result<T, E>, BoxDynError> {
    use crate::fault::{Dependency, Fault};
    // A deferral left by an earlier attempt that was never acknowledged is stale.
    at.outages.deferrals.take(at.job_id);
    if at.outages.paused() {
        return Err(settle(
            at,
            Fault::Outage(Dependency::Postgres),
            NotRun::Paused,
        ));
    }
    let Some(limit) = limit else {
        return Ok(attempt.await);
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(result) => Ok(result),
        Err(_) => {
            let probe = tokio::time::timeout(
                Duration::from_secs(2),
                sqlx::query("SELECT 1").execute(pool),
            )
            .await;
            Err(if matches!(probe, Ok(Ok(_))) {
                settle(at, Fault::Retry, NotRun::TimedOut(limit))
            } else {
                settle(at, Fault::Outage(Dependency::Postgres), NotRun::Hung(limit))
            })
        }
    }
}

/// Turns a failed attempt into what apalis and the backend act on, logging it once: a
/// permanent error or a failed last attempt becomes `AbortError` (→ dead letter, an ERROR
/// line, and a Sentry event when SENTRY_DSN is set); anything else is retried later.
fn job_failed(
    queue: &'static str,
    job_id: &str,
    attempt: usize,
    policy: &RetryPolicy,
    retryable: bool,
    error: impl std::error::Error + Send + Sync + 'static,
) -> BoxDynError {
    let outcome = if !retryable || attempt >= policy.max_attempts as usize {
        "dead"
    } else {
        "retry"
    };
    ::metrics::counter!("gatehouse_jobs_total", "queue" => queue, "outcome" => outcome)
        .increment(1);
    if !retryable {
        tracing::error!(job.id = %job_id, job.queue = queue, job.attempt = attempt, %error, "job failed permanently; dead-lettered");
        AbortError::new(error).into()
    } else if attempt >= policy.max_attempts as usize {
        tracing::error!(job.id = %job_id, job.queue = queue, job.attempt = attempt, job.max_attempts = policy.max_attempts, %error, "job failed on its last attempt; dead-lettered");
        AbortError::new(error).into()
    } else {
        tracing::warn!(job.id = %job_id, job.queue = queue, job.attempt = attempt, %error, "job failed, will retry");
        error.into()
    }
}

/// Runs one job attempt inside its span and records its duration and, when it succeeds, its
/// count (failures are counted by `job_failed`).
pub(super) async fn observed(
    queue: &'static str,
    span: tracing::Span,
    attempt: impl Future<Output = Result<(), BoxDynError>>,
) -> Result<(), BoxDynError> {
    let started = std::time::Instant::now();
    let result = attempt.instrument(span).await;
    ::metrics::histogram!("gatehouse_job_duration_seconds", "queue" => queue)
        .record(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ::metrics::counter!("gatehouse_jobs_total", "queue" => queue, "outcome" => "ok")
            .increment(1);
    }
    result
}
