//! Security events: the one `SecurityEvent` type, the one recorder (`SecurityLog`) that writes
//! each event three ways — a JSON log line (target `security`; ERROR for critical kinds, which
//! the Sentry tracing layer turns into Sentry events when `SENTRY_DSN` is set), a row in
//! `security_events`, and metrics — and evaluates the SPEC's alert rules over windows counted
//! in Redis, raising one `suspicious_activity` event per rule, subject and window.
//!
//! Recording never fails the operation that caused it: a failed insert is logged and counted
//! (`gatehouse_security_event_insert_failures_total`); with Redis down the event is still
//! logged and stored, and only alerting degrades (logged and counted).
//!
//! `details` is written by gatehouse's own call sites only, never copied from a request: it
//! holds reasons, scope names, limit names and ids — never a secret, token, password, signature
//! or message body.

use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// The kinds of security event (SPEC "Security events").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    pub const ALL: [EventType; 9] = [
        Self::FailedLogin,
        Self::PermissionDenied,
        Self::InvalidWebhookSignature,
        Self::RateLimitExceeded,
        Self::SuspiciousActivity,
        Self::FourEyesViolation,
        Self::EncryptionError,
        Self::KeyRotationStarted,
        Self::KeyRotationCompleted,
    ];

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

    /// The kind stored under `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
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

    /// The dedicated counter this kind also increments (besides
    /// `gatehouse_security_events_total{type}`), if any.
    fn counter(self) -> Option<&'static str> {
        match self {
            Self::FailedLogin => Some("gatehouse_failed_logins_total"),
            Self::PermissionDenied => Some("gatehouse_permission_denials_total"),
            Self::FourEyesViolation => Some("gatehouse_four_eyes_violations_total"),
            Self::EncryptionError => Some("gatehouse_encryption_errors_total"),
            _ => None,
        }
    }
}

/// One security event. Never put a secret, token, password or message body in `details`.
#[derive(Debug, Clone)]
pub struct SecurityEvent {
    pub kind: EventType,
    /// When it happened (set by [`SecurityEvent::new`]); also picks the alert window.
    pub occurred_at: OffsetDateTime,
    pub ip: Option<IpAddr>,
    pub user_id: Option<Uuid>,
    pub email: Option<String>,
    pub tenant_id: Option<Uuid>,
    pub request_id: Option<String>,
    pub details: Value,
}

impl SecurityEvent {
    /// An event of `kind`, happening now, with empty details.
    pub fn new(kind: EventType) -> Self {
        Self {
            kind,
            occurred_at: OffsetDateTime::now_utc(),
            ip: None,
            user_id: None,
            email: None,
            tenant_id: None,
            request_id: None,
            details: Value::Object(Default::default()),
        }
    }
}

/// One alert rule of SPEC "Security events": `threshold` events of `kind` about one subject
/// within one window raise one `suspicious_activity` event.
#[derive(Debug, Clone, Copy)]
pub struct AlertRule {
    /// The name carried in the alert's `details.rule`.
    pub name: &'static str,
    pub kind: EventType,
    pub threshold: u64,
    pub window: Duration,
    /// What the rule counts per: `ip`, or `tenant` (falling back to the IP, then to `any`).
    pub per: Subject,
}

/// What an alert rule counts events per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Ip,
    Tenant,
}

impl AlertRule {
    /// The subject `event` counts against, if the rule can name one.
    fn subject(&self, event: &SecurityEvent) -> Option<String> {
        match self.per {
            Subject::Ip => event.ip.map(|ip| format!("ip:{ip}")),
            Subject::Tenant => Some(match (event.tenant_id, event.ip) {
                (Some(tenant), _) => format!("tenant:{tenant}"),
                (None, Some(ip)) => format!("ip:{ip}"),
                (None, None) => "any".to_owned(),
            }),
        }
    }
}

/// The SPEC's alert rules. Windows are fixed and aligned to the Unix epoch (a 5-minute window
/// starts at :00, :05, …), so every process of a fleet counts into the same Redis key.
pub const RULES: [AlertRule; 5] = [
    AlertRule {
        name: "failed_logins_per_ip",
        kind: EventType::FailedLogin,
        threshold: 10,
        window: Duration::from_secs(5 * 60),
        per: Subject::Ip,
    },
    AlertRule {
        name: "rate_limit_hits_per_ip",
        kind: EventType::RateLimitExceeded,
        threshold: 100,
        window: Duration::from_secs(3600),
        per: Subject::Ip,
    },
    AlertRule {
        name: "invalid_webhook_signature",
        kind: EventType::InvalidWebhookSignature,
        threshold: 1,
        window: Duration::from_secs(3600),
        per: Subject::Tenant,
    },
    AlertRule {
        name: "four_eyes_violation",
        kind: EventType::FourEyesViolation,
        threshold: 1,
        window: Duration::from_secs(3600),
        per: Subject::Tenant,
    },
    AlertRule {
        name: "encryption_error",
        kind: EventType::EncryptionError,
        threshold: 1,
        window: Duration::from_secs(3600),
        per: Subject::Tenant,
    },
];

/// INCR a window's counter and give it a lifetime on first use, atomically.
static COUNT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local n = redis.call('INCR', KEYS[1])
         if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
         return n",
    )
});

/// The one way to record a security event. Cheap to clone; hold one per process.
#[derive(Clone)]
pub struct SecurityLog {
    pool: PgPool,
    /// Where alert windows are counted; `None` records events without alerting.
    redis: Option<ConnectionManager>,
    namespace: String,
    /// Recordings started by [`SecurityLog::spawn`] and not finished yet, awaited at shutdown.
    pending: TaskTracker,
}

impl std::fmt::Debug for SecurityLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityLog")
            .field("alerts", &self.redis.is_some())
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl SecurityLog {
    /// Records into `pool` and counts alert windows in Redis under `namespace`.
    pub fn new(pool: PgPool, redis: ConnectionManager, namespace: impl Into<String>) -> Self {
        Self {
            pool,
            redis: Some(redis),
            namespace: namespace.into(),
            pending: TaskTracker::new(),
        }
    }

    /// Records without alert rules (for one-shot commands that hold no Redis connection).
    pub fn without_alerts(pool: PgPool) -> Self {
        Self {
            pool,
            redis: None,
            namespace: String::new(),
            pending: TaskTracker::new(),
        }
    }

    /// Records `event` off the caller's path (a spawned task): never fails or slows it.
    /// [`SecurityLog::drain`] waits for it at shutdown.
    pub fn spawn(&self, event: SecurityEvent) {
        let log = self.clone();
        self.pending.spawn(async move { log.record(event).await });
    }

    /// Waits up to `within` for the recordings [`SecurityLog::spawn`] started, so an event
    /// caused just before shutdown still reaches its row, log line and Sentry. True when all
    /// finished; otherwise how many did not is logged. Recording continues afterwards.
    pub async fn drain(&self, within: Duration) -> bool {
        self.pending.close();
        let finished = tokio::time::timeout(within, self.pending.wait())
            .await
            .is_ok();
        self.pending.reopen();
        if !finished {
            tracing::error!(
                unfinished = self.pending.len(),
                "security events still being recorded at shutdown"
            );
        }
        finished
    }

    /// Records `event` three ways (log line, row, metrics), then evaluates the alert rules and
    /// records the alert it raises, if any. Errors are logged and counted, never returned.
    pub async fn record(&self, event: SecurityEvent) {
        self.write(&event).await;
        if let Some(alert) = self.evaluate(&event).await {
            self.write(&alert).await;
        }
    }

    /// The alert `event` raises: `Some` exactly when it is the event that brings its window's
    /// count to a rule's threshold.
    async fn evaluate(&self, event: &SecurityEvent) -> Option<SecurityEvent> {
        let rule = RULES.iter().find(|r| r.kind == event.kind)?;
        let subject = rule.subject(event)?;
        let mut redis = self.redis.clone()?;
        let window = rule.window.as_secs().max(1);
        let index = event.occurred_at.unix_timestamp().max(0) as u64 / window;
        let key = format!(
            "{}:alerts:{}:{}:{}",
            self.namespace, rule.name, subject, index
        );
        let count: u64 = match COUNT
            .key(&key)
            .arg(window * 2)
            .invoke_async(&mut redis)
            .await
        {
            Ok(n) => n,
            Err(error) => {
                ::metrics::counter!("gatehouse_security_alert_failures_total").increment(1);
                tracing::warn!(target: "security", %error, rule = rule.name, "alert window not counted: Redis unavailable");
                return None;
            }
        };
        if count != rule.threshold {
            return None;
        }
        ::metrics::counter!("gatehouse_security_alerts_total", "rule" => rule.name).increment(1);
        let mut alert = SecurityEvent::new(EventType::SuspiciousActivity);
        alert.ip = event.ip;
        alert.user_id = event.user_id;
        alert.email = event.email.clone();
        alert.tenant_id = event.tenant_id;
        alert.request_id = event.request_id.clone();
        alert.details = json!({
            "rule": rule.name,
            "subject": subject,
            "trigger": event.kind.as_str(),
            "threshold": rule.threshold,
            "window_seconds": window,
            "window_start": time_text(
                OffsetDateTime::from_unix_timestamp((index * window) as i64)
                    .unwrap_or(event.occurred_at),
            ),
        });
        Some(alert)
    }

    async fn write(&self, event: &SecurityEvent) {
        let kind = event.kind.as_str();
        let ip = event.ip.map(|ip| ip.to_string());
        let tenant_id = event.tenant_id.map(|t| t.to_string());
        let user_id = event.user_id.map(|u| u.to_string());
        let time = time_text(event.occurred_at);
        // One field list for both levels; tracing needs the level at compile time.
        macro_rules! log_event {
            ($level:ident) => {
                tracing::$level!(
                    target: "security",
                    r#type = kind,
                    time = time.as_str(),
                    ip = ip.as_deref(),
                    user.id = user_id.as_deref(),
                    email = event.email.as_deref(),
                    tenant.id = tenant_id.as_deref(),
                    request.id = event.request_id.as_deref(),
                    details = %event.details,
                    "security event {kind}"
                )
            };
        }
        // ERROR is what reaches Sentry (see cli::telemetry): critical kinds only.
        if event.kind.is_critical() {
            log_event!(error);
        } else {
            log_event!(warn);
        }
        ::metrics::counter!("gatehouse_security_events_total", "type" => kind).increment(1);
        if let Some(name) = event.kind.counter() {
            ::metrics::counter!(name).increment(1);
        }
        let result = sqlx::query(
            "INSERT INTO security_events
                 (type, occurred_at, ip, user_id, email, tenant_id, request_id, details)
             VALUES ($1, $2, $3::inet, $4, $5, $6, $7, $8)",
        )
        .bind(kind)
        .bind(event.occurred_at)
        .bind(ip)
        .bind(event.user_id)
        .bind(event.email.as_deref())
        .bind(event.tenant_id)
        .bind(event.request_id.as_deref())
        .bind(&event.details)
        .execute(&self.pool)
        .await;
        if let Err(error) = result {
            ::metrics::counter!("gatehouse_security_event_insert_failures_total").increment(1);
            tracing::error!(target: "security", %error, r#type = kind, "failed to store security event");
        }
    }
}

fn time_text(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A stored event as the API reads it back (SPEC: `{id,type,occurred_at,ip,user_id,email,
/// tenant_id,details}`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StoredEvent {
    pub id: Uuid,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub kind: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub occurred_at: OffsetDateTime,
    pub ip: Option<String>,
    pub user_id: Option<Uuid>,
    pub email: Option<String>,
    pub tenant_id: Option<Uuid>,
    #[schema(value_type = Object)]
    pub details: Value,
}

/// Which events to read: newest first, optionally of one kind, since a time, and strictly
/// before a cursor (`(occurred_at, id)` of the last event of the previous page).
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub kind: Option<EventType>,
    pub since: Option<OffsetDateTime>,
    pub before: Option<(OffsetDateTime, Uuid)>,
    pub limit: u32,
}

/// Reads events matching `filter`, newest first (ties broken by id, descending), at most
/// `filter.limit` of them. Shared by the API and the operator dashboard.
pub async fn list(pool: &PgPool, filter: &EventFilter) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let (before_at, before_id) = filter.before.unzip();
    sqlx::query_as::<_, StoredEvent>(
        "SELECT id, type, occurred_at, host(ip) AS ip, user_id, email, tenant_id, details
           FROM security_events
          WHERE ($1::text IS NULL OR type = $1)
            AND ($2::timestamptz IS NULL OR occurred_at >= $2)
            AND ($3::timestamptz IS NULL OR (occurred_at, id) < ($3, $4::uuid))
          ORDER BY occurred_at DESC, id DESC
          LIMIT $5",
    )
    .bind(filter.kind.map(EventType::as_str))
    .bind(filter.since)
    .bind(before_at)
    .bind(before_id)
    .bind(i64::from(filter.limit))
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_parses_back_from_its_stored_name() {
        for kind in EventType::ALL {
            assert_eq!(EventType::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(EventType::parse("FAILED_LOGIN"), None);
    }

    #[test]
    fn each_alert_rule_watches_a_different_kind_and_never_an_alert() {
        for (i, rule) in RULES.iter().enumerate() {
            assert_ne!(rule.kind, EventType::SuspiciousActivity);
            assert!(RULES[i + 1..].iter().all(|other| other.kind != rule.kind));
        }
    }

    #[test]
    fn a_tenant_rule_falls_back_to_the_ip_then_to_any() {
        let rule = RULES[2];
        let mut event = SecurityEvent::new(EventType::InvalidWebhookSignature);
        assert_eq!(rule.subject(&event).as_deref(), Some("any"));
        event.ip = Some(IpAddr::from([10, 0, 0, 1]));
        assert_eq!(rule.subject(&event).as_deref(), Some("ip:10.0.0.1"));
        event.tenant_id = Some(Uuid::nil());
        assert_eq!(
            rule.subject(&event).as_deref(),
            Some("tenant:00000000-0000-0000-0000-000000000000")
        );
    }
}
