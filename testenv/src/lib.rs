//! gatehouse-testenv: the environment gatehouse runs in under the integration tests
//! (`tests/it`) and the system benchmark (`bench/`). It owns the per-run PostgreSQL database and
//! Redis namespace ([`TestEnv`]: created, migrated, removed afterwards even on panic), the
//! configuration variables, the in-process ingress and workers ([`TestServer`],
//! [`TestWorker`]), the `gatehouse` processes and their plumbing ([`process`]: the binary, free
//! ports, HTTP clients, waiting for health, SIGTERM), a private [`RedisServer`] and the
//! [`fault_proxy`]. A missing PostgreSQL or Redis is an error (a failed test), never a skip.

pub mod fault_proxy;
pub mod process;
mod redis_server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse::config::Config;
use gatehouse::http::AppState;
use gatehouse::redis_conn::{RedisConn, RedisTarget};
use gatehouse::tenants::NewTenant;
use gatehouse::worker::{WorkerOptions, WorkerState};
use gatehouse_jobs::client::Queues;
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

pub use process::{
    KillOnDrop, chat_completion, client, client_builder, confident_order_status, eventually,
    eventually_every, free_port, gatehouse_bin, kill, process_cpu_us, run_cli, terminate,
    terminate_within, try_free_port, wait_healthy,
};
pub use redis_server::{LocalCluster, OneNodeCluster, RedisServer, ReplicatedRedis};

/// Why an environment could not be set up (every message names the variable to fix and never
/// a value: the URLs may hold passwords).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("PostgreSQL must be running (TEST_DATABASE_URL): {0}")]
    Postgres(#[source] sqlx::Error),
    #[error("TEST_DATABASE_URL is not a URL: {0}")]
    Url(#[from] url::ParseError),
    #[error("the migrations do not apply: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("Redis must be running (REDIS_URL): {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the configuration is invalid: {0}")]
    Config(#[from] gatehouse::config::ConfigError),
    #[error(
        "{name} not found next to {dir} (build it in the same profile: cargo build -p gatehouse, with --release for a release build)"
    )]
    BinaryNotFound { name: String, dir: String },
    #[error("redis-server could not be started (scripts/test and scripts/bench install it): {0}")]
    RedisServerSpawn(#[source] std::io::Error),
    #[error("redis-server did not listen on port {0} within 10 s")]
    RedisServerNotListening(u16),
    #[error("redis-server did not exit within {0:?}")]
    RedisServerStillRunning(std::time::Duration),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub const PUBLIC_BASE: &str = "https://gh.example.com";
pub const TOKEN: &str = "12345abcdef67890fedcba0987654321";
pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn with_database(url: &str, db: &str) -> Result<String, Error> {
    let mut parsed = url::Url::parse(url)?;
    parsed.set_path(&format!("/{db}"));
    Ok(parsed.to_string())
}

/// Logs to the test's captured output; installs the process-wide TLS provider once.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// A fixed, valid key set and the tests' short timings (test and bench values only).
pub fn base_vars(db_url: &str, namespace: &str) -> HashMap<String, String> {
    let mut vars = HashMap::new();
    for (k, v) in [
        ("DATABASE_URL", db_url.to_owned()),
        ("REDIS_URL", redis_url()),
        (
            "SECRET_KEY",
            "test-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz".to_owned(),
        ),
        (
            "JWT_SECRET_KEY",
            "jwt-ZYXWVUTSRQPONMLKJIHGFEDCBA-9876543210-zyxwv".to_owned(),
        ),
        (
            "ENCRYPTION_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_owned(),
        ),
        ("PUBLIC_BASE_URL", PUBLIC_BASE.to_owned()),
        ("TRUSTED_PROXIES", "127.0.0.1/32".to_owned()),
        ("QUEUE_NAMESPACE", namespace.to_owned()),
        ("WORKER_CONCURRENCY", "8".to_owned()),
        ("WORKER_HEARTBEAT_SECONDS", "1".to_owned()),
        ("WORKER_MISSED_HEARTBEATS", "3".to_owned()),
        ("WORKER_GRACE_SECONDS", "10".to_owned()),
        // Short retries, so failing jobs reach their dead letter within a test.
        ("JOB_RETRY_BASE_MS_INBOUND_MESSAGE", "100".to_owned()),
        ("JOB_RETRY_CAP_MS_INBOUND_MESSAGE", "400".to_owned()),
        ("JOB_RETRY_BASE_MS_SYNC_CATALOG", "100".to_owned()),
        ("JOB_RETRY_CAP_MS_SYNC_CATALOG", "400".to_owned()),
        // The fake stores of the catalog and worker tests listen on loopback, which a store
        // may reach only when the operator opens it; tests of the refusal remove this.
        ("STORE_ALLOWED_NETWORKS", "127.0.0.0/8".to_owned()),
    ] {
        vars.insert(k.to_owned(), v);
    }
    vars
}

pub fn config_from(vars: &HashMap<String, String>) -> Config {
    Config::from_vars(|k| vars.get(k).cloned()).expect("test configuration is valid")
}

/// One test's (or bench run's) database and Redis namespace, and the configuration over them.
pub struct TestEnv {
    pub db_name: String,
    pub db_url: String,
    pub pool: PgPool,
    pub namespace: String,
    pub redis: RedisConn,
    pub vars: HashMap<String, String>,
    pub config: Arc<Config>,
    scratch: Scratch,
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::with_vars(|_| {}).await
    }

    /// A test's environment: [`base_vars`] edited by `edit`; logs go to the test's output.
    pub async fn with_vars(edit: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        init();
        Self::create("test", 30, edit)
            .await
            .expect("the test environment is set up")
    }

    /// A database `gh_{kind}_…` (migrated, with a pool of `max_connections`) and a namespace
    /// `gh{kind}-…`, both removed by [`TestEnv::cleanup`] or on drop; the variables are
    /// [`base_vars`] edited by `edit`.
    pub async fn create(
        kind: &str,
        max_connections: u32,
        edit: impl FnOnce(&mut HashMap<String, String>),
    ) -> Result<Self, Error> {
        let target = RedisTarget::single(SecretString::from(redis_url()));
        Self::create_on(kind, max_connections, target, edit).await
    }

    /// A test's environment on the Redis at `url` (a Redis Cluster node, say): `REDIS_URL`
    /// names it and [`TestEnv::redis`] talks to it.
    pub async fn on_redis(url: &str, edit: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        init();
        let url = url.to_owned();
        let target = RedisTarget::single(SecretString::from(url.clone()));
        Self::create_on("test", 30, target, move |vars| {
            vars.insert("REDIS_URL".into(), url);
            edit(vars);
        })
        .await
        .expect("the test environment is set up")
    }

    /// A test's environment on the Redis Cluster whose nodes `seeds` lists (comma-separated):
    /// `REDIS_CLUSTER=true`, and [`TestEnv::redis`] is a cluster connection.
    pub async fn on_cluster(seeds: &str, edit: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        init();
        let seeds = seeds.to_owned();
        let target = RedisTarget::cluster(
            seeds
                .split(',')
                .map(|s| SecretString::from(s.to_owned()))
                .collect(),
        );
        Self::create_on("test", 30, target, move |vars| {
            vars.insert("REDIS_URL".into(), seeds);
            vars.insert("REDIS_CLUSTER".into(), "true".into());
            edit(vars);
        })
        .await
        .expect("the test environment is set up")
    }

    /// [`TestEnv::create`] with [`TestEnv::redis`] connected to `redis`.
    pub async fn create_on(
        kind: &str,
        max_connections: u32,
        redis: RedisTarget,
        edit: impl FnOnce(&mut HashMap<String, String>),
    ) -> Result<Self, Error> {
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("gh_{kind}_{id}");
        let namespace = format!("gh{kind}-{}", &id[..12]);
        let admin = PgPool::connect(&admin_url())
            .await
            .map_err(Error::Postgres)?;
        let created = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&admin)
            .await;
        admin.close().await;
        created.map_err(Error::Postgres)?;
        // From here on, whatever fails removes what was made.
        let scratch = Scratch {
            db_name: db_name.clone(),
            namespace: namespace.clone(),
            removed: false,
        };
        let db_url = with_database(&admin_url(), &db_name)?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&db_url)
            .await
            .map_err(Error::Postgres)?;
        gatehouse::db::migrate(&pool).await?;
        let mut vars = base_vars(&db_url, &namespace);
        edit(&mut vars);
        let config = Arc::new(Config::from_vars(|k| vars.get(k).cloned())?);
        let redis = gatehouse::redis_conn::connect(&redis).await?;
        Ok(Self {
            db_name,
            db_url,
            pool,
            namespace,
            redis,
            vars,
            config,
            scratch,
        })
    }

    /// The security-event recorder a process of this test would use (its own small pool to
    /// the test's database, budgets and alerts counted under the test's namespace).
    pub fn events(&self) -> gatehouse::events::SecurityLog {
        gatehouse::events::SecurityLog::new(
            self.pool.clone(),
            self.redis.clone(),
            self.namespace.clone(),
        )
    }

    pub fn queues(&self) -> Queues {
        self.config.queues()
    }

    /// A tenant with [`ACCOUNT_SID`] and [`TOKEN`] (sealed like any other).
    pub async fn create_tenant(&self) -> Uuid {
        self.try_create_tenant().await.expect("tenant created")
    }

    /// [`TestEnv::create_tenant`], its error returned.
    pub async fn try_create_tenant(&self) -> Result<Uuid, gatehouse::tenants::TenantError> {
        gatehouse::tenants::create(
            &self.pool,
            &self.config.keyring,
            &NewTenant {
                name: "Shop".into(),
                twilio_account_sid: ACCOUNT_SID.into(),
                twilio_auth_token: SecretString::from(TOKEN.to_owned()),
                store_url: None,
                store_api_key: None,
                webhook_shared_key: None,
                owner_email: None,
            },
        )
        .await
    }

    /// The ingress state over this env's configuration, database and Redis.
    pub fn app_state(&self) -> Arc<AppState> {
        Arc::new(AppState::new(
            self.config.clone(),
            self.pool.clone(),
            self.redis.clone(),
        ))
    }

    pub async fn start_server(&self) -> TestServer {
        TestServer::start(self.app_state()).await
    }

    pub fn worker_state(&self) -> Arc<WorkerState> {
        self.worker_state_with(self.pool.clone())
    }

    /// Worker state over another pool (e.g. one whose PostgreSQL is unreachable).
    pub fn worker_state_with(&self, pool: PgPool) -> Arc<WorkerState> {
        Arc::new(WorkerState::new(pool, &self.config).expect("store client builds"))
    }

    /// The workers' options as `gatehouse work` would derive them from this test's variables.
    pub fn worker_options(&self) -> WorkerOptions {
        WorkerOptions::from_config(&self.config)
    }

    /// Runs the workers in this process until the returned handle is stopped.
    pub fn start_worker(&self) -> TestWorker {
        self.start_worker_with(Duration::from_secs(1))
    }

    /// Runs the workers with the given heartbeat interval.
    pub fn start_worker_with(&self, heartbeat: Duration) -> TestWorker {
        let (tx, rx) = oneshot::channel::<()>();
        let options = WorkerOptions {
            heartbeat,
            ..self.worker_options()
        };
        let task = tokio::spawn(gatehouse::worker::run(
            self.worker_state(),
            self.redis.clone(),
            self.queues(),
            options,
            async move {
                let _ = rx.await;
            },
        ));
        TestWorker {
            stop: Some(tx),
            task,
        }
    }

    /// One job's metadata (its `:meta` entry; empty when it has none).
    pub async fn job_meta(&self, queue: &str, job_id: &str) -> gatehouse_jobs::keys::JobMeta {
        let mut redis = self.redis.clone();
        let raw: Option<String> = redis::cmd("HGET")
            .arg(self.queues().keys(queue).meta())
            .arg(job_id)
            .query_async(&mut redis)
            .await
            .expect("hget meta");
        gatehouse_jobs::keys::JobMeta::parse(raw.as_deref())
    }

    /// Sets one field of a job's metadata, as a hand edit (or an attacker with Redis access)
    /// would.
    pub async fn set_job_meta(&self, queue: &str, job_id: &str, field: &str, value: &str) {
        let mut meta = self.job_meta(queue, job_id).await;
        meta.0.insert(field.to_owned(), value.to_owned());
        let json = serde_json::to_string(&meta.0).expect("meta json");
        let mut redis = self.redis.clone();
        let () = redis::cmd("HSET")
            .arg(self.queues().keys(queue).meta())
            .arg(job_id)
            .arg(json)
            .query_async(&mut redis)
            .await
            .expect("hset meta");
    }

    /// Jobs waiting on a queue's active list.
    pub async fn queued(&self, queue: &str) -> i64 {
        let mut redis = self.redis.clone();
        redis::cmd("LLEN")
            .arg(format!("{}:{{{queue}:0}}:active", self.namespace))
            .query_async(&mut redis)
            .await
            .expect("llen")
    }

    /// Waits (at most `within`) for a job to land in a queue's dead set.
    pub async fn wait_for_dead(&self, queue: &str, job_id: &str, within: Duration) -> bool {
        let mut redis = self.redis.clone();
        let key = format!("{}:{{{queue}:0}}:dead", self.namespace);
        let start = Instant::now();
        loop {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(&key)
                .arg(job_id)
                .query_async(&mut redis)
                .await
                .expect("zscore");
            let dead = score.is_some();
            if dead || start.elapsed() > within {
                return dead;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the built binary with this test's environment.
    pub fn spawn(&self, args: &[&str], extra: &[(&str, &str)]) -> std::process::Child {
        std::process::Command::new(gatehouse_bin())
            .args(args)
            .env_clear()
            .envs(self.vars.iter())
            .envs(extra.iter().copied())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn gatehouse")
    }

    /// Starts the built binary with piped stdin and stdout (for commands that read secrets
    /// from stdin and print results).
    pub fn spawn_piped(&self, args: &[&str]) -> std::process::Child {
        std::process::Command::new(gatehouse_bin())
            .args(args)
            .env_clear()
            .envs(self.vars.iter())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn gatehouse")
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .expect("count query")
    }

    /// Polls `sql` (a count) until it equals `want` or the deadline passes; returns the last value.
    pub async fn wait_for_count(&self, sql: &'static str, want: i64, within: Duration) -> i64 {
        let start = Instant::now();
        loop {
            let n = self.count(sql).await;
            if n == want || start.elapsed() > within {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many security events of `kind` are stored.
    pub async fn events_of(&self, kind: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM security_events WHERE type = $1")
            .bind(kind)
            .fetch_one(&self.pool)
            .await
            .expect("count security events")
    }

    /// Polls until at least `at_least` events of `kind` are stored (events are recorded off
    /// the request's path) or 10 s pass; returns the last count.
    pub async fn wait_for_events(&self, kind: &str, at_least: i64) -> i64 {
        let start = Instant::now();
        loop {
            let n = self.events_of(kind).await;
            if n >= at_least || start.elapsed() > Duration::from_secs(10) {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every key of this test's namespace matching `{namespace}:{suffix}` (a `SCAN` pattern),
    /// sorted, each once.
    pub async fn keys_matching(&self, suffix: &str) -> Vec<String> {
        let mut redis = self.redis.clone();
        let pattern = format!("{}:{suffix}", self.namespace);
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut redis)
                .await
                .expect("SCAN the test's namespace");
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// Deletes every key of the namespace (a bench run does, between its figures).
    pub async fn clear_namespace(&self) -> Result<(), Error> {
        clear_namespace(&self.namespace).await
    }

    /// Drops the database and the namespace's keys. (An environment dropped without it, as
    /// when its test panics, is removed by `Drop`.)
    pub async fn cleanup(mut self) {
        self.pool.close().await;
        self.scratch.remove().await;
    }
}

/// What [`TestEnv::create`] made, removed once: by [`TestEnv::cleanup`], else on drop.
struct Scratch {
    db_name: String,
    namespace: String,
    removed: bool,
}

impl Scratch {
    async fn remove(&mut self) {
        if let Err(error) = clear_namespace(&self.namespace).await {
            eprintln!(
                "warning: could not remove Redis namespace {}: {error}",
                self.namespace
            );
        }
        if let Ok(admin) = PgPool::connect(&admin_url()).await {
            if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db_name
            )))
            .execute(&admin)
            .await
            {
                eprintln!("warning: could not drop database {}: {error}", self.db_name);
            }
            admin.close().await;
        }
        self.removed = true;
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let mut scratch = Scratch {
            db_name: std::mem::take(&mut self.db_name),
            namespace: std::mem::take(&mut self.namespace),
            removed: false,
        };
        self.removed = true;
        // The owner's runtime may be unwinding: remove on a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(scratch.remove());
            }
        })
        .join();
    }
}

/// Deletes every key of `namespace` and its entries in apalis-redis's global queue list.
async fn clear_namespace(namespace: &str) -> Result<(), Error> {
    let client = redis::Client::open(redis_url())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{namespace}:*"))
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut redis)
            .await?;
        for chunk in keys.chunks(1000) {
            let _: () = redis::cmd("UNLINK")
                .arg(chunk)
                .query_async(&mut redis)
                .await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // apalis-redis registers every queue's worker set in one global sorted set.
    let registered: Vec<String> = redis::cmd("ZRANGE")
        .arg("core:apalis:queues:list")
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    let ours: Vec<&String> = registered
        .iter()
        .filter(|k| k.starts_with(&format!("{namespace}:")))
        .collect();
    if !ours.is_empty() {
        let _: () = redis::cmd("ZREM")
            .arg("core:apalis:queues:list")
            .arg(ours)
            .query_async(&mut redis)
            .await?;
    }
    Ok(())
}

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(state: Arc<AppState>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gatehouse::http::serve(listener, state, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            stop: Some(tx),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

pub struct TestWorker {
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), gatehouse::worker::WorkerError>>,
}

impl TestWorker {
    pub async fn stop(mut self) -> Result<(), gatehouse::worker::WorkerError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("worker stops within its grace period")
            .expect("worker task did not panic")
    }
}
