//! The process's Prometheus recorder (the `metrics` facade and its Prometheus exporter):
//! installed once per process, its metric names described and their known label sets started
//! at zero (so `rate()` and absent-series alerts work from the first scrape), and rendered as
//! Prometheus text. Gauges read at scrape time (queues) are added by [`scrape`], the
//! `/metrics` text both edges serve.

pub mod scrape;

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Histogram buckets for every `*_seconds` metric: 5 ms to 60 s.
const SECONDS_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Histogram buckets for `gatehouse_group_commit_jobs` and `gatehouse_enqueue_group_jobs`: jobs
/// per group, 1 to 1000 (`GROUP_COMMIT_MAX_JOBS`' range).
const GROUP_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1000.0];

/// Every counter gatehouse produces through the recorder, with its help text.
pub const COUNTERS: [(&str, &str); 16] = [
    (
        "gatehouse_security_events_total",
        "Security events recorded, by type.",
    ),
    (
        "gatehouse_failed_logins_total",
        "Failed logins and refused tokens.",
    ),
    (
        "gatehouse_permission_denials_total",
        "Requests refused for a missing scope.",
    ),
    (
        "gatehouse_four_eyes_violations_total",
        "Four-eyes violations.",
    ),
    (
        "gatehouse_encryption_errors_total",
        "Envelopes that could not be sealed or opened.",
    ),
    (
        "gatehouse_security_events_suppressed_total",
        "Security events counted but not stored (past the per-type, per-IP budget), by type.",
    ),
    (
        "gatehouse_security_events_dropped_total",
        "Security events dropped because the recording queue was full, by type.",
    ),
    (
        "gatehouse_retention_deleted_total",
        "Rows deleted by the retention rounds, by table.",
    ),
    (
        "gatehouse_security_event_insert_failures_total",
        "Security events whose row could not be stored (the log line was written).",
    ),
    (
        "gatehouse_security_alerts_total",
        "suspicious_activity alerts raised, by rule.",
    ),
    (
        "gatehouse_security_alert_failures_total",
        "Events whose alert window could not be counted (Redis unavailable).",
    ),
    (
        "gatehouse_rate_limit_hits_total",
        "Requests refused with 429, by limit.",
    ),
    (
        "gatehouse_webhook_verifications_total",
        "Twilio webhook signature checks, by result (valid, invalid, unavailable).",
    ),
    (
        "gatehouse_http_requests_total",
        "HTTP requests, by method, matched route template and status.",
    ),
    (
        "gatehouse_jobs_total",
        "Job attempts, by queue and outcome (ok, retry, dead).",
    ),
    (
        "gatehouse_group_commit_fallbacks_total",
        "inbound_message groups whose one statement failed, applying nothing; their jobs were stored one by one.",
    ),
];

/// Every histogram, with its help text.
pub const HISTOGRAMS: [(&str, &str); 4] = [
    (
        "gatehouse_http_request_duration_seconds",
        "HTTP request latency, by method and matched route template.",
    ),
    (
        "gatehouse_job_duration_seconds",
        "Job attempt duration, by queue.",
    ),
    (
        "gatehouse_group_commit_jobs",
        "inbound_message jobs whose effects one statement committed together (group commit), per group.",
    ),
    (
        "gatehouse_enqueue_group_jobs",
        "Webhook jobs the ingress sent to Redis in one enqueue script call (coalesced enqueues), per call.",
    ),
];

/// Every gauge the recorder holds (queue gauges are written at scrape time by
/// `metrics::scrape`), with its help text. Set where the state changes, never zeroed here: a
/// process that does not track a dependency exports no sample for it.
pub const GAUGES: [(&str, &str); 1] = [(
    "gatehouse_dependency_up",
    "Whether this worker process reaches a dependency (1) or is riding out an outage of it (0), by dependency.",
)];

/// Label sets known in advance, started at zero.
const ZERO: &[(&str, &str, &[&str])] = &[
    (
        "gatehouse_rate_limit_hits_total",
        "limit",
        &["auth_ip", "failed_login", "user"],
    ),
    (
        "gatehouse_webhook_verifications_total",
        "result",
        &["valid", "invalid", "unavailable"],
    ),
    (
        "gatehouse_retention_deleted_total",
        "table",
        &[
            "security_events",
            "processed_jobs",
            "catalog_syncs",
            "outbox",
        ],
    ),
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often the recorder's histogram samples are drained into their buckets: the exporter's
/// own upkeep default.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Keeps histograms bounded between scrapes. The recorder keeps every recorded sample until
/// upkeep folds it into its buckets, and `build_recorder` (unlike the exporter's `install`)
/// starts no upkeep of its own: without this, a process nobody scrapes grows by every
/// request's and job's latency sample (at 20,000 webhooks a second, ~2 MB a minute) and a
/// scrape after a long gap folds them all at once. A thread rather than a task: the handle is
/// the process's, and outlives any one runtime (each test has its own).
fn keep_up(handle: PrometheusHandle) {
    let started = every(UPKEEP_EVERY, move || {
        handle.run_upkeep();
        true
    });
    if let Err(error) = started {
        tracing::warn!(%error, "cannot start the metrics upkeep; histograms drain at scrapes only");
    }
}

/// Runs `work` on a thread of its own every `period`, until it returns false.
fn every(period: Duration, mut work: impl FnMut() -> bool + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("gatehouse-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(period);
                if !work() {
                    break;
                }
            }
        })
        .map(drop)
}

/// The process's recorder, installed on first call (later calls return the same handle). If
/// another recorder was installed first, the handle renders an empty registry and a warning
/// is logged.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = match PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("gatehouse_group_commit_jobs".into()),
                        &GROUP_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("gatehouse_enqueue_group_jobs".into()),
                        &GROUP_BUCKETS,
                    )
                }) {
                Ok(builder) => builder,
                Err(error) => {
                    tracing::warn!(%error, "histogram buckets refused; using summaries");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
                return handle;
            }
            describe_and_zero();
            keep_up(handle.clone());
            handle
        })
        .clone()
}

fn describe_and_zero() {
    for (name, help) in COUNTERS {
        metrics::describe_counter!(name, help);
    }
    for (name, help) in HISTOGRAMS {
        metrics::describe_histogram!(name, metrics::Unit::Seconds, help);
    }
    for (name, help) in GAUGES {
        metrics::describe_gauge!(name, help);
    }
    for name in [
        "gatehouse_failed_logins_total",
        "gatehouse_permission_denials_total",
        "gatehouse_four_eyes_violations_total",
        "gatehouse_encryption_errors_total",
        "gatehouse_security_event_insert_failures_total",
        "gatehouse_security_alert_failures_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for kind in crate::events::EventType::ALL {
        for name in [
            "gatehouse_security_events_total",
            "gatehouse_security_events_suppressed_total",
            "gatehouse_security_events_dropped_total",
        ] {
            metrics::counter!(name, "type" => kind.as_str()).absolute(0);
        }
    }
    for rule in crate::events::RULES {
        metrics::counter!("gatehouse_security_alerts_total", "rule" => rule.name).absolute(0);
    }
    for (name, label, values) in ZERO {
        for value in *values {
            metrics::counter!(*name, *label => *value).absolute(0);
        }
    }
}

/// The recorder's metrics as Prometheus text (histograms drained first).
pub fn render(handle: &PrometheusHandle) -> String {
    handle.run_upkeep();
    handle.render()
}

/// Appends one metric family (HELP, TYPE and its samples) to `out`. Label values are escaped.
pub fn write_family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: &[(Vec<(&str, &str)>, f64)],
) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        out.push_str(name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(out, "{k}=\"{v}\"");
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_escapes_its_label_values() {
        let mut out = String::new();
        write_family(
            &mut out,
            "gatehouse_x",
            "gauge",
            "X.",
            &[(vec![("queue", "a\"b\\c")], 3.0)],
        );
        assert_eq!(
            out,
            "# HELP gatehouse_x X.\n# TYPE gatehouse_x gauge\ngatehouse_x{queue=\"a\\\"b\\\\c\"} 3\n"
        );
    }

    #[test]
    fn every_metric_name_follows_prometheus_conventions() {
        for (name, _) in COUNTERS {
            assert!(
                name.starts_with("gatehouse_") && name.ends_with("_total"),
                "{name}"
            );
        }
        // A histogram's name ends in its unit: seconds, or jobs for a group's size.
        for (name, _) in HISTOGRAMS {
            assert!(
                name.starts_with("gatehouse_")
                    && (name.ends_with("_seconds") || name.ends_with("_jobs")),
                "{name}"
            );
        }
        for (name, _) in GAUGES {
            assert!(
                name.starts_with("gatehouse_") && !name.ends_with("_total"),
                "{name}"
            );
        }
    }

    #[test]
    fn upkeep_runs_again_and_again_on_its_own_thread() {
        let (runs, ran) = std::sync::mpsc::channel();
        let mut count = 0;
        every(Duration::from_millis(5), move || {
            count += 1;
            let _ = runs.send(count);
            count < 3
        })
        .expect("an upkeep thread");
        let seen: Vec<u32> = (0..3)
            .map(|_| {
                ran.recv_timeout(Duration::from_secs(5))
                    .expect("upkeep ran")
            })
            .collect();
        assert_eq!(seen, [1, 2, 3]);
        // It stops once its work says so.
        assert!(ran.recv_timeout(Duration::from_millis(100)).is_err());
    }
}
