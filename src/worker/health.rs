//! The worker process's own health: with `WORKER_HEALTH_PORT` set, `gatehouse work` answers
//! `GET /healthz` with 200 while it reaches Redis and PostgreSQL answers, and 503 otherwise,
//! saying which is down and, for a Redis outage, since when (`outages`: dependency and RFC 3339
//! time) — for a supervisor's readiness probe; an outage never makes the process exit — and
//! `GET /metrics` (Prometheus text: job counters and durations, queue gauges, dependency
//! gauges).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use sqlx::PgPool;
use time::OffsetDateTime;

use super::scrape::Scrape;

/// Whether this process reaches Redis: not until something first has (the maintenance round,
/// a worker's probe), then down from the first failure that is an outage (`outage`) until
/// the next success (`reached`). Each transition is logged once (an ERROR line when the
/// outage starts, an INFO line with its length when it ends) and sets the
/// `gatehouse_dependency_up{dependency="redis"}` gauge; failures in between log nothing.
#[derive(Debug, Clone, Default)]
pub struct RedisHealth(Arc<Mutex<Reach>>);

#[derive(Debug, Default)]
struct Reach {
    reached: bool,
    down_since: Option<OffsetDateTime>,
}

/// The dependency label of the gauge and of `/healthz`'s `outages`.
pub const REDIS: &str = "redis";

impl RedisHealth {
    /// A maintenance round's result: `true` as [`Self::reached`], `false` as an outage.
    pub fn set(&self, ok: bool) {
        if ok {
            self.reached();
        } else {
            self.outage(&"the maintenance round (heartbeat, vacuum) failed");
        }
    }

    /// Whether Redis was reached and is not down now.
    pub fn get(&self) -> bool {
        self.0
            .lock()
            .map(|r| r.reached && r.down_since.is_none())
            .unwrap_or(false)
    }

    /// Since when Redis has been down, if it is.
    pub fn down_since(&self) -> Option<OffsetDateTime> {
        self.0.lock().ok().and_then(|r| r.down_since)
    }

    /// Something just reached Redis: ends an outage (logged once).
    pub fn reached(&self) {
        let Ok(mut reach) = self.0.lock() else {
            return;
        };
        let was_down = reach.down_since.take();
        let first = !reach.reached;
        reach.reached = true;
        drop(reach);
        if let Some(since) = was_down {
            let seconds = (OffsetDateTime::now_utc() - since).as_seconds_f64();
            tracing::info!(
                dependency = REDIS,
                outage.seconds = (seconds * 10.0).round() / 10.0,
                "redis is reachable again; workers resume"
            );
        }
        if first || was_down.is_some() {
            ::metrics::gauge!("gatehouse_dependency_up", "dependency" => REDIS).set(1.0);
        }
    }

    /// Redis is unreachable or answers that it cannot serve (an outage, see
    /// `worker::redis_outage`): starts an outage (logged once, with this first error).
    pub fn outage(&self, error: &dyn std::fmt::Display) {
        let Ok(mut reach) = self.0.lock() else {
            return;
        };
        if reach.down_since.is_some() {
            return;
        }
        let since = OffsetDateTime::now_utc();
        reach.down_since = Some(since);
        drop(reach);
        ::metrics::gauge!("gatehouse_dependency_up", "dependency" => REDIS).set(0.0);
        tracing::error!(
            dependency = REDIS,
            since = %rfc3339(since),
            %error,
            "redis is unreachable; workers stop fetching and probe it with backoff until it answers"
        );
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
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
    let outages: Vec<serde_json::Value> = state
        .redis
        .down_since()
        .map(|since| json!({ "dependency": REDIS, "since": rfc3339(since) }))
        .into_iter()
        .collect();
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
        "outages": outages,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_keeps_its_first_start_until_redis_is_reached_again() {
        let health = RedisHealth::default();
        assert!(!health.get(), "not healthy before Redis was ever reached");
        health.reached();
        assert!(health.get() && health.down_since().is_none());
        health.outage(&"connection refused");
        let since = health.down_since().expect("down");
        health.outage(&"connection refused again");
        health.set(false);
        assert_eq!(health.down_since(), Some(since), "one outage, one start");
        assert!(!health.get());
        health.set(true);
        assert!(health.get() && health.down_since().is_none());
    }
}
