//! CPU time by process group, for figure 1's account of where a job's cost goes: PostgreSQL
//! (every `postgres` process, including the backends that exited meanwhile, which the
//! postmaster has reaped into its children's time), Redis (`INFO cpu`, the whole server) and
//! the consumer (the worker processes, or this process for the in-process bare workers and
//! the pgbench client it reaped).

use gatehouse_testenv::process::stat_cpu_us;

use crate::env::BenchEnv;

/// CPU microseconds so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub postgres_us: u64,
    pub redis_us: u64,
    pub consumer_us: u64,
}

impl Cpu {
    /// `self - earlier`, per unit of work.
    pub fn per(self, earlier: Cpu, units: u64) -> CpuPer {
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / units.max(1) as f64;
        CpuPer {
            postgres_us: per(self.postgres_us, earlier.postgres_us),
            redis_us: per(self.redis_us, earlier.redis_us),
            consumer_us: per(self.consumer_us, earlier.consumer_us),
        }
    }
}

/// CPU microseconds per job (or transaction).
#[derive(Debug, Clone, Copy)]
pub struct CpuPer {
    pub postgres_us: f64,
    pub redis_us: f64,
    pub consumer_us: f64,
}

/// Every `postgres` process on this machine, with what the postmaster reaped.
fn postgres_us() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| stat.contains("(postgres)"))
        .filter_map(|stat| stat_cpu_us(&stat, true))
        .sum()
}

/// This process and the children it reaped (pgbench).
pub fn own_us() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| stat_cpu_us(&stat, true))
        .unwrap_or(0)
}

/// The worker processes `pids` (their own time; they are still running).
pub fn processes_us(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| gatehouse_testenv::process::process_cpu_us(*pid))
        .sum()
}

/// Redis's CPU so far (`INFO cpu`: the whole server, user + system).
pub async fn redis_us(env: &BenchEnv) -> anyhow::Result<u64> {
    let mut redis = env.redis.clone();
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut redis)
        .await?;
    let seconds: f64 = info
        .lines()
        .filter_map(|line| {
            line.strip_prefix("used_cpu_sys:")
                .or_else(|| line.strip_prefix("used_cpu_user:"))
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum();
    Ok((seconds * 1e6) as u64)
}

/// How many `EVALSHA` calls (script calls: the enqueue script, on the ingress's path) Redis has
/// answered since its statistics were last reset (`INFO commandstats`).
pub async fn script_calls(env: &BenchEnv) -> anyhow::Result<u64> {
    let mut redis = env.redis.clone();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis)
        .await?;
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0))
}

/// Now, with the consumer's CPU as `consumer_us` reads it.
pub async fn now(env: &BenchEnv, consumer_us: u64) -> anyhow::Result<Cpu> {
    Ok(Cpu {
        postgres_us: postgres_us(),
        redis_us: redis_us(env).await?,
        consumer_us,
    })
}
