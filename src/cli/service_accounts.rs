//! `gatehouse service-accounts create | list | revoke`: the producers' accounts. `create`
//! prints the client secret once; `revoke` takes effect on the account's next request (see
//! `crate::principals`) and records a security event. One confirmation line each; `list` is
//! tab-separated and never shows a secret.

use clap::{ArgGroup, Subcommand};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::process::{connect_db, tools};
use super::{Failure, account_failure, principal_failure};
use crate::accounts::TenantBinding;
use crate::config::Config;
use crate::events::{EventType, SecurityLog};
use crate::principals;

#[derive(Debug, Subcommand)]
pub enum ServiceAccountsCommand {
    /// Create a service account bound to the tenants it may enqueue for; prints
    /// `client_id=…` and `client_secret=…` (shown once).
    #[command(group(ArgGroup::new("binding").required(true).multiple(false).args(["tenants", "all_tenants"])))]
    Create {
        #[arg(long)]
        name: String,
        /// A scope it holds (repeatable): jobs:enqueue, security:read, platform:admin.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// A tenant it may enqueue for (repeatable; jobs:enqueue only).
        #[arg(long = "tenant", value_name = "ID")]
        tenants: Vec<Uuid>,
        /// It may enqueue for every tenant, present and future.
        #[arg(long)]
        all_tenants: bool,
    },
    /// Every service account: id, client id, name, scopes, tenants, status, created and
    /// last-used (last token) times. Never a secret.
    List,
    /// Revoke an account: its tokens are refused from the next request on, and it gets no
    /// new ones.
    Revoke {
        #[arg(long)]
        client_id: String,
    },
}

fn time(t: Option<OffsetDateTime>) -> String {
    t.and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "never".to_owned())
}

/// Runs a `service-accounts` subcommand.
pub(super) async fn run(config: &Config, command: ServiceAccountsCommand) -> anyhow::Result<()> {
    match command {
        ServiceAccountsCommand::Create {
            name,
            scopes,
            tenants,
            all_tenants,
        } => {
            let binding = if all_tenants {
                TenantBinding::All
            } else {
                TenantBinding::Tenants(tenants)
            };
            let pool = connect_db(config).await?;
            let hasher = crate::security::password::Hasher::owasp();
            let creds = crate::accounts::create_bound_service_account(
                &pool, &hasher, &name, &scopes, &binding,
            )
            .await
            .map_err(account_failure)?;
            let tenants = match &binding {
                TenantBinding::All => json!("all"),
                TenantBinding::Tenants(t) => json!(t),
            };
            let events = SecurityLog::without_alerts(pool.clone());
            events
                .record(principals::event(
                    EventType::ServiceAccountCreated,
                    creds.id,
                    None,
                    json!({"client_id": creds.client_id, "scopes": scopes, "tenants": tenants}),
                ))
                .await;
            use secrecy::ExposeSecret;
            println!("client_id={}", creds.client_id);
            println!("client_secret={}", creds.client_secret.expose_secret());
            Ok(())
        }
        ServiceAccountsCommand::List => {
            let pool = connect_db(config).await?;
            let accounts = principals::list_service_accounts(&pool)
                .await
                .map_err(|e| Failure::Service(format!("database: {e}")))?;
            println!("id\tclient_id\tname\tscopes\ttenants\tstatus\tcreated\tlast_used");
            for a in accounts {
                let tenants = if a.all_tenants {
                    "all".to_owned()
                } else if a.tenants.is_empty() {
                    "none".to_owned()
                } else {
                    a.tenants
                        .iter()
                        .map(Uuid::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                };
                let status = match (a.active, a.revoked_at) {
                    (true, _) => "active".to_owned(),
                    (false, Some(at)) => format!("revoked {}", time(Some(at))),
                    (false, None) => "inactive".to_owned(),
                };
                // The name is the operator's free text: tabs and line breaks would break columns.
                let name: String = a
                    .name
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    a.id,
                    a.client_id,
                    name,
                    a.scopes.join(","),
                    tenants,
                    status,
                    time(Some(a.created_at)),
                    time(a.last_used_at),
                );
            }
            Ok(())
        }
        ServiceAccountsCommand::Revoke { client_id } => {
            let client_id = client_id.trim().to_owned();
            if client_id.is_empty() {
                return Err(Failure::Invalid("--client-id must not be empty".into()).into());
            }
            let mut t = tools(config).await?;
            let done =
                principals::revoke_service_account(&t.pool, &mut t.redis, &t.cache, &client_id)
                    .await
                    .map_err(principal_failure)?;
            t.events
                .record(principals::event(
                    EventType::ServiceAccountRevoked,
                    done.id,
                    None,
                    json!({"client_id": client_id, "already_revoked": !done.changed}),
                ))
                .await;
            let note = if done.changed {
                ""
            } else {
                " (it already was)"
            };
            println!(
                "revoked service account {client_id} ({}){note}: its tokens are refused from the next request and it gets no new ones",
                done.id
            );
            Ok(())
        }
    }
}
