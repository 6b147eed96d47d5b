//! Test harness: every test gets its own PostgreSQL database and its own Redis namespace,
//! both removed afterwards. A missing service fails the test; nothing is skipped.
#![allow(dead_code)]

pub mod fault_proxy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse::config::Config;
use gatehouse::http::AppState;
use gatehouse::security::twilio::{Algorithm, sign_form};
use gatehouse::tenants::NewTenant;
use gatehouse::worker::{WorkerOptions, WorkerState};
use gatehouse_jobs::client::Queues;
use redis::aio::ConnectionManager;
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

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

fn with_database(url: &str, db: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("TEST_DATABASE_URL is a URL");
    parsed.set_path(&format!("/{db}"));
    parsed.to_string()
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

/// A fixed, valid key set (tests only).
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

/// One test's database and Redis namespace.
pub struct TestEnv {
    pub db_name: String,
    pub db_url: String,
    pub pool: PgPool,
    pub namespace: String,
    pub redis: ConnectionManager,
    pub vars: HashMap<String, String>,
    pub config: Arc<Config>,
    cleaned: bool,
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::with_vars(|_| {}).await
    }

    pub async fn with_vars(edit: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        init();
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("gh_test_{id}");
        let admin = PgPool::connect(&admin_url())
            .await
            .expect("PostgreSQL must be running (TEST_DATABASE_URL)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let db_url = with_database(&admin_url(), &db_name);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(30)
            .connect(&db_url)
            .await
            .expect("connect test database");
        gatehouse::db::migrate(&pool)
            .await
            .expect("migrations apply");
        let namespace = format!("ghtest-{}", &id[..12]);
        let mut vars = base_vars(&db_url, &namespace);
        edit(&mut vars);
        let config = Arc::new(config_from(&vars));
        let redis = gatehouse::queue::connect(&SecretString::from(redis_url()))
            .await
            .expect("Redis must be running (REDIS_URL)");
        Self {
            db_name,
            db_url,
            pool,
            namespace,
            redis,
            vars,
            config,
            cleaned: false,
        }
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
        Queues::new(self.namespace.clone())
    }

    pub async fn create_tenant(&self) -> Uuid {
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
        .expect("tenant created")
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

    /// Jobs waiting on a queue's active list.
    pub async fn queued(&self, queue: &str) -> i64 {
        let mut redis = self.redis.clone();
        redis::cmd("LLEN")
            .arg(format!("{}:{queue}:active", self.namespace))
            .query_async(&mut redis)
            .await
            .expect("llen")
    }

    /// Waits (at most `within`) for a job to land in a queue's dead set.
    pub async fn wait_for_dead(&self, queue: &str, job_id: &str, within: Duration) -> bool {
        let mut redis = self.redis.clone();
        let key = format!("{}:{queue}:dead", self.namespace);
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
        std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
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
        std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
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

    /// Drops the database and the namespace's keys. (A test that panics before calling it
    /// is cleaned up by `Drop`.)
    pub async fn cleanup(mut self) {
        self.pool.close().await;
        remove_namespace_and_database(&self.namespace, &self.db_name).await;
        self.cleaned = true;
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let namespace = self.namespace.clone();
        let db_name = self.db_name.clone();
        // The test's runtime may be unwinding: clean up on a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(remove_namespace_and_database(&namespace, &db_name));
            }
        })
        .join();
    }
}

async fn remove_namespace_and_database(namespace: &str, db_name: &str) {
    if let Ok(client) = redis::Client::open(redis_url())
        && let Ok(mut redis) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{namespace}:*"))
            .query_async(&mut redis)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await;
        }
        // apalis-redis registers every queue in one global sorted set.
        for queue in gatehouse_jobs::QUEUES {
            let _: Result<(), _> = redis::cmd("ZREM")
                .arg("core:apalis:queues:list")
                .arg(format!("{namespace}:{queue}:workers"))
                .query_async(&mut redis)
                .await;
        }
    }
    if let Ok(admin) = PgPool::connect(&admin_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
        admin.close().await;
    }
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

/// Sends SIGTERM and waits (at most 15 s) for the process to exit.
pub fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..300 {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("process did not exit within 15 s of SIGTERM");
}

/// A fresh Twilio-style message SID.
pub fn message_sid() -> String {
    format!("SM{}", Uuid::new_v4().simple())
}

/// The form parameters Twilio sends for an inbound SMS.
pub fn sms_params(sid: &str, from: &str, body: &str) -> Vec<(String, String)> {
    vec![
        ("MessageSid".into(), sid.into()),
        ("SmsSid".into(), sid.into()),
        ("AccountSid".into(), ACCOUNT_SID.into()),
        ("From".into(), from.into()),
        ("To".into(), "+14155550199".into()),
        ("Body".into(), body.into()),
        ("NumMedia".into(), "0".into()),
    ]
}

pub fn webhook_path(tenant: Uuid) -> String {
    format!("/v1/webhooks/twilio/{tenant}/messages")
}

/// A signed form request as Twilio would send it (behind a TLS-terminating proxy on loopback).
pub fn signed_form(
    client: &reqwest::Client,
    server: &TestServer,
    tenant: Uuid,
    params: &[(String, String)],
) -> reqwest::RequestBuilder {
    signed_form_with(client, server, tenant, params, TOKEN)
}

/// Like `signed_form`, signed with `token`.
pub fn signed_form_with(
    client: &reqwest::Client,
    server: &TestServer,
    tenant: Uuid,
    params: &[(String, String)],
    token: &str,
) -> reqwest::RequestBuilder {
    let path = webhook_path(tenant);
    let refs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let signature = sign_form(
        &format!("{PUBLIC_BASE}{path}"),
        &refs,
        token.as_bytes(),
        Algorithm::HmacSha1,
    );
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    client
        .post(server.url(&path))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", signature)
        .body(body)
}

/// A loopback server that plays Sentry: it keeps the body of every envelope it is sent.
pub async fn fake_sentry() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let store = seen.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let store = store.clone();
        async move {
            if let Ok(mut all) = store.lock() {
                all.push(String::from_utf8_lossy(&body).into_owned());
            }
            "{}"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

/// Waits until `check` holds or `within` passes (polling every 50 ms); returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    loop {
        if check().await {
            return true;
        }
        if start.elapsed() > within {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A loopback HTTP server that answers every request with `status` and an empty body (a
/// reachable endpoint failing on its own: its answers count as the job's attempts).
pub async fn answering(status: u16) -> SocketAddr {
    let status = axum::http::StatusCode::from_u16(status).expect("a status code");
    let app = axum::Router::new().fallback(move || async move { status });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// Runs the built binary to completion with exactly `vars` as its environment and `stdin` as
/// its input (secrets go in there, never in argv).
pub fn run_cli(args: &[&str], vars: &HashMap<String, String>, stdin: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(args)
        .env_clear()
        .envs(vars.iter())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn gatehouse");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("gatehouse runs")
}

/// The password of the users the helpers below create.
pub const PASSWORD: &str = "correct horse battery staple";

/// A request as it arrives through the (trusted, loopback) TLS-terminating proxy.
pub fn api(
    http: &reqwest::Client,
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
) -> reqwest::RequestBuilder {
    http.request(method, server.url(path))
        .header("x-forwarded-proto", "https")
}

/// A user with [`PASSWORD`] and an optional platform role.
pub async fn create_user(
    env: &TestEnv,
    email: &str,
    role: Option<gatehouse::access::PlatformRole>,
) -> Uuid {
    gatehouse::accounts::create_user(
        &env.pool,
        &gatehouse::security::password::Hasher::owasp(),
        gatehouse::accounts::NewUser {
            email: email.into(),
            password: SecretString::from(PASSWORD),
            first_name: "Test".into(),
            last_name: "User".into(),
            platform_role: role,
        },
    )
    .await
    .expect("user created")
}

/// Logs `email` in with [`PASSWORD`] (asserting 200); its access token.
pub async fn login(http: &reqwest::Client, server: &TestServer, email: &str) -> String {
    let r = api(http, server, reqwest::Method::POST, "/v1/auth/login")
        .json(&serde_json::json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200, "login of {email}");
    let body: serde_json::Value = r.json().await.expect("json");
    body["access_token"].as_str().expect("token").to_owned()
}

/// Makes `user` a member of `tenant` with `role` (straight in the database).
pub async fn add_member(
    env: &TestEnv,
    tenant: Uuid,
    user: Uuid,
    role: gatehouse::access::TenantRole,
) {
    sqlx::query("INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, $3)")
        .bind(tenant)
        .bind(user)
        .bind(role.as_str())
        .execute(&env.pool)
        .await
        .expect("membership");
}
