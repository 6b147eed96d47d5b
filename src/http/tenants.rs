//! `POST /v1/tenants`, `PUT /v1/tenants/{tenant_id}/members/{user_id}` and
//! `POST /v1/tenants/{tenant_id}/catalog/sync`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use gatehouse_jobs::client::Enqueue;
use gatehouse_jobs::{SyncCatalog, SyncMode};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use super::authz::{Caller, json_body, with_rate_headers};
use super::error::ApiError;
use crate::access::{self, AccessError, Scope, TenantRole};
use crate::tenants::{NewTenant, TenantError};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    name: String,
    twilio_account_sid: String,
    #[schema(value_type = String, format = Password)]
    twilio_auth_token: SecretString,
    /// The store API's base URL: `https` (plain `http` only with `DEBUG=true`), no user info;
    /// a literal loopback, private, link-local, CGNAT, multicast, unspecified or reserved
    /// address, or `localhost`, is refused (400 `invalid_request` naming `store_url`) unless
    /// inside `STORE_ALLOWED_NETWORKS`.
    store_url: Option<String>,
    #[schema(value_type = Option<String>, format = Password)]
    store_api_key: Option<SecretString>,
    webhook_shared_key_id: Option<String>,
    #[schema(value_type = Option<String>, format = Password)]
    webhook_shared_key: Option<SecretString>,
    /// Whom an owner invitation is issued for (a record only: holding the address grants
    /// nothing). The 201 body then carries `invite_token`, shown once; the signed-in user who
    /// presents it to `POST /v1/invitations/accept` becomes the tenant's owner.
    owner_email: Option<String>,
}

/// A created tenant.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct TenantCreated {
    pub id: Uuid,
    /// With `owner_email` only: the single-use owner invitation (32 random bytes, URL-safe
    /// base64), shown this once; it expires after `INVITE_TTL_SECONDS`.
    #[schema(format = Password)]
    pub invite_token: Option<String>,
}

fn path_uuid(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found())
}

/// Creates a tenant (`platform:admin`).
#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", security(("bearer" = [])),
    request_body = CreateTenant,
    responses(
        (status = 201, description = "Created (with `invite_token` when `owner_email` was given)", body = TenantCreated),
        super::error::BodyErrors,
        (status = 401, description = "No valid bearer token / wrong credentials", body = super::error::ErrorBody),
        (status = 403, description = "Forbidden (missing scope, or `invalid_signature`)", body = super::error::ErrorBody),
        (status = 409, description = "Conflict", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require(&state, Scope::PlatformAdmin)?;
    let decision = caller.limit_writes(&state).await?;
    let req: CreateTenant = json_body(&state, &headers, body).await?;
    let webhook_shared_key = match (req.webhook_shared_key_id, req.webhook_shared_key) {
        (Some(id), Some(key)) => Some((id, key)),
        (None, None) => None,
        _ => {
            return Err(ApiError::invalid_request(
                "webhook_shared_key_id and webhook_shared_key go together",
            ));
        }
    };
    let new = NewTenant {
        name: req.name,
        twilio_account_sid: req.twilio_account_sid,
        twilio_auth_token: req.twilio_auth_token,
        store_url: req.store_url,
        store_api_key: req.store_api_key,
        webhook_shared_key,
        owner_email: req.owner_email,
    };
    new.validate()
        .and_then(|()| new.check_store_url(&crate::tenants::store_url_policy(&state.config)))
        .map_err(|e| ApiError::invalid_request(e.to_string()))?;
    let ttl = std::time::Duration::from_secs(state.config.invite_ttl_seconds);
    let created =
        crate::tenants::create_with_invitation(&state.pool, &state.config.keyring, &new, ttl)
            .await
            .map_err(|e| match e {
                TenantError::Database(error) => {
                    tracing::error!(%error, "cannot create tenant");
                    ApiError::unavailable()
                }
                other => ApiError::invalid_request(other.to_string()),
            })?;
    let id = created.id;
    tracing::info!(
        tenant.id = %id,
        user.id = %caller.id(),
        invitation.id = created.invitation.as_ref().map(|i| tracing::field::display(i.id)),
        "tenant created"
    );
    let body = match &created.invitation {
        Some(invitation) => {
            use secrecy::ExposeSecret;
            json!({"id": id, "invite_token": invitation.token.expose_secret()})
        }
        None => json!({"id": id}),
    };
    let response = (StatusCode::CREATED, Json(body)).into_response();
    Ok(with_rate_headers(response, &decision))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRole {
    role: String,
}

/// Adds a member to a tenant or changes its role.
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/members/{user_id}", tag = "tenants",
    security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path), ("user_id" = Uuid, Path)),
    request_body = SetRole,
    responses(
        (status = 200, description = "Membership set", body = super::openapi::MemberSet),
        super::error::BodyErrors,
        (status = 401, description = "No valid bearer token / wrong credentials", body = super::error::ErrorBody),
        (status = 403, description = "Forbidden (missing scope, or `invalid_signature`)", body = super::error::ErrorBody),
        (status = 404, description = "No such resource", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn put_member(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((tenant, user)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let tenant_id = path_uuid(&tenant)?;
    let user_id = path_uuid(&user)?;
    // Tenant admins manage their tenant; platform admins may manage any tenant (that is
    // how a new tenant gets its first owner through the API).
    let platform_admin = caller.principal.has_platform_scope(Scope::PlatformAdmin);
    if !platform_admin {
        caller.require_in(&state, tenant_id, Scope::TenantAdmin)?;
    }
    let decision = caller.limit_writes(&state).await?;
    let req: SetRole = json_body(&state, &headers, body).await?;
    let role = TenantRole::parse(&req.role)
        .ok_or_else(|| ApiError::invalid_request("role must be one of owner, admin, agent"))?;
    // Only an owner (or a platform admin) grants `owner` or changes an owner's role: an
    // admin cannot promote itself above its grant. Checked inside the change's transaction,
    // against the roles as they are then (`access::set_member_role`).
    let actor = if platform_admin {
        access::Actor::PlatformAdmin
    } else {
        access::Actor::Member(caller.id())
    };
    let mut redis = state.redis.clone();
    access::set_member_role(
        &state.pool,
        &mut redis,
        &state.scopes,
        actor,
        tenant_id,
        user_id,
        role,
    )
    .await
    .map_err(|e| match e {
        AccessError::NotFound => ApiError::not_found(),
        AccessError::Forbidden => caller.deny_in(&state, tenant_id, Scope::TenantAdmin),
        AccessError::Conflict(message) => ApiError::conflict("conflict", message),
        AccessError::Database(error) => {
            tracing::error!(%error, "cannot change membership");
            ApiError::unavailable()
        }
        AccessError::Cache(error) => {
            tracing::error!(%error, "scope cache unreachable; membership left unchanged");
            ApiError::unavailable()
        }
    })?;
    tracing::info!(tenant.id = %tenant_id, member.id = %user_id, role = role.as_str(), by = %caller.id(), "membership set");
    let response = Json(json!({
        "tenant_id": tenant_id,
        "user_id": user_id,
        "role": role.as_str(),
    }))
    .into_response();
    Ok(with_rate_headers(response, &decision))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// `incremental` (default) or `full`.
    #[serde(default = "default_mode")]
    #[schema(value_type = Option<String>)]
    mode: SyncMode,
}

fn default_mode() -> SyncMode {
    SyncMode::Incremental
}

/// Requests a catalog sync of a tenant's store.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/catalog/sync", tag = "tenants",
    security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path)),
    request_body = SyncRequest,
    responses(
        (status = 202, description = "Sync enqueued", body = super::openapi::JobAccepted),
        super::error::BodyErrors,
        (status = 401, description = "No valid bearer token / wrong credentials", body = super::error::ErrorBody),
        (status = 403, description = "Forbidden (missing scope, or `invalid_signature`)", body = super::error::ErrorBody),
        (status = 404, description = "No such resource", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn catalog_sync(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let tenant_id = path_uuid(&tenant)?;
    caller.require_in(&state, tenant_id, Scope::CatalogSync)?;
    let decision = caller.limit_writes(&state).await?;
    let req: SyncRequest = json_body(&state, &headers, body).await?;
    let job = SyncCatalog {
        tenant_id,
        requested_by: caller.id(),
        mode: req.mode,
    };
    let mut redis = state.redis.clone();
    let enqueued = state
        .queues
        .enqueue(
            &mut redis,
            &job,
            Enqueue {
                job_id: None,
                dedupe: None,
                request_id: Some(caller.ctx.request_id.clone()),
            },
        )
        .await
        .map_err(|error| {
            tracing::error!(tenant.id = %tenant_id, %error, "cannot enqueue catalog sync");
            ApiError::unavailable()
        })?;
    tracing::info!(tenant.id = %tenant_id, job.id = %enqueued.job_id, "catalog sync requested");
    let response = (
        StatusCode::ACCEPTED,
        Json(json!({"job_id": enqueued.job_id})),
    )
        .into_response();
    Ok(with_rate_headers(response, &decision))
}
