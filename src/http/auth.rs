//! `/v1/auth/register`, `/v1/auth/login`, `/v1/auth/token` and `/v1/me`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::authz::{Caller, Ctx, Limit, RateHeaders, json_body, limit, record};
use super::error::ApiError;
use crate::accounts::{self, Login, NewUser};
use crate::events::EventType;
use crate::ratelimit::{self, Decision, Mode, email_subject, ip_subject, normalize_email};
use crate::security::jwt::SubjectKind;

#[derive(Deserialize, ToSchema)]
pub struct RegisterRequest {
    /// An address like `name@example.com` (stored trimmed and lower-cased). The pattern states
    /// a plain form every server-side check accepts.
    #[schema(
        max_length = 254,
        pattern = r"^[A-Za-z0-9_%+-]{1,64}@([A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,63}$",
        example = "ada@example.com"
    )]
    email: String,
    /// 12 characters at least, 1024 bytes at most (256 characters always fit).
    #[schema(value_type = String, format = Password, min_length = 12, max_length = 256)]
    password: SecretString,
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    first_name: String,
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    last_name: String,
}

#[derive(Deserialize, ToSchema)]
pub struct LoginRequest {
    /// Any value: a wrong one is 401 `invalid_credentials`, like a wrong password.
    email: String,
    #[schema(value_type = String, format = Password)]
    password: SecretString,
}

#[derive(Deserialize, ToSchema)]
pub struct TokenRequest {
    client_id: String,
    #[schema(value_type = String, format = Password)]
    client_secret: SecretString,
}

/// An access token.
#[derive(Serialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `Bearer`.
    #[schema(pattern = "^Bearer$")]
    pub token_type: &'static str,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// A created user.
#[derive(Serialize, ToSchema)]
pub struct Registered {
    pub id: Uuid,
    /// Normalized (trimmed, lower-cased).
    #[schema(format = "email")]
    pub email: String,
}

/// A membership of the caller.
#[derive(Serialize, ToSchema)]
pub struct Membership {
    pub tenant_id: Uuid,
    #[schema(schema_with = super::openapi::tenant_role)]
    pub role: &'static str,
    pub scopes: Vec<&'static str>,
}

/// The caller.
#[derive(Serialize, ToSchema)]
pub struct Me {
    pub id: Uuid,
    #[schema(schema_with = super::openapi::subject_kind)]
    pub kind: &'static str,
    pub email: Option<String>,
    pub memberships: Vec<Membership>,
    pub platform_scopes: Vec<&'static str>,
}

/// A token answer: never cached.
pub type TokenAnswer = ([(header::HeaderName, HeaderValue); 1], Json<TokenResponse>);

/// `gh_` and 16 URL-safe characters: the shape of the client ids gatehouse issues (a secret
/// is 43 characters and has no prefix).
fn looks_like_client_id(id: &str) -> bool {
    id.len() == 19
        && id.starts_with("gh_")
        && id[3..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// Every register, login and token attempt counts against the client IP's limit (IPv6 by
/// its /64).
pub(crate) async fn ip_limit(state: &AppState, ctx: &Ctx) -> Result<Decision, ApiError> {
    limit(
        state,
        ctx,
        Limit::AuthIp,
        &ip_subject(ctx.ip),
        Mode::Hit,
        None,
    )
    .await
}

/// Gives back an attempt reserved on the per-email limit (the password was right, or it was
/// never checked). A failure leaves the reservation counted: logged, never fatal.
async fn refund_failed_login(state: &AppState, subject: &str) {
    let key = ratelimit::key(
        &state.config.redis_namespace,
        Limit::FailedLogin.name(),
        subject,
    );
    let mut redis = state.redis.clone();
    if let Err(error) = ratelimit::refund(&mut redis, &key, Limit::FailedLogin.rate(state)).await {
        tracing::warn!(%error, "cannot refund a reserved login attempt");
    }
}

fn token_response(
    state: &AppState,
    subject: Uuid,
    kind: SubjectKind,
) -> Result<TokenAnswer, ApiError> {
    let issued = state.jwt.issue(subject, kind).map_err(|error| {
        tracing::error!(%error, "cannot sign a token");
        ApiError::internal()
    })?;
    let body = TokenResponse {
        access_token: issued.token,
        token_type: "Bearer",
        expires_in: issued.expires_in,
    };
    Ok((
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(body),
    ))
}

/// Registers a user.
#[utoipa::path(operation_id = "register_user", post, path = "/v1/auth/register", tag = "auth",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered", body = Registered),
        super::error::BodyErrors,
        (status = 409, description = "Conflict", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn register(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, RateHeaders, Json<Registered>), ApiError> {
    let decision = ip_limit(&state, &ctx).await?;
    let req: RegisterRequest = json_body(&state, &headers, body).await?;
    let new = NewUser {
        email: req.email,
        password: req.password,
        first_name: req.first_name,
        last_name: req.last_name,
        platform_role: None,
    };
    let email = normalize_email(&new.email);
    let id = accounts::create_user(&state.pool, &state.hasher, new).await?;
    tracing::info!(user.id = %id, "user registered");
    Ok((
        StatusCode::CREATED,
        RateHeaders(decision),
        Json(Registered { id, email }),
    ))
}

/// Logs a user in: an access token.
#[utoipa::path(operation_id = "log_in", post, path = "/v1/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in", body = TokenResponse),
        super::error::BodyErrors,
        (status = 401, description = "No valid bearer token / wrong credentials", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn login(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<TokenAnswer, ApiError> {
    ip_limit(&state, &ctx).await?;
    let req: LoginRequest = json_body(&state, &headers, body).await?;
    let user_id = check_password(&state, &ctx, &req.email, &req.password, None).await?;
    tracing::info!(user.id = %user_id, "login");
    token_response(&state, user_id, SubjectKind::User)
}

/// Checks a user's email and password with every login protection but the per-IP limit
/// (which callers count before reading the body). One attempt is reserved on the email's
/// limit before any password work (a locked email is refused there, and however many guesses
/// arrive at once, at most the limit's worth get checked); a right password gives it back, so
/// a user who logs in often is never locked out by their own successes. A failure is a
/// `failed_login` event (with `surface` in its details when given, e.g. `"admin"`) carrying
/// the email only when the value has an email's shape (otherwise `details.email_shape:
/// false`, never the value). Shared by the JSON login and the dashboard's login form.
pub(crate) async fn check_password(
    state: &AppState,
    ctx: &Ctx,
    email: &str,
    password: &SecretString,
    surface: Option<&'static str>,
) -> Result<Uuid, ApiError> {
    let email = normalize_email(email);
    if email.is_empty() || email.len() > 320 {
        return Err(ApiError::invalid_credentials());
    }
    let shaped = accounts::looks_like_email(&email);
    let subject = email_subject(&email);
    limit(
        state,
        ctx,
        Limit::FailedLogin,
        &subject,
        Mode::Hit,
        Some(&email),
    )
    .await?;
    let outcome = accounts::login(&state.pool, &state.hasher, &email, password).await;
    match outcome {
        Ok(Login::Ok(user_id)) => {
            refund_failed_login(state, &subject).await;
            Ok(user_id)
        }
        Ok(Login::Invalid { user_id }) => {
            // The reserved attempt stays counted: this failure is it.
            let mut event = ctx.event(EventType::FailedLogin);
            event.user_id = user_id;
            let mut details = json!({"reason": "invalid_credentials"});
            if let Some(surface) = surface {
                details["surface"] = json!(surface);
            }
            if shaped {
                event.email = Some(email);
            } else {
                details["email_shape"] = json!(false);
            }
            event.details = details;
            record(state, event);
            Err(ApiError::invalid_credentials())
        }
        Err(error) => {
            // Nothing was checked (hashing queue full, database down): not a failure.
            refund_failed_login(state, &subject).await;
            Err(error.into())
        }
    }
}

/// A service account's token (client credentials).
#[utoipa::path(operation_id = "issue_service_token", post, path = "/v1/auth/token", tag = "auth",
    request_body = TokenRequest,
    responses(
        (status = 200, description = "Issued", body = TokenResponse),
        super::error::BodyErrors,
        (status = 401, description = "No valid bearer token / wrong credentials", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn token(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<TokenAnswer, ApiError> {
    // Limited per IP only: a client secret is 256 random bits, and a limit on the client id
    // would let anyone who has seen one lock its producer out.
    ip_limit(&state, &ctx).await?;
    let req: TokenRequest = json_body(&state, &headers, body).await?;
    match accounts::authenticate_service(
        &state.pool,
        &state.hasher,
        &req.client_id,
        &req.client_secret,
    )
    .await?
    {
        Some(id) => {
            tracing::info!(service_account.id = %id, "service token issued");
            token_response(&state, id, SubjectKind::Service)
        }
        None => {
            let mut event = ctx.event(EventType::FailedLogin);
            // Only an id of the shape gatehouse issues is logged: a secret pasted into the
            // wrong field never reaches the log.
            let client_id = Some(req.client_id.as_str()).filter(|id| looks_like_client_id(id));
            event.details = json!({"reason": "invalid_client_credentials", "client_id": client_id});
            record(&state, event);
            Err(ApiError::invalid_credentials())
        }
    }
}

/// The caller, its memberships and scopes.
#[utoipa::path(operation_id = "get_me", get, path = "/v1/me", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller", body = Me),
        (status = 401, description = "No valid bearer token / wrong credentials", body = super::error::ErrorBody),
        (status = 429, description = "Too many refused requests from this address (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn me(caller: Caller) -> Json<Me> {
    let p = &caller.principal;
    let memberships = p
        .memberships
        .iter()
        .map(|m| Membership {
            tenant_id: m.tenant_id,
            role: m.role.as_str(),
            scopes: m.role.scopes().iter().map(|s| s.as_str()).collect(),
        })
        .collect();
    Json(Me {
        id: p.id,
        kind: match p.kind {
            SubjectKind::User => "user",
            SubjectKind::Service => "service",
        },
        email: p.email.clone(),
        memberships,
        platform_scopes: p.platform_scopes.iter().map(|s| s.as_str()).collect(),
    })
}
