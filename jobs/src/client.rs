//! The enqueue client: puts a job on a gatehouse queue in Redis.
//!
//! Works over any `redis::aio::ConnectionLike` (the caller picks the runtime and the
//! connection type). Jobs go straight to the queue's active list in one Lua script; a
//! dedupe key, when given, is claimed in the same script so a job is enqueued at most once
//! per key while the key lives.
//!
//! ```no_run
//! # async fn run(mut conn: impl redis::aio::ConnectionLike) -> Result<(), gatehouse_jobs::client::EnqueueError> {
//! use gatehouse_jobs::{SyncCatalog, SyncMode, client::{Enqueue, Queues}};
//! let queues = Queues::new("gatehouse");
//! let job = SyncCatalog { tenant_id: uuid::Uuid::nil(), requested_by: uuid::Uuid::nil(), mode: SyncMode::Full };
//! let outcome = queues.enqueue(&mut conn, &job, Enqueue::default()).await?;
//! println!("job {} (new: {})", outcome.job_id, outcome.created);
//! # Ok(()) }
//! ```

use std::sync::LazyLock;

use redis::{Script, aio::ConnectionLike};
use uuid::Uuid;

use crate::Job;
use crate::keys::{QueueKeys, dedupe_key};
use crate::spec::default_max_attempts;

static ENQUEUE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/enqueue.lua")));

/// Why a job could not be enqueued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// Redis refused or could not be reached; retrying may help.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The payload could not be serialized.
    #[error("payload: {0}")]
    Payload(#[from] serde_json::Error),
}

/// Options for one enqueue.
#[derive(Debug, Default, Clone)]
pub struct Enqueue {
    /// Job id to use; a fresh UUIDv7 when `None`.
    pub job_id: Option<String>,
    /// A dedupe key (already namespaced by the caller's purpose) and how long it lives.
    pub dedupe: Option<(String, u64)>,
    /// Request id carried into the job's metadata for tracing.
    pub request_id: Option<String>,
}

/// The result of an enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The job's id (the existing one when deduplicated).
    pub job_id: String,
    /// False when the dedupe key or job id already existed and nothing was enqueued.
    pub created: bool,
}

/// The Redis key names of gatehouse's queues under one namespace.
#[derive(Debug, Clone)]
pub struct Queues {
    namespace: String,
}

impl Queues {
    /// Queues under `namespace` (production: `gatehouse`; tests use their own).
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The apalis queue name (Redis key prefix) of a queue: `{namespace}:{queue}`.
    pub fn queue_key(&self, queue: &str) -> String {
        self.keys(queue).prefix
    }

    /// Every Redis key of a queue (the layout is [`crate::keys`]).
    pub fn keys(&self, queue: &str) -> QueueKeys {
        QueueKeys::new(&self.namespace, queue)
    }

    /// A namespaced dedupe key: `{namespace}:dedupe:{purpose}`.
    pub fn dedupe_key(&self, purpose: &str) -> String {
        dedupe_key(&self.namespace, purpose)
    }

    /// Enqueue a typed job.
    pub async fn enqueue<C: ConnectionLike, J: Job>(
        &self,
        conn: &mut C,
        job: &J,
        options: Enqueue,
    ) -> Result<Enqueued, EnqueueError> {
        let payload = serde_json::to_string(job)?;
        self.enqueue_raw(conn, J::QUEUE, &payload, options).await
    }

    /// Enqueue many jobs of one type, pipelined (`BATCH` script calls per round trip); each
    /// job is still its own atomic script call, straight onto the active list. Returns the new
    /// jobs' ids in order. For backfills and bulk producers; use [`Queues::enqueue`] for
    /// dedupe keys and request ids.
    pub async fn enqueue_batch<C: ConnectionLike, J: Job>(
        &self,
        conn: &mut C,
        jobs: &[J],
    ) -> Result<Vec<String>, EnqueueError> {
        const BATCH: usize = 1000;
        let keys = self.keys(J::QUEUE);
        let max_attempts = default_max_attempts(J::QUEUE);
        // EVALSHA needs the script cached; SCRIPT LOAD is idempotent.
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(include_str!("../lua/enqueue.lua"))
            .query_async(conn)
            .await?;
        let hash = ENQUEUE.get_hash().to_owned();
        let mut ids = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for job in chunk {
                let job_id = Uuid::now_v7().to_string();
                pipe.cmd("EVALSHA")
                    .arg(&hash)
                    .arg(5)
                    .arg(keys.data())
                    .arg(keys.active())
                    .arg(keys.signal())
                    .arg(keys.meta())
                    .arg("")
                    .arg(&job_id)
                    .arg(serde_json::to_string(job)?)
                    .arg(max_attempts)
                    .arg(1)
                    .ignore();
                ids.push(job_id);
            }
            let () = pipe.query_async(conn).await?;
        }
        Ok(ids)
    }

    /// Enqueue a payload that was already validated against the queue's schema. The attempt
    /// budget recorded with the job is the queue's default ([`crate::spec`]).
    pub async fn enqueue_raw<C: ConnectionLike>(
        &self,
        conn: &mut C,
        queue: &str,
        payload_json: &str,
        options: Enqueue,
    ) -> Result<Enqueued, EnqueueError> {
        let keys = self.keys(queue);
        let job_id = options.job_id.unwrap_or_else(|| Uuid::now_v7().to_string());
        let (dedupe_key, ttl) = options.dedupe.unwrap_or_default();
        let mut invocation = ENQUEUE.prepare_invoke();
        invocation
            .key(keys.data())
            .key(keys.active())
            .key(keys.signal())
            .key(keys.meta())
            .key(dedupe_key)
            .arg(&job_id)
            .arg(payload_json)
            .arg(default_max_attempts(queue))
            .arg(ttl.max(1));
        if let Some(request_id) = options.request_id {
            invocation.arg("request_id").arg(request_id);
        }
        let (created, job_id): (i64, String) = invocation.invoke_async(conn).await?;
        Ok(Enqueued {
            job_id,
            created: created == 1,
        })
    }
}
