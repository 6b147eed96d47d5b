//! `POST /v1/jobs/{queue}`: producers enqueue a job whose payload follows the committed JSON
//! Schema of `gatehouse-jobs`.

use std::sync::{Arc, LazyLock};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use gatehouse_jobs::client::Enqueue;
use gatehouse_jobs::{Job, RotateKeys};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::AppState;
use super::authz::{Caller, RateHeaders, json_body};
use super::error::ApiError;
use crate::access::Scope;
use crate::queue::payloads::{PayloadValidators, SchemaError};

/// An accepted job.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JobAccepted {
    pub job_id: String,
}

/// How long an `Idempotency-Key` is remembered.
pub const IDEMPOTENCY_TTL_SECONDS: u64 = 24 * 3600;

static VALIDATORS: LazyLock<Result<PayloadValidators, SchemaError>> =
    LazyLock::new(PayloadValidators::new);

/// Enqueues a job whose payload follows the queue's committed JSON Schema (`jobs:enqueue`).
/// An `Idempotency-Key` header makes retries safe.
#[utoipa::path(operation_id = "enqueue_job", post, path = "/v1/jobs/{queue}", tag = "jobs", security(("bearer" = [])),
    params(
        ("queue" = String, Path, pattern = "^(inbound_message|sync_catalog)$", description = "A queue producers may enqueue to (another name is 404; `rotate_keys` is 403: key rotation starts only through its four-eyes approval)"),
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible characters; repeats within 24 h return the first job"),
    ),
    request_body(content = Object, description = "The job payload: it follows the queue's committed JSON Schema (`jobs/schemas/{queue}.json`), and its `tenant_id` names an existing tenant the caller may produce for; otherwise 400 `invalid_payload` naming the field"),
    responses(
        (status = 202, description = "Enqueued", body = JobAccepted),
        super::error::BodyErrors,
        (status = 401, description = "No valid bearer token / wrong credentials", body = super::error::ErrorBody),
        (status = 403, description = "Forbidden (missing scope, or a tenant the caller is not bound to)", body = super::error::ErrorBody),
        (status = 404, description = "No such resource", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn enqueue(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, RateHeaders, Json<JobAccepted>), ApiError> {
    caller.require(&state, Scope::JobsEnqueue)?;
    let Some(queue) = gatehouse_jobs::QUEUES.into_iter().find(|q| *q == queue) else {
        return Err(ApiError::not_found());
    };
    // Key rotation starts only through its four-eyes approval, never from a producer.
    if queue == RotateKeys::QUEUE {
        return Err(caller.deny(&state, Scope::KeysRotate, None));
    }
    let decision = caller.limit_writes(&state).await?;
    let mut payload: Value = json_body(&state, &headers, body).await?;
    let validators = VALIDATORS.as_ref().map_err(|error| {
        tracing::error!(%error, "payload schemas do not compile");
        ApiError::internal()
    })?;
    validators.validate(queue, &payload)?;
    // The caller acts for the payload's tenant: one it is bound to (a bound producer gets 403
    // for any other, existing or not, so it learns nothing about them), and one that exists.
    let tenant_id = payload
        .get("tenant_id")
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| ApiError::invalid_payload("/tenant_id: required"))?;
    // A sync records who asked for it: the caller, whatever the payload says.
    if queue == gatehouse_jobs::SyncCatalog::QUEUE {
        payload["requested_by"] = json!(caller.id());
    }
    let known: Option<Uuid> = sqlx::query_scalar("SELECT id FROM tenants WHERE id = $1")
        .bind(tenant_id)
        .fetch_optional(&state.pool)
        .await?;
    if !caller.principal.may_produce_for(tenant_id) {
        // Events name existing tenants only, never an id a client made up.
        return Err(caller.deny_tenant(&state, Scope::JobsEnqueue, known));
    }
    if known.is_none() {
        return Err(ApiError::invalid_payload("/tenant_id: no such tenant"));
    }
    let dedupe = match headers.get("idempotency-key") {
        None => None,
        Some(value) => {
            let key = value
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| {
                    ApiError::invalid_request("Idempotency-Key must be 1 to 255 visible characters")
                })?;
            // Scoped to the caller and queue; hashed so the key's text never sits in Redis.
            let digest = hex::encode(Sha256::digest(key.as_bytes()));
            let purpose = format!("idempotency:{}:{queue}:{digest}", caller.id());
            Some((purpose, IDEMPOTENCY_TTL_SECONDS))
        }
    };
    let mut redis = state.enqueue_redis();
    // The customer data is sealed on the way in (SPEC "Customer data in Redis").
    let enqueued = state
        .queues
        .enqueue_json(
            &mut redis,
            queue,
            payload,
            Enqueue {
                job_id: None,
                dedupe,
                request_id: Some(caller.ctx.request_id.clone()),
            },
        )
        .await?;
    tracing::info!(job.queue = queue, job.id = %enqueued.job_id, job.created = enqueued.created, by = %caller.id(), "job enqueued by a producer");
    let body = JobAccepted {
        job_id: enqueued.job_id,
    };
    Ok((StatusCode::ACCEPTED, RateHeaders(decision), Json(body)))
}
