//! The `/metrics` text both processes serve (the ingress on its port, `gatehouse work` on
//! `WORKER_HEALTH_PORT`): the process's recorder (counters, histograms), then gauges read at
//! scrape time — every queue's depth and dead letters from Redis (one script per queue) — and
//! the LLM rejection counters. With `METRICS_TOKEN` set, a scrape must present it as a bearer
//! token (compared in constant time). Built on the `http` crate's types (which axum
//! re-exports), so each edge serves [`Scrape::respond`] as it is without this module knowing
//! axum.

use ::http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use super::{render, write_family};
use crate::queue::stats::{QueueStats, all_queue_stats};

/// What a scrape reads.
#[derive(Clone)]
pub struct Scrape {
    pub handle: PrometheusHandle,
    pub redis: crate::redis_conn::Renewing,
    pub layout: gatehouse_jobs::keys::Layout,
    /// `METRICS_TOKEN`: required as a bearer token when set.
    pub token: Option<SecretString>,
}

impl Scrape {
    /// Whether `headers` may scrape: always without a token configured, else only with
    /// `Authorization: Bearer <METRICS_TOKEN>`.
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .unwrap_or_default();
        bool::from(presented.as_bytes().ct_eq(token.expose_secret().as_bytes()))
    }

    /// The `/metrics` response: 401 without the token (when one is configured), else the text.
    /// Any body built from a `String` (axum's `Body`, for one).
    pub async fn respond<B: From<String>>(&self, headers: &HeaderMap) -> Response<B> {
        let (status, header_name, value, body) = if self.authorized(headers) {
            (
                StatusCode::OK,
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
                self.text().await,
            )
        } else {
            (
                StatusCode::UNAUTHORIZED,
                header::WWW_AUTHENTICATE,
                "Bearer realm=\"metrics\"",
                "a valid bearer token is required\n".to_owned(),
            )
        };
        let mut response = Response::new(B::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        // What axum gives a text body; the scrape's own content type replaces it.
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header_name, HeaderValue::from_static(value));
        response
    }

    /// The whole Prometheus text. Redis unreachable → `gatehouse_queue_stats_up 0` and no
    /// queue gauges (the rest is still served).
    pub async fn text(&self) -> String {
        let mut out = render(&self.handle);
        let mut redis = self.redis.clone();
        let stats = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            all_queue_stats(&mut redis, &self.layout, &gatehouse_jobs::QUEUES),
        )
        .await;
        match stats {
            Ok(Ok(stats)) => {
                queue_families(&mut out, &stats);
                write_family(
                    &mut out,
                    "gatehouse_queue_stats_up",
                    "gauge",
                    "Whether the queue gauges could be read from Redis.",
                    &[(vec![], 1.0)],
                );
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "queue gauges unavailable for /metrics");
                queue_down(&mut out);
            }
            Err(_) => {
                tracing::warn!("queue gauges timed out for /metrics");
                queue_down(&mut out);
            }
        }
        let rejections: Vec<_> = crate::llm::rejection_counts()
            .into_iter()
            .map(|(reason, n)| (vec![("reason", reason)], n as f64))
            .collect();
        write_family(
            &mut out,
            "gatehouse_llm_rejections_total",
            "counter",
            "Rejected LLM answers since the process started, by reason.",
            &rejections,
        );
        out
    }
}

fn queue_down(out: &mut String) {
    write_family(
        out,
        "gatehouse_queue_stats_up",
        "gauge",
        "Whether the queue gauges could be read from Redis.",
        &[(vec![], 0.0)],
    );
}

fn queue_families(out: &mut String, stats: &[QueueStats]) {
    let mut jobs = Vec::new();
    let mut dead = Vec::new();
    let mut workers = Vec::new();
    let mut tenants = Vec::new();
    for s in stats {
        for (state, n) in [("waiting", s.tenants_waiting), ("capped", s.tenants_capped)] {
            tenants.push((
                vec![("queue", s.queue.as_str()), ("state", state)],
                n as f64,
            ));
        }
        for (state, n) in [
            ("pending", s.pending),
            ("retrying", s.retrying),
            ("in_flight", s.in_flight),
            ("done", s.done),
        ] {
            jobs.push((
                vec![("queue", s.queue.as_str()), ("state", state)],
                n as f64,
            ));
        }
        dead.push((vec![("queue", s.queue.as_str())], s.dead as f64));
        workers.push((vec![("queue", s.queue.as_str())], s.workers as f64));
    }
    write_family(
        out,
        "gatehouse_queue_jobs",
        "gauge",
        "Jobs in each queue by state (pending, retrying, in_flight, done), read from Redis at scrape time.",
        &jobs,
    );
    write_family(
        out,
        "gatehouse_dead_letters",
        "gauge",
        "Dead-lettered jobs in each queue, read from Redis at scrape time.",
        &dead,
    );
    write_family(
        out,
        "gatehouse_queue_workers",
        "gauge",
        "Registered worker instances per queue.",
        &workers,
    );
    write_family(
        out,
        "gatehouse_queue_tenants",
        "gauge",
        "Tenants per queue with jobs waiting (waiting), and with jobs held back at their cap of jobs in flight (capped); read from Redis at scrape time.",
        &tenants,
    );
}
