//! The one HTTP error type: `{"error":{"code":"…","message":"…"}}`.
//!
//! 4xx bodies say what was wrong; 5xx bodies are generic and the cause is logged once where
//! the error is made.
//!
//! The core's errors become `ApiError` here and only here (`From` impls below, so a handler
//! writes `?`): each one's status, code and message, and the log line of a 5xx. A refusal that
//! also records a security event (a denied scope, a refused invitation, a self-approval)
//! records it in its handler, then converts like any other error.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::access::AccessError;
use crate::accounts::AccountError;
use crate::invitations::InvitationError;
use crate::queue::payloads::PayloadError;
use crate::rotation::RotationError;
use crate::security::password::PasswordError;
use crate::tenants::TenantError;
use gatehouse_jobs::client::EnqueueError;

/// The error body every endpoint answers with (for the API description).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable `code` (SPEC "Error codes") and a human message.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// What every endpoint that reads a request body may answer about that body, besides its own
/// answers (for the OpenAPI document: `responses(..., BodyErrors)`).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum BodyErrors {
    /// Malformed request (`invalid_request` / `invalid_payload`)
    #[response(status = 400)]
    Malformed(ErrorBody),
    /// Body too large (`payload_too_large`)
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Wrong content type (`unsupported_media_type`)
    #[response(status = 415)]
    WrongType(ErrorBody),
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// Extra response headers (rate-limit state, `WWW-Authenticate`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            headers: Vec::new(),
        }
    }
    pub fn invalid_payload(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_payload", message)
    }
    /// No or an unusable bearer token.
    pub fn unauthorized() -> Self {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        );
        e.headers.push((
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"gatehouse\""),
        ));
        e
    }
    /// Wrong credentials; the same body whatever was wrong.
    pub fn invalid_credentials() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "the credentials are not valid",
        )
    }
    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "you are not allowed to do this",
        )
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    /// Too many attempts; `retry_after` seconds until one is allowed.
    pub fn rate_limited(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests, retry later",
        );
        e.retry_after = Some(retry_after.max(1));
        e
    }
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    pub fn invalid_signature() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_signature",
            "the request signature is missing or invalid",
        )
    }
    /// The rest of the body is left unread, so the connection cannot carry another request:
    /// `Connection: close` tells the client so, instead of letting it send its next request on
    /// a connection the server is closing.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body exceeds {limit} bytes"),
        )
        .closing()
    }
    /// Answered before the body is read, so it closes the connection (see `payload_too_large`).
    pub fn unsupported_media_type(expected: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("the content type must be {expected}"),
        )
        .closing()
    }
    fn closing(mut self) -> Self {
        self.headers
            .push((header::CONNECTION, HeaderValue::from_static("close")));
        self
    }
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }
    /// A dependency is down; the cause must already be logged. Clients may retry.
    pub fn unavailable() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the service is temporarily unavailable, retry later",
        );
        e.retry_after = Some(5);
        e
    }
    /// Too much work already waits (the password hashing queue is full): answered at once,
    /// `Retry-After` seconds from now it may succeed.
    pub fn overloaded(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the service is busy, retry shortly",
        );
        e.retry_after = Some(retry_after.max(1));
        e
    }
    /// An unexpected failure; the cause must already be logged.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// A database failure: logged, and 503 (clients may retry).
impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        tracing::error!(%error, "database failure");
        ApiError::unavailable()
    }
}

/// Redis would not take a job: logged, and 503.
impl From<EnqueueError> for ApiError {
    fn from(error: EnqueueError) -> Self {
        tracing::error!(%error, "cannot enqueue");
        ApiError::unavailable()
    }
}

impl From<AccountError> for ApiError {
    fn from(error: AccountError) -> Self {
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
}

/// `Forbidden` (the owner rules) is 403; its handler records the denial first.
impl From<AccessError> for ApiError {
    fn from(error: AccessError) -> Self {
        match error {
            AccessError::NotFound => ApiError::not_found(),
            AccessError::Forbidden => ApiError::forbidden(),
            AccessError::Conflict(message) => ApiError::conflict("conflict", message),
            AccessError::Database(error) => {
                tracing::error!(%error, "cannot change membership");
                ApiError::unavailable()
            }
            AccessError::Cache(error) => {
                tracing::error!(%error, "scope cache unreachable; membership left unchanged");
                ApiError::unavailable()
            }
        }
    }
}

/// Anything but a database failure is the request's fault: 400 naming what was wrong.
impl From<TenantError> for ApiError {
    fn from(error: TenantError) -> Self {
        match error {
            TenantError::Database(error) => {
                tracing::error!(%error, "tenants: database failure");
                ApiError::unavailable()
            }
            other => ApiError::invalid_request(other.to_string()),
        }
    }
}

/// Unknown, used and expired tokens get one 404 (the handler records why first).
impl From<InvitationError> for ApiError {
    fn from(error: InvitationError) -> Self {
        match error {
            InvitationError::Refused { .. } => ApiError::not_found(),
            InvitationError::Database(error) => {
                tracing::error!(%error, "cannot accept an invitation");
                ApiError::unavailable()
            }
            InvitationError::Cache(error) => {
                tracing::error!(%error, "scope cache unreachable; invitation left unused");
                ApiError::unavailable()
            }
        }
    }
}

/// The four-eyes refusals are 403 (their handler records the event first), a rotation in
/// the wrong state 409.
impl From<RotationError> for ApiError {
    fn from(error: RotationError) -> Self {
        match error {
            RotationError::SelfApproval => ApiError::new(
                StatusCode::FORBIDDEN,
                "four_eyes_violation",
                "a rotation must be approved by a different user than the one who requested it",
            ),
            RotationError::ApproverNotAuthorized => ApiError::forbidden(),
            RotationError::NotFound => ApiError::not_found(),
            e @ (RotationError::NotPending(_)
            | RotationError::Expired
            | RotationError::InitiatorNotAuthorized) => {
                ApiError::conflict("conflict", e.to_string())
            }
            RotationError::Database(error) => {
                tracing::error!(%error, "key rotation: database failure");
                ApiError::unavailable()
            }
            other => {
                tracing::error!(error = %other, "unexpected key rotation failure");
                ApiError::internal()
            }
        }
    }
}

/// A payload its queue's schema refuses: 400 `invalid_payload` naming the field (`/` for the
/// payload as a whole).
impl From<PayloadError> for ApiError {
    fn from(error: PayloadError) -> Self {
        match error {
            PayloadError::Invalid { field, message } => {
                let field = if field.is_empty() { "/" } else { &field };
                ApiError::invalid_payload(format!("{field}: {message}"))
            }
            PayloadError::UnknownQueue(_) => ApiError::not_found(),
        }
    }
}
