//! Rotating `JWT_SECRET_KEY` (`JWT_SECRET_KEY_PREVIOUS`, `kid`) and `SECRET_KEY`
//! (`SECRET_KEY_PREVIOUS`, per-tenant blind indexes, `gatehouse keys reindex`), end to end
//! against real PostgreSQL and Redis: a "restart" is a new configuration and state over the
//! same database.

use std::collections::HashMap;
use std::sync::Arc;

use crate::common::*;
use gatehouse::accounts::{self, NewUser};
use gatehouse::classify::classify_with_rules;
use gatehouse::config::Config;
use gatehouse::conversations::{InboundContext, InboundOutcome, store_inbound};
use gatehouse::http::AppState;
use gatehouse::security::blind_index::BlindIndex;
use gatehouse::security::jwt::key_id;
use gatehouse::security::keyring::aad;
use gatehouse::security::password::Hasher;
use gatehouse_testenv::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde_json::json;
use uuid::Uuid;

const JWT_A: &str = "jwt-ZYXWVUTSRQPONMLKJIHGFEDCBA-9876543210-zyxwv";
const JWT_B: &str = "jwt-b-abcdefghijklmnopqrstuvwxyz-0123456789-QRS";
const SECRET_A: &str = "test-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz";
const SECRET_B: &str = "rotated-secret-key-9876543210-ZYXWVUTSRQPONMLKJIHG";
const SECRET_OLD: &str = "an-older-secret-key-from-before-the-last-change-42";
const X: &str = "+14155550100";
const Y: &str = "+14155550111";

fn vars_with(env: &TestEnv, pairs: &[(&str, &str)]) -> HashMap<String, String> {
    let mut vars = env.vars.clone();
    for (k, v) in pairs {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    vars
}

async fn server_with(env: &TestEnv, vars: &HashMap<String, String>) -> TestServer {
    let config = Arc::new(config_from(vars));
    TestServer::start(Arc::new(AppState::new(
        config,
        env.pool.clone(),
        env.redis.clone(),
    )))
    .await
}

async fn me(http: &reqwest::Client, server: &TestServer, token: &str) -> StatusCode {
    http.request(Method::GET, server.url("/v1/me"))
        .header("x-forwarded-proto", "https")
        .bearer_auth(token)
        .send()
        .await
        .expect("me")
        .status()
}

fn kid_of(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).expect("header").kid
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A token as `secret` would sign it, with the given `kid` (or none) and lifetime window.
fn forge(secret: &str, kid: Option<String>, sub: Uuid, iat: u64, exp: u64) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid;
    let claims = json!({
        "sub": sub, "iat": iat, "nbf": iat, "exp": exp, "iss": "gatehouse",
        "aud": "gatehouse-api", "jti": Uuid::new_v4(), "kind": "user",
    });
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_the_previous_jwt_key_stay_valid_until_they_expire_and_new_ones_use_the_new_key()
{
    let env = TestEnv::with_vars(|v| {
        v.insert("JWT_SECRET_KEY".into(), JWT_A.into());
    })
    .await;
    let user = accounts::create_user(
        &env.pool,
        &Hasher::owasp(),
        NewUser {
            email: "ops@example.com".into(),
            password: SecretString::from(PASSWORD),
            first_name: "Op".into(),
            last_name: "Erator".into(),
            platform_role: None,
        },
    )
    .await
    .expect("user");
    let http = client();
    let kid_a = key_id(&SecretString::from(JWT_A));
    let kid_b = key_id(&SecretString::from(JWT_B));

    // Before the rotation: tokens name key A.
    let before = server_with(&env, &env.vars).await;
    let token_a = login(&http, &before, "ops@example.com").await;
    assert_eq!(kid_of(&token_a).as_deref(), Some(kid_a.as_str()));
    assert_eq!(me(&http, &before, &token_a).await, 200);
    // A token from before kids existed (no kid, signed with the current key) still works.
    let legacy = forge(JWT_A, None, user, now(), now() + 600);
    assert_eq!(me(&http, &before, &legacy).await, 200);
    before.stop().await;

    // Restart with JWT_SECRET_KEY=B, JWT_SECRET_KEY_PREVIOUS=A.
    let rotating = vars_with(
        &env,
        &[
            ("JWT_SECRET_KEY", JWT_B),
            ("JWT_SECRET_KEY_PREVIOUS", JWT_A),
        ],
    );
    let during = server_with(&env, &rotating).await;
    assert_eq!(
        me(&http, &during, &token_a).await,
        200,
        "old token still works"
    );
    let token_b = login(&http, &during, "ops@example.com").await;
    assert_eq!(kid_of(&token_b).as_deref(), Some(kid_b.as_str()));
    assert_eq!(me(&http, &during, &token_b).await, 200);
    // ... until it expires (past the 30 s leeway).
    let expired = forge(JWT_A, Some(kid_a.clone()), user, now() - 1000, now() - 100);
    assert_eq!(me(&http, &during, &expired).await, 401);
    // A kid-less token is checked against the current key only, never the previous one.
    assert_eq!(me(&http, &during, &legacy).await, 401);
    // Key A's token relabelled as key B's does not pass either.
    let relabelled = forge(JWT_A, Some(kid_b.clone()), user, now(), now() + 600);
    assert_eq!(me(&http, &during, &relabelled).await, 401);
    during.stop().await;

    // Rotation finished: JWT_SECRET_KEY_PREVIOUS removed; key A's tokens are refused.
    let after = server_with(&env, &vars_with(&env, &[("JWT_SECRET_KEY", JWT_B)])).await;
    assert_eq!(me(&http, &after, &token_a).await, 401);
    assert_eq!(me(&http, &after, &token_b).await, 200);
    after.stop().await;
    env.cleanup().await;
}

/// Runs the built binary with `vars`; returns (success, stdout, stderr).
fn gatehouse(vars: &HashMap<String, String>, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(args)
        .env_clear()
        .envs(vars.iter())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run gatehouse");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn keys_check_validates_the_previous_keys_by_name_never_by_value() {
    let env = TestEnv::new().await;
    let ok = vars_with(
        &env,
        &[
            ("JWT_SECRET_KEY_PREVIOUS", JWT_B),
            ("SECRET_KEY_PREVIOUS", SECRET_B),
        ],
    );
    let (success, stdout, _) = gatehouse(&ok, &["keys", "check"]);
    assert!(success);
    assert_eq!(stdout.trim(), "keys ok");
    let same = env.vars["JWT_SECRET_KEY"].clone();
    let bad = vars_with(
        &env,
        &[
            ("JWT_SECRET_KEY_PREVIOUS", &same),
            ("SECRET_KEY_PREVIOUS", "too-short"),
        ],
    );
    let (success, _, stderr) = gatehouse(&bad, &["keys", "check"]);
    assert!(!success);
    assert!(stderr.contains("JWT_SECRET_KEY_PREVIOUS: must differ from JWT_SECRET_KEY"));
    assert!(stderr.contains("SECRET_KEY_PREVIOUS: must be at least 32 characters"));
    assert!(!stderr.contains(&same) && !stderr.contains("too-short"));
    // The ingress refuses to start on the same rule.
    assert!(Config::from_vars(|k| bad.get(k).cloned()).is_err());
    env.cleanup().await;
}

/// Stores a low-confidence message from `from` as a worker under `config` would; returns
/// (conversation, streak).
async fn store(env: &TestEnv, config: &Config, tenant: Uuid, from: &str) -> (Uuid, i32) {
    store_at(env, config, tenant, from, "2026-11-28T10:00:00.123Z").await
}

async fn store_at(
    env: &TestEnv,
    config: &Config,
    tenant: Uuid,
    from: &str,
    received_at: &str,
) -> (Uuid, i32) {
    let ctx = InboundContext {
        keyring: &config.keyring,
        blind_index: &config.blind_index,
        min_confidence: config.llm_min_confidence,
        worker: "test",
    };
    let mut msg = inbound_message(tenant, from, "qwzx vbnm");
    msg.received_at = received_at.into();
    let outcome = store_inbound(
        &env.pool,
        &ctx,
        &Uuid::new_v4().to_string(),
        &msg,
        &classify_with_rules(&msg.body),
    )
    .await
    .expect("stored");
    match outcome {
        InboundOutcome::Stored {
            conversation_id,
            low_confidence_count,
            ..
        } => (conversation_id, low_confidence_count),
        other => panic!("unexpected {other:?}"),
    }
}

/// A conversation as the release before per-tenant indexes wrote it: the un-tenanted index
/// under `secret`, no form recorded.
async fn legacy_conversation(
    env: &TestEnv,
    tenant: Uuid,
    number: &str,
    secret: &str,
    streak: i32,
    last_message_at: &str,
) -> Uuid {
    let id = Uuid::new_v4();
    let sealed = env.config.keyring.seal(
        number.as_bytes(),
        &aad("conversations", "customer_number", &id.to_string()),
    );
    let index = BlindIndex::new(&SecretString::from(secret))
        .compute("conversations.customer_number", number.as_bytes());
    sqlx::query(
        "INSERT INTO conversations (id, tenant_id, customer_number, customer_number_index,
                                    low_confidence_count, last_message_at)
         VALUES ($1, $2, $3, $4, $5, $6::timestamptz)",
    )
    .bind(id)
    .bind(tenant)
    .bind(sealed)
    .bind(index.to_vec())
    .bind(streak)
    .bind(last_message_at)
    .execute(&env.pool)
    .await
    .expect("legacy conversation");
    id
}

async fn form_of(env: &TestEnv, conversation: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT customer_number_index_form FROM conversations WHERE id = $1")
        .bind(conversation)
        .fetch_one(&env.pool)
        .await
        .expect("conversation")
}

async fn index_of(env: &TestEnv, conversation: Uuid) -> Vec<u8> {
    sqlx::query_scalar("SELECT customer_number_index FROM conversations WHERE id = $1")
        .bind(conversation)
        .fetch_one(&env.pool)
        .await
        .expect("conversation")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_customer_keeps_the_conversation_through_a_secret_key_rotation_and_reindex() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let other_tenant = env.create_tenant().await;
    let a = env.config.clone();
    assert_eq!(env.vars["SECRET_KEY"], SECRET_A);

    // Under SECRET_KEY=A: X writes through this release; Y's conversation is one the
    // previous release wrote (un-tenanted index, no form).
    let (conv_x, n) = store(&env, &a, tenant, X).await;
    assert_eq!(n, 1);
    assert_eq!(store(&env, &a, tenant, X).await, (conv_x, 2));
    let conv_y = legacy_conversation(&env, tenant, Y, SECRET_A, 1, "2026-11-27T10:00:00Z").await;
    assert_eq!(
        store(&env, &a, tenant, Y).await,
        (conv_y, 2),
        "the upgrade keeps Y's"
    );

    // Rotate: SECRET_KEY=B, SECRET_KEY_PREVIOUS=A. Before the reindex, both keep theirs.
    let rotating_vars = vars_with(
        &env,
        &[("SECRET_KEY", SECRET_B), ("SECRET_KEY_PREVIOUS", SECRET_A)],
    );
    let rotating = config_from(&rotating_vars);
    assert_eq!(store(&env, &rotating, tenant, X).await, (conv_x, 3));
    assert_eq!(store(&env, &rotating, tenant, Y).await, (conv_y, 3));

    let (ok, stdout, stderr) = gatehouse(&rotating_vars, &["keys", "reindex"]);
    assert!(ok, "{stderr}");
    let form = rotating.blind_index.form().to_owned();
    // Two conversations and the three messages stored under A (the two stored under B are
    // already current).
    assert!(stdout.starts_with("reindex complete: 5/5 rows"), "{stdout}");
    assert!(stdout.contains(&form), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "one summary line: {stdout}");
    assert!(!stderr.contains(SECRET_B) && !stdout.contains(SECRET_B));
    for conv in [conv_x, conv_y] {
        assert_eq!(form_of(&env, conv).await.as_deref(), Some(form.as_str()));
        assert_eq!(
            index_of(&env, conv).await,
            rotating
                .blind_index
                .compute_for_tenant(
                    "conversations.customer_number",
                    tenant,
                    if conv == conv_x { X } else { Y }.as_bytes()
                )
                .to_vec()
        );
    }
    assert_eq!(
        env.count(
            "SELECT count(*) FROM messages WHERE from_number_index_form IS DISTINCT FROM \
             (SELECT customer_number_index_form FROM conversations LIMIT 1)"
        )
        .await,
        0,
        "every message's index was rewritten too"
    );
    assert_eq!(store(&env, &rotating, tenant, X).await, (conv_x, 4));

    // SECRET_KEY_PREVIOUS removed: still the same conversations, the streak goes on.
    let rotated = config_from(&vars_with(&env, &[("SECRET_KEY", SECRET_B)]));
    assert_eq!(store(&env, &rotated, tenant, X).await, (conv_x, 5));
    assert_eq!(store(&env, &rotated, tenant, Y).await, (conv_y, 4));

    // The same number in another tenant is another conversation with an unrelated index.
    let (conv_other, n) = store(&env, &rotated, other_tenant, X).await;
    assert_ne!(conv_other, conv_x);
    assert_eq!(n, 1);
    assert_ne!(
        index_of(&env, conv_other).await,
        index_of(&env, conv_x).await
    );
    let distinct_from_indexes: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT from_number_index) FROM messages m
         JOIN conversations c ON c.id = m.conversation_id WHERE c.id = ANY($1)",
    )
    .bind(vec![conv_x, conv_other])
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(
        distinct_from_indexes, 2,
        "messages.from_number_index is per tenant too"
    );
    assert_eq!(env.count("SELECT count(*) FROM conversations").await, 3);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_resumes_where_it_stopped_and_skips_rows_already_current() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let a = env.config.clone();
    for i in 0..7 {
        store(&env, &a, tenant, &format!("+1415555020{i}")).await;
    }
    let vars = vars_with(
        &env,
        &[("SECRET_KEY", SECRET_B), ("SECRET_KEY_PREVIOUS", SECRET_A)],
    );
    let form = config_from(&vars).blind_index.form().to_owned();
    let current = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM conversations WHERE customer_number_index_form = $1)
                  + (SELECT count(*) FROM messages WHERE from_number_index_form = $1)",
        )
        .bind(&form)
        .fetch_one(&env.pool)
        .await
        .expect("count");
        n
    };

    // Stopped part way: two batches of two, committed.
    let (ok, stdout, stderr) = gatehouse(
        &vars,
        &["keys", "reindex", "--batch-size", "2", "--limit", "3"],
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("reindex stopped at --limit (run again to continue): 4/14 rows"),
        "{stdout}"
    );
    assert_eq!(current().await, 4);

    // Again: continues with the ten left.
    let (ok, stdout, stderr) = gatehouse(&vars, &["keys", "reindex", "--batch-size", "3"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("reindex complete: 10/10 rows"),
        "{stdout}"
    );
    assert_eq!(current().await, 14);

    // Nothing left: nothing rewritten.
    let (ok, stdout, _) = gatehouse(&vars, &["keys", "reindex"]);
    assert!(ok);
    assert!(stdout.starts_with("reindex complete: 0/0 rows"), "{stdout}");

    // A bad batch size is a usage error, and nothing happens.
    let (ok, _, stderr) = gatehouse(&vars, &["keys", "reindex", "--batch-size", "0"]);
    assert!(!ok);
    assert!(stderr.contains("--batch-size"), "{stderr}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_retires_a_duplicate_conversation_instead_of_colliding() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let a = env.config.clone();
    // The damage of an earlier unannounced SECRET_KEY change: X and Y each have a
    // conversation under the old key, and a second one under the current key A.
    let x_old = legacy_conversation(&env, tenant, X, SECRET_OLD, 2, "2026-11-01T10:00:00Z").await;
    let (x_new, _) = store_at(&env, &a, tenant, X, "2026-11-28T10:00:00Z").await;
    assert_ne!(x_old, x_new);
    let y_old = legacy_conversation(&env, tenant, Y, SECRET_OLD, 2, "2026-12-01T10:00:00Z").await;
    let (y_new, _) = store_at(&env, &a, tenant, Y, "2026-11-28T10:00:00Z").await;
    // And Z has two legacy rows that meet in the same batch.
    let z = "+14155550122";
    let z_old = legacy_conversation(&env, tenant, z, SECRET_OLD, 0, "2026-11-01T10:00:00Z").await;
    let z_a = legacy_conversation(&env, tenant, z, SECRET_A, 0, "2026-11-02T10:00:00Z").await;

    let (ok, stdout, stderr) = gatehouse(&env.vars, &["keys", "reindex"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("3 duplicate conversation(s) retired"),
        "{stdout}"
    );
    let form = a.blind_index.form().to_owned();
    // The conversation with the latest message keeps the index; the other is retired.
    assert_eq!(form_of(&env, x_new).await.as_deref(), Some(form.as_str()));
    assert_eq!(form_of(&env, x_old).await.as_deref(), Some("retired"));
    assert_eq!(form_of(&env, y_old).await.as_deref(), Some(form.as_str()));
    assert_eq!(form_of(&env, y_new).await.as_deref(), Some("retired"));
    assert_eq!(form_of(&env, z_a).await.as_deref(), Some(form.as_str()));
    assert_eq!(form_of(&env, z_old).await.as_deref(), Some("retired"));
    assert_eq!(index_of(&env, x_old).await, x_old.as_bytes().to_vec());
    // Nothing was deleted, and the next messages land in the survivors.
    assert_eq!(env.count("SELECT count(*) FROM conversations").await, 6);
    assert_eq!(store(&env, &a, tenant, X).await.0, x_new);
    assert_eq!(store(&env, &a, tenant, Y).await.0, y_old);
    assert_eq!(store(&env, &a, tenant, z).await.0, z_a);
    // Run again: retired rows are not revisited.
    let (ok, stdout, _) = gatehouse(&env.vars, &["keys", "reindex"]);
    assert!(ok);
    assert!(stdout.starts_with("reindex complete: 0/0 rows"), "{stdout}");
    env.cleanup().await;
}
