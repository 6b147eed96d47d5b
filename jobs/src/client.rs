//! The enqueue client: puts a job on a gatehouse queue in Redis.
//!
//! Works over any `redis::aio::ConnectionLike` (the caller picks the runtime and the
//! connection type). Jobs go straight to the queue's active list in one Lua script; a
//! dedupe key, when given, is claimed in the same script so a job is enqueued at most once
//! per key while the key lives.
//!
//! A queue whose payload identifies a customer (`inbound_message`) seals those fields before
//! they leave the process (`crate::sealed`): give the client gatehouse's `ENCRYPTION_KEY` with
//! [`Queues::sealing_with`]. Without it, enqueuing such a job fails
//! ([`EnqueueError::Seal`]); nothing is ever sent in plaintext.
//!
//! ```no_run
//! # async fn run(mut conn: impl redis::aio::ConnectionLike) -> Result<(), Box<dyn std::error::Error>> {
//! use gatehouse_jobs::envelope::EncryptionKey;
//! use gatehouse_jobs::{InboundMessage, SyncCatalog, SyncMode, client::{Enqueue, Queues}};
//! // The same base64 key as gatehouse's ENCRYPTION_KEY (read it from your secret store).
//! let key = EncryptionKey::from_base64(&std::env::var("ENCRYPTION_KEY")?)?;
//! let queues = Queues::new("gatehouse").sealing_with(key);
//! let job = SyncCatalog { tenant_id: uuid::Uuid::nil(), requested_by: uuid::Uuid::nil(), mode: SyncMode::Full };
//! let outcome = queues.enqueue(&mut conn, &job, Enqueue::default()).await?;
//! println!("job {} (new: {})", outcome.job_id, outcome.created);
//! # Ok(()) }
//! ```

use std::sync::LazyLock;

use redis::{Script, aio::ConnectionLike};
use uuid::Uuid;

use crate::Job;
use crate::envelope::EncryptionKey;
use crate::keys::{QueueKeys, dedupe_key};
use crate::sealed::{AtRest, SealError, at_rest, seal_job, seal_value};
use crate::spec::default_max_attempts;

static ENQUEUE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/enqueue.lua")));

/// Why a job could not be enqueued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// Redis refused or could not be reached; retrying may help.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The payload could not be serialized (the error names no value: serde_json's
    /// serialization errors describe types).
    #[error("payload: {0}")]
    Payload(#[from] serde_json::Error),
    /// The payload's customer data could not be sealed (no key given, or not an object).
    #[error("{0}")]
    Seal(#[from] SealError),
    /// A payload handed over as already sealed ([`Queues::enqueue_at_rest`]) is not.
    #[error("the payload for queue {queue} is not sealed; refusing to put it in Redis")]
    NotSealed {
        /// The queue.
        queue: String,
    },
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

/// The Redis key names of gatehouse's queues under one namespace, and the key that seals
/// customer data on the way in. `Debug` shows the key's id only.
#[derive(Debug, Clone)]
pub struct Queues {
    namespace: String,
    key: Option<EncryptionKey>,
}

impl Queues {
    /// Queues under `namespace` (production: `gatehouse`; tests use their own), without a
    /// sealing key: enough for queues that seal nothing, and for reading the key layout.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            key: None,
        }
    }

    /// Seals customer data with `key` (gatehouse's current `ENCRYPTION_KEY`) before it is sent.
    #[must_use]
    pub fn sealing_with(mut self, key: EncryptionKey) -> Self {
        self.key = Some(key);
        self
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

    /// Enqueue a typed job, its customer data sealed.
    pub async fn enqueue<C: ConnectionLike, J: Job>(
        &self,
        conn: &mut C,
        job: &J,
        options: Enqueue,
    ) -> Result<Enqueued, EnqueueError> {
        let mut options = options;
        // The job id is the AAD's: fixed before anything is sealed.
        let job_id = options
            .job_id
            .take()
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        let payload = seal_job(job, &job_id, self.key.as_ref())?;
        self.push(conn, J::QUEUE, &job_id, &payload, options).await
    }

    /// The payload as it will rest in Redis: sealed for job `job_id` when `queue` seals.
    fn at_rest(
        &self,
        queue: &str,
        job_id: &str,
        payload: serde_json::Value,
    ) -> Result<String, EnqueueError> {
        Ok(seal_value(queue, job_id, &payload, self.key.as_ref())?)
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
                let payload = seal_job(job, &job_id, self.key.as_ref())?;
                pipe.cmd("EVALSHA")
                    .arg(&hash)
                    .arg(5)
                    .arg(keys.data())
                    .arg(keys.active())
                    .arg(keys.signal())
                    .arg(keys.meta())
                    .arg("")
                    .arg(&job_id)
                    .arg(payload)
                    .arg(max_attempts)
                    .arg(1)
                    .ignore();
                ids.push(job_id);
            }
            let () = pipe.query_async(conn).await?;
        }
        Ok(ids)
    }

    /// Enqueue a payload that was already validated against the queue's schema
    /// (`jobs/schemas/{queue}.json`), its customer data sealed here. The attempt budget
    /// recorded with the job is the queue's default ([`crate::spec`]).
    pub async fn enqueue_json<C: ConnectionLike>(
        &self,
        conn: &mut C,
        queue: &str,
        payload: serde_json::Value,
        mut options: Enqueue,
    ) -> Result<Enqueued, EnqueueError> {
        // The job id is the AAD's: fixed before anything is sealed.
        let job_id = options
            .job_id
            .take()
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        let payload = self.at_rest(queue, &job_id, payload)?;
        self.push(conn, queue, &job_id, &payload, options).await
    }

    /// Enqueue a payload already in its at-rest form (`jobs/schemas/at-rest/{queue}.json`,
    /// sealed for `job_id`), as it is: the outbox relay's path, so a job committed with a
    /// database write is never re-sealed. A queue that seals refuses a payload that is not.
    pub async fn enqueue_at_rest<C: ConnectionLike>(
        &self,
        conn: &mut C,
        queue: &str,
        job_id: &str,
        payload_json: &str,
        options: Enqueue,
    ) -> Result<Enqueued, EnqueueError> {
        if matches!(
            at_rest(queue, payload_json),
            AtRest::Plaintext | AtRest::Malformed
        ) {
            return Err(EnqueueError::NotSealed {
                queue: queue.to_owned(),
            });
        }
        self.push(conn, queue, job_id, payload_json, options).await
    }

    async fn push<C: ConnectionLike>(
        &self,
        conn: &mut C,
        queue: &str,
        job_id: &str,
        payload_json: &str,
        options: Enqueue,
    ) -> Result<Enqueued, EnqueueError> {
        let keys = self.keys(queue);
        let (dedupe_key, ttl) = options.dedupe.unwrap_or_default();
        let mut invocation = ENQUEUE.prepare_invoke();
        invocation
            .key(keys.data())
            .key(keys.active())
            .key(keys.signal())
            .key(keys.meta())
            .key(dedupe_key)
            .arg(job_id)
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
