//! `gatehouse users create | deactivate | activate | set-platform-role`. `create` reads the
//! password from stdin and prints the user id; the incident commands take effect on the
//! user's next request with every token and session (see `crate::principals`), record a
//! security event and print one confirmation line.

use std::io::Read;

use clap::Subcommand;
use serde_json::json;

use super::process::{connect_db, load_config, runtime, tools};
use super::{Failure, account_failure, principal_failure, stdin};
use crate::access::PlatformRole;
use crate::config::Config;
use crate::events::EventType;
use crate::principals;

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user. Reads `password=…` from stdin; prints the user id.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long)]
        first_name: String,
        #[arg(long)]
        last_name: String,
        /// platform_admin, security_officer or service.
        #[arg(long)]
        platform_role: Option<String>,
    },
    #[command(flatten)]
    Incident(UsersIncidentCommand),
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

/// Runs a `users` subcommand.
pub(super) fn run(command: UsersCommand) -> anyhow::Result<()> {
    match command {
        UsersCommand::Create {
            email,
            first_name,
            last_name,
            platform_role,
        } => {
            let platform_role = match platform_role.as_deref() {
                None => None,
                Some(r) => Some(PlatformRole::parse(r).ok_or_else(|| {
                    Failure::Invalid(
                        "--platform-role must be platform_admin, security_officer or service"
                            .into(),
                    )
                })?),
            };
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .map_err(|_| Failure::Invalid("stdin could not be read".into()))?;
            let mut secrets = stdin::parse(&input, &["password"]).map_err(Failure::Invalid)?;
            let password = secrets
                .remove("password")
                .ok_or_else(|| Failure::Invalid("stdin must contain password=…".into()))?;
            let mut new = crate::accounts::NewUser {
                email,
                password,
                first_name,
                last_name,
                platform_role,
            };
            new.validate()
                .map_err(|e| Failure::Invalid(e.to_string()))?;
            let config = load_config(false)?;
            runtime()?.block_on(async {
                let pool = connect_db(&config).await?;
                let hasher = crate::security::password::Hasher::owasp();
                let id = crate::accounts::create_user(&pool, &hasher, new)
                    .await
                    .map_err(account_failure)?;
                println!("{id}");
                Ok(())
            })
        }
        UsersCommand::Incident(command) => {
            let config = load_config(false)?;
            runtime()?.block_on(incident(&config, command))
        }
    }
}

/// Runs a `users deactivate | activate | set-platform-role` subcommand.
async fn incident(config: &Config, command: UsersIncidentCommand) -> anyhow::Result<()> {
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
