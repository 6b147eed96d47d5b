//! The reliability core, one regression test per apalis-redis 1.0 defect gatehouse must not
//! inherit (ARCHITECTURE.md): deep backlogs, bursts of due retries, workers killed or
//! restarted under load, Redis connections that fail, long jobs, retention — and the
//! dead-letter commands.
//!
//! Bulk tests use the cheapest real path through the worker: `sync_catalog` jobs whose ids
//! are already in `processed_jobs` (a redelivery), which the real handler acknowledges after
//! one indexed lookup.

use std::time::{Duration, Instant};

use crate::common::*;
use gatehouse_jobs::client::Enqueue;
use gatehouse_jobs::{InboundMessage, SyncCatalog, SyncMode};
use gatehouse_testenv::fault_proxy::{FaultProxy, Mode};
use gatehouse_testenv::*;
use uuid::Uuid;

fn sync_job() -> SyncCatalog {
    SyncCatalog {
        tenant_id: Uuid::new_v4(),
        requested_by: Uuid::new_v4(),
        mode: SyncMode::Incremental,
    }
}

/// Enqueues `n` sync jobs whose effect is already recorded, so running one is a lookup. Only
/// with no worker running: the markers are written after the jobs are enqueued.
async fn enqueue_redeliveries(env: &TestEnv, n: usize) -> Vec<String> {
    let mut redis = env.redis.clone();
    let jobs: Vec<SyncCatalog> = (0..n).map(|_| sync_job()).collect();
    let ids = env
        .queues()
        .enqueue_batch(&mut redis, &jobs)
        .await
        .expect("enqueue batch");
    for chunk in ids.chunks(10_000) {
        sqlx::query(
            "INSERT INTO processed_jobs (job_id, queue, worker)
             SELECT unnest($1::text[]), 'sync_catalog', 'earlier'",
        )
        .bind(chunk)
        .execute(&env.pool)
        .await
        .expect("mark processed");
    }
    ids
}

async fn zcard(env: &TestEnv, key: &str) -> i64 {
    let mut redis = env.redis.clone();
    redis::cmd("ZCARD")
        .arg(format!("{}:{key}", env.namespace))
        .query_async(&mut redis)
        .await
        .expect("zcard")
}

async fn hlen(env: &TestEnv, key: &str) -> i64 {
    let mut redis = env.redis.clone();
    redis::cmd("HLEN")
        .arg(format!("{}:{key}", env.namespace))
        .query_async(&mut redis)
        .await
        .expect("hlen")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_thousand_jobs_enqueued_without_workers_are_drained_then_vacuumed() {
    // apalis-redis 1.0 died at 8,000 due jobs (one unpack of every id) and slowed with the
    // backlog when lock_tasks was on. Here 100k wait, then two worker processes drain them, and
    // with a one-second retention the vacuum leaves no payload behind.
    const JOBS: usize = 100_000;
    let env = TestEnv::with_vars(|v| {
        v.insert("JOB_RETENTION_SECONDS".into(), "1".into());
        // 16 per process: two processes' pools (18 connections each) stay well inside
        // PostgreSQL's connection limit, which other test binaries share.
        v.insert("WORKER_CONCURRENCY".into(), "16".into());
    })
    .await;
    let started = Instant::now();
    enqueue_redeliveries(&env, JOBS).await;
    let enqueued_in = started.elapsed();
    assert_eq!(env.queued("sync_catalog").await, JOBS as i64);

    let started = Instant::now();
    let mut a = env.spawn(&["work"], &[]);
    let mut b = env.spawn(&["work"], &[]);
    let drained = eventually(Duration::from_secs(240), || async {
        env.queued("sync_catalog").await == 0
            && zcard(&env, "{sync_catalog:0}:dead").await == 0
            && hlen(&env, "{sync_catalog:0}:data").await == 0
    })
    .await;
    let drained_in = started.elapsed();
    eprintln!(
        "100k jobs: enqueued in {enqueued_in:?}, drained and vacuumed in {drained_in:?} \
         ({:.0} jobs/s)",
        JOBS as f64 / drained_in.as_secs_f64()
    );
    assert!(drained, "every job ran and its payload was vacuumed");
    assert!(a.try_wait().expect("status").is_none(), "worker a is alive");
    assert!(b.try_wait().expect("status").is_none(), "worker b is alive");
    assert!(terminate(&mut a).success());
    assert!(terminate(&mut b).success());
    let mut redis = env.redis.clone();
    let metas: u64 = redis::cmd("HLEN")
        .arg(env.queues().keys("sync_catalog").meta())
        .query_async(&mut redis)
        .await
        .expect("hlen");
    assert_eq!(metas, 0, "{metas} metadata entries left");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_retries_falling_due_at_once_are_promoted_in_chunks() {
    // The same unpack() killed apalis-redis's fetch when thousands of retries came due together
    // (after a database outage, say). Make 20k retries due at once and drain them.
    const JOBS: usize = 20_000;
    let env = TestEnv::with_vars(|v| {
        v.insert("WORKER_CONCURRENCY".into(), "32".into());
    })
    .await;
    let ids = enqueue_redeliveries(&env, JOBS).await;
    let mut redis = env.redis.clone();
    let active = format!("{}:{{sync_catalog:0}}:active", env.namespace);
    let scheduled = format!("{}:{{sync_catalog:0}}:scheduled", env.namespace);
    for chunk in ids.chunks(1000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("ZADD").arg(&scheduled).arg(0).arg(id).ignore();
        }
        let () = pipe.query_async(&mut redis).await.expect("schedule");
    }
    let () = redis::cmd("DEL")
        .arg(&active)
        .query_async(&mut redis)
        .await
        .expect("del");
    assert_eq!(zcard(&env, "{sync_catalog:0}:scheduled").await, JOBS as i64);

    let worker = env.start_worker();
    let drained = eventually(Duration::from_secs(120), || async {
        zcard(&env, "{sync_catalog:0}:done").await == JOBS as i64
    })
    .await;
    assert!(drained, "every due retry was promoted and ran");
    assert_eq!(zcard(&env, "{sync_catalog:0}:scheduled").await, 0);
    assert_eq!(zcard(&env, "{sync_catalog:0}:dead").await, 0);
    worker.stop().await.expect("the worker never died");
    env.cleanup().await;
}

fn low_confidence_message(tenant: Uuid) -> InboundMessage {
    inbound_message(tenant, "+14155550100", "qwzx vbnm")
}

async fn streak(env: &TestEnv) -> i64 {
    let n: Option<i32> = sqlx::query_scalar("SELECT low_confidence_count FROM conversations")
        .fetch_optional(&env.pool)
        .await
        .expect("conversation");
    i64::from(n.unwrap_or(0))
}

/// Customers the kill -9 test's jobs come from: more than one, so group commit has groups to
/// form; all low-confidence, so every applied effect adds one to some streak.
const KILL_CUSTOMERS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_job_is_taken_over_and_no_effect_applies_twice() {
    killed_mid_job(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_job_without_group_commit_is_taken_over_and_no_effect_applies_twice() {
    killed_mid_job(&[("GROUP_COMMIT_MAX_JOBS", "1")]).await;
}

/// kill -9 a real `gatehouse work` process under load: its fetched jobs sit in its inflight
/// set until the orphan timeout (1 s heartbeat × 3), then another process runs them; the
/// processed_jobs marker keeps every effect single, whether the killed process committed its
/// jobs in groups (the default) or one by one.
async fn killed_mid_job(mode: &[(&str, &str)]) {
    const JOBS: i64 = 2000;
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let mut redis = env.redis.clone();
    let jobs: Vec<InboundMessage> = (0..JOBS as usize)
        .map(|i| InboundMessage {
            from: format!("+141555501{:02}", i % KILL_CUSTOMERS),
            ..low_confidence_message(tenant)
        })
        .collect();
    env.queues()
        .enqueue_batch(&mut redis, &jobs)
        .await
        .expect("enqueue");
    let mut victim = env.spawn(&["work"], mode);
    let started = eventually(Duration::from_secs(60), || async {
        env.count("SELECT count(*) FROM messages").await >= 200
    })
    .await;
    assert!(started, "the first worker was working");
    victim.kill().expect("kill -9");
    let _ = victim.wait();
    let at_kill = env.count("SELECT count(*) FROM messages").await;
    assert!(at_kill < JOBS, "killed mid-backlog ({at_kill} done)");

    let mut survivor = env.spawn(&["work"], mode);
    let n = env
        .wait_for_count(
            "SELECT count(*) FROM messages",
            JOBS,
            Duration::from_secs(90),
        )
        .await;
    assert_eq!(
        n, JOBS,
        "every job ran, including those the killed worker held"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.count("SELECT sum(low_confidence_count)::int8 FROM conversations")
            .await,
        JOBS,
        "no job's effect was applied twice"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM conversations").await,
        KILL_CUSTOMERS as i64
    );
    assert_eq!(env.count("SELECT count(*) FROM processed_jobs").await, JOBS);
    assert!(terminate(&mut survivor).success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_restarted_under_load_loses_nothing() {
    // SIGTERM under load, then a new process: in-flight jobs finish within the grace period,
    // buffered ones go back to the queue, and the next process finishes the rest.
    const JOBS: i64 = 2000;
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let mut redis = env.redis.clone();
    let jobs: Vec<InboundMessage> = (0..JOBS).map(|_| low_confidence_message(tenant)).collect();
    env.queues()
        .enqueue_batch(&mut redis, &jobs)
        .await
        .expect("enqueue");
    let mut first = env.spawn(&["work"], &[]);
    let started = eventually(Duration::from_secs(60), || async {
        env.count("SELECT count(*) FROM messages").await >= 200
    })
    .await;
    assert!(started);
    assert!(terminate(&mut first).success(), "a clean stop under load");
    let mut second = env.spawn(&["work"], &[]);
    let n = env
        .wait_for_count(
            "SELECT count(*) FROM messages",
            JOBS,
            Duration::from_secs(90),
        )
        .await;
    assert_eq!(n, JOBS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(streak(&env).await, JOBS);
    assert!(terminate(&mut second).success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_running_longer_than_the_orphan_timeout_is_not_run_twice() {
    // The orphan timeout is 3 s (1 s × 3); a catalog sync against a store that takes 5 s must
    // keep its worker alive (the process heartbeats on its own task) and run exactly once,
    // though another worker process is watching for orphans.
    let env = TestEnv::new().await;
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/products",
        axum::routing::get({
            let hits = hits.clone();
            move || async move {
                hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(5)).await;
                axum::Json(serde_json::json!({
                    "products": [{"id": "slow", "name": "Slow"}], "next_page": null
                }))
            }
        }),
    );
    let addr = serve_loopback(app).await;
    let tenant = gatehouse::tenants::create(
        &env.pool,
        &env.config.keyring,
        &gatehouse::tenants::NewTenant {
            name: "Slow shop".into(),
            twilio_account_sid: ACCOUNT_SID.into(),
            twilio_auth_token: secrecy::SecretString::from(TOKEN.to_owned()),
            store_url: Some(format!("http://{addr}")),
            store_api_key: Some(secrecy::SecretString::from("k".repeat(20))),
            webhook_shared_key: None,
            owner_email: None,
        },
    )
    .await
    .expect("tenant");
    // One slot per worker, so the long job fills it; its worker must keep heartbeating while
    // it runs (the process's own heartbeat task does, whatever apalis's loop is doing), or the
    // other process would take the job over and run it a second time.
    let mut a = env.spawn(&["work"], &[("WORKER_CONCURRENCY", "1")]);
    let mut b = env.spawn(&["work"], &[("WORKER_CONCURRENCY", "1")]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut redis = env.redis.clone();
    env.queues()
        .enqueue(
            &mut redis,
            &SyncCatalog {
                tenant_id: tenant,
                requested_by: Uuid::new_v4(),
                mode: SyncMode::Full,
            },
            Enqueue::default(),
        )
        .await
        .expect("enqueue");
    let n = env
        .wait_for_count("SELECT count(*) FROM products", 1, Duration::from_secs(30))
        .await;
    assert_eq!(n, 1);
    // Longer than another orphan timeout, to catch a late second run.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the long job ran once"
    );
    assert!(terminate(&mut a).success());
    assert!(terminate(&mut b).success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_survive_a_redis_restart_and_killed_connections_under_a_running_worker() {
    const JOBS: i64 = 1500;
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A private Redis (its append-only file synced on every write), so the test may restart it
    // and kill its connections without disturbing the other tests.
    let mut server = RedisServer::new(
        free_port(),
        &[
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            dir.path().to_str().expect("a UTF-8 temporary directory"),
        ],
    );
    server
        .start()
        .await
        .expect("the private redis-server starts");
    let url = server.url();
    let mut conn = gatehouse::redis_conn::connect_url(&secrecy::SecretString::from(url.clone()))
        .await
        .expect("private redis");
    let jobs: Vec<InboundMessage> = (0..JOBS).map(|_| low_confidence_message(tenant)).collect();
    env.queues()
        .enqueue_batch(&mut conn, &jobs)
        .await
        .expect("enqueue");
    let mut worker = env.spawn(&["work"], &[("REDIS_URL", &url)]);
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.count("SELECT count(*) FROM messages").await >= 100
        })
        .await
    );

    // Its connections are cut (CLIENT KILL), twice.
    for _ in 0..2 {
        let _: Result<i64, _> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query_async(&mut conn)
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Redis itself restarts (keeping its append-only file) for two seconds.
    server.terminate();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server
        .start()
        .await
        .expect("the private redis-server starts again");
    assert!(
        worker.try_wait().expect("status").is_none(),
        "the worker process is still running"
    );
    let n = env
        .wait_for_count(
            "SELECT count(*) FROM messages",
            JOBS,
            Duration::from_secs(90),
        )
        .await;
    assert_eq!(n, JOBS, "no job was lost");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(streak(&env).await, JOBS, "none applied twice");
    assert!(terminate(&mut worker).success());
    drop(server);
    env.cleanup().await;
}

/// Runs the built binary with the test's environment and returns (status, stdout, stderr).
fn gatehouse(env: &TestEnv, args: &[&str], extra: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(args)
        .env_clear()
        .envs(env.vars.iter())
        .envs(extra.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run gatehouse");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_listed_without_secrets_retried_and_purged() {
    let env = TestEnv::new().await;
    let worker = env.start_worker();
    let mut redis = env.redis.clone();
    // Unknown tenants: permanent errors, dead at once.
    let jobs: Vec<SyncCatalog> = (0..3).map(|_| sync_job()).collect();
    let mut ids = Vec::new();
    for job in &jobs {
        let e = env
            .queues()
            .enqueue(&mut redis, job, Enqueue::default())
            .await
            .expect("enqueue");
        assert!(
            env.wait_for_dead("sync_catalog", &e.job_id, Duration::from_secs(10))
                .await
        );
        ids.push(e.job_id);
    }
    worker.stop().await.expect("stop");

    let (code, out, _) = gatehouse(&env, &["jobs", "dead"], &[]);
    assert_eq!(code, 0);
    for id in &ids {
        let line = out
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{id} listed in {out}"));
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols[1], "sync_catalog");
        assert_eq!(cols[2], "1", "attempts");
        assert!(cols[3].ends_with('Z'), "RFC 3339 time: {}", cols[3]);
        assert!(
            cols[4].contains("unknown tenant"),
            "last error: {}",
            cols[4]
        );
    }
    for job in &jobs {
        assert!(
            !out.contains(&job.tenant_id.to_string()),
            "no payload is printed"
        );
    }
    let (code, out, _) = gatehouse(&env, &["jobs", "dead", "--queue", "inbound_message"], &[]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "only the header: {out}");
    let (code, _, err) = gatehouse(&env, &["jobs", "dead", "--queue", "nope"], &[]);
    assert_eq!(code, 1, "{err}");

    // Retry puts the job back on its queue with a fresh budget.
    let (code, out, _) = gatehouse(&env, &["jobs", "retry", &ids[0]], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("sync_catalog"));
    assert_eq!(env.queued("sync_catalog").await, 1);
    let meta = env.job_meta("sync_catalog", &ids[0]).await;
    assert_eq!(meta.get("attempts"), Some("0"));
    let (code, _, _) = gatehouse(&env, &["jobs", "retry", &ids[0]], &[]);
    assert_eq!(code, 1, "no longer dead");
    let (code, _, _) = gatehouse(&env, &["jobs", "retry", "no-such-job"], &[]);
    assert_eq!(code, 1);

    let (code, out, _) = gatehouse(&env, &["jobs", "purge", "--queue", "sync_catalog"], &[]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "purged 2 dead job(s)");
    assert_eq!(zcard(&env, "{sync_catalog:0}:dead").await, 0);
    assert_eq!(
        hlen(&env, "{sync_catalog:0}:data").await,
        1,
        "only the retried job's payload is left"
    );
    let (code, out, _) = gatehouse(&env, &["jobs", "purge"], &[]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "purged 0 dead job(s)");

    let (code, _, err) = gatehouse(
        &env,
        &["jobs", "dead"],
        &[("REDIS_URL", "redis://127.0.0.1:1")],
    );
    assert_eq!(code, 2, "Redis unreachable: {err}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_failing_for_good_logs_one_error_line_and_reaches_sentry() {
    // A loopback server plays Sentry: the worker's ERROR line about the dead letter must arrive
    // there as an event, and appear once in the process's JSON logs.
    let env = TestEnv::new().await;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let app = axum::Router::new().fallback({
        let received = received.clone();
        move |body: axum::body::Bytes| async move {
            if let Ok(mut r) = received.lock() {
                r.push(String::from_utf8_lossy(&body).into_owned());
            }
            axum::Json(serde_json::json!({}))
        }
    });
    let addr = serve_loopback(app).await;
    let dsn = format!("http://publickey@{addr}/42");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .arg("work")
        .env_clear()
        .envs(env.vars.iter())
        .env("SENTRY_DSN", &dsn)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut redis = env.redis.clone();
    let job = env
        .queues()
        .enqueue(&mut redis, &sync_job(), Enqueue::default())
        .await
        .expect("enqueue");
    assert!(
        env.wait_for_dead("sync_catalog", &job.job_id, Duration::from_secs(20))
            .await
    );
    let reached = eventually(Duration::from_secs(15), || async {
        received
            .lock()
            .map(|r| {
                r.iter()
                    .any(|b| b.contains("dead-lettered") && b.contains(&job.job_id))
            })
            .unwrap_or(false)
    })
    .await;
    let status = terminate(&mut child);
    assert!(status.success());
    assert!(reached, "a Sentry event names the dead-lettered job");
    let mut logs = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        use std::io::Read;
        let _ = stderr.read_to_string(&mut logs);
    }
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("dead-lettered") && l.contains(&job.job_id))
        .collect();
    assert_eq!(lines.len(), 1, "one structured line: {logs}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON log line");
    assert_eq!(line["level"], "ERROR");
    assert_eq!(line["job.queue"], "sync_catalog");
    assert_eq!(line["job.attempt"], 1);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_wait_out_a_postgres_outage_without_using_attempts_and_none_is_lost_or_half_applied() {
    const JOBS: i64 = 300;
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    // The proxy accepts connections and closes them at once while it is cut, as a PgBouncer,
    // HAProxy or cloud load balancer does while its backend is down.
    let proxy = FaultProxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let mut url = url::Url::parse(&env.db_url).expect("db url");
    url.set_port(Some(proxy.addr.port())).expect("port");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy(url.as_str())
        .expect("lazy pool");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(gatehouse::worker::run(
        env.worker_state_with(pool),
        env.redis.clone(),
        env.queues(),
        env.worker_options(),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut redis = env.redis.clone();
    let jobs: Vec<InboundMessage> = (0..JOBS).map(|_| low_confidence_message(tenant)).collect();
    let half = (JOBS / 2) as usize;
    env.queues()
        .enqueue_batch(&mut redis, &jobs[..half])
        .await
        .expect("enqueue");
    assert!(
        eventually(Duration::from_secs(30), || async {
            env.count("SELECT count(*) FROM messages").await >= 20
        })
        .await
    );
    // PostgreSQL goes away for two seconds while jobs keep arriving.
    proxy.set(Mode::AcceptThenClose);
    env.queues()
        .enqueue_batch(&mut redis, &jobs[half..])
        .await
        .expect("enqueue");
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set(Mode::Pass);

    let n = env
        .wait_for_count(
            "SELECT count(*) FROM messages",
            JOBS,
            Duration::from_secs(60),
        )
        .await;
    if n != JOBS {
        let mut r = env.redis.clone();
        let active: i64 = redis::cmd("LLEN")
            .arg(format!("{}:{{inbound_message:0}}:active", env.namespace))
            .query_async(&mut r)
            .await
            .unwrap_or(-1);
        panic!(
            "every job ran once the database was back: {n} of {JOBS}; active {active}, scheduled {}, dead {}, done {}",
            zcard(&env, "{inbound_message:0}:scheduled").await,
            zcard(&env, "{inbound_message:0}:dead").await,
            zcard(&env, "{inbound_message:0}:done").await,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(streak(&env).await, JOBS, "nothing applied twice or half");
    assert_eq!(zcard(&env, "{inbound_message:0}:dead").await, 0);
    // The outage is not the jobs' fault: none used an attempt for it.
    let mut retried = 0;
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{}:{{inbound_message:0}}:done", env.namespace))
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .expect("done ids");
    for id in ids {
        let meta = env.job_meta("inbound_message", &id).await;
        let attempts: u32 = meta
            .get("attempts")
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);
        if attempts > 1 {
            retried += 1;
        }
    }
    assert_eq!(retried, 0, "no job used an attempt for the outage");
    let _ = stop.send(());
    let _ = worker.await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_waits_in_redis_not_in_a_worker_slot() {
    // One slot, retries up to ten minutes away: after a failed attempt the job sits in the
    // scheduled set with its due time, and the single slot takes the next job at once.
    let env = TestEnv::with_vars(|v| {
        v.insert("WORKER_CONCURRENCY".into(), "1".into());
        v.insert("JOB_RETRY_BASE_MS_SYNC_CATALOG".into(), "600000".into());
        v.insert("JOB_RETRY_CAP_MS_SYNC_CATALOG".into(), "600000".into());
    })
    .await;
    // A store that answers 503 for this request: a failure of the job's own, worth a retry
    // (one nobody listens on would be an outage, deferred without an attempt).
    let failing_store = answering(503).await;
    let tenant = gatehouse::tenants::create(
        &env.pool,
        &env.config.keyring,
        &gatehouse::tenants::NewTenant {
            name: "Failing shop".into(),
            twilio_account_sid: ACCOUNT_SID.into(),
            twilio_auth_token: secrecy::SecretString::from(TOKEN.to_owned()),
            store_url: Some(format!("http://{failing_store}")),
            store_api_key: Some(secrecy::SecretString::from("k".repeat(20))),
            webhook_shared_key: None,
            owner_email: None,
        },
    )
    .await
    .expect("tenant");
    let worker = env.start_worker();
    let mut redis = env.redis.clone();
    let failing = env
        .queues()
        .enqueue(
            &mut redis,
            &SyncCatalog {
                tenant_id: tenant,
                requested_by: Uuid::new_v4(),
                mode: SyncMode::Full,
            },
            Enqueue::default(),
        )
        .await
        .expect("enqueue");
    let scheduled = eventually(Duration::from_secs(10), || {
        let job_id = failing.job_id.clone();
        let env = &env;
        async move {
            env.job_meta("sync_catalog", &job_id)
                .await
                .get("retry_at")
                .is_some()
        }
    })
    .await;
    assert!(scheduled, "the failed attempt was rescheduled");
    let meta = env.job_meta("sync_catalog", &failing.job_id).await;
    let retry_at: u64 = meta
        .get("retry_at")
        .and_then(|v| v.parse().ok())
        .expect("retry_at");
    let attempts: u32 = meta
        .get("attempts")
        .and_then(|v| v.parse().ok())
        .expect("attempts");
    assert_eq!(attempts, 1);
    let due: Option<f64> = redis::cmd("ZSCORE")
        .arg(format!("{}:{{sync_catalog:0}}:scheduled", env.namespace))
        .arg(&failing.job_id)
        .query_async(&mut redis)
        .await
        .expect("zscore");
    assert_eq!(
        due.map(|d| d as u64),
        Some(retry_at),
        "due time kept in Redis"
    );
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut redis)
        .await
        .expect("time");
    let now_ms = secs * 1000 + micros / 1000;
    assert!(retry_at <= now_ms + 600_000, "within the cap");

    // The one slot is free: a new job runs now, long before the retry is due (minutes away:
    // a slot held until then would miss this bound, which leaves room for a loaded machine).
    // Marked processed before it is enqueued (the running worker may take it at once), so it
    // finishes without a store or a tenant.
    let next = Uuid::now_v7().to_string();
    sqlx::query(
        "INSERT INTO processed_jobs (job_id, queue, worker) VALUES ($1, 'sync_catalog', 'earlier')",
    )
    .bind(&next)
    .execute(&env.pool)
    .await
    .expect("mark processed");
    env.queues()
        .enqueue(
            &mut redis,
            &sync_job(),
            Enqueue {
                job_id: Some(next.clone()),
                ..Enqueue::default()
            },
        )
        .await
        .expect("enqueue");
    let done = eventually(Duration::from_secs(15), || async {
        let mut redis = env.redis.clone();
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(format!("{}:{{sync_catalog:0}}:done", env.namespace))
            .arg(&next)
            .query_async(&mut redis)
            .await
            .expect("zscore");
        score.is_some()
    })
    .await;
    assert!(done, "the next job did not wait for the retry's delay");
    worker.stop().await.expect("stop");
    env.cleanup().await;
}
