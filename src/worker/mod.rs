//! The worker edge: apalis workers over gatehouse's Redis queues.
//!
//! apalis is the worker framework; the queue underneath is gatehouse's own Redis backend
//! (`backend`: chunked promotion, exponential backoff with full jitter, dead letters with
//! their last error, orphan recovery, retention), replacing what apalis-redis 1.0 gets wrong
//! (see ARCHITECTURE.md). Every process names its workers uniquely, heartbeats from a task of
//! its own (so long jobs keep their workers alive), vacuums finished jobs, and supervises its
//! workers: one ending on its own is restarted under a new name, never a silent clean exit. A
//! Redis outage (classified by `redis_outage`) pauses them instead of ending the process: each
//! restart waits a capped, jittered backoff and probes Redis first, the outage is logged once
//! at its start and once at its end and shown on `/healthz` and `/metrics` (`health`,
//! `outage`). A job whose attempt fails for an outage (PostgreSQL, the LLM, a store) or a
//! transient fault is deferred without using an attempt (`settle`, `crate::fault`); while
//! PostgreSQL is down the process fetches nothing and gives back what it holds, and a probe
//! (`outage::watch_postgres`) resumes it.
//! Beside the Redis maintenance, a task of its own deletes expired PostgreSQL rows in bounded
//! batches about once a minute (`crate::retention`), so a slow database never delays a
//! heartbeat.

pub mod backend;
pub mod dead;
pub mod health;
pub mod outage;
pub mod poll;
pub mod retry;
pub mod scrape;
pub mod stats;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use apalis_core::error::WorkerError as ApalisWorkerError;
use gatehouse_jobs::{InboundMessage, Job, RotateKeys, SyncCatalog, client::Queues};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tracing::Instrument;

use crate::catalog::{StoreClient, StoreLimits, SyncOutcome};
use crate::classify::Classifier;
use crate::config::{Config, RetryPolicies, RetryPolicy};
use crate::conversations::{InboundContext, InboundOutcome, process_inbound};
use crate::security::blind_index::BlindIndex;
use crate::security::keyring::Keyring;
use backend::{LiveWorkers, QueueBackend, QueueKeys, QueueSettings};

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
    /// Per-queue retry policies (the handler logs a job's last attempt; the backend
    /// schedules retries).
    pub retry: RetryPolicies,
    /// The client for tenants' stores (catalog sync).
    pub store: StoreClient,
    /// Records security events from jobs (`state.events.record(event).await`), alert rules
    /// included.
    pub events: crate::events::SecurityLog,
    /// Sealed values re-encrypted per transaction (`KEY_ROTATION_BATCH_SIZE`).
    pub key_rotation_batch_size: usize,
    /// Dependencies' outages and circuits, and the deferral register (`outage`).
    pub outages: outage::Outages,
    /// The longest an `inbound_message` attempt may run (the LLM's timeout plus
    /// [`ATTEMPT_DB_ALLOWANCE`]): past it, a hang (a connection that stopped answering) ends
    /// the attempt.
    pub inbound_limit: Duration,
    /// The same for `sync_catalog` (`CATALOG_SYNC_DEADLINE_SECONDS` plus the allowance).
    pub sync_limit: Duration,
}

/// What an attempt may spend in PostgreSQL beyond its remote calls' own bounds before it
/// counts as hung.
pub const ATTEMPT_DB_ALLOWANCE: Duration = Duration::from_secs(30);

/// The handlers' HTTP clients could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot set up the store client: {0}")]
    Store(#[from] reqwest::Error),
    #[error(transparent)]
    Llm(#[from] crate::llm::SetupError),
    #[error("REDIS_URL: {0}")]
    Redis(#[from] redis::RedisError),
}

impl WorkerState {
    /// The handlers' state from the configuration.
    pub fn new(pool: PgPool, config: &Config) -> Result<Self, SetupError> {
        // The store client is rustls without a built-in provider: ring is the process's one
        // TLS stack (installing it twice is a no-op).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let events = crate::events::SecurityLog::new(
            pool.clone(),
            crate::queue::Renewing::lazy(&config.redis_url)?,
            config.queue_namespace.clone(),
        );
        let classifier = crate::llm::classifier(config.llm.as_ref())?;
        let store = StoreClient::new(
            StoreLimits {
                deadline: Duration::from_secs(config.catalog_sync_deadline_seconds),
                ..StoreLimits::with_timeout(Duration::from_millis(config.store_timeout_ms))
            },
            config.store_allowed_networks.clone(),
        )?;
        // The circuits live with the clients that use them; the outage state shows them.
        let mut outages = outage::Outages::new(Duration::from_secs(config.outage_max_wait_seconds));
        if let Some(circuit) = classifier.circuit() {
            outages.llm = circuit;
        }
        outages.stores = store.circuits().clone();
        Ok(Self {
            pool,
            keyring: config.keyring.clone(),
            blind_index: config.blind_index.clone(),
            min_confidence: config.llm_min_confidence,
            classifier,
            retry: config.retry,
            store,
            events,
            key_rotation_batch_size: config.key_rotation_batch_size,
            outages,
            inbound_limit: config.llm.as_ref().map_or(Duration::ZERO, |l| l.timeout)
                + ATTEMPT_DB_ALLOWANCE,
            sync_limit: Duration::from_secs(config.catalog_sync_deadline_seconds)
                + ATTEMPT_DB_ALLOWANCE,
        })
    }
}

/// How a worker process runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs in flight per queue in this process.
    pub concurrency: usize,
    /// How long in-flight jobs may take to finish after a shutdown signal.
    pub grace: Duration,
    pub heartbeat: Duration,
    /// Heartbeats a worker may miss before its jobs are handed to another worker.
    pub missed_heartbeats: usize,
    /// How long finished jobs stay in Redis before the vacuum removes them.
    pub retention: Duration,
    /// Where to answer `GET /healthz` and `GET /metrics` (`WORKER_HEALTH_PORT`); `None`: no
    /// listener.
    pub health_port: Option<u16>,
    /// The address the health port listens on: every interface for `gatehouse work`, the
    /// ingress's for `gatehouse dev` (loopback unless told otherwise).
    pub health_ip: std::net::IpAddr,
    /// The health port's header timeout and connection cap (`HTTP_HEADER_TIMEOUT_SECONDS`,
    /// `HTTP_MAX_CONNECTIONS`).
    pub health_limits: crate::server::Limits,
    /// `METRICS_TOKEN`: the bearer token `/metrics` requires, if any.
    pub metrics_token: Option<secrecy::SecretString>,
    /// Which PostgreSQL rows expire, and how often and how much a round deletes.
    pub row_retention: crate::retention::Retention,
    /// `REDIS_URL`, the address the connection given to [`run`] was opened with: a connection
    /// whose (re)connect ended in an answer that is not I/O (garbage, a server error) stays
    /// failed for good in the redis crate, so the workers open a new one from this URL.
    /// `None`: never renewed.
    pub redis_url: Option<secrecy::SecretString>,
}

impl WorkerOptions {
    pub fn from_config(config: &Config) -> Self {
        Self {
            concurrency: config.worker_concurrency,
            grace: config.worker_grace(),
            heartbeat: config.worker_heartbeat(),
            missed_heartbeats: config.worker_missed_heartbeats,
            retention: Duration::from_secs(config.job_retention_seconds),
            health_port: config.worker_health_port,
            health_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
            health_limits: crate::server::Limits::from_config(config),
            metrics_token: config.metrics_token.clone(),
            row_retention: crate::retention::Retention::from_config(config),
            redis_url: Some(config.redis_url.clone()),
        }
    }

    /// Silence after which a worker counts as dead.
    pub fn orphan_timeout(&self) -> Duration {
        self.heartbeat * self.missed_heartbeats.max(1) as u32
    }
}

/// Why the worker process stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("workers stopped without being asked to: {0}")]
    Exited(String),
    #[error("in-flight jobs did not finish within the {0:?} grace period")]
    GraceExceeded(Duration),
    #[error("WORKER_HEALTH_PORT: cannot listen on port {0}: {1}")]
    HealthPort(u16, std::io::Error),
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

fn queue_settings(
    queues: &Queues,
    queue: &str,
    options: &WorkerOptions,
    retry: RetryPolicy,
    outages: &outage::Outages,
) -> QueueSettings {
    QueueSettings {
        keys: QueueKeys::new(queues.namespace(), queue),
        batch_size: options.concurrency.max(1),
        heartbeat: options.heartbeat,
        orphan_timeout: options.orphan_timeout(),
        retry,
        outages: outages.clone(),
    }
}

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
fn settle(
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
struct Attempted<'a> {
    queue: &'static str,
    job_id: &'a str,
    attempt: usize,
    policy: &'a RetryPolicy,
    outages: &'a outage::Outages,
}

/// Runs one attempt unless PostgreSQL is down (then the job is given back at once), bounded by
/// `limit` (`None`: unbounded): an attempt past it is cancelled — its transaction never
/// commits — and counts as PostgreSQL's outage if a quick probe gets no answer either. An
/// attempt that did not run to its end is settled here (the `Err`); one that did returns its
/// own result.
async fn guarded<T, E>(
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
    observed(
        InboundMessage::QUEUE,
        span,
        run_inbound(job, job_id, attempt, worker, state),
    )
    .await
}

/// Runs one job attempt inside its span and records its duration and, when it succeeds, its
/// count (failures are counted by `job_failed`).
async fn observed(
    queue: &'static str,
    span: tracing::Span,
    attempt: impl std::future::Future<Output = Result<(), BoxDynError>>,
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

async fn handle_sync(
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

async fn handle_rotate(
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
        let ctx = crate::rotation::RunContext {
            keyring: &state.keyring,
            events: &state.events,
            job_id: &job_id,
            worker: worker.name(),
            batch_size: state.key_rotation_batch_size,
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

/// Pushes committed outbox entries to Redis every second (see `crate::outbox`). A PostgreSQL
/// outage is noted once (the process's outage state logs it), not per round.
async fn relay_outbox(
    pool: PgPool,
    redis: SharedRedis,
    queues: Queues,
    postgres: outage::Reachability,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if postgres.is_down() {
            continue;
        }
        let mut redis = redis.get();
        if let Err(error) = crate::outbox::relay(&pool, &mut redis, &queues).await {
            if let crate::fault::Fault::Outage(_) = crate::fault::postgres(&error) {
                postgres.outage(&error);
            } else {
                tracing::warn!(%error, "outbox relay failed; will retry");
            }
        }
    }
}

/// The Redis error inside a worker's failure, if the failure is a Redis outage: anything on
/// the way to a usable answer — connect, I/O (refused, reset, closed, timed out), protocol
/// garbage — or a server that says it cannot serve now (`LOADING`, `BUSY`, `TRYAGAIN`,
/// `READONLY`, `MASTERDOWN`, `CLUSTERDOWN`). Classified by where it happens (the error's kind
/// and the server's error code), never by its text. Anything else (a script error, "worker
/// not registered", a panic) is not an outage.
pub fn redis_outage<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a redis::RedisError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(redis) = e.downcast_ref::<redis::RedisError>() {
            let outage = matches!(crate::fault::redis(redis), crate::fault::Fault::Outage(_));
            return outage.then_some(redis);
        }
        current = e.source();
    }
    None
}

/// Whether a worker's failure is a Redis outage (see [`redis_outage`]).
fn failure_is_outage(error: &ApalisWorkerError) -> Option<&redis::RedisError> {
    /// What apalis wraps a durable backend's errors in (it gives no `source()`).
    type Durable =
        apalis_core::backend::finalize::DurableError<backend::BackendError, serde_json::Error>;
    match error {
        ApalisWorkerError::BackendError(inner) => match inner.downcast_ref::<Durable>() {
            Some(Durable::PollNextError(backend)) => redis_outage(backend),
            Some(_) => None,
            None => redis_outage(inner.as_ref()),
        },
        other => redis_outage(other),
    }
}

/// Restarts allowed within a sliding window, for failures that are not outages (a bug, a
/// script error): past it the process exits non-zero, for its supervisor to restart, instead
/// of spinning or stopping silently. Outages never count here (see [`Supervisor`]).
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

/// The backoff between restarts of one queue's worker during an outage: exponential from
/// [`Self::BASE`] with equal jitter (half fixed, half random), capped at [`Self::CAP`] so the
/// drain resumes within seconds of the dependency's return, and forgotten after
/// [`Self::HEALTHY`] without a failure.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    last: Option<std::time::Instant>,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);
    const HEALTHY: Duration = Duration::from_secs(30);

    /// Records a failure at `now`; returns the delay before the next start. `jitter` in [0, 1).
    fn next(&mut self, now: std::time::Instant, jitter: f64) -> Duration {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) > Self::HEALTHY)
        {
            self.failures = 0;
        }
        self.last = Some(now);
        let exp = Self::BASE.saturating_mul(1u32 << self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        let ceiling = exp.min(Self::CAP);
        ceiling / 2 + ceiling.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }
}

/// The restart policy of a process's workers: a failure that is a Redis outage is restarted
/// after a backoff (per queue), the restarted worker first probing Redis, and never exhausts
/// anything (the outage is logged and shown on `/healthz` once); any other failure is
/// restarted at once and spends the [`RestartBudget`].
#[derive(Debug, Default)]
struct Supervisor {
    budget: RestartBudget,
    /// Per queue worker ("{base}-{queue}"): its backoff, the delay its next start waits, and
    /// the generation of the shared Redis connection its current instance was built with.
    queues: std::collections::HashMap<String, (Backoff, Duration, u64)>,
}

/// A worker's name without its restart suffix ("{base}-{queue}").
fn queue_key(name: &str) -> &str {
    name.rsplit_once("-r").map_or(name, |(key, _)| key)
}

impl Supervisor {
    /// Whether to restart after `error`; records the delay the restarted worker waits.
    /// `generation`: the shared connection's current generation ([`SharedRedis`]).
    fn on_failure(
        &mut self,
        name: &str,
        error: &ApalisWorkerError,
        redis: &outage::Reachability,
        generation: u64,
    ) -> bool {
        let outage = failure_is_outage(error);
        let (backoff, delay, built) = self.queues.entry(queue_key(name).to_owned()).or_default();
        match outage {
            // A worker still holding a connection that was since renewed: its error is that
            // stale connection's, not news about Redis. Restart it on the new one at once.
            Some(cause) if !cause.is_io_error() && *built < generation => {
                *delay = Duration::ZERO;
                tracing::debug!(worker.name = name, %error, "worker stopped on a renewed redis connection; restarting on the new one");
                true
            }
            Some(cause) => {
                *delay = backoff.next(std::time::Instant::now(), rand::random::<f64>());
                redis.outage(cause);
                tracing::debug!(worker.name = name, %error, delay_ms = delay.as_millis() as u64, "worker stopped by a redis outage; probing again after the delay");
                true
            }
            None => {
                *delay = Duration::ZERO;
                let allowed = self.budget.allow();
                if allowed {
                    tracing::error!(worker.name = name, %error, "worker failed, restarting");
                } else {
                    tracing::error!(worker.name = name, %error, "worker keeps failing, giving up");
                }
                allowed
            }
        }
    }

    /// The delay the next start of a queue's worker waits (taken: a later start without a
    /// failure waits nothing); records the connection generation it is built with.
    fn take_delay(&mut self, key: &str, generation: u64) -> Duration {
        let (_, delay, built) = self.queues.entry(key.to_owned()).or_default();
        *built = generation;
        std::mem::take(delay)
    }
}

/// Before a restarted worker registers: waits its backoff, then probes Redis (PING). A failed
/// probe fails the start, which the supervisor counts as the outage's next failure; a
/// successful one ends the outage.
async fn probe_redis(
    delay: Duration,
    redis: SharedRedis,
    health: outage::Reachability,
) -> Result<(), backend::BackendError> {
    if delay.is_zero() {
        return Ok(());
    }
    tokio::time::sleep(delay).await;
    let mut conn = redis.get();
    match redis::cmd("PING").query_async::<String>(&mut conn).await {
        Ok(_) => {
            health.reached();
            Ok(())
        }
        Err(error) => {
            if !error.is_io_error() {
                redis.renew();
            }
            Err(error.into())
        }
    }
}

/// The process's Redis connection for the workers, the maintenance round and the outbox
/// relay: renewable (`crate::queue::Renewing`), because a reconnect answered with garbage (or a
/// server error) leaves a `ConnectionManager` failing for good. A failed probe that is not I/O
/// replaces it; users take a clone per round or per worker start.
type SharedRedis = crate::queue::Renewing;

/// Keeps this process's workers alive in Redis, recovers dead workers' jobs and vacuums
/// finished ones, every heartbeat interval, independently of how busy the workers are.
async fn maintain(
    redis: SharedRedis,
    queues: Vec<QueueKeys>,
    live: LiveWorkers,
    options: WorkerOptions,
    health: outage::Reachability,
) {
    const VACUUM_CHUNK: usize = 1000;
    const VACUUM_CHUNKS_PER_ROUND: usize = 20;
    let mut ticker = tokio::time::interval(options.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let mut redis = redis.get();
        // The round's first outage error, if any; other errors are logged as they come.
        let mut outage: Option<redis::RedisError> = None;
        let mut ok = true;
        let mut failed = |error: redis::RedisError, what: &str, queue: &str| {
            ok = false;
            if redis_outage(&error).is_some() {
                tracing::debug!(queue, %error, "{what} failed (redis outage)");
                outage.get_or_insert(error);
            } else {
                tracing::warn!(queue, %error, "{what} failed");
            }
        };
        for keys in &queues {
            let names = live.names(&keys.prefix);
            match backend::heartbeat(&mut redis, keys, options.orphan_timeout(), None, &names).await
            {
                Ok((jobs, workers)) if jobs > 0 || workers > 0 => tracing::warn!(
                    queue = %keys.prefix, jobs, workers,
                    "recovered the jobs of workers that stopped heartbeating"
                ),
                Ok(_) => {}
                Err(error) => {
                    failed(error, "heartbeat", &keys.prefix);
                    continue;
                }
            }
            for _ in 0..VACUUM_CHUNKS_PER_ROUND {
                match backend::vacuum(&mut redis, keys, options.retention, VACUUM_CHUNK).await {
                    Ok(n) if n as usize == VACUUM_CHUNK => continue,
                    Ok(_) => break,
                    Err(error) => {
                        failed(error, "vacuum", &keys.prefix);
                        break;
                    }
                }
            }
        }
        // Logged once per outage, by the health state.
        match outage {
            Some(error) => health.outage(&error),
            None if ok => health.reached(),
            None => {}
        }
    }
}

/// How long the health port's open connections may take to finish at shutdown.
const HEALTH_DRAIN: Duration = Duration::from_secs(5);

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
    // Installed before anything sets a gauge (a no-op when already installed).
    let metrics = crate::monitoring::install();
    let redis_health = state.outages.redis.clone();
    let stop_health = tokio_util::sync::CancellationToken::new();
    let shared: SharedRedis = match &options.redis_url {
        Some(url) => crate::queue::Renewing::from_manager(redis.clone(), url),
        None => redis.clone().into(),
    };
    let health_server = match options.health_port {
        None => None,
        Some(port) => {
            let listener = tokio::net::TcpListener::bind((options.health_ip, port))
                .await
                .map_err(|e| WorkerError::HealthPort(port, e))?;
            tracing::info!(
                port,
                ip = %options.health_ip,
                "worker health on GET /healthz, metrics on GET /metrics"
            );
            Some(tokio::spawn(health::serve(
                listener,
                options.health_limits,
                state.outages.clone(),
                state.pool.clone(),
                scrape::Scrape {
                    handle: metrics,
                    redis: shared.clone(),
                    namespace: queues.namespace().to_owned(),
                    token: options.metrics_token.clone(),
                },
                stop_health.clone().cancelled_owned(),
            )))
        }
    };
    tracing::info!(worker.name = %base, concurrency = options.concurrency, "starting workers");
    let concurrency = options.concurrency.max(1);
    let live = LiveWorkers::default();
    let inbound = queue_settings(
        &queues,
        InboundMessage::QUEUE,
        &options,
        state.retry.inbound_message,
        &state.outages,
    );
    let sync = queue_settings(
        &queues,
        SyncCatalog::QUEUE,
        &options,
        state.retry.sync_catalog,
        &state.outages,
    );
    let rotate = queue_settings(
        &queues,
        RotateKeys::QUEUE,
        &options,
        state.retry.rotate_keys,
        &state.outages,
    );
    let relay = tokio::spawn(relay_outbox(
        state.pool.clone(),
        shared.clone(),
        queues.clone(),
        state.outages.postgres.clone(),
    ));
    let retention = tokio::spawn(crate::retention::run(
        state.pool.clone(),
        options.row_retention,
        state.outages.postgres.clone(),
    ));
    let postgres_probe = tokio::spawn(outage::watch_postgres(
        state.pool.clone(),
        state.outages.postgres.clone(),
    ));
    let maintenance = tokio::spawn(maintain(
        shared.clone(),
        vec![inbound.keys.clone(), sync.keys.clone(), rotate.keys.clone()],
        live.clone(),
        options.clone(),
        redis_health.clone(),
    ));
    let supervisor = Arc::new(std::sync::Mutex::new(Supervisor::default()));
    // A restarted worker's previous name stops heartbeating, so whatever it held is recovered
    // after the orphan timeout.
    let retire = |live: &LiveWorkers, settings: &QueueSettings, name: String| {
        live.remove(&settings.keys.prefix, &name);
    };
    // One registration per queue: a restart retires the previous instance's name and builds
    // the worker again under a new one.
    macro_rules! queue_worker {
        ($job:ty, $settings:ident, $handler:expr) => {{
            let (redis, state, live, base, supervisor, health) = (
                shared.clone(),
                state.clone(),
                live.clone(),
                base.clone(),
                supervisor.clone(),
                redis_health.clone(),
            );
            move |restarts| {
                let queue = <$job as gatehouse_jobs::Job>::QUEUE;
                if restarts > 0 {
                    retire(
                        &live,
                        &$settings,
                        format!("{base}-{queue}-r{}", restarts - 1),
                    );
                }
                let generation = redis.generation();
                let delay = supervisor
                    .lock()
                    .map(|mut s| s.take_delay(&format!("{base}-{queue}"), generation))
                    .unwrap_or(Backoff::CAP);
                let (probe, health) = (redis.clone(), health.clone());
                let storage =
                    QueueBackend::<$job>::new(redis.get(), $settings.clone(), live.clone())
                        .poll_with_strategy(poll::Ticker::new(POLL_INTERVAL))
                        .before_start(move |_| probe_redis(delay, probe.clone(), health.clone()));
                WorkerBuilder::new(format!("{base}-{queue}-r{restarts}"))
                    .backend(storage)
                    .catch_panic()
                    .concurrency(concurrency)
                    .data(state.clone())
                    .build($handler)
            }
        }};
    }
    let monitor = Monitor::new()
        .register(queue_worker!(InboundMessage, inbound, handle_inbound))
        .register(queue_worker!(SyncCatalog, sync, handle_sync))
        .register(queue_worker!(RotateKeys, rotate, handle_rotate))
        .should_restart({
            let (health, shared) = (redis_health.clone(), shared.clone());
            move |ctx, error| {
                let generation = shared.generation();
                supervisor
                    .lock()
                    .map(|mut s| s.on_failure(ctx.name(), error, &health, generation))
                    .unwrap_or(false)
            }
        });
    let context = monitor.context();
    let mut running = Box::pin(monitor.run());
    let result = tokio::select! {
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
    };
    maintenance.abort();
    postgres_probe.abort();
    retention.abort();
    relay.abort();
    if let Some(mut server) = health_server {
        // Connections finish the probe or scrape they are serving; idle ones close at once.
        stop_health.cancel();
        if tokio::time::timeout(HEALTH_DRAIN, &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
    result
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

    /// The error a Redis reply `-{line}` becomes.
    fn server_error(line: &str) -> redis::RedisError {
        let reply = format!("-{line}\r\n");
        redis::parse_redis_value(reply.as_bytes())
            .and_then(redis::Value::extract_error)
            .expect_err("an error reply")
    }

    /// A worker's failure as apalis reports it: the backend's error inside `DurableError`.
    fn failed(error: redis::RedisError) -> ApalisWorkerError {
        ApalisWorkerError::BackendError(Box::new(apalis_core::backend::finalize::DurableError::<
            _,
            serde_json::Error,
        >::PollNextError(
            backend::BackendError::Redis(error)
        )))
    }

    #[test]
    fn redis_errors_on_the_way_to_an_answer_or_servers_that_cannot_serve_are_outages() {
        let io = |kind| redis::RedisError::from(std::io::Error::from(kind));
        let garbage = redis::parse_redis_value(b"\x01\x02garbage\r\n").expect_err("garbage");
        for error in [
            io(std::io::ErrorKind::ConnectionRefused),
            io(std::io::ErrorKind::ConnectionReset),
            io(std::io::ErrorKind::UnexpectedEof),
            io(std::io::ErrorKind::TimedOut),
            io(std::io::ErrorKind::BrokenPipe),
            garbage,
            server_error("LOADING Redis is loading the dataset in memory"),
            server_error(
                "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
            ),
            server_error("TRYAGAIN Multiple keys request during rehashing of slot"),
            server_error("READONLY You can't write against a read only replica."),
            server_error(
                "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            ),
            server_error("CLUSTERDOWN The cluster is down"),
        ] {
            let text = error.to_string();
            assert!(failure_is_outage(&failed(error)).is_some(), "{text}");
        }
    }

    #[test]
    fn script_errors_and_panics_are_worker_failures_not_outages() {
        for error in [
            server_error("gatehouse: worker w-r0 is not registered (declared dead?)"),
            server_error("ERR Error running script"),
            server_error("NOSCRIPT No matching script"),
            server_error("WRONGTYPE Operation against a key holding the wrong kind of value"),
        ] {
            let text = error.to_string();
            assert!(failure_is_outage(&failed(error)).is_none(), "{text}");
        }
        assert!(failure_is_outage(&ApalisWorkerError::PanicError("boom".into())).is_none());
        assert!(
            failure_is_outage(&ApalisWorkerError::BackendError(Box::new(
                backend::BackendError::Unsupported
            )))
            .is_none()
        );
    }

    #[test]
    fn restart_delays_grow_with_jitter_up_to_the_cap_and_reset_after_a_healthy_period() {
        let mut backoff = Backoff::default();
        let start = std::time::Instant::now();
        let low: Vec<Duration> = (0..12).map(|_| backoff.next(start, 0.0)).collect();
        assert_eq!(low[0], Backoff::BASE / 2);
        assert_eq!(low[1], Backoff::BASE);
        assert!(
            low.windows(2).all(|w| w[0] <= w[1]),
            "never shrinks: {low:?}"
        );
        assert_eq!(*low.last().expect("delays"), Backoff::CAP / 2);
        assert_eq!(
            backoff.next(start, 0.999_999).max(Backoff::CAP),
            Backoff::CAP
        );
        assert!(backoff.next(start, 0.999_999) > Backoff::CAP * 9 / 10);
        // A failure long after the last one starts from the base again.
        let later = start + Backoff::HEALTHY + Duration::from_secs(1);
        assert_eq!(backoff.next(later, 0.0), Backoff::BASE / 2);
    }

    #[test]
    fn a_redis_outage_never_exhausts_the_restarts_but_other_failures_do() {
        let mut supervisor = Supervisor::default();
        let health = outage::Reachability::new(crate::fault::Dependency::Redis);
        let refused = || {
            failed(redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )))
        };
        for restart in 0..1000 {
            let name = format!("host-1-ab-inbound_message-r{restart}");
            assert!(supervisor.on_failure(&name, &refused(), &health, 0));
            assert!(
                !supervisor
                    .take_delay("host-1-ab-inbound_message", 0)
                    .is_zero()
            );
        }
        assert!(health.down_since().is_some(), "the outage shows");
        assert!(!health.get());
        health.reached();
        assert!(health.down_since().is_none() && health.get());

        let bug = || ApalisWorkerError::PanicError("bug".into());
        for restart in 0..RestartBudget::MAX_IN_WINDOW {
            let name = format!("host-1-ab-sync_catalog-r{restart}");
            assert!(supervisor.on_failure(&name, &bug(), &health, 0));
            assert!(supervisor.take_delay("host-1-ab-sync_catalog", 0).is_zero());
        }
        assert!(
            !supervisor.on_failure("host-1-ab-sync_catalog-r99", &bug(), &health, 0),
            "a worker failing for another reason still gives up past the budget"
        );
        assert!(health.get(), "and that is no redis outage");
    }

    #[test]
    fn a_worker_failing_on_a_connection_renewed_since_restarts_at_once_without_an_outage() {
        let mut supervisor = Supervisor::default();
        let health = outage::Reachability::new(crate::fault::Dependency::Redis);
        health.reached();
        let garbled =
            || failed(redis::parse_redis_value(b"\x01\x02garbage\r\n").expect_err("garbage"));
        assert!(supervisor.take_delay("h-1-ab-inbound_message", 0).is_zero());
        // Built on generation 0; the connection is now at generation 1.
        assert!(supervisor.on_failure("h-1-ab-inbound_message-r0", &garbled(), &health, 1));
        assert!(supervisor.take_delay("h-1-ab-inbound_message", 1).is_zero());
        assert!(health.get(), "no outage from a stale connection");
        // Built on the current connection: the same error is an outage.
        assert!(supervisor.on_failure("h-1-ab-inbound_message-r1", &garbled(), &health, 1));
        assert!(!supervisor.take_delay("h-1-ab-inbound_message", 1).is_zero());
        assert!(!health.get());
    }

    #[test]
    fn the_queue_key_is_the_worker_name_without_its_restart_suffix() {
        assert_eq!(
            queue_key("h-12-0af3-inbound_message-r0"),
            "h-12-0af3-inbound_message"
        );
        assert_eq!(
            queue_key("my-r-host-1-ab-rotate_keys-r17"),
            "my-r-host-1-ab-rotate_keys"
        );
    }

    #[test]
    fn worker_names_are_unique_per_call() {
        assert_ne!(unique_worker_name(), unique_worker_name());
    }
}
