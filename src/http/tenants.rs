//! `POST /v1/tenants`, `PUT /v1/tenants/{tenant_id}/members/{user_id}` and
//! `POST /v1/tenants/{tenant_id}/catalog/sync`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use gatehouse_jobs::client::Enqueue;
use gatehouse_jobs::{SyncCatalog, SyncMode};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AppState;
use super::authz::{Caller, RateHeaders, json_body};
use super::error::ApiError;
use super::jobs::JobAccepted;
use crate::access::{self, AccessError, Scope, TenantRole};
use crate::tenants::NewTenant;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// 1 to 200 characters, not only whitespace.
    #[schema(max_length = 200, pattern = r"\S")]
    name: String,
    /// `AC` and 32 hex digits.
    #[schema(
        pattern = "^AC[0-9a-fA-F]{32}$",
        example = "AC0123456789abcdef0123456789abcdef"
    )]
    twilio_account_sid: String,
    /// 16 to 256 visible ASCII characters.
    #[schema(value_type = String, format = Password, pattern = "^[!-~]{16,256}$")]
    twilio_auth_token: SecretString,
    /// The store API's base URL: `https` (plain `http` only with `DEBUG=true`), no user info;
    /// a literal loopback, private, link-local, CGNAT, multicast, unspecified or reserved
    /// address, or `localhost`, is refused (400 `invalid_request` naming `store_url`) unless
    /// inside `STORE_ALLOWED_NETWORKS`.
    #[schema(
        max_length = 2048,
        pattern = r"^https://([a-z0-9-]{1,63}\.){1,8}([a-z]{2,8}|[a-z]{10,63})(/[A-Za-z0-9._~-]*)*$"
    )]
    store_url: Option<String>,
    #[schema(value_type = Option<String>, format = Password)]
    store_api_key: Option<SecretString>,
    /// 1 to 128 visible ASCII characters; given with `webhook_shared_key` or not at all.
    #[schema(value_type = String, required = false, pattern = "^[!-~]{1,128}$")]
    webhook_shared_key_id: Option<String>,
    /// At least 16 characters; given with `webhook_shared_key_id` or not at all.
    #[schema(value_type = String, required = false, format = Password, min_length = 16)]
    webhook_shared_key: Option<SecretString>,
    /// Whom an owner invitation is issued for (a record only: holding the address grants
    /// nothing). The 201 body then carries `invite_token`, shown once; the signed-in user who
    /// presents it to `POST /v1/invitations/accept` becomes the tenant's owner.
    #[schema(
        max_length = 254,
        pattern = r"^[A-Za-z0-9_%+-]{1,64}@([A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,63}$"
    )]
    owner_email: Option<String>,
}

/// A created tenant.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct TenantCreated {
    pub id: Uuid,
    /// With `owner_email` only: the single-use owner invitation (32 random bytes, URL-safe
    /// base64), shown this once; it expires after `INVITE_TTL_SECONDS`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Password)]
    pub invite_token: Option<String>,
}

/// A membership after `PUT`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MemberSet {
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    #[schema(schema_with = super::openapi::tenant_role)]
    pub role: &'static str,
}

fn path_uuid(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found())
}

/// Creates a tenant (`platform:admin`).
#[utoipa::path(operation_id = "create_tenant", post, path = "/v1/tenants", tag = "tenants", security(("bearer" = [])),
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
) -> Result<(StatusCode, RateHeaders, Json<TenantCreated>), ApiError> {
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
            .await?;
    let id = created.id;
    tracing::info!(
        tenant.id = %id,
        user.id = %caller.id(),
        invitation.id = created.invitation.as_ref().map(|i| tracing::field::display(i.id)),
        "tenant created"
    );
    let body = TenantCreated {
        id,
        invite_token: created
            .invitation
            .as_ref()
            .map(|invitation| invitation.token.expose_secret().to_owned()),
    };
    Ok((StatusCode::CREATED, RateHeaders(decision), Json(body)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRole {
    #[schema(schema_with = super::openapi::tenant_role)]
    role: String,
}

/// Adds a member to a tenant or changes its role.
#[utoipa::path(operation_id = "set_tenant_member", put, path = "/v1/tenants/{tenant_id}/members/{user_id}", tag = "tenants",
    security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path), ("user_id" = Uuid, Path)),
    request_body = SetRole,
    responses(
        (status = 200, description = "Membership set", body = MemberSet),
        super::error::BodyErrors,
        (status = 401, description = "No valid bearer token / wrong credentials", body = super::error::ErrorBody),
        (status = 403, description = "Forbidden (missing scope, or `invalid_signature`)", body = super::error::ErrorBody),
        (status = 404, description = "No such resource", body = super::error::ErrorBody),
        (status = 409, description = "The change would leave the tenant without an owner (`conflict`)", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn put_member(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((tenant, user)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<(RateHeaders, Json<MemberSet>), ApiError> {
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
    .inspect_err(|e| {
        if matches!(e, AccessError::Forbidden) {
            caller.deny_in(&state, tenant_id, Scope::TenantAdmin);
        }
    })?;
    tracing::info!(tenant.id = %tenant_id, member.id = %user_id, role = role.as_str(), by = %caller.id(), "membership set");
    let body = MemberSet {
        tenant_id,
        user_id,
        role: role.as_str(),
    };
    Ok((RateHeaders(decision), Json(body)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    #[serde(default = "default_mode")]
    #[schema(schema_with = super::openapi::sync_mode, required = false)]
    mode: SyncMode,
}

fn default_mode() -> SyncMode {
    SyncMode::Incremental
}

/// Requests a catalog sync of a tenant's store.
#[utoipa::path(operation_id = "request_catalog_sync", post, path = "/v1/tenants/{tenant_id}/catalog/sync", tag = "tenants",
    security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path)),
    request_body = SyncRequest,
    responses(
        (status = 202, description = "Sync enqueued", body = JobAccepted),
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
) -> Result<(StatusCode, RateHeaders, Json<JobAccepted>), ApiError> {
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
        .await?;
    tracing::info!(tenant.id = %tenant_id, job.id = %enqueued.job_id, "catalog sync requested");
    let body = JobAccepted {
        job_id: enqueued.job_id,
    };
    Ok((StatusCode::ACCEPTED, RateHeaders(decision), Json(body)))
}
