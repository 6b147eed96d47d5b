//! One benchmark run's own PostgreSQL database and Redis namespace, removed afterwards
//! (also when the run fails or panics).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gatehouse_jobs::client::Queues;
use redis::aio::ConnectionManager;
use secrecy::SecretString;
use sqlx::PgPool;
use uuid::Uuid;

/// The signed URL's base (what `PUBLIC_BASE_URL` says Twilio calls).
pub const PUBLIC_BASE: &str = "https://bench.gatehouse.invalid";
/// The bench tenant's Twilio auth token (a fixed test value, not a secret).
pub const TWILIO_TOKEN: &str = "bench0123456789abcdef0123456789ab";
pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
/// The login flood's account.
pub const LOGIN_EMAIL: &str = "bench@example.com";
pub const LOGIN_PASSWORD: &str = "correct horse battery staple 42";

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let mut parsed = url::Url::parse(url).context("TEST_DATABASE_URL is not a URL")?;
    parsed.set_path(&format!("/{db}"));
    Ok(parsed.to_string())
}

/// The benchmark's database, namespace and the environment its child processes get.
pub struct BenchEnv {
    pub db_name: String,
    pub db_url: String,
    pub pool: PgPool,
    pub namespace: String,
    pub redis: ConnectionManager,
    pub vars: HashMap<String, String>,
    pub config: std::sync::Arc<gatehouse::config::Config>,
    cleaned: bool,
}

impl BenchEnv {
    pub async fn new() -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("gh_bench_{id}");
        let admin = PgPool::connect(&admin_url())
            .await
            .context("PostgreSQL must be running (TEST_DATABASE_URL)")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&admin)
            .await
            .context("failed to create the bench database")?;
        admin.close().await;
        let db_url = with_database(&admin_url(), &db_name)?;
        let namespace = format!("ghbench-{}", &id[..12]);
        let mut env = Self {
            db_name,
            db_url: db_url.clone(),
            pool: sqlx::postgres::PgPoolOptions::new()
                .max_connections(20)
                .connect_lazy(&db_url)?,
            namespace: namespace.clone(),
            redis: gatehouse::redis_conn::connect(&SecretString::from(redis_url()))
                .await
                .context("Redis must be running (REDIS_URL)")?,
            vars: base_vars(&db_url, &namespace),
            config: std::sync::Arc::new(
                gatehouse::config::Config::from_vars(|k| {
                    base_vars(&db_url, &namespace).get(k).cloned()
                })
                .map_err(|e| anyhow::anyhow!("bench configuration: {e}"))?,
            ),
            cleaned: false,
        };
        gatehouse::db::migrate(&env.pool)
            .await
            .context("failed to migrate the bench database")?;
        env.cleaned = false;
        Ok(env)
    }

    pub fn queues(&self) -> Queues {
        Queues::new(self.namespace.clone())
    }

    pub fn queue_key(&self, queue: &str) -> String {
        self.queues().queue_key(queue)
    }

    /// Creates the bench tenant (its Twilio token sealed like any other).
    pub async fn create_tenant(&self) -> anyhow::Result<Uuid> {
        gatehouse::tenants::create(
            &self.pool,
            &self.config.keyring,
            &gatehouse::tenants::NewTenant {
                name: "Bench shop".into(),
                twilio_account_sid: ACCOUNT_SID.into(),
                twilio_auth_token: SecretString::from(TWILIO_TOKEN.to_owned()),
                store_url: None,
                store_api_key: None,
                webhook_shared_key: None,
                owner_email: None,
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("failed to create the bench tenant: {e}"))
    }

    /// Creates the login flood's user.
    pub async fn create_user(&self) -> anyhow::Result<Uuid> {
        gatehouse::accounts::create_user(
            &self.pool,
            &gatehouse::security::password::Hasher::owasp(),
            gatehouse::accounts::NewUser {
                email: LOGIN_EMAIL.into(),
                password: SecretString::from(LOGIN_PASSWORD.to_owned()),
                first_name: "Bench".into(),
                last_name: "User".into(),
                platform_role: None,
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("failed to create the bench user: {e}"))
    }

    /// Deletes every key of the namespace (between runs: queues, dedupe keys, caches).
    pub async fn clear_namespace(&self) -> anyhow::Result<()> {
        clear_namespace(&self.namespace).await
    }

    /// `gatehouse` with this run's environment (the release binary next to this one).
    pub fn gatehouse(&self, args: &[&str], extra: &[(&str, &str)]) -> anyhow::Result<Child> {
        self.gatehouse_logging_to(args, extra, Stdio::inherit())
    }

    /// [`BenchEnv::gatehouse`] with its log (stderr) sent to `log` instead of ours.
    pub fn gatehouse_logging_to(
        &self,
        args: &[&str],
        extra: &[(&str, &str)],
        log: Stdio,
    ) -> anyhow::Result<Child> {
        let mut cmd = Command::new(sibling_binary("gatehouse")?);
        self.configure(&mut cmd, extra);
        cmd.args(args)
            .stderr(log)
            .spawn()
            .context("failed to start the gatehouse binary")
    }

    /// This very binary (for the ingress server processes) with the run's environment.
    pub fn myself(&self, args: &[&str], extra: &[(&str, &str)]) -> anyhow::Result<Child> {
        let mut cmd = Command::new(std::env::current_exe()?);
        self.configure(&mut cmd, extra);
        cmd.args(args)
            .spawn()
            .context("failed to start a gatehouse-bench server process")
    }

    /// Runs `gatehouse ARGS` to its end (a CLI command such as `jobs dead`) and returns its
    /// output.
    pub async fn gatehouse_output(
        &self,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> anyhow::Result<std::process::Output> {
        let mut cmd = Command::new(sibling_binary("gatehouse")?);
        self.configure(&mut cmd, extra);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        tokio::process::Command::from(cmd)
            .output()
            .await
            .context("failed to run the gatehouse binary")
    }

    /// `extra` wins over the run's variables, `RUST_LOG` (`GH_BENCH_RUST_LOG`, else `warn`)
    /// included.
    fn configure(&self, cmd: &mut Command, extra: &[(&str, &str)]) {
        cmd.env_clear()
            .envs(self.vars.iter())
            .env(
                "RUST_LOG",
                std::env::var("GH_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for passed in ["PATH", "GH_BENCH_HASH_CONCURRENCY"] {
            if let Ok(value) = std::env::var(passed) {
                cmd.env(passed, value);
            }
        }
    }

    pub async fn cleanup(mut self) {
        self.pool.close().await;
        remove(&self.namespace, &self.db_name).await;
        self.cleaned = true;
    }
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let namespace = self.namespace.clone();
        let db_name = self.db_name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(remove(&namespace, &db_name));
            }
        })
        .join();
    }
}

/// The environment gatehouse processes of the run get (fixed, valid bench keys).
fn base_vars(db_url: &str, namespace: &str) -> HashMap<String, String> {
    [
        ("DATABASE_URL", db_url.to_owned()),
        ("REDIS_URL", redis_url()),
        (
            "SECRET_KEY",
            "bench-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz".to_owned(),
        ),
        (
            "JWT_SECRET_KEY",
            "jwt-bench-ZYXWVUTSRQPONMLKJIHGFEDCBA-9876543210".to_owned(),
        ),
        (
            "ENCRYPTION_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_owned(),
        ),
        ("PUBLIC_BASE_URL", PUBLIC_BASE.to_owned()),
        ("TRUSTED_PROXIES", "127.0.0.1/32".to_owned()),
        ("QUEUE_NAMESPACE", namespace.to_owned()),
        ("WORKER_CONCURRENCY", crate::WORKER_CONCURRENCY.to_string()),
        ("WORKER_HEARTBEAT_SECONDS", "5".to_owned()),
        ("WORKER_MISSED_HEARTBEATS", "3".to_owned()),
        ("WORKER_GRACE_SECONDS", "10".to_owned()),
        // The login flood must reach argon2, not the limiter.
        ("RATE_LIMIT_LOGIN_IP", "1000000/m".to_owned()),
        ("RATE_LIMIT_LOGIN_EMAIL", "1000000/m".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A binary built next to this one (same target directory and profile).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me
        .parent()
        .context("the bench binary has no directory")?
        .to_owned();
    // `cargo test` puts test binaries in deps/; the binaries are one level up.
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "{name} not found next to {} (build it: cargo build --release -p gatehouse -p gatehouse-bench)",
        me.display()
    )
}

async fn clear_namespace(namespace: &str) -> anyhow::Result<()> {
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

async fn remove(namespace: &str, db_name: &str) {
    if let Err(error) = clear_namespace(namespace).await {
        eprintln!("warning: could not remove Redis namespace {namespace}: {error}");
    }
    if let Ok(admin) = PgPool::connect(&admin_url()).await {
        if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await
        {
            eprintln!("warning: could not drop database {db_name}: {error}");
        }
        admin.close().await;
    }
}

/// Waits until `check` is true or `within` passes.
pub async fn wait_until<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return true;
        }
        if start.elapsed() > within {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM and waits (at most 20 s) for the process, then kills it.
pub fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..400 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills (SIGKILL) and reaps a process: used where its in-flight work does not matter.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
