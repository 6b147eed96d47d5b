//! `POST /v1/admin/key-rotations`, `POST /v1/admin/key-rotations/{id}/approve` and
//! `GET /v1/admin/key-rotations/{id}`: four-eyes key rotation (scope `keys:rotate`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::json;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::authz::{Caller, RateHeaders, record};
use super::error::ApiError;
use crate::access::Scope;
use crate::events::EventType;
use crate::rotation::{self, Rotation, RotationError};

fn path_uuid(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found())
}

/// A key-rotation request as `POST /v1/admin/key-rotations` answers it.
#[derive(Serialize, ToSchema)]
pub struct RotationRequested {
    pub id: Uuid,
    /// `pending_approval`.
    #[schema(schema_with = super::openapi::rotation_status)]
    pub status: String,
    pub initiated_by: Uuid,
    /// The key everything will be re-encrypted under (16 lower-case hex characters).
    pub target_key_id: String,
    /// When the request lapses unapproved.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
}

/// An approved rotation: its job is queued.
#[derive(Serialize, ToSchema)]
pub struct RotationQueued {
    pub id: Uuid,
    /// `queued`.
    #[schema(schema_with = super::openapi::rotation_status)]
    pub status: String,
}

/// A key rotation with its progress.
#[derive(Serialize, ToSchema)]
pub struct RotationView {
    pub id: Uuid,
    #[schema(schema_with = super::openapi::rotation_status)]
    pub status: String,
    pub initiated_by: Uuid,
    pub approved_by: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub approved_at: Option<OffsetDateTime>,
    /// The key everything is re-encrypted under (16 lower-case hex characters).
    pub target_key_id: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub completed_at: Option<OffsetDateTime>,
    /// Sealed values to re-encrypt, fixed when the job starts.
    pub total: i64,
    pub done: i64,
    /// Values no known key opens: counted, reported, left untouched.
    pub failed: i64,
    pub last_error: Option<String>,
}

impl From<Rotation> for RotationView {
    fn from(r: Rotation) -> Self {
        Self {
            id: r.id,
            status: r.status,
            initiated_by: r.initiated_by,
            approved_by: r.approved_by,
            approved_at: r.approved_at,
            target_key_id: r.target_key_id,
            created_at: r.created_at,
            expires_at: r.expires_at,
            started_at: r.started_at,
            completed_at: r.completed_at,
            total: r.total,
            done: r.done,
            failed: r.failed,
            last_error: r.last_error,
        }
    }
}

/// `POST /v1/admin/key-rotations`: records a request to re-encrypt everything under this
/// ingress's current key.
#[utoipa::path(operation_id = "request_key_rotation", post, path = "/v1/admin/key-rotations", tag = "keys", security(("bearer" = [])),
    responses(
        (status = 201, description = "Requested; waits for a second person's approval", body = RotationRequested),
        (status = 401, description = "No valid bearer token", body = super::error::ErrorBody),
        (status = 403, description = "Missing `keys:rotate`", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<(StatusCode, RateHeaders, Json<RotationRequested>), ApiError> {
    caller.require(&state, Scope::KeysRotate)?;
    let decision = caller.limit_writes(&state).await?;
    let target = state.config.keyring.current_id();
    let rotation = rotation::request(
        &state.pool,
        caller.id(),
        target,
        std::time::Duration::from_secs(state.config.key_rotation_approval_ttl_seconds),
    )
    .await
    .map_err(|e| match e {
        // The token said keys:rotate, the database no longer does.
        RotationError::InitiatorNotAuthorized => caller.deny(&state, Scope::KeysRotate, None),
        other => other.into(),
    })?;
    tracing::info!(rotation.id = %rotation.id, user.id = %caller.id(), target_key_id = %rotation.target_key_id, "key rotation requested");
    let body = RotationRequested {
        id: rotation.id,
        status: rotation.status,
        initiated_by: rotation.initiated_by,
        target_key_id: rotation.target_key_id,
        expires_at: rotation.expires_at,
    };
    Ok((StatusCode::CREATED, RateHeaders(decision), Json(body)))
}

/// `POST /v1/admin/key-rotations/{id}/approve`: the second pair of eyes.
#[utoipa::path(operation_id = "approve_key_rotation", post, path = "/v1/admin/key-rotations/{id}/approve", tag = "keys",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The rotation")),
    responses(
        (status = 202, description = "Approved; the `rotate_keys` job is queued", body = RotationQueued),
        (status = 401, description = "No valid bearer token", body = super::error::ErrorBody),
        (status = 403, description = "`four_eyes_violation` (self-approval), or the approver lacks `keys:rotate` or is inactive", body = super::error::ErrorBody),
        (status = 404, description = "No such rotation", body = super::error::ErrorBody),
        (status = 409, description = "Not pending, already approved, expired, or the initiator is no longer active", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn approve(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, RateHeaders, Json<RotationQueued>), ApiError> {
    caller.require(&state, Scope::KeysRotate)?;
    let decision = caller.limit_writes(&state).await?;
    let rotation_id = path_uuid(&id)?;
    let approved = rotation::approve(&state.pool, rotation_id, caller.id())
        .await
        .map_err(|e| match e {
            RotationError::SelfApproval => {
                let mut event = caller.ctx.event(EventType::FourEyesViolation);
                event.user_id = Some(caller.id());
                event.email = caller.principal.email.clone();
                event.details = json!({"rotation_id": rotation_id, "reason": "self_approval"});
                record(&state, event);
                e.into()
            }
            RotationError::ApproverNotAuthorized => caller.deny(&state, Scope::KeysRotate, None),
            other => other.into(),
        })?;
    tracing::info!(rotation.id = %rotation_id, user.id = %caller.id(), initiated_by = %approved.rotation.initiated_by, job.id = %approved.job_id, "key rotation approved");
    // The job is committed in the outbox; push it now so the rotation starts at once. If
    // Redis is away the workers' relay pushes it when it is back.
    let mut redis = state.redis.clone();
    if let Err(error) = crate::queue::outbox::relay(&state.pool, &mut redis, &state.queues).await {
        tracing::warn!(%error, "outbox relay after approval failed; the workers' relay will push it");
    }
    let body = RotationQueued {
        id: approved.rotation.id,
        status: approved.rotation.status,
    };
    Ok((StatusCode::ACCEPTED, RateHeaders(decision), Json(body)))
}

/// `GET /v1/admin/key-rotations/{id}`: status and progress.
#[utoipa::path(operation_id = "get_key_rotation", get, path = "/v1/admin/key-rotations/{id}", tag = "keys",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The rotation")),
    responses(
        (status = 200, description = "Status and progress", body = RotationView),
        (status = 401, description = "No valid bearer token", body = super::error::ErrorBody),
        (status = 403, description = "Missing `keys:rotate`", body = super::error::ErrorBody),
        (status = 404, description = "No such rotation", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RotationView>, ApiError> {
    caller.require(&state, Scope::KeysRotate)?;
    let rotation_id = path_uuid(&id)?;
    let rotation = rotation::get(&state.pool, rotation_id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(rotation.into()))
}
