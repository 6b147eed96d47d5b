//! The worker process's maintenance, beside the apalis workers and independent of how busy
//! they are: every heartbeat interval, [`maintain`] keeps this process's workers alive in
//! Redis, rescues the jobs of dead workers (orphans), vacuums finished jobs and moves what a
//! release before the cluster-safe key layout left in Redis (`crate::queue::legacy`); once a second
//! [`relay_outbox`] pushes committed outbox entries; about once a minute the retention round
//! (`crate::retention`) deletes expired PostgreSQL rows and [`sync_limits`] copies the
//! per-tenant caps into Redis; and the PostgreSQL probe (`outage::watch_postgres`) ends an
//! outage. [`Maintenance`] starts them and stops them
//! together.

use std::time::Duration;

use gatehouse_jobs::client::Queues;
use sqlx::PgPool;
use tokio::task::JoinHandle;

use super::backend::LiveWorkers;
use super::supervise::redis_outage;
use super::{SharedRedis, WorkerOptions, WorkerState, outage};
use crate::queue::keys::QueueKeys;
use crate::queue::table::QUEUE_SPECS;
use crate::queue::{consume, legacy};

/// The process's maintenance tasks, aborted together at shutdown.
pub(super) struct Maintenance(Vec<JoinHandle<()>>);

impl Maintenance {
    /// Starts the outbox relay, the retention round, the PostgreSQL probe and the heartbeat /
    /// orphan rescue / vacuum loop over `keys`.
    pub(super) fn start(
        state: &WorkerState,
        redis: &SharedRedis,
        queues: &Queues,
        keys: Vec<QueueKeys>,
        live: &LiveWorkers,
        options: &WorkerOptions,
    ) -> Self {
        // An outbox push that waits for replicas (`WAIT` blocks its connection) gets a
        // connection of its own, so fetches and acknowledgements never queue behind it.
        let relay_redis = match (&options.redis_url, queues.replica_acks()) {
            (Some(target), Some(_)) => {
                crate::redis_conn::Renewing::lazy(target).unwrap_or_else(|_| redis.clone())
            }
            _ => redis.clone(),
        };
        Self(vec![
            tokio::spawn(relay_outbox(
                state.pool.clone(),
                relay_redis,
                queues.clone(),
                state.outages.postgres.clone(),
            )),
            tokio::spawn(crate::retention::run(
                state.pool.clone(),
                options.row_retention,
                state.outages.postgres.clone(),
            )),
            tokio::spawn(outage::watch_postgres(
                state.pool.clone(),
                state.outages.postgres.clone(),
            )),
            tokio::spawn(sync_limits(
                state.pool.clone(),
                redis.clone(),
                queues.layout().clone(),
                state.outages.postgres.clone(),
            )),
            tokio::spawn(maintain(
                redis.clone(),
                queues.namespace().to_owned(),
                keys,
                live.clone(),
                options.clone(),
                state.outages.redis.clone(),
            )),
        ])
    }

    /// Stops every task (each round is idempotent, so one cut short is simply redone by the
    /// next process).
    pub(super) fn stop(self) {
        for task in self.0 {
            task.abort();
        }
    }
}

/// Pushes committed outbox entries to Redis every second (see `crate::queue::outbox`). A PostgreSQL
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
        if let Err(error) = crate::queue::outbox::relay(&pool, &mut redis, &queues).await {
            if let crate::fault::Fault::Outage(_) = crate::fault::postgres(&error) {
                postgres.outage(&error);
            } else {
                tracing::warn!(%error, "outbox relay failed; will retry");
            }
        }
    }
}

/// Copies the per-tenant caps (`tenant_queue_limits`) into every queue shard's `:caps` hash at
/// start and every minute (`crate::queue::limits::sync`): an override set while Redis was
/// down, or lost with Redis's keys, is enforced again within a minute.
async fn sync_limits(
    pool: PgPool,
    redis: SharedRedis,
    layout: crate::queue::keys::Layout,
    postgres: outage::Reachability,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(60));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if postgres.is_down() {
            continue;
        }
        let mut conn = redis.get();
        match crate::queue::limits::sync(&pool, &mut conn, &layout).await {
            Ok(0) => {}
            Ok(changed) => tracing::info!(changed, "per-tenant caps copied into redis"),
            Err(error) => tracing::debug!(%error, "per-tenant caps not synced this round"),
        }
    }
}

/// Keeps this process's workers alive in Redis, recovers dead workers' jobs and vacuums
/// finished ones, every heartbeat interval, independently of how busy the workers are.
async fn maintain(
    redis: SharedRedis,
    namespace: String,
    queues: Vec<QueueKeys>,
    live: LiveWorkers,
    options: WorkerOptions,
    health: outage::Reachability,
) {
    const VACUUM_CHUNK: usize = 1000;
    const VACUUM_CHUNKS_PER_ROUND: usize = 20;
    const LEGACY_PER_ROUND: usize = 5000;
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
            let fairness = options.fairness(&keys.queue);
            match consume::heartbeat(
                &mut redis,
                keys,
                fairness,
                options.orphan_timeout(),
                None,
                &names,
            )
            .await
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
                match consume::vacuum(&mut redis, keys, options.retention, VACUUM_CHUNK).await {
                    Ok(n) if n as usize == VACUUM_CHUNK => continue,
                    Ok(_) => break,
                    Err(error) => {
                        failed(error, "vacuum", &keys.prefix);
                        break;
                    }
                }
            }
        }
        // What an older release left in its key layout moves into the current one (only
        // ever on a single Redis: no release before it ran on a cluster).
        let specs: &[_] = if redis.is_cluster() {
            &[]
        } else {
            &QUEUE_SPECS
        };
        for spec in specs {
            match legacy::relay(
                &mut redis,
                &namespace,
                spec.name,
                options.orphan_timeout(),
                LEGACY_PER_ROUND,
            )
            .await
            {
                Ok(relayed) if relayed.moved > 0 || relayed.recovered > 0 => tracing::info!(
                    queue = spec.name,
                    moved = relayed.moved,
                    recovered = relayed.recovered,
                    "moved jobs from the pre-cluster key layout"
                ),
                Ok(_) => {}
                Err(error) => failed(error, "legacy relay", spec.name),
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
