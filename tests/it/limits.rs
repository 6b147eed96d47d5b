//! Hostile traffic against the rate limits, over HTTP against real PostgreSQL and Redis:
//! refused unauthenticated requests counted per client IP before any PostgreSQL work, IPv6
//! keyed by /64, racing password guesses, token requests limited per IP only, the bounded
//! password-hashing queue, emails in events only when they look like one, and the real
//! `gatehouse limits reset` lifting a lockout. Clients are chosen with `X-Forwarded-For`
//! through the trusted loopback proxy.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use gatehouse::accounts::{self, NewUser};
use gatehouse::http::AppState;
use gatehouse::security::password::{Cost, Hasher, PoolStats};
use gatehouse_testenv::*;
use reqwest::{Method, RequestBuilder, Response};
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;

const PASSWORD: &str = "correct horse battery staple";

/// A request from client `ip`, as the trusted loopback TLS proxy forwards it.
fn from(
    http: &reqwest::Client,
    server: &TestServer,
    method: Method,
    path: &str,
    ip: &str,
) -> RequestBuilder {
    http.request(method, server.url(path))
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-for", ip)
}

async fn create_user(env: &TestEnv, email: &str) -> Uuid {
    accounts::create_user(
        &env.pool,
        &Hasher::owasp(),
        NewUser {
            email: email.into(),
            password: SecretString::from(PASSWORD),
            first_name: "Test".into(),
            last_name: "User".into(),
            platform_role: None,
        },
    )
    .await
    .expect("user created")
}

async fn login_from(
    http: &reqwest::Client,
    server: &TestServer,
    ip: &str,
    email: &str,
    password: &str,
) -> Response {
    from(http, server, Method::POST, "/v1/auth/login", ip)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .expect("login")
}

/// A forged webhook (a made-up signature) for `tenant_path` from `ip`.
async fn forged(
    http: &reqwest::Client,
    server: &TestServer,
    tenant_path: &str,
    ip: &str,
) -> Response {
    from(
        http,
        server,
        Method::POST,
        &format!("/v1/webhooks/twilio/{tenant_path}/messages"),
        ip,
    )
    .header("content-type", "application/x-www-form-urlencoded")
    .header("x-twilio-signature", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    .body(format!(
        "MessageSid={}&From=%2B14155550100&Body=hi",
        message_sid()
    ))
    .send()
    .await
    .expect("webhook")
}

async fn code(response: Response) -> String {
    let body: Value = response.json().await.expect("json body");
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Asserts a 429 `rate_limited` with `Retry-After` and the `RateLimit-*` headers.
async fn assert_rate_limited(response: Response, what: &str) {
    assert_eq!(response.status(), 429, "{what}");
    let header = |n: &str| {
        response
            .headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let retry: u64 = header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: Retry-After"));
    assert!((1..=60).contains(&retry), "{what}: {retry}");
    assert!(header("ratelimit-limit").is_some(), "{what}");
    assert_eq!(
        header("ratelimit-remaining").as_deref(),
        Some("0"),
        "{what}"
    );
    assert_eq!(code(response).await, "rate_limited", "{what}");
}

async fn wait_stats(hasher: &Hasher, what: &str, done: impl Fn(PoolStats) -> bool) {
    let start = Instant::now();
    while !done(hasher.stats()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: {:?}",
            hasher.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Occupies a one-thread hasher until the returned sender is used or dropped.
async fn occupy(hasher: &Hasher) -> std::sync::mpsc::Sender<()> {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let h = hasher.clone();
    tokio::spawn(async move {
        let _ = h
            .run(move || {
                let _ = started_tx.send(());
                let _ = wait.recv();
            })
            .await;
    });
    let start = Instant::now();
    while started_rx.try_recv().is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    release
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_webhooks_past_the_unauthenticated_limit_answer_429_before_any_postgresql_work() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_UNAUTHENTICATED_IP".into(), "3/m".into());
    })
    .await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let http = client();
    let attacker = "198.51.100.66";
    // A forgery for a real tenant, one for an unknown tenant, one for a path that is no id.
    let known = forged(&http, &server, &tenant.to_string(), attacker).await;
    assert_eq!(known.status(), 403);
    assert_eq!(code(known).await, "invalid_signature");
    let unknown = forged(&http, &server, &Uuid::new_v4().to_string(), attacker).await;
    assert_eq!(unknown.status(), 403);
    let not_an_id = forged(&http, &server, "not-a-uuid", attacker).await;
    assert_eq!(not_an_id.status(), 403);
    // The budget is spent: 429, for real and unknown tenants alike.
    for path in [tenant.to_string(), Uuid::new_v4().to_string()] {
        assert_rate_limited(forged(&http, &server, &path, attacker).await, "forged").await;
    }
    // Proof that the 429 is decided before PostgreSQL: an ingress sharing this Redis whose
    // PostgreSQL is unreachable still answers 429 for a tenant it has never seen (reaching
    // the key lookup would have been a 503).
    let dead_pg = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .expect("lazy pool");
    let blind = TestServer::start(Arc::new(AppState::new(
        env.config.clone(),
        dead_pg,
        env.redis.clone(),
    )))
    .await;
    let r = forged(&http, &blind, &Uuid::new_v4().to_string(), attacker).await;
    assert_rate_limited(r, "forged, PostgreSQL down").await;
    blind.stop().await;
    // Only the three refusals within the budget reached the signature path's event.
    assert_eq!(env.wait_for_events("invalid_webhook_signature", 3).await, 3);
    // Twilio's genuine signed webhook from another address is unaffected.
    let sid = message_sid();
    let genuine = signed_form(
        &http,
        &server,
        tenant,
        &sms_params(&sid, "+14155550100", "hi"),
    )
    .header("x-forwarded-for", "198.51.100.77")
    .send()
    .await
    .expect("genuine");
    assert_eq!(genuine.status(), 200);
    assert_eq!(env.events_of("invalid_webhook_signature").await, 3);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_bearer_tokens_past_the_limit_answer_429_and_genuine_tokens_still_work() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_UNAUTHENTICATED_IP".into(), "3/m".into());
    })
    .await;
    create_user(&env, "ada@example.com").await;
    let server = env.start_server().await;
    let http = client();
    let attacker = "203.0.113.9";
    let token = {
        let r = login_from(&http, &server, attacker, "ada@example.com", PASSWORD).await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.expect("json");
        body["access_token"].as_str().expect("token").to_owned()
    };
    let me = |ip: &'static str, bearer: Option<&str>| {
        let mut r = from(&http, &server, Method::GET, "/v1/me", ip);
        if let Some(t) = bearer {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    // Garbage, missing and forged tokens: 401 while the budget lasts.
    let forged_jwt = format!("{}.AAAA", token.rsplit_once('.').expect("jwt").0);
    for bearer in [Some("garbage"), None, Some(forged_jwt.as_str())] {
        let r = me(attacker, bearer).await.expect("me");
        assert_eq!(r.status(), 401, "{bearer:?}");
        assert_eq!(code(r).await, "unauthorized");
    }
    assert_rate_limited(me(attacker, Some("garbage")).await.expect("me"), "garbage").await;
    // A genuine token is never counted nor refused, even from the same address.
    for _ in 0..3 {
        assert_eq!(me(attacker, Some(&token)).await.expect("me").status(), 200);
    }
    // Another client still gets the plain 401.
    assert_eq!(
        me("203.0.113.10", Some("garbage"))
            .await
            .expect("me")
            .status(),
        401
    );
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipv6_clients_of_one_64_share_every_per_ip_limit_and_ipv4_mapped_is_ipv4() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_LOGIN_IP".into(), "2/m".into());
        v.insert("RATE_LIMIT_UNAUTHENTICATED_IP".into(), "2/m".into());
    })
    .await;
    let server = env.start_server().await;
    let http = client();
    let status = |ip: &'static str| {
        let http = &http;
        let server = &server;
        async move {
            login_from(http, server, ip, "x@example.com", "whatever password")
                .await
                .status()
                .as_u16()
        }
    };
    // Three addresses of one /64 share the login limit; the next /64 has its own.
    assert_eq!(status("2001:db8:1:2::1").await, 401);
    assert_eq!(status("2001:db8:1:2:ffff::9").await, 401);
    assert_eq!(status("2001:db8:1:2:abcd::77").await, 429);
    assert_eq!(status("2001:db8:1:3::1").await, 401);
    // An IPv4-mapped IPv6 address is its IPv4 address.
    assert_eq!(status("198.51.100.7").await, 401);
    assert_eq!(status("::ffff:198.51.100.7").await, 401);
    assert_eq!(status("198.51.100.7").await, 429);
    // The unauthenticated budget too.
    let me = |ip: &'static str| {
        from(&http, &server, Method::GET, "/v1/me", ip)
            .bearer_auth("garbage")
            .send()
    };
    assert_eq!(me("2001:db8:9:9::1").await.expect("me").status(), 401);
    assert_eq!(me("2001:db8:9:9:1::2").await.expect("me").status(), 401);
    assert_rate_limited(me("2001:db8:9:9:2::3").await.expect("me"), "same /64").await;
    assert_eq!(me("2001:db8:9:a::1").await.expect("me").status(), 401);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_wrong_guesses_for_one_email_check_at_most_the_limits_worth() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_LOGIN_IP".into(), "1000/m".into());
        v.insert("RATE_LIMIT_LOGIN_EMAIL".into(), "5/h".into());
    })
    .await;
    create_user(&env, "ada@example.com").await;
    create_user(&env, "busy@example.com").await;
    create_user(&env, "fresh@example.com").await;
    let server = env.start_server().await;
    let http = client();
    let guesses = (0..20).map(|i| {
        let http = http.clone();
        let url = server.url("/v1/auth/login");
        async move {
            http.post(url)
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-for", format!("203.0.113.{}", i + 1))
                .json(&json!({"email": "ada@example.com", "password": format!("wrong guess {i}")}))
                .send()
                .await
                .expect("login")
                .status()
                .as_u16()
        }
    });
    let statuses = futures::future::join_all(guesses).await;
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(checked, 5, "{statuses:?}");
    assert_eq!(limited, 15, "{statuses:?}");
    assert_eq!(env.wait_for_events("failed_login", 5).await, 5);
    // A fresh email logs in with its right password.
    let r = login_from(&http, &server, "203.0.113.1", "fresh@example.com", PASSWORD).await;
    assert_eq!(r.status(), 200);
    // Frequent successful logins give their reservation back: never refused.
    for _ in 0..8 {
        let r = login_from(&http, &server, "203.0.113.2", "busy@example.com", PASSWORD).await;
        assert_eq!(r.status(), 200);
    }
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_on_a_client_id_from_other_addresses_never_lock_its_producer_out() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_LOGIN_IP".into(), "3/m".into());
        v.insert("RATE_LIMIT_LOGIN_EMAIL".into(), "2/h".into());
    })
    .await;
    let creds = accounts::create_service_account(
        &env.pool,
        &Hasher::owasp(),
        "producer",
        &["jobs:enqueue".to_owned()],
    )
    .await
    .expect("service account");
    let server = env.start_server().await;
    let http = client();
    let token = |ip: String, secret: String| {
        from(&http, &server, Method::POST, "/v1/auth/token", &ip)
            .json(&json!({"client_id": creds.client_id, "client_secret": secret}))
            .send()
    };
    // Ten failures on the producer's client id, from ten addresses.
    for i in 0..10 {
        let r = token(format!("192.0.2.{}", i + 1), "not the secret".into())
            .await
            .expect("token");
        assert_eq!(r.status(), 401);
    }
    use secrecy::ExposeSecret;
    let secret = creds.client_secret.expose_secret().to_owned();
    let r = token("198.51.100.50".into(), secret).await.expect("token");
    assert_eq!(r.status(), 200, "the producer gets its token");
    // The per-IP limit still holds for one address failing repeatedly.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            token("192.0.2.200".into(), "nope".into())
                .await
                .expect("token")
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [401, 401, 401, 429]);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_hashing_queue_answers_503_at_once_and_a_gone_request_is_not_hashed() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_LOGIN_IP".into(), "1000/m".into());
        v.insert("RATE_LIMIT_LOGIN_EMAIL".into(), "1/h".into());
    })
    .await;
    create_user(&env, "ada@example.com").await;
    let mut state = AppState::new(env.config.clone(), env.pool.clone(), env.redis.clone());
    // One hashing thread, room for one waiting hash.
    let hasher = Hasher::with_queue(Cost::OWASP, 1, 1);
    state.hasher = hasher.clone();
    let server = TestServer::start(Arc::new(state)).await;
    let http = client();
    let release = occupy(&hasher).await;
    // One login waits for the thread...
    let waiting = {
        let http = http.clone();
        let url = server.url("/v1/auth/login");
        tokio::spawn(async move {
            http.post(url)
                .header("x-forwarded-proto", "https")
                .json(&json!({"email": "queued@example.com", "password": "a wrong password"}))
                .send()
                .await
                .expect("login")
                .status()
                .as_u16()
        })
    };
    wait_stats(&hasher, "one login waits", |s| {
        s.waiting == 1 && s.callers == 2
    })
    .await;
    // ...so the queue is full: the next login and a registration are refused at once.
    let r = login_from(&http, &server, "198.51.100.1", "ada@example.com", PASSWORD).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(code(r).await, "unavailable");
    let reg = from(&http, &server, Method::POST, "/v1/auth/register", "198.51.100.1")
        .json(&json!({"email": "new@example.com", "password": PASSWORD, "first_name": "N", "last_name": "U"}))
        .send()
        .await
        .expect("register");
    assert_eq!(reg.status(), 503);
    assert!(reg.headers().contains_key("retry-after"));
    assert_eq!(hasher.stats().refused, 2);
    // The client of the waiting login goes away before a thread is free.
    waiting.abort();
    let _ = waiting.await;
    // Once the server has noticed (the handler's future is dropped), only the blocker waits.
    wait_stats(&hasher, "the login's handler is gone", |s| s.callers == 1).await;
    let _ = release.send(());
    wait_stats(&hasher, "the abandoned hash is skipped", |s| {
        s.waiting == 0 && s.skipped == 1
    })
    .await;
    assert_eq!(hasher.stats().computed, 1, "only the blocker ran");
    // The refused login's reserved attempt was given back (the limit is 1/h): ada logs in.
    let r = login_from(&http, &server, "198.51.100.1", "ada@example.com", PASSWORD).await;
    assert_eq!(r.status(), 200);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_typed_into_the_email_field_is_never_stored_in_an_event() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_LOGIN_EMAIL".into(), "1/h".into());
    })
    .await;
    let server = env.start_server().await;
    let http = client();
    let typed = "Tr0ub4dor&3 secret";
    let r = login_from(&http, &server, "198.51.100.3", typed, "x").await;
    assert_eq!(r.status(), 401);
    // The second attempt is over the (1/h) per-value limit: a rate_limit_exceeded event.
    let r = login_from(&http, &server, "198.51.100.3", typed, "x").await;
    assert_eq!(r.status(), 429);
    let r = login_from(&http, &server, "198.51.100.3", "someone@example.com", "x").await;
    assert_eq!(r.status(), 401);
    assert_eq!(env.wait_for_events("failed_login", 2).await, 2);
    assert_eq!(env.wait_for_events("rate_limit_exceeded", 1).await, 1);
    let rows: Vec<(String, Option<String>, Value)> =
        sqlx::query_as("SELECT type, email, details FROM security_events ORDER BY occurred_at, id")
            .fetch_all(&env.pool)
            .await
            .expect("events");
    let shapeless: Vec<_> = rows
        .iter()
        .filter(|(_, email, _)| email.is_none())
        .collect();
    assert_eq!(shapeless.len(), 2, "{rows:?}");
    for (kind, _, details) in shapeless {
        assert_eq!(details["email_shape"], json!(false), "{kind}: {details}");
    }
    assert!(rows.iter().any(|(kind, email, _)| kind == "failed_login"
        && email.as_deref() == Some("someone@example.com")));
    let everything: Vec<String> =
        sqlx::query_scalar("SELECT row_to_json(e)::text FROM security_events e")
            .fetch_all(&env.pool)
            .await
            .expect("rows");
    for row in &everything {
        assert!(!row.to_lowercase().contains("tr0ub4dor"), "{row}");
    }
    // Nor does the value rest in a Redis key name.
    let mut redis = env.redis.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", env.namespace))
        .query_async(&mut redis)
        .await
        .expect("keys");
    assert!(
        keys.iter().all(|k| !k.to_lowercase().contains("tr0ub4dor")),
        "{keys:?}"
    );
    server.stop().await;
    env.cleanup().await;
}

fn limits_reset(env: &TestEnv, args: &[&str]) -> std::process::Output {
    limits_reset_with(&env.vars, args)
}

fn limits_reset_with(
    vars: &std::collections::HashMap<String, String>,
    args: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["limits", "reset"])
        .args(args)
        .env_clear()
        .envs(vars.iter())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("gatehouse runs")
}

/// Runs `gatehouse limits reset ARGS`, asserts it exits 0, and returns its stdout.
fn limits_reset_ok(env: &TestEnv, args: &[&str]) -> String {
    let out = limits_reset(env, args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_reset_lifts_an_email_lockout_and_every_per_ip_limit_of_an_address() {
    let env = TestEnv::with_vars(|v| {
        v.insert("RATE_LIMIT_LOGIN_IP".into(), "3/m".into());
        v.insert("RATE_LIMIT_LOGIN_EMAIL".into(), "2/h".into());
        v.insert("RATE_LIMIT_UNAUTHENTICATED_IP".into(), "1/m".into());
    })
    .await;
    create_user(&env, "ada@example.com").await;
    let server = env.start_server().await;
    let http = client();
    // Lock ada's email out from two addresses.
    for ip in ["198.51.100.1", "198.51.100.2"] {
        let r = login_from(&http, &server, ip, "ada@example.com", "wrong password").await;
        assert_eq!(r.status(), 401);
    }
    let r = login_from(&http, &server, "198.51.100.3", "ADA@example.com", PASSWORD).await;
    assert_eq!(r.status(), 429, "locked");
    let stdout = limits_reset_ok(&env, &["--email", " Ada@Example.com "]);
    assert!(
        stdout.contains("removed failed_login ada@example.com"),
        "{stdout}"
    );
    let r = login_from(&http, &server, "198.51.100.3", "ada@example.com", PASSWORD).await;
    assert_eq!(r.status(), 200, "the lockout is lifted");
    // Running it again finds nothing to remove, and says so.
    let again = limits_reset_ok(&env, &["--email", "ada@example.com"]);
    assert!(again.contains("none failed_login"), "{again}");

    // An IPv6 client spends its login and unauthenticated budgets; a reset of any address of
    // its /64 lifts both.
    for _ in 0..3 {
        login_from(&http, &server, "2001:db8:5:6::1", "x@example.com", "nope").await;
    }
    let garbage = |ip: &'static str| {
        from(&http, &server, Method::GET, "/v1/me", ip)
            .bearer_auth("garbage")
            .send()
    };
    assert_eq!(garbage("2001:db8:5:6::1").await.expect("me").status(), 401);
    assert_rate_limited(garbage("2001:db8:5:6::1").await.expect("me"), "spent").await;
    let r = login_from(
        &http,
        &server,
        "2001:db8:5:6::1",
        "ada@example.com",
        PASSWORD,
    )
    .await;
    assert_eq!(r.status(), 429);
    let stdout = limits_reset_ok(&env, &["--ip", "2001:db8:5:6:aaaa::1"]);
    assert!(
        stdout.contains("removed auth_ip 2001:db8:5:6::/64"),
        "{stdout}"
    );
    assert!(
        stdout.contains("removed unauthenticated_ip 2001:db8:5:6::/64"),
        "{stdout}"
    );
    let r = login_from(
        &http,
        &server,
        "2001:db8:5:6::1",
        "ada@example.com",
        PASSWORD,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(garbage("2001:db8:5:6::1").await.expect("me").status(), 401);

    // A client id is accepted, and the answer explains that token limits are per IP.
    let stdout = limits_reset_ok(&env, &["--client-id", "gh_0123456789abcdef"]);
    assert!(stdout.contains("per IP only"), "{stdout}");
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_reset_exits_1_on_a_usage_error_and_2_when_redis_cannot_be_reached() {
    let env = TestEnv::new().await;
    for args in [
        &[][..],
        &["--email", "a@example.com", "--ip", "198.51.100.1"][..],
        &["--ip", "not-an-address"][..],
        &["--email", "  "][..],
    ] {
        let out = limits_reset(&env, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
    }
    let mut unreachable = env.vars.clone();
    unreachable.insert("REDIS_URL".into(), "redis://127.0.0.1:1".into());
    let out = limits_reset_with(&unreachable, &["--email", "a@example.com"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.cleanup().await;
}
