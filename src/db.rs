//! PostgreSQL pool and migrations.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::{PgPool, postgres::PgPoolOptions};

/// The migrations embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a pool with bounded waits, so a PostgreSQL outage fails requests and jobs fast
/// instead of parking them.
pub async fn connect(url: &SecretString, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    options(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url.expose_secret())
        .await
}

/// How long a connection given back to the pool may take to answer a ping.
pub const RELEASE_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Pool options every pool shares: a connection given back is pinged within
/// [`RELEASE_PING_TIMEOUT`] and dropped without ceremony if it does not answer. sqlx's own
/// release check pings without a bound: a connection whose query was cancelled (an attempt
/// past its time limit) behind a network path that stopped answering would hold its pool
/// slot for good.
fn options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .after_release(|conn, _meta| {
            Box::pin(async move {
                use sqlx::Connection;
                match tokio::time::timeout(RELEASE_PING_TIMEOUT, conn.ping()).await {
                    Ok(Ok(())) => Ok(true),
                    Ok(Err(error)) => Err(error),
                    Err(_) => Err(sqlx::Error::Io(std::io::ErrorKind::TimedOut.into())),
                }
            })
        })
}

/// A pool that connects on first use (startup must not fail because PostgreSQL is down
/// for a moment; `/readyz` tells).
pub fn connect_lazy(url: &SecretString, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    options(max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy(url.expose_secret())
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
