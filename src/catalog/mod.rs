//! Product catalogs: fetching a tenant's catalog from its store (untrusted input, bounded and
//! validated), staging it page by page, then applying it in one transaction under the tenant's
//! row lock.
//!
//! One concern per file: `store.rs` is the store API client, `product.rs` the validation of
//! one untrusted product, `staging.rs` the staging of pages and the one applying transaction;
//! this file runs an attempt (`sync`: the deadline, the page loop, the outcome) and says how
//! each failure is classified (`CatalogError`).
//!
//! # The store API gatehouse speaks
//!
//! `GET {store_url}/products?page={n}` for n = 1, 2, …, with `Authorization: Bearer
//! {store_api_key}` and `Accept: application/json`. A page answers 200 with
//! `{"products": [ … ], "next_page": n+1 | null}`; `null` (or a missing `next_page`) ends the
//! listing. Each product is an object:
//!
//! | field | rule |
//! |---|---|
//! | `id` | required; a string of 1–128 printable characters, or a non-negative integer |
//! | `name` | required; 1–300 characters after NFC normalization, control characters removed and trimming |
//! | `sku` | optional; 1–128 printable characters |
//! | `description` | optional; at most 5,000 characters (normalized like `name`, line breaks kept) |
//! | `price_cents` | optional; an integer from 0 to 10^12 |
//! | `currency` | optional; three upper-case letters (ISO 4217) |
//! | `in_stock` | optional; a boolean |
//! | `url` | optional; an `http`/`https` URL of at most 2,048 characters |
//!
//! `null` counts as absent; other properties are ignored. A product that breaks a rule is
//! rejected (counted, logged by position, field and rule — never its values — and recorded in
//! `catalog_syncs`), the rest are applied. Limits: each request times out (`STORE_TIMEOUT_MS`),
//! a page is at most 4 MiB, a listing at most 1,000 pages and 100,000 products, and a whole
//! attempt — every page fetched and staged, and the listing applied — has
//! `CATALOG_SYNC_DEADLINE_SECONDS` (default 600); redirects are not followed and no proxy is
//! used. 5xx, 408, 429, timeouts, the deadline, connection errors and malformed pages are worth
//! a retry; other 4xx, oversize pages or listings are not.
//!
//! # Where the store may be
//!
//! The store client connects only to public addresses and to `STORE_ALLOWED_NETWORKS`
//! (`security::net`): names resolve through a resolver that drops every other address (DNS
//! rebinding finds nothing to connect to), literal addresses are checked before the request.
//! A store whose address is refused fails the job at once, for good, with
//! `store_url_forbidden` (the dead letter's `last_error`).
//!
//! # Decision: pages are staged in PostgreSQL, then applied in one short transaction
//!
//! A worker holds one page in memory, never the listing: each page is validated and written to
//! `catalog_sync_staging` under a fresh attempt id (short statements, no transaction held open
//! across the network), and when the last page is in, one transaction takes the tenant's row
//! lock, upserts the attempt's valid rows, deletes (on `full`) the products the attempt did not
//! list, records the sync and deletes the attempt's staging rows. Still all or nothing: a
//! failure or the deadline before that commit leaves products exactly as they were, and the
//! attempt's rows are discarded. Holding the one transaction open across the fetches instead
//! would keep a pooled connection idle in transaction and the tenant's row locked for up to the
//! whole deadline (DESIGN: no slow I/O inside a transaction). Staging rows are keyed by attempt,
//! not by job, so two runs of one job cannot mix; rows of a worker that died are swept once
//! older than twice the deadline; an attempt whose rows vanished (an UNLOGGED table emptied by
//! a crash) notices by counting and fails as retryable.

mod product;
mod staging;
mod store;

use gatehouse_jobs::SyncCatalog;
use serde_json::Value;
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

use crate::events::SecurityLog;
use crate::security::keyring::Keyring;

pub use product::{Product, Rejection, validate_product};
pub use store::{StoreClient, StoreCredentials, StoreError, StoreLimits, store_credentials};

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("unknown tenant")]
    UnknownTenant,
    #[error("tenant has no store configured")]
    NoStore,
    #[error("tenant's store settings are unusable: {0}")]
    BadStore(&'static str),
    #[error(
        "the sync attempt ran past its deadline of {seconds} s (CATALOG_SYNC_DEADLINE_SECONDS)"
    )]
    DeadlineExceeded { seconds: u64 },
    #[error("{found} of the attempt's {expected} staged rows are left (PostgreSQL restarted?)")]
    StagingLost { expected: i64, found: i64 },
}

impl CatalogError {
    /// Whether retrying the job can help.
    pub fn is_retryable(&self) -> bool {
        self.fault() != crate::fault::Fault::Permanent
    }

    /// Where the failure belongs (`crate::fault`): a store that cannot be reached (or whose
    /// circuit is open) is an outage; its answers (5xx, a malformed page) are the job's.
    pub fn fault(&self) -> crate::fault::Fault {
        use crate::fault::Fault;
        match self {
            Self::Database(error) => crate::fault::postgres(error),
            // Rows a restarted PostgreSQL lost: running again restages them.
            Self::StagingLost { .. } => Fault::Transient,
            Self::DeadlineExceeded { .. } => Fault::Retry,
            Self::Store(error) => error.fault(),
            Self::UnknownTenant | Self::NoStore | Self::BadStore(_) => Fault::Permanent,
        }
    }
}

/// What a sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    Applied {
        pages: u32,
        fetched: usize,
        upserted: usize,
        deleted: u64,
        rejected: usize,
    },
    /// This job id already committed (a redelivery).
    AlreadyProcessed,
}

/// The attempt's deadline, as an error once it has passed.
struct Deadline {
    at: Instant,
    seconds: u64,
}

impl Deadline {
    fn exceeded(&self) -> CatalogError {
        CatalogError::DeadlineExceeded {
            seconds: self.seconds,
        }
    }

    /// What is left of the budget; an error when nothing is.
    fn remaining(&self) -> Result<std::time::Duration, CatalogError> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(self.exceeded())
        } else {
            Ok(left)
        }
    }
}

/// A whole sync attempt, within the client's deadline: the store credentials, every page
/// fetched, validated and staged, then one transaction that applies them.
pub async fn sync(
    pool: &PgPool,
    keyring: &Keyring,
    events: &SecurityLog,
    client: &StoreClient,
    job_id: &str,
    worker: &str,
    job: &SyncCatalog,
) -> Result<SyncOutcome, CatalogError> {
    let budget = client.limits().deadline;
    let deadline = Deadline {
        at: Instant::now() + budget,
        seconds: budget.as_secs(),
    };
    let done: Option<i32> = sqlx::query_scalar("SELECT 1 FROM processed_jobs WHERE job_id = $1")
        .bind(job_id)
        .fetch_optional(pool)
        .await?;
    if done.is_some() {
        return Ok(SyncOutcome::AlreadyProcessed);
    }
    let creds = store_credentials(pool, keyring, events, job.tenant_id).await?;
    let swept = staging::sweep(pool, budget * 2 + std::time::Duration::from_secs(60)).await?;
    if swept > 0 {
        tracing::info!(
            rows = swept,
            "swept staging rows of abandoned catalog syncs"
        );
    }
    let attempt = Uuid::new_v4();
    let result = attempt_sync(
        pool, client, &creds, attempt, job_id, worker, job, &deadline,
    )
    .await;
    let result = match result {
        // The apply transaction's statement timeout (query_canceled) is the deadline's.
        Err(CatalogError::Database(sqlx::Error::Database(e)))
            if e.code().as_deref() == Some("57014") && deadline.remaining().is_err() =>
        {
            Err(deadline.exceeded())
        }
        other => other,
    };
    if !matches!(result, Ok(SyncOutcome::Applied { .. }))
        && let Err(error) = staging::discard(pool, attempt).await
    {
        tracing::warn!(%error, "cannot discard a failed catalog sync's staging rows; the sweep will");
    }
    if let Ok(SyncOutcome::Applied { rejected, .. }) = &result
        && *rejected > staging::MAX_RECORDED_REJECTIONS
    {
        tracing::warn!(
            job.id = %job_id,
            tenant.id = %job.tenant_id,
            rejected,
            logged = staging::MAX_RECORDED_REJECTIONS,
            "more store products rejected than logged one by one"
        );
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn attempt_sync(
    pool: &PgPool,
    client: &StoreClient,
    creds: &StoreCredentials,
    attempt: Uuid,
    job_id: &str,
    worker: &str,
    job: &SyncCatalog,
    deadline: &Deadline,
) -> Result<SyncOutcome, CatalogError> {
    let limits = client.limits();
    let mut progress = staging::Progress::default();
    let mut page = 1u32;
    loop {
        if page > limits.max_pages {
            return Err(StoreError::ListingTooLarge("the page limit").into());
        }
        let left = deadline.remaining()?;
        let body = tokio::time::timeout(left, store::fetch_page(client, creds, page))
            .await
            .map_err(|_| deadline.exceeded())??;
        progress.pages += 1;
        let products =
            body.get("products")
                .and_then(Value::as_array)
                .ok_or(StoreError::Malformed {
                    page,
                    why: "products is not an array",
                })?;
        if progress.fetched + products.len() > limits.max_products {
            return Err(StoreError::ListingTooLarge("the product limit").into());
        }
        deadline.remaining()?;
        staging::stage_page(
            pool,
            attempt,
            job_id,
            job.tenant_id,
            products,
            &mut progress,
        )
        .await?;
        match body.get("next_page") {
            None | Some(Value::Null) => break,
            Some(next) => match next.as_u64() {
                Some(n) if n == u64::from(page) + 1 => page += 1,
                _ => {
                    return Err(StoreError::Malformed {
                        page,
                        why: "next_page is not the following page number",
                    }
                    .into());
                }
            },
        }
    }
    let left = deadline.remaining()?;
    staging::apply(pool, attempt, job_id, worker, job, &progress, left).await
}
