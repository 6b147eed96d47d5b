//! `/metrics` on the ingress and on the worker's health port, after real traffic against real
//! PostgreSQL and Redis; and the operator files (`docs/prometheus/alerts.yml`,
//! `docs/grafana/gatehouse.json`) checked against what `/metrics` really exports.
//!
//! The Prometheus recorder is per process (each test runs in its own process under nextest), so
//! assertions are "at least" where another test in the same process could add to a counter.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use gatehouse::access::PlatformRole;
use gatehouse::accounts::{self, NewUser};
use gatehouse::events::{EventType, SecurityEvent};
use gatehouse::metrics::scrape::Scrape;
use gatehouse::security::jwt::{JwtKeys, SubjectKind};
use gatehouse::security::password::Hasher;
use gatehouse::worker::health::{Outages, serve as serve_worker_health};
use gatehouse_testenv::*;
use secrecy::SecretString;
use uuid::Uuid;

/// Every metric name with a sample in Prometheus text (`_bucket`, `_sum`, `_count` included).
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The value of the sample whose line starts with `series` (name and labels as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Identifiers starting with `gatehouse_` in a PromQL expression.
fn metric_identifiers(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("gatehouse_") {
        let start = i + pos;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_' || c == b':')
        };
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(expr.len(), |n| start + n);
        if boundary {
            out.push(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// The `expr:` values of a Prometheus rules file (inline, or a `|` block scalar).
fn rule_expressions(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let trimmed = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        if let Some(rest) = trimmed.strip_prefix("expr:") {
            let indent = line.len() - trimmed.len();
            let rest = rest.trim();
            if rest == "|" || rest == ">" || rest.is_empty() {
                let mut block = String::new();
                i += 1;
                while i < lines.len() {
                    let l = lines[i];
                    let ind = l.len() - l.trim_start().len();
                    if !l.trim().is_empty() && ind <= indent {
                        break;
                    }
                    block.push_str(l.trim());
                    block.push(' ');
                    i += 1;
                }
                out.push(block);
                continue;
            }
            out.push(rest.to_owned());
        }
        i += 1;
    }
    out
}

/// The `expr` of every target of every panel of a Grafana dashboard.
fn dashboard_expressions(json: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![json];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(expr)) = map.get("expr") {
                    out.push(expr.clone());
                }
                stack.extend(map.values());
            }
            serde_json::Value::Array(items) => stack.extend(items.iter()),
            _ => {}
        }
    }
    out
}

async fn scrape(http: &reqwest::Client, url: &str) -> String {
    let r = http.get(url).send().await.expect("scrape");
    assert_eq!(r.status(), 200);
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    r.text().await.expect("text")
}

/// Drives one of every kind of traffic the metrics describe; returns both processes' scrapes.
async fn traffic_and_scrapes(env: &TestEnv) -> (String, String) {
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let worker = env.start_worker();
    let http = reqwest::Client::new();

    // A signed webhook, processed by the worker: a valid verification, a job that succeeds.
    let r = signed_form(
        &http,
        &server,
        tenant,
        &sms_params(&message_sid(), "+14155550100", "hello"),
    )
    .send()
    .await
    .expect("webhook");
    assert_eq!(r.status(), 200);
    assert_eq!(
        env.wait_for_count("SELECT count(*) FROM messages", 1, Duration::from_secs(20))
            .await,
        1
    );
    // A forged one.
    let r = http
        .post(server.url(&webhook_path(tenant)))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        .body("MessageSid=SMx")
        .send()
        .await
        .expect("forged webhook");
    assert_eq!(r.status(), 403);
    // A forged token; a caller without the scope; an unknown path.
    let r = http
        .get(server.url("/v1/me"))
        .header("x-forwarded-proto", "https")
        .bearer_auth("forged")
        .send()
        .await
        .expect("me");
    assert_eq!(r.status(), 401);
    let user = accounts::create_user(
        &env.pool,
        &Hasher::owasp(),
        NewUser {
            email: "plain@example.com".into(),
            password: SecretString::from("correct horse battery staple"),
            first_name: "P".into(),
            last_name: "U".into(),
            platform_role: None::<PlatformRole>,
        },
    )
    .await
    .expect("user");
    let token = JwtKeys::from_config(&env.config)
        .issue(user, SubjectKind::User)
        .expect("token")
        .token;
    let r = http
        .get(server.url("/v1/admin/security-events"))
        .header("x-forwarded-proto", "https")
        .bearer_auth(&token)
        .send()
        .await
        .expect("events");
    assert_eq!(r.status(), 403);
    let r = http
        .get(server.url(&format!("/v1/nothing/{}", Uuid::new_v4())))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .expect("404");
    assert_eq!(r.status(), 404);
    // The per-IP auth limit (2/m here): the third attempt is refused.
    let mut refused = false;
    for _ in 0..3 {
        let r = http
            .post(server.url("/v1/auth/register"))
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-for", "192.0.2.99")
            .send()
            .await
            .expect("register");
        refused |= r.status() == 429;
    }
    assert!(refused, "the auth limit refused an attempt");
    // Kinds only other modules produce (key rotation, the keyring), through the one recorder.
    let state = env.app_state();
    for kind in [EventType::FourEyesViolation, EventType::EncryptionError] {
        let mut event = SecurityEvent::new(kind);
        event.tenant_id = Some(tenant);
        state.events.record(event).await;
    }
    // Events are recorded off the request path: wait for them.
    env.wait_for_count(
        "SELECT count(*) FROM security_events WHERE type IN ('failed_login', 'permission_denied', 'invalid_webhook_signature', 'rate_limit_exceeded')",
        4,
        Duration::from_secs(10),
    )
    .await;

    let ingress = scrape(&http, &server.url("/metrics")).await;

    // The worker's health port serves the same families (jobs are produced there).
    let (addr, health) = worker_health(env, None).await;
    let worker_text = scrape(&http, &format!("http://{addr}/metrics")).await;
    health.abort();
    worker.stop().await.expect("worker stops");
    server.stop().await;
    (ingress, worker_text)
}

/// A worker's health and metrics server on a free loopback port, as `gatehouse work` runs it.
async fn worker_health(
    env: &TestEnv,
    token: Option<secrecy::SecretString>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let health = tokio::spawn(serve_worker_health(
        listener,
        gatehouse::server::Limits::from_config(&env.config),
        Outages::default(),
        env.pool.clone(),
        Scrape {
            handle: gatehouse::metrics::install(),
            redis: env.redis.clone().into(),
            layout: env.config.layout().clone(),
            token,
        },
        std::future::pending(),
    ));
    (addr, health)
}

fn env_vars(vars: &mut std::collections::HashMap<String, String>) {
    vars.insert("RATE_LIMIT_LOGIN_IP".into(), "2/m".into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_security_http_and_job_traffic_by_route_template_and_read_queues_from_redis()
{
    let env = TestEnv::with_vars(env_vars).await;
    let (ingress, worker) = traffic_and_scrapes(&env).await;
    let at_least = |series: &str, n: f64| {
        let v = sample(&ingress, series).unwrap_or_else(|| panic!("{series} missing:\n{ingress}"));
        assert!(v >= n, "{series} = {v}, expected at least {n}");
    };
    at_least("gatehouse_failed_logins_total", 1.0);
    at_least("gatehouse_permission_denials_total", 1.0);
    at_least("gatehouse_four_eyes_violations_total", 1.0);
    at_least("gatehouse_encryption_errors_total", 1.0);
    at_least(
        "gatehouse_webhook_verifications_total{result=\"valid\"}",
        1.0,
    );
    at_least(
        "gatehouse_webhook_verifications_total{result=\"invalid\"}",
        1.0,
    );
    at_least("gatehouse_rate_limit_hits_total{limit=\"auth_ip\"}", 1.0);
    at_least(
        "gatehouse_security_events_total{type=\"failed_login\"}",
        1.0,
    );
    at_least(
        "gatehouse_security_alerts_total{rule=\"invalid_webhook_signature\"}",
        1.0,
    );
    at_least(
        "gatehouse_jobs_total{queue=\"inbound_message\",outcome=\"ok\"}",
        1.0,
    );
    assert!(
        ingress.contains(
            "gatehouse_job_duration_seconds_bucket{queue=\"inbound_message\",le=\"0.005\"}"
        ),
        "job durations are a histogram"
    );
    // HTTP requests carry the route template, never the raw path (no tenant id, no UUID).
    at_least(
        "gatehouse_http_requests_total{method=\"POST\",route=\"/v1/webhooks/twilio/{tenant_id}/messages\",status=\"200\"}",
        1.0,
    );
    at_least(
        "gatehouse_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}",
        1.0,
    );
    assert!(ingress.contains(
        "gatehouse_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/webhooks/twilio/{tenant_id}/messages\",le=\"+Inf\"}"
    ));
    for line in ingress.lines().filter(|l| l.starts_with("gatehouse_http_")) {
        assert!(
            !line.contains("/v1/nothing"),
            "a raw path became a label: {line}"
        );
    }
    // Queue gauges from Redis: the one message is done, nothing is dead.
    at_least(
        "gatehouse_queue_jobs{queue=\"inbound_message\",state=\"done\"}",
        1.0,
    );
    assert_eq!(
        sample(
            &ingress,
            "gatehouse_dead_letters{queue=\"inbound_message\"}"
        ),
        Some(0.0)
    );
    assert_eq!(sample(&ingress, "gatehouse_queue_stats_up"), Some(1.0));
    // Tenants waiting and held back at their caps: counts per queue, never a tenant label.
    for state in ["waiting", "capped"] {
        assert_eq!(
            sample(
                &ingress,
                &format!("gatehouse_queue_tenants{{queue=\"inbound_message\",state=\"{state}\"}}")
            ),
            Some(0.0),
            "{state}"
        );
    }
    assert!(
        sample(
            &ingress,
            "gatehouse_llm_rejections_total{reason=\"not_json\"}"
        )
        .is_some()
            || ingress.contains("gatehouse_llm_rejections_total{reason=")
    );
    // The worker's port: job metrics and queue gauges.
    assert!(worker.contains("gatehouse_jobs_total{queue=\"inbound_message\",outcome=\"ok\"}"));
    assert!(worker.contains("gatehouse_dead_letters{queue=\"sync_catalog\"}"));
    // No secret of the test reaches the metrics.
    for text in [&ingress, &worker] {
        assert!(!text.contains(TOKEN));
        assert!(!text.contains("AAAAAAAAAAAAAAAAAAAAAAAAAAA="));
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_shipped_alert_rules_and_dashboard_name_is_one_metrics_exports() {
    let env = TestEnv::with_vars(env_vars).await;
    let (ingress, worker) = traffic_and_scrapes(&env).await;
    let mut exported = exported_names(&ingress);
    exported.extend(exported_names(&worker));

    let root = env!("CARGO_MANIFEST_DIR");
    let rules =
        std::fs::read_to_string(format!("{root}/docs/prometheus/alerts.yml")).expect("alerts.yml");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/docs/grafana/gatehouse.json"))
            .expect("gatehouse.json"),
    )
    .expect("the dashboard is JSON");
    let rule_exprs = rule_expressions(&rules);
    let panel_exprs = dashboard_expressions(&dashboard);
    assert!(rule_exprs.len() >= 5, "the rules file has expressions");
    assert!(panel_exprs.len() >= 10, "the dashboard has queries");
    let mut referenced = BTreeSet::new();
    for expr in rule_exprs.iter().chain(&panel_exprs) {
        let names = metric_identifiers(expr);
        assert!(
            !names.is_empty(),
            "an expression names no gatehouse metric: {expr}"
        );
        referenced.extend(names);
    }
    let missing: Vec<_> = referenced.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "named by docs/ but not exported: {missing:?}\nexported: {exported:?}"
    );
    // The five SPEC alert rules have a Prometheus counterpart.
    for name in [
        "gatehouse_failed_logins_total",
        "gatehouse_rate_limit_hits_total",
        "gatehouse_webhook_verifications_total",
        "gatehouse_four_eyes_violations_total",
        "gatehouse_encryption_errors_total",
    ] {
        assert!(
            rule_exprs
                .iter()
                .any(|e| metric_identifiers(e).iter().any(|n| n == name)),
            "no alert rule over {name}"
        );
    }
    env.cleanup().await;
}

const METRICS_TOKEN: &str = "prometheus-scrape-token-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_metrics_token_both_metrics_endpoints_refuse_scrapes_without_it() {
    let env = TestEnv::with_vars(|vars| {
        vars.insert("METRICS_TOKEN".into(), METRICS_TOKEN.into());
    })
    .await;
    let server = env.start_server().await;
    let (worker_addr, health) = worker_health(&env, env.worker_options().metrics_token).await;
    let http = reqwest::Client::new();
    for url in [
        server.url("/metrics"),
        format!("http://{worker_addr}/metrics"),
    ] {
        let status = |auth: Option<&str>| {
            let mut request = http.get(&url).header("x-forwarded-proto", "https");
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            async move { request.send().await.expect("scrape").status().as_u16() }
        };
        assert_eq!(status(None).await, 401, "{url}");
        assert_eq!(status(Some("Bearer wrong-token")).await, 401, "{url}");
        assert_eq!(
            status(Some(&format!("Basic {METRICS_TOKEN}"))).await,
            401,
            "{url}"
        );
        assert_eq!(
            status(Some(&format!("Bearer {METRICS_TOKEN}"))).await,
            200,
            "{url}"
        );
    }
    // The rest of the API is unaffected.
    let r = http
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
    health.abort();
    server.stop().await;
    env.cleanup().await;
}

#[test]
fn promql_identifiers_are_found_whole() {
    assert_eq!(
        metric_identifiers(
            "histogram_quantile(0.99, sum by (le) (rate(gatehouse_http_request_duration_seconds_bucket[5m]))) / gatehouse_x"
        ),
        vec![
            "gatehouse_http_request_duration_seconds_bucket".to_owned(),
            "gatehouse_x".to_owned()
        ]
    );
    assert!(metric_identifiers("not_gatehouse_y").is_empty());
    assert_eq!(
        rule_expressions(
            "  - expr: a\n    labels: {}\n  - expr: |\n      b\n      c\n    for: 1m\n"
        ),
        vec!["a".to_owned(), "b c ".to_owned()]
    );
}
