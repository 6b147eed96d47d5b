//! The operator dashboard's numbers from PostgreSQL: security events per hour and kind, the
//! failed-authentication heatmap and top source IPs, rate-limit statistics, webhook
//! verification per tenant, key rotations and recent events. Read-only; no HTTP here.
//!
//! Times are bucketed in UTC by PostgreSQL and returned as labels (text) or Unix hours, so
//! every process draws the same chart whatever its own clock or time zone.

use sqlx::PgPool;
use uuid::Uuid;

/// Failure to read the dashboard's numbers.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Events per hour and kind over the last `hours` hours (the current hour included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    /// The current hour, as hours since the Unix epoch (UTC).
    pub end_hour: i64,
    pub hours: i64,
    /// (hour since the epoch, kind, count), only non-zero cells.
    pub cells: Vec<(i64, String, i64)>,
}

impl Timeline {
    /// The first hour shown.
    pub fn start_hour(&self) -> i64 {
        self.end_hour - self.hours + 1
    }

    /// The count of `kind` in `hour`.
    pub fn count(&self, hour: i64, kind: &str) -> i64 {
        self.cells
            .iter()
            .filter(|(h, k, _)| *h == hour && k == kind)
            .map(|(_, _, n)| *n)
            .sum()
    }

    /// Events in `hour`, all kinds.
    pub fn hour_total(&self, hour: i64) -> i64 {
        self.cells
            .iter()
            .filter(|(h, _, _)| *h == hour)
            .map(|(_, _, n)| *n)
            .sum()
    }

    /// Events of `kind` over the whole window.
    pub fn kind_total(&self, kind: &str) -> i64 {
        self.cells
            .iter()
            .filter(|(_, k, _)| k == kind)
            .map(|(_, _, n)| *n)
            .sum()
    }
}

/// Security events per hour and kind over the last `hours` hours.
pub async fn timeline(pool: &PgPool, hours: i64) -> Result<Timeline, DashboardError> {
    let hours = hours.clamp(1, 24 * 31);
    let end_hour: i64 =
        sqlx::query_scalar("SELECT floor(extract(epoch FROM now()) / 3600)::bigint")
            .fetch_one(pool)
            .await?;
    let cells: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT floor(extract(epoch FROM occurred_at) / 3600)::bigint AS hour, type, count(*)
           FROM security_events
          WHERE occurred_at >= to_timestamp(($1 - $2 + 1) * 3600)
          GROUP BY 1, 2
          ORDER BY 1, 2",
    )
    .bind(end_hour)
    .bind(hours)
    .fetch_all(pool)
    .await?;
    Ok(Timeline {
        end_hour,
        hours,
        cells,
    })
}

/// Failed authentications by UTC day and hour of day over the last `days` days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heatmap {
    /// Day labels (`YYYY-MM-DD`), oldest first; today last.
    pub days: Vec<String>,
    /// (day index into `days`, hour 0–23, count), only non-zero cells.
    pub cells: Vec<(usize, u32, i64)>,
}

impl Heatmap {
    pub fn count(&self, day: usize, hour: u32) -> i64 {
        self.cells
            .iter()
            .find(|(d, h, _)| *d == day && *h == hour)
            .map(|(_, _, n)| *n)
            .unwrap_or(0)
    }

    pub fn max(&self) -> i64 {
        self.cells.iter().map(|(_, _, n)| *n).max().unwrap_or(0)
    }

    pub fn total(&self) -> i64 {
        self.cells.iter().map(|(_, _, n)| *n).sum()
    }
}

/// The failed-login heatmap of the last `days` UTC days (today included).
pub async fn failed_login_heatmap(pool: &PgPool, days: i32) -> Result<Heatmap, DashboardError> {
    let days = days.clamp(1, 31);
    let labels: Vec<String> = sqlx::query_scalar(
        "SELECT to_char((now() AT TIME ZONE 'UTC')::date - g, 'YYYY-MM-DD')
           FROM generate_series($1 - 1, 0, -1) AS g",
    )
    .bind(days)
    .fetch_all(pool)
    .await?;
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                extract(hour FROM occurred_at AT TIME ZONE 'UTC')::int,
                count(*)
           FROM security_events
          WHERE type = 'failed_login'
            AND occurred_at >= (((now() AT TIME ZONE 'UTC')::date - ($1 - 1)) AT TIME ZONE 'UTC')
          GROUP BY 1, 2",
    )
    .bind(days)
    .fetch_all(pool)
    .await?;
    let cells = rows
        .into_iter()
        .filter_map(|(day, hour, n)| {
            let index = labels.iter().position(|d| *d == day)?;
            let hour = u32::try_from(hour).ok().filter(|h| *h < 24)?;
            Some((index, hour, n))
        })
        .collect();
    Ok(Heatmap {
        days: labels,
        cells,
    })
}

/// One source address and how often it appears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIp {
    pub ip: String,
    pub count: i64,
    /// Distinct emails it tried (failed logins) or hit limits with.
    pub emails: i64,
    /// `YYYY-MM-DD HH:MM UTC`.
    pub last_seen: String,
}

/// The `limit` addresses with the most events of `kind` in the last `hours` hours.
pub async fn top_source_ips(
    pool: &PgPool,
    kind: &str,
    hours: i64,
    limit: i64,
) -> Result<Vec<SourceIp>, DashboardError> {
    let rows: Vec<(String, i64, i64, String)> = sqlx::query_as(
        "SELECT host(ip), count(*), count(DISTINCT email),
                to_char(max(occurred_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"')
           FROM security_events
          WHERE type = $1 AND ip IS NOT NULL
            AND occurred_at >= now() - make_interval(hours => $2::int)
          GROUP BY ip
          ORDER BY 2 DESC, 1
          LIMIT $3",
    )
    .bind(kind)
    .bind(i32::try_from(hours.clamp(1, 24 * 366)).unwrap_or(24))
    .bind(limit.clamp(1, 100))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(ip, count, emails, last_seen)| SourceIp {
            ip,
            count,
            emails,
            last_seen,
        })
        .collect())
}

/// Rate-limit refusals of one limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitHits {
    /// The limit's name as recorded (`auth_ip`, `failed_login`, `user`).
    pub limit: String,
    pub last_24h: i64,
    pub last_7d: i64,
}

/// Refusals per limit over the last 24 hours and 7 days.
pub async fn rate_limit_hits(pool: &PgPool) -> Result<Vec<LimitHits>, DashboardError> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT coalesce(details->>'limit', 'unknown'),
                count(*) FILTER (WHERE occurred_at >= now() - interval '24 hours'),
                count(*)
           FROM security_events
          WHERE type = 'rate_limit_exceeded' AND occurred_at >= now() - interval '7 days'
          GROUP BY 1
          ORDER BY 3 DESC, 1",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(limit, last_24h, last_7d)| LimitHits {
            limit,
            last_24h,
            last_7d,
        })
        .collect())
}

/// Webhook verification of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WebhookStatus {
    pub tenant_id: Uuid,
    pub name: String,
    /// Whether the tenant has a webhook shared key (the HMAC-SHA256 form) besides its token.
    pub shared_key: bool,
    pub invalid_24h: i64,
    pub invalid_7d: i64,
    /// `YYYY-MM-DD HH:MM UTC` of the last invalid signature, if any.
    pub last_invalid: Option<String>,
    /// Messages stored in the last 24 hours (each passed verification).
    pub messages_24h: i64,
    pub last_message: Option<String>,
}

impl WebhookStatus {
    /// `failing` (refusals and nothing verified in 24 h), `mixed`, `ok`, or `idle`.
    pub fn verdict(&self) -> &'static str {
        match (self.invalid_24h > 0, self.messages_24h > 0) {
            (true, false) => "failing",
            (true, true) => "mixed",
            (false, true) => "ok",
            (false, false) => "idle",
        }
    }
}

/// Webhook verification per tenant (at most 500 tenants, by name).
pub async fn webhook_status(pool: &PgPool) -> Result<Vec<WebhookStatus>, DashboardError> {
    Ok(sqlx::query_as(
        "SELECT t.id AS tenant_id, t.name, t.webhook_shared_key_id IS NOT NULL AS shared_key,
                coalesce(e.day, 0) AS invalid_24h, coalesce(e.week, 0) AS invalid_7d,
                to_char(e.last AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"') AS last_invalid,
                coalesce(m.day, 0) AS messages_24h,
                to_char(m.last AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"') AS last_message
           FROM tenants t
           LEFT JOIN (
                SELECT tenant_id,
                       count(*) FILTER (WHERE occurred_at >= now() - interval '24 hours') AS day,
                       count(*) AS week,
                       max(occurred_at) AS last
                  FROM security_events
                 WHERE type = 'invalid_webhook_signature'
                   AND occurred_at >= now() - interval '7 days'
                 GROUP BY tenant_id) e ON e.tenant_id = t.id
           LEFT JOIN (
                SELECT tenant_id,
                       count(*) FILTER (WHERE created_at >= now() - interval '24 hours') AS day,
                       max(created_at) AS last
                  FROM messages
                 GROUP BY tenant_id) m ON m.tenant_id = t.id
          ORDER BY t.name, t.id
          LIMIT 500",
    )
    .fetch_all(pool)
    .await?)
}

/// Invalid signatures in the last 24 hours for tenant ids that name no tenant (probing).
pub async fn webhook_unknown_tenant_refusals(pool: &PgPool) -> Result<i64, DashboardError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM security_events e
          WHERE e.type = 'invalid_webhook_signature'
            AND e.occurred_at >= now() - interval '24 hours'
            AND NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = e.tenant_id)",
    )
    .fetch_one(pool)
    .await?)
}

/// One key rotation and its progress.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Rotation {
    pub id: Uuid,
    pub status: String,
    pub target_key_id: String,
    pub initiated_by: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub total: i64,
    pub done: i64,
    pub failed: i64,
    pub last_error: Option<String>,
}

impl Rotation {
    /// Per mille of `total` processed (done or failed); 0 when nothing is counted yet.
    pub fn progress_permille(&self) -> i64 {
        if self.total <= 0 {
            return 0;
        }
        ((self.done + self.failed).clamp(0, self.total) * 1000) / self.total
    }
}

/// The newest `limit` key rotations.
pub async fn rotations(pool: &PgPool, limit: i64) -> Result<Vec<Rotation>, DashboardError> {
    Ok(sqlx::query_as(
        "SELECT r.id, r.status, r.target_key_id, u.email AS initiated_by,
                to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"') AS created_at,
                to_char(r.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"') AS started_at,
                to_char(r.completed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"') AS completed_at,
                r.total, r.done, r.failed, r.last_error
           FROM key_rotations r
           LEFT JOIN users u ON u.id = r.initiated_by
          ORDER BY r.created_at DESC, r.id
          LIMIT $1",
    )
    .bind(limit.clamp(1, 500))
    .fetch_all(pool)
    .await?)
}

/// One recent event, as the dashboard lists it (details are not shown).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RecentEvent {
    pub kind: String,
    pub occurred_at: String,
    pub ip: Option<String>,
    pub email: Option<String>,
    pub tenant_id: Option<Uuid>,
}

/// The newest `limit` security events.
pub async fn recent_events(pool: &PgPool, limit: i64) -> Result<Vec<RecentEvent>, DashboardError> {
    Ok(sqlx::query_as(
        "SELECT type AS kind,
                to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"') AS occurred_at,
                host(ip) AS ip, email, tenant_id
           FROM security_events e
          -- The column, not the formatted text the output names `occurred_at`.
          ORDER BY e.occurred_at DESC, e.id
          LIMIT $1",
    )
    .bind(limit.clamp(1, 500))
    .fetch_all(pool)
    .await?)
}
