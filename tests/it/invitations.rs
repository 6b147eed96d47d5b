//! The tenant boundary (SPEC "Tenant boundary"): owners by invitation only — an account holding
//! the owner's email gets nothing, a token makes its holder the owner once — and membership
//! changes whose owner rules are checked inside their transaction. Also the operator's side:
//! `tenants create --owner-email` and `tenants webhook-url` through the real binary.

use std::time::Duration;

use crate::common::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gatehouse::access::{PlatformRole, TenantRole};
use gatehouse::security::twilio::{Algorithm, sign_form};
use gatehouse_testenv::run_cli as run;
use gatehouse_testenv::*;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

async fn role_of(env: &TestEnv, tenant: Uuid, user: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT role FROM memberships WHERE tenant_id = $1 AND user_id = $2")
        .bind(tenant)
        .bind(user)
        .fetch_optional(&env.pool)
        .await
        .expect("role")
}

async fn owners(env: &TestEnv, tenant: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM memberships WHERE tenant_id = $1 AND role = 'owner'")
        .bind(tenant)
        .fetch_one(&env.pool)
        .await
        .expect("owners")
}

async fn accept(
    http: &reqwest::Client,
    server: &TestServer,
    bearer: &str,
    token: &str,
) -> (u16, Value) {
    let r = api(http, server, Method::POST, "/v1/invitations/accept")
        .bearer_auth(bearer)
        .json(&json!({"token": token}))
        .send()
        .await
        .expect("accept");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `POST /v1/tenants` with an owner email, as a platform admin: (tenant id, invite token).
async fn create_tenant_inviting(
    http: &reqwest::Client,
    server: &TestServer,
    admin: &str,
    owner_email: &str,
) -> (Uuid, String) {
    let r = api(http, server, Method::POST, "/v1/tenants")
        .bearer_auth(admin)
        .json(&json!({
            "name": "New shop",
            "twilio_account_sid": ACCOUNT_SID,
            "twilio_auth_token": TOKEN,
            "owner_email": owner_email,
        }))
        .send()
        .await
        .expect("create tenant");
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.expect("json");
    let keys: Vec<&String> = body.as_object().expect("object").keys().collect();
    assert_eq!(keys, ["id", "invite_token"], "the 201 body: {body}");
    let id = body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let token = body["invite_token"].as_str().expect("token").to_owned();
    (id, token)
}

fn assert_token_shape(token: &str) {
    let raw = URL_SAFE_NO_PAD.decode(token).expect("URL-safe base64");
    assert_eq!(raw.len(), 32, "32 random bytes");
}

async fn sync_status(http: &reqwest::Client, server: &TestServer, bearer: &str, t: Uuid) -> u16 {
    api(
        http,
        server,
        Method::POST,
        &format!("/v1/tenants/{t}/catalog/sync"),
    )
    .bearer_auth(bearer)
    .json(&json!({"mode": "full"}))
    .send()
    .await
    .expect("sync")
    .status()
    .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_squatting_the_owners_email_gets_nothing_and_only_the_token_holder_becomes_owner()
 {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = reqwest::Client::new();
    create_user(&env, "admin@example.com", Some(PlatformRole::PlatformAdmin)).await;
    let admin = login(&http, &server, "admin@example.com").await;

    // The squatter registers the shop's address before the operator onboards the shop.
    let r = api(&http, &server, Method::POST, "/v1/auth/register")
        .json(
            &json!({"email": "owner@newshop.example", "password": PASSWORD,
                      "first_name": "Mallory", "last_name": "Squat"}),
        )
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 201);
    let squatter: Uuid = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let squatter_t = login(&http, &server, "owner@newshop.example").await;

    let (tenant, token) =
        create_tenant_inviting(&http, &server, &admin, "owner@newshop.example").await;
    assert_token_shape(&token);

    // Holding the email grants nothing.
    assert_eq!(role_of(&env, tenant, squatter).await, None);
    assert_eq!(env.count("SELECT count(*) FROM memberships").await, 0);
    let me: Value = api(&http, &server, Method::GET, "/v1/me")
        .bearer_auth(&squatter_t)
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("json");
    assert_eq!(me["memberships"], json!([]));
    assert_eq!(sync_status(&http, &server, &squatter_t, tenant).await, 403);
    let put = api(
        &http,
        &server,
        Method::PUT,
        &format!("/v1/tenants/{tenant}/members/{squatter}"),
    )
    .bearer_auth(&squatter_t)
    .json(&json!({"role": "owner"}))
    .send()
    .await
    .expect("put");
    assert_eq!(put.status(), 403, "nor can it make itself a member");

    // The invitation is stored hashed, for the email it was issued for.
    let (email, hash, accepted): (String, Vec<u8>, Option<Uuid>) = sqlx::query_as(
        "SELECT email, token_hash, accepted_by FROM tenant_invitations WHERE tenant_id = $1",
    )
    .bind(tenant)
    .fetch_one(&env.pool)
    .await
    .expect("invitation row");
    assert_eq!(email, "owner@newshop.example");
    assert_eq!(hash, Sha256::digest(token.as_bytes()).to_vec());
    assert_eq!(accepted, None);

    // The real owner, under any address, signs in and presents the token. Its scopes are
    // cached first, so the membership must reach it through the scope version.
    let owner = create_user(&env, "real.owner@elsewhere.example", None).await;
    let owner_t = login(&http, &server, "real.owner@elsewhere.example").await;
    assert_eq!(sync_status(&http, &server, &owner_t, tenant).await, 403);
    let (status, body) = accept(&http, &server, &owner_t, &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"tenant_id": tenant, "role": "owner"}));
    assert_eq!(role_of(&env, tenant, owner).await.as_deref(), Some("owner"));
    assert_eq!(
        sync_status(&http, &server, &owner_t, tenant).await,
        202,
        "the next request has the owner's scopes"
    );
    let accepted_by: Option<Uuid> =
        sqlx::query_scalar("SELECT accepted_by FROM tenant_invitations WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(&env.pool)
            .await
            .expect("row");
    assert_eq!(accepted_by, Some(owner));

    // The squatter, too late, gets the same 404 as for any used token.
    let (status, _) = accept(&http, &server, &squatter_t, &token).await;
    assert_eq!(status, 404);
    assert_eq!(role_of(&env, tenant, squatter).await, None);

    assert!(env.wait_for_events("invitation_accepted", 1).await >= 1);
    let (user, event_tenant, details): (Option<Uuid>, Option<Uuid>, Value) = sqlx::query_as(
        "SELECT user_id, tenant_id, details FROM security_events WHERE type = 'invitation_accepted'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("event");
    assert_eq!((user, event_tenant), (Some(owner), Some(tenant)));
    assert_eq!(details["role"], "owner");
    assert!(
        !details.to_string().contains(&token),
        "no token in the event"
    );
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_used_and_expired_tokens_all_get_the_same_404() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = reqwest::Client::new();
    create_user(&env, "admin@example.com", Some(PlatformRole::PlatformAdmin)).await;
    let admin = login(&http, &server, "admin@example.com").await;
    let alice = create_user(&env, "alice@example.com", None).await;
    let bob = create_user(&env, "bob@example.com", None).await;
    let alice_t = login(&http, &server, "alice@example.com").await;
    let bob_t = login(&http, &server, "bob@example.com").await;

    let (used_tenant, used) =
        create_tenant_inviting(&http, &server, &admin, "alice@example.com").await;
    let (expired_tenant, expired) =
        create_tenant_inviting(&http, &server, &admin, "bob@example.com").await;
    // The TTL comes from INVITE_TTL_SECONDS (default 7 days).
    let ttl: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM expires_at - created_at)::float8 FROM tenant_invitations
          WHERE tenant_id = $1",
    )
    .bind(expired_tenant)
    .fetch_one(&env.pool)
    .await
    .expect("ttl");
    assert!((ttl - 604_800.0).abs() < 5.0, "{ttl}");
    sqlx::query(
        "UPDATE tenant_invitations SET created_at = now() - interval '8 days',
                expires_at = now() - interval '1 second' WHERE tenant_id = $1",
    )
    .bind(expired_tenant)
    .execute(&env.pool)
    .await
    .expect("backdate");

    let (status, _) = accept(&http, &server, &alice_t, &used).await;
    assert_eq!(status, 200);
    let (status, again) = accept(&http, &server, &alice_t, &used).await;
    assert_eq!(status, 404, "single use, even for the one who accepted it");
    let (status, used_body) = accept(&http, &server, &bob_t, &used).await;
    assert_eq!(status, 404);
    let (status, expired_body) = accept(&http, &server, &bob_t, &expired).await;
    assert_eq!(status, 404);
    let unknown = URL_SAFE_NO_PAD.encode([7u8; 32]);
    let (status, unknown_body) = accept(&http, &server, &bob_t, &unknown).await;
    assert_eq!(status, 404);
    let (status, empty_body) = accept(&http, &server, &bob_t, "").await;
    assert_eq!(status, 404);
    assert_eq!(unknown_body["error"]["code"], "not_found");
    for body in [&again, &used_body, &expired_body, &empty_body] {
        assert_eq!(body, &unknown_body, "one body for every refusal");
    }
    assert_eq!(owners(&env, used_tenant).await, 1);
    assert_eq!(
        role_of(&env, used_tenant, alice).await.as_deref(),
        Some("owner")
    );
    assert_eq!(role_of(&env, used_tenant, bob).await, None);
    assert_eq!(owners(&env, expired_tenant).await, 0);

    // An owner email that is no address is refused before anything is written.
    let r = api(&http, &server, Method::POST, "/v1/tenants")
        .bearer_auth(&admin)
        .json(&json!({"name": "S", "twilio_account_sid": ACCOUNT_SID,
                      "twilio_auth_token": TOKEN, "owner_email": "not an email"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400, "a malformed owner_email is refused");
    assert_eq!(
        env.count("SELECT count(*) FROM tenants").await,
        2,
        "and nothing is created"
    );

    // Operators see why each was refused; the token is in no event.
    assert!(env.wait_for_events("permission_denied", 5).await >= 5);
    let reasons: Vec<(Option<String>, Option<Uuid>)> = sqlx::query_as(
        "SELECT details->>'reason', tenant_id FROM security_events
          WHERE type = 'permission_denied' AND details->>'action' = 'accept_invitation'
          ORDER BY occurred_at, id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("events");
    let mut reasons: Vec<_> = reasons
        .into_iter()
        .map(|(r, t)| (r.unwrap_or_default(), t))
        .collect();
    reasons.sort();
    let mut want = vec![
        ("used".to_owned(), Some(used_tenant)),
        ("used".to_owned(), Some(used_tenant)),
        ("expired".to_owned(), Some(expired_tenant)),
        ("unknown".to_owned(), None),
        ("unknown".to_owned(), None),
    ];
    want.sort();
    assert_eq!(reasons, want);
    let all: Vec<Value> = sqlx::query_scalar("SELECT to_jsonb(e) FROM security_events e")
        .fetch_all(&env.pool)
        .await
        .expect("events");
    for event in all {
        let text = event.to_string();
        assert!(!text.contains(&used) && !text.contains(&expired));
    }
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_accepts_of_one_token_make_exactly_one_owner() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = reqwest::Client::new();
    create_user(&env, "admin@example.com", Some(PlatformRole::PlatformAdmin)).await;
    let admin = login(&http, &server, "admin@example.com").await;
    let mut users = Vec::new();
    for email in ["one@example.com", "two@example.com"] {
        let id = create_user(&env, email, None).await;
        users.push((id, login(&http, &server, email).await));
    }
    for round in 0..5 {
        let (tenant, token) =
            create_tenant_inviting(&http, &server, &admin, "one@example.com").await;
        let (a, b) = tokio::join!(
            accept(&http, &server, &users[0].1, &token),
            accept(&http, &server, &users[1].1, &token),
        );
        let mut statuses = [a.0, b.0];
        statuses.sort();
        assert_eq!(statuses, [200, 404], "round {round}: exactly one wins");
        assert_eq!(owners(&env, tenant).await, 1, "round {round}");
        let winner = if a.0 == 200 { users[0].0 } else { users[1].0 };
        let accepted_by: Option<Uuid> =
            sqlx::query_scalar("SELECT accepted_by FROM tenant_invitations WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_one(&env.pool)
                .await
                .expect("row");
        assert_eq!(accepted_by, Some(winner));
    }
    server.stop().await;
    env.cleanup().await;
}

async fn put_role(
    http: &reqwest::Client,
    server: &TestServer,
    bearer: &str,
    tenant: Uuid,
    user: Uuid,
    role: &str,
) -> u16 {
    api(
        http,
        server,
        Method::PUT,
        &format!("/v1/tenants/{tenant}/members/{user}"),
    )
    .bearer_auth(bearer)
    .json(&json!({"role": role}))
    .send()
    .await
    .expect("put")
    .status()
    .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_demotions_of_a_tenants_two_owners_never_leave_it_without_one() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = reqwest::Client::new();
    create_user(&env, "admin@example.com", Some(PlatformRole::PlatformAdmin)).await;
    let admin = login(&http, &server, "admin@example.com").await;
    let a = create_user(&env, "a@example.com", None).await;
    let b = create_user(&env, "b@example.com", None).await;
    let a_t = login(&http, &server, "a@example.com").await;
    let b_t = login(&http, &server, "b@example.com").await;
    for round in 0..4 {
        let tenant = env.create_tenant().await;
        add_member(&env, tenant, a, TenantRole::Owner).await;
        add_member(&env, tenant, b, TenantRole::Owner).await;
        // Each owner demotes the other at once.
        let (x, y) = tokio::join!(
            put_role(&http, &server, &a_t, tenant, b, "admin"),
            put_role(&http, &server, &b_t, tenant, a, "admin"),
        );
        let successes = [x, y].iter().filter(|s| **s == 200).count();
        assert!(successes <= 1, "round {round}: {x} {y}");
        assert_eq!(owners(&env, tenant).await, 1, "round {round}: {x} {y}");
        // A platform admin demotes both at once: one wins, the other is the last owner.
        let tenant = env.create_tenant().await;
        add_member(&env, tenant, a, TenantRole::Owner).await;
        add_member(&env, tenant, b, TenantRole::Owner).await;
        let (x, y) = tokio::join!(
            put_role(&http, &server, &admin, tenant, a, "agent"),
            put_role(&http, &server, &admin, tenant, b, "agent"),
        );
        let mut statuses = [x, y];
        statuses.sort();
        assert_eq!(statuses, [200, 409], "round {round}");
        assert_eq!(owners(&env, tenant).await, 1, "round {round}");
    }
    server.stop().await;
    env.cleanup().await;
}

/// Waits until some statement of this test's database waits for a lock.
async fn wait_for_lock_waiter(env: &TestEnv) {
    let waiting = eventually(Duration::from_secs(10), || async {
        env.count(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
            > 0
    })
    .await;
    assert!(waiting, "the change waits for the tenant's lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_admins_change_is_judged_by_the_roles_as_they_are_when_it_commits() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = reqwest::Client::new();
    let tenant = env.create_tenant().await;
    let owner = create_user(&env, "owner@example.com", None).await;
    let tadmin = create_user(&env, "tadmin@example.com", None).await;
    let target = create_user(&env, "target@example.com", None).await;
    add_member(&env, tenant, owner, TenantRole::Owner).await;
    add_member(&env, tenant, tadmin, TenantRole::Admin).await;
    add_member(&env, tenant, target, TenantRole::Admin).await;
    let tadmin_t = login(&http, &server, "tadmin@example.com").await;

    // An owner's change is in flight (it holds the tenant's lock) when the tenant admin asks
    // to demote the target, an admin so far; the owner's change promotes the target.
    let mut other = env.pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
        .bind(tenant)
        .execute(&mut *other)
        .await
        .expect("lock");
    let request = tokio::spawn({
        let (http, url, token) = (
            http.clone(),
            server.url(&format!("/v1/tenants/{tenant}/members/{target}")),
            tadmin_t.clone(),
        );
        async move {
            http.put(url)
                .header("x-forwarded-proto", "https")
                .bearer_auth(token)
                .json(&json!({"role": "agent"}))
                .send()
                .await
                .expect("put")
                .status()
                .as_u16()
        }
    });
    wait_for_lock_waiter(&env).await;
    sqlx::query("UPDATE memberships SET role = 'owner' WHERE tenant_id = $1 AND user_id = $2")
        .bind(tenant)
        .bind(target)
        .execute(&mut *other)
        .await
        .expect("promote");
    other.commit().await.expect("commit");
    assert_eq!(
        request.await.expect("request"),
        403,
        "an admin does not change an owner's role, even one made owner while it waited"
    );
    assert_eq!(
        role_of(&env, tenant, target).await.as_deref(),
        Some("owner")
    );

    // Likewise the admin's own role: demoted to agent while its change waits, it changes nothing.
    let mut other = env.pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
        .bind(tenant)
        .execute(&mut *other)
        .await
        .expect("lock");
    let request = tokio::spawn({
        let (http, url, token) = (
            http.clone(),
            server.url(&format!("/v1/tenants/{tenant}/members/{owner}")),
            tadmin_t.clone(),
        );
        async move {
            http.put(url)
                .header("x-forwarded-proto", "https")
                .bearer_auth(token)
                .json(&json!({"role": "agent"}))
                .send()
                .await
                .expect("put")
                .status()
                .as_u16()
        }
    });
    // The request is refused up front (the owner rules) or waits; give it the lock either way.
    let _ = tokio::time::timeout(Duration::from_secs(2), wait_for_lock_waiter(&env)).await;
    sqlx::query("UPDATE memberships SET role = 'agent' WHERE tenant_id = $1 AND user_id = $2")
        .bind(tenant)
        .bind(tadmin)
        .execute(&mut *other)
        .await
        .expect("demote");
    other.commit().await.expect("commit");
    assert_eq!(request.await.expect("request"), 403);
    assert_eq!(role_of(&env, tenant, owner).await.as_deref(), Some("owner"));
    server.stop().await;
    env.cleanup().await;
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_create_with_an_owner_email_prints_the_id_then_an_invite_token_that_makes_an_owner()
{
    let env = TestEnv::new().await;
    // A squatter holds the address already; the CLI does not look at accounts.
    let squatter = create_user(&env, "owner@newshop.example", None).await;
    let out = run(
        &[
            "tenants",
            "create",
            "--name",
            "New shop",
            "--twilio-account-sid",
            ACCOUNT_SID,
            "--owner-email",
            "Owner@NewShop.example",
        ],
        &env.vars,
        &format!("twilio_auth_token={TOKEN}\n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let tenant: Uuid = lines[0].parse().expect("the tenant id on the first line");
    let token = lines[1]
        .strip_prefix("invite_token=")
        .expect("invite_token=… on the second line");
    assert_token_shape(token);
    assert!(!text(&out.stderr).contains(token), "shown once, on stdout");
    assert!(!text(&out.stderr).contains(TOKEN));
    assert_eq!(role_of(&env, tenant, squatter).await, None);
    let email: String =
        sqlx::query_scalar("SELECT email FROM tenant_invitations WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(&env.pool)
            .await
            .expect("invitation");
    assert_eq!(email, "owner@newshop.example");

    // INVITE_TTL_SECONDS sets the expiry.
    let mut vars = env.vars.clone();
    vars.insert("INVITE_TTL_SECONDS".into(), "3600".into());
    let short = run(
        &[
            "tenants",
            "create",
            "--name",
            "Short",
            "--twilio-account-sid",
            ACCOUNT_SID,
            "--owner-email",
            "x@example.com",
        ],
        &vars,
        &format!("twilio_auth_token={TOKEN}\n"),
    );
    assert_eq!(short.status.code(), Some(0), "{}", text(&short.stderr));
    let short_tenant: Uuid = text(&short.stdout)
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .expect("id");
    let ttl: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM expires_at - created_at)::float8 FROM tenant_invitations
          WHERE tenant_id = $1",
    )
    .bind(short_tenant)
    .fetch_one(&env.pool)
    .await
    .expect("ttl");
    assert!((ttl - 3600.0).abs() < 5.0, "{ttl}");
    vars.insert("INVITE_TTL_SECONDS".into(), "10".into());
    let bad = run(
        &[
            "tenants",
            "create",
            "--name",
            "Bad",
            "--twilio-account-sid",
            ACCOUNT_SID,
        ],
        &vars,
        &format!("twilio_auth_token={TOKEN}\n"),
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("INVITE_TTL_SECONDS"),
        "{}",
        text(&bad.stderr)
    );

    // Without --owner-email: the id alone.
    let plain = run(
        &[
            "tenants",
            "create",
            "--name",
            "Plain",
            "--twilio-account-sid",
            ACCOUNT_SID,
        ],
        &env.vars,
        &format!("twilio_auth_token={TOKEN}\n"),
    );
    assert_eq!(plain.status.code(), Some(0));
    assert_eq!(text(&plain.stdout).lines().count(), 1);

    // The token holder, under another address, becomes the owner.
    let owner = create_user(&env, "real@elsewhere.example", None).await;
    let mut redis = env.redis.clone();
    let scopes = gatehouse::access::ScopeCache::new(env.namespace.clone());
    let accepted = gatehouse::invitations::accept(&env.pool, &mut redis, &scopes, token, owner)
        .await
        .expect("accepted");
    assert_eq!(accepted.tenant_id, tenant);
    assert_eq!(role_of(&env, tenant, owner).await.as_deref(), Some("owner"));
    assert_eq!(role_of(&env, tenant, squatter).await, None);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_webhook_url_prints_the_url_the_webhook_verifies_against() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let out = run(
        &["tenants", "webhook-url", "--tenant", &tenant.to_string()],
        &env.vars,
        "",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let url = text(&out.stdout).trim_end().to_owned();
    assert_eq!(
        url,
        format!("https://gh.example.com/v1/webhooks/twilio/{tenant}/messages")
    );

    // Twilio signs the URL it was given; the ingress accepts exactly that.
    let server = env.start_server().await;
    let params = sms_params(&message_sid(), "+15550001111", "hello");
    let refs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let signature = sign_form(&url, &refs, TOKEN.as_bytes(), Algorithm::HmacSha1);
    let path = url
        .strip_prefix(PUBLIC_BASE)
        .expect("under PUBLIC_BASE_URL");
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    let r = reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", signature)
        .body(body)
        .send()
        .await
        .expect("webhook");
    assert_eq!(r.status(), 200);
    server.stop().await;

    // A trailing slash in PUBLIC_BASE_URL changes nothing; a port is kept.
    let mut vars = env.vars.clone();
    vars.insert(
        "PUBLIC_BASE_URL".into(),
        "https://gh.example.com:8443/".into(),
    );
    let out = run(
        &["tenants", "webhook-url", "--tenant", &tenant.to_string()],
        &vars,
        "",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim_end(),
        format!("https://gh.example.com:8443/v1/webhooks/twilio/{tenant}/messages")
    );

    // Clear errors: no PUBLIC_BASE_URL, no such tenant, not an id.
    let mut vars = env.vars.clone();
    vars.remove("PUBLIC_BASE_URL");
    let out = run(
        &["tenants", "webhook-url", "--tenant", &tenant.to_string()],
        &vars,
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("PUBLIC_BASE_URL"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let unknown = Uuid::new_v4();
    let out = run(
        &["tenants", "webhook-url", "--tenant", &unknown.to_string()],
        &env.vars,
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("no tenant with id {unknown}")),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let out = run(
        &["tenants", "webhook-url", "--tenant", "shop-1"],
        &env.vars,
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--tenant"));
    env.cleanup().await;
}
