//! Workers: atomic counters under concurrency, two worker processes sharing one queue,
//! graceful shutdown.

use std::time::Duration;

use crate::common::*;
use gatehouse::classify::classify_with_rules;
use gatehouse::conversations::{InboundContext, InboundOutcome, store_inbound};
use gatehouse_jobs::client::Enqueue;
use gatehouse_testenv::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_low_confidence_messages_count_exactly_a_hundred() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let pool = env.pool.clone();
        let config = env.config.clone();
        tasks.push(tokio::spawn(async move {
            let msg = inbound_message(tenant, "+14155550100", "qwzx vbnm");
            let classification = classify_with_rules(&msg.body);
            let ctx = InboundContext {
                keyring: &config.keyring,
                blind_index: &config.blind_index,
                min_confidence: config.llm_min_confidence,
                worker: "test",
            };
            store_inbound(&pool, &ctx, &format!("job-{i}"), &msg, &classification).await
        }));
    }
    for task in tasks {
        let outcome = task.await.expect("task").expect("stored");
        assert!(matches!(outcome, InboundOutcome::Stored { .. }));
    }
    let (count, state): (i32, String) =
        sqlx::query_as("SELECT low_confidence_count, state FROM conversations")
            .fetch_one(&env.pool)
            .await
            .expect("one conversation");
    assert_eq!(count, 100);
    assert_eq!(state, "handoff");
    assert_eq!(env.count("SELECT count(*) FROM messages").await, 100);
    assert_eq!(env.count("SELECT count(*) FROM conversations").await, 1);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_jobs_racing_with_one_message_sid_store_one_row_and_count_it_once() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    // One message enqueued twenty times under different job ids (a producer that retried, say):
    // the jobs race, the unique key lets one message in, and the losers' streak updates roll
    // back with their failed insert.
    let msg = inbound_message(tenant, "+14155550100", "qwzx vbnm");
    let mut tasks = Vec::new();
    for i in 0..20 {
        let pool = env.pool.clone();
        let config = env.config.clone();
        let msg = msg.clone();
        tasks.push(tokio::spawn(async move {
            let classification = classify_with_rules(&msg.body);
            let ctx = InboundContext {
                keyring: &config.keyring,
                blind_index: &config.blind_index,
                min_confidence: config.llm_min_confidence,
                worker: "test",
            };
            store_inbound(&pool, &ctx, &format!("race-{i}"), &msg, &classification).await
        }));
    }
    let mut stored = 0;
    for task in tasks {
        match task.await.expect("task").expect("no error") {
            InboundOutcome::Stored { .. } => stored += 1,
            InboundOutcome::DuplicateMessage => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(stored, 1, "exactly one job stores the message");
    assert_eq!(env.count("SELECT count(*) FROM messages").await, 1);
    let count: i32 = sqlx::query_scalar("SELECT low_confidence_count FROM conversations")
        .fetch_one(&env.pool)
        .await
        .expect("one conversation");
    assert_eq!(count, 1, "the streak counts the message once");
    // Redelivering the winner's job (whichever it was) is recognised as already processed.
    let winner: String = sqlx::query_scalar("SELECT job_id FROM messages")
        .fetch_one(&env.pool)
        .await
        .expect("message");
    let ctx = InboundContext {
        keyring: &env.config.keyring,
        blind_index: &env.config.blind_index,
        min_confidence: env.config.llm_min_confidence,
        worker: "test",
    };
    let again = store_inbound(
        &env.pool,
        &ctx,
        &winner,
        &msg,
        &classify_with_rules(&msg.body),
    )
    .await
    .expect("redelivery");
    assert_eq!(again, InboundOutcome::AlreadyProcessed);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_streak_hands_off_at_three_and_a_confident_answer_resets_it() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let ctx = InboundContext {
        keyring: &env.config.keyring,
        blind_index: &env.config.blind_index,
        min_confidence: env.config.llm_min_confidence,
        worker: "test",
    };
    let mut seen = Vec::new();
    for (i, body) in ["qwzx", "qwzx", "qwzx", "hello", "qwzx"].iter().enumerate() {
        let msg = inbound_message(tenant, "+14155550100", body);
        let outcome = store_inbound(
            &env.pool,
            &ctx,
            &format!("job-{i}"),
            &msg,
            &classify_with_rules(body),
        )
        .await
        .expect("stored");
        match outcome {
            InboundOutcome::Stored {
                low_confidence_count,
                handoff,
                ..
            } => seen.push((low_confidence_count, handoff)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![(1, false), (2, false), (3, true), (0, true), (1, true)],
        "handoff at three; a confident answer resets the count, the state stays"
    );
    // Another customer of the same tenant has a separate conversation.
    let other = inbound_message(tenant, "+14155550111", "qwzx");
    store_inbound(
        &env.pool,
        &ctx,
        "job-x",
        &other,
        &classify_with_rules("qwzx"),
    )
    .await
    .expect("stored");
    assert_eq!(env.count("SELECT count(*) FROM conversations").await, 2);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_worker_processes_share_one_queue_and_apply_no_job_twice() {
    two_processes_share_one_queue(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_worker_processes_without_group_commit_share_one_queue_and_apply_no_job_twice() {
    two_processes_share_one_queue(&[("GROUP_COMMIT_MAX_JOBS", "1")]).await;
}

/// Two `gatehouse work` processes drain one queue, committing in groups (the default) or one
/// job at a time (`mode`).
async fn two_processes_share_one_queue(mode: &[(&str, &str)]) {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let queues = env.queues();
    let mut redis = env.redis.clone();
    const JOBS: i64 = 1000;
    // Half on one conversation (one job at a time there, whatever the mode), half spread over
    // ten (groups can form); all low-confidence: any job applied twice would push a counter
    // past its share.
    for i in 0..JOBS {
        let from = if i % 2 == 0 {
            "+14155550100".to_owned()
        } else {
            format!("+1415555011{}", (i / 2) % 10)
        };
        queues
            .enqueue(
                &mut redis,
                &inbound_message(tenant, &from, "qwzx"),
                Enqueue::default(),
            )
            .await
            .expect("enqueue");
    }
    let mut a = env.spawn(&["work"], mode);
    let mut b = env.spawn(&["work"], mode);
    let n = env
        .wait_for_count(
            "SELECT count(*) FROM messages",
            JOBS,
            Duration::from_secs(90),
        )
        .await;
    assert_eq!(n, JOBS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.count("SELECT count(*) FROM processed_jobs").await, JOBS);
    let count: i64 =
        sqlx::query_scalar("SELECT sum(low_confidence_count)::int8 FROM conversations")
            .fetch_one(&env.pool)
            .await
            .expect("conversations");
    assert_eq!(count, JOBS, "no job's effect was applied twice");
    let hot: i32 = sqlx::query_scalar("SELECT max(low_confidence_count) FROM conversations")
        .fetch_one(&env.pool)
        .await
        .expect("conversation");
    assert_eq!(
        i64::from(hot),
        JOBS / 2,
        "the busy customer's streak counts each of its jobs"
    );
    let by_job: i64 = env
        .count("SELECT count(DISTINCT job_id) FROM messages")
        .await;
    assert_eq!(by_job, JOBS);
    let sa = terminate(&mut a);
    let sb = terminate(&mut b);
    assert!(sa.success(), "first worker exits 0 on SIGTERM: {sa:?}");
    assert!(sb.success(), "second worker exits 0 on SIGTERM: {sb:?}");
    // Both processes took jobs from the one queue, under distinct names.
    let processes = env
        .count(
            "SELECT count(DISTINCT split_part(worker, '-inbound_message', 1)) FROM processed_jobs",
        )
        .await;
    assert_eq!(processes, 2, "both worker processes took jobs");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_worker_notices_a_new_job_by_polling_not_at_its_next_heartbeat() {
    // Without a working idle poll a worker looks for jobs only at its heartbeat (apalis-redis
    // note 6; and a release build with apalis-core's IntervalStrategy was measured waiting
    // 4 s for the 5 s heartbeat). With a 60 s heartbeat, a pickup well under a minute proves
    // the poll wakes the worker; the 20 s bound is generous on purpose.
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let mut worker = env.spawn(&["work"], &[("WORKER_HEARTBEAT_SECONDS", "60")]);
    let queues = env.queues();
    let mut redis = env.redis.clone();
    for round in 1..=3 {
        // Idle long enough for the first poll timers to have fired.
        tokio::time::sleep(Duration::from_millis(if round == 1 { 1500 } else { 300 })).await;
        queues
            .enqueue(
                &mut redis,
                &inbound_message(tenant, "+14155550100", "hello"),
                Enqueue::default(),
            )
            .await
            .expect("enqueue");
        let n = env
            .wait_for_count(
                "SELECT count(*) FROM messages",
                round,
                Duration::from_secs(20),
            )
            .await;
        assert_eq!(n, round, "job {round} was picked up while the worker idled");
    }
    assert!(terminate(&mut worker).success());
    env.cleanup().await;
}

/// A private Redis server on its own port, so a test may restart it without disturbing
/// the other tests.
struct PrivateRedis {
    port: u16,
    child: std::process::Child,
}

impl PrivateRedis {
    fn start(port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls a worker's `/healthz` until it answers `want` (or 20 s pass); returns the last status.
async fn wait_for_health(url: &str, want: u16) -> u16 {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut last = 0;
    while std::time::Instant::now() < deadline {
        if let Ok(r) = reqwest::get(url).await {
            last = r.status().as_u16();
            if last == want {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_rides_out_a_redis_restart_and_takes_jobs_afterwards() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let port = free_port();
    let redis_server = PrivateRedis::start(port);
    let url = redis_server.url();
    let health_port = free_port().to_string();
    let mut worker = env.spawn(
        &["work"],
        &[("REDIS_URL", &url), ("WORKER_HEALTH_PORT", &health_port)],
    );
    let health = format!("http://127.0.0.1:{health_port}/healthz");
    // The worker's own health follows Redis (heartbeats are 1 s here).
    assert_eq!(
        wait_for_health(&health, 200).await,
        200,
        "healthy while Redis is up"
    );

    // Redis goes away and comes back empty (it keeps nothing on disk).
    redis_server.stop();
    assert_eq!(wait_for_health(&health, 503).await, 503, "the outage shows");
    let redis_server = PrivateRedis::start(port);
    assert_eq!(wait_for_health(&health, 200).await, 200, "healthy again");
    assert!(
        worker.try_wait().expect("status").is_none(),
        "the worker process is still running"
    );

    let mut conn = gatehouse::redis_conn::connect_url(&secrecy::SecretString::from(url))
        .await
        .expect("private redis");
    env.queues()
        .enqueue(
            &mut conn,
            &inbound_message(tenant, "+14155550100", "hello"),
            Enqueue::default(),
        )
        .await
        .expect("enqueue");
    let n = env
        .wait_for_count("SELECT count(*) FROM messages", 1, Duration::from_secs(30))
        .await;
    assert_eq!(n, 1, "the job enqueued after the restart was processed");
    assert!(terminate(&mut worker).success());
    redis_server.stop();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_keeps_failing_is_retried_then_dead_lettered_never_lost() {
    // An LLM that answers 503 to every request: each attempt fails on its own (an answer from
    // a reachable endpoint counts, unlike an outage).
    let llm = answering(503).await;
    let env = TestEnv::with_vars(|vars| {
        vars.insert("LLM_URL".into(), format!("http://{llm}/v1"));
        vars.insert("LLM_MODEL".into(), "failing-model".into());
    })
    .await;
    let tenant = env.create_tenant().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(gatehouse::worker::run(
        env.worker_state(),
        env.redis.clone(),
        env.queues(),
        gatehouse::worker::WorkerOptions {
            concurrency: 2,
            ..env.worker_options()
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let mut redis = env.redis.clone();
    let job = env
        .queues()
        .enqueue(
            &mut redis,
            &inbound_message(tenant, "+14155550100", "hello"),
            Enqueue::default(),
        )
        .await
        .expect("enqueue");
    let dead = env
        .wait_for_dead("inbound_message", &job.job_id, Duration::from_secs(30))
        .await;
    assert!(dead, "after its last attempt the job is in the dead set");
    let meta = env.job_meta("inbound_message", &job.job_id).await;
    assert_eq!(meta.get("attempts"), Some("4"), "one run and three retries");
    // The payload is still there for an operator to retry.
    let payload: Option<String> = redis::cmd("HGET")
        .arg(format!("{}:{{inbound_message:0}}:data", env.namespace))
        .arg(&job.job_id)
        .query_async(&mut redis)
        .await
        .expect("hget");
    assert!(payload.is_some());
    let stats =
        gatehouse::queue::stats::queue_stats(&mut redis, env.config.layout(), "inbound_message")
            .await
            .expect("queue stats");
    assert_eq!(
        (
            stats.pending,
            stats.retrying,
            stats.in_flight,
            stats.dead,
            stats.done
        ),
        (0, 0, 0, 1, 0),
        "the stats see one dead job and nothing else: {stats:?}"
    );
    assert!(stats.workers >= 1, "the running worker is registered");
    let _ = stop.send(());
    let _ = worker.await;
    env.cleanup().await;
}
