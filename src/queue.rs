//! Redis connections for the queues, the dedupe keys and (later) rate limits.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2))
}

/// A reconnecting connection that is opened on first use, so a process can start (and say
/// so on `/readyz`) while Redis is down.
pub fn connect_lazy(url: &SecretString) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url.expose_secret())?;
    ConnectionManager::new_lazy_with_config(client, manager_config())
}

/// A reconnecting connection, opened now.
pub async fn connect(url: &SecretString) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url.expose_secret())?;
    ConnectionManager::new_with_config(client, manager_config()).await
}

/// Whether Redis answers a PING.
pub async fn ping(conn: &mut ConnectionManager) -> bool {
    redis::cmd("PING")
        .query_async::<String>(conn)
        .await
        .is_ok_and(|pong| pong == "PONG")
}
