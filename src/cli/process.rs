//! Process wiring: the configuration loaded (and `.env` for `dev`), the tokio runtime, the
//! connections a command opens, `migrate`, and the long-running processes — `serve` (the
//! ingress), `work` (the workers) and `dev` (migrate, then both in one process) — that run
//! until SIGINT/SIGTERM.

use std::sync::Arc;

use tokio::sync::watch;

use super::Failure;
use super::account_failure;
use super::telemetry::telemetry;
use crate::access::ScopeCache;
use crate::config::Config;
use crate::events::SecurityLog;
use crate::http::AppState;
use crate::worker::{WorkerOptions, WorkerState};

/// The validated configuration from the environment (and `.env` first, for `dev`); every
/// problem at once, exit 1.
pub(super) fn load_config(read_dotenv: bool) -> anyhow::Result<Config> {
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

/// The multi-threaded tokio runtime a command runs on.
pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// `gatehouse migrate`: the pending migrations, then the legacy-hash step.
pub(super) fn migrate() -> anyhow::Result<()> {
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

/// `gatehouse serve`: the ingress on every interface (behind a proxy or in a container).
pub(super) fn serve_command() -> anyhow::Result<()> {
    let config = Arc::new(load_config(false)?);
    let _guard = telemetry(&config);
    // Behind a proxy or in a container: every interface.
    let every = std::net::Ipv4Addr::UNSPECIFIED.into();
    runtime()?.block_on(serve(config, every, shutdown_signal()))
}

/// `gatehouse work`: every queue's workers.
pub(super) fn work_command() -> anyhow::Result<()> {
    let config = Arc::new(load_config(false)?);
    let _guard = telemetry(&config);
    runtime()?.block_on(work(config, None, shutdown_signal()))
}

/// `gatehouse dev --listen ADDR`: reads `.env`, then migrates, serves and works.
pub(super) fn dev_command(listen: std::net::IpAddr) -> anyhow::Result<()> {
    let config = Arc::new(load_config(true)?);
    let _guard = telemetry(&config);
    runtime()?.block_on(dev(config, listen))
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

/// A small pool for a one-shot command; unreachable PostgreSQL exits 2.
pub(super) async fn connect_db(config: &Config) -> anyhow::Result<sqlx::PgPool> {
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
    let queues = config.queues();
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

/// What an incident command (`users deactivate`, `service-accounts revoke`, …) works with.
pub(super) struct Tools {
    pub(super) pool: sqlx::PgPool,
    pub(super) redis: crate::redis_conn::RedisConn,
    pub(super) cache: ScopeCache,
    pub(super) events: SecurityLog,
}

/// Connects an incident command: PostgreSQL, Redis (unreachable: exit 2), its security log.
pub(super) async fn tools(config: &Config) -> anyhow::Result<Tools> {
    let pool = connect_db(config).await?;
    let redis = crate::redis_conn::connect(&config.redis_url)
        .await
        .map_err(|e| Failure::Service(format!("Redis cannot be reached: {e}")))?;
    let events = SecurityLog::new(pool.clone(), redis.clone(), config.redis_namespace.clone());
    Ok(Tools {
        pool,
        redis,
        cache: ScopeCache::new(config.redis_namespace.clone()),
        events,
    })
}
