//! The tenant boundary for producers and the incident tools, against the real ingress,
//! PostgreSQL and Redis: bound service accounts, the caller as a sync's requester, and
//! deactivation, revocation and platform-role changes refusing a token already in hand on
//! its very next request (on every ingress process), plus the commands as an operator runs
//! them.

use std::process::Output;
use std::time::Duration;

use crate::common::*;
use gatehouse::access::{PlatformRole, ScopeCache};
use gatehouse::accounts::{self, TenantBinding};
use gatehouse::security::password::Hasher;
use gatehouse_testenv::*;
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use uuid::Uuid;

fn message(tenant: Uuid) -> Value {
    json!({
        "tenant_id": tenant,
        "message_sid": message_sid(),
        "from": "+14155550100",
        "to": "+14155550199",
        "body": "Where is my order?",
        "received_at": "2026-11-28T10:00:00Z",
    })
}

async fn token_for(server: &TestServer, client_id: &str, secret: &str) -> reqwest::Response {
    client()
        .post(server.url("/v1/auth/token"))
        .header("x-forwarded-proto", "https")
        .json(&json!({"client_id": client_id, "client_secret": secret}))
        .send()
        .await
        .expect("token request")
}

async fn access_token(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    body["access_token"].as_str().expect("token").to_owned()
}

/// A bound (or all-tenants) producer's credentials and a token.
async fn producer(
    env: &TestEnv,
    server: &TestServer,
    binding: TenantBinding,
) -> (accounts::ServiceCredentials, String) {
    let creds = accounts::create_bound_service_account(
        &env.pool,
        &Hasher::owasp(),
        "producer",
        &["jobs:enqueue".to_owned()],
        &binding,
    )
    .await
    .expect("service account");
    let token = access_token(
        token_for(
            server,
            &creds.client_id,
            creds.client_secret.expose_secret(),
        )
        .await,
    )
    .await;
    (creds, token)
}

async fn enqueue(
    server: &TestServer,
    token: &str,
    queue: &str,
    payload: &Value,
) -> (StatusCode, Value) {
    let r = client()
        .post(server.url(&format!("/v1/jobs/{queue}")))
        .header("x-forwarded-proto", "https")
        .bearer_auth(token)
        .json(payload)
        .send()
        .await
        .expect("enqueue");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn me(server: &TestServer, token: &str) -> (StatusCode, String) {
    let r = client()
        .get(server.url("/v1/me"))
        .header("x-forwarded-proto", "https")
        .bearer_auth(token)
        .send()
        .await
        .expect("me");
    (r.status(), r.text().await.expect("body"))
}

async fn login(server: &TestServer, email: &str, password: &str) -> reqwest::Response {
    client()
        .post(server.url("/v1/auth/login"))
        .header("x-forwarded-proto", "https")
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .expect("login")
}

async fn queued(env: &TestEnv, queue: &str) -> i64 {
    env.queued(queue).await
}

/// The stored payloads of `queue`'s jobs (the queue's data hash: job id → payload).
async fn queued_payloads(env: &TestEnv, queue: &str) -> Vec<Value> {
    let mut redis = env.redis.clone();
    let values: Vec<String> = redis::cmd("HVALS")
        .arg(format!("{}:{{{queue}:0}}:data", env.namespace))
        .query_async(&mut redis)
        .await
        .expect("hvals");
    values
        .iter()
        .filter_map(|v| serde_json::from_str::<Value>(v).ok())
        .collect()
}

async fn denied_for(env: &TestEnv, tenant: Option<Uuid>) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM security_events WHERE type = 'permission_denied'
              AND details->>'reason' = 'tenant_not_bound'
              AND tenant_id IS NOT DISTINCT FROM $1",
        )
        .bind(tenant)
        .fetch_one(&env.pool)
        .await
        .expect("count");
        if n >= 1 || std::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bound_producer_enqueues_for_its_tenants_only_and_is_told_403_for_any_other() {
    let env = TestEnv::new().await;
    let mine = env.create_tenant().await;
    let theirs = env.create_tenant().await;
    let server = env.start_server().await;
    let (_, token) = producer(&env, &server, TenantBinding::Tenants(vec![mine])).await;

    let (status, _) = enqueue(&server, &token, "inbound_message", &message(mine)).await;
    assert_eq!(status, 202);
    assert_eq!(queued(&env, "inbound_message").await, 1);

    let (status, body) = enqueue(&server, &token, "inbound_message", &message(theirs)).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(
        denied_for(&env, Some(theirs)).await,
        1,
        "a permission_denied event"
    );
    // A tenant that does not exist gets the same 403 (no probing), and its event names no
    // tenant.
    let (status, _) = enqueue(&server, &token, "inbound_message", &message(Uuid::new_v4())).await;
    assert_eq!(status, 403);
    assert_eq!(denied_for(&env, None).await, 1);
    // A sync of another tenant, with that tenant's store, is refused the same way.
    let sync = json!({"tenant_id": theirs, "requested_by": Uuid::new_v4(), "mode": "full"});
    let (status, _) = enqueue(&server, &token, "sync_catalog", &sync).await;
    assert_eq!(status, 403);
    assert_eq!(
        queued(&env, "inbound_message").await,
        1,
        "nothing more enqueued"
    );
    assert_eq!(queued(&env, "sync_catalog").await, 0);

    // An all-tenants account (explicitly so) reaches both.
    let (_, wide) = producer(&env, &server, TenantBinding::All).await;
    for tenant in [mine, theirs] {
        let (status, _) = enqueue(&server, &wide, "inbound_message", &message(tenant)).await;
        assert_eq!(status, 202);
    }
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_produce_for_their_tenants_and_platform_admins_for_all() {
    let env = TestEnv::new().await;
    let member_of = env.create_tenant().await;
    let other = env.create_tenant().await;
    let server = env.start_server().await;
    let service = create_user(&env, "svc@example.com", Some(PlatformRole::Service)).await;
    create_user(&env, "admin@example.com", Some(PlatformRole::PlatformAdmin)).await;
    sqlx::query("INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, 'agent')")
        .bind(member_of)
        .bind(service)
        .execute(&env.pool)
        .await
        .expect("membership");
    let svc = access_token(login(&server, "svc@example.com", PASSWORD).await).await;
    let admin = access_token(login(&server, "admin@example.com", PASSWORD).await).await;
    assert_eq!(
        enqueue(&server, &svc, "inbound_message", &message(member_of))
            .await
            .0,
        202
    );
    assert_eq!(
        enqueue(&server, &svc, "inbound_message", &message(other))
            .await
            .0,
        403
    );
    for tenant in [member_of, other] {
        assert_eq!(
            enqueue(&server, &admin, "inbound_message", &message(tenant))
                .await
                .0,
            202
        );
    }
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sync_records_the_caller_as_requester_whatever_the_payload_says() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let (creds, token) = producer(&env, &server, TenantBinding::Tenants(vec![tenant])).await;
    let forged = Uuid::new_v4();
    let sync = json!({"tenant_id": tenant, "requested_by": forged, "mode": "full"});
    let (status, _) = enqueue(&server, &token, "sync_catalog", &sync).await;
    assert_eq!(status, 202);
    let payloads = queued_payloads(&env, "sync_catalog").await;
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    assert_eq!(payloads[0]["requested_by"], json!(creds.id));
    assert_eq!(payloads[0]["tenant_id"], json!(tenant));
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_producer_is_refused_on_its_next_request_on_every_ingress_and_gets_no_new_token()
{
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    // Two ingress processes' worth of state sharing one Redis and one database.
    let a = env.start_server().await;
    let b = env.start_server().await;
    let (creds, token) = producer(&env, &a, TenantBinding::Tenants(vec![tenant])).await;
    // Both ingresses have the principal cached (the cache is what must not be trusted).
    for server in [&a, &b] {
        assert_eq!(me(server, &token).await.0, 200);
        assert_eq!(
            enqueue(server, &token, "inbound_message", &message(tenant))
                .await
                .0,
            202
        );
    }
    let (_, garbage_body) = me(&a, "not-a-token").await;

    let mut redis = env.redis.clone();
    let cache = ScopeCache::new(env.namespace.clone());
    let done = gatehouse::principals::revoke_service_account(
        &env.pool,
        &mut redis,
        &cache,
        &creds.client_id,
    )
    .await
    .expect("revoked");
    assert!(done.changed);
    for server in [&a, &b] {
        let (status, body) = me(server, &token).await;
        assert_eq!(status, 401);
        assert_eq!(body, garbage_body, "refused exactly like an invalid token");
        assert_eq!(
            enqueue(server, &token, "inbound_message", &message(tenant))
                .await
                .0,
            401
        );
    }
    assert_eq!(
        queued(&env, "inbound_message").await,
        2,
        "nothing enqueued after"
    );
    // No new token with the right secret.
    let refused = token_for(&a, &creds.client_id, creds.client_secret.expose_secret()).await;
    assert_eq!(refused.status(), 401);
    a.stop().await;
    b.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deactivated_users_token_is_refused_at_once_and_login_answers_as_a_wrong_password() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let id = create_user(&env, "ada@example.com", Some(PlatformRole::SecurityOfficer)).await;
    let token = access_token(login(&server, "ada@example.com", PASSWORD).await).await;
    assert_eq!(me(&server, &token).await.0, 200);
    let (_, garbage_body) = me(&server, "not-a-token").await;

    let mut redis = env.redis.clone();
    let cache = ScopeCache::new(env.namespace.clone());
    let done = gatehouse::principals::set_user_active(
        &env.pool,
        &mut redis,
        &cache,
        "Ada@Example.com",
        false,
    )
    .await
    .expect("deactivated");
    assert_eq!(done.id, id);
    let (status, body) = me(&server, &token).await;
    assert_eq!(status, 401);
    assert_eq!(body, garbage_body);

    let right = login(&server, "ada@example.com", PASSWORD).await;
    let right_status = right.status();
    let right_body = right.text().await.expect("body");
    let wrong = login(&server, "ada@example.com", "not the password at all").await;
    assert_eq!(right_status, 401);
    assert_eq!(wrong.status(), 401);
    assert_eq!(right_body, wrong.text().await.expect("body"));

    // Activated again: a fresh login works (the old token, still unexpired, works too).
    gatehouse::principals::set_user_active(&env.pool, &mut redis, &cache, "ada@example.com", true)
        .await
        .expect("activated");
    assert_eq!(me(&server, &token).await.0, 200);
    access_token(login(&server, "ada@example.com", PASSWORD).await).await;
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_platform_role_takes_the_scopes_away_on_the_next_request() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    create_user(&env, "ops@example.com", Some(PlatformRole::PlatformAdmin)).await;
    let token = access_token(login(&server, "ops@example.com", PASSWORD).await).await;
    assert_eq!(
        enqueue(&server, &token, "inbound_message", &message(tenant))
            .await
            .0,
        202
    );
    let mut redis = env.redis.clone();
    let cache = ScopeCache::new(env.namespace.clone());
    let change = gatehouse::principals::set_platform_role(
        &env.pool,
        &mut redis,
        &cache,
        "ops@example.com",
        None,
    )
    .await
    .expect("role removed");
    assert_eq!(change.previous.as_deref(), Some("platform_admin"));
    assert_eq!(
        enqueue(&server, &token, "inbound_message", &message(tenant))
            .await
            .0,
        403
    );
    let (_, body) = me(&server, &token).await;
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["platform_scopes"], json!([]));
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn last_used_is_set_when_a_token_is_issued() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let creds = accounts::create_bound_service_account(
        &env.pool,
        &Hasher::owasp(),
        "p",
        &["jobs:enqueue".to_owned()],
        &TenantBinding::All,
    )
    .await
    .expect("account");
    let before: Option<time::OffsetDateTime> =
        sqlx::query_scalar("SELECT last_used_at FROM service_accounts WHERE id = $1")
            .bind(creds.id)
            .fetch_one(&env.pool)
            .await
            .expect("row");
    assert!(before.is_none());
    access_token(
        token_for(
            &server,
            &creds.client_id,
            creds.client_secret.expose_secret(),
        )
        .await,
    )
    .await;
    let after: Option<time::OffsetDateTime> =
        sqlx::query_scalar("SELECT last_used_at FROM service_accounts WHERE id = $1")
            .bind(creds.id)
            .fetch_one(&env.pool)
            .await
            .expect("row");
    assert!(after.is_some());
    server.stop().await;
    env.cleanup().await;
}

// ---- the commands, as an operator runs them ----

fn run(env: &TestEnv, args: &[&str]) -> Output {
    run_cli(args, &env.vars, "")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn line_value(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {out}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_accounts_create_needs_exactly_one_binding_and_known_tenants() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let t = tenant.to_string();
    let ghost = Uuid::new_v4().to_string();

    let neither = run(
        &env,
        &[
            "service-accounts",
            "create",
            "--name",
            "p",
            "--scope",
            "jobs:enqueue",
        ],
    );
    assert_eq!(neither.status.code(), Some(1));
    assert!(
        text(&neither.stderr).contains("--tenant"),
        "{}",
        text(&neither.stderr)
    );
    let both = run(
        &env,
        &[
            "service-accounts",
            "create",
            "--name",
            "p",
            "--scope",
            "jobs:enqueue",
            "--tenant",
            &t,
            "--all-tenants",
        ],
    );
    assert_eq!(both.status.code(), Some(1));
    let unknown = run(
        &env,
        &[
            "service-accounts",
            "create",
            "--name",
            "p",
            "--scope",
            "jobs:enqueue",
            "--tenant",
            &t,
            "--tenant",
            &ghost,
        ],
    );
    assert_eq!(unknown.status.code(), Some(1));
    let err = text(&unknown.stderr);
    assert!(err.contains(&format!("no tenant with id {ghost}")), "{err}");
    let wide = run(
        &env,
        &[
            "service-accounts",
            "create",
            "--name",
            "p",
            "--scope",
            "platform:admin",
            "--tenant",
            &t,
        ],
    );
    assert_eq!(wide.status.code(), Some(1));
    assert!(text(&wide.stderr).contains("--all-tenants"));
    assert_eq!(
        env.count("SELECT count(*) FROM service_accounts").await,
        0,
        "nothing created"
    );

    let bound = run(
        &env,
        &[
            "service-accounts",
            "create",
            "--name",
            "shop-bot",
            "--scope",
            "jobs:enqueue",
            "--tenant",
            &t,
        ],
    );
    assert_eq!(bound.status.code(), Some(0), "{}", text(&bound.stderr));
    let out = text(&bound.stdout);
    let client_id = line_value(&out, "client_id");
    let secret = line_value(&out, "client_secret");
    let all = run(
        &env,
        &[
            "service-accounts",
            "create",
            "--name",
            "fleet",
            "--scope",
            "jobs:enqueue",
            "--all-tenants",
        ],
    );
    assert_eq!(all.status.code(), Some(0), "{}", text(&all.stderr));
    assert_eq!(env.wait_for_events("service_account_created", 2).await, 2);

    let list = run(&env, &["service-accounts", "list"]);
    assert_eq!(list.status.code(), Some(0), "{}", text(&list.stderr));
    let listed = text(&list.stdout);
    assert!(!listed.contains(&secret), "never a secret");
    let row = listed
        .lines()
        .find(|l| l.contains(&client_id))
        .unwrap_or_else(|| panic!("{client_id} listed: {listed}"));
    let cols: Vec<&str> = row.split('\t').collect();
    assert_eq!(cols[2], "shop-bot");
    assert_eq!(cols[3], "jobs:enqueue");
    assert_eq!(cols[4], t);
    assert_eq!(cols[5], "active");
    assert_eq!(cols[7], "never");
    let fleet = listed
        .lines()
        .find(|l| l.contains("\tfleet\t"))
        .expect("fleet listed");
    assert_eq!(fleet.split('\t').nth(4), Some("all"));

    let revoked = run(
        &env,
        &["service-accounts", "revoke", "--client-id", &client_id],
    );
    assert_eq!(revoked.status.code(), Some(0), "{}", text(&revoked.stderr));
    let line = text(&revoked.stdout);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.starts_with(&format!("revoked service account {client_id}")),
        "{line}"
    );
    assert_eq!(env.wait_for_events("service_account_revoked", 1).await, 1);
    let listed = text(&run(&env, &["service-accounts", "list"]).stdout);
    let row = listed
        .lines()
        .find(|l| l.contains(&client_id))
        .expect("still listed");
    assert!(
        row.split('\t')
            .nth(5)
            .is_some_and(|s| s.starts_with("revoked ")),
        "{row}"
    );

    let missing = run(
        &env,
        &[
            "service-accounts",
            "revoke",
            "--client-id",
            "gh_nosuchaccount0",
        ],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("no service account with client id gh_nosuchaccount0"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_commands_confirm_in_one_line_record_events_and_refuse_unknown_emails() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let id = create_user(&env, "eve@example.com", Some(PlatformRole::PlatformAdmin)).await;
    let token = access_token(login(&server, "eve@example.com", PASSWORD).await).await;
    assert_eq!(me(&server, &token).await.0, 200);

    let out = run(&env, &["users", "deactivate", "--email", "eve@example.com"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    assert_eq!(line.lines().count(), 1);
    assert!(
        line.starts_with(&format!("deactivated user eve@example.com ({id})")),
        "{line}"
    );
    // The binary's change reaches this ingress's next request.
    assert_eq!(me(&server, &token).await.0, 401);
    assert_eq!(env.wait_for_events("user_deactivated", 1).await, 1);

    let out = run(&env, &["users", "activate", "--email", "eve@example.com"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("activated user eve@example.com"));
    assert_eq!(me(&server, &token).await.0, 200);
    assert_eq!(env.wait_for_events("user_activated", 1).await, 1);

    let out = run(
        &env,
        &[
            "users",
            "set-platform-role",
            "--email",
            "eve@example.com",
            "--role",
            "none",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    assert!(line.contains("platform_admin -> none"), "{line}");
    let (_, body) = me(&server, &token).await;
    assert!(body.contains("\"platform_scopes\":[]"), "{body}");
    let out = run(
        &env,
        &[
            "users",
            "set-platform-role",
            "--email",
            "eve@example.com",
            "--role",
            "service",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("none -> service"));
    assert_eq!(env.wait_for_events("platform_role_changed", 2).await, 2);
    let recorded: Value = sqlx::query_scalar(
        "SELECT details FROM security_events WHERE type = 'platform_role_changed'
          ORDER BY occurred_at LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .expect("event");
    assert_eq!(recorded["from"], "platform_admin");
    assert_eq!(recorded["to"], Value::Null);

    let bad_role = run(
        &env,
        &[
            "users",
            "set-platform-role",
            "--email",
            "eve@example.com",
            "--role",
            "root",
        ],
    );
    assert_eq!(bad_role.status.code(), Some(1));
    assert!(text(&bad_role.stderr).contains("--role must be"));
    for args in [
        vec!["users", "deactivate", "--email", "nobody@example.com"],
        vec!["users", "activate", "--email", "nobody@example.com"],
        vec![
            "users",
            "set-platform-role",
            "--email",
            "nobody@example.com",
            "--role",
            "none",
        ],
    ] {
        let out = run(&env, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&out.stderr).contains("no user with email nobody@example.com"),
            "{}",
            text(&out.stderr)
        );
    }
    server.stop().await;
    env.cleanup().await;
}
