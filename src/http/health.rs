//! `/healthz` (the process answers) and `/readyz` (PostgreSQL and Redis answer).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use super::AppState;

/// The process answers.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", body = super::openapi::Health)))]
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// PostgreSQL and Redis answer.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready", body = super::openapi::Readiness),
        (status = 503, description = "A dependency does not answer", body = super::openapi::Readiness),
    ))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let timeout = Duration::from_secs(2);
    let pg = async {
        matches!(
            tokio::time::timeout(
                timeout,
                sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool)
            )
            .await,
            Ok(Ok(1))
        )
    };
    let mut redis = state.redis.clone();
    let rd = async {
        tokio::time::timeout(timeout, crate::redis_conn::ping(&mut redis))
            .await
            .unwrap_or(false)
    };
    let (pg, rd) = tokio::join!(pg, rd);
    let status = if pg && rd {
        StatusCode::OK
    } else {
        tracing::warn!(postgres = pg, redis = rd, "not ready");
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "postgres": if pg { "ok" } else { "unavailable" },
            "redis": if rd { "ok" } else { "unavailable" },
        })),
    )
}
