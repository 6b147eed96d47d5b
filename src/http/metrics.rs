//! What the ingress tells Prometheus: `GET /metrics` (see `metrics::scrape`), and [`Measure`],
//! which the outer layer (`http::outer_layer`) uses to count every request by method, matched
//! route template (never the raw path) and status, with its latency.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock};
use std::time::Instant;

use ::metrics::{Counter, Histogram};

use axum::extract::{Request, State};
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

/// The route templates the router serves (`/v1/webhooks/twilio/{tenant_id}/messages`), to
/// label a request's metrics by the template its path matches. The edge's layers wrap the
/// router as a whole (`http::layered`), outside the routing that would tell them axum's
/// `MatchedPath`; this table is built from the same registrations (the OpenAPI document's
/// paths, which `tests/it/openapi.rs` holds equal to the router's) and matched the same way
/// (`matchit`, axum's own matcher).
#[derive(Clone, Default)]
pub struct RouteTemplates(Arc<matchit::Router<&'static Route>>);

impl RouteTemplates {
    pub fn new<'a>(templates: impl IntoIterator<Item = &'a str>) -> Self {
        let mut router = matchit::Router::new();
        for template in templates {
            let route = Route::interned(template);
            if let Err(error) = router.insert(route.template, route) {
                // Only a template the router itself would have refused.
                tracing::warn!(%error, template, "a route template cannot label metrics");
            }
        }
        Self(Arc::new(router))
    }

    /// The template `path` matches, if any.
    pub fn matching(&self, path: &str) -> Option<&'static str> {
        self.0.at(path).ok().map(|matched| matched.value.template)
    }

    /// The route `path` matches, or the one of requests no route matched.
    fn route(&self, path: &str) -> &'static Route {
        match self.0.at(path) {
            Ok(matched) => matched.value,
            Err(_) => *UNMATCHED,
        }
    }
}

/// The route of requests no route matched (label `unmatched`), looked up once: a flood of
/// unknown paths takes no lock on the way in.
static UNMATCHED: LazyLock<&'static Route> = LazyLock::new(|| Route::interned("unmatched"));

/// A route template and its request metrics' handles, registered on the route's first request
/// with each method and status: afterwards a request finds them behind a read lock of its own
/// route, without building or hashing a labelled key. Bounded: route templates, methods
/// (`method_label`) and statuses are finite.
struct Route {
    template: &'static str,
    handles: RwLock<RouteHandles>,
}

impl Route {
    /// The one copy of a route for the process's lifetime: labels are `&'static str`, and the
    /// set of templates is the program's routes, so this stays as small as they are however
    /// often a router is built (each test builds its own).
    fn interned(template: &str) -> &'static Route {
        static INTERNED: LazyLock<Mutex<HashMap<&'static str, &'static Route>>> =
            LazyLock::new(Mutex::default);
        let mut interned = INTERNED.lock().unwrap_or_else(PoisonError::into_inner);
        match interned.get(template) {
            Some(kept) => kept,
            None => {
                let kept: &'static Route = Box::leak(Box::new(Route {
                    template: Box::leak(template.into()),
                    handles: RwLock::default(),
                }));
                interned.insert(kept.template, kept);
                kept
            }
        }
    }

    fn record(&self, method: &'static str, status: u16, seconds: f64) {
        {
            let handles = self.handles.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((requests, duration)) = handles.find(method, status) {
                requests.increment(1);
                duration.record(seconds);
                return;
            }
        }
        let mut handles = self.handles.write().unwrap_or_else(PoisonError::into_inner);
        let route = self.template;
        if !handles
            .requests
            .iter()
            .any(|(m, s, _)| *m == method && *s == status)
        {
            let counter = ::metrics::counter!(
                "gatehouse_http_requests_total",
                "method" => method,
                "route" => route,
                "status" => status.to_string()
            );
            handles.requests.push((method, status, counter));
        }
        if !handles.durations.iter().any(|(m, _)| *m == method) {
            let histogram = ::metrics::histogram!(
                "gatehouse_http_request_duration_seconds",
                "method" => method,
                "route" => route
            );
            handles.durations.push((method, histogram));
        }
        if let Some((requests, duration)) = handles.find(method, status) {
            requests.increment(1);
            duration.record(seconds);
        }
    }
}

/// Counts a request by method, matched route and status, and times it: `start` when it
/// arrives, `finish` with its response. Requests no route matched share the route `unmatched`.
pub struct Measure {
    route: &'static Route,
    method: &'static str,
    started: Instant,
}

impl Measure {
    pub fn start(request: &Request, routes: &RouteTemplates) -> Self {
        Self {
            route: routes.route(request.uri().path()),
            method: method_label(request.method()),
            started: Instant::now(),
        }
    }

    /// Records the metrics, and at DEBUG level one access-log line (no path, no query: the
    /// route template only, so no identifier or token in a URL reaches the log).
    pub fn finish(self, response: &Response) {
        let status = response.status().as_u16();
        let elapsed = self.started.elapsed();
        self.route
            .record(self.method, status, elapsed.as_secs_f64());
        tracing::debug!(
            http.method = self.method,
            http.route = self.route.template,
            http.status = status,
            latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            "request finished"
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_labelled_by_the_template_it_matches_as_axum_routes_it() {
        let routes = RouteTemplates::new([
            "/healthz",
            "/v1/webhooks/twilio/{tenant_id}/messages",
            "/admin/rotations/{id}",
        ]);
        assert_eq!(routes.matching("/healthz"), Some("/healthz"));
        assert_eq!(
            routes.matching("/v1/webhooks/twilio/0b7c/messages"),
            Some("/v1/webhooks/twilio/{tenant_id}/messages")
        );
        // No trailing-slash or prefix matches, as axum: those paths are the fallback's.
        assert_eq!(routes.matching("/healthz/"), None);
        assert_eq!(routes.matching("/v1/webhooks/twilio/x/messages/more"), None);
        assert_eq!(routes.matching("/admin/rotations/"), None);
        assert_eq!(routes.matching("/nothing"), None);
    }

    #[test]
    fn templates_are_kept_once_however_many_routers_are_built() {
        let a = RouteTemplates::new(["/v1/jobs"]).matching("/v1/jobs");
        let b = RouteTemplates::new(["/v1/jobs"]).matching("/v1/jobs");
        assert!(std::ptr::eq(a.expect("matched"), b.expect("matched")));
    }

    #[test]
    fn the_served_routes_are_all_labelled_by_their_own_template() {
        let (_, document) = crate::http::routes().split_for_parts();
        let paths: Vec<&str> = document.paths.paths.keys().map(String::as_str).collect();
        assert!(paths.len() >= 14, "{paths:?}");
        let routes = RouteTemplates::new(paths.iter().copied());
        for path in paths {
            assert_eq!(routes.matching(path), Some(path));
        }
    }
}
