//! `POST /v1/admin/key-rotations`, `POST /v1/admin/key-rotations/{id}/approve` and
//! `GET /v1/admin/key-rotations/{id}`: four-eyes key rotation (scope `keys:rotate`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::AppState;
use super::authz::{Caller, record, with_rate_headers};
use super::error::ApiError;
use crate::access::Scope;
use crate::events::EventType;
use crate::rotation::{self, Rotation, RotationError};

fn path_uuid(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found())
}

fn rfc3339(t: Option<OffsetDateTime>) -> Value {
    t.and_then(|t| t.format(&Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

/// The rotation as the API shows it.
fn view(r: &Rotation) -> Value {
    json!({
        "id": r.id,
        "status": r.status,
        "initiated_by": r.initiated_by,
        "approved_by": r.approved_by,
        "approved_at": rfc3339(r.approved_at),
        "target_key_id": r.target_key_id,
        "created_at": rfc3339(Some(r.created_at)),
        "expires_at": rfc3339(Some(r.expires_at)),
        "started_at": rfc3339(r.started_at),
        "completed_at": rfc3339(r.completed_at),
        "total": r.total,
        "done": r.done,
        "failed": r.failed,
        "last_error": r.last_error,
    })
}

fn database_error(error: sqlx::Error, what: &str) -> ApiError {
    tracing::error!(%error, "cannot {what}");
    ApiError::unavailable()
}

/// `POST /v1/admin/key-rotations`: records a request to re-encrypt everything under this
/// ingress's current key.
#[utoipa::path(post, path = "/v1/admin/key-rotations", tag = "keys", security(("bearer" = [])),
    responses(
        (status = 201, description = "Requested; waits for a second person's approval", body = super::openapi::RotationRequested),
        (status = 401, description = "No valid bearer token", body = super::error::ErrorBody),
        (status = 403, description = "Missing `keys:rotate`", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Response, ApiError> {
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
        RotationError::Database(error) => database_error(error, "record key rotation"),
        // The token said keys:rotate, the database no longer does.
        _ => caller.deny(&state, Scope::KeysRotate, None),
    })?;
    tracing::info!(rotation.id = %rotation.id, user.id = %caller.id(), target_key_id = %rotation.target_key_id, "key rotation requested");
    let body = json!({
        "id": rotation.id,
        "status": rotation.status,
        "initiated_by": rotation.initiated_by,
        "target_key_id": rotation.target_key_id,
        "expires_at": rfc3339(Some(rotation.expires_at)),
    });
    let response = (StatusCode::CREATED, Json(body)).into_response();
    Ok(with_rate_headers(response, &decision))
}

/// `POST /v1/admin/key-rotations/{id}/approve`: the second pair of eyes.
#[utoipa::path(post, path = "/v1/admin/key-rotations/{id}/approve", tag = "keys",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The rotation")),
    responses(
        (status = 202, description = "Approved; the `rotate_keys` job is queued", body = super::openapi::RotationQueued),
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
) -> Result<Response, ApiError> {
    caller.require(&state, Scope::KeysRotate)?;
    let decision = caller.limit_writes(&state).await?;
    let rotation_id = path_uuid(&id)?;
    let approved = match rotation::approve(&state.pool, rotation_id, caller.id()).await {
        Ok(approved) => approved,
        Err(RotationError::SelfApproval) => {
            let mut event = caller.ctx.event(EventType::FourEyesViolation);
            event.user_id = Some(caller.id());
            event.email = caller.principal.email.clone();
            event.details = json!({"rotation_id": rotation_id, "reason": "self_approval"});
            record(&state, event);
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "four_eyes_violation",
                "a rotation must be approved by a different user than the one who requested it",
            ));
        }
        Err(RotationError::ApproverNotAuthorized) => {
            return Err(caller.deny(&state, Scope::KeysRotate, None));
        }
        Err(RotationError::NotFound) => return Err(ApiError::not_found()),
        Err(
            e @ (RotationError::NotPending(_)
            | RotationError::Expired
            | RotationError::InitiatorNotAuthorized),
        ) => {
            return Err(ApiError::conflict("conflict", e.to_string()));
        }
        Err(RotationError::Database(error)) => {
            return Err(database_error(error, "approve key rotation"));
        }
        Err(other) => {
            tracing::error!(error = %other, "unexpected approval failure");
            return Err(ApiError::internal());
        }
    };
    tracing::info!(rotation.id = %rotation_id, user.id = %caller.id(), initiated_by = %approved.rotation.initiated_by, job.id = %approved.job_id, "key rotation approved");
    // The job is committed in the outbox; push it now so the rotation starts at once. If
    // Redis is away the workers' relay pushes it when it is back.
    let mut redis = state.redis.clone();
    if let Err(error) = crate::queue::outbox::relay(&state.pool, &mut redis, &state.queues).await {
        tracing::warn!(%error, "outbox relay after approval failed; the workers' relay will push it");
    }
    let body = json!({"id": approved.rotation.id, "status": approved.rotation.status});
    let response = (StatusCode::ACCEPTED, Json(body)).into_response();
    Ok(with_rate_headers(response, &decision))
}

/// `GET /v1/admin/key-rotations/{id}`: status and progress.
#[utoipa::path(get, path = "/v1/admin/key-rotations/{id}", tag = "keys",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The rotation")),
    responses(
        (status = 200, description = "Status and progress", body = super::openapi::RotationView),
        (status = 401, description = "No valid bearer token", body = super::error::ErrorBody),
        (status = 403, description = "Missing `keys:rotate`", body = super::error::ErrorBody),
        (status = 404, description = "No such rotation", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(&state, Scope::KeysRotate)?;
    let rotation_id = path_uuid(&id)?;
    let rotation = rotation::get(&state.pool, rotation_id)
        .await
        .map_err(|error| database_error(error, "read key rotation"))?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(view(&rotation)).into_response())
}
