//! Telemetry: tracing (JSON lines in production, human-readable with `DEBUG=true`, apalis'
//! per-poll noise off) and Sentry (ERROR events, only when `SENTRY_DSN` is set).

use crate::config::Config;

/// Logs as JSON lines in production, human-readable with `DEBUG=true`; initializes Sentry
/// when `SENTRY_DSN` is set.
pub(super) fn telemetry(config: &Config) -> Option<sentry::ClientInitGuard> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // apalis-core logs each failed poll of a worker at WARN/ERROR; gatehouse supervises its
    // workers and logs an outage once when it starts and once when it ends, so those lines
    // (and the Sentry events ERROR lines become) would only repeat it per probe.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(crate::config::DEFAULT_LOG_FILTER));
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
