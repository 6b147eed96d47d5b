//! `gatehouse tenants create | rotate-secret | webhook-url | set-limits | show`: `create`'s
//! output (the id, then the owner invitation's token) and `webhook-url` here; `rotate-secret`'s
//! arguments and body in `rotate_secret.rs`; `set-limits` and `show` in `limits.rs`.

mod limits;
mod rotate_secret;

use std::collections::HashMap;
use std::io::Read;

use clap::Subcommand;
use secrecy::SecretString;

use super::process::{connect_db, load_config, runtime};
use super::{Failure, stdin};
use crate::config::Config;
use crate::tenants::{NewTenant, TenantError};

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Create a tenant. Reads `twilio_auth_token=…` and optionally `store_api_key=…`,
    /// `webhook_shared_key_id=…`, `webhook_shared_key=…` from stdin; prints the tenant id, and
    /// with `--owner-email` an `invite_token=…` line (the owner invitation, shown once).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        twilio_account_sid: String,
        #[arg(long)]
        store_url: Option<String>,
        /// Issue an owner invitation, recorded as meant for this address (the address itself
        /// grants nothing: whoever accepts the token becomes the owner).
        #[arg(long)]
        owner_email: Option<String>,
    },
    /// Replace one tenant secret; the new value is read from stdin (`twilio_auth_token=…`,
    /// `store_api_key=…`, or `webhook_shared_key_id=…` + `webhook_shared_key=…`).
    RotateSecret(rotate_secret::RotateSecretArgs),
    /// Print the URL to paste into Twilio's console for this tenant (from PUBLIC_BASE_URL).
    WebhookUrl {
        #[arg(long)]
        tenant: String,
    },
    /// Cap the tenant's jobs in flight in one queue, across every worker (overrides
    /// TENANT_MAX_IN_FLIGHT_{QUEUE}); takes effect at once.
    SetLimits(limits::SetLimitsArgs),
    /// Print the tenant, its caps, and its jobs in flight and waiting in each queue.
    Show {
        #[arg(long)]
        tenant: uuid::Uuid,
    },
}

/// Runs a `tenants` subcommand.
pub(super) fn run(command: TenantsCommand) -> anyhow::Result<()> {
    match command {
        TenantsCommand::RotateSecret(args) => {
            let config = load_config(false)?;
            runtime()?.block_on(rotate_secret::rotate(&config, args))
        }
        TenantsCommand::Create {
            name,
            twilio_account_sid,
            store_url,
            owner_email,
        } => {
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .map_err(|_| Failure::Invalid("stdin could not be read".into()))?;
            let mut secrets = stdin::parse(
                &input,
                &[
                    "twilio_auth_token",
                    "store_api_key",
                    "webhook_shared_key_id",
                    "webhook_shared_key",
                ],
            )
            .map_err(Failure::Invalid)?;
            let new = new_tenant(
                name,
                twilio_account_sid,
                store_url,
                owner_email,
                &mut secrets,
            )?;
            new.validate()
                .map_err(|e| Failure::Invalid(e.to_string()))?;
            let config = load_config(false)?;
            new.check_store_url(&crate::tenants::store_url_policy(&config))
                .map_err(|e| Failure::Invalid(e.to_string()))?;
            runtime()?.block_on(create(&config, &new))
        }
        TenantsCommand::WebhookUrl { tenant } => {
            let config = load_config(false)?;
            runtime()?.block_on(webhook_url(&config, &tenant))
        }
        TenantsCommand::SetLimits(args) => {
            let config = load_config(false)?;
            runtime()?.block_on(limits::set_limits(&config, args))
        }
        TenantsCommand::Show { tenant } => {
            let config = load_config(false)?;
            runtime()?.block_on(limits::show(&config, tenant))
        }
    }
}

/// The tenant from its flags and stdin's secrets.
fn new_tenant(
    name: String,
    twilio_account_sid: String,
    store_url: Option<String>,
    owner_email: Option<String>,
    secrets: &mut HashMap<String, SecretString>,
) -> anyhow::Result<NewTenant> {
    let twilio_auth_token = secrets
        .remove("twilio_auth_token")
        .ok_or_else(|| Failure::Invalid("stdin must contain twilio_auth_token=…".into()))?;
    let shared_id = secrets.remove("webhook_shared_key_id");
    let shared_key = secrets.remove("webhook_shared_key");
    let webhook_shared_key = match (shared_id, shared_key) {
        (Some(id), Some(key)) => {
            use secrecy::ExposeSecret;
            Some((id.expose_secret().to_owned(), key))
        }
        (None, None) => None,
        _ => {
            return Err(Failure::Invalid(
                "webhook_shared_key_id and webhook_shared_key go together".into(),
            )
            .into());
        }
    };
    Ok(NewTenant {
        name,
        twilio_account_sid,
        twilio_auth_token,
        store_url,
        store_api_key: secrets.remove("store_api_key"),
        webhook_shared_key,
        owner_email,
    })
}

/// Creates the tenant and prints its id on the first line; with `--owner-email`, the owner
/// invitation's token on the next as `invite_token=…` (shown once, stored only hashed).
async fn create(config: &Config, new: &NewTenant) -> anyhow::Result<()> {
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
async fn webhook_url(config: &Config, tenant: &str) -> anyhow::Result<()> {
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
