//! Security events: one row in `security_events` and one structured log line per event.
//!
//! Recording never fails the operation that caused it: a failed insert is logged.

use std::net::IpAddr;

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// The kinds of security event (SPEC "Security events").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    FailedLogin,
    PermissionDenied,
    InvalidWebhookSignature,
    RateLimitExceeded,
    SuspiciousActivity,
    FourEyesViolation,
    EncryptionError,
    KeyRotationStarted,
    KeyRotationCompleted,
}

impl EventType {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailedLogin => "failed_login",
            Self::PermissionDenied => "permission_denied",
            Self::InvalidWebhookSignature => "invalid_webhook_signature",
            Self::RateLimitExceeded => "rate_limit_exceeded",
            Self::SuspiciousActivity => "suspicious_activity",
            Self::FourEyesViolation => "four_eyes_violation",
            Self::EncryptionError => "encryption_error",
            Self::KeyRotationStarted => "key_rotation_started",
            Self::KeyRotationCompleted => "key_rotation_completed",
        }
    }

    /// Critical events also go to Sentry.
    pub fn is_critical(self) -> bool {
        matches!(
            self,
            Self::InvalidWebhookSignature
                | Self::SuspiciousActivity
                | Self::FourEyesViolation
                | Self::EncryptionError
        )
    }
}

/// One security event. Never put a secret, token, password or message body in `details`.
#[derive(Debug, Clone)]
pub struct SecurityEvent {
    pub kind: EventType,
    pub ip: Option<IpAddr>,
    pub user_id: Option<Uuid>,
    pub email: Option<String>,
    pub tenant_id: Option<Uuid>,
    pub request_id: Option<String>,
    pub details: Value,
}

impl SecurityEvent {
    /// An event of `kind` with empty details.
    pub fn new(kind: EventType) -> Self {
        Self {
            kind,
            ip: None,
            user_id: None,
            email: None,
            tenant_id: None,
            request_id: None,
            details: Value::Object(Default::default()),
        }
    }
}

/// Records an event: a structured log line (target `security`), then a row. Errors are
/// logged, never returned.
pub async fn record(pool: &PgPool, event: SecurityEvent) {
    let ip = event.ip.map(|ip| ip.to_string());
    let tenant_id = event.tenant_id.map(|t| t.to_string());
    let user_id = event.user_id.map(|u| u.to_string());
    // One field list for both levels; tracing needs the level at compile time.
    macro_rules! log_event {
        ($level:ident) => {
            tracing::$level!(
                target: "security",
                event_type = event.kind.as_str(),
                ip = ip.as_deref(),
                user.id = user_id.as_deref(),
                email = event.email.as_deref(),
                tenant.id = tenant_id.as_deref(),
                request.id = event.request_id.as_deref(),
                details = %event.details,
                "security event"
            )
        };
    }
    // ERROR is what reaches Sentry (see cli::telemetry): critical kinds only.
    if event.kind.is_critical() {
        log_event!(error);
    } else {
        log_event!(warn);
    }
    let result = sqlx::query(
        "INSERT INTO security_events (type, ip, user_id, email, tenant_id, request_id, details)
         VALUES ($1, $2::inet, $3, $4, $5, $6, $7)",
    )
    .bind(event.kind.as_str())
    .bind(ip)
    .bind(event.user_id)
    .bind(event.email)
    .bind(event.tenant_id)
    .bind(event.request_id)
    .bind(event.details)
    .execute(pool)
    .await;
    if let Err(error) = result {
        tracing::error!(target: "security", %error, event_type = event.kind.as_str(), "failed to store security event");
    }
}
