//! What the ingress tells Prometheus: `GET /metrics` (see `metrics::scrape`), and [`Measure`],
//! which the outer layer (`http::outer_layer`) uses to count every request by method, matched
//! route template (never the raw path) and status, with its latency.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};
use std::time::Instant;

use ::metrics::{Counter, Histogram};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method};
use axum::response::Response;

use super::AppState;

/// Prometheus text: counters, histograms, queue gauges read from Redis now.
#[utoipa::path(
    operation_id = "metrics",
    get,
    path = "/metrics",
    tag = "health",
    security((), ("metrics_token" = [])),
    responses(
        (status = 200, description = "Prometheus text exposition format", content_type = "text/plain"),
        (status = 401, description = "`METRICS_TOKEN` is set and the request does not carry it"),
    )
)]
pub async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    state.scrape.respond(&headers).await
}

/// A bounded label for the method: the standard ones, else `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Counts a request by method, matched route and status, and times it: `start` when it
/// arrives, `finish` with its response. Requests no route matched share the route `unmatched`.
pub struct Measure {
    route: Option<MatchedPath>,
    method: &'static str,
    started: Instant,
}

impl Measure {
    pub fn start(request: &Request) -> Self {
        Self {
            route: request.extensions().get::<MatchedPath>().cloned(),
            method: method_label(request.method()),
            started: Instant::now(),
        }
    }

    /// Records the metrics, and at DEBUG level one access-log line (no path, no query: the
    /// route template only, so no identifier or token in a URL reaches the log).
    pub fn finish(self, response: &Response) {
        let route = self.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let status = response.status().as_u16();
        let elapsed = self.started.elapsed();
        HANDLES.record(self.method, route, status, elapsed.as_secs_f64());
        tracing::debug!(
            http.method = self.method,
            http.route = route,
            http.status = status,
            latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            "request finished"
        );
    }
}

/// The request metrics' handles by route template, registered on a route's first request:
/// afterwards a request costs one map lookup instead of building and hashing a labelled key
/// per metric. Bounded: route templates, methods (`method_label`) and statuses are finite.
static HANDLES: LazyLock<Handles> = LazyLock::new(Handles::default);

#[derive(Default)]
struct Handles {
    routes: RwLock<HashMap<String, RouteHandles>>,
}

#[derive(Default)]
struct RouteHandles {
    /// `gatehouse_http_requests_total` by method and status.
    requests: Vec<(&'static str, u16, Counter)>,
    /// `gatehouse_http_request_duration_seconds` by method.
    durations: Vec<(&'static str, Histogram)>,
}

impl RouteHandles {
    fn find(&self, method: &str, status: u16) -> Option<(&Counter, &Histogram)> {
        let requests = self
            .requests
            .iter()
            .find(|(m, s, _)| *m == method && *s == status)?;
        let duration = self.durations.iter().find(|(m, _)| *m == method)?;
        Some((&requests.2, &duration.1))
    }
}

impl Handles {
    fn record(&self, method: &'static str, route: &str, status: u16, seconds: f64) {
        {
            let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((requests, duration)) =
                routes.get(route).and_then(|r| r.find(method, status))
            {
                requests.increment(1);
                duration.record(seconds);
                return;
            }
        }
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        let handles = routes.entry(route.to_owned()).or_default();
        if !handles
            .requests
            .iter()
            .any(|(m, s, _)| *m == method && *s == status)
        {
            let counter = ::metrics::counter!(
                "gatehouse_http_requests_total",
                "method" => method,
                "route" => route.to_owned(),
                "status" => status.to_string()
            );
            handles.requests.push((method, status, counter));
        }
        if !handles.durations.iter().any(|(m, _)| *m == method) {
            let histogram = ::metrics::histogram!(
                "gatehouse_http_request_duration_seconds",
                "method" => method,
                "route" => route.to_owned()
            );
            handles.durations.push((method, histogram));
        }
        if let Some((requests, duration)) = handles.find(method, status) {
            requests.increment(1);
            duration.record(seconds);
        }
    }
}
