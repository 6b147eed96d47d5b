//! The HTTP edge (axum): parses, calls one core function, maps the result.

pub mod admin;
pub mod auth;
pub mod authz;
pub mod client_ip;
pub mod error;
pub mod health;
pub mod invitations;
pub mod jobs;
pub mod key_cache;
pub mod key_notices;
pub mod metrics;
pub mod openapi;
pub mod outer_layer;
pub mod rotations;
pub mod security_events;
pub mod tenants;
pub mod transport;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::redis_conn::RedisConn;
use axum::Router;
use axum::response::{IntoResponse, Response};
use gatehouse_jobs::client::Queues;
use sqlx::PgPool;
use tower_http::catch_panic::CatchPanicLayer;
use tower_layer::{Layer, Stack};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::ScopeCache;
use crate::config::Config;
use crate::events::SecurityLog;
use crate::security::jwt::JwtKeys;
use crate::security::password::Hasher;
use error::ApiError;
use key_cache::KeyCache;

/// What every handler shares.
pub struct AppState {
    pub config: Arc<Config>,
    pub pool: PgPool,
    /// Renewed from `REDIS_URL` when stuck (`crate::redis_conn::Renewing`).
    pub redis: crate::redis_conn::Renewing,
    /// With `REDIS_MIN_REPLICA_ACKS`, the connections enqueues wait for replicas on
    /// ([`AppState::enqueue_redis`]).
    pub acked: Option<crate::redis_conn::Spread>,
    pub queues: Queues,
    /// Inbound messages' enqueues, coalesced into groups under load (`crate::queue::coalesce`),
    /// over [`AppState::enqueue_redis`]'s connections.
    pub enqueuer: crate::queue::coalesce::Coalescer<crate::redis_conn::Renewing>,
    pub key_cache: Arc<KeyCache>,
    /// `PUBLIC_BASE_URL` without a trailing slash.
    pub public_base: Option<String>,
    pub jwt: JwtKeys,
    /// argon2id on its own threads behind a `PASSWORD_HASH_QUEUE`-bounded queue.
    pub hasher: Hasher,
    pub scopes: ScopeCache,
    /// Records security events (row, log line, metrics) and evaluates the alert rules.
    pub events: SecurityLog,
    /// What `GET /metrics` renders.
    pub scrape: crate::metrics::scrape::Scrape,
}

impl AppState {
    /// `redis` must be a connection to `config.redis_url`: it is renewed from there when
    /// stuck.
    pub fn new(config: Arc<Config>, pool: PgPool, redis: RedisConn) -> Self {
        let redis = crate::redis_conn::Renewing::from_manager(redis, &config.redis_url);
        let queues = config.queues();
        let key_cache = KeyCache::new(Duration::from_secs(config.tenant_key_cache_seconds));
        let public_base = config
            .public_base_url
            .as_ref()
            .map(|u| u.as_str().trim_end_matches('/').to_owned());
        let jwt = JwtKeys::from_config(&config);
        let scopes = ScopeCache::new(config.redis_namespace.clone());
        let hasher = Hasher::owasp_with_queue(config.password_hash_queue);
        let events = SecurityLog::new(pool.clone(), redis.clone(), config.redis_namespace.clone());
        let scrape = crate::metrics::scrape::Scrape {
            handle: crate::metrics::install(),
            redis: redis.clone(),
            layout: config.layout().clone(),
            token: config.metrics_token.clone(),
        };
        // A failure here is a URL the configuration already accepted; without the pool the
        // enqueues still wait for replicas, on the shared connection.
        let acked = config.replica_acks.and_then(|_| {
            crate::redis_conn::Spread::lazy(&config.redis_url, ACKED_CONNECTIONS)
                .inspect_err(|error| tracing::warn!(%error, "cannot open the enqueue connections"))
                .ok()
        });
        let enqueuer = {
            let (redis, acked) = (redis.clone(), acked.clone());
            crate::queue::coalesce::Coalescer::new(queues.clone(), move || {
                enqueue_connection(&redis, acked.as_ref())
            })
        };
        Self {
            config,
            pool,
            redis,
            acked,
            queues,
            enqueuer,
            key_cache,
            public_base,
            jwt,
            hasher,
            scopes,
            events,
            scrape,
        }
    }
}

/// Connections enqueues wait for replicas on (`REDIS_MIN_REPLICA_ACKS`), taken in turn: a
/// `WAIT` delays only the enqueues behind it on its own connection.
const ACKED_CONNECTIONS: usize = 16;

impl AppState {
    /// The connection an enqueue goes over: one of its own when it waits for replicas (`WAIT`
    /// blocks its connection), the shared one otherwise.
    pub fn enqueue_redis(&self) -> crate::redis_conn::Renewing {
        enqueue_connection(&self.redis, self.acked.as_ref())
    }
}

fn enqueue_connection(
    shared: &crate::redis_conn::Renewing,
    acked: Option<&crate::redis_conn::Spread>,
) -> crate::redis_conn::Renewing {
    match acked {
        Some(spread) => spread.get(),
        None => shared.clone(),
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::internal().into_response()
}

async fn fallback() -> ApiError {
    ApiError::not_found()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this path does not accept that method",
    )
}

/// Every route with its documentation. A route is added here, and only here, with
/// `routes!(handler)` on a handler annotated `#[utoipa::path(...)]`; `tests/it/openapi.rs` fails
/// for a route the document does not list.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(webhook::twilio_message))
        .routes(routes!(auth::register))
        .routes(routes!(auth::login))
        .routes(routes!(auth::token))
        .routes(routes!(auth::me))
        .routes(routes!(jobs::enqueue))
        .routes(routes!(tenants::create))
        .routes(routes!(tenants::put_member))
        .routes(routes!(invitations::accept))
        .routes(routes!(tenants::catalog_sync))
        .routes(routes!(security_events::list))
        .routes(routes!(rotations::create))
        .routes(routes!(rotations::get))
        .routes(routes!(rotations::approve))
        .merge(admin::routes())
}

/// Every route with its fallbacks and state, without the edge's layers ([`layered`] adds them).
pub fn router(state: Arc<AppState>) -> Router {
    finish(routes().split_for_parts().0, state)
}

fn finish(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// `routes` (with the JSON fallbacks) behind the layers every request passes (edge, panic
/// catcher, the server's request timeout), per connection: [`Layered::connection`]; `templates`
/// are the routes' paths, which label the request metrics. Public so a test can serve a route
/// of its own (one that panics, say) behind exactly what production routes get.
///
/// The layers wrap the router as a whole, not each route: `Router::layer` wraps every route in
/// a boxed `Route` around its own copy of the stack, and a request then clones that box and
/// boxes its future once more at each level (BENCHMARKS §16). Around the router, a request
/// costs neither; the 404 and 405 fallbacks pass the same layers as any route.
///
/// No body limit layer: every handler reads its body through `authz::read_limited` (the
/// webhook, the JSON bodies, the dashboard's forms), with the limit its route allows, and no
/// route uses axum's body extractors (which would fall back to axum's own 2 MB cap).
pub fn layered(
    routes: Router<Arc<AppState>>,
    templates: metrics::RouteTemplates,
    state: Arc<AppState>,
) -> Layered {
    Layered {
        outer: outer_layer::OuterLayer::new(state.clone(), templates),
        router: finish(routes, state),
    }
}

/// The router and the edge's layers, put together for each connection ([`layered`]).
#[derive(Clone)]
pub struct Layered {
    outer: outer_layer::OuterLayer,
    router: Router,
}

impl Layered {
    /// The service of the connection from `peer`: the edge (request id, transport security,
    /// metrics), the panic catcher, then `watch` (the server's request timeout: its 408 passes
    /// the edge like any answer), then the router.
    pub fn connection(
        &self,
        peer: SocketAddr,
        watch: crate::server::Watch,
    ) -> impl tower_service::Service<
        axum::http::Request<hyper::body::Incoming>,
        Response = Response,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    >
    + Clone
    + Send
    + 'static
    + use<> {
        Stack::new(
            Stack::new(watch, CatchPanicLayer::custom(panic_response)),
            self.outer.connection(peer),
        )
        .layer(self.router.clone())
    }
}

/// How long shutdown waits for security events still being recorded.
pub const EVENT_DRAIN: Duration = Duration::from_secs(5);

/// Serves the router on `listener` (through [`crate::server`]: header timeout, connection cap)
/// until `shutdown` resolves, then drains connections and the security events their requests
/// caused (up to [`EVENT_DRAIN`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let events = state.events.clone();
    let limits = crate::server::Limits::from_config(&state.config);
    // Tenant-key change notices (`tenants rotate-secret`) drop this ingress's cached keys.
    let notices = tokio::spawn(key_notices::listen(
        state.config.redis_url.clone(),
        state.config.redis_namespace.clone(),
        state.key_cache.clone(),
    ));
    // Every route behind the edge's layers, request metrics labelled by the routes' templates
    // (the OpenAPI document's paths, registered in the same `routes!` calls).
    let (routes, document) = routes().split_for_parts();
    let templates = metrics::RouteTemplates::new(document.paths.paths.keys().map(String::as_str));
    let app = layered(routes, templates, state);
    let served = crate::server::run(
        listener,
        limits,
        move |peer, watch| app.connection(peer, watch),
        shutdown,
    )
    .await;
    notices.abort();
    events.drain(EVENT_DRAIN).await;
    served
}
