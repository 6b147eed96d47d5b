//! The tests' own scenario helpers over the shared environment (`gatehouse-testenv`): Twilio
//! messages and their signatures, users and logins over the API, and loopback fakes of Sentry
//! and of an endpoint that fails on its own.

use std::net::SocketAddr;
use std::sync::Arc;

use gatehouse::security::twilio::{Algorithm, sign_form};
use gatehouse_testenv::{ACCOUNT_SID, PUBLIC_BASE, TOKEN, TestEnv, TestServer};
use secrecy::SecretString;
use uuid::Uuid;

/// A fresh Twilio-style message SID.
pub fn message_sid() -> String {
    format!("SM{}", Uuid::new_v4().simple())
}

/// An inbound message of `tenant` from `from`, with a fresh `MessageSid`.
pub fn inbound_message(tenant: Uuid, from: &str, body: &str) -> gatehouse_jobs::InboundMessage {
    gatehouse_jobs::InboundMessage {
        tenant_id: tenant,
        message_sid: message_sid(),
        from: from.into(),
        to: "+14155550199".into(),
        body: body.into(),
        received_at: "2026-11-28T10:00:00.123Z".into(),
    }
}

/// The dead letters of `inbound_message` (its first shard).
pub async fn inbound_dead_letters(env: &TestEnv) -> i64 {
    let mut redis = env.redis.clone();
    redis::cmd("ZCARD")
        .arg(format!("{}:{{inbound_message:0}}:dead", env.namespace))
        .query_async(&mut redis)
        .await
        .expect("zcard")
}

/// The form parameters Twilio sends for an inbound SMS.
pub fn sms_params(sid: &str, from: &str, body: &str) -> Vec<(String, String)> {
    vec![
        ("MessageSid".into(), sid.into()),
        ("SmsSid".into(), sid.into()),
        ("AccountSid".into(), ACCOUNT_SID.into()),
        ("From".into(), from.into()),
        ("To".into(), "+14155550199".into()),
        ("Body".into(), body.into()),
        ("NumMedia".into(), "0".into()),
    ]
}

pub fn webhook_path(tenant: Uuid) -> String {
    format!("/v1/webhooks/twilio/{tenant}/messages")
}

/// A signed form request as Twilio would send it (behind a TLS-terminating proxy on loopback).
pub fn signed_form(
    client: &reqwest::Client,
    server: &TestServer,
    tenant: Uuid,
    params: &[(String, String)],
) -> reqwest::RequestBuilder {
    signed_form_with(client, server, tenant, params, TOKEN)
}

/// Like `signed_form`, signed with `token`.
pub fn signed_form_with(
    client: &reqwest::Client,
    server: &TestServer,
    tenant: Uuid,
    params: &[(String, String)],
    token: &str,
) -> reqwest::RequestBuilder {
    signed_form_at(client, &server.url(""), tenant, params, token)
}

/// Like `signed_form_with`, to the ingress at `base` (`http://127.0.0.1:{port}`: a `gatehouse
/// serve` process).
pub fn signed_form_at(
    client: &reqwest::Client,
    base: &str,
    tenant: Uuid,
    params: &[(String, String)],
    token: &str,
) -> reqwest::RequestBuilder {
    let path = webhook_path(tenant);
    let refs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let signature = sign_form(
        &format!("{PUBLIC_BASE}{path}"),
        &refs,
        token.as_bytes(),
        Algorithm::HmacSha1,
    );
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    client
        .post(format!("{base}{path}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", signature)
        .body(body)
}

/// Serves `app` on a fresh loopback port (until the test's runtime ends); its address.
pub async fn serve_loopback(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// A loopback server that plays Sentry: it keeps the body of every envelope it is sent.
pub async fn fake_sentry() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let store = seen.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let store = store.clone();
        async move {
            if let Ok(mut all) = store.lock() {
                all.push(String::from_utf8_lossy(&body).into_owned());
            }
            "{}"
        }
    });
    let addr = serve_loopback(app).await;
    (addr, seen)
}

/// A loopback HTTP server that answers every request with `status` and an empty body (a
/// reachable endpoint failing on its own: its answers count as the job's attempts).
pub async fn answering(status: u16) -> SocketAddr {
    let status = axum::http::StatusCode::from_u16(status).expect("a status code");
    let app = axum::Router::new().fallback(move || async move { status });
    serve_loopback(app).await
}

/// The password of the users the helpers below create.
pub const PASSWORD: &str = "correct horse battery staple";

/// A request as it arrives through the (trusted, loopback) TLS-terminating proxy.
pub fn api(
    http: &reqwest::Client,
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
) -> reqwest::RequestBuilder {
    http.request(method, server.url(path))
        .header("x-forwarded-proto", "https")
}

/// A user with [`PASSWORD`] and an optional platform role.
pub async fn create_user(
    env: &TestEnv,
    email: &str,
    role: Option<gatehouse::access::PlatformRole>,
) -> Uuid {
    gatehouse::accounts::create_user(
        &env.pool,
        &gatehouse::security::password::Hasher::owasp(),
        gatehouse::accounts::NewUser {
            email: email.into(),
            password: SecretString::from(PASSWORD),
            first_name: "Test".into(),
            last_name: "User".into(),
            platform_role: role,
        },
    )
    .await
    .expect("user created")
}

/// Logs `email` in with [`PASSWORD`] (asserting 200); its access token.
pub async fn login(http: &reqwest::Client, server: &TestServer, email: &str) -> String {
    let r = api(http, server, reqwest::Method::POST, "/v1/auth/login")
        .json(&serde_json::json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200, "login of {email}");
    let body: serde_json::Value = r.json().await.expect("json");
    body["access_token"].as_str().expect("token").to_owned()
}

/// Makes `user` a member of `tenant` with `role` (straight in the database).
pub async fn add_member(
    env: &TestEnv,
    tenant: Uuid,
    user: Uuid,
    role: gatehouse::access::TenantRole,
) {
    sqlx::query("INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, $3)")
        .bind(tenant)
        .bind(user)
        .bind(role.as_str())
        .execute(&env.pool)
        .await
        .expect("membership");
}

/// A service account with `scopes` (straight in the database) and its access token from the
/// ingress at `base` (`server.url("")`, or a `gatehouse serve` process's address).
pub async fn service_token(env: &TestEnv, base: &str, scopes: &[&str]) -> String {
    use secrecy::ExposeSecret;
    let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
    let creds = gatehouse::accounts::create_service_account(
        &env.pool,
        &gatehouse::security::password::Hasher::owasp(),
        "producer",
        &scopes,
    )
    .await
    .expect("service account");
    let r = gatehouse_testenv::client()
        .post(format!("{base}/v1/auth/token"))
        .header("x-forwarded-proto", "https")
        .json(&serde_json::json!({"client_id": creds.client_id, "client_secret": creds.client_secret.expose_secret()}))
        .send()
        .await
        .expect("token");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    body["access_token"].as_str().expect("token").to_owned()
}

/// Runs `gatehouse ARGS` with the test's environment and no stdin; its exit code and stdout.
pub fn cli(env: &TestEnv, args: &[&str]) -> (i32, String) {
    let out = gatehouse_testenv::run_cli(args, &env.vars, "");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The address a URL points at (a loopback server of the test machine).
pub fn address_of(url: &str) -> std::net::SocketAddr {
    let url = url::Url::parse(url).expect("a URL");
    format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5432)
    )
    .parse()
    .expect("the server is on an IP address")
}
