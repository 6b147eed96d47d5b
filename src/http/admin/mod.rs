//! The `/admin` operator dashboard: server-rendered HTML (maud, escaped by default, no
//! JavaScript) behind a login form, a server-side session and CSRF tokens, for users holding
//! `security:read` or `platform:admin` (checked per request through the scope cache). Pages
//! only read; the one write (retrying a dead job) needs `platform:admin`.

pub mod csrf;
pub mod pages;
pub mod session;
pub mod svg;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::Markup;
use secrecy::SecretString;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::{check_password, ip_limit};
use super::authz::{Ctx, count_refusal, read_limited, record};
use super::error::ApiError;
use crate::access::{Principal, Scope};
use crate::events::EventType;
use crate::security::jwt::SubjectKind;
use session::Token;

/// The biggest form the dashboard reads.
const MAX_FORM_BYTES: usize = 8 * 1024;

/// The stylesheet (the CSP allows styles from 'self' only).
const STYLESHEET: &str = include_str!("admin.css");

/// The dashboard's routes, merged into the main router.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(pages::overview))
        .routes(routes!(login_form, login))
        .routes(routes!(logout))
        .routes(routes!(pages::failed_auth))
        .routes(routes!(pages::rate_limits))
        .routes(routes!(pages::webhooks))
        .routes(routes!(pages::queues))
        .routes(routes!(retry_dead))
        .routes(routes!(pages::rotations))
        .routes(routes!(stylesheet))
}

/// An HTML response that no cache keeps.
pub fn html(status: StatusCode, markup: Markup) -> Response {
    let mut response = (status, markup.into_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// 303 See Other to `to` (a fixed path of ours).
fn see_other(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

/// An error page for an API error (status, message, `Retry-After` and the error's headers,
/// such as `RateLimit-*`, kept).
fn error_page(error: ApiError) -> Response {
    let mut response = html(
        error.status,
        pages::message_page("Error", error.status, &error.message),
    );
    if let Some(seconds) = error.retry_after
        && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    for (name, value) in error.headers {
        response.headers_mut().insert(name, value);
    }
    response
}

/// A request refused for its session or CSRF token counts against the client's budget of
/// refused unauthenticated requests (decided in Redis, before any PostgreSQL work):
/// `refused` while the budget lasts, a 429 page once it is spent.
async fn counted(state: &AppState, ctx: &Ctx, refused: Response) -> Response {
    match count_refusal(state, ctx).await {
        Ok(()) => refused,
        Err(error) => error_page(error),
    }
}

fn forbidden() -> Response {
    html(
        StatusCode::FORBIDDEN,
        pages::message_page(
            "Forbidden",
            StatusCode::FORBIDDEN,
            "You are not allowed to do this.",
        ),
    )
}

fn unavailable(what: &str, error: &dyn std::fmt::Display) -> Response {
    tracing::error!(%error, "admin: {what}");
    error_page(ApiError::unavailable())
}

/// A read a page cannot do without: on failure the cause is logged (as `what`), never shown,
/// and the page answers 503. Use with `?` in a handler returning `Result<Response, Unavailable>`.
fn loaded<T, E: std::fmt::Display>(what: &str, result: Result<T, E>) -> Result<T, Unavailable> {
    result.map_err(|error| {
        tracing::error!(%error, "admin: {what}");
        Unavailable
    })
}

/// A page's data could not be read (already logged by [`loaded`]): the 503 error page.
pub struct Unavailable;

impl IntoResponse for Unavailable {
    fn into_response(self) -> Response {
        error_page(ApiError::unavailable())
    }
}

/// A signed-in operator holding `security:read` as of this request.
pub struct Officer {
    pub principal: Principal,
    pub session: Token,
    pub ctx: Ctx,
    /// The CSRF token for this session's forms.
    pub csrf: String,
}

impl FromRequestParts<Arc<AppState>> for Officer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let ctx = match Ctx::from_request_parts(parts, state).await {
            Ok(ctx) => ctx,
            Err(never) => match never {},
        };
        let Some(id) = session::token_cookie(&parts.headers, session::COOKIE) else {
            return Err(see_other("/admin/login"));
        };
        let namespace = &state.config.redis_namespace;
        let mut redis = state.redis.clone();
        let live = session::load(&mut redis, namespace, &id)
            .await
            .map_err(|e| unavailable("cannot read the session store", &e))?;
        let Some(live) = live else {
            // A session cookie that names no live session (forged, expired, logged out).
            let mut response = see_other("/admin/login");
            response
                .headers_mut()
                .insert(header::SET_COOKIE, session::clear_cookie(session::COOKIE));
            return Err(counted(state, &ctx, response).await);
        };
        let (principal, _) = state
            .scopes
            .resolve(&mut redis, &state.pool, live.user_id, SubjectKind::User)
            .await
            .map_err(|e| unavailable("cannot resolve the operator's scopes", &e))?;
        let principal = match principal {
            Some(p) if p.active => p,
            _ => {
                let _ = session::destroy(&mut redis, namespace, &id).await;
                let mut response = see_other("/admin/login");
                response
                    .headers_mut()
                    .insert(header::SET_COOKIE, session::clear_cookie(session::COOKIE));
                return Err(response);
            }
        };
        if !may_sign_in(&principal) {
            deny(state, &ctx, &principal, "security:read");
            return Err(forbidden());
        }
        let csrf = csrf::token(&state.config.secret_key, "session", id.as_bytes());
        Ok(Officer {
            principal,
            session: id,
            ctx,
            csrf,
        })
    }
}

/// Who may sign in and read the dashboard: security officers (`security:read`) and platform
/// admins (`platform:admin`, who alone may retry dead jobs, so they need the pages too).
pub fn may_sign_in(principal: &Principal) -> bool {
    principal.has_platform_scope(Scope::SecurityRead)
        || principal.has_platform_scope(Scope::PlatformAdmin)
}

impl Officer {
    /// Whether this operator may change things (retry dead jobs): `platform:admin`.
    pub fn may_write(&self) -> bool {
        self.principal.has_platform_scope(Scope::PlatformAdmin)
    }
}

fn deny(state: &AppState, ctx: &Ctx, principal: &Principal, scope: &str) {
    let mut event = ctx.event(EventType::PermissionDenied);
    event.user_id = Some(principal.id);
    event.email = principal.email.clone();
    event.details = json!({"scope": scope, "surface": "admin"});
    record(state, event);
}

/// A refused CSRF check: a `permission_denied` event (no token in it) and 403, counted
/// against the client's budget of refused requests (429 once it is spent).
async fn csrf_refused(state: &AppState, ctx: &Ctx, user: Option<&Principal>) -> Response {
    let mut event = ctx.event(EventType::PermissionDenied);
    if let Some(p) = user {
        event.user_id = Some(p.id);
        event.email = p.email.clone();
    }
    event.details = json!({"reason": "csrf", "surface": "admin"});
    record(state, event);
    counted(state, ctx, forbidden()).await
}

/// Reads a form body (`application/x-www-form-urlencoded`, at most 8 KiB).
async fn form(headers: &HeaderMap, body: Body) -> Result<Vec<(String, String)>, ApiError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(ApiError::unsupported_media_type(
            "application/x-www-form-urlencoded",
        ));
    }
    let bytes = read_limited(body, headers, MAX_FORM_BYTES).await?;
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let mut values = form.iter().filter(|(k, _)| k == name);
    let first = values.next()?;
    // A repeated field is ambiguous: refuse it.
    values.next().is_none().then_some(first.1.as_str())
}

/// A login form with a fresh nonce cookie.
fn login_page(state: &AppState, status: StatusCode, error: Option<&str>) -> Response {
    let nonce = Token::random();
    let token = csrf::token(&state.config.secret_key, "login", nonce.as_bytes());
    let mut response = html(status, pages::login_page(&token, error));
    response.headers_mut().append(
        header::SET_COOKIE,
        session::set_cookie(
            session::LOGIN_COOKIE,
            &nonce.encode(),
            Some(session::LOGIN_SECONDS),
        ),
    );
    response
}

/// The sign-in form's fields (for the document; the handler reads them with [`field`]).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct LoginForm {
    email: String,
    #[schema(format = Password)]
    password: String,
    /// The token of the login page's form.
    csrf: String,
}

/// A form carrying only its CSRF token.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct CsrfForm {
    csrf: String,
}

/// The queues page's retry form.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct RetryForm {
    job_id: String,
    csrf: String,
}

/// What a dashboard form may be answered about its body, besides its own answers.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum FormErrors {
    /// The body could not be read
    #[response(status = 400, content_type = "text/html")]
    Malformed(String),
    /// Body too large
    #[response(status = 413, content_type = "text/html")]
    TooLarge(String),
    /// Not `application/x-www-form-urlencoded`
    #[response(status = 415, content_type = "text/html")]
    WrongType(String),
}

/// The dashboard's login form.
#[utoipa::path(operation_id = "admin_login_form", get, path = "/admin/login", tag = "admin",
    responses((status = 200, description = "The login form", content_type = "text/html")))]
async fn login_form(State(state): State<Arc<AppState>>) -> Response {
    login_page(&state, StatusCode::OK, None)
}

/// The same words whatever was wrong (unknown email, wrong password, locked out by scope).
const LOGIN_FAILED: &str = "The email or password is not valid.";

/// Signs in (form fields `email`, `password`, `csrf`); sets the `__Host-` session cookie.
#[utoipa::path(operation_id = "admin_log_in", post, path = "/admin/login", tag = "admin",
    request_body(content = LoginForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        FormErrors,
        (status = 303, description = "Signed in: to /admin"),
        (status = 401, description = "Wrong email or password (one answer for both)", content_type = "text/html"),
        (status = 403, description = "Missing or wrong CSRF token, or cross-site", content_type = "text/html"),
        (status = 429, description = "Too many attempts", content_type = "text/html"),
    ))]
async fn login(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Every attempt counts against the client's address, as on the JSON login.
    if let Err(error) = ip_limit(&state, &ctx).await {
        return error_page(error);
    }
    let form = match form(&headers, body).await {
        Ok(form) => form,
        Err(error) => return error_page(error),
    };
    let nonce = session::token_cookie(&headers, session::LOGIN_COOKIE);
    let token_ok = match (&nonce, field(&form, "csrf")) {
        (Some(nonce), Some(presented)) => csrf::verify(
            &state.config.secret_key,
            "login",
            nonce.as_bytes(),
            presented,
        ),
        _ => false,
    };
    if !token_ok || !csrf::same_origin(&headers, state.config.public_base_url.as_ref()) {
        return csrf_refused(&state, &ctx, None).await;
    }
    let (Some(email), Some(password)) = (field(&form, "email"), field(&form, "password")) else {
        return login_page(&state, StatusCode::BAD_REQUEST, Some(LOGIN_FAILED));
    };
    let password = SecretString::from(password.to_owned());
    let user_id = match check_password(&state, &ctx, email, &password, Some("admin")).await {
        Ok(id) => id,
        Err(error) if error.status == StatusCode::UNAUTHORIZED => {
            return login_page(&state, StatusCode::UNAUTHORIZED, Some(LOGIN_FAILED));
        }
        Err(error) => return error_page(error),
    };
    let mut redis = state.redis.clone();
    let principal = match state
        .scopes
        .resolve(&mut redis, &state.pool, user_id, SubjectKind::User)
        .await
    {
        Ok((Some(p), _)) if p.active => p,
        Ok(_) => return login_page(&state, StatusCode::UNAUTHORIZED, Some(LOGIN_FAILED)),
        Err(e) => return unavailable("cannot resolve the operator's scopes", &e),
    };
    if !may_sign_in(&principal) {
        // The same answer as a wrong password: the form must not confirm that a password
        // was right for an account that may not use the dashboard. The event says why.
        deny(&state, &ctx, &principal, "security:read");
        return login_page(&state, StatusCode::UNAUTHORIZED, Some(LOGIN_FAILED));
    }
    let namespace = &state.config.redis_namespace;
    // A session id the browser already had is never reused (no fixation).
    if let Some(old) = session::token_cookie(&headers, session::COOKIE) {
        let _ = session::destroy(&mut redis, namespace, &old).await;
    }
    let id = match session::create(&mut redis, namespace, user_id).await {
        Ok(id) => id,
        Err(e) => return unavailable("cannot create a session", &e),
    };
    tracing::info!(user.id = %user_id, "admin: signed in");
    let mut response = see_other("/admin");
    let headers = response.headers_mut();
    headers.append(
        header::SET_COOKIE,
        session::set_cookie(session::COOKIE, &id.encode(), None),
    );
    headers.append(
        header::SET_COOKIE,
        session::clear_cookie(session::LOGIN_COOKIE),
    );
    response
}

/// Signs out: deletes the session server-side.
#[utoipa::path(operation_id = "admin_log_out", post, path = "/admin/logout", tag = "admin",
    request_body(content = CsrfForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        FormErrors,
        (status = 303, description = "Signed out: to the login page"),
        (status = 403, description = "Missing or wrong CSRF token, or cross-site", content_type = "text/html"),
    ))]
async fn logout(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = match form(&headers, body).await {
        Ok(form) => form,
        Err(error) => return error_page(error),
    };
    let Some(id) = session::token_cookie(&headers, session::COOKIE) else {
        return see_other("/admin/login");
    };
    let token_ok = field(&form, "csrf").is_some_and(|presented| {
        csrf::verify(
            &state.config.secret_key,
            "session",
            id.as_bytes(),
            presented,
        )
    });
    if !token_ok || !csrf::same_origin(&headers, state.config.public_base_url.as_ref()) {
        return csrf_refused(&state, &ctx, None).await;
    }
    let mut redis = state.redis.clone();
    if let Err(e) = session::destroy(&mut redis, &state.config.redis_namespace, &id).await {
        return unavailable("cannot delete the session", &e);
    }
    tracing::info!("admin: signed out");
    let mut response = see_other("/admin/login");
    response
        .headers_mut()
        .insert(header::SET_COOKIE, session::clear_cookie(session::COOKIE));
    response
}

/// Puts a dead job back on its queue (form fields `job_id`, `csrf`); needs `platform:admin`.
#[utoipa::path(operation_id = "admin_retry_dead", post, path = "/admin/queues/retry", tag = "admin",
    request_body(content = RetryForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        FormErrors,
        (status = 303, description = "Back to the queues page with a notice"),
        (status = 403, description = "No `platform:admin` (`security:read` only reads), a missing or wrong CSRF token, or cross-site", content_type = "text/html"),
    ))]
async fn retry_dead(
    State(state): State<Arc<AppState>>,
    officer: Officer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Writes need platform:admin; security:read only reads. Refused before the body is read.
    if !officer.may_write() {
        deny(&state, &officer.ctx, &officer.principal, "platform:admin");
        return forbidden();
    }
    // Origin first: a cross-site post is refused before its body is even read.
    if !csrf::same_origin(&headers, state.config.public_base_url.as_ref()) {
        return csrf_refused(&state, &officer.ctx, Some(&officer.principal)).await;
    }
    let form = match form(&headers, body).await {
        Ok(form) => form,
        Err(error) => return error_page(error),
    };
    let token_ok = field(&form, "csrf").is_some_and(|presented| {
        csrf::verify(
            &state.config.secret_key,
            "session",
            officer.session.as_bytes(),
            presented,
        )
    });
    if !token_ok {
        return csrf_refused(&state, &officer.ctx, Some(&officer.principal)).await;
    }
    let Some(job_id) = field(&form, "job_id").filter(|id| !id.is_empty() && id.len() <= 128) else {
        return error_page(ApiError::invalid_request("job_id is required"));
    };
    let mut redis = state.redis.clone();
    match crate::queue::dead::retry(
        &mut redis,
        state.queues.layout(),
        &gatehouse_jobs::QUEUES,
        job_id,
    )
    .await
    {
        Ok(Some(queue)) => {
            tracing::info!(user.id = %officer.principal.id, job.id = job_id, job.queue = queue, "admin: dead job retried");
            see_other("/admin/queues?notice=retried")
        }
        Ok(None) => see_other("/admin/queues?notice=missing"),
        Err(e) => unavailable("cannot retry a dead job", &e),
    }
}

/// The dashboard's stylesheet.
#[utoipa::path(operation_id = "admin_stylesheet", get, path = "/admin/static/admin.css", tag = "admin",
    responses((status = 200, description = "CSS", content_type = "text/css")))]
async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLESHEET,
    )
        .into_response()
}
