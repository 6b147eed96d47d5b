//! The one HTTP/1.1 server loop both processes run (the ingress, and the worker's health and
//! metrics port): a connection that has not sent complete request headers within the header
//! timeout — just opened, trickling, or idle between keep-alive requests — is closed; at most
//! `max_connections` connections open per listener (past it, new ones wait in the kernel's
//! backlog until one closes); graceful shutdown. Knows hyper, tower, tokio and the
//! configuration only.
//!
//! The header timeout is a watchdog per connection, not hyper's `header_read_timeout`: hyper
//! makes, registers and cancels a timer for every request head it reads, and reads and parses
//! each head once more to arm it (~0.5 µs a request; BENCHMARKS §16). The watchdog's one timer
//! is due a header timeout after the connection opened or its last request ended; a request
//! costs two counter increments and a clock read, and the timer moves only when it fires and
//! finds that requests came since. A request in flight is the request timeout's.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a connection may take to send complete request headers, counted from when it
    /// opened or from its previous response (`HTTP_HEADER_TIMEOUT_SECONDS`).
    pub header_timeout: Duration,
    /// Connections open at once (`HTTP_MAX_CONNECTIONS`).
    pub max_connections: usize,
}

impl Limits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            header_timeout: Duration::from_secs(config.http_header_timeout_seconds),
            max_connections: config.http_max_connections,
        }
    }
}

/// Serves HTTP/1.1 (keep-alive) on `listener` until `shutdown` resolves; `service(peer)` makes
/// the service of the connection from `peer`. On shutdown it stops accepting, lets every
/// connection finish the request it is serving (idle ones close at once), and returns when all
/// are closed.
pub async fn run<M, S, B>(
    listener: TcpListener,
    limits: Limits,
    service: M,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    M: Fn(SocketAddr) -> S,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = http1::Builder::new();
    builder.keep_alive(true);
    // A permit per open connection: with none left the loop stops accepting, and new clients
    // wait in the kernel's backlog (or are refused by it) instead of costing a task here.
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if !is_connection_error(&error) {
                        // Out of file descriptors, say: wait before trying again rather than
                        // spinning (what hyper's and axum's own loops do).
                        tracing::error!(%error, "cannot accept a connection");
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                    continue;
                }
            },
        };
        let activity = Activity::new();
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(Watched {
                inner: service(peer),
                activity: activity.clone(),
            }),
        );
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                () = idle_for(activity, limits.header_timeout) => {
                    // What hyper's header timeout did: the connection is dropped.
                    tracing::debug!(%peer, "no complete request headers within the header timeout");
                    Ok(())
                }
            };
            if let Err(error) = result {
                // A reset, a malformed request: the client's doing, and a flood of them must
                // not flood the log.
                tracing::debug!(%peer, %error, "connection closed with an error");
            }
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

/// One connection's requests: how many began plus how many ended (odd while one is in flight;
/// HTTP/1.1 serves a connection's requests one at a time), and when the last one ended (or the
/// connection opened). Written by [`Watched`], read by [`idle_for`].
#[derive(Clone)]
struct Activity(Arc<Counts>);

struct Counts {
    events: AtomicU64,
    /// Milliseconds from `opened` to the end of the last request.
    last_end_ms: AtomicU64,
    opened: tokio::time::Instant,
}

impl Activity {
    fn new() -> Self {
        Self(Arc::new(Counts {
            events: AtomicU64::new(0),
            last_end_ms: AtomicU64::new(0),
            opened: tokio::time::Instant::now(),
        }))
    }

    fn begin(&self) {
        self.0.events.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self) {
        let ms = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_end_ms.store(ms, Ordering::Relaxed);
        // Release: a watchdog that sees this count sees the time stored above.
        self.0.events.fetch_add(1, Ordering::Release);
    }

    /// When the connection became idle: `None` while a request is in flight.
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        if !self.0.events.load(Ordering::Acquire).is_multiple_of(2) {
            return None;
        }
        let ms = self.0.last_end_ms.load(Ordering::Relaxed);
        Some(self.0.opened + Duration::from_millis(ms))
    }
}

/// A connection's service, counting its requests into the connection's [`Activity`].
#[derive(Clone)]
struct Watched<S> {
    inner: S,
    activity: Activity,
}

impl<S, Req> tower_service::Service<Req> for Watched<S>
where
    S: tower_service::Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = WatchedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.activity.begin();
        WatchedFuture {
            inner: self.inner.call(request),
            ended: Ended(self.activity.clone()),
        }
    }
}

/// Counts the request's end when dropped: answered, or abandoned with its connection.
struct Ended(Activity);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.end();
    }
}

pin_project_lite::pin_project! {
    /// A request's response future, counting its end.
    struct WatchedFuture<F> {
        #[pin]
        inner: F,
        ended: Ended,
    }
}

impl<F: Future> Future for WatchedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// The header timeout of one connection: resolves once it has been idle — no request in
/// flight, none begun — for `timeout` since it opened or since its last request ended. One
/// timer, moved on only when it fires and finds that a request came since.
async fn idle_for(activity: Activity, timeout: Duration) {
    let timer = tokio::time::sleep_until(activity.0.opened + timeout);
    tokio::pin!(timer);
    loop {
        timer.as_mut().await;
        let now = tokio::time::Instant::now();
        let due = match activity.idle_since() {
            Some(since) => since + timeout,
            // In flight: the request timeout's; look again a timeout from now.
            None => now + timeout,
        };
        if due <= now {
            return;
        }
        timer.as_mut().reset(due);
    }
}

/// Errors of one connection that the next `accept` does not share.
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
