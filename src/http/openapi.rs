//! The API description: an OpenAPI 3.1 document generated from the handlers' `#[utoipa::path]`
//! annotations (routes and docs are registered together through `utoipa_axum::routes!`, see
//! `http::routes`), the bearer scheme, the schemas of string enums the handlers parse, and
//! `GET /openapi.json`. Each request and response body is the type its handler reads or
//! returns, declared beside that handler.

use std::sync::LazyLock;

use axum::Json;
use utoipa::openapi::OpenApi as Document;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

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

/// Fields a handler accepts only together, stated as JSON Schema's `dependentRequired` (which
/// the derive cannot write): `POST /v1/tenants`'s webhook shared key and its id. Applied to
/// the finished document, since the handlers' schemas join it after `ApiDoc`'s modifiers.
struct PairedFields;

impl Modify for PairedFields {
    fn modify(&self, openapi: &mut Document) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        if let Some(RefOr::T(Schema::Object(tenant))) = components.schemas.get_mut("CreateTenant") {
            tenant
                .extensions
                .get_or_insert_with(Default::default)
                .insert(
                    "dependentRequired".to_owned(),
                    serde_json::json!({
                        "webhook_shared_key_id": ["webhook_shared_key"],
                        "webhook_shared_key": ["webhook_shared_key_id"],
                    }),
                );
        }
    }
}

/// The whole document, built once from the router's registrations.
pub static DOCUMENT: LazyLock<Document> = LazyLock::new(|| {
    let mut document = super::routes().split_for_parts().1;
    PairedFields.modify(&mut document);
    document
});

/// This document.
#[utoipa::path(
    operation_id = "openapi_json",
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
pub async fn openapi_json() -> Json<&'static Document> {
    Json(&DOCUMENT)
}

/// A string schema holding one of `values` (for fields a handler parses into an enum).
fn one_of(values: &[&str], description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
        .description(Some(description))
        .build()
}

/// A member's role (`access::TenantRole`).
pub fn tenant_role() -> Object {
    one_of(&TENANT_ROLES, "A member's role in its tenant")
}

/// The names `access::TenantRole::parse` reads (a test checks they are all of them).
pub const TENANT_ROLES: [&str; 3] = ["owner", "admin", "agent"];

/// What a token speaks for (`security::jwt::SubjectKind`).
pub fn subject_kind() -> Object {
    one_of(&["user", "service"], "`user` or `service`")
}

/// How much of a catalog a sync reads (`gatehouse_jobs::SyncMode`).
pub fn sync_mode() -> Object {
    one_of(
        &["incremental", "full"],
        "`incremental` (the default: upsert what the store returns) or `full` (also delete products the store no longer has)",
    )
}

/// A key rotation's state (`rotation::Rotation::status`).
pub fn rotation_status() -> Object {
    one_of(
        &[
            "pending_approval",
            "queued",
            "running",
            "completed",
            "failed",
            "expired",
        ],
        "The rotation's state",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_roles_are_the_ones_the_handlers_read() {
        for role in TENANT_ROLES {
            let parsed = crate::access::TenantRole::parse(role).expect("a role");
            assert_eq!(parsed.as_str(), role);
        }
        for role in [
            crate::access::TenantRole::Owner,
            crate::access::TenantRole::Admin,
            crate::access::TenantRole::Agent,
        ] {
            assert!(TENANT_ROLES.contains(&role.as_str()), "{}", role.as_str());
        }
    }

    #[test]
    fn every_operation_has_its_own_id() {
        let mut seen = std::collections::BTreeSet::new();
        for (path, item) in &DOCUMENT.paths.paths {
            for (method, operation) in [
                ("get", &item.get),
                ("put", &item.put),
                ("post", &item.post),
                ("delete", &item.delete),
                ("patch", &item.patch),
            ] {
                let Some(operation) = operation else { continue };
                let id = operation.operation_id.clone().expect("an operation id");
                assert!(seen.insert(id.clone()), "{method} {path}: {id} twice");
            }
        }
        assert!(seen.len() >= 25, "{seen:?}");
    }
}
