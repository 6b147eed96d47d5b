//! Figure 8: hostile traffic against the real `gatehouse serve` and one `gatehouse work` (the
//! release binaries next to this one), with a fake Sentry on 127.0.0.1 counting envelopes.
//!
//! Each run has five phases, each on freshly started processes and an emptied namespace: a
//! baseline (the legitimate mix alone), a forged-webhook flood from one IP, the same flood
//! from 2,000 IPs, a flood of concurrent wrong-password logins from 2,000 IPs, and the floor:
//! as many `GET /healthz` at the first flood's rate (what any flood of that rate costs the
//! genuine traffic, with no work behind it). Beside every
//! phase runs the same legitimate mix, paced (open loop): Twilio's signed webhooks for the real
//! tenant, each from one of Twilio's addresses; users logging in with the right password at a
//! human pace, each from an address of its own; producers enqueueing `inbound_message` jobs
//! within their limit; `/healthz` probes. Client addresses are claimed with `X-Forwarded-For`
//! (the processes trust `127.0.0.0/8`). Every answer is tallied by status: the harness makes
//! no assumption about which codes the server gives.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use gatehouse::security::twilio::{Algorithm, sign_form};
use secrecy::{ExposeSecret as _, SecretString};
use uuid::Uuid;

use crate::env::{self, ACCOUNT_SID, BenchEnv, PUBLIC_BASE, TWILIO_TOKEN};
use crate::load::{Prepared, percentile};

/// Sizes and pace of the figure.
#[derive(Debug, Clone, Copy)]
pub struct FloodPlan {
    /// Forged webhooks per forged flood.
    pub forged: usize,
    /// Forged webhooks in flight at once.
    pub forged_concurrency: usize,
    /// Wrong-password logins of the login flood, all sent at once.
    pub logins: usize,
    /// Distinct attacker addresses of the "many IPs" floods.
    pub attacker_ips: usize,
    /// Genuine signed webhooks per second (paced, open loop).
    pub webhooks_per_s: f64,
    /// `/healthz` probes per second (paced, open loop).
    pub healthz_per_s: f64,
    /// Legitimate users, each logging in every `user_interval` from its own address.
    pub users: usize,
    pub user_interval: Duration,
    /// Producers (service accounts), each enqueueing a job every `producer_interval`.
    pub producers: usize,
    pub producer_interval: Duration,
    /// The legitimate mix runs this long before a flood starts (or the baseline's clock).
    pub warmup: Duration,
    /// The baseline phase's measured window.
    pub baseline_window: Duration,
    /// A flood's window lasts until its last answer, and at least this long.
    pub min_window: Duration,
    /// No phase's window lasts longer than this (the flood is abandoned, and says so).
    pub cap: Duration,
    /// Client timeout of every request (the server's own request timeout is 30 s).
    pub request_timeout: Duration,
}

impl FloodPlan {
    pub fn full() -> Self {
        Self {
            forged: 20_000,
            forged_concurrency: 64,
            logins: 2_000,
            attacker_ips: 2_000,
            webhooks_per_s: 200.0,
            healthz_per_s: 20.0,
            users: 50,
            user_interval: Duration::from_secs(10),
            producers: 5,
            producer_interval: Duration::from_secs(2),
            warmup: Duration::from_secs(2),
            baseline_window: Duration::from_secs(10),
            min_window: Duration::from_secs(5),
            cap: Duration::from_secs(180),
            request_timeout: Duration::from_secs(60),
        }
    }

    pub fn smoke() -> Self {
        Self {
            forged: 200,
            forged_concurrency: 16,
            logins: 50,
            attacker_ips: 50,
            webhooks_per_s: 50.0,
            healthz_per_s: 10.0,
            users: 4,
            user_interval: Duration::from_secs(1),
            producers: 2,
            producer_interval: Duration::from_millis(500),
            warmup: Duration::from_millis(300),
            baseline_window: Duration::from_secs(1),
            min_window: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            request_timeout: Duration::from_secs(40),
        }
    }
}

/// The phases of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Baseline,
    ForgedOneIp,
    ForgedManyIps,
    Logins,
    /// The floor: as many requests as the forged floods, at the rate the same run's forged
    /// flood from 1 IP reached and at most as many in flight, but `GET /healthz` (no work at
    /// all): what is left is the flood's transport and the load generator's own CPU.
    HealthzFlood,
}

impl Phase {
    pub const FLOODS: [Phase; 4] = [
        Phase::ForgedOneIp,
        Phase::ForgedManyIps,
        Phase::Logins,
        Phase::HealthzFlood,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Phase::Baseline => "no flood",
            Phase::ForgedOneIp => "forged webhooks from 1 IP",
            Phase::ForgedManyIps => "forged webhooks from many IPs",
            Phase::Logins => "wrong-password logins from many IPs",
            Phase::HealthzFlood => "a /healthz flood from 1 IP (the floor)",
        }
    }

    /// A short name for the table.
    pub fn short(self) -> &'static str {
        match self {
            Phase::Baseline => "baseline",
            Phase::ForgedOneIp => "forged flood, 1 IP",
            Phase::ForgedManyIps => "forged flood, many IPs",
            Phase::Logins => "login flood",
            Phase::HealthzFlood => "/healthz flood (floor)",
        }
    }
}

/// The single attacker of the one-IP flood (TEST-NET-3).
const ONE_ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 66));

/// The attackers of the many-IPs floods: 90 % IPv4 (172.16/12), then IPv6 (documentation
/// prefix): half of those each in a /64 of its own, half sharing one /64.
pub fn attacker_ips(n: usize) -> Vec<IpAddr> {
    let v6 = (n / 10).max(2).min(n);
    let v4 = n - v6;
    let base = u32::from(Ipv4Addr::new(172, 16, 0, 1));
    let mut ips: Vec<IpAddr> = (0..v4)
        .map(|i| IpAddr::V4(Ipv4Addr::from(base + i as u32)))
        .collect();
    for i in 0..v6 {
        let i = i as u16;
        ips.push(IpAddr::V6(if usize::from(i) < v6 / 2 {
            Ipv6Addr::new(0x2001, 0xdb8, 0xbad, i, 0, 0, 0, 1)
        } else {
            Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0xffff, 0, 0, 0, i + 1)
        }));
    }
    ips
}

/// Twilio's webhook addresses (one of its published ranges), round robin.
pub(crate) fn twilio_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        54,
        172,
        60 + ((i / 256) % 2) as u8,
        (i % 256) as u8,
    ))
}

/// User `i`'s own address: TEST-NET-2, every fifth user on IPv6 in a /64 of its own.
fn user_ip(i: usize) -> IpAddr {
    if i % 5 == 4 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xface, i as u16, 0, 0, 0, 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i % 250 + 1) as u8))
    }
}

fn producer_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, (i % 240 + 10) as u8))
}

const USER_PASSWORD: &str = "bench user password, correct 7";
const VICTIM_EMAIL: &str = "victim@bench.example.com";

/// The accounts the legitimate mix uses (created once per invocation).
pub struct Fixture {
    tenant: Uuid,
    users: Vec<String>,
    producers: Vec<(String, SecretString)>,
}

/// Creates the users, the victim of the one-email login flood and the producers.
pub async fn prepare(env: &BenchEnv, tenant: Uuid, plan: &FloodPlan) -> anyhow::Result<Fixture> {
    let hasher = gatehouse::security::password::Hasher::owasp();
    let mut emails: Vec<String> = (0..plan.users)
        .map(|i| format!("user{i}@bench.example.com"))
        .collect();
    emails.push(VICTIM_EMAIL.to_owned());
    let created = futures::stream::iter(emails.iter().cloned())
        .map(|email| {
            let hasher = hasher.clone();
            async move {
                gatehouse::accounts::create_user(
                    &env.pool,
                    &hasher,
                    gatehouse::accounts::NewUser {
                        email: email.clone(),
                        password: SecretString::from(USER_PASSWORD.to_owned()),
                        first_name: "Bench".into(),
                        last_name: "User".into(),
                        platform_role: None,
                    },
                )
                .await
                .map_err(|e| anyhow::anyhow!("failed to create user {email}: {e}"))
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    for result in created {
        result?;
    }
    emails.pop();
    let mut producers = Vec::new();
    for i in 0..plan.producers {
        let creds = gatehouse::accounts::create_service_account(
            &env.pool,
            &hasher,
            &format!("bench producer {i}"),
            &["jobs:enqueue".to_owned()],
        )
        .await
        .map_err(|e| anyhow::anyhow!("failed to create a service account: {e}"))?;
        producers.push((creds.client_id, creds.client_secret));
    }
    Ok(Fixture {
        tenant,
        users: emails,
        producers,
    })
}

/// A loopback server that plays Sentry: counts the envelopes it is sent.
pub struct FakeSentry {
    pub dsn: String,
    envelopes: Arc<AtomicU64>,
    events: Arc<AtomicU64>,
}

impl FakeSentry {
    pub async fn start() -> anyhow::Result<Self> {
        let envelopes = Arc::new(AtomicU64::new(0));
        let events = Arc::new(AtomicU64::new(0));
        let (e, v) = (envelopes.clone(), events.clone());
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let (e, v) = (e.clone(), v.clone());
            async move {
                e.fetch_add(1, Ordering::Relaxed);
                let text = String::from_utf8_lossy(&body);
                let items = text.matches("\"type\":\"event\"").count() as u64;
                v.fetch_add(items, Ordering::Relaxed);
                "{}"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot listen for the fake Sentry")?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            dsn: format!("http://0123456789abcdef0123456789abcdef@{addr}/1"),
            envelopes,
            events,
        })
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.envelopes.load(Ordering::Relaxed),
            self.events.load(Ordering::Relaxed),
        )
    }

    /// Waits until no envelope has arrived for half a second (at most `within`).
    async fn settle(&self, within: Duration) -> (u64, u64) {
        let start = Instant::now();
        let mut last = self.counts();
        let mut quiet_since = Instant::now();
        while start.elapsed() < within {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.counts();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(500) {
                break;
            }
        }
        last
    }
}

/// What kind of legitimate request a sample is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Legit {
    Webhook,
    Login,
    Token,
    Enqueue,
    Healthz,
}

impl Legit {
    fn name(self) -> &'static str {
        match self {
            Legit::Webhook => "signed webhook",
            Legit::Login => "user login",
            Legit::Token => "producer token",
            Legit::Enqueue => "producer enqueue",
            Legit::Healthz => "/healthz",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    kind: Legit,
    sent: Instant,
    micros: u32,
    /// `None`: no answer (connection error or client timeout).
    status: Option<u16>,
}

type Samples = Arc<Mutex<Vec<Sample>>>;

fn status_name(status: Option<u16>) -> String {
    status.map_or_else(|| "no answer".to_owned(), |s| s.to_string())
}

/// Sends one prepared request and tells its status and latency.
pub(crate) async fn send(
    client: &reqwest::Client,
    base: &str,
    request: &Prepared,
) -> (Option<u16>, u32) {
    let url = format!("{base}{}", request.path);
    let mut builder = if request.post {
        client.post(url).body(request.body.clone())
    } else {
        client.get(url)
    };
    for (name, value) in &request.headers {
        builder = builder.header(*name, value);
    }
    let sent = Instant::now();
    let status = match builder.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            Some(status)
        }
        Err(_) => None,
    };
    let micros = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
    (status, micros)
}

fn record(samples: &Samples, kind: Legit, sent: Instant, status: Option<u16>, micros: u32) {
    if let Ok(mut all) = samples.lock() {
        all.push(Sample {
            kind,
            sent,
            micros,
            status,
        });
    }
}

pub(crate) fn proxied(mut request: Prepared, ip: IpAddr) -> Prepared {
    request.headers.push(("x-forwarded-for", ip.to_string()));
    request
}

fn form_request(path: String, params: &[(&str, &str)], signature: String) -> Prepared {
    Prepared {
        post: true,
        path,
        headers: vec![
            (
                "content-type",
                "application/x-www-form-urlencoded".to_owned(),
            ),
            ("x-forwarded-proto", "https".to_owned()),
            ("x-twilio-signature", signature),
        ],
        body: form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params.iter())
            .finish(),
    }
}

/// A webhook for `tenant` signed with `token` (the tenant's own token makes a genuine one).
fn webhook(tenant: Uuid, token: &str, i: usize) -> Prepared {
    signed_webhook(tenant, token, i, &format!("SM{}", Uuid::new_v4().simple()))
}

/// [`webhook`] with the `MessageSid` given (the outage drill counts the rows of its own).
pub(crate) fn signed_webhook(tenant: Uuid, token: &str, i: usize, sid: &str) -> Prepared {
    let path = format!("/v1/webhooks/twilio/{tenant}/messages");
    let url = format!("{PUBLIC_BASE}{path}");
    let from = format!("+1415555{:04}", i % 200);
    let params = [
        ("MessageSid", sid),
        ("SmsSid", sid),
        ("AccountSid", ACCOUNT_SID),
        ("From", from.as_str()),
        ("To", "+14155550199"),
        ("Body", "Hi! Where is my order #12345?"),
        ("NumMedia", "0"),
    ];
    let signature = sign_form(&url, &params, token.as_bytes(), Algorithm::HmacSha1);
    form_request(path, &params, signature)
}

fn json_post(path: &str, body: String) -> Prepared {
    Prepared {
        post: true,
        path: path.to_owned(),
        headers: vec![
            ("content-type", "application/json".to_owned()),
            ("x-forwarded-proto", "https".to_owned()),
        ],
        body,
    }
}

fn login(email: &str, password: &str) -> Prepared {
    json_post(
        "/v1/auth/login",
        serde_json::json!({"email": email, "password": password}).to_string(),
    )
}

/// The flood of a phase: forged webhooks (half a wrong signature for the real tenant, half
/// random unknown tenant ids) or wrong-password logins (half one existing user's email, half
/// distinct unknown emails).
fn flood_requests(phase: Phase, tenant: Uuid, plan: &FloodPlan) -> Vec<Prepared> {
    let ips = attacker_ips(plan.attacker_ips);
    let ip = |i: usize| match phase {
        Phase::ForgedOneIp | Phase::HealthzFlood => ONE_ATTACKER,
        _ => ips[i % ips.len()],
    };
    match phase {
        Phase::Baseline => Vec::new(),
        // Paced at the same run's forged flood from 1 IP's rate (see run_phase).
        Phase::HealthzFlood => Vec::new(),
        Phase::ForgedOneIp | Phase::ForgedManyIps => (0..plan.forged)
            .map(|i| {
                let forged = if i % 2 == 0 {
                    webhook(tenant, "not-the-tenant-token-0123456789ab", i)
                } else {
                    webhook(Uuid::new_v4(), TWILIO_TOKEN, i)
                };
                proxied(forged, ip(i))
            })
            .collect(),
        Phase::Logins => (0..plan.logins)
            .map(|i| {
                let attempt = if i % 2 == 0 {
                    login(VICTIM_EMAIL, &format!("guess-{i}-wrong"))
                } else {
                    login(
                        &format!("nobody{i}@bench.example.com"),
                        &format!("guess-{i}-wrong"),
                    )
                };
                proxied(attempt, ip(i))
            })
            .collect(),
    }
}

/// Sends `requests` with `concurrency` in flight until `deadline`; answers by status, and
/// whether the deadline came first (the rest is abandoned).
async fn flood(
    client: &reqwest::Client,
    base: &str,
    requests: impl Iterator<Item = Prepared>,
    concurrency: usize,
    deadline: tokio::time::Instant,
) -> (BTreeMap<String, u64>, bool) {
    let mut answers = BTreeMap::new();
    let mut results = futures::stream::iter(requests)
        .map(|request| async move { send(client, base, &request).await.0 })
        .buffer_unordered(concurrency.max(1));
    loop {
        match tokio::time::timeout_at(deadline, results.next()).await {
            Ok(Some(status)) => *answers.entry(status_name(status)).or_insert(0) += 1,
            Ok(None) => return (answers, false),
            Err(_) => return (answers, true),
        }
    }
}

/// Sends `count` copies of `request` at `rate` per second (open loop), at most `concurrency`
/// in flight (past that it waits), until `deadline`; answers by status.
async fn paced_flood(
    client: &reqwest::Client,
    base: &str,
    request: Prepared,
    count: usize,
    rate: f64,
    concurrency: usize,
    deadline: tokio::time::Instant,
) -> BTreeMap<String, u64> {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let request = Arc::new(request);
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let at = start + period.mul_f64(i as f64);
        if at >= deadline {
            break;
        }
        tokio::time::sleep_until(at).await;
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (client, base, request) = (client.clone(), base.to_owned(), request.clone());
        tasks.spawn(async move {
            let (status, _) = send(&client, &base, &request).await;
            drop(permit);
            status
        });
    }
    let mut answers = BTreeMap::new();
    while let Some(status) = tasks.join_next().await {
        if let Ok(status) = status {
            *answers.entry(status_name(status)).or_insert(0) += 1;
        }
    }
    answers
}

/// Calls `make(i)` every `1/rate` seconds until `stop`, each request in its own task (open
/// loop: a slow answer never delays the next request); at most `max_in_flight` at once, the
/// rest counted as skipped.
#[allow(clippy::too_many_arguments)]
async fn paced<F>(
    client: reqwest::Client,
    base: String,
    rate: f64,
    kind: Legit,
    stop: Arc<AtomicBool>,
    samples: Samples,
    skipped: Arc<AtomicU64>,
    mut make: F,
) where
    F: FnMut(usize) -> Prepared + Send + 'static,
{
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(4096));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(start + period * i as u32).await;
        let request = make(i);
        i += 1;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (client, base, samples) = (client.clone(), base.clone(), samples.clone());
        tasks.spawn(async move {
            let sent = Instant::now();
            let (status, micros) = send(&client, &base, &request).await;
            record(&samples, kind, sent, status, micros);
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// A user logging in with the right password every `interval` from its own address.
#[allow(clippy::too_many_arguments)]
async fn user(
    client: reqwest::Client,
    base: String,
    email: String,
    ip: IpAddr,
    offset: Duration,
    interval: Duration,
    stop: Arc<AtomicBool>,
    samples: Samples,
) {
    tokio::time::sleep(offset).await;
    while !stop.load(Ordering::Relaxed) {
        let next = tokio::time::Instant::now() + interval;
        let request = proxied(login(&email, USER_PASSWORD), ip);
        let sent = Instant::now();
        let (status, micros) = send(&client, &base, &request).await;
        record(&samples, Legit::Login, sent, status, micros);
        tokio::time::sleep_until(next).await;
    }
}

/// A producer: one token from `/v1/auth/token`, then one job every `interval`.
#[allow(clippy::too_many_arguments)]
async fn producer(
    client: reqwest::Client,
    base: String,
    tenant: Uuid,
    credentials: (String, SecretString),
    ip: IpAddr,
    offset: Duration,
    interval: Duration,
    stop: Arc<AtomicBool>,
    samples: Samples,
) {
    tokio::time::sleep(offset).await;
    let request = proxied(
        json_post(
            "/v1/auth/token",
            serde_json::json!({
                "client_id": credentials.0,
                "client_secret": credentials.1.expose_secret(),
            })
            .to_string(),
        ),
        ip,
    );
    // The token's answer is read here (not through `send`), and counted alike.
    let mut token = None;
    while token.is_none() && !stop.load(Ordering::Relaxed) {
        let mut builder = client.post(format!("{base}{}", request.path));
        for (name, value) in &request.headers {
            builder = builder.header(*name, value);
        }
        let sent = Instant::now();
        let (status, body) = match builder.body(request.body.clone()).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (Some(status), r.json::<serde_json::Value>().await.ok())
            }
            Err(_) => (None, None),
        };
        let micros = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
        record(&samples, Legit::Token, sent, status, micros);
        token = body
            .as_ref()
            .and_then(|b| b["access_token"].as_str())
            .map(str::to_owned);
        if token.is_none() {
            tokio::time::sleep(interval).await;
        }
    }
    let Some(token) = token else { return };
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let next = tokio::time::Instant::now() + interval;
        let mut request = proxied(
            json_post(
                "/v1/jobs/inbound_message",
                serde_json::json!({
                    "tenant_id": tenant,
                    "message_sid": format!("SM{}", Uuid::new_v4().simple()),
                    "from": format!("+1415666{:04}", i % 100),
                    "to": "+14155550199",
                    "body": "Where is my order?",
                    "received_at": "2026-11-28T10:00:00Z",
                })
                .to_string(),
            ),
            ip,
        );
        request
            .headers
            .push(("authorization", format!("Bearer {token}")));
        let sent = Instant::now();
        let (status, micros) = send(&client, &base, &request).await;
        record(&samples, Legit::Enqueue, sent, status, micros);
        i += 1;
        tokio::time::sleep_until(next).await;
    }
}

/// Keys of the namespace by kind: the queues' own keys (webhook dedupe tombstones among them)
/// and an older release's dedupe keys (the legitimate traffic's payload), and the rest by their
/// first segment (`rl:<limit>` for rate limits).
async fn key_census(env: &BenchEnv) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut redis = env.redis.clone();
    let prefix = format!("{}:", env.namespace);
    let mut census = BTreeMap::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut redis)
            .await?;
        for key in keys {
            let rest = key.strip_prefix(&prefix).unwrap_or(&key);
            let mut parts = rest.split(':');
            // A hash tag (`{events:…}`, the security-event budgets) names its kind too.
            let first = parts.next().unwrap_or_default().trim_start_matches('{');
            let kind = if gatehouse_jobs::QUEUES.contains(&first) {
                "queue".to_owned()
            } else if first == "rl" {
                format!("rl:{}", parts.next().unwrap_or_default())
            } else {
                first.to_owned()
            };
            *census.entry(kind).or_insert(0) += 1;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(census)
}

/// Key kinds that scale with the legitimate traffic's volume, not with a flood.
fn legit_payload_key(kind: &str) -> bool {
    kind == "queue" || kind == "dedupe"
}

async fn rows_by_type(env: &BenchEnv) -> anyhow::Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT type, count(*) FROM security_events GROUP BY type")
            .fetch_all(&env.pool)
            .await?;
    Ok(rows.into_iter().collect())
}

fn diff(after: &BTreeMap<String, i64>, before: &BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0);
        if d != 0 {
            out.insert(k.clone(), d);
        }
    }
    for (k, v) in before {
        if !after.contains_key(k) {
            out.insert(k.clone(), -v);
        }
    }
    out
}

/// Latency quantiles of a set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn latency<'a>(samples: impl Iterator<Item = &'a Sample>) -> Latency {
    let mut micros: Vec<u32> = samples.map(|s| s.micros).collect();
    micros.sort_unstable();
    Latency {
        n: micros.len(),
        p50_ms: percentile(&micros, 0.50),
        p99_ms: percentile(&micros, 0.99),
    }
}

/// One phase's measurements.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    pub phase: Phase,
    /// Genuine webhooks sent within the window (the flood, or the baseline's clock).
    pub webhook: Latency,
    pub healthz: Latency,
    /// `/healthz` probes over the phase that got no 200.
    pub healthz_failed: u64,
    /// Requests of the flood and their answers by status.
    pub flood_sent: u64,
    pub flood_answers: BTreeMap<String, u64>,
    pub flood_seconds: f64,
    /// Whether the flood had not finished at the cap (then abandoned).
    pub flood_capped: bool,
    /// `security_events` rows added over the phase, by type.
    pub rows: BTreeMap<String, i64>,
    /// Namespace keys added over the phase, by kind.
    pub keys: BTreeMap<String, i64>,
    /// Sentry envelopes (and event items in them) received over the phase.
    pub sentry_envelopes: u64,
    pub sentry_events: u64,
    /// Legitimate requests (webhooks, logins, tokens, enqueues) sent, and refused (non-2xx or
    /// no answer), by kind and status.
    pub legit_sent: u64,
    pub legit_refused: BTreeMap<String, u64>,
    /// Legitimate requests per kind.
    pub legit_by_kind: BTreeMap<String, u64>,
    /// Paced requests not sent because 4,096 of their kind were already in flight.
    pub skipped: u64,
    /// Both processes still running when the phase ended.
    pub server_up: bool,
    /// Log lines (and bytes) both processes wrote over the phase (`RUST_LOG=warn`, JSON).
    pub log_lines: u64,
    pub log_bytes: u64,
}

impl PhaseResult {
    pub fn rows_added(&self) -> i64 {
        self.rows.values().sum()
    }

    /// Keys added that do not scale with the legitimate traffic's volume.
    pub fn keys_added(&self) -> i64 {
        self.keys
            .iter()
            .filter(|(k, _)| !legit_payload_key(k))
            .map(|(_, v)| v)
            .sum()
    }

    pub fn refused(&self) -> u64 {
        self.legit_refused.values().sum()
    }

    pub fn refused_share(&self) -> f64 {
        self.refused() as f64 / self.legit_sent.max(1) as f64
    }

    pub fn flood_count(&self) -> u64 {
        self.flood_sent
    }
}

pub(crate) fn client(pool: usize, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    Ok(gatehouse_testenv::client_builder()
        .pool_max_idle_per_host(pool)
        .timeout(timeout)
        .build()?)
}

/// `gatehouse serve` and `gatehouse work`, stopped (SIGTERM, then SIGKILL after 20 s) on drop.
struct Processes {
    serve: Option<std::process::Child>,
    work: Option<std::process::Child>,
}

impl Processes {
    fn running(&mut self) -> bool {
        [&mut self.serve, &mut self.work]
            .into_iter()
            .all(|c| c.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))))
    }

    /// SIGTERM to both, waiting off the runtime (the fake Sentry must keep answering while
    /// the processes flush their last events).
    async fn stop(&mut self) {
        let children: Vec<std::process::Child> = [self.serve.take(), self.work.take()]
            .into_iter()
            .flatten()
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for mut child in children {
                env::terminate(&mut child);
            }
        })
        .await;
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in [self.serve.as_mut(), self.work.as_mut()]
            .into_iter()
            .flatten()
        {
            env::kill(child);
        }
    }
}

/// One phase on fresh processes and an emptied namespace. `floor` is how long the
/// `/healthz` flood's requests are spread over (the same run's forged flood from 1 IP's
/// duration).
pub async fn run_phase(
    env: &BenchEnv,
    fixture: &Fixture,
    sentry: &FakeSentry,
    phase: Phase,
    plan: &FloodPlan,
    floor: Duration,
) -> anyhow::Result<PhaseResult> {
    env.clear_namespace().await?;
    let port = gatehouse_testenv::try_free_port()?.to_string();
    let common: Vec<(&str, &str)> = vec![
        ("TRUSTED_PROXIES", "127.0.0.0/8"),
        ("SENTRY_DSN", sentry.dsn.as_str()),
        // The defaults, explicitly (the login figure raises them for its own purpose).
        ("RATE_LIMIT_LOGIN_IP", "10/m"),
        ("RATE_LIMIT_LOGIN_EMAIL", "5/h"),
        ("RATE_LIMIT_USER", "100/h"),
    ];
    let mut serve_env = common.clone();
    serve_env.push(("PORT", port.as_str()));
    // Their logs go to a file, as to a log collector: the lines a flood makes are part of its
    // cost (counted below), and would drown the harness's own output.
    let log_path = std::env::temp_dir().join(format!(
        "gatehouse-bench-flood-{}-{}.log",
        std::process::id(),
        Uuid::new_v4().simple()
    ));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut processes = Processes {
        serve: Some(env.gatehouse_logging_to(&["serve"], &serve_env, log.try_clone()?.into())?),
        work: None,
    };
    processes.work = Some(env.gatehouse_logging_to(&["work"], &common, log.into())?);
    let base = format!("http://127.0.0.1:{port}");
    let probe = client(1, Duration::from_secs(2))?;
    let health = format!("{base}/healthz");
    let up = env::wait_until(Duration::from_secs(30), || {
        let request = probe.get(&health).send();
        async move { request.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    if !up {
        processes.stop().await;
        let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = std::fs::remove_file(&log_path);
        anyhow::bail!(
            "gatehouse serve did not answer /healthz within 30 s; its log:\n{}",
            tail.lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let log_at_start = std::fs::metadata(&log_path).map_or(0, |m| m.len());

    let rows_before = rows_by_type(env).await?;
    let keys_before = key_census(env).await?;
    let sentry_before = sentry.counts();

    let legit = client(512, plan.request_timeout)?;
    let samples: Samples = Arc::new(Mutex::new(Vec::new()));
    let skipped = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut mix = tokio::task::JoinSet::new();
    let tenant = fixture.tenant;
    mix.spawn(paced(
        legit.clone(),
        base.clone(),
        plan.webhooks_per_s,
        Legit::Webhook,
        stop.clone(),
        samples.clone(),
        skipped.clone(),
        move |i| proxied(webhook(tenant, TWILIO_TOKEN, i), twilio_ip(i)),
    ));
    mix.spawn(paced(
        legit.clone(),
        base.clone(),
        plan.healthz_per_s,
        Legit::Healthz,
        stop.clone(),
        samples.clone(),
        skipped.clone(),
        |_| Prepared::get("/healthz"),
    ));
    let spread = |i: usize, n: usize, over: Duration| over.mul_f64(i as f64 / n.max(1) as f64);
    for (i, email) in fixture.users.iter().enumerate() {
        mix.spawn(user(
            legit.clone(),
            base.clone(),
            email.clone(),
            user_ip(i),
            spread(i, fixture.users.len(), plan.user_interval),
            plan.user_interval,
            stop.clone(),
            samples.clone(),
        ));
    }
    for (i, credentials) in fixture.producers.iter().enumerate() {
        mix.spawn(producer(
            legit.clone(),
            base.clone(),
            tenant,
            credentials.clone(),
            producer_ip(i),
            spread(i, fixture.producers.len(), plan.producer_interval),
            plan.producer_interval,
            stop.clone(),
            samples.clone(),
        ));
    }
    let requests = flood_requests(phase, tenant, plan);
    tokio::time::sleep(plan.warmup).await;

    let window_start = Instant::now();
    let mut flood_sent = requests.len() as u64;
    let concurrency = match phase {
        Phase::Logins => requests.len(),
        _ => plan.forged_concurrency,
    };
    let attacker = client(concurrency, plan.request_timeout)?;
    let (flood_answers, flood_capped) = match phase {
        Phase::Baseline => {
            tokio::time::sleep(plan.baseline_window).await;
            (BTreeMap::new(), false)
        }
        Phase::HealthzFlood => {
            let deadline = tokio::time::Instant::now() + plan.cap;
            let rate = plan.forged as f64 / floor.as_secs_f64().max(0.001);
            let answers = paced_flood(
                &attacker,
                &base,
                proxied(Prepared::get("/healthz"), ONE_ATTACKER),
                plan.forged,
                rate,
                concurrency,
                deadline,
            )
            .await;
            flood_sent = answers.values().sum();
            (answers, false)
        }
        _ => {
            let deadline = tokio::time::Instant::now() + plan.cap;
            flood(
                &attacker,
                &base,
                requests.into_iter(),
                concurrency,
                deadline,
            )
            .await
        }
    };
    let flood_seconds = window_start.elapsed().as_secs_f64();
    let min = if phase == Phase::Baseline {
        plan.baseline_window
    } else {
        plan.min_window
    };
    if window_start.elapsed() < min {
        tokio::time::sleep(min - window_start.elapsed()).await;
    }
    let window_end = Instant::now();
    let server_up = processes.running();
    stop.store(true, Ordering::Relaxed);
    while mix.join_next().await.is_some() {}

    processes.stop().await;
    let (envelopes, events) = sentry.settle(Duration::from_secs(10)).await;
    let (log_lines, log_bytes) = match std::fs::read(&log_path) {
        Ok(all) => {
            let added = all.get(log_at_start as usize..).unwrap_or_default();
            (
                added.iter().filter(|b| **b == b'\n').count() as u64,
                added.len() as u64,
            )
        }
        Err(_) => (0, 0),
    };
    let _ = std::fs::remove_file(&log_path);
    let rows = diff(&rows_by_type(env).await?, &rows_before);
    let keys = diff(&key_census(env).await?, &keys_before);

    let samples = samples
        .lock()
        .map(|s| s.clone())
        .map_err(|_| anyhow::anyhow!("a sample recorder panicked"))?;
    let in_window = |s: &&Sample| s.sent >= window_start && s.sent <= window_end;
    let webhook_latency = latency(
        samples
            .iter()
            .filter(|s| s.kind == Legit::Webhook)
            .filter(in_window),
    );
    let healthz = latency(
        samples
            .iter()
            .filter(|s| s.kind == Legit::Healthz)
            .filter(in_window),
    );
    let healthz_failed = samples
        .iter()
        .filter(|s| s.kind == Legit::Healthz && s.status != Some(200))
        .count() as u64;
    let mut legit_sent = 0;
    let mut legit_refused = BTreeMap::new();
    let mut legit_by_kind = BTreeMap::new();
    for s in samples.iter().filter(|s| s.kind != Legit::Healthz) {
        legit_sent += 1;
        *legit_by_kind.entry(s.kind.name().to_owned()).or_insert(0) += 1;
        if !s.status.is_some_and(|c| (200..300).contains(&c)) {
            *legit_refused
                .entry(format!("{} {}", s.kind.name(), status_name(s.status)))
                .or_insert(0) += 1;
        }
    }
    Ok(PhaseResult {
        phase,
        webhook: webhook_latency,
        healthz,
        healthz_failed,
        flood_sent,
        flood_answers,
        flood_seconds,
        flood_capped,
        rows,
        keys,
        sentry_envelopes: envelopes - sentry_before.0,
        sentry_events: events - sentry_before.1,
        legit_sent,
        legit_refused,
        legit_by_kind,
        skipped: skipped.load(Ordering::Relaxed),
        server_up,
        log_lines,
        log_bytes,
    })
}

/// One run: the baseline, then each flood.
#[derive(Debug, Clone)]
pub struct FloodRun {
    pub baseline: PhaseResult,
    pub floods: Vec<PhaseResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_many_ips_floods_use_distinct_addresses_a_tenth_of_them_ipv6() {
        let ips = attacker_ips(2_000);
        let distinct: std::collections::HashSet<_> = ips.iter().collect();
        assert_eq!(distinct.len(), 2_000);
        let v6: Vec<_> = ips.iter().filter(|ip| ip.is_ipv6()).collect();
        assert_eq!(v6.len(), 200);
        let shared_64 = v6
            .iter()
            .filter(|ip| match ip {
                IpAddr::V6(a) => a.segments()[..4] == [0x2001, 0xdb8, 0xbad, 0xffff],
                IpAddr::V4(_) => false,
            })
            .count();
        assert_eq!(shared_64, 100);
        assert!(!ips.contains(&ONE_ATTACKER));
        assert!(!ips.contains(&user_ip(0)) && !ips.contains(&twilio_ip(0)));
    }

    #[test]
    fn additions_are_counted_per_kind_including_kinds_that_vanished() {
        let before: BTreeMap<String, i64> = [("alerts".to_owned(), 3), ("rl:ip".to_owned(), 2)]
            .into_iter()
            .collect();
        let after: BTreeMap<String, i64> = [("alerts".to_owned(), 10), ("queue".to_owned(), 4)]
            .into_iter()
            .collect();
        let d = diff(&after, &before);
        assert_eq!(d.get("alerts"), Some(&7));
        assert_eq!(d.get("queue"), Some(&4));
        assert_eq!(d.get("rl:ip"), Some(&-2));
    }
}
