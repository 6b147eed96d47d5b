//! `gatehouse keys generate | check | reindex | status`: the encryption and signing keys.
//! `reindex` rewrites every blind index under `SECRET_KEY` (see `crate::reindex`); `status`
//! is the census of which key protects how many sealed values (see `crate::rotation`).

use std::io::{IsTerminal, Write};

use clap::Subcommand;

use super::Failure;
use super::process::{connect_db, load_config, runtime};
use crate::config::Config;
use crate::queue::at_rest::JobState;
use crate::reindex::{self, Options, Progress};
use crate::security::keyring::EncryptionKey;
use gatehouse_jobs::sealed::AtRest;

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
    /// Per sealed column, and per queue and job state for the sealed job payloads in Redis,
    /// how many values each key id protects; exits 1 when any value's key is unknown to this
    /// configuration or a payload in Redis is not sealed.
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

/// `gatehouse keys status`: one line per configured key and per (column, key id), then per
/// (queue, job state, key id) for the sealed job payloads Redis holds (states `queued`,
/// `scheduled`, `in_flight`, `dead`, `retained`, and `unlisted` when there are any), then the
/// number of payloads at rest in plaintext and of values no configured key opens. Plain,
/// space-separated, for scripts:
///
/// ```text
/// key 3f2a…c4 current
/// key 91be…07 old
/// tenants.twilio_auth_token 3f2a…c4 current 12
/// tenants.twilio_auth_token 91be…07 old 0
/// job.inbound_message.queued 3f2a…c4 current 40
/// job.inbound_message.queued 91be…07 old 0
/// job.inbound_message.dead 91be…07 old 2
/// plaintext 0
/// unknown 0
/// ```
///
/// An old key may be retired when every line naming it, columns and payloads, reads 0.
async fn status(config: &Config) -> anyhow::Result<()> {
    let pool = connect_db(config).await?;
    let usage = crate::rotation::key_usage(&pool)
        .await
        .map_err(|e| Failure::Service(format!("database: {e}")))?;
    let mut redis = crate::redis_conn::connect(&config.redis_url)
        .await
        .map_err(|e| Failure::Service(format!("Redis cannot be reached: {e}")))?;
    let payloads = crate::queue::at_rest::census(&mut redis, config.layout())
        .await
        .map_err(|e| Failure::Service(format!("redis: {e}")))?;
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
    let mut plaintext = 0u64;
    for queue in gatehouse_jobs::QUEUES {
        if gatehouse_jobs::sealed::sealed_fields(queue).is_empty() {
            continue;
        }
        for state in JobState::ALL {
            let here: Vec<_> = payloads
                .iter()
                .filter(|c| c.queue == queue && c.state == state)
                .collect();
            if state == JobState::Unlisted && here.is_empty() {
                continue;
            }
            let name = format!("job.{queue}.{}", state.as_str());
            for id in &configured {
                let n: u64 = here
                    .iter()
                    .filter(|c| matches!(c.at_rest, AtRest::Sealed(k) if k.to_hex() == *id))
                    .map(|c| c.count)
                    .sum();
                println!("{name} {id} {} {n}", role(id));
            }
            for c in &here {
                match c.at_rest {
                    AtRest::Sealed(k) if keyring.knows(k) => {}
                    AtRest::Sealed(k) => {
                        println!("{name} {k} unknown {}", c.count);
                        unknown += c.count as i64;
                    }
                    AtRest::Malformed => {
                        println!("{name} malformed unknown {}", c.count);
                        unknown += c.count as i64;
                    }
                    AtRest::Plaintext => {
                        println!("{name} plaintext none {}", c.count);
                        plaintext += c.count;
                    }
                    AtRest::Unsealed => {}
                }
            }
        }
    }
    println!("plaintext {plaintext}");
    println!("unknown {unknown}");
    if unknown > 0 {
        return Err(Failure::Invalid(format!(
            "{unknown} sealed value(s) are under a key this configuration does not have"
        ))
        .into());
    }
    if plaintext > 0 {
        return Err(Failure::Invalid(format!(
            "{plaintext} job payload(s) in Redis hold customer data in plaintext (enqueued by a \
             producer that does not seal); a key rotation seals them"
        ))
        .into());
    }
    Ok(())
}
