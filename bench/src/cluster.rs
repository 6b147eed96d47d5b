//! Figure 9 (issue 18): the queue's Redis side alone — enqueue, fetch and acknowledge with a
//! no-op handler, so PostgreSQL is out of the picture — on one Redis against a three-primary
//! Redis Cluster with `inbound_message` in three shards, consumer processes scaled 1 → 3, and
//! Redis's own CPU per job. Both topologies are private `redis-server`s on loopback, started
//! here and removed afterwards.
//!
//! A consumer is a process of this binary (`gatehouse-bench consume`) running gatehouse's queue
//! layer directly (`gatehouse::queue::consume`: register, fetch, ack) in [`LOOPS`] loops, each a
//! worker of its own, taking the shards in turn as `gatehouse work` does.

use std::time::{Duration, Instant};

use gatehouse::queue::consume::{self, Ack, Outcome};
use gatehouse::redis_conn::{RedisConn, RedisTarget};
use gatehouse_jobs::InboundMessage;
use gatehouse_jobs::client::Queues;
use gatehouse_jobs::keys::Layout;
use secrecy::SecretString;
use uuid::Uuid;

use crate::env::BenchEnv;

/// Fetch-and-acknowledge loops per consumer process.
const LOOPS: usize = 4;
/// Jobs per fetch.
const BATCH: usize = 64;
const QUEUE: &str = "inbound_message";

/// One measurement.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub cluster: bool,
    pub processes: usize,
    pub jobs_per_s: f64,
    /// Redis CPU (user + system, every node) per job over the measured window, µs.
    pub redis_cpu_us_per_job: f64,
    /// Jobs/s of the backlog's enqueue (one producer, pipelined) and Redis CPU per enqueued job.
    pub enqueue_per_s: f64,
    pub enqueue_cpu_us_per_job: f64,
}

fn target(seeds: &[String], cluster: bool) -> RedisTarget {
    let nodes: Vec<SecretString> = seeds
        .iter()
        .map(|s| SecretString::from(s.clone()))
        .collect();
    if cluster {
        RedisTarget::cluster(nodes)
    } else {
        RedisTarget::single(nodes.into_iter().next().unwrap_or_default())
    }
}

fn layout(namespace: &str, shards: u16) -> Layout {
    Layout::new(namespace).with_shards(QUEUE, shards)
}

/// The `consume` subcommand: fetch and acknowledge until SIGTERM.
pub async fn consume(
    seeds: Vec<String>,
    cluster: bool,
    namespace: String,
    shards: u16,
) -> anyhow::Result<()> {
    let conn = gatehouse::redis_conn::connect(&target(&seeds, cluster)).await?;
    let keys = layout(&namespace, shards).all(QUEUE);
    let mut loops = Vec::new();
    for _ in 0..LOOPS {
        let (mut conn, keys) = (conn.clone(), keys.clone());
        loops.push(tokio::spawn(async move {
            let name = format!("bench-{}", Uuid::new_v4().simple());
            for k in &keys {
                consume::register(&mut conn, k, &name).await?;
            }
            let mut turn = 0usize;
            let mut idle = 0usize;
            loop {
                let k = &keys[turn % keys.len()];
                turn += 1;
                let reply =
                    consume::fetch(&mut conn, k, consume::Fairness::default(), &name, BATCH)
                        .await?;
                let tasks = apalis_redis::queries::deserialize_with_meta(reply)?;
                if tasks.is_empty() {
                    idle += 1;
                    if idle >= keys.len() {
                        idle = 0;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    continue;
                }
                idle = 0;
                let acks: Vec<Ack> = tasks
                    .iter()
                    .map(|task| Ack::settled(task.task_id.to_string(), Outcome::Done, ""))
                    .collect();
                consume::ack(
                    &mut conn,
                    k,
                    consume::Fairness::default(),
                    &name,
                    Duration::from_secs(86_400),
                    &acks,
                )
                .await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        }));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    for task in loops {
        task.abort();
    }
    Ok(())
}

/// Redis's CPU seconds so far (user + system), summed over `nodes`.
async fn redis_cpu(nodes: &[String]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for url in nodes {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await?;
        for line in info.lines() {
            if let Some(v) = line
                .strip_prefix("used_cpu_sys:")
                .or_else(|| line.strip_prefix("used_cpu_user:"))
            {
                total += v.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Ok(total)
}

async fn flush(nodes: &[String]) -> anyhow::Result<()> {
    for url in nodes {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        // A replica-less cluster primary or a single server: FLUSHALL empties it.
        let () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
    }
    Ok(())
}

async fn done(conn: &mut RedisConn, layout: &Layout) -> anyhow::Result<u64> {
    let mut total = 0;
    for keys in layout.all(QUEUE) {
        let n: u64 = redis::cmd("ZCARD")
            .arg(keys.done())
            .query_async(conn)
            .await?;
        total += n;
    }
    Ok(total)
}

/// One measurement: `backlog` jobs of many tenants enqueued, `processes` consumers started,
/// jobs/s between 5 % and 95 % of the backlog and Redis CPU over the same window.
async fn measure(
    env: &BenchEnv,
    nodes: &[String],
    cluster: bool,
    processes: usize,
    backlog: u64,
) -> anyhow::Result<Run> {
    flush(nodes).await?;
    let shards: u16 = if cluster { 3 } else { 1 };
    let layout = layout(&env.namespace, shards);
    let mut conn = gatehouse::redis_conn::connect(&target(nodes, cluster)).await?;
    let queues =
        Queues::with_layout(layout.clone()).sealing_with(env.config.keyring.current().clone());
    let jobs: Vec<InboundMessage> = (0..backlog)
        .map(|i| crate::worker::message(Uuid::new_v4(), i))
        .collect();
    let (cpu0, t0) = (redis_cpu(nodes).await?, Instant::now());
    queues.enqueue_batch(&mut conn, &jobs).await?;
    let enqueue_per_s = backlog as f64 / t0.elapsed().as_secs_f64().max(1e-6);
    let enqueue_cpu_us_per_job = (redis_cpu(nodes).await? - cpu0) * 1e6 / backlog.max(1) as f64;
    let shards_arg = shards.to_string();
    let seeds = nodes.join(",");
    let mut args = vec![
        "consume",
        "--seeds",
        seeds.as_str(),
        "--namespace",
        env.namespace.as_str(),
        "--shards",
        shards_arg.as_str(),
    ];
    if cluster {
        args.push("--cluster");
    }
    let mut children = Vec::new();
    for _ in 0..processes {
        children.push(env.myself(&args, &[])?);
    }
    let (from, until) = (backlog / 20, backlog - backlog / 20);
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut start: Option<(Instant, u64, f64)> = None;
    let result = loop {
        let n = done(&mut conn, &layout).await?;
        let now = Instant::now();
        match start {
            None if n >= from => start = Some((now, n, redis_cpu(nodes).await?)),
            Some((t0, n0, cpu0)) if n >= until => {
                let cpu = redis_cpu(nodes).await? - cpu0;
                let jobs = (n - n0).max(1) as f64;
                break Ok(Run {
                    cluster,
                    processes,
                    jobs_per_s: jobs / (now - t0).as_secs_f64().max(1e-6),
                    redis_cpu_us_per_job: cpu * 1e6 / jobs,
                    enqueue_per_s,
                    enqueue_cpu_us_per_job,
                });
            }
            _ if now > give_up => break Err(anyhow::anyhow!("the backlog did not drain in 120 s")),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for child in &mut children {
        crate::env::terminate(child);
    }
    result
}

/// Figure 9: every topology and process count, `runs` times, alternating topologies.
pub async fn figure9(env: &BenchEnv, backlog: u64, runs: usize) -> anyhow::Result<Vec<Run>> {
    let dir = std::env::temp_dir().join(format!("ghbench-single-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let dir_arg = dir.to_string_lossy().into_owned();
    let mut single = gatehouse_testenv::RedisServer::new(
        gatehouse_testenv::try_free_port()?,
        &["--save", "", "--appendonly", "no", "--dir", &dir_arg],
    );
    single.start().await?;
    let cluster = gatehouse_testenv::LocalCluster::start(3, 0).await?;
    let single_nodes = vec![single.url()];
    let cluster_nodes: Vec<String> = cluster.seeds().split(',').map(str::to_owned).collect();
    let mut out = Vec::new();
    for run in 0..runs {
        for processes in 1..=3 {
            for (nodes, is_cluster) in [(&single_nodes, false), (&cluster_nodes, true)] {
                crate::progress(&format!(
                    "run {}/{runs}: queue Redis side, {}, {processes} consumer process(es)",
                    run + 1,
                    if is_cluster {
                        "3-primary cluster, 3 shards"
                    } else {
                        "one Redis"
                    }
                ));
                let r = measure(env, nodes, is_cluster, processes, backlog).await?;
                eprintln!(
                    "    fetch+ack {:.0} jobs/s, Redis CPU {:.1} µs/job; enqueue {:.0} jobs/s, {:.1} µs/job",
                    r.jobs_per_s, r.redis_cpu_us_per_job, r.enqueue_per_s, r.enqueue_cpu_us_per_job
                );
                out.push(r);
            }
        }
    }
    single.terminate();
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}
