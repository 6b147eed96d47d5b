//! `/v1/auth/register`, `/v1/auth/login`, `/v1/auth/token` and `/v1/me`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::authz::{Caller, Ctx, Limit, json_body, limit, record, with_rate_headers};
use super::error::ApiError;
use crate::accounts::{self, AccountError, Login, NewUser};
use crate::events::EventType;
use crate::ratelimit::{self, Decision, Mode, email_subject, ip_subject, normalize_email};
use crate::security::jwt::SubjectKind;
use crate::security::password::PasswordError;

#[derive(Deserialize, utoipa::ToSchema)]
pub struct RegisterRequest {
    email: String,
    #[schema(value_type = String, format = Password)]
    password: SecretString,
    first_name: String,
    last_name: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct LoginRequest {
    email: String,
    #[schema(value_type = String, format = Password)]
    password: SecretString,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct TokenRequest {
    client_id: String,
    #[schema(value_type = String, format = Password)]
    client_secret: SecretString,
}

/// `gh_` and 16 URL-safe characters: the shape of the client ids gatehouse issues (a secret
/// is 43 characters and has no prefix).
fn looks_like_client_id(id: &str) -> bool {
    id.len() == 19
        && id.starts_with("gh_")
        && id[3..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

fn account_error(error: AccountError) -> ApiError {
    match error {
        AccountError::Invalid(message) => ApiError::invalid_request(message),
        AccountError::EmailTaken => {
            ApiError::conflict("email_taken", "an account with this email already exists")
        }
        AccountError::Database(error) => {
            tracing::error!(%error, "accounts: database failure");
            ApiError::unavailable()
        }
        AccountError::Password(PasswordError::Busy) => {
            tracing::warn!("password hashing queue full; answering 503");
            ApiError::overloaded(1)
        }
        AccountError::Password(error) => {
            tracing::error!(%error, "accounts: password hashing failure");
            ApiError::internal()
        }
    }
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
        &state.config.queue_namespace,
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
    subject: uuid::Uuid,
    kind: SubjectKind,
) -> Result<Response, ApiError> {
    let issued = state.jwt.issue(subject, kind).map_err(|error| {
        tracing::error!(%error, "cannot sign a token");
        ApiError::internal()
    })?;
    let body = json!({
        "access_token": issued.token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
    });
    let mut response = (StatusCode::OK, Json(body)).into_response();
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

/// Registers a user.
#[utoipa::path(post, path = "/v1/auth/register", tag = "auth",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered", body = super::openapi::Registered),
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
) -> Result<Response, ApiError> {
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
    let id = accounts::create_user(&state.pool, &state.hasher, new)
        .await
        .map_err(account_error)?;
    tracing::info!(user.id = %id, "user registered");
    let response = (StatusCode::CREATED, Json(json!({"id": id, "email": email}))).into_response();
    Ok(with_rate_headers(response, &decision))
}

/// Logs a user in: an access token.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in", body = super::openapi::TokenResponse),
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
) -> Result<Response, ApiError> {
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
) -> Result<uuid::Uuid, ApiError> {
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
            Err(account_error(error))
        }
    }
}

/// A service account's token (client credentials).
#[utoipa::path(post, path = "/v1/auth/token", tag = "auth",
    request_body = TokenRequest,
    responses(
        (status = 200, description = "Issued", body = super::openapi::TokenResponse),
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
) -> Result<Response, ApiError> {
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
    .await
    .map_err(account_error)?
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
#[utoipa::path(get, path = "/v1/me", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller", body = super::openapi::Me),
        (status = 401, description = "No valid bearer token / wrong credentials", body = super::error::ErrorBody),
        (status = 429, description = "Too many refused requests from this address (`rate_limited`, with `Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "A dependency is unavailable (`unavailable`)", body = super::error::ErrorBody),
    ))]
pub async fn me(caller: Caller) -> Json<serde_json::Value> {
    let p = &caller.principal;
    let memberships: Vec<_> = p
        .memberships
        .iter()
        .map(|m| {
            json!({
                "tenant_id": m.tenant_id,
                "role": m.role.as_str(),
                "scopes": m.role.scopes().iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({
        "id": p.id,
        "kind": p.kind,
        "email": p.email,
        "memberships": memberships,
        "platform_scopes": p.platform_scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    }))
}
