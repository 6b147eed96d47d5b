//! The outermost layer, wrapping every answer: request metrics around transport security
//! (HTTPS redirect, security headers, request id). Outside the panic catcher, so a caught
//! panic's 500 carries the headers and is counted too.
//!
//! A plain tower layer rather than `axum::middleware::from_fn`: it runs on every request,
//! and this way a request costs no clone of the inner service and no boxed future. Everything
//! before the route is synchronous, so the route's future is created in `call` and wrapped.
//! It takes the request as hyper gives it (any body), so it can be the outermost service.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::BoxError;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::response::Response;
use tower_layer::Layer;
use tower_service::Service;

use super::AppState;
use super::metrics::{Measure, RouteTemplates};
use super::transport::{self, Arrival};

/// Puts [`Outer`] around a service (`http::layered`: around the whole router).
#[derive(Clone)]
pub struct OuterLayer {
    state: Arc<AppState>,
    routes: RouteTemplates,
    peer: SocketAddr,
}

impl OuterLayer {
    /// `routes`: the templates the inner router serves, which label the request metrics. The
    /// peer is the unspecified address until [`OuterLayer::connection`] names it: forwarded
    /// headers are then not trusted (it is nobody's proxy unless configured so).
    pub fn new(state: Arc<AppState>, routes: RouteTemplates) -> Self {
        Self {
            state,
            routes,
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }

    /// This layer for the connection from `peer`, whose requests carry it ([`transport::Origin`]).
    pub fn connection(&self, peer: SocketAddr) -> Self {
        Self {
            peer,
            ..self.clone()
        }
    }
}

impl<S> Layer<S> for OuterLayer {
    type Service = Outer<S>;

    fn layer(&self, inner: S) -> Outer<S> {
        Outer {
            inner,
            state: self.state.clone(),
            routes: self.routes.clone(),
            peer: self.peer,
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Outer<S> {
    inner: S,
    state: Arc<AppState>,
    routes: RouteTemplates,
    peer: SocketAddr,
}

/// Any request body (hyper's, as it arrives) goes on as axum's; the inner stack may answer
/// any body (the panic catcher boxes its own); the edge's answer is axum's.
impl<S, ReqB, B> Service<http::Request<ReqB>> for Outer<S>
where
    S: Service<Request, Response = http::Response<B>>,
    ReqB: HttpBody<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = OuterFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqB>) -> Self::Future {
        // A no-op for a body that is already axum's.
        let mut request = request.map(Body::new);
        let measure = Measure::start(&request, &self.routes);
        let (arrival, answered) = transport::arrive(&self.state, self.peer, &mut request);
        let inner = match answered {
            Some(response) => Inner::Answered {
                response: Some(response),
            },
            None => Inner::Route {
                future: self.inner.call(request),
            },
        };
        OuterFuture {
            inner,
            done: Some((measure, arrival)),
        }
    }
}

pin_project_lite::pin_project! {
    #[project = InnerProj]
    enum Inner<F> {
        Answered { response: Option<Response> },
        Route { #[pin] future: F },
    }
}

pin_project_lite::pin_project! {
    /// The route's answer (or the edge's own), finished with headers and metrics.
    pub struct OuterFuture<F> {
        #[pin]
        inner: Inner<F>,
        done: Option<(Measure, Arrival)>,
    }
}

impl<F, B, E> Future for OuterFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.inner.project() {
            InnerProj::Answered { response } => match response.take() {
                Some(response) => response,
                None => panic!("OuterFuture polled after completion"),
            },
            InnerProj::Route { future } => match future.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(response)) => response.map(Body::new),
            },
        };
        if let Some((measure, arrival)) = this.done.take() {
            transport::depart(arrival, &mut response);
            measure.finish(&response);
        }
        Poll::Ready(Ok(response))
    }
}
