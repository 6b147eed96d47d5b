//! The worker process's own health: with `WORKER_HEALTH_PORT` set, `gatehouse work` answers
//! `GET /healthz` with 200 while it reaches Redis and PostgreSQL answers, and 503 otherwise,
//! saying which is down and since when (`outages`: dependency and RFC 3339 time; an open LLM or
//! store circuit is listed too, without making the answer 503: the worker still serves the
//! jobs that do not need it) — for a supervisor's readiness probe; an outage never makes the
//! process exit — and `GET /metrics` (Prometheus text: job counters and durations, queue
//! gauges, dependency gauges, open circuits).

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use sqlx::PgPool;

use crate::metrics::scrape::Scrape;

pub use super::outage::{Outages, Reachability};

#[derive(Clone)]
struct HealthState {
    outages: Outages,
    pool: PgPool,
    scrape: Scrape,
}

async fn metrics(State(state): State<HealthState>, headers: axum::http::HeaderMap) -> Response {
    state.outages.export_circuits();
    state.scrape.respond(&headers).await
}

async fn healthz(State(state): State<HealthState>) -> Response {
    let redis = state.outages.redis.get();
    state.outages.export_circuits();
    let outages = state.outages.report();
    let postgres = !state.outages.postgres.is_down()
        && tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&state.pool),
        )
        .await
        .is_ok_and(|r| r.is_ok());
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    let status = if redis && postgres {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ok" } else { "unavailable" },
        "redis": word(redis),
        "postgres": word(postgres),
        "outages": outages,
    });
    (status, axum::Json(body)).into_response()
}

/// Serves `/healthz` and `/metrics` on `listener` (through [`crate::server`]: header timeout,
/// connection cap) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    limits: crate::server::Limits,
    outages: Outages,
    pool: PgPool,
    scrape: Scrape,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(HealthState {
            outages,
            pool,
            scrape,
        });
    crate::server::run(
        listener,
        limits,
        move |_peer, watch| tower_layer::Layer::layer(&watch, app.clone()),
        shutdown,
    )
    .await
}
