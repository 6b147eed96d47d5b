//! The outage drill of issue 14 ("outages must pause the work, not burn attempts"), run the way
//! the issue says it will be checked, against the real release binaries:
//!
//! - **A. PostgreSQL outage**: `gatehouse serve` (straight to PostgreSQL) and one
//!   `gatehouse work` whose `DATABASE_URL` goes through the test suite's fault proxy on
//!   loopback. With the worker healthy, the proxy turns to accept-then-close for 60 s, during
//!   which 10,000 signed webhooks (distinct `MessageSid`s) arrive at the ingress, paced over the
//!   outage; then the proxy passes again and the harness waits until every message is stored.
//! - **B. Redis restart under a drain**: a private `redis-server` (AOF on, `everysec`, with
//!   ballast rewritten into the AOF so that the reload takes a while and clients hear
//!   `LOADING`), `gatehouse serve` and two `gatehouse work` on it, 20,000 `inbound_message`
//!   jobs enqueued; once a few thousand are stored, a clean `SHUTDOWN` and a restart on the
//!   same port and directory; then the harness waits until every message is stored.
//!
//! Each drill checks what the issue promises: every message stored exactly once, nothing dead
//! (the dead-letter set and `gatehouse jobs dead`), the same worker processes from start to
//! end, each outage logged once when it starts and once when it ends; and it measures how long
//! the work paused. The processes' logs (`RUST_LOG=warn,gatehouse::worker::outage=info` for
//! the workers) are kept in a temporary directory when a requirement fails.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use gatehouse_jobs::{InboundMessage, Job as _};
use secrecy::SecretString;
use uuid::Uuid;

use crate::env::{self, BenchEnv, TWILIO_TOKEN};
use crate::flood;
use crate::load::Prepared;

use gatehouse_testenv::RedisServer;
use gatehouse_testenv::fault_proxy::{FaultProxy, Mode};

/// What the workers log: warnings, and each outage's start and end.
const WORKER_LOG: &str = "warn,gatehouse::worker::outage=info";

/// Sizes of the drill.
#[derive(Debug, Clone, Copy)]
pub struct OutagePlan {
    /// Drill A: signed webhooks sent during the PostgreSQL outage.
    pub webhooks: usize,
    /// Drill A: how long PostgreSQL stays unreachable for the worker.
    pub outage: Duration,
    /// Drill B: jobs of the drain.
    pub jobs: usize,
    /// Drill B: Redis is restarted once this many messages are stored.
    pub restart_after: usize,
    /// Drill B: ballast keys (64-byte values) in the AOF, so the reload takes a while.
    pub ballast: u64,
    /// Either drill's drain must end within this after the fault.
    pub drain_limit: Duration,
}

impl OutagePlan {
    pub fn full() -> Self {
        Self {
            webhooks: 10_000,
            outage: Duration::from_secs(60),
            jobs: 20_000,
            restart_after: 3_000,
            ballast: 1_500_000,
            drain_limit: Duration::from_secs(300),
        }
    }
}

/// Drill A's measurements.
#[derive(Debug, Clone)]
pub struct PostgresDrill {
    pub webhooks: usize,
    /// How long the proxy refused the worker PostgreSQL, and over how long the webhooks went.
    pub outage_seconds: f64,
    pub send_seconds: f64,
    /// The ingress's answers to the webhooks, by status.
    pub answers: BTreeMap<String, u64>,
    /// Messages stored when the outage ended (the worker could store none).
    pub stored_during_outage: i64,
    /// The worker's `/healthz` said PostgreSQL was unreachable during the outage.
    pub health_saw_outage: bool,
    /// The worker's `/healthz` answered 200 after the drain.
    pub healthy_after: bool,
    pub stored: Stored,
    /// The message rows from the proxy passing again.
    pub drain: Drain,
    /// Jobs in the queue's `done` index, and seconds from the proxy passing again until all
    /// were there.
    pub finished: (u64, Option<f64>),
    pub dead: Dead,
    pub attempts: BTreeMap<String, usize>,
    pub worker: Survivor,
    pub serve: Survivor,
    pub unreachable_lines: usize,
    pub reachable_lines: usize,
    /// Log lines of the worker about a job dead or given up.
    pub gave_up_lines: usize,
    /// The worker's log: lines in all, and those of `apalis_core` (which gatehouse's default
    /// filter turns off; an explicit `RUST_LOG` brings them back).
    pub log_lines: (usize, usize),
    /// Jobs the worker recovered from worker registrations that stopped heartbeating.
    pub recovered: u64,
}

/// Drill B's measurements.
#[derive(Debug, Clone)]
pub struct RedisDrill {
    pub jobs: usize,
    pub ballast: u64,
    /// Messages stored when `SHUTDOWN` was sent.
    pub stored_at_shutdown: i64,
    /// Seconds from `SHUTDOWN` to the old server's exit (the restart follows at once).
    pub shutdown_seconds: f64,
    /// Seconds from the restart to the first and the last `LOADING` answer, and to the first
    /// `PONG`.
    pub loading_first: Option<f64>,
    pub loading_last: Option<f64>,
    pub pong_after: f64,
    /// The message rows from the restart.
    pub drain: Drain,
    /// Jobs in the queue's `done` index, and seconds from the restart until all were there.
    pub finished: (u64, Option<f64>),
    pub stored: Stored,
    pub dead: Dead,
    pub attempts: BTreeMap<String, usize>,
    pub workers: Vec<Survivor>,
    pub serve: Survivor,
    /// The ingress's `/readyz` (PostgreSQL and Redis) answered 200 after the drain.
    pub serve_ready_after: bool,
    /// Per worker: `redis is unreachable` and `redis is reachable again` lines.
    pub outage_lines: Vec<(usize, usize)>,
    pub gave_up_lines: usize,
    /// The workers' logs: lines in all, and those of `apalis_core`.
    pub log_lines: (usize, usize),
    /// Jobs the workers recovered from worker registrations that stopped heartbeating.
    pub recovered: u64,
    /// Seconds from the restart until the ingress's `/readyz` answered 200 again.
    pub serve_ready_after_restart: Option<f64>,
}

/// The messages of the drill's tenant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stored {
    pub expected: usize,
    pub rows: i64,
    pub distinct: i64,
    /// Rows whose `message_sid` is one the drill sent.
    pub ours: i64,
}

impl Stored {
    pub fn exactly_once(&self) -> bool {
        let n = self.expected as i64;
        self.rows == n && self.distinct == n && self.ours == n
    }
}

/// The message rows created from a point in time: how many, and seconds from that point to
/// the first, the median, the 99th percentile and the last of them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Drain {
    pub rows: i64,
    pub first: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub last: Option<f64>,
}

/// Dead jobs, in the dead-letter set and as `gatehouse jobs dead` lists them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dead {
    pub zcard: i64,
    pub listed: usize,
}

/// A process of the drill: its pid, and whether it was still running at the end.
#[derive(Debug, Clone, Copy)]
pub struct Survivor {
    pub pid: u32,
    pub running: bool,
}

/// A `gatehouse` child process with its log (stderr) in a file; killed on drop.
struct Logged {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl Logged {
    fn spawn(
        env: &BenchEnv,
        dir: &Path,
        name: &str,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = env.gatehouse_logging_to(args, extra, file.into())?;
        Ok(Self {
            pid: child.id(),
            child: Some(child),
            log,
        })
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn survivor(&mut self) -> Survivor {
        Survivor {
            pid: self.pid,
            running: self.running(),
        }
    }

    /// SIGTERM (SIGKILL after 20 s), off the runtime.
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = tokio::task::spawn_blocking(move || env::terminate(&mut child)).await;
        }
    }

    /// Log lines containing `needle`.
    fn lines(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|log| log.lines().filter(|l| l.contains(needle)).count())
            .unwrap_or(0)
    }

    /// Log lines in all, and those of `apalis_core`.
    fn census(&self) -> (usize, usize) {
        (self.lines(""), self.lines("\"target\":\"apalis_core"))
    }

    /// `inbound_message` jobs the process recovered from workers that stopped heartbeating
    /// (their `recovered the jobs …` lines).
    fn recovered(&self) -> u64 {
        let suffix = format!(":{}", InboundMessage::QUEUE);
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("recovered the jobs of workers that stopped heartbeating"))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["queue"].as_str().is_some_and(|q| q.ends_with(&suffix)))
            .filter_map(|v| v["jobs"].as_u64())
            .sum()
    }

    /// The log's last lines, for an error message.
    fn tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            env::kill(child);
        }
    }
}

/// Waits (at most `within`) until `url` answers 200.
async fn answers_200(client: &reqwest::Client, url: &str, within: Duration) -> bool {
    env::wait_until(within, || {
        let request = client.get(url).send();
        async move { request.await.is_ok_and(|r| r.status().as_u16() == 200) }
    })
    .await
}

/// Fails with the process's log tail unless `url` answers 200 within 30 s.
async fn started(client: &reqwest::Client, url: &str, process: &Logged) -> anyhow::Result<()> {
    if answers_200(client, url, Duration::from_secs(30)).await {
        return Ok(());
    }
    anyhow::bail!(
        "{url} did not answer 200 within 30 s; the process's log ({}):\n{}",
        process.log.display(),
        process.tail()
    )
}

/// `url` (a PostgreSQL URL) with its host and port replaced by `addr`.
fn through(url: &str, addr: SocketAddr) -> anyhow::Result<String> {
    let mut url = url::Url::parse(url).context("the database URL is not a URL")?;
    url.set_host(Some(&addr.ip().to_string()))?;
    url.set_port(Some(addr.port()))
        .map_err(|()| anyhow::anyhow!("the database URL takes no port"))?;
    Ok(url.to_string())
}

/// The address a PostgreSQL URL points at (a loopback server of this machine).
fn address_of(url: &str) -> anyhow::Result<SocketAddr> {
    let url = url::Url::parse(url).context("the database URL is not a URL")?;
    let host = match url.host_str() {
        None | Some("localhost") => "127.0.0.1",
        Some(host) => host,
    };
    format!("{host}:{}", url.port().unwrap_or(5432))
        .parse()
        .context("the fault proxy needs PostgreSQL at an IP address")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The tenant's messages, and how many carry one of `sids`.
async fn stored(env: &BenchEnv, tenant: Uuid, sids: &[String]) -> anyhow::Result<Stored> {
    let (rows, distinct, ours): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT message_sid),
                count(*) FILTER (WHERE message_sid = ANY($2))
         FROM messages WHERE tenant_id = $1",
    )
    .bind(tenant)
    .bind(sids)
    .fetch_one(&env.pool)
    .await?;
    Ok(Stored {
        expected: sids.len(),
        rows,
        distinct,
        ours,
    })
}

async fn stored_rows(env: &BenchEnv, tenant: Uuid) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM messages WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(&env.pool)
            .await?,
    )
}

/// The tenant's message rows created from `since` (Unix time), by `created_at` (the start of
/// the job's transaction).
async fn rows_after(env: &BenchEnv, tenant: Uuid, since: f64) -> anyhow::Result<Drain> {
    type Row = (i64, Option<f64>, Option<f64>, Option<f64>, Option<f64>);
    let (rows, first, p50, p99, last): Row = sqlx::query_as(
        "SELECT count(*),
                min(t) - $2,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY t) - $2,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY t) - $2,
                max(t) - $2
         FROM (SELECT extract(epoch FROM created_at)::float8 AS t FROM messages
               WHERE tenant_id = $1 AND created_at >= to_timestamp($2)) AS after",
    )
    .bind(tenant)
    .bind(since)
    .fetch_one(&env.pool)
    .await?;
    Ok(Drain {
        rows,
        first,
        p50,
        p99,
        last,
    })
}

/// Waits until the tenant has `n` messages, the limit passes, or a worker exits.
async fn drain(
    env: &BenchEnv,
    tenant: Uuid,
    n: usize,
    limit: Duration,
    workers: &mut [&mut Logged],
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if stored_rows(env, tenant).await? >= n as i64 {
            return Ok(());
        }
        if start.elapsed() > limit || !workers.iter_mut().all(|w| w.running()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (at most `limit`) until every one of the `n` jobs is in the queue's `done` index:
/// stored rows can be complete while a job whose row committed is still to be acknowledged
/// (recovered from a worker that stopped heartbeating, say). Seconds from `since` to then.
async fn finished(
    env: &BenchEnv,
    redis: &mut gatehouse::redis_conn::RedisConn,
    n: usize,
    since: Instant,
    limit: Duration,
) -> anyhow::Result<(u64, Option<f64>)> {
    let key = env.queue_key(InboundMessage::QUEUE);
    let start = Instant::now();
    loop {
        let done = crate::worker::done_count_on(redis, &key).await?;
        if done >= n as u64 {
            return Ok((done, Some(since.elapsed().as_secs_f64())));
        }
        if start.elapsed() > limit {
            return Ok((done, None));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many finished jobs of `inbound_message` took how many attempts (their metadata).
async fn attempts_histogram(
    redis: &mut gatehouse::redis_conn::RedisConn,
    namespace: &str,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let meta = gatehouse_jobs::keys::QueueKeys::new(namespace, InboundMessage::QUEUE).meta();
    let mut histogram = BTreeMap::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
            .arg(&meta)
            .arg(cursor)
            .arg("COUNT")
            .arg(5000)
            .query_async(redis)
            .await?;
        for value in flat.iter().skip(1).step_by(2) {
            let meta = gatehouse_jobs::keys::JobMeta::parse(Some(value));
            *histogram
                .entry(meta.get("attempts").unwrap_or("-").to_owned())
                .or_insert(0) += 1;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(histogram)
}

/// The dead-letter set's size, and the jobs `gatehouse jobs dead` lists (with `extra`'s
/// `REDIS_URL`).
async fn dead(
    env: &BenchEnv,
    redis: &mut gatehouse::redis_conn::RedisConn,
    extra: &[(&str, &str)],
) -> anyhow::Result<Dead> {
    let zcard: i64 = redis::cmd("ZCARD")
        .arg(env.queues().keys(InboundMessage::QUEUE).dead())
        .query_async(redis)
        .await?;
    let output = env.gatehouse_output(&["jobs", "dead"], extra).await?;
    anyhow::ensure!(
        output.status.success(),
        "gatehouse jobs dead failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A header line, then one line per dead job.
    let listed = String::from_utf8_lossy(&output.stdout)
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    Ok(Dead { zcard, listed })
}

/// Sends `requests` paced evenly over `over` (open loop; at most `in_flight` at once, past
/// that it waits); the answers by status, and how long the sending took.
async fn paced(
    client: &reqwest::Client,
    base: &str,
    requests: Vec<Prepared>,
    over: Duration,
    in_flight: usize,
) -> (BTreeMap<String, u64>, f64) {
    let period = over.div_f64(requests.len().max(1) as f64);
    let slots = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut answers = BTreeMap::new();
    let mut count = |status: Result<Option<u16>, tokio::task::JoinError>| {
        let name = match status {
            Ok(Some(s)) => s.to_string(),
            Ok(None) => "no answer".to_owned(),
            Err(_) => "task failed".to_owned(),
        };
        *answers.entry(name).or_insert(0) += 1;
    };
    for (i, request) in requests.into_iter().enumerate() {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (client, base) = (client.clone(), base.to_owned());
        tasks.spawn(async move {
            let (status, _) = flood::send(&client, &base, &request).await;
            drop(permit);
            status
        });
        while let Some(status) = tasks.try_join_next() {
            count(status);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    while let Some(status) = tasks.join_next().await {
        count(status);
    }
    (answers, seconds)
}

/// Polls the worker's `/healthz` every half second until `stop`; whether it ever said
/// PostgreSQL was unreachable.
async fn watch_postgres_down(client: reqwest::Client, url: String, stop: Arc<AtomicBool>) -> bool {
    let mut seen = false;
    while !stop.load(Ordering::Relaxed) {
        if let Ok(response) = client.get(&url).send().await
            && let Ok(body) = response.json::<serde_json::Value>().await
            && body["postgres"] == "unreachable"
        {
            seen = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    seen
}

/// Drill A: a 60 s PostgreSQL outage (accept-then-close in front of the worker) under 10,000
/// arriving webhooks.
pub async fn postgres_drill(
    env: &BenchEnv,
    plan: &OutagePlan,
    dir: &Path,
) -> anyhow::Result<PostgresDrill> {
    let tenant = env.try_create_tenant().await?;
    let proxy = FaultProxy::start(address_of(&env.db_url)?).await;
    let worker_db = through(&env.db_url, proxy.addr)?;
    let port = gatehouse_testenv::try_free_port()?.to_string();
    let health_port = gatehouse_testenv::try_free_port()?.to_string();
    let mut serve = Logged::spawn(env, dir, "a-serve", &["serve"], &[("PORT", &port)])?;
    let mut work = Logged::spawn(
        env,
        dir,
        "a-work",
        &["work"],
        &[
            ("DATABASE_URL", &worker_db),
            ("WORKER_HEALTH_PORT", &health_port),
            ("RUST_LOG", WORKER_LOG),
        ],
    )?;
    let probe = flood::client(4, Duration::from_secs(5))?;
    let base = format!("http://127.0.0.1:{port}");
    let work_health = format!("http://127.0.0.1:{health_port}/healthz");
    started(&probe, &format!("{base}/healthz"), &serve).await?;
    started(&probe, &work_health, &work).await?;

    let sids: Vec<String> = (0..plan.webhooks)
        .map(|_| format!("SM{}", Uuid::new_v4().simple()))
        .collect();
    let requests: Vec<Prepared> = sids
        .iter()
        .enumerate()
        .map(|(i, sid)| {
            flood::proxied(
                flood::signed_webhook(tenant, TWILIO_TOKEN, i, sid),
                flood::twilio_ip(i),
            )
        })
        .collect();
    let http = flood::client(256, Duration::from_secs(30))?;

    crate::progress(&format!(
        "A: PostgreSQL unreachable for the worker (accept-then-close) for {} s; {} signed webhooks arrive meanwhile",
        plan.outage.as_secs(),
        plan.webhooks
    ));
    let outage_start = Instant::now();
    proxy.set(Mode::AcceptThenClose);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_postgres_down(
        probe.clone(),
        work_health.clone(),
        stop.clone(),
    ));
    // The webhooks are spread over the outage, the last ones a twelfth of it before its end.
    let over = plan.outage.saturating_sub(plan.outage / 12);
    let (answers, send_seconds) = paced(&http, &base, requests, over, 256).await;
    let ok = answers.get("200").copied().unwrap_or(0);
    eprintln!(
        "    {} webhooks in {send_seconds:.1} s: {answers:?}",
        plan.webhooks
    );
    if let Some(rest) = plan.outage.checked_sub(outage_start.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let stored_during_outage = stored_rows(env, tenant).await?;
    proxy.set(Mode::Pass);
    let returned = unix_now();
    let returned_instant = Instant::now();
    let outage_seconds = outage_start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let health_saw_outage = watcher.await.unwrap_or(false);
    crate::progress(&format!(
        "A: PostgreSQL back after {outage_seconds:.1} s ({ok} webhooks answered 200, {stored_during_outage} stored meanwhile); waiting for the drain"
    ));

    drain(
        env,
        tenant,
        plan.webhooks,
        plan.drain_limit,
        &mut [&mut work],
    )
    .await?;
    let stored = stored(env, tenant, &sids).await?;
    let drain_rows = rows_after(env, tenant, returned).await?;
    let healthy_after = answers_200(&probe, &work_health, Duration::from_secs(10)).await;
    let mut redis = env.redis.clone();
    let finished = finished(
        env,
        &mut redis,
        plan.webhooks,
        returned_instant,
        Duration::from_secs(120),
    )
    .await?;
    let dead = dead(env, &mut redis, &[]).await?;
    let attempts = attempts_histogram(&mut redis, &env.namespace).await?;
    let worker = work.survivor();
    let serve_survivor = serve.survivor();
    work.stop().await;
    serve.stop().await;
    drop(proxy);
    Ok(PostgresDrill {
        webhooks: plan.webhooks,
        outage_seconds,
        send_seconds,
        answers,
        stored_during_outage,
        health_saw_outage,
        healthy_after,
        stored,
        drain: drain_rows,
        finished,
        dead,
        attempts,
        worker,
        serve: serve_survivor,
        unreachable_lines: work.lines("postgres is unreachable"),
        reachable_lines: work.lines("postgres is reachable again"),
        gave_up_lines: work.lines("dead-lettered") + work.lines("giving up"),
        log_lines: work.census(),
        recovered: work.recovered(),
    })
}

/// A private `redis-server` on a loopback port, its data (AOF) in a directory of the drill;
/// killed on drop.
fn private_redis(port: u16, dir: &Path) -> RedisServer {
    RedisServer::new(
        port,
        &[
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            &dir.to_string_lossy(),
            "--logfile",
            "redis.log",
            "--enable-debug-command",
            "yes",
        ],
    )
}

/// Seconds from `since` until `url` answers 200 (polled every 50 ms, for at most 120 s).
async fn ready_again(client: reqwest::Client, url: String, since: Instant) -> Option<f64> {
    while since.elapsed() < Duration::from_secs(120) {
        if client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200)
        {
            return Some(since.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn loading(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
}

/// PINGs a restarted server until it answers `PONG`: seconds from `since` to the first and
/// the last `LOADING` answer, and to the `PONG`.
async fn ping_through_loading(
    url: &str,
    since: Instant,
) -> anyhow::Result<(Option<f64>, Option<f64>, f64)> {
    let client = redis::Client::open(url)?;
    let (mut first, mut last) = (None, None);
    let mut seen = |at: f64| {
        first.get_or_insert(at);
        last = Some(at);
    };
    let mut conn = None;
    loop {
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(120),
            "the restarted Redis did not answer PONG within 120 s"
        );
        let connection = match conn.as_mut() {
            Some(c) => c,
            None => match client.get_multiplexed_async_connection().await {
                Ok(c) => conn.insert(c),
                Err(error) => {
                    if loading(&error) {
                        seen(since.elapsed().as_secs_f64());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        match redis::cmd("PING").query_async::<String>(connection).await {
            Ok(_) => break,
            Err(error) if loading(&error) => {
                seen(since.elapsed().as_secs_f64());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {
                conn = None;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let pong = since.elapsed().as_secs_f64();
    Ok((first, last, pong))
}

/// Drill B: a clean Redis restart (AOF on, reloading) under a 20,000-job drain by two workers.
pub async fn redis_drill(
    env: &BenchEnv,
    plan: &OutagePlan,
    dir: &Path,
) -> anyhow::Result<RedisDrill> {
    let tenant = env.try_create_tenant().await?;
    let data = dir.join("redis");
    std::fs::create_dir_all(&data)?;
    let mut server = private_redis(gatehouse_testenv::try_free_port()?, &data);
    server.start().await?;
    let url = server.url();
    let mut conn = gatehouse::redis_conn::connect_url(&SecretString::from(url.clone()))
        .await
        .context("the private Redis does not answer")?;
    crate::progress(&format!(
        "B: private redis-server on {url} (AOF, everysec): {} ballast keys, rewritten into the AOF",
        plan.ballast
    ));
    // DEBUG POPULATE is not written to the AOF: a rewrite puts the ballast there, so that the
    // restart reloads it (and answers LOADING meanwhile).
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(plan.ballast)
        .arg("ballast")
        .arg(64)
        .query_async(&mut conn)
        .await
        .context("DEBUG POPULATE")?;
    let _: () = redis::cmd("BGREWRITEAOF")
        .query_async(&mut conn)
        .await
        .context("BGREWRITEAOF")?;
    let rewritten = env::wait_until(Duration::from_secs(120), || {
        let mut conn = conn.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("persistence")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            info.contains("aof_rewrite_in_progress:0") && info.contains("aof_rewrite_scheduled:0")
        }
    })
    .await;
    anyhow::ensure!(rewritten, "the AOF rewrite did not finish within 120 s");

    let jobs: Vec<InboundMessage> = (0..plan.jobs)
        .map(|i| crate::worker::message(tenant, i as u64))
        .collect();
    let sids: Vec<String> = jobs.iter().map(|j| j.message_sid.clone()).collect();
    let port = gatehouse_testenv::try_free_port()?.to_string();
    let mut serve = Logged::spawn(
        env,
        dir,
        "b-serve",
        &["serve"],
        &[("PORT", &port), ("REDIS_URL", &url)],
    )?;
    let probe = flood::client(4, Duration::from_secs(5))?;
    let base = format!("http://127.0.0.1:{port}");
    started(&probe, &format!("{base}/readyz"), &serve).await?;
    env.queues()
        .enqueue_batch(&mut conn, &jobs)
        .await
        .context("failed to enqueue the drain")?;
    crate::progress(&format!(
        "B: {} jobs enqueued; two gatehouse work processes drain them",
        plan.jobs
    ));
    let mut workers = Vec::new();
    for i in 1..=2 {
        let health_port = gatehouse_testenv::try_free_port()?.to_string();
        let worker = Logged::spawn(
            env,
            dir,
            &format!("b-work-{i}"),
            &["work"],
            &[
                ("REDIS_URL", &url),
                ("WORKER_HEALTH_PORT", &health_port),
                ("RUST_LOG", WORKER_LOG),
            ],
        )?;
        started(
            &probe,
            &format!("http://127.0.0.1:{health_port}/healthz"),
            &worker,
        )
        .await?;
        workers.push(worker);
    }
    let restart_after = plan.restart_after.min(plan.jobs / 2) as i64;
    let draining = env::wait_until(Duration::from_secs(120), || async {
        stored_rows(env, tenant).await.unwrap_or(0) >= restart_after
    })
    .await;
    anyhow::ensure!(
        draining,
        "the workers did not store {restart_after} messages within 120 s"
    );

    // A clean restart in the middle of the drain: SHUTDOWN (the AOF is flushed), then the
    // same port and directory.
    let stored_at_shutdown = stored_rows(env, tenant).await?;
    let shutdown_started = Instant::now();
    let _: Result<(), _> = redis::cmd("SHUTDOWN").query_async(&mut conn).await;
    drop(conn);
    let status = server.exited(Duration::from_secs(60)).await?;
    anyhow::ensure!(status.success(), "redis-server exited with {status}");
    let shutdown_seconds = shutdown_started.elapsed().as_secs_f64();
    let restarted = Instant::now();
    let restarted_at = unix_now();
    server.start().await?;
    let readyz = tokio::spawn(ready_again(
        probe.clone(),
        format!("{base}/readyz"),
        restarted,
    ));
    let (loading_first, loading_last, pong_after) = ping_through_loading(&url, restarted).await?;
    crate::progress(&format!(
        "B: SHUTDOWN with {stored_at_shutdown} stored; restarted, LOADING answered from {:.2} s to {:.2} s, PONG at {pong_after:.2} s; waiting for the drain",
        loading_first.unwrap_or(f64::NAN),
        loading_last.unwrap_or(f64::NAN)
    ));
    {
        let mut running: Vec<&mut Logged> = workers.iter_mut().collect();
        drain(env, tenant, plan.jobs, plan.drain_limit, &mut running).await?;
    }
    let stored = stored(env, tenant, &sids).await?;
    let drain_rows = rows_after(env, tenant, restarted_at).await?;
    let serve_ready_after_restart = readyz.await.ok().flatten();
    let serve_ready_after =
        answers_200(&probe, &format!("{base}/readyz"), Duration::from_secs(10)).await;
    let mut conn = gatehouse::redis_conn::connect_url(&SecretString::from(url.clone())).await?;
    let finished = finished(
        env,
        &mut conn,
        plan.jobs,
        restarted,
        Duration::from_secs(120),
    )
    .await?;
    let dead = dead(env, &mut conn, &[("REDIS_URL", &url)]).await?;
    let attempts = attempts_histogram(&mut conn, &env.namespace).await?;
    let survivors: Vec<Survivor> = workers.iter_mut().map(Logged::survivor).collect();
    let serve_survivor = serve.survivor();
    for worker in &mut workers {
        worker.stop().await;
    }
    serve.stop().await;
    drop(server);
    Ok(RedisDrill {
        jobs: plan.jobs,
        ballast: plan.ballast,
        stored_at_shutdown,
        shutdown_seconds,
        loading_first,
        loading_last,
        pong_after,
        drain: drain_rows,
        finished,
        stored,
        dead,
        attempts,
        workers: survivors,
        serve: serve_survivor,
        serve_ready_after,
        outage_lines: workers
            .iter()
            .map(|w| {
                (
                    w.lines("redis is unreachable"),
                    w.lines("redis is reachable again"),
                )
            })
            .collect(),
        gave_up_lines: workers
            .iter()
            .map(|w| w.lines("dead-lettered") + w.lines("giving up"))
            .sum(),
        log_lines: workers
            .iter()
            .map(Logged::census)
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
        recovered: workers.iter().map(Logged::recovered).sum(),
        serve_ready_after_restart,
    })
}

/// A directory for the drill's logs and the private Redis's data.
pub fn drill_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "gatehouse-bench-outage-{}-{}",
        std::process::id(),
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
