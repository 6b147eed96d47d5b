//! Product catalogs: fetching a tenant's catalog from its store (untrusted input, bounded and
//! validated), then applying it in one transaction under the tenant's row lock.
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
//! a page is at most 4 MiB, a listing at most 1,000 pages and 100,000 products; redirects are
//! not followed. 5xx, 408, 429, timeouts, connection errors and malformed pages are worth a
//! retry; other 4xx, oversize pages or listings are not.

use std::collections::HashSet;
use std::time::Duration;

use gatehouse_jobs::{SyncCatalog, SyncMode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sqlx::PgPool;
use unicode_normalization::UnicodeNormalization;
use uuid::Uuid;

use crate::events::{EventType, SecurityEvent, SecurityLog};
use crate::security::keyring::{Keyring, aad};

/// Bounds on what a store may send.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    pub timeout: Duration,
    pub max_page_bytes: usize,
    pub max_pages: u32,
    pub max_products: usize,
}

impl StoreLimits {
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            timeout,
            max_page_bytes: 4 * 1024 * 1024,
            max_pages: 1000,
            max_products: 100_000,
        }
    }
}

/// The HTTP client for tenants' stores.
#[derive(Debug, Clone)]
pub struct StoreClient {
    http: reqwest::Client,
    limits: StoreLimits,
}

impl StoreClient {
    pub fn new(limits: StoreLimits) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(limits.timeout.min(Duration::from_secs(5)))
            .timeout(limits.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("gatehouse/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, limits })
    }

    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }
}

/// Why fetching from the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store request timed out on page {page}")]
    Timeout { page: u32 },
    #[error("store could not be reached on page {page}")]
    Unreachable { page: u32 },
    #[error("store answered HTTP {status} on page {page}")]
    Status { page: u32, status: u16 },
    #[error("store page {page} is not a valid listing: {why}")]
    Malformed { page: u32, why: &'static str },
    #[error("store page {page} is larger than {limit} bytes")]
    PageTooLarge { page: u32, limit: usize },
    #[error("store listing exceeds {0}")]
    ListingTooLarge(&'static str),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Unreachable { .. } | Self::Malformed { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            Self::PageTooLarge { .. } | Self::ListingTooLarge(_) => false,
        }
    }
}

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
}

impl CatalogError {
    /// Whether retrying the job can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Database(_) => true,
            Self::Store(e) => e.is_retryable(),
            Self::UnknownTenant | Self::NoStore | Self::BadStore(_) => false,
        }
    }
}

/// A product that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    pub external_id: String,
    pub name: String,
    pub sku: Option<String>,
    pub description: Option<String>,
    pub price_cents: Option<i64>,
    pub currency: Option<String>,
    pub in_stock: Option<bool>,
    pub url: Option<String>,
}

/// A rejected row: where and why, never what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    /// Position in the whole listing, from 0.
    pub index: usize,
    pub field: &'static str,
    pub reason: &'static str,
}

/// What the store sent, validated.
#[derive(Debug, Default)]
pub struct Listing {
    pub pages: u32,
    pub fetched: usize,
    pub products: Vec<Product>,
    pub rejections: Vec<Rejection>,
    /// Every well-formed id the store listed, rejected rows included: a product whose row was
    /// malformed this time is not "vanished", so a full sync keeps it.
    pub listed_ids: HashSet<String>,
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

const MAX_ID_CHARS: usize = 128;
const MAX_NAME_CHARS: usize = 300;
const MAX_DESCRIPTION_CHARS: usize = 5000;
const MAX_URL_CHARS: usize = 2048;
const MAX_PRICE_CENTS: i64 = 1_000_000_000_000;
/// Rejections recorded per sync (all are counted).
const MAX_RECORDED_REJECTIONS: usize = 100;

fn clean_text(s: &str, keep_newlines: bool) -> String {
    let normalized: String = s.nfc().collect();
    normalized
        .chars()
        .filter(|c| !c.is_control() || (keep_newlines && (*c == '\n' || *c == '\t')))
        .collect::<String>()
        .trim()
        .to_owned()
}

fn printable_token(s: &str, max: usize) -> Option<String> {
    let ok = !s.is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control);
    ok.then(|| s.trim().to_owned()).filter(|t| !t.is_empty())
}

/// Reads a product's id alone (used for the full sync's "still listed" set).
fn product_id(value: &Value) -> Option<String> {
    match value.get("id")? {
        Value::String(s) => printable_token(s, MAX_ID_CHARS),
        Value::Number(n) => n.as_u64().map(|n| n.to_string()),
        _ => None,
    }
}

fn optional<'a>(obj: &'a serde_json::Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

/// Validates one untrusted product; `Err((field, rule))` names the first broken rule.
pub fn validate_product(value: &Value) -> Result<Product, (&'static str, &'static str)> {
    let obj = value.as_object().ok_or(("product", "must be an object"))?;
    let external_id = product_id(value).ok_or((
        "id",
        "must be 1-128 printable characters or a non-negative integer",
    ))?;
    let name = match optional(obj, "name") {
        Some(Value::String(s)) => clean_text(s, false),
        _ => return Err(("name", "is required and must be a string")),
    };
    let name_chars = name.chars().count();
    if name_chars == 0 || name_chars > MAX_NAME_CHARS {
        return Err(("name", "must be 1-300 characters"));
    }
    let sku = match optional(obj, "sku") {
        None => None,
        Some(Value::String(s)) => Some(
            printable_token(s, MAX_ID_CHARS)
                .ok_or(("sku", "must be 1-128 printable characters"))?,
        ),
        Some(_) => return Err(("sku", "must be a string")),
    };
    let description = match optional(obj, "description") {
        None => None,
        Some(Value::String(s)) => {
            let d = clean_text(s, true);
            if d.chars().count() > MAX_DESCRIPTION_CHARS {
                return Err(("description", "must be at most 5000 characters"));
            }
            (!d.is_empty()).then_some(d)
        }
        Some(_) => return Err(("description", "must be a string")),
    };
    let price_cents = match optional(obj, "price_cents") {
        None => None,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(p) if (0..=MAX_PRICE_CENTS).contains(&p) => Some(p),
            _ => return Err(("price_cents", "must be an integer from 0 to 10^12")),
        },
        Some(_) => return Err(("price_cents", "must be an integer from 0 to 10^12")),
    };
    let currency = match optional(obj, "currency") {
        None => None,
        Some(Value::String(s)) if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) => {
            Some(s.clone())
        }
        Some(_) => return Err(("currency", "must be three upper-case letters")),
    };
    let in_stock = match optional(obj, "in_stock") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(("in_stock", "must be a boolean")),
    };
    let url = match optional(obj, "url") {
        None => None,
        Some(Value::String(s)) if s.len() <= MAX_URL_CHARS => match url::Url::parse(s) {
            Ok(u) if (u.scheme() == "https" || u.scheme() == "http") && u.has_host() => {
                Some(u.to_string())
            }
            _ => return Err(("url", "must be an http(s) URL")),
        },
        Some(_) => return Err(("url", "must be an http(s) URL of at most 2048 characters")),
    };
    Ok(Product {
        external_id,
        name,
        sku,
        description,
        price_cents,
        currency,
        in_stock,
        url,
    })
}

/// A tenant's store endpoint and key, opened.
pub struct StoreCredentials {
    pub base_url: url::Url,
    pub api_key: SecretString,
}

impl std::fmt::Debug for StoreCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCredentials")
            .field("base_url", &self.base_url.as_str())
            .finish_non_exhaustive()
    }
}

/// Loads and opens a tenant's store settings.
pub async fn store_credentials(
    pool: &PgPool,
    keyring: &Keyring,
    events: &SecurityLog,
    tenant_id: Uuid,
) -> Result<StoreCredentials, CatalogError> {
    let row: Option<(Option<String>, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT store_url, store_api_key FROM tenants WHERE id = $1")
            .bind(tenant_id)
            .fetch_optional(pool)
            .await?;
    let (url, sealed) = row.ok_or(CatalogError::UnknownTenant)?;
    let (Some(url), Some(sealed)) = (url, sealed) else {
        return Err(CatalogError::NoStore);
    };
    let base_url = url::Url::parse(&url)
        .ok()
        .filter(|u| u.scheme() == "https" || u.scheme() == "http")
        .ok_or(CatalogError::BadStore("store_url is not an http(s) URL"))?;
    let plain = match keyring.open(
        &sealed,
        &aad("tenants", "store_api_key", &tenant_id.to_string()),
    ) {
        Ok(plain) => plain,
        Err(error) => {
            // Fail closed: no plaintext fallback, no request to the store; an event names the
            // cell and the check that failed, never the value.
            tracing::error!(tenant.id = %tenant_id, %error, "cannot open the store API key");
            let mut event = SecurityEvent::new(EventType::EncryptionError);
            event.tenant_id = Some(tenant_id);
            event.details = serde_json::json!({
                "operation": "sync_catalog",
                "table": "tenants",
                "column": "store_api_key",
                "row_id": tenant_id,
                "reason": error.to_string(),
            });
            events.record(event).await;
            return Err(CatalogError::BadStore("store_api_key could not be opened"));
        }
    };
    let key = String::from_utf8(plain.to_vec())
        .map_err(|_| CatalogError::BadStore("store_api_key is not UTF-8"))?;
    Ok(StoreCredentials {
        base_url,
        api_key: SecretString::from(key),
    })
}

fn page_url(base: &url::Url, page: u32) -> url::Url {
    let mut url = base.clone();
    let path = format!("{}/products", base.path().trim_end_matches('/'));
    url.set_path(&path);
    url.query_pairs_mut()
        .clear()
        .append_pair("page", &page.to_string());
    url
}

async fn fetch_page(
    client: &StoreClient,
    creds: &StoreCredentials,
    page: u32,
) -> Result<Value, StoreError> {
    let limit = client.limits.max_page_bytes;
    let map_send = |e: reqwest::Error| {
        if e.is_timeout() {
            StoreError::Timeout { page }
        } else {
            StoreError::Unreachable { page }
        }
    };
    let mut response = client
        .http
        .get(page_url(&creds.base_url, page))
        .bearer_auth(creds.api_key.expose_secret())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(map_send)?;
    let status = response.status();
    if !status.is_success() {
        return Err(StoreError::Status {
            page,
            status: status.as_u16(),
        });
    }
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(StoreError::PageTooLarge { page, limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(map_send)? {
        if body.len() + chunk.len() > limit {
            return Err(StoreError::PageTooLarge { page, limit });
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|_| StoreError::Malformed {
        page,
        why: "not JSON",
    })
}

/// Fetches and validates the whole listing. Nothing is written.
pub async fn fetch_listing(
    client: &StoreClient,
    creds: &StoreCredentials,
) -> Result<Listing, StoreError> {
    let mut listing = Listing::default();
    let mut page = 1u32;
    loop {
        if page > client.limits.max_pages {
            return Err(StoreError::ListingTooLarge("the page limit"));
        }
        let body = fetch_page(client, creds, page).await?;
        listing.pages += 1;
        let products =
            body.get("products")
                .and_then(Value::as_array)
                .ok_or(StoreError::Malformed {
                    page,
                    why: "products is not an array",
                })?;
        if listing.fetched + products.len() > client.limits.max_products {
            return Err(StoreError::ListingTooLarge("the product limit"));
        }
        for value in products {
            let index = listing.fetched;
            listing.fetched += 1;
            let id = product_id(value);
            if let Some(id) = &id
                && listing.listed_ids.contains(id)
            {
                listing.rejections.push(Rejection {
                    index,
                    field: "id",
                    reason: "is listed twice",
                });
                continue;
            }
            if let Some(id) = id {
                listing.listed_ids.insert(id);
            }
            match validate_product(value) {
                Ok(product) => listing.products.push(product),
                Err((field, reason)) => listing.rejections.push(Rejection {
                    index,
                    field,
                    reason,
                }),
            }
        }
        match body.get("next_page") {
            None | Some(Value::Null) => break,
            Some(next) => match next.as_u64() {
                Some(n) if n == u64::from(page) + 1 => page += 1,
                _ => {
                    return Err(StoreError::Malformed {
                        page,
                        why: "next_page is not the following page number",
                    });
                }
            },
        }
    }
    Ok(listing)
}

/// Rows upserted per statement.
const UPSERT_CHUNK: usize = 2000;

/// Applies a validated listing in one transaction: tenant row lock, processed-job marker,
/// upserts, deletions of vanished products (full mode), `last_synced_at`, the sync record.
pub async fn apply_listing(
    pool: &PgPool,
    job_id: &str,
    worker: &str,
    job: &SyncCatalog,
    listing: &Listing,
) -> Result<SyncOutcome, CatalogError> {
    let mut tx = pool.begin().await?;
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
    for chunk in listing.products.chunks(UPSERT_CHUNK) {
        let ids: Vec<&str> = chunk.iter().map(|p| p.external_id.as_str()).collect();
        let names: Vec<&str> = chunk.iter().map(|p| p.name.as_str()).collect();
        let skus: Vec<Option<&str>> = chunk.iter().map(|p| p.sku.as_deref()).collect();
        let descriptions: Vec<Option<&str>> =
            chunk.iter().map(|p| p.description.as_deref()).collect();
        let prices: Vec<Option<i64>> = chunk.iter().map(|p| p.price_cents).collect();
        let currencies: Vec<Option<&str>> = chunk.iter().map(|p| p.currency.as_deref()).collect();
        let stock: Vec<Option<bool>> = chunk.iter().map(|p| p.in_stock).collect();
        let urls: Vec<Option<&str>> = chunk.iter().map(|p| p.url.as_deref()).collect();
        sqlx::query(
            "INSERT INTO products (tenant_id, external_id, name, sku, description, price_cents,
                                   currency, in_stock, url, synced_at)
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[],
                                      $6::bigint[], $7::text[], $8::boolean[], $9::text[]), now()
             ON CONFLICT (tenant_id, external_id) DO UPDATE SET
                 name = EXCLUDED.name, sku = EXCLUDED.sku, description = EXCLUDED.description,
                 price_cents = EXCLUDED.price_cents, currency = EXCLUDED.currency,
                 in_stock = EXCLUDED.in_stock, url = EXCLUDED.url,
                 synced_at = now(), updated_at = now()",
        )
        .bind(job.tenant_id)
        .bind(ids)
        .bind(names)
        .bind(skus)
        .bind(descriptions)
        .bind(prices)
        .bind(currencies)
        .bind(stock)
        .bind(urls)
        .execute(&mut *tx)
        .await?;
    }
    let deleted = match job.mode {
        SyncMode::Full => {
            let listed: Vec<&str> = listing.listed_ids.iter().map(String::as_str).collect();
            sqlx::query(
                "DELETE FROM products WHERE tenant_id = $1 AND NOT (external_id = ANY($2::text[]))",
            )
            .bind(job.tenant_id)
            .bind(listed)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        }
        SyncMode::Incremental => 0,
    };
    sqlx::query("UPDATE tenants SET last_synced_at = now(), updated_at = now() WHERE id = $1")
        .bind(job.tenant_id)
        .execute(&mut *tx)
        .await?;
    let recorded: Vec<&Rejection> = listing
        .rejections
        .iter()
        .take(MAX_RECORDED_REJECTIONS)
        .collect();
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
    .bind(listing.pages as i32)
    .bind(listing.fetched as i32)
    .bind(listing.products.len() as i32)
    .bind(deleted as i32)
    .bind(listing.rejections.len() as i32)
    .bind(serde_json::to_value(&recorded).unwrap_or(Value::Array(Vec::new())))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(SyncOutcome::Applied {
        pages: listing.pages,
        fetched: listing.fetched,
        upserted: listing.products.len(),
        deleted,
        rejected: listing.rejections.len(),
    })
}

/// A whole sync: network first (store credentials, every page), then one transaction.
pub async fn sync(
    pool: &PgPool,
    keyring: &Keyring,
    events: &SecurityLog,
    client: &StoreClient,
    job_id: &str,
    worker: &str,
    job: &SyncCatalog,
) -> Result<SyncOutcome, CatalogError> {
    let done: Option<i32> = sqlx::query_scalar("SELECT 1 FROM processed_jobs WHERE job_id = $1")
        .bind(job_id)
        .fetch_optional(pool)
        .await?;
    if done.is_some() {
        return Ok(SyncOutcome::AlreadyProcessed);
    }
    let creds = store_credentials(pool, keyring, events, job.tenant_id).await?;
    let listing = fetch_listing(client, &creds).await?;
    for rejection in listing.rejections.iter().take(MAX_RECORDED_REJECTIONS) {
        tracing::warn!(
            job.id = %job_id,
            tenant.id = %job.tenant_id,
            product.index = rejection.index,
            product.field = rejection.field,
            rule = rejection.reason,
            "store product rejected"
        );
    }
    if listing.rejections.len() > MAX_RECORDED_REJECTIONS {
        tracing::warn!(
            job.id = %job_id,
            tenant.id = %job.tenant_id,
            rejected = listing.rejections.len(),
            logged = MAX_RECORDED_REJECTIONS,
            "more store products rejected than logged one by one"
        );
    }
    apply_listing(pool, job_id, worker, job, &listing).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_well_formed_product_is_normalized() {
        let p = validate_product(&json!({
            "id": 42, "name": "  Cafe\u{301} au lait\u{7} ", "sku": "SKU-1",
            "description": "line one\nline two", "price_cents": 450, "currency": "EUR",
            "in_stock": true, "url": "https://shop.example/p/42", "extra": {"ignored": true}
        }))
        .expect("valid");
        assert_eq!(p.external_id, "42");
        assert_eq!(p.name, "Café au lait");
        assert_eq!(p.description.as_deref(), Some("line one\nline two"));
        assert_eq!(p.price_cents, Some(450));
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let cases = [
            (json!("nope"), "product"),
            (json!({"name": "x"}), "id"),
            (json!({"id": -1, "name": "x"}), "id"),
            (json!({"id": "a\u{0}b", "name": "x"}), "id"),
            (json!({"id": "x".repeat(129), "name": "x"}), "id"),
            (json!({"id": "1"}), "name"),
            (json!({"id": "1", "name": "\u{7}  "}), "name"),
            (json!({"id": "1", "name": "x".repeat(301)}), "name"),
            (
                json!({"id": "1", "name": "x", "price_cents": 1.5}),
                "price_cents",
            ),
            (
                json!({"id": "1", "name": "x", "price_cents": -3}),
                "price_cents",
            ),
            (
                json!({"id": "1", "name": "x", "price_cents": "3"}),
                "price_cents",
            ),
            (
                json!({"id": "1", "name": "x", "currency": "eur"}),
                "currency",
            ),
            (
                json!({"id": "1", "name": "x", "in_stock": "yes"}),
                "in_stock",
            ),
            (
                json!({"id": "1", "name": "x", "url": "javascript:alert(1)"}),
                "url",
            ),
            (
                json!({"id": "1", "name": "x", "description": "d".repeat(5001)}),
                "description",
            ),
            (json!({"id": "1", "name": "x", "sku": 7}), "sku"),
        ];
        for (value, field) in cases {
            let got = validate_product(&value).expect_err("rejected");
            assert_eq!(got.0, field, "{value}");
        }
    }

    #[test]
    fn nulls_count_as_absent() {
        let p = validate_product(&json!({"id": "1", "name": "x", "sku": null, "url": null}))
            .expect("valid");
        assert_eq!(p.sku, None);
        assert_eq!(p.url, None);
    }

    #[test]
    fn page_urls_keep_the_base_path() {
        let base = url::Url::parse("https://store.example/api/v2/").expect("url");
        assert_eq!(
            page_url(&base, 3).as_str(),
            "https://store.example/api/v2/products?page=3"
        );
    }

    #[test]
    fn only_transient_store_failures_are_retried() {
        assert!(
            StoreError::Status {
                page: 1,
                status: 503
            }
            .is_retryable()
        );
        assert!(
            StoreError::Status {
                page: 1,
                status: 429
            }
            .is_retryable()
        );
        assert!(
            !StoreError::Status {
                page: 1,
                status: 401
            }
            .is_retryable()
        );
        assert!(StoreError::Malformed { page: 1, why: "x" }.is_retryable());
        assert!(!StoreError::PageTooLarge { page: 1, limit: 1 }.is_retryable());
        assert!(!CatalogError::UnknownTenant.is_retryable());
    }
}
