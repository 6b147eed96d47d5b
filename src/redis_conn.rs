//! Redis connections (a primitive: it imports only `fault`) for the queues (dedupe tombstones
//! included), the rate limits and the security log: one Redis (a reconnecting
//! `ConnectionManager`) or a Redis Cluster (the `redis` crate's cluster client: it follows
//! `MOVED`/`ASK` redirections, retries `TRYAGAIN` and `CLUSTERDOWN`, refreshes its slot map after
//! a failover, and [`redis::Script`] reloads a script a promoted replica does not have on
//! `NOSCRIPT`).
//! [`RedisTarget`] says which, from `REDIS_URL` and `REDIS_CLUSTER`; [`RedisConn`] is either,
//! behind one `ConnectionLike`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};
use secrecy::{ExposeSecret, SecretString};

/// Where Redis is: one server, or the seed nodes of a Redis Cluster (any reachable one
/// tells the client the rest of the cluster). `Debug` shows neither URLs nor passwords.
#[derive(Clone)]
pub struct RedisTarget {
    nodes: Vec<SecretString>,
    cluster: bool,
}

impl RedisTarget {
    /// One Redis at `url`.
    pub fn single(url: SecretString) -> Self {
        Self {
            nodes: vec![url],
            cluster: false,
        }
    }

    /// A Redis Cluster reached through `seeds` (at least one).
    pub fn cluster(seeds: Vec<SecretString>) -> Self {
        Self {
            nodes: seeds,
            cluster: true,
        }
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The URLs: the one server's, or the cluster's seed nodes.
    pub fn nodes(&self) -> &[SecretString] {
        &self.nodes
    }
}

impl From<SecretString> for RedisTarget {
    fn from(url: SecretString) -> Self {
        Self::single(url)
    }
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("nodes", &self.nodes.len())
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// A connection to one Redis or to a Redis Cluster; clones share it.
#[derive(Clone)]
pub enum RedisConn {
    /// One Redis, reconnecting by itself after I/O errors.
    Single(ConnectionManager),
    /// A Redis Cluster: one connection per node, commands routed by their keys' slot.
    Cluster(Cluster),
}

/// A Redis Cluster connection that is let go after an outage error and opened again on the
/// next command.
///
/// Why: redis-rs 1.8's (and 2.0-rc's) cluster client spins a core while no node answers. Once
/// a command fails and its slot map must be rebuilt, a failed rebuild starts the next one at
/// once and wakes its own task (`ClusterConnInner::poll_flush`: `wake_by_ref` after
/// `poll_recover` fails, with no backoff), so its background task runs flat out for as long as
/// the cluster is gone — with no command pending, for hours. That task lives as long as any
/// clone of its `ClusterConnection`, so holding one through an outage means a busy core; every
/// clone here shares one slot instead, and the first outage error of a connection empties the
/// slot, which ends the task once the commands still running on it finish. What this costs:
/// the first command after an outage error connects to the cluster again (the seeds, then
/// `CLUSTER SLOTS`), a few milliseconds; the callers already back off between attempts while
/// Redis is down, so a dead cluster costs one short connection attempt per attempt, not a core.
#[derive(Clone)]
pub struct Cluster {
    client: Arc<redis::cluster::ClusterClient>,
    current: Arc<Mutex<Option<(u64, ClusterConnection)>>>,
    opened: Arc<AtomicU64>,
}

impl Cluster {
    fn new(client: redis::cluster::ClusterClient, conn: Option<ClusterConnection>) -> Self {
        let opened = Arc::new(AtomicU64::new(u64::from(conn.is_some())));
        Self {
            client: Arc::new(client),
            current: Arc::new(Mutex::new(conn.map(|conn| (1, conn)))),
            opened,
        }
    }

    /// The connection commands go to now (opened here if the last one was let go), with its
    /// number.
    fn connection(&self) -> (u64, ClusterConnection) {
        let mut current = match self.current.lock() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((number, conn)) = current.as_ref() {
            return (*number, conn.clone());
        }
        let number = self.opened.fetch_add(1, Ordering::AcqRel) + 1;
        let conn = self
            .client
            .get_pending_async_connection_with_config(cluster_config());
        *current = Some((number, conn.clone()));
        (number, conn)
    }

    /// A command on connection `number` failed: lets that connection go if the error is an
    /// outage (and no other command already did).
    fn failed(&self, number: u64, error: &RedisError) {
        if !matches!(crate::fault::redis(error), crate::fault::Fault::Outage(_)) {
            return;
        }
        let mut current = match self.current.lock() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.as_ref().is_some_and(|(open, _)| *open == number) {
            *current = None;
            tracing::debug!(%error, "letting the redis cluster connection go after an outage error");
        }
    }

    /// How many connections this has opened (1 after [`connect`]; one more after each outage
    /// error that let one go and a command that needed a new one).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Acquire)
    }

    async fn command(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        let (number, mut conn) = self.connection();
        let result = conn.req_packed_command(cmd).await;
        if let Err(error) = &result {
            self.failed(number, error);
        }
        result
    }

    async fn pipeline(
        &self,
        cmd: &Pipeline,
        offset: usize,
        count: usize,
    ) -> Result<Vec<Value>, RedisError> {
        let (number, mut conn) = self.connection();
        let result = conn.req_packed_commands(cmd, offset, count).await;
        if let Err(error) = &result {
            self.failed(number, error);
        }
        result
    }
}

impl RedisConn {
    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Single(_) => f.write_str("RedisConn::Single"),
            Self::Cluster(_) => f.write_str("RedisConn::Cluster"),
        }
    }
}

impl From<ConnectionManager> for RedisConn {
    fn from(conn: ConnectionManager) -> Self {
        Self::Single(conn)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => Box::pin(conn.command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Self::Cluster(conn) => Box::pin(conn.pipeline(cmd, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            // A cluster has database 0 only.
            Self::Cluster(_) => 0,
        }
    }
}

/// Connect 2 s, answer 5 s (a hang is an outage, not a stuck process).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2))
}

fn cluster_client(seeds: &[SecretString]) -> Result<redis::cluster::ClusterClient, RedisError> {
    ClusterClientBuilder::new(seeds.iter().map(|url| url.expose_secret().to_owned()))
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        // A failover takes the cluster a few seconds (node timeout + election): redirections
        // and CLUSTERDOWN answers are retried within that, then the error is the caller's
        // (an outage: the ingress answers 503, a worker backs off).
        .retries(6)
        .min_retry_wait(100)
        .max_retry_wait(2000)
        .build()
}

fn cluster_config() -> ClusterConfig {
    ClusterConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT)
}

/// A reconnecting connection that is opened on first use, so a process can start (and say
/// so on `/readyz`) while Redis is down.
pub fn connect_lazy(target: &RedisTarget) -> Result<RedisConn, RedisError> {
    if target.cluster {
        let client = cluster_client(&target.nodes)?;
        return Ok(RedisConn::Cluster(Cluster::new(client, None)));
    }
    let url = target.nodes.first().ok_or_else(no_url)?;
    let client = redis::Client::open(url.expose_secret())?;
    Ok(RedisConn::Single(ConnectionManager::new_lazy_with_config(
        client,
        manager_config(),
    )?))
}

/// A reconnecting connection, opened now.
pub async fn connect(target: &RedisTarget) -> Result<RedisConn, RedisError> {
    if target.cluster {
        let client = cluster_client(&target.nodes)?;
        let conn = client
            .get_async_connection_with_config(cluster_config())
            .await?;
        return Ok(RedisConn::Cluster(Cluster::new(client, Some(conn))));
    }
    let url = target.nodes.first().ok_or_else(no_url)?;
    let client = redis::Client::open(url.expose_secret())?;
    Ok(RedisConn::Single(
        ConnectionManager::new_with_config(client, manager_config()).await?,
    ))
}

/// [`connect`] to the one Redis at `url`.
pub async fn connect_url(url: &SecretString) -> Result<RedisConn, RedisError> {
    connect(&RedisTarget::single(url.clone())).await
}

/// [`connect_lazy`] to the one Redis at `url`.
pub fn connect_lazy_url(url: &SecretString) -> Result<RedisConn, RedisError> {
    connect_lazy(&RedisTarget::single(url.clone()))
}

fn no_url() -> RedisError {
    RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL"))
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
/// opens a new connection from `REDIS_URL` (at most once per [`Renewing::MIN_RENEW_INTERVAL`]);
/// the next command uses it. Clones share the connection.
#[derive(Clone)]
pub struct Renewing {
    current: Arc<RwLock<RedisConn>>,
    /// Where renewals connect; `None`: never renewed (a connection handed in without its URL).
    url: Option<Arc<RedisTarget>>,
    renewed_at: Arc<Mutex<Option<Instant>>>,
    /// How many times the connection was renewed.
    generation: Arc<AtomicU64>,
}

impl Renewing {
    /// The least time between two renewals, so an outage that lasts does not open a
    /// connection per failed command.
    pub const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);

    /// A renewing connection opened on first use (see [`connect_lazy`]).
    pub fn lazy(url: &RedisTarget) -> Result<Self, RedisError> {
        Ok(Self::from_manager(connect_lazy(url)?, url))
    }

    /// Wraps an open connection; renewals open new ones from `url`.
    pub fn from_manager(conn: RedisConn, url: &RedisTarget) -> Self {
        Self {
            current: Arc::new(RwLock::new(conn)),
            url: Some(Arc::new(url.clone())),
            renewed_at: Arc::default(),
            generation: Arc::default(),
        }
    }

    /// The current connection (a clone: cheap, shares the connection).
    pub fn get(&self) -> RedisConn {
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

    fn renew_from(&self, url: &RedisTarget) {
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

/// A connection without its URL: used as is, never renewed.
impl From<RedisConn> for Renewing {
    fn from(conn: RedisConn) -> Self {
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

/// Connections of their own, handed out in turn, for commands that block the connection they
/// are sent on: `WAIT` holds a connection until the replicas answer (up to its timeout), so an
/// enqueue that waits for replicas must not share the connection everything else uses — with a
/// replica gone, every rate limit and session read behind it would wait too.
#[derive(Clone)]
pub struct Spread {
    conns: Arc<[Renewing]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
}

impl Spread {
    /// `size` (at least 1) connections to `target`, each opened on first use.
    pub fn lazy(target: &RedisTarget, size: usize) -> Result<Self, RedisError> {
        let conns = (0..size.max(1))
            .map(|_| Renewing::lazy(target))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            conns: conns.into(),
            next: Arc::default(),
        })
    }

    /// The next connection.
    pub fn get(&self) -> Renewing {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
    }
}

impl std::fmt::Debug for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spread")
            .field("connections", &self.conns.len())
            .finish()
    }
}
