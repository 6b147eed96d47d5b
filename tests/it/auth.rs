//! Accounts, tokens, scopes and rate limits, end to end over HTTP against real PostgreSQL
//! and Redis. Tokens are forged and hashes checked with libraries outside gatehouse
//! (`jsonwebtoken`, `rust-argon2`), the way a user's own tooling would.

use std::sync::Arc;

use crate::common::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gatehouse::access::{PlatformRole, TenantRole};
use gatehouse::http::AppState;
use gatehouse_testenv::*;
use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, RequestBuilder, StatusCode};
use secrecy::SecretString;
use serde_json::{Value, json};
use sha2::Sha256;
use uuid::Uuid;

const JWT_SECRET: &str = "jwt-ZYXWVUTSRQPONMLKJIHGFEDCBA-9876543210-zyxwv";

async fn status(request: RequestBuilder) -> u16 {
    request.send().await.expect("request").status().as_u16()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn claims(sub: Uuid) -> Value {
    let t = now();
    json!({
        "sub": sub, "exp": t + 600, "iat": t, "nbf": t,
        "iss": "gatehouse", "aud": "gatehouse-api", "jti": Uuid::new_v4(), "kind": "user",
    })
}

fn sign(alg: Algorithm, claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

/// header.payload signed with HMAC-SHA256 under the real secret, whatever the header says.
fn hand_made(header: &Value, claims: &Value, secret: &str) -> String {
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let p = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{h}.{p}").as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{h}.{p}.{sig}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registration_stores_an_argon2id_hash_that_another_implementation_verifies() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = client();
    let r = api(&http, &server, Method::POST, "/v1/auth/register")
        .json(&json!({"email": " New.User@Example.com ", "password": PASSWORD, "first_name": "New", "last_name": "User"}))
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["email"], "new.user@example.com");
    let id: Uuid = body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");

    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .expect("row");
    assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
    // Parameters at least OWASP's: m ≥ 19 MiB, t ≥ 2, p = 1.
    let params = hash.split('$').nth(3).expect("params");
    let get = |k: &str| -> u32 {
        params
            .split(',')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .expect("param")
    };
    assert!(
        get("m") >= 19 * 1024 && get("t") >= 2 && get("p") == 1,
        "{params}"
    );
    assert!(rust_argon2::verify_encoded(&hash, PASSWORD.as_bytes()).expect("verify"));
    assert!(!rust_argon2::verify_encoded(&hash, b"wrong password!").expect("verify"));

    // The same email again, in another case: 409.
    let again = api(&http, &server, Method::POST, "/v1/auth/register")
        .json(&json!({"email": "NEW.USER@example.com", "password": PASSWORD, "first_name": "N", "last_name": "U"}))
        .send()
        .await
        .expect("register");
    assert_eq!(again.status(), 409);
    let body: Value = again.json().await.expect("json");
    assert_eq!(body["error"]["code"], "email_taken");

    // Bad input: clear 400s and 415s, nothing stored, the password never echoed.
    for bad in [
        json!({"email": "x@example.com", "password": "short", "first_name": "a", "last_name": "b"}),
        json!({"email": "not-an-email", "password": PASSWORD, "first_name": "a", "last_name": "b"}),
        json!({"email": "x@example.com", "password": PASSWORD, "first_name": "", "last_name": "b"}),
        json!({"email": "x@example.com", "first_name": "a", "last_name": "b"}),
        json!({"email": "x@example.com", "password": 12345678901234u64, "first_name": "a", "last_name": "b"}),
    ] {
        let r = api(&http, &server, Method::POST, "/v1/auth/register")
            .json(&bad)
            .send()
            .await
            .expect("register");
        assert_eq!(r.status(), 400, "{bad}");
        let text = r.text().await.expect("text");
        assert!(text.contains("invalid_request"), "{text}");
        assert!(
            !text.contains("short") && !text.contains("12345678901234"),
            "{text}"
        );
    }
    let r = api(&http, &server, Method::POST, "/v1/auth/register")
        .header("content-type", "text/plain")
        .body("email=x")
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 415);
    assert_eq!(env.count("SELECT count(*) FROM users").await, 1);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_issues_an_hs256_token_that_a_jwt_library_accepts_and_me_describes_the_caller() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = client();
    let tenant = env.create_tenant().await;
    let user = create_user(&env, "ada@example.com", Some(PlatformRole::SecurityOfficer)).await;
    add_member(&env, tenant, user, TenantRole::Admin).await;

    let r = api(&http, &server, Method::POST, "/v1/auth/login")
        .json(&json!({"email": "ADA@example.com ", "password": PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    let token = body["access_token"].as_str().expect("token");

    let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
    validation.set_issuer(&["gatehouse"]);
    validation.set_audience(&["gatehouse-api"]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(JWT_SECRET.as_bytes()),
        &validation,
    )
    .expect("a standard library validates the token");
    assert_eq!(data.header.alg, Algorithm::HS256);
    let c = data.claims;
    assert_eq!(c["sub"], user.to_string());
    assert!(c["jti"].as_str().is_some_and(|j| !j.is_empty()));
    assert_eq!(
        c["exp"].as_u64().expect("exp") - c["iat"].as_u64().expect("iat"),
        900
    );

    let second = login(&http, &server, "ada@example.com").await;
    let jti = |t: &str| {
        jsonwebtoken::dangerous::insecure_decode::<Value>(t)
            .expect("decode")
            .claims["jti"]
            .clone()
    };
    assert_ne!(jti(token), jti(&second), "every token has its own jti");

    let me: Value = api(&http, &server, Method::GET, "/v1/me")
        .bearer_auth(token)
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("json");
    assert_eq!(me["id"], user.to_string());
    assert_eq!(me["email"], "ada@example.com");
    assert_eq!(
        me["platform_scopes"],
        json!(["keys:rotate", "security:read"])
    );
    assert_eq!(
        me["memberships"],
        json!([{"tenant_id": tenant, "role": "admin", "scopes": ["tenant:admin", "catalog:sync", "conversations:read"]}])
    );
    let anonymous = api(&http, &server, Method::GET, "/v1/me")
        .send()
        .await
        .expect("me");
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_email_and_a_wrong_password_get_the_same_answer_and_a_failed_login_event() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = client();
    create_user(&env, "ada@example.com", None).await;
    let mut answers = Vec::new();
    for (email, password) in [
        ("ada@example.com", "not the right password"),
        ("nobody@example.com", PASSWORD),
    ] {
        let r = api(&http, &server, Method::POST, "/v1/auth/login")
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .expect("login");
        answers.push((r.status(), r.text().await.expect("text")));
    }
    assert_eq!(answers[0].0, StatusCode::UNAUTHORIZED);
    assert_eq!(answers[0], answers[1], "same status and body");
    assert!(answers[0].1.contains("invalid_credentials"));
    assert_eq!(env.wait_for_events("failed_login", 2).await, 2);
    // Recorded off the request path, so in either order.
    let rows: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT email, host(ip) FROM security_events WHERE type = 'failed_login' ORDER BY email",
    )
    .fetch_all(&env.pool)
    .await
    .expect("events");
    let want = |email: &str| (Some(email.to_owned()), Some("127.0.0.1".to_owned()));
    assert_eq!(rows, [want("ada@example.com"), want("nobody@example.com")]);
    let details: String =
        sqlx::query_scalar("SELECT string_agg(details::text, ' ') FROM security_events")
            .fetch_one(&env.pool)
            .await
            .expect("details");
    assert!(!details.contains("not the right password") && !details.contains(PASSWORD));
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_expired_and_foreign_tokens_are_refused_with_401() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = client();
    let user = create_user(&env, "ada@example.com", Some(PlatformRole::PlatformAdmin)).await;
    let good = login(&http, &server, "ada@example.com").await;
    let t = now();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims(user);
        edit(&mut c);
        c
    };
    // HS256 under the real secret, with some claims edited.
    let hs256 = |edit: &dyn Fn(&mut Value)| sign(Algorithm::HS256, &with(edit), JWT_SECRET);
    let (h, p, _) = {
        let mut parts = good.split('.');
        (
            parts.next().expect("h").to_owned(),
            parts.next().expect("p").to_owned(),
            parts.next().expect("s").to_owned(),
        )
    };
    let mut tampered_claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&p).expect("b64")).expect("json");
    tampered_claims["sub"] = json!(Uuid::new_v4());
    let tampered = format!(
        "{h}.{}.{}",
        URL_SAFE_NO_PAD.encode(tampered_claims.to_string()),
        good.split('.').nth(2).expect("sig")
    );
    let cases: Vec<(&str, String, bool)> = vec![
        // (what, token, expect a failed_login event)
        (
            "alg none",
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
                URL_SAFE_NO_PAD.encode(claims(user).to_string())
            ),
            true,
        ),
        (
            "wrong key",
            sign(
                Algorithm::HS256,
                &claims(user),
                "another-secret-another-secret-0123456789",
            ),
            true,
        ),
        (
            "expired",
            hs256(&|c| {
                c["exp"] = json!(t - 3600);
                c["iat"] = json!(t - 7200);
                c["nbf"] = json!(t - 7200);
            }),
            false,
        ),
        (
            "not yet valid",
            hs256(&|c| {
                c["nbf"] = json!(t + 3600);
            }),
            true,
        ),
        (
            "issued in the future",
            hs256(&|c| {
                c["iat"] = json!(t + 3600);
                c["nbf"] = json!(t);
            }),
            true,
        ),
        (
            "wrong iss",
            hs256(&|c| {
                c["iss"] = json!("evil");
            }),
            true,
        ),
        (
            "wrong aud",
            hs256(&|c| {
                c["aud"] = json!("other-api");
            }),
            true,
        ),
        (
            "no exp",
            hs256(&|c| {
                c.as_object_mut().map(|o| o.remove("exp"));
            }),
            true,
        ),
        (
            "no aud",
            hs256(&|c| {
                c.as_object_mut().map(|o| o.remove("aud"));
            }),
            true,
        ),
        (
            "HS512",
            sign(Algorithm::HS512, &claims(user), JWT_SECRET),
            true,
        ),
        (
            "RS256 header, HMAC body",
            hand_made(
                &json!({"alg": "RS256", "typ": "JWT"}),
                &claims(user),
                JWT_SECRET,
            ),
            true,
        ),
        ("tampered payload", tampered, true),
        ("garbage", "not.a.token".to_owned(), true),
    ];
    let mut expected_events = 0;
    for (i, (what, token, event)) in cases.iter().enumerate() {
        // Each from its own address: one address's failed logins are stored 10 a minute.
        let r = api(&http, &server, Method::GET, "/v1/me")
            .header("x-forwarded-for", format!("192.0.2.{}", i + 1))
            .bearer_auth(token)
            .send()
            .await
            .expect("me");
        assert_eq!(r.status(), 401, "{what}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"], "unauthorized", "{what}");
        if *event {
            expected_events += 1;
        }
    }
    // A control: the real token still works, and a forged one never reached a handler.
    let ok = api(&http, &server, Method::GET, "/v1/me")
        .bearer_auth(&good)
        .send()
        .await
        .expect("me");
    assert_eq!(ok.status(), 200);
    assert_eq!(
        env.wait_for_events("failed_login", expected_events).await,
        expected_events
    );
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_protected_endpoint_checks_its_scope_and_logs_permission_denied() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = client();
    let tenant = env.create_tenant().await;
    let other_tenant = env.create_tenant().await;
    create_user(&env, "admin@example.com", Some(PlatformRole::PlatformAdmin)).await;
    let owner = create_user(&env, "owner@example.com", None).await;
    let agent = create_user(&env, "agent@example.com", None).await;
    let tenant_admin = create_user(&env, "tadmin@example.com", None).await;
    add_member(&env, tenant, owner, TenantRole::Owner).await;
    add_member(&env, tenant, agent, TenantRole::Agent).await;
    add_member(&env, tenant, tenant_admin, TenantRole::Admin).await;
    let admin_t = login(&http, &server, "admin@example.com").await;
    let owner_t = login(&http, &server, "owner@example.com").await;
    let agent_t = login(&http, &server, "agent@example.com").await;
    let tadmin_t = login(&http, &server, "tadmin@example.com").await;

    let new_tenant = json!({"name": "Shop 2", "twilio_account_sid": ACCOUNT_SID, "twilio_auth_token": TOKEN, "owner_email": "owner@example.com"});
    // POST /v1/tenants: platform:admin only.
    for token in [&owner_t, &agent_t] {
        let r = api(&http, &server, Method::POST, "/v1/tenants")
            .bearer_auth(token)
            .json(&new_tenant)
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 403);
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    let r = api(&http, &server, Method::POST, "/v1/tenants")
        .bearer_auth(&admin_t)
        .json(&new_tenant)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.expect("json");
    let created_id: Uuid = created["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT twilio_auth_token FROM tenants WHERE id = $1")
        .bind(created_id)
        .fetch_one(&env.pool)
        .await
        .expect("row");
    assert!(
        !sealed.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
        "the token is sealed"
    );

    // Catalog sync: catalog:sync in that tenant.
    let sync = |token: &String, t: Uuid| {
        api(
            &http,
            &server,
            Method::POST,
            &format!("/v1/tenants/{t}/catalog/sync"),
        )
        .bearer_auth(token.clone())
        .json(&json!({"mode": "full"}))
    };
    for (token, t, why) in [
        (&agent_t, tenant, "an agent has no catalog:sync"),
        (&owner_t, other_tenant, "not a member of that tenant"),
        (&admin_t, tenant, "platform admins are not tenant members"),
    ] {
        assert_eq!(status(sync(token, t)).await, 403, "{why}");
    }
    let r = sync(&tadmin_t, tenant).send().await.expect("sync");
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.expect("json");
    let job_id = job["job_id"].as_str().expect("job id").to_owned();
    assert_eq!(env.queued("sync_catalog").await, 1);
    let mut redis = env.redis.clone();
    let payload: Option<String> = redis::cmd("HGET")
        .arg(format!("{}:{{sync_catalog:0}}:data", env.namespace))
        .arg(&job_id)
        .query_async(&mut redis)
        .await
        .expect("hget");
    let payload: Value = serde_json::from_str(&payload.expect("payload stored")).expect("json");
    assert_eq!(payload["tenant_id"], tenant.to_string());
    assert_eq!(payload["requested_by"], tenant_admin.to_string());
    assert_eq!(payload["mode"], "full");

    // Members: tenant:admin in that tenant; only an owner grants owner.
    let put = |token: &String, t: Uuid, u: Uuid, role: &str| {
        api(
            &http,
            &server,
            Method::PUT,
            &format!("/v1/tenants/{t}/members/{u}"),
        )
        .bearer_auth(token.clone())
        .json(&json!({"role": role}))
    };
    for (token, u, role, want, why) in [
        (&agent_t, agent, "admin", 403, "agents manage nobody"),
        (&tadmin_t, agent, "owner", 403, "only an owner grants owner"),
        (
            &tadmin_t,
            owner,
            "agent",
            403,
            "only an owner changes an owner",
        ),
        (
            &tadmin_t,
            agent,
            "admin",
            200,
            "a tenant admin promotes an agent",
        ),
        (&owner_t, Uuid::new_v4(), "agent", 404, "no such user"),
        (&owner_t, agent, "superuser", 400, "no such role"),
        (&owner_t, owner, "admin", 409, "the last owner stays"),
    ] {
        assert_eq!(status(put(token, tenant, u, role)).await, want, "{why}");
    }
    let me: Value = api(&http, &server, Method::GET, "/v1/me")
        .bearer_auth(&agent_t)
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("json");
    assert_eq!(
        me["memberships"][0]["role"], "admin",
        "takes effect on the next request"
    );

    // 2 + 3 + 3 refusals above, each one event naming the scope.
    assert_eq!(env.wait_for_events("permission_denied", 8).await, 8);
    let scopes: Vec<String> = sqlx::query_scalar("SELECT DISTINCT details->>'scope' FROM security_events WHERE type = 'permission_denied' ORDER BY 1")
        .fetch_all(&env.pool)
        .await
        .expect("scopes");
    assert_eq!(scopes, ["catalog:sync", "platform:admin", "tenant:admin"]);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_request_after_a_role_change_sees_the_old_scopes_while_the_role_flips_under_load() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_USER".into(), "100000/h".into());
    })
    .await;
    let server = Arc::new(env.start_server().await);
    let http = client();
    let tenant = env.create_tenant().await;
    let owner = create_user(&env, "owner@example.com", None).await;
    let member = create_user(&env, "member@example.com", None).await;
    add_member(&env, tenant, owner, TenantRole::Owner).await;
    add_member(&env, tenant, member, TenantRole::Agent).await;
    let owner_t = login(&http, &server, "owner@example.com").await;
    let member_t = login(&http, &server, "member@example.com").await;

    // Background load: the member keeps asking, so the cache is always being filled.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (http, server, token, stop) =
            (http.clone(), server.clone(), member_t.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = api(&http, &server, Method::GET, "/v1/me")
                    .bearer_auth(&token)
                    .send()
                    .await;
            }
        }));
    }
    for round in 0..12 {
        let role = if round % 2 == 0 { "admin" } else { "agent" };
        let r = api(
            &http,
            &server,
            Method::PUT,
            &format!("/v1/tenants/{tenant}/members/{member}"),
        )
        .bearer_auth(&owner_t)
        .json(&json!({"role": role}))
        .send()
        .await
        .expect("put");
        assert_eq!(r.status(), 200);
        let want = if role == "admin" { 202 } else { 403 };
        let checks = (0..16).map(|_| {
            api(
                &http,
                &server,
                Method::POST,
                &format!("/v1/tenants/{tenant}/catalog/sync"),
            )
            .bearer_auth(&member_t)
            .json(&json!({"mode": "incremental"}))
            .send()
        });
        for r in futures::future::join_all(checks).await {
            assert_eq!(
                r.expect("sync").status().as_u16(),
                want,
                "round {round}: role {role}"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }
    if let Ok(server) = Arc::try_unwrap(server) {
        server.stop().await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_down_scopes_come_from_the_database_and_logins_fail_closed() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let user = create_user(&env, "ada@example.com", None).await;
    add_member(&env, tenant, user, TenantRole::Agent).await;
    // A token issued while everything was up.
    let up = env.start_server().await;
    let http = client();
    let token = login(&http, &up, "ada@example.com").await;
    up.stop().await;

    // The same app with a Redis that refuses connections.
    let dead = gatehouse::redis_conn::connect_lazy_url(&SecretString::from("redis://127.0.0.1:1"))
        .expect("lazy connection");
    let state = Arc::new(AppState::new(env.config.clone(), env.pool.clone(), dead));
    let down = TestServer::start(state).await;

    let me = api(&http, &down, Method::GET, "/v1/me")
        .bearer_auth(&token)
        .send()
        .await
        .expect("me");
    assert_eq!(me.status(), 200, "scopes resolve from PostgreSQL");
    let me: Value = me.json().await.expect("json");
    assert_eq!(me["memberships"][0]["role"], "agent");
    // Never "allow": the agent still may not sync.
    let sync = api(
        &http,
        &down,
        Method::POST,
        &format!("/v1/tenants/{tenant}/catalog/sync"),
    )
    .bearer_auth(&token)
    .json(&json!({"mode": "full"}))
    .send()
    .await
    .expect("sync");
    assert_eq!(sync.status(), 403);
    // Login cannot be counted, so it is refused with a clear 503.
    let r = api(&http, &down, Method::POST, "/v1/auth/login")
        .json(&json!({"email": "ada@example.com", "password": PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "unavailable");
    // A role change cannot commit while its cache cannot be told: nothing changes.
    sqlx::query("UPDATE memberships SET role = 'owner' WHERE user_id = $1")
        .bind(user)
        .execute(&env.pool)
        .await
        .expect("promote to owner directly");
    let r = api(
        &http,
        &down,
        Method::PUT,
        &format!("/v1/tenants/{tenant}/members/{user}"),
    )
    .bearer_auth(&token)
    .json(&json!({"role": "admin"}))
    .send()
    .await
    .expect("put");
    assert_eq!(r.status(), 503);
    let role: String = sqlx::query_scalar("SELECT role FROM memberships WHERE user_id = $1")
        .bind(user)
        .fetch_one(&env.pool)
        .await
        .expect("role");
    assert_eq!(role, "owner");
    down.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ip_limit_holds_against_spoofed_forwarded_headers_and_answers_429_with_headers() {
    // 127.0.0.1 is NOT a trusted proxy here: its X-Forwarded-For must be ignored.
    let env = TestEnv::with_vars(|v| {
        v.remove("TRUSTED_PROXIES");
        v.insert("DEBUG".into(), "true".into());
        v.insert("RATE_LIMIT_LOGIN_IP".into(), "3/m".into());
    })
    .await;
    let server = env.start_server().await;
    let http = client();
    let mut statuses = Vec::new();
    let mut last = None;
    for i in 0..5 {
        let r = http
            .post(server.url("/v1/auth/login"))
            .header("x-forwarded-for", format!("203.0.113.{i}"))
            .json(&json!({"email": format!("u{i}@example.com"), "password": "whatever-password"}))
            .send()
            .await
            .expect("login");
        statuses.push(r.status().as_u16());
        last = Some(r);
    }
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
    let r = last.expect("response");
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let retry: u64 = header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(header("ratelimit-limit").as_deref(), Some("3"));
    assert_eq!(header("ratelimit-remaining").as_deref(), Some("0"));
    assert!(
        header("ratelimit-reset")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|s| s <= 60)
    );
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limited");
    // Register and token share the IP's limit.
    let reg = http
        .post(server.url("/v1/auth/register"))
        .json(&json!({"email": "z@example.com", "password": PASSWORD, "first_name": "a", "last_name": "b"}))
        .send()
        .await
        .expect("register");
    assert_eq!(reg.status(), 429);
    assert_eq!(
        env.count("SELECT count(*) FROM users").await,
        0,
        "the refused request was not processed"
    );
    assert!(env.wait_for_events("rate_limit_exceeded", 3).await >= 3);
    let ip: String = sqlx::query_scalar(
        "SELECT host(ip) FROM security_events WHERE type = 'rate_limit_exceeded' LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .expect("ip");
    assert_eq!(
        ip, "127.0.0.1",
        "the event names the real peer, not the spoofed header"
    );
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_a_trusted_proxy_the_limit_keys_on_the_right_most_untrusted_hop() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_LOGIN_IP".into(), "2/m".into());
    })
    .await;
    let server = env.start_server().await;
    let http = client();
    let attempt = |xff: &str| {
        api(&http, &server, Method::POST, "/v1/auth/login")
            .header("x-forwarded-for", xff.to_owned())
            .json(&json!({"email": "x@example.com", "password": "whatever-password"}))
            .send()
    };
    // The client 198.51.100.7 prepends made-up hops; the proxy appends the real one.
    let mut got = Vec::new();
    for fake in ["10.9.9.1", "10.9.9.2", "10.9.9.3"] {
        got.push(
            attempt(&format!("{fake}, 198.51.100.7"))
                .await
                .expect("login")
                .status()
                .as_u16(),
        );
    }
    assert_eq!(got, [401, 401, 429]);
    // Another real client has its own allowance.
    assert_eq!(attempt("198.51.100.8").await.expect("login").status(), 401);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_logins_lock_one_normalized_email_while_successful_logins_never_count() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_LOGIN_IP".into(), "1000/m".into());
        v.insert("RATE_LIMIT_LOGIN_EMAIL".into(), "3/h".into());
    })
    .await;
    let server = env.start_server().await;
    let http = client();
    create_user(&env, "ada@example.com", None).await;
    create_user(&env, "busy@example.com", None).await;
    // A frequent, successful user is never locked out.
    for _ in 0..6 {
        login(&http, &server, "busy@example.com").await;
    }
    let attempt = |email: &str, password: &str| {
        api(&http, &server, Method::POST, "/v1/auth/login")
            .json(&json!({"email": email, "password": password}))
            .send()
    };
    let mut got = Vec::new();
    for email in ["ada@example.com", "ADA@example.com", " Ada@Example.com "] {
        got.push(
            attempt(email, "wrong password!!")
                .await
                .expect("login")
                .status()
                .as_u16(),
        );
    }
    assert_eq!(got, [401, 401, 401]);
    // Locked now, whatever the case or spacing, even with the right password.
    let r = attempt("  ADA@EXAMPLE.COM", PASSWORD).await.expect("login");
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // Other emails are unaffected.
    login(&http, &server, "busy@example.com").await;
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_per_user_limit_counts_authenticated_writes() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_USER".into(), "2/h".into());
    })
    .await;
    let server = env.start_server().await;
    let http = client();
    let tenant = env.create_tenant().await;
    let user = create_user(&env, "ada@example.com", None).await;
    add_member(&env, tenant, user, TenantRole::Owner).await;
    let token = login(&http, &server, "ada@example.com").await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let r = api(
            &http,
            &server,
            Method::POST,
            &format!("/v1/tenants/{tenant}/catalog/sync"),
        )
        .bearer_auth(&token)
        .json(&json!({"mode": "incremental"}))
        .send()
        .await
        .expect("sync");
        got.push((
            r.status().as_u16(),
            r.headers()
                .get("ratelimit-remaining")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ));
    }
    assert_eq!(got[0], (202, Some("1".into())));
    assert_eq!(got[1], (202, Some("0".into())));
    assert_eq!(got[2].0, 429);
    assert_eq!(
        env.queued("sync_catalog").await,
        2,
        "the refused request enqueued nothing"
    );
    // Reads are not writes.
    let me = api(&http, &server, Method::GET, "/v1/me")
        .bearer_auth(&token)
        .send()
        .await
        .expect("me");
    assert_eq!(me.status(), 200);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_wraps_legacy_sha256_hashes_and_login_upgrades_them_and_weak_argon2_hashes() {
    use sha2::Digest;
    let env = TestEnv::new().await;
    let legacy = hex::encode(Sha256::digest(PASSWORD.as_bytes()));
    let weak = gatehouse::security::password::hash_blocking(
        PASSWORD.as_bytes(),
        gatehouse::security::password::Cost {
            m_kib: 4096,
            t: 1,
            p: 1,
        },
    )
    .expect("weak hash");
    for (email, hash) in [
        ("legacy@example.com", legacy.as_str()),
        ("weak@example.com", weak.as_str()),
    ] {
        sqlx::query("INSERT INTO users (email, password_hash, first_name, last_name) VALUES ($1, $2, 'L', 'U')")
            .bind(email)
            .bind(hash)
            .execute(&env.pool)
            .await
            .expect("legacy row");
    }
    let server = env.start_server().await;
    let http = client();
    // Before migrate: a bare digest is never accepted.
    let r = api(&http, &server, Method::POST, "/v1/auth/login")
        .json(&json!({"email": "legacy@example.com", "password": PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 401);

    let mut child = env.spawn(&["migrate"], &[]);
    let status = child.wait().expect("migrate runs");
    assert!(status.success());
    let stored: String =
        sqlx::query_scalar("SELECT password_hash FROM users WHERE email = 'legacy@example.com'")
            .fetch_one(&env.pool)
            .await
            .expect("row");
    assert!(
        stored.starts_with("legacy-sha256:$argon2id$v=19$m=19456,t=2,p=1$"),
        "{stored}"
    );
    assert!(!stored.contains(&legacy), "no bare SHA-256 remains at rest");
    assert_eq!(
        env.count("SELECT count(*) FROM users WHERE password_hash ~ '^[0-9a-fA-F]{64}$'")
            .await,
        0
    );
    // The wrapped form is argon2id over the legacy digest, as another implementation sees it.
    let inner = stored.strip_prefix("legacy-sha256:").expect("prefix");
    assert!(rust_argon2::verify_encoded(inner, legacy.as_bytes()).expect("verify"));
    // Running migrate again changes nothing.
    let mut again = env.spawn(&["migrate"], &[]);
    assert!(again.wait().expect("migrate").success());
    let same: String =
        sqlx::query_scalar("SELECT password_hash FROM users WHERE email = 'legacy@example.com'")
            .fetch_one(&env.pool)
            .await
            .expect("row");
    assert_eq!(same, stored);

    for email in ["legacy@example.com", "weak@example.com"] {
        login(&http, &server, email).await;
        let upgraded: String =
            sqlx::query_scalar("SELECT password_hash FROM users WHERE email = $1")
                .bind(email)
                .fetch_one(&env.pool)
                .await
                .expect("row");
        assert!(
            upgraded.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{email}: {upgraded}"
        );
        assert!(rust_argon2::verify_encoded(&upgraded, PASSWORD.as_bytes()).expect("verify"));
        // and the upgraded hash keeps working
        login(&http, &server, email).await;
    }
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_creates_users_and_service_accounts_whose_credentials_work_over_http() {
    use std::io::Write;
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let http = client();

    let mut child = env.spawn_piped(&[
        "users",
        "create",
        "--email",
        "Op@Example.com",
        "--first-name",
        "Op",
        "--last-name",
        "Erator",
        "--platform-role",
        "platform_admin",
    ]);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("password={PASSWORD}\n").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("users create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: Uuid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("prints the id");
    let token = login(&http, &server, "op@example.com").await;
    let me: Value = api(&http, &server, Method::GET, "/v1/me")
        .bearer_auth(&token)
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("json");
    assert_eq!(me["id"], id.to_string());
    assert_eq!(
        me["platform_scopes"],
        json!(["platform:admin", "jobs:enqueue"])
    );

    let child = env.spawn_piped(&[
        "service-accounts",
        "create",
        "--name",
        "orders",
        "--scope",
        "jobs:enqueue",
        "--all-tenants",
    ]);
    let out = child.wait_with_output().expect("service-accounts create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .expect("field printed")
            .to_owned()
    };
    let (client_id, secret) = (field("client_id"), field("client_secret"));
    let stored: String = sqlx::query_scalar("SELECT secret_hash FROM service_accounts")
        .fetch_one(&env.pool)
        .await
        .expect("row");
    assert!(
        stored.starts_with("$argon2id$") && !stored.contains(&secret),
        "stored hashed"
    );

    let r = api(&http, &server, Method::POST, "/v1/auth/token")
        .json(&json!({"client_id": client_id, "client_secret": secret}))
        .send()
        .await
        .expect("token");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    let service_token = body["access_token"].as_str().expect("token").to_owned();
    let me: Value = api(&http, &server, Method::GET, "/v1/me")
        .bearer_auth(&service_token)
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("json");
    assert_eq!(me["kind"], "service");
    assert_eq!(me["platform_scopes"], json!(["jobs:enqueue"]));
    let wrong = api(&http, &server, Method::POST, "/v1/auth/token")
        .json(&json!({"client_id": client_id, "client_secret": "nope"}))
        .send()
        .await
        .expect("token");
    assert_eq!(wrong.status(), 401);

    // Bad input exits 1 and names the problem; no secret on argv anywhere.
    let child = env.spawn_piped(&[
        "service-accounts",
        "create",
        "--name",
        "x",
        "--scope",
        "keys:rotate",
        "--all-tenants",
    ]);
    let out = child.wait_with_output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let mut child = env.spawn_piped(&[
        "users",
        "create",
        "--email",
        "short@example.com",
        "--first-name",
        "a",
        "--last-name",
        "b",
    ]);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"password=short\n")
        .expect("write");
    let out = child.wait_with_output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("=short"));
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_oversized_auth_bodies_get_clear_errors_and_the_server_stays_up() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_LOGIN_IP".into(), "1000/m".into());
        v.insert("MAX_BODY_BYTES".into(), "4096".into());
    })
    .await;
    let server = env.start_server().await;
    let http = client();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/auth/login",
            "application/json",
            b"{not json".to_vec(),
            400,
            "invalid_request",
        ),
        (
            "/v1/auth/login",
            "application/json",
            b"[]".to_vec(),
            400,
            "invalid_request",
        ),
        (
            "/v1/auth/login",
            "application/json",
            br#"{"email":"a@example.com"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "/v1/auth/login",
            "text/plain",
            b"email=a".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "/v1/auth/token",
            "application/json",
            vec![b' '; 10_000],
            413,
            "payload_too_large",
        ),
        (
            "/v1/auth/register",
            "application/json",
            vec![0xff, 0xfe, 0x00],
            400,
            "invalid_request",
        ),
    ];
    for (path, content_type, body, status, code) in cases {
        let r = api(&http, &server, Method::POST, path)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status().as_u16(), status, "{path} {content_type}");
        let body: Value = r.json().await.expect("json error body");
        assert_eq!(body["error"]["code"], code, "{path}");
    }
    // A chunked body over the limit is cut off too.
    let chunks = futures::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1000])));
    let r = api(&http, &server, Method::POST, "/v1/auth/login")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 413);
    // A fresh connection: the server closes the one whose oversized body it refused to read,
    // and a pooled client could otherwise try to reuse it.
    let health = api(&client(), &server, Method::GET, "/healthz")
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    server.stop().await;
    env.cleanup().await;
}
