//! Per-tenant overrides of a queue's cap on jobs in flight (`TENANT_MAX_IN_FLIGHT_{QUEUE}`):
//! `gatehouse tenants set-limits` and `tenants show`.
//!
//! PostgreSQL (`tenant_queue_limits`) is where an override is kept; the queue scripts read it
//! from Redis, from the `:caps` hash of every shard of its queue. [`set`] writes both;
//! [`sync`] copies the table into Redis again (and removes what the table no longer has), so a
//! Redis that lost its keys, or an override changed while Redis was down, is right again after
//! the next worker start or maintenance round.

use redis::aio::ConnectionLike;
use sqlx::PgPool;
use uuid::Uuid;

use super::keys::Layout;
use super::table::QUEUE_SPECS;

/// The most a cap may be.
pub const MAX_IN_FLIGHT: u32 = 100_000;

/// A tenant's cap in one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The queue's default (`TENANT_MAX_IN_FLIGHT_{QUEUE}`, or none): no override.
    Default,
    /// No cap for this tenant, whatever the default.
    Unlimited,
    /// At most this many jobs in flight (1..=[`MAX_IN_FLIGHT`]).
    MaxInFlight(u32),
}

impl Limit {
    /// `--max-in-flight`'s value: a whole number from 1, `none` or `default`.
    pub fn parse(value: &str) -> Result<Self, LimitError> {
        match value {
            "default" => Ok(Self::Default),
            "none" => Ok(Self::Unlimited),
            n => match n.parse::<u32>() {
                Ok(cap)
                    if n.bytes().all(|b| b.is_ascii_digit())
                        && (1..=MAX_IN_FLIGHT).contains(&cap) =>
                {
                    Ok(Self::MaxInFlight(cap))
                }
                _ => Err(LimitError::Invalid(format!(
                    "--max-in-flight must be a whole number from 1 to {MAX_IN_FLIGHT}, none or default"
                ))),
            },
        }
    }

    /// What `:caps` holds for it (`0`: no cap); `None`: no field.
    fn stored(self) -> Option<u32> {
        match self {
            Self::Default => None,
            Self::Unlimited => Some(0),
            Self::MaxInFlight(cap) => Some(cap),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("{0}")]
    Invalid(String),
    #[error("no tenant with id {0}")]
    UnknownTenant(Uuid),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// One override, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub tenant: Uuid,
    pub queue: String,
    /// `0`: no cap.
    pub max_in_flight: u32,
}

fn known_queue(queue: &str) -> Result<(), LimitError> {
    if QUEUE_SPECS.iter().any(|spec| spec.name == queue) {
        Ok(())
    } else {
        let names: Vec<&str> = QUEUE_SPECS.iter().map(|spec| spec.name).collect();
        Err(LimitError::Invalid(format!(
            "--queue must be one of {}",
            names.join(", ")
        )))
    }
}

/// Records `tenant`'s limit in `queue`, then writes it to every shard of the queue in Redis.
/// The database row is written first: if Redis then fails, the error says so, and the next
/// worker start (or maintenance round) applies it.
pub async fn set<C: ConnectionLike>(
    pool: &PgPool,
    redis: &mut C,
    layout: &Layout,
    tenant: Uuid,
    queue: &str,
    limit: Limit,
) -> Result<(), LimitError> {
    known_queue(queue)?;
    if !crate::tenants::exists(pool, tenant).await? {
        return Err(LimitError::UnknownTenant(tenant));
    }
    match limit.stored() {
        None => {
            sqlx::query("DELETE FROM tenant_queue_limits WHERE tenant_id = $1 AND queue = $2")
                .bind(tenant)
                .bind(queue)
                .execute(pool)
                .await?;
        }
        Some(cap) => {
            sqlx::query(
                "INSERT INTO tenant_queue_limits (tenant_id, queue, max_in_flight)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (tenant_id, queue)
                 DO UPDATE SET max_in_flight = EXCLUDED.max_in_flight, updated_at = now()",
            )
            .bind(tenant)
            .bind(queue)
            .bind(i64::from(cap))
            .execute(pool)
            .await?;
        }
    }
    let field = tenant.to_string();
    for keys in layout.all(queue) {
        let () = match limit.stored() {
            None => redis::cmd("HDEL")
                .arg(keys.caps())
                .arg(&field)
                .query_async::<i64>(redis)
                .await
                .map(drop)?,
            Some(cap) => redis::cmd("HSET")
                .arg(keys.caps())
                .arg(&field)
                .arg(cap)
                .query_async::<i64>(redis)
                .await
                .map(drop)?,
        };
    }
    Ok(())
}

/// Every override of `tenant`, by queue.
pub async fn of_tenant(pool: &PgPool, tenant: Uuid) -> Result<Vec<Override>, sqlx::Error> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT queue, max_in_flight FROM tenant_queue_limits WHERE tenant_id = $1 ORDER BY queue",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(queue, cap)| Override {
            tenant,
            queue,
            max_in_flight: u32::try_from(cap).unwrap_or(0),
        })
        .collect())
}

/// Makes every shard's `:caps` hash hold exactly the table's overrides of its queue. Returns
/// how many fields it wrote or removed.
pub async fn sync<C: ConnectionLike>(
    pool: &PgPool,
    redis: &mut C,
    layout: &Layout,
) -> Result<usize, LimitError> {
    let rows: Vec<(Uuid, String, i32)> =
        sqlx::query_as("SELECT tenant_id, queue, max_in_flight FROM tenant_queue_limits")
            .fetch_all(pool)
            .await?;
    let mut changed = 0;
    for spec in QUEUE_SPECS.iter() {
        let want: std::collections::HashMap<String, String> = rows
            .iter()
            .filter(|(_, queue, _)| queue == spec.name)
            .map(|(tenant, _, cap)| (tenant.to_string(), cap.max(&0).to_string()))
            .collect();
        for keys in layout.all(spec.name) {
            let have: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                .arg(keys.caps())
                .query_async(redis)
                .await?;
            let stale: Vec<&String> = have.keys().filter(|t| !want.contains_key(*t)).collect();
            if !stale.is_empty() {
                let () = redis::cmd("HDEL")
                    .arg(keys.caps())
                    .arg(&stale)
                    .query_async::<i64>(redis)
                    .await
                    .map(drop)?;
                changed += stale.len();
            }
            let missing: Vec<(&String, &String)> = want
                .iter()
                .filter(|(t, cap)| have.get(*t) != Some(*cap))
                .collect();
            if !missing.is_empty() {
                let () = redis::cmd("HSET")
                    .arg(keys.caps())
                    .arg(&missing)
                    .query_async::<i64>(redis)
                    .await
                    .map(drop)?;
                changed += missing.len();
            }
        }
    }
    Ok(changed)
}

/// What one tenant has in one queue right now, summed over the queue's shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantLoad {
    /// Jobs in flight.
    pub running: u64,
    /// Jobs waiting in the fair order (ready or parked).
    pub waiting: u64,
    /// Of those, parked at the cap.
    pub parked: u64,
}

/// `tenant`'s jobs in flight and waiting in `queue`.
pub async fn load<C: ConnectionLike>(
    redis: &mut C,
    layout: &Layout,
    queue: &str,
    tenant: Uuid,
) -> Result<TenantLoad, redis::RedisError> {
    let field = tenant.to_string();
    let mut total = TenantLoad::default();
    for keys in layout.all(queue) {
        let (running, waiting, parked): (Option<i64>, Option<i64>, Option<i64>) = redis::pipe()
            .cmd("HGET")
            .arg(keys.running())
            .arg(&field)
            .cmd("HGET")
            .arg(keys.backlog())
            .arg(&field)
            .cmd("HGET")
            .arg(keys.capped())
            .arg(&field)
            .query_async(redis)
            .await?;
        let count = |n: Option<i64>| u64::try_from(n.unwrap_or(0)).unwrap_or(0);
        total.running += count(running);
        total.waiting += count(waiting);
        total.parked += count(parked);
    }
    Ok(total)
}

/// The `n` tenants with the most jobs waiting in `queue` (ready or parked), most first, with
/// their counts: read from each shard's `:backlog` hash, at most [`TOP_SCAN`] entries a shard
/// (the dashboard's bounded view; `/metrics` never has a label per tenant).
pub async fn top_waiting<C: ConnectionLike>(
    redis: &mut C,
    layout: &Layout,
    queue: &str,
    n: usize,
) -> Result<Vec<(String, u64)>, redis::RedisError> {
    let mut all: Vec<(String, u64)> = Vec::new();
    for keys in layout.all(queue) {
        let mut cursor: u64 = 0;
        let mut read = 0;
        loop {
            let (next, page): (u64, Vec<(String, i64)>) = redis::cmd("HSCAN")
                .arg(keys.backlog())
                .arg(cursor)
                .arg("COUNT")
                .arg(500)
                .query_async(redis)
                .await?;
            read += page.len();
            all.extend(
                page.into_iter()
                    .map(|(tenant, waiting)| (tenant, u64::try_from(waiting).unwrap_or(0))),
            );
            cursor = next;
            if cursor == 0 || read >= TOP_SCAN {
                break;
            }
        }
    }
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(n);
    Ok(all)
}

/// Most `:backlog` entries [`top_waiting`] reads per shard.
pub const TOP_SCAN: usize = 10_000;
