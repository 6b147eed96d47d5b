//! The binary as an operator runs it: exit codes, config errors, secrets on stdin, and
//! `serve` + `work` processes carrying a signed message to a committed row.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use base64::Engine;
use gatehouse_testenv::run_cli as run;
use gatehouse_testenv::*;
use hmac::{KeyInit, Mac};

const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn keys_generate_prints_a_fresh_key_that_keys_check_accepts() {
    let empty = HashMap::new();
    let a = run(&["keys", "generate"], &empty, "");
    let b = run(&["keys", "generate"], &empty, "");
    assert!(a.status.success() && b.status.success());
    let key = text(&a.stdout).trim().to_owned();
    assert_ne!(key, text(&b.stdout).trim());
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&key)
        .expect("base64");
    assert_eq!(raw.len(), 32);
    let mut vars = base_vars("postgres://postgres@127.0.0.1/x", "unused");
    vars.insert("ENCRYPTION_KEY".into(), key);
    let check = run(&["keys", "check"], &vars, "");
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
}

#[test]
fn keys_check_names_every_broken_rule_and_never_a_value() {
    let mut vars = HashMap::new();
    vars.insert("SECRET_KEY".to_owned(), "short-secret-value".to_owned());
    vars.insert("JWT_SECRET_KEY".to_owned(), "a".repeat(40));
    vars.insert("ENCRYPTION_KEY".to_owned(), "bm90LWEta2V5".to_owned());
    let out = run(&["keys", "check"], &vars, "");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    for name in ["SECRET_KEY", "JWT_SECRET_KEY", "ENCRYPTION_KEY"] {
        assert!(err.contains(name), "{name} named in {err}");
    }
    for value in ["short-secret-value", &"a".repeat(40), "bm90LWEta2V5"] {
        assert!(!err.contains(value), "a value leaked: {err}");
    }
}

#[test]
fn serve_refuses_a_bad_configuration_with_one_line_per_problem() {
    let mut vars = base_vars("postgres://postgres@127.0.0.1/x", "unused");
    vars.insert("JWT_SECRET_KEY".into(), vars["SECRET_KEY"].clone());
    vars.insert("RATE_LIMIT_USER".into(), "10/w".into());
    vars.insert("DEBUG".into(), "maybe".into());
    vars.remove("DATABASE_URL");
    let out = run(&["serve"], &vars, "");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    for name in ["JWT_SECRET_KEY", "RATE_LIMIT_USER", "DEBUG", "DATABASE_URL"] {
        assert!(
            err.lines().any(|l| l.contains(name)),
            "{name} has its own line in {err}"
        );
    }
    assert!(
        !err.contains(&vars["SECRET_KEY"]),
        "the secret leaked: {err}"
    );
}

#[test]
fn migrate_exits_2_when_postgres_cannot_be_reached() {
    let vars = base_vars("postgres://postgres@127.0.0.1:1/none", "unused");
    let out = run(&["migrate"], &vars, "");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_create_reads_its_secrets_from_stdin_and_seals_them() {
    let env = TestEnv::new().await;
    let out = run(
        &[
            "tenants",
            "create",
            "--name",
            "Blue Shoes",
            "--twilio-account-sid",
            ACCOUNT_SID,
            "--store-url",
            "https://shop.example.com",
        ],
        &env.vars,
        &format!(
            "twilio_auth_token={TOKEN}\nstore_api_key=sk_live_0123456789abcdef\nwebhook_shared_key_id=KS1\nwebhook_shared_key=whsk_0123456789abcdef0123\n"
        ),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id = uuid::Uuid::parse_str(text(&out.stdout).trim()).expect("prints the tenant id");
    let (token, key): (Vec<u8>, Vec<u8>) =
        sqlx::query_as("SELECT twilio_auth_token, store_api_key FROM tenants WHERE id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .expect("tenant row");
    assert!(!token.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()));
    assert!(!key.windows(8).any(|w| w == b"sk_live_"));
    let keys = gatehouse::tenants::verification_keys(&env.pool, &env.config.keyring, id)
        .await
        .expect("keys open")
        .expect("tenant exists");
    use secrecy::ExposeSecret;
    assert_eq!(keys.auth_token.expose_secret(), TOKEN);
    assert_eq!(keys.shared_keys.len(), 1);

    // Missing token, unknown name, an owner email that is no address: exit 1 and nothing
    // written. (An owner email issues an invitation, whoever holds the address: see
    // tests/it/invitations.rs.)
    let bad = run(
        &[
            "tenants",
            "create",
            "--name",
            "X",
            "--twilio-account-sid",
            ACCOUNT_SID,
        ],
        &env.vars,
        "store_api_key=abc\n",
    );
    assert_eq!(bad.status.code(), Some(1));
    let owner = run(
        &[
            "tenants",
            "create",
            "--name",
            "X",
            "--twilio-account-sid",
            ACCOUNT_SID,
            "--owner-email",
            "nobody-at-example.com",
        ],
        &env.vars,
        &format!("twilio_auth_token={TOKEN}\n"),
    );
    assert_eq!(owner.status.code(), Some(1));
    assert!(!text(&owner.stderr).contains(TOKEN));
    assert_eq!(env.count("SELECT count(*) FROM tenants").await, 1);
    env.cleanup().await;
}

/// Twilio's classic signature, computed here from the definition, independently of
/// gatehouse's verifier.
fn independent_signature(url: &str, params: &[(&str, &str)], token: &str) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut data = url.to_owned();
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()).expect("hmac key");
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_work_processes_carry_a_signed_message_to_a_row_and_stop_cleanly() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let port = free_port();
    let port_text = port.to_string();
    let mut serve = env.spawn(&["serve"], &[("PORT", &port_text)]);
    let mut work = env.spawn(&["work"], &[]);
    wait_healthy(
        &format!("http://127.0.0.1:{port}/healthz"),
        Duration::from_secs(10),
    )
    .await;

    let sid = message_sid();
    let path = webhook_path(tenant);
    let params = [
        ("MessageSid", sid.as_str()),
        ("AccountSid", ACCOUNT_SID),
        ("From", "+14155550100"),
        ("To", "+14155550199"),
        ("Body", "Where is my order?"),
    ];
    let signature = independent_signature(&format!("{PUBLIC_BASE}{path}"), &params, TOKEN);
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", signature)
        .body(body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let n = env
        .wait_for_count("SELECT count(*) FROM messages", 1, Duration::from_secs(30))
        .await;
    assert_eq!(n, 1);
    let intent: String = sqlx::query_scalar("SELECT intent FROM messages")
        .fetch_one(&env.pool)
        .await
        .expect("row");
    assert_eq!(intent, "order_status");
    assert!(terminate(&mut serve).success(), "serve exits 0 on SIGTERM");
    assert!(terminate(&mut work).success(), "work exits 0 on SIGTERM");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_reads_dotenv_migrates_and_serves() {
    let env = TestEnv::new().await;
    // dev migrates by itself: point it at a fresh, empty database.
    let admin = sqlx::PgPool::connect(&admin_url()).await.expect("admin");
    let db = format!("{}_dev", env.db_name);
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&admin)
        .await
        .expect("create");
    let mut url = url::Url::parse(&admin_url()).expect("url");
    url.set_path(&format!("/{db}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut vars = env.vars.clone();
    vars.insert("DATABASE_URL".into(), url.to_string());
    vars.insert("PORT".into(), port.to_string());
    vars.insert("DEBUG".into(), "true".into());
    let dotenv: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(dir.path().join(".env"), dotenv).expect("write .env");
    let mut dev = Command::new(BIN)
        .arg("dev")
        .current_dir(dir.path())
        .env_clear()
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn dev");
    wait_healthy(
        &format!("http://127.0.0.1:{port}/readyz"),
        Duration::from_secs(10),
    )
    .await;
    let dev_pool = sqlx::PgPool::connect(url.as_str()).await.expect("dev db");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'processed_jobs'",
    )
    .fetch_one(&dev_pool)
    .await
    .expect("count");
    assert_eq!(tables, 1, "dev applied the migrations");
    dev_pool.close().await;
    assert!(terminate(&mut dev).success(), "dev exits 0 on SIGTERM");
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_webhook_reaches_sentry_without_secrets_or_the_message() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let (sentry, seen) = fake_sentry().await;
    let port = free_port().to_string();
    let dsn = format!("http://0123456789abcdef@{sentry}/42");
    let mut serve = env.spawn(&["serve"], &[("PORT", &port), ("SENTRY_DSN", &dsn)]);
    wait_healthy(
        &format!("http://127.0.0.1:{port}/healthz"),
        Duration::from_secs(10),
    )
    .await;
    let body = "MessageSid=SM0123456789abcdef0123456789abcdef&From=%2B14155550100&Body=my+card+is+4111-1111-1111-1111-zq";
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}{}", webhook_path(tenant)))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        .body(body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403);
    assert!(terminate(&mut serve).success());
    let envelopes = seen.lock().map(|v| v.clone()).unwrap_or_default();
    let all = envelopes.join("\n");
    assert!(
        all.contains("invalid_webhook_signature"),
        "the critical security event reached Sentry: {all}"
    );
    for secret in [
        TOKEN,
        "4111-1111-1111-1111-zq",
        "+14155550100",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    ] {
        assert!(!all.contains(secret), "{secret} leaked to Sentry");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_exits_1_when_its_port_is_taken_instead_of_lingering_half_alive() {
    let env = TestEnv::new().await;
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let mut dev = env.spawn(&["dev"], &[("PORT", &port)]);
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = dev.try_wait().expect("status") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = dev.kill();
            panic!("gatehouse dev kept running without its ingress");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(1));
    drop(taken);
    env.cleanup().await;
}

/// The local addresses (as /proc/net/tcp{,6} spell them) of the sockets listening on `port`.
fn listening_addresses(port: u16) -> Vec<String> {
    let port = format!("{port:04X}");
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [_, local, _, state, ..] = fields[..]
                && state == "0A"
                && let Some((ip, p)) = local.split_once(':')
                && p == port
            {
                found.push(ip.to_owned());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_listens_on_loopback_unless_told_otherwise_and_logs_where() {
    let env = TestEnv::new().await;
    let (port, health_port) = (free_port(), free_port());
    let mut dev = Command::new(BIN)
        .arg("dev")
        .env_clear()
        .envs(env.vars.iter())
        .env("DEBUG", "true")
        .env("PORT", port.to_string())
        .env("WORKER_HEALTH_PORT", health_port.to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dev");
    let stderr = dev.stderr.take().expect("stderr");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    wait_healthy(
        &format!("http://127.0.0.1:{port}/healthz"),
        Duration::from_secs(10),
    )
    .await;
    wait_healthy(
        &format!("http://127.0.0.1:{health_port}/healthz"),
        Duration::from_secs(10),
    )
    .await;
    // 127.0.0.1 as /proc/net/tcp spells it; no wildcard (0.0.0.0 or ::) listener.
    assert_eq!(listening_addresses(port), ["0100007F"]);
    assert_eq!(listening_addresses(health_port), ["0100007F"]);
    assert!(terminate(&mut dev).success(), "dev exits 0 on SIGTERM");
    // The process is gone, so the reader reaches the end of its stderr.
    let logged: Vec<String> = lines.iter().collect();
    let serving = format!("127.0.0.1:{port}");
    assert!(
        logged
            .iter()
            .any(|l| l.contains("serving") && l.contains(&serving)),
        "the log names the address: {logged:#?}"
    );
    env.cleanup().await;
}
