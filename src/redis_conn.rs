//! Redis connections (a primitive: it imports only `fault`) for the queues, the dedupe keys,
//! the rate limits and the security log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};
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
pub async fn ping(conn: &mut impl ConnectionLike) -> bool {
    redis::cmd("PING")
        .query_async::<String>(conn)
        .await
        .is_ok_and(|pong| pong == "PONG")
}

/// A Redis connection that replaces itself when it is stuck: redis-rs 1.8's
/// `ConnectionManager` reconnects only after I/O errors, so a reconnect answered with garbage
/// or a server error (`LOADING` during a restart, a middlebox answering nonsense) leaves it
/// failing with that error for good — an ingress holding one would refuse every webhook until
/// restarted. A command failing with an outage error that is not I/O (`crate::fault::redis`)
/// opens a new manager from `REDIS_URL` (at most once per [`Renewing::MIN_RENEW_INTERVAL`]);
/// the next command uses it. Clones share the connection.
#[derive(Clone)]
pub struct Renewing {
    current: Arc<RwLock<ConnectionManager>>,
    /// Where renewals connect; `None`: never renewed (a manager handed in without its URL).
    url: Option<Arc<SecretString>>,
    renewed_at: Arc<Mutex<Option<Instant>>>,
    /// How many times the connection was renewed.
    generation: Arc<AtomicU64>,
}

impl Renewing {
    /// The least time between two renewals, so an outage that lasts does not open a
    /// connection per failed command.
    pub const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);

    /// A renewing connection opened on first use (see [`connect_lazy`]).
    pub fn lazy(url: &SecretString) -> Result<Self, RedisError> {
        Ok(Self::from_manager(connect_lazy(url)?, url))
    }

    /// Wraps an open manager; renewals open new ones from `url`.
    pub fn from_manager(conn: ConnectionManager, url: &SecretString) -> Self {
        Self {
            current: Arc::new(RwLock::new(conn)),
            url: Some(Arc::new(url.clone())),
            renewed_at: Arc::default(),
            generation: Arc::default(),
        }
    }

    /// The current manager (a clone: cheap, shares the connection).
    pub fn get(&self) -> ConnectionManager {
        match self.current.read() {
            Ok(conn) => conn.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Looks at a failed command's error: renews the connection if it may be stuck.
    fn failed(&self, error: &RedisError) {
        let Some(url) = &self.url else {
            return;
        };
        if error.is_io_error()
            || !matches!(crate::fault::redis(error), crate::fault::Fault::Outage(_))
        {
            return;
        }
        let Ok(mut renewed_at) = self.renewed_at.lock() else {
            return;
        };
        if renewed_at.is_some_and(|at| at.elapsed() < Self::MIN_RENEW_INTERVAL) {
            return;
        }
        *renewed_at = Some(Instant::now());
        drop(renewed_at);
        tracing::debug!(%error, "renewing the redis connection after an outage error");
        self.renew_from(url);
    }

    /// Replaces the connection with a new one from the URL now (a no-op without one).
    pub fn renew(&self) {
        if let Some(url) = &self.url {
            self.renew_from(url);
        }
    }

    fn renew_from(&self, url: &SecretString) {
        match connect_lazy(url) {
            Ok(conn) => {
                if let Ok(mut current) = self.current.write() {
                    *current = conn;
                    self.generation.fetch_add(1, Ordering::AcqRel);
                }
            }
            Err(error) => tracing::warn!(%error, "cannot open a new redis connection"),
        }
    }

    /// How many times the connection was renewed (a user holding a clone of an older one
    /// knows its errors are that stale connection's).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A manager without its URL: used as is, never renewed.
impl From<ConnectionManager> for Renewing {
    fn from(conn: ConnectionManager) -> Self {
        Self {
            current: Arc::new(RwLock::new(conn)),
            url: None,
            renewed_at: Arc::default(),
            generation: Arc::default(),
        }
    }
}

impl std::fmt::Debug for Renewing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewing").finish_non_exhaustive()
    }
}

impl ConnectionLike for Renewing {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut conn = self.get();
            let result = conn.req_packed_command(cmd).await;
            if let Err(error) = &result {
                self.failed(error);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut conn = self.get();
            let result = conn.req_packed_commands(cmd, offset, count).await;
            if let Err(error) = &result {
                self.failed(error);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.get().get_db()
    }
}
