//! `gatehouse-bench`: the system figures of BENCHMARKS.md, each measured against its
//! baseline in the same run, on the same PostgreSQL and Redis, medians over repeated runs.
//!
//! It creates its own database (`gh_bench_*`) and Redis namespace (`ghbench-*`) and removes
//! both afterwards; every load is bounded in count and time and sent to 127.0.0.1 only. The
//! outage drill (`outage`, not part of `all`) restarts only a private `redis-server` of its own.
//! `gatehouse work` is the release binary built next to this one.

mod cluster;
mod cpu;
mod env;
mod fairness;
mod flood;

/// The same allocator as the `gatehouse` binary, so that the ingress figure's two servers (both
/// in this process image) and gatehouse in production allocate alike.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod ingress;
mod load;
mod outage;
mod pgbench;
mod report;
mod storage;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::env::BenchEnv;
use crate::ingress::{IngressPlan, ServerKind};
use crate::report::Report;
use crate::worker::{Consumer, Window};

/// Jobs in flight per worker, for gatehouse (`WORKER_CONCURRENCY`, its default) and the
/// bare baselines alike (the one-UPDATE worker also at 4, its best: figure 1).
pub const WORKER_CONCURRENCY: usize = gatehouse::config::DEFAULT_WORKER_CONCURRENCY;

#[derive(Parser)]
#[command(
    name = "gatehouse-bench",
    about = "gatehouse against its baselines, side by side"
)]
struct Cli {
    /// Repetitions of every measurement; figures are medians.
    #[arg(long, global = true, default_value_t = 3)]
    runs: usize,
    /// Also write the results as a markdown block to this file.
    #[arg(long, global = true)]
    markdown: Option<PathBuf>,
    /// Override the small backlog (default 5000).
    #[arg(long, global = true)]
    small_backlog: Option<u64>,
    /// Override the large backlog (default 50000).
    #[arg(long, global = true)]
    large_backlog: Option<u64>,
    /// Override the seconds each ingress load runs after its warm-up (default 5).
    #[arg(long, global = true)]
    ingress_seconds: Option<u64>,
    /// Override the jobs figure 7 processes (default 100000, read every quarter).
    #[arg(long, global = true)]
    memory_jobs: Option<u64>,
    /// Override the sealed values figure 6 re-encrypts (default 50000).
    #[arg(long, global = true)]
    reencrypt_rows: Option<u64>,
    /// Override figure 6's batch size, the job's `KEY_ROTATION_BATCH_SIZE` and the SQL-only
    /// floor's (default: gatehouse's default).
    #[arg(long, global = true)]
    reencrypt_batch: Option<usize>,
    /// Override the forged webhooks of each figure 8 flood (default 20000).
    #[arg(long, global = true)]
    flood_forged: Option<usize>,
    /// Override the wrong-password logins of figure 8's login flood (default 2000).
    #[arg(long, global = true)]
    flood_logins: Option<usize>,
    /// Override the forged webhooks figure 8 keeps in flight (default 64).
    #[arg(long, global = true)]
    flood_concurrency: Option<usize>,
    /// Override the outage drill's signed webhooks during the PostgreSQL outage (default 10000).
    #[arg(long, global = true)]
    outage_webhooks: Option<usize>,
    /// Override the outage drill's PostgreSQL outage, in seconds (default 60).
    #[arg(long, global = true)]
    outage_seconds: Option<u64>,
    /// Override the jobs the outage drill's Redis restart happens under (default 20000).
    #[arg(long, global = true)]
    outage_jobs: Option<usize>,
    /// Override the ballast keys the outage drill's Redis reloads (default 1500000).
    #[arg(long, global = true)]
    outage_ballast: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every system figure (1–8).
    All,
    /// Figures 1–3: worker throughput, backlog sensitivity, scale-out.
    Worker,
    /// Figure 4: signed-webhook ingress against a bare enqueue-only handler.
    Ingress,
    /// Figure 5: `/healthz` and webhook p99 during a bounded argon2 login flood.
    Login,
    /// Figure 6: re-encryption rows/s (`rotate_keys` in a worker process, and its baselines).
    Reencrypt,
    /// Figure 7: Redis memory after processed jobs.
    Memory,
    /// Figure 8: forged-webhook and login floods through `gatehouse serve` + `gatehouse work`:
    /// genuine traffic's latency, rows, Redis keys and Sentry events per flood, legitimate
    /// requests refused.
    Flood,
    /// The outage drill of issue 14 (not part of `all`): a 60 s PostgreSQL outage under
    /// 10,000 arriving webhooks, and a Redis restart (AOF, reloading) under a 20,000-job drain,
    /// against `gatehouse serve` + `gatehouse work`. Pass/fail per requirement; exits 1 if
    /// any fails.
    Outage,
    /// Figure 9 (not part of `all`): the queue's Redis side alone (enqueue, fetch, ack, no-op
    /// handler) on one Redis against a three-primary cluster with three shards, consumer
    /// processes 1 → 3, and Redis CPU per job. Starts its own private servers.
    Cluster,
    /// Figure 10: tenant fairness. A noisy tenant's 20,000-job backlog, then 200 jobs of a
    /// quiet one, through `gatehouse work` with `QUEUE_ORDER=fair` against `fifo`: the quiet
    /// tenant's completion times and the drain's jobs/s; then a tenant cap's accuracy over
    /// three worker processes.
    Fairness,
    /// Every figure at a toy size, once: checks the harness works (no timing claims).
    Smoke,
    /// Internal: one figure 9 consumer process.
    #[command(hide = true)]
    Consume {
        #[arg(long)]
        seeds: String,
        #[arg(long)]
        cluster: bool,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        shards: u16,
    },
    /// Prints figure 1's pgbench script (`bench/pgbench/inbound_message.sql`), rendered from
    /// the worker's own statement.
    #[command(hide = true)]
    PgbenchScript,
    /// Internal: one ingress server process on 127.0.0.1.
    #[command(hide = true)]
    Server {
        #[arg(long, value_enum)]
        kind: ServerKind,
        #[arg(long)]
        port: u16,
    },
}

/// Sizes of one invocation.
#[derive(Debug, Clone, Copy)]
struct Plan {
    runs: usize,
    small: u64,
    large: u64,
    window_jobs: u64,
    cap: Duration,
    ingress: IngressPlan,
    reencrypt_rows: u64,
    reencrypt_batch: usize,
    memory_total: u64,
    memory_step: u64,
    memory_budget: Duration,
    flood: flood::FloodPlan,
    outage: outage::OutagePlan,
    fairness: FairnessPlan,
}

/// Figure 10's sizes.
#[derive(Debug, Clone, Copy)]
struct FairnessPlan {
    noisy: u64,
    quiet: u64,
    cap_jobs: u64,
}

impl Plan {
    fn full(runs: usize) -> Self {
        Self {
            runs: runs.max(1),
            small: 5_000,
            large: 50_000,
            window_jobs: 20_000,
            cap: Duration::from_secs(15),
            ingress: IngressPlan {
                concurrency: 16,
                warmup: Duration::from_secs(1),
                duration: Duration::from_secs(5),
                slice: Duration::from_millis(500),
                max_requests: 150_000,
            },
            // Large enough that a fresh connection's first statements (catalog caches, plans:
            // ~15 ms) and the job's start and end weigh little: 10k rows take ~0.1 s.
            reencrypt_rows: 50_000,
            reencrypt_batch: gatehouse::config::DEFAULT_KEY_ROTATION_BATCH_SIZE,
            memory_total: 100_000,
            memory_step: 25_000,
            memory_budget: Duration::from_secs(300),
            flood: flood::FloodPlan::full(),
            outage: outage::OutagePlan::full(),
            fairness: FairnessPlan {
                noisy: 20_000,
                quiet: 200,
                cap_jobs: 1_000,
            },
        }
    }

    fn smoke() -> Self {
        Self {
            runs: 1,
            small: 200,
            large: 400,
            window_jobs: 1_000,
            cap: Duration::from_secs(5),
            ingress: IngressPlan {
                concurrency: 4,
                warmup: Duration::from_millis(200),
                duration: Duration::from_millis(800),
                slice: Duration::from_millis(400),
                max_requests: 20_000,
            },
            reencrypt_rows: 200,
            reencrypt_batch: gatehouse::config::DEFAULT_KEY_ROTATION_BATCH_SIZE,
            memory_total: 200,
            memory_step: 100,
            memory_budget: Duration::from_secs(60),
            flood: flood::FloodPlan::smoke(),
            // The drill is not part of the smoke run (nor of `all`).
            outage: outage::OutagePlan::full(),
            fairness: FairnessPlan {
                noisy: 400,
                quiet: 20,
                cap_jobs: 40,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Figures {
    All,
    Worker,
    Ingress,
    Login,
    Reencrypt,
    Memory,
    Flood,
    /// Only by name: never part of `All`.
    Outage,
    /// Only by name: never part of `All`.
    Cluster,
    Fairness,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let smoke = matches!(cli.command, Command::Smoke);
    let (figures, plan) = match cli.command {
        Command::Server { kind, port } => return runtime.block_on(ingress::serve(kind, port)),
        Command::PgbenchScript => {
            print!("{}", pgbench::render());
            return Ok(());
        }
        Command::Consume {
            seeds,
            cluster,
            namespace,
            shards,
        } => {
            let seeds = seeds.split(',').map(str::to_owned).collect();
            return runtime.block_on(cluster::consume(seeds, cluster, namespace, shards));
        }
        Command::Cluster => (Figures::Cluster, Plan::full(cli.runs)),
        Command::Fairness => (Figures::Fairness, Plan::full(cli.runs)),
        Command::All => (Figures::All, Plan::full(cli.runs)),
        Command::Worker => (Figures::Worker, Plan::full(cli.runs)),
        Command::Ingress => (Figures::Ingress, Plan::full(cli.runs)),
        Command::Login => (Figures::Login, Plan::full(cli.runs)),
        Command::Reencrypt => (Figures::Reencrypt, Plan::full(cli.runs)),
        Command::Memory => (Figures::Memory, Plan::full(cli.runs)),
        Command::Flood => (Figures::Flood, Plan::full(cli.runs)),
        Command::Outage => (Figures::Outage, Plan::full(cli.runs)),
        Command::Smoke => (Figures::All, Plan::smoke()),
    };
    let mut plan = plan;
    if let Some(n) = cli.small_backlog {
        plan.small = n.max(20);
    }
    if let Some(n) = cli.large_backlog {
        plan.large = n.max(20);
    }
    if let Some(s) = cli.ingress_seconds {
        plan.ingress.duration = Duration::from_secs(s.max(1));
    }
    if let Some(n) = cli.reencrypt_rows {
        plan.reencrypt_rows = n.max(2);
    }
    if let Some(n) = cli.reencrypt_batch {
        plan.reencrypt_batch = n.clamp(1, 10_000);
    }
    if let Some(n) = cli.memory_jobs {
        plan.memory_total = n.max(4);
        plan.memory_step = (n / 4).max(1);
    }
    if let Some(n) = cli.flood_forged {
        plan.flood.forged = n.max(1);
    }
    if let Some(n) = cli.flood_logins {
        plan.flood.logins = n.max(1);
    }
    if let Some(n) = cli.flood_concurrency {
        plan.flood.forged_concurrency = n.max(1);
    }
    if let Some(n) = cli.outage_webhooks {
        plan.outage.webhooks = n.max(1);
    }
    if let Some(s) = cli.outage_seconds {
        plan.outage.outage = Duration::from_secs(s.max(2));
    }
    if let Some(n) = cli.outage_jobs {
        plan.outage.jobs = n.max(10);
    }
    if let Some(n) = cli.outage_ballast {
        plan.outage.ballast = n;
    }
    let report = runtime.block_on(async {
        let env = BenchEnv::new().await?;
        eprintln!(
            "bench database {}, namespace {} (both removed at the end)",
            env.db_name, env.namespace
        );
        let result = run(&env, figures, plan).await;
        env.cleanup().await;
        result
    })?;
    let markdown = report.markdown();
    println!("{markdown}");
    if let Some(path) = cli.markdown {
        std::fs::write(&path, &markdown)
            .with_context(|| format!("failed to write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if report.drill_failed() {
        eprintln!("the drill failed: see the requirements marked FAIL above");
        std::process::exit(1);
    }
    if report.any_failed() {
        eprintln!("a figure could not be measured: see the notes above");
        std::process::exit(1);
    }
    // A figure that misses its target fails the run, so a regression shows the moment someone
    // runs the bench; the smoke run's toy sizes claim nothing, so it only checks the harness.
    let missed = report.missed();
    if !smoke && !missed.is_empty() {
        eprintln!("targets missed ({}):", missed.len());
        for figure in missed {
            eprintln!("  {figure}");
        }
        std::process::exit(1);
    }
    Ok(())
}

/// One load run's figures, on stderr as the run goes.
fn print_load(r: &load::LoadResult) {
    eprintln!(
        "    {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
        r.rps(),
        r.p50_ms,
        r.p99_ms,
        r.errors
    );
}

fn progress(what: &str) {
    eprintln!(
        "[{}] {what}",
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    );
}

async fn run(env: &BenchEnv, figures: Figures, plan: Plan) -> anyhow::Result<Report> {
    let mut report = Report::new(plan.runs);
    let tenant = worker::prepare(env).await?;
    let wants = |f: Figures| {
        (figures == Figures::All && !matches!(f, Figures::Outage | Figures::Cluster))
            || figures == f
    };

    if wants(Figures::Worker) {
        let result: anyhow::Result<()> = async {
            let consumers = [
                Consumer::Gatehouse(1),
                Consumer::GatehouseAlone,
                Consumer::BareNoop,
                Consumer::BareUpdate(crate::WORKER_CONCURRENCY),
                Consumer::BareUpdate(4),
                Consumer::Pgbench,
            ];
            let mut samples = report::WorkerSamples::default();
            for run in 0..plan.runs {
                for backlog in [plan.small, plan.large] {
                    let window = Window::for_backlog(backlog, plan.window_jobs, plan.cap);
                    for consumer in consumers {
                        progress(&format!(
                            "run {}/{}: {} at a backlog of {backlog}",
                            run + 1,
                            plan.runs,
                            consumer.label()
                        ));
                        if consumer == Consumer::Pgbench {
                            // The SQL floor: as many transactions as the window times.
                            let jobs = window.until - window.warmup;
                            let f = pgbench::run(env, tenant, jobs, crate::WORKER_CONCURRENCY)
                                .await?;
                            eprintln!(
                                "    {:.0} transactions/s ({} transactions); CPU per transaction: PostgreSQL {:.0} µs, pgbench {:.0} µs",
                                f.tps, f.transactions, f.cpu.postgres_us, f.cpu.consumer_us
                            );
                            samples.push(consumer, backlog == plan.large, run, f.tps);
                            samples.push_cpu(consumer, backlog == plan.large, f.cpu);
                            continue;
                        }
                        let t = worker::measure(env, tenant, consumer, backlog, window).await?;
                        eprintln!(
                            "    {:.0} jobs/s ({} jobs in {:.2} s); per job: {:.2} commits, {:.2} rows written",
                            t.jobs_per_s, t.jobs, t.seconds, t.commits_per_job, t.rows_per_job
                        );
                        eprintln!(
                            "    CPU per job: PostgreSQL {:.0} µs, Redis {:.0} µs, consumer {:.0} µs",
                            t.cpu.postgres_us, t.cpu.redis_us, t.cpu.consumer_us
                        );
                        samples.push(consumer, backlog == plan.large, run, t.jobs_per_s);
                        samples.push_pg(consumer, t.commits_per_job, t.rows_per_job);
                        samples.push_cpu(consumer, backlog == plan.large, t.cpu);
                    }
                }
                let window = Window::for_backlog(plan.large, plan.window_jobs, plan.cap);
                progress(&format!(
                    "run {}/{}: gatehouse work ×2 at a backlog of {}",
                    run + 1,
                    plan.runs,
                    plan.large
                ));
                let t =
                    worker::measure(env, tenant, Consumer::Gatehouse(2), plan.large, window).await?;
                eprintln!("    {:.0} jobs/s", t.jobs_per_s);
                samples.push(Consumer::Gatehouse(2), true, run, t.jobs_per_s);
            }
            report.worker(&samples, plan.small, plan.large);
            Ok(())
        }
        .await;
        if let Err(error) = result {
            eprintln!("figures 1–3 (worker) failed: {error:#}");
            report.failed("figures 1–3 (worker)", &error);
        }
    }

    if wants(Figures::Ingress) {
        let result: anyhow::Result<()> = async {
            let mut gatehouse = Vec::new();
            let mut bare = Vec::new();
            for run in 0..plan.runs {
                progress(&format!(
                    "run {}/{}: webhook ingress, gatehouse and bare taking turns",
                    run + 1,
                    plan.runs
                ));
                let (g, b) = ingress::webhook_pair(env, tenant, plan.ingress).await?;
                eprintln!("    this run: {:.3}× the bare handler", g.rps() / b.rps());
                for (kind, r, into) in [("gatehouse", g, &mut gatehouse), ("bare", b, &mut bare)] {
                    eprint!("  {kind}:");
                    print_load(&r);
                    into.push(r);
                }
            }
            report.ingress(&gatehouse, &bare, plan.ingress.concurrency);
            // Figure 4b: what waiting for a replica costs (a private primary and replica).
            let replicated = gatehouse_testenv::ReplicatedRedis::start().await?;
            let (mut plain, mut acked) = (Vec::new(), Vec::new());
            for run in 0..plan.runs {
                for (wait, into) in [(false, &mut plain), (true, &mut acked)] {
                    progress(&format!(
                        "run {}/{}: webhook ingress on a primary with a replica, REDIS_MIN_REPLICA_ACKS={}",
                        run + 1,
                        plan.runs,
                        u8::from(wait)
                    ));
                    let r =
                        ingress::replica_ack_run(env, tenant, &replicated, wait, plan.ingress)
                            .await?;
                    print_load(&r);
                    into.push(r);
                }
            }
            report.replica_acks(&acked, &plain, plan.ingress.concurrency);
            Ok(())
        }
        .await;
        if let Err(error) = result {
            eprintln!("figure 4 (ingress) failed: {error:#}");
            report.failed("figure 4 (ingress)", &error);
        }
    }

    if wants(Figures::Login) {
        let result: anyhow::Result<()> = async {
            env.create_user().await?;
            let mut quiet = Vec::new();
            let mut flooded = Vec::new();
            for run in 0..plan.runs {
                for (flood, into) in [(false, &mut quiet), (true, &mut flooded)] {
                    progress(&format!(
                        "run {}/{}: /healthz and webhook p99, login flood {}",
                        run + 1,
                        plan.runs,
                        if flood { "on" } else { "off" }
                    ));
                    let r = ingress::login_run(env, tenant, flood, plan.ingress).await?;
                    eprintln!(
                        "    healthz p99 {:.2} ms, webhook p99 {:.2} ms, logins {} ({:.1}/s)",
                        r.healthz.p99_ms,
                        r.webhook.p99_ms,
                        r.logins.ok,
                        r.logins.rps()
                    );
                    into.push(r);
                }
            }
            report.login(&quiet, &flooded);
            Ok(())
        }
        .await;
        if let Err(error) = result {
            eprintln!("figure 5 (login flood) failed: {error:#}");
            report.failed("figure 5 (login flood)", &error);
        }
    }

    if wants(Figures::Reencrypt) {
        let result: anyhow::Result<()> = async {
            let mut runs = Vec::new();
            for run in 0..plan.runs {
                progress(&format!(
                    "run {}/{}: re-encryption (baselines, then rotate_keys) over {} rows, batches of {}",
                    run + 1,
                    plan.runs,
                    plan.reencrypt_rows,
                    plan.reencrypt_batch
                ));
                let r =
                    storage::reencrypt_run(env, plan.reencrypt_rows, plan.reencrypt_batch).await?;
                eprintln!(
                    "    plain UPDATE {:.0} rows/s, reseal {:.0} rows/s, SQL-only floor {:.0} rows/s, rotate_keys {:.0} rows/s",
                    r.plain_update_rows_per_s,
                    r.reseal_rows_per_s,
                    r.sql_floor_rows_per_s,
                    r.rotate_keys_rows_per_s
                );
                runs.push(r);
            }
            report.reencrypt(&runs, plan.reencrypt_rows, plan.reencrypt_batch);
            Ok(())
        }
        .await;
        if let Err(error) = result {
            eprintln!("figure 6 (re-encryption) failed: {error:#}");
            report.failed("figure 6 (re-encryption)", &error);
        }
    }

    if wants(Figures::Memory) {
        let result: anyhow::Result<()> = async {
            progress(&format!(
                "memory: {} jobs through two gatehouse work processes, {} at a time",
                plan.memory_total, plan.memory_step
            ));
            let points = storage::memory_run(
                env,
                tenant,
                plan.memory_total,
                plan.memory_step,
                plan.memory_budget,
            )
            .await?;
            for p in &points {
                eprintln!(
                    "    after {} jobs: {} keys, {} bytes",
                    p.processed, p.keys, p.bytes
                );
            }
            report.memory(&points);
            Ok(())
        }
        .await;
        if let Err(error) = result {
            eprintln!("figure 7 (memory) failed: {error:#}");
            report.failed("figure 7 (memory)", &error);
        }
    }

    if wants(Figures::Flood) {
        let result: anyhow::Result<()> = async {
            let sentry = flood::FakeSentry::start().await?;
            // A tenant of its own, sealed under the run's key: figure 6 re-seals every earlier
            // tenant's token under a key these processes do not have.
            let tenant = env.try_create_tenant().await?;
            progress("floods: creating the users and producers of the legitimate mix");
            let fixture = flood::prepare(env, tenant, &plan.flood).await?;
            let mut runs = Vec::new();
            for run in 0..plan.runs {
                let mut phases = Vec::new();
                let mut floor = Duration::from_secs(5);
                for phase in std::iter::once(flood::Phase::Baseline).chain(flood::Phase::FLOODS) {
                    progress(&format!(
                        "run {}/{}: gatehouse serve + work, {}",
                        run + 1,
                        plan.runs,
                        phase.label()
                    ));
                    let r = flood::run_phase(env, &fixture, &sentry, phase, &plan.flood, floor)
                        .await?;
                    if phase == flood::Phase::ForgedOneIp {
                        floor = Duration::from_secs_f64(r.flood_seconds);
                    }
                    eprintln!(
                        "    webhook p99 {:.2} ms (n={}), /healthz p99 {:.2} ms; flood {} in {:.1} s{}: {:?}; +{} rows, +{} keys, {} Sentry envelopes; legitimate refused {} of {}{}",
                        r.webhook.p99_ms,
                        r.webhook.n,
                        r.healthz.p99_ms,
                        r.flood_sent,
                        r.flood_seconds,
                        if r.flood_capped { " (capped)" } else { "" },
                        r.flood_answers,
                        r.rows_added(),
                        r.keys_added(),
                        r.sentry_envelopes,
                        r.refused(),
                        r.legit_sent,
                        if r.server_up { "" } else { "; a process had exited" },
                    );
                    phases.push(r);
                }
                let baseline = phases.remove(0);
                runs.push(flood::FloodRun {
                    baseline,
                    floods: phases,
                });
            }
            report.flood(&runs);
            Ok(())
        }
        .await;
        if let Err(error) = result {
            eprintln!("figure 8 (floods) failed: {error:#}");
            report.failed("figure 8 (floods)", &error);
        }
    }

    if wants(Figures::Fairness) {
        let f = plan.fairness;
        match fairness::figure10(env, f.noisy, f.quiet, f.cap_jobs, plan.runs).await {
            Ok((drains, cap)) => report.fairness(&drains, &cap, f.noisy, f.quiet),
            Err(error) => {
                eprintln!("figure 10 (tenant fairness) failed: {error:#}");
                report.failed("figure 10 (tenant fairness)", &error);
            }
        }
    }

    if wants(Figures::Cluster) {
        match cluster::figure9(env, 150_000, plan.runs).await {
            Ok(runs) => report.cluster(&runs),
            Err(error) => {
                eprintln!("figure 9 (Redis Cluster) failed: {error:#}");
                report.failed("figure 9 (Redis Cluster)", &error);
            }
        }
    }

    if wants(Figures::Outage) {
        let dir = outage::drill_dir()?;
        eprintln!(
            "outage drill: logs and the private Redis's data in {}",
            dir.display()
        );
        match outage::postgres_drill(env, &plan.outage, &dir).await {
            Ok(drill) => report.outage_postgres(&drill),
            Err(error) => {
                eprintln!("drill A (PostgreSQL outage) failed: {error:#}");
                report.drill_error("A. the PostgreSQL outage drill", &error);
            }
        }
        match outage::redis_drill(env, &plan.outage, &dir).await {
            Ok(drill) => report.outage_redis(&drill),
            Err(error) => {
                eprintln!("drill B (Redis restart) failed: {error:#}");
                report.drill_error("B. the Redis restart drill", &error);
            }
        }
        if report.drill_failed() || std::env::var_os("GH_BENCH_KEEP_LOGS").is_some() {
            eprintln!("outage drill: logs kept in {}", dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(report)
}
