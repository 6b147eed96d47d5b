//! Figures 1–3: `inbound_message` jobs/s through real `gatehouse work` processes against
//! bare apalis-redis workers (default storage config) on the same Redis and PostgreSQL.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use apalis::prelude::*;
use apalis_redis::RedisStorage;
use futures::StreamExt as _;
use gatehouse_jobs::sealed::Sealed;
use gatehouse_jobs::{InboundMessage, Job as _, client::Enqueue};
use sqlx::PgPool;
use uuid::Uuid;

use crate::env::{BenchEnv, kill};

/// What processes the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumer {
    /// `n` real `gatehouse work` processes, as configured by default (group commit on).
    Gatehouse(usize),
    /// One `gatehouse work` process committing every job alone (`GROUP_COMMIT_MAX_JOBS=1`).
    GatehouseAlone,
    /// A bare apalis-redis worker (default `Config`) whose job does nothing.
    BareNoop,
    /// A bare apalis-redis worker whose job is one `UPDATE … SET n = n + 1` transaction, with
    /// this many jobs in flight (its one row serializes them: more in flight is not faster).
    BareUpdate(usize),
    /// No queue at all: pgbench running the job's own statement (`crate::pgbench`), the SQL
    /// floor.
    Pgbench,
}

impl Consumer {
    pub fn label(self) -> String {
        match self {
            Consumer::Gatehouse(1) => "gatehouse work".into(),
            Consumer::Gatehouse(n) => format!("gatehouse work ×{n}"),
            Consumer::GatehouseAlone => "gatehouse work, one commit per job".into(),
            Consumer::BareNoop => "bare apalis-redis, no-op job".into(),
            Consumer::BareUpdate(n) => format!("bare apalis-redis, one-UPDATE job, {n} in flight"),
            Consumer::Pgbench => "pgbench, the job's statement".into(),
        }
    }
}

/// How much of a drain is measured.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Jobs processed before the clock starts (process start-up, connection set-up).
    pub warmup: u64,
    /// Jobs processed when the clock stops (at most the backlog).
    pub until: u64,
    /// The clock stops here at the latest.
    pub cap: Duration,
}

impl Window {
    /// The window for a backlog: skips the first 5 %, stops before the last 5 % (a draining
    /// queue no longer keeps every slot busy), measures at most `max_jobs` jobs.
    pub fn for_backlog(backlog: u64, max_jobs: u64, cap: Duration) -> Self {
        let warmup = (backlog / 20).max(1);
        let until = (backlog - backlog / 20).min(warmup + max_jobs);
        Self { warmup, until, cap }
    }
}

/// One measurement's result.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub jobs_per_s: f64,
    pub jobs: u64,
    pub seconds: f64,
    /// PostgreSQL work per processed job over the whole run (this database only):
    /// committed transactions and rows written (inserted + updated + deleted).
    pub commits_per_job: f64,
    pub rows_per_job: f64,
    /// CPU per job over the timed window, by process group.
    pub cpu: crate::cpu::CpuPer,
}

/// This database's transaction and row counters (`pg_stat_database`).
async fn pg_counters(env: &BenchEnv) -> anyhow::Result<(i64, i64)> {
    // Reads the shared statistics afresh, not this transaction's snapshot of them.
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&env.pool)
        .await?;
    let row: (i64, i64) = sqlx::query_as(
        "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted
         FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&env.pool)
    .await?;
    Ok(row)
}

/// Prepares the database for the workers: the bench tenant and the baseline's counter row.
pub async fn prepare(env: &BenchEnv) -> anyhow::Result<Uuid> {
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_counter (id int PRIMARY KEY, n bigint NOT NULL)")
        .execute(&env.pool)
        .await?;
    sqlx::query("INSERT INTO bench_counter (id, n) VALUES (1, 0) ON CONFLICT DO NOTHING")
        .execute(&env.pool)
        .await?;
    Ok(env.try_create_tenant().await?)
}

/// A realistic inbound message: 200 distinct customers, so conversations see repeat traffic.
pub fn message(tenant: Uuid, i: u64) -> InboundMessage {
    InboundMessage {
        tenant_id: tenant,
        message_sid: format!("SM{}", Uuid::new_v4().simple()),
        from: format!("+1415555{:04}", i % 200),
        to: "+14155550199".into(),
        body: "Hi! Where is my order #12345? It was supposed to arrive yesterday.".into(),
        received_at: "2026-11-28T22:00:00Z".into(),
    }
}

/// Puts `n` jobs in apalis-redis 1.0's layout onto the bare workers' queue: the payload the
/// ingress would enqueue (sealed), the metadata hash apalis-redis's fetch reads, the id on the
/// active list; pipelined 1,000 at a time.
pub async fn enqueue_backlog_bare(env: &BenchEnv, tenant: Uuid, n: u64) -> anyhow::Result<()> {
    let key = bare_queue_key(env);
    let seal = env.config.keyring.current().clone();
    let mut redis = env.redis.clone();
    let mut i = 0;
    while i < n {
        let mut pipe = redis::pipe();
        for j in i..(i + 1000).min(n) {
            let id = Uuid::now_v7().to_string();
            let payload = gatehouse_jobs::sealed::seal_job(&message(tenant, j), &id, Some(&seal))?;
            pipe.hset(format!("{key}:data"), &id, payload)
                .ignore()
                .hset_multiple(
                    format!("{key}:meta:{id}"),
                    &[
                        ("attempts", "0"),
                        ("max_attempts", "4"),
                        ("status", "Pending"),
                        ("idempotency_key", ""),
                    ],
                )
                .ignore()
                .rpush(format!("{key}:active"), &id)
                .ignore();
        }
        let () = pipe.query_async(&mut redis).await?;
        i = (i + 1000).min(n);
    }
    Ok(())
}

/// Puts `n` jobs straight onto the queue's active list (the way the ingress does), 64 in
/// flight at a time on one multiplexed connection.
pub async fn enqueue_backlog(env: &BenchEnv, tenant: Uuid, n: u64) -> anyhow::Result<()> {
    let queues = env.queues();
    let redis = env.redis.clone();
    let mut results = futures::stream::iter(0..n)
        .map(|i| {
            let queues = queues.clone();
            let mut redis = redis.clone();
            async move {
                queues
                    .enqueue(&mut redis, &message(tenant, i), Enqueue::default())
                    .await
            }
        })
        .buffer_unordered(64);
    while let Some(result) = results.next().await {
        result.context("failed to enqueue the backlog")?;
    }
    Ok(())
}

/// The bare apalis-redis workers' queue: apalis-redis 1.0's own key layout (a hash per job's
/// metadata, which gatehouse's cluster-safe layout no longer has), filled by
/// [`enqueue_backlog_bare`].
pub fn bare_queue_key(env: &BenchEnv) -> String {
    format!("{}:bench_bare_inbound", env.namespace)
}

/// Jobs in the `done` index of gatehouse's queue and of the bare workers' (only one of them
/// runs at a time): a set in apalis-redis 1.0, a sorted set in gatehouse's own backend
/// (issue 5).
pub async fn done_count(env: &BenchEnv) -> anyhow::Result<u64> {
    let mut redis = env.redis.clone();
    let ours = done_count_on(&mut redis, &env.queue_key(InboundMessage::QUEUE)).await?;
    let bare = done_count_on(&mut redis, &bare_queue_key(env)).await?;
    Ok(ours + bare)
}

/// [`done_count`] of the queue `queue_key` on the Redis behind `redis`.
pub async fn done_count_on(
    redis: &mut gatehouse::redis_conn::RedisConn,
    queue_key: &str,
) -> anyhow::Result<u64> {
    let key = format!("{queue_key}:done");
    let kind: String = redis::cmd("TYPE").arg(&key).query_async(redis).await?;
    // Checked first and counted second: a key that does not exist yet may appear in between
    // (as either type), so "none" counts as 0 rather than guessing a command.
    let command = match kind.as_str() {
        "zset" => "ZCARD",
        "set" => "SCARD",
        _ => return Ok(0),
    };
    Ok(redis::cmd(command).arg(&key).query_async(redis).await?)
}

/// Empties the queue keys and the tables the jobs write, so every run starts alike.
pub async fn reset(env: &BenchEnv) -> anyhow::Result<()> {
    env.clear_namespace().await?;
    sqlx::query("TRUNCATE messages, conversations, processed_jobs CASCADE")
        .execute(&env.pool)
        .await
        .context("failed to truncate the job tables")?;
    Ok(())
}

// The baselines take the payload as it rests in Redis (customer data sealed) and never open
// it: bare apalis knows no keys, so opening (~1 µs) is part of gatehouse's side of the ratio.
async fn noop(_job: Sealed<InboundMessage>) -> Result<(), BoxDynError> {
    Ok(())
}

async fn one_update(_job: Sealed<InboundMessage>, pool: Data<PgPool>) -> Result<(), BoxDynError> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE bench_counter SET n = n + 1 WHERE id = 1")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// A running consumer, stopped by [`Running::stop`].
enum Running {
    Processes(Vec<std::process::Child>),
    Task {
        task: tokio::task::JoinHandle<()>,
        stop: tokio::sync::oneshot::Sender<()>,
        pool: Option<PgPool>,
    },
}

impl Running {
    /// The consumer's CPU so far: its processes', or this process's for an in-process worker.
    fn cpu_us(&self) -> u64 {
        match self {
            Running::Processes(children) => {
                crate::cpu::processes_us(&children.iter().map(|c| c.id()).collect::<Vec<_>>())
            }
            Running::Task { .. } => crate::cpu::own_us(),
        }
    }

    async fn stop(self) {
        match self {
            Running::Processes(mut children) => {
                for child in &mut children {
                    kill(child);
                }
            }
            Running::Task {
                mut task,
                stop,
                pool,
            } => {
                // Stop the worker the way apalis expects (it deregisters and its heartbeat
                // ends); abort it only if that takes too long.
                let _ = stop.send(());
                if tokio::time::timeout(Duration::from_secs(10), &mut task)
                    .await
                    .is_err()
                {
                    task.abort();
                    let _ = task.await;
                }
                if let Some(pool) = pool {
                    pool.close().await;
                }
            }
        }
    }
}

/// Runs a built apalis worker until told to stop.
fn spawn_worker<F>(
    label: &'static str,
    run: F,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Sender<()>,
)
where
    F: FnOnce(
            std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), std::io::Error>> + Send>>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), WorkerError>> + Send>,
        > + Send
        + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let signal = Box::pin(async move {
        let _ = rx.await;
        Ok::<(), std::io::Error>(())
    });
    let task = tokio::spawn(async move {
        if let Err(error) = run(signal).await {
            eprintln!("{label} stopped: {error}");
        }
    });
    (task, tx)
}

/// apalis-redis's own connection type, to the bench's Redis.
fn bare_connection() -> anyhow::Result<redis::aio::ConnectionManager> {
    let client = redis::Client::open(gatehouse_testenv::redis_url())?;
    Ok(redis::aio::ConnectionManager::new_lazy_with_config(
        client,
        redis::aio::ConnectionManagerConfig::new(),
    )?)
}

fn start(env: &BenchEnv, consumer: Consumer) -> anyhow::Result<Running> {
    let concurrency = crate::WORKER_CONCURRENCY;
    let config = apalis_redis::Config::default().queue(bare_queue_key(env));
    let name = format!("bench-{}", Uuid::new_v4().simple());
    let ticker = gatehouse::worker::poll::Ticker::new(gatehouse::worker::POLL_INTERVAL);
    match consumer {
        Consumer::Gatehouse(n) => {
            let extra = worker_env();
            let extra: Vec<(&str, &str)> = extra
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let children = (0..n)
                .map(|_| env.gatehouse(&["work"], &extra))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(Running::Processes(children))
        }
        Consumer::GatehouseAlone => {
            Ok(Running::Processes(vec![env.gatehouse(
                &["work"],
                &[("GROUP_COMMIT_MAX_JOBS", "1")],
            )?]))
        }
        Consumer::BareNoop => {
            let storage = RedisStorage::<Sealed<InboundMessage>>::new(bare_connection()?)
                .with_config(config)
                .poll_with_strategy(ticker);
            let worker = WorkerBuilder::new(name)
                .backend(storage)
                .concurrency(concurrency)
                .build(noop);
            let (task, stop) = spawn_worker("bare no-op worker", move |signal| {
                Box::pin(worker.run_until(signal))
            });
            Ok(Running::Task {
                task,
                stop,
                pool: None,
            })
        }
        Consumer::Pgbench => anyhow::bail!("pgbench is not a queue consumer"),
        Consumer::BareUpdate(concurrency) => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(concurrency as u32 + 2)
                .connect_lazy(&env.db_url)?;
            let storage = RedisStorage::<Sealed<InboundMessage>>::new(bare_connection()?)
                .with_config(config)
                .poll_with_strategy(ticker);
            let worker = WorkerBuilder::new(name)
                .backend(storage)
                .concurrency(concurrency)
                .data(pool.clone())
                .build(one_update);
            let (task, stop) = spawn_worker("bare one-UPDATE worker", move |signal| {
                Box::pin(worker.run_until(signal))
            });
            Ok(Running::Task {
                task,
                stop,
                pool: Some(pool),
            })
        }
    }
}

/// `GH_BENCH_WORKER_ENV` (`NAME=value,NAME=value`): settings for the default `gatehouse work`
/// consumers, to try a setting against the same baselines; unset in the figures' runs.
fn worker_env() -> Vec<(String, String)> {
    std::env::var("GH_BENCH_WORKER_ENV")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Enqueues `backlog` jobs, starts `consumer`, and measures jobs/s over `window`.
pub async fn measure(
    env: &BenchEnv,
    tenant: Uuid,
    consumer: Consumer,
    backlog: u64,
    window: Window,
) -> anyhow::Result<Throughput> {
    reset(env).await?;
    match consumer {
        Consumer::Gatehouse(_) | Consumer::GatehouseAlone => {
            enqueue_backlog(env, tenant, backlog).await?;
        }
        Consumer::BareNoop | Consumer::BareUpdate(_) => {
            enqueue_backlog_bare(env, tenant, backlog).await?;
        }
        Consumer::Pgbench => anyhow::bail!("pgbench is measured by crate::pgbench::run"),
    }
    let before = pg_counters(env).await?;
    let running = start(env, consumer)?;
    let result = sample(env, window, &running).await;
    running.stop().await;
    let processed = done_count(env).await?;
    // Backends flush their statistics when their client disconnects.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after = pg_counters(env).await?;
    // Every job the done set counted must have committed its effect: a bench that counted
    // acks of jobs that did nothing would flatter gatehouse.
    let stored = match consumer {
        Consumer::Gatehouse(_) | Consumer::GatehouseAlone => {
            Some(stored_messages(&env.pool).await?)
        }
        _ => None,
    };
    reset(env).await?;
    let mut result = result?;
    let per_job = |d: i64| (d as f64 / processed.max(1) as f64).max(0.0);
    // Our own two counter reads commit too; they are noise next to thousands of jobs.
    result.commits_per_job = per_job(after.0 - before.0);
    result.rows_per_job = per_job(after.1 - before.1);
    if let Some(stored) = stored
        && (stored as u64) < result.jobs
    {
        anyhow::bail!(
            "{} acked {} jobs but stored only {stored} messages",
            consumer.label(),
            result.jobs
        );
    }
    if result.jobs == 0 && result.seconds >= window.cap.as_secs_f64() {
        anyhow::bail!("{} processed nothing in {:?}", consumer.label(), window.cap);
    }
    Ok(result)
}

/// Polls the done set: the clock runs from the first sample at or past `warmup` to the first
/// at or past `until` (or the cap).
async fn sample(env: &BenchEnv, window: Window, running: &Running) -> anyhow::Result<Throughput> {
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut start: Option<(Instant, u64)> = None;
    let mut cpu_at_start = crate::cpu::Cpu::default();
    loop {
        let now = Instant::now();
        let done = done_count(env).await?;
        match start {
            None if done >= window.warmup => {
                start = Some((now, done));
                cpu_at_start = crate::cpu::now(env, running.cpu_us()).await?;
            }
            None if now > give_up => anyhow::bail!("no job finished within 60 s"),
            None => {}
            Some((t0, n0)) if done >= window.until || now.duration_since(t0) >= window.cap => {
                let seconds = now.duration_since(t0).as_secs_f64();
                let jobs = done - n0;
                let cpu = crate::cpu::now(env, running.cpu_us())
                    .await?
                    .per(cpu_at_start, jobs);
                // A window drained between two samples is too short to time: NaN, which
                // the report leaves out of the medians.
                return Ok(Throughput {
                    jobs_per_s: if jobs == 0 {
                        f64::NAN
                    } else {
                        jobs as f64 / seconds
                    },
                    jobs,
                    seconds,
                    commits_per_job: f64::NAN,
                    rows_per_job: f64::NAN,
                    cpu,
                });
            }
            Some(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Messages gatehouse has stored.
pub async fn stored_messages(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(pool)
        .await?)
}
