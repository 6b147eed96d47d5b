//! The `inbound_message` queue's handler: an inbound SMS/WhatsApp message is classified and
//! stored (`crate::conversations::process_inbound`), bounded by the LLM's timeout plus the
//! database allowance.

use std::sync::Arc;

use apalis::prelude::{Attempt, BoxDynError, Data, MetadataStore, TaskId, WorkerContext};
use gatehouse_jobs::{InboundMessage, Job};

use super::WorkerState;
use super::attempt::{Attempted, guarded, observed, settle};
use crate::conversations::{InboundContext, InboundOutcome, process_inbound};

/// Handles one `inbound_message` job: classify and store the message (`crate::conversations`).
pub async fn handle(
    job: InboundMessage,
    id: TaskId,
    attempt: Attempt,
    worker: WorkerContext,
    meta: MetadataStore,
    state: Data<Arc<WorkerState>>,
) -> Result<(), BoxDynError> {
    let job_id = id.to_string();
    // The ingress request that enqueued the job, so one id follows a message end to end.
    let span = tracing::info_span!(
        "job",
        job.id = %job_id,
        job.queue = InboundMessage::QUEUE,
        request.id = meta.get("request_id").unwrap_or("-"),
    );
    observed(
        InboundMessage::QUEUE,
        span,
        run(job, job_id, attempt, worker, state),
    )
    .await
}

async fn run(
    job: InboundMessage,
    job_id: String,
    attempt: Attempt,
    worker: WorkerContext,
    state: Data<Arc<WorkerState>>,
) -> Result<(), BoxDynError> {
    let ctx = InboundContext {
        keyring: &state.keyring,
        blind_index: &state.blind_index,
        min_confidence: state.min_confidence,
        worker: worker.name(),
    };
    let at = Attempted {
        queue: InboundMessage::QUEUE,
        job_id: &job_id,
        attempt: attempt.current(),
        policy: &state.retry.inbound_message,
        outages: &state.outages,
    };
    let run = process_inbound(&state.pool, &ctx, &job_id, &job, state.classifier.as_ref());
    match guarded(&at, &state.pool, Some(state.inbound_limit), run).await? {
        Ok(outcome) => {
            match outcome {
                InboundOutcome::Stored {
                    low_confidence_count,
                    handoff,
                    intent,
                    ref rejected_reason,
                    ..
                } => tracing::info!(
                    job.id = %job_id,
                    job.queue = InboundMessage::QUEUE,
                    tenant.id = %job.tenant_id,
                    intent = intent.as_str(),
                    rejected_reason = rejected_reason.as_deref().unwrap_or("-"),
                    low_confidence_count,
                    handoff,
                    "inbound message stored"
                ),
                other => tracing::info!(
                    job.id = %job_id,
                    job.queue = InboundMessage::QUEUE,
                    outcome = ?other,
                    "inbound message already applied"
                ),
            }
            Ok(())
        }
        Err(error) => Err(settle(&at, error.fault(), error)),
    }
}
