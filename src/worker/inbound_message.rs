//! The `inbound_message` queue's handler: the payload's sealed customer data is opened (the one
//! place it is: SPEC "Customer data in Redis"), then the message is classified and stored
//! (`crate::conversations`, alone or with other jobs' messages: `super::group_commit`), bounded by the LLM's timeout plus the database
//! allowance. A payload no configured key opens is dead at once, with an `encryption_error`
//! event naming the queue, the job and the check that failed.

use std::sync::Arc;

use apalis::prelude::{Attempt, BoxDynError, Data, MetadataStore, TaskId, WorkerContext};
use gatehouse_jobs::sealed::{OpenError, Sealed};
use gatehouse_jobs::{InboundMessage, Job};

use super::WorkerState;
use super::attempt::{Attempted, guarded, observed, settle};
use crate::conversations::{
    InboundContext, InboundError, InboundOutcome, PreparedInbound, classify_unless_applied,
};
use crate::events::{EventType, SecurityEvent};
use crate::fault::Fault;

/// Handles one `inbound_message` job: classify and store the message (`crate::conversations`).
pub async fn handle(
    job: Sealed<InboundMessage>,
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
    job: Sealed<InboundMessage>,
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
    let job = match job.open(&job_id, &state.keyring) {
        Ok(job) => job,
        Err(error) => {
            if !matches!(error, OpenError::Payload { .. }) {
                unopenable(&state, &job_id, &error).await;
            }
            // Never retried: no later attempt opens it either.
            return Err(settle(&at, Fault::Permanent, error));
        }
    };
    let run = async {
        let classifier = state.classifier.as_ref();
        match classify_unless_applied(&state.pool, &job_id, &job, classifier).await? {
            // Alone or in a group with other jobs' messages (`super::group_commit`).
            Some(c) => {
                let message = PreparedInbound::new(&ctx, &job_id, &job, &c)?;
                state.group_commit.store(message).await
            }
            None => Ok::<_, InboundError>(InboundOutcome::AlreadyProcessed),
        }
    };
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

/// Reports a payload that no configured key opens (or that is not sealed at all): an
/// `encryption_error` event naming the queue, the job and the check that failed — the cell of a
/// sealed column, for a job — never its content.
async fn unopenable(state: &WorkerState, job_id: &str, error: &OpenError) {
    let mut event = SecurityEvent::new(EventType::EncryptionError);
    event.details = serde_json::json!({
        "operation": InboundMessage::QUEUE,
        "queue": InboundMessage::QUEUE,
        "job_id": job_id,
        "reason": error.reason(),
        "error": error.to_string(),
    });
    state.events.record(event).await;
}
