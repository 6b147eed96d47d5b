//! The one definition of gatehouse's Redis key layout: every key of a queue, for the enqueue
//! client here and the consuming backend (`gatehouse::queue`), so the two cannot drift. The Lua
//! scripts (`jobs/lua/`, `src/queue/lua/`) take these keys as `KEYS[n]` and name them by the
//! methods below instead of re-listing the layout.
//!
//! Under `{namespace}:{queue}` (the prefix, compatible with apalis-redis 1.0's layout):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `:active` | list | ids ready to be fetched |
//! | `:signal` | list | a token that wakes waiting workers |
//! | `:data` | hash | job id → payload JSON |
//! | `:meta:{id}` | hash | one job's metadata (`attempts`, `max_attempts`, `status`, `last_error`, …) |
//! | `:scheduled` | zset | retries and deferrals by due time (ms) |
//! | `:done` | zset | finished ids by time (the vacuum's index) |
//! | `:dead` | zset | dead letters by time |
//! | `:workers` | zset | worker name → last heartbeat (ms) |
//! | `:inflight:{worker}` | set | the ids a worker fetched and has not acknowledged |
//!
//! Dedupe keys live beside the queues: `{namespace}:dedupe:{purpose}`.

/// The Redis key names of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    /// `{namespace}:{queue}`.
    pub prefix: String,
}

impl QueueKeys {
    /// The keys of `queue` under `namespace`.
    pub fn new(namespace: &str, queue: &str) -> Self {
        Self {
            prefix: format!("{namespace}:{queue}"),
        }
    }
    /// `:active`: ids ready to be fetched.
    pub fn active(&self) -> String {
        format!("{}:active", self.prefix)
    }
    /// `:signal`: wakes waiting workers.
    pub fn signal(&self) -> String {
        format!("{}:signal", self.prefix)
    }
    /// `:data`: job id → payload.
    pub fn data(&self) -> String {
        format!("{}:data", self.prefix)
    }
    /// `:meta`: the prefix of the per-job metadata hashes (`:meta:{id}`).
    pub fn meta(&self) -> String {
        format!("{}:meta", self.prefix)
    }
    /// `:meta:{id}`: one job's metadata.
    pub fn meta_of(&self, id: &str) -> String {
        format!("{}:meta:{id}", self.prefix)
    }
    /// `:scheduled`: retries and deferrals by due time.
    pub fn scheduled(&self) -> String {
        format!("{}:scheduled", self.prefix)
    }
    /// `:done`: finished ids by time.
    pub fn done(&self) -> String {
        format!("{}:done", self.prefix)
    }
    /// `:dead`: dead letters by time.
    pub fn dead(&self) -> String {
        format!("{}:dead", self.prefix)
    }
    /// `:workers`: worker name → last heartbeat.
    pub fn workers(&self) -> String {
        format!("{}:workers", self.prefix)
    }
    /// `:inflight`: the prefix of the per-worker inflight sets.
    pub fn inflight(&self) -> String {
        format!("{}:inflight", self.prefix)
    }
    /// `:inflight:{worker}`: what `worker` holds.
    pub fn inflight_of(&self, worker: &str) -> String {
        format!("{}:inflight:{worker}", self.prefix)
    }
}

/// A namespaced dedupe key: `{namespace}:dedupe:{purpose}`.
pub fn dedupe_key(namespace: &str, purpose: &str) -> String {
    format!("{namespace}:dedupe:{purpose}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_sits_under_the_queue_prefix() {
        let keys = QueueKeys::new("ns", "sync_catalog");
        assert_eq!(keys.active(), "ns:sync_catalog:active");
        assert_eq!(keys.data(), "ns:sync_catalog:data");
        assert_eq!(keys.meta_of("j1"), format!("{}:j1", keys.meta()));
        assert_eq!(keys.inflight_of("w"), format!("{}:w", keys.inflight()));
        assert_eq!(dedupe_key("ns", "p"), "ns:dedupe:p");
    }
}
