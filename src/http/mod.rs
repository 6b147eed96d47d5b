//! The HTTP edge (axum): parses, calls one core function, maps the result.

pub mod auth;
pub mod authz;
pub mod client_ip;
pub mod error;
pub mod health;
pub mod jobs;
pub mod key_cache;
pub mod rotations;
pub mod tenants;
pub mod transport;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use gatehouse_jobs::client::Queues;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::access::ScopeCache;
use crate::config::Config;
use crate::security::jwt::JwtKeys;
use crate::security::password::Hasher;
use error::ApiError;
use key_cache::KeyCache;

/// How long one request may take, body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What every handler shares.
pub struct AppState {
    pub config: Arc<Config>,
    pub pool: PgPool,
    pub redis: ConnectionManager,
    pub queues: Queues,
    pub key_cache: Arc<KeyCache>,
    /// `PUBLIC_BASE_URL` without a trailing slash.
    pub public_base: Option<String>,
    pub jwt: JwtKeys,
    /// argon2id on the blocking pool, bounded.
    pub hasher: Hasher,
    pub scopes: ScopeCache,
}

impl AppState {
    pub fn new(config: Arc<Config>, pool: PgPool, redis: ConnectionManager) -> Self {
        let queues = Queues::new(config.queue_namespace.clone());
        let key_cache = KeyCache::new(Duration::from_secs(config.tenant_key_cache_seconds));
        let public_base = config
            .public_base_url
            .as_ref()
            .map(|u| u.as_str().trim_end_matches('/').to_owned());
        let jwt = JwtKeys::from_config(&config);
        let scopes = ScopeCache::new(config.queue_namespace.clone());
        Self {
            config,
            pool,
            redis,
            queues,
            key_cache,
            public_base,
            jwt,
            hasher: Hasher::owasp(),
            scopes,
        }
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

/// The whole router.
pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.config.max_body_bytes;
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route(
            "/v1/webhooks/twilio/{tenant_id}/messages",
            post(webhook::twilio_message),
        )
        .route("/v1/auth/register", post(auth::register))
        .route("/v1/auth/login", post(auth::login))
        .route("/v1/auth/token", post(auth::token))
        .route("/v1/me", get(auth::me))
        .route("/v1/jobs/{queue}", post(jobs::enqueue))
        .route("/v1/tenants", post(tenants::create))
        .route(
            "/v1/tenants/{tenant_id}/members/{user_id}",
            put(tenants::put_member),
        )
        .route(
            "/v1/tenants/{tenant_id}/catalog/sync",
            post(tenants::catalog_sync),
        )
        .route("/v1/admin/key-rotations", post(rotations::create))
        .route("/v1/admin/key-rotations/{id}", get(rotations::get))
        .route(
            "/v1/admin/key-rotations/{id}/approve",
            post(rotations::approve),
        )
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        // A client that trickles its request (slowloris) is cut off.
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            transport::transport_security,
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves the router on `listener` until `shutdown` resolves, then drains connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
