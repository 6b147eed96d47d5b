//! `gatehouse limits reset (--email E | --ip IP | --client-id C)`: an operator lifts a
//! rate-limit lockout by deleting its keys under `QUEUE_NAMESPACE`. Prints one line per key
//! it looked at (`removed …` / `none …`); nothing secret is printed.

use clap::{Args, Subcommand};

use super::Failure;
use crate::config::Config;
use crate::ratelimit::{self, ResetTarget};

#[derive(Debug, Subcommand)]
pub enum LimitsCommand {
    /// Lift a lockout: the per-email failed-login limit (--email), every per-IP limit of an
    /// address (--ip; IPv6 by its /64), or a client id (--client-id).
    Reset(ResetArgs),
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ResetArgs {
    /// An email locked out by failed logins (matched trimmed and lower-cased).
    #[arg(long)]
    email: Option<String>,
    /// A client address (every per-IP limit: register/login/token attempts, refused
    /// unauthenticated requests; an IPv6 address covers its /64).
    #[arg(long)]
    ip: Option<String>,
    /// A service account's client id. Token requests are limited per IP only, so this only
    /// removes a key left from before that change.
    #[arg(long)]
    client_id: Option<String>,
}

fn target(args: ResetArgs) -> Result<ResetTarget, Failure> {
    match (args.email, args.ip, args.client_id) {
        (Some(email), None, None) => {
            let email = ratelimit::normalize_email(&email);
            if email.is_empty() || email.len() > 320 {
                return Err(Failure::Invalid("--email must not be empty".into()));
            }
            Ok(ResetTarget::Email(email))
        }
        (None, Some(ip), None) => ip
            .trim()
            .parse()
            .map(ResetTarget::Ip)
            .map_err(|_| Failure::Invalid("--ip must be an IPv4 or IPv6 address".into())),
        (None, None, Some(id)) => {
            let ok = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(Failure::Invalid("--client-id must be a client id".into()));
            }
            Ok(ResetTarget::ClientId(id))
        }
        _ => Err(Failure::Invalid(
            "exactly one of --email, --ip, --client-id is required".into(),
        )),
    }
}

/// Runs a `limits` subcommand.
pub async fn run(config: &Config, command: LimitsCommand) -> anyhow::Result<()> {
    let LimitsCommand::Reset(args) = command;
    // Validate before touching Redis, so a typo exits 1, not 2.
    let target = target(args)?;
    let unreachable = |error: &dyn std::fmt::Display| {
        Failure::Service(format!("Redis cannot be reached: {error}"))
    };
    let mut conn = crate::redis_conn::connect(&config.redis_url)
        .await
        .map_err(|e| unreachable(&e))?;
    let keys = ratelimit::reset(&mut conn, &config.redis_namespace, &target)
        .await
        .map_err(|e| unreachable(&e))?;
    for key in &keys {
        let state = if key.removed { "removed" } else { "none" };
        println!("{state} {} {}", key.limit, key.subject);
    }
    let removed = keys.iter().filter(|k| k.removed).count();
    if let ResetTarget::ClientId(_) = target {
        println!(
            "note: /v1/auth/token is limited per IP only; to lift a producer's lockout, reset its --ip"
        );
    }
    eprintln!("{removed} rate-limit key(s) removed");
    Ok(())
}
