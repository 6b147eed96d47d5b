//! `tenants create` (its output: the id, then the owner invitation's token) and
//! `tenants webhook-url`.

use super::{Failure, connect_db};
use crate::config::Config;
use crate::tenants::{NewTenant, TenantError};

/// Creates the tenant and prints its id on the first line; with `--owner-email`, the owner
/// invitation's token on the next as `invite_token=…` (shown once, stored only hashed).
pub(super) async fn create(config: &Config, new: &NewTenant) -> anyhow::Result<()> {
    let pool = connect_db(config).await?;
    let ttl = std::time::Duration::from_secs(config.invite_ttl_seconds);
    let created = crate::tenants::create_with_invitation(&pool, &config.keyring, new, ttl)
        .await
        .map_err(|e| match e {
            TenantError::Database(e) => Failure::Service(format!("database: {e}")),
            other => Failure::Invalid(other.to_string()),
        })?;
    println!("{}", created.id);
    if let Some(invitation) = &created.invitation {
        use secrecy::ExposeSecret;
        println!("invite_token={}", invitation.token.expose_secret());
        eprintln!(
            "the owner signs in and sends this token to POST /v1/invitations/accept before {}; \
             it is shown only now",
            invitation
                .expires_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Prints the URL to paste into Twilio's console ("A message comes in", HTTP POST): exactly
/// the URL the ingress verifies this tenant's signatures against.
pub(super) async fn webhook_url(config: &Config, tenant: &str) -> anyhow::Result<()> {
    let tenant_id = uuid::Uuid::parse_str(tenant)
        .map_err(|_| Failure::Invalid("--tenant must be a tenant id (a UUID)".into()))?;
    let base = config.public_base().ok_or_else(|| {
        Failure::Invalid(
            "PUBLIC_BASE_URL is not set: it is the external https://host[:port] Twilio calls, \
             and the webhook URL is built from it"
                .into(),
        )
    })?;
    let pool = connect_db(config).await?;
    let exists = crate::tenants::exists(&pool, tenant_id)
        .await
        .map_err(|e| Failure::Service(format!("database: {e}")))?;
    if !exists {
        return Err(Failure::Invalid(format!("no tenant with id {tenant_id}")).into());
    }
    println!("{}", crate::tenants::webhook_url(base, tenant_id));
    Ok(())
}
