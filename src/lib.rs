//! gatehouse: the secure job backbone of a multi-tenant messaging and commerce platform.
//!
//! Floors, top to bottom: `cli` (and `main.rs`); the edges `http` (axum) and `worker`
//! (apalis); the core (`accounts`, `access`, `ratelimit`, `tenants`, `tenant_secrets`, `conversations`,
//! `classify`, `llm`, `queue`, `rotation`, `outbox`, `retention`, `invitations`, `reindex`); the bottom
//! (`security`, `config`, `events`, `db`, and `server`, the HTTP/1.1 server loop both edges
//! run). No module imports a floor above its own.

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
pub mod monitoring;
pub mod outbox;
pub mod payloads;
pub mod principals;
pub mod queue;
pub mod ratelimit;
pub mod reindex;
pub mod retention;
pub mod rotation;
pub mod security;
pub mod server;
pub mod tenant_secrets;
pub mod tenants;
pub mod worker;
