//! The command line: `gatehouse serve | work | migrate | dev | keys | tenants | users |
//! service-accounts | jobs | limits`.
//!
//! Exit codes: 0 success, 1 usage or validation error, 2 a service (PostgreSQL, Redis)
//! cannot be reached. Secrets are read from stdin as `name=value` lines, never from argv.

mod jobs;
mod limits;
mod principals;
mod reindex;
mod secrets;
mod stdin;
mod tenants;

use std::collections::HashMap;
use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use secrecy::SecretString;
use tokio::sync::watch;

use crate::config::Config;
use crate::http::AppState;
use crate::security::keyring::EncryptionKey;
use crate::worker::{WorkerOptions, WorkerState};

#[derive(Debug, Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "The secure job backbone: ingress, workers, operators' tools"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP ingress.
    Serve,
    /// Run a worker process (every queue) until SIGTERM/SIGINT.
    Work,
    /// Apply pending migrations and exit.
    Migrate,
    /// Migrate, serve and work in one process (reads .env), for a laptop.
    Dev {
        /// The address the ingress (and `WORKER_HEALTH_PORT`) listens on: loopback unless
        /// told otherwise, since `dev` runs with `DEBUG=true`.
        #[arg(long, value_name = "ADDR", default_value_t = std::net::Ipv4Addr::LOCALHOST.into())]
        listen: std::net::IpAddr,
    },
    /// Encryption and signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Tenants.
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// Dead-letter operations.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Users.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Service accounts (producers).
    #[command(subcommand, name = "service-accounts")]
    ServiceAccounts(principals::ServiceAccountsCommand),
    /// Rate limits: lift a lockout.
    #[command(subcommand)]
    Limits(limits::LimitsCommand),
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
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
    Incident(principals::UsersIncidentCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
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

#[derive(Debug, Subcommand)]
enum TenantsCommand {
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
    RotateSecret(secrets::RotateSecretArgs),
    /// Print the URL to paste into Twilio's console for this tenant (from PUBLIC_BASE_URL).
    WebhookUrl {
        #[arg(long)]
        tenant: String,
    },
}

/// A failure with its exit code.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Service(String),
}

fn exit_code(error: &anyhow::Error) -> u8 {
    match error.downcast_ref::<Failure>() {
        Some(Failure::Service(_)) => 2,
        _ => 1,
    }
}

/// Parses argv and runs the command.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() { 1 } else { 0 };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    if let Err(error) = run(cli) {
        eprintln!("error: {error:#}");
        return ExitCode::from(exit_code(&error));
    }
    ExitCode::SUCCESS
}

fn load_config(read_dotenv: bool) -> anyhow::Result<Config> {
    if read_dotenv {
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(error) if error.not_found() => {}
            Err(_) => {
                return Err(Failure::Invalid(".env could not be read or parsed".into()).into());
            }
        }
    }
    Config::from_env().map_err(|e| {
        let lines = e.to_string();
        Failure::Invalid(format!("invalid configuration:\n{}", lines.trim_end())).into()
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keys(KeysCommand::Generate) => {
            let key = EncryptionKey::generate();
            use secrecy::ExposeSecret;
            println!("{}", key.to_base64().expose_secret());
            Ok(())
        }
        Command::Keys(KeysCommand::Check) => {
            let _ = dotenvy::dotenv();
            crate::config::check_keys_from_env().map_err(|e| {
                Failure::Invalid(format!("key check failed:\n{}", e.to_string().trim_end()))
            })?;
            println!("keys ok");
            Ok(())
        }
        Command::Keys(KeysCommand::Reindex { batch_size, limit }) => {
            let config = load_config(false)?;
            let options = crate::reindex::Options {
                batch_size: batch_size as usize,
                limit,
            };
            runtime()?.block_on(reindex::run(&config, options))
        }
        Command::Keys(KeysCommand::Status) => {
            let config = load_config(false)?;
            runtime()?.block_on(keys_status(&config))
        }
        Command::Migrate => {
            let config = load_config(false)?;
            telemetry(&config);
            runtime()?.block_on(async {
                let pool = connect_db(&config).await?;
                crate::db::migrate(&pool)
                    .await
                    .map_err(|e| Failure::Service(format!("migration failed: {e}")))?;
                tracing::info!("migrations applied");
                wrap_legacy_hashes(&pool).await
            })
        }
        Command::Users(UsersCommand::Create {
            email,
            first_name,
            last_name,
            platform_role,
        }) => {
            let platform_role = match platform_role.as_deref() {
                None => None,
                Some(r) => Some(crate::access::PlatformRole::parse(r).ok_or_else(|| {
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
        Command::ServiceAccounts(command) => {
            let config = load_config(false)?;
            runtime()?.block_on(principals::service_accounts(&config, command))
        }
        Command::Users(UsersCommand::Incident(command)) => {
            let config = load_config(false)?;
            runtime()?.block_on(principals::users(&config, command))
        }
        Command::Serve => {
            let config = Arc::new(load_config(false)?);
            let _guard = telemetry(&config);
            // Behind a proxy or in a container: every interface.
            let every = std::net::Ipv4Addr::UNSPECIFIED.into();
            runtime()?.block_on(serve(config, every, shutdown_signal()))
        }
        Command::Work => {
            let config = Arc::new(load_config(false)?);
            let _guard = telemetry(&config);
            runtime()?.block_on(work(config, None, shutdown_signal()))
        }
        Command::Dev { listen } => {
            let config = Arc::new(load_config(true)?);
            let _guard = telemetry(&config);
            runtime()?.block_on(dev(config, listen))
        }
        Command::Jobs(command) => {
            let config = load_config(false)?;
            runtime()?.block_on(jobs::run(&config, command))
        }
        Command::Limits(command) => {
            let config = load_config(false)?;
            runtime()?.block_on(limits::run(&config, command))
        }
        Command::Tenants(TenantsCommand::RotateSecret(args)) => {
            let config = load_config(false)?;
            runtime()?.block_on(secrets::rotate(&config, args))
        }
        Command::Tenants(TenantsCommand::Create {
            name,
            twilio_account_sid,
            store_url,
            owner_email,
        }) => {
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
            runtime()?.block_on(tenants::create(&config, &new))
        }
        Command::Tenants(TenantsCommand::WebhookUrl { tenant }) => {
            let config = load_config(false)?;
            runtime()?.block_on(tenants::webhook_url(&config, &tenant))
        }
    }
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
async fn keys_status(config: &Config) -> anyhow::Result<()> {
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

fn account_failure(error: crate::accounts::AccountError) -> anyhow::Error {
    use crate::accounts::AccountError;
    match error {
        AccountError::Database(e) => Failure::Service(format!("database: {e}")).into(),
        other => Failure::Invalid(other.to_string()).into(),
    }
}

/// The `migrate` step after the schema: no bare legacy SHA-256 hash stays at rest.
async fn wrap_legacy_hashes(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let hasher = crate::security::password::Hasher::owasp();
    let wrapped = crate::accounts::wrap_legacy_hashes(pool, &hasher)
        .await
        .map_err(account_failure)?;
    tracing::info!(
        wrapped,
        "legacy SHA-256 password hashes wrapped in argon2id"
    );
    Ok(())
}

fn new_tenant(
    name: String,
    twilio_account_sid: String,
    store_url: Option<String>,
    owner_email: Option<String>,
    secrets: &mut HashMap<String, SecretString>,
) -> anyhow::Result<crate::tenants::NewTenant> {
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
    Ok(crate::tenants::NewTenant {
        name,
        twilio_account_sid,
        twilio_auth_token,
        store_url,
        store_api_key: secrets.remove("store_api_key"),
        webhook_shared_key,
        owner_email,
    })
}

/// Logs as JSON lines in production, human-readable with `DEBUG=true`; initializes Sentry
/// when `SENTRY_DSN` is set.
fn telemetry(config: &Config) -> Option<sentry::ClientInitGuard> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // apalis-core logs each failed poll of a worker at WARN/ERROR; gatehouse supervises its
    // workers and logs an outage once when it starts and once when it ends, so those lines
    // (and the Sentry events ERROR lines become) would only repeat it per probe.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,apalis_core=off"));
    let (pretty, json) = if config.debug {
        (
            Some(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)),
            None,
        )
    } else {
        let json = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true);
        (None, Some(json))
    };
    // ERROR events (critical security events, jobs that failed for good) become Sentry
    // events; nothing is sent while no client is bound (SENTRY_DSN unset).
    let sentry_errors =
        sentry::integrations::tracing::ErrorLayer::new().with_filter(LevelFilter::ERROR);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(pretty)
        .with(json)
        .with(sentry_errors)
        .try_init();
    let dsn = config.sentry_dsn.as_ref()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    use secrecy::ExposeSecret;
    let mut options = sentry::ClientOptions::default();
    options.release = sentry::release_name!();
    options.send_default_pii = false;
    let guard = sentry::init((dsn.expose_secret(), options));
    Some(guard)
}

async fn connect_db(config: &Config) -> anyhow::Result<sqlx::PgPool> {
    crate::db::connect(&config.database_url, 5)
        .await
        .map_err(|e| Failure::Service(format!("PostgreSQL cannot be reached: {e}")).into())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}

async fn serve(
    config: Arc<Config>,
    ip: std::net::IpAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if config.public_base_url.is_none() {
        return Err(Failure::Invalid(
            "PUBLIC_BASE_URL: required to serve (the URL Twilio calls, e.g. https://gh.example.com)".into(),
        )
        .into());
    }
    let pool = crate::db::connect_lazy(&config.database_url, 20)
        .map_err(|e| Failure::Invalid(format!("DATABASE_URL: {e}")))?;
    let redis = crate::redis_conn::connect_lazy(&config.redis_url)
        .map_err(|e| Failure::Invalid(format!("REDIS_URL: {e}")))?;
    let addr = std::net::SocketAddr::new(ip, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Failure::Invalid(format!("PORT: cannot listen on {addr}: {e}")))?;
    tracing::info!(%addr, debug = config.debug, "serving");
    let state = Arc::new(AppState::new(config, pool, redis));
    crate::http::serve(listener, state, shutdown).await?;
    tracing::info!("ingress stopped");
    Ok(())
}

/// `health_ip`: where `WORKER_HEALTH_PORT` listens, when not on every interface.
async fn work(
    config: Arc<Config>,
    health_ip: Option<std::net::IpAddr>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    // Lazy: a worker started during a PostgreSQL outage waits it out like one already running
    // (its probe says when PostgreSQL answers), instead of exiting.
    let pool = crate::db::connect_lazy(
        &config.database_url,
        (config.worker_concurrency as u32 + 2).min(50),
    )
    .map_err(|e| Failure::Invalid(format!("DATABASE_URL: {e}")))?;
    let redis = crate::redis_conn::connect(&config.redis_url)
        .await
        .map_err(|e| Failure::Service(format!("Redis cannot be reached: {e}")))?;
    let state =
        Arc::new(WorkerState::new(pool, &config).map_err(|e| Failure::Invalid(e.to_string()))?);
    let mut options = WorkerOptions::from_config(&config);
    if let Some(ip) = health_ip {
        options.health_ip = ip;
    }
    let queues = gatehouse_jobs::client::Queues::new(config.queue_namespace.clone());
    crate::worker::run(state, redis, queues, options, shutdown).await?;
    tracing::info!("workers stopped");
    Ok(())
}

async fn dev(config: Arc<Config>, listen: std::net::IpAddr) -> anyhow::Result<()> {
    let pool = connect_db(&config).await?;
    crate::db::migrate(&pool)
        .await
        .map_err(|e| Failure::Service(format!("migration failed: {e}")))?;
    tracing::info!("migrations applied");
    wrap_legacy_hashes(&pool).await?;
    let (tx, rx) = watch::channel(false);
    let tx = Arc::new(tx);
    let on_signal = Arc::clone(&tx);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = on_signal.send(true);
    });
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let web = serve(config.clone(), listen, wait(rx.clone()));
    let workers = work(config, Some(listen), wait(rx));
    tokio::pin!(web, workers);
    // Whichever half ends first (a signal, or a failure such as a port in use) stops the
    // other, so `dev` never lingers half-alive.
    tokio::select! {
        result = &mut web => {
            let _ = tx.send(true);
            let other = workers.await;
            result.and(other)
        }
        result = &mut workers => {
            let _ = tx.send(true);
            let other = web.await;
            result.and(other)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_listen(args: &[&str]) -> Result<std::net::IpAddr, clap::Error> {
        let cli = Cli::try_parse_from(["gatehouse", "dev"].iter().chain(args))?;
        match cli.command {
            Command::Dev { listen } => Ok(listen),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn dev_listens_on_loopback_unless_given_another_address() {
        assert_eq!(dev_listen(&[]).expect("parses").to_string(), "127.0.0.1");
        assert_eq!(
            dev_listen(&["--listen", "0.0.0.0"])
                .expect("parses")
                .to_string(),
            "0.0.0.0"
        );
        assert_eq!(
            dev_listen(&["--listen", "::1"])
                .expect("parses")
                .to_string(),
            "::1"
        );
        assert!(dev_listen(&["--listen", "localhost"]).is_err());
        assert!(dev_listen(&["--listen", "127.0.0.1:8080"]).is_err());
    }
}
