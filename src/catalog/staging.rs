//! A sync attempt's pages staged in `catalog_sync_staging` as they arrive (one short statement
//! per page chunk, no transaction held), then applied to `products` in one transaction under
//! the tenant's row lock; and the clean-up of what failed or abandoned attempts left.

use std::collections::HashSet;
use std::time::Duration;

use gatehouse_jobs::{SyncCatalog, SyncMode};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::product::{Product, Rejection, product_id, validate_product};
use super::{CatalogError, SyncOutcome};

/// Rows written per statement.
const CHUNK: usize = 2000;
/// Rejections recorded per sync (all are counted).
pub(super) const MAX_RECORDED_REJECTIONS: usize = 100;
/// Abandoned staging rows deleted per sweep.
const SWEEP_BATCH: i64 = 10_000;

/// What an attempt has staged so far: counts, and the first rejections. Its size does not grow
/// with the listing.
#[derive(Debug, Default)]
pub(super) struct Progress {
    pub pages: u32,
    /// Rows the store sent.
    pub fetched: usize,
    /// Staged rows: one per distinct well-formed id, valid or not.
    pub staged: i64,
    /// Staged rows that passed validation (to be upserted).
    pub valid: usize,
    pub rejected: usize,
    /// The first `MAX_RECORDED_REJECTIONS` rejections.
    pub rejections: Vec<Rejection>,
}

struct Row {
    index: usize,
    id: String,
    product: Result<Product, (&'static str, &'static str)>,
}

/// One text column of a chunk (NULL for rejected rows).
fn column<'a>(
    products: &[Option<&'a Product>],
    f: fn(&'a Product) -> Option<&'a str>,
) -> Vec<Option<&'a str>> {
    products.iter().map(|p| p.and_then(f)).collect()
}

/// Validates one page and stages it under `attempt`: a row per id not seen before in this
/// attempt (rejected rows with a well-formed id too, so a full sync keeps their products);
/// a repeated id is rejected as listed twice. Rejections are counted and the first ones kept.
pub(super) async fn stage_page(
    pool: &PgPool,
    attempt: Uuid,
    job_id: &str,
    tenant_id: Uuid,
    values: &[Value],
    progress: &mut Progress,
) -> Result<(), sqlx::Error> {
    let base = progress.fetched;
    progress.fetched += values.len();
    let mut rejections = Vec::new();
    let mut seen = HashSet::new();
    let mut rows = Vec::with_capacity(values.len());
    for (offset, value) in values.iter().enumerate() {
        let index = base + offset;
        match product_id(value) {
            None => {
                let (field, reason) = validate_product(value)
                    .err()
                    .unwrap_or(("id", "must be 1-128 printable characters"));
                rejections.push(Rejection {
                    index,
                    field,
                    reason,
                });
            }
            Some(id) if !seen.insert(id.clone()) => rejections.push(Rejection {
                index,
                field: "id",
                reason: "is listed twice",
            }),
            Some(id) => rows.push(Row {
                index,
                id,
                product: validate_product(value),
            }),
        }
    }
    for chunk in rows.chunks(CHUNK) {
        let products: Vec<Option<&Product>> =
            chunk.iter().map(|r| r.product.as_ref().ok()).collect();
        let ids: Vec<&str> = chunk.iter().map(|r| r.id.as_str()).collect();
        let names = column(&products, |p| Some(p.name.as_str()));
        let skus = column(&products, |p| p.sku.as_deref());
        let descriptions = column(&products, |p| p.description.as_deref());
        let currencies = column(&products, |p| p.currency.as_deref());
        let urls = column(&products, |p| p.url.as_deref());
        let prices: Vec<Option<i64>> = products
            .iter()
            .map(|p| p.and_then(|p| p.price_cents))
            .collect();
        let stock: Vec<Option<bool>> = products
            .iter()
            .map(|p| p.and_then(|p| p.in_stock))
            .collect();
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO catalog_sync_staging (attempt_id, tenant_id, external_id, name, sku,
                                               description, price_cents, currency, in_stock, url)
             SELECT $1, $2, * FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[],
                                          $7::bigint[], $8::text[], $9::boolean[], $10::text[])
             ON CONFLICT (attempt_id, external_id) DO NOTHING
             RETURNING external_id",
        )
        .bind(attempt)
        .bind(tenant_id)
        .bind(ids)
        .bind(names)
        .bind(skus)
        .bind(descriptions)
        .bind(prices)
        .bind(currencies)
        .bind(stock)
        .bind(urls)
        .fetch_all(pool)
        .await?;
        let inserted: HashSet<String> = inserted.into_iter().collect();
        progress.staged += inserted.len() as i64;
        for row in chunk {
            if !inserted.contains(&row.id) {
                // Listed on an earlier page of this attempt.
                rejections.push(Rejection {
                    index: row.index,
                    field: "id",
                    reason: "is listed twice",
                });
                continue;
            }
            match &row.product {
                Ok(_) => progress.valid += 1,
                Err((field, reason)) => rejections.push(Rejection {
                    index: row.index,
                    field,
                    reason,
                }),
            }
        }
    }
    rejections.sort_by_key(|r| r.index);
    progress.rejected += rejections.len();
    for rejection in rejections {
        if progress.rejections.len() >= MAX_RECORDED_REJECTIONS {
            break;
        }
        tracing::warn!(
            job.id = %job_id,
            tenant.id = %tenant_id,
            product.index = rejection.index,
            product.field = rejection.field,
            rule = rejection.reason,
            "store product rejected"
        );
        progress.rejections.push(rejection);
    }
    Ok(())
}

/// Applies a staged attempt in one transaction: tenant row lock, processed-job marker, upserts,
/// deletions of vanished products (full mode), `last_synced_at`, the sync record, and the
/// attempt's staging rows removed. Every statement, the wait for the lock included, is bounded
/// by `budget` (what is left of the attempt's deadline).
pub(super) async fn apply(
    pool: &PgPool,
    attempt: Uuid,
    job_id: &str,
    worker: &str,
    job: &SyncCatalog,
    progress: &Progress,
    budget: Duration,
) -> Result<SyncOutcome, CatalogError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(budget.as_millis().max(1).to_string())
        .execute(&mut *tx)
        .await?;
    // Serializes syncs of one tenant; other tenants' rows are not touched.
    let locked: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
            .bind(job.tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
    if locked.is_none() {
        return Err(CatalogError::UnknownTenant);
    }
    let fresh = sqlx::query(
        "INSERT INTO processed_jobs (job_id, queue, worker) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(job_id)
    .bind(<SyncCatalog as gatehouse_jobs::Job>::QUEUE)
    .bind(worker)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if fresh == 0 {
        tx.rollback().await?;
        return Ok(SyncOutcome::AlreadyProcessed);
    }
    let staged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM catalog_sync_staging WHERE attempt_id = $1")
            .bind(attempt)
            .fetch_one(&mut *tx)
            .await?;
    if staged != progress.staged {
        return Err(CatalogError::StagingLost {
            expected: progress.staged,
            found: staged,
        });
    }
    sqlx::query(
        "INSERT INTO products (tenant_id, external_id, name, sku, description, price_cents,
                               currency, in_stock, url, synced_at)
         SELECT $1, external_id, name, sku, description, price_cents, currency, in_stock, url,
                now()
         FROM catalog_sync_staging WHERE attempt_id = $2 AND name IS NOT NULL
         ON CONFLICT (tenant_id, external_id) DO UPDATE SET
             name = EXCLUDED.name, sku = EXCLUDED.sku, description = EXCLUDED.description,
             price_cents = EXCLUDED.price_cents, currency = EXCLUDED.currency,
             in_stock = EXCLUDED.in_stock, url = EXCLUDED.url,
             synced_at = now(), updated_at = now()",
    )
    .bind(job.tenant_id)
    .bind(attempt)
    .execute(&mut *tx)
    .await?;
    let deleted = match job.mode {
        SyncMode::Full => sqlx::query(
            "DELETE FROM products p WHERE p.tenant_id = $1 AND NOT EXISTS (
                 SELECT 1 FROM catalog_sync_staging s
                 WHERE s.attempt_id = $2 AND s.external_id = p.external_id)",
        )
        .bind(job.tenant_id)
        .bind(attempt)
        .execute(&mut *tx)
        .await?
        .rows_affected(),
        SyncMode::Incremental => 0,
    };
    sqlx::query("UPDATE tenants SET last_synced_at = now(), updated_at = now() WHERE id = $1")
        .bind(job.tenant_id)
        .execute(&mut *tx)
        .await?;
    let mode = match job.mode {
        SyncMode::Full => "full",
        SyncMode::Incremental => "incremental",
    };
    sqlx::query(
        "INSERT INTO catalog_syncs (job_id, tenant_id, requested_by, mode, pages, fetched,
                                    upserted, deleted, rejected, rejections)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(job_id)
    .bind(job.tenant_id)
    .bind(job.requested_by)
    .bind(mode)
    .bind(progress.pages as i32)
    .bind(progress.fetched as i32)
    .bind(progress.valid as i32)
    .bind(deleted as i32)
    .bind(progress.rejected as i32)
    .bind(serde_json::to_value(&progress.rejections).unwrap_or(Value::Array(Vec::new())))
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM catalog_sync_staging WHERE attempt_id = $1")
        .bind(attempt)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(SyncOutcome::Applied {
        pages: progress.pages,
        fetched: progress.fetched,
        upserted: progress.valid,
        deleted,
        rejected: progress.rejected,
    })
}

/// Deletes what an attempt staged (it failed, or found its job already applied).
pub(super) async fn discard(pool: &PgPool, attempt: Uuid) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM catalog_sync_staging WHERE attempt_id = $1")
            .bind(attempt)
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

/// Deletes (a bounded batch of) rows staged longer ago than `older_than`: attempts whose worker
/// died before it could discard them. No live attempt is that old, and one that lost rows
/// anyway notices before it applies (`CatalogError::StagingLost`).
pub(super) async fn sweep(pool: &PgPool, older_than: Duration) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM catalog_sync_staging WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM catalog_sync_staging
             WHERE staged_at < now() - make_interval(secs => $1) LIMIT $2))",
    )
    .bind(older_than.as_secs_f64())
    .bind(SWEEP_BATCH)
    .execute(pool)
    .await?
    .rows_affected())
}
