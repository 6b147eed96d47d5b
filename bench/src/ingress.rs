//! Figures 4 and 5: the signed-webhook ingress against a bare axum handler that only
//! enqueues, and other routes' latency while argon2 logins flood the ingress.
//!
//! Both servers run as separate processes of this binary (`gatehouse-bench server …`),
//! listening on 127.0.0.1 only, so the load generator never shares their runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use gatehouse::redis_conn::RedisConn;
use gatehouse::security::twilio::{Algorithm, sign_form};
use gatehouse_jobs::client::{Enqueue, Queues};
use gatehouse_jobs::{InboundMessage, Job as _};
use uuid::Uuid;

use crate::env::{self, ACCOUNT_SID, BenchEnv, LOGIN_EMAIL, LOGIN_PASSWORD, PUBLIC_BASE};
use crate::load::{self, LoadResult, Prepared};

/// Which server a `server` process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerKind {
    /// gatehouse's own router (`gatehouse::http::serve`), as `gatehouse serve` runs it.
    Gatehouse,
    /// An axum handler that parses the form and enqueues the same payload, nothing else — in
    /// plaintext (to a queue of the same layout that seals nothing), as a bare enqueue did before
    /// customer data was sealed, so the ratio carries the cost of sealing.
    Bare,
}

/// Where the bare handler enqueues: not one of gatehouse's queues, so nothing is sealed.
pub const BARE_QUEUE: &str = "bench_bare_plain";

const TWIML_EMPTY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>";

struct Bare {
    redis: RedisConn,
    queues: Queues,
    dedupe: bool,
    headers: bool,
}

async fn bare_webhook(
    State(state): State<Arc<Bare>>,
    Path(tenant_id): Path<Uuid>,
    body: Bytes,
) -> impl IntoResponse {
    let mut job = InboundMessage {
        tenant_id,
        message_sid: String::new(),
        from: String::new(),
        to: String::new(),
        body: String::new(),
        received_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    };
    for (name, value) in form_urlencoded::parse(&body) {
        match name.as_ref() {
            "MessageSid" => job.message_sid = value.into_owned(),
            "From" => job.from = value.into_owned(),
            "To" => job.to = value.into_owned(),
            "Body" => job.body = value.into_owned(),
            _ => {}
        }
    }
    let mut redis = state.redis.clone();
    // Experiment knob (not gatehouse configuration): `GH_BENCH_BARE_DEDUPE=1` makes the bare
    // handler make the same dedupe claim gatehouse makes (the purpose fixes the job id, and the
    // script looks for its tombstone), to show what that claim costs.
    let dedupe = state.dedupe.then(|| {
        (
            gatehouse::http::webhook::dedupe_purpose(tenant_id, &job.message_sid),
            gatehouse::http::webhook::DEDUPE_TTL_SECONDS,
        )
    });
    let payload = serde_json::to_value(&job).unwrap_or_default();
    match state
        .queues
        .enqueue_json(
            &mut redis,
            BARE_QUEUE,
            payload,
            Enqueue {
                dedupe,
                ..Enqueue::default()
            },
        )
        .await
    {
        // Experiment knob: `GH_BENCH_BARE_HEADERS=1` answers with the headers gatehouse's
        // answer carries (the SPEC's security headers, a request id, the charset), to show
        // what they cost the server and the load generator that reads them.
        Ok(_) if state.headers => {
            let mut response = TWIML_EMPTY.into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/xml; charset=utf-8"),
            );
            // The edge's own constants (SPEC "Transport security"), so the two cannot drift.
            headers.insert(
                header::STRICT_TRANSPORT_SECURITY,
                gatehouse::http::transport::HSTS,
            );
            for (name, value) in gatehouse::http::transport::SECURITY_HEADERS {
                headers.insert(name, value);
            }
            if let Ok(id) = header::HeaderValue::from_str(&Uuid::new_v4().to_string()) {
                headers.insert("x-request-id", id);
            }
            response
        }
        Ok(_) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/xml")],
            TWIML_EMPTY,
        )
            .into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// Runs a server process until SIGTERM (the `server` subcommand).
pub async fn serve(kind: ServerKind, port: u16) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    let shutdown = async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        }
    };
    let config = Arc::new(
        gatehouse::config::Config::from_env()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?,
    );
    let redis = gatehouse::redis_conn::connect(&config.redis_url).await?;
    match kind {
        ServerKind::Gatehouse => {
            let pool = gatehouse::db::connect_lazy(&config.database_url, 20)?;
            let mut state = gatehouse::http::AppState::new(config, pool, redis);
            // Experiment knob (not gatehouse configuration): how many argon2 hashes may run
            // at once, to show what figure 5 depends on. Unset: gatehouse's default.
            if let Some(n) = std::env::var("GH_BENCH_HASH_CONCURRENCY")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
            {
                state.hasher = gatehouse::security::password::Hasher::new(
                    gatehouse::security::password::Cost::OWASP,
                    n,
                );
            }
            let state = Arc::new(state);
            gatehouse::http::serve(listener, state, shutdown).await?;
        }
        ServerKind::Bare => {
            let state = Arc::new(Bare {
                redis,
                queues: Queues::new(config.redis_namespace.clone()),
                dedupe: std::env::var("GH_BENCH_BARE_DEDUPE").is_ok_and(|v| v == "1"),
                headers: std::env::var("GH_BENCH_BARE_HEADERS").is_ok_and(|v| v == "1"),
            });
            let app = Router::new()
                .route("/healthz", get(|| async { "ok" }))
                .route(
                    "/v1/webhooks/twilio/{tenant_id}/messages",
                    post(bare_webhook),
                )
                .with_state(state);
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?;
        }
    }
    Ok(())
}

/// A server process and its base URL.
pub struct Server {
    child: std::process::Child,
    pub base: String,
}

impl Server {
    pub async fn start(env: &BenchEnv, kind: ServerKind) -> anyhow::Result<Self> {
        Self::start_with(env, kind, &[]).await
    }

    /// [`Server::start`] with `extra` variables (another `REDIS_URL`, say).
    pub async fn start_with(
        env: &BenchEnv,
        kind: ServerKind,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let port = gatehouse_testenv::try_free_port()?;
        let kind_name = match kind {
            ServerKind::Gatehouse => "gatehouse",
            ServerKind::Bare => "bare",
        };
        let child = env.myself(
            &["server", "--kind", kind_name, "--port", &port.to_string()],
            extra,
        )?;
        let mut server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let client = load::client(1)?;
        let url = format!("{}/healthz", server.base);
        let up = env::wait_until(Duration::from_secs(20), || {
            let request = client.get(&url).send();
            async move { request.await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        if !up {
            server.stop();
            anyhow::bail!("the {kind_name} server did not come up within 20 s");
        }
        Ok(server)
    }

    /// CPU time the server process has used so far, in microseconds.
    pub fn cpu_us(&self) -> Option<u64> {
        gatehouse_testenv::process_cpu_us(self.child.id())
    }

    pub fn stop(&mut self) {
        env::terminate(&mut self.child);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            env::kill(&mut self.child);
        }
    }
}

/// `n` signed webhook requests for `tenant`, each with a fresh MessageSid (so none is a
/// duplicate), signed exactly as Twilio signs them.
pub fn signed_webhooks(tenant: Uuid, n: usize) -> Vec<Prepared> {
    let path = format!("/v1/webhooks/twilio/{tenant}/messages");
    let url = format!("{PUBLIC_BASE}{path}");
    (0..n)
        .map(|i| {
            let sid = format!("SM{}", Uuid::new_v4().simple());
            let from = format!("+1415555{:04}", i % 200);
            let params = [
                ("MessageSid", sid.as_str()),
                ("SmsSid", sid.as_str()),
                ("AccountSid", ACCOUNT_SID),
                ("From", from.as_str()),
                ("To", "+14155550199"),
                ("Body", "Hi! Where is my order #12345?"),
                ("NumMedia", "0"),
            ];
            let signature = sign_form(
                &url,
                &params,
                env::TWILIO_TOKEN.as_bytes(),
                Algorithm::HmacSha1,
            );
            let body = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(params.iter())
                .finish();
            Prepared {
                post: true,
                path: path.clone(),
                headers: vec![
                    (
                        "content-type",
                        "application/x-www-form-urlencoded".to_owned(),
                    ),
                    ("x-forwarded-proto", "https".to_owned()),
                    ("x-twilio-signature", signature),
                ],
                body,
            }
        })
        .collect()
}

fn logins(n: usize) -> Vec<Prepared> {
    let body = serde_json::json!({"email": LOGIN_EMAIL, "password": LOGIN_PASSWORD}).to_string();
    vec![
        Prepared {
            post: true,
            path: "/v1/auth/login".into(),
            headers: vec![
                ("content-type", "application/json".to_owned()),
                ("x-forwarded-proto", "https".to_owned()),
            ],
            body,
        };
        n
    ]
}

/// Load shape of the ingress figures.
#[derive(Debug, Clone, Copy)]
pub struct IngressPlan {
    pub concurrency: usize,
    pub warmup: Duration,
    /// Measured time per server (figure 4: in slices of `slice`).
    pub duration: Duration,
    /// Figure 4's turn length: the load alternates between the two servers this often.
    pub slice: Duration,
    /// Prepared (signed) requests per run: the count bound.
    pub max_requests: usize,
}

/// The order of figure 4's turns: `g b b g g b b g …` (each kind first as often as second,
/// so a drift over the run — Redis's hashes growing, say — falls on both alike).
fn turn_order(turns: usize) -> impl Iterator<Item = ServerKind> {
    (0..turns).map(|i| match i % 4 {
        0 | 3 => ServerKind::Gatehouse,
        _ => ServerKind::Bare,
    })
}

/// One server of figure 4's pair, with its client, its requests and what it measured.
struct Side {
    kind: ServerKind,
    server: Server,
    client: reqwest::Client,
    cursor: load::Cursor,
    samples: load::Samples,
    server_us: u64,
    redis_us: u64,
    client_us: u64,
    script_calls: u64,
}

impl Side {
    /// The figures, each CPU over the requests this side sent in its turns.
    fn result(self) -> LoadResult {
        let sent = self.samples.sent.max(1) as f64;
        let mut result = self.samples.result();
        result.server_cpu_us_per_request = self.server_us as f64 / sent;
        result.redis_cpu_us_per_request = self.redis_us as f64 / sent;
        result.client_cpu_us_per_request = self.client_us as f64 / sent;
        result.script_calls_per_request = self.script_calls as f64 / sent;
        result
    }
}

/// Figure 4, one run: both servers up at once, and the same load taking turns between them
/// (`plan.slice` each, [`turn_order`]) until each has had `plan.duration`. A shared VM's
/// other tenants take 2–17 % of its CPU in bursts of seconds (`vmstat`'s `st`, BENCHMARKS
/// §16 "Figure 4 taking turns"): a burst lands on both servers' turns alike instead of on one server's whole run.
/// Each server has its own client, queue and requests (fresh MessageSids, none sent twice,
/// warm-up included). Returns (gatehouse, bare).
pub async fn webhook_pair(
    env: &BenchEnv,
    tenant: Uuid,
    plan: IngressPlan,
) -> anyhow::Result<(LoadResult, LoadResult)> {
    env.clear_namespace().await?;
    let mut sides = Vec::new();
    for kind in [ServerKind::Gatehouse, ServerKind::Bare] {
        let requests = Arc::new(signed_webhooks(tenant, plan.max_requests));
        sides.push(Side {
            kind,
            // Logging as `gatehouse serve` logs by default (`RUST_LOG` unset) unless
            // `GH_BENCH_RUST_LOG` says otherwise: a line the webhook path writes at the
            // default level costs the figure what it costs a deployment (BENCHMARKS §16).
            server: match std::env::var_os("GH_BENCH_RUST_LOG") {
                Some(_) => Server::start(env, kind).await?,
                None => {
                    let log = [("RUST_LOG", gatehouse::config::DEFAULT_LOG_FILTER)];
                    Server::start_with(env, kind, &log).await?
                }
            },
            client: load::client(plan.concurrency)?,
            cursor: load::Cursor::new(requests, false),
            samples: load::Samples::default(),
            server_us: 0,
            redis_us: 0,
            client_us: 0,
            script_calls: 0,
        });
    }
    for side in &sides {
        load::run_from(
            &side.client,
            &side.server.base,
            &side.cursor,
            plan.concurrency,
            plan.warmup,
            Duration::ZERO,
        )
        .await;
    }
    let slice = plan
        .slice
        .min(plan.duration)
        .max(Duration::from_millis(100));
    let turns = 2 * plan.duration.as_millis().div_ceil(slice.as_millis()).max(1) as usize;
    for kind in turn_order(turns) {
        let side = sides
            .iter_mut()
            .find(|side| side.kind == kind)
            .context("no server of that kind")?;
        let server_before = side.server.cpu_us();
        let (redis_before, client_before) =
            (crate::cpu::redis_us(env).await?, crate::cpu::own_us());
        let calls_before = crate::cpu::script_calls(env).await?;
        let samples = load::run_from(
            &side.client,
            &side.server.base,
            &side.cursor,
            plan.concurrency,
            Duration::ZERO,
            slice,
        )
        .await;
        // Where each request's CPU goes, all three on the same cores: the server, Redis (the
        // enqueue script) and the load generator (reading the answer).
        if let (Some(before), Some(after)) = (server_before, side.server.cpu_us()) {
            side.server_us += after.saturating_sub(before);
        }
        side.client_us += crate::cpu::own_us().saturating_sub(client_before);
        side.redis_us += crate::cpu::redis_us(env)
            .await?
            .saturating_sub(redis_before);
        side.script_calls += crate::cpu::script_calls(env)
            .await?
            .saturating_sub(calls_before);
        side.samples.merge(samples);
    }
    let mut results = Vec::new();
    for mut side in sides {
        side.server.stop();
        // Every 2xx must stand for a job on the queue (warm-up requests enqueue too).
        let mut redis = env.redis.clone();
        let queued: u64 = redis::cmd("LLEN")
            .arg(format!(
                "{}:active",
                env.queue_key(match side.kind {
                    ServerKind::Gatehouse => InboundMessage::QUEUE,
                    ServerKind::Bare => BARE_QUEUE,
                })
            ))
            .query_async(&mut redis)
            .await?;
        results.push((side.kind, queued, side.result()));
    }
    // Cleared before the checks, so a failed check leaves nothing behind either.
    env.clear_namespace().await?;
    let mut results = results.into_iter().map(|(kind, queued, result)| {
        let ok = result.ok;
        if ok == 0 {
            anyhow::bail!("{kind:?} ingress answered no request with 2xx");
        }
        if queued < ok {
            anyhow::bail!(
                "{kind:?} ingress answered {ok} requests with 2xx but queued only {queued} jobs"
            );
        }
        Ok(result)
    });
    let gatehouse = results.next().context("no gatehouse result")??;
    let bare = results.next().context("no bare result")??;
    Ok((gatehouse, bare))
}

/// Figure 4b, one run: the gatehouse ingress on a primary with one replica, waiting for it
/// (`REDIS_MIN_REPLICA_ACKS=1`) or not; every 2xx must stand for a job on the primary.
pub async fn replica_ack_run(
    env: &BenchEnv,
    tenant: Uuid,
    replicated: &gatehouse_testenv::ReplicatedRedis,
    wait_for_replica: bool,
    plan: IngressPlan,
) -> anyhow::Result<LoadResult> {
    let url = replicated.primary.url();
    let client = redis::Client::open(url.as_str())?;
    let mut primary = client.get_multiplexed_async_connection().await?;
    let () = redis::cmd("FLUSHALL").query_async(&mut primary).await?;
    let requests = Arc::new(signed_webhooks(tenant, plan.max_requests));
    let acks = if wait_for_replica { "1" } else { "0" };
    let mut server = Server::start_with(
        env,
        ServerKind::Gatehouse,
        &[
            ("REDIS_URL", url.as_str()),
            ("REDIS_MIN_REPLICA_ACKS", acks),
        ],
    )
    .await?;
    let load_client = load::client(plan.concurrency)?;
    let cpu_before = server.cpu_us();
    let mut result = load::run(
        &load_client,
        &server.base,
        requests,
        false,
        plan.concurrency,
        plan.warmup,
        plan.duration,
    )
    .await;
    if let (Some(before), Some(after)) = (cpu_before, server.cpu_us()) {
        result.server_cpu_us_per_request = (after - before) as f64 / result.sent.max(1) as f64;
    }
    server.stop();
    let queued: u64 = redis::cmd("LLEN")
        .arg(env.queues().keys(InboundMessage::QUEUE).active())
        .query_async(&mut primary)
        .await?;
    if result.ok == 0 || queued < result.ok {
        anyhow::bail!(
            "replica-ack run (wait: {wait_for_replica}): {} answered 2xx, {queued} queued",
            result.ok
        );
    }
    Ok(result)
}

/// Figure 5, one run: `/healthz` and webhook p99 at low concurrency, with or without a
/// bounded login flood running alongside.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoginRun {
    pub healthz: LoadResult,
    pub webhook: LoadResult,
    pub logins: LoadResult,
}

pub async fn login_run(
    env: &BenchEnv,
    tenant: Uuid,
    flood: bool,
    plan: IngressPlan,
) -> anyhow::Result<LoginRun> {
    env.clear_namespace().await?;
    let mut server = Server::start(env, ServerKind::Gatehouse).await?;
    let client = load::client(16)?;
    let probes = 2;
    let health = Arc::new(vec![Prepared::get("/healthz")]);
    let hooks = Arc::new(signed_webhooks(tenant, plan.max_requests / 4));
    // Bounded: at most 400 logins (about 35 s of argon2 on both cores), 8 at a time.
    let flood_requests = Arc::new(logins(if flood { 400 } else { 0 }));
    let (healthz, webhook, logins) = tokio::join!(
        load::run(
            &client,
            &server.base,
            health,
            true,
            probes,
            plan.warmup,
            plan.duration
        ),
        load::run(
            &client,
            &server.base,
            hooks,
            false,
            probes,
            plan.warmup,
            plan.duration
        ),
        load::run(
            &client,
            &server.base,
            flood_requests,
            false,
            8,
            Duration::ZERO,
            plan.warmup + plan.duration
        ),
    );
    server.stop();
    env.clear_namespace().await?;
    Ok(LoginRun {
        healthz,
        webhook,
        logins,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_alternate_in_pairs_and_each_server_gets_as_many() {
        use ServerKind::{Bare as B, Gatehouse as G};
        let turns: Vec<_> = turn_order(10).collect();
        assert_eq!(turns, [G, B, B, G, G, B, B, G, G, B]);
        let gatehouse = turns.iter().filter(|&&k| k == G).count();
        assert_eq!(gatehouse, turns.len() - gatehouse);
    }
}
