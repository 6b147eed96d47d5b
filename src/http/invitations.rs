//! `POST /v1/invitations/accept`: the signed-in user who presents an owner invitation's token
//! becomes that tenant's owner (SPEC "Tenant boundary"; the rules are in `invitations`).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use super::authz::{Caller, RateHeaders, json_body, record};
use super::error::ApiError;
use crate::events::EventType;
use crate::invitations::{self, InvitationError};
use crate::security::jwt::SubjectKind;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptInvitation {
    /// The `invite_token` shown when the tenant was created.
    #[schema(value_type = String, format = Password)]
    token: SecretString,
}

/// An accepted invitation.
#[derive(Serialize, utoipa::ToSchema)]
pub struct InvitationAccepted {
    pub tenant_id: Uuid,
    /// Always `owner`.
    #[schema(schema_with = super::openapi::tenant_role)]
    pub role: &'static str,
}

/// Accepts an owner invitation: the caller (a user) becomes the tenant's `owner`, from its
/// next request on. Unknown, used and expired tokens get the same 404.
#[utoipa::path(operation_id = "accept_invitation", post, path = "/v1/invitations/accept", tag = "tenants", security(("bearer" = [])),
    request_body = AcceptInvitation,
    responses(
        (status = 200, description = "The caller is the tenant's owner", body = InvitationAccepted),
        super::error::BodyErrors,
        (status = 401, description = "No valid bearer token / wrong credentials", body = super::error::ErrorBody),
        (status = 403, description = "Forbidden (a service account cannot own a tenant)", body = super::error::ErrorBody),
        (status = 404, description = "Unknown, used or expired token (`not_found`, one body for all three)", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn accept(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<(RateHeaders, Json<InvitationAccepted>), ApiError> {
    let decision = caller.limit_writes(&state).await?;
    if caller.principal.kind != SubjectKind::User {
        let mut event = caller.ctx.event(EventType::PermissionDenied);
        event.user_id = Some(caller.id());
        event.details = json!({"action": "accept_invitation", "reason": "not_a_user"});
        record(&state, event);
        return Err(ApiError::forbidden());
    }
    let req: AcceptInvitation = json_body(&state, &headers, body).await?;
    let mut redis = state.redis.clone();
    let accepted = invitations::accept(
        &state.pool,
        &mut redis,
        &state.scopes,
        req.token.expose_secret(),
        caller.id(),
    )
    .await
    .inspect_err(|e| {
        if let InvitationError::Refused {
            refusal,
            invitation_id,
            tenant_id,
        } = e
        {
            // Someone presented a token that grants nothing: who, and why (for operators;
            // the caller gets one answer whatever the reason).
            let mut event = caller.ctx.event(EventType::PermissionDenied);
            event.user_id = Some(caller.id());
            event.email = caller.principal.email.clone();
            event.tenant_id = *tenant_id;
            event.details = json!({
                "action": "accept_invitation",
                "reason": refusal.as_str(),
                "invitation_id": invitation_id,
            });
            record(&state, event);
        }
    })?;
    let mut event = caller.ctx.event(EventType::InvitationAccepted);
    event.user_id = Some(caller.id());
    event.email = caller.principal.email.clone();
    event.tenant_id = Some(accepted.tenant_id);
    event.details = json!({
        "invitation_id": accepted.invitation_id,
        "role": accepted.role.as_str(),
    });
    record(&state, event);
    tracing::info!(
        tenant.id = %accepted.tenant_id,
        user.id = %caller.id(),
        invitation.id = %accepted.invitation_id,
        "owner invitation accepted"
    );
    let body = InvitationAccepted {
        tenant_id: accepted.tenant_id,
        role: accepted.role.as_str(),
    };
    Ok((RateHeaders(decision), Json(body)))
}
