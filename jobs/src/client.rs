//! The enqueue client: puts a job on a gatehouse queue in Redis.
//!
//! Works over any `redis::aio::ConnectionLike` (the caller picks the runtime and the
//! connection type). Jobs go straight to the queue's active list in one Lua script; a
//! dedupe purpose, when given, fixes the job's id ([`dedupe_job_id`]), so a job is enqueued at
//! most once per purpose while the job, or its tombstone, lives.
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
    /// Both a job id and a dedupe purpose were given: the purpose fixes the id.
    #[error("a job id and a dedupe purpose were both given; the purpose fixes the job id")]
    IdAndDedupe,
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
    /// Job id to use; when `None`, the one [`dedupe_job_id`] derives from the dedupe purpose,
    /// or else a fresh UUIDv7. Not together with `dedupe` ([`EnqueueError::IdAndDedupe`]).
    pub job_id: Option<String>,
    /// A dedupe purpose (e.g. `inbound_message:{tenant}:{message_sid}`) and how long, in
    /// seconds, it is remembered: while it lives, a second job with the same purpose is not
    /// enqueued and [`Enqueued::job_id`] names the first. The purpose fixes the job's id
    /// ([`dedupe_job_id`]), so while the job is in Redis (waiting, running, dead or finished
    /// within `JOB_RETENTION_SECONDS`) it is its own claim; when it is removed before the
    /// purpose's time is up, a tombstone (its id in [`QueueKeys::gone`]) keeps the claim until
    /// then.
    /// One purpose must always be used with the same queue.
    pub dedupe: Option<(String, u64)>,
    /// Request id carried into the job's metadata for tracing.
    pub request_id: Option<String>,
}

impl Enqueue {
    /// The job id: asked for, derived from the dedupe purpose, or a fresh UUIDv7 — the AAD's,
    /// so fixed before anything is sealed.
    fn take_job_id(&mut self) -> Result<String, EnqueueError> {
        match (self.job_id.take(), &self.dedupe) {
            (Some(_), Some(_)) => Err(EnqueueError::IdAndDedupe),
            (Some(job_id), None) => Ok(job_id),
            (None, Some((purpose, _))) => Ok(dedupe_job_id(purpose)),
            (None, None) => Ok(Uuid::now_v7().to_string()),
        }
    }
}

/// The id of the job that claims a dedupe `purpose`: a UUIDv8 made of the first 122 bits of
/// SHA-256 over a fixed label and the purpose, the same in every process and release. Two
/// enqueues of one purpose name one job, so writing the job (`HSETNX` on the shard's `:data`)
/// is the claim: no key of its own per job while the job is in Redis.
pub fn dedupe_job_id(purpose: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::new()
        .chain_update(b"gatehouse dedupe job id\0")
        .chain_update(purpose.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// The result of an enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The job's id (the existing one when deduplicated).
    pub job_id: String,
    /// False when the job (or its tombstone) was already there and nothing was enqueued.
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
        let prepared = self.prepare(job, options)?;
        self.push(conn, prepared).await
    }

    /// A typed job made ready to send: its id fixed, its customer data sealed (the id is the
    /// AAD's), its shard and metadata chosen. [`Queues::enqueue_prepared`] sends it, alone or
    /// with others; sealing stays with the caller, so a producer that coalesces jobs seals each
    /// on its own thread.
    pub fn prepare<J: Job>(&self, job: &J, options: Enqueue) -> Result<Prepared, EnqueueError> {
        let mut options = options;
        let job_id = options.take_job_id()?;
        let payload = seal_job(job, &job_id, self.key.as_ref())?;
        let tenant = job.tenant();
        let keys = self.layout.for_tenant(J::QUEUE, tenant.as_ref());
        Ok(Prepared::new(
            keys,
            tenant.as_ref(),
            job_id,
            payload,
            options,
        ))
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

    /// Enqueue many jobs of one type (`GROUP` jobs a script call — about a millisecond of
    /// Redis's time each — one call per shard); each
    /// job is what [`Queues::enqueue`] would make of it, straight onto the active list, without
    /// a dedupe purpose. Returns the new jobs' ids in order. For backfills and bulk producers; use
    /// [`Queues::enqueue`] for dedupe purposes and request ids. No replica acknowledgement is
    /// waited for.
    pub async fn enqueue_batch<C: ConnectionLike, J: Job>(
        &self,
        conn: &mut C,
        jobs: &[J],
    ) -> Result<Vec<String>, EnqueueError> {
        const GROUP: usize = 100;
        let mut ids = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(GROUP) {
            let prepared = chunk
                .iter()
                .map(|job| self.prepare(job, Enqueue::default()))
                .collect::<Result<Vec<_>, _>>()?;
            ids.extend(prepared.iter().map(|p| p.job_id.clone()));
            send_groups(conn, &prepared, None).await?;
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
        let job_id = options.take_job_id()?;
        let tenant = tenant_of(&payload);
        let keys = self.layout.for_tenant(queue, tenant.as_ref());
        let payload = self.at_rest(queue, &job_id, payload)?;
        let prepared = Prepared::new(keys, tenant.as_ref(), job_id, payload, options);
        self.push(conn, prepared).await
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
        // The job id is given: a dedupe purpose would fix another.
        if options.dedupe.is_some() {
            return Err(EnqueueError::IdAndDedupe);
        }
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
        let prepared = Prepared::new(
            keys,
            tenant.as_ref(),
            job_id.to_owned(),
            payload_json.to_owned(),
            options,
        );
        self.push(conn, prepared).await
    }

    /// Sends prepared jobs: one script call (one round trip) for each shard among them, in
    /// the order their shards first appear; with [`Queues::acknowledged_by`], each call waits
    /// for the replicas (`WAIT` in the same round trip). Within a shard the call is atomic, and
    /// each job is what it would be alone: its dedupe claim made or found, its job id
    /// written once. Returns one outcome per job, in order. A failure names no job: none, some
    /// or all of the jobs may be in Redis, and sending the same prepared jobs again adds
    /// nothing that is there (their ids, which carry their dedupe claims, are fixed).
    pub async fn enqueue_prepared<C: ConnectionLike>(
        &self,
        conn: &mut C,
        jobs: &[Prepared],
    ) -> Result<Vec<Enqueued>, SendError> {
        send_groups(conn, jobs, self.acks).await
    }

    async fn push<C: ConnectionLike>(
        &self,
        conn: &mut C,
        prepared: Prepared,
    ) -> Result<Enqueued, EnqueueError> {
        let mut sent = send_group(conn, &[&prepared], self.acks).await?;
        sent.pop().ok_or(EnqueueError::Redis(short_answer()))
    }
}

/// A job ready to be sent ([`Queues::prepare`]): its id, its sealed payload, its shard's keys,
/// its metadata and dedupe TTL. Cloning copies the payload.
#[derive(Debug, Clone)]
pub struct Prepared {
    keys: QueueKeys,
    job_id: String,
    payload: String,
    /// How long its dedupe claim lasts, in seconds (its purpose fixed `job_id`); 0 when it has
    /// no purpose (the script's "none").
    dedupe_ttl: u64,
    /// Its metadata as JSON text without the closing brace ([`meta_prefix`]): the enqueue
    /// script closes it, adding `dedupe_until` from Redis's clock when there is a purpose.
    meta: String,
}

impl Prepared {
    fn new(
        keys: QueueKeys,
        tenant: Option<&Uuid>,
        job_id: String,
        payload: String,
        options: Enqueue,
    ) -> Self {
        let dedupe_ttl = options.dedupe.map_or(0, |(_, ttl)| ttl.max(1));
        let meta = meta_prefix(
            default_max_attempts(&keys.queue),
            tenant,
            options.request_id.as_deref(),
        );
        Self {
            keys,
            job_id,
            payload,
            dedupe_ttl,
            meta,
        }
    }

    /// The job's id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The queue and shard the job goes to: jobs of one shard travel in one script call.
    pub fn shard(&self) -> (&str, u16) {
        (&self.keys.queue, self.keys.shard)
    }
}

/// Why prepared jobs could not be sent ([`Queues::enqueue_prepared`]); cloned, it answers every
/// job of a group that failed together.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// Redis refused or could not be reached; retrying may help.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// As [`EnqueueError::NotReplicated`].
    #[error("the job reached {acked} of {wanted} Redis replicas in time")]
    NotReplicated {
        /// Replicas that confirmed.
        acked: u64,
        /// Replicas asked for.
        wanted: u64,
    },
}

impl From<SendError> for EnqueueError {
    fn from(error: SendError) -> Self {
        match error {
            SendError::Redis(error) => Self::Redis(error),
            SendError::NotReplicated { acked, wanted } => Self::NotReplicated { acked, wanted },
        }
    }
}

/// Redis answered the script with fewer outcomes than jobs sent, or one that is neither `1`
/// nor a job id (never, from this script).
fn short_answer() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "the enqueue script's answer does not match the jobs sent",
    ))
}

/// One script call per shard among `jobs` (in the order the shards first appear), the
/// outcomes put back in the jobs' order.
async fn send_groups<C: ConnectionLike>(
    conn: &mut C,
    jobs: &[Prepared],
    acks: Option<ReplicaAcks>,
) -> Result<Vec<Enqueued>, SendError> {
    let Some(first) = jobs.first() else {
        return Ok(Vec::new());
    };
    if jobs.iter().all(|job| job.shard() == first.shard()) {
        let group: Vec<&Prepared> = jobs.iter().collect();
        return send_group(conn, &group, acks).await;
    }
    // Each shard's jobs, and where each one's outcome goes.
    struct Group<'a> {
        shard: (&'a str, u16),
        jobs: Vec<&'a Prepared>,
        at: Vec<usize>,
    }
    let mut groups: Vec<Group<'_>> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        match groups.iter_mut().find(|group| group.shard == job.shard()) {
            Some(group) => {
                group.jobs.push(job);
                group.at.push(i);
            }
            None => groups.push(Group {
                shard: job.shard(),
                jobs: vec![job],
                at: vec![i],
            }),
        }
    }
    let mut outcomes: Vec<Option<Enqueued>> = vec![None; jobs.len()];
    for group in groups {
        let sent = send_group(conn, &group.jobs, acks).await?;
        for (i, outcome) in group.at.into_iter().zip(sent) {
            outcomes[i] = Some(outcome);
        }
    }
    outcomes
        .into_iter()
        .map(|outcome| outcome.ok_or_else(|| SendError::Redis(short_answer())))
        .collect()
}

/// One script call for `jobs`, all of one shard: one round trip, with `WAIT` in it when
/// replicas must confirm (on the same connection and, on a Redis Cluster, the primary that
/// took the jobs: the pipeline goes to its first key's slot). A server without the script
/// loads it and the call runs again (the script is idempotent: a job id already
/// there adds nothing).
async fn send_group<C: ConnectionLike>(
    conn: &mut C,
    jobs: &[&Prepared],
    acks: Option<ReplicaAcks>,
) -> Result<Vec<Enqueued>, SendError> {
    let Some(first) = jobs.first() else {
        return Ok(Vec::new());
    };
    let keys = &first.keys;
    // Sized once for the whole group (nine arguments, four a job; a group of 64 sealed jobs is
    // ~50 KB): no regrowth.
    let mut call = redis::Cmd::with_capacity(
        9 + 4 * jobs.len(),
        256 + jobs
            .iter()
            .map(|job| job.job_id.len() + job.payload.len() + job.meta.len() + 24)
            .sum::<usize>(),
    );
    call.arg("EVALSHA")
        .arg(ENQUEUE.get_hash())
        .arg(5)
        .arg(keys.data())
        .arg(keys.active())
        .arg(keys.signal())
        .arg(keys.meta())
        .arg(keys.gone());
    call.arg(jobs.len());
    for job in jobs {
        call.arg(&job.job_id)
            .arg(&job.payload)
            .arg(job.dedupe_ttl)
            .arg(&job.meta);
    }
    let outcomes: Vec<redis::Value> = match acks {
        None => match call.query_async(conn).await {
            Err(error) if is_noscript(&error) => {
                load_script(conn).await?;
                call.query_async(conn).await?
            }
            answer => answer?,
        },
        Some(acks) => {
            let mut pipe = redis::pipe();
            pipe.add_command(call)
                .cmd("WAIT")
                .arg(acks.replicas)
                .arg(acks.timeout.as_millis().max(1) as u64);
            let (outcomes, acked): (Vec<redis::Value>, u64) = match pipe.query_async(conn).await {
                Err(error) if is_noscript(&error) => {
                    load_script(conn).await?;
                    pipe.query_async(conn).await?
                }
                answer => answer?,
            };
            if acked < acks.replicas {
                return Err(SendError::NotReplicated {
                    acked,
                    wanted: acks.replicas,
                });
            }
            outcomes
        }
    };
    if outcomes.len() != jobs.len() {
        return Err(SendError::Redis(short_answer()));
    }
    // 1: enqueued; otherwise the id of the job that was there.
    jobs.iter()
        .zip(outcomes)
        .map(|(job, outcome)| match outcome {
            redis::Value::Int(1) => Ok(Enqueued {
                job_id: job.job_id.clone(),
                created: true,
            }),
            redis::Value::BulkString(id) => match String::from_utf8(id) {
                Ok(job_id) => Ok(Enqueued {
                    job_id,
                    created: false,
                }),
                Err(_) => Err(SendError::Redis(short_answer())),
            },
            _ => Err(SendError::Redis(short_answer())),
        })
        .collect()
}

fn is_noscript(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// `SCRIPT LOAD` of the enqueue script (idempotent; on a Redis Cluster, every primary).
async fn load_script<C: ConnectionLike>(conn: &mut C) -> Result<(), redis::RedisError> {
    let _: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(include_str!("../lua/enqueue.lua"))
        .query_async(conn)
        .await?;
    Ok(())
}

/// A new job's metadata as JSON text without its closing brace: what the enqueue script
/// stores, closed, with `dedupe_until` added when the job has a dedupe purpose. Every value is
/// a JSON string, as the queue's other scripts read and write them. Written here rather than
/// by the script (a table and `cjson.encode` per job cost Redis ~2 µs a job, BENCHMARKS.md
/// §16); the request id is escaped when it needs it (it may be a caller's).
///
/// `tenant` is the job's tenant id, or `-` for a job of no tenant: workers take the tenants
/// with waiting jobs in turn (and cap each one's jobs in flight) by it; a job from an older
/// client without it gets its payload's `tenant_id`.
fn meta_prefix(max_attempts: u32, tenant: Option<&Uuid>, request_id: Option<&str>) -> String {
    let mut text = Uuid::encode_buffer();
    let tenant = tenant.map_or("-", |tenant| tenant.hyphenated().encode_lower(&mut text));
    // Pieces pushed rather than `write!`: this runs for every job, on the request's thread.
    let mut digits = [0u8; 10];
    let mut meta = String::with_capacity(200);
    meta.push_str(r#"{"attempts":"0","max_attempts":""#);
    meta.push_str(crate::keys::decimal(max_attempts, &mut digits));
    meta.push_str(r#"","status":"Pending","idempotency_key":"","tenant":""#);
    meta.push_str(tenant);
    meta.push('"');
    if let Some(request_id) = request_id {
        meta.push_str(r#","request_id":"#);
        let plain = request_id
            .bytes()
            .all(|b| b >= 0x20 && b != b'"' && b != b'\\');
        if plain {
            meta.push('"');
            meta.push_str(request_id);
            meta.push('"');
        } else {
            meta.push_str(&serde_json::Value::from(request_id).to_string());
        }
    }
    meta
}

/// A payload's `tenant_id`, which picks its shard.
fn tenant_of(payload: &serde_json::Value) -> Option<Uuid> {
    payload
        .get("tenant_id")
        .and_then(serde_json::Value::as_str)
        .and_then(|id| id.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the enqueue script stores: the prefix closed, with or without `dedupe_until`.
    fn closed(prefix: &str, dedupe_until: Option<u64>) -> serde_json::Value {
        let text = match dedupe_until {
            Some(until) => format!(r#"{prefix},"dedupe_until":"{until}"}}"#),
            None => format!("{prefix}}}"),
        };
        serde_json::from_str(&text).expect("the metadata is a JSON object")
    }

    #[test]
    fn metadata_is_a_json_object_of_strings_once_the_script_closes_it() {
        let tenant = Uuid::from_u128(7);
        let meta = closed(&meta_prefix(25, Some(&tenant), Some("req-1")), Some(17));
        assert_eq!(
            meta,
            serde_json::json!({
                "attempts": "0", "max_attempts": "25", "status": "Pending",
                "idempotency_key": "", "tenant": tenant.to_string(), "request_id": "req-1",
                "dedupe_until": "17",
            })
        );
        let meta = closed(&meta_prefix(1, None, None), None);
        assert_eq!(meta["tenant"], "-");
        assert!(meta.get("request_id").is_none() && meta.get("dedupe_until").is_none());
        for (n, text) in [(0, "0"), (9, "9"), (10, "10"), (u32::MAX, "4294967295")] {
            assert_eq!(
                closed(&meta_prefix(n, None, None), None)["max_attempts"],
                text
            );
        }
    }

    #[test]
    fn a_request_id_that_needs_escaping_stays_one_string() {
        for hostile in [
            r#"a","status":"Done"#,
            "back\\slash",
            "line\nbreak",
            "\u{1}",
            "é",
        ] {
            let meta = closed(&meta_prefix(3, None, Some(hostile)), None);
            assert_eq!(meta["request_id"], hostile);
            assert_eq!(meta["status"], "Pending");
        }
    }
}
