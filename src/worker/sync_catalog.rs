//! The `sync_catalog` queue's handler: a tenant's product catalog is synchronized from its
//! store (`crate::catalog::sync`), bounded by `CATALOG_SYNC_DEADLINE_SECONDS` plus the
//! database allowance.

use std::sync::Arc;

use apalis::prelude::{Attempt, BoxDynError, Data, MetadataStore, TaskId, WorkerContext};
use gatehouse_jobs::{Job, SyncCatalog};

use super::WorkerState;
use super::attempt::{Attempted, guarded, observed, settle};
use crate::catalog::SyncOutcome;

/// Handles one `sync_catalog` job: synchronize a tenant's catalog from its store.
pub async fn handle(
    job: SyncCatalog,
    id: TaskId,
    attempt: Attempt,
    worker: WorkerContext,
    meta: MetadataStore,
    state: Data<Arc<WorkerState>>,
) -> Result<(), BoxDynError> {
    let job_id = id.to_string();
    let span = tracing::info_span!(
        "job",
        job.id = %job_id,
        job.queue = SyncCatalog::QUEUE,
        request.id = meta.get("request_id").unwrap_or("-"),
    );
    let attempt_run = async move {
        let at = Attempted {
            queue: SyncCatalog::QUEUE,
            job_id: &job_id,
            attempt: attempt.current(),
            policy: &state.retry.sync_catalog,
            outages: &state.outages,
        };
        let run = crate::catalog::sync(
            &state.pool,
            &state.keyring,
            &state.events,
            &state.store,
            &job_id,
            worker.name(),
            &job,
        );
        match guarded(&at, &state.pool, Some(state.sync_limit), run).await? {
            Ok(SyncOutcome::Applied {
                pages,
                fetched,
                upserted,
                deleted,
                rejected,
            }) => {
                tracing::info!(
                    tenant.id = %job.tenant_id,
                    pages, fetched, upserted, deleted, rejected,
                    "catalog synced"
                );
                Ok(())
            }
            Ok(SyncOutcome::AlreadyProcessed) => {
                tracing::info!(tenant.id = %job.tenant_id, "catalog sync already applied");
                Ok(())
            }
            Err(error) => Err(settle(&at, error.fault(), error)),
        }
    };
    observed(SyncCatalog::QUEUE, span, attempt_run).await
}
