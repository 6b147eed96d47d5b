//! Figure 10: tenant fairness (issue 19). A noisy tenant's `inbound_message` backlog, then a
//! quiet tenant's few messages, enqueued into a running `gatehouse work` process with
//! `QUEUE_ORDER=fair` against `QUEUE_ORDER=fifo` (the order before fairness), alternating in one
//! run: the quiet tenant's completion times from its enqueue (each job's `done_at`, Redis
//! time), and the whole drain's jobs/s. Then the cap's accuracy: three `gatehouse work`
//! processes with `TENANT_MAX_IN_FLIGHT_INBOUND_MESSAGE`, counted by the LLM the handlers call
//! (a loopback fake that counts each tenant's calls in flight), not by gatehouse.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gatehouse_jobs::{InboundMessage, Job as _};
use uuid::Uuid;

use crate::env::{BenchEnv, kill};
use crate::worker::{message, reset, stored_messages};

/// One drain's result.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    pub fifo: bool,
    /// The quiet tenant's completion times from its enqueue, ms.
    pub quiet_p50_ms: f64,
    pub quiet_p99_ms: f64,
    /// The whole backlog's jobs/s, from the 5 % mark to the last job.
    pub jobs_per_s: f64,
}

/// The cap's accuracy: the most of one tenant's LLM calls ever in flight at once.
#[derive(Debug, Clone, Copy)]
pub struct CapRun {
    pub cap: u32,
    pub processes: usize,
    pub most_in_flight: usize,
    pub jobs: u64,
}

/// Figure 10's drains: `runs` × (fair, fifo), alternating.
pub async fn drains(
    env: &BenchEnv,
    noisy: u64,
    quiet: u64,
    runs: usize,
) -> anyhow::Result<Vec<Drain>> {
    let a = env.try_create_tenant().await?;
    let b = env.try_create_tenant().await?;
    let mut out = Vec::new();
    for run in 0..runs {
        for fifo in [false, true] {
            crate::progress(&format!(
                "figure 10: run {}/{runs}, {} order, {noisy} + {quiet} jobs",
                run + 1,
                if fifo { "fifo" } else { "fair" }
            ));
            out.push(drain(env, a, b, noisy, quiet, fifo).await?);
        }
    }
    Ok(out)
}

async fn enqueue(env: &BenchEnv, tenant: Uuid, n: u64, from: u64) -> anyhow::Result<Vec<String>> {
    let jobs: Vec<InboundMessage> = (from..from + n).map(|i| message(tenant, i)).collect();
    Ok(env
        .queues()
        .enqueue_batch(&mut env.redis.clone(), &jobs)
        .await?)
}

/// Redis server time, ms.
async fn redis_now_ms(env: &BenchEnv) -> anyhow::Result<f64> {
    let (s, us): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut env.redis.clone())
        .await?;
    Ok(s as f64 * 1000.0 + us as f64 / 1000.0)
}

async fn drain(
    env: &BenchEnv,
    a: Uuid,
    b: Uuid,
    noisy: u64,
    quiet: u64,
    fifo: bool,
) -> anyhow::Result<Drain> {
    reset(env).await?;
    // A running worker (its start-up is not the quiet tenant's wait): one job through it
    // first, then the noisy backlog, then the quiet tenant's jobs, as on a live system.
    let order = if fifo { "fifo" } else { "fair" };
    let mut worker = env.gatehouse(&["work"], &[("QUEUE_ORDER", order)])?;
    let warm = async {
        enqueue(env, a, 1, 0).await?;
        let ready = crate::env::wait_until(Duration::from_secs(60), || async {
            crate::worker::done_count(env).await.is_ok_and(|n| n >= 1)
        })
        .await;
        anyhow::ensure!(ready, "the worker did not take a job within 60 s");
        enqueue(env, a, noisy, 1).await?;
        let enqueued_at = redis_now_ms(env).await?;
        let quiet_ids = enqueue(env, b, quiet, noisy + 1).await?;
        Ok((enqueued_at, quiet_ids))
    }
    .await;
    let (enqueued_at, quiet_ids) = match warm {
        Ok(warm) => warm,
        Err(error) => {
            kill(&mut worker);
            return Err(error);
        }
    };
    let total = 1 + noisy + quiet;
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut mark: Option<(Instant, u64)> = None;
        loop {
            let done = crate::worker::done_count(env).await?;
            let now = Instant::now();
            if mark.is_none() && done >= total / 20 {
                mark = Some((now, done));
            }
            if done >= total {
                let (t0, n0) = mark.unwrap_or((now, done));
                let seconds = now.duration_since(t0).as_secs_f64();
                break Ok::<f64, anyhow::Error>(if seconds > 0.0 {
                    (done - n0) as f64 / seconds
                } else {
                    f64::NAN
                });
            }
            anyhow::ensure!(now < deadline, "the backlog did not drain within 300 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    .await;
    kill(&mut worker);
    let jobs_per_s = result?;
    let stored = stored_messages(&env.pool).await?;
    anyhow::ensure!(
        stored as u64 >= total,
        "{total} jobs done but {stored} messages stored"
    );
    let keys = env.queues().keys(InboundMessage::QUEUE);
    let metas: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(keys.meta())
        .arg(&quiet_ids)
        .query_async(&mut env.redis.clone())
        .await?;
    let mut waits: Vec<f64> = metas
        .iter()
        .filter_map(|raw| {
            let meta = gatehouse::queue::keys::JobMeta::parse(raw.as_deref());
            let done_at: f64 = meta.get("done_at")?.parse().ok()?;
            Some(done_at - enqueued_at)
        })
        .collect();
    anyhow::ensure!(
        waits.len() as u64 == quiet,
        "only {} of the quiet tenant's {quiet} jobs have a done_at",
        waits.len()
    );
    waits.sort_by(f64::total_cmp);
    let at = |q: f64| waits[((q * waits.len() as f64).ceil() as usize).clamp(1, waits.len()) - 1];
    Ok(Drain {
        fifo,
        quiet_p50_ms: at(0.50),
        quiet_p99_ms: at(0.99),
        jobs_per_s,
    })
}

/// Calls in flight now and the most ever, per tenant marker.
#[derive(Clone, Default)]
struct InFlight(Arc<Mutex<HashMap<Uuid, (usize, usize)>>>);

impl InFlight {
    fn enter(&self, tenant: Uuid) {
        if let Ok(mut m) = self.0.lock() {
            let e = m.entry(tenant).or_default();
            e.0 += 1;
            e.1 = e.1.max(e.0);
        }
    }
    fn leave(&self, tenant: Uuid) {
        if let Ok(mut m) = self.0.lock()
            && let Some(e) = m.get_mut(&tenant)
        {
            e.0 = e.0.saturating_sub(1);
        }
    }
    fn most(&self, tenant: Uuid) -> usize {
        self.0
            .lock()
            .map(|m| m.get(&tenant).map_or(0, |e| e.1))
            .unwrap_or(0)
    }
}

/// A chat-completions fake on loopback that answers after `delay`, counting each tenant's calls
/// in flight by the tenant id the message text carries.
async fn counting_llm(delay: Duration, tenants: Vec<Uuid>) -> anyhow::Result<(String, InFlight)> {
    let seen = InFlight::default();
    let counted = seen.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |request: String| {
            let counted = counted.clone();
            let tenant = tenants
                .iter()
                .copied()
                .find(|t| request.contains(&t.simple().to_string()));
            async move {
                struct Leave(InFlight, Option<Uuid>);
                impl Drop for Leave {
                    fn drop(&mut self) {
                        if let Some(t) = self.1 {
                            self.0.leave(t);
                        }
                    }
                }
                if let Some(t) = tenant {
                    counted.enter(t);
                }
                let _leave = Leave(counted.clone(), tenant);
                tokio::time::sleep(delay).await;
                axum::Json(gatehouse_testenv::confident_order_status())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}/v1"), seen))
}

/// The cap's accuracy: `jobs` of one tenant (and as many of another, uncapped by default the
/// same way) through three `gatehouse work` processes of `WORKER_CONCURRENCY=8` each, with
/// `TENANT_MAX_IN_FLIGHT_INBOUND_MESSAGE=cap`; the LLM answers after 20 ms.
pub async fn cap_accuracy(env: &BenchEnv, cap: u32, jobs: u64) -> anyhow::Result<CapRun> {
    let a = env.try_create_tenant().await?;
    let b = env.try_create_tenant().await?;
    reset(env).await?;
    let (url, seen) = counting_llm(Duration::from_millis(20), vec![a, b]).await?;
    // The message text carries its tenant, so the fake can tell whose call it is.
    let with_marker = |tenant: Uuid, i: u64| InboundMessage {
        body: format!("order {} of {}", i, tenant.simple()),
        ..message(tenant, i)
    };
    let jobs_a: Vec<InboundMessage> = (0..jobs).map(|i| with_marker(a, i)).collect();
    let jobs_b: Vec<InboundMessage> = (0..jobs).map(|i| with_marker(b, i)).collect();
    let queues = env.queues();
    queues
        .enqueue_batch(&mut env.redis.clone(), &jobs_a)
        .await?;
    queues
        .enqueue_batch(&mut env.redis.clone(), &jobs_b)
        .await?;
    let cap_s = cap.to_string();
    let vars = [
        ("LLM_URL", url.as_str()),
        ("LLM_MODEL", "bench-model"),
        ("TENANT_MAX_IN_FLIGHT_INBOUND_MESSAGE", cap_s.as_str()),
        ("WORKER_CONCURRENCY", "8"),
    ];
    let mut workers = (0..3)
        .map(|_| env.gatehouse(&["work"], &vars))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let total = 2 * jobs;
    let drained = crate::env::wait_until(Duration::from_secs(300), || async {
        stored_messages(&env.pool)
            .await
            .is_ok_and(|n| n as u64 >= total)
    })
    .await;
    for worker in &mut workers {
        kill(worker);
    }
    anyhow::ensure!(drained, "the capped backlog did not drain within 300 s");
    Ok(CapRun {
        cap,
        processes: 3,
        most_in_flight: seen.most(a).max(seen.most(b)),
        jobs: total,
    })
}

/// Figure 10, both parts.
pub async fn figure10(
    env: &BenchEnv,
    noisy: u64,
    quiet: u64,
    cap_jobs: u64,
    runs: usize,
) -> anyhow::Result<(Vec<Drain>, CapRun)> {
    let drains = drains(env, noisy, quiet, runs)
        .await
        .context("figure 10 drains")?;
    crate::progress("figure 10: the cap's accuracy, 3 processes");
    let cap = cap_accuracy(env, 4, cap_jobs)
        .await
        .context("figure 10 cap")?;
    Ok((drains, cap))
}
