//! `gatehouse keys generate | check | reindex | status`: the encryption and signing keys.
//! `reindex` rewrites every blind index under `SECRET_KEY` (see `crate::reindex`); `status`
//! is the census of which key protects how many sealed values (see `crate::rotation`).

use std::io::{IsTerminal, Write};

use clap::Subcommand;

use super::Failure;
use super::process::{connect_db, load_config, runtime};
use crate::config::Config;
use crate::reindex::{self, Options, Progress};
use crate::security::keyring::EncryptionKey;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print a fresh base64 32-byte key.
    Generate,
    /// Validate ENCRYPTION_KEY, ENCRYPTION_OLD_KEYS, JWT_SECRET_KEY, JWT_SECRET_KEY_PREVIOUS,
    /// SECRET_KEY and SECRET_KEY_PREVIOUS.
    Check,
    /// Rewrite every blind index under SECRET_KEY, per tenant (resumable: run it again to
    /// continue). Progress on stderr when it is a terminal; a summary line on stdout.
    Reindex {
        /// Rows per transaction.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch_size: u32,
        /// Stop after about this many rows (whole batches); run again to continue.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Per sealed column, how many values each key id protects; exits 1 when any value's
    /// key is unknown to this configuration.
    Status,
}

/// Runs a `keys` subcommand.
pub(super) fn run(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Generate => {
            let key = EncryptionKey::generate();
            use secrecy::ExposeSecret;
            println!("{}", key.to_base64().expose_secret());
            Ok(())
        }
        KeysCommand::Check => {
            let _ = dotenvy::dotenv();
            crate::config::check_keys_from_env().map_err(|e| {
                Failure::Invalid(format!("key check failed:\n{}", e.to_string().trim_end()))
            })?;
            println!("keys ok");
            Ok(())
        }
        KeysCommand::Reindex { batch_size, limit } => {
            let config = load_config(false)?;
            let options = Options {
                batch_size: batch_size as usize,
                limit,
            };
            runtime()?.block_on(reindex(&config, options))
        }
        KeysCommand::Status => {
            let config = load_config(false)?;
            runtime()?.block_on(status(&config))
        }
    }
}

/// `keys reindex`: progress on stderr while it is a terminal, one summary line on stdout.
/// Exits 1 when some value could not be opened (run it again once its key is configured), 0
/// otherwise, also when stopped early by `--limit`.
async fn reindex(config: &Config, options: Options) -> anyhow::Result<()> {
    let pool = connect_db(config).await?;
    let terminal = std::io::stderr().is_terminal();
    let index = &config.blind_index;
    let report = |p: &Progress| {
        if terminal {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\rreindex: {}   ", p.line());
            let _ = err.flush();
        }
    };
    let result = reindex::run(&pool, &config.keyring, index, options, report).await;
    if terminal {
        eprintln!();
    }
    let p = result.map_err(|e| Failure::Service(e.to_string()))?;
    let state = if p.complete {
        "complete"
    } else {
        "stopped at --limit (run again to continue)"
    };
    println!(
        "reindex {state}: {}; {} duplicate conversation(s) retired; {} unreadable; form {}",
        p.line(),
        p.retired,
        p.unreadable,
        index.form()
    );
    if p.unreadable > 0 {
        return Err(Failure::Invalid(format!(
            "{} value(s) could not be opened with the configured ENCRYPTION_KEY/ENCRYPTION_OLD_KEYS \
             and keep their old blind index; configure their key and run `gatehouse keys reindex` again",
            p.unreadable
        ))
        .into());
    }
    Ok(())
}

/// `gatehouse keys status`: one line per configured key and per (column, key id), then the
/// number of values no configured key opens. Plain, space-separated, for scripts:
///
/// ```text
/// key 3f2a…c4 current
/// key 91be…07 old
/// tenants.twilio_auth_token 3f2a…c4 current 12
/// tenants.twilio_auth_token 91be…07 old 0
/// unknown 0
/// ```
async fn status(config: &Config) -> anyhow::Result<()> {
    let pool = connect_db(config).await?;
    let usage = crate::rotation::key_usage(&pool)
        .await
        .map_err(|e| Failure::Service(format!("database: {e}")))?;
    let keyring = &config.keyring;
    let current = keyring.current_id().to_hex();
    let role = |id: &str| -> &'static str {
        if id == current {
            "current"
        } else if crate::security::keyring::KeyId::from_hex(id).is_some_and(|k| keyring.knows(k)) {
            "old"
        } else {
            "unknown"
        }
    };
    let configured: Vec<String> = keyring.key_ids().iter().map(|k| k.to_hex()).collect();
    for id in &configured {
        println!("key {id} {}", role(id));
    }
    let mut unknown = 0i64;
    for col in crate::rotation::SEALED_COLUMNS {
        let name = col.name();
        let here: Vec<_> = usage.iter().filter(|u| u.column == col).collect();
        // Every configured key, protecting something or nothing, so "the old key protects
        // nothing" reads as a 0.
        for id in &configured {
            let n: i64 = here
                .iter()
                .filter(|u| u.key_id.as_deref() == Some(id.as_str()))
                .map(|u| u.count)
                .sum();
            println!("{name} {id} {} {n}", role(id));
        }
        for u in here.iter().filter(|u| {
            u.key_id
                .as_deref()
                .is_none_or(|id| !configured.iter().any(|c| c == id))
        }) {
            let id = u.key_id.as_deref().unwrap_or("malformed");
            println!("{name} {id} unknown {}", u.count);
            unknown += u.count;
        }
    }
    println!("unknown {unknown}");
    if unknown > 0 {
        return Err(Failure::Invalid(format!(
            "{unknown} sealed value(s) are under a key this configuration does not have"
        ))
        .into());
    }
    Ok(())
}
