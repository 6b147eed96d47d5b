//! Catalog sync against a real HTTP server on loopback playing the tenant's store: paginated
//! listings, untrusted rows, slow pages, 500s, malformed JSON, a page failing halfway, and the
//! row lock that serializes one tenant's syncs while other tenants' run in parallel.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::*;
use gatehouse::catalog::{CatalogError, StoreClient, StoreError, StoreLimits, SyncOutcome};
use gatehouse::tenants::NewTenant;
use gatehouse_jobs::client::Enqueue;
use gatehouse_jobs::{SyncCatalog, SyncMode};
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;

const STORE_KEY: &str = "store-key-0123456789abcdef";

/// How the store answers one page.
#[derive(Clone)]
enum Page {
    Json(Value),
    Status(u16),
    Slow(Duration, Value),
    Malformed,
    Huge(usize),
}

#[derive(Clone, Default)]
struct Store {
    pages: Arc<Mutex<Vec<Page>>>,
    hits: Arc<AtomicUsize>,
}

#[derive(serde::Deserialize)]
struct PageQuery {
    page: usize,
}

async fn products(
    State(store): State<Store>,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    store.hits.fetch_add(1, Ordering::SeqCst);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {STORE_KEY}") {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let page = store
        .pages
        .lock()
        .expect("pages")
        .get(q.page.wrapping_sub(1))
        .cloned();
    match page {
        None => StatusCode::NOT_FOUND.into_response(),
        Some(Page::Json(v)) => axum::Json(v).into_response(),
        Some(Page::Status(s)) => StatusCode::from_u16(s)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response(),
        Some(Page::Slow(d, v)) => {
            tokio::time::sleep(d).await;
            axum::Json(v).into_response()
        }
        Some(Page::Malformed) => (
            [("content-type", "application/json")],
            "{\"products\": [{\"id\": 1,",
        )
            .into_response(),
        Some(Page::Huge(n)) => (
            [("content-type", "application/json")],
            format!("{{\"products\": [], \"pad\": \"{}\"}}", "x".repeat(n)),
        )
            .into_response(),
    }
}

impl Store {
    async fn start(pages: Vec<Page>) -> (Self, String) {
        let store = Store {
            pages: Arc::new(Mutex::new(pages)),
            hits: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/shop/products", axum::routing::get(products))
            .with_state(store.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (store, format!("http://{addr}/shop/"))
    }

    fn set(&self, pages: Vec<Page>) {
        *self.pages.lock().expect("pages") = pages;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn page(products: Value, next: Option<u32>) -> Page {
    Page::Json(json!({ "products": products, "next_page": next }))
}

fn product(id: &str, name: &str, price: i64) -> Value {
    json!({ "id": id, "name": name, "price_cents": price, "currency": "EUR", "in_stock": true })
}

async fn store_tenant(env: &TestEnv, store_url: &str) -> Uuid {
    gatehouse::tenants::create(
        &env.pool,
        &env.config.keyring,
        &NewTenant {
            name: "Shop".into(),
            twilio_account_sid: ACCOUNT_SID.into(),
            twilio_auth_token: SecretString::from(TOKEN.to_owned()),
            store_url: Some(store_url.to_owned()),
            store_api_key: Some(SecretString::from(STORE_KEY.to_owned())),
            webhook_shared_key: None,
            owner_email: None,
        },
    )
    .await
    .expect("tenant created")
}

fn client(timeout: Duration) -> StoreClient {
    StoreClient::new(StoreLimits {
        max_page_bytes: 64 * 1024,
        ..StoreLimits::with_timeout(timeout)
    })
    .expect("client")
}

fn job(tenant: Uuid, mode: SyncMode) -> SyncCatalog {
    SyncCatalog {
        tenant_id: tenant,
        requested_by: Uuid::new_v4(),
        mode,
    }
}

async fn run_sync(
    env: &TestEnv,
    client: &StoreClient,
    job_id: &str,
    job: &SyncCatalog,
) -> Result<SyncOutcome, CatalogError> {
    gatehouse::catalog::sync(
        &env.pool,
        &env.config.keyring,
        &env.events(),
        client,
        job_id,
        "test",
        job,
    )
    .await
}

async fn seed_product(env: &TestEnv, tenant: Uuid, external_id: &str) {
    sqlx::query("INSERT INTO products (tenant_id, external_id, name) VALUES ($1, $2, 'Old')")
        .bind(tenant)
        .bind(external_id)
        .execute(&env.pool)
        .await
        .expect("seed product");
}

async fn names(env: &TestEnv, tenant: Uuid) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT external_id, name FROM products WHERE tenant_id = $1 ORDER BY external_id",
    )
    .bind(tenant)
    .fetch_all(&env.pool)
    .await
    .expect("products")
}

async fn last_synced(env: &TestEnv, tenant: Uuid) -> Option<time::OffsetDateTime> {
    sqlx::query_scalar("SELECT last_synced_at FROM tenants WHERE id = $1")
        .bind(tenant)
        .fetch_one(&env.pool)
        .await
        .expect("tenant")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_applies_every_page_rejects_bad_rows_and_deletes_vanished_products() {
    let env = TestEnv::new().await;
    let (store, url) = Store::start(vec![
        page(
            json!([
                product("a", "Apple", 120),
                product("b", "Banana", 80),
                // untrusted rows: a negative price, a script URL, and a duplicate id
                {"id": "bad-price", "name": "Bad", "price_cents": -5},
                {"id": "bad-url", "name": "Bad", "url": "javascript:alert(1)"},
                product("a", "Apple again", 1),
            ]),
            Some(2),
        ),
        page(
            json!([product("c", "Cherry\u{7}", 300), {"name": "no id"}]),
            None,
        ),
    ])
    .await;
    let tenant = store_tenant(&env, &url).await;
    seed_product(&env, tenant, "gone").await;
    seed_product(&env, tenant, "bad-price").await;
    seed_product(&env, tenant, "b").await;
    let client = client(Duration::from_secs(5));
    let job = job(tenant, SyncMode::Full);

    let outcome = run_sync(&env, &client, "job-1", &job).await.expect("sync");
    assert_eq!(
        outcome,
        SyncOutcome::Applied {
            pages: 2,
            fetched: 7,
            upserted: 3,
            deleted: 1,
            rejected: 4
        }
    );
    assert_eq!(
        names(&env, tenant).await,
        vec![
            ("a".into(), "Apple".into()),
            ("b".into(), "Banana".into()),
            // still listed by the store, though its row was rejected this time: kept as it was
            ("bad-price".into(), "Old".into()),
            ("c".into(), "Cherry".into()),
        ]
    );
    assert!(last_synced(&env, tenant).await.is_some());
    let (rejected, rejections): (i32, Value) =
        sqlx::query_as("SELECT rejected, rejections FROM catalog_syncs WHERE job_id = 'job-1'")
            .fetch_one(&env.pool)
            .await
            .expect("sync recorded");
    assert_eq!(rejected, 4);
    let fields: Vec<&str> = rejections
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["field"].as_str())
        .collect();
    assert_eq!(fields, vec!["price_cents", "url", "id", "id"]);
    assert!(
        !rejections.to_string().contains("javascript"),
        "rejections record where and why, never the store's values"
    );

    // The same job delivered again changes nothing and does not call the store.
    let hits = store.hits();
    let again = run_sync(&env, &client, "job-1", &job).await.expect("sync");
    assert_eq!(again, SyncOutcome::AlreadyProcessed);
    assert_eq!(store.hits(), hits);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_sync_upserts_and_deletes_nothing() {
    let env = TestEnv::new().await;
    let (_store, url) = Store::start(vec![page(json!([product("b", "Banana", 90)]), None)]).await;
    let tenant = store_tenant(&env, &url).await;
    seed_product(&env, tenant, "a").await;
    seed_product(&env, tenant, "b").await;
    let outcome = run_sync(
        &env,
        &client(Duration::from_secs(5)),
        "job-1",
        &job(tenant, SyncMode::Incremental),
    )
    .await
    .expect("sync");
    assert!(matches!(
        outcome,
        SyncOutcome::Applied {
            deleted: 0,
            upserted: 1,
            ..
        }
    ));
    assert_eq!(
        names(&env, tenant).await,
        vec![("a".into(), "Old".into()), ("b".into(), "Banana".into())]
    );
    env.cleanup().await;
}

/// Runs a sync that must fail, and checks that nothing of it is visible.
async fn assert_fails_without_effect(
    env: &TestEnv,
    client: &StoreClient,
    tenant: Uuid,
    check: impl FnOnce(&CatalogError) -> bool,
) {
    let before = names(env, tenant).await;
    let error = run_sync(env, client, "job-x", &job(tenant, SyncMode::Full))
        .await
        .expect_err("the sync fails");
    assert!(check(&error), "unexpected error: {error:?}");
    assert_eq!(names(env, tenant).await, before, "no product changed");
    assert!(last_synced(env, tenant).await.is_none(), "not stamped");
    assert_eq!(env.count("SELECT count(*) FROM processed_jobs").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM catalog_syncs").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failing_halfway_slow_or_malformed_leaves_nothing_visible() {
    let env = TestEnv::new().await;
    let first = page(json!([product("new", "New", 1)]), Some(2));
    let (store, url) = Store::start(vec![first.clone(), Page::Status(500)]).await;
    let tenant = store_tenant(&env, &url).await;
    seed_product(&env, tenant, "old").await;
    let client = client(Duration::from_millis(500));

    // Page 2 of 2 answers 500: page 1 was fetched, yet nothing is applied; worth a retry.
    assert_fails_without_effect(&env, &client, tenant, |e| {
        matches!(
            e,
            CatalogError::Store(StoreError::Status {
                page: 2,
                status: 500
            })
        ) && e.is_retryable()
    })
    .await;
    // Malformed JSON on page 2.
    store.set(vec![first.clone(), Page::Malformed]);
    assert_fails_without_effect(&env, &client, tenant, |e| {
        matches!(
            e,
            CatalogError::Store(StoreError::Malformed { page: 2, .. })
        ) && e.is_retryable()
    })
    .await;
    // A page slower than the timeout.
    store.set(vec![
        first.clone(),
        Page::Slow(Duration::from_secs(3), json!({"products": []})),
    ]);
    let started = std::time::Instant::now();
    assert_fails_without_effect(&env, &client, tenant, |e| {
        matches!(e, CatalogError::Store(StoreError::Timeout { page: 2 })) && e.is_retryable()
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the timeout cut it short"
    );
    // A page past the size bound: retrying cannot help.
    store.set(vec![Page::Huge(100 * 1024)]);
    assert_fails_without_effect(&env, &client, tenant, |e| {
        matches!(e, CatalogError::Store(StoreError::PageTooLarge { .. })) && !e.is_retryable()
    })
    .await;
    // A listing whose next_page goes backwards (a loop) is malformed.
    store.set(vec![first, page(json!([]), Some(1))]);
    assert_fails_without_effect(&env, &client, tenant, |e| {
        matches!(e, CatalogError::Store(StoreError::Malformed { .. }))
    })
    .await;
    // A tenant whose store key is gone: permanent, nothing to retry.
    sqlx::query("UPDATE tenants SET store_api_key = NULL WHERE id = $1")
        .bind(tenant)
        .execute(&env.pool)
        .await
        .expect("update");
    assert_fails_without_effect(&env, &client, tenant, |e| {
        matches!(e, CatalogError::NoStore) && !e.is_retryable()
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_syncs_of_one_tenant_serialize_while_another_tenant_syncs_in_parallel() {
    let env = TestEnv::new().await;
    let (_store, url) = Store::start(vec![page(json!([product("a", "Apple", 1)]), None)]).await;
    let busy = store_tenant(&env, &url).await;
    let other = store_tenant(&env, &url).await;
    let client = client(Duration::from_secs(5));

    // Someone (a first sync of `busy`) holds the tenant row lock.
    let mut holder = env.pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
        .bind(busy)
        .execute(&mut *holder)
        .await
        .expect("lock");

    let blocked = {
        let (pool, keyring, client, events) = (
            env.pool.clone(),
            env.config.keyring.clone(),
            client.clone(),
            env.events(),
        );
        tokio::spawn(async move {
            gatehouse::catalog::sync(
                &pool,
                &keyring,
                &events,
                &client,
                "second",
                "t",
                &job(busy, SyncMode::Full),
            )
            .await
        })
    };
    // Another tenant's sync is not held up by that lock.
    let parallel = tokio::time::timeout(
        Duration::from_secs(10),
        run_sync(&env, &client, "other", &job(other, SyncMode::Full)),
    )
    .await
    .expect("the other tenant's sync does not wait")
    .expect("sync");
    assert!(matches!(parallel, SyncOutcome::Applied { .. }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !blocked.is_finished(),
        "the second sync of the same tenant waits for the lock"
    );
    assert_eq!(
        names(&env, busy).await,
        vec![],
        "nothing of it is visible yet"
    );

    holder.commit().await.expect("release");
    let outcome = tokio::time::timeout(Duration::from_secs(10), blocked)
        .await
        .expect("finishes once the lock is released")
        .expect("task")
        .expect("sync");
    assert!(matches!(outcome, SyncOutcome::Applied { upserted: 1, .. }));
    assert_eq!(names(&env, busy).await, vec![("a".into(), "Apple".into())]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_jobs_run_through_the_worker_and_a_store_that_keeps_failing_is_dead_lettered() {
    let env = TestEnv::new().await;
    let (store, url) = Store::start(vec![page(json!([product("a", "Apple", 1)]), None)]).await;
    let tenant = store_tenant(&env, &url).await;
    let worker = env.start_worker();
    let queues = env.queues();
    let mut redis = env.redis.clone();

    let ok = queues
        .enqueue(&mut redis, &job(tenant, SyncMode::Full), Enqueue::default())
        .await
        .expect("enqueue");
    let n = env
        .wait_for_count("SELECT count(*) FROM products", 1, Duration::from_secs(20))
        .await;
    assert_eq!(n, 1, "the sync job applied the catalog");
    let processed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_jobs WHERE job_id = $1")
            .bind(&ok.job_id)
            .fetch_one(&env.pool)
            .await
            .expect("count");
    assert_eq!(processed, 1);

    // The store now fails every time: four attempts with backoff, then the dead letter.
    store.set(vec![Page::Status(503)]);
    let hits = store.hits();
    let failing = queues
        .enqueue(&mut redis, &job(tenant, SyncMode::Full), Enqueue::default())
        .await
        .expect("enqueue");
    assert!(
        env.wait_for_dead("sync_catalog", &failing.job_id, Duration::from_secs(30))
            .await,
        "dead-lettered after its last attempt"
    );
    assert_eq!(store.hits() - hits, 4, "one run and three retries");

    // An unknown tenant is permanent: dead at once, the store never asked.
    let hits = store.hits();
    let unknown = queues
        .enqueue(
            &mut redis,
            &job(Uuid::new_v4(), SyncMode::Full),
            Enqueue::default(),
        )
        .await
        .expect("enqueue");
    assert!(
        env.wait_for_dead("sync_catalog", &unknown.job_id, Duration::from_secs(10))
            .await
    );
    let attempts: String = redis::cmd("HGET")
        .arg(format!(
            "{}:sync_catalog:meta:{}",
            env.namespace, unknown.job_id
        ))
        .arg("attempts")
        .query_async(&mut redis)
        .await
        .expect("attempts");
    assert_eq!(attempts, "1", "no retry for a permanent error");
    assert_eq!(store.hits(), hits);
    worker.stop().await.expect("worker stops cleanly");
    env.cleanup().await;
}
