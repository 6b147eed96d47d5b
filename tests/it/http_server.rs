//! The HTTP server loop itself, over raw TCP against the real ingress and the worker's health
//! port: slow and idle connections are closed after `HTTP_HEADER_TIMEOUT_SECONDS`, at most
//! `HTTP_MAX_CONNECTIONS` are served at once, shutdown drains, and handlers still see the peer.

use std::time::{Duration, Instant};

use crate::common::*;
use gatehouse::metrics::scrape::Scrape;
use gatehouse::worker::health::{Outages, serve as serve_worker_health};
use gatehouse_testenv::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous: the server is told 1 s; a loaded machine may take longer to notice.
const CLOSE_WITHIN: Duration = Duration::from_secs(20);

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n";

fn header_timeout(
    seconds: &'static str,
) -> impl FnOnce(&mut std::collections::HashMap<String, String>) {
    move |vars| {
        vars.insert("HTTP_HEADER_TIMEOUT_SECONDS".into(), seconds.into());
    }
}

/// Reads until the peer closes the connection (EOF or reset); false if it is still open after
/// `within`. Whatever the server sends before closing is ignored.
async fn closed_by_peer(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A response's head once `data` holds all of it: the status, the head lower-cased, and where
/// the body starts.
fn response_head(data: &[u8]) -> Option<(u16, String, usize)> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head, end + 4))
}

/// Reads one HTTP/1.1 response with a `Content-Length` body; `None` if none is complete within
/// `within` (or the connection closes first).
async fn read_response(stream: &mut TcpStream, within: Duration) -> Option<(u16, String)> {
    let deadline = Instant::now() + within;
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some((status, head, start)) = response_head(&data) {
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if data.len() >= start + length {
                let body = String::from_utf8_lossy(&data[start..start + length]).into_owned();
                return Some((status, body));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => data.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_part_of_its_headers_and_then_nothing_is_closed() {
    let env = TestEnv::with_vars(header_timeout("1")).await;
    let server = env.start_server().await;
    let mut slow = TcpStream::connect(server.addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: gatehouse.test\r\nX-Slow: ")
        .await
        .expect("write");
    assert!(
        closed_by_peer(&mut slow, CLOSE_WITHIN).await,
        "a connection trickling its headers stays open"
    );
    // The server is unharmed: a complete request on a new connection is answered.
    let mut fine = TcpStream::connect(server.addr).await.expect("connect");
    fine.write_all(HEALTHZ).await.expect("write");
    let (status, body) = read_response(&mut fine, CLOSE_WITHIN)
        .await
        .expect("a complete request is answered");
    assert_eq!(status, 200);
    assert!(body.contains("ok"), "{body}");
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed() {
    let env = TestEnv::with_vars(header_timeout("1")).await;
    let server = env.start_server().await;
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    assert!(
        closed_by_peer(&mut silent, CLOSE_WITHIN).await,
        "a connection that never sends a byte stays open"
    );
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let env = TestEnv::with_vars(header_timeout("1")).await;
    let server = env.start_server().await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    // Two requests on one connection: it is kept alive between them...
    for _ in 0..2 {
        stream.write_all(HEALTHZ).await.expect("write");
        let (status, _) = read_response(&mut stream, CLOSE_WITHIN)
            .await
            .expect("answered on the kept-alive connection");
        assert_eq!(status, 200);
    }
    // ...and closed once it idles past the header timeout.
    assert!(
        closed_by_peer(&mut stream, CLOSE_WITHIN).await,
        "an idle keep-alive connection stays open"
    );
    server.stop().await;
    env.cleanup().await;
}

/// The header timeout counts idleness, not a connection's age: requests 0.4 s apart keep a
/// connection open for several timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_keep_alive_connection_outlives_the_header_timeout() {
    let env = TestEnv::with_vars(header_timeout("1")).await;
    let server = env.start_server().await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(4) {
        stream.write_all(HEALTHZ).await.expect("write");
        let (status, _) = read_response(&mut stream, CLOSE_WITHIN)
            .await
            .unwrap_or_else(|| panic!("closed after {answered} requests, {:?}", started.elapsed()));
        assert_eq!(status, 200);
        answered += 1;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(answered >= 8, "{answered}");
    server.stop().await;
    env.cleanup().await;
}

/// A request in flight is not the header timeout's (the request timeout bounds it): a body
/// that takes three header timeouts to arrive is still read and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_outlasts_the_header_timeout_is_answered() {
    let env = TestEnv::with_vars(header_timeout("1")).await;
    let server = env.start_server().await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let body = br#"{"email":"nobody@example.com","password":"not the password"}"#;
    let head = format!(
        "POST /v1/auth/login HTTP/1.1\r\nHost: gatehouse.test\r\nX-Forwarded-Proto: https\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    for chunk in body.chunks(body.len().div_ceil(10)) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream
            .write_all(chunk)
            .await
            .expect("the connection is still open");
    }
    let (status, _) = read_response(&mut stream, CLOSE_WITHIN)
        .await
        .expect("a request whose body trickled in is answered");
    assert_eq!(status, 401);
    server.stop().await;
    env.cleanup().await;
}

/// The ingress's own routes behind the edge, served with `limits` (the request timeout is not
/// a setting: a test that needs it short serves the app itself) until the sender is dropped.
async fn serve_with_limits(
    env: &TestEnv,
    limits: gatehouse::server::Limits,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let (routes, document) = gatehouse::http::routes().split_for_parts();
    let templates = gatehouse::http::metrics::RouteTemplates::new(
        document.paths.paths.keys().map(String::as_str),
    );
    let app = gatehouse::http::layered(routes, templates, env.app_state());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gatehouse::server::run(
        listener,
        limits,
        move |peer, watch| app.connection(peer, watch),
        async move {
            let _ = stopped.await;
        },
    ));
    (addr, stop, served)
}

/// Sends a login whose body never finishes (a byte every 200 ms) and returns the answer's
/// status and head, or `None` if none came within `within`.
async fn late_login(addr: std::net::SocketAddr, within: Duration) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"POST /v1/auth/login HTTP/1.1\r\nHost: gatehouse.test\r\nX-Forwarded-Proto: https\r\n\
              Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
        )
        .await
        .expect("write");
    let deadline = Instant::now() + within;
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        // The server may stop reading once it has answered: a failed write is not the test's.
        let _ = stream.write_all(b" ").await;
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
            if let Some((status, head, _)) = response_head(&data) {
                return Some((status, head));
            }
        }
    }
    None
}

/// A request not answered within the request timeout — here its body never ends — is answered
/// 408, through the edge (security headers and request id, as every answer), whichever of the
/// two timeouts is the shorter: the watchdog's one timer serves both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_request_timeout_is_answered_408() {
    let env = TestEnv::new().await;
    for (header, request) in [(1, 2), (60, 1)] {
        let limits = gatehouse::server::Limits {
            header_timeout: Duration::from_secs(header),
            request_timeout: Duration::from_secs(request),
            max_connections: 16,
        };
        let (addr, _stop, _served) = serve_with_limits(&env, limits).await;
        let (status, head) = late_login(addr, CLOSE_WITHIN).await.unwrap_or_else(|| {
            panic!("no answer (header timeout {header} s, request {request} s)")
        });
        assert_eq!(status, 408, "{head}");
        for header in [
            "strict-transport-security:",
            "x-content-type-options: nosniff",
            "content-security-policy:",
            "x-request-id:",
        ] {
            assert!(head.contains(header), "{header} missing from {head}");
        }
    }
    env.cleanup().await;
}

/// Shutdown waits for the request in flight, but no longer than the request timeout: a body
/// that never ends is answered 408 and the server returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_a_request_that_never_ends_408_and_returns() {
    let env = TestEnv::new().await;
    let limits = gatehouse::server::Limits {
        header_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(2),
        max_connections: 16,
    };
    let (addr, stop, served) = serve_with_limits(&env, limits).await;
    let late = tokio::spawn(late_login(addr, CLOSE_WITHIN));
    // The request is in flight (its headers are in) before shutdown begins.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop.send(());
    let answer = late.await.expect("client task");
    assert_eq!(answer.map(|(status, _)| status), Some(408));
    tokio::time::timeout(CLOSE_WITHIN, served)
        .await
        .expect("shutdown returns once the late request is answered")
        .expect("server task")
        .expect("server");
    env.cleanup().await;
}

/// A client that stops reading its answers is closed too: they fill the socket buffers, no
/// request is in flight, and a header timeout later the connection is dropped — where hyper's
/// own header timer, which starts only once an answer is written, never fired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_answers_is_closed() {
    const OPENAPI: &[u8] =
        b"GET /openapi.json HTTP/1.1\r\nHost: gatehouse.test\r\nX-Forwarded-Proto: https\r\n\r\n";
    let env = TestEnv::with_vars(header_timeout("1")).await;
    let server = env.start_server().await;
    let mut probe = TcpStream::connect(server.addr).await.expect("connect");
    probe.write_all(OPENAPI).await.expect("write");
    let (status, document) = read_response(&mut probe, CLOSE_WITHIN)
        .await
        .expect("the document is served");
    assert_eq!(status, 200);
    // Answers worth 32 MiB, far more than the kernel buffers of either side hold.
    let answers = (32 << 20) / document.len().max(1) + 1;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("a small receive buffer");
    let mut stream = socket.connect(server.addr).await.expect("connect");
    stream
        .write_all(&OPENAPI.repeat(answers))
        .await
        .expect("write the pipelined requests");
    // Not reading for three header timeouts...
    tokio::time::sleep(Duration::from_secs(3)).await;
    // ...then everything that arrives until the connection ends.
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(CLOSE_WITHIN, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection stayed open");
    assert!(
        received < answers * document.len(),
        "all {answers} answers were delivered ({received} bytes): the stalled connection was kept"
    );
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_a_new_connection_waits_until_one_closes() {
    let env = TestEnv::with_vars(|vars| {
        vars.insert("HTTP_MAX_CONNECTIONS".into(), "2".into());
        // Long enough that the two held connections are not closed for idling meanwhile.
        vars.insert("HTTP_HEADER_TIMEOUT_SECONDS".into(), "120".into());
    })
    .await;
    let server = env.start_server().await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream.write_all(HEALTHZ).await.expect("write");
        let (status, _) = read_response(&mut stream, CLOSE_WITHIN)
            .await
            .expect("within the cap: answered");
        assert_eq!(status, 200);
        held.push(stream);
    }
    // The kernel completes the handshake (backlog), but the server does not take it.
    let mut third = TcpStream::connect(server.addr).await.expect("connect");
    third.write_all(HEALTHZ).await.expect("write");
    assert_eq!(
        read_response(&mut third, Duration::from_secs(2)).await,
        None,
        "a third connection was served while two were held"
    );
    drop(held.pop());
    let (status, _) = read_response(&mut third, CLOSE_WITHIN)
        .await
        .expect("served once a held connection closed");
    assert_eq!(status, 200);
    // The one still held was never disturbed.
    let still = held.first_mut().expect("held");
    still.write_all(HEALTHZ).await.expect("write");
    assert_eq!(
        read_response(still, CLOSE_WITHIN).await.map(|(s, _)| s),
        Some(200)
    );
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_see_the_socket_peer_as_the_client_address() {
    // Loopback is not a trusted proxy here: its X-Forwarded-For must be ignored, so the
    // event names the socket peer that ConnectInfo carries.
    let env = TestEnv::with_vars(|vars| {
        vars.insert("TRUSTED_PROXIES".into(), "10.0.0.0/8".into());
        // Plain HTTP from an untrusted peer would be redirected to https before the handler.
        vars.insert("DEBUG".into(), "true".into());
    })
    .await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let response = reqwest::Client::new()
        .post(server.url(&webhook_path(tenant)))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-twilio-signature", "bCKNFa1ALlAtW1bWNwG18+MUxZY=")
        .body("MessageSid=SM0123456789abcdef0123456789abcdef&From=%2B14155550100")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 403);
    assert_eq!(env.wait_for_events("invalid_webhook_signature", 1).await, 1);
    let ip: String = sqlx::query_scalar(
        "SELECT host(ip) FROM security_events WHERE type = 'invalid_webhook_signature'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("event ip");
    assert_eq!(ip, "127.0.0.1");
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_request_in_flight_closes_idle_connections_and_returns() {
    let env = TestEnv::with_vars(header_timeout("120")).await;
    let server = env.start_server().await;
    let mut idle = TcpStream::connect(server.addr).await.expect("connect");
    idle.write_all(HEALTHZ).await.expect("write");
    assert_eq!(
        read_response(&mut idle, CLOSE_WITHIN).await.map(|(s, _)| s),
        Some(200)
    );
    // A request whose body is still arriving when shutdown starts: with `Expect:
    // 100-continue`, hyper says "100 Continue" once the handler reads the body, so the
    // request is known to be in flight.
    let mut busy = TcpStream::connect(server.addr).await.expect("connect");
    let body = "MessageSid=SM0123456789abcdef0123456789abcdef&From=%2B14155550100";
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: gatehouse.test\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         X-Forwarded-Proto: https\r\nX-Twilio-Signature: bCKNFa1ALlAtW1bWNwG18+MUxZY=\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        webhook_path(uuid::Uuid::new_v4()),
        body.len()
    );
    busy.write_all(head.as_bytes()).await.expect("write");
    assert_eq!(
        read_response(&mut busy, CLOSE_WITHIN).await.map(|(s, _)| s),
        Some(100),
        "the handler reads the body"
    );

    let stopping = tokio::spawn(server.stop());
    assert!(
        closed_by_peer(&mut idle, CLOSE_WITHIN).await,
        "an idle connection kept shutdown waiting"
    );
    busy.write_all(body.as_bytes()).await.expect("write");
    let (status, _) = read_response(&mut busy, CLOSE_WITHIN)
        .await
        .expect("the request in flight is answered");
    assert_eq!(status, 403);
    assert!(
        closed_by_peer(&mut busy, CLOSE_WITHIN).await,
        "the connection closes after its last answer"
    );
    tokio::time::timeout(CLOSE_WITHIN, stopping)
        .await
        .expect("serve returns once its connections are closed")
        .expect("stop task");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_health_port_closes_slow_and_idle_connections_too() {
    let env = TestEnv::with_vars(header_timeout("1")).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let health = tokio::spawn(serve_worker_health(
        listener,
        gatehouse::server::Limits::from_config(&env.config),
        Outages::default(),
        env.pool.clone(),
        Scrape {
            handle: gatehouse::metrics::install(),
            redis: env.redis.clone().into(),
            layout: env.config.layout().clone(),
            token: None,
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: gate")
        .await
        .expect("write");
    let mut kept = TcpStream::connect(addr).await.expect("connect");
    kept.write_all(b"GET /metrics HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(
        read_response(&mut kept, CLOSE_WITHIN).await.map(|(s, _)| s),
        Some(200)
    );
    assert!(
        closed_by_peer(&mut slow, CLOSE_WITHIN).await,
        "a trickling connection to the health port stays open"
    );
    assert!(
        closed_by_peer(&mut kept, CLOSE_WITHIN).await,
        "an idle keep-alive connection to the health port stays open"
    );
    let _ = stop.send(());
    tokio::time::timeout(CLOSE_WITHIN, health)
        .await
        .expect("the health server stops when told")
        .expect("health task")
        .expect("health server");
    env.cleanup().await;
}
