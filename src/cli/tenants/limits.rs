//! `gatehouse tenants set-limits` (a tenant's cap on jobs in flight in one queue, overriding
//! `TENANT_MAX_IN_FLIGHT_{QUEUE}`) and `tenants show` (the tenant, its caps, and what it has in
//! flight and waiting in each queue).

use uuid::Uuid;

use super::super::Failure;
use super::super::process::connect_db;
use crate::config::Config;
use crate::queue::limits::{self, Limit, LimitError};
use crate::queue::table::QUEUE_SPECS;

#[derive(Debug, clap::Args)]
pub struct SetLimitsArgs {
    #[arg(long)]
    tenant: Uuid,
    /// The queue (inbound_message, sync_catalog, rotate_keys).
    #[arg(long)]
    queue: String,
    /// The most of the tenant's jobs in flight at once in that queue, across every worker: a
    /// whole number from 1, `none` (no cap for this tenant) or `default` (the queue's
    /// TENANT_MAX_IN_FLIGHT_{QUEUE} again).
    #[arg(long)]
    max_in_flight: String,
}

fn failure(error: LimitError) -> Failure {
    match error {
        LimitError::Invalid(_) | LimitError::UnknownTenant(_) => {
            Failure::Invalid(error.to_string())
        }
        LimitError::Database(_) => Failure::Service(error.to_string()),
        LimitError::Redis(e) => Failure::Service(format!(
            "recorded in the database, but Redis did not take it ({e}): workers apply it within \
             a minute once Redis answers, or run this again"
        )),
    }
}

pub async fn set_limits(config: &Config, args: SetLimitsArgs) -> anyhow::Result<()> {
    let limit = Limit::parse(&args.max_in_flight).map_err(failure)?;
    let pool = connect_db(config).await?;
    let mut redis = crate::redis_conn::connect_lazy(&config.redis_url)
        .map_err(|e| Failure::Service(format!("redis: {e}")))?;
    limits::set(
        &pool,
        &mut redis,
        config.layout(),
        args.tenant,
        &args.queue,
        limit,
    )
    .await
    .map_err(failure)?;
    let cap = match limit {
        Limit::Default => default_cap(config, &args.queue),
        Limit::Unlimited => "none".to_owned(),
        Limit::MaxInFlight(n) => n.to_string(),
    };
    println!("{} {} max_in_flight={cap}", args.tenant, args.queue);
    Ok(())
}

fn default_cap(config: &Config, queue: &str) -> String {
    config
        .tenant_max_in_flight(queue)
        .map_or_else(|| "none".to_owned(), |n| n.to_string())
}

/// Prints the tenant's id, name and creation time, then a line per queue: its cap (and
/// whether it is the tenant's override or the queue's default) and, when Redis answers, its
/// jobs in flight, waiting, and parked at the cap.
pub async fn show(config: &Config, tenant: Uuid) -> anyhow::Result<()> {
    let pool = connect_db(config).await?;
    let row: Option<(String, time::OffsetDateTime)> =
        sqlx::query_as("SELECT name, created_at FROM tenants WHERE id = $1")
            .bind(tenant)
            .fetch_optional(&pool)
            .await
            .map_err(|e| Failure::Service(format!("database: {e}")))?;
    let Some((name, created_at)) = row else {
        return Err(Failure::Invalid(format!("no tenant with id {tenant}")).into());
    };
    let overrides = limits::of_tenant(&pool, tenant)
        .await
        .map_err(|e| Failure::Service(format!("database: {e}")))?;
    println!("id={tenant}");
    println!("name={name}");
    println!(
        "created_at={}",
        created_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    );
    let mut redis = crate::redis_conn::connect_lazy(&config.redis_url).ok();
    for spec in QUEUE_SPECS.iter() {
        let (cap, source) = match overrides.iter().find(|o| o.queue == spec.name) {
            Some(o) if o.max_in_flight == 0 => ("none".to_owned(), "tenant"),
            Some(o) => (o.max_in_flight.to_string(), "tenant"),
            None => (default_cap(config, spec.name), "default"),
        };
        let mut line = format!("{} max_in_flight={cap} ({source})", spec.name);
        if let Some(conn) = redis.as_mut() {
            match limits::load(conn, config.layout(), spec.name, tenant).await {
                Ok(load) => line.push_str(&format!(
                    " running={} waiting={} parked={}",
                    load.running, load.waiting, load.parked
                )),
                Err(e) => {
                    eprintln!("redis did not answer ({e}): jobs in flight and waiting not shown");
                    redis = None;
                }
            }
        }
        println!("{line}");
    }
    Ok(())
}
