//! The apalis adapter: gatehouse's queue layer (`crate::queue::consume`) behind apalis-core's
//! `Backend` and `Persistence` traits, so apalis stays the worker framework while the queue's
//! semantics are gatehouse's (ARCHITECTURE.md, "The queue"). What is apalis's here: turning
//! apalis's task events into acknowledgements (where a finished attempt goes, by its status and
//! the queue's retry policy), decoding fetched tasks, and the worker's lifecycle (register,
//! release, deregister). The key layout is `crate::queue::keys`.

use std::collections::{BTreeMap, BTreeSet};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use crate::redis_conn::Renewing;
use apalis_codec::json::JsonCodec;
use apalis_core::backend::finalize::Durable;
use apalis_core::backend::future::BoxSyncFuture;
use apalis_core::backend::persistence::{Persisted, Persistence, TaskEvent, TaskPersistLayer};
use apalis_core::backend::{Backend, BackendConfig, TaskResult, WireFormatBackend};
use apalis_core::task::Task;
use apalis_core::task::status::Status;
use apalis_core::worker::context::WorkerContext;
use futures::FutureExt;
use serde_json::Value;

use crate::config::RetryPolicy;
use crate::queue::consume::{self, Ack, MAX_ERROR_CHARS, Outcome};
use crate::queue::keys::QueueKeys;
use crate::queue::retry::backoff_delay;

/// Why a queue operation failed. Any of these ends the apalis worker, which gatehouse's
/// supervisor restarts under a new name.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("enqueue through gatehouse-jobs, not the apalis sink")]
    Unsupported,
}

/// The worker names of this process that are alive, per queue key prefix: the process-wide
/// heartbeat keeps exactly these registered, whatever the apalis poll loop is busy with, so a
/// job that runs longer than the orphan timeout is not taken over while its process lives.
#[derive(Debug, Clone, Default)]
pub struct LiveWorkers(Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>);

impl LiveWorkers {
    pub fn add(&self, prefix: &str, name: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.entry(prefix.to_owned())
                .or_default()
                .insert(name.to_owned());
        }
    }
    pub fn remove(&self, prefix: &str, name: &str) {
        if let Ok(mut map) = self.0.lock()
            && let Some(set) = map.get_mut(prefix)
        {
            set.remove(name);
        }
    }
    pub fn names(&self, prefix: &str) -> Vec<String> {
        self.0
            .lock()
            .ok()
            .and_then(|map| map.get(prefix).map(|s| s.iter().cloned().collect()))
            .unwrap_or_default()
    }
}

/// How one queue's backend behaves.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// The queue's name.
    pub queue: &'static str,
    /// Every shard the worker takes jobs from (at least one: shard 0 first), fetched in turn.
    pub shards: Vec<QueueKeys>,
    pub batch_size: usize,
    pub heartbeat: Duration,
    /// A worker silent this long is dead and its jobs are handed on.
    pub orphan_timeout: Duration,
    /// How the queue hands out its tenants' jobs (order, cap).
    pub fairness: consume::Fairness,
    pub retry: RetryPolicy,
    /// The process's outage state: fetching pauses while PostgreSQL is down, and deferred
    /// attempts are acknowledged without counting (`super::outage`).
    pub outages: super::outage::Outages,
    /// Whether a payload decodes into the handler's argument ([`decodes`] of its type). One
    /// that does not is dead at fetch: handed to apalis it would end the worker, and the job,
    /// rescued from the dead worker, would end the next one.
    pub decodes: fn(&[u8]) -> bool,
}

/// Whether `payload` decodes as an `Args` (what apalis's JSON codec would do with it).
pub fn decodes<Args: serde::de::DeserializeOwned>(payload: &[u8]) -> bool {
    serde_json::from_slice::<Args>(payload).is_ok()
}

/// The `Persistence` half: what apalis-core's `Persisted` driver calls.
#[derive(Debug, Clone)]
pub struct QueuePersistence {
    /// The process's shared connection, itself (not a snapshot of it): a command failing on a
    /// connection stuck after a fault (a reconnect answered with garbage) renews it for every
    /// worker at once, instead of each worker built on the stuck one failing in turn until a
    /// probe renews it.
    conn: Renewing,
    settings: QueueSettings,
    live: LiveWorkers,
    /// Which shard each job this worker fetched and has not acknowledged came from.
    held: Arc<Mutex<std::collections::HashMap<String, usize>>>,
    /// The shard the next fetch tries first: fetches go round the shards, so a busy shard
    /// never starves the others.
    next_shard: usize,
}

impl QueuePersistence {
    fn shard(&self, index: usize) -> &QueueKeys {
        &self.settings.shards[index % self.settings.shards.len()]
    }

    /// Takes the shard a held job came from (shard 0 if unknown: its acknowledgement finds
    /// nothing there and is dropped, like any stale one).
    fn release_held(&self, id: &str) -> usize {
        self.held
            .lock()
            .ok()
            .and_then(|mut held| held.remove(id))
            .unwrap_or(0)
    }

    /// Dead-letters fetched jobs whose payload does not decode, at once and without running
    /// them (the error names the queue, never the payload).
    async fn kill_undecodable(
        &mut self,
        worker: &WorkerContext,
        shard: usize,
        tasks: &[Task<Vec<u8>>],
    ) -> Result<(), BackendError> {
        let keys = self.shard(shard).clone();
        let acks: Vec<Ack> = tasks
            .iter()
            .filter_map(|task| {
                let id = task.ctx().task_id()?.to_string();
                self.release_held(&id);
                tracing::error!(queue = %keys.prefix, job.id = %id, "job payload does not decode; dead-lettered without running");
                Some(Ack {
                    id,
                    outcome: Outcome::Dead,
                    attempt: task.attempt() + 1,
                    delay: Duration::ZERO,
                    error: "the payload does not decode as a job of this queue".into(),
                    counted: Outcome::Dead,
                    counted_delay: Duration::ZERO,
                })
            })
            .collect();
        ::metrics::counter!("gatehouse_jobs_total", "queue" => queue_name(&keys), "outcome" => "dead")
            .increment(acks.len() as u64);
        consume::ack(
            &mut self.conn,
            &keys,
            self.settings.fairness,
            worker.name(),
            self.settings.outages.max_wait,
            &acks,
        )
        .await?;
        Ok(())
    }
}

/// The queue's name, for metrics labels.
fn queue_name(keys: &QueueKeys) -> String {
    keys.queue.clone()
}

/// Where a finished attempt goes.
fn outcome(status: &Status, attempt: usize, policy: &RetryPolicy) -> Outcome {
    match status {
        Status::Done => Outcome::Done,
        Status::Killed => Outcome::Dead,
        _ if attempt >= policy.max_attempts as usize => Outcome::Dead,
        _ => Outcome::Retry,
    }
}

fn error_text(result: &TaskResult<Value>) -> String {
    match &result.result {
        Ok(_) => String::new(),
        Err(e) => e.chars().take(MAX_ERROR_CHARS).collect(),
    }
}

impl Persistence for QueuePersistence {
    type Compact = Vec<u8>;
    type Response = Value;
    type Error = BackendError;

    async fn register(&mut self, worker: &WorkerContext) -> Result<(), BackendError> {
        for keys in &self.settings.shards {
            consume::register(&mut self.conn, keys, worker.name()).await?;
            self.live.add(&keys.prefix, worker.name());
        }
        tracing::debug!(
            worker.name = worker.name(),
            queue = self.settings.queue,
            shards = self.settings.shards.len(),
            "worker registered"
        );
        Ok(())
    }

    async fn heartbeat(&mut self, worker: &WorkerContext) -> Result<(), BackendError> {
        for keys in &self.settings.shards {
            let (recovered, dead) = consume::heartbeat(
                &mut self.conn,
                keys,
                self.settings.fairness,
                self.settings.orphan_timeout,
                Some(worker.name()),
                &[],
            )
            .await?;
            if recovered > 0 || dead > 0 {
                tracing::warn!(
                    queue = %keys.prefix,
                    jobs = recovered,
                    workers = dead,
                    "recovered the jobs of workers that stopped heartbeating"
                );
            }
        }
        Ok(())
    }

    async fn fetch_next(
        &mut self,
        worker: &WorkerContext,
    ) -> Result<Vec<Task<Vec<u8>>>, BackendError> {
        // Every job needs PostgreSQL: while it is down, take nothing (what is queued waits
        // in Redis, unattempted).
        if self.settings.outages.paused() {
            return Ok(Vec::new());
        }
        // One shard per fetch, in turn: the first that has jobs answers, and the next fetch
        // starts at the shard after it.
        let count = self.settings.shards.len();
        for step in 0..count {
            let shard = (self.next_shard + step) % count;
            let keys = self.shard(shard).clone();
            let result = consume::fetch(
                &mut self.conn,
                &keys,
                self.settings.fairness,
                worker.name(),
                self.settings.batch_size,
            )
            .await?;
            let tasks = apalis_redis::queries::deserialize_with_meta(result)?;
            if tasks.is_empty() {
                continue;
            }
            self.next_shard = (shard + 1) % count;
            if let Ok(mut held) = self.held.lock() {
                for task in &tasks {
                    held.insert(task.task_id.to_string(), shard);
                }
            }
            let (good, bad): (Vec<_>, Vec<_>) = tasks
                .into_iter()
                .map(apalis_redis::queries::CompactTask::into_full_compact)
                .partition(|task| (self.settings.decodes)(&task.args));
            if !bad.is_empty() {
                self.kill_undecodable(worker, shard, &bad).await?;
            }
            return Ok(good);
        }
        Ok(Vec::new())
    }

    async fn reenqueue_abandoned(
        &mut self,
        tasks: Vec<Task<Vec<u8>>>,
        worker: &WorkerContext,
    ) -> Result<u64, BackendError> {
        if tasks.is_empty() {
            return Ok(0);
        }
        let mut by_shard: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for id in tasks
            .iter()
            .filter_map(|task| task.ctx().task_id().map(ToString::to_string))
        {
            by_shard.entry(self.release_held(&id)).or_default().push(id);
        }
        let mut released = 0;
        for (shard, ids) in by_shard {
            let keys = self.shard(shard).clone();
            released += consume::release(
                &mut self.conn,
                &keys,
                self.settings.fairness,
                worker.name(),
                &ids,
            )
            .await?;
        }
        Ok(released)
    }

    async fn handle_events(
        &mut self,
        events: Vec<TaskEvent<Value>>,
        worker: &WorkerContext,
    ) -> Result<(), BackendError> {
        let results: Vec<&TaskResult<Value>> = events
            .iter()
            .filter_map(|event| match event {
                TaskEvent::Complete(result) => Some(result),
                _ => None,
            })
            .collect();
        if results.is_empty() {
            return Ok(());
        }
        let policy = self.settings.retry;
        let deferrals = &self.settings.outages.deferrals;
        let acks: Vec<Ack> = results
            .iter()
            .map(|result| {
                let id = result.task_id.to_string();
                let attempt = result.attempt.max(1);
                // What the attempt is if it counts: the outcome itself, or (for a deferral)
                // what it becomes once the job has waited out outages for longer than the
                // maximum.
                let counted = outcome(&result.status, attempt, &policy);
                let counted_delay = if counted == Outcome::Retry {
                    backoff_delay(&policy, attempt as u32, rand::random::<f64>())
                } else {
                    Duration::ZERO
                };
                let deferred = match deferrals.take(&id) {
                    Some(delay) if result.status != Status::Done => Some(delay),
                    _ => None,
                };
                let (outcome, delay) = match deferred {
                    Some(delay) => (Outcome::Defer, delay),
                    None => (counted, counted_delay),
                };
                Ack {
                    id,
                    outcome,
                    attempt,
                    delay,
                    error: error_text(result),
                    counted,
                    counted_delay,
                }
            })
            .collect();
        let mut by_shard: BTreeMap<usize, Vec<Ack>> = BTreeMap::new();
        for ack in acks {
            by_shard
                .entry(self.release_held(&ack.id))
                .or_default()
                .push(ack);
        }
        let (mut acked, mut expired) = (0, 0);
        for (shard, acks) in by_shard {
            let keys = self.shard(shard).clone();
            let done = consume::ack(
                &mut self.conn,
                &keys,
                self.settings.fairness,
                worker.name(),
                self.settings.outages.max_wait,
                &acks,
            )
            .await?;
            acked += done.acked;
            expired += done.expired;
        }
        let queue = self.settings.queue;
        if expired > 0 {
            tracing::warn!(
                queue,
                jobs = expired,
                max_wait_s = self.settings.outages.max_wait.as_secs(),
                "jobs waited out outages for longer than OUTAGE_MAX_WAIT_SECONDS; their failed attempts count again"
            );
        }
        if acked < results.len() {
            tracing::warn!(
                queue,
                stale = results.len() - acked,
                "results of jobs this worker no longer held were dropped (taken over after a missed heartbeat)"
            );
        }
        Ok(())
    }

    async fn push_tasks(&mut self, _tasks: Vec<Task<Vec<u8>>>) -> Result<(), BackendError> {
        Err(BackendError::Unsupported)
    }
}

/// An apalis backend over one gatehouse queue.
pub struct QueueBackend<Args> {
    persist: Persisted<QueuePersistence>,
    codec: JsonCodec,
    cleanup: Option<BoxSyncFuture<Result<(), BackendError>>>,
    _args: PhantomData<fn() -> Args>,
}

impl<Args> std::fmt::Debug for QueueBackend<Args> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueBackend")
            .field("queue", &self.persist.settings.queue)
            .finish_non_exhaustive()
    }
}

impl<Args> QueueBackend<Args> {
    pub fn new(conn: Renewing, settings: QueueSettings, live: LiveWorkers) -> Self {
        Self {
            persist: Persisted::new(QueuePersistence {
                conn,
                settings,
                live,
                held: Arc::default(),
                next_shard: 0,
            }),
            codec: JsonCodec::default(),
            cleanup: None,
            _args: PhantomData,
        }
    }
}

impl<Args> Backend for QueueBackend<Args> {
    type Task = Task<Vec<u8>>;
    type Error = BackendError;

    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), BackendError>> {
        let heartbeat = self.persist.settings.heartbeat;
        self.persist.poll_ready(cx, worker, heartbeat)
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, BackendError>>> {
        self.persist.poll_next(cx, worker)
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), BackendError>> {
        if self.cleanup.is_none() {
            ready!(self.persist.poll_close(cx, worker))?;
            let name = worker.name().to_owned();
            let shards = self.persist.settings.shards.clone();
            let live = self.persist.live.clone();
            let mut conn = self.persist.conn.clone();
            self.cleanup = Some(
                async move {
                    for keys in &shards {
                        live.remove(&keys.prefix, &name);
                        consume::deregister(&mut conn, keys, &name).await?;
                    }
                    Ok(())
                }
                .boxed()
                .into(),
            );
        }
        match self.cleanup.as_mut() {
            Some(cleanup) => cleanup.poll_unpin(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<Args> BackendConfig for QueueBackend<Args> {
    type Args = Args;
    type Id = apalis_core::task::task_id::TaskId;
    type Kind = Durable;
    type Config = QueueSettings;
    type Layer = TaskPersistLayer<JsonCodec<Value>, Value>;

    fn config(&self) -> &QueueSettings {
        &self.persist.settings
    }

    fn middleware(&mut self, _worker: &mut WorkerContext) -> Self::Layer {
        let batch = self.persist.settings.batch_size;
        self.persist
            .layer(JsonCodec::<Value>::default(), batch)
            // Acks are how a job leaves the inflight set; never off.
            .persist_results(true)
            // apalis's leases LREM the whole active list per job; gatehouse's liveness is
            // per worker (heartbeat + inflight set), so they are not needed.
            .lock_tasks(false)
    }
}

impl<Args> WireFormatBackend for QueueBackend<Args> {
    type Codec = JsonCodec;
    type Compact = Vec<u8>;

    fn codec(&self) -> &JsonCodec {
        &self.codec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(10),
            max_attempts: 4,
        }
    }

    #[test]
    fn undecodable_payloads_are_told_apart_and_labelled_by_queue() {
        assert!(decodes::<gatehouse_jobs::SyncCatalog>(
            br#"{"tenant_id":"7b0c5c5e-3f0a-4c5e-9a64-2f1f6f0b9d11","requested_by":"7b0c5c5e-3f0a-4c5e-9a64-2f1f6f0b9d12","mode":"full"}"#
        ));
        assert!(!decodes::<gatehouse_jobs::SyncCatalog>(
            br#"{"tenant_id":7}"#
        ));
        type Inbound = gatehouse_jobs::sealed::Sealed<gatehouse_jobs::InboundMessage>;
        assert!(
            decodes::<Inbound>(b"[1, 2]"),
            "the handler refuses it, with an event"
        );
        assert!(!decodes::<Inbound>(b"{not json"));
        let keys = QueueKeys::new("ns:with:colons", "inbound_message");
        assert_eq!(queue_name(&keys), "inbound_message");
    }

    /// A backend's command failing on a stuck connection (answered with garbage) renews the
    /// process's shared connection — the backend holds that connection, not a snapshot of it —
    /// so once Redis answers, the next worker built on it works without waiting for a probe.
    #[tokio::test]
    async fn a_command_failing_on_a_stuck_connection_renews_the_shared_one() {
        use gatehouse_testenv::fault_proxy::{FaultProxy, Mode};
        let upstream = url::Url::parse(&gatehouse_testenv::redis_url()).expect("redis url");
        let upstream = (
            upstream.host_str().expect("host").to_owned(),
            upstream.port().unwrap_or(6379),
        );
        let upstream = tokio::net::lookup_host(upstream)
            .await
            .expect("resolve redis")
            .next()
            .expect("an address");
        let proxy = FaultProxy::start(upstream).await;
        let target = crate::redis_conn::RedisTarget::single(proxy.redis_url().into());
        let shared = Renewing::lazy(&target).expect("connection");
        let namespace = format!("ghtest-renew-{}", uuid::Uuid::new_v4().simple());
        let settings = QueueSettings {
            queue: "inbound_message",
            shards: vec![QueueKeys::new(&namespace, "inbound_message")],
            batch_size: 1,
            heartbeat: Duration::from_secs(1),
            orphan_timeout: Duration::from_secs(3),
            fairness: consume::Fairness {
                order: crate::config::QueueOrder::default(),
                max_in_flight: None,
            },
            retry: policy(),
            outages: super::super::outage::Outages::new(Duration::from_secs(60)),
            decodes: decodes::<Value>,
        };
        let worker = WorkerContext::new("renew-test-w1");

        proxy.set(Mode::Garbage);
        let mut stuck =
            QueueBackend::<Value>::new(shared.clone(), settings.clone(), LiveWorkers::default());
        assert!(
            stuck.persist.register(&worker).await.is_err(),
            "garbage fails the command"
        );
        assert!(shared.generation() >= 1, "and renews the shared connection");

        proxy.set(Mode::Pass);
        let mut next =
            QueueBackend::<Value>::new(shared.clone(), settings.clone(), LiveWorkers::default());
        next.persist
            .register(&worker)
            .await
            .expect("the next worker registers on the renewed connection");
        let mut cleanup = shared.get();
        consume::deregister(&mut cleanup, &settings.shards[0], worker.name())
            .await
            .expect("deregister");
        let left: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{namespace}:*"))
            .query_async(&mut cleanup)
            .await
            .expect("keys");
        if !left.is_empty() {
            redis::cmd("DEL")
                .arg(&left)
                .query_async::<()>(&mut cleanup)
                .await
                .expect("del");
        }
    }

    #[test]
    fn live_worker_names_are_kept_per_queue_until_retired() {
        let live = LiveWorkers::default();
        live.add("ns:a", "w1");
        live.add("ns:a", "w2");
        live.add("ns:b", "w3");
        live.remove("ns:a", "w1");
        assert_eq!(live.names("ns:a"), vec!["w2".to_owned()]);
        assert_eq!(live.names("ns:b"), vec!["w3".to_owned()]);
        assert!(live.names("ns:c").is_empty());
    }

    #[test]
    fn failures_retry_until_the_last_attempt_then_die() {
        let p = policy();
        assert_eq!(outcome(&Status::Done, 1, &p).as_str(), "done");
        assert_eq!(outcome(&Status::Failed, 1, &p).as_str(), "retry");
        assert_eq!(outcome(&Status::Failed, 3, &p).as_str(), "retry");
        assert_eq!(outcome(&Status::Failed, 4, &p).as_str(), "dead");
        assert_eq!(outcome(&Status::Pending, 2, &p).as_str(), "retry");
        assert_eq!(
            outcome(&Status::Killed, 1, &p).as_str(),
            "dead",
            "permanent errors never retry"
        );
    }
}
