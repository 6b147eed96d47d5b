//! Catalog sync against a real HTTP server on loopback playing the tenant's store: paginated
//! listings, untrusted rows, slow pages, 500s, malformed JSON, a page failing halfway, the row
//! lock that serializes one tenant's syncs while other tenants' run in parallel; where a store
//! may be (creation over HTTP and the CLI, connect-time refusal of names resolving to loopback);
//! and the budgets (fifty pages staged one by one, a failure on page 30, the whole-attempt
//! deadline, staging leftovers). The fake store is on loopback, which `gatehouse-testenv` opens with
//! `STORE_ALLOWED_NETWORKS=127.0.0.0/8`; the refusal tests remove it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use gatehouse::catalog::{CatalogError, StoreClient, StoreError, StoreLimits, SyncOutcome};
use gatehouse::tenants::NewTenant;
use gatehouse_jobs::client::Enqueue;
use gatehouse_jobs::{SyncCatalog, SyncMode};
use gatehouse_testenv::*;
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
        let addr = crate::common::serve_loopback(app).await;
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

/// A store client with small pages, opened to the env's `STORE_ALLOWED_NETWORKS` (loopback,
/// unless the test removed it).
fn client(env: &TestEnv, timeout: Duration) -> StoreClient {
    StoreClient::new(
        StoreLimits {
            max_page_bytes: 64 * 1024,
            ..StoreLimits::with_timeout(timeout)
        },
        env.config.store_allowed_networks.clone(),
    )
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
    let client = client(&env, Duration::from_secs(5));
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
        &client(&env, Duration::from_secs(5)),
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
    assert_eq!(
        env.count("SELECT count(*) FROM catalog_sync_staging").await,
        0,
        "the failed attempt's staged pages are discarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failing_halfway_slow_or_malformed_leaves_nothing_visible() {
    let env = TestEnv::new().await;
    let first = page(json!([product("new", "New", 1)]), Some(2));
    let (store, url) = Store::start(vec![first.clone(), Page::Status(500)]).await;
    let tenant = store_tenant(&env, &url).await;
    seed_product(&env, tenant, "old").await;
    let client = client(&env, Duration::from_millis(500));

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
    let client = client(&env, Duration::from_secs(5));

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
    let meta = env.job_meta("sync_catalog", &unknown.job_id).await;
    assert_eq!(
        meta.get("attempts"),
        Some("1"),
        "no retry for a permanent error"
    );
    assert_eq!(store.hits(), hits);
    worker.stop().await.expect("worker stops cleanly");
    env.cleanup().await;
}

// ---- Store URLs: where a store may be --------------------------------------------------------

/// An env whose configuration opens no network to stores (the production default).
async fn strict_env(edit: impl FnOnce(&mut std::collections::HashMap<String, String>)) -> TestEnv {
    TestEnv::with_vars(|v| {
        v.remove("STORE_ALLOWED_NETWORKS");
        v.insert("RATE_LIMIT_USER".into(), "1000/m".into());
        edit(v);
    })
    .await
}

/// A platform admin's bearer token against `server`.
async fn platform_admin(env: &TestEnv, server: &TestServer, http: &reqwest::Client) -> String {
    gatehouse::accounts::create_user(
        &env.pool,
        &gatehouse::security::password::Hasher::owasp(),
        gatehouse::accounts::NewUser {
            email: "admin@example.com".into(),
            password: SecretString::from("correct horse battery staple"),
            first_name: "Ada".into(),
            last_name: "Admin".into(),
            platform_role: Some(gatehouse::access::PlatformRole::PlatformAdmin),
        },
    )
    .await
    .expect("admin created");
    let r = http
        .post(server.url("/v1/auth/login"))
        .header("x-forwarded-proto", "https")
        .json(&json!({"email": "admin@example.com", "password": "correct horse battery staple"}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    body["access_token"].as_str().expect("token").to_owned()
}

/// `POST /v1/tenants` with `store_url`; the status and the error body.
async fn create_with_store_url(
    http: &reqwest::Client,
    server: &TestServer,
    token: &str,
    store_url: &str,
) -> (u16, Value) {
    let r = http
        .post(server.url("/v1/tenants"))
        .header("x-forwarded-proto", "https")
        .bearer_auth(token)
        .json(&json!({
            "name": "Shop", "twilio_account_sid": ACCOUNT_SID, "twilio_auth_token": TOKEN,
            "store_url": store_url, "store_api_key": STORE_KEY,
        }))
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_tenant_refuses_internal_plain_http_and_credentialed_store_urls_naming_store_url()
 {
    let env = strict_env(|_| {}).await;
    let server = env.start_server().await;
    let http = reqwest::Client::new();
    let token = platform_admin(&env, &server, &http).await;
    for store_url in [
        // plain http without DEBUG: the store key would travel in clear
        "http://shop.example.com/",
        // user info
        "https://user:secret@shop.example.com/",
        // loopback, in its many spellings
        "https://127.0.0.1/",
        "https://127.0.0.1:8443/shop/",
        "https://127.1/",
        "https://0x7f.1/",
        "https://2130706433/",
        "https://017700000001/",
        "https://[::1]/",
        "https://[::ffff:127.0.0.1]/",
        "https://localhost/",
        "https://LOCALHOST./",
        "https://shop.localhost/",
        // private
        "https://10.0.0.1/",
        "https://172.16.5.4/",
        "https://192.168.1.1/",
        "https://[fd00::1]/",
        // link-local, the cloud metadata address among them
        "https://169.254.169.254/latest/meta-data/",
        "https://[fe80::1]/",
        "https://[::ffff:169.254.169.254]/",
        // CGNAT, multicast, unspecified, broadcast, documentation, reserved
        "https://100.64.0.1/",
        "https://224.0.0.1/",
        "https://[ff02::1]/",
        "https://0.0.0.0/",
        "https://[::]/",
        "https://255.255.255.255/",
        "https://192.0.2.1/",
        "https://240.0.0.1/",
    ] {
        let (status, body) = create_with_store_url(&http, &server, &token, store_url).await;
        assert_eq!(status, 400, "{store_url}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{store_url}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("store_url"), "{store_url}: {message}");
        assert!(
            !message.contains("secret"),
            "no user info echoed: {message}"
        );
    }
    assert_eq!(env.count("SELECT count(*) FROM tenants").await, 0);
    // A public name over https is fine (it is judged again by what it resolves to at sync time).
    let (status, body) =
        create_with_store_url(&http, &server, &token, "https://shop.example.com/api/").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(env.count("SELECT count(*) FROM tenants").await, 1);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_allowed_networks_and_debug_open_chosen_store_urls_at_creation() {
    let env = strict_env(|v| {
        v.insert(
            "STORE_ALLOWED_NETWORKS".into(),
            "127.0.0.0/8,10.1.0.0/16".into(),
        );
    })
    .await;
    let server = env.start_server().await;
    let http = reqwest::Client::new();
    let token = platform_admin(&env, &server, &http).await;
    for allowed in [
        "https://127.0.0.1:8443/shop/",
        "https://0x7f.1/",
        "https://[::ffff:127.0.0.1]/",
        "https://localhost:8443/",
        "https://10.1.2.3/",
    ] {
        let (status, body) = create_with_store_url(&http, &server, &token, allowed).await;
        assert_eq!(status, 201, "{allowed}: {body}");
    }
    for refused in [
        "https://10.2.0.1/",
        "https://169.254.169.254/",
        "https://[::1]/",
        "http://127.0.0.1:8080/",
    ] {
        let (status, body) = create_with_store_url(&http, &server, &token, refused).await;
        assert_eq!(status, 400, "{refused}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("store_url"))
        );
    }
    server.stop().await;
    env.cleanup().await;

    // DEBUG=true allows plain http (and nothing else).
    let env = strict_env(|v| {
        v.insert("DEBUG".into(), "true".into());
    })
    .await;
    let server = env.start_server().await;
    let token = platform_admin(&env, &server, &http).await;
    let (status, body) =
        create_with_store_url(&http, &server, &token, "http://shop.example.com/").await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = create_with_store_url(&http, &server, &token, "http://127.0.0.1:8080/").await;
    assert_eq!(status, 400, "loopback stays refused in DEBUG");
    server.stop().await;
    env.cleanup().await;
}

/// Runs `gatehouse tenants create --store-url URL` with `vars`; exit code and stderr.
fn cli_create(vars: &std::collections::HashMap<String, String>, store_url: &str) -> (i32, String) {
    let args = [
        "tenants",
        "create",
        "--name",
        "Shop",
        "--twilio-account-sid",
        ACCOUNT_SID,
        "--store-url",
        store_url,
    ];
    let stdin = format!("twilio_auth_token={TOKEN}\nstore_api_key={STORE_KEY}\n");
    let out = run_cli(&args, vars, &stdin);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_create_refuses_an_internal_store_url_with_exit_1_unless_its_network_is_allowed() {
    let env = strict_env(|_| {}).await;
    for refused in [
        "https://169.254.169.254/latest/",
        "https://[::ffff:10.0.0.1]/",
        "https://localhost/",
        "http://shop.example.com/",
    ] {
        let (code, stderr) = cli_create(&env.vars, refused);
        assert_eq!(code, 1, "{refused}: {stderr}");
        assert!(stderr.contains("store_url"), "{refused}: {stderr}");
        assert!(!stderr.contains(TOKEN) && !stderr.contains(STORE_KEY));
    }
    assert_eq!(env.count("SELECT count(*) FROM tenants").await, 0);
    let mut vars = env.vars.clone();
    vars.insert("STORE_ALLOWED_NETWORKS".into(), "169.254.0.0/16".into());
    let (code, stderr) = cli_create(&vars, "https://169.254.169.254/latest/");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(env.count("SELECT count(*) FROM tenants").await, 1);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_name_resolving_to_loopback_is_refused_at_connect_time_and_its_job_dies_at_once() {
    let env = strict_env(|_| {}).await;
    let (store, url) = Store::start(vec![page(json!([product("a", "Apple", 1)]), None)]).await;
    // Written as it might have been before the creation checks, or by a name that resolved
    // elsewhere when the tenant was created: the library's `create` leaves the network rules to
    // its callers.
    let by_name = store_tenant(&env, &url.replace("127.0.0.1", "localhost")).await;
    let by_literal = store_tenant(&env, &url).await;
    let strict = client(&env, Duration::from_secs(5));
    for tenant in [by_name, by_literal] {
        let error = run_sync(&env, &strict, "direct", &job(tenant, SyncMode::Full))
            .await
            .expect_err("refused");
        assert!(
            matches!(
                error,
                CatalogError::Store(StoreError::Forbidden {
                    class: gatehouse::security::net::AddressClass::Loopback
                })
            ),
            "{error:?}"
        );
        assert!(!error.is_retryable());
        assert!(error.to_string().starts_with("store_url_forbidden"));
    }
    assert_eq!(store.hits(), 0, "the store never received a request");

    // Through the worker: one attempt, then the dead letter says why.
    let worker = env.start_worker();
    let mut redis = env.redis.clone();
    let dead = env
        .queues()
        .enqueue(
            &mut redis,
            &job(by_name, SyncMode::Full),
            Enqueue::default(),
        )
        .await
        .expect("enqueue");
    assert!(
        env.wait_for_dead("sync_catalog", &dead.job_id, Duration::from_secs(20))
            .await,
        "dead-lettered"
    );
    let letters =
        gatehouse::queue::dead::list(&mut redis, env.config.layout(), &["sync_catalog"], 10)
            .await
            .expect("dead letters");
    let letter = letters
        .iter()
        .find(|j| j.id == dead.job_id)
        .expect("listed");
    assert_eq!(letter.attempts, 1, "a permanent error is not retried");
    assert!(
        letter.last_error.contains("store_url_forbidden"),
        "{}",
        letter.last_error
    );
    assert_eq!(store.hits(), 0);
    assert_eq!(env.count("SELECT count(*) FROM products").await, 0);
    worker.stop().await.expect("worker stops");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_loopback_allowed_a_store_reached_by_name_syncs_through_the_worker() {
    // base_vars opens 127.0.0.0/8.
    let env = TestEnv::new().await;
    let (store, url) = Store::start(vec![page(json!([product("a", "Apple", 1)]), None)]).await;
    let tenant = store_tenant(&env, &url.replace("127.0.0.1", "localhost")).await;
    let worker = env.start_worker();
    let mut redis = env.redis.clone();
    env.queues()
        .enqueue(&mut redis, &job(tenant, SyncMode::Full), Enqueue::default())
        .await
        .expect("enqueue");
    assert_eq!(
        env.wait_for_count("SELECT count(*) FROM products", 1, Duration::from_secs(20))
            .await,
        1
    );
    assert_eq!(store.hits(), 1);
    worker.stop().await.expect("worker stops");
    env.cleanup().await;
}

// ---- Budgets: many pages, failures late in the listing, the deadline, leftovers -----------------

/// `n` pages of `per_page` products each; product ids are `p{page}-{i}`.
fn pages(n: u32, per_page: u32) -> Vec<Page> {
    (1..=n)
        .map(|p| {
            let products: Vec<Value> = (0..per_page)
                .map(|i| {
                    product(
                        &format!("p{p}-{i}"),
                        &format!("Product {p}/{i}"),
                        i64::from(i),
                    )
                })
                .collect();
            page(Value::Array(products), (p < n).then_some(p + 1))
        })
        .collect()
}

/// Every column of a tenant's products, to compare before and after a failed sync.
async fn snapshot(env: &TestEnv, tenant: Uuid) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT to_jsonb(p) FROM products p WHERE tenant_id = $1 ORDER BY external_id",
    )
    .bind(tenant)
    .fetch_all(&env.pool)
    .await
    .expect("products")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifty_page_listing_is_staged_page_by_page_and_applied_completely() {
    let env = TestEnv::new().await;
    let mut listing = pages(50, 20);
    // Page 40 repeats an id of page 3 and carries one bad row whose product already exists.
    listing[39] = page(
        json!([product("p3-0", "Again", 1), {"id": "kept", "name": "Bad", "price_cents": -1}, product("late", "Late", 5)]),
        Some(41),
    );
    let (store, url) = Store::start(listing).await;
    let tenant = store_tenant(&env, &url).await;
    seed_product(&env, tenant, "gone").await;
    seed_product(&env, tenant, "kept").await;
    let outcome = run_sync(
        &env,
        &client(&env, Duration::from_secs(5)),
        "job-50",
        &job(tenant, SyncMode::Full),
    )
    .await
    .expect("sync");
    assert_eq!(
        outcome,
        SyncOutcome::Applied {
            pages: 50,
            fetched: 49 * 20 + 3,
            upserted: 49 * 20 + 1,
            deleted: 1,
            rejected: 2,
        }
    );
    assert_eq!(store.hits(), 50);
    let products = names(&env, tenant).await;
    assert_eq!(
        products.len(),
        49 * 20 + 2,
        "all listed products plus the kept one"
    );
    assert!(
        products.contains(&("p3-0".into(), "Product 3/0".into())),
        "first listing wins"
    );
    assert!(products.contains(&("kept".into(), "Old".into())));
    assert!(products.contains(&("p50-19".into(), "Product 50/19".into())));
    assert!(!products.iter().any(|(id, _)| id == "gone"));
    let rejections: Value =
        sqlx::query_scalar("SELECT rejections FROM catalog_syncs WHERE job_id = 'job-50'")
            .fetch_one(&env.pool)
            .await
            .expect("sync recorded");
    assert_eq!(
        rejections,
        json!([
            {"index": 780, "field": "id", "reason": "is listed twice"},
            {"index": 781, "field": "price_cents", "reason": "must be an integer from 0 to 10^12"},
        ])
    );
    assert_eq!(
        env.count("SELECT count(*) FROM catalog_sync_staging").await,
        0
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failing_on_page_30_leaves_products_exactly_as_before() {
    let env = TestEnv::new().await;
    let (store, url) = Store::start(pages(2, 10)).await;
    let tenant = store_tenant(&env, &url).await;
    let client = client(&env, Duration::from_secs(5));
    run_sync(&env, &client, "first", &job(tenant, SyncMode::Full))
        .await
        .expect("first sync");
    let before = snapshot(&env, tenant).await;
    assert_eq!(before.len(), 20);

    // A new listing (other names and prices, the old ids gone) that fails on page 30 of 40.
    let mut listing: Vec<Page> = (1..=40u32)
        .map(|p| {
            page(
                json!([product(&format!("new-{p}"), "New", 999)]),
                (p < 40).then_some(p + 1),
            )
        })
        .collect();
    listing[29] = Page::Status(500);
    store.set(listing);
    let error = run_sync(&env, &client, "second", &job(tenant, SyncMode::Full))
        .await
        .expect_err("page 30 fails");
    assert!(
        matches!(
            error,
            CatalogError::Store(StoreError::Status {
                page: 30,
                status: 500
            })
        ),
        "{error:?}"
    );
    assert!(error.is_retryable());
    assert_eq!(
        snapshot(&env, tenant).await,
        before,
        "every column as before"
    );
    assert_eq!(env.count("SELECT count(*) FROM catalog_syncs").await, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM catalog_sync_staging").await,
        0
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_trickling_pages_past_the_deadline_fails_the_attempt_as_retryable_with_nothing_applied()
 {
    let env = TestEnv::with_vars(|v| {
        v.insert("CATALOG_SYNC_DEADLINE_SECONDS".into(), "10".into());
    })
    .await;
    // Each page is well within the per-request timeout; thirty of them are not within the
    // attempt's deadline.
    let listing: Vec<Page> = (1..=30u32)
        .map(|p| {
            Page::Slow(
                Duration::from_secs(1),
                json!({"products": [product(&format!("slow-{p}"), "Slow", 1)],
                       "next_page": (p < 30).then_some(p + 1)}),
            )
        })
        .collect();
    let (store, url) = Store::start(listing).await;
    let tenant = store_tenant(&env, &url).await;
    seed_product(&env, tenant, "old").await;
    let before = snapshot(&env, tenant).await;
    // The worker's own client: deadline and allowed networks from the configuration.
    let client = env.worker_state().store.clone();
    assert_eq!(client.limits().deadline, Duration::from_secs(10));
    let error = run_sync(&env, &client, "slow", &job(tenant, SyncMode::Full))
        .await
        .expect_err("the deadline cuts it short");
    assert!(
        matches!(error, CatalogError::DeadlineExceeded { seconds: 10 }),
        "{error:?}"
    );
    assert!(error.is_retryable());
    assert!(store.hits() < 30, "the listing was not fetched to its end");
    assert_eq!(snapshot(&env, tenant).await, before);
    assert!(last_synced(&env, tenant).await.is_none());
    assert_eq!(env.count("SELECT count(*) FROM processed_jobs").await, 0);
    assert_eq!(
        env.count("SELECT count(*) FROM catalog_sync_staging").await,
        0
    );
    env.cleanup().await;
}

async fn stage_directly(env: &TestEnv, attempt: Uuid, tenant: Uuid, id: &str, age: &str) {
    sqlx::query(
        "INSERT INTO catalog_sync_staging (attempt_id, tenant_id, external_id, name, staged_at)
         VALUES ($1, $2, $3, 'Leftover', now() - $4::interval)",
    )
    .bind(attempt)
    .bind(tenant)
    .bind(id)
    .bind(age)
    .execute(&env.pool)
    .await
    .expect("stage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_left_by_failed_or_abandoned_attempts_never_reaches_the_next_attempt() {
    let env = TestEnv::new().await;
    let (store, url) = Store::start(vec![
        page(json!([product("partial", "Partial", 1)]), Some(2)),
        Page::Status(503),
    ])
    .await;
    let tenant = store_tenant(&env, &url).await;
    seed_product(&env, tenant, "ghost").await;
    // A worker that died mid-attempt a minute ago (maybe still running elsewhere), and one
    // that died a day ago.
    let recent = Uuid::new_v4();
    let ancient = Uuid::new_v4();
    stage_directly(&env, recent, tenant, "ghost", "1 minute").await;
    stage_directly(&env, recent, tenant, "phantom", "1 minute").await;
    stage_directly(&env, ancient, tenant, "ghost", "1 day").await;
    let client = client(&env, Duration::from_secs(5));

    // An attempt that fails after staging page 1.
    run_sync(&env, &client, "failing", &job(tenant, SyncMode::Full))
        .await
        .expect_err("page 2 fails");
    // The next attempt lists only "a".
    store.set(vec![page(json!([product("a", "Apple", 1)]), None)]);
    let outcome = run_sync(&env, &client, "next", &job(tenant, SyncMode::Full))
        .await
        .expect("sync");
    assert!(matches!(
        outcome,
        SyncOutcome::Applied {
            upserted: 1,
            deleted: 1,
            ..
        }
    ));
    assert_eq!(
        names(&env, tenant).await,
        vec![("a".into(), "Apple".into())],
        "neither the failed attempt's page nor anyone's leftovers were applied or kept"
    );
    let left: Vec<Uuid> =
        sqlx::query_scalar("SELECT DISTINCT attempt_id FROM catalog_sync_staging")
            .fetch_all(&env.pool)
            .await
            .expect("staging");
    assert_eq!(
        left,
        vec![recent],
        "the failed attempt discarded its rows, the day-old ones were swept, the recent ones \
         (perhaps a live attempt's) are left alone"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sync_still_waiting_for_the_tenant_lock_at_its_deadline_fails_as_retryable_with_nothing_applied()
 {
    let env = TestEnv::with_vars(|v| {
        v.insert("CATALOG_SYNC_DEADLINE_SECONDS".into(), "10".into());
    })
    .await;
    let (_store, url) = Store::start(vec![page(json!([product("a", "Apple", 1)]), None)]).await;
    let tenant = store_tenant(&env, &url).await;
    seed_product(&env, tenant, "old").await;
    let before = snapshot(&env, tenant).await;
    // Someone holds the tenant's row lock for longer than the whole deadline: the apply step
    // is part of the budget too.
    let mut holder = env.pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
        .bind(tenant)
        .execute(&mut *holder)
        .await
        .expect("lock");
    let client = env.worker_state().store.clone();
    let error = run_sync(&env, &client, "locked", &job(tenant, SyncMode::Full))
        .await
        .expect_err("the deadline ends the wait");
    holder.rollback().await.expect("release");
    assert!(
        matches!(error, CatalogError::DeadlineExceeded { seconds: 10 }),
        "{error:?}"
    );
    assert!(error.is_retryable());
    assert_eq!(snapshot(&env, tenant).await, before);
    assert_eq!(env.count("SELECT count(*) FROM processed_jobs").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM catalog_syncs").await, 0);
    assert_eq!(
        env.count("SELECT count(*) FROM catalog_sync_staging").await,
        0
    );
    env.cleanup().await;
}
