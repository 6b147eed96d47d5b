//! gatehouse's integration tests, as one binary (it links gatehouse once): one module per area,
//! each against real PostgreSQL and Redis through `gatehouse-testenv` (every test gets its own
//! database and namespace). `common` holds the tests' scenario helpers, `webdriver` the
//! dashboard test's browser driver. Run them with `cargo nextest run --test it` (each test in
//! its own process) or `cargo test --test it`.

mod common;
mod webdriver;

mod auth;
mod bounded_costs;
mod catalog;
mod cli;
mod coalesce;
mod dashboard;
mod dedupe;
mod fairness;
mod group_commit;
mod http_server;
mod invitations;
mod key_rotation;
mod limits;
mod llm;
mod migrations;
mod monitoring;
mod openapi;
mod outages;
mod principals;
mod producers;
mod redis_cluster;
mod reliability;
mod rotation;
mod sealed_payloads;
mod security_events;
mod sentry;
mod tenant_secrets;
mod webhook;
mod worker;
