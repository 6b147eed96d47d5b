//! Typed configuration from the environment, validated completely before any I/O.
//!
//! [`Config::from_env`] reads every variable, checks every rule and reports
//! *all* problems at once, one `VARIABLE: rule` line each, never a value.
//! An empty variable counts as unset (optional variables take their default,
//! required ones are reported missing). Secrets are held as
//! [`SecretString`], so neither `Debug` nor logging can print them.

mod keys;
mod rate;
mod reader;
mod urls;

pub use keys::{check_keys, check_keys_from_env};
pub use rate::{Rate, RateError};

use std::fmt;
use std::time::Duration;

use gatehouse_jobs::spec::{QUEUE_SPECS, QueueSpec};
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::redis_conn::RedisTarget;
use crate::security::blind_index::BlindIndex;
use crate::security::keyring::Keyring;
use keys::{read_jwt_secret_key, read_keyring, read_previous_keys, read_secret_key};
use reader::{Lookup, Reader, env_lookup};
use urls::{check_url_scheme, is_sentry_dsn, parse_llm_url, parse_network, parse_public_base};

/// `true`/`false`, case-insensitive.
fn parse_bool(s: &str) -> Result<bool, String> {
    if s.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if s.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err("must be true or false".to_owned())
    }
}

/// Every environment variable gatehouse reads, in documentation order.
pub const VARIABLES: &[&str] = &[
    "DATABASE_URL",
    "REDIS_URL",
    "REDIS_CLUSTER",
    "REDIS_MIN_REPLICA_ACKS",
    "REDIS_REPLICA_ACK_TIMEOUT_MS",
    "DEBUG",
    "SECRET_KEY",
    "SECRET_KEY_PREVIOUS",
    "JWT_SECRET_KEY",
    "JWT_SECRET_KEY_PREVIOUS",
    "JWT_ISSUER",
    "JWT_AUDIENCE",
    "JWT_TTL_SECONDS",
    "ENCRYPTION_KEY",
    "ENCRYPTION_OLD_KEYS",
    "TRUSTED_PROXIES",
    "PUBLIC_BASE_URL",
    "PORT",
    "WORKER_CONCURRENCY",
    "SENTRY_DSN",
    "LLM_URL",
    "LLM_API_KEY",
    "LLM_MODEL",
    "LLM_TIMEOUT_MS",
    "RATE_LIMIT_LOGIN_IP",
    "RATE_LIMIT_LOGIN_EMAIL",
    "RATE_LIMIT_USER",
    "MAX_BODY_BYTES",
    "LLM_MIN_CONFIDENCE",
    "WORKER_GRACE_SECONDS",
    "WORKER_HEARTBEAT_SECONDS",
    "WORKER_MISSED_HEARTBEATS",
    "QUEUE_NAMESPACE",
    "TENANT_KEY_CACHE_SECONDS",
    "JOB_RETRY_BASE_MS_INBOUND_MESSAGE",
    "JOB_RETRY_CAP_MS_INBOUND_MESSAGE",
    "JOB_MAX_ATTEMPTS_INBOUND_MESSAGE",
    "JOB_RETRY_BASE_MS_SYNC_CATALOG",
    "JOB_RETRY_CAP_MS_SYNC_CATALOG",
    "JOB_MAX_ATTEMPTS_SYNC_CATALOG",
    "JOB_RETRY_BASE_MS_ROTATE_KEYS",
    "JOB_RETRY_CAP_MS_ROTATE_KEYS",
    "JOB_MAX_ATTEMPTS_ROTATE_KEYS",
    "QUEUE_SHARDS_INBOUND_MESSAGE",
    "QUEUE_SHARDS_SYNC_CATALOG",
    "QUEUE_SHARDS_ROTATE_KEYS",
    "QUEUE_ORDER",
    "TENANT_MAX_IN_FLIGHT_INBOUND_MESSAGE",
    "TENANT_MAX_IN_FLIGHT_SYNC_CATALOG",
    "TENANT_MAX_IN_FLIGHT_ROTATE_KEYS",
    "JOB_RETENTION_SECONDS",
    "STORE_TIMEOUT_MS",
    "WORKER_HEALTH_PORT",
    "METRICS_TOKEN",
    "KEY_ROTATION_BATCH_SIZE",
    "GROUP_COMMIT_MAX_JOBS",
    "KEY_ROTATION_APPROVAL_TTL_SECONDS",
    "RATE_LIMIT_UNAUTHENTICATED_IP",
    "HTTP_HEADER_TIMEOUT_SECONDS",
    "HTTP_MAX_CONNECTIONS",
    "STORE_ALLOWED_NETWORKS",
    "CATALOG_SYNC_DEADLINE_SECONDS",
    "PASSWORD_HASH_QUEUE",
    "SECURITY_EVENT_RETENTION_DAYS",
    "PROCESSED_JOB_RETENTION_DAYS",
    "OUTAGE_MAX_WAIT_SECONDS",
    "INVITE_TTL_SECONDS",
];

/// The key variables that `gatehouse keys check` validates.
pub const KEY_VARIABLES: &[&str] = &[
    "ENCRYPTION_KEY",
    "ENCRYPTION_OLD_KEYS",
    "JWT_SECRET_KEY",
    "JWT_SECRET_KEY_PREVIOUS",
    "SECRET_KEY",
    "SECRET_KEY_PREVIOUS",
];

/// `KEY_ROTATION_BATCH_SIZE`'s default (BENCHMARKS.md figure 6 measures the choice).
pub const DEFAULT_KEY_ROTATION_BATCH_SIZE: usize = 500;
/// `WORKER_CONCURRENCY`'s default: enough `inbound_message` jobs in flight for group commit to
/// form groups (BENCHMARKS.md figure 1: 4 in flight gave groups of under 2, slower than one
/// commit per job; 16 gave groups of about 8).
pub const DEFAULT_WORKER_CONCURRENCY: usize = 16;
/// `GROUP_COMMIT_MAX_JOBS`'s default (BENCHMARKS.md figure 1 measures the choice).
pub const DEFAULT_GROUP_COMMIT_MAX_JOBS: usize = 16;
/// Default `REDIS_URL`.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// The log filter when `RUST_LOG` is unset: INFO, apalis's own per-poll lines off (they repeat
/// what the worker's supervisor logs once per outage). The benchmarks' ingress servers run
/// with it too, so a line the hot path writes by default is part of figure 4.
pub const DEFAULT_LOG_FILTER: &str = "info,apalis_core=off";
/// Minimum length, in characters, of `SECRET_KEY` and `JWT_SECRET_KEY`.
pub const MIN_SECRET_CHARS: usize = 32;
/// Minimum number of distinct characters in `JWT_SECRET_KEY`.
pub const MIN_JWT_DISTINCT_CHARS: usize = 16;
/// How long the ingress remembers a webhook's `MessageSid` (and `POST /v1/jobs` an
/// idempotency key), so the same delivery never makes a second job: 7 days.
/// `PROCESSED_JOB_RETENTION_DAYS` must outlast it.
pub const WEBHOOK_DEDUPE_SECONDS: u64 = 7 * 24 * 3600;
/// Largest accepted `MAX_BODY_BYTES` (64 MiB).
pub const MAX_BODY_BYTES_LIMIT: usize = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------
// Problems
// ---------------------------------------------------------------------------

/// One violated rule: the variable (with an index for list entries, e.g.
/// `ENCRYPTION_OLD_KEYS[1]`) and the rule, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Variable name, e.g. `JWT_SECRET_KEY` or `TRUSTED_PROXIES[2]`.
    pub variable: String,
    /// The rule that failed, e.g. `must be at least 32 characters`.
    pub rule: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.variable, self.rule)
    }
}

/// Every configuration problem found. `Display` prints one `VARIABLE: rule`
/// line per problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// All problems, in documentation order of the variables.
    pub problems: Vec<Problem>,
}

impl ConfigError {
    /// Whether some problem concerns `variable` (or an entry of it).
    pub fn mentions(&self, variable: &str) -> bool {
        self.problems.iter().any(|p| {
            p.variable == variable
                || p.variable
                    .strip_prefix(variable)
                    .is_some_and(|rest| rest.starts_with('['))
        })
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------

/// The optional LLM classifier endpoint (OpenAI-compatible chat completions).
#[derive(Debug, Clone)]
pub struct LlmConfig {
    /// `LLM_URL`: base URL; requests go to `{LLM_URL}/chat/completions`.
    pub url: Url,
    /// `LLM_API_KEY`: sent as a bearer token when set.
    pub api_key: Option<SecretString>,
    /// `LLM_MODEL`, default `gpt-4o-mini`.
    pub model: String,
    /// `LLM_TIMEOUT_MS`, default 10 000 ms, 1..=120 000.
    pub timeout: Duration,
}

impl LlmConfig {
    /// `{LLM_URL}/chat/completions`, without a doubled slash.
    pub fn chat_completions_url(&self) -> String {
        format!(
            "{}/chat/completions",
            self.url.as_str().trim_end_matches('/')
        )
    }
}

/// How a queue's failed jobs are retried: exponential backoff with full jitter, the delay of
/// retry `n` (1-based) drawn uniformly from `0..=min(cap, base * 2^(n-1))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// `JOB_RETRY_BASE_MS_{QUEUE}`: the first retry's upper bound.
    pub base: Duration,
    /// `JOB_RETRY_CAP_MS_{QUEUE}`: no retry waits longer than this.
    pub cap: Duration,
    /// `JOB_MAX_ATTEMPTS_{QUEUE}`: runs (the first included) before a job is dead-lettered.
    pub max_attempts: u32,
}

/// The retry policies of every queue, one per row of the queue table
/// (`gatehouse_jobs::spec::QUEUE_SPECS`, which holds their defaults and variable names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicies {
    pub inbound_message: RetryPolicy,
    pub sync_catalog: RetryPolicy,
    pub rotate_keys: RetryPolicy,
}

impl RetryPolicy {
    /// The longest a job can take from its first run to its last retry: the sum of every
    /// retry's largest delay, `min(cap, base * 2^(n-1))` for n = 1 .. max_attempts - 1.
    pub fn longest_schedule(&self) -> Duration {
        let mut total = Duration::ZERO;
        for n in 1..self.max_attempts {
            let doubled = self
                .base
                .checked_mul(1u32.checked_shl(n - 1).unwrap_or(u32::MAX))
                .unwrap_or(self.cap);
            total = total.saturating_add(doubled.min(self.cap));
        }
        total
    }
}

impl RetryPolicies {
    /// The longest retry schedule of any queue (see [`RetryPolicy::longest_schedule`]).
    pub fn longest_schedule(&self) -> Duration {
        [self.inbound_message, self.sync_catalog, self.rotate_keys]
            .iter()
            .map(RetryPolicy::longest_schedule)
            .max()
            .unwrap_or_default()
    }

    /// The policy of a queue by its name (`inbound_message`, …); `None` for an unknown queue.
    pub fn for_queue(&self, queue: &str) -> Option<RetryPolicy> {
        let policies = [self.inbound_message, self.sync_catalog, self.rotate_keys];
        QUEUE_SPECS
            .iter()
            .position(|spec| spec.name == queue)
            .and_then(|i| policies.get(i).copied())
    }
}

/// The whole validated configuration. Build it with [`Config::from_env`] or
/// [`Config::from_vars`]. `Debug` never prints a secret.
#[derive(Debug, Clone)]
pub struct Config {
    /// `DATABASE_URL` (required): a `postgres://` or `postgresql://` URL.
    pub database_url: SecretString,
    /// `REDIS_URL`, default `redis://127.0.0.1:6379`: a `redis://` or `rediss://` URL; with
    /// `REDIS_CLUSTER=true` (default `false`), one or more comma-separated seed nodes of a
    /// Redis Cluster.
    pub redis_url: RedisTarget,
    /// `REDIS_MIN_REPLICA_ACKS`, default 0, 0..=16, and `REDIS_REPLICA_ACK_TIMEOUT_MS`, default
    /// 1000, 10..=10000: with n > 0 an enqueue is acknowledged (webhook 200, `POST /v1/jobs`
    /// 202, an outbox row marked sent) only once n replicas confirmed it within the timeout
    /// (Redis `WAIT`), else 503 — so a primary's death cannot lose an acknowledged job.
    pub replica_acks: Option<gatehouse_jobs::client::ReplicaAcks>,
    /// `DEBUG`, `true`/`false` (case-insensitive), default `false`. Only turns
    /// off the HTTPS redirect and HSTS (and allows an `http` `PUBLIC_BASE_URL`).
    pub debug: bool,
    /// `SECRET_KEY` (required, ≥ 32 characters): signs cookies, keys the blind indexes.
    pub secret_key: SecretString,
    /// `JWT_SECRET_KEY` (required, ≥ 32 characters, ≥ 16 distinct characters,
    /// different from `SECRET_KEY`).
    pub jwt_secret_key: SecretString,
    /// `SECRET_KEY_PREVIOUS` (optional, `SECRET_KEY`'s rules, distinct from every other
    /// key): while set, blind-index lookups also try it (`gatehouse keys reindex`).
    pub secret_key_previous: Option<SecretString>,
    /// `JWT_SECRET_KEY_PREVIOUS` (optional, `JWT_SECRET_KEY`'s rules, distinct from every
    /// other key): tokens signed with it stay valid until they expire; it signs nothing.
    pub jwt_secret_key_previous: Option<SecretString>,
    /// `JWT_ISSUER`, default `gatehouse`.
    pub jwt_issuer: String,
    /// `JWT_AUDIENCE`, default `gatehouse-api`.
    pub jwt_audience: String,
    /// `JWT_TTL_SECONDS`, default 900, 1..=86 400.
    pub jwt_ttl_seconds: u64,
    /// `ENCRYPTION_KEY` (current) + `ENCRYPTION_OLD_KEYS` (decrypt only).
    pub keyring: Keyring,
    /// Blind index keyed from `SECRET_KEY` (and `SECRET_KEY_PREVIOUS` for lookups).
    pub blind_index: BlindIndex,
    /// `TRUSTED_PROXIES`: comma-separated CIDRs (a bare IP is a /32 or /128),
    /// default none. Host bits are cleared (`10.1.2.3/8` → `10.0.0.0/8`).
    pub trusted_proxies: Vec<IpNet>,
    /// `PUBLIC_BASE_URL`: `https://host[:port]` (http only with `DEBUG=true`),
    /// no path, query, fragment or user info. See [`Config::public_base`].
    pub public_base_url: Option<Url>,
    /// `PORT`, default 8080, 1..=65 535.
    pub port: u16,
    /// `WORKER_CONCURRENCY`: jobs in flight per queue per process, default
    /// [`DEFAULT_WORKER_CONCURRENCY`], 1..=256.
    pub worker_concurrency: usize,
    /// `SENTRY_DSN` (optional): `https://PUBLIC_KEY@HOST/PROJECT_ID`.
    pub sentry_dsn: Option<SecretString>,
    /// `LLM_URL` and friends; `None` → the built-in rule-based classifier.
    pub llm: Option<LlmConfig>,
    /// `RATE_LIMIT_LOGIN_IP`, default `10/m`.
    pub rate_limit_login_ip: Rate,
    /// `RATE_LIMIT_LOGIN_EMAIL`, default `5/h`.
    pub rate_limit_login_email: Rate,
    /// `RATE_LIMIT_USER`, default `100/h`.
    pub rate_limit_user: Rate,
    /// `MAX_BODY_BYTES`, default 1 MiB, 1..=64 MiB.
    pub max_body_bytes: usize,
    /// `LLM_MIN_CONFIDENCE`, default 0.6, a finite number in [0, 1].
    pub llm_min_confidence: f64,
    /// `WORKER_GRACE_SECONDS`, default 30, 0..=3600: after SIGTERM/SIGINT, how
    /// long a worker waits for in-flight jobs before exiting (unfinished jobs
    /// are picked up again by another worker).
    pub worker_grace_seconds: u64,
    /// `WORKER_HEARTBEAT_SECONDS`, default 5, 1..=300: how often a worker
    /// process reports that it is alive.
    pub worker_heartbeat_seconds: u64,
    /// `WORKER_MISSED_HEARTBEATS`, default 3, 1..=100: after this many missed
    /// heartbeats a worker counts as dead and its jobs are taken over.
    pub worker_missed_heartbeats: usize,
    /// `QUEUE_NAMESPACE` (the variable's name kept for compatibility), default `gatehouse`,
    /// `[a-z0-9_-]{1,64}`: prefix of every gatehouse Redis key — queues (dedupe tombstones
    /// included), rate limits, dashboard sessions, alert windows, scope cache, tenant-key
    /// notices — so several deployments can share a Redis.
    pub redis_namespace: String,
    /// `TENANT_KEY_CACHE_SECONDS`, default 300, 1..=3600: how long the ingress
    /// keeps a tenant's webhook verification keys in memory, so signed
    /// webhooks keep flowing through a short PostgreSQL outage.
    pub tenant_key_cache_seconds: u64,
    /// Per-queue retry policies (`JOB_RETRY_BASE_MS_*`, `JOB_RETRY_CAP_MS_*`,
    /// `JOB_MAX_ATTEMPTS_*`). Defaults: inbound_message base 5 s, cap 10 min;
    /// sync_catalog base 60 s, cap 1 h; rotate_keys base 30 s, cap 30 min; 4 attempts
    /// (3 retries) each.
    pub retry: RetryPolicies,
    /// `QUEUE_NAMESPACE` and `QUEUE_SHARDS_{QUEUE}` (default 1, 1..=64: each queue's shard
    /// count; a job's shard comes from its tenant): where every queue's shards are.
    pub layout: gatehouse_jobs::keys::Layout,
    /// `QUEUE_ORDER`: `fair` (default: tenants with waiting jobs take turns, one job each) or
    /// `fifo` (one order for every tenant, as before tenant fairness).
    pub queue_order: QueueOrder,
    /// `TENANT_MAX_IN_FLIGHT_{QUEUE}` (1..=100 000; unset: no cap): the most jobs of one tenant
    /// in flight at once in that queue, across every worker process; `tenants set-limits`
    /// overrides it per tenant. Only the queues with a cap are here.
    pub tenant_max_in_flight: std::collections::BTreeMap<&'static str, u32>,
    /// `JOB_RETENTION_SECONDS`, default 3600, 1..=2592000: how long a finished job's
    /// payload and metadata stay in Redis before the vacuum removes them.
    pub job_retention_seconds: u64,
    /// `KEY_ROTATION_BATCH_SIZE`, default [`DEFAULT_KEY_ROTATION_BATCH_SIZE`], 1..=10 000:
    /// sealed values re-encrypted per transaction by the `rotate_keys` job.
    pub key_rotation_batch_size: usize,
    /// `GROUP_COMMIT_MAX_JOBS`, default [`DEFAULT_GROUP_COMMIT_MAX_JOBS`], 1..=1000: the most
    /// `inbound_message` jobs whose effects one statement commits together
    /// (`crate::worker::group_commit`); 1 commits every job alone.
    pub group_commit_max_jobs: usize,
    /// `KEY_ROTATION_APPROVAL_TTL_SECONDS`, default 86 400 (24 h), 60..=604 800: how long a
    /// key-rotation request waits for its second person before approving it answers 409.
    pub key_rotation_approval_ttl_seconds: u64,
    /// `STORE_TIMEOUT_MS`, default 10 000, 100..=120 000: timeout of each request to a
    /// tenant's store (catalog sync).
    pub store_timeout_ms: u64,
    /// `WORKER_HEALTH_PORT` (optional, 1..=65 535): where `gatehouse work` answers
    /// `GET /healthz` (200 while it reaches Redis and PostgreSQL, else 503). Unset: no
    /// listener.
    pub worker_health_port: Option<u16>,
    /// `METRICS_TOKEN` (optional, at least 32 characters): when set, `GET /metrics` (ingress and
    /// worker) requires `Authorization: Bearer` with it. Unset: `/metrics` is open (restrict it
    /// at the network).
    pub metrics_token: Option<SecretString>,
    /// `RATE_LIMIT_UNAUTHENTICATED_IP`, default `60/m`: refused unauthenticated requests
    /// (forged or unknown-tenant webhooks, missing/garbage/forged bearer tokens, dashboard
    /// session and CSRF refusals) per client IP (IPv6 by /64) before the answer turns to 429.
    pub rate_limit_unauthenticated_ip: Rate,
    /// `HTTP_HEADER_TIMEOUT_SECONDS`, default 10, 1..=300: a connection whose request headers
    /// are not complete this long after it opened (or after its previous response) is closed.
    pub http_header_timeout_seconds: u64,
    /// `HTTP_MAX_CONNECTIONS`, default 10 000, 1..=1 000 000: open connections per listener;
    /// past it new connections wait in the kernel's backlog until one closes.
    pub http_max_connections: usize,
    /// `STORE_ALLOWED_NETWORKS`: CIDRs a store URL may point into although the address is
    /// loopback, private, link-local, CGNAT, multicast or unspecified; default none.
    pub store_allowed_networks: Vec<IpNet>,
    /// `CATALOG_SYNC_DEADLINE_SECONDS`, default 600, 10..=86 400: the whole-job time budget of
    /// one catalog sync attempt (every page fetched and applied within it).
    pub catalog_sync_deadline_seconds: u64,
    /// `OUTAGE_MAX_WAIT_SECONDS`, default 86 400, 1..=2 592 000: how long a job may wait out
    /// outages (PostgreSQL, Redis, an open LLM or store circuit) without using attempts; past
    /// it, its failed attempts count again and it can reach the dead letters.
    pub outage_max_wait_seconds: u64,
    /// `PASSWORD_HASH_QUEUE`, default 64, 1..=100 000: password hashes (login, register)
    /// that may wait for a hashing thread; past it a login answers 503 at once.
    pub password_hash_queue: usize,
    /// `SECURITY_EVENT_RETENTION_DAYS`, default 90, 1..=36 500: older `security_events` rows
    /// are deleted by the workers.
    pub security_event_retention_days: u64,
    /// `PROCESSED_JOB_RETENTION_DAYS`, default 30, 1..=36 500, and longer than both the
    /// webhook dedupe window (7 days) and every queue's longest retry schedule: older
    /// `processed_jobs` rows (and finished `catalog_syncs`) are deleted by the workers.
    pub processed_job_retention_days: u64,
    /// `INVITE_TTL_SECONDS`, default 604 800 (7 days), 60..=2 592 000 (30 days): how long an
    /// owner invitation (`tenants create --owner-email`) can be accepted.
    pub invite_ttl_seconds: u64,
}

/// `QUEUE_ORDER`: how a queue orders its tenants' jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueOrder {
    /// Tenants with waiting jobs take turns, one job each; each tenant's jobs first in, first
    /// out.
    #[default]
    Fair,
    /// First in, first out across every tenant.
    Fifo,
}

impl QueueOrder {
    /// The value's spelling (`fair`, `fifo`), as the queue scripts read it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fair => "fair",
            Self::Fifo => "fifo",
        }
    }
}

impl std::str::FromStr for QueueOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fair" => Ok(Self::Fair),
            "fifo" => Ok(Self::Fifo),
            _ => Err("must be fair or fifo".to_owned()),
        }
    }
}

impl Config {
    /// `TENANT_MAX_IN_FLIGHT_{QUEUE}` of `queue`: its default cap per tenant (`None`: none).
    pub fn tenant_max_in_flight(&self, queue: &str) -> Option<u32> {
        self.tenant_max_in_flight.get(queue).copied()
    }

    /// Where every queue's shards are in Redis: `QUEUE_NAMESPACE` and `QUEUE_SHARDS_*`.
    pub fn layout(&self) -> &gatehouse_jobs::keys::Layout {
        &self.layout
    }

    /// The enqueue client this process's producers use: [`Config::layout`], sealing with the
    /// current `ENCRYPTION_KEY`, waiting for `REDIS_MIN_REPLICA_ACKS` replicas.
    pub fn queues(&self) -> gatehouse_jobs::client::Queues {
        let queues = gatehouse_jobs::client::Queues::with_layout(self.layout.clone())
            .sealing_with(self.keyring.current().clone());
        match self.replica_acks {
            Some(acks) => queues.acknowledged_by(acks),
            None => queues,
        }
    }

    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(env_lookup)
    }

    /// Reads and validates variables from `get` (the testable core of
    /// [`Config::from_env`]).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::from_lookup(|name| get(name).map_or(Lookup::Unset, Lookup::Value))
    }

    /// `PUBLIC_BASE_URL` normalized without the trailing slash, e.g.
    /// `https://gh.example.com` or `https://gh.example.com:8443`.
    pub fn public_base(&self) -> Option<&str> {
        self.public_base_url
            .as_ref()
            .map(|u| u.as_str().trim_end_matches('/'))
    }

    /// `worker_grace_seconds` as a [`Duration`].
    pub fn worker_grace(&self) -> Duration {
        Duration::from_secs(self.worker_grace_seconds)
    }

    /// `worker_heartbeat_seconds` as a [`Duration`].
    pub fn worker_heartbeat(&self) -> Duration {
        Duration::from_secs(self.worker_heartbeat_seconds)
    }

    /// `tenant_key_cache_seconds` as a [`Duration`].
    pub fn tenant_key_cache_ttl(&self) -> Duration {
        Duration::from_secs(self.tenant_key_cache_seconds)
    }

    fn from_lookup(get: impl Fn(&str) -> Lookup) -> Result<Self, ConfigError> {
        let mut r = Reader::new(get);

        let database_url = r.required_secret("DATABASE_URL");
        if let Some(url) = &database_url {
            check_url_scheme(
                &mut r,
                "DATABASE_URL",
                url.expose_secret(),
                &["postgres", "postgresql"],
                "must be a postgres:// or postgresql:// URL",
            );
        }

        let redis_cluster = r.parse("REDIS_CLUSTER", false, parse_bool);
        let redis_url = r
            .optional_secret("REDIS_URL")
            .unwrap_or_else(|| SecretString::from(DEFAULT_REDIS_URL));
        let redis_url = if redis_cluster {
            let seeds: Vec<SecretString> = redis_url
                .expose_secret()
                .split(',')
                .map(|seed| SecretString::from(seed.trim().to_owned()))
                .collect();
            for seed in &seeds {
                check_url_scheme(
                    &mut r,
                    "REDIS_URL",
                    seed.expose_secret(),
                    &["redis", "rediss"],
                    "must be one or more comma-separated redis:// or rediss:// URLs with a host \
                     (the cluster's seed nodes)",
                );
            }
            RedisTarget::cluster(seeds)
        } else {
            let rule = if redis_url.expose_secret().contains(',') {
                "must be one redis:// or rediss:// URL; a list of seed nodes needs REDIS_CLUSTER=true"
            } else {
                "must be a redis:// or rediss:// URL with a host"
            };
            check_url_scheme(
                &mut r,
                "REDIS_URL",
                redis_url.expose_secret(),
                &["redis", "rediss"],
                rule,
            );
            RedisTarget::single(redis_url)
        };

        let min_replica_acks = r.integer("REDIS_MIN_REPLICA_ACKS", 0u64, 0, 16);
        let replica_ack_timeout = r.integer("REDIS_REPLICA_ACK_TIMEOUT_MS", 1000u64, 10, 10_000);
        let replica_acks = (min_replica_acks > 0).then(|| gatehouse_jobs::client::ReplicaAcks {
            replicas: min_replica_acks,
            timeout: Duration::from_millis(replica_ack_timeout),
        });

        let debug = r.parse("DEBUG", false, parse_bool);

        let secret_key = read_secret_key(&mut r);
        let jwt_secret_key = read_jwt_secret_key(&mut r, secret_key.as_ref());
        let (secret_key_previous, jwt_secret_key_previous) =
            read_previous_keys(&mut r, secret_key.as_ref(), jwt_secret_key.as_ref());

        let jwt_issuer = r.string("JWT_ISSUER", "gatehouse");
        let jwt_audience = r.string("JWT_AUDIENCE", "gatehouse-api");
        let jwt_ttl_seconds = r.integer("JWT_TTL_SECONDS", 900u64, 1, 86_400);

        let keyring = read_keyring(&mut r);

        let trusted_proxies = r.list("TRUSTED_PROXIES", parse_network);

        let public_base_url = r.optional_parse("PUBLIC_BASE_URL", |s| parse_public_base(s, debug));

        let port = r.integer("PORT", 8080u16, 1, u16::MAX);
        let worker_concurrency =
            r.integer("WORKER_CONCURRENCY", DEFAULT_WORKER_CONCURRENCY, 1, 256);

        let sentry_dsn = r.optional_secret("SENTRY_DSN");
        if let Some(dsn) = &sentry_dsn
            && !is_sentry_dsn(dsn.expose_secret())
        {
            r.problem(
                "SENTRY_DSN",
                "must be a Sentry DSN: https://PUBLIC_KEY@HOST/PROJECT_ID",
            );
        }

        let llm_url = r.optional_parse("LLM_URL", parse_llm_url);
        let llm_api_key = r.optional_secret("LLM_API_KEY");
        let llm_model = r.string("LLM_MODEL", "gpt-4o-mini");
        let llm_timeout_ms = r.integer("LLM_TIMEOUT_MS", 10_000u64, 1, 120_000);
        let llm = llm_url.map(|url| LlmConfig {
            url,
            api_key: llm_api_key,
            model: llm_model,
            timeout: Duration::from_millis(llm_timeout_ms),
        });

        let rate_limit_login_ip = r.rate("RATE_LIMIT_LOGIN_IP", Rate::per_minute(10));
        let rate_limit_login_email = r.rate("RATE_LIMIT_LOGIN_EMAIL", Rate::per_hour(5));
        let rate_limit_user = r.rate("RATE_LIMIT_USER", Rate::per_hour(100));

        let max_body_bytes = r.integer("MAX_BODY_BYTES", 1_048_576usize, 1, MAX_BODY_BYTES_LIMIT);

        let llm_min_confidence =
            r.parse("LLM_MIN_CONFIDENCE", 0.6f64, |s| match s.parse::<f64>() {
                Ok(v) if v.is_finite() && (0.0..=1.0).contains(&v) => Ok(v),
                _ => Err("must be a number from 0 to 1".to_owned()),
            });

        let worker_grace_seconds = r.integer("WORKER_GRACE_SECONDS", 30u64, 0, 3600);
        let worker_heartbeat_seconds = r.integer("WORKER_HEARTBEAT_SECONDS", 5u64, 1, 300);
        let worker_missed_heartbeats = r.integer("WORKER_MISSED_HEARTBEATS", 3usize, 1, 100);
        let redis_namespace = r.parse("QUEUE_NAMESPACE", "gatehouse".to_owned(), |s| {
            let ok = (1..=64).contains(&s.len())
                && s.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if ok {
                Ok(s.to_owned())
            } else {
                Err("must be 1 to 64 characters of a-z, 0-9, _ and -".to_owned())
            }
        });
        let tenant_key_cache_seconds = r.integer("TENANT_KEY_CACHE_SECONDS", 300u64, 1, 3600);
        // One policy per row of the queue table, in its order.
        let [inbound_message, sync_catalog, rotate_keys] =
            QUEUE_SPECS.map(|spec| read_retry_policy(&mut r, &spec));
        let retry = RetryPolicies {
            inbound_message,
            sync_catalog,
            rotate_keys,
        };
        let layout = QUEUE_SPECS.iter().fold(
            gatehouse_jobs::keys::Layout::new(redis_namespace.clone()),
            |layout, spec| {
                let max = gatehouse_jobs::keys::MAX_SHARDS;
                let shards = r.integer(spec.shards_variable, 1u16, 1, max);
                layout.with_shards(spec.name, shards)
            },
        );
        let queue_order = r.parse("QUEUE_ORDER", QueueOrder::Fair, |s| s.parse());
        let tenant_max_in_flight = QUEUE_SPECS
            .iter()
            .filter_map(|spec| {
                let cap =
                    r.optional_parse(spec.max_in_flight_variable, |s| match s.parse::<u32>() {
                        Ok(cap)
                            if s.bytes().all(|b| b.is_ascii_digit())
                                && (1..=100_000).contains(&cap) =>
                        {
                            Ok(cap)
                        }
                        _ => Err("must be a whole number from 1 to 100000".to_owned()),
                    })?;
                Some((spec.name, cap))
            })
            .collect();
        let job_retention_seconds = r.integer("JOB_RETENTION_SECONDS", 3600u64, 1, 2_592_000);
        let store_timeout_ms = r.integer("STORE_TIMEOUT_MS", 10_000u64, 100, 120_000);
        let key_rotation_batch_size = r.integer(
            "KEY_ROTATION_BATCH_SIZE",
            DEFAULT_KEY_ROTATION_BATCH_SIZE,
            1,
            10_000,
        );
        let group_commit_max_jobs = r.integer(
            "GROUP_COMMIT_MAX_JOBS",
            DEFAULT_GROUP_COMMIT_MAX_JOBS,
            1,
            1000,
        );
        let key_rotation_approval_ttl_seconds = r.integer(
            "KEY_ROTATION_APPROVAL_TTL_SECONDS",
            86_400u64,
            60,
            7 * 86_400,
        );
        let worker_health_port =
            r.optional_parse("WORKER_HEALTH_PORT", |s| match s.parse::<u16>() {
                Ok(port) if port > 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
                _ => Err("must be a whole number from 1 to 65535".to_owned()),
            });

        let metrics_token = r.optional_secret("METRICS_TOKEN");
        if let Some(token) = &metrics_token {
            let t = token.expose_secret();
            if t.chars().count() < MIN_SECRET_CHARS || !t.bytes().all(|b| b.is_ascii_graphic()) {
                r.problem(
                    "METRICS_TOKEN",
                    "must be at least 32 visible ASCII characters (no spaces)",
                );
            }
        }

        let rate_limit_unauthenticated_ip =
            r.rate("RATE_LIMIT_UNAUTHENTICATED_IP", Rate::per_minute(60));
        let http_header_timeout_seconds = r.integer("HTTP_HEADER_TIMEOUT_SECONDS", 10u64, 1, 300);
        let http_max_connections = r.integer("HTTP_MAX_CONNECTIONS", 10_000usize, 1, 1_000_000);
        let store_allowed_networks = r.list("STORE_ALLOWED_NETWORKS", parse_network);
        let catalog_sync_deadline_seconds =
            r.integer("CATALOG_SYNC_DEADLINE_SECONDS", 600u64, 10, 86_400);
        let outage_max_wait_seconds = r.integer("OUTAGE_MAX_WAIT_SECONDS", 86_400u64, 1, 2_592_000);
        let password_hash_queue = r.integer("PASSWORD_HASH_QUEUE", 64usize, 1, 100_000);
        let security_event_retention_days =
            r.integer("SECURITY_EVENT_RETENTION_DAYS", 90u64, 1, 36_500);
        let processed_job_retention_days =
            r.integer("PROCESSED_JOB_RETENTION_DAYS", 30u64, 1, 36_500);
        let must_outlast = (retry.longest_schedule().as_secs() + outage_max_wait_seconds)
            .max(WEBHOOK_DEDUPE_SECONDS);
        if processed_job_retention_days.saturating_mul(86_400) <= must_outlast {
            r.problem(
                "PROCESSED_JOB_RETENTION_DAYS",
                format!(
                    "must be more than {} days: the webhook dedupe window (7 days) and the longest \
                     retry schedule (JOB_RETRY_*) plus OUTAGE_MAX_WAIT_SECONDS must end before a \
                     job's exactly-once marker goes",
                    must_outlast / 86_400
                ),
            );
        }

        let invite_ttl_seconds = r.integer("INVITE_TTL_SECONDS", 604_800u64, 60, 2_592_000);

        let problems = r.finish();
        match (database_url, secret_key, jwt_secret_key, keyring) {
            (Some(database_url), Some(secret_key), Some(jwt_secret_key), Some(keyring))
                if problems.is_empty() =>
            {
                let blind_index =
                    BlindIndex::with_previous(&secret_key, secret_key_previous.as_ref());
                Ok(Self {
                    database_url,
                    redis_url,
                    replica_acks,
                    layout,
                    queue_order,
                    tenant_max_in_flight,
                    debug,
                    secret_key,
                    jwt_secret_key,
                    secret_key_previous,
                    jwt_secret_key_previous,
                    jwt_issuer,
                    jwt_audience,
                    jwt_ttl_seconds,
                    keyring,
                    blind_index,
                    trusted_proxies,
                    public_base_url,
                    port,
                    worker_concurrency,
                    sentry_dsn,
                    llm,
                    rate_limit_login_ip,
                    rate_limit_login_email,
                    rate_limit_user,
                    max_body_bytes,
                    llm_min_confidence,
                    worker_grace_seconds,
                    worker_heartbeat_seconds,
                    worker_missed_heartbeats,
                    redis_namespace,
                    tenant_key_cache_seconds,
                    retry,
                    job_retention_seconds,
                    store_timeout_ms,
                    worker_health_port,
                    metrics_token,
                    key_rotation_batch_size,
                    group_commit_max_jobs,
                    key_rotation_approval_ttl_seconds,
                    rate_limit_unauthenticated_ip,
                    http_header_timeout_seconds,
                    http_max_connections,
                    store_allowed_networks,
                    catalog_sync_deadline_seconds,
                    outage_max_wait_seconds,
                    password_hash_queue,
                    security_event_retention_days,
                    processed_job_retention_days,
                    invite_ttl_seconds,
                })
            }
            _ => Err(ConfigError { problems }),
        }
    }
}

// ---------------------------------------------------------------------------
// Retry policies
// ---------------------------------------------------------------------------

/// One queue's retry policy from its three variables (its row of the queue table gives their
/// names and defaults); a cap below the base is a problem named by the cap's variable.
fn read_retry_policy<F: Fn(&str) -> Lookup>(r: &mut Reader<F>, spec: &QueueSpec) -> RetryPolicy {
    let (vars, defaults) = (spec.variables, spec.retry);
    let (base_var, cap_var) = (vars.base_ms, vars.cap_ms);
    let base = r.integer(base_var, defaults.base_ms, 1, 86_400_000);
    let cap = r.integer(cap_var, defaults.cap_ms, 1, 604_800_000);
    let max_attempts = r.integer(vars.max_attempts, defaults.max_attempts, 1, 100);
    if cap < base {
        r.problem(cap_var, format!("must not be below {base_var}"));
    }
    RetryPolicy {
        base: Duration::from_millis(base),
        cap: Duration::from_millis(cap),
        max_attempts,
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const SECRET_KEY: &str = "sk-0123456789abcdefghijklmnopqrstuvwxyz";
    const JWT_SECRET_KEY: &str = "jwt-ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210";
    /// bytes 0..32
    const ENCRYPTION_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    /// bytes 32..64
    const OLD_KEY_1: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    /// bytes 64..96
    const OLD_KEY_2: &str = "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8=";
    const DATABASE_URL: &str = "postgres://gh:db-password-xyz@db.internal:5432/gatehouse";

    fn minimal() -> HashMap<&'static str, String> {
        HashMap::from([
            ("DATABASE_URL", DATABASE_URL.to_owned()),
            ("SECRET_KEY", SECRET_KEY.to_owned()),
            ("JWT_SECRET_KEY", JWT_SECRET_KEY.to_owned()),
            ("ENCRYPTION_KEY", ENCRYPTION_KEY.to_owned()),
        ])
    }

    fn with(pairs: &[(&'static str, &str)]) -> HashMap<&'static str, String> {
        let mut vars = minimal();
        for (k, v) in pairs {
            vars.insert(k, (*v).to_owned());
        }
        vars
    }

    fn load(vars: &HashMap<&'static str, String>) -> Result<Config, ConfigError> {
        Config::from_vars(|name| vars.get(name).cloned())
    }

    fn problems(vars: &HashMap<&'static str, String>) -> ConfigError {
        match load(vars) {
            Ok(_) => panic!("configuration unexpectedly valid"),
            Err(err) => err,
        }
    }

    /// Asserts the configuration fails, with exactly one problem, on `variable`.
    fn fails_on(pairs: &[(&'static str, &str)], variable: &str) -> Problem {
        let err = problems(&with(pairs));
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].variable, variable, "{err}");
        err.problems[0].clone()
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn a_minimal_set_parses_with_the_documented_defaults() {
        let cfg = load(&minimal()).unwrap();
        assert_eq!(cfg.database_url.expose_secret(), DATABASE_URL);
        assert_eq!(
            cfg.redis_url.nodes()[0].expose_secret(),
            "redis://127.0.0.1:6379"
        );
        assert!(!cfg.debug);
        assert_eq!(cfg.jwt_issuer, "gatehouse");
        assert_eq!(cfg.jwt_audience, "gatehouse-api");
        assert_eq!(cfg.jwt_ttl_seconds, 900);
        assert_eq!(cfg.keyring.key_ids().len(), 1);
        assert_eq!(cfg.keyring.current_id().to_string(), "630dcd2966c43366");
        assert!(cfg.trusted_proxies.is_empty());
        assert!(cfg.public_base_url.is_none());
        assert_eq!(cfg.public_base(), None);
        assert_eq!(cfg.port, 8080);
        assert_eq!(cfg.worker_concurrency, DEFAULT_WORKER_CONCURRENCY);
        assert_eq!(cfg.group_commit_max_jobs, DEFAULT_GROUP_COMMIT_MAX_JOBS);
        assert!(cfg.sentry_dsn.is_none());
        assert!(cfg.llm.is_none());
        assert_eq!(cfg.rate_limit_login_ip, Rate::per_minute(10));
        assert_eq!(cfg.rate_limit_login_email, Rate::per_hour(5));
        assert_eq!(cfg.rate_limit_user, Rate::per_hour(100));
        assert_eq!(cfg.rate_limit_login_ip.to_string(), "10/m");
        assert_eq!(cfg.rate_limit_login_email.to_string(), "5/h");
        assert_eq!(cfg.rate_limit_user.to_string(), "100/h");
        assert_eq!(cfg.max_body_bytes, 1_048_576);
        assert!((cfg.llm_min_confidence - 0.6).abs() < f64::EPSILON);
        assert_eq!(cfg.worker_grace_seconds, 30);
        assert_eq!(cfg.worker_heartbeat_seconds, 5);
        assert_eq!(cfg.worker_missed_heartbeats, 3);
        assert_eq!(cfg.redis_namespace, "gatehouse");
        assert_eq!(cfg.tenant_key_cache_seconds, 300);
        assert_eq!(
            cfg.retry.sync_catalog,
            RetryPolicy {
                base: Duration::from_secs(60),
                cap: Duration::from_secs(3600),
                max_attempts: 4
            }
        );
        assert_eq!(cfg.retry.inbound_message.max_attempts, 4);
        assert_eq!(cfg.retry.rotate_keys.max_attempts, 4);
        assert_eq!(cfg.job_retention_seconds, 3600);
        assert_eq!(cfg.store_timeout_ms, 10_000);
        assert_eq!(cfg.rate_limit_unauthenticated_ip.to_string(), "60/m");
        assert_eq!(cfg.http_header_timeout_seconds, 10);
        assert_eq!(cfg.http_max_connections, 10_000);
        assert!(cfg.store_allowed_networks.is_empty());
        assert_eq!(cfg.catalog_sync_deadline_seconds, 600);
        assert_eq!(cfg.outage_max_wait_seconds, 86_400);
        assert_eq!(cfg.password_hash_queue, 64);
        assert_eq!(cfg.security_event_retention_days, 90);
        assert_eq!(cfg.processed_job_retention_days, 30);
        assert_eq!(cfg.invite_ttl_seconds, 604_800);
    }

    #[test]
    fn invite_ttl_seconds_is_a_bounded_number_of_seconds() {
        for bad in ["0", "59", "2592001", "7d", "-1"] {
            fails_on(&[("INVITE_TTL_SECONDS", bad)], "INVITE_TTL_SECONDS");
        }
        let cfg = load(&with(&[("INVITE_TTL_SECONDS", "3600")])).unwrap();
        assert_eq!(cfg.invite_ttl_seconds, 3600);
    }

    #[test]
    fn hostile_traffic_settings_are_validated_and_named() {
        fails_on(
            &[("RATE_LIMIT_UNAUTHENTICATED_IP", "0/m")],
            "RATE_LIMIT_UNAUTHENTICATED_IP",
        );
        fails_on(
            &[("HTTP_HEADER_TIMEOUT_SECONDS", "0")],
            "HTTP_HEADER_TIMEOUT_SECONDS",
        );
        fails_on(&[("HTTP_MAX_CONNECTIONS", "ten")], "HTTP_MAX_CONNECTIONS");
        fails_on(
            &[("STORE_ALLOWED_NETWORKS", "127.0.0.0/8,nope")],
            "STORE_ALLOWED_NETWORKS[1]",
        );
        fails_on(
            &[("CATALOG_SYNC_DEADLINE_SECONDS", "1")],
            "CATALOG_SYNC_DEADLINE_SECONDS",
        );
        fails_on(&[("PASSWORD_HASH_QUEUE", "0")], "PASSWORD_HASH_QUEUE");
        fails_on(
            &[("SECURITY_EVENT_RETENTION_DAYS", "0")],
            "SECURITY_EVENT_RETENTION_DAYS",
        );
        let cfg = load(&with(&[(
            "STORE_ALLOWED_NETWORKS",
            "127.0.0.1, 10.1.2.3/8, ::1",
        )]))
        .unwrap();
        assert_eq!(
            cfg.store_allowed_networks,
            vec![
                "127.0.0.1/32".parse::<IpNet>().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
                "::1/128".parse().unwrap()
            ]
        );
    }

    #[test]
    fn processed_jobs_must_outlast_the_dedupe_window_and_the_longest_retry_schedule() {
        let p = fails_on(
            &[("PROCESSED_JOB_RETENTION_DAYS", "7")],
            "PROCESSED_JOB_RETENTION_DAYS",
        );
        assert!(p.rule.contains("dedupe"), "{p}");
        assert!(load(&with(&[("PROCESSED_JOB_RETENTION_DAYS", "8")])).is_ok());
        // 100 attempts capped at 7 days each: about 690 days of retries.
        let long = [
            ("JOB_MAX_ATTEMPTS_SYNC_CATALOG", "100"),
            ("JOB_RETRY_CAP_MS_SYNC_CATALOG", "604800000"),
        ];
        fails_on(&long, "PROCESSED_JOB_RETENTION_DAYS");
        let mut longer = long.to_vec();
        longer.push(("PROCESSED_JOB_RETENTION_DAYS", "700"));
        assert!(load(&with(&longer)).is_ok());
    }

    #[test]
    fn the_longest_retry_schedule_sums_each_capped_delay() {
        let policy = RetryPolicy {
            base: Duration::from_secs(5),
            cap: Duration::from_secs(12),
            max_attempts: 4,
        };
        // retries 1, 2, 3: 5 s, 10 s, min(12, 20) = 12 s
        assert_eq!(policy.longest_schedule(), Duration::from_secs(27));
        let one = RetryPolicy {
            max_attempts: 1,
            ..policy
        };
        assert_eq!(one.longest_schedule(), Duration::ZERO);
    }

    #[test]
    fn each_queue_reads_its_own_row_of_the_queue_table() {
        let cfg = load(&with(&[])).expect("valid");
        for spec in QUEUE_SPECS {
            assert_eq!(
                cfg.retry.for_queue(spec.name),
                Some(RetryPolicy {
                    base: Duration::from_millis(spec.retry.base_ms),
                    cap: Duration::from_millis(spec.retry.cap_ms),
                    max_attempts: spec.retry.max_attempts,
                }),
                "{}",
                spec.name
            );
        }
    }

    #[test]
    fn retry_settings_are_validated_per_queue_and_named() {
        let p = fails_on(
            &[("JOB_MAX_ATTEMPTS_SYNC_CATALOG", "0")],
            "JOB_MAX_ATTEMPTS_SYNC_CATALOG",
        );
        assert!(p.rule.contains("1 to 100"), "{p}");
        fails_on(
            &[("JOB_RETRY_BASE_MS_INBOUND_MESSAGE", "soon")],
            "JOB_RETRY_BASE_MS_INBOUND_MESSAGE",
        );
        let p = fails_on(
            &[
                ("JOB_RETRY_BASE_MS_ROTATE_KEYS", "5000"),
                ("JOB_RETRY_CAP_MS_ROTATE_KEYS", "10"),
            ],
            "JOB_RETRY_CAP_MS_ROTATE_KEYS",
        );
        assert!(p.rule.contains("JOB_RETRY_BASE_MS_ROTATE_KEYS"), "{p}");
        fails_on(&[("JOB_RETENTION_SECONDS", "0")], "JOB_RETENTION_SECONDS");
        fails_on(&[("STORE_TIMEOUT_MS", "-1")], "STORE_TIMEOUT_MS");
        fails_on(
            &[("KEY_ROTATION_BATCH_SIZE", "0")],
            "KEY_ROTATION_BATCH_SIZE",
        );
        fails_on(
            &[("KEY_ROTATION_BATCH_SIZE", "10001")],
            "KEY_ROTATION_BATCH_SIZE",
        );
        fails_on(&[("GROUP_COMMIT_MAX_JOBS", "0")], "GROUP_COMMIT_MAX_JOBS");
        fails_on(
            &[("GROUP_COMMIT_MAX_JOBS", "1001")],
            "GROUP_COMMIT_MAX_JOBS",
        );
        fails_on(
            &[("KEY_ROTATION_APPROVAL_TTL_SECONDS", "59")],
            "KEY_ROTATION_APPROVAL_TTL_SECONDS",
        );
        fails_on(
            &[("KEY_ROTATION_APPROVAL_TTL_SECONDS", "1d")],
            "KEY_ROTATION_APPROVAL_TTL_SECONDS",
        );
        let cfg = load(&with(&[
            ("JOB_RETRY_BASE_MS_SYNC_CATALOG", "100"),
            ("JOB_RETRY_CAP_MS_SYNC_CATALOG", "1000"),
            ("JOB_MAX_ATTEMPTS_SYNC_CATALOG", "2"),
        ]))
        .unwrap();
        assert_eq!(
            cfg.retry.for_queue("sync_catalog"),
            Some(RetryPolicy {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(1),
                max_attempts: 2
            })
        );
        assert_eq!(cfg.retry.for_queue("nope"), None);
    }

    #[test]
    fn a_valid_full_set_parses() {
        let vars = with(&[
            ("REDIS_URL", "rediss://:redis-pass@cache.internal:6380/0"),
            ("DEBUG", "FALSE"),
            ("JWT_ISSUER", "https://auth.example.com"),
            ("JWT_AUDIENCE", "gh"),
            ("JWT_TTL_SECONDS", "3600"),
            ("ENCRYPTION_OLD_KEYS", &format!("{OLD_KEY_1}, {OLD_KEY_2}")),
            (
                "TRUSTED_PROXIES",
                "10.0.0.0/8, 192.0.2.7,2001:db8::/32, ::1",
            ),
            ("PUBLIC_BASE_URL", "https://gh.example.com:8443/"),
            ("PORT", "9000"),
            ("WORKER_CONCURRENCY", "16"),
            (
                "SENTRY_DSN",
                "https://abcdef0123456789@o1.ingest.sentry.io/42",
            ),
            ("LLM_URL", "https://api.openai.com/v1/"),
            ("LLM_API_KEY", "sk-llm-api-key-value"),
            ("LLM_MODEL", "gpt-4o"),
            ("LLM_TIMEOUT_MS", "2500"),
            ("RATE_LIMIT_LOGIN_IP", "20/s"),
            ("RATE_LIMIT_LOGIN_EMAIL", "3/d"),
            ("RATE_LIMIT_USER", "1000/h"),
            ("MAX_BODY_BYTES", "2048"),
            ("LLM_MIN_CONFIDENCE", "0.75"),
            ("WORKER_GRACE_SECONDS", "60"),
            ("WORKER_HEARTBEAT_SECONDS", "2"),
            ("WORKER_MISSED_HEARTBEATS", "5"),
            ("QUEUE_NAMESPACE", "gh-prod_1"),
            ("TENANT_KEY_CACHE_SECONDS", "120"),
        ]);
        let cfg = load(&vars).unwrap();
        assert_eq!(cfg.keyring.key_ids().len(), 3);
        assert_eq!(cfg.trusted_proxies.len(), 4);
        assert_eq!(cfg.trusted_proxies[1].to_string(), "192.0.2.7/32");
        assert_eq!(cfg.trusted_proxies[3].to_string(), "::1/128");
        assert_eq!(cfg.public_base(), Some("https://gh.example.com:8443"));
        assert_eq!(cfg.port, 9000);
        assert_eq!(cfg.worker_concurrency, 16);
        assert!(cfg.sentry_dsn.is_some());
        let llm = cfg.llm.as_ref().unwrap();
        assert_eq!(
            llm.chat_completions_url(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(llm.model, "gpt-4o");
        assert_eq!(llm.timeout, Duration::from_millis(2500));
        assert!(llm.api_key.is_some());
        assert_eq!(cfg.rate_limit_login_ip.to_string(), "20/s");
        assert_eq!(
            cfg.rate_limit_login_email.period,
            Duration::from_secs(86_400)
        );
        assert_eq!(cfg.rate_limit_user.count, 1000);
        assert_eq!(cfg.max_body_bytes, 2048);
        assert!((cfg.llm_min_confidence - 0.75).abs() < f64::EPSILON);
        assert_eq!(cfg.worker_grace(), Duration::from_secs(60));
        assert_eq!(cfg.worker_heartbeat(), Duration::from_secs(2));
        assert_eq!(cfg.worker_missed_heartbeats, 5);
        assert_eq!(cfg.redis_namespace, "gh-prod_1");
        assert_eq!(cfg.tenant_key_cache_ttl(), Duration::from_secs(120));
        assert_eq!(cfg.jwt_ttl_seconds, 3600);
    }

    #[test]
    fn missing_required_variables_are_each_named() {
        let err = Config::from_vars(|_| None).err().unwrap();
        let named: Vec<&str> = err.problems.iter().map(|p| p.variable.as_str()).collect();
        assert_eq!(
            named,
            [
                "DATABASE_URL",
                "SECRET_KEY",
                "JWT_SECRET_KEY",
                "ENCRYPTION_KEY"
            ]
        );
        assert!(err.problems.iter().all(|p| p.rule == "is required"));
        assert_eq!(
            err.to_string(),
            "DATABASE_URL: is required\nSECRET_KEY: is required\n\
             JWT_SECRET_KEY: is required\nENCRYPTION_KEY: is required"
        );
    }

    #[test]
    fn an_empty_required_variable_counts_as_missing() {
        let p = fails_on(&[("SECRET_KEY", "")], "SECRET_KEY");
        assert_eq!(p.rule, "is required");
    }

    #[test]
    fn an_empty_optional_variable_takes_its_default() {
        let cfg = load(&with(&[("PORT", ""), ("DEBUG", ""), ("LLM_URL", "")])).unwrap();
        assert_eq!(cfg.port, 8080);
        assert!(!cfg.debug);
        assert!(cfg.llm.is_none());
    }

    #[test]
    fn a_short_secret_key_is_rejected() {
        let short = "s".repeat(10) + "0123456789abcdefghij"; // 30 chars
        let p = fails_on(&[("SECRET_KEY", &short)], "SECRET_KEY");
        assert!(p.rule.contains("32"));
    }

    #[test]
    fn a_short_jwt_secret_key_is_rejected() {
        let p = fails_on(
            &[("JWT_SECRET_KEY", "0123456789abcdefghijKLMNOPQ")],
            "JWT_SECRET_KEY",
        );
        assert!(p.rule.contains("32"));
    }

    #[test]
    fn a_jwt_secret_key_equal_to_secret_key_is_rejected() {
        let p = fails_on(&[("JWT_SECRET_KEY", SECRET_KEY)], "JWT_SECRET_KEY");
        assert!(p.rule.contains("SECRET_KEY"));
    }

    #[test]
    fn a_jwt_secret_key_of_one_repeated_character_is_rejected() {
        let p = fails_on(&[("JWT_SECRET_KEY", &"a".repeat(64))], "JWT_SECRET_KEY");
        assert!(p.rule.contains("low-entropy"));
    }

    #[test]
    fn a_jwt_secret_key_with_fewer_than_16_distinct_characters_is_rejected() {
        let fifteen = "abcdefghijklmno".repeat(3); // 45 chars, 15 distinct
        let p = fails_on(&[("JWT_SECRET_KEY", &fifteen)], "JWT_SECRET_KEY");
        assert!(p.rule.contains("16 distinct"));
        let sixteen = "abcdefghijklmnop".repeat(2);
        assert!(load(&with(&[("JWT_SECRET_KEY", &sixteen)])).is_ok());
    }

    #[test]
    fn a_jwt_secret_key_failing_two_rules_reports_both() {
        let err = problems(&with(&[("JWT_SECRET_KEY", "aaaa")]));
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.problems.iter().all(|p| p.variable == "JWT_SECRET_KEY"));
    }

    #[test]
    fn an_encryption_key_of_the_wrong_length_is_rejected() {
        let p = fails_on(&[("ENCRYPTION_KEY", &b64(&[7u8; 16]))], "ENCRYPTION_KEY");
        assert!(p.rule.contains("exactly 32 bytes"), "{}", p.rule);
    }

    #[test]
    fn an_all_zero_encryption_key_is_rejected() {
        let p = fails_on(&[("ENCRYPTION_KEY", &b64(&[0u8; 32]))], "ENCRYPTION_KEY");
        assert!(p.rule.contains("zero"), "{}", p.rule);
    }

    #[test]
    fn a_low_entropy_encryption_key_is_rejected() {
        let cycling: Vec<u8> = (0..32u8).map(|i| i % 8).collect();
        let p = fails_on(&[("ENCRYPTION_KEY", &b64(&cycling))], "ENCRYPTION_KEY");
        assert!(p.rule.contains("distinct"), "{}", p.rule);
    }

    #[test]
    fn an_encryption_key_that_is_not_base64_is_rejected() {
        let p = fails_on(
            &[("ENCRYPTION_KEY", "this is not base64 at all!!")],
            "ENCRYPTION_KEY",
        );
        assert!(p.rule.contains("base64"), "{}", p.rule);
    }

    #[test]
    fn a_bad_encryption_old_keys_entry_is_reported_with_its_index() {
        let list = format!("{OLD_KEY_1},{}", b64(&[0u8; 32]));
        let p = fails_on(&[("ENCRYPTION_OLD_KEYS", &list)], "ENCRYPTION_OLD_KEYS[1]");
        assert!(p.rule.contains("zero"));
        let err = problems(&with(&[("ENCRYPTION_OLD_KEYS", &list)]));
        assert_eq!(
            err.to_string(),
            format!("ENCRYPTION_OLD_KEYS[1]: {}", p.rule)
        );
    }

    #[test]
    fn an_old_key_equal_to_the_current_key_is_rejected() {
        let list = format!("{OLD_KEY_1},{ENCRYPTION_KEY}");
        let p = fails_on(&[("ENCRYPTION_OLD_KEYS", &list)], "ENCRYPTION_OLD_KEYS[1]");
        assert!(p.rule.contains("ENCRYPTION_KEY"));
    }

    #[test]
    fn a_repeated_old_key_is_rejected() {
        let list = format!("{OLD_KEY_1},{OLD_KEY_2},{OLD_KEY_1}");
        let p = fails_on(&[("ENCRYPTION_OLD_KEYS", &list)], "ENCRYPTION_OLD_KEYS[2]");
        assert!(p.rule.contains("index 0"));
    }

    #[test]
    fn an_empty_old_keys_entry_is_rejected() {
        let list = format!("{OLD_KEY_1},");
        fails_on(&[("ENCRYPTION_OLD_KEYS", &list)], "ENCRYPTION_OLD_KEYS[1]");
    }

    #[test]
    fn a_malformed_debug_is_rejected() {
        for bad in ["1", "0", "yes", "on", "truee"] {
            fails_on(&[("DEBUG", bad)], "DEBUG");
        }
        assert!(load(&with(&[("DEBUG", "True")])).unwrap().debug);
        assert!(!load(&with(&[("DEBUG", "false")])).unwrap().debug);
    }

    #[test]
    fn a_malformed_port_is_rejected() {
        for bad in ["http", "0", "65536", "-1", "80.5", "8 080"] {
            fails_on(&[("PORT", bad)], "PORT");
        }
    }

    #[test]
    fn malformed_rate_strings_are_rejected() {
        for bad in [
            "10", "x/m", "0/m", "10/w", "10/", "/m", "-1/m", "1.5/m", "10/M", "10/min",
        ] {
            for var in [
                "RATE_LIMIT_LOGIN_IP",
                "RATE_LIMIT_LOGIN_EMAIL",
                "RATE_LIMIT_USER",
            ] {
                fails_on(&[(var, bad)], var);
            }
        }
    }

    #[test]
    fn malformed_trusted_proxies_are_rejected_with_their_index() {
        fails_on(
            &[("TRUSTED_PROXIES", "10.0.0.0/8,10.0.0.0/33")],
            "TRUSTED_PROXIES[1]",
        );
        fails_on(
            &[("TRUSTED_PROXIES", "proxy.internal")],
            "TRUSTED_PROXIES[0]",
        );
        fails_on(&[("TRUSTED_PROXIES", "300.1.1.1")], "TRUSTED_PROXIES[0]");
        fails_on(&[("TRUSTED_PROXIES", "10.0.0.1,")], "TRUSTED_PROXIES[1]");
    }

    #[test]
    fn trusted_proxies_accept_bare_ips_and_clear_host_bits() {
        let cfg = load(&with(&[(
            "TRUSTED_PROXIES",
            "10.1.2.3/8,192.0.2.1,2001:db8::1",
        )]))
        .unwrap();
        let shown: Vec<String> = cfg
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.0.2.1/32", "2001:db8::1/128"]);
    }

    #[test]
    fn a_malformed_llm_min_confidence_is_rejected() {
        for bad in ["NaN", "1.5", "-0.1", "inf", "high"] {
            fails_on(&[("LLM_MIN_CONFIDENCE", bad)], "LLM_MIN_CONFIDENCE");
        }
        for good in ["0", "1", "0.5"] {
            assert!(load(&with(&[("LLM_MIN_CONFIDENCE", good)])).is_ok());
        }
    }

    #[test]
    fn a_malformed_max_body_bytes_is_rejected() {
        for bad in ["0", "1MiB", "67108865", "-5"] {
            fails_on(&[("MAX_BODY_BYTES", bad)], "MAX_BODY_BYTES");
        }
        assert_eq!(
            load(&with(&[("MAX_BODY_BYTES", "67108864")]))
                .unwrap()
                .max_body_bytes,
            MAX_BODY_BYTES_LIMIT
        );
    }

    #[test]
    fn a_malformed_llm_url_is_rejected() {
        for bad in [
            "not a url",
            "ftp://llm.internal",
            "llm.internal:8000",
            "https://user:pw@llm.internal",
            "https://llm.internal/v1?x=1",
        ] {
            fails_on(&[("LLM_URL", bad)], "LLM_URL");
        }
    }

    #[test]
    fn llm_settings_are_validated_even_without_llm_url() {
        fails_on(&[("LLM_TIMEOUT_MS", "0")], "LLM_TIMEOUT_MS");
        fails_on(&[("LLM_TIMEOUT_MS", "120001")], "LLM_TIMEOUT_MS");
    }

    #[test]
    fn llm_defaults_apply_when_llm_url_is_set() {
        let cfg = load(&with(&[("LLM_URL", "http://llm.internal:8000")])).unwrap();
        let llm = cfg.llm.unwrap();
        assert_eq!(llm.model, "gpt-4o-mini");
        assert_eq!(llm.timeout, Duration::from_millis(10_000));
        assert!(llm.api_key.is_none());
        assert_eq!(
            llm.chat_completions_url(),
            "http://llm.internal:8000/chat/completions"
        );
    }

    #[test]
    fn a_public_base_url_with_a_path_is_rejected() {
        let p = fails_on(
            &[("PUBLIC_BASE_URL", "https://gh.example.com/twilio")],
            "PUBLIC_BASE_URL",
        );
        assert!(p.rule.contains("path"));
    }

    #[test]
    fn a_public_base_url_with_http_is_rejected_when_debug_is_false() {
        let p = fails_on(
            &[("PUBLIC_BASE_URL", "http://gh.example.com")],
            "PUBLIC_BASE_URL",
        );
        assert!(p.rule.contains("https"));
        let cfg = load(&with(&[
            ("PUBLIC_BASE_URL", "http://localhost:8080"),
            ("DEBUG", "true"),
        ]))
        .unwrap();
        assert_eq!(cfg.public_base(), Some("http://localhost:8080"));
    }

    #[test]
    fn a_public_base_url_with_query_fragment_user_info_or_other_scheme_is_rejected() {
        for bad in [
            "https://gh.example.com/?a=1",
            "https://gh.example.com/#top",
            "https://user@gh.example.com",
            "wss://gh.example.com",
            "gh.example.com",
        ] {
            fails_on(&[("PUBLIC_BASE_URL", bad)], "PUBLIC_BASE_URL");
        }
    }

    #[test]
    fn a_public_base_url_is_stored_without_trailing_slash_or_default_port() {
        let cfg = load(&with(&[("PUBLIC_BASE_URL", "https://GH.example.com:443/")])).unwrap();
        assert_eq!(cfg.public_base(), Some("https://gh.example.com"));
    }

    #[test]
    fn redis_cluster_takes_seed_nodes_and_a_list_needs_it() {
        let cfg = load(&minimal()).unwrap();
        assert!(!cfg.redis_url.is_cluster());
        let seeds = "redis://10.0.0.1:7000, redis://10.0.0.2:7000";
        let cfg = load(&with(&[("REDIS_CLUSTER", "true"), ("REDIS_URL", seeds)])).unwrap();
        assert!(cfg.redis_url.is_cluster());
        assert_eq!(cfg.redis_url.nodes().len(), 2);
        assert_eq!(
            cfg.redis_url.nodes()[1].expose_secret(),
            "redis://10.0.0.2:7000"
        );
        let problem = fails_on(&[("REDIS_URL", seeds)], "REDIS_URL");
        assert!(
            problem.rule.contains("REDIS_CLUSTER=true"),
            "{}",
            problem.rule
        );
        fails_on(
            &[
                ("REDIS_CLUSTER", "true"),
                ("REDIS_URL", "redis://a:1,http://b:2"),
            ],
            "REDIS_URL",
        );
        fails_on(&[("REDIS_CLUSTER", "yes")], "REDIS_CLUSTER");
        // The target's Debug names no URL (they may hold passwords).
        let cfg = load(&with(&[
            ("REDIS_CLUSTER", "true"),
            ("REDIS_URL", "redis://:hunter2-pass@a:1"),
        ]))
        .unwrap();
        assert!(!format!("{:?}", cfg.redis_url).contains("hunter2"));
    }

    #[test]
    fn replica_acknowledgements_are_off_by_default_and_bounded() {
        assert!(load(&minimal()).unwrap().replica_acks.is_none());
        let cfg = load(&with(&[
            ("REDIS_MIN_REPLICA_ACKS", "2"),
            ("REDIS_REPLICA_ACK_TIMEOUT_MS", "250"),
        ]))
        .unwrap();
        let acks = cfg.replica_acks.expect("asked for");
        assert_eq!(acks.replicas, 2);
        assert_eq!(acks.timeout, Duration::from_millis(250));
        assert_eq!(cfg.queues().replica_acks(), Some(acks));
        fails_on(
            &[("REDIS_MIN_REPLICA_ACKS", "-1")],
            "REDIS_MIN_REPLICA_ACKS",
        );
        fails_on(
            &[("REDIS_REPLICA_ACK_TIMEOUT_MS", "0")],
            "REDIS_REPLICA_ACK_TIMEOUT_MS",
        );
    }

    #[test]
    fn a_malformed_redis_url_is_rejected() {
        for bad in ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis://"] {
            fails_on(&[("REDIS_URL", bad)], "REDIS_URL");
        }
    }

    #[test]
    fn a_malformed_database_url_is_rejected() {
        fails_on(&[("DATABASE_URL", "mysql://db/gatehouse")], "DATABASE_URL");
        fails_on(&[("DATABASE_URL", "db.internal")], "DATABASE_URL");
        assert!(
            load(&with(&[(
                "DATABASE_URL",
                "postgresql:///gatehouse?host=/run/postgresql"
            )]))
            .is_ok()
        );
    }

    #[test]
    fn a_malformed_sentry_dsn_is_rejected() {
        for bad in [
            "not a dsn",
            "https://o1.ingest.sentry.io/42",
            "https://key@o1.ingest.sentry.io/",
            "ftp://key@o1.ingest.sentry.io/42",
        ] {
            fails_on(&[("SENTRY_DSN", bad)], "SENTRY_DSN");
        }
    }

    #[test]
    fn malformed_numbers_and_names_are_rejected() {
        fails_on(&[("JWT_TTL_SECONDS", "0")], "JWT_TTL_SECONDS");
        fails_on(&[("JWT_TTL_SECONDS", "86401")], "JWT_TTL_SECONDS");
        fails_on(&[("WORKER_CONCURRENCY", "0")], "WORKER_CONCURRENCY");
        fails_on(&[("WORKER_CONCURRENCY", "257")], "WORKER_CONCURRENCY");
        fails_on(&[("WORKER_GRACE_SECONDS", "3601")], "WORKER_GRACE_SECONDS");
        fails_on(
            &[("WORKER_HEARTBEAT_SECONDS", "0")],
            "WORKER_HEARTBEAT_SECONDS",
        );
        fails_on(
            &[("WORKER_MISSED_HEARTBEATS", "0")],
            "WORKER_MISSED_HEARTBEATS",
        );
        fails_on(
            &[("TENANT_KEY_CACHE_SECONDS", "0")],
            "TENANT_KEY_CACHE_SECONDS",
        );
        fails_on(&[("QUEUE_NAMESPACE", "Gatehouse")], "QUEUE_NAMESPACE");
        fails_on(&[("QUEUE_NAMESPACE", &"a".repeat(65))], "QUEUE_NAMESPACE");
        fails_on(&[("QUEUE_NAMESPACE", "gh:prod")], "QUEUE_NAMESPACE");
        fails_on(&[("JWT_ISSUER", "gate\u{7}house")], "JWT_ISSUER");
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let vars = HashMap::from([
            ("SECRET_KEY", "short".to_owned()),
            ("JWT_SECRET_KEY", "a".repeat(40)),
            ("ENCRYPTION_KEY", b64(&[0u8; 32])),
            ("ENCRYPTION_OLD_KEYS", "nope".to_owned()),
            ("DEBUG", "yes".to_owned()),
            ("PORT", "99999".to_owned()),
            ("RATE_LIMIT_USER", "10/w".to_owned()),
            ("TRUSTED_PROXIES", "10.0.0.0/99".to_owned()),
            ("LLM_MIN_CONFIDENCE", "NaN".to_owned()),
            ("MAX_BODY_BYTES", "0".to_owned()),
            ("LLM_URL", "nope".to_owned()),
            ("PUBLIC_BASE_URL", "https://gh.example.com/path".to_owned()),
        ]);
        let err = problems(&vars);
        let named: Vec<&str> = err.problems.iter().map(|p| p.variable.as_str()).collect();
        assert_eq!(
            named,
            [
                "DATABASE_URL",
                "DEBUG",
                "SECRET_KEY",
                "JWT_SECRET_KEY",
                "ENCRYPTION_KEY",
                "ENCRYPTION_OLD_KEYS[0]",
                "TRUSTED_PROXIES[0]",
                "PUBLIC_BASE_URL",
                "PORT",
                "LLM_URL",
                "RATE_LIMIT_USER",
                "MAX_BODY_BYTES",
                "LLM_MIN_CONFIDENCE",
            ]
        );
        assert_eq!(err.to_string().lines().count(), named.len());
        assert!(err.mentions("ENCRYPTION_OLD_KEYS") && err.mentions("PORT"));
        assert!(!err.mentions("REDIS_URL"));
    }

    #[test]
    fn error_display_never_contains_a_secret_value() {
        let short_secret = "Secret-Value-Short-12345";
        let repeated_jwt = "Q".repeat(48);
        let bad_key = b64(&[0x5au8; 32]);
        let bad_old = "TooShortKeyValue123=";
        let bad_db = "mysql://root:Db-Pass-Word-9@db/x";
        let bad_redis = "http://:Redis-Pass-Word-9@cache:6379";
        let bad_dsn = "Sentry-Dsn-Value-Not-A-Url";
        let vars = HashMap::from([
            ("DATABASE_URL", bad_db.to_owned()),
            ("REDIS_URL", bad_redis.to_owned()),
            ("SECRET_KEY", short_secret.to_owned()),
            ("JWT_SECRET_KEY", repeated_jwt.clone()),
            ("ENCRYPTION_KEY", bad_key.clone()),
            ("ENCRYPTION_OLD_KEYS", format!("{bad_old},{ENCRYPTION_KEY}")),
            ("SENTRY_DSN", bad_dsn.to_owned()),
        ]);
        let err = problems(&vars);
        let shown = format!("{err}\n{err:?}");
        for secret in [
            short_secret,
            repeated_jwt.as_str(),
            bad_key.as_str(),
            bad_old,
            ENCRYPTION_KEY,
            "Db-Pass-Word-9",
            "Redis-Pass-Word-9",
            bad_dsn,
        ] {
            assert!(
                !shown.contains(secret),
                "error output leaks {secret}: {shown}"
            );
        }
        // JWT equal to SECRET_KEY: the value appears nowhere either.
        let err = problems(&with(&[("JWT_SECRET_KEY", SECRET_KEY)]));
        assert!(!format!("{err}{err:?}").contains(SECRET_KEY));
    }

    #[test]
    fn config_debug_never_contains_a_secret_value() {
        let vars = with(&[
            ("REDIS_URL", "redis://:redis-pass-value@cache:6379"),
            ("ENCRYPTION_OLD_KEYS", OLD_KEY_1),
            (
                "SENTRY_DSN",
                "https://sentrypublickey123@o1.ingest.sentry.io/42",
            ),
            ("LLM_URL", "https://llm.internal/v1"),
            ("LLM_API_KEY", "llm-api-key-value-123"),
        ]);
        let cfg = load(&vars).unwrap();
        let dbg = format!("{cfg:?}\n{cfg:#?}");
        for secret in [
            DATABASE_URL,
            "db-password-xyz",
            "redis-pass-value",
            SECRET_KEY,
            JWT_SECRET_KEY,
            ENCRYPTION_KEY,
            OLD_KEY_1,
            &hex::encode((0u8..32).collect::<Vec<_>>()),
            "sentrypublickey123",
            "llm-api-key-value-123",
        ] {
            assert!(!dbg.contains(secret), "Debug leaks {secret}");
        }
        assert!(dbg.contains("630dcd2966c43366"));
    }

    #[test]
    fn check_keys_validates_only_the_four_key_variables() {
        let vars = HashMap::from([
            ("SECRET_KEY", SECRET_KEY.to_owned()),
            ("JWT_SECRET_KEY", JWT_SECRET_KEY.to_owned()),
            ("ENCRYPTION_KEY", ENCRYPTION_KEY.to_owned()),
            ("ENCRYPTION_OLD_KEYS", OLD_KEY_1.to_owned()),
            ("PORT", "not-a-port".to_owned()),
        ]);
        assert!(check_keys(|n| vars.get(n).cloned()).is_ok());

        let err = check_keys(|_| None).unwrap_err();
        let mut named: Vec<&str> = err.problems.iter().map(|p| p.variable.as_str()).collect();
        named.sort_unstable();
        assert_eq!(named, ["ENCRYPTION_KEY", "JWT_SECRET_KEY", "SECRET_KEY"]);

        let vars = HashMap::from([
            ("SECRET_KEY", SECRET_KEY.to_owned()),
            ("JWT_SECRET_KEY", SECRET_KEY.to_owned()),
            ("ENCRYPTION_KEY", ENCRYPTION_KEY.to_owned()),
            ("ENCRYPTION_OLD_KEYS", format!("{OLD_KEY_1},x")),
        ]);
        let err = check_keys(|n| vars.get(n).cloned()).unwrap_err();
        let named: Vec<&str> = err.problems.iter().map(|p| p.variable.as_str()).collect();
        assert_eq!(named, ["JWT_SECRET_KEY", "ENCRYPTION_OLD_KEYS[1]"]);
    }

    #[test]
    fn the_blind_index_is_keyed_from_secret_key() {
        let a = load(&minimal()).unwrap();
        let b = load(&with(&[(
            "SECRET_KEY",
            "another-secret-key-with-32-chars-or-more",
        )]))
        .unwrap();
        let expected =
            crate::security::blind_index::BlindIndex::new(&SecretString::from(SECRET_KEY));
        assert_eq!(
            a.blind_index.compute("messages.from_number", b"+1555"),
            expected.compute("messages.from_number", b"+1555")
        );
        assert_ne!(
            a.blind_index.compute("messages.from_number", b"+1555"),
            b.blind_index.compute("messages.from_number", b"+1555")
        );
    }

    #[test]
    fn a_short_or_spaced_metrics_token_is_rejected_and_a_long_one_kept() {
        for bad in ["short", "a token with spaces in it that is long enough"] {
            let problem = fails_on(&[("METRICS_TOKEN", bad)], "METRICS_TOKEN");
            assert!(!problem.to_string().contains(bad));
        }
        let cfg = load(&with(&[(
            "METRICS_TOKEN",
            "prometheus-scrape-token-0123456789abcdef",
        )]))
        .expect("valid");
        assert!(cfg.metrics_token.is_some());
    }

    #[test]
    fn every_documented_variable_is_read() {
        use std::cell::RefCell;
        let seen = RefCell::new(Vec::<String>::new());
        let _ = Config::from_vars(|name| {
            seen.borrow_mut().push(name.to_owned());
            None
        });
        let seen = seen.into_inner();
        for var in VARIABLES {
            assert!(seen.iter().any(|s| s == var), "{var} is never read");
        }
        assert_eq!(seen.len(), VARIABLES.len(), "a variable is read twice");
    }

    // -- SECRET_KEY_PREVIOUS / JWT_SECRET_KEY_PREVIOUS ------------------------------------

    const SECRET_KEY_PREVIOUS: &str = "skp-abcdefghijklmnopqrstuvwxyz0123456789";
    const JWT_SECRET_KEY_PREVIOUS: &str = "jwtp-abcdefghijklmnopqrstuvwxyz-0123456789";

    #[test]
    fn the_previous_keys_are_optional_and_kept_when_valid() {
        let cfg = load(&minimal()).unwrap();
        assert!(cfg.secret_key_previous.is_none());
        assert!(cfg.jwt_secret_key_previous.is_none());
        let cfg = load(&with(&[
            ("SECRET_KEY_PREVIOUS", SECRET_KEY_PREVIOUS),
            ("JWT_SECRET_KEY_PREVIOUS", JWT_SECRET_KEY_PREVIOUS),
        ]))
        .unwrap();
        assert_eq!(
            cfg.secret_key_previous.as_ref().map(|k| k.expose_secret()),
            Some(SECRET_KEY_PREVIOUS)
        );
        assert_eq!(
            cfg.jwt_secret_key_previous
                .as_ref()
                .map(|k| k.expose_secret()),
            Some(JWT_SECRET_KEY_PREVIOUS)
        );
        assert!(!format!("{cfg:?}").contains(SECRET_KEY_PREVIOUS));
        assert!(!format!("{cfg:?}").contains(JWT_SECRET_KEY_PREVIOUS));
    }

    #[test]
    fn a_weak_jwt_secret_key_previous_is_rejected_by_name_never_by_value() {
        let short = "0123456789abcdefghijKLMNOPQ";
        let p = fails_on(
            &[("JWT_SECRET_KEY_PREVIOUS", short)],
            "JWT_SECRET_KEY_PREVIOUS",
        );
        assert_eq!(p.rule, "must be at least 32 characters");
        assert!(!p.to_string().contains(short));
        let p = fails_on(
            &[("JWT_SECRET_KEY_PREVIOUS", &"ab".repeat(20))],
            "JWT_SECRET_KEY_PREVIOUS",
        );
        assert!(p.rule.contains("16 distinct characters"), "{p}");
    }

    #[test]
    fn a_short_secret_key_previous_is_rejected() {
        let short = "0123456789abcdefghijKLMNOPQ";
        let p = fails_on(&[("SECRET_KEY_PREVIOUS", short)], "SECRET_KEY_PREVIOUS");
        assert_eq!(p.rule, "must be at least 32 characters");
        assert!(!p.to_string().contains(short));
    }

    #[test]
    fn a_previous_key_equal_to_any_other_key_is_rejected() {
        type Case<'a> = (&'a [(&'static str, &'a str)], &'a str, &'a str);
        let cases: &[Case<'_>] = &[
            (
                &[("JWT_SECRET_KEY_PREVIOUS", JWT_SECRET_KEY)],
                "JWT_SECRET_KEY_PREVIOUS",
                "must differ from JWT_SECRET_KEY",
            ),
            (
                &[("JWT_SECRET_KEY_PREVIOUS", SECRET_KEY)],
                "JWT_SECRET_KEY_PREVIOUS",
                "must differ from SECRET_KEY",
            ),
            (
                &[("SECRET_KEY_PREVIOUS", SECRET_KEY)],
                "SECRET_KEY_PREVIOUS",
                "must differ from SECRET_KEY",
            ),
            (
                &[("SECRET_KEY_PREVIOUS", JWT_SECRET_KEY)],
                "SECRET_KEY_PREVIOUS",
                "must differ from JWT_SECRET_KEY",
            ),
            (
                &[
                    ("SECRET_KEY_PREVIOUS", JWT_SECRET_KEY_PREVIOUS),
                    ("JWT_SECRET_KEY_PREVIOUS", JWT_SECRET_KEY_PREVIOUS),
                ],
                "JWT_SECRET_KEY_PREVIOUS",
                "must differ from SECRET_KEY_PREVIOUS",
            ),
        ];
        for (pairs, variable, rule) in cases {
            let p = fails_on(pairs, variable);
            assert_eq!(p.rule, *rule);
            for (_, value) in *pairs {
                assert!(!p.to_string().contains(value));
            }
        }
    }

    #[test]
    fn check_keys_validates_the_previous_keys_too() {
        let mut vars = HashMap::from([
            ("SECRET_KEY", SECRET_KEY.to_owned()),
            ("JWT_SECRET_KEY", JWT_SECRET_KEY.to_owned()),
            ("ENCRYPTION_KEY", ENCRYPTION_KEY.to_owned()),
            ("SECRET_KEY_PREVIOUS", SECRET_KEY_PREVIOUS.to_owned()),
            (
                "JWT_SECRET_KEY_PREVIOUS",
                JWT_SECRET_KEY_PREVIOUS.to_owned(),
            ),
        ]);
        assert!(check_keys(|n| vars.get(n).cloned()).is_ok());
        vars.insert("JWT_SECRET_KEY_PREVIOUS", JWT_SECRET_KEY.to_owned());
        vars.insert("SECRET_KEY_PREVIOUS", "short".to_owned());
        let err = check_keys(|n| vars.get(n).cloned()).unwrap_err();
        let named: Vec<&str> = err.problems.iter().map(|p| p.variable.as_str()).collect();
        assert_eq!(named, ["SECRET_KEY_PREVIOUS", "JWT_SECRET_KEY_PREVIOUS"]);
        assert!(!err.to_string().contains(JWT_SECRET_KEY));
        assert!(KEY_VARIABLES.contains(&"SECRET_KEY_PREVIOUS"));
        assert!(KEY_VARIABLES.contains(&"JWT_SECRET_KEY_PREVIOUS"));
    }
}
