//! A closed-loop HTTP load generator for loopback: `concurrency` connections each send the
//! next prepared request as soon as the previous answer arrives, until the requests or the
//! time run out. Latencies are recorded after a warm-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One request, ready to send.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub post: bool,
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Prepared {
    /// A GET as a TLS-terminating proxy on loopback forwards it.
    pub fn get(path: &str) -> Self {
        Self {
            post: false,
            path: path.to_owned(),
            headers: vec![("x-forwarded-proto", "https".to_owned())],
            body: String::new(),
        }
    }
}

/// What a load run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadResult {
    /// Requests answered 2xx after the warm-up.
    pub ok: u64,
    /// Requests answered otherwise (or failed) after the warm-up.
    pub errors: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Every request sent, warm-up included.
    pub sent: u64,
    /// CPU time the server process used per request sent, in microseconds (NaN if unknown).
    pub server_cpu_us_per_request: f64,
    /// Redis's CPU time per request sent, in microseconds (NaN where not measured).
    pub redis_cpu_us_per_request: f64,
    /// This process's CPU time (the load generator) per request sent, in microseconds (NaN
    /// where not measured).
    pub client_cpu_us_per_request: f64,
    /// Redis script calls per request sent (NaN where not measured).
    pub script_calls_per_request: f64,
}

impl LoadResult {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.seconds.max(1e-9)
    }
}

/// A keep-alive HTTP/1.1 client for loopback.
pub fn client(concurrency: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// Sends `requests` (each at most once, in order) to `base` with `concurrency` loops for
/// `warmup + duration` at most; latencies count only after the warm-up.
pub async fn run(
    client: &reqwest::Client,
    base: &str,
    requests: Arc<Vec<Prepared>>,
    cycle: bool,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    let cursor = Cursor::new(requests, cycle);
    run_from(client, base, &cursor, concurrency, warmup, duration)
        .await
        .result()
}

/// Where a sequence of loads is in its prepared requests: each load takes the next ones, so
/// that several loads in turn (figure 4's slices) never send one request twice.
pub struct Cursor {
    requests: Arc<Vec<Prepared>>,
    next: Arc<AtomicUsize>,
    /// Start again from the first request when all were sent (else stop).
    cycle: bool,
}

impl Cursor {
    pub fn new(requests: Arc<Vec<Prepared>>, cycle: bool) -> Self {
        Self {
            requests,
            next: Arc::new(AtomicUsize::new(0)),
            cycle,
        }
    }
}

/// What one load measured, its latencies kept, so that several loads can be merged.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Microseconds, of the requests sent after the warm-up.
    pub latencies: Vec<u32>,
    pub ok: u64,
    pub errors: u64,
    pub seconds: f64,
    pub sent: u64,
}

impl Samples {
    /// Adds `other` (a later load of the same kind) to these.
    pub fn merge(&mut self, other: Samples) {
        self.latencies.extend(other.latencies);
        self.ok += other.ok;
        self.errors += other.errors;
        self.seconds += other.seconds;
        self.sent += other.sent;
    }

    /// The figures; the CPU columns are NaN until the caller measures them.
    pub fn result(mut self) -> LoadResult {
        self.latencies.sort_unstable();
        LoadResult {
            ok: self.ok,
            errors: self.errors,
            seconds: self.seconds,
            p50_ms: percentile(&self.latencies, 0.50),
            p99_ms: percentile(&self.latencies, 0.99),
            sent: self.sent,
            server_cpu_us_per_request: f64::NAN,
            redis_cpu_us_per_request: f64::NAN,
            client_cpu_us_per_request: f64::NAN,
            script_calls_per_request: f64::NAN,
        }
    }
}

/// [`run`] taking its requests from `cursor`, where the previous load left it.
pub async fn run_from(
    client: &reqwest::Client,
    base: &str,
    cursor: &Cursor,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Samples {
    let start = Instant::now();
    let measure_from = start + warmup;
    let deadline = measure_from + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let base = base.to_owned();
        let requests = cursor.requests.clone();
        let next = cursor.next.clone();
        let cycle = cursor.cycle;
        tasks.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::new();
            let mut ok = 0u64;
            let mut errors = 0u64;
            let mut sent_total = 0u64;
            loop {
                // Checked before a request is taken, so that none is taken and left unsent.
                let sent = Instant::now();
                if sent >= deadline {
                    break;
                }
                let mut i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests.len() {
                    if !cycle || requests.is_empty() {
                        break;
                    }
                    i %= requests.len();
                }
                sent_total += 1;
                let request = &requests[i];
                let url = format!("{base}{}", request.path);
                let mut builder = if request.post {
                    client.post(url).body(request.body.clone())
                } else {
                    client.get(url)
                };
                for (name, value) in &request.headers {
                    builder = builder.header(*name, value);
                }
                let success = match builder.send().await {
                    Ok(response) => {
                        let status = response.status();
                        // Read the body so the connection is reused.
                        let _ = response.bytes().await;
                        status.is_success()
                    }
                    Err(_) => false,
                };
                if sent >= measure_from {
                    let micros = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    latencies.push(micros);
                    if success {
                        ok += 1;
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, ok, errors, sent_total)
        }));
    }
    let mut samples = Samples::default();
    for task in tasks {
        if let Ok((latencies, ok, errors, sent)) = task.await {
            samples.latencies.extend(latencies);
            samples.sent += sent;
            samples.ok += ok;
            samples.errors += errors;
        }
    }
    let end = Instant::now().min(deadline);
    samples.seconds = end.saturating_duration_since(measure_from).as_secs_f64();
    samples
}

/// The `q` quantile (nearest rank) of sorted microsecond latencies, in milliseconds.
pub fn percentile(sorted_micros: &[u32], q: f64) -> f64 {
    if sorted_micros.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted_micros.len() as f64).ceil() as usize).clamp(1, sorted_micros.len());
    f64::from(sorted_micros[rank - 1]) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
