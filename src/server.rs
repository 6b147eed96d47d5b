//! The one HTTP/1.1 server loop both processes run (the ingress, and the worker's health and
//! metrics port): a connection that has not sent complete request headers within the header
//! timeout — just opened, trickling, or idle between keep-alive requests — is closed; a request
//! not answered within the request timeout (its body still arriving, its handler still
//! working) is answered 408; at most `max_connections` connections open per listener (past it,
//! new ones wait in the kernel's backlog until one closes); graceful shutdown. Knows hyper,
//! tower, tokio and the configuration only.
//!
//! Both timeouts are one watchdog per connection, not hyper's `header_read_timeout` and a
//! timeout layer: hyper makes, registers and cancels a timer for every request head it reads,
//! and reads and parses each head once more to arm it (~0.5 µs a request), and a timeout
//! layer makes, polls and cancels another for every request (~1,000 instructions; BENCHMARKS
//! §16 "The request timeout in the watchdog"). The watchdog's one timer is due a header
//! timeout after the connection opened or its last request ended, or a request timeout after
//! the request in flight began; a request costs two counter increments and two clock reads,
//! and the timer moves only when it fires and finds that requests came since. The requests are
//! counted, and a late one answered, by [`Watched`], which the connection's service places
//! around what it times ([`Watch`]).

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// How long one request may take, from its complete headers to its answer (body included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a connection may take to send complete request headers, counted from when it
    /// opened or from its previous response (`HTTP_HEADER_TIMEOUT_SECONDS`).
    pub header_timeout: Duration,
    /// How long a request may take once its headers are in ([`REQUEST_TIMEOUT`]): past it,
    /// [`Watched`] answers 408 and the handler is dropped.
    pub request_timeout: Duration,
    /// Connections open at once (`HTTP_MAX_CONNECTIONS`).
    pub max_connections: usize,
}

impl Limits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            header_timeout: Duration::from_secs(config.http_header_timeout_seconds),
            request_timeout: REQUEST_TIMEOUT,
            max_connections: config.http_max_connections,
        }
    }
}

/// Serves HTTP/1.1 (keep-alive) on `listener` until `shutdown` resolves; `service(peer, watch)`
/// makes the service of the connection from `peer`, with `watch` layered around what the
/// timeouts cover (a connection whose service leaves it out is closed a header timeout after
/// it opened, busy or not). On shutdown it stops accepting, lets every connection finish the
/// request it is serving within the request timeout (idle ones close at once), and returns when
/// all are closed.
pub async fn run<M, S, B>(
    listener: TcpListener,
    limits: Limits,
    service: M,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    M: Fn(SocketAddr, Watch) -> S,
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
            Serial::new(service(peer, Watch(activity.clone()))),
        );
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut connection = std::pin::pin!(connection);
            let mut watchdog = std::pin::pin!(Watchdog::new(activity, limits));
            // In this order: a request begins while the connection is polled, and the watchdog
            // polled after it sees the request's deadline the same turn.
            let result = tokio::select! {
                biased;
                result = connection.as_mut() => result,
                () = watchdog.as_mut() => {
                    // What hyper's header timeout did: the connection is dropped.
                    tracing::debug!(%peer, "no complete request headers within the header timeout");
                    Ok(())
                }
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    // The request in flight finishes, within the request timeout: the watchdog
                    // still answers it 408 when it is late (a trickling body cannot hold
                    // shutdown open), and still closes a connection idle that long.
                    tokio::select! {
                        biased;
                        result = connection.as_mut() => result,
                        () = watchdog.as_mut() => Ok(()),
                    }
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

/// A connection's tower service as hyper's: HTTP/1.1 calls it for one request at a time, so
/// the connection's own copy is called in place. hyper_util's `TowerToHyperService` clones the
/// whole service stack for every request (an atomic increment and decrement per `Arc` in it)
/// and drives a readiness future; the stacks served here are always ready, so a request costs
/// neither — one that is not ready goes the general way, on a clone.
struct Serial<S>(RefCell<S>);

impl<S> Serial<S> {
    fn new(service: S) -> Self {
        Self(RefCell::new(service))
    }
}

type Boxed<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, Req> hyper::service::Service<Req> for Serial<S>
where
    S: tower_service::Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, Boxed<S::Response, S::Error>>;

    fn call(&self, request: Req) -> Self::Future {
        // Never borrowed elsewhere: the borrow ends with this call, and hyper does not call
        // again before this returns.
        let mut service = self.0.borrow_mut();
        match service.poll_ready(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(Ok(())) => futures::future::Either::Left(service.call(request)),
            Poll::Ready(Err(error)) => {
                futures::future::Either::Right(Box::pin(std::future::ready(Err(error))))
            }
            Poll::Pending => {
                let mut service = service.clone();
                futures::future::Either::Right(Box::pin(async move {
                    std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                    service.call(request).await
                }))
            }
        }
    }
}

/// One connection's requests: how many began plus how many ended (odd while one is in flight;
/// HTTP/1.1 serves a connection's requests one at a time), when the last one ended (or the
/// connection opened) and when the one in flight began, and whether the watchdog found that
/// one late. Written by [`Watched`] and the watchdog, read by both; one task does all of it
/// (the connection's), so the atomics only make it shareable.
#[derive(Clone)]
struct Activity(Arc<Counts>);

struct Counts {
    events: AtomicU64,
    /// Microseconds from `opened` to the end of the last request.
    last_end_us: AtomicU64,
    /// Microseconds from `opened` to the beginning of the request in flight.
    began_us: AtomicU64,
    /// The request in flight is past the request timeout: [`Watched`] answers 408.
    late: AtomicBool,
    opened: Instant,
}

/// Where a connection is, as the watchdog sees it.
enum State {
    /// No request in flight since this instant.
    Idle(Instant),
    /// A request in flight since this instant; `late` once the watchdog found it past its time.
    Busy { began: Instant, late: bool },
}

impl Activity {
    fn new() -> Self {
        Self(Arc::new(Counts {
            events: AtomicU64::new(0),
            last_end_us: AtomicU64::new(0),
            began_us: AtomicU64::new(0),
            late: AtomicBool::new(false),
            opened: Instant::now(),
        }))
    }

    fn since_opened(&self) -> u64 {
        u64::try_from(self.0.opened.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn at(&self, us: u64) -> Instant {
        self.0.opened + Duration::from_micros(us)
    }

    fn begin(&self) {
        self.0
            .began_us
            .store(self.since_opened(), Ordering::Relaxed);
        // Release: a watchdog that sees this count sees the time stored above.
        self.0.events.fetch_add(1, Ordering::Release);
    }

    fn end(&self) {
        self.0
            .last_end_us
            .store(self.since_opened(), Ordering::Relaxed);
        self.0.late.store(false, Ordering::Relaxed);
        self.0.events.fetch_add(1, Ordering::Release);
    }

    fn late(&self) -> bool {
        self.0.late.load(Ordering::Relaxed)
    }

    fn state(&self) -> State {
        if self.0.events.load(Ordering::Acquire).is_multiple_of(2) {
            State::Idle(self.at(self.0.last_end_us.load(Ordering::Relaxed)))
        } else {
            State::Busy {
                began: self.at(self.0.began_us.load(Ordering::Relaxed)),
                late: self.late(),
            }
        }
    }
}

/// What [`run`] gives each connection's service: layered around a service ([`Watched`]), it
/// counts that service's requests for the header timeout and answers those past the request
/// timeout. Place it inside whatever must see every answer (security headers, metrics): its
/// 408 passes through them as any route's answer does.
#[derive(Clone)]
pub struct Watch(Activity);

impl<S> tower_layer::Layer<S> for Watch {
    type Service = Watched<S>;

    fn layer(&self, inner: S) -> Watched<S> {
        Watched {
            inner,
            activity: self.0.clone(),
        }
    }
}

/// A connection's service, counting its requests into the connection's watchdog and answering
/// 408 (an empty body) for one the watchdog found past the request timeout.
#[derive(Clone)]
pub struct Watched<S> {
    inner: S,
    activity: Activity,
}

impl<S, Req, B> tower_service::Service<Req> for Watched<S>
where
    S: tower_service::Service<Req, Response = Response<B>>,
    B: Default,
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
    /// A request's response future, counting its end, answering 408 once it is late.
    pub struct WatchedFuture<F> {
        #[pin]
        inner: F,
        ended: Ended,
    }
}

impl<F, B, E> Future for WatchedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if this.ended.0.late() {
            // The handler is dropped with this future, as a timeout layer's would be.
            let mut response = Response::new(B::default());
            *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
            return Poll::Ready(Ok(response));
        }
        this.inner.poll(cx)
    }
}

pin_project_lite::pin_project! {
    /// Both timeouts of one connection, on one timer: resolves once the connection has been
    /// idle — no request in flight, none begun — for the header timeout since it opened or
    /// since its last request ended; marks a request in flight for longer than the request
    /// timeout late (and wakes the connection, whose [`Watched`] then answers it). The timer
    /// moves only when it fires and finds that a request came since, or when a request begins
    /// that is due before it (a request timeout shorter than the header timeout).
    struct Watchdog {
        activity: Activity,
        limits: Limits,
        #[pin]
        timer: Sleep,
    }
}

impl Watchdog {
    fn new(activity: Activity, limits: Limits) -> Self {
        let timer = tokio::time::sleep_until(activity.0.opened + limits.header_timeout);
        Self {
            activity,
            limits,
            timer,
        }
    }
}

impl Future for Watchdog {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.limits.request_timeout < this.limits.header_timeout
            && let State::Busy { began, late: false } = this.activity.state()
        {
            let due = began + this.limits.request_timeout;
            if due < this.timer.deadline() {
                this.timer.as_mut().reset(due);
            }
        }
        loop {
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let due = match this.activity.state() {
                State::Idle(since) => {
                    let due = since + this.limits.header_timeout;
                    if due <= now {
                        return Poll::Ready(());
                    }
                    due
                }
                State::Busy { began, late } => {
                    let due = began + this.limits.request_timeout;
                    if due <= now && !late {
                        this.activity.0.late.store(true, Ordering::Relaxed);
                        // Polled after the connection this turn: it looks again next turn.
                        cx.waker().wake_by_ref();
                    }
                    // Late: answered on the connection's next turn; look again later.
                    if due <= now {
                        now + this.limits.header_timeout
                    } else {
                        due
                    }
                }
            };
            this.timer.as_mut().reset(due);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Answers its request doubled; not ready on its first `poll_ready` (it wakes the caller);
    /// counts its clones.
    struct Doubler {
        ready: bool,
        clones: Arc<AtomicUsize>,
    }

    impl Clone for Doubler {
        fn clone(&self) -> Self {
            self.clones.fetch_add(1, Ordering::Relaxed);
            Self {
                ready: self.ready,
                clones: self.clones.clone(),
            }
        }
    }

    impl tower_service::Service<u32> for Doubler {
        type Response = u32;
        type Error = Infallible;
        type Future = std::future::Ready<Result<u32, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.ready {
                return Poll::Ready(Ok(()));
            }
            self.ready = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }

        fn call(&mut self, request: u32) -> Self::Future {
            assert!(self.ready, "called before it was ready");
            std::future::ready(Ok(request * 2))
        }
    }

    #[tokio::test]
    async fn a_ready_service_is_called_in_place_and_one_not_ready_waits_on_a_clone() {
        use hyper::service::Service as _;
        let clones = Arc::new(AtomicUsize::new(0));
        let serial = Serial::new(Doubler {
            ready: false,
            clones: clones.clone(),
        });
        // Not ready: answered once ready, by a clone.
        assert_eq!(serial.call(1).await, Ok(2));
        assert_eq!(clones.load(Ordering::Relaxed), 1);
        // The connection's own copy was polled once (and is ready now): called in place.
        assert_eq!(serial.call(2).await, Ok(4));
        assert_eq!(serial.call(3).await, Ok(6));
        assert_eq!(clones.load(Ordering::Relaxed), 1);
    }
}
