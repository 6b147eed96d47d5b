//! Producers: a service account gets a token and enqueues jobs through `POST /v1/jobs/{queue}`;
//! the payload follows the committed schema, the tenant must exist, `Idempotency-Key` holds,
//! and the job runs to a committed row.

use std::time::Duration;

use crate::common::*;
use gatehouse_testenv::*;
use reqwest::Method;
use serde_json::{Value, json};

fn post(server: &TestServer, path: &str, token: &str) -> reqwest::RequestBuilder {
    client()
        .request(Method::POST, server.url(path))
        .header("x-forwarded-proto", "https")
        .bearer_auth(token)
}

fn message(tenant: uuid::Uuid) -> Value {
    json!({
        "tenant_id": tenant,
        "message_sid": message_sid(),
        "from": "+14155550100",
        "to": "+14155550199",
        "body": "Where is my order?",
        "received_at": "2026-11-28T10:00:00Z",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_producer_enqueues_a_message_that_a_worker_commits() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let worker = env.start_worker();
    let token = service_token(&env, &server.url(""), &["jobs:enqueue"]).await;
    let r = post(&server, "/v1/jobs/inbound_message", &token)
        .json(&message(tenant))
        .send()
        .await
        .expect("enqueue");
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.expect("json");
    assert!(body["job_id"].as_str().is_some_and(|id| !id.is_empty()));
    let n = env
        .wait_for_count("SELECT count(*) FROM messages", 1, Duration::from_secs(20))
        .await;
    assert_eq!(n, 1);
    let intent: String = sqlx::query_scalar("SELECT intent FROM messages")
        .fetch_one(&env.pool)
        .await
        .expect("row");
    assert_eq!(intent, "order_status");
    let _ = worker.stop().await;
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_payloads_are_refused_naming_the_field_and_nothing_is_enqueued() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let token = service_token(&env, &server.url(""), &["jobs:enqueue"]).await;
    let mut extra = message(tenant);
    extra["admin"] = json!(true);
    let mut bad_sid = message(tenant);
    bad_sid["message_sid"] = json!(42);
    let mut missing = message(tenant);
    missing.as_object_mut().map(|o| o.remove("from"));
    let unknown_tenant = message(uuid::Uuid::new_v4());
    let mut bad_time = message(tenant);
    bad_time["received_at"] = json!("yesterday");
    for (payload, names) in [
        (extra, "admin"),
        (bad_sid, "/message_sid"),
        (missing, "from"),
        (unknown_tenant, "/tenant_id"),
        (bad_time, "/received_at"),
    ] {
        let r = post(&server, "/v1/jobs/inbound_message", &token)
            .json(&payload)
            .send()
            .await
            .expect("enqueue");
        assert_eq!(r.status(), 400, "{payload}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"], "invalid_payload");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(names), "{message} should name {names}");
    }
    let r = post(&server, "/v1/jobs/inbound_message", &token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("enqueue");
    assert_eq!(r.status(), 400);
    let r = post(&server, "/v1/jobs/no_such_queue", &token)
        .json(&json!({}))
        .send()
        .await
        .expect("enqueue");
    assert_eq!(r.status(), 404);
    assert_eq!(env.queued("inbound_message").await, 0);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_idempotency_key_returns_the_first_job_and_enqueues_nothing_more() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let token = service_token(&env, &server.url(""), &["jobs:enqueue"]).await;
    let payload =
        json!({"tenant_id": tenant, "requested_by": uuid::Uuid::new_v4(), "mode": "full"});
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = post(&server, "/v1/jobs/sync_catalog", &token)
            .header("idempotency-key", "order-42-sync")
            .json(&payload)
            .send()
            .await
            .expect("enqueue");
        assert_eq!(r.status(), 202);
        let body: Value = r.json().await.expect("json");
        ids.push(body["job_id"].as_str().expect("id").to_owned());
    }
    assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
    // Another key is another job.
    let r = post(&server, "/v1/jobs/sync_catalog", &token)
        .header("idempotency-key", "order-43-sync")
        .json(&payload)
        .send()
        .await
        .expect("enqueue");
    assert_eq!(r.status(), 202);
    assert_eq!(env.queued("sync_catalog").await, 2);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enqueueing_needs_the_scope_and_rotation_never_starts_from_a_producer() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let reader = service_token(&env, &server.url(""), &["security:read"]).await;
    let r = post(&server, "/v1/jobs/inbound_message", &reader)
        .json(&message(tenant))
        .send()
        .await
        .expect("enqueue");
    assert_eq!(r.status(), 403);
    let producer = service_token(&env, &server.url(""), &["jobs:enqueue", "platform:admin"]).await;
    let r = post(&server, "/v1/jobs/rotate_keys", &producer)
        .json(&json!({"rotation_id": uuid::Uuid::new_v4()}))
        .send()
        .await
        .expect("enqueue");
    assert_eq!(r.status(), 403);
    assert_eq!(env.queued("rotate_keys").await, 0);
    let anonymous = client()
        .post(server.url("/v1/jobs/inbound_message"))
        .header("x-forwarded-proto", "https")
        .json(&message(tenant))
        .send()
        .await
        .expect("enqueue");
    assert_eq!(anonymous.status(), 401);
    server.stop().await;
    env.cleanup().await;
}
