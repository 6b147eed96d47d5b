//! The real binary (`gatehouse serve`) with `SENTRY_DSN` pointed at a loopback server that
//! plays Sentry: critical security events arrive through the alert they raise (one Sentry
//! event per rule, subject and window, however many forgeries), non-critical ones do not, and
//! no password, token, signature or message body reaches Sentry or the JSON log.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use gatehouse_testenv::*;
use serde_json::{Value, json};

const PASSWORD: &str = "Corr3ct-H0rse-Battery-Staple";
const WRONG_PASSWORD: &str = "Wr0ng-Passw0rd-Do-Not-Log";
const FORGED_SIGNATURE: &str = "Rm9yZ2VkU2lnbmF0dXJlRm9yZ2Vk=";
const BODY_TEXT: &str = "my-card-is-4111-1111-1111-1111";

/// `gatehouse serve` as production runs it (JSON logs), its stderr captured.
fn spawn_serve(env: &TestEnv, port: u16, dsn: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .arg("serve")
        .env_clear()
        .envs(env.vars.iter())
        .env("PORT", port.to_string())
        .env("SENTRY_DSN", dsn)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gatehouse serve")
}

/// Waits until some envelope contains `needle`.
async fn wait_for_envelope(seen: &Arc<Mutex<Vec<String>>>, needle: &str) -> bool {
    for _ in 0..200 {
        if seen
            .lock()
            .map(|all| all.iter().any(|e| e.contains(needle)))
            .unwrap_or(false)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_events_reach_sentry_and_the_json_log_without_secrets_and_failed_logins_stay_out_of_sentry()
 {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let (sentry, seen) = fake_sentry().await;
    let port = free_port();
    let dsn = format!("http://0123456789abcdef@{sentry}/42");
    let mut serve = spawn_serve(&env, port, &dsn);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&format!("{base}/healthz"), Duration::from_secs(15)).await;
    let http = reqwest::Client::new();

    // A user, a wrong password (failed_login: not critical), then a right one (a token).
    let r = http
        .post(format!("{base}/v1/auth/register"))
        .header("x-forwarded-proto", "https")
        .json(&json!({"email": "ana@example.com", "password": PASSWORD, "first_name": "Ana", "last_name": "Lee"}))
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 201);
    let r = http
        .post(format!("{base}/v1/auth/login"))
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-for", "203.0.113.5")
        .json(&json!({"email": "ana@example.com", "password": WRONG_PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{base}/v1/auth/login"))
        .header("x-forwarded-proto", "https")
        .json(&json!({"email": "ana@example.com", "password": PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200);
    let token = r.json::<Value>().await.expect("json")["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    // The token used where its scopes do not reach (permission_denied: not critical).
    let r = http
        .get(format!("{base}/v1/admin/security-events"))
        .header("x-forwarded-proto", "https")
        .bearer_auth(&token)
        .send()
        .await
        .expect("events");
    assert_eq!(r.status(), 403);

    // A forged webhook carrying a message body: critical, and it raises an alert.
    let body = format!(
        "MessageSid=SM0123456789abcdef0123456789abcdef&From=%2B14155550100&Body={BODY_TEXT}"
    );
    let r = http
        .post(format!("{base}{}", webhook_path(tenant)))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", FORGED_SIGNATURE)
        .body(body)
        .send()
        .await
        .expect("webhook");
    assert_eq!(r.status(), 403);

    assert!(
        wait_for_envelope(&seen, "invalid_webhook_signature").await,
        "the critical event reached Sentry"
    );
    assert!(
        wait_for_envelope(&seen, "suspicious_activity").await,
        "the alert reached Sentry"
    );
    // Every row is written before the process stops (events are recorded off the request path).
    env.wait_for_count(
        "SELECT count(*) FROM security_events WHERE type IN ('failed_login', 'permission_denied', 'invalid_webhook_signature', 'suspicious_activity')",
        4,
        Duration::from_secs(10),
    )
    .await;
    assert!(terminate(&mut serve).success());
    let mut stderr = String::new();
    serve
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");

    let envelopes = seen.lock().map(|v| v.clone()).unwrap_or_default();
    let all = envelopes.join("\n");
    assert!(
        all.contains(&tenant.to_string()),
        "the event names its tenant"
    );
    assert!(all.contains("invalid_webhook_signature") && all.contains("rule"));
    for kind in ["failed_login", "permission_denied"] {
        assert!(
            !all.contains(kind),
            "{kind} is not critical but reached Sentry"
        );
    }
    for secret in [
        PASSWORD,
        WRONG_PASSWORD,
        token.as_str(),
        FORGED_SIGNATURE,
        BODY_TEXT,
        TOKEN,
        "+14155550100",
    ] {
        assert!(!all.contains(secret), "{secret} leaked to Sentry");
        assert!(!stderr.contains(secret), "{secret} leaked to the log");
    }

    // The production log: one JSON object per line; security events carry their fields.
    let lines: Vec<Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON line: {l}")))
        .collect();
    let security: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "security" && l.get("type").is_some())
        .collect();
    let login = security
        .iter()
        .find(|l| l["type"] == "failed_login")
        .expect("a failed_login line");
    assert_eq!(login["level"], "WARN");
    assert_eq!(login["ip"], "203.0.113.5");
    assert_eq!(login["email"], "ana@example.com");
    assert!(login["user.id"].is_string(), "{login}");
    assert!(login["request.id"].is_string(), "{login}");
    assert!(
        login["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{login}"
    );
    assert!(login["timestamp"].is_string());
    let forged = security
        .iter()
        .find(|l| l["type"] == "invalid_webhook_signature")
        .expect("an invalid_webhook_signature line");
    // The forgery reaches Sentry through its alert (one per rule, subject and window), so its
    // own line is a warning; the alert's is the ERROR line Sentry receives.
    assert_eq!(forged["level"], "WARN");
    assert_eq!(forged["tenant.id"], tenant.to_string());
    let alert = security
        .iter()
        .find(|l| l["type"] == "suspicious_activity")
        .expect("an alert line");
    assert_eq!(alert["level"], "ERROR");
    assert_eq!(alert["tenant.id"], tenant.to_string());
    assert!(
        alert["details"]
            .as_str()
            .is_some_and(|d| d.contains("\"rule\":\"invalid_webhook_signature\"")),
        "{alert}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_webhooks_sends_sentry_one_event_per_rule_subject_and_window() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let (sentry, seen) = fake_sentry().await;
    let port = free_port();
    let dsn = format!("http://0123456789abcdef@{sentry}/42");
    let mut serve = spawn_serve(&env, port, &dsn);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&format!("{base}/healthz"), Duration::from_secs(15)).await;
    let http = reqwest::Client::new();
    // The alert window is the hour: keep the flood inside one.
    let into_hour = time::OffsetDateTime::now_utc().unix_timestamp() % 3600;
    if into_hour > 3540 {
        tokio::time::sleep(Duration::from_secs((3601 - into_hour) as u64)).await;
    }
    const N: usize = 30;
    let body = "MessageSid=SM0123456789abcdef0123456789abcdef&From=%2B14155550100&Body=hi";
    for i in 0..N {
        // N forgeries for the real tenant, and N for tenants that do not exist, each from
        // its own address.
        for (target, ip) in [
            (tenant, format!("198.51.100.{i}")),
            (uuid::Uuid::new_v4(), format!("203.0.113.{i}")),
        ] {
            let r = http
                .post(format!("{base}{}", webhook_path(target)))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-for", ip)
                .header("x-twilio-signature", FORGED_SIGNATURE)
                .body(body)
                .send()
                .await
                .expect("webhook");
            assert_eq!(r.status(), 403);
        }
    }
    let stored = env
        .wait_for_count(
            "SELECT count(*) FROM security_events WHERE type = 'invalid_webhook_signature'",
            2 * N as i64,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(stored, 2 * N as i64);
    // Stopping flushes Sentry's queue.
    assert!(terminate(&mut serve).success());
    assert_eq!(env.events_of("suspicious_activity").await, 2);

    let envelopes = seen.lock().map(|v| v.clone()).unwrap_or_default();
    let events: Vec<&String> = envelopes
        .iter()
        .filter(|e| e.contains("\"type\":\"event\""))
        .collect();
    assert_eq!(
        events.len(),
        2,
        "one Sentry event per (rule, subject, window), nothing else: {events:#?}"
    );
    for subject in [format!("tenant:{tenant}"), "unknown-tenant".to_owned()] {
        let about: Vec<_> = events.iter().filter(|e| e.contains(&subject)).collect();
        assert_eq!(about.len(), 1, "{subject}: {events:#?}");
        assert!(about[0].contains("invalid_webhook_signature"));
    }
    env.cleanup().await;
}
