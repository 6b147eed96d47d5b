//! gatehouse: the secure job backbone of a multi-tenant messaging and commerce platform.
//!
//! Floors, top to bottom: `cli` (and `main.rs`); the edges `http` (axum) and `worker`
//! (apalis); the core (`accounts`, `access`, `ratelimit`, `tenants`, `conversations`,
//! `classify`, `llm`, `queue` — the queue layer: keys, Lua, consume, retries, dead letters,
//! stats, the outbox and payload validation —, `metrics` — the recorder and the `/metrics` text
//! both edges serve —, `rotation`, `retention`, `invitations`, `reindex`); the bottom
//! (`security`, `config`, `events`, `db`, `redis_conn` — Redis connections —, and `server`,
//! the HTTP/1.1 server loop both edges run). No module imports a floor above its own.

pub mod access;
pub mod accounts;
pub mod catalog;
pub mod circuit;
pub mod classify;
pub mod cli;
pub mod config;
pub mod conversations;
pub mod dashboard;
pub mod db;
pub mod events;
pub mod fault;
pub mod http;
pub mod invitations;
pub mod llm;
pub mod metrics;
pub mod principals;
pub mod queue;
pub mod ratelimit;
pub mod redis_conn;
pub mod reindex;
pub mod retention;
pub mod rotation;
pub mod security;
pub mod server;
pub mod tenant_secrets;
pub mod tenants;
pub mod worker;
