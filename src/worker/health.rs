//! The worker process's own health: with `WORKER_HEALTH_PORT` set, `gatehouse work` answers
//! `GET /healthz` with 200 while its maintenance task reaches Redis and PostgreSQL answers,
//! and 503 (saying which is down) otherwise — for a supervisor's liveness/readiness probe — and
//! `GET /metrics` (Prometheus text: job counters and durations, queue gauges).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use sqlx::PgPool;

use super::scrape::Scrape;

/// Whether the last maintenance round (heartbeat, recovery, vacuum) reached Redis. False until
/// the first round has.
#[derive(Debug, Clone, Default)]
pub struct RedisHealth(Arc<AtomicBool>);

impl RedisHealth {
    pub fn set(&self, ok: bool) {
        self.0.store(ok, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct HealthState {
    redis: RedisHealth,
    pool: PgPool,
    scrape: Scrape,
}

async fn metrics(State(state): State<HealthState>, headers: axum::http::HeaderMap) -> Response {
    state.scrape.respond(&headers).await
}

async fn healthz(State(state): State<HealthState>) -> Response {
    let redis = state.redis.get();
    let postgres = tokio::time::timeout(
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
    });
    (status, axum::Json(body)).into_response()
}

/// Serves `/healthz` and `/metrics` on `listener` (through [`crate::server`]: header timeout,
/// connection cap) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    limits: crate::server::Limits,
    redis: RedisHealth,
    pool: PgPool,
    scrape: Scrape,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(HealthState {
            redis,
            pool,
            scrape,
        });
    crate::server::run(listener, limits, move |_peer| app.clone(), shutdown).await
}
