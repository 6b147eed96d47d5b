//! `gatehouse tenants rotate-secret --tenant ID --secret NAME [--previous-valid-for SECONDS]`:
//! replaces one tenant secret (the new value from stdin, never argv), tells every ingress, and
//! records a `tenant_secret_rotated` security event. Prints one confirmation line; never a
//! secret.

use std::io::Read;
use std::time::Duration;

use clap::Args;
use secrecy::ExposeSecret;
use uuid::Uuid;

use crate::cli::process::connect_db;
use crate::cli::{Failure, stdin};
use crate::config::Config;
use crate::events::{EventType, SecurityEvent};
use crate::tenant_secrets::{self, NewValue, RotateError, Secret};

#[derive(Debug, Args)]
pub struct RotateSecretArgs {
    /// The tenant's id.
    #[arg(long)]
    tenant: Uuid,
    /// Which secret: twilio_auth_token, store_api_key or webhook_shared_key.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Secret::NAMES))]
    secret: String,
    /// Seconds the replaced Twilio token or shared key still verifies (Twilio's secondary
    /// token promotion); 0 (the default) refuses it at once.
    #[arg(long, default_value_t = 0)]
    previous_valid_for: u64,
}

/// The new value from stdin's `name=value` lines.
fn new_value(secret: Secret, input: &str) -> Result<NewValue, Failure> {
    let names: &[&str] = match secret {
        Secret::WebhookSharedKey => &["webhook_shared_key_id", "webhook_shared_key"],
        other => &[other.as_str()],
    };
    let mut values = stdin::parse(input, names).map_err(Failure::Invalid)?;
    match secret {
        Secret::WebhookSharedKey => {
            match (
                values.remove("webhook_shared_key_id"),
                values.remove("webhook_shared_key"),
            ) {
                (Some(id), Some(key)) => Ok(NewValue::SharedKey {
                    id: id.expose_secret().to_owned(),
                    key,
                }),
                _ => Err(Failure::Invalid(
                    "stdin must contain webhook_shared_key_id=… and webhook_shared_key=…".into(),
                )),
            }
        }
        other => values
            .remove(other.as_str())
            .map(NewValue::Plain)
            .ok_or_else(|| Failure::Invalid(format!("stdin must contain {}=…", other.as_str()))),
    }
}

pub async fn rotate(config: &Config, args: RotateSecretArgs) -> anyhow::Result<()> {
    let secret = Secret::parse(&args.secret)
        .ok_or_else(|| Failure::Invalid(format!("--secret: unknown secret {}", args.secret)))?;
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|_| Failure::Invalid("stdin could not be read".into()))?;
    let new = new_value(secret, &input)?;
    let overlap = Duration::from_secs(args.previous_valid_for);
    let pool = connect_db(config).await?;
    let rotated =
        tenant_secrets::rotate(&pool, &config.keyring, args.tenant, secret, &new, overlap)
            .await
            .map_err(|e| match e {
                RotateError::Database(e) => Failure::Service(format!("database: {e}")),
                other => Failure::Invalid(other.to_string()),
            })?;
    // Every ingress drops its cached keys of this tenant; without Redis they refresh within
    // TENANT_KEY_CACHE_SECONDS.
    let listening = match crate::redis_conn::connect(&config.redis_url).await {
        Ok(mut redis) => tenant_secrets::notify(&mut redis, &config.redis_namespace, args.tenant)
            .await
            .ok(),
        Err(_) => None,
    };
    let events = crate::events::SecurityLog::new(
        pool.clone(),
        crate::redis_conn::Renewing::lazy(&config.redis_url)?,
        config.redis_namespace.clone(),
    );
    let mut event = SecurityEvent::new(EventType::TenantSecretRotated);
    event.tenant_id = Some(args.tenant);
    event.details = serde_json::json!({
        "secret": secret.as_str(),
        "previous_valid_for_seconds": args.previous_valid_for,
        "keys_version": rotated.keys_version,
        "via": "cli",
    });
    events.record(event).await;
    let until = rotated
        .previous_until
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map(|t| format!("; the previous value verifies until {t}"))
        .unwrap_or_else(|| "; the previous value no longer verifies".to_owned());
    let until = if secret.has_overlap() {
        until
    } else {
        String::new()
    };
    let notice = match listening {
        Some(n) => format!("{n} ingress process(es) notified"),
        None => format!(
            "Redis could not be reached: ingresses pick the change up within TENANT_KEY_CACHE_SECONDS ({} s)",
            config.tenant_key_cache_seconds
        ),
    };
    println!(
        "rotated {} of tenant {} (keys version {}){until}; {notice}",
        secret.as_str(),
        args.tenant,
        rotated.keys_version
    );
    Ok(())
}
