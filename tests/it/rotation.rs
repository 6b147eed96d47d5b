//! Encryption at rest and four-eyes key rotation, end to end against real PostgreSQL and
//! Redis: the approval rules over HTTP, the outbox relay through a Redis outage, the
//! `rotate_keys` job (in-process, and as real `gatehouse work` processes killed with -9),
//! `gatehouse keys status`, and failing closed on ciphertexts moved between cells.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use gatehouse::http::AppState;
use gatehouse::rotation::{self, RotationError, RunContext, RunOutcome};
use gatehouse::security::blind_index::BlindIndex;
use gatehouse::security::jwt::{JwtKeys, SubjectKind};
use gatehouse::security::keyring::{EncryptionKey, Keyring, aad};
use gatehouse::tenants::NewTenant;
use gatehouse_jobs::client::Enqueue;
use gatehouse_jobs::{Job, RotateKeys};
use gatehouse_testenv::*;
use reqwest::Method;
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;

/// The test harness's `ENCRYPTION_KEY`: the key everything is sealed with before rotating.
const OLD_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn old_key() -> EncryptionKey {
    EncryptionKey::from_base64(OLD_KEY).expect("old key")
}

/// The keyring of the deployment before the rotation: the old key only.
fn old_keyring() -> Keyring {
    Keyring::new(old_key(), vec![])
}

/// A fresh key as `gatehouse keys generate` prints it.
fn generate_key() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["keys", "generate"])
        .env_clear()
        .output()
        .expect("run keys generate");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// A test environment deployed with `new_key` as current and the old key kept.
async fn rotated_env(new_key: &str, extra: &[(&str, &str)]) -> TestEnv {
    let new_key = new_key.to_owned();
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    TestEnv::with_vars(move |vars| {
        vars.insert("ENCRYPTION_KEY".into(), new_key);
        vars.insert("ENCRYPTION_OLD_KEYS".into(), OLD_KEY.into());
        for (k, v) in extra {
            vars.insert(k, v);
        }
    })
    .await
}

/// A user created straight in SQL (no password needed: tokens are issued directly).
async fn user(env: &TestEnv, role: Option<&str>) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO users (email, password_hash, first_name, last_name, platform_role)
         VALUES ($1, 'unused', 'Test', 'User', $2) RETURNING id",
    )
    .bind(format!("{}@example.com", Uuid::new_v4().simple()))
    .bind(role)
    .fetch_one(&env.pool)
    .await
    .expect("user")
}

fn token(env: &TestEnv, id: Uuid) -> String {
    JwtKeys::from_config(&env.config)
        .issue(id, SubjectKind::User)
        .expect("token")
        .token
}

async fn call(
    http: &reqwest::Client,
    server: &TestServer,
    method: Method,
    path: &str,
    bearer: &str,
) -> (u16, Value) {
    let response = http
        .request(method, server.url(path))
        .header("x-forwarded-proto", "https")
        .bearer_auth(bearer)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// `POST /v1/admin/key-rotations` as `bearer`: must answer 201; the new request's id.
async fn request_rotation(http: &reqwest::Client, server: &TestServer, bearer: &str) -> String {
    let (status, body) = call(
        http,
        server,
        Method::POST,
        "/v1/admin/key-rotations",
        bearer,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

async fn events(env: &TestEnv, kind: &str) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT jsonb_build_object('user_id', user_id, 'tenant_id', tenant_id, 'details', details)
         FROM security_events WHERE type = $1 ORDER BY occurred_at",
    )
    .bind(kind)
    .fetch_all(&env.pool)
    .await
    .expect("events")
}

async fn wait_for_events(env: &TestEnv, kind: &str, at_least: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = events(env, kind).await;
        if found.len() >= at_least || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn rotation_row(env: &TestEnv, id: Uuid) -> (String, i64, i64, i64) {
    sqlx::query_as("SELECT status, total, done, failed FROM key_rotations WHERE id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .expect("rotation row")
}

async fn wait_for_status(env: &TestEnv, id: Uuid, within: Duration) -> (String, i64, i64, i64) {
    let deadline = Instant::now() + within;
    loop {
        let row = rotation_row(env, id).await;
        if row.0 == "completed" || row.0 == "failed" || Instant::now() > deadline {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tenant with all three sealed secrets, sealed with `keyring`.
async fn sealed_tenant(env: &TestEnv, keyring: &Keyring) -> Uuid {
    gatehouse::tenants::create(
        &env.pool,
        keyring,
        &NewTenant {
            name: "Shop".into(),
            twilio_account_sid: ACCOUNT_SID.into(),
            twilio_auth_token: SecretString::from(TOKEN.to_owned()),
            store_url: Some("https://store.example.com".into()),
            store_api_key: Some(SecretString::from("store-api-key-0123456789".to_owned())),
            webhook_shared_key: Some((
                "kid-1".into(),
                SecretString::from("shared-key-0123456789abcdef".to_owned()),
            )),
            owner_email: None,
        },
    )
    .await
    .expect("tenant")
}

/// `conversations` conversations of `per` messages each under `tenant`, sealed with
/// `keyring`, inserted in SQL-side batches (unnest) so thousands of rows take a moment.
/// Returns the number of sealed values written.
async fn seed(
    env: &TestEnv,
    keyring: &Keyring,
    tenant: Uuid,
    conversations: usize,
    per: usize,
) -> i64 {
    let index = BlindIndex::new(&SecretString::from("seed-blind-index-key".to_owned()));
    let mut written = 0i64;
    for chunk in (0..conversations).collect::<Vec<_>>().chunks(500) {
        let mut conv_ids = Vec::new();
        let mut numbers = Vec::new();
        let mut indexes = Vec::new();
        let mut msg_ids = Vec::new();
        let mut msg_convs = Vec::new();
        let mut froms = Vec::new();
        let mut from_indexes = Vec::new();
        let mut sids = Vec::new();
        for &i in chunk {
            let id = Uuid::new_v4();
            let number = format!("+1415555{i:06}");
            conv_ids.push(id);
            numbers.push(keyring.seal(
                number.as_bytes(),
                &aad("conversations", "customer_number", &id.to_string()),
            ));
            let blind = index.compute("conversations.customer_number", number.as_bytes());
            indexes.push(blind.to_vec());
            for _ in 0..per {
                let mid = Uuid::new_v4();
                msg_ids.push(mid);
                msg_convs.push(id);
                froms.push(keyring.seal(
                    number.as_bytes(),
                    &aad("messages", "from_number", &mid.to_string()),
                ));
                from_indexes.push(blind.to_vec());
                sids.push(message_sid());
            }
        }
        sqlx::query(
            "INSERT INTO conversations (id, tenant_id, customer_number, customer_number_index)
             SELECT u.id, $1, u.num, u.idx FROM unnest($2::uuid[], $3::bytea[], $4::bytea[])
                 AS u(id, num, idx)",
        )
        .bind(tenant)
        .bind(&conv_ids)
        .bind(&numbers)
        .bind(&indexes)
        .execute(&env.pool)
        .await
        .expect("seed conversations");
        sqlx::query(
            "INSERT INTO messages (id, tenant_id, conversation_id, message_sid, from_number,
                                   from_number_index, to_number, body, intent, confidence,
                                   classifier, job_id, received_at)
             SELECT u.id, $1, u.conv, u.sid, u.num, u.idx, '+14155550199', 'hello', 'other', 0.5,
                    'rules', 'seed', now()
             FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::bytea[], $6::bytea[])
                 AS u(id, conv, sid, num, idx)",
        )
        .bind(tenant)
        .bind(&msg_ids)
        .bind(&msg_convs)
        .bind(&sids)
        .bind(&froms)
        .bind(&from_indexes)
        .execute(&env.pool)
        .await
        .expect("seed messages");
        written += (conv_ids.len() + msg_ids.len()) as i64;
    }
    written
}

/// Opens every sealed value with `keyring`; returns (opened, under the keyring's current key).
async fn open_everything(env: &TestEnv, keyring: &Keyring) -> (usize, usize) {
    let mut opened = 0;
    let mut current = 0;
    for col in rotation::SEALED_COLUMNS {
        let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, {c} FROM {t} WHERE {c} IS NOT NULL",
            c = col.column,
            t = col.table
        )))
        .fetch_all(&env.pool)
        .await
        .expect("read sealed values");
        for (id, sealed) in rows {
            keyring
                .open(&sealed, &aad(col.table, col.column, &id.to_string()))
                .unwrap_or_else(|e| {
                    panic!("{}.{} of {id} does not open: {e}", col.table, col.column)
                });
            opened += 1;
            if !keyring.needs_reseal(&sealed) {
                current += 1;
            }
        }
    }
    (opened, current)
}

/// Runs `gatehouse keys status` with this test's environment and the given key variables.
fn keys_status(env: &TestEnv, keys: &[(&str, &str)]) -> (i32, String) {
    let mut vars: HashMap<String, String> = env.vars.clone();
    vars.remove("ENCRYPTION_OLD_KEYS");
    for (k, v) in keys {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    let out = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["keys", "status"])
        .env_clear()
        .envs(vars)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run keys status");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).expect("utf-8"),
    )
}

/// The count `keys status` printed for a column and key id.
fn status_count(output: &str, column: &str, key_id: &str) -> Option<(String, i64)> {
    output.lines().find_map(|line| {
        let parts: Vec<&str> = line.split(' ').collect();
        (parts.len() == 4 && parts[0] == column && parts[1] == key_id)
            .then(|| (parts[2].to_owned(), parts[3].parse().expect("count")))
    })
}

/// Requests and approves a rotation through the core (two security officers).
/// A rotation ready to run: values sealed under the old key (`conversations` conversations,
/// `per` messages each, plus the tenant's three secrets), the new key current, and a request
/// approved by two officers. Returns the new key, the env, the old keyring, how many values
/// are sealed, and the rotation's id.
async fn seeded_rotation(
    conversations: usize,
    per: usize,
) -> (String, TestEnv, Keyring, i64, Uuid) {
    let new_key = generate_key();
    let env = rotated_env(&new_key, &[]).await;
    let old = old_keyring();
    let tenant = sealed_tenant(&env, &old).await;
    let seeded = seed(&env, &old, tenant, conversations, per).await + 3;
    let (rotation_id, _) = approved_rotation(&env).await;
    (new_key, env, old, seeded, rotation_id)
}

/// Seals the first conversation's number under a key no configuration has; returns its id,
/// the stored ciphertext and the stranger's keyring.
async fn seal_first_conversation_under_an_unknown_key(env: &TestEnv) -> (Uuid, Vec<u8>, Keyring) {
    let (conv,): (Uuid,) = sqlx::query_as("SELECT id FROM conversations ORDER BY id LIMIT 1")
        .fetch_one(&env.pool)
        .await
        .expect("a conversation");
    let stranger = Keyring::new(EncryptionKey::generate(), vec![]);
    let foreign = stranger.seal(
        b"+14155550000",
        &aad("conversations", "customer_number", &conv.to_string()),
    );
    sqlx::query("UPDATE conversations SET customer_number = $2 WHERE id = $1")
        .bind(conv)
        .bind(&foreign)
        .execute(&env.pool)
        .await
        .expect("foreign value");
    (conv, foreign, stranger)
}

async fn approved_rotation(env: &TestEnv) -> (Uuid, String) {
    let alice = user(env, Some("security_officer")).await;
    let bob = user(env, Some("security_officer")).await;
    let requested = rotation::request(
        &env.pool,
        alice,
        env.config.keyring.current_id(),
        rotation::APPROVAL_TTL,
    )
    .await
    .expect("request");
    let approved = rotation::approve(&env.pool, requested.id, bob)
        .await
        .expect("approve");
    (requested.id, approved.job_id)
}

/// Runs the workers in this process with the test's configuration.
fn start_worker(env: &TestEnv) -> TestWorker {
    env.start_worker()
}

#[tokio::test]
async fn a_security_officer_cannot_approve_their_own_rotation_and_the_attempt_is_a_critical_event()
{
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = client();
    let alice = user(&env, Some("security_officer")).await;
    let alice_token = token(&env, alice);

    let (status, body) = call(
        &http,
        &server,
        Method::POST,
        "/v1/admin/key-rotations",
        &alice_token,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "pending_approval");
    assert_eq!(body["initiated_by"], alice.to_string());
    let id = body["id"].as_str().expect("id").to_owned();

    let (status, body) = call(
        &http,
        &server,
        Method::POST,
        &format!("/v1/admin/key-rotations/{id}/approve"),
        &alice_token,
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "four_eyes_violation");
    let violations = wait_for_events(&env, "four_eyes_violation", 1).await;
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0]["user_id"], alice.to_string());
    assert_eq!(violations[0]["details"]["rotation_id"], id);
    // Nothing was approved or queued.
    let (status, body) = call(
        &http,
        &server,
        Method::GET,
        &format!("/v1/admin/key-rotations/{id}"),
        &alice_token,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "pending_approval");
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 0);
    assert_eq!(
        env.count("SELECT count(*) FROM key_rotation_approvals")
            .await,
        0
    );
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_approver_is_checked_against_the_database_not_only_the_token() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = client();
    let alice = user(&env, Some("security_officer")).await;
    let bob = user(&env, Some("security_officer")).await;
    let carol = user(&env, Some("security_officer")).await;
    let admin = user(&env, Some("platform_admin")).await;
    let (alice_t, bob_t, carol_t, admin_t) = (
        token(&env, alice),
        token(&env, bob),
        token(&env, carol),
        token(&env, admin),
    );
    let id = request_rotation(&http, &server, &alice_t).await;
    let approve = format!("/v1/admin/key-rotations/{id}/approve");

    // Without the scope at all: refused before anything else, with permission_denied.
    let (status, _) = call(&http, &server, Method::POST, &approve, &admin_t).await;
    assert_eq!(status, 403);
    let (status, _) = call(
        &http,
        &server,
        Method::POST,
        "/v1/admin/key-rotations",
        &admin_t,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = call(
        &http,
        &server,
        Method::GET,
        &format!("/v1/admin/key-rotations/{id}"),
        &admin_t,
    )
    .await;
    assert_eq!(status, 403);
    assert!(wait_for_events(&env, "permission_denied", 3).await.len() >= 3);

    // Bob and Carol are seen (and cached) as active security officers...
    for t in [&bob_t, &carol_t] {
        let (status, _) = call(
            &http,
            &server,
            Method::GET,
            &format!("/v1/admin/key-rotations/{id}"),
            t,
        )
        .await;
        assert_eq!(status, 200);
    }
    // ...then Bob is deactivated and Carol loses the role, behind the scope cache's back.
    sqlx::query("UPDATE users SET is_active = false WHERE id = $1")
        .bind(bob)
        .execute(&env.pool)
        .await
        .expect("deactivate");
    sqlx::query("UPDATE users SET platform_role = NULL WHERE id = $1")
        .bind(carol)
        .execute(&env.pool)
        .await
        .expect("demote");
    let before = events(&env, "permission_denied").await.len();
    for t in [&bob_t, &carol_t] {
        let (status, body) = call(&http, &server, Method::POST, &approve, t).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    assert!(
        wait_for_events(&env, "permission_denied", before + 2)
            .await
            .len()
            >= before + 2
    );
    assert_eq!(
        env.count("SELECT count(*) FROM key_rotation_approvals")
            .await,
        0
    );

    // An initiator deactivated after asking can no longer have the request approved.
    let dave = user(&env, Some("security_officer")).await;
    let dave_t = token(&env, dave);
    sqlx::query("UPDATE users SET is_active = false WHERE id = $1")
        .bind(alice)
        .execute(&env.pool)
        .await
        .expect("deactivate initiator");
    let (status, body) = call(&http, &server, Method::POST, &approve, &dave_t).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 0);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_approval_is_single_use_and_an_expired_request_cannot_be_approved() {
    let env = TestEnv::with_vars(|vars| {
        vars.insert("KEY_ROTATION_APPROVAL_TTL_SECONDS".into(), "3600".into());
    })
    .await;
    let server = env.start_server().await;
    let http = client();
    let alice = user(&env, Some("security_officer")).await;
    let bob = user(&env, Some("security_officer")).await;
    let carol = user(&env, Some("security_officer")).await;
    let (alice_t, bob_t, carol_t) = (token(&env, alice), token(&env, bob), token(&env, carol));

    let id = request_rotation(&http, &server, &alice_t).await;
    let approve = format!("/v1/admin/key-rotations/{id}/approve");
    let (status, body) = call(&http, &server, Method::POST, &approve, &bob_t).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, json!({"id": id, "status": "queued"}));
    // A second approval, by the same or another officer, finds nothing pending.
    for t in [&bob_t, &carol_t] {
        let (status, body) = call(&http, &server, Method::POST, &approve, t).await;
        assert_eq!(status, 409, "{body}");
    }
    let (a_by, i_by): (Uuid, Uuid) = sqlx::query_as(
        "SELECT approved_by, initiated_by FROM key_rotation_approvals WHERE rotation_id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&env.pool)
    .await
    .expect("approval recorded");
    assert_eq!((a_by, i_by), (bob, alice), "both ids are recorded");
    let (status, body) = call(
        &http,
        &server,
        Method::GET,
        &format!("/v1/admin/key-rotations/{id}"),
        &carol_t,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["approved_by"], bob.to_string());
    assert_eq!(body["initiated_by"], alice.to_string());
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 1);

    // A request left past its expiry.
    let stale = request_rotation(&http, &server, &alice_t).await;
    let ttl: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM expires_at - created_at)::float8 FROM key_rotations
         WHERE id = $1::uuid",
    )
    .bind(&stale)
    .fetch_one(&env.pool)
    .await
    .expect("rotation");
    assert!(
        (ttl - 3600.0).abs() < 5.0,
        "the request expires after KEY_ROTATION_APPROVAL_TTL_SECONDS: {ttl}"
    );
    sqlx::query(
        "UPDATE key_rotations SET expires_at = now() - interval '1 second' WHERE id = $1::uuid",
    )
    .bind(&stale)
    .execute(&env.pool)
    .await
    .expect("age the request");
    let (status, body) = call(
        &http,
        &server,
        Method::POST,
        &format!("/v1/admin/key-rotations/{stale}/approve"),
        &bob_t,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (_, body) = call(
        &http,
        &server,
        Method::GET,
        &format!("/v1/admin/key-rotations/{stale}"),
        &bob_t,
    )
    .await;
    assert_eq!(body["status"], "expired");

    // Unknown and malformed ids.
    let (status, _) = call(
        &http,
        &server,
        Method::GET,
        &format!("/v1/admin/key-rotations/{}", Uuid::new_v4()),
        &bob_t,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &http,
        &server,
        Method::POST,
        &format!("/v1/admin/key-rotations/{}/approve", Uuid::new_v4()),
        &bob_t,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &http,
        &server,
        Method::GET,
        "/v1/admin/key-rotations/not-a-uuid",
        &bob_t,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 1);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_approval_made_while_redis_is_unreachable_is_enqueued_once_when_redis_is_back() {
    let env = TestEnv::new().await;
    sealed_tenant(&env, &env.config.keyring).await;
    let (rotation_id, job_id) = approved_rotation(&env).await;
    let queues = env.queues();

    // The relay's Redis is down: nothing is enqueued, the entry stays pending with why.
    let mut down = gatehouse::redis_conn::connect_lazy_url(&SecretString::from(
        "redis://127.0.0.1:1".to_owned(),
    ))
    .expect("lazy connection");
    let outcome = gatehouse::queue::outbox::relay(&env.pool, &mut down, &queues)
        .await
        .expect("relay reads PostgreSQL");
    assert_eq!((outcome.sent, outcome.failed), (0, 1));
    let (attempts, sent, last_error): (i32, bool, Option<String>) = sqlx::query_as(
        "SELECT attempts, sent_at IS NOT NULL, last_error FROM outbox WHERE job_id = $1",
    )
    .bind(&job_id)
    .fetch_one(&env.pool)
    .await
    .expect("outbox row");
    assert_eq!((attempts, sent), (1, false));
    assert!(last_error.is_some());
    assert_eq!(env.queued(RotateKeys::QUEUE).await, 0);

    // Redis is back: the entry is pushed with its own job id and marked sent.
    let mut up = env.redis.clone();
    let outcome = gatehouse::queue::outbox::relay(&env.pool, &mut up, &queues)
        .await
        .expect("relay");
    assert_eq!((outcome.sent, outcome.failed), (1, 0));
    assert_eq!(env.queued(RotateKeys::QUEUE).await, 1);
    // A crash between the push and the mark (sent_at lost): pushed again, enqueued once.
    sqlx::query("UPDATE outbox SET sent_at = NULL")
        .execute(&env.pool)
        .await
        .expect("forget the mark");
    let outcome = gatehouse::queue::outbox::relay(&env.pool, &mut up, &queues)
        .await
        .expect("relay");
    assert_eq!(outcome.sent, 1);
    assert_eq!(env.queued(RotateKeys::QUEUE).await, 1);
    let queued: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{}:{{rotate_keys:0}}:active", env.namespace))
        .arg(0)
        .arg(-1)
        .query_async(&mut up)
        .await
        .expect("lrange");
    assert_eq!(queued, vec![job_id.clone()]);

    // And the job runs: the rotation completes once.
    let worker = start_worker(&env);
    let (status, total, done, failed) =
        wait_for_status(&env, rotation_id, Duration::from_secs(30)).await;
    worker.stop().await.expect("worker stops");
    assert_eq!(status, "completed");
    assert_eq!((done, failed), (total, 0));
    assert_eq!(events(&env, "key_rotation_completed").await.len(), 1);
    env.cleanup().await;
}

#[tokio::test]
async fn operators_rotate_to_a_new_key_with_two_people_and_retire_the_old_one() {
    // 1. Generate a key; 2. deploy it as current, the old one kept for decryption.
    let new_key = generate_key();
    let env = rotated_env(&new_key, &[]).await;
    let old = old_keyring();
    let old_id = old.current_id().to_hex();
    let new_id = env.config.keyring.current_id().to_hex();
    assert_ne!(old_id, new_id);
    // What the deployment sealed before: a tenant's secrets and 2,000 conversations'
    // numbers (6,000 sealed values).
    let tenant = sealed_tenant(&env, &old).await;
    let seeded = seed(&env, &old, tenant, 2_000, 2).await + 3;
    let (code, out) = keys_status(
        &env,
        &[
            ("ENCRYPTION_KEY", &new_key),
            ("ENCRYPTION_OLD_KEYS", OLD_KEY),
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        status_count(&out, "messages.from_number", &old_id),
        Some(("old".into(), 4_000))
    );
    assert_eq!(
        status_count(&out, "messages.from_number", &new_id),
        Some(("current".into(), 0))
    );

    let server = env.start_server().await;
    let worker = start_worker(&env);
    let http = client();
    let alice = user(&env, Some("security_officer")).await;
    let bob = user(&env, Some("security_officer")).await;

    // 3. Alice requests, 4. Bob approves.
    let (status, body) = call(
        &http,
        &server,
        Method::POST,
        "/v1/admin/key-rotations",
        &token(&env, alice),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["target_key_id"], new_id);
    let id = body["id"].as_str().expect("id").to_owned();
    let (status, _) = call(
        &http,
        &server,
        Method::POST,
        &format!("/v1/admin/key-rotations/{id}/approve"),
        &token(&env, bob),
    )
    .await;
    assert_eq!(status, 202);

    // 5. Watch progress until it completes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (status, body) = call(
            &http,
            &server,
            Method::GET,
            &format!("/v1/admin/key-rotations/{id}"),
            &token(&env, alice),
        )
        .await;
        assert_eq!(status, 200);
        if body["status"] == "completed" || Instant::now() > deadline {
            break body;
        }
        assert!(body["done"].as_i64() <= body["total"].as_i64().max(Some(seeded)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["status"], "completed", "{body}");
    assert_eq!(body["total"], seeded);
    assert_eq!(body["done"], seeded);
    assert_eq!(body["failed"], 0);
    assert!(body["completed_at"].is_string());
    let started = wait_for_events(&env, "key_rotation_started", 1).await;
    let completed = wait_for_events(&env, "key_rotation_completed", 1).await;
    assert_eq!((started.len(), completed.len()), (1, 1));
    assert_eq!(completed[0]["details"]["done"], seeded);
    worker.stop().await.expect("worker stops");
    server.stop().await;

    // 6. keys status: the old key protects nothing.
    let (code, out) = keys_status(
        &env,
        &[
            ("ENCRYPTION_KEY", &new_key),
            ("ENCRYPTION_OLD_KEYS", OLD_KEY),
        ],
    );
    assert_eq!(code, 0, "{out}");
    for col in rotation::SEALED_COLUMNS {
        assert_eq!(
            status_count(&out, &col.name(), &old_id),
            Some(("old".into(), 0)),
            "{out}"
        );
    }
    assert_eq!(
        status_count(&out, "conversations.customer_number", &new_id),
        Some(("current".into(), 2_000))
    );
    assert!(out.lines().any(|l| l == "unknown 0"), "{out}");

    // 7. Retire it: restart with the new key only; everything still opens.
    let (code, out) = keys_status(&env, &[("ENCRYPTION_KEY", &new_key)]);
    assert_eq!(code, 0, "{out}");
    let retired = Keyring::new(EncryptionKey::from_base64(&new_key).expect("key"), vec![]);
    assert_eq!(
        open_everything(&env, &retired).await,
        (seeded as usize, seeded as usize)
    );
    let mut vars = env.vars.clone();
    vars.remove("ENCRYPTION_OLD_KEYS");
    let config = Arc::new(config_from(&vars));
    let server = TestServer::start(Arc::new(AppState::new(
        config,
        env.pool.clone(),
        env.redis.clone(),
    )))
    .await;
    let params = sms_params(&message_sid(), "+14155550100", "hello after the rotation");
    let response = signed_form(&http, &server, tenant, &params)
        .send()
        .await
        .expect("webhook");
    assert_eq!(
        response.status(),
        200,
        "the rotated webhook keys open and verify"
    );
    server.stop().await;
    // And a deployment that lost the key it needs says so.
    let (code, out) = keys_status(&env, &[("ENCRYPTION_KEY", OLD_KEY)]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        status_count(&out, "messages.from_number", &new_id),
        Some(("unknown".into(), 4_000))
    );
    env.cleanup().await;
}

/// `gatehouse work` with this test's environment and extra variables.
fn spawn_worker(env: &TestEnv, extra: &[(&str, &str)]) -> std::process::Child {
    env.spawn(&["work"], extra)
}

#[tokio::test]
async fn a_rotation_survives_kill_9_of_its_worker_and_two_workers_finish_it_together() {
    let new_key = generate_key();
    let env = rotated_env(&new_key, &[]).await;
    let old = old_keyring();
    let tenant = sealed_tenant(&env, &old).await;
    let seeded = seed(&env, &old, tenant, 4_000, 3).await + 3;
    let (rotation_id, _job_id) = approved_rotation(&env).await;

    // Small batches, so the kill lands mid-rotation. The worker's own relay enqueues the job.
    let small = [("KEY_ROTATION_BATCH_SIZE", "20")];
    let mut first = spawn_worker(&env, &small);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, done, _) = rotation_row(&env, rotation_id).await;
        if status == "running" && done >= 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the rotation never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill().expect("kill -9");
    let _ = first.wait();
    let (status, total, done_at_kill, failed) = rotation_row(&env, rotation_id).await;
    assert_eq!(status, "running");
    assert_eq!(total, seeded);
    assert!(
        done_at_kill < total,
        "killed mid-rotation ({done_at_kill}/{total})"
    );
    assert_eq!(failed, 0);

    // Two new workers: one takes over the dead worker's job once it misses its heartbeats,
    // the other runs a second job for the same rotation (as a redelivery would) — both at once.
    let mut redis = env.redis.clone();
    env.queues()
        .enqueue(&mut redis, &RotateKeys { rotation_id }, Enqueue::default())
        .await
        .expect("second job");
    let mut second = spawn_worker(&env, &small);
    let mut third = spawn_worker(&env, &small);
    let (status, total, done, failed) =
        wait_for_status(&env, rotation_id, Duration::from_secs(120)).await;
    assert_eq!(terminate(&mut second).code(), Some(0));
    assert_eq!(terminate(&mut third).code(), Some(0));
    assert_eq!(status, "completed");
    assert_eq!(
        (total, done, failed),
        (seeded, seeded, 0),
        "every value counted exactly once"
    );
    // Every value opens under the new key alone.
    let retired = Keyring::new(EncryptionKey::from_base64(&new_key).expect("key"), vec![]);
    assert_eq!(
        open_everything(&env, &retired).await,
        (seeded as usize, seeded as usize)
    );
    assert_eq!(events(&env, "key_rotation_started").await.len(), 1);
    assert_eq!(events(&env, "key_rotation_completed").await.len(), 1);
    env.cleanup().await;
}

#[tokio::test]
async fn two_runs_of_one_rotation_at_once_share_the_batches_and_count_each_value_once() {
    let (_, env, _, seeded, rotation_id) = seeded_rotation(1_500, 1).await;
    let keyring = env.config.keyring.clone();
    let run = |job: &'static str| {
        let pool = env.pool.clone();
        let keyring = keyring.clone();
        let events = env.events();
        let (redis, layout) = (env.redis.clone(), env.config.layout().clone());
        async move {
            let ctx = RunContext {
                keyring: &keyring,
                events: &events,
                job_id: job,
                worker: job,
                batch_size: 25,
                redis: &redis,
                layout: &layout,
                stall_limit: rotation::STALL_LIMIT,
            };
            rotation::run(&pool, &ctx, rotation_id).await
        }
    };
    let (a, b) = tokio::join!(run("job-a"), run("job-b"));
    let outcomes = [a.expect("run a"), b.expect("run b")];
    let finished = outcomes
        .iter()
        .filter(|o| matches!(o, RunOutcome::Finished { .. }))
        .count();
    assert_eq!(
        finished, 1,
        "exactly one run finishes the rotation: {outcomes:?}"
    );
    let (status, total, done, failed) = rotation_row(&env, rotation_id).await;
    assert_eq!(status, "completed");
    assert_eq!((total, done, failed), (seeded, seeded, 0));
    assert_eq!(
        open_everything(&env, &keyring).await,
        (seeded as usize, seeded as usize)
    );
    // A late redelivery changes nothing.
    let again = run("job-c").await.expect("run c");
    assert_eq!(
        again,
        RunOutcome::AlreadyFinished {
            status: "completed".into()
        }
    );
    assert_eq!(
        rotation_row(&env, rotation_id).await,
        (status, total, done, failed)
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_run_blocked_by_a_row_lock_gives_up_after_its_stall_limit_and_a_retry_finishes() {
    let (new_key, env, old, seeded, rotation_id) = seeded_rotation(100, 1).await;
    let keyring = env.config.keyring.clone();
    let events = env.events();
    let ctx = RunContext {
        keyring: &keyring,
        events: &events,
        job_id: "job-stalled",
        worker: "job-stalled",
        batch_size: 25,
        redis: &env.redis,
        layout: env.config.layout(),
        stall_limit: Duration::from_secs(1),
    };
    // Another transaction holds one sealed row and does not let go.
    let mut holder = env.pool.begin().await.expect("begin");
    let (locked,): (Uuid,) =
        sqlx::query_as("SELECT id FROM conversations ORDER BY id LIMIT 1 FOR UPDATE")
            .fetch_one(&mut *holder)
            .await
            .expect("lock a conversation");
    let started = Instant::now();
    let stalled = rotation::run(&env.pool, &ctx, rotation_id).await;
    assert!(
        matches!(stalled, Err(RotationError::Stalled { seconds: 1 })),
        "{stalled:?}"
    );
    assert!(stalled.as_ref().is_err_and(RotationError::is_retryable));
    assert!(started.elapsed() < Duration::from_secs(30), "bounded wait");
    // Everything but the locked row moved; the rotation is still running, nothing is lost.
    let (status, total, done, failed) = rotation_row(&env, rotation_id).await;
    assert_eq!(
        (status.as_str(), total, done, failed),
        ("running", seeded, seeded - 1, 0)
    );
    let key_id: Vec<u8> = sqlx::query_scalar(
        "SELECT substring(customer_number from 2 for 8) FROM conversations WHERE id = $1",
    )
    .bind(locked)
    .fetch_one(&env.pool)
    .await
    .expect("the locked row");
    assert_eq!(
        key_id,
        old.current_id().0.to_vec(),
        "the locked value is untouched"
    );
    holder.rollback().await.expect("release the lock");
    // The retry resumes and finishes.
    let ctx = RunContext {
        job_id: "job-retry",
        worker: "job-retry",
        ..ctx
    };
    let finished = rotation::run(&env.pool, &ctx, rotation_id)
        .await
        .expect("the retry runs");
    assert!(
        matches!(finished, RunOutcome::Finished { .. }),
        "{finished:?}"
    );
    assert_eq!(
        rotation_row(&env, rotation_id).await,
        ("completed".to_owned(), seeded, seeded, 0)
    );
    let retired = Keyring::new(EncryptionKey::from_base64(&new_key).expect("key"), vec![]);
    assert_eq!(
        open_everything(&env, &retired).await,
        (seeded as usize, seeded as usize)
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_unreadable_value_a_crashed_run_left_unreported_is_reported_once_by_the_next_run() {
    let (_, env, _, seeded, rotation_id) = seeded_rotation(20, 1).await;
    // What a run that died right after a batch's commit leaves: a value no key opens, its
    // failure row committed and counted, no event yet.
    let (conv, _, _) = seal_first_conversation_under_an_unknown_key(&env).await;
    sqlx::query(
        "INSERT INTO key_rotation_failures (rotation_id, table_name, column_name, row_id, reason)
         VALUES ($1, 'conversations', 'customer_number', $2, 'no configured key opens it')",
    )
    .bind(rotation_id)
    .bind(conv)
    .execute(&env.pool)
    .await
    .expect("failure row");
    sqlx::query("UPDATE key_rotations SET failed = 1 WHERE id = $1")
        .bind(rotation_id)
        .execute(&env.pool)
        .await
        .expect("counted");
    assert!(events(&env, "encryption_error").await.is_empty());

    let keyring = env.config.keyring.clone();
    let log = env.events();
    let ctx = RunContext {
        keyring: &keyring,
        events: &log,
        job_id: "job-next",
        worker: "job-next",
        batch_size: 25,
        redis: &env.redis,
        layout: env.config.layout(),
        stall_limit: rotation::STALL_LIMIT,
    };
    let outcome = rotation::run(&env.pool, &ctx, rotation_id)
        .await
        .expect("the next run");
    assert!(
        matches!(outcome, RunOutcome::Finished { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        rotation_row(&env, rotation_id).await,
        ("failed".to_owned(), seeded, seeded - 1, 1)
    );
    let reported = events(&env, "encryption_error").await;
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert_eq!(reported[0]["details"]["row_id"], json!(conv));
    assert_eq!(reported[0]["details"]["operation"], "rotate_keys");
    let unreported: i64 =
        sqlx::query_scalar("SELECT count(*) FROM key_rotation_failures WHERE reported_at IS NULL")
            .fetch_one(&env.pool)
            .await
            .expect("count");
    assert_eq!(unreported, 0);
    // A redelivery reports nothing twice.
    let ctx = RunContext {
        job_id: "job-again",
        worker: "job-again",
        ..ctx
    };
    rotation::run(&env.pool, &ctx, rotation_id)
        .await
        .expect("again");
    assert_eq!(events(&env, "encryption_error").await.len(), 1);
    env.cleanup().await;
}

#[tokio::test]
async fn values_that_no_known_key_opens_are_counted_as_failed_reported_and_left_untouched() {
    let new_key = generate_key();
    let env = rotated_env(&new_key, &[]).await;
    let old = old_keyring();
    let tenant = sealed_tenant(&env, &old).await;
    let seeded = seed(&env, &old, tenant, 300, 1).await + 3;
    // One conversation's number sealed under a key nobody configured, and one message's
    // number copied from another message (a known key, but the wrong cell).
    let (conv, foreign, stranger) = seal_first_conversation_under_an_unknown_key(&env).await;
    let (m1, m2): (Uuid, Uuid) =
        sqlx::query_as("SELECT min(id::text)::uuid, max(id::text)::uuid FROM messages")
            .fetch_one(&env.pool)
            .await
            .expect("two messages");
    sqlx::query("UPDATE messages SET from_number = (SELECT from_number FROM messages WHERE id = $2) WHERE id = $1")
        .bind(m1)
        .bind(m2)
        .execute(&env.pool)
        .await
        .expect("copied value");
    let copied: Vec<u8> = sqlx::query_scalar("SELECT from_number FROM messages WHERE id = $1")
        .bind(m1)
        .fetch_one(&env.pool)
        .await
        .expect("copied");

    let (rotation_id, _) = approved_rotation(&env).await;
    let worker = start_worker(&env);
    let (status, total, done, failed) =
        wait_for_status(&env, rotation_id, Duration::from_secs(60)).await;
    worker.stop().await.expect("worker stops");
    assert_eq!(
        status, "failed",
        "a rotation that left values behind says so"
    );
    assert_eq!((total, done, failed), (seeded, seeded - 2, 2));
    // Untouched, byte for byte.
    let still: Vec<u8> =
        sqlx::query_scalar("SELECT customer_number FROM conversations WHERE id = $1")
            .bind(conv)
            .fetch_one(&env.pool)
            .await
            .expect("foreign value");
    assert_eq!(still, foreign);
    let still: Vec<u8> = sqlx::query_scalar("SELECT from_number FROM messages WHERE id = $1")
        .bind(m1)
        .fetch_one(&env.pool)
        .await
        .expect("copied value");
    assert_eq!(still, copied);
    // Reported where they are, never what they hold.
    let reported = wait_for_events(&env, "encryption_error", 2).await;
    assert_eq!(reported.len(), 2);
    let mut cells: Vec<(String, String)> = reported
        .iter()
        .map(|e| {
            let d = &e["details"];
            let mut keys: Vec<&String> = d.as_object().expect("details").keys().collect();
            keys.sort();
            assert_eq!(
                keys,
                [
                    "column",
                    "operation",
                    "reason",
                    "rotation_id",
                    "row_id",
                    "table"
                ]
            );
            (
                format!(
                    "{}.{}",
                    d["table"].as_str().unwrap_or(""),
                    d["column"].as_str().unwrap_or("")
                ),
                d["row_id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    cells.sort();
    assert_eq!(
        cells,
        vec![
            ("conversations.customer_number".to_owned(), conv.to_string()),
            ("messages.from_number".to_owned(), m1.to_string()),
        ]
    );
    let text = serde_json::to_string(&reported).expect("json");
    assert!(!text.contains(&hex::encode(&foreign[21..])) && !text.contains("+1415"));
    // keys status names the unknown key and exits 1.
    let (code, out) = keys_status(
        &env,
        &[
            ("ENCRYPTION_KEY", &new_key),
            ("ENCRYPTION_OLD_KEYS", OLD_KEY),
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        status_count(
            &out,
            "conversations.customer_number",
            &stranger.current_id().to_hex()
        ),
        Some(("unknown".into(), 1))
    );
    assert!(out.lines().any(|l| l == "unknown 1"), "{out}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_ciphertext_copied_into_another_tenants_row_fails_closed_with_an_encryption_error() {
    let env = TestEnv::new().await;
    let keyring = env.config.keyring.clone();
    let victim = sealed_tenant(&env, &keyring).await;
    let donor = sealed_tenant(&env, &keyring).await;
    // Someone with database access moves the donor's sealed secrets into the victim's row.
    sqlx::query(
        "UPDATE tenants SET twilio_auth_token = d.twilio_auth_token, store_api_key = d.store_api_key
         FROM tenants d WHERE tenants.id = $1 AND d.id = $2",
    )
    .bind(victim)
    .bind(donor)
    .execute(&env.pool)
    .await
    .expect("swap ciphertexts");

    // The webhook: no crash, no plaintext fallback, 503 and an event naming the cell.
    let server = env.start_server().await;
    let http = client();
    let params = sms_params(&message_sid(), "+14155550100", "hi");
    let response = signed_form(&http, &server, victim, &params)
        .send()
        .await
        .expect("webhook");
    assert_eq!(response.status(), 503);
    assert_eq!(env.queued("inbound_message").await, 0);
    let reported = wait_for_events(&env, "encryption_error", 1).await;
    assert_eq!(reported[0]["tenant_id"], victim.to_string());
    assert_eq!(reported[0]["details"]["column"], "twilio_auth_token");
    assert_eq!(reported[0]["details"]["row_id"], victim.to_string());
    // The donor's own row still works.
    let params = sms_params(&message_sid(), "+14155550100", "hi");
    let response = signed_form(&http, &server, donor, &params)
        .send()
        .await
        .expect("webhook");
    assert_eq!(response.status(), 200);
    server.stop().await;

    // The store key (catalog sync): refused, reported, never sent anywhere.
    let error = gatehouse::catalog::store_credentials(&env.pool, &keyring, &env.events(), victim)
        .await
        .expect_err("a moved store key does not open");
    assert!(error.to_string().contains("store_api_key"), "{error}");
    let reported = wait_for_events(&env, "encryption_error", 2).await;
    assert_eq!(reported.len(), 2);
    assert_eq!(reported[1]["details"]["column"], "store_api_key");
    assert_eq!(reported[1]["details"]["operation"], "sync_catalog");
    assert!(
        gatehouse::catalog::store_credentials(&env.pool, &keyring, &env.events(), donor)
            .await
            .is_ok()
    );
    let secret = "store-api-key-0123456789";
    let all: String =
        sqlx::query_scalar("SELECT string_agg(details::text, ' ') FROM security_events")
            .fetch_one(&env.pool)
            .await
            .expect("events text");
    assert!(!all.contains(secret) && !all.contains(TOKEN));
    env.cleanup().await;
}

/// An inbound message for `tenant` (its number and text are what Redis must never show).
fn inbound(tenant: Uuid, i: usize) -> gatehouse_jobs::InboundMessage {
    gatehouse_jobs::InboundMessage {
        tenant_id: tenant,
        message_sid: message_sid(),
        from: format!("+1500555{i:04}"),
        to: "+14155550199".into(),
        body: format!("order {i} please"),
        received_at: "2026-12-05T10:00:00Z".into(),
    }
}

/// Enqueues `n` inbound messages sealed by `producer`; returns their job ids.
async fn enqueue_inbound(
    env: &TestEnv,
    producer: &gatehouse_jobs::client::Queues,
    tenant: Uuid,
    n: usize,
) -> Vec<String> {
    let mut redis = env.redis.clone();
    let mut ids = Vec::new();
    for i in 0..n {
        let enqueued = producer
            .enqueue(&mut redis, &inbound(tenant, i), Enqueue::default())
            .await
            .expect("enqueue");
        ids.push(enqueued.job_id);
    }
    ids
}

/// Takes `n` jobs off the queue as worker `name` would (registered, holding them in the
/// inflight hash).
async fn take(env: &TestEnv, name: &str, n: usize) -> Vec<String> {
    use gatehouse::queue::consume;
    let keys = gatehouse::queue::keys::QueueKeys::new(&env.namespace, "inbound_message");
    let mut redis = env.redis.clone();
    consume::register(&mut redis, &keys, name)
        .await
        .expect("register");
    consume::fetch(&mut redis, &keys, consume::Fairness::default(), name, n)
        .await
        .expect("fetch");
    let held: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(keys.inflight())
        .query_async(&mut redis)
        .await
        .expect("inflight");
    held.into_iter()
        .filter(|(_, holder)| holder == name)
        .map(|(id, _)| id)
        .collect()
}

/// Worker `name` acknowledges `ids` with `outcome` (`Dead` or `Done`).
async fn settle_taken(
    env: &TestEnv,
    name: &str,
    ids: &[String],
    outcome: gatehouse::queue::consume::Outcome,
) {
    use gatehouse::queue::consume::{self, Ack};
    let keys = gatehouse::queue::keys::QueueKeys::new(&env.namespace, "inbound_message");
    let acks: Vec<Ack> = ids
        .iter()
        .map(|id| Ack::settled(id.as_str(), outcome, "failed for the test"))
        .collect();
    let acked = consume::ack(
        &mut env.redis.clone(),
        &keys,
        consume::Fairness::default(),
        name,
        Duration::from_secs(60),
        &acks,
    )
    .await
    .expect("ack");
    assert_eq!(acked.acked, ids.len());
}

/// Every inbound payload Redis holds, by job id.
async fn payloads(env: &TestEnv) -> HashMap<String, String> {
    let keys = gatehouse::queue::keys::QueueKeys::new(&env.namespace, "inbound_message");
    redis::cmd("HGETALL")
        .arg(keys.data())
        .query_async(&mut env.redis.clone())
        .await
        .expect("payloads")
}

fn run_context<'a>(
    env: &'a TestEnv,
    keyring: &'a Keyring,
    events: &'a gatehouse::events::SecurityLog,
    job: &'a str,
    stall_limit: Duration,
) -> RunContext<'a> {
    RunContext {
        keyring,
        events,
        job_id: job,
        worker: job,
        batch_size: 4,
        redis: &env.redis,
        layout: env.config.layout(),
        stall_limit,
    }
}

#[tokio::test]
async fn a_rotation_reseals_the_job_payloads_redis_holds_and_waits_for_a_held_one() {
    use gatehouse::queue::consume::Outcome;
    use gatehouse_jobs::sealed::{AtRest, Sealed, at_rest};
    let new_key = generate_key();
    let env = rotated_env(&new_key, &[]).await;
    let old = old_keyring();
    let (old_id, new_id) = (
        old.current_id().to_hex(),
        env.config.keyring.current_id().to_hex(),
    );
    let tenant = sealed_tenant(&env, &old).await;
    // What producers still on the old key enqueued: two jobs a worker killed, one a worker
    // holds right now, five waiting, and one from a producer that did not seal at all.
    let producer =
        gatehouse_jobs::client::Queues::new(env.namespace.clone()).sealing_with(old_key());
    enqueue_inbound(&env, &producer, tenant, 2).await;
    let dead = take(&env, "killer", 2).await;
    settle_taken(&env, "killer", &dead, Outcome::Dead).await;
    enqueue_inbound(&env, &producer, tenant, 1).await;
    let held = take(&env, "holder", 1).await;
    let queued = enqueue_inbound(&env, &producer, tenant, 5).await;
    let plain_id = Uuid::now_v7().to_string();
    let keys = gatehouse::queue::keys::QueueKeys::new(&env.namespace, "inbound_message");
    let plain = serde_json::to_string(&inbound(tenant, 99)).expect("json");
    let () = redis::pipe()
        .hset(keys.data(), &plain_id, &plain)
        .ignore()
        .hset(
            keys.meta(),
            &plain_id,
            r#"{"status":"Pending","attempts":"0","max_attempts":"4"}"#,
        )
        .ignore()
        .rpush(keys.active(), &plain_id)
        .ignore()
        .query_async(&mut env.redis.clone())
        .await
        .expect("plaintext job");
    let both = [
        ("ENCRYPTION_KEY", new_key.as_str()),
        ("ENCRYPTION_OLD_KEYS", OLD_KEY),
    ];
    let (code, out) = keys_status(&env, &both);
    assert_eq!(
        code, 1,
        "a plaintext payload in Redis fails the check: {out}"
    );
    for (state, n) in [
        ("queued", 5),
        ("in_flight", 1),
        ("dead", 2),
        ("scheduled", 0),
        ("retained", 0),
    ] {
        let line = format!("job.inbound_message.{state}");
        assert_eq!(
            status_count(&out, &line, &old_id),
            Some(("old".into(), n)),
            "{state}: {out}"
        );
        assert_eq!(
            status_count(&out, &line, &new_id),
            Some(("current".into(), 0)),
            "{out}"
        );
    }
    assert_eq!(
        status_count(&out, "job.inbound_message.queued", "plaintext"),
        Some(("none".into(), 1)),
        "{out}"
    );
    assert!(out.lines().any(|l| l == "plaintext 1"), "{out}");

    // The rotation re-seals everything but the held job, and waits for it.
    let (rotation_id, _) = approved_rotation(&env).await;
    let keyring = env.config.keyring.clone();
    let events = env.events();
    let ctx = run_context(&env, &keyring, &events, "job-1", Duration::from_millis(800));
    let error = rotation::run(&env.pool, &ctx, rotation_id)
        .await
        .expect_err("a held payload keeps the rotation from completing");
    assert!(matches!(error, RotationError::Stalled { .. }), "{error}");
    let (status, total, done, failed) = rotation_row(&env, rotation_id).await;
    assert_eq!((status.as_str(), failed), ("running", 0));
    assert_eq!(
        total,
        3 + 9,
        "the tenant's three secrets and the nine payloads"
    );
    assert_eq!(done, 3 + 8);
    let now = payloads(&env).await;
    let new_key_id = env.config.keyring.current_id();
    for id in queued.iter().chain(&dead).chain([&plain_id]) {
        assert_eq!(
            at_rest("inbound_message", &now[id]),
            AtRest::Sealed(new_key_id),
            "{id}"
        );
    }
    assert_eq!(
        at_rest("inbound_message", &now[&held[0]]),
        AtRest::Sealed(old.current_id()),
        "the held job's payload is left alone"
    );

    // The holder finishes (its payload is retained); the next run re-seals it and completes.
    settle_taken(&env, "holder", &held, Outcome::Done).await;
    let ctx = run_context(&env, &keyring, &events, "job-2", rotation::STALL_LIMIT);
    let outcome = rotation::run(&env.pool, &ctx, rotation_id)
        .await
        .expect("the rotation completes");
    assert_eq!(
        outcome,
        RunOutcome::Finished {
            status: "completed".into(),
            total: 12,
            done: 12,
            failed: 0
        }
    );

    // The old key protects nothing anywhere: it may be retired, and every payload opens for
    // its own job with the new key alone.
    let (code, out) = keys_status(&env, &both);
    assert_eq!(code, 0, "{out}");
    for state in ["queued", "in_flight", "dead", "scheduled", "retained"] {
        let line = format!("job.inbound_message.{state}");
        assert_eq!(
            status_count(&out, &line, &old_id),
            Some(("old".into(), 0)),
            "{out}"
        );
    }
    assert_eq!(
        status_count(&out, "job.inbound_message.queued", &new_id),
        Some(("current".into(), 6))
    );
    assert_eq!(
        status_count(&out, "job.inbound_message.retained", &new_id),
        Some(("current".into(), 1))
    );
    let (code, out) = keys_status(&env, &[("ENCRYPTION_KEY", new_key.as_str())]);
    assert_eq!(code, 0, "{out}");
    let retired = Keyring::new(EncryptionKey::from_base64(&new_key).expect("key"), vec![]);
    for (id, payload) in payloads(&env).await {
        let sealed: Sealed<gatehouse_jobs::InboundMessage> =
            serde_json::from_str(&payload).expect("payload");
        let job = sealed.open(&id, &retired).expect("opens with the new key");
        assert_eq!(job.tenant_id, tenant);
        assert!(
            !payload.contains("+1500555") && !payload.contains("please"),
            "{payload}"
        );
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_payload_no_key_opens_is_counted_failed_reported_once_and_left_untouched() {
    let new_key = generate_key();
    let env = rotated_env(&new_key, &[]).await;
    let old = old_keyring();
    let tenant = sealed_tenant(&env, &old).await;
    let stranger = EncryptionKey::generate();
    let foreign =
        gatehouse_jobs::client::Queues::new(env.namespace.clone()).sealing_with(stranger.clone());
    let ids = enqueue_inbound(&env, &foreign, tenant, 1).await;
    let before = payloads(&env).await;
    let (code, out) = keys_status(
        &env,
        &[
            ("ENCRYPTION_KEY", new_key.as_str()),
            ("ENCRYPTION_OLD_KEYS", OLD_KEY),
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        status_count(&out, "job.inbound_message.queued", &stranger.id().to_hex()),
        Some(("unknown".into(), 1)),
        "{out}"
    );

    let (rotation_id, _) = approved_rotation(&env).await;
    let keyring = env.config.keyring.clone();
    let events = env.events();
    for job in ["job-1", "job-2"] {
        let ctx = run_context(&env, &keyring, &events, job, rotation::STALL_LIMIT);
        rotation::run(&env.pool, &ctx, rotation_id)
            .await
            .expect("the run ends");
    }
    let (status, _, done, failed) = rotation_row(&env, rotation_id).await;
    assert_eq!((status.as_str(), done, failed), ("failed", 3, 1));
    assert_eq!(payloads(&env).await, before, "left as it was");
    let reported = wait_for_events(&env, "encryption_error", 1).await;
    let for_job: Vec<_> = reported
        .iter()
        .filter(|e| e["details"]["job_id"] == ids[0].as_str())
        .collect();
    assert_eq!(for_job.len(), 1, "reported once: {reported:?}");
    assert_eq!(for_job[0]["details"]["queue"], "inbound_message");
    assert_eq!(
        for_job[0]["details"]["rotation_id"],
        rotation_id.to_string()
    );
    env.cleanup().await;
}

#[tokio::test]
async fn keys_status_exits_2_when_redis_cannot_be_reached() {
    let env = TestEnv::new().await;
    // Nothing listens there: connection refused, so the job payloads cannot be counted.
    let unreachable = format!("redis://127.0.0.1:{}", free_port());
    let (code, out) = keys_status(&env, &[("REDIS_URL", unreachable.as_str())]);
    assert_eq!(code, 2, "a service that cannot be reached: {out}");
    assert!(
        !out.lines().any(|l| l.starts_with("unknown ")),
        "no partial census is printed as if complete: {out}"
    );
    env.cleanup().await;
}
