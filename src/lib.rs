//! gatehouse: the secure job backbone of a multi-tenant messaging and commerce platform.
//!
//! The modules by floor, top to bottom (ARCHITECTURE.md's Layers table is the rule, and
//! `tests/architecture.rs` enforces it: a module imports only from its own floor, without
//! cycles, or from below; the two edges never import each other):
//! - **top**: `cli` — the command line, process wiring and telemetry (`main.rs` calls it).
//! - **edges**: `http` — the axum ingress and the dashboard; `worker` — the apalis edge: the
//!   backend adapter, one handler per queue, maintenance and supervision.
//! - **core**: `accounts` (users, service accounts, passwords), `access` (roles, scopes, the
//!   scope cache, memberships), `catalog` (store client, product validation, staged apply),
//!   `circuit` (circuit breakers), `classify` (intents, the rule classifier), `conversations`
//!   (storing an inbound message once), `dashboard` (the dashboard's queries), `invitations`
//!   (owner invitations), `llm` (the LLM classifier and its answer pipeline), `metrics` (the
//!   recorder and the `/metrics` text both edges serve), `principals` (incident tools for users
//!   and service accounts), `queue` (the queue layer: key layout, Lua, consume operations,
//!   retries, dead letters, statistics, the outbox, payload validation, the per-queue table),
//!   `ratelimit` (GCRA limits in Redis), `reindex` (`keys reindex`), `retention` (bounded
//!   deletion of expired rows), `rotation` (four-eyes key rotation and re-encryption),
//!   `tenant_secrets` (`tenants rotate-secret` and its notices), `tenants` (tenants and their
//!   sealed secrets).
//! - **services**: `config` (the typed configuration), `events` (the security log), `server`
//!   (the HTTP/1.1 server loop both processes run).
//! - **primitives**: `security` (envelope encryption, blind indexes, Twilio signatures,
//!   passwords, JWTs, address rules), `fault` (where a failure belongs; dependency
//!   reachability), `db` (the pool and migrations), `redis_conn` (Redis connections).

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
