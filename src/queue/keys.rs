//! The queue's Redis key layout: the one definition lives in the contract crate
//! (`gatehouse_jobs::keys`, shared with the enqueue client so the two cannot drift); this
//! module re-exports it for the queue layer and its users.

pub use gatehouse_jobs::keys::{
    JobMeta, Layout, LegacyKeys, MAX_SHARDS, QueueKeys, hash_slot, shard_of,
};
