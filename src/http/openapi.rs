//! The API description: an OpenAPI 3.1 document generated from the handlers' `#[utoipa::path]`
//! annotations (routes and docs are registered together through `utoipa_axum::routes!`, see
//! `http::routes`), the bearer scheme, the shared response bodies, and `GET /openapi.json`.

use std::sync::LazyLock;

use axum::Json;
use serde::Serialize;
use utoipa::openapi::OpenApi as Document;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use uuid::Uuid;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gatehouse",
        description = "The secure job backbone: Twilio webhooks in, jobs out; accounts, tenants and security events."
    ),
    modifiers(&BearerScheme),
    components(schemas(super::error::ErrorBody)),
    tags(
        (name = "health", description = "Liveness, readiness, metrics and this document"),
        (name = "auth", description = "Accounts and tokens"),
        (name = "tenants", description = "Tenants and their members"),
        (name = "jobs", description = "Producers enqueue jobs"),
        (name = "webhooks", description = "Twilio webhooks"),
        (name = "security", description = "Security events"),
        (name = "keys", description = "Four-eyes key rotation"),
        (name = "admin", description = "The operator dashboard (HTML, session cookie, CSRF)"),
    )
)]
pub struct ApiDoc;

/// The `bearer` security scheme: a JWT from `/v1/auth/login` or `/v1/auth/token`.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "metrics_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The whole document, built once from the router's registrations.
pub static DOCUMENT: LazyLock<Document> = LazyLock::new(|| super::routes().split_for_parts().1);

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
pub async fn openapi_json() -> Json<&'static Document> {
    Json(&DOCUMENT)
}

/// An access token.
#[derive(Serialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// A created user.
#[derive(Serialize, ToSchema)]
pub struct Registered {
    pub id: Uuid,
    /// Normalized (trimmed, lower-cased).
    pub email: String,
}

/// A key-rotation request as `POST /v1/admin/key-rotations` answers it.
#[derive(Serialize, ToSchema)]
pub struct RotationRequested {
    pub id: Uuid,
    /// `pending_approval`.
    pub status: String,
    pub initiated_by: Uuid,
    /// The key everything will be re-encrypted under (16 lower-case hex characters).
    pub target_key_id: String,
    /// When the request lapses unapproved (RFC 3339).
    pub expires_at: String,
}

/// An approved rotation: its job is queued.
#[derive(Serialize, ToSchema)]
pub struct RotationQueued {
    pub id: Uuid,
    /// `queued`.
    pub status: String,
}

/// A key rotation with its progress.
#[derive(Serialize, ToSchema)]
pub struct RotationView {
    pub id: Uuid,
    /// `pending_approval`, `queued`, `running`, `completed`, `failed` or `expired`.
    pub status: String,
    pub initiated_by: Uuid,
    pub approved_by: Option<Uuid>,
    /// RFC 3339.
    pub approved_at: Option<String>,
    /// The key everything is re-encrypted under (16 lower-case hex characters).
    pub target_key_id: String,
    pub created_at: String,
    pub expires_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    /// Sealed values to re-encrypt, fixed when the job starts.
    pub total: i64,
    pub done: i64,
    /// Values no known key opens: counted, reported, left untouched.
    pub failed: i64,
    pub last_error: Option<String>,
}

/// A created resource.
#[derive(Serialize, ToSchema)]
pub struct Created {
    pub id: Uuid,
}

/// An accepted job.
#[derive(Serialize, ToSchema)]
pub struct JobAccepted {
    pub job_id: String,
}

/// A membership of the caller.
#[derive(Serialize, ToSchema)]
pub struct Membership {
    pub tenant_id: Uuid,
    pub role: String,
    pub scopes: Vec<String>,
}

/// The caller.
#[derive(Serialize, ToSchema)]
pub struct Me {
    pub id: Uuid,
    /// `user` or `service`.
    pub kind: String,
    pub email: Option<String>,
    pub memberships: Vec<Membership>,
    pub platform_scopes: Vec<String>,
}

/// A membership after `PUT`.
#[derive(Serialize, ToSchema)]
pub struct MemberSet {
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    pub role: String,
}

/// `/healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// `/readyz`: each dependency `ok` or `unavailable`.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    pub postgres: String,
    pub redis: String,
}
