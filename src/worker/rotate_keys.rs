//! The `rotate_keys` queue's handler: an approved key rotation re-encrypts every sealed value,
//! in PostgreSQL and in the job payloads Redis holds (`crate::rotation::run`), unbounded in time (each batch is its own transaction); a rotation
//! that will not run again is marked failed on its row.

use std::sync::Arc;

use apalis::prelude::{Attempt, BoxDynError, Data, TaskId, WorkerContext};
use gatehouse_jobs::{Job, RotateKeys};

use super::WorkerState;
use super::attempt::{Attempted, guarded, observed, settle};

/// Handles one `rotate_keys` job: run an approved key rotation.
pub async fn handle(
    job: RotateKeys,
    id: TaskId,
    attempt: Attempt,
    worker: WorkerContext,
    state: Data<Arc<WorkerState>>,
) -> Result<(), BoxDynError> {
    let job_id = id.to_string();
    let span = tracing::info_span!(
        "job",
        job.id = %job_id,
        job.queue = RotateKeys::QUEUE,
        rotation.id = %job.rotation_id,
    );
    let attempt_run = async move {
        let started = std::time::Instant::now();
        let redis = state.redis.get();
        let ctx = crate::rotation::RunContext {
            keyring: &state.keyring,
            events: &state.events,
            job_id: &job_id,
            worker: worker.name(),
            batch_size: state.key_rotation_batch_size,
            redis: &redis,
            layout: &state.layout,
            stall_limit: crate::rotation::STALL_LIMIT,
        };
        let at = Attempted {
            queue: RotateKeys::QUEUE,
            job_id: &job_id,
            attempt: attempt.current(),
            policy: &state.retry.rotate_keys,
            outages: &state.outages,
        };
        // Unbounded: a rotation may rightly run for hours (each batch is its own transaction).
        let run = crate::rotation::run(&state.pool, &ctx, job.rotation_id);
        match guarded(&at, &state.pool, None, run).await? {
            Ok(crate::rotation::RunOutcome::Finished {
                status,
                total,
                done,
                failed,
            }) => {
                tracing::info!(
                    %status, total, done, failed,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "key rotation finished"
                );
                Ok(())
            }
            Ok(crate::rotation::RunOutcome::AlreadyFinished { status }) => {
                tracing::info!(%status, "key rotation already finished");
                Ok(())
            }
            Err(error) => {
                let fault = error.fault();
                let last = fault == crate::fault::Fault::Permanent
                    || (fault.counts() && at.attempt >= at.policy.max_attempts as usize);
                if last {
                    // The rotation will not run again: say so on its row.
                    let marked = crate::rotation::mark_failed(
                        &state.pool,
                        job.rotation_id,
                        &error.to_string(),
                    )
                    .await;
                    if let Err(db) = marked {
                        tracing::error!(error = %db, "cannot mark the key rotation failed");
                    }
                }
                Err(settle(&at, fault, error))
            }
        }
    };
    observed(RotateKeys::QUEUE, span, attempt_run).await
}
