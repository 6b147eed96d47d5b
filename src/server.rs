//! The one HTTP/1.1 server loop both processes run (the ingress, and the worker's health and
//! metrics port): hyper with a timer, so a connection that has not sent complete request headers
//! within the header timeout — just opened, trickling, or idle between keep-alive requests — is
//! closed; at most `max_connections` connections open per listener (past it, new ones wait in
//! the kernel's backlog until one closes); graceful shutdown. Knows hyper, tower, tokio and the
//! configuration only.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
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
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
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
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(service(peer)),
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
            };
            if let Err(error) = result {
                // A header timeout, a reset, a malformed request: the client's doing, and a
                // flood of them must not flood the log.
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

/// Errors of one connection that the next `accept` does not share.
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
