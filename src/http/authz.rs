//! Who is calling and what they may do: the request context (client IP, request id), the
//! bearer-token extractor, scope checks that log `permission_denied`, rate limits that
//! answer 429 with `RateLimit-*` headers (among them the per-IP budget of refused
//! unauthenticated requests, [`unauthenticated_budget`] / [`refuse_unauthenticated`]), and a
//! JSON body reader with the API's errors.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponseParts, ResponseParts};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use super::client_ip::client_ip;
use super::error::ApiError;
use super::transport::Origin;
use crate::access::{Principal, Scope};
use crate::config::Rate;
use crate::events::{EventType, SecurityEvent};
use crate::ratelimit::{self, Decision, Mode, ip_subject, names};
use crate::security::jwt::JwtError;

/// The client's address and the request id, for limits and security events.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub ip: IpAddr,
    pub request_id: String,
}

impl Ctx {
    fn from_parts(parts: &Parts, state: &AppState) -> Self {
        let (peer, id) = Origin::of(&parts.extensions);
        let ip = client_ip(peer, &parts.headers, &state.config.trusted_proxies);
        let request_id = id.map(|r| r.as_str().to_owned()).unwrap_or_default();
        Self { ip, request_id }
    }

    /// A security event of `kind` carrying this request's IP and id.
    pub fn event(&self, kind: EventType) -> SecurityEvent {
        let mut event = SecurityEvent::new(kind);
        event.ip = Some(self.ip);
        event.request_id = Some(self.request_id.clone());
        event
    }
}

impl FromRequestParts<Arc<AppState>> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        Ok(Ctx::from_parts(parts, state))
    }
}

/// Records `event` off the request path: recording never fails or slows the request.
pub fn record(state: &AppState, event: SecurityEvent) {
    state.events.spawn(event);
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub ctx: Ctx,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let ctx = Ctx::from_parts(parts, state);
        // Every refusal below is decided before any PostgreSQL work and counts against the
        // client's unauthenticated budget (429 once it is spent).
        let Some(token) = bearer(&parts.headers) else {
            return Err(refuse_unauthenticated(state, &ctx, ApiError::unauthorized()).await);
        };
        let claims = match state.jwt.verify(token) {
            Ok(claims) => claims,
            Err(JwtError::Expired) => {
                return Err(refuse_unauthenticated(state, &ctx, ApiError::unauthorized()).await);
            }
            Err(_) => {
                // A forged, tampered or foreign token: someone is trying something.
                let mut event = ctx.event(EventType::FailedLogin);
                event.details = json!({"reason": "invalid_token"});
                record(state, event);
                return Err(refuse_unauthenticated(state, &ctx, ApiError::unauthorized()).await);
            }
        };
        let mut redis = state.redis.clone();
        let (principal, _source) = state
            .scopes
            .resolve(&mut redis, &state.pool, claims.sub, claims.kind)
            .await
            .map_err(|error| {
                tracing::error!(%error, "cannot resolve the caller's scopes");
                ApiError::unavailable()
            })?;
        match principal {
            Some(principal) if principal.active => Ok(Caller { principal, ctx }),
            _ => {
                let mut event = ctx.event(EventType::FailedLogin);
                event.user_id = Some(claims.sub);
                event.details = json!({"reason": "inactive_or_deleted_subject"});
                record(state, event);
                Err(refuse_unauthenticated(state, &ctx, ApiError::unauthorized()).await)
            }
        }
    }
}

impl Caller {
    pub fn id(&self) -> Uuid {
        self.principal.id
    }

    /// Denies: a `permission_denied` event naming `scope`, and 403.
    pub fn deny(&self, state: &AppState, scope: Scope, tenant_id: Option<Uuid>) -> ApiError {
        let mut event = self.ctx.event(EventType::PermissionDenied);
        event.user_id = Some(self.principal.id);
        event.email = self.principal.email.clone();
        event.tenant_id = tenant_id;
        event.details = json!({"scope": scope.as_str()});
        record(state, event);
        ApiError::forbidden()
    }

    /// Denies acting for a tenant outside the caller's binding: a `permission_denied` event
    /// naming `scope`, the reason and the tenant (`tenant_id`: only when it exists), and 403.
    pub fn deny_tenant(&self, state: &AppState, scope: Scope, tenant_id: Option<Uuid>) -> ApiError {
        let mut event = self.ctx.event(EventType::PermissionDenied);
        event.user_id = Some(self.principal.id);
        event.email = self.principal.email.clone();
        event.tenant_id = tenant_id;
        event.details = json!({"scope": scope.as_str(), "reason": "tenant_not_bound"});
        record(state, event);
        ApiError::forbidden()
    }

    /// Requires a platform-wide scope.
    pub fn require(&self, state: &AppState, scope: Scope) -> Result<(), ApiError> {
        if self.principal.has_platform_scope(scope) {
            Ok(())
        } else {
            Err(self.deny(state, scope, None))
        }
    }

    /// Requires `scope` through a membership of `tenant_id`.
    pub fn require_in(
        &self,
        state: &AppState,
        tenant_id: Uuid,
        scope: Scope,
    ) -> Result<(), ApiError> {
        if self.principal.has_tenant_scope(tenant_id, scope) {
            Ok(())
        } else {
            Err(self.deny(state, scope, Some(tenant_id)))
        }
    }

    /// Denies with an event, for checks beyond scopes (e.g. granting `owner`).
    pub fn deny_in(&self, state: &AppState, tenant_id: Uuid, scope: Scope) -> ApiError {
        self.deny(state, scope, Some(tenant_id))
    }

    /// Counts one authenticated write against `RATE_LIMIT_USER`.
    pub async fn limit_writes(&self, state: &AppState) -> Result<Decision, ApiError> {
        limit(
            state,
            &self.ctx,
            Limit::User,
            &self.principal.id.to_string(),
            Mode::Hit,
            self.principal.email.as_deref(),
        )
        .await
    }
}

/// The limits gatehouse applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Every register, login and token attempt, per client IP (subject: [`ip_subject`]).
    AuthIp,
    /// Refused unauthenticated requests (forged or unknown-tenant webhooks, bad bearer
    /// tokens, dashboard session and CSRF refusals), per client IP (subject: [`ip_subject`]).
    UnauthenticatedIp,
    /// Failed logins per email (subject: [`ratelimit::email_subject`]), reserved before the
    /// password check and refunded on success.
    FailedLogin,
    /// Authenticated writes per user or service account.
    User,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::AuthIp => names::AUTH_IP,
            Limit::UnauthenticatedIp => names::UNAUTHENTICATED_IP,
            Limit::FailedLogin => names::FAILED_LOGIN,
            Limit::User => names::USER,
        }
    }

    pub fn rate(self, state: &AppState) -> Rate {
        match self {
            Limit::AuthIp => state.config.rate_limit_login_ip,
            Limit::UnauthenticatedIp => state.config.rate_limit_unauthenticated_ip,
            Limit::FailedLogin => state.config.rate_limit_login_email,
            Limit::User => state.config.rate_limit_user,
        }
    }
}

/// Peeks at the client's budget of refused unauthenticated requests: 429 when it is spent.
/// Paths whose refusal can only be decided after PostgreSQL work (a webhook's tenant keys)
/// call this first, so a client past its budget costs one Redis call and nothing more.
/// Genuine requests are never counted. Redis unreachable → 503 (fail closed, as every limit).
pub async fn unauthenticated_budget(state: &AppState, ctx: &Ctx) -> Result<(), ApiError> {
    unauthenticated(state, ctx, Mode::Peek).await
}

/// Counts one refused unauthenticated request against the client's budget: `Ok` while the
/// budget lasts (answer the refusal as usual), else the 429 `rate_limited` to answer instead
/// (503 when Redis cannot count it: fail closed, as every limit).
pub async fn count_refusal(state: &AppState, ctx: &Ctx) -> Result<(), ApiError> {
    unauthenticated(state, ctx, Mode::Hit).await
}

async fn unauthenticated(state: &AppState, ctx: &Ctx, mode: Mode) -> Result<(), ApiError> {
    let subject = ip_subject(ctx.ip);
    limit(state, ctx, Limit::UnauthenticatedIp, &subject, mode, None)
        .await
        .map(|_| ())
}

/// [`count_refusal`], then the answer to give: `refusal` (401/403) while the budget lasts.
pub async fn refuse_unauthenticated(state: &AppState, ctx: &Ctx, refusal: ApiError) -> ApiError {
    match count_refusal(state, ctx).await {
        Ok(()) => refusal,
        Err(error) => error,
    }
}

/// `RateLimit-*` headers for a decision.
pub fn rate_headers(decision: &Decision) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::with_capacity(3);
    for (name, value) in [
        ("ratelimit-limit", u64::from(decision.limit)),
        ("ratelimit-remaining", u64::from(decision.remaining)),
        ("ratelimit-reset", decision.reset_seconds),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            out.push((HeaderName::from_static(name), v));
        }
    }
    out
}

/// A decision's `RateLimit-*` headers, as part of a response (`(status, RateHeaders(d), Json(body))`).
pub struct RateHeaders(pub Decision);

impl IntoResponseParts for RateHeaders {
    type Error = std::convert::Infallible;

    fn into_response_parts(self, mut parts: ResponseParts) -> Result<ResponseParts, Self::Error> {
        for (name, value) in rate_headers(&self.0) {
            parts.headers_mut().insert(name, value);
        }
        Ok(parts)
    }
}

/// Checks one limit. Over the limit → 429 with `Retry-After` and `RateLimit-*` and a
/// `rate_limit_exceeded` event; Redis unreachable → 503 (fail closed: no attempt goes
/// uncounted).
pub async fn limit(
    state: &AppState,
    ctx: &Ctx,
    which: Limit,
    subject: &str,
    mode: Mode,
    email: Option<&str>,
) -> Result<Decision, ApiError> {
    let key = ratelimit::key(&state.config.redis_namespace, which.name(), subject);
    let rate = which.rate(state);
    let mut redis = state.redis.clone();
    let decision = ratelimit::check(&mut redis, &key, rate, mode)
        .await
        .map_err(|error| {
            tracing::error!(%error, limit = which.name(), "rate limiter unavailable; refusing");
            ApiError::unavailable()
        })?;
    if decision.allowed {
        return Ok(decision);
    }
    ::metrics::counter!("gatehouse_rate_limit_hits_total", "limit" => which.name()).increment(1);
    let mut event = ctx.event(EventType::RateLimitExceeded);
    event.details = json!({"limit": which.name(), "rate": rate.to_string()});
    if let Some(email) = email {
        // Only a value with an email's shape is stored; never what was typed otherwise.
        if crate::accounts::looks_like_email(email) {
            event.email = Some(email.to_owned());
        } else {
            event.details["email_shape"] = json!(false);
        }
    }
    record(state, event);
    let mut error = ApiError::rate_limited(decision.retry_after_seconds);
    error.headers = rate_headers(&decision);
    Err(error)
}

/// Reads at most `limit` bytes, whether or not a Content-Length was sent (chunked bodies are
/// counted as they arrive): 413 past the limit.
pub async fn read_limited(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ApiError::payload_too_large(limit));
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => Err(
            if error
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::payload_too_large(limit)
            } else {
                ApiError::invalid_request("the body could not be read")
            },
        ),
    }
}

/// Reads a JSON body of at most `MAX_BODY_BYTES`: 415 without a JSON content type, 413 when
/// too large, 400 `invalid_request` when malformed (naming a missing or unknown field, never
/// echoing a value).
pub async fn json_body<T: DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::unsupported_media_type("application/json"));
    }
    let bytes = read_limited(body, headers, state.config.max_body_bytes).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => {
                let text = e.to_string();
                let head = text.split(" at line").next().unwrap_or_default();
                if head.starts_with("missing field") || head.starts_with("unknown field") {
                    ApiError::invalid_request(head.to_owned())
                } else {
                    ApiError::invalid_request("a field has the wrong type or value")
                }
            }
            _ => ApiError::invalid_request("the body is not valid JSON"),
        }
    })
}
