//! Dependency outages (SPEC "Dependency outages"): a real `gatehouse work` process whose Redis
//! is behind the fault proxy (`tests/common/fault_proxy.rs`), through every fault shape, with a
//! backlog; and the fault proxy's own modes against a loopback echo server.

mod common;

use std::time::{Duration, Instant};

use common::fault_proxy::{FaultProxy, Mode, echo_server};
use common::*;
use gatehouse_jobs::InboundMessage;
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
    proxy.set(Mode::Pass);
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
    InboundMessage {
        tenant_id: tenant,
        message_sid: message_sid(),
        from: "+14155550100".into(),
        to: "+14155550199".into(),
        body: "qwzx vbnm".into(),
        received_at: "2026-11-28T10:00:00Z".into(),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
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

/// Whether `/healthz` says Redis is down, with an RFC 3339 time.
fn says_redis_down(body: &serde_json::Value) -> bool {
    body["redis"] == "unreachable"
        && body["outages"].as_array().is_some_and(|outages| {
            outages.iter().any(|o| {
                o["dependency"] == "redis"
                    && o["since"].as_str().is_some_and(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .is_ok()
                    })
            })
        })
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

async fn dead_letters(env: &TestEnv) -> i64 {
    let mut redis = env.redis.clone();
    redis::cmd("ZCARD")
        .arg(format!("{}:inbound_message:dead", env.namespace))
        .query_async(&mut redis)
        .await
        .expect("zcard")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_rides_out_every_redis_fault_shape_and_no_job_dies_is_lost_or_runs_twice() {
    const PER_PHASE: usize = 60;
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let upstream = url::Url::parse(&redis_url()).expect("REDIS_URL");
    let upstream = format!(
        "{}:{}",
        upstream.host_str().unwrap_or("127.0.0.1"),
        upstream.port().unwrap_or(6379)
    )
    .parse()
    .expect("Redis is on an IP address");
    let proxy = FaultProxy::start(upstream).await;
    let health_port = free_port().to_string();
    let health_url = format!("http://127.0.0.1:{health_port}/healthz");
    // Its log lines are kept: the outage is logged when it starts and when it ends.
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .arg("work")
        .env_clear()
        .envs(env.vars.iter())
        .env("REDIS_URL", proxy.redis_url())
        .env("WORKER_HEALTH_PORT", &health_port)
        .env("RUST_LOG", "warn,gatehouse::worker::health=info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn gatehouse work");
    let stderr = worker.stderr.take().expect("stderr");
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
    let logged = |message: &str| {
        lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| l.contains(message))
            .count()
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            health(&health_url).await.is_some_and(|(s, _)| s == 200)
        })
        .await,
        "the worker is healthy behind the proxy"
    );

    let mut redis = env.redis.clone();
    let mut sids = Vec::new();
    for shape in [
        Mode::Refuse,
        Mode::AcceptThenClose,
        Mode::Reset,
        Mode::Blackhole,
        Mode::Garbage,
    ] {
        // A backlog, and the fault while the worker is in the middle of it; more jobs arrive
        // (straight into Redis, as the ingress would) during the fault.
        let jobs: Vec<InboundMessage> = (0..2 * PER_PHASE)
            .map(|_| low_confidence_message(tenant))
            .collect();
        sids.extend(jobs.iter().map(|j| j.message_sid.clone()));
        let before = messages_of(&env, &sids).await.0;
        env.queues()
            .enqueue_batch(&mut redis, &jobs[..PER_PHASE])
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
            .enqueue_batch(&mut redis, &jobs[PER_PHASE..])
            .await
            .expect("enqueue");
        let (down, last) = wait_health(&health_url, Duration::from_secs(30), |s, b| {
            s == 503 && says_redis_down(b)
        })
        .await;
        assert!(down, "{shape:?}: /healthz reports redis down: {last:?}");
        // The fault lasts about 5 s in all, whatever it took to be noticed.
        if let Some(rest) = Duration::from_secs(5).checked_sub(fault_started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        assert!(
            worker.try_wait().expect("status").is_none(),
            "{shape:?}: the worker process is still running"
        );
        proxy.set(Mode::Pass);
        let (up, last) = wait_health(&health_url, Duration::from_secs(30), |s, b| {
            s == 200 && b["redis"] == "ok" && b["outages"].as_array().is_some_and(Vec::is_empty)
        })
        .await;
        assert!(up, "{shape:?}: /healthz is ok again: {last:?}");
    }

    let total = sids.len() as i64;
    let all = eventually(Duration::from_secs(60), || async {
        messages_of(&env, &sids).await.0 >= total
    })
    .await;
    let (rows, distinct) = messages_of(&env, &sids).await;
    assert!(all, "every job ran: {rows} of {total}");
    assert_eq!((rows, distinct), (total, total), "one row per message");
    assert_eq!(dead_letters(&env).await, 0, "no job ended dead");
    let streak: i32 = sqlx::query_scalar("SELECT low_confidence_count FROM conversations")
        .fetch_one(&env.pool)
        .await
        .expect("the conversation");
    assert_eq!(i64::from(streak), total, "no job's effect applied twice");
    assert!(
        worker.try_wait().expect("status").is_none(),
        "the worker process never exited"
    );
    assert!(terminate(&mut worker).success(), "and it stops cleanly");
    let _ = collector.join();
    // One line when each outage starts and one when it ends, not one per retry (a fault's
    // aftermath may at most reopen it once).
    let (started, ended) = (
        logged("redis is unreachable; workers stop fetching"),
        logged("redis is reachable again; workers resume"),
    );
    assert!((5..=10).contains(&started), "{started} outage start lines");
    assert!((5..=10).contains(&ended), "{ended} outage end lines");
    assert_eq!(logged("giving up"), 0);
    drop(proxy);
    env.cleanup().await;
}

/// A private redis-server (no persistence), so a test may make it busy without disturbing the
/// other tests.
struct PrivateRedis {
    port: u16,
    child: std::process::Child,
}

impl PrivateRedis {
    fn start() -> Self {
        let port = free_port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            // Other clients hear BUSY 100 ms into a long script (the default is 5 s).
            .args(["--busy-reply-threshold", "100"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        let started = Instant::now();
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
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_busy_running_a_script_pauses_the_worker_until_the_script_is_killed() {
    const JOBS: usize = 200;
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = PrivateRedis::start();
    let client = redis::Client::open(server.url()).expect("url");
    let mut conn = gatehouse::queue::connect(&secrecy::SecretString::from(server.url()))
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
    let all = eventually(Duration::from_secs(60), || async {
        messages_of(&env, &sids).await.0 >= JOBS as i64
    })
    .await;
    let (rows, distinct) = messages_of(&env, &sids).await;
    assert!(all, "every job ran: {rows} of {JOBS}");
    assert_eq!((rows, distinct), (JOBS as i64, JOBS as i64));
    let dead: i64 = redis::cmd("ZCARD")
        .arg(format!("{}:inbound_message:dead", env.namespace))
        .query_async(&mut admin)
        .await
        .expect("zcard");
    assert_eq!(dead, 0, "no job ended dead");
    assert!(terminate(&mut worker).success());
    drop(server);
    env.cleanup().await;
}
