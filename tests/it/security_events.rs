//! Security events end to end against real PostgreSQL and Redis: the alert rules and their
//! windows (counted in Redis, shared by a fleet), recording with Redis down, and the
//! `GET /v1/admin/security-events` API (scope, filters, paging).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use gatehouse::access::PlatformRole;
use gatehouse::accounts::{self, NewUser};
use gatehouse::events::{Budget, EventType, SecurityEvent, SecurityLog};
use gatehouse::http::AppState;
use gatehouse::security::jwt::{JwtKeys, SubjectKind};
use gatehouse::security::password::Hasher;
use gatehouse_testenv::*;
use secrecy::SecretString;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

/// The start of the 5-minute window after the current one, so a test's events are never
/// split across a window boundary by the clock.
fn next_window_start() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    OffsetDateTime::from_unix_timestamp((now / 300 + 1) * 300).expect("valid time")
}

fn failed_login(ip: IpAddr, at: OffsetDateTime) -> SecurityEvent {
    let mut event = SecurityEvent::new(EventType::FailedLogin);
    event.ip = Some(ip);
    event.occurred_at = at;
    event.request_id = Some(Uuid::new_v4().to_string());
    event.details = serde_json::json!({"reason": "invalid_credentials"});
    event
}

fn log(env: &TestEnv) -> SecurityLog {
    SecurityLog::new(env.pool.clone(), env.redis.clone(), env.namespace.clone())
}

async fn alerts(env: &TestEnv) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT details FROM security_events WHERE type = 'suspicious_activity' ORDER BY occurred_at",
    )
    .fetch_all(&env.pool)
    .await
    .expect("alerts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_failed_logins_from_one_ip_in_a_window_raise_exactly_one_alert() {
    let env = TestEnv::new().await;
    let log = log(&env);
    let ip: IpAddr = "203.0.113.7".parse().expect("ip");
    let start = next_window_start();
    for i in 0..15 {
        log.record(failed_login(ip, start + Duration::from_secs(i * 10)))
            .await;
    }
    assert_eq!(env.events_of("failed_login").await, 15);
    let alerts = alerts(&env).await;
    assert_eq!(alerts.len(), 1, "one alert per window: {alerts:?}");
    assert_eq!(alerts[0]["rule"], "failed_logins_per_ip");
    assert_eq!(alerts[0]["subject"], "ip:203.0.113.7");
    assert_eq!(alerts[0]["threshold"], 10);
    assert_eq!(alerts[0]["window_seconds"], 300);
    let ip_of_alert: Option<String> = sqlx::query_scalar(
        "SELECT host(ip) FROM security_events WHERE type = 'suspicious_activity'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("alert row");
    assert_eq!(ip_of_alert.as_deref(), Some("203.0.113.7"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_failed_logins_from_one_ip_raise_no_alert_and_other_ips_count_apart() {
    let env = TestEnv::new().await;
    let log = log(&env);
    let start = next_window_start();
    for i in 0..9 {
        log.record(failed_login(
            "203.0.113.8".parse().expect("ip"),
            start + Duration::from_secs(i),
        ))
        .await;
        // A second address's failures never add to the first's.
        log.record(failed_login(
            "203.0.113.9".parse().expect("ip"),
            start + Duration::from_secs(i),
        ))
        .await;
    }
    assert_eq!(env.events_of("failed_login").await, 18);
    assert!(alerts(&env).await.is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_window_of_failed_logins_raises_a_second_alert() {
    let env = TestEnv::new().await;
    let log = log(&env);
    let ip: IpAddr = "2001:db8::17".parse().expect("ip");
    let first = next_window_start();
    let second = first + Duration::from_secs(300);
    for i in 0..12 {
        log.record(failed_login(ip, first + Duration::from_secs(i)))
            .await;
    }
    // The next window counts from zero again: its tenth failure raises the second alert.
    for i in 0..10 {
        log.record(failed_login(ip, second + Duration::from_secs(i)))
            .await;
    }
    let alerts = alerts(&env).await;
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_ne!(alerts[0]["window_start"], alerts[1]["window_start"]);
    // An IPv6 client is its /64, as in every per-IP limit.
    assert!(alerts.iter().all(|a| a["subject"] == "ip:2001:db8::/64"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingress_processes_sharing_redis_agree_on_one_window() {
    let env = TestEnv::new().await;
    // Two processes' states: their own pools and Redis connections, one namespace.
    let other_redis = gatehouse::redis_conn::connect_url(&SecretString::from(redis_url()))
        .await
        .expect("redis");
    let a = env.app_state();
    let b = Arc::new(AppState::new(
        env.config.clone(),
        env.pool.clone(),
        other_redis,
    ));
    let ip: IpAddr = "198.51.100.4".parse().expect("ip");
    let start = next_window_start();
    let mut tasks = Vec::new();
    for i in 0..10u64 {
        let state = if i % 2 == 0 { a.clone() } else { b.clone() };
        let event = failed_login(ip, start + Duration::from_secs(i));
        tasks.push(tokio::spawn(
            async move { state.events.record(event).await },
        ));
    }
    for task in tasks {
        task.await.expect("recorded");
    }
    assert_eq!(env.events_of("failed_login").await, 10);
    let alerts = alerts(&env).await;
    assert_eq!(alerts.len(), 1, "the fleet raised {alerts:?}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_over_http_are_failed_logins_that_raise_one_alert_for_their_ip() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = reqwest::Client::new();
    // These events happen now: keep the burst inside one minute (the event budget's window,
    // and so inside one 5-minute alert window too).
    let into_minute = OffsetDateTime::now_utc().unix_timestamp() % 60;
    if into_minute > 40 {
        tokio::time::sleep(Duration::from_secs((61 - into_minute) as u64)).await;
    }
    for _ in 0..12 {
        let r = http
            .get(server.url("/v1/me"))
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-for", "192.0.2.77")
            .bearer_auth("not.a.token")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 401);
    }
    // Stopping drains the recorder: every event the requests caused is counted by then.
    server.stop().await;
    // The event budget: the first 10 of the address's failed logins this minute are stored,
    // the other 2 only counted; the alert rule counts all of them.
    assert_eq!(env.events_of("failed_login").await, 10);
    assert_eq!(env.events_of("suspicious_activity").await, 1);
    let alerts = alerts(&env).await;
    assert_eq!(alerts[0]["rule"], "failed_logins_per_ip");
    assert_eq!(alerts[0]["subject"], "ip:192.0.2.77");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_critical_kind_alerts_once_per_window_and_subject() {
    let env = TestEnv::new().await;
    let log = log(&env);
    let tenant_a = Uuid::new_v4();
    let tenant_b = Uuid::new_v4();
    // The start of the next hour: no event of the test falls across a window boundary.
    let hour = OffsetDateTime::from_unix_timestamp(
        (OffsetDateTime::now_utc().unix_timestamp() / 3600 + 1) * 3600,
    )
    .expect("time");
    for (kind, rule) in [
        (
            EventType::InvalidWebhookSignature,
            "invalid_webhook_signature",
        ),
        (EventType::FourEyesViolation, "four_eyes_violation"),
        (EventType::EncryptionError, "encryption_error"),
    ] {
        for tenant in [tenant_a, tenant_a, tenant_a, tenant_b] {
            let mut event = SecurityEvent::new(kind);
            event.tenant_id = Some(tenant);
            event.occurred_at = hour;
            log.record(event).await;
        }
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM security_events
              WHERE type = 'suspicious_activity' AND details->>'rule' = $1",
        )
        .bind(rule)
        .fetch_one(&env.pool)
        .await
        .expect("count");
        assert_eq!(n, 2, "{rule}: one alert per tenant");
    }
    // 99 rate-limit hits from one address: no alert; the 100th: one.
    let ip: IpAddr = "192.0.2.200".parse().expect("ip");
    for i in 0..100u64 {
        if i == 99 {
            assert!(
                !alerts(&env)
                    .await
                    .iter()
                    .any(|a| a["rule"] == "rate_limit_hits_per_ip")
            );
        }
        let mut event = SecurityEvent::new(EventType::RateLimitExceeded);
        event.ip = Some(ip);
        event.occurred_at = hour + Duration::from_secs(i);
        log.record(event).await;
    }
    let rate_alerts = alerts(&env)
        .await
        .into_iter()
        .filter(|a| a["rule"] == "rate_limit_hits_per_ip")
        .count();
    assert_eq!(rate_alerts, 1);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_events_are_still_recorded_without_alerts() {
    let env = TestEnv::new().await;
    let metrics = gatehouse::metrics::install();
    // Nothing listens on port 1: every alert-window count fails.
    let dead = gatehouse::redis_conn::connect_lazy_url(&SecretString::from(
        "redis://127.0.0.1:1".to_owned(),
    ))
    .expect("lazy client");
    let log = SecurityLog::new(env.pool.clone(), dead, env.namespace.clone());
    let ip: IpAddr = "203.0.113.50".parse().expect("ip");
    let start = next_window_start();
    for i in 0..10 {
        log.record(failed_login(ip, start + Duration::from_secs(i)))
            .await;
    }
    let mut event = SecurityEvent::new(EventType::EncryptionError);
    event.details = serde_json::json!({"operation": "open"});
    log.record(event).await;
    assert_eq!(env.events_of("failed_login").await, 10);
    assert_eq!(env.events_of("encryption_error").await, 1);
    assert_eq!(env.events_of("suspicious_activity").await, 0);
    // Counted, so Prometheus can tell alerting is degraded.
    assert!(counter(&metrics, "gatehouse_security_alert_failures_total") >= 11.0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_insert_never_fails_the_caller() {
    let env = TestEnv::new().await;
    let metrics = gatehouse::metrics::install();
    // A pool whose database does not exist: every insert fails.
    let broken = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy("postgres://postgres@127.0.0.1:5432/gh_no_such_database")
        .expect("lazy pool");
    let log = SecurityLog::new(broken, env.redis.clone(), env.namespace.clone());
    // Returns (logged and counted) instead of panicking or erroring.
    log.record(failed_login(
        "203.0.113.51".parse().expect("ip"),
        OffsetDateTime::now_utc(),
    ))
    .await;
    assert_eq!(env.events_of("failed_login").await, 0);
    assert!(counter(&metrics, "gatehouse_security_event_insert_failures_total") >= 1.0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_spawned_just_before_shutdown_are_all_recorded_once_drained() {
    let env = TestEnv::new().await;
    let log = log(&env);
    for i in 0..20u8 {
        log.spawn(failed_login(
            IpAddr::from([203, 0, 113, 100 + i]),
            OffsetDateTime::now_utc(),
        ));
    }
    // What `http::serve` does once its connections are closed: no sleeping, no polling.
    assert!(log.drain(Duration::from_secs(10)).await, "drained in time");
    assert_eq!(env.events_of("failed_login").await, 20);
    // The log keeps recording after a drain.
    log.spawn(failed_login(
        "203.0.113.99".parse().expect("ip"),
        OffsetDateTime::now_utc(),
    ));
    assert!(log.drain(Duration::from_secs(10)).await);
    assert_eq!(env.events_of("failed_login").await, 21);
    env.cleanup().await;
}

/// An unlabelled counter's value in the process's Prometheus text.
fn counter(handle: &metrics_exporter_prometheus::PrometheusHandle, name: &str) -> f64 {
    gatehouse::metrics::render(handle)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

// --- the API -----------------------------------------------------------------------------

async fn user_token(env: &TestEnv, role: Option<PlatformRole>) -> (Uuid, String) {
    let id = accounts::create_user(
        &env.pool,
        &Hasher::owasp(),
        NewUser {
            email: format!("{}@example.com", Uuid::new_v4().simple()),
            password: SecretString::from("correct horse battery staple"),
            first_name: "Sec".into(),
            last_name: "Officer".into(),
            platform_role: role,
        },
    )
    .await
    .expect("user");
    let token = JwtKeys::from_config(&env.config)
        .issue(id, SubjectKind::User)
        .expect("token")
        .token;
    (id, token)
}

async fn get(
    http: &reqwest::Client,
    server: &TestServer,
    token: &str,
    query: &str,
) -> reqwest::Response {
    http.get(server.url(&format!("/v1/admin/security-events{query}")))
        .header("x-forwarded-proto", "https")
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_events_read_back_newest_first_filtered_and_paged_with_a_cursor() {
    let env = TestEnv::new().await;
    // 25 events of one address within a minute: a budget wide enough to store them all (the
    // budget itself is tested in tests/it/bounded_costs.rs).
    let log = log(&env).with_budget(Budget {
        per_window: 100,
        window: Duration::from_secs(60),
    });
    let base =
        OffsetDateTime::from_unix_timestamp(OffsetDateTime::now_utc().unix_timestamp() - 3600)
            .expect("time");
    let tenant = Uuid::new_v4();
    // 25 events a second apart, alternating kinds; two share one instant (ties by id).
    for i in 0..25u64 {
        let kind = if i % 2 == 0 {
            EventType::PermissionDenied
        } else {
            EventType::KeyRotationStarted
        };
        let mut event = SecurityEvent::new(kind);
        event.occurred_at = base + Duration::from_secs(i.min(23));
        event.tenant_id = Some(tenant);
        event.ip = Some("198.51.100.1".parse().expect("ip"));
        event.email = Some("ops@example.com".into());
        event.details = serde_json::json!({"n": i});
        log.record(event).await;
    }
    let (_, token) = user_token(&env, Some(PlatformRole::SecurityOfficer)).await;
    let server = env.start_server().await;
    let http = reqwest::Client::new();

    let r = get(&http, &server, &token, "").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("x-next-before").is_none() && r.headers().get("link").is_none(),
        "one page holds all 25: no next page"
    );
    let body: Value = r.json().await.expect("json");
    let events = body.as_array().expect("the body is the array of events");
    assert_eq!(events.len(), 25);
    let first = &events[0];
    for field in [
        "id",
        "type",
        "occurred_at",
        "ip",
        "user_id",
        "email",
        "tenant_id",
        "details",
    ] {
        assert!(first.get(field).is_some(), "{field} in {first}");
    }
    assert_eq!(first["ip"], "198.51.100.1");
    assert_eq!(first["tenant_id"], tenant.to_string());
    assert!(first["occurred_at"].as_str().expect("time").ends_with('Z'));
    let times: Vec<&str> = events
        .iter()
        .map(|e| e["occurred_at"].as_str().expect("time"))
        .collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted, "newest first");

    // Pages of 10 by the cursor: every event once, in the same order.
    let mut paged = Vec::new();
    let mut query = "?limit=10".to_owned();
    let mut pages = 0;
    loop {
        let r = get(&http, &server, &token, &query).await;
        let next = r
            .headers()
            .get("x-next-before")
            .map(|v| v.to_str().expect("ascii").to_owned());
        let link = r
            .headers()
            .get("link")
            .map(|v| v.to_str().expect("ascii").to_owned());
        let body: Value = r.json().await.expect("json");
        let page = body.as_array().expect("events").clone();
        assert!(page.len() <= 10);
        paged.extend(page.into_iter().map(|e| e["id"].clone()));
        pages += 1;
        match next {
            Some(cursor) => {
                let link = link.expect("a Link header beside the cursor");
                assert_eq!(
                    link,
                    format!("</v1/admin/security-events?limit=10&before={cursor}>; rel=\"next\""),
                    "the Link names the next page with the same filters"
                );
                query = format!("?limit=10&before={cursor}");
            }
            None => break,
        }
    }
    assert_eq!(pages, 3, "25 events in pages of 10");
    let all: Vec<Value> = events.iter().map(|e| e["id"].clone()).collect();
    assert_eq!(paged, all);

    // Filters.
    let body: Value = get(&http, &server, &token, "?type=key_rotation_started")
        .await
        .json()
        .await
        .expect("json");
    let only = body.as_array().expect("events");
    assert_eq!(only.len(), 12);
    assert!(only.iter().all(|e| e["type"] == "key_rotation_started"));
    let since = (base + Duration::from_secs(20))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    let body: Value = get(&http, &server, &token, &format!("?since={since}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body.as_array().expect("events").len(), 5);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_security_events_needs_security_read_and_bad_filters_are_invalid_requests() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = reqwest::Client::new();
    let (plain_id, plain) = user_token(&env, None).await;
    let r = get(&http, &server, &plain, "").await;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(env.wait_for_events("permission_denied", 1).await, 1);
    let denied_user: Option<Uuid> =
        sqlx::query_scalar("SELECT user_id FROM security_events WHERE type = 'permission_denied'")
            .fetch_one(&env.pool)
            .await
            .expect("row");
    assert_eq!(denied_user, Some(plain_id));

    let r = http
        .get(server.url("/v1/admin/security-events"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);

    let (_, officer) = user_token(&env, Some(PlatformRole::SecurityOfficer)).await;
    for bad in [
        "?type=not_a_type",
        "?since=yesterday",
        "?since=2026-11-29",
        "?limit=0",
        "?limit=1001",
        "?limit=ten",
        "?before=garbage",
        "?colour=blue",
    ] {
        let r = get(&http, &server, &officer, bad).await;
        assert_eq!(r.status(), 400, "{bad}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"], "invalid_request", "{bad}");
    }
    let r = get(
        &http,
        &server,
        &officer,
        "?limit=1000&type=suspicious_activity",
    )
    .await;
    assert_eq!(r.status(), 200);
    server.stop().await;
    env.cleanup().await;
}
