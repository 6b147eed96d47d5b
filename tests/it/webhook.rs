//! The webhook path end to end: HTTP → Redis → worker → committed rows, against real
//! PostgreSQL and Redis.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use gatehouse::http::AppState;
use gatehouse::http::key_cache::KeyCache;
use gatehouse_jobs::client::Enqueue;
use gatehouse_jobs::{InboundMessage, Job};
use gatehouse_testenv::*;

/// The headers SPEC's transport security puts on every response (`DEBUG=false`).
const SECURITY_HEADERS: [&str; 5] = [
    "strict-transport-security",
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
    "content-security-policy",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signed_message_travels_from_http_through_redis_to_a_committed_row() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let worker = env.start_worker();
    let sid = message_sid();
    let response = signed_form(
        &client(),
        &server,
        tenant,
        &sms_params(
            &sid,
            "+14155550100",
            "Do you have the blue shoes in size 42?",
        ),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/xml"))
    );
    assert!(response.text().await.expect("body").contains("<Response/>"));

    let n = env
        .wait_for_count("SELECT count(*) FROM messages", 1, Duration::from_secs(20))
        .await;
    assert_eq!(n, 1, "the message row is committed by the worker");
    let (intent, body, sealed, stored_sid): (String, String, Vec<u8>, String) =
        sqlx::query_as("SELECT intent, body, from_number, message_sid FROM messages")
            .fetch_one(&env.pool)
            .await
            .expect("row");
    assert_eq!(intent, "product_question");
    assert_eq!(body, "Do you have the blue shoes in size 42?");
    assert_eq!(stored_sid, sid);
    assert!(
        !sealed.windows(12).any(|w| w == b"+14155550100"),
        "the phone number is sealed, not stored in clear"
    );
    assert_eq!(sealed[0], 1, "envelope version byte");
    assert_eq!(env.count("SELECT count(*) FROM processed_jobs").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM conversations").await, 1);

    // The job is acknowledged in Redis (done, held by no worker in the inflight hash), so
    // orphan recovery can never run it again.
    let mut redis = env.redis.clone();
    let done_key = format!("{}:{{inbound_message:0}}:done", env.namespace);
    let mut done = 0;
    for _ in 0..100 {
        // `done` is a sorted set by finish time (the vacuum's index).
        done = redis::cmd("ZCARD")
            .arg(&done_key)
            .query_async(&mut redis)
            .await
            .expect("zcard");
        if done == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(done, 1);
    let held: i64 = redis::cmd("HLEN")
        .arg(env.queues().keys("inbound_message").inflight())
        .query_async(&mut redis)
        .await
        .expect("hlen");
    assert_eq!(held, 0, "no worker holds a job");

    worker.stop().await.expect("worker stops cleanly");
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_message_sid_delivered_twenty_times_at_once_yields_one_job_and_one_row() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let sid = message_sid();
    let params = sms_params(&sid, "+14155550100", "hello");
    let http = client();
    let sends = (0..20).map(|_| signed_form(&http, &server, tenant, &params).send());
    for response in futures::future::join_all(sends).await {
        assert_eq!(response.expect("request").status(), 200);
    }
    assert_eq!(
        env.queued("inbound_message").await,
        1,
        "one job for twenty deliveries"
    );

    let worker = env.start_worker();
    let n = env
        .wait_for_count("SELECT count(*) FROM messages", 1, Duration::from_secs(20))
        .await;
    assert_eq!(n, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.count("SELECT count(*) FROM messages").await, 1);
    worker.stop().await.expect("worker stops cleanly");
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redelivered_job_changes_nothing() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let queues = env.queues();
    let mut redis = env.redis.clone();
    let job = InboundMessage {
        tenant_id: tenant,
        message_sid: message_sid(),
        from: "+14155550100".into(),
        to: "+14155550199".into(),
        body: "qwzx".into(),
        received_at: "2026-11-28T10:00:00Z".into(),
    };
    let first = queues
        .enqueue(&mut redis, &job, Enqueue::default())
        .await
        .expect("enqueue");
    let worker = env.start_worker();
    assert_eq!(
        env.wait_for_count(
            "SELECT count(*) FROM processed_jobs",
            1,
            Duration::from_secs(20)
        )
        .await,
        1
    );
    // Redelivery, as orphan recovery does it: the same job id back on the active list.
    let _: i64 = redis::cmd("RPUSH")
        .arg(format!("{}:{{inbound_message:0}}:active", env.namespace))
        .arg(&first.job_id)
        .query_async(&mut redis)
        .await
        .expect("rpush");
    // And the same job id enqueued again through the client is refused outright.
    let again = queues
        .enqueue(
            &mut redis,
            &job,
            Enqueue {
                job_id: Some(first.job_id.clone()),
                ..Enqueue::default()
            },
        )
        .await
        .expect("enqueue");
    assert!(!again.created);
    for _ in 0..100 {
        if env.queued("inbound_message").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.count("SELECT count(*) FROM messages").await, 1);
    let count: i32 = sqlx::query_scalar("SELECT low_confidence_count FROM conversations")
        .fetch_one(&env.pool)
        .await
        .expect("conversation");
    assert_eq!(count, 1, "the streak counted the message once");
    worker.stop().await.expect("worker stops cleanly");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_for_an_unknown_tenant_is_dead_lettered_without_retries() {
    let env = TestEnv::new().await;
    let queues = env.queues();
    let mut redis = env.redis.clone();
    let job = InboundMessage {
        tenant_id: uuid::Uuid::new_v4(),
        message_sid: message_sid(),
        from: "+14155550100".into(),
        to: "+14155550199".into(),
        body: "hello".into(),
        received_at: "2026-11-28T10:00:00Z".into(),
    };
    let enqueued = queues
        .enqueue(&mut redis, &job, Enqueue::default())
        .await
        .expect("enqueue");
    let worker = env.start_worker();
    let dead = env
        .wait_for_dead(
            InboundMessage::QUEUE,
            &enqueued.job_id,
            Duration::from_secs(10),
        )
        .await;
    assert!(dead, "a permanent failure goes straight to the dead set");
    assert_eq!(env.count("SELECT count(*) FROM messages").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM processed_jobs").await, 0);
    worker.stop().await.expect("worker stops cleanly");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_signature_is_refused_with_403_and_a_security_event() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let params = sms_params(&message_sid(), "+14155550100", "hello");
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    let response = client()
        .post(server.url(&webhook_path(tenant)))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", "bCKNFa1ALlAtW1bWNwG18+MUxZY=")
        .body(body.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 403);
    let json: serde_json::Value = response.json().await.expect("json");
    assert_eq!(json["error"]["code"], "invalid_signature");

    // An unknown tenant looks exactly the same.
    let unknown = client()
        .post(server.url(&webhook_path(uuid::Uuid::new_v4())))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", "bCKNFa1ALlAtW1bWNwG18+MUxZY=")
        .body(body)
        .send()
        .await
        .expect("request");
    assert_eq!(unknown.status(), 403);
    let json2: serde_json::Value = unknown.json().await.expect("json");
    assert_eq!(json, json2);

    let events = env
        .wait_for_count(
            "SELECT count(*) FROM security_events WHERE type = 'invalid_webhook_signature'",
            2,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(events, 2);
    // The refusal's one record says why, for an operator diagnosing a URL mismatch: a
    // mismatch for the real tenant, nothing but "unknown tenant" for the other.
    let details: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT details FROM security_events WHERE type = 'invalid_webhook_signature'
          ORDER BY (tenant_id IS NULL), id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("details");
    assert_eq!(
        details,
        [
            serde_json::json!({
                "reason": "signature",
                "error": "webhook signature does not match",
                // The URL the signature was checked against, to compare with Twilio's console.
                "url": format!("{PUBLIC_BASE}{}", webhook_path(tenant)),
            }),
            serde_json::json!({"reason": "unknown tenant"}),
        ]
    );
    assert_eq!(
        env.queued("inbound_message").await,
        0,
        "nothing is enqueued for a forged request"
    );
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_malformed_and_mistyped_bodies_are_refused_and_the_server_stays_healthy() {
    let env = TestEnv::with_vars(|v| {
        v.insert("MAX_BODY_BYTES".into(), "4096".into());
    })
    .await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let http = client();
    let url = server.url(&webhook_path(tenant));

    let big = "Body=".to_owned() + &"x".repeat(10_000);
    let r = http
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .body(big.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 413);

    // Chunked: no Content-Length, the limit still holds.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|_| Ok(vec![b'x'; 1000])).collect();
    let r = http
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 413);
    // The unread rest of the body makes the connection unusable: the answer says so, so
    // the client opens a new one for its next request instead of racing the close.
    assert_eq!(
        r.headers().get("connection").and_then(|v| v.to_str().ok()),
        Some("close")
    );

    let r = http
        .post(&url)
        .header("content-type", "text/plain")
        .header("x-forwarded-proto", "https")
        .body("hello")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 415);

    // Correctly signed but missing MessageSid: 400 naming the field.
    let params = vec![("Body".to_owned(), "hi".to_owned())];
    let r = signed_form(&http, &server, tenant, &params)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 400);
    let json: serde_json::Value = r.json().await.expect("json");
    assert_eq!(json["error"]["code"], "invalid_request");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("MessageSid"))
    );

    // Garbage bytes, signed or not, never crash anything.
    let r = http
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", "%%%not-base64")
        .body(vec![0xff, 0xfe, 0x00, b'=', b'&', 0x80])
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403);

    // Wrong method and unknown path answer in the same JSON error shape.
    let r = http
        .get(&url)
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 405);
    let json: serde_json::Value = r.json().await.expect("json");
    assert_eq!(json["error"]["code"], "method_not_allowed");
    let r = http
        .get(server.url("/nope"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
    let json: serde_json::Value = r.json().await.expect("json");
    assert_eq!(json["error"]["code"], "not_found");

    let health = http
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = http
        .get(server.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_route_answers_500_with_the_security_headers_and_the_server_stays_up() {
    let env = TestEnv::new().await;
    let state = env.app_state();
    let routes = axum::Router::new().route(
        "/boom",
        axum::routing::get(|| async {
            if std::hint::black_box(true) {
                panic!("a handler bug");
            }
            "unreachable"
        }),
    );
    let limits = gatehouse::server::Limits::from_config(&state.config);
    let app = gatehouse::http::layered(
        routes,
        gatehouse::http::metrics::RouteTemplates::new(["/boom"]),
        state,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(gatehouse::server::run(
        listener,
        limits,
        move |peer, watch| app.connection(peer, watch),
        std::future::pending(),
    ));
    let http = client();
    for _ in 0..2 {
        let r = http
            .get(format!("http://{addr}/boom"))
            .header("x-forwarded-proto", "https")
            .send()
            .await
            .expect("the server answers a panicking route");
        assert_eq!(r.status(), 500);
        for name in SECURITY_HEADERS.iter().chain(&["x-request-id"]) {
            assert!(r.headers().contains_key(*name), "{name} on a panic's 500");
        }
        let json: serde_json::Value = r.json().await.expect("json");
        assert_eq!(json["error"]["code"], "internal");
        assert!(
            !json.to_string().contains("a handler bug"),
            "the panic message stays out of the answer"
        );
    }
    // Counted by its route's template, as any route's answer.
    let text = gatehouse::metrics::render(&gatehouse::metrics::install());
    let line = "gatehouse_http_requests_total{method=\"GET\",route=\"/boom\",status=\"500\"} 2";
    assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    server.abort();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plain_http_is_redirected_and_every_response_carries_security_headers() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = client();
    let r = http
        .post(server.url("/v1/webhooks/twilio/x/messages?a=1"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 301);
    assert_eq!(
        r.headers().get("location").and_then(|v| v.to_str().ok()),
        Some("https://gh.example.com/v1/webhooks/twilio/x/messages?a=1")
    );
    for name in SECURITY_HEADERS {
        assert!(r.headers().contains_key(name), "{name} on a redirect");
    }
    assert_eq!(
        r.headers()
            .get("strict-transport-security")
            .and_then(|v| v.to_str().ok()),
        Some("max-age=31536000; includeSubDomains; preload")
    );
    // Health endpoints are exempt from the redirect.
    let h = http
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(h.status(), 200);
    assert!(h.headers().contains_key("x-frame-options"));
    server.stop().await;

    // X-Forwarded-Proto from a peer outside TRUSTED_PROXIES is ignored.
    let untrusting = TestEnv::with_vars(|v| {
        v.insert("TRUSTED_PROXIES".into(), "10.0.0.0/8".into());
    })
    .await;
    let server = untrusting.start_server().await;
    let r = http
        .post(server.url("/v1/webhooks/twilio/x/messages"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 301);
    server.stop().await;
    untrusting.cleanup().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn debug_mode_turns_off_the_redirect_and_hsts_only() {
    let env = TestEnv::with_vars(|v| {
        v.insert("DEBUG".into(), "true".into());
        v.insert("PUBLIC_BASE_URL".into(), PUBLIC_BASE.into());
    })
    .await;
    let server = env.start_server().await;
    let r = client()
        .post(server.url("/v1/webhooks/twilio/x/messages"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("a=b")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403, "no redirect; the signature check answers");
    assert!(!r.headers().contains_key("strict-transport-security"));
    assert!(r.headers().contains_key("x-content-type-options"));
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_known_tenant_keeps_flowing_into_redis_while_postgres_is_down() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let never_seen = env.create_tenant().await;
    let dead_pool = gatehouse::db::connect_lazy(
        &secrecy::SecretString::from("postgres://postgres@127.0.0.1:1/none".to_owned()),
        1,
    )
    .expect("lazy pool");
    // An ingress whose PostgreSQL is unreachable, and whose cache saw `tenant` a while ago
    // (entries live 1 s here; the outage outlasts that).
    let mut state = AppState::new(env.config.clone(), dead_pool, env.redis.clone());
    state.key_cache = KeyCache::new(Duration::from_secs(1));
    let state = Arc::new(state);
    let warmed = state
        .key_cache
        .get(&env.pool, &env.config.keyring, tenant)
        .await
        .expect("keys load while PostgreSQL is up");
    assert!(warmed.is_some());
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let server = TestServer::start(state).await;
    let http = client();
    let sms = sms_params(&message_sid(), "+14155550100", "hi");
    let r = signed_form(&http, &server, tenant, &sms)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200, "the cached keys verify during the outage");
    assert_eq!(
        env.queued("inbound_message").await,
        1,
        "the message is in Redis"
    );

    // A tenant this ingress never saw cannot be verified now: 503, never 200.
    let r = signed_form(&http, &server, never_seen, &sms)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let json: serde_json::Value = r.json().await.expect("json");
    assert_eq!(json["error"]["code"], "unavailable");
    assert_eq!(env.queued("inbound_message").await, 1);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_auth_token_reaches_the_ingress_through_the_background_refresh() {
    use gatehouse::security::keyring::aad;
    let env = TestEnv::with_vars(|v| {
        v.insert("TENANT_KEY_CACHE_SECONDS".into(), "1".into());
    })
    .await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let http = client();
    let sms = || sms_params(&message_sid(), "+14155550100", "hi");
    let old = signed_form(&http, &server, tenant, &sms())
        .send()
        .await
        .expect("request");
    assert_eq!(old.status(), 200);

    let new_token = "fedcba0987654321fedcba0987654321";
    sqlx::query("UPDATE tenants SET twilio_auth_token = $2 WHERE id = $1")
        .bind(tenant)
        .bind(env.config.keyring.seal(
            new_token.as_bytes(),
            &aad("tenants", "twilio_auth_token", &tenant.to_string()),
        ))
        .execute(&env.pool)
        .await
        .expect("rotate token");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // The first request past the TTL is answered from the cache while it refreshes.
    let stale = signed_form(&http, &server, tenant, &sms())
        .send()
        .await
        .expect("request");
    assert_eq!(stale.status(), 200);
    let mut refreshed = false;
    for _ in 0..100 {
        let r = signed_form_with(&http, &server, tenant, &sms(), new_token)
            .send()
            .await
            .expect("request");
        if r.status() == 200 {
            refreshed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refreshed, "the new token verifies once the refresh has run");
    let old_again = signed_form(&http, &server, tenant, &sms())
        .send()
        .await
        .expect("request");
    assert_eq!(old_again.status(), 403, "the old token no longer does");
    server.stop().await;
    env.cleanup().await;
}

/// The tenant of the shared test vectors, re-created under the vectors' fixed id.
async fn vector_tenant(env: &TestEnv, shared_key: (&str, &str)) -> uuid::Uuid {
    use gatehouse::security::keyring::aad;
    let created = env.create_tenant().await;
    let id = uuid::Uuid::parse_str("7b0c5c5e-3f0a-4c5e-9a64-2f1f6f0b9d11").expect("uuid");
    let row = id.to_string();
    let keyring = &env.config.keyring;
    sqlx::query(
        "UPDATE tenants SET id = $2, twilio_auth_token = $3, webhook_shared_key_id = $4,
                webhook_shared_key = $5 WHERE id = $1",
    )
    .bind(created)
    .bind(id)
    .bind(keyring.seal(TOKEN.as_bytes(), &aad("tenants", "twilio_auth_token", &row)))
    .bind(shared_key.0)
    .bind(keyring.seal(
        shared_key.1.as_bytes(),
        &aad("tenants", "webhook_shared_key", &row),
    ))
    .execute(&env.pool)
    .await
    .expect("re-key tenant");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signatures_made_by_twilios_own_library_are_accepted_over_http() {
    let env = TestEnv::new().await;
    let vectors: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/testdata/twilio-signatures.json"
        ))
        .expect("test vectors exist"),
    )
    .expect("vectors parse");
    let shared_key_id = "KS0123456789abcdef0123456789abcdef";
    let tenant = vector_tenant(
        &env,
        (shared_key_id, "whsk_9f8e7d6c5b4a39281706f5e4d3c2b1a0"),
    )
    .await;
    let server = env.start_server().await;
    let http = client();
    let mut accepted = 0;
    for case in vectors["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let url = case["url_signed"].as_str().expect("url");
        let Some(rest) = url.strip_prefix(&format!("{PUBLIC_BASE}/v1/webhooks/twilio/{tenant}/"))
        else {
            continue; // vectors for other hosts and ports are covered by the unit tests
        };
        let target = server.url(&format!("/v1/webhooks/twilio/{tenant}/{rest}"));
        let mut request = http
            .post(&target)
            .header("x-forwarded-proto", "https")
            .header(
                "x-twilio-signature",
                case["expected_signature"].as_str().expect("signature"),
            );
        let (body, content_type) = if let Some(json) = case["json_body"].as_str() {
            (json.to_owned(), "application/json")
        } else {
            let pairs: Vec<(String, String)> = match &case["form_params"] {
                serde_json::Value::Object(map) => map
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect(),
                _ => case["form_pairs"]
                    .as_array()
                    .expect("pairs")
                    .iter()
                    .map(|p| {
                        (
                            p[0].as_str().unwrap_or_default().to_owned(),
                            p[1].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect(),
            };
            let body = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs.iter())
                .finish();
            (body, "application/x-www-form-urlencoded")
        };
        if case["algorithm"] == "HMAC_SHA256" {
            request = request.header(
                "x-twilio-webhooks-signature-settings",
                format!("key={shared_key_id},algorithm=HMAC_SHA256"),
            );
        }
        let response = request
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        if body.contains("MessageSid") {
            assert_eq!(status, 200, "{name}");
            accepted += 1;
        } else {
            // Verified, but not a message: the signature passed, the fields did not.
            assert_eq!(status, 400, "{name}");
        }
        // Any change to the body is refused.
        let tampered = body.replacen('0', "1", 1)
            + if content_type.ends_with("json") {
                " "
            } else {
                "&x=1"
            };
        let forged = http
            .post(&target)
            .header("x-forwarded-proto", "https")
            .header(
                "x-twilio-signature",
                case["expected_signature"].as_str().expect("signature"),
            )
            .header("content-type", content_type)
            .body(tampered)
            .send()
            .await
            .expect("request");
        assert_eq!(forged.status(), 403, "{name} tampered");
    }
    assert!(
        accepted >= 5,
        "the vectors for this tenant were exercised ({accepted})"
    );
    let mut redis = env.redis.clone();
    let queued: i64 = redis::cmd("LLEN")
        .arg(format!("{}:{{inbound_message:0}}:active", env.namespace))
        .query_async(&mut redis)
        .await
        .expect("llen");
    assert_eq!(
        queued, 1,
        "every vector carries the same MessageSid: one job"
    );
    server.stop().await;
    env.cleanup().await;
}

/// Twilio's fields plus numbered filler, `total` parameters in all.
fn params_totalling(sid: &str, total: usize) -> Vec<(String, String)> {
    let mut params = sms_params(sid, "+14155550100", "hello");
    let filler = total - params.len();
    params.extend((0..filler).map(|i| (format!("p{i}"), "v".to_owned())));
    assert_eq!(params.len(), total);
    params
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signed_form_of_1000_parameters_is_verified_and_accepted() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let r = signed_form(
        &client(),
        &server,
        tenant,
        &params_totalling(&message_sid(), 1_000),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(env.queued("inbound_message").await, 1);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_form_of_1001_parameters_is_refused_with_400_before_its_signature_is_checked() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let http = client();
    let expect_400 = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 400);
        let json: serde_json::Value = r.json().await.expect("json");
        assert_eq!(json["error"]["code"], "invalid_request");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("1000 parameters")),
            "{json}"
        );
    };
    // Correctly signed: still refused, the count comes first.
    let too_many = params_totalling(&message_sid(), 1_001);
    expect_400(
        signed_form(&http, &server, tenant, &too_many)
            .send()
            .await
            .expect("request"),
    )
    .await;
    // What the issue measured: a 1 MiB body of bare names, for a known tenant and for an
    // unknown one, with a forged signature.
    let bare = "a&".repeat(512 * 1024 - 1);
    for target in [tenant, uuid::Uuid::new_v4()] {
        expect_400(
            http.post(server.url(&webhook_path(target)))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-forwarded-proto", "https")
                .header("x-twilio-signature", "bCKNFa1ALlAtW1bWNwG18+MUxZY=")
                .body(bare.clone())
                .send()
                .await
                .expect("request"),
        )
        .await;
    }
    // None of them left an event: a forgery sent after them leaves the first and only one.
    let forged = http
        .post(server.url(&webhook_path(tenant)))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", "bCKNFa1ALlAtW1bWNwG18+MUxZY=")
        .body("MessageSid=SM0123456789abcdef0123456789abcdef&From=%2B14155550100")
        .send()
        .await
        .expect("request");
    assert_eq!(forged.status(), 403);
    assert_eq!(env.wait_for_events("invalid_webhook_signature", 1).await, 1);
    server.stop().await;
    assert_eq!(env.events_of("invalid_webhook_signature").await, 1);
    assert_eq!(
        env.queued("inbound_message").await,
        0,
        "nothing was enqueued"
    );
    env.cleanup().await;
}

/// A JSON body signed as Twilio signs one: the URL carries the body's SHA-256.
fn signed_json(
    http: &reqwest::Client,
    server: &TestServer,
    tenant: uuid::Uuid,
    body: &str,
) -> reqwest::RequestBuilder {
    use gatehouse::security::twilio::{Algorithm, body_sha256_hex, sign_form};
    let path = format!(
        "{}?bodySHA256={}",
        webhook_path(tenant),
        body_sha256_hex(body.as_bytes())
    );
    let signature = sign_form(
        &format!("{PUBLIC_BASE}{path}"),
        &[],
        TOKEN.as_bytes(),
        Algorithm::HmacSha1,
    );
    http.post(server.url(&path))
        .header("content-type", "application/json")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", signature)
        .body(body.to_owned())
}

fn json_members(sid: &str, total: usize) -> String {
    let mut members = serde_json::Map::new();
    members.insert("MessageSid".into(), sid.into());
    members.insert("From".into(), "+14155550100".into());
    members.insert("Body".into(), "hello".into());
    for i in 0..total - 3 {
        members.insert(format!("p{i}"), serde_json::json!({"nested": [i]}));
    }
    serde_json::Value::Object(members).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signed_json_body_is_read_up_to_1000_members_and_refused_past_them() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let http = client();
    let r = signed_json(&http, &server, tenant, &json_members(&message_sid(), 1_000))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let r = signed_json(&http, &server, tenant, &json_members(&message_sid(), 1_001))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 400);
    let json: serde_json::Value = r.json().await.expect("json");
    assert_eq!(json["error"]["code"], "invalid_request");
    // Not JSON at all, and JSON that is not an object, are what they were.
    for (body, needle) in [
        ("{\"MessageSid\":", "not valid JSON"),
        ("[1,2]", "MessageSid"),
    ] {
        let r = signed_json(&http, &server, tenant, body)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 400);
        let json: serde_json::Value = r.json().await.expect("json");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(needle)),
            "{body}: {json}"
        );
    }
    assert_eq!(env.queued("inbound_message").await, 1, "only the first");
    server.stop().await;
    env.cleanup().await;
}
