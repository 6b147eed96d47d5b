//! The worker edge: apalis workers over gatehouse's Redis queues.
//!
//! apalis-redis 1.0 is configured around its measured defects (see ARCHITECTURE.md):
//! explicit queue names, `lock_tasks(false)`, jobs enqueued straight onto the active list
//! by `gatehouse-jobs`, a short poll interval, a unique worker name per process, and a
//! supervisor that treats workers ending on their own as a failure, never a clean exit.

pub mod poll;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use apalis_redis::{ConnectionManager, RedisStorage};
use gatehouse_jobs::{InboundMessage, Job, client::Queues};
use sqlx::PgPool;
use tracing::Instrument;

use crate::classify::Classifier;
use crate::conversations::{InboundContext, InboundOutcome, process_inbound};
use crate::security::blind_index::BlindIndex;
use crate::security::keyring::Keyring;

/// How often an idle worker polls its queue.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What the job handlers share.
pub struct WorkerState {
    pub pool: PgPool,
    pub keyring: Keyring,
    pub blind_index: BlindIndex,
    pub min_confidence: f64,
    /// The rule-based classifier or the LLM client (`crate::llm::classifier`).
    pub classifier: Arc<dyn Classifier>,
}

/// How a worker process runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs in flight per queue in this process.
    pub concurrency: usize,
    /// How long in-flight jobs may take to finish after a shutdown signal.
    pub grace: Duration,
    pub heartbeat: Duration,
    pub missed_heartbeats: usize,
}

/// Why the worker process stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("workers stopped without being asked to: {0}")]
    Exited(String),
    #[error("in-flight jobs did not finish within the {0:?} grace period")]
    GraceExceeded(Duration),
}

/// A name no other live process has: host, pid and a random suffix. apalis-redis's orphan
/// recovery breaks when two processes share a name.
pub fn unique_worker_name() -> String {
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "host".to_owned());
    let suffix: u32 = rand::random();
    format!("{host}-{}-{suffix:08x}", std::process::id())
}

fn storage_config(queues: &Queues, queue: &str, options: &WorkerOptions) -> apalis_redis::Config {
    apalis_redis::Config::default()
        .queue(queues.queue_key(queue))
        .lock_tasks(false)
        .batch_size(options.concurrency.max(1))
        .heartbeat_interval(options.heartbeat)
        .missed_heartbeats(options.missed_heartbeats)
        .emit_events(false)
        // "results" is how apalis-redis acks: without it a finished job stays in the
        // worker's inflight set and is re-run by orphan recovery.
        .persist_results(true)
}

async fn handle_inbound(
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
    run_inbound(job, job_id, attempt, worker, state)
        .instrument(span)
        .await
}

async fn run_inbound(
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
    match process_inbound(&state.pool, &ctx, &job_id, &job, state.classifier.as_ref()).await {
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
        Err(error) if !error.is_retryable() => {
            tracing::error!(job.id = %job_id, job.queue = InboundMessage::QUEUE, %error, "job failed permanently");
            Err(AbortError::new(error).into())
        }
        Err(error) if attempt.current() >= InboundMessage::MAX_ATTEMPTS as usize => {
            tracing::error!(job.id = %job_id, job.queue = InboundMessage::QUEUE, attempt = attempt.current(), %error, "job failed on its last attempt");
            Err(AbortError::new(error).into())
        }
        Err(error) => {
            tracing::warn!(job.id = %job_id, job.queue = InboundMessage::QUEUE, attempt = attempt.current(), %error, "job failed, will retry");
            Err(error.into())
        }
    }
}

/// Restarts allowed within a sliding window. A worker that fails (Redis restarting, say) is
/// restarted at once; the redis connection's own backoff spaces the attempts (about 0.5 s
/// each), so an outage of about half a minute is ridden out. Past that the process exits
/// non-zero, for its supervisor to restart, instead of spinning or stopping silently.
#[derive(Debug, Default)]
struct RestartBudget {
    recent: std::collections::VecDeque<std::time::Instant>,
}

impl RestartBudget {
    const WINDOW: Duration = Duration::from_secs(60);
    const MAX_IN_WINDOW: usize = 60;

    fn allow(&mut self) -> bool {
        let now = std::time::Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > Self::WINDOW)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= Self::MAX_IN_WINDOW {
            return false;
        }
        self.recent.push_back(now);
        true
    }
}

/// Runs every queue's workers until `shutdown` resolves, then stops taking jobs and waits
/// up to the grace period for in-flight ones.
pub async fn run(
    state: Arc<WorkerState>,
    redis: ConnectionManager,
    queues: Queues,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let base = unique_worker_name();
    tracing::info!(worker.name = %base, concurrency = options.concurrency, "starting workers");
    let inbound_config = storage_config(&queues, InboundMessage::QUEUE, &options);
    let concurrency = options.concurrency.max(1);
    let monitor = Monitor::new()
        .register(move |restarts| {
            let storage = RedisStorage::<InboundMessage>::new(redis.clone())
                .with_config(inbound_config.clone())
                .poll_with_strategy(poll::Ticker::new(POLL_INTERVAL));
            WorkerBuilder::new(format!("{base}-{}-r{restarts}", InboundMessage::QUEUE))
                .backend(storage)
                .catch_panic()
                .concurrency(concurrency)
                .data(state.clone())
                .build(handle_inbound)
        })
        .should_restart({
            let budget = std::sync::Mutex::new(RestartBudget::default());
            move |ctx, error| {
                let allowed = budget.lock().map(|mut b| b.allow()).unwrap_or(false);
                if allowed {
                    tracing::error!(worker.name = ctx.name(), %error, "worker failed, restarting");
                } else {
                    tracing::error!(worker.name = ctx.name(), %error, "worker keeps failing, giving up");
                }
                allowed
            }
        });
    let context = monitor.context();
    let mut running = Box::pin(monitor.run());
    tokio::select! {
        result = &mut running => {
            let why = match result {
                Ok(()) => "all workers returned".to_owned(),
                Err(error) => error.to_string(),
            };
            tracing::error!(%why, "workers stopped on their own");
            Err(WorkerError::Exited(why))
        }
        () = shutdown => {
            tracing::info!(grace_ms = options.grace.as_millis() as u64, "shutdown requested, finishing in-flight jobs");
            let _ = context.shutdown();
            match tokio::time::timeout(options.grace, running).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "workers reported errors while stopping");
                    Ok(())
                }
                Err(_) => Err(WorkerError::GraceExceeded(options.grace)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restart_budget_refuses_a_burst_and_counts_only_the_window() {
        let mut budget = RestartBudget::default();
        for _ in 0..RestartBudget::MAX_IN_WINDOW {
            assert!(budget.allow());
        }
        assert!(!budget.allow(), "a burst past the budget is refused");
        // Restarts older than the window no longer count.
        let old = std::time::Instant::now() - RestartBudget::WINDOW - Duration::from_secs(1);
        budget.recent.iter_mut().for_each(|t| *t = old);
        assert!(budget.allow());
    }

    #[test]
    fn worker_names_are_unique_per_call() {
        assert_ne!(unique_worker_name(), unique_worker_name());
    }
}
