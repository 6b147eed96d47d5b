//! `gatehouse tenants rotate-secret`: a tenant's Twilio token, webhook shared key or store key
//! replaced while webhooks flow, seen by every ingress within moments (two real `serve`
//! processes whose key caches would otherwise keep the old keys for an hour), with and without
//! an overlap for the previous value.

use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::*;
use gatehouse::security::twilio::{Algorithm, sign_form};
use gatehouse_testenv::run_cli as gatehouse;
use gatehouse_testenv::*;
use uuid::Uuid;

const NEW_TOKEN: &str = "fedcba09876543210fedcba098765432";
const SHARED_ID: &str = "kid-1";
const SHARED_KEY: &str = "first-shared-key-0123456789abcdef";
const NEW_SHARED_ID: &str = "kid-2";
const NEW_SHARED_KEY: &str = "second-shared-key-0123456789abcdef";

fn rotate(env: &TestEnv, tenant: Uuid, secret: &str, overlap: u64, stdin: &str) -> Output {
    gatehouse(
        &[
            "tenants",
            "rotate-secret",
            "--tenant",
            &tenant.to_string(),
            "--secret",
            secret,
            "--previous-valid-for",
            &overlap.to_string(),
        ],
        &env.vars,
        stdin,
    )
}

/// The key a webhook is signed with.
#[derive(Clone, Copy)]
enum Signer<'a> {
    /// The classic form, with a Twilio auth token.
    Token(&'a str),
    /// The shared-key form: key id and key.
    Shared(&'a str, &'a str),
}

/// Sends one signed webhook to the ingress on `port`; its status.
async fn webhook(port: u16, tenant: Uuid, signer: Signer<'_>) -> u16 {
    let sid = message_sid();
    let path = webhook_path(tenant);
    let params = [
        ("MessageSid", sid.as_str()),
        ("AccountSid", ACCOUNT_SID),
        ("From", "+14155550100"),
        ("To", "+14155550199"),
        ("Body", "hello"),
    ];
    let url = format!("{PUBLIC_BASE}{path}");
    let (signature, settings) = match signer {
        Signer::Token(token) => (
            sign_form(&url, &params, token.as_bytes(), Algorithm::HmacSha1),
            None,
        ),
        Signer::Shared(id, key) => (
            sign_form(&url, &params, key.as_bytes(), Algorithm::HmacSha256),
            Some(format!("key={id},algorithm=HMAC_SHA256")),
        ),
    };
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    let mut request = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", signature)
        .timeout(Duration::from_secs(10))
        .body(body);
    if let Some(settings) = settings {
        request = request.header("x-twilio-webhooks-signature-settings", settings);
    }
    request
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Two `serve` processes of `env`, healthy; their ports.
async fn two_ingresses(env: &TestEnv) -> (Vec<std::process::Child>, [u16; 2]) {
    let ports = [free_port(), free_port()];
    let children = ports
        .iter()
        .map(|port| env.spawn(&["serve"], &[("PORT", &port.to_string())]))
        .collect();
    for port in ports {
        let url = format!("http://127.0.0.1:{port}/healthz");
        assert!(
            eventually(Duration::from_secs(20), || async {
                reqwest::get(&url).await.is_ok_and(|r| r.status() == 200)
            })
            .await,
            "ingress on {port} is up"
        );
    }
    (children, ports)
}

/// A tenant with the common Twilio token and a webhook shared key.
async fn tenant_with_shared_key(env: &TestEnv) -> Uuid {
    gatehouse::tenants::create(
        &env.pool,
        &env.config.keyring,
        &gatehouse::tenants::NewTenant {
            name: "Shop".into(),
            twilio_account_sid: ACCOUNT_SID.into(),
            twilio_auth_token: secrecy::SecretString::from(TOKEN.to_owned()),
            store_url: None,
            store_api_key: None,
            webhook_shared_key: Some((
                SHARED_ID.to_owned(),
                secrecy::SecretString::from(SHARED_KEY.to_owned()),
            )),
            owner_email: None,
        },
    )
    .await
    .expect("tenant created")
}

/// An environment whose ingresses would keep cached keys for an hour: only the change notice
/// makes them see a rotation within moments.
async fn long_cache_env() -> TestEnv {
    TestEnv::with_vars(|vars| {
        vars.insert("TENANT_KEY_CACHE_SECONDS".into(), "3600".into());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_twilio_token_is_refused_on_every_ingress_at_once_and_the_new_one_accepted() {
    let env = long_cache_env().await;
    let tenant = env.create_tenant().await;
    let (mut ingresses, ports) = two_ingresses(&env).await;
    for port in ports {
        assert_eq!(webhook(port, tenant, Signer::Token(TOKEN)).await, 200);
    }
    let out = rotate(
        &env,
        tenant,
        "twilio_auth_token",
        0,
        &format!("twilio_auth_token={NEW_TOKEN}\n"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("rotated twilio_auth_token of tenant"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 ingress process(es) notified"),
        "{stdout}"
    );
    assert!(!stdout.contains(NEW_TOKEN) && !stdout.contains(TOKEN));
    let rotated = Instant::now();
    for port in ports {
        let refused = eventually(Duration::from_secs(5), || async {
            webhook(port, tenant, Signer::Token(TOKEN)).await == 403
        })
        .await;
        assert!(refused, "ingress {port} refuses the old token");
        assert_eq!(webhook(port, tenant, Signer::Token(NEW_TOKEN)).await, 200);
    }
    assert!(
        rotated.elapsed() < Duration::from_secs(10),
        "not the hour-long cache"
    );
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM security_events WHERE type = 'tenant_secret_rotated'
           AND tenant_id = $1 AND details->>'secret' = 'twilio_auth_token'",
    )
    .bind(tenant)
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(events, 1, "the rotation is a security event");
    for child in &mut ingresses {
        assert!(terminate(child).success());
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_an_overlap_both_tokens_verify_until_it_ends_then_only_the_new_one() {
    let env = long_cache_env().await;
    let tenant = env.create_tenant().await;
    let (mut ingresses, ports) = two_ingresses(&env).await;
    for port in ports {
        assert_eq!(webhook(port, tenant, Signer::Token(TOKEN)).await, 200);
    }
    let out = rotate(
        &env,
        tenant,
        "twilio_auth_token",
        4,
        &format!("twilio_auth_token={NEW_TOKEN}\n"),
    );
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("the previous value verifies until"),
        "{stdout}"
    );
    let rotated = Instant::now();
    for port in ports {
        // The new token works at once everywhere (the notice), the old one still does.
        assert!(
            eventually(Duration::from_secs(3), || async {
                webhook(port, tenant, Signer::Token(NEW_TOKEN)).await == 200
            })
            .await
        );
        if rotated.elapsed() < Duration::from_secs(3) {
            assert_eq!(webhook(port, tenant, Signer::Token(TOKEN)).await, 200);
        }
    }
    // Past the overlap the cached entry (no further notice) no longer accepts the old token.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(rotated.elapsed())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for port in ports {
        assert_eq!(webhook(port, tenant, Signer::Token(TOKEN)).await, 403);
        assert_eq!(webhook(port, tenant, Signer::Token(NEW_TOKEN)).await, 200);
    }
    for child in &mut ingresses {
        assert!(terminate(child).success());
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_shared_key_keeps_its_predecessor_for_the_overlap_only() {
    let env = long_cache_env().await;
    let tenant = tenant_with_shared_key(&env).await;
    let (mut ingresses, ports) = two_ingresses(&env).await;
    let old = Signer::Shared(SHARED_ID, SHARED_KEY);
    let new = Signer::Shared(NEW_SHARED_ID, NEW_SHARED_KEY);
    for port in ports {
        assert_eq!(webhook(port, tenant, old).await, 200);
        assert_eq!(webhook(port, tenant, new).await, 403, "not yet");
    }
    let out = rotate(
        &env,
        tenant,
        "webhook_shared_key",
        3,
        &format!("webhook_shared_key_id={NEW_SHARED_ID}\nwebhook_shared_key={NEW_SHARED_KEY}\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotated = Instant::now();
    for port in ports {
        assert!(
            eventually(Duration::from_secs(2), || async {
                webhook(port, tenant, new).await == 200
            })
            .await
        );
        if rotated.elapsed() < Duration::from_secs(2) {
            assert_eq!(webhook(port, tenant, old).await, 200, "within the overlap");
        }
    }
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(rotated.elapsed())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for port in ports {
        assert_eq!(webhook(port, tenant, old).await, 403, "past the overlap");
        assert_eq!(webhook(port, tenant, new).await, 200);
        // The classic form still uses the (unchanged) auth token.
        assert_eq!(webhook(port, tenant, Signer::Token(TOKEN)).await, 200);
    }
    for child in &mut ingresses {
        assert!(terminate(child).success());
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_key_is_replaced_without_overlap_and_bad_requests_change_nothing() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let keys_version = || async {
        sqlx::query_scalar::<_, i64>("SELECT keys_version FROM tenants WHERE id = $1")
            .bind(tenant)
            .fetch_one(&env.pool)
            .await
            .expect("keys_version")
    };
    let before = keys_version().await;
    for (args, stdin, want) in [
        // No overlap for the store key: gatehouse is the one sending it.
        (
            ("store_api_key", 60),
            "store_api_key=new-store-key-0123456789\n",
            "--previous-valid-for",
        ),
        (("twilio_auth_token", 0), "", "twilio_auth_token="),
        (
            ("webhook_shared_key", 0),
            "webhook_shared_key=only-the-key-0123456789\n",
            "webhook_shared_key_id",
        ),
        (("twilio_auth_token", 0), "store_api_key=x\n", ""),
    ] {
        let out = rotate(&env, tenant, args.0, args.1, stdin);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("0123456789"), "no secret in the error");
    }
    let unknown = rotate(
        &env,
        Uuid::new_v4(),
        "twilio_auth_token",
        0,
        "twilio_auth_token=x\n",
    );
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no such tenant"));
    assert_eq!(keys_version().await, before, "nothing changed");

    let out = rotate(
        &env,
        tenant,
        "store_api_key",
        0,
        "store_api_key=new-store-key-0123456789\n",
    );
    assert!(out.status.success());
    assert_eq!(keys_version().await, before + 1);
    // Sealed to its row and column like any tenant secret.
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT store_api_key FROM tenants WHERE id = $1")
        .bind(tenant)
        .fetch_one(&env.pool)
        .await
        .expect("store key");
    let opened = env
        .config
        .keyring
        .open(
            &sealed,
            &gatehouse::security::keyring::aad("tenants", "store_api_key", &tenant.to_string()),
        )
        .expect("opens under its row and column");
    assert_eq!(&opened[..], b"new-store-key-0123456789");
    env.cleanup().await;
}
