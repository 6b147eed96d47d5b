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
use crate::keys::{Layout, QueueKeys};
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
    /// The job is in Redis, but fewer replicas than asked confirmed it within the bound
    /// ([`Queues::acknowledged_by`]): a failover now could lose it, so the caller must not
    /// report it accepted. Retrying the same enqueue (same dedupe purpose or job id) adds
    /// nothing and waits again.
    #[error("the job reached {acked} of {wanted} Redis replicas in time")]
    NotReplicated {
        /// Replicas that confirmed.
        acked: u64,
        /// Replicas asked for.
        wanted: u64,
    },
}

/// How many replicas must confirm an enqueue, and for how long to wait for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaAcks {
    /// Replicas (`REDIS_MIN_REPLICA_ACKS`).
    pub replicas: u64,
    /// The longest wait (`WAIT`'s timeout).
    pub timeout: std::time::Duration,
}

/// Options for one enqueue.
#[derive(Debug, Default, Clone)]
pub struct Enqueue {
    /// Job id to use; a fresh UUIDv7 when `None`.
    pub job_id: Option<String>,
    /// A dedupe purpose (e.g. `inbound_message:{tenant}:{message_sid}`) and how long, in
    /// seconds, it is remembered: while it lives, a second job with the same purpose is not
    /// enqueued and [`Enqueued::job_id`] names the first. The key is the queue shard's
    /// ([`QueueKeys::dedupe`]), so one purpose must always be used with the same queue.
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
    layout: Layout,
    key: Option<EncryptionKey>,
    acks: Option<ReplicaAcks>,
}

impl Queues {
    /// Queues under `namespace` (production: `gatehouse`; tests use their own), without a
    /// sealing key: enough for queues that seal nothing, and for reading the key layout.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            layout: Layout::new(namespace),
            key: None,
            acks: None,
        }
    }

    /// Queues laid out as `layout` says (shard counts: gatehouse's `QUEUE_SHARDS_{QUEUE}`,
    /// which a producer must set the same as gatehouse's workers).
    pub fn with_layout(layout: Layout) -> Self {
        Self {
            layout,
            key: None,
            acks: None,
        }
    }

    /// An enqueue succeeds only once `acks.replicas` replicas confirmed it (Redis `WAIT`, sent
    /// in the same round trip, on the same connection, to the primary that took the job),
    /// otherwise [`EnqueueError::NotReplicated`]. WAIT blocks the connection it is sent on
    /// until the replicas answer (up to the timeout): give these enqueues their own
    /// connections, not the one everything else shares. No effect on [`Queues::enqueue_batch`].
    #[must_use]
    pub fn acknowledged_by(mut self, acks: ReplicaAcks) -> Self {
        self.acks = Some(acks).filter(|acks| acks.replicas > 0);
        self
    }

    /// The replica acknowledgement asked of each enqueue, if any.
    pub fn replica_acks(&self) -> Option<ReplicaAcks> {
        self.acks
    }

    /// The layout: the namespace and each queue's shards.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Seals customer data with `key` (gatehouse's current `ENCRYPTION_KEY`) before it is sent.
    #[must_use]
    pub fn sealing_with(mut self, key: EncryptionKey) -> Self {
        self.key = Some(key);
        self
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        self.layout.namespace()
    }

    /// The Redis key prefix (hash tag) of a queue's shard 0: `{namespace}:{queue:0}`.
    pub fn queue_key(&self, queue: &str) -> String {
        self.keys(queue).prefix
    }

    /// The keys of the shard a job of `tenant` goes to in `queue`.
    pub fn for_tenant_keys(&self, queue: &str, tenant: Uuid) -> QueueKeys {
        self.layout.for_tenant(queue, Some(&tenant))
    }

    /// Every Redis key of a queue's shard 0 (the layout is [`crate::keys`]); the only shard
    /// of an unsharded queue.
    pub fn keys(&self, queue: &str) -> QueueKeys {
        self.layout.shard(queue, 0)
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
        let tenant = job.tenant();
        let keys = self.layout.for_tenant(J::QUEUE, tenant.as_ref());
        self.push(conn, &keys, tenant.as_ref(), &job_id, &payload, options)
            .await
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

    /// Enqueue many jobs of one type, pipelined (up to `BATCH` script calls per round trip, one
    /// pipeline per shard); each
    /// job is still its own atomic script call, straight onto the active list. Returns the new
    /// jobs' ids in order. For backfills and bulk producers; use [`Queues::enqueue`] for
    /// dedupe keys and request ids.
    pub async fn enqueue_batch<C: ConnectionLike, J: Job>(
        &self,
        conn: &mut C,
        jobs: &[J],
    ) -> Result<Vec<String>, EnqueueError> {
        const BATCH: usize = 1000;
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
            // One pipeline per shard: a Redis Cluster client sends a pipeline to one slot.
            let mut pipes: std::collections::BTreeMap<u16, redis::Pipeline> =
                std::collections::BTreeMap::new();
            for job in chunk {
                let job_id = Uuid::now_v7().to_string();
                let payload = seal_job(job, &job_id, self.key.as_ref())?;
                let tenant = job.tenant();
                let keys = self.layout.for_tenant(J::QUEUE, tenant.as_ref());
                pipes
                    .entry(keys.shard)
                    .or_insert_with(redis::pipe)
                    .cmd("EVALSHA")
                    .arg(&hash)
                    .arg(4)
                    .arg(keys.data())
                    .arg(keys.active())
                    .arg(keys.signal())
                    .arg(keys.meta())
                    .arg(&job_id)
                    .arg(payload)
                    .arg(max_attempts)
                    .arg(1)
                    .arg("tenant")
                    .arg(tenant_field(tenant.as_ref()))
                    .ignore();
                ids.push(job_id);
            }
            for pipe in pipes.values() {
                let () = pipe.query_async(conn).await?;
            }
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
        let tenant = tenant_of(&payload);
        let keys = self.layout.for_tenant(queue, tenant.as_ref());
        let payload = self.at_rest(queue, &job_id, payload)?;
        self.push(conn, &keys, tenant.as_ref(), &job_id, &payload, options)
            .await
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
        // The tenant stays in the open in the at-rest form (it is not customer data).
        let tenant = serde_json::from_str::<serde_json::Value>(payload_json)
            .ok()
            .and_then(|payload| tenant_of(&payload));
        let keys = self.layout.for_tenant(queue, tenant.as_ref());
        self.push(conn, &keys, tenant.as_ref(), job_id, payload_json, options)
            .await
    }

    async fn push<C: ConnectionLike>(
        &self,
        conn: &mut C,
        keys: &QueueKeys,
        tenant: Option<&Uuid>,
        job_id: &str,
        payload_json: &str,
        options: Enqueue,
    ) -> Result<Enqueued, EnqueueError> {
        let queue = keys.queue.as_str();
        let mut names = vec![keys.data(), keys.active(), keys.signal(), keys.meta()];
        let ttl = match &options.dedupe {
            Some((purpose, ttl)) => {
                names.push(keys.dedupe(purpose));
                *ttl
            }
            None => 0,
        };
        // Borrowed: the payload is copied once, into the command.
        let (max_attempts, ttl) = (
            default_max_attempts(queue).to_string(),
            ttl.max(1).to_string(),
        );
        let tenant = tenant_field(tenant);
        let mut args: Vec<&str> =
            vec![job_id, payload_json, &max_attempts, &ttl, "tenant", &tenant];
        if let Some(request_id) = &options.request_id {
            args.extend(["request_id", request_id.as_str()]);
        }
        let (created, job_id): (i64, String) = match self.acks {
            None => {
                let mut invocation = ENQUEUE.prepare_invoke();
                for name in &names {
                    invocation.key(name);
                }
                for arg in &args {
                    invocation.arg(arg);
                }
                invocation.invoke_async(conn).await?
            }
            Some(acks) => {
                let (outcome, acked) = enqueue_and_wait(conn, &names, &args, acks).await?;
                if acked < acks.replicas {
                    return Err(EnqueueError::NotReplicated {
                        acked,
                        wanted: acks.replicas,
                    });
                }
                outcome
            }
        };
        Ok(Enqueued {
            job_id,
            created: created == 1,
        })
    }
}

/// The enqueue script and `WAIT` in one pipeline: one round trip, both on the connection (and,
/// on a Redis Cluster, the primary: the pipeline goes to its first key's slot) that wrote the
/// job. A server without the script loads it and the pipeline runs again (the script is
/// idempotent: a job id or dedupe purpose already there adds nothing).
async fn enqueue_and_wait<C: ConnectionLike>(
    conn: &mut C,
    names: &[String],
    args: &[&str],
    acks: ReplicaAcks,
) -> Result<((i64, String), u64), EnqueueError> {
    let mut pipe = redis::pipe();
    pipe.cmd("EVALSHA")
        .arg(ENQUEUE.get_hash())
        .arg(names.len())
        .arg(names)
        .arg(args)
        .cmd("WAIT")
        .arg(acks.replicas)
        .arg(acks.timeout.as_millis().max(1) as u64);
    match pipe.query_async(conn).await {
        Ok(answer) => Ok(answer),
        Err(error)
            if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            let _: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(include_str!("../lua/enqueue.lua"))
                .query_async(conn)
                .await?;
            Ok(pipe.query_async(conn).await?)
        }
        Err(error) => Err(error.into()),
    }
}

/// The `tenant` a job's metadata records: its tenant's id, or `-` for a job of no tenant.
/// Workers take the tenants with waiting jobs in turn (and cap each one's jobs in flight) by
/// it; a job from an older client without it gets its payload's `tenant_id`.
fn tenant_field(tenant: Option<&Uuid>) -> String {
    tenant.map_or_else(|| "-".to_owned(), ToString::to_string)
}

/// A payload's `tenant_id`, which picks its shard.
fn tenant_of(payload: &serde_json::Value) -> Option<Uuid> {
    payload
        .get("tenant_id")
        .and_then(serde_json::Value::as_str)
        .and_then(|id| id.parse().ok())
}
