//! gatehouse's Redis backend for apalis: its own Lua scripts behind apalis-core's
//! `Persistence` trait, so apalis stays the worker framework while the queue's semantics are
//! gatehouse's (ARCHITECTURE.md, "The queue").
//!
//! Key layout under `{namespace}:{queue}` (compatible with what `gatehouse-jobs` enqueues):
//! `:active` list of ready ids, `:data` hash of payloads, `:meta:{id}` hashes, `:scheduled`
//! zset of retries by due time, `:done` and `:dead` zsets by time, `:workers` zset of
//! heartbeats, `:inflight:{worker}` sets of fetched jobs.

use std::collections::{BTreeMap, BTreeSet};
use std::marker::PhantomData;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use apalis_codec::json::JsonCodec;
use apalis_core::backend::finalize::Durable;
use apalis_core::backend::future::BoxSyncFuture;
use apalis_core::backend::persistence::{Persisted, Persistence, TaskEvent, TaskPersistLayer};
use apalis_core::backend::{Backend, BackendConfig, TaskResult, WireFormatBackend};
use apalis_core::task::Task;
use apalis_core::task::status::Status;
use apalis_core::worker::context::WorkerContext;
use futures::FutureExt;
use redis::Script;
use redis::aio::ConnectionManager;
use serde_json::Value;

use crate::config::RetryPolicy;
use crate::worker::retry::backoff_delay;

/// Due retries promoted per fetch: far below Lua's ~8,000 `unpack` limit, and enough that a
/// burst of 20,000 due retries drains in a few dozen fetches.
pub const PROMOTE_CHUNK: usize = 1000;
/// Dead workers recovered per heartbeat call.
const RECOVER_CHUNK: usize = 100;
/// Longest error text kept with a job (the cause, never a payload).
pub const MAX_ERROR_CHARS: usize = 500;

macro_rules! script {
    ($name:ident, $file:literal) => {
        static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(include_str!(concat!("lua/", $file))));
    };
}
script!(FETCH, "fetch.lua");
script!(ACK, "ack.lua");
script!(HEARTBEAT, "heartbeat.lua");
script!(REGISTER, "register.lua");
script!(RELEASE, "release.lua");
script!(DEREGISTER, "deregister.lua");
script!(VACUUM, "vacuum.lua");
pub(crate) static DEAD_RETRY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/dead_retry.lua")));
pub(crate) static DEAD_PURGE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/dead_purge.lua")));

/// Why a queue operation failed. Any of these ends the apalis worker, which gatehouse's
/// supervisor restarts under a new name.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("enqueue through gatehouse-jobs, not the apalis sink")]
    Unsupported,
}

/// The Redis key names of one queue.
#[derive(Debug, Clone)]
pub struct QueueKeys {
    /// `{namespace}:{queue}`.
    pub prefix: String,
}

impl QueueKeys {
    pub fn new(namespace: &str, queue: &str) -> Self {
        Self {
            prefix: format!("{namespace}:{queue}"),
        }
    }
    pub fn active(&self) -> String {
        format!("{}:active", self.prefix)
    }
    pub fn data(&self) -> String {
        format!("{}:data", self.prefix)
    }
    pub fn meta(&self) -> String {
        format!("{}:meta", self.prefix)
    }
    pub fn scheduled(&self) -> String {
        format!("{}:scheduled", self.prefix)
    }
    pub fn done(&self) -> String {
        format!("{}:done", self.prefix)
    }
    pub fn dead(&self) -> String {
        format!("{}:dead", self.prefix)
    }
    pub fn workers(&self) -> String {
        format!("{}:workers", self.prefix)
    }
    pub fn inflight(&self) -> String {
        format!("{}:inflight", self.prefix)
    }
    pub fn inflight_of(&self, worker: &str) -> String {
        format!("{}:inflight:{worker}", self.prefix)
    }
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
    pub keys: QueueKeys,
    pub batch_size: usize,
    pub heartbeat: Duration,
    /// A worker silent this long is dead and its jobs are handed on.
    pub orphan_timeout: Duration,
    pub retry: RetryPolicy,
    /// The process's outage state: fetching pauses while PostgreSQL is down, and deferred
    /// attempts are acknowledged without counting (`super::outage`).
    pub outages: super::outage::Outages,
}

/// One heartbeat round for a queue: keeps `names` alive (and `strict`, which must still be
/// registered), then recovers the jobs of dead workers. Returns (jobs recovered, dead workers).
pub async fn heartbeat(
    conn: &mut ConnectionManager,
    keys: &QueueKeys,
    orphan_timeout: Duration,
    strict: Option<&str>,
    names: &[String],
) -> Result<(u64, u64), redis::RedisError> {
    let mut invocation = HEARTBEAT.prepare_invoke();
    invocation
        .key(keys.workers())
        .key(keys.active())
        .key(keys.inflight())
        .arg(orphan_timeout.as_millis() as u64)
        .arg(RECOVER_CHUNK)
        .arg(strict.unwrap_or(""));
    for name in names {
        invocation.arg(name);
    }
    invocation.invoke_async(conn).await
}

/// Removes up to `limit` finished jobs older than `retention`; returns how many.
pub async fn vacuum(
    conn: &mut ConnectionManager,
    keys: &QueueKeys,
    retention: Duration,
    limit: usize,
) -> Result<u64, redis::RedisError> {
    VACUUM
        .key(keys.done())
        .key(keys.data())
        .key(keys.meta())
        .arg(retention.as_millis() as u64)
        .arg(limit)
        .invoke_async(conn)
        .await
}

/// The `Persistence` half: what apalis-core's `Persisted` driver calls.
#[derive(Debug, Clone)]
pub struct QueuePersistence {
    conn: ConnectionManager,
    settings: QueueSettings,
    live: LiveWorkers,
}

/// Where a finished attempt goes.
fn outcome(status: &Status, attempt: usize, policy: &RetryPolicy) -> &'static str {
    match status {
        Status::Done => "done",
        Status::Killed => "dead",
        _ if attempt >= policy.max_attempts as usize => "dead",
        _ => "retry",
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
        let keys = &self.settings.keys;
        let _: i64 = REGISTER
            .key(keys.workers())
            .arg(worker.name())
            .invoke_async(&mut self.conn)
            .await?;
        self.live.add(&keys.prefix, worker.name());
        tracing::debug!(worker.name = worker.name(), queue = %keys.prefix, "worker registered");
        Ok(())
    }

    async fn heartbeat(&mut self, worker: &WorkerContext) -> Result<(), BackendError> {
        let (recovered, dead) = heartbeat(
            &mut self.conn,
            &self.settings.keys,
            self.settings.orphan_timeout,
            Some(worker.name()),
            &[],
        )
        .await?;
        if recovered > 0 || dead > 0 {
            tracing::warn!(
                queue = %self.settings.keys.prefix,
                jobs = recovered,
                workers = dead,
                "recovered the jobs of workers that stopped heartbeating"
            );
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
        let keys = &self.settings.keys;
        let result: Vec<redis::Value> = FETCH
            .key(keys.workers())
            .key(keys.active())
            .key(keys.inflight_of(worker.name()))
            .key(keys.data())
            .key(keys.meta())
            .key(keys.scheduled())
            .arg(self.settings.batch_size)
            .arg(worker.name())
            .arg(PROMOTE_CHUNK)
            .invoke_async(&mut self.conn)
            .await?;
        let tasks = apalis_redis::queries::deserialize_with_meta(result)?;
        Ok(tasks
            .into_iter()
            .map(apalis_redis::queries::CompactTask::into_full_compact)
            .collect())
    }

    async fn reenqueue_abandoned(
        &mut self,
        tasks: Vec<Task<Vec<u8>>>,
        worker: &WorkerContext,
    ) -> Result<u64, BackendError> {
        if tasks.is_empty() {
            return Ok(0);
        }
        let keys = &self.settings.keys;
        let mut invocation = RELEASE.prepare_invoke();
        invocation
            .key(keys.inflight_of(worker.name()))
            .key(keys.active());
        for task in &tasks {
            if let Some(id) = task.ctx().task_id() {
                invocation.arg(id.to_string());
            }
        }
        Ok(invocation.invoke_async(&mut self.conn).await?)
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
        let keys = &self.settings.keys;
        let policy = self.settings.retry;
        let deferrals = &self.settings.outages.deferrals;
        let mut invocation = ACK.prepare_invoke();
        invocation
            .key(keys.inflight_of(worker.name()))
            .key(keys.done())
            .key(keys.dead())
            .key(keys.scheduled())
            .key(keys.meta())
            .arg(self.settings.outages.max_wait.as_millis() as u64);
        for result in &results {
            let id = result.task_id.to_string();
            let attempt = result.attempt.max(1);
            // What the attempt is if it counts: the outcome itself, or (for a deferral) what
            // it becomes once the job has waited out outages for longer than the maximum.
            let counted = outcome(&result.status, attempt, &policy);
            let counted_delay = if counted == "retry" {
                backoff_delay(&policy, attempt as u32, rand::random::<f64>())
            } else {
                Duration::ZERO
            };
            let deferred = match deferrals.take(&id) {
                Some(delay) if result.status != Status::Done => Some(delay),
                _ => None,
            };
            let (outcome, delay) = match deferred {
                Some(delay) => ("defer", delay),
                None => (counted, counted_delay),
            };
            invocation
                .arg(id)
                .arg(outcome)
                .arg(attempt)
                .arg(delay.as_millis() as u64)
                .arg(error_text(result))
                .arg(counted)
                .arg(counted_delay.as_millis() as u64);
        }
        let (acked, expired): (usize, usize) = invocation.invoke_async(&mut self.conn).await?;
        if expired > 0 {
            tracing::warn!(
                queue = %keys.prefix,
                jobs = expired,
                max_wait_s = self.settings.outages.max_wait.as_secs(),
                "jobs waited out outages for longer than OUTAGE_MAX_WAIT_SECONDS; their failed attempts count again"
            );
        }
        if acked < results.len() {
            tracing::warn!(
                queue = %keys.prefix,
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
            .field("queue", &self.persist.settings.keys.prefix)
            .finish_non_exhaustive()
    }
}

impl<Args> QueueBackend<Args> {
    pub fn new(conn: ConnectionManager, settings: QueueSettings, live: LiveWorkers) -> Self {
        Self {
            persist: Persisted::new(QueuePersistence {
                conn,
                settings,
                live,
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
            let keys = self.persist.settings.keys.clone();
            let live = self.persist.live.clone();
            let mut conn = self.persist.conn.clone();
            self.cleanup = Some(
                async move {
                    live.remove(&keys.prefix, &name);
                    let _: i64 = DEREGISTER
                        .key(keys.workers())
                        .key(keys.inflight_of(&name))
                        .arg(&name)
                        .invoke_async(&mut conn)
                        .await?;
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
        assert_eq!(outcome(&Status::Done, 1, &p), "done");
        assert_eq!(outcome(&Status::Failed, 1, &p), "retry");
        assert_eq!(outcome(&Status::Failed, 3, &p), "retry");
        assert_eq!(outcome(&Status::Failed, 4, &p), "dead");
        assert_eq!(outcome(&Status::Pending, 2, &p), "retry");
        assert_eq!(
            outcome(&Status::Killed, 1, &p),
            "dead",
            "permanent errors never retry"
        );
    }
}
