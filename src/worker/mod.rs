//! The worker edge: apalis workers over gatehouse's Redis queues, and nothing else — the
//! queue itself (keys, Lua scripts, fetch/ack/heartbeat/vacuum, retries, dead letters, the
//! outbox) is the queue layer, `crate::queue`.
//!
//! - `backend`: the apalis `Backend`/`Persistence` adapter over `crate::queue::consume`.
//! - One handler per queue, named after it: `inbound_message`, `sync_catalog`, `rotate_keys`;
//!   `attempt`: what every attempt shares (bounded in time, settled by its fault).
//! - `maintenance`: heartbeat, orphan rescue, vacuum, outbox relay, retention round.
//! - `supervise`: restarts, their budget and backoff, the Redis probe.
//! - `outage`: what the process knows of its dependencies; `health`: `/healthz` and
//!   `/metrics` on `WORKER_HEALTH_PORT`; `poll`: the idle poll ticker.
//!
//! Every process names its workers uniquely, heartbeats from a task of its own (so long jobs
//! keep their workers alive), vacuums finished jobs, and supervises its workers: one ending on
//! its own is restarted under a new name, never a silent clean exit. A Redis outage pauses
//! them instead of ending the process: each restart waits a capped, jittered backoff and
//! probes Redis first, the outage is logged once at its start and once at its end and shown on
//! `/healthz` and `/metrics`. A job whose attempt fails for an outage (PostgreSQL, the LLM, a
//! store) or a transient fault is deferred without using an attempt (`attempt::settle`,
//! `crate::fault`); while PostgreSQL is down the process fetches nothing and gives back what
//! it holds, and a probe (`outage::watch_postgres`) resumes it.

mod attempt;
pub mod backend;
pub mod group_commit;
pub mod health;
pub mod inbound_message;
pub mod maintenance;
pub mod outage;
pub mod poll;
pub mod rotate_keys;
pub mod supervise;
pub mod sync_catalog;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::redis_conn::RedisConn;
use apalis::prelude::*;
use gatehouse_jobs::{InboundMessage, Job, RotateKeys, SyncCatalog, client::Queues};
use sqlx::PgPool;

use crate::catalog::{StoreClient, StoreLimits};
use crate::classify::Classifier;
use crate::config::{Config, RetryPolicies, RetryPolicy};
use crate::security::blind_index::BlindIndex;
use crate::security::keyring::Keyring;
use backend::{LiveWorkers, QueueBackend, QueueSettings};
use maintenance::Maintenance;
use supervise::{Backoff, Supervisor, probe_redis};

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
    /// Redis and the queue layout, for the job payloads a key rotation re-seals.
    pub redis: crate::redis_conn::Renewing,
    pub layout: gatehouse_jobs::keys::Layout,
    /// Dependencies' outages and circuits, and the deferral register (`outage`).
    pub outages: outage::Outages,
    /// The longest an `inbound_message` attempt may run (the LLM's timeout plus
    /// [`ATTEMPT_DB_ALLOWANCE`]): past it, a hang (a connection that stopped answering) ends
    /// the attempt.
    pub inbound_limit: Duration,
    /// The same for `sync_catalog` (`CATALOG_SYNC_DEADLINE_SECONDS` plus the allowance).
    pub sync_limit: Duration,
    /// Stores `inbound_message` effects, in groups (`GROUP_COMMIT_MAX_JOBS`).
    pub group_commit: group_commit::GroupCommit,
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
        let redis = crate::redis_conn::Renewing::lazy(&config.redis_url)?;
        let events = crate::events::SecurityLog::new(
            pool.clone(),
            redis.clone(),
            config.redis_namespace.clone(),
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
            group_commit: group_commit::GroupCommit::new(
                pool.clone(),
                config.group_commit_max_jobs,
            ),
            pool,
            keyring: config.keyring.clone(),
            blind_index: config.blind_index.clone(),
            min_confidence: config.llm_min_confidence,
            classifier,
            retry: config.retry,
            store,
            events,
            key_rotation_batch_size: config.key_rotation_batch_size,
            redis,
            layout: config.layout().clone(),
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
    pub redis_url: Option<crate::redis_conn::RedisTarget>,
    /// `QUEUE_ORDER`.
    pub queue_order: crate::config::QueueOrder,
    /// `TENANT_MAX_IN_FLIGHT_{QUEUE}`, by queue (only those with a cap).
    pub tenant_max_in_flight: std::collections::BTreeMap<&'static str, u32>,
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
            queue_order: config.queue_order,
            tenant_max_in_flight: config.tenant_max_in_flight.clone(),
        }
    }

    /// How `queue` hands out its tenants' jobs.
    pub fn fairness(&self, queue: &str) -> crate::queue::consume::Fairness {
        crate::queue::consume::Fairness {
            order: self.queue_order,
            max_in_flight: self.tenant_max_in_flight.get(queue).copied(),
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

fn queue_settings<Args: serde::de::DeserializeOwned>(
    shards: Vec<crate::queue::keys::QueueKeys>,
    queue: &'static str,
    options: &WorkerOptions,
    retry: RetryPolicy,
    outages: &outage::Outages,
) -> QueueSettings {
    QueueSettings {
        queue,
        shards,
        batch_size: options.concurrency.max(1),
        heartbeat: options.heartbeat,
        orphan_timeout: options.orphan_timeout(),
        fairness: options.fairness(queue),
        retry,
        outages: outages.clone(),
        decodes: backend::decodes::<Args>,
    }
}

/// The process's Redis connection for the workers, the maintenance round and the outbox
/// relay: renewable (`crate::redis_conn::Renewing`), because a reconnect answered with garbage
/// (or a server error) leaves a `ConnectionManager` failing for good. A command or a probe
/// failing with an outage error that is not I/O replaces it; the workers' backends send every
/// command through it (never a snapshot), the other users take the current one per round.
type SharedRedis = crate::redis_conn::Renewing;

/// How long the health port's open connections may take to finish at shutdown.
const HEALTH_DRAIN: Duration = Duration::from_secs(5);

/// Runs every queue's workers until `shutdown` resolves, then stops taking jobs and waits
/// up to the grace period for in-flight ones.
pub async fn run(
    state: Arc<WorkerState>,
    redis: RedisConn,
    queues: Queues,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let base = unique_worker_name();
    // Installed before anything sets a gauge (a no-op when already installed).
    let metrics = crate::metrics::install();
    let redis_health = state.outages.redis.clone();
    let stop_health = tokio_util::sync::CancellationToken::new();
    let shared: SharedRedis = match &options.redis_url {
        Some(url) => crate::redis_conn::Renewing::from_manager(redis.clone(), url),
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
                crate::metrics::scrape::Scrape {
                    handle: metrics,
                    redis: shared.clone(),
                    layout: queues.layout().clone(),
                    token: options.metrics_token.clone(),
                },
                stop_health.clone().cancelled_owned(),
            )))
        }
    };
    tracing::info!(worker.name = %base, concurrency = options.concurrency, "starting workers");
    let concurrency = options.concurrency.max(1);
    let live = LiveWorkers::default();
    let mut probe = shared.clone();
    let mut shards_of = async |queue| {
        crate::queue::consume::shards_to_read(&mut probe, queues.layout(), queue).await
    };
    let inbound = queue_settings::<gatehouse_jobs::sealed::Sealed<InboundMessage>>(
        shards_of(InboundMessage::QUEUE).await,
        InboundMessage::QUEUE,
        &options,
        state.retry.inbound_message,
        &state.outages,
    );
    let sync = queue_settings::<SyncCatalog>(
        shards_of(SyncCatalog::QUEUE).await,
        SyncCatalog::QUEUE,
        &options,
        state.retry.sync_catalog,
        &state.outages,
    );
    let rotate = queue_settings::<RotateKeys>(
        shards_of(RotateKeys::QUEUE).await,
        RotateKeys::QUEUE,
        &options,
        state.retry.rotate_keys,
        &state.outages,
    );
    let maintenance = Maintenance::start(
        &state,
        &shared,
        &queues,
        [&inbound, &sync, &rotate]
            .iter()
            .flat_map(|settings| settings.shards.iter().cloned())
            .collect(),
        &live,
        &options,
    );
    let supervisor = Arc::new(std::sync::Mutex::new(Supervisor::default()));
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A restarted worker's previous name stops heartbeating, so whatever it held is recovered
    // after the orphan timeout.
    let retire = |live: &LiveWorkers, settings: &QueueSettings, name: String| {
        for keys in &settings.shards {
            live.remove(&keys.prefix, &name);
        }
    };
    // One registration per queue: a restart retires the previous instance's name and builds
    // the worker again under a new one.
    macro_rules! queue_worker {
        // `$args`: what the handler takes (the payload as it rests in Redis: `Sealed<$job>`
        // for a queue that seals customer data, which only the handler opens).
        ($job:ty, $args:ty, $settings:ident, $handler:expr) => {{
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
                    QueueBackend::<$args>::new(redis.clone(), $settings.clone(), live.clone())
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
        .register(queue_worker!(
            InboundMessage,
            gatehouse_jobs::sealed::Sealed<InboundMessage>,
            inbound,
            inbound_message::handle
        ))
        .register(queue_worker!(
            SyncCatalog,
            SyncCatalog,
            sync,
            sync_catalog::handle
        ))
        .register(queue_worker!(
            RotateKeys,
            RotateKeys,
            rotate,
            rotate_keys::handle
        ))
        .should_restart({
            let (health, shared, stopping) =
                (redis_health.clone(), shared.clone(), stopping.clone());
            move |ctx, error| {
                // Once shutdown began, a worker that fails (Redis gone, say) stays stopped:
                // restarting it would only fail again, at once, until the grace ran out.
                if stopping.load(std::sync::atomic::Ordering::Acquire) {
                    return false;
                }
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
            stopping.store(true, std::sync::atomic::Ordering::Release);
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
    maintenance.stop();
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
    fn worker_names_are_unique_per_call() {
        assert_ne!(unique_worker_name(), unique_worker_name());
    }
}
