//! Security events: the one `SecurityEvent` type, the one recorder (`SecurityLog`) that writes
//! each event three ways — a JSON log line (target `security`), a row in `security_events`, and
//! metrics — and evaluates the SPEC's alert rules over windows counted in Redis, raising one
//! `suspicious_activity` event per rule, subject and window.
//!
//! Recording has a budget (SPEC "Hostile traffic"). Requests hand events to a bounded queue
//! ([`SecurityLog::spawn`], never awaited; a full queue drops the event, counted) drained by a
//! fixed number of writer tasks over the recorder's own small pool, never the request path's.
//! At most [`Budget::DEFAULT`] events of one (type, source IP) pair are stored per minute,
//! counted fleet-wide in Redis (one Lua script per event, which also counts the alert window);
//! later ones are counted (`gatehouse_security_events_suppressed_total`, one log line per pair
//! and window) and the pair's next stored event carries `details.suppressed`. Events without
//! an IP (worker-side) have no budget. With Redis down the budget is counted in process and
//! only alerting degrades (logged and counted); a failed insert is logged and counted
//! (`gatehouse_security_event_insert_failures_total`). Recording never fails the operation
//! that caused it.
//!
//! Sentry (the tracing integration sends ERROR lines, see `cli::telemetry`) gets at most one
//! event per (rule, subject, window): the alert's line is ERROR, the critical events it counts
//! log at WARN. Only while Redis cannot count does a critical event log at ERROR itself, the
//! first per (rule, subject, window) in the process.
//!
//! `details` is written by gatehouse's own call sites only, never copied from a request: it
//! holds reasons, scope names, limit names and ids — never a secret, token, password, signature
//! or message body.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use redis::Script;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use crate::security::net::client_key;

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
    /// An operator replaced a tenant secret (`tenants rotate-secret`).
    TenantSecretRotated,
    /// A user accepted an owner invitation and became a tenant's owner.
    InvitationAccepted,
    /// `users deactivate`: the user's tokens and sessions are refused from the next request.
    UserDeactivated,
    /// `users activate`.
    UserActivated,
    /// `users set-platform-role` granted, changed or removed a platform role.
    PlatformRoleChanged,
    /// `service-accounts create`: a producer credential exists (details: its tenants).
    ServiceAccountCreated,
    /// `service-accounts revoke`: the account's tokens are refused from the next request.
    ServiceAccountRevoked,
}

impl EventType {
    pub const ALL: [EventType; 16] = [
        Self::FailedLogin,
        Self::PermissionDenied,
        Self::InvalidWebhookSignature,
        Self::RateLimitExceeded,
        Self::SuspiciousActivity,
        Self::FourEyesViolation,
        Self::EncryptionError,
        Self::KeyRotationStarted,
        Self::KeyRotationCompleted,
        Self::TenantSecretRotated,
        Self::InvitationAccepted,
        Self::UserDeactivated,
        Self::UserActivated,
        Self::PlatformRoleChanged,
        Self::ServiceAccountCreated,
        Self::ServiceAccountRevoked,
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
            Self::TenantSecretRotated => "tenant_secret_rotated",
            Self::InvitationAccepted => "invitation_accepted",
            Self::UserDeactivated => "user_deactivated",
            Self::UserActivated => "user_activated",
            Self::PlatformRoleChanged => "platform_role_changed",
            Self::ServiceAccountCreated => "service_account_created",
            Self::ServiceAccountRevoked => "service_account_revoked",
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
    /// What the rule counts per.
    pub per: Subject,
}

/// What an alert rule counts events per. Subjects are existing tenants, users or IPs only —
/// never a value a client picked, such as the tenant id in a webhook's path for a tenant that
/// does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// The client IP (events without one are not counted).
    Ip,
    /// The event's tenant; an event naming none counts per user, and otherwise under the one
    /// shared `fallback` (all forgeries for unknown tenants are one subject).
    Tenant { fallback: &'static str },
}

impl AlertRule {
    /// The subject `event` counts against, if the rule can name one.
    fn subject(&self, event: &SecurityEvent) -> Option<String> {
        match self.per {
            Subject::Ip => event.ip.map(|ip| format!("ip:{}", client_key(ip))),
            Subject::Tenant { fallback } => Some(match (event.tenant_id, event.user_id) {
                (Some(tenant), _) => format!("tenant:{tenant}"),
                (None, Some(user)) => format!("user:{user}"),
                (None, None) => fallback.to_owned(),
            }),
        }
    }
}

/// The subject shared by forged webhooks for tenants that do not exist.
pub const UNKNOWN_TENANT: &str = "unknown-tenant";

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
        per: Subject::Tenant {
            fallback: UNKNOWN_TENANT,
        },
    },
    AlertRule {
        name: "four_eyes_violation",
        kind: EventType::FourEyesViolation,
        threshold: 1,
        window: Duration::from_secs(3600),
        per: Subject::Tenant {
            fallback: "no-tenant",
        },
    },
    AlertRule {
        name: "encryption_error",
        kind: EventType::EncryptionError,
        threshold: 1,
        window: Duration::from_secs(3600),
        per: Subject::Tenant {
            fallback: "no-tenant",
        },
    },
];

/// How many events of one (type, source IP) pair are stored per window; the rest are counted
/// and reported by the next stored event of the pair as `details.suppressed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub per_window: u64,
    /// Windows are fixed and aligned to the Unix epoch, picked by the event's `occurred_at`.
    pub window: Duration,
}

impl Budget {
    /// SPEC "Hostile traffic": the first 10 events of a pair per minute.
    pub const DEFAULT: Budget = Budget {
        per_window: 10,
        window: Duration::from_secs(60),
    };
}

/// Events waiting for a writer; past this, events are dropped and counted.
pub const QUEUE_CAPACITY: usize = 4096;
/// Writer tasks draining the queue.
pub const WRITERS: usize = 3;
/// Connections of the writers' own pool (never the request path's).
pub const POOL_CONNECTIONS: u32 = 2;
/// How long the suppressed count of a pair waits for its next stored event.
const SUPPRESSED_TTL_SECONDS: u64 = 86_400;
/// Pairs (and Sentry windows) tracked in process while Redis is unavailable.
const LOCAL_CAPACITY: usize = 10_000;
/// After a failed Redis call, budgets and alert windows are counted in process for this long.
const REDIS_BACKOFF_MS: i64 = 1000;
/// At most one "Redis unavailable" warning per this many seconds.
const WARN_EVERY_SECONDS: i64 = 10;

/// The pair's budget: INCR a per-window counter with EXPIRE; past the budget INCR the pair's
/// suppressed counter, within it GETDEL that counter into the stored event. Both keys carry the
/// pair's hash tag (`{events:{kind}:{ip}}`), so the script runs on a Redis Cluster; the alert
/// rule's window counter (another subject, another slot) is an `INCR` beside it in the same
/// pipeline — still one round trip per event.
/// KEYS: budget window, suppressed counter. ARGV: per-window budget, budget TTL, suppressed TTL.
/// Returns {stored (0/1), suppressed carried into this event, first suppression of the
/// window (0/1)}.
static BUDGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "#!lua
         local stored, carried, first = 1, 0, 0
         local limit = tonumber(ARGV[1])
         local n = redis.call('INCR', KEYS[1])
         if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
         if n > limit then
           stored = 0
           redis.call('INCR', KEYS[2])
           redis.call('EXPIRE', KEYS[2], ARGV[3])
           if n == limit + 1 then first = 1 end
         else
           carried = tonumber(redis.call('GETDEL', KEYS[2]) or 0)
         end
         return {stored, carried, first}",
    )
});

/// One pipeline: the pair's [`BUDGET`] (when it has one) and the alert window's `INCR` and
/// `EXPIRE … NX` (when a rule watches the event). Returns (stored, carried, first suppressed)
/// and the alert window's count.
async fn count_in_redis(
    redis: &mut crate::redis_conn::Renewing,
    budget: Option<(&str, &str, u64, u64)>,
    alert: Option<(&str, u64)>,
) -> Result<((u8, u64, u8), u64), redis::RedisError> {
    if redis.get().is_cluster() {
        return count_on_cluster(redis, budget, alert).await;
    }
    let mut pipe = redis::pipe();
    if let Some((budget_key, suppressed_key, limit, ttl)) = budget {
        pipe.cmd("EVALSHA")
            .arg(BUDGET.get_hash())
            .arg(2)
            .arg(budget_key)
            .arg(suppressed_key)
            .arg(limit)
            .arg(ttl)
            .arg(SUPPRESSED_TTL_SECONDS);
    }
    if let Some((alert_key, ttl)) = alert {
        pipe.cmd("INCR").arg(alert_key);
        pipe.cmd("EXPIRE")
            .arg(alert_key)
            .arg(ttl)
            .arg("NX")
            .ignore();
    }
    let mut answers: Vec<redis::Value> = match pipe.query_async(redis).await {
        // The script is not in this server's cache (a restart, a failover). The pipeline's
        // other commands ran regardless (a pipeline is not a transaction): run the budget
        // again on its own, which loads the script, and read the alert count the INCR left.
        Err(error)
            if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            let mut answers = Vec::new();
            if let Some((budget_key, suppressed_key, limit, ttl)) = budget {
                let value: redis::Value = BUDGET
                    .key(budget_key)
                    .key(suppressed_key)
                    .arg(limit)
                    .arg(ttl)
                    .arg(SUPPRESSED_TTL_SECONDS)
                    .invoke_async(redis)
                    .await?;
                answers.push(value);
            }
            if let Some((alert_key, _)) = alert {
                let value: redis::Value =
                    redis::cmd("GET").arg(alert_key).query_async(redis).await?;
                answers.push(value);
            }
            answers
        }
        other => other?,
    };
    let alert_count = match alert {
        Some(_) => redis::from_redis_value(answers.pop().unwrap_or(redis::Value::Nil))?,
        None => 0,
    };
    let budgeted = match budget {
        Some(_) => redis::from_redis_value(answers.pop().unwrap_or(redis::Value::Nil))?,
        None => (1, 0, 0),
    };
    Ok((budgeted, alert_count))
}

/// [`count_in_redis`] on a Redis Cluster, whose client refuses a pipeline across slots: the
/// budget script and the alert window's pipeline (one key) go out side by side, still one
/// round trip of latency.
async fn count_on_cluster(
    redis: &mut crate::redis_conn::Renewing,
    budget: Option<(&str, &str, u64, u64)>,
    alert: Option<(&str, u64)>,
) -> Result<((u8, u64, u8), u64), redis::RedisError> {
    let (mut for_budget, mut for_alert) = (redis.clone(), redis.clone());
    let budgeted = async move {
        match budget {
            Some((budget_key, suppressed_key, limit, ttl)) => {
                BUDGET
                    .key(budget_key)
                    .key(suppressed_key)
                    .arg(limit)
                    .arg(ttl)
                    .arg(SUPPRESSED_TTL_SECONDS)
                    .invoke_async(&mut for_budget)
                    .await
            }
            None => Ok((1, 0, 0)),
        }
    };
    let counted = async move {
        match alert {
            Some((alert_key, ttl)) => {
                let (count,): (u64,) = redis::pipe()
                    .cmd("INCR")
                    .arg(alert_key)
                    .cmd("EXPIRE")
                    .arg(alert_key)
                    .arg(ttl)
                    .arg("NX")
                    .ignore()
                    .query_async(&mut for_alert)
                    .await?;
                Ok::<u64, redis::RedisError>(count)
            }
            None => Ok(0),
        }
    };
    let (budgeted, counted) = tokio::join!(budgeted, counted);
    Ok((budgeted?, counted?))
}

/// What counting an event decided.
#[derive(Debug, Clone, Copy)]
struct Verdict {
    stored: bool,
    /// Events of the pair not stored since its last stored one (reported on this one).
    carried: u64,
    /// This is the pair's first suppressed event in its window (one log line per window).
    first_suppressed: bool,
    alert: AlertCount,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AlertCount {
    /// No alert rule watches this kind (or it names no subject).
    NoRule,
    /// The event's position in its rule's window for its subject.
    Counted(u64),
    /// Redis could not count it.
    Unavailable,
}

/// The in-process stand-in for Redis while it is unavailable: the budget per pair and the
/// first Sentry line per (rule, subject, window), both bounded.
#[derive(Debug, Default)]
struct Local {
    pairs: HashMap<(EventType, String), LocalPair>,
    sentry: HashMap<(&'static str, String), u64>,
}

#[derive(Debug, Clone, Copy)]
struct LocalPair {
    window: u64,
    count: u64,
    suppressed: u64,
}

impl Local {
    /// The budget decision for `pair` in `window`, counted in process.
    fn budget(&mut self, pair: (EventType, String), window: u64, per_window: u64) -> Verdict {
        if !self.pairs.contains_key(&pair) && self.pairs.len() >= LOCAL_CAPACITY {
            self.pairs.retain(|_, p| p.window >= window);
        }
        let suppressed_untracked = Verdict {
            stored: false,
            carried: 0,
            first_suppressed: false,
            alert: AlertCount::Unavailable,
        };
        if !self.pairs.contains_key(&pair) && self.pairs.len() >= LOCAL_CAPACITY {
            // More live pairs than the process tracks: bounded cost wins over storing.
            return suppressed_untracked;
        }
        let entry = self.pairs.entry(pair).or_insert(LocalPair {
            window,
            count: 0,
            suppressed: 0,
        });
        if entry.window != window {
            entry.window = window;
            entry.count = 0;
        }
        entry.count += 1;
        if entry.count > per_window {
            entry.suppressed += 1;
            Verdict {
                stored: false,
                carried: 0,
                first_suppressed: entry.count == per_window + 1,
                alert: AlertCount::Unavailable,
            }
        } else {
            Verdict {
                stored: true,
                carried: std::mem::take(&mut entry.suppressed),
                first_suppressed: false,
                alert: AlertCount::Unavailable,
            }
        }
    }

    /// True for the first event of `(rule, subject)` in `window` seen by this process.
    fn first_for_sentry(&mut self, rule: &AlertRule, subject: &str, window: u64) -> bool {
        let key = (rule.name, subject.to_owned());
        if !self.sentry.contains_key(&key) && self.sentry.len() >= LOCAL_CAPACITY {
            let now = OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
            self.sentry.retain(|(name, _), w| {
                RULES
                    .iter()
                    .find(|r| r.name == *name)
                    .is_some_and(|r| *w >= now / r.window.as_secs().max(1))
            });
            if self.sentry.len() >= LOCAL_CAPACITY {
                return false;
            }
        }
        match self.sentry.insert(key, window) {
            Some(previous) => previous != window,
            None => true,
        }
    }
}

/// Events queued and not yet recorded, and a wake-up for [`SecurityLog::drain`].
#[derive(Debug, Default)]
struct Pending {
    count: AtomicUsize,
    idle: Notify,
}

impl Pending {
    fn done(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// What the writers and [`SecurityLog::record`] share: where events go and how they are
/// counted.
#[derive(Clone)]
struct Recorder {
    /// The recorder's own small pool.
    pool: PgPool,
    /// Where budgets and alert windows are counted; `None` counts in process, without alerts.
    redis: Option<crate::redis_conn::Renewing>,
    namespace: String,
    budget: Budget,
    local: Arc<Mutex<Local>>,
    /// Unix second of the last "Redis unavailable" warning.
    warned_at: Arc<AtomicI64>,
    /// Unix second of the last "failed to store" error line (ERROR reaches Sentry).
    insert_failed_at: Arc<AtomicI64>,
    /// Unix milliseconds until which Redis is not asked (it just failed): the writers keep
    /// their pace through an outage instead of waiting on each reconnect.
    redis_down_until: Arc<AtomicI64>,
}

/// The one way to record a security event. Cheap to clone; hold one per process.
#[derive(Clone)]
pub struct SecurityLog {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: Recorder,
    queue: mpsc::Sender<SecurityEvent>,
    /// Taken by the writers when the first event is queued (they start lazily, on the runtime
    /// of the first caller).
    receiver: Mutex<Option<mpsc::Receiver<SecurityEvent>>>,
    capacity: usize,
    writers: usize,
    started: OnceLock<()>,
    pending: Arc<Pending>,
    /// Unix second of the last "queue full" warning.
    dropped_warned_at: AtomicI64,
}

impl std::fmt::Debug for SecurityLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityLog")
            .field("alerts", &self.inner.recorder.redis.is_some())
            .field("namespace", &self.inner.recorder.namespace)
            .field("budget", &self.inner.recorder.budget)
            .field("capacity", &self.inner.capacity)
            .field("writers", &self.inner.writers)
            .finish()
    }
}

/// The recorder's own pool to the database `pool` connects to: [`POOL_CONNECTIONS`]
/// connections, opened on first use, so a flood of events never takes a connection from the
/// caller's pool.
pub fn own_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(POOL_CONNECTIONS)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy_with((*pool.connect_options()).clone())
}

impl SecurityLog {
    /// Records into the database `pool` connects to (through a pool of its own, see
    /// [`own_pool`]) and counts budgets and alert windows in Redis under `namespace`.
    pub fn new(
        pool: PgPool,
        redis: impl Into<crate::redis_conn::Renewing>,
        namespace: impl Into<String>,
    ) -> Self {
        let redis = redis.into();
        Self::build(
            Recorder {
                pool: own_pool(&pool),
                redis: Some(redis),
                namespace: namespace.into(),
                budget: Budget::DEFAULT,
                local: Arc::default(),
                warned_at: Arc::default(),
                insert_failed_at: Arc::default(),
                redis_down_until: Arc::default(),
            },
            QUEUE_CAPACITY,
            WRITERS,
        )
    }

    /// Records without alert rules, budgets counted in process (for one-shot commands that
    /// hold no Redis connection).
    pub fn without_alerts(pool: PgPool) -> Self {
        Self::build(
            Recorder {
                pool: own_pool(&pool),
                redis: None,
                namespace: String::new(),
                budget: Budget::DEFAULT,
                local: Arc::default(),
                warned_at: Arc::default(),
                insert_failed_at: Arc::default(),
                redis_down_until: Arc::default(),
            },
            QUEUE_CAPACITY,
            WRITERS,
        )
    }

    fn build(recorder: Recorder, capacity: usize, writers: usize) -> Self {
        let (queue, receiver) = mpsc::channel(capacity.max(1));
        Self {
            inner: Arc::new(Inner {
                recorder,
                queue,
                receiver: Mutex::new(Some(receiver)),
                capacity: capacity.max(1),
                writers: writers.max(1),
                started: OnceLock::new(),
                pending: Arc::default(),
                dropped_warned_at: AtomicI64::new(0),
            }),
        }
    }

    /// The same log with a queue of `capacity` events and `writers` writer tasks. Call it
    /// before recording anything (events queued before are not carried over).
    pub fn with_queue(self, capacity: usize, writers: usize) -> Self {
        Self::build(self.inner.recorder.clone(), capacity, writers)
    }

    /// The same log with another per-pair budget (tests use short windows).
    pub fn with_budget(self, budget: Budget) -> Self {
        let mut recorder = self.inner.recorder.clone();
        recorder.budget = budget;
        Self::build(recorder, self.inner.capacity, self.inner.writers)
    }

    /// The same log writing through `pool` itself instead of a pool of its own.
    pub fn with_writer_pool(self, pool: PgPool) -> Self {
        let mut recorder = self.inner.recorder.clone();
        recorder.pool = pool;
        Self::build(recorder, self.inner.capacity, self.inner.writers)
    }

    /// Queues `event` for the writers and returns at once: never awaits, never fails the
    /// caller. A full queue drops the event, counted in
    /// `gatehouse_security_events_dropped_total{type}`. [`SecurityLog::drain`] waits for
    /// queued events at shutdown.
    pub fn spawn(&self, event: SecurityEvent) {
        self.start_writers();
        let kind = event.kind;
        let inner = &self.inner;
        inner.pending.count.fetch_add(1, Ordering::AcqRel);
        if inner.queue.try_send(event).is_err() {
            inner.pending.done();
            ::metrics::counter!("gatehouse_security_events_dropped_total", "type" => kind.as_str())
                .increment(1);
            if once_per(&inner.dropped_warned_at, WARN_EVERY_SECONDS) {
                tracing::warn!(
                    target: "security",
                    r#type = kind.as_str(),
                    capacity = inner.capacity,
                    "security event queue full: events dropped (counted in gatehouse_security_events_dropped_total)"
                );
            }
        }
    }

    fn start_writers(&self) {
        let inner = &self.inner;
        inner.started.get_or_init(|| {
            let Some(receiver) = inner.receiver.lock().ok().and_then(|mut r| r.take()) else {
                return;
            };
            let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
            for _ in 0..inner.writers {
                let receiver = receiver.clone();
                let recorder = inner.recorder.clone();
                let pending = inner.pending.clone();
                tokio::spawn(async move {
                    loop {
                        // The lock is held only while waiting for the next event.
                        let next = receiver.lock().await.recv().await;
                        let Some(event) = next else { break };
                        recorder.record(event).await;
                        pending.done();
                    }
                });
            }
        });
    }

    /// Waits up to `within` until every event queued so far is recorded, so an event caused
    /// just before shutdown still reaches its row, log line and Sentry. True when all
    /// finished; otherwise how many did not is logged. Recording continues afterwards.
    pub async fn drain(&self, within: Duration) -> bool {
        let pending = &self.inner.pending;
        let idle = async {
            loop {
                let notified = pending.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if pending.count.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let finished = tokio::time::timeout(within, idle).await.is_ok();
        if !finished {
            tracing::error!(
                unfinished = pending.count.load(Ordering::Acquire),
                "security events still being recorded at shutdown"
            );
        }
        finished
    }

    /// Records `event` now, awaited (jobs and one-shot commands; requests use
    /// [`SecurityLog::spawn`]): budget, log line, row, metrics, then the alert rules and the
    /// alert they raise, if any. Errors are logged and counted, never returned.
    pub async fn record(&self, event: SecurityEvent) {
        self.inner.recorder.record(event).await;
    }
}

/// True at most once per `seconds` across callers sharing `last`.
fn once_per(last: &AtomicI64, seconds: i64) -> bool {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let previous = last.load(Ordering::Relaxed);
    now - previous >= seconds
        && last
            .compare_exchange(previous, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

fn window_index(at: OffsetDateTime, window: Duration) -> u64 {
    at.unix_timestamp().max(0) as u64 / window.as_secs().max(1)
}

impl Recorder {
    async fn record(&self, mut event: SecurityEvent) {
        let kind = event.kind.as_str();
        let rule = RULES.iter().find(|r| r.kind == event.kind);
        let subject = rule.and_then(|r| r.subject(&event));
        // Alerts are already one per rule, subject and window; events without an IP
        // (worker-side) have no pair.
        let pair = match (event.kind, event.ip) {
            (EventType::SuspiciousActivity, _) | (_, None) => None,
            (_, Some(ip)) => Some(client_key(ip)),
        };
        let verdict = self
            .count(&event, pair.as_deref(), rule.zip(subject.as_deref()))
            .await;
        ::metrics::counter!("gatehouse_security_events_total", "type" => kind).increment(1);
        if let Some(name) = event.kind.counter() {
            ::metrics::counter!(name).increment(1);
        }
        if verdict.stored {
            if verdict.carried > 0 {
                match &mut event.details {
                    Value::Object(map) => {
                        map.insert("suppressed".into(), verdict.carried.into());
                    }
                    other => *other = json!({"suppressed": verdict.carried}),
                }
            }
            // Sentry gets one event per rule, subject and window: the alert, which names its
            // trigger. Only while Redis cannot count does the critical event itself go, the
            // first per (rule, subject, window) this process sees.
            let to_sentry = event.kind.is_critical()
                && match (verdict.alert, rule, subject.as_deref()) {
                    (AlertCount::Unavailable, Some(rule), Some(subject)) => {
                        let window = window_index(event.occurred_at, rule.window);
                        self.local
                            .lock()
                            .map(|mut l| l.first_for_sentry(rule, subject, window))
                            .unwrap_or(false)
                    }
                    (AlertCount::Counted(_), _, _) => false,
                    _ => true,
                };
            self.write(&event, to_sentry).await;
        } else {
            ::metrics::counter!("gatehouse_security_events_suppressed_total", "type" => kind)
                .increment(1);
            if verdict.first_suppressed {
                tracing::warn!(
                    target: "security",
                    r#type = kind,
                    ip = pair.as_deref(),
                    per_window = self.budget.per_window,
                    window_seconds = self.budget.window.as_secs(),
                    "security events of this type from this address are counted, not stored, until the window ends"
                );
            }
        }
        if let (AlertCount::Counted(n), Some(rule), Some(subject)) = (verdict.alert, rule, subject)
            && n == rule.threshold
        {
            let alert = alert_for(rule, subject, &event);
            ::metrics::counter!("gatehouse_security_alerts_total", "rule" => rule.name)
                .increment(1);
            self.write(&alert, true).await;
        }
    }

    /// Counts `event` against its pair's budget and its rule's window, in Redis when it
    /// answers, in process otherwise.
    async fn count(
        &self,
        event: &SecurityEvent,
        pair: Option<&str>,
        rule: Option<(&AlertRule, &str)>,
    ) -> Verdict {
        let budget_window = window_index(event.occurred_at, self.budget.window);
        let kind = event.kind.as_str();
        let now_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let redis = self
            .redis
            .clone()
            .filter(|_| now_ms >= self.redis_down_until.load(Ordering::Relaxed));
        if self.redis.is_some() && redis.is_none() && rule.is_some() {
            ::metrics::counter!("gatehouse_security_alert_failures_total").increment(1);
        }
        if let Some(mut redis) = redis {
            let ns = &self.namespace;
            // One hash tag per pair: its two keys in one slot.
            let pair_keys = pair.map(|ip| {
                (
                    format!("{ns}:{{events:{kind}:{ip}}}:budget:{budget_window}"),
                    format!("{ns}:{{events:{kind}:{ip}}}:suppressed"),
                )
            });
            let alert = rule.map(|(rule, subject)| {
                let window = rule.window.as_secs().max(1);
                let index = window_index(event.occurred_at, rule.window);
                (
                    format!("{ns}:alerts:{}:{subject}:{index}", rule.name),
                    window * 2,
                )
            });
            let budget_ttl = self.budget.window.as_secs().max(1) * 2;
            let limit = self.budget.per_window.max(1);
            let answer = if pair_keys.is_none() && alert.is_none() {
                Ok(((1, 0, 0), 0))
            } else {
                count_in_redis(
                    &mut redis,
                    pair_keys
                        .as_ref()
                        .map(|(b, s)| (b.as_str(), s.as_str(), limit, budget_ttl)),
                    alert.as_ref().map(|(key, ttl)| (key.as_str(), *ttl)),
                )
                .await
            };
            match answer {
                Ok(((stored, carried, first), alert)) => {
                    return Verdict {
                        stored: stored == 1,
                        carried,
                        first_suppressed: first == 1,
                        alert: if rule.is_some() {
                            AlertCount::Counted(alert)
                        } else {
                            AlertCount::NoRule
                        },
                    };
                }
                Err(error) => {
                    self.redis_down_until
                        .store(now_ms + REDIS_BACKOFF_MS, Ordering::Relaxed);
                    if rule.is_some() {
                        ::metrics::counter!("gatehouse_security_alert_failures_total").increment(1);
                    }
                    if once_per(&self.warned_at, WARN_EVERY_SECONDS) {
                        tracing::warn!(target: "security", %error, "security event budgets and alert windows counted in process: Redis unavailable");
                    }
                }
            }
        }
        let alert = if rule.is_some() {
            AlertCount::Unavailable
        } else {
            AlertCount::NoRule
        };
        let Some(ip) = pair else {
            return Verdict {
                stored: true,
                carried: 0,
                first_suppressed: false,
                alert,
            };
        };
        let verdict = match self.local.lock() {
            Ok(mut local) => local.budget(
                (event.kind, ip.to_owned()),
                budget_window,
                self.budget.per_window.max(1),
            ),
            // A poisoned lock: store (recording never fails).
            Err(_) => Verdict {
                stored: true,
                carried: 0,
                first_suppressed: false,
                alert,
            },
        };
        Verdict { alert, ..verdict }
    }

    async fn write(&self, event: &SecurityEvent, to_sentry: bool) {
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
        // ERROR is what reaches Sentry (see cli::telemetry).
        if to_sentry {
            log_event!(error);
        } else {
            log_event!(warn);
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
            if once_per(&self.insert_failed_at, WARN_EVERY_SECONDS) {
                tracing::error!(target: "security", %error, r#type = kind, "failed to store security events (counted in gatehouse_security_event_insert_failures_total)");
            }
        }
    }
}

/// The `suspicious_activity` event `rule` raises for `subject`, triggered by `event`.
fn alert_for(rule: &AlertRule, subject: String, event: &SecurityEvent) -> SecurityEvent {
    let window = rule.window.as_secs().max(1);
    let index = window_index(event.occurred_at, rule.window);
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
    alert
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
    fn a_tenant_rule_never_counts_per_ip_and_shares_one_subject_for_unknown_tenants() {
        let rule = RULES[2];
        let mut event = SecurityEvent::new(EventType::InvalidWebhookSignature);
        assert_eq!(rule.subject(&event).as_deref(), Some(UNKNOWN_TENANT));
        // Forgeries from any number of addresses for unknown tenants are one subject.
        event.ip = Some(IpAddr::from([10, 0, 0, 1]));
        assert_eq!(rule.subject(&event).as_deref(), Some(UNKNOWN_TENANT));
        event.user_id = Some(Uuid::nil());
        assert_eq!(
            rule.subject(&event).as_deref(),
            Some("user:00000000-0000-0000-0000-000000000000")
        );
        event.tenant_id = Some(Uuid::nil());
        assert_eq!(
            rule.subject(&event).as_deref(),
            Some("tenant:00000000-0000-0000-0000-000000000000")
        );
    }

    #[test]
    fn budgets_key_ipv4_whole_and_ipv6_by_its_64() {
        assert_eq!(client_key(IpAddr::from([203, 0, 113, 7])), "203.0.113.7");
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        assert_eq!(client_key(a), "2001:db8:1:2::/64");
        assert_eq!(client_key(a), client_key(b));
        // Per-IP alert rules count an IPv6 client by its /64 too: rotating addresses inside
        // one /64 is one subject, so one Sentry event per window.
        let rule = RULES
            .iter()
            .find(|r| r.name == "failed_logins_per_ip")
            .expect("rule");
        let mut event = SecurityEvent::new(EventType::FailedLogin);
        event.ip = Some(a);
        let first = rule.subject(&event);
        event.ip = Some(b);
        assert_eq!(rule.subject(&event), first);
        assert_eq!(first.as_deref(), Some("ip:2001:db8:1:2::/64"));
    }

    #[test]
    fn the_local_budget_stores_the_first_of_a_window_and_carries_the_rest() {
        let mut local = Local::default();
        let pair = (EventType::FailedLogin, "192.0.2.1".to_owned());
        let verdicts: Vec<Verdict> = (0..5).map(|_| local.budget(pair.clone(), 7, 2)).collect();
        assert_eq!(
            verdicts.iter().map(|v| v.stored).collect::<Vec<_>>(),
            [true, true, false, false, false]
        );
        assert!(verdicts[2].first_suppressed && !verdicts[3].first_suppressed);
        let next = local.budget(pair, 8, 2);
        assert!(next.stored);
        assert_eq!(next.carried, 3);
    }

    #[test]
    fn the_local_sentry_gate_lets_one_event_through_per_rule_subject_and_window() {
        let mut local = Local::default();
        let rule = &RULES[2];
        assert!(local.first_for_sentry(rule, "tenant:a", 5));
        assert!(!local.first_for_sentry(rule, "tenant:a", 5));
        assert!(local.first_for_sentry(rule, "tenant:b", 5));
        assert!(local.first_for_sentry(rule, "tenant:a", 6));
    }
}
