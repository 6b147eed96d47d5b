//! Customer data in Redis (SPEC "Customer data in Redis"), end to end against real `gatehouse
//! serve` and `gatehouse work` processes: a marker phone number and a marker body, sent through
//! every producer path (the signed webhook, `POST /v1/jobs/inbound_message`, the
//! `gatehouse_jobs` client), appear in no key, field, member or value of the test's Redis
//! namespace while queued, once done, or dead; a sealed payload moved to another job, or sealed
//! under a key the worker lacks, is dead at once with an `encryption_error`; and nothing an
//! operator or a collector sees — job errors, `jobs dead`, the dashboard, the security-events
//! API, Sentry, `/metrics` of both processes, their logs — shows the values either.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::dashboard::{Agent, PAGES};
use gatehouse::access::PlatformRole;
use gatehouse_jobs::InboundMessage;
use gatehouse_jobs::client::{Enqueue, Queues};
use gatehouse_jobs::envelope::EncryptionKey;
use gatehouse_testenv::*;
use serde_json::{Value, json};
use uuid::Uuid;

/// The customer's number (`from`): sealed in Redis, sealed in `messages.from_number`.
const FROM: &str = "+15005550123";
/// The tenant's number (`to`): sealed in Redis (stored in the clear in `messages.to_number`).
const TO: &str = "+15005550188";
/// In a customer's body, the fake LLM answers 500 (an answer that counts: retried, then dead).
const PLEASE_FAIL: &str = "please-fail";
const QUEUE: &str = "inbound_message";

/// The values no place may show: both numbers, with and without their `+` (a URL-encoded
/// `%2B…` still shows the digits), and this test's body.
struct Markers {
    body: String,
}

impl Markers {
    fn new() -> Self {
        Self {
            body: format!("marker-body-{}", Uuid::new_v4().simple()),
        }
    }

    fn needles(&self) -> [&str; 5] {
        [FROM, &FROM[1..], TO, &TO[1..], self.body.as_str()]
    }

    /// Panics naming `what` if `text` holds any marker.
    fn assert_absent(&self, what: &str, text: &str) {
        for needle in self.needles() {
            if let Some(at) = text.find(needle) {
                let around = at.saturating_sub(200)..(at + needle.len() + 200).min(text.len());
                let excerpt = text.get(around).unwrap_or(text);
                panic!("{what} shows {needle:?}: …{excerpt}…");
            }
        }
    }

    fn message(&self, tenant: Uuid, body: &str) -> InboundMessage {
        InboundMessage {
            tenant_id: tenant,
            message_sid: message_sid(),
            from: FROM.into(),
            to: TO.into(),
            body: body.into(),
            received_at: "2026-12-06T10:00:00Z".into(),
        }
    }
}

/// Every string a `redis::Value` holds (scores and counts left out).
fn strings_of(value: &redis::Value, out: &mut Vec<String>) {
    use redis::Value as V;
    match value {
        V::BulkString(bytes) => out.push(String::from_utf8_lossy(bytes).into_owned()),
        V::SimpleString(text) => out.push(text.clone()),
        V::VerbatimString { text, .. } => out.push(text.clone()),
        V::Array(items) | V::Set(items) => items.iter().for_each(|v| strings_of(v, out)),
        V::Map(pairs) => pairs.iter().for_each(|(k, v)| {
            strings_of(k, out);
            strings_of(v, out);
        }),
        _ => {}
    }
}

/// Every key of the namespace with everything it holds: a string's value, a hash's fields and
/// values, a list's items, a set's and a sorted set's members, a stream's entries. A type this
/// does not read fails the test (nothing is skipped unread).
async fn namespace_contents(env: &TestEnv) -> Vec<(String, Vec<String>)> {
    let mut redis = env.redis.clone();
    let keys = env.keys_matching("*").await;
    let mut contents = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .expect("type");
        let read = |name: &str| {
            let mut cmd = redis::cmd(name);
            cmd.arg(&key);
            cmd
        };
        let cmd = match kind.as_str() {
            // Gone since the scan (a signal token taken, say).
            "none" => continue,
            "string" => read("GET"),
            "hash" => read("HGETALL"),
            "list" => {
                let mut c = read("LRANGE");
                c.arg(0).arg(-1);
                c
            }
            "set" => read("SMEMBERS"),
            "zset" => {
                let mut c = read("ZRANGE");
                c.arg(0).arg(-1);
                c
            }
            "stream" => {
                let mut c = read("XRANGE");
                c.arg("-").arg("+");
                c
            }
            other => panic!("key {key} is a {other}, which this scan does not read"),
        };
        let value: redis::Value = cmd.query_async(&mut redis).await.expect("read key");
        let mut strings = Vec::new();
        strings_of(&value, &mut strings);
        contents.push((key, strings));
    }
    contents
}

/// Scans the namespace (see [`namespace_contents`]) and asserts no key name or content holds a
/// marker; returns how many keys were read.
async fn assert_redis_clean(env: &TestEnv, markers: &Markers, stage: &str) -> usize {
    let contents = namespace_contents(env).await;
    for (key, strings) in &contents {
        markers.assert_absent(&format!("{stage}: the name of Redis key {key}"), key);
        for text in strings {
            markers.assert_absent(&format!("{stage}: Redis key {key}"), text);
        }
    }
    contents.len()
}

/// The `inbound_message` payloads in Redis by job id, each asserted sealed: a `sealed`
/// property and no `from`, `to` or `body`.
async fn sealed_payloads(env: &TestEnv) -> std::collections::HashMap<String, Value> {
    let mut redis = env.redis.clone();
    let all: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(env.queues().keys(QUEUE).data())
        .query_async(&mut redis)
        .await
        .expect("hgetall data");
    all.into_iter()
        .map(|(id, json)| {
            let payload: Value = serde_json::from_str(&json).expect("a JSON payload");
            assert!(
                payload["sealed"].as_str().is_some_and(|s| s.len() > 40),
                "job {id} rests sealed: {payload}"
            );
            for field in ["from", "to", "body"] {
                assert!(
                    payload.get(field).is_none(),
                    "job {id} has {field} in the open"
                );
            }
            (id, payload)
        })
        .collect()
}

/// Members of one of the queue's sorted sets (`done`, `dead`, `scheduled`).
async fn members(env: &TestEnv, key: String) -> Vec<String> {
    let mut redis = env.redis.clone();
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .expect("zrange")
}

/// One job's metadata.
async fn meta(env: &TestEnv, job_id: &str) -> std::collections::BTreeMap<String, String> {
    env.job_meta(QUEUE, job_id).await.0
}

/// Waits until the queue's `set` (`done`, `dead`) holds every one of `ids`.
async fn wait_in(env: &TestEnv, set: &str, ids: &[&str]) -> bool {
    let key = format!("{}:{set}", env.queues().keys(QUEUE).prefix);
    eventually(Duration::from_secs(20), || async {
        let now = members(env, key.clone()).await;
        ids.iter().all(|id| now.iter().any(|m| m == id))
    })
    .await
}

/// Panics with what a wait for `ids` could not see: each job's metadata and the processes'
/// logs (this test's own markers never reach them: the rest of the test checks that).
async fn stuck(env: &TestEnv, dir: &Path, what: &str, ids: &[&str]) -> ! {
    let mut report = String::new();
    for id in ids {
        report.push_str(&format!("job {id}: {:?}\n", meta(env, id).await));
    }
    for name in ["serve", "work"] {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        report.push_str(&format!("--- {name}.log\n{log}\n"));
    }
    panic!("{what}: not within the wait\n{report}");
}

/// `gatehouse {args}` as production runs it, its stdout and stderr in `dir/{name}.log`.
fn spawn_logged(
    env: &TestEnv,
    dir: &Path,
    name: &str,
    args: &[&str],
    extra: &[(&str, &str)],
) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    let err = log.try_clone().expect("log file");
    Command::new(gatehouse_bin())
        .args(args)
        .env_clear()
        .envs(env.vars.iter())
        .envs(extra.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn gatehouse")
}

fn read_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).expect("read log")
}

/// A Twilio SMS webhook's form from the marker numbers.
fn sms(body: &str) -> Vec<(String, String)> {
    let sid = message_sid();
    vec![
        ("MessageSid".into(), sid.clone()),
        ("SmsSid".into(), sid),
        ("AccountSid".into(), ACCOUNT_SID.into()),
        ("From".into(), FROM.into()),
        ("To".into(), TO.into()),
        ("Body".into(), body.into()),
        ("NumMedia".into(), "0".into()),
    ]
}

/// Sends the signed webhook to the ingress at `base` (200 expected).
async fn post_webhook(base: &str, tenant: Uuid, body: &str) {
    let r = signed_form_at(&client(), base, tenant, &sms(body), TOKEN)
        .send()
        .await
        .expect("webhook");
    assert_eq!(r.status(), 200, "the signed webhook is accepted");
}

/// `POST /v1/jobs/inbound_message` with the marker numbers (202 expected); the job id.
async fn post_job(base: &str, token: &str, tenant: Uuid, body: &str) -> String {
    let r = client()
        .post(format!("{base}/v1/jobs/inbound_message"))
        .header("x-forwarded-proto", "https")
        .bearer_auth(token)
        .json(&json!({
            "tenant_id": tenant,
            "message_sid": message_sid(),
            "from": FROM,
            "to": TO,
            "body": body,
            "received_at": "2026-12-06T10:00:00Z",
        }))
        .send()
        .await
        .expect("enqueue");
    assert_eq!(r.status(), 202, "the producer's job is accepted");
    let answer: Value = r.json().await.expect("json");
    answer["job_id"].as_str().expect("a job id").to_owned()
}

/// The stored message of `job_id`: its body, and its sealed `from_number`.
async fn stored(env: &TestEnv, job_id: &str) -> (String, Vec<u8>) {
    sqlx::query_as("SELECT body, from_number FROM messages WHERE job_id = $1")
        .bind(job_id)
        .fetch_one(&env.pool)
        .await
        .expect("the job's message row")
}

/// The job's message was stored as the product stores it: the body as sent, the customer's
/// number sealed (its bytes are not the number's).
async fn assert_stored(env: &TestEnv, job_id: &str, body: &str) {
    let (stored_body, from_number) = stored(env, job_id).await;
    assert_eq!(stored_body, body, "job {job_id} stored its body");
    assert!(
        !from_number
            .windows(FROM.len() - 1)
            .any(|w| w == &FROM.as_bytes()[1..]),
        "messages.from_number of job {job_id} is sealed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_customer_value_rests_in_redis_queued_done_or_dead_whichever_producer_sent_it() {
    let markers = Markers::new();
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let logs = tempfile::tempdir().expect("tempdir");
    let port = free_port().to_string();
    let mut serve = spawn_logged(&env, logs.path(), "serve", &["serve"], &[("PORT", &port)]);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&format!("{base}/healthz"), Duration::from_secs(15)).await;

    // Every producer path, with no worker running: the ingress (signed webhook), a producer
    // (`POST /v1/jobs`), the client; and through the client a job for a tenant that does not
    // exist, which the worker kills for its own fault.
    post_webhook(&base, tenant, &markers.body).await;
    let token = service_token(&env, &base, &["jobs:enqueue"]).await;
    let produced = post_job(&base, &token, tenant, &markers.body).await;
    let queues = env.queues();
    let client_job = enqueue(&queues, &env, &markers.message(tenant, &markers.body)).await;
    let orphan = enqueue(
        &queues,
        &env,
        &markers.message(Uuid::new_v4(), &markers.body),
    )
    .await;

    // (a) Queued.
    let payloads = sealed_payloads(&env).await;
    assert_eq!(payloads.len(), 4, "four jobs wait: {payloads:?}");
    let webhook_job = payloads
        .keys()
        .find(|id| ![&produced, &client_job, &orphan].contains(id))
        .expect("the webhook's job")
        .clone();
    assert_eq!(env.queued(QUEUE).await, 4);
    let keys = assert_redis_clean(&env, &markers, "queued").await;
    assert!(keys >= 6, "the scan read the queue's keys ({keys})");

    // (b), (c) A worker processes them: three stored (done, retained), one dead.
    let mut work = spawn_logged(&env, logs.path(), "work", &["work"], &[]);
    let done = [webhook_job.as_str(), produced.as_str(), client_job.as_str()];
    assert!(
        wait_in(&env, "done", &done).await,
        "the three jobs are done"
    );
    assert!(
        wait_in(&env, "dead", &[orphan.as_str()]).await,
        "the unknown tenant's job is dead"
    );
    for job in done {
        assert_stored(&env, job, &markers.body).await;
    }
    assert_eq!(env.count("SELECT count(*) FROM messages").await, 3);
    let orphan_meta = meta(&env, &orphan).await;
    assert_eq!(orphan_meta.get("attempts").map(String::as_str), Some("1"));
    assert!(
        orphan_meta
            .get("last_error")
            .is_some_and(|e| e.contains("unknown tenant")),
        "a permanent failure: {orphan_meta:?}"
    );
    // The payloads stay in Redis (done until vacuumed, dead until retried or purged), sealed.
    assert_eq!(sealed_payloads(&env).await.len(), 4);
    let keys = assert_redis_clean(&env, &markers, "done and dead").await;
    assert!(keys >= 8, "the scan read the queue's keys ({keys})");

    assert!(terminate(&mut work).success());
    assert!(terminate(&mut serve).success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sealed_payload_moved_to_another_job_or_sealed_under_an_unknown_key_is_dead_at_once() {
    let markers = Markers::new();
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let mut redis = env.redis.clone();
    let queues = env.queues();
    let a = enqueue(&queues, &env, &markers.message(tenant, &markers.body)).await;
    let b = enqueue(&queues, &env, &markers.message(tenant, "job B's own body")).await;
    // Sealed under a key that is neither the worker's current nor an old one.
    let stranger = enqueue(
        &Queues::new(env.namespace.clone()).sealing_with(EncryptionKey::generate()),
        &env,
        &markers.message(tenant, &markers.body),
    )
    .await;
    // A's sealed payload, moved into B's field.
    let data = queues.keys(QUEUE).data();
    let a_payload: String = redis::cmd("HGET")
        .arg(&data)
        .arg(&a)
        .query_async(&mut redis)
        .await
        .expect("A's payload");
    let () = redis::cmd("HSET")
        .arg(&data)
        .arg(&b)
        .arg(&a_payload)
        .query_async(&mut redis)
        .await
        .expect("B's payload replaced");

    let worker = env.start_worker();
    assert!(wait_in(&env, "done", &[a.as_str()]).await, "A is done");
    assert!(
        wait_in(&env, "dead", &[b.as_str(), stranger.as_str()]).await,
        "B and the stranger's job are dead"
    );
    assert_stored(&env, &a, &markers.body).await;
    assert_eq!(
        env.count("SELECT count(*) FROM messages").await,
        1,
        "only A stored a message"
    );
    assert_eq!(env.wait_for_events("encryption_error", 2).await, 2);

    for (job, reason) in [(&b, "decrypt"), (&stranger, "unknown_key")] {
        let m = meta(&env, job).await;
        assert_eq!(
            m.get("attempts").map(String::as_str),
            Some("1"),
            "{job}: {m:?}"
        );
        assert_eq!(m.get("status").map(String::as_str), Some("Killed"), "{m:?}");
        let error = m.get("last_error").expect("a last error");
        assert!(!error.is_empty());
        markers.assert_absent(&format!("last_error of {job}"), error);
        let events: Vec<Value> = sqlx::query_scalar(
            "SELECT details FROM security_events
             WHERE type = 'encryption_error' AND details->>'job_id' = $1",
        )
        .bind(job)
        .fetch_all(&env.pool)
        .await
        .expect("events");
        assert_eq!(
            events.len(),
            1,
            "one encryption_error for {job}: {events:?}"
        );
        let details = &events[0];
        assert_eq!(details["queue"], QUEUE);
        assert_eq!(details["operation"], QUEUE);
        assert_eq!(details["reason"], reason, "{details}");
        markers.assert_absent("an encryption_error event", &details.to_string());
    }
    // Never retried: not scheduled, and still on its one attempt after the worker moved on.
    let scheduled = members(&env, env.queues().keys(QUEUE).scheduled()).await;
    assert!(
        !scheduled.contains(&b) && !scheduled.contains(&stranger),
        "{scheduled:?}"
    );

    // What an operator reads of them through the API.
    let server = env.start_server().await;
    let reader = service_token(&env, &server.url(""), &["security:read"]).await;
    let r = client()
        .get(server.url("/v1/admin/security-events?type=encryption_error"))
        .header("x-forwarded-proto", "https")
        .bearer_auth(&reader)
        .send()
        .await
        .expect("security events");
    assert_eq!(r.status(), 200);
    let listed = r.text().await.expect("body");
    assert!(
        listed.contains(&b) && listed.contains(&stranger),
        "{listed}"
    );
    markers.assert_absent("GET /v1/admin/security-events", &listed);

    sealed_payloads(&env).await;
    assert_redis_clean(&env, &markers, "moved and foreign payloads").await;
    worker.stop().await.expect("worker stops");
    server.stop().await;
    env.cleanup().await;
}

/// An OpenAI-compatible LLM on loopback: a confident `order_status` for a message, except one
/// holding [`PLEASE_FAIL`], which gets a 500 whose page quotes the whole request (as some
/// servers' error pages do). Counts the calls.
async fn fake_llm() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use axum::response::IntoResponse;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |request: String| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                if request.contains(PLEASE_FAIL) {
                    return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, request)
                        .into_response();
                }
                axum::Json(confident_order_status()).into_response()
            }
        }),
    );
    let addr = serve_loopback(app).await;
    (addr, calls)
}

/// `GET url` (200 expected); the body.
async fn fetch(url: &str) -> String {
    let r = client().get(url).send().await.expect("GET");
    assert_eq!(r.status(), 200, "{url}");
    r.text().await.expect("body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_error_text_cli_dashboard_api_sentry_metrics_or_log_shows_a_customer_value() {
    let markers = Markers::new();
    let (llm, llm_calls) = fake_llm().await;
    let (sentry, envelopes) = fake_sentry().await;
    let env = TestEnv::with_vars(|vars| {
        vars.insert("LLM_URL".into(), format!("http://{llm}/v1"));
        vars.insert("LLM_MODEL".into(), "leak-test-model".into());
    })
    .await;
    let tenant = env.create_tenant().await;
    let officer = "officer@example.com";
    create_user(&env, officer, Some(PlatformRole::SecurityOfficer)).await;
    let logs = tempfile::tempdir().expect("tempdir");
    let dsn = format!("http://0123456789abcdef@{sentry}/42");
    let port = free_port().to_string();
    let health_port = free_port().to_string();
    let mut serve = spawn_logged(
        &env,
        logs.path(),
        "serve",
        &["serve"],
        &[("PORT", &port), ("SENTRY_DSN", &dsn)],
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&format!("{base}/healthz"), Duration::from_secs(15)).await;

    // One message that succeeds (the webhook), one the LLM keeps failing (a producer's:
    // retried, then dead), one for a tenant that does not exist (the client's: dead at once).
    post_webhook(&base, tenant, &markers.body).await;
    let token = service_token(&env, &base, &["jobs:enqueue"]).await;
    let failing = post_job(
        &base,
        &token,
        tenant,
        &format!("{} {PLEASE_FAIL}", markers.body),
    )
    .await;
    let mut redis = env.redis.clone();
    let orphan = enqueue(
        &env.queues(),
        &env,
        &markers.message(Uuid::new_v4(), &markers.body),
    )
    .await;
    let ok = sealed_payloads(&env)
        .await
        .into_keys()
        .find(|id| *id != failing && *id != orphan)
        .expect("the webhook's job");

    let as_sealed: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(env.queues().keys(QUEUE).data())
        .query_async(&mut redis)
        .await
        .expect("the payloads as enqueued");
    let mut work = spawn_logged(
        &env,
        logs.path(),
        "work",
        &["work"],
        &[("WORKER_HEALTH_PORT", &health_port), ("SENTRY_DSN", &dsn)],
    );
    if !wait_in(&env, "done", &[ok.as_str()]).await {
        stuck(&env, logs.path(), "the message is done", &[&ok]).await;
    }
    if !wait_in(&env, "dead", &[failing.as_str(), orphan.as_str()]).await {
        stuck(
            &env,
            logs.path(),
            "both failing jobs are dead",
            &[&failing, &orphan],
        )
        .await;
    }
    assert_stored(&env, &ok, &markers.body).await;
    assert_eq!(env.count("SELECT count(*) FROM messages").await, 1);

    // The job error texts.
    let failing_meta = meta(&env, &failing).await;
    let attempts = failing_meta.get("attempts").expect("attempts");
    assert!(
        attempts.parse::<u32>().is_ok_and(|n| n > 1)
            && failing_meta.get("max_attempts") == Some(attempts),
        "the LLM's 500s were retried to the last attempt: {failing_meta:?}"
    );
    assert!(
        failing_meta
            .get("last_error")
            .is_some_and(|e| e.contains("500")),
        "{failing_meta:?}"
    );
    // Retried to its last attempt, then dead: still the very bytes its producer sealed (a
    // retry never re-seals), and so is every other payload.
    let now: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(env.queues().keys(QUEUE).data())
        .query_async(&mut redis)
        .await
        .expect("the payloads now");
    assert_eq!(
        now, as_sealed,
        "no payload changed on its way through the queue"
    );
    assert!(
        llm_calls.load(std::sync::atomic::Ordering::SeqCst) > 2,
        "the messages went to the LLM"
    );
    for job in [&ok, &failing, &orphan] {
        let m = meta(&env, job).await;
        markers.assert_absent(&format!("the metadata of job {job}"), &format!("{m:?}"));
    }

    // The dead-letter CLI.
    for args in [
        &["jobs", "dead"][..],
        &["jobs", "dead", "--queue", "inbound_message"][..],
    ] {
        let out = run_cli(args, &env.vars, "");
        assert!(out.status.success(), "{args:?}: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&failing) && stdout.contains(&orphan),
            "{args:?} lists the dead jobs: {stdout}"
        );
        markers.assert_absent(&format!("`gatehouse {}`", args.join(" ")), &stdout);
        markers.assert_absent(
            &format!("`gatehouse {}` stderr", args.join(" ")),
            &String::from_utf8_lossy(&out.stderr),
        );
    }

    // `jobs retry` puts the dead job back as it is; it runs (and dies) again with the same bytes.
    let out = run_cli(&["jobs", "retry", &orphan], &env.vars, "");
    assert!(out.status.success(), "jobs retry: {out:?}");
    markers.assert_absent(
        "`gatehouse jobs retry`",
        &String::from_utf8_lossy(&out.stdout),
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            meta(&env, &orphan)
                .await
                .get("attempts")
                .map(String::as_str)
                == Some("1")
                && members(&env, env.queues().keys(QUEUE).dead())
                    .await
                    .contains(&orphan)
        })
        .await,
        "the retried job ran and is dead again"
    );
    let again: Option<String> = redis::cmd("HGET")
        .arg(env.queues().keys(QUEUE).data())
        .arg(&orphan)
        .query_async(&mut redis)
        .await
        .expect("the retried payload");
    assert_eq!(
        again.as_ref(),
        as_sealed.get(&orphan),
        "a retry moves the sealed bytes as they are"
    );

    // The dashboard, every page.
    let mut agent = Agent::at(&base);
    let signed_in = agent.login(officer, PASSWORD).await;
    assert_eq!(signed_in.status, 303, "{}", signed_in.body);
    for path in PAGES {
        let page = agent.get(path).await;
        assert_eq!(page.status, 200, "{path}");
        if path == "/admin/queues" {
            assert!(
                page.body.contains(&failing) && page.body.contains(&orphan),
                "the queues page lists the dead jobs"
            );
        }
        markers.assert_absent(&format!("the dashboard's {path}"), &page.body);
    }

    // The security events API.
    let reader = service_token(&env, &base, &["security:read"]).await;
    let r = client()
        .get(format!("{base}/v1/admin/security-events"))
        .header("x-forwarded-proto", "https")
        .bearer_auth(&reader)
        .send()
        .await
        .expect("security events");
    assert_eq!(r.status(), 200);
    markers.assert_absent(
        "GET /v1/admin/security-events",
        &r.text().await.expect("body"),
    );

    // `/metrics` of the ingress and of the worker.
    let ingress_metrics = fetch(&format!("{base}/metrics")).await;
    let worker_metrics = fetch(&format!("http://127.0.0.1:{health_port}/metrics")).await;
    assert!(
        worker_metrics.contains("gatehouse_jobs_total"),
        "{worker_metrics}"
    );
    markers.assert_absent("the ingress's /metrics", &ingress_metrics);
    markers.assert_absent("the worker's /metrics", &worker_metrics);

    // Sentry: both dead letters reached it.
    let reached = eventually(Duration::from_secs(15), || async {
        envelopes.lock().is_ok_and(|all| {
            [&failing, &orphan]
                .iter()
                .all(|job| all.iter().any(|e| e.contains(job.as_str())))
        })
    })
    .await;

    // The processes' logs, complete once they have exited.
    assert!(terminate(&mut work).success());
    assert!(terminate(&mut serve).success());
    assert!(reached, "Sentry received the dead letters");
    for envelope in envelopes.lock().expect("envelopes").iter() {
        markers.assert_absent("a Sentry envelope", envelope);
    }
    let serve_log = read_log(logs.path(), "serve");
    let work_log = read_log(logs.path(), "work");
    // At the default level the ingress writes no line per accepted webhook (the worker's
    // `inbound message stored` is the per-message record); what it does write is checked below.
    assert!(serve_log.contains("serving"), "{serve_log}");
    assert!(!serve_log.contains("webhook accepted"), "{serve_log}");
    assert!(
        work_log.contains(&failing) && work_log.contains(&orphan),
        "{work_log}"
    );
    markers.assert_absent("the serve log", &serve_log);
    markers.assert_absent("the work log", &work_log);

    sealed_payloads(&env).await;
    assert_redis_clean(&env, &markers, "after retries and dead letters").await;
    env.cleanup().await;
}

/// Enqueues `job` through the client `queues` (which seals it); its job id.
async fn enqueue(queues: &Queues, env: &TestEnv, job: &InboundMessage) -> String {
    queues
        .enqueue(&mut env.redis.clone(), job, Enqueue::default())
        .await
        .expect("enqueue")
        .job_id
}

/// Writes a job with `payload` straight into a queue, as anyone with write access to Redis
/// could (no producer would: the client refuses what it cannot seal).
async fn plant(env: &TestEnv, queue: &str, payload: &str) -> String {
    let keys = env.queues().keys(queue);
    let id = Uuid::now_v7().to_string();
    let () = redis::pipe()
        .hset(keys.data(), &id, payload)
        .ignore()
        .hset(
            keys.meta(),
            &id,
            r#"{"status":"Pending","attempts":"0","max_attempts":"4"}"#,
        )
        .ignore()
        .rpush(keys.active(), &id)
        .ignore()
        .query_async(&mut env.redis.clone())
        .await
        .expect("planted");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payloads_that_do_not_decode_or_open_are_dead_at_once_and_the_worker_keeps_going() {
    let markers = Markers::new();
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let queues = env.queues();
    let redis = env.redis.clone();
    let enqueue = |body: &'static str| {
        let (queues, mut redis, job) =
            (queues.clone(), redis.clone(), markers.message(tenant, body));
        async move {
            queues
                .enqueue(&mut redis, &job, Enqueue::default())
                .await
                .expect("enqueue")
                .job_id
        }
    };
    let first = enqueue("before the garbage").await;
    let not_json = plant(&env, QUEUE, "{not json").await;
    let not_an_object = plant(&env, QUEUE, "[1, 2]").await;
    let plaintext = plant(
        &env,
        QUEUE,
        &serde_json::to_string(&markers.message(tenant, "unsealed")).expect("json"),
    )
    .await;
    let wrong_shape = plant(&env, "sync_catalog", r#"{"tenant_id": 7}"#).await;
    let last = enqueue("after the garbage").await;

    let worker = env.start_worker();
    assert!(
        wait_in(&env, "done", &[first.as_str(), last.as_str()]).await,
        "the jobs around the garbage run"
    );
    assert!(
        wait_in(
            &env,
            "dead",
            &[
                not_json.as_str(),
                not_an_object.as_str(),
                plaintext.as_str()
            ]
        )
        .await,
        "each undecodable or unopenable inbound payload is dead"
    );
    let sync_dead = queues.keys("sync_catalog").dead();
    let wrong_shape_dead = eventually(Duration::from_secs(20), || async {
        members(&env, sync_dead.clone())
            .await
            .contains(&wrong_shape)
    })
    .await;
    assert!(
        wrong_shape_dead,
        "a sync_catalog payload of the wrong shape is dead"
    );
    for job in [&not_json, &not_an_object, &plaintext] {
        let m = meta(&env, job).await;
        assert_eq!(
            m.get("attempts").map(String::as_str),
            Some("1"),
            "{job}: {m:?}"
        );
        assert_eq!(m.get("status").map(String::as_str), Some("Killed"), "{m:?}");
    }
    // What opens as JSON reaches the handler, which reports it; the plaintext one is refused,
    // never processed (an unsealed payload could come from anyone with write access to Redis).
    assert!(env.wait_for_events("encryption_error", 2).await >= 2);
    for (job, reason) in [
        (&not_an_object, "not_an_object"),
        (&plaintext, "not_sealed"),
    ] {
        let reasons: Vec<String> = sqlx::query_scalar(
            "SELECT details->>'reason' FROM security_events
             WHERE type = 'encryption_error' AND details->>'job_id' = $1",
        )
        .bind(job)
        .fetch_all(&env.pool)
        .await
        .expect("events");
        assert_eq!(reasons, [reason], "{job}");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM messages").await,
        2,
        "only the two sealed jobs stored a message"
    );
    // The same worker is still taking jobs.
    let later = enqueue("long after").await;
    assert!(
        wait_in(&env, "done", &[later.as_str()]).await,
        "still working"
    );
    worker.stop().await.expect("worker stops");
    env.cleanup().await;
}
