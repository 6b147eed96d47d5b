//! The queue layer: gatehouse's Redis queue, in Redis and Lua only (never apalis or axum),
//! shared by both edges.
//!
//! - [`keys`]: the key layout (one definition, in `gatehouse_jobs::keys`, shared with the
//!   enqueue client); [`table`]: each queue's facts (name, schema, default retry policy and its
//!   variables, what it does), also from the contract crate.
//! - [`scripts`]: every Lua script (`src/queue/lua/`), loaded once.
//! - [`consume`]: fetch, ack, release, heartbeat (with orphan rescue), register, deregister and
//!   vacuum, as plain async functions; [`retry`]: the backoff schedule.
//! - The operator API the edges and the CLI call: [`dead`] (dead letters), [`stats`] (counts),
//!   [`limits`] (per-tenant caps on jobs in flight, kept in PostgreSQL and copied to Redis).
//! - [`legacy`]: moves what a release before the cluster-safe key layout left in Redis.
//! - [`outbox`]: jobs committed with a database write, relayed to Redis; [`payloads`]: payloads
//!   checked against the committed schemas before they are enqueued; [`at_rest`]: the sealed
//!   payloads Redis holds, counted per key (`keys status`) and re-sealed by a key rotation.
//!
//! Delivery is at-least-once: a job is acknowledged after its handler returns, so a crash
//! between its effects and the acknowledgement runs it again (handlers are idempotent). A job
//! is retried on its queue's backoff until its attempt budget is spent, then dead-lettered;
//! an attempt that failed for an outage is deferred without counting (ARCHITECTURE.md, "The
//! queue").

pub mod at_rest;
pub mod coalesce;
pub mod consume;
pub mod dead;
pub mod keys;
pub mod legacy;
pub mod limits;
pub mod outbox;
pub mod payloads;
pub mod retry;
pub mod scripts;
pub mod stats;
pub mod table;
