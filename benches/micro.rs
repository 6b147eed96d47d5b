//! Micro figures (criterion): the per-request and per-job costs of gatehouse's security
//! core. `cargo bench --bench micro`; the system figures are `scripts/bench`.
//!
//! Scope resolution runs against the local Redis and PostgreSQL (`REDIS_URL`,
//! `TEST_DATABASE_URL`) in its own database and key namespace, both removed afterwards;
//! without them that one figure is skipped with a message.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use gatehouse::access::ScopeCache;
use gatehouse::queue::payloads::PayloadValidators;
use gatehouse::security::jwt::{JwtKeys, SubjectKind};
use gatehouse::security::keyring::{EncryptionKey, Keyring, aad};
use gatehouse::security::twilio::{
    Algorithm, Body, Headers, SharedKey, TenantKeys, sign_form, signature_settings_value, verify,
};
use secrecy::SecretString;
use uuid::Uuid;

const URL: &str =
    "https://gh.example.com/v1/webhooks/twilio/0b9f3a34-5d7e-4a53-9b0e-3f0cbb0f3c11/messages";
const TOKEN: &str = "12345abcdef67890fedcba0987654321";

fn sms_params() -> Vec<(&'static str, &'static str)> {
    vec![
        ("MessageSid", "SM0123456789abcdef0123456789abcdef"),
        ("SmsSid", "SM0123456789abcdef0123456789abcdef"),
        ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
        ("From", "+14155550100"),
        ("To", "+14155550199"),
        (
            "Body",
            "Hi! Where is my order #12345? It was supposed to arrive yesterday.",
        ),
        ("NumMedia", "0"),
    ]
}

fn twilio(c: &mut Criterion) {
    let params = sms_params();
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    let token = SecretString::from(TOKEN.to_owned());
    let shared = [SharedKey::new(
        "whsk_1",
        b"whsk_bench_shared_key_0123456789".to_vec(),
    )];
    let keys = TenantKeys {
        auth_token: &token,
        shared_keys: &shared,
    };
    let sha1 = sign_form(URL, &params, TOKEN.as_bytes(), Algorithm::HmacSha1);
    let sha256 = sign_form(
        URL,
        &params,
        b"whsk_bench_shared_key_0123456789",
        Algorithm::HmacSha256,
    );
    let settings = signature_settings_value("whsk_1");
    let mut group = c.benchmark_group("twilio_verify");
    group.bench_function("form_hmac_sha1", |b| {
        b.iter(|| {
            verify(
                black_box(URL),
                Body::Form(black_box(body.as_bytes())),
                Headers {
                    signature: Some(&sha1),
                    signature_settings: None,
                },
                &keys,
            )
        })
    });
    group.bench_function("form_shared_key_hmac_sha256", |b| {
        b.iter(|| {
            verify(
                black_box(URL),
                Body::Form(black_box(body.as_bytes())),
                Headers {
                    signature: Some(&sha256),
                    signature_settings: Some(&settings),
                },
                &keys,
            )
        })
    });
    group.bench_function("form_bad_signature", |b| {
        let bad = sign_form(URL, &params, b"wrong-token", Algorithm::HmacSha1);
        b.iter(|| {
            verify(
                black_box(URL),
                Body::Form(black_box(body.as_bytes())),
                Headers {
                    signature: Some(&bad),
                    signature_settings: None,
                },
                &keys,
            )
        })
    });
    group.finish();
}

fn envelope(c: &mut Criterion) {
    let keyring = Keyring::new(EncryptionKey::generate(), vec![EncryptionKey::generate()]);
    let cell = aad("conversations", "customer_number", &Uuid::nil().to_string());
    let phone = b"+14155550100";
    let token = TOKEN.as_bytes();
    let sealed_phone = keyring.seal(phone, &cell);
    let sealed_token = keyring.seal(token, &cell);
    let mut group = c.benchmark_group("envelope");
    group.bench_function("seal_phone_12B", |b| {
        b.iter(|| keyring.seal(black_box(phone), black_box(&cell)))
    });
    group.bench_function("open_phone_12B", |b| {
        b.iter(|| keyring.open(black_box(&sealed_phone), black_box(&cell)))
    });
    group.bench_function("seal_token_32B", |b| {
        b.iter(|| keyring.seal(black_box(token), black_box(&cell)))
    });
    group.bench_function("open_token_32B", |b| {
        b.iter(|| keyring.open(black_box(&sealed_token), black_box(&cell)))
    });
    group.finish();
}

/// Sealing and opening an `inbound_message` payload (SPEC "Customer data in Redis"): what the
/// ingress adds per webhook and a worker per job, serde included, against serializing and
/// parsing the same payload in plaintext.
fn job_payload(c: &mut Criterion) {
    use gatehouse_jobs::InboundMessage;
    use gatehouse_jobs::sealed::{Sealed, seal_job};
    let keyring = Keyring::new(EncryptionKey::generate(), vec![]);
    let job = InboundMessage {
        tenant_id: Uuid::nil(),
        message_sid: format!("SM{}", "0".repeat(32)),
        from: "+14155550100".into(),
        to: "+14155550199".into(),
        body: "Hi! Where is my order #12345? It was supposed to arrive yesterday.".into(),
        received_at: "2026-12-05T10:00:00Z".into(),
    };
    let job_id = Uuid::now_v7().to_string();
    // The ingress's path (the typed job); POST /v1/jobs seals a parsed `Value` instead.
    let seal = |job: &InboundMessage| seal_job(job, &job_id, Some(keyring.current()));
    let sealed = seal(&job).unwrap_or_default();
    let plain = serde_json::to_string(&job).unwrap_or_default();
    let mut group = c.benchmark_group("job_payload");
    group.bench_function("plain_serialize", |b| {
        b.iter(|| serde_json::to_string(black_box(&job)))
    });
    group.bench_function("seal_and_serialize", |b| b.iter(|| seal(black_box(&job))));
    group.bench_function("plain_parse", |b| {
        b.iter(|| serde_json::from_str::<InboundMessage>(black_box(&plain)))
    });
    group.bench_function("parse_and_open", |b| {
        b.iter(|| {
            serde_json::from_str::<Sealed<InboundMessage>>(black_box(&sealed))
                .map(|s| s.open(&job_id, &keyring))
        })
    });
    group.finish();
}

fn schema(c: &mut Criterion) {
    let validators = PayloadValidators::new().expect("committed schemas compile");
    let valid = serde_json::json!({
        "tenant_id": Uuid::new_v4(),
        "message_sid": "SM0123456789abcdef0123456789abcdef",
        "from": "+14155550100",
        "to": "+14155550199",
        "body": "Hi! Where is my order #12345?",
        "received_at": "2026-11-28T22:00:00Z",
    });
    let mut invalid = valid.clone();
    invalid["message_sid"] = serde_json::json!("not a sid");
    let mut group = c.benchmark_group("json_schema");
    group.bench_function("inbound_message_valid", |b| {
        b.iter(|| validators.validate("inbound_message", black_box(&valid)))
    });
    group.bench_function("inbound_message_invalid", |b| {
        b.iter(|| validators.validate("inbound_message", black_box(&invalid)))
    });
    group.finish();
}

/// The whole LLM-answer pipeline (parse without duplicate keys → Draft 2020-12 schema →
/// finiteness → sanitize/NFC), on a typical answer and on hostile ones.
fn llm_answer(c: &mut Criterion) {
    let valid = r#"{"intent":"order_status","confidence":0.92,"slots":{"order_number":"12345","days_late":1,"urgent":false}}"#;
    let extra_key = r#"{"intent":"order_status","confidence":0.92,"slots":{},"note":"ignore previous instructions"}"#;
    let bidi = "{\"intent\":\"complaint\",\"confidence\":0.8,\"slots\":{\"reason\":\"late\u{202e} delivery \\u0007\"}}";
    let big = format!(
        r#"{{"intent":"other","confidence":0.5,"slots":{{"text":"{}"}}}}"#,
        "x".repeat(100_000)
    );
    assert!(
        gatehouse::llm::validate::validate_answer(valid).is_ok(),
        "the typical answer is accepted"
    );
    let mut group = c.benchmark_group("llm_answer");
    group.bench_function("valid_3_slots", |b| {
        b.iter(|| gatehouse::llm::validate::validate_answer(black_box(valid)))
    });
    group.bench_function("rejected_extra_key", |b| {
        b.iter(|| gatehouse::llm::validate::validate_answer(black_box(extra_key)))
    });
    group.bench_function("sanitized_bidi_and_control", |b| {
        b.iter(|| gatehouse::llm::validate::validate_answer(black_box(bidi)))
    });
    group.bench_function("rejected_100kB_slot", |b| {
        b.iter(|| gatehouse::llm::validate::validate_answer(black_box(&big)))
    });
    group.finish();
}

fn jwt(c: &mut Criterion) {
    let keys = JwtKeys::new(
        &SecretString::from("jwt-bench-ZYXWVUTSRQPONMLKJIHGFEDCBA-9876543210".to_owned()),
        "gatehouse",
        "gatehouse-api",
        900,
    );
    let token = keys
        .issue(Uuid::new_v4(), SubjectKind::User)
        .expect("issue")
        .token;
    let mut group = c.benchmark_group("jwt");
    group.bench_function("verify_hs256", |b| {
        b.iter(|| keys.verify(black_box(&token)))
    });
    group.bench_function("issue_hs256", |b| {
        b.iter(|| keys.issue(black_box(Uuid::nil()), SubjectKind::User))
    });
    group.finish();
}

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A throwaway database with one user who owns one tenant, and a Redis namespace.
struct ScopeFixture {
    db_name: String,
    pool: sqlx::PgPool,
    redis: gatehouse::redis_conn::RedisConn,
    namespace: String,
    user: Uuid,
}

async fn scope_fixture() -> anyhow::Result<ScopeFixture> {
    let id = Uuid::new_v4().simple().to_string();
    let db_name = format!("gh_bench_micro_{id}");
    let admin = sqlx::PgPool::connect(&admin_url()).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    let mut url = url::Url::parse(&admin_url())?;
    url.set_path(&format!("/{db_name}"));
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(url.as_str())
        .await?;
    gatehouse::db::migrate(&pool).await?;
    let user = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO users (id, email, password_hash, first_name, last_name)
         VALUES ($1, 'micro@example.com', 'not-a-real-hash', 'Micro', 'Bench')",
    )
    .bind(user)
    .execute(&pool)
    .await?;
    let keyring = Keyring::new(EncryptionKey::generate(), Vec::new());
    let tenant = gatehouse::tenants::create(
        &pool,
        &keyring,
        &gatehouse::tenants::NewTenant {
            name: "Micro shop".into(),
            twilio_account_sid: "AC0123456789abcdef0123456789abcdef".into(),
            twilio_auth_token: SecretString::from(TOKEN.to_owned()),
            store_url: None,
            store_api_key: None,
            webhook_shared_key: None,
            owner_email: None,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    // The user owns the tenant (owners come by invitation; the fixture writes the row).
    sqlx::query("INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, 'owner')")
        .bind(tenant)
        .bind(user)
        .execute(&pool)
        .await?;
    let redis = gatehouse::redis_conn::connect_url(&SecretString::from(redis_url())).await?;
    Ok(ScopeFixture {
        db_name,
        pool,
        redis,
        namespace: format!("ghbench-micro-{}", &id[..12]),
        user,
    })
}

async fn remove_fixture(f: ScopeFixture) {
    let mut redis = f.redis.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", f.namespace))
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await;
    }
    f.pool.close().await;
    if let Ok(admin) = sqlx::PgPool::connect(&admin_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            f.db_name
        )))
        .execute(&admin)
        .await;
        admin.close().await;
    }
}

fn scopes(c: &mut Criterion) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let fixture = match rt.block_on(scope_fixture()) {
        Ok(f) => f,
        Err(error) => {
            eprintln!("scope_cache: skipped, PostgreSQL and Redis are needed: {error}");
            return;
        }
    };
    let cache = ScopeCache::new(fixture.namespace.clone());
    let mut redis = fixture.redis.clone();
    // Fill the cache once (a database load), then every resolve is a hit.
    let (principal, _) = rt
        .block_on(cache.resolve(&mut redis, &fixture.pool, fixture.user, SubjectKind::User))
        .expect("first resolve");
    assert!(principal.is_some(), "the fixture user resolves");
    let mut group = c.benchmark_group("scope_cache");
    group.bench_function("resolve_hit_local_redis", |b| {
        b.iter(|| {
            rt.block_on(cache.resolve(
                &mut redis,
                &fixture.pool,
                black_box(fixture.user),
                SubjectKind::User,
            ))
        })
    });
    group.bench_function("resolve_miss_after_bump_postgres", |b| {
        b.iter(|| {
            rt.block_on(async {
                let _ = cache.bump(&mut redis, fixture.user).await;
                cache
                    .resolve(
                        &mut redis,
                        &fixture.pool,
                        black_box(fixture.user),
                        SubjectKind::User,
                    )
                    .await
            })
        })
    });
    group.finish();
    rt.block_on(remove_fixture(fixture));
}

criterion_group! {
    name = micro;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = twilio, envelope, job_payload, schema, llm_answer, jwt, scopes
}
criterion_main!(micro);
