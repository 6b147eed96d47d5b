//! Dependency outages (SPEC "Dependency outages"): a real `gatehouse work` process whose Redis
//! is behind the fault proxy (`testenv/src/fault_proxy.rs`), through every fault shape, with a
//! backlog; and the fault proxy's own modes against a loopback echo server.

use std::time::{Duration, Instant};

use crate::common::*;
use gatehouse_jobs::InboundMessage;
use gatehouse_testenv::fault_proxy::{FaultProxy, Mode, echo_server};
use gatehouse_testenv::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

/// Reads until `n` bytes arrived or the peer ends the stream (returns what came, and the error
/// that ended it if any).
async fn read_n(stream: &mut TcpStream, n: usize) -> (Vec<u8>, Option<std::io::Error>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await {
            Ok(Ok(0)) => return (out, None),
            Ok(Ok(k)) => out.extend_from_slice(&buf[..k]),
            Ok(Err(e)) => return (out, Some(e)),
            Err(_) => panic!("nothing happened within 20 s"),
        }
    }
    (out, None)
}

/// Whether the peer ended `stream` (EOF or an error), waiting at most 20 s.
async fn ended(stream: &mut TcpStream) -> Result<(), std::io::Error> {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(n)) => panic!("{n} bytes arrived on a connection that should have ended"),
        Ok(Err(e)) => Err(e),
        Err(_) => panic!("the connection was not ended within 20 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_proxy_forwards_in_pass_and_one_byte_at_a_time_in_trickle() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
    client.write_all(b"hello").await.expect("write");
    assert_eq!(read_n(&mut client, 5).await.0, b"hello");

    // Trickled: the echo still arrives whole, a byte at a time.
    proxy.set(Mode::Trickle);
    let mut slow = TcpStream::connect(proxy.addr).await.expect("connect");
    slow.write_all(b"slow!").await.expect("write");
    assert_eq!(read_n(&mut slow, 5).await.0, b"slow!");
    assert!(
        proxy.trickled() >= 10,
        "both directions went a byte at a time"
    );
    // A chunk in the middle of trickling goes at full speed once the fault ends: 4,000 bytes
    // a byte at a time would take 80 s each way.
    let long = vec![b'x'; 4000];
    slow.write_all(&long).await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set(Mode::Pass);
    let resumed = Instant::now();
    assert_eq!(read_n(&mut slow, long.len()).await.0, long);
    assert!(
        resumed.elapsed() < Duration::from_secs(40),
        "the rest of a trickled chunk went at once after the fault ended ({:?})",
        resumed.elapsed()
    );
    let mut fresh = TcpStream::connect(proxy.addr).await.expect("connect");
    fresh.write_all(b"again").await.expect("write");
    assert_eq!(read_n(&mut fresh, 5).await.0, b"again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_proxy_refuses_with_its_listener_closed_and_resets_open_connections() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut open = TcpStream::connect(proxy.addr).await.expect("connect");
    open.write_all(b"x").await.expect("write");
    assert_eq!(read_n(&mut open, 1).await.0, b"x");

    proxy.set(Mode::Refuse);
    let error = ended(&mut open).await.expect_err("reset, not closed");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    let refused = eventually(Duration::from_secs(10), || async {
        matches!(
            TcpStream::connect(proxy.addr).await,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
    .await;
    assert!(refused, "new connections are refused by the kernel");
    // The port stays the proxy's while it refuses: were it free, another process's socket
    // (a `bind(0)`, an outgoing connection's local port) could take it, and the proxy could
    // not listen there again. A socket without `SO_REUSEADDR` cannot share it.
    let taken = tokio::net::TcpSocket::new_v4()
        .expect("socket")
        .bind(proxy.addr)
        .expect_err("the refusing proxy's port is held");
    assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);

    proxy.set(Mode::Pass);
    let start = Instant::now();
    let mut back = loop {
        if let Ok(stream) = TcpStream::connect(proxy.addr).await {
            break stream;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the same port listens again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    back.write_all(b"y").await.expect("write");
    assert_eq!(read_n(&mut back, 1).await.0, b"y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_proxy_closes_or_resets_new_and_open_connections() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut open = TcpStream::connect(proxy.addr).await.expect("connect");
    open.write_all(b"x").await.expect("write");
    assert_eq!(read_n(&mut open, 1).await.0, b"x");

    // Accept-then-close: the open connection gets a FIN, a new one is accepted and closed.
    proxy.set(Mode::AcceptThenClose);
    ended(&mut open).await.expect("a clean close (FIN)");
    let mut new = TcpStream::connect(proxy.addr).await.expect("accepted");
    ended(&mut new).await.expect("closed at once");

    // Reset: mid-stream RST on an open connection, and on new ones.
    proxy.set(Mode::Pass);
    let mut open = TcpStream::connect(proxy.addr).await.expect("connect");
    open.write_all(b"y").await.expect("write");
    assert_eq!(read_n(&mut open, 1).await.0, b"y");
    proxy.set(Mode::Reset);
    let error = ended(&mut open).await.expect_err("reset");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    // (On loopback the RST may even beat `connect` returning.)
    let error = match TcpStream::connect(proxy.addr).await {
        Ok(mut new) => ended(&mut new).await.expect_err("reset"),
        Err(error) => error,
    };
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(
        proxy
            .stats
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_proxy_blackholes_or_answers_garbage() {
    let proxy = FaultProxy::start(echo_server().await).await;
    proxy.set(Mode::Blackhole);
    let mut client = TcpStream::connect(proxy.addr).await.expect("accepted");
    client.write_all(b"PING\r\n").await.expect("write");
    assert!(
        eventually(Duration::from_secs(10), || async { proxy.discarded() >= 6 }).await,
        "what the client sent was read"
    );
    let mut buf = [0u8; 16];
    assert!(
        matches!(client.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "and nothing was answered"
    );
    // Leaving the blackhole resets the connection whose bytes were eaten.
    proxy.set(Mode::Garbage);
    // (A reset, which a read reports as an error; an EOF would also be an end, but the proxy
    // never sends a FIN here.)
    let error = ended(&mut client).await.expect_err("reset, not a FIN");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);

    let mut client = TcpStream::connect(proxy.addr).await.expect("accepted");
    client.write_all(b"PING\r\n").await.expect("write");
    let (answer, _) = read_n(&mut client, 16).await;
    assert!(answer.len() >= 16, "an answer came");
    assert_ne!(&answer[..6], b"PING\r\n", "not the echo");
    assert!(answer[0] < 0x20, "the first byte is no protocol marker");
    assert!(proxy.garbage() >= 16);
}

fn low_confidence_message(tenant: Uuid) -> InboundMessage {
    inbound_message(tenant, "+14155550100", "qwzx vbnm")
}

/// The worker's `/healthz`: status and body (None while it does not answer).
async fn health(url: &str) -> Option<(u16, serde_json::Value)> {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.ok()?))
}

/// Polls `/healthz` until `want` holds of its answer (at most `within`); returns whether it
/// did and the last answer.
async fn wait_health(
    url: &str,
    within: Duration,
    want: impl Fn(u16, &serde_json::Value) -> bool,
) -> (bool, Option<(u16, serde_json::Value)>) {
    let start = Instant::now();
    loop {
        let last = health(url).await;
        if last.as_ref().is_some_and(|(s, b)| want(*s, b)) {
            return (true, last);
        }
        if start.elapsed() > within {
            return (false, last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `gatehouse work` process whose log lines (at `RUST_LOG`) are kept, with its health port.
struct LoggedWorker {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    collector: Option<std::thread::JoinHandle<()>>,
    health_url: String,
}

impl LoggedWorker {
    /// Outage transitions, circuits and warnings are logged, and the outage module at DEBUG
    /// (each failed probe and its error, for a failure report); `GH_TEST_WORKER_LOG` replaces
    /// the filter, to chase a failure with more.
    const LOG: &str =
        "warn,gatehouse::worker::outage=debug,gatehouse::llm=info,gatehouse::catalog=info";

    fn spawn(env: &TestEnv, extra: &[(&str, &str)]) -> Self {
        let health_port = free_port().to_string();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .arg("work")
            .env_clear()
            .envs(env.vars.iter())
            .envs(extra.iter().copied())
            .env("WORKER_HEALTH_PORT", &health_port)
            .env(
                "RUST_LOG",
                std::env::var("GH_TEST_WORKER_LOG").unwrap_or_else(|_| Self::LOG.to_owned()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn gatehouse work");
        let stderr = child.stderr.take().expect("stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let collector = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    eprintln!("{line}");
                    lines.lock().expect("lines").push(line);
                }
            })
        };
        Self {
            child,
            lines,
            collector: Some(collector),
            health_url: format!("http://127.0.0.1:{health_port}/healthz"),
        }
    }

    /// Log lines containing `message`.
    fn logged(&self, message: &str) -> usize {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| l.contains(message))
            .count()
    }

    /// The last `n` log lines, for a failure report.
    fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().expect("lines");
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("status").is_none()
    }

    /// SIGTERM; whether it stopped cleanly. The log is complete afterwards.
    fn stop(&mut self) -> bool {
        let ok = terminate(&mut self.child).success();
        if let Some(collector) = self.collector.take() {
            let _ = collector.join();
        }
        ok
    }

    async fn wait_health(
        &self,
        within: Duration,
        want: impl Fn(u16, &serde_json::Value) -> bool,
    ) -> (bool, Option<(u16, serde_json::Value)>) {
        wait_health(&self.health_url, within, want).await
    }
}

impl Drop for LoggedWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `/healthz`'s `outages` names `dependency`, with an RFC 3339 time.
fn names_outage(body: &serde_json::Value, dependency: &str) -> bool {
    body["outages"].as_array().is_some_and(|outages| {
        outages.iter().any(|o| {
            o["dependency"] == dependency
                && o["since"].as_str().is_some_and(|t| {
                    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                        .is_ok()
                })
        })
    })
}

/// `/healthz` answers 200 and names no outage.
fn all_clear(status: u16, body: &serde_json::Value) -> bool {
    status == 200 && body["outages"].as_array().is_some_and(Vec::is_empty)
}

/// Whether `/healthz` says Redis is down, with an RFC 3339 time.
fn says_redis_down(body: &serde_json::Value) -> bool {
    body["redis"] == "unreachable" && names_outage(body, "redis")
}

async fn messages_of(env: &TestEnv, sids: &[String]) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT message_sid) FROM messages WHERE message_sid = ANY($1)",
    )
    .bind(sids)
    .fetch_one(&env.pool)
    .await
    .expect("count messages")
}

/// Waits until `total` of `sids` are stored, for as long as the drain makes progress: `false`
/// once [`DRAIN_STALL`] passes without a new row (a stuck drain) or after [`DRAIN_MOST`].
/// These tests assert liveness — no job lost, none stuck, none run twice — not the drain's
/// speed (the benchmarks' business): one customer's messages commit one at a time, so on a
/// machine loaded by the rest of the suite the same drain took 20 s or well over 60 s
/// (~50 commits a second), which a fixed bound mistook for a stall. Polled every 500 ms: the
/// count over thousands of MessageSids itself costs PostgreSQL ~1 s under that load.
async fn drained(env: &TestEnv, sids: &[String], total: i64) -> bool {
    let started = Instant::now();
    let (mut last, mut progressed) = (-1, Instant::now());
    loop {
        let (rows, _) = messages_of(env, sids).await;
        if rows >= total {
            return true;
        }
        if rows > last {
            (last, progressed) = (rows, Instant::now());
        } else if progressed.elapsed() > DRAIN_STALL {
            return false;
        }
        if started.elapsed() > DRAIN_MOST {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How long a drain may go without storing a message before it counts as stuck: ten orphan
/// timeouts of the test environment (3 s) and six of the outage backoff's cap (5 s).
const DRAIN_STALL: Duration = Duration::from_secs(30);

/// The longest any drain here may take, progressing or not.
const DRAIN_MOST: Duration = Duration::from_secs(300);

/// Where `queue`'s jobs are in Redis (each key's type and size, and the workers' heartbeats),
/// for a failure message: which state jobs are stuck in, if they are.
async fn queue_state(env: &TestEnv, queue: &str) -> String {
    let keys = env.queues().keys(queue);
    let mut redis = env.redis.clone();
    let mut state = Vec::new();
    for (label, key) in [
        ("active", keys.active()),
        ("ready", keys.ready()),
        ("parked", keys.parked()),
        ("running", keys.running()),
        ("scheduled", keys.scheduled()),
        ("inflight", keys.inflight()),
        ("done", keys.done()),
        ("dead", keys.dead()),
        ("data", keys.data()),
        ("workers", keys.workers()),
    ] {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap_or_else(|e| format!("? ({e})"));
        let size_command = match kind.as_str() {
            "list" => Some("LLEN"),
            "zset" => Some("ZCARD"),
            "hash" => Some("HLEN"),
            "set" => Some("SCARD"),
            _ => None,
        };
        let size: i64 = match size_command {
            Some(command) => redis::cmd(command)
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap_or(-1),
            None => 0,
        };
        state.push(format!("{label}: {kind} {size}"));
    }
    // Each registered worker's last heartbeat, in milliseconds before Redis's clock now.
    let now_ms: (u64, u64) = redis::cmd("TIME")
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    let now_ms = now_ms.0 * 1000 + now_ms.1 / 1000;
    let workers: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(keys.workers())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    let workers: Vec<String> = workers
        .into_iter()
        .map(|(name, beat)| format!("{name} {}ms ago", now_ms as f64 - beat))
        .collect();
    state.push(format!("heartbeats: {workers:?}"));
    // Who holds the in-flight jobs (a few).
    let inflight: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(keys.inflight())
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    let holders: Vec<String> = inflight
        .into_iter()
        .take(5)
        .map(|(job, worker)| format!("{job}: {worker}"))
        .collect();
    state.push(format!("held: {holders:?}"));
    state.join("; ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_drain_reports_where_the_queues_jobs_are() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let mut redis = env.redis.clone();
    env.queues()
        .enqueue_batch(&mut redis, &[low_confidence_message(tenant)])
        .await
        .expect("enqueue");
    let state = queue_state(&env, "inbound_message").await;
    assert!(state.contains("active: list 1"), "{state}");
    assert!(state.contains("data: hash 1"), "{state}");
    assert!(state.contains("heartbeats: []"), "{state}");
    env.cleanup().await;
}

/// How many of a queue's finished jobs took how many attempts (from their meta hashes).
async fn attempts_histogram(
    env: &TestEnv,
    queue: &str,
) -> std::collections::BTreeMap<String, usize> {
    let mut redis = env.redis.clone();
    let metas: Vec<String> = redis::cmd("HVALS")
        .arg(env.queues().keys(queue).meta())
        .query_async(&mut redis)
        .await
        .expect("hvals");
    let mut histogram = std::collections::BTreeMap::new();
    for meta in metas {
        let meta = gatehouse_jobs::keys::JobMeta::parse(Some(&meta));
        *histogram
            .entry(meta.get("attempts").unwrap_or("-").to_owned())
            .or_insert(0) += 1;
    }
    histogram
}

/// Asserts that every finished job of `queue` ran on its first counted attempt: no outage
/// used one. A redelivery may still be on its way when the effects are already committed (a
/// job whose worker missed its heartbeats under load is rescued and run again; if the store's
/// circuit is open then, that run is deferred with its count unchanged, `attempts` 0): the
/// histogram is read until the queue has settled.
async fn assert_no_attempt_used(env: &TestEnv, queue: &str, jobs: usize) {
    let expected = std::collections::BTreeMap::from([("1".to_owned(), jobs)]);
    let mut histogram = attempts_histogram(env, queue).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while histogram != expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        histogram = attempts_histogram(env, queue).await;
    }
    assert_eq!(
        histogram, expected,
        "every job finished on attempt 1 (attempts: jobs)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_rides_out_every_redis_fault_shape_and_no_job_dies_is_lost_or_runs_twice() {
    const BACKLOG: usize = 1000;
    const ARRIVING: usize = 300;
    const WEBHOOKS: usize = 20;
    // The worker and the ingress reach Redis through the proxy (REDIS_URL); the test's own
    // connection goes straight to it.
    let proxy = FaultProxy::start(address_of(&redis_url())).await;
    let redis_via_proxy = proxy.redis_url();
    let env = TestEnv::with_vars(|vars| {
        vars.insert("REDIS_URL".into(), redis_via_proxy.clone());
    })
    .await;
    let tenant = env.create_tenant().await;
    // Its log lines are kept: the outage is logged when it starts and when it ends.
    let mut worker = LoggedWorker::spawn(&env, &[]);
    let ingress =
        gatehouse::redis_conn::connect_lazy_url(&secrecy::SecretString::from(redis_via_proxy))
            .expect("redis url");
    let server = TestServer::start(std::sync::Arc::new(gatehouse::http::AppState::new(
        env.config.clone(),
        env.pool.clone(),
        ingress,
    )))
    .await;
    let http = reqwest::Client::new();
    let health_url = worker.health_url.clone();
    assert!(
        eventually(Duration::from_secs(30), || async {
            health(&health_url).await.is_some_and(|(s, _)| s == 200)
        })
        .await,
        "the worker is healthy behind the proxy"
    );

    let mut redis = env.redis.clone();
    let mut sids = Vec::new();
    // Webhooks the ingress refused during a fault, which Twilio sends again later.
    let mut to_resend: Vec<String> = Vec::new();
    let send = |sid: String| {
        let http = &http;
        let server = &server;
        async move {
            let params = sms_params(&sid, "+14155550100", "qwzx vbnm");
            let status = signed_form(http, server, tenant, &params)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            (sid, status)
        }
    };
    for shape in Mode::FAULTS {
        // A backlog, and the fault while the worker is in the middle of it; more jobs arrive
        // during the fault, straight into Redis and as webhooks the ingress cannot enqueue.
        let jobs: Vec<InboundMessage> = (0..BACKLOG + ARRIVING)
            .map(|_| low_confidence_message(tenant))
            .collect();
        sids.extend(jobs.iter().map(|j| j.message_sid.clone()));
        let before = messages_of(&env, &sids).await.0;
        env.queues()
            .enqueue_batch(&mut redis, &jobs[..BACKLOG])
            .await
            .expect("enqueue");
        assert!(
            eventually(Duration::from_secs(30), || async {
                messages_of(&env, &sids).await.0 > before
            })
            .await,
            "{shape:?}: the worker is draining before the fault"
        );
        let fault_started = Instant::now();
        proxy.set(shape);
        env.queues()
            .enqueue_batch(&mut redis, &jobs[BACKLOG..])
            .await
            .expect("enqueue");
        let answers = futures::future::join_all((0..WEBHOOKS).map(|_| send(message_sid()))).await;
        for (sid, status) in answers {
            // 503 for Twilio to retry, or 200 if the fault let it through.
            assert!(
                status == 200 || status == 503,
                "{shape:?}: a webhook answered {status}"
            );
            sids.push(sid.clone());
            if status != 200 {
                to_resend.push(sid);
            }
        }
        if shape != Mode::Trickle {
            let (down, last) = wait_health(&health_url, Duration::from_secs(30), |s, b| {
                s == 503 && says_redis_down(b)
            })
            .await;
            assert!(down, "{shape:?}: /healthz reports redis down: {last:?}");
        }
        // The fault lasts about 5 s in all, whatever it took to be noticed.
        if let Some(rest) = Duration::from_secs(5).checked_sub(fault_started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        assert!(
            worker.running(),
            "{shape:?}: the worker process is still running"
        );
        proxy.set(Mode::Pass);
        let (up, last) = wait_health(&health_url, Duration::from_secs(30), |s, b| {
            all_clear(s, b) && b["redis"] == "ok"
        })
        .await;
        assert!(up, "{shape:?}: /healthz is ok again: {last:?}");
        // Twilio sends the refused webhooks again.
        for sid in std::mem::take(&mut to_resend) {
            let delivered = eventually(Duration::from_secs(20), || async {
                send(sid.clone()).await.1 == 200
            })
            .await;
            assert!(delivered, "{shape:?}: the ingress takes the webhook again");
        }
    }

    let total = sids.len() as i64;
    let all = drained(&env, &sids, total).await;
    let (rows, distinct) = messages_of(&env, &sids).await;
    let state = if all {
        String::new()
    } else {
        queue_state(&env, "inbound_message").await
    };
    assert!(all, "every job ran: {rows} of {total}; the queue: {state}");
    assert_eq!((rows, distinct), (total, total), "one row per message");
    assert_eq!(inbound_dead_letters(&env).await, 0, "no job ended dead");
    let streak: i32 = sqlx::query_scalar("SELECT low_confidence_count FROM conversations")
        .fetch_one(&env.pool)
        .await
        .expect("the conversation");
    assert_eq!(i64::from(streak), total, "no job's effect applied twice");
    assert_no_attempt_used(&env, "inbound_message", sids.len()).await;
    assert!(worker.running(), "the worker process never exited");
    assert!(worker.stop(), "and it stops cleanly");
    // One line when each outage starts and one when it ends, not one per retry (a fault's
    // aftermath may at most reopen it once).
    let (started, ended) = (
        worker.logged("redis is unreachable; workers stop fetching"),
        worker.logged("redis is reachable again; workers resume"),
    );
    assert!((5..=12).contains(&started), "{started} outage start lines");
    assert_eq!(started, ended, "each outage that started ended");
    assert_eq!(worker.logged("giving up"), 0);
    server.stop().await;
    drop(proxy);
    env.cleanup().await;
}

/// A private redis-server on `port` with these arguments, started, so a test may make it busy
/// or restart it without disturbing the other tests. Other clients hear BUSY 100 ms into a long
/// script (the default is 5 s).
async fn private_redis(port: u16, args: &[&str]) -> RedisServer {
    let mut args = args.to_vec();
    args.extend(["--busy-reply-threshold", "100"]);
    let mut server = RedisServer::new(port, &args);
    server
        .start()
        .await
        .expect("the private redis-server starts");
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_busy_running_a_script_pauses_the_worker_until_the_script_is_killed() {
    const JOBS: usize = 200;
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = private_redis(free_port(), &["--save", "", "--appendonly", "no"]).await;
    let client = redis::Client::open(server.url()).expect("url");
    let mut conn = gatehouse::redis_conn::connect_url(&secrecy::SecretString::from(server.url()))
        .await
        .expect("private redis");
    let jobs: Vec<InboundMessage> = (0..JOBS).map(|_| low_confidence_message(tenant)).collect();
    let sids: Vec<String> = jobs.iter().map(|j| j.message_sid.clone()).collect();
    let health_port = free_port().to_string();
    let health_url = format!("http://127.0.0.1:{health_port}/healthz");
    let mut worker = env.spawn(
        &["work"],
        &[
            ("REDIS_URL", &server.url()),
            ("WORKER_HEALTH_PORT", &health_port),
        ],
    );
    let (healthy, last) = wait_health(&health_url, Duration::from_secs(30), |s, _| s == 200).await;
    assert!(healthy, "{last:?}");
    env.queues()
        .enqueue_batch(&mut conn, &jobs)
        .await
        .expect("enqueue");
    assert!(
        eventually(Duration::from_secs(30), || async {
            messages_of(&env, &sids).await.0 > 0
        })
        .await
    );

    // A script that never ends: every other client hears BUSY.
    let mut busy_conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let busy = tokio::spawn(async move {
        let _: Result<(), _> = redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query_async(&mut busy_conn)
            .await;
    });
    let (down, last) = wait_health(&health_url, Duration::from_secs(30), |s, b| {
        s == 503 && says_redis_down(b)
    })
    .await;
    assert!(down, "/healthz reports redis down: {last:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        worker.try_wait().expect("status").is_none(),
        "the worker process is still running"
    );
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let killed = eventually(Duration::from_secs(10), || {
        let mut admin = admin.clone();
        async move {
            redis::cmd("SCRIPT")
                .arg("KILL")
                .query_async::<()>(&mut admin)
                .await
                .is_ok()
        }
    })
    .await;
    assert!(killed, "SCRIPT KILL");
    let _ = busy.await;
    let (up, last) = wait_health(&health_url, Duration::from_secs(30), |s, b| {
        s == 200 && b["outages"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    assert!(up, "/healthz is ok again: {last:?}");
    let all = drained(&env, &sids, JOBS as i64).await;
    let (rows, distinct) = messages_of(&env, &sids).await;
    assert!(all, "every job ran: {rows} of {JOBS}");
    assert_eq!((rows, distinct), (JOBS as i64, JOBS as i64));
    let dead: i64 = redis::cmd("ZCARD")
        .arg(format!("{}:{{inbound_message:0}}:dead", env.namespace))
        .query_async(&mut admin)
        .await
        .expect("zcard");
    assert_eq!(dead, 0, "no job ended dead");
    assert!(terminate(&mut worker).success());
    drop(server);
    env.cleanup().await;
}

/// `url` (a PostgreSQL URL) with its host and port replaced by `addr`.
fn through(url: &str, addr: std::net::SocketAddr) -> String {
    let mut url = url::Url::parse(url).expect("a URL");
    url.set_host(Some(&addr.ip().to_string())).expect("host");
    url.set_port(Some(addr.port())).expect("port");
    url.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_rides_out_every_postgres_fault_shape_and_no_job_dies_is_lost_or_runs_twice() {
    const BACKLOG: usize = 1000;
    const ARRIVING: usize = 300;
    const WEBHOOKS: usize = 20;
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    // The worker reaches PostgreSQL only through the proxy; the ingress (in this process)
    // and the test's own checks go straight to it.
    let proxy = FaultProxy::start(address_of(&env.db_url)).await;
    let db_via_proxy = through(&env.db_url, proxy.addr);
    let mut worker = LoggedWorker::spawn(&env, &[("DATABASE_URL", &db_via_proxy)]);
    let (healthy, last) = worker
        .wait_health(Duration::from_secs(30), |s, _| s == 200)
        .await;
    assert!(healthy, "the worker is healthy behind the proxy: {last:?}");
    let server = env.start_server().await;
    let http = reqwest::Client::new();

    let mut redis = env.redis.clone();
    let mut sids = Vec::new();
    for shape in Mode::FAULTS {
        // A backlog, and the fault while the worker is in the middle of it; more jobs arrive
        // during the fault, straight into Redis and as signed webhooks through the ingress.
        // Ten customers, so the worker commits in groups (group commit is on by default)
        // when the fault strikes.
        let jobs: Vec<InboundMessage> = (0..BACKLOG + ARRIVING)
            .map(|i| InboundMessage {
                from: format!("+1415555020{}", i % 10),
                ..low_confidence_message(tenant)
            })
            .collect();
        sids.extend(jobs.iter().map(|j| j.message_sid.clone()));
        let before = messages_of(&env, &sids).await.0;
        env.queues()
            .enqueue_batch(&mut redis, &jobs[..BACKLOG])
            .await
            .expect("enqueue");
        assert!(
            eventually(Duration::from_secs(30), || async {
                messages_of(&env, &sids).await.0 > before
            })
            .await,
            "{shape:?}: the worker is draining before the fault"
        );
        let fault_started = Instant::now();
        proxy.set(shape);
        env.queues()
            .enqueue_batch(&mut redis, &jobs[BACKLOG..])
            .await
            .expect("enqueue");
        for _ in 0..WEBHOOKS {
            let sid = message_sid();
            let params = sms_params(&sid, "+14155550100", "qwzx vbnm");
            let response = signed_form(&http, &server, tenant, &params)
                .send()
                .await
                .expect("webhook");
            assert_eq!(response.status(), 200, "{shape:?}: the ingress takes it");
            sids.push(sid);
        }
        if shape != Mode::Trickle {
            // (A trickle is slowness, not necessarily an outage.)
            let (down, last) = worker
                .wait_health(Duration::from_secs(30), |s, b| {
                    s == 503 && b["postgres"] == "unreachable" && names_outage(b, "postgres")
                })
                .await;
            assert!(down, "{shape:?}: /healthz reports postgres down: {last:?}");
        }
        if let Some(rest) = Duration::from_secs(5).checked_sub(fault_started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        assert!(
            worker.running(),
            "{shape:?}: the worker process is still running"
        );
        let stalled_at = messages_of(&env, &sids).await.0;
        proxy.set(Mode::Pass);
        let (up, last) = worker.wait_health(Duration::from_secs(30), all_clear).await;
        assert!(
            up,
            "{shape:?}: /healthz is ok again: {last:?}\nworker log:\n{}",
            worker.tail(30)
        );
        // The drain resumes within seconds, not after a backoff grown during the outage.
        assert!(
            eventually(Duration::from_secs(15), || async {
                messages_of(&env, &sids).await.0 > stalled_at
            })
            .await,
            "{shape:?}: the drain resumed"
        );
    }

    let total = sids.len() as i64;
    let all = drained(&env, &sids, total).await;
    let (rows, distinct) = messages_of(&env, &sids).await;
    let state = if all {
        String::new()
    } else {
        queue_state(&env, "inbound_message").await
    };
    assert!(all, "every job ran: {rows} of {total}; the queue: {state}");
    assert_eq!((rows, distinct), (total, total), "one row per message");
    assert_eq!(inbound_dead_letters(&env).await, 0, "no job ended dead");
    let streak: i64 =
        sqlx::query_scalar("SELECT sum(low_confidence_count)::int8 FROM conversations")
            .fetch_one(&env.pool)
            .await
            .expect("the conversations");
    assert_eq!(streak, total, "no job's effect applied twice");
    assert_no_attempt_used(&env, "inbound_message", sids.len()).await;
    assert!(worker.running(), "the worker process never exited");
    assert!(worker.stop(), "and it stops cleanly");
    let (started, ended) = (
        worker.logged("postgres is unreachable; workers stop fetching"),
        worker.logged("postgres is reachable again; workers resume"),
    );
    assert!((5..=14).contains(&started), "{started} outage start lines");
    assert_eq!(started, ended, "each outage that started ended");
    assert_eq!(worker.logged("dead-lettered"), 0);
    assert_eq!(worker.logged("giving up"), 0);
    server.stop().await;
    drop(proxy);
    env.cleanup().await;
}

const LLM_MODEL: &str = "outage-model";
const STORE_KEY: &str = "store-key-outages-0123456789";

/// A loopback chat-completions endpoint that answers every request with one valid,
/// confident classification; counts the requests it answered.
async fn fake_llm() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = answered.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                axum::Json(chat_completion(
                    &serde_json::json!({"intent": "order_status", "confidence": 0.9}).to_string(),
                ))
            }
        }),
    );
    let addr = serve_loopback(app).await;
    (addr, answered)
}

/// Messages of `sids` stored with the LLM's own answer (not a rejection, not the rules).
async fn classified_by_llm(env: &TestEnv, sids: &[String]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM messages WHERE message_sid = ANY($1) AND classifier = $2",
    )
    .bind(sids)
    .bind(format!("llm:{LLM_MODEL}"))
    .fetch_one(&env.pool)
    .await
    .expect("count messages")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_fault_shape_in_front_of_the_llm_opens_its_circuit_and_kills_no_job() {
    const PER_PHASE: usize = 40;
    let (llm, answered) = fake_llm().await;
    let proxy = FaultProxy::start(llm).await;
    let llm_url = format!("http://{}/v1", proxy.addr);
    let env = TestEnv::with_vars(|vars| {
        vars.insert("LLM_URL".into(), llm_url.clone());
        vars.insert("LLM_MODEL".into(), LLM_MODEL.into());
        // Hangs (blackhole, trickle) end quickly.
        vars.insert("LLM_TIMEOUT_MS".into(), "800".into());
    })
    .await;
    let tenant = env.create_tenant().await;
    let mut worker = LoggedWorker::spawn(&env, &[]);
    let (healthy, last) = worker
        .wait_health(Duration::from_secs(30), |s, _| s == 200)
        .await;
    assert!(healthy, "{last:?}");
    let mut redis = env.redis.clone();
    let mut sids = Vec::new();
    for shape in Mode::FAULTS {
        let jobs: Vec<InboundMessage> = (0..PER_PHASE)
            .map(|_| low_confidence_message(tenant))
            .collect();
        sids.extend(jobs.iter().map(|j| j.message_sid.clone()));
        let before = answered.load(std::sync::atomic::Ordering::SeqCst);
        proxy.set(shape);
        env.queues()
            .enqueue_batch(&mut redis, &jobs)
            .await
            .expect("enqueue");
        // Repeated failures to reach it open the circuit: the worker says so and stays ready.
        let (open, last) = worker
            .wait_health(Duration::from_secs(30), |s, b| {
                s == 200 && names_outage(b, "llm")
            })
            .await;
        assert!(
            open,
            "{shape:?}: /healthz names the LLM's open circuit: {last:?}"
        );
        let (blocked, last) = worker
            .wait_health(Duration::from_secs(5), |_, b| {
                b["outages"][0]["circuit"] == "open"
            })
            .await;
        assert!(blocked, "{shape:?}: {last:?}");
        if shape != Mode::Trickle {
            assert_eq!(
                answered.load(std::sync::atomic::Ordering::SeqCst),
                before,
                "{shape:?}: nothing reached the LLM"
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(worker.running(), "{shape:?}");
        proxy.set(Mode::Pass);
        let (closed, last) = worker.wait_health(Duration::from_secs(90), all_clear).await;
        assert!(closed, "{shape:?}: one probe closed the circuit: {last:?}");
        let stored = eventually(Duration::from_secs(60), || async {
            classified_by_llm(&env, &sids).await >= sids.len() as i64
        })
        .await;
        assert!(stored, "{shape:?}: every job ran once the LLM answered");
    }
    let total = sids.len() as i64;
    assert_eq!(
        messages_of(&env, &sids).await,
        (total, total),
        "one row each"
    );
    assert_eq!(
        classified_by_llm(&env, &sids).await,
        total,
        "all by the LLM"
    );
    assert_eq!(inbound_dead_letters(&env).await, 0, "no job ended dead");
    assert_no_attempt_used(&env, "inbound_message", sids.len()).await;
    assert!(worker.stop());
    let opened = worker.logged("the LLM fails to answer repeatedly; its circuit is open");
    assert!(
        (6..=18).contains(&opened),
        "{opened} lines: once per outage (and per failed probe at most)"
    );
    assert!(worker.logged("the LLM answers again; its circuit is closed") >= 6);
    drop(proxy);
    env.cleanup().await;
}

/// A loopback store answering one page with one product; counts the pages it served.
async fn fake_store() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = served.clone();
    let app = axum::Router::new().route(
        "/shop/products",
        axum::routing::get(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                axum::Json(serde_json::json!({
                    "products": [{
                        "id": "sku-1", "name": "Apple", "price_cents": 100,
                        "currency": "EUR", "in_stock": true
                    }],
                    "next_page": null
                }))
            }
        }),
    );
    let addr = serve_loopback(app).await;
    (addr, served)
}

async fn store_tenant(env: &TestEnv, store: std::net::SocketAddr) -> Uuid {
    gatehouse::tenants::create(
        &env.pool,
        &env.config.keyring,
        &gatehouse::tenants::NewTenant {
            name: "Shop".into(),
            twilio_account_sid: ACCOUNT_SID.into(),
            twilio_auth_token: secrecy::SecretString::from(TOKEN.to_owned()),
            store_url: Some(format!("http://{store}/shop/")),
            store_api_key: Some(secrecy::SecretString::from(STORE_KEY.to_owned())),
            webhook_shared_key: None,
            owner_email: None,
        },
    )
    .await
    .expect("tenant created")
}

/// Finished syncs of `tenant` (the job's exactly-once markers).
async fn syncs_applied(env: &TestEnv, jobs: &[String]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM processed_jobs WHERE job_id = ANY($1)")
        .bind(jobs)
        .fetch_one(&env.pool)
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_fault_shape_in_front_of_a_store_pauses_its_syncs_only_and_kills_none() {
    let (store, _) = fake_store().await;
    let proxy = FaultProxy::start(store).await;
    let (healthy_store, healthy_served) = fake_store().await;
    let env = TestEnv::with_vars(|vars| {
        vars.insert("STORE_TIMEOUT_MS".into(), "800".into());
    })
    .await;
    let faulty = store_tenant(&env, proxy.addr).await;
    let other = store_tenant(&env, healthy_store).await;
    let mut worker = LoggedWorker::spawn(&env, &[]);
    let (healthy, last) = worker
        .wait_health(Duration::from_secs(30), |s, _| s == 200)
        .await;
    assert!(healthy, "{last:?}");
    let mut redis = env.redis.clone();
    let queues = env.queues();
    let sync = |tenant| gatehouse_jobs::SyncCatalog {
        tenant_id: tenant,
        requested_by: Uuid::new_v4(),
        mode: gatehouse_jobs::SyncMode::Full,
    };
    let mut faulty_jobs = Vec::new();
    for shape in Mode::FAULTS {
        proxy.set(shape);
        // Enough syncs of the faulty store to open its circuit.
        for _ in 0..6 {
            let job = queues
                .enqueue(
                    &mut redis,
                    &sync(faulty),
                    gatehouse_jobs::client::Enqueue::default(),
                )
                .await
                .expect("enqueue");
            faulty_jobs.push(job.job_id);
        }
        let (open, last) = worker
            .wait_health(Duration::from_secs(60), |s, b| {
                s == 200 && names_outage(b, "store") && b["outages"][0]["hosts"] == 1
            })
            .await;
        assert!(
            open,
            "{shape:?}: /healthz names one store's open circuit: {last:?}"
        );
        // Another tenant's store still syncs meanwhile.
        let served = healthy_served.load(std::sync::atomic::Ordering::SeqCst);
        let job = queues
            .enqueue(
                &mut redis,
                &sync(other),
                gatehouse_jobs::client::Enqueue::default(),
            )
            .await
            .expect("enqueue");
        assert!(
            eventually(Duration::from_secs(20), || async {
                syncs_applied(&env, std::slice::from_ref(&job.job_id)).await == 1
            })
            .await,
            "{shape:?}: the healthy store's sync ran"
        );
        assert!(healthy_served.load(std::sync::atomic::Ordering::SeqCst) > served);
        proxy.set(Mode::Pass);
        let (closed, last) = worker
            .wait_health(Duration::from_secs(120), all_clear)
            .await;
        assert!(closed, "{shape:?}: a probe closed the circuit: {last:?}");
        let done = eventually(Duration::from_secs(60), || async {
            syncs_applied(&env, &faulty_jobs).await == faulty_jobs.len() as i64
        })
        .await;
        assert!(
            done,
            "{shape:?}: every sync of the faulty store ran after it came back"
        );
    }
    let dead: i64 = redis::cmd("ZCARD")
        .arg(format!("{}:{{sync_catalog:0}}:dead", env.namespace))
        .query_async(&mut redis)
        .await
        .expect("zcard");
    assert_eq!(dead, 0, "no sync ended dead");
    // The faulty store's syncs and the healthy one's, one per phase.
    assert_no_attempt_used(&env, "sync_catalog", faulty_jobs.len() + Mode::FAULTS.len()).await;
    assert!(worker.running());
    assert!(worker.stop());
    drop(proxy);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_waits_out_an_outage_longer_than_the_maximum_counts_its_attempts_again() {
    // An LLM endpoint nothing listens on, and a one-second maximum wait.
    let llm_url = format!("http://127.0.0.1:{}/v1", free_port());
    let env = TestEnv::with_vars(|vars| {
        vars.insert("LLM_URL".into(), llm_url.clone());
        vars.insert("LLM_MODEL".into(), LLM_MODEL.into());
        vars.insert("OUTAGE_MAX_WAIT_SECONDS".into(), "1".into());
    })
    .await;
    let tenant = env.create_tenant().await;
    let worker = env.start_worker();
    let mut redis = env.redis.clone();
    let job = env
        .queues()
        .enqueue(
            &mut redis,
            &low_confidence_message(tenant),
            gatehouse_jobs::client::Enqueue::default(),
        )
        .await
        .expect("enqueue");
    // Deferred first: its attempts stay at 0 while it waits.
    assert!(
        eventually(Duration::from_secs(10), || {
            let job_id = job.job_id.clone();
            let env = &env;
            async move {
                let meta = env.job_meta("inbound_message", &job_id).await;
                meta.get("attempts") == Some("0") && meta.get("waiting_since").is_some()
            }
        })
        .await,
        "the job waits without using an attempt"
    );
    assert!(
        env.wait_for_dead("inbound_message", &job.job_id, Duration::from_secs(60))
            .await,
        "past the maximum wait, its attempts count and it reaches the dead letters"
    );
    let meta = env.job_meta("inbound_message", &job.job_id).await;
    let (attempts, error) = (meta.get("attempts"), meta.get("last_error").unwrap_or(""));
    assert_eq!(
        attempts,
        Some("4"),
        "its four attempts, counted after the wait"
    );
    assert!(error.contains("OUTAGE_MAX_WAIT_SECONDS"), "{error}");
    worker.stop().await.expect("worker stops");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_that_reloads_its_aof_pauses_the_worker_and_loses_nothing() {
    const JOBS: usize = 3000;
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let dir = std::env::temp_dir().join(format!("gh-aof-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("data dir");
    let dir_arg = dir.to_string_lossy().into_owned();
    let port = free_port();
    // AOF on, fsync always: what was acknowledged survives the restart.
    let args = [
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        &dir_arg,
        "--enable-debug-command",
        "yes",
    ];
    let mut server = private_redis(port, &args).await;
    let url = server.url();
    let mut conn = gatehouse::redis_conn::connect_url(&secrecy::SecretString::from(url.clone()))
        .await
        .expect("private redis");
    // Ballast, so the reload takes a while and clients hear LOADING meanwhile.
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(1_500_000)
        .arg("ballast")
        .arg(64)
        .query_async(&mut conn)
        .await
        .expect("DEBUG POPULATE");
    // DEBUG POPULATE is not written to the AOF: a rewrite puts the ballast there.
    let _: () = redis::cmd("BGREWRITEAOF")
        .query_async(&mut conn)
        .await
        .expect("BGREWRITEAOF");
    assert!(
        eventually(Duration::from_secs(60), || {
            let mut conn = conn.clone();
            async move {
                let info: String = redis::cmd("INFO")
                    .arg("persistence")
                    .query_async(&mut conn)
                    .await
                    .expect("INFO");
                info.contains("aof_rewrite_in_progress:0")
                    && info.contains("aof_rewrite_scheduled:0")
            }
        })
        .await,
        "the AOF rewrite finished"
    );
    let jobs: Vec<InboundMessage> = (0..JOBS).map(|_| low_confidence_message(tenant)).collect();
    let sids: Vec<String> = jobs.iter().map(|j| j.message_sid.clone()).collect();
    let mut worker = LoggedWorker::spawn(&env, &[("REDIS_URL", &url)]);
    let (healthy, last) = worker
        .wait_health(Duration::from_secs(30), |s, _| s == 200)
        .await;
    assert!(healthy, "{last:?}");
    env.queues()
        .enqueue_batch(&mut conn, &jobs)
        .await
        .expect("enqueue");
    assert!(
        eventually(Duration::from_secs(30), || async {
            messages_of(&env, &sids).await.0 > 100
        })
        .await,
        "draining"
    );
    // A clean restart in the middle of the drain: SHUTDOWN, then the same directory.
    let _: Result<(), _> = redis::cmd("SHUTDOWN").query_async(&mut conn).await;
    server
        .exited(Duration::from_secs(60))
        .await
        .expect("redis-server exits after SHUTDOWN");
    let restarted_at = Instant::now();
    server.start().await.expect("redis-server starts again");
    let mut probe = redis::Client::open(url.clone())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    // How long the restarted server answers LOADING.
    let mut loading = Duration::ZERO;
    loop {
        match redis::cmd("PING").query_async::<String>(&mut probe).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading) => {
                loading = restarted_at.elapsed();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => break,
        }
    }
    assert!(
        !loading.is_zero(),
        "the restarted server answered LOADING for a while"
    );
    let (up, last) = worker.wait_health(Duration::from_secs(60), all_clear).await;
    assert!(up, "/healthz is ok again: {last:?}");
    let all = drained(&env, &sids, JOBS as i64).await;
    let (rows, distinct) = messages_of(&env, &sids).await;
    assert!(all, "every job ran: {rows} of {JOBS}");
    assert_eq!((rows, distinct), (JOBS as i64, JOBS as i64), "once each");
    let mut conn = gatehouse::redis_conn::connect_url(&secrecy::SecretString::from(url.clone()))
        .await
        .expect("private redis");
    let dead: i64 = redis::cmd("ZCARD")
        .arg(format!("{}:{{inbound_message:0}}:dead", env.namespace))
        .query_async(&mut conn)
        .await
        .expect("zcard");
    assert_eq!(dead, 0, "no job ended dead");
    assert!(
        worker.running(),
        "the same worker process, from start to end"
    );
    assert!(worker.stop());
    assert_eq!(worker.logged("giving up"), 0);
    assert!(
        worker.logged("redis is unreachable; workers stop fetching") >= 1,
        "the outage was noticed"
    );
    eprintln!("restart: the restarted server answered LOADING for {loading:?}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ingress_takes_webhooks_again_after_every_redis_fault_shape() {
    // The ingress's REDIS_URL is the proxy (a connection it renews is opened there too).
    let proxy = FaultProxy::start(address_of(&redis_url())).await;
    let via_proxy = proxy.redis_url();
    let env = TestEnv::with_vars(|vars| {
        vars.insert("REDIS_URL".into(), via_proxy);
    })
    .await;
    let tenant = env.create_tenant().await;
    let redis =
        gatehouse::redis_conn::connect_lazy_url(&secrecy::SecretString::from(proxy.redis_url()))
            .expect("redis url");
    let state = std::sync::Arc::new(gatehouse::http::AppState::new(
        env.config.clone(),
        env.pool.clone(),
        redis,
    ));
    let server = TestServer::start(state).await;
    let http = reqwest::Client::new();
    let send = || async {
        let sid = message_sid();
        let params = sms_params(&sid, "+14155550100", "hello");
        signed_form(&http, &server, tenant, &params)
            .send()
            .await
            .expect("webhook")
            .status()
            .as_u16()
    };
    assert_eq!(send().await, 200, "through the proxy");
    for shape in [
        Mode::Garbage,
        Mode::AcceptThenClose,
        Mode::Reset,
        Mode::Refuse,
        Mode::Blackhole,
    ] {
        proxy.set(shape);
        let refused = send().await;
        assert_eq!(
            refused, 503,
            "{shape:?}: Redis unusable, the webhook is refused for Twilio to retry"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = send().await;
        proxy.set(Mode::Pass);
        assert!(
            eventually(Duration::from_secs(10), || async { send().await == 200 }).await,
            "{shape:?}: the ingress enqueues again once Redis answers"
        );
    }
    server.stop().await;
    drop(proxy);
    env.cleanup().await;
}
