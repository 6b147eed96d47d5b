//! One benchmark run's environment: `gatehouse-testenv`'s database and Redis namespace
//! (removed afterwards, also when the run fails or panics) with the bench's own settings, the
//! login flood's account, and the `gatehouse` processes of the run.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use gatehouse_testenv::TestEnv;
use secrecy::SecretString;
use uuid::Uuid;

pub use gatehouse_testenv::{ACCOUNT_SID, PUBLIC_BASE, TOKEN as TWILIO_TOKEN, kill};

/// The login flood's account.
pub const LOGIN_EMAIL: &str = "bench@example.com";
pub const LOGIN_PASSWORD: &str = "correct horse battery staple 42";

/// The benchmark's database, namespace and the environment its child processes get (the
/// test environment's, read through `Deref`, with the bench's settings).
pub struct BenchEnv {
    env: TestEnv,
}

impl std::ops::Deref for BenchEnv {
    type Target = TestEnv;

    fn deref(&self) -> &TestEnv {
        &self.env
    }
}

impl BenchEnv {
    pub async fn new() -> anyhow::Result<Self> {
        let env = TestEnv::create("bench", 20, bench_vars)
            .await
            .context("failed to set up the bench database and namespace")?;
        Ok(Self { env })
    }

    pub fn queue_key(&self, queue: &str) -> String {
        self.queues().queue_key(queue)
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
        let mut cmd = Command::new(gatehouse_testenv::process::sibling_binary("gatehouse")?);
        self.configure(&mut cmd, extra);
        cmd.args(args)
            .stderr(log)
            .spawn()
            .context("failed to start the gatehouse binary")
    }

    /// This very binary (for the ingress server processes) with the run's environment.
    ///
    /// Experiment knob (not gatehouse configuration): `GH_BENCH_SERVER_WRAPPER`, a command and
    /// its arguments separated by spaces, runs the process under it (`valgrind
    /// --tool=callgrind`, say, for instruction counts that do not depend on the machine's load).
    pub fn myself(&self, args: &[&str], extra: &[(&str, &str)]) -> anyhow::Result<Child> {
        let me = std::env::current_exe()?;
        let wrapper = std::env::var("GH_BENCH_SERVER_WRAPPER").unwrap_or_default();
        let mut wrapper = wrapper.split_whitespace();
        let mut cmd = match wrapper.next() {
            Some(program) => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper).arg(me);
                cmd
            }
            None => Command::new(me),
        };
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
        let mut cmd = Command::new(gatehouse_testenv::process::sibling_binary("gatehouse")?);
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
        for passed in [
            "PATH",
            "GH_BENCH_HASH_CONCURRENCY",
            "GH_BENCH_BARE_DEDUPE",
            "GH_BENCH_BARE_HEADERS",
        ] {
            if let Ok(value) = std::env::var(passed) {
                cmd.env(passed, value);
            }
        }
    }

    pub async fn cleanup(self) {
        self.env.cleanup().await;
    }
}

/// The bench's settings over the test environment's variables: its worker concurrency and
/// heartbeat, login limits the flood does not reach, and the defaults (not the tests' short
/// retries or open store networks) for the rest.
fn bench_vars(vars: &mut std::collections::HashMap<String, String>) {
    for test_only in [
        "JOB_RETRY_BASE_MS_INBOUND_MESSAGE",
        "JOB_RETRY_CAP_MS_INBOUND_MESSAGE",
        "JOB_RETRY_BASE_MS_SYNC_CATALOG",
        "JOB_RETRY_CAP_MS_SYNC_CATALOG",
        "STORE_ALLOWED_NETWORKS",
    ] {
        vars.remove(test_only);
    }
    for (k, v) in [
        ("WORKER_CONCURRENCY", crate::WORKER_CONCURRENCY.to_string()),
        ("WORKER_HEARTBEAT_SECONDS", "5".to_owned()),
        // The login flood must reach argon2, not the limiter.
        ("RATE_LIMIT_LOGIN_IP", "1000000/m".to_owned()),
        ("RATE_LIMIT_LOGIN_EMAIL", "1000000/m".to_owned()),
    ] {
        vars.insert(k.to_owned(), v);
    }
}

/// Waits until `check` is true or `within` passes (polling every 20 ms).
pub async fn wait_until<F, Fut>(within: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    gatehouse_testenv::eventually_every(within, Duration::from_millis(20), check).await
}

/// Sends SIGTERM and waits (at most 20 s) for the process, then kills it.
pub fn terminate(child: &mut Child) {
    if gatehouse_testenv::terminate_within(child, Duration::from_secs(20)).is_none() {
        kill(child);
    }
}
