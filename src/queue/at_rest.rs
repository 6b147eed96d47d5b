//! The sealed payloads Redis holds (SPEC "Customer data in Redis"): counted per queue, job
//! state and key ([`census`], what `gatehouse keys status` prints), and re-sealed under the
//! current key by a key rotation ([`reseal_pass`]).
//!
//! Every payload of a queue lives in its `:data` hash whatever the job's state, so both walk
//! that hash with `HSCAN` (bounded work per round trip; a payload present for the whole walk is
//! seen at least once). The census reads each envelope's key id without opening anything. The
//! rotation opens a payload only to seal it again, and writes it back with a compare-and-set
//! (`lua/reseal.lua`): replaced only if it is still what was read and no worker holds the job,
//! so a job a worker took meanwhile — or one retried, purged or vacuumed — is left alone and
//! the next pass sees it. Nothing here logs or returns a value.

use std::collections::{BTreeMap, HashSet};

use gatehouse_jobs::envelope::{KeyId, Keyring};
use gatehouse_jobs::sealed::{AtRest, Resealed, at_rest, reseal};
use gatehouse_jobs::spec::QUEUE_SPECS;
use redis::aio::ConnectionLike;

use super::keys::{JobMeta, Layout, QueueKeys};
use super::scripts::RESEAL;

/// Payloads read per `HSCAN` round trip.
const SCAN_COUNT: usize = 500;

/// Where a job with a payload in Redis stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Waiting to run: arrived, in the fair order, or parked at its tenant's cap.
    Queued,
    /// Waiting for its retry or deferral (the scheduled set).
    Scheduled,
    /// Held by a worker.
    InFlight,
    /// A dead letter.
    Dead,
    /// Finished, kept for `JOB_RETENTION_SECONDS`.
    Retained,
    /// A payload without metadata (a job being enqueued or removed at that very moment).
    Unlisted,
}

impl JobState {
    /// Every state, in the order `keys status` prints them.
    pub const ALL: [JobState; 6] = [
        Self::Queued,
        Self::Scheduled,
        Self::InFlight,
        Self::Dead,
        Self::Retained,
        Self::Unlisted,
    ];

    /// The state's name in `keys status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Scheduled => "scheduled",
            Self::InFlight => "in_flight",
            Self::Dead => "dead",
            Self::Retained => "retained",
            Self::Unlisted => "unlisted",
        }
    }
}

/// How many payloads of one queue, in one state, are held as one [`AtRest`] (a key id, or
/// plaintext, or malformed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadCount {
    pub queue: &'static str,
    pub state: JobState,
    pub at_rest: AtRest,
    pub count: u64,
}

impl PayloadCount {
    /// Whether a key rotation to `current` has these payloads to re-seal (or to record as
    /// unreadable): sealed under another key, plaintext, or malformed.
    pub fn needs_reseal(&self, current: KeyId) -> bool {
        match self.at_rest {
            AtRest::Unsealed => false,
            AtRest::Sealed(id) => id != current,
            AtRest::Plaintext | AtRest::Malformed => true,
        }
    }
}

/// The queues whose payloads carry sealed fields.
fn sealing_queues() -> impl Iterator<Item = &'static str> {
    QUEUE_SPECS
        .iter()
        .filter(|spec| !spec.sealed.is_empty())
        .map(|spec| spec.name)
}

/// One `HSCAN` step of a hash: the next cursor and the (field, value) pairs.
async fn hscan<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    cursor: u64,
) -> Result<(u64, Vec<(String, String)>), redis::RedisError> {
    let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
        .arg(key)
        .arg(cursor)
        .arg("COUNT")
        .arg(SCAN_COUNT)
        .query_async(conn)
        .await?;
    let mut pairs = Vec::with_capacity(flat.len() / 2);
    let mut items = flat.into_iter();
    while let (Some(field), Some(value)) = (items.next(), items.next()) {
        pairs.push((field, value));
    }
    Ok((next, pairs))
}

/// The ids a registered worker of the queue shard holds right now.
async fn held<C: ConnectionLike>(
    conn: &mut C,
    keys: &QueueKeys,
) -> Result<HashSet<String>, redis::RedisError> {
    let workers: HashSet<String> = redis::cmd("ZRANGE")
        .arg(keys.workers())
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await?;
    let inflight: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(keys.inflight())
        .query_async(conn)
        .await?;
    Ok(inflight
        .into_iter()
        .filter(|(_, worker)| workers.contains(worker))
        .map(|(id, _)| id)
        .collect())
}

/// Per sealing queue, job state and key id, how many payloads Redis holds in all of the
/// queue's shards (only non-zero counts are listed). A snapshot walked in steps, not one
/// atomic read: jobs moving meanwhile may be counted in either state.
pub async fn census<C: ConnectionLike>(
    conn: &mut C,
    layout: &Layout,
) -> Result<Vec<PayloadCount>, redis::RedisError> {
    let mut out = Vec::new();
    for queue in sealing_queues() {
        let mut counts: BTreeMap<(JobState, AtRest), u64> = BTreeMap::new();
        for keys in layout.all(queue) {
            count_shard(conn, &keys, queue, &mut counts).await?;
        }
        out.extend(
            counts
                .into_iter()
                .map(|((state, at_rest), count)| PayloadCount {
                    queue,
                    state,
                    at_rest,
                    count,
                }),
        );
    }
    Ok(out)
}

/// Adds one queue shard's payloads to `counts`.
async fn count_shard<C: ConnectionLike>(
    conn: &mut C,
    keys: &QueueKeys,
    queue: &'static str,
    counts: &mut BTreeMap<(JobState, AtRest), u64>,
) -> Result<(), redis::RedisError> {
    let held = held(conn, keys).await?;
    let mut cursor = 0;
    loop {
        let (next, pairs) = hscan(conn, &keys.data(), cursor).await?;
        if !pairs.is_empty() {
            let mut pipe = redis::pipe();
            for (id, _) in &pairs {
                pipe.hget(keys.meta(), id).zscore(keys.scheduled(), id);
            }
            let flat: Vec<redis::Value> = pipe.query_async(conn).await?;
            for ((id, payload), pair) in pairs.iter().zip(flat.chunks(2)) {
                let meta: Option<String> = pair
                    .first()
                    .and_then(|v| redis::from_redis_value_ref(v).ok());
                let scheduled: Option<f64> = pair
                    .get(1)
                    .and_then(|v| redis::from_redis_value_ref(v).ok());
                let status = meta.map(|meta| {
                    JobMeta::parse(Some(&meta))
                        .get("status")
                        .unwrap_or("")
                        .to_owned()
                });
                let state = if held.contains(id) {
                    JobState::InFlight
                } else {
                    match status.as_deref() {
                        Some("Done") => JobState::Retained,
                        Some("Killed") => JobState::Dead,
                        Some(_) if scheduled.is_some() => JobState::Scheduled,
                        Some(_) => JobState::Queued,
                        None => JobState::Unlisted,
                    }
                };
                *counts.entry((state, at_rest(queue, payload))).or_default() += 1;
            }
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// A payload a rotation could not re-seal: no configured key opens it. Names the job and the
/// check that failed, never the content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub queue: &'static str,
    pub job_id: String,
    /// `OpenError::reason`.
    pub reason: &'static str,
    pub error: String,
}

/// What one [`reseal_pass`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResealPass {
    /// Payloads now under the current key (plaintext ones sealed).
    pub resealed: u64,
    /// Payloads still to re-seal that the compare-and-set left alone (held by a worker, or
    /// changed while the pass read them): the next pass tries again.
    pub left: u64,
    /// Payloads no configured key opens (and not in `skip`).
    pub unreadable: Vec<Unreadable>,
}

/// Walks every sealing queue once and re-seals, under the keyring's current key, each payload
/// that is not already under it (`batch` per compare-and-set call), skipping the jobs `skip`
/// names (unreadable payloads already recorded).
pub async fn reseal_pass<C: ConnectionLike>(
    conn: &mut C,
    layout: &Layout,
    keyring: &Keyring,
    batch: usize,
    skip: &(dyn Fn(&str, &str) -> bool + Sync),
) -> Result<ResealPass, redis::RedisError> {
    let mut pass = ResealPass::default();
    let shards =
        sealing_queues().flat_map(|queue| layout.all(queue).into_iter().map(move |k| (queue, k)));
    for (queue, keys) in shards {
        let mut pending: Vec<(String, String, String)> = Vec::new();
        let mut cursor = 0;
        loop {
            let (next, pairs) = hscan(conn, &keys.data(), cursor).await?;
            for (id, payload) in pairs {
                if skip(queue, &id) {
                    continue;
                }
                match reseal(queue, &id, &payload, keyring) {
                    Ok(Resealed::Current) => {}
                    Ok(Resealed::New(sealed)) => pending.push((id, payload, sealed)),
                    Err(error) => pass.unreadable.push(Unreadable {
                        queue,
                        reason: error.reason(),
                        error: error.to_string(),
                        job_id: id,
                    }),
                }
                if pending.len() >= batch.max(1) {
                    compare_and_set(conn, &keys, &mut pending, &mut pass).await?;
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        compare_and_set(conn, &keys, &mut pending, &mut pass).await?;
    }
    Ok(pass)
}

async fn compare_and_set<C: ConnectionLike>(
    conn: &mut C,
    keys: &QueueKeys,
    pending: &mut Vec<(String, String, String)>,
    pass: &mut ResealPass,
) -> Result<(), redis::RedisError> {
    if pending.is_empty() {
        return Ok(());
    }
    let mut call = RESEAL.prepare_invoke();
    call.key(keys.data())
        .key(keys.workers())
        .key(keys.inflight());
    for (id, read, sealed) in pending.drain(..) {
        call.arg(id).arg(read).arg(sealed);
    }
    let (replaced, left): (u64, u64) = call.invoke_async(conn).await?;
    pass.resealed += replaced;
    pass.left += left;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_print_in_a_stable_order_with_distinct_names() {
        let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "queued",
                "scheduled",
                "in_flight",
                "dead",
                "retained",
                "unlisted"
            ]
        );
    }

    #[test]
    fn only_inbound_message_seals_today() {
        assert_eq!(sealing_queues().collect::<Vec<_>>(), ["inbound_message"]);
    }
}
