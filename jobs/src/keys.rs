//! The one definition of gatehouse's Redis key layout: every key of a queue shard, for the
//! enqueue client here and the consuming backend (`gatehouse::queue`), so the two cannot drift.
//! The Lua scripts (`jobs/lua/`, `src/queue/lua/`) take these keys as `KEYS[n]` and name them by
//! the methods below; no script builds a key name.
//!
//! Every key of one shard carries one Redis Cluster hash tag, `{queue:shard}`, so a shard lives
//! in one hash slot (a script may touch all of its keys on a cluster) while the shards of a
//! queue spread over the cluster's nodes. The namespace stays the keys' first characters, so
//! `SCAN MATCH {namespace}:*` and an ACL key pattern `~{namespace}:*` still cover every key.
//! Under the prefix `{namespace}:{queue:shard}`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `:active` | list | arrivals, in order: ids not yet in the fair order (workers admit them) |
//! | `:ready` | zset | ids in the fair order, by virtual start time |
//! | `:parked` | zset | jobs of tenants at their cap, as `tenant\|start\|id` (score 0: by tenant, then start) |
//! | `:clock` | string | the virtual start time of the job taken last |
//! | `:vtime` | hash | tenant → the virtual start time of its last arrival |
//! | `:backlog` | hash | tenant → its jobs in `:ready` or `:parked` |
//! | `:running` | hash | tenant → its jobs in flight |
//! | `:capped` | hash | tenant → its jobs in `:parked` |
//! | `:caps` | hash | tenant → its max in flight, overriding the queue's default (`0`: none) |
//! | `:signal` | list | a token that wakes waiting workers |
//! | `:data` | hash | job id → payload JSON |
//! | `:meta` | hash | job id → its metadata, a JSON object of strings (`attempts`, `max_attempts`, `status`, `last_error`, …) |
//! | `:scheduled` | zset | retries and deferrals by due time (ms) |
//! | `:done` | zset | finished ids by time (the vacuum's index) |
//! | `:dead` | zset | dead letters by time |
//! | `:workers` | zset | worker name → last heartbeat (ms) |
//! | `:inflight` | hash | job id → the worker that fetched it and has not acknowledged it |
//! | `:gone` | zset | tombstones: ids of jobs removed (vacuum, purge) while their dedupe claim had time left, scored by when it ends (ms) |
//! | `:dedupe:{purpose}` | string | an older release's dedupe claim (the job id); neither written nor read now |
//!
//! Before issue 18 the layout was `{namespace}:{queue}:…` with a hash per job's metadata and a
//! set per worker; [`LegacyKeys`] names it, so a newer worker can move what an older release
//! left behind (`gatehouse::queue::legacy`).

/// The Redis key names of one shard of a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    /// `{namespace}:{queue:shard}`: what every key of the shard starts with (its hash tag).
    pub prefix: String,
    /// The queue's name.
    pub queue: String,
    /// The shard's number (0 for an unsharded queue).
    pub shard: u16,
}

impl QueueKeys {
    /// The keys of shard 0 of `queue` under `namespace`: the only shard of an unsharded queue.
    pub fn new(namespace: &str, queue: &str) -> Self {
        Self::shard(namespace, queue, 0)
    }
    /// The keys of shard `shard` of `queue` under `namespace`.
    pub fn shard(namespace: &str, queue: &str, shard: u16) -> Self {
        // Concatenated rather than `format!`ed, the shard's digits on the stack: every
        // enqueue builds one.
        let mut digits = [0u8; 10];
        let shard_text = decimal(u32::from(shard), &mut digits);
        Self {
            prefix: [namespace, ":{", queue, ":", shard_text, "}"].concat(),
            queue: queue.to_owned(),
            shard,
        }
    }
    /// `{prefix}{suffix}`, allocated once at its size (enqueues name five keys a job).
    fn key(&self, suffix: &str) -> String {
        [self.prefix.as_str(), suffix].concat()
    }
    /// `:active`: arrivals, in order, not yet admitted into the fair order (`:ready`).
    pub fn active(&self) -> String {
        self.key(":active")
    }
    /// `:ready`: ids in the fair order, by virtual start time.
    pub fn ready(&self) -> String {
        self.key(":ready")
    }
    /// `:parked`: ids of tenants at their cap (`tenant|start|id`).
    pub fn parked(&self) -> String {
        self.key(":parked")
    }
    /// `:clock`: the virtual start time of the job taken last.
    pub fn clock(&self) -> String {
        self.key(":clock")
    }
    /// `:vtime`: tenant → the virtual start time of its last arrival.
    pub fn vtime(&self) -> String {
        self.key(":vtime")
    }
    /// `:backlog`: tenant → its jobs waiting in `:ready` or `:parked`.
    pub fn backlog(&self) -> String {
        self.key(":backlog")
    }
    /// `:running`: tenant → its jobs in flight.
    pub fn running(&self) -> String {
        self.key(":running")
    }
    /// `:capped`: tenant → its parked jobs.
    pub fn capped(&self) -> String {
        self.key(":capped")
    }
    /// `:caps`: tenant → its max in flight, overriding the queue's default (`0`: none).
    pub fn caps(&self) -> String {
        self.key(":caps")
    }
    /// `:signal`: wakes waiting workers.
    pub fn signal(&self) -> String {
        self.key(":signal")
    }
    /// `:data`: job id → payload.
    pub fn data(&self) -> String {
        self.key(":data")
    }
    /// `:meta`: job id → its metadata (a JSON object of strings).
    pub fn meta(&self) -> String {
        self.key(":meta")
    }
    /// `:scheduled`: retries and deferrals by due time.
    pub fn scheduled(&self) -> String {
        self.key(":scheduled")
    }
    /// `:done`: finished ids by time.
    pub fn done(&self) -> String {
        self.key(":done")
    }
    /// `:dead`: dead letters by time.
    pub fn dead(&self) -> String {
        self.key(":dead")
    }
    /// `:workers`: worker name → last heartbeat.
    pub fn workers(&self) -> String {
        self.key(":workers")
    }
    /// `:inflight`: job id → the worker holding it.
    pub fn inflight(&self) -> String {
        self.key(":inflight")
    }
    /// `:gone`: the tombstones of jobs removed while their dedupe claim had time left (id →
    /// when the claim ends, ms): the enqueue script reads it atomically with writing a job
    /// whose dedupe purpose fixed its id; the vacuum and a purge add to it and drop what ended.
    pub fn gone(&self) -> String {
        self.key(":gone")
    }
    /// `:dedupe:{purpose}`: where releases before the job id carried the claim held it (in the
    /// shard's slot). Neither written nor read now; kept to name what an older release left.
    pub fn dedupe(&self, purpose: &str) -> String {
        [self.prefix.as_str(), ":dedupe:", purpose].concat()
    }
}

/// Most shards a queue may have (`QUEUE_SHARDS_{QUEUE}` is 1 to this).
pub const MAX_SHARDS: u16 = 64;

/// `n` in decimal, written into `buffer` (a `u32` has at most ten digits): for the key names
/// and metadata every enqueue writes, without a `String` for a number.
pub(crate) fn decimal(mut n: u32, buffer: &mut [u8; 10]) -> &str {
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits only.
    std::str::from_utf8(&buffer[at..]).unwrap_or("0")
}

/// The shard of a job of `tenant` in a queue of `shards` shards: FNV-1a (64-bit) over the
/// tenant UUID's 16 bytes, modulo `shards`. Stable across releases, processes and hosts, so
/// every producer puts one tenant's jobs on the same shard. No tenant: shard 0.
pub fn shard_of(tenant: Option<&uuid::Uuid>, shards: u16) -> u16 {
    let Some(tenant) = tenant else {
        return 0;
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in tenant.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(shards.max(1))) as u16
}

/// Where every queue's shards are: the namespace and each queue's shard count (1 unless
/// `QUEUE_SHARDS_{QUEUE}` says more). Producers and workers build it from the same
/// configuration, so they agree on which shard a job is on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    namespace: String,
    shards: std::collections::BTreeMap<String, u16>,
}

impl Layout {
    /// Every queue of `namespace` with one shard.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            shards: std::collections::BTreeMap::new(),
        }
    }
    /// `queue` split into `shards` shards (clamped to 1..=[`MAX_SHARDS`]).
    #[must_use]
    pub fn with_shards(mut self, queue: &str, shards: u16) -> Self {
        self.shards
            .insert(queue.to_owned(), shards.clamp(1, MAX_SHARDS));
        self
    }
    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// How many shards `queue` has.
    pub fn shards(&self, queue: &str) -> u16 {
        self.shards.get(queue).copied().unwrap_or(1)
    }
    /// The keys of shard `shard` of `queue`.
    pub fn shard(&self, queue: &str, shard: u16) -> QueueKeys {
        QueueKeys::shard(&self.namespace, queue, shard)
    }
    /// The keys of every shard of `queue`, shard 0 first.
    pub fn all(&self, queue: &str) -> Vec<QueueKeys> {
        (0..self.shards(queue))
            .map(|shard| self.shard(queue, shard))
            .collect()
    }
    /// The keys of the shard a job of `tenant` goes to.
    pub fn for_tenant(&self, queue: &str, tenant: Option<&uuid::Uuid>) -> QueueKeys {
        self.shard(queue, shard_of(tenant, self.shards(queue)))
    }
}

/// One job's metadata as `:meta` holds it: a JSON object of strings (`attempts`,
/// `max_attempts`, `status`, `last_error`, `retry_at`, `done_at`, `dead_at`, `waiting_since`,
/// `request_id`, …). Read leniently: a missing or unreadable value is an empty map, a
/// non-string value its JSON text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobMeta(pub std::collections::BTreeMap<String, String>);

impl JobMeta {
    /// Reads a `:meta` value (`None`: the job has none).
    pub fn parse(raw: Option<&str>) -> Self {
        let Some(Ok(serde_json::Value::Object(fields))) = raw.map(serde_json::from_str) else {
            return Self::default();
        };
        Self(
            fields
                .into_iter()
                .map(|(field, value)| {
                    let text = match value {
                        serde_json::Value::String(text) => text,
                        other => other.to_string(),
                    };
                    (field, text)
                })
                .collect(),
        )
    }
    /// One field.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.0.get(field).map(String::as_str)
    }
}

/// The layout of releases before issue 18: `{namespace}:{queue}:…`, no hash tag, a hash per
/// job's metadata (`:meta:{id}`) and a set per worker (`:inflight:{worker}`). Only ever on a
/// single Redis; read only to move what it holds into shard 0 of the current layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyKeys {
    /// `{namespace}:{queue}`.
    pub prefix: String,
}

impl LegacyKeys {
    /// The old keys of `queue` under `namespace`.
    pub fn new(namespace: &str, queue: &str) -> Self {
        Self {
            prefix: format!("{namespace}:{queue}"),
        }
    }
    /// A key of the old layout: `{prefix}:{suffix}` (`active`, `data`, `scheduled`, `dead`,
    /// `done`, `workers`).
    pub fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.prefix)
    }
    /// One job's old metadata hash.
    pub fn meta_of(&self, id: &str) -> String {
        format!("{}:meta:{id}", self.prefix)
    }
    /// One worker's old inflight set.
    pub fn inflight_of(&self, worker: &str) -> String {
        format!("{}:inflight:{worker}", self.prefix)
    }
}

/// The Redis Cluster hash slot of a key (CRC16/XMODEM of its hash tag, or of the whole key
/// when it has none, modulo 16384), as the cluster computes it.
pub fn hash_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(bytes)) % 16384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_as_to_string_writes_them() {
        for n in [
            0u32,
            1,
            9,
            10,
            63,
            64,
            99,
            100,
            12_345,
            65_535,
            4_000_000_000,
            u32::MAX,
        ] {
            let mut digits = [0u8; 10];
            assert_eq!(decimal(n, &mut digits), n.to_string());
        }
        assert_eq!(QueueKeys::shard("ns", "q", 63).prefix, "ns:{q:63}");
    }

    #[test]
    fn every_key_of_a_shard_sits_in_one_slot_and_shards_differ() {
        let keys = QueueKeys::new("ns", "sync_catalog");
        assert_eq!(keys.active(), "ns:{sync_catalog:0}:active");
        let all = [
            keys.active(),
            keys.signal(),
            keys.data(),
            keys.meta(),
            keys.scheduled(),
            keys.done(),
            keys.dead(),
            keys.workers(),
            keys.inflight(),
            keys.dedupe("p:1"),
            keys.gone(),
        ];
        for key in &all {
            assert!(key.starts_with(&keys.prefix), "{key}");
            assert_eq!(hash_slot(key), hash_slot(&keys.prefix), "{key}");
        }
        let slots: std::collections::HashSet<u16> = (0..8)
            .map(|s| hash_slot(&QueueKeys::shard("ns", "sync_catalog", s).active()))
            .collect();
        assert!(slots.len() > 1, "shards spread over slots");
    }

    #[test]
    fn a_shard_prefix_names_namespace_queue_and_shard() {
        for shard in [0, 7, 10, 63, 99, 100, 12_345, u16::MAX] {
            assert_eq!(
                QueueKeys::shard("ns", "q", shard).prefix,
                format!("ns:{{q:{shard}}}")
            );
        }
    }

    #[test]
    fn hash_slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(hash_slot("foo"), 12182);
        assert_eq!(hash_slot("{user1000}.following"), hash_slot("user1000"));
        assert_eq!(hash_slot("123456789"), 12739);
        // An empty tag is no tag: the whole key is hashed.
        assert_eq!(hash_slot("{}foo"), crc16(b"{}foo") % 16384);
    }

    #[test]
    fn a_tenant_always_lands_on_the_same_shard_and_tenants_spread() {
        let layout = Layout::new("ns").with_shards("q", 4);
        let tenant = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let first = layout.for_tenant("q", Some(&tenant));
        assert_eq!(layout.for_tenant("q", Some(&tenant)), first);
        // Pinned: producers in other processes and releases compute the same.
        assert_eq!(shard_of(Some(&tenant), 4), first.shard);
        assert_eq!(shard_of(Some(&tenant), 1), 0);
        assert_eq!(layout.for_tenant("q", None).shard, 0);
        assert_eq!(layout.for_tenant("other", Some(&tenant)).shard, 0);
        let mut counts = [0u32; 4];
        for i in 0..4000u128 {
            counts[shard_of(Some(&uuid::Uuid::from_u128(i * 7919 + 13)), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert_eq!(layout.all("q").len(), 4);
        assert_eq!(Layout::new("ns").with_shards("q", 0).shards("q"), 1);
        assert_eq!(
            Layout::new("ns").with_shards("q", 999).shards("q"),
            MAX_SHARDS
        );
    }

    #[test]
    fn metadata_reads_leniently() {
        let meta = JobMeta::parse(Some(r#"{"attempts":"2","status":"Killed","n":3}"#));
        assert_eq!(meta.get("attempts"), Some("2"));
        assert_eq!(meta.get("n"), Some("3"));
        assert_eq!(JobMeta::parse(Some("not json")), JobMeta::default());
        assert_eq!(JobMeta::parse(None).get("status"), None);
    }

    #[test]
    fn the_legacy_layout_is_the_pre_cluster_one() {
        let old = LegacyKeys::new("ns", "q");
        assert_eq!(old.key("active"), "ns:q:active");
        assert_eq!(old.meta_of("j"), "ns:q:meta:j");
        assert_eq!(old.inflight_of("w"), "ns:q:inflight:w");
    }
}
