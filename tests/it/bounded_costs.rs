//! What hostile traffic can make gatehouse spend is bounded (SPEC "Hostile traffic"), against
//! real PostgreSQL and Redis: the security-event budget per (type, IP) and minute, the bounded
//! recording queue and its own pool, alert subjects for unknown tenants, the key cache's
//! separate bounded set of unknown tenants, and the retention rounds.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use gatehouse::events::{EventType, SecurityEvent, SecurityLog};
use gatehouse::http::AppState;
use gatehouse::http::key_cache::{KeyCache, KeyCacheError, MAX_UNKNOWN};
use gatehouse::retention::{self, Retention};
use gatehouse::worker::WorkerOptions;
use gatehouse_testenv::*;
use secrecy::SecretString;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use time::OffsetDateTime;
use uuid::Uuid;

/// The start of the next minute, so a test's events all fall in known budget windows.
fn next_minute() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    OffsetDateTime::from_unix_timestamp((now / 60 + 1) * 60).expect("valid time")
}

fn denied(ip: IpAddr, at: OffsetDateTime) -> SecurityEvent {
    let mut event = SecurityEvent::new(EventType::PermissionDenied);
    event.ip = Some(ip);
    event.occurred_at = at;
    event.details = serde_json::json!({"scope": "security:read"});
    event
}

/// A labelled or unlabelled series' value in the process's Prometheus text.
fn sample(series: &str) -> f64 {
    let text = gatehouse::metrics::render(&gatehouse::metrics::install());
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn details_of(env: &TestEnv, ip: &str) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT details FROM security_events WHERE host(ip) = $1 ORDER BY occurred_at",
    )
    .bind(ip)
    .fetch_all(&env.pool)
    .await
    .expect("details")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_events_of_one_type_from_one_ip_in_a_minute_store_ten_and_the_next_one_reports_the_rest()
 {
    let env = TestEnv::new().await;
    let log = env.events();
    let noisy: IpAddr = "203.0.113.10".parse().expect("ip");
    let quiet: IpAddr = "203.0.113.11".parse().expect("ip");
    let minute = next_minute();
    let suppressed_before =
        sample("gatehouse_security_events_suppressed_total{type=\"permission_denied\"}");
    for i in 0..50u64 {
        log.spawn(denied(noisy, minute + Duration::from_millis(i * 100)));
        if i % 10 == 0 {
            // Another address in the same minute has a budget of its own.
            log.spawn(denied(quiet, minute + Duration::from_millis(i * 100)));
        }
    }
    assert!(log.drain(Duration::from_secs(30)).await, "drained");
    assert_eq!(details_of(&env, "203.0.113.10").await.len(), 10);
    let quiet_rows = details_of(&env, "203.0.113.11").await;
    assert_eq!(quiet_rows.len(), 5);
    assert!(quiet_rows.iter().all(|d| d.get("suppressed").is_none()));
    assert_eq!(
        sample("gatehouse_security_events_suppressed_total{type=\"permission_denied\"}")
            - suppressed_before,
        40.0
    );
    // The next minute: the first stored event of the pair says how many were not stored,
    // and the one after it starts from zero again.
    log.record(denied(noisy, minute + Duration::from_secs(60)))
        .await;
    log.record(denied(noisy, minute + Duration::from_secs(61)))
        .await;
    let rows = details_of(&env, "203.0.113.10").await;
    assert_eq!(rows.len(), 12);
    assert_eq!(rows[10]["suppressed"], 40);
    assert_eq!(
        rows[10]["scope"], "security:read",
        "the call site's details stay"
    );
    assert!(rows[11].get("suppressed").is_none());
    assert!(rows[..10].iter().all(|d| d.get("suppressed").is_none()));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_without_an_ip_have_no_budget() {
    let env = TestEnv::new().await;
    let log = env.events();
    let minute = next_minute();
    for i in 0..25u64 {
        let mut event = SecurityEvent::new(EventType::KeyRotationStarted);
        event.occurred_at = minute + Duration::from_millis(i);
        log.record(event).await;
    }
    assert_eq!(env.events_of("key_rotation_started").await, 25);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_budget_is_counted_in_process_and_events_are_still_stored() {
    let env = TestEnv::new().await;
    let dead = gatehouse::redis_conn::connect_lazy_url(&SecretString::from(
        "redis://127.0.0.1:1".to_owned(),
    ))
    .expect("lazy client");
    let log = SecurityLog::new(env.pool.clone(), dead, env.namespace.clone());
    let ip: IpAddr = "198.51.100.20".parse().expect("ip");
    let minute = next_minute();
    for i in 0..15u64 {
        log.spawn(denied(ip, minute + Duration::from_millis(i)));
    }
    assert!(log.drain(Duration::from_secs(30)).await);
    assert_eq!(env.events_of("permission_denied").await, 10);
    log.record(denied(ip, minute + Duration::from_secs(60)))
        .await;
    let rows = details_of(&env, "198.51.100.20").await;
    assert_eq!(rows.len(), 11);
    assert_eq!(rows[10]["suppressed"], 5);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_into_a_full_queue_is_dropped_and_counted_without_waiting_for_the_writers() {
    let env = TestEnv::new().await;
    // The writers' pool has one connection, and the test holds it: they are stuck.
    let writer_pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(120))
        .connect(&env.db_url)
        .await
        .expect("pool");
    let held = writer_pool.acquire().await.expect("the only connection");
    let log = SecurityLog::new(env.pool.clone(), env.redis.clone(), env.namespace.clone())
        .with_queue(100, 2)
        .with_writer_pool(writer_pool.clone());
    let series = "gatehouse_security_events_dropped_total{type=\"key_rotation_started\"}";
    let before = sample(series);
    // `spawn` is not async: queuing cannot wait for the writers, whatever they are doing.
    for _ in 0..10_000 {
        log.spawn(SecurityEvent::new(EventType::KeyRotationStarted));
    }
    let dropped = (sample(series) - before) as i64;
    // At most the queue's 100 plus one event in each writer's hands are kept.
    assert!(dropped >= 10_000 - 102, "dropped {dropped}");
    drop(held);
    assert!(log.drain(Duration::from_secs(60)).await, "the queue drains");
    assert_eq!(
        env.events_of("key_rotation_started").await,
        10_000 - dropped,
        "every queued event is stored, every other one counted as dropped"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_stored_while_the_request_pool_is_exhausted() {
    let env = TestEnv::new().await;
    // The request path's pool: one connection, held by the test.
    let request_pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&env.db_url)
        .await
        .expect("pool");
    let held = request_pool.acquire().await.expect("the only connection");
    let state = Arc::new(AppState::new(
        env.config.clone(),
        request_pool.clone(),
        env.redis.clone(),
    ));
    let server = TestServer::start(state).await;
    let http = reqwest::Client::new();
    for i in 0..3 {
        let r = http
            .get(server.url("/v1/me"))
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-for", format!("192.0.2.{}", 30 + i))
            .bearer_auth("not.a.token")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 401);
    }
    // The recorder writes through a pool of its own.
    assert_eq!(env.wait_for_events("failed_login", 3).await, 3);
    drop(held);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_for_a_hundred_unknown_tenants_share_one_alert_subject_and_name_no_tenant() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = reqwest::Client::new();
    // The alert window is the hour: keep the forgeries inside one.
    let into_hour = OffsetDateTime::now_utc().unix_timestamp() % 3600;
    if into_hour > 3540 {
        tokio::time::sleep(Duration::from_secs((3601 - into_hour) as u64)).await;
    }
    let body = "MessageSid=SM0123456789abcdef0123456789abcdef&From=%2B14155550100&Body=hi";
    for i in 0..100 {
        let r = http
            .post(server.url(&webhook_path(Uuid::new_v4())))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-forwarded-proto", "https")
            .header(
                "x-forwarded-for",
                format!("198.18.{}.{}", i / 250, i % 250 + 1),
            )
            .header("x-twilio-signature", "Rm9yZ2VkU2lnbmF0dXJlRm9yZ2Vk=")
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 403);
    }
    server.stop().await;
    assert_eq!(env.events_of("invalid_webhook_signature").await, 100);
    let claimed = env
        .count("SELECT count(*) FROM security_events WHERE tenant_id IS NOT NULL")
        .await;
    assert_eq!(claimed, 0, "no row names a tenant that does not exist");
    let alerts: Vec<Value> = sqlx::query_scalar(
        "SELECT details FROM security_events WHERE type = 'suspicious_activity'",
    )
    .fetch_all(&env.pool)
    .await
    .expect("alerts");
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["subject"], "unknown-tenant");
    // One alert window in Redis, whatever the number of ids and addresses.
    let mut redis = env.redis.clone();
    let windows: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:alerts:*", env.namespace))
        .query_async(&mut redis)
        .await
        .expect("keys");
    assert_eq!(windows.len(), 1, "{windows:?}");
    env.cleanup().await;
}

// --- the key cache -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_thousand_unknown_tenant_ids_never_evict_a_known_tenants_keys() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let keyring = env.config.keyring.clone();
    let cache = KeyCache::new(Duration::from_secs(600));
    assert!(
        cache
            .get(&env.pool, &keyring, tenant)
            .await
            .expect("keys")
            .is_some()
    );
    let first_unknown = Uuid::new_v4();
    assert!(
        cache
            .get(&env.pool, &keyring, first_unknown)
            .await
            .expect("looked up")
            .is_none()
    );
    // 60,000 more unknown ids, looked up against the real database.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (cache, pool, keyring) = (cache.clone(), env.pool.clone(), keyring.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..7_500 {
                let keys = cache
                    .get(&pool, &keyring, Uuid::new_v4())
                    .await
                    .expect("looked up");
                assert!(keys.is_none());
            }
        }));
    }
    for task in tasks {
        task.await.expect("lookups");
    }
    let last_unknown = Uuid::new_v4();
    assert!(
        cache
            .get(&env.pool, &keyring, last_unknown)
            .await
            .expect("looked up")
            .is_none()
    );
    // PostgreSQL goes away.
    let unreachable = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .expect("lazy pool");
    let keys = cache
        .get(&unreachable, &keyring, tenant)
        .await
        .expect("the known tenant is still served from memory");
    assert!(keys.is_some());
    // Unknown ids are kept apart, least recently used first out: the latest is still
    // known to be unknown, the first was evicted long ago (MAX_UNKNOWN of 60,000).
    const { assert!(60_000 > MAX_UNKNOWN) };
    assert!(
        cache
            .get(&unreachable, &keyring, last_unknown)
            .await
            .expect("cached as unknown")
            .is_none()
    );
    assert!(matches!(
        cache.get(&unreachable, &keyring, first_unknown).await,
        Err(KeyCacheError::Unavailable(_))
    ));
    env.cleanup().await;
}

// --- retention -----------------------------------------------------------------------------

/// Inserts `n` rows into each table aged `days` days (and a sent outbox row sent `days` ago).
async fn insert_aged(env: &TestEnv, tenant: Uuid, n: i64, days: i64, tag: &str) {
    let statements: [&str; 4] = [
        "INSERT INTO security_events (type, occurred_at, details)
         SELECT 'key_rotation_started', now() - make_interval(days => $1::int), jsonb_build_object('tag', $3::text)
           FROM generate_series(1, $2)",
        "INSERT INTO processed_jobs (job_id, queue, worker, processed_at)
         SELECT $3 || '-' || g, 'inbound_message', 'w', now() - make_interval(days => $1::int)
           FROM generate_series(1, $2) g",
        "INSERT INTO catalog_syncs (job_id, tenant_id, requested_by, mode, pages, fetched, upserted, deleted, rejected, finished_at)
         SELECT $3 || '-' || g, $4, $4, 'full', 0, 0, 0, 0, 0, now() - make_interval(days => $1::int)
           FROM generate_series(1, $2) g",
        "INSERT INTO outbox (queue, job_id, payload, created_at, sent_at)
         SELECT 'rotate_keys', $3 || '-' || g, '{}'::jsonb, now() - make_interval(days => $1::int),
                now() - make_interval(days => $1::int)
           FROM generate_series(1, $2) g",
    ];
    for sql in statements {
        sqlx::query(sql)
            .bind(days as i32)
            .bind(n)
            .bind(tag)
            .bind(tenant)
            .execute(&env.pool)
            .await
            .expect("insert aged rows");
    }
}

async fn remaining(env: &TestEnv) -> [i64; 4] {
    [
        env.count("SELECT count(*) FROM security_events").await,
        env.count("SELECT count(*) FROM processed_jobs").await,
        env.count("SELECT count(*) FROM catalog_syncs").await,
        env.count("SELECT count(*) FROM outbox").await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_round_deletes_only_the_expired_rows_of_each_table() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    // Defaults: security events 90 days, processed jobs (and catalog syncs) 30, sent outbox 7.
    insert_aged(&env, tenant, 3, 100, "ancient").await;
    insert_aged(&env, tenant, 2, 40, "old").await;
    insert_aged(&env, tenant, 2, 8, "week").await;
    insert_aged(&env, tenant, 2, 1, "new").await;
    // An outbox row never sent is kept however old.
    sqlx::query(
        "INSERT INTO outbox (queue, job_id, payload, created_at)
         VALUES ('rotate_keys', 'unsent', '{}', now() - interval '200 days')",
    )
    .execute(&env.pool)
    .await
    .expect("unsent row");
    let retention = Retention::from_config(&env.config);
    let deleted = retention::run_round(&env.pool, &retention)
        .await
        .expect("round");
    assert_eq!(deleted.security_events, 3);
    assert_eq!(deleted.processed_jobs, 5);
    assert_eq!(deleted.catalog_syncs, 5);
    assert_eq!(deleted.outbox, 7);
    assert_eq!(remaining(&env).await, [6, 4, 4, 3]);
    let unsent = env
        .count("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .await;
    assert_eq!(unsent, 1);
    // A second round (or another process's) finds nothing more.
    let again = retention::run_round(&env.pool, &retention)
        .await
        .expect("round");
    assert_eq!(again.total(), 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_bigger_than_a_round_drains_over_several_rounds() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    insert_aged(&env, tenant, 25, 400, "backlog").await;
    let retention = Retention {
        batch_size: 4,
        batches_per_round: 2,
        ..Retention::from_config(&env.config)
    };
    let mut rounds = Vec::new();
    loop {
        let deleted = retention::run_round(&env.pool, &retention)
            .await
            .expect("round");
        if deleted.total() == 0 {
            break;
        }
        rounds.push(deleted.security_events);
        assert!(rounds.len() < 10, "the backlog drains");
    }
    // At most 2 batches of 4 per table per round.
    assert_eq!(rounds, [8, 8, 8, 1]);
    assert_eq!(remaining(&env).await, [0, 0, 0, 0]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_workers_delete_expired_rows_on_their_own() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    insert_aged(&env, tenant, 3, 400, "expired").await;
    insert_aged(&env, tenant, 1, 0, "fresh").await;
    let options = WorkerOptions {
        row_retention: Retention {
            every: Duration::from_millis(100),
            ..Retention::from_config(&env.config)
        },
        ..env.worker_options()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(gatehouse::worker::run(
        env.worker_state(),
        env.redis.clone(),
        env.queues(),
        options,
        async move {
            let _ = stopped.await;
        },
    ));
    let left = env
        .wait_for_count(
            "SELECT (SELECT count(*) FROM security_events) + (SELECT count(*) FROM processed_jobs)
                  + (SELECT count(*) FROM catalog_syncs) + (SELECT count(*) FROM outbox)",
            4,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(left, 4, "only the fresh rows are left");
    let _ = stop.send(());
    worker.await.expect("worker task").expect("worker stops");
    env.cleanup().await;
}
