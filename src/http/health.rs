//! `/healthz` (the process answers) and `/readyz` (PostgreSQL and Redis answer).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

/// `/healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(pattern = "^ok$")]
    pub status: &'static str,
}

/// `/readyz`: each dependency `ok` or `unavailable`.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    #[schema(schema_with = dependency_state)]
    pub postgres: &'static str,
    #[schema(schema_with = dependency_state)]
    pub redis: &'static str,
}

fn dependency_state() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["ok", "unavailable"]))
        .build()
}

fn state(up: bool) -> &'static str {
    if up { "ok" } else { "unavailable" }
}

/// The process answers.
#[utoipa::path(operation_id = "healthz", get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// PostgreSQL and Redis answer.
#[utoipa::path(operation_id = "readyz", get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "A dependency does not answer", body = Readiness),
    ))]
pub async fn readyz(State(app): State<Arc<AppState>>) -> (StatusCode, Json<Readiness>) {
    let timeout = Duration::from_secs(2);
    let pg = async {
        matches!(
            tokio::time::timeout(
                timeout,
                sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&app.pool)
            )
            .await,
            Ok(Ok(1))
        )
    };
    let mut redis = app.redis.clone();
    let rd = async {
        let answers = async {
            // On a cluster, every queue shard's node must answer, not just one node.
            crate::redis_conn::ping(&mut redis).await
                && (!redis.get().is_cluster()
                    || crate::queue::consume::every_shard_answers(&mut redis, app.queues.layout())
                        .await)
        };
        tokio::time::timeout(timeout, answers)
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
        Json(Readiness {
            postgres: state(pg),
            redis: state(rd),
        }),
    )
}
