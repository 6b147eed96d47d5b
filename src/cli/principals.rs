//! Who may act, and shutting them out: `service-accounts create | list | revoke` and
//! `users deactivate | activate | set-platform-role`. Each change takes effect on the next
//! request of every token and session of the principal (see `crate::principals`), records a
//! security event and prints one confirmation line. Secrets are printed once, at creation.

use clap::{ArgGroup, Subcommand};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::{Failure, account_failure, connect_db};
use crate::access::{PlatformRole, ScopeCache};
use crate::accounts::TenantBinding;
use crate::config::Config;
use crate::events::{EventType, SecurityLog};
use crate::principals::{self, PrincipalError};

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

#[derive(Debug, Subcommand)]
pub enum UsersIncidentCommand {
    /// Deactivate a user: its tokens and dashboard sessions are refused from the next
    /// request on, and its logins fail as a wrong password does.
    Deactivate {
        #[arg(long)]
        email: String,
    },
    /// Reactivate a deactivated user.
    Activate {
        #[arg(long)]
        email: String,
    },
    /// Grant, change or remove (`none`) a user's platform role, effective from the next request.
    SetPlatformRole {
        #[arg(long)]
        email: String,
        /// platform_admin, security_officer, service, or none.
        #[arg(long)]
        role: String,
    },
}

fn principal_failure(error: PrincipalError) -> anyhow::Error {
    match error {
        PrincipalError::UnknownUser(_) | PrincipalError::UnknownServiceAccount(_) => {
            Failure::Invalid(error.to_string()).into()
        }
        PrincipalError::Database(_) | PrincipalError::Cache(_) => {
            Failure::Service(error.to_string()).into()
        }
    }
}

struct Tools {
    pool: sqlx::PgPool,
    redis: redis::aio::ConnectionManager,
    cache: ScopeCache,
    events: SecurityLog,
}

async fn tools(config: &Config) -> anyhow::Result<Tools> {
    let pool = connect_db(config).await?;
    let redis = crate::redis_conn::connect(&config.redis_url)
        .await
        .map_err(|e| Failure::Service(format!("Redis cannot be reached: {e}")))?;
    let events = SecurityLog::new(pool.clone(), redis.clone(), config.queue_namespace.clone());
    Ok(Tools {
        pool,
        redis,
        cache: ScopeCache::new(config.queue_namespace.clone()),
        events,
    })
}

fn time(t: Option<OffsetDateTime>) -> String {
    t.and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "never".to_owned())
}

/// Runs a `service-accounts` subcommand.
pub async fn service_accounts(
    config: &Config,
    command: ServiceAccountsCommand,
) -> anyhow::Result<()> {
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

/// Runs a `users deactivate | activate | set-platform-role` subcommand.
pub async fn users(config: &Config, command: UsersIncidentCommand) -> anyhow::Result<()> {
    match command {
        UsersIncidentCommand::Deactivate { email } | UsersIncidentCommand::Activate { email }
            if email.trim().is_empty() =>
        {
            Err(Failure::Invalid("--email must not be empty".into()).into())
        }
        UsersIncidentCommand::Deactivate { email } => set_active(config, &email, false).await,
        UsersIncidentCommand::Activate { email } => set_active(config, &email, true).await,
        UsersIncidentCommand::SetPlatformRole { email, role } => {
            // Validate before connecting, so a typo exits 1, not 2.
            let role = match role.as_str() {
                "none" => None,
                other => Some(PlatformRole::parse(other).ok_or_else(|| {
                    Failure::Invalid(
                        "--role must be platform_admin, security_officer, service or none".into(),
                    )
                })?),
            };
            let mut t = tools(config).await?;
            let change =
                principals::set_platform_role(&t.pool, &mut t.redis, &t.cache, &email, role)
                    .await
                    .map_err(principal_failure)?;
            let email = crate::accounts::normalize_email(&email);
            let new = role.map(PlatformRole::as_str);
            t.events
                .record(principals::event(
                    EventType::PlatformRoleChanged,
                    change.id,
                    Some(email.clone()),
                    json!({"from": change.previous, "to": new}),
                ))
                .await;
            println!(
                "platform role of {email} ({}): {} -> {}, effective from the next request",
                change.id,
                change.previous.as_deref().unwrap_or("none"),
                new.unwrap_or("none"),
            );
            Ok(())
        }
    }
}

async fn set_active(config: &Config, email: &str, active: bool) -> anyhow::Result<()> {
    let mut t = tools(config).await?;
    let done = principals::set_user_active(&t.pool, &mut t.redis, &t.cache, email, active)
        .await
        .map_err(principal_failure)?;
    let email = crate::accounts::normalize_email(email);
    let kind = if active {
        EventType::UserActivated
    } else {
        EventType::UserDeactivated
    };
    t.events
        .record(principals::event(
            kind,
            done.id,
            Some(email.clone()),
            json!({"changed": done.changed}),
        ))
        .await;
    let note = if done.changed {
        ""
    } else {
        " (it already was)"
    };
    if active {
        println!("activated user {email} ({}){note}", done.id);
    } else {
        println!(
            "deactivated user {email} ({}){note}: its tokens and dashboard sessions are refused from the next request",
            done.id
        );
    }
    Ok(())
}
