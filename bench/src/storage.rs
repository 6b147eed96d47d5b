//! Figures 6 and 7: re-encryption rows/s (the baseline side until `rotate_keys` lands) and
//! the Redis memory that processed jobs leave behind.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use gatehouse::security::keyring::{EncryptionKey, Keyring, aad};
use uuid::Uuid;

use crate::env::{BenchEnv, kill};
use crate::worker;

/// Re-encryption measurements over the same rows.
#[derive(Debug, Clone, Copy)]
pub struct Reencrypt {
    /// A plain `UPDATE … SET v = v` of every row, in batches: the floor PostgreSQL sets.
    pub plain_update_rows_per_s: f64,
    /// The same batches, each row opened under the old key and sealed under the new one in
    /// Rust between a `SELECT … FOR UPDATE SKIP LOCKED` and the `UPDATE` (what a
    /// `rotate_keys` job has to do at least; not the job itself).
    pub reseal_rows_per_s: f64,
}

const BATCH: i64 = 500;

/// Fills `bench_sealed` with `rows` values sealed under the run's current key.
async fn fill(env: &BenchEnv, rows: u64) -> anyhow::Result<()> {
    sqlx::query("DROP TABLE IF EXISTS bench_sealed")
        .execute(&env.pool)
        .await?;
    sqlx::query("CREATE TABLE bench_sealed (id uuid PRIMARY KEY, v bytea NOT NULL)")
        .execute(&env.pool)
        .await?;
    let keyring = &env.config.keyring;
    let mut ids = Vec::with_capacity(rows as usize);
    let mut values = Vec::with_capacity(rows as usize);
    for _ in 0..rows {
        let id = Uuid::new_v4();
        values.push(keyring.seal(b"+14155550100", &aad("bench_sealed", "v", &id.to_string())));
        ids.push(id);
    }
    sqlx::query("INSERT INTO bench_sealed (id, v) SELECT * FROM unnest($1::uuid[], $2::bytea[])")
        .bind(&ids)
        .bind(&values)
        .execute(&env.pool)
        .await?;
    Ok(())
}

async fn plain_update(env: &BenchEnv) -> anyhow::Result<u64> {
    let mut done = 0u64;
    let mut after = Uuid::nil();
    loop {
        let mut tx = env.pool.begin().await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM bench_sealed WHERE id > $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(after)
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = ids.last().copied() else {
            break;
        };
        sqlx::query("UPDATE bench_sealed SET v = v WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        done += ids.len() as u64;
        after = last;
    }
    Ok(done)
}

async fn reseal(env: &BenchEnv, keyring: &Keyring) -> anyhow::Result<u64> {
    let mut done = 0u64;
    let mut after = Uuid::nil();
    loop {
        let mut tx = env.pool.begin().await?;
        let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
            "SELECT id, v FROM bench_sealed WHERE id > $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(after)
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last().map(|r| r.0) else {
            break;
        };
        let mut ids = Vec::with_capacity(rows.len());
        let mut values = Vec::with_capacity(rows.len());
        for (id, v) in rows {
            let cell = aad("bench_sealed", "v", &id.to_string());
            let plain = keyring
                .open(&v, &cell)
                .map_err(|e| anyhow::anyhow!("open: {e}"))?;
            values.push(keyring.seal(&plain, &cell));
            ids.push(id);
        }
        sqlx::query(
            "UPDATE bench_sealed AS s SET v = n.v FROM unnest($1::uuid[], $2::bytea[]) AS n(id, v)
             WHERE s.id = n.id",
        )
        .bind(&ids)
        .bind(&values)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        done += ids.len() as u64;
        after = last;
    }
    Ok(done)
}

/// Figure 6, one run.
pub async fn reencrypt_run(env: &BenchEnv, rows: u64) -> anyhow::Result<Reencrypt> {
    fill(env, rows).await?;
    let start = Instant::now();
    let n = plain_update(env).await?;
    let plain = n as f64 / start.elapsed().as_secs_f64();
    let new_key = EncryptionKey::generate();
    let old = EncryptionKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
        .map_err(|e| anyhow::anyhow!("bench key: {e}"))?;
    let keyring = Keyring::new(new_key, vec![old]);
    let start = Instant::now();
    let n = reseal(env, &keyring).await?;
    let resealed = n as f64 / start.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE bench_sealed")
        .execute(&env.pool)
        .await?;
    Ok(Reencrypt {
        plain_update_rows_per_s: plain,
        reseal_rows_per_s: resealed,
    })
}

/// Redis memory held by the run's namespace after some number of processed jobs.
#[derive(Debug, Clone, Copy)]
pub struct MemoryPoint {
    pub processed: u64,
    pub keys: u64,
    pub bytes: u64,
}

/// Sums `MEMORY USAGE` over every key of the namespace.
pub async fn namespace_memory(env: &BenchEnv) -> anyhow::Result<(u64, u64)> {
    let mut redis = env.redis.clone();
    let mut cursor: u64 = 0;
    let mut keys_total = 0u64;
    let mut bytes = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}:*", env.namespace))
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut redis)
            .await?;
        keys_total += keys.len() as u64;
        for chunk in keys.chunks(1000) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("MEMORY").arg("USAGE").arg(key);
            }
            let sizes: Vec<Option<u64>> = pipe.query_async(&mut redis).await?;
            bytes += sizes.into_iter().flatten().sum::<u64>();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok((keys_total, bytes))
}

/// How long finished jobs are kept in the memory run (seconds, as the variable takes it).
pub const MEMORY_RETENTION_SECONDS: &str = "15";

/// Figure 7: two `gatehouse work` processes (16 jobs in flight each: throughput is not what
/// this figure measures) process `total` jobs enqueued `step` at a time; the namespace's
/// memory is read after each step has been processed. No step starts after `budget`.
pub async fn memory_run(
    env: &BenchEnv,
    tenant: Uuid,
    total: u64,
    step: u64,
    budget: Duration,
) -> anyhow::Result<Vec<MemoryPoint>> {
    worker::reset(env).await?;
    let started = Instant::now();
    let mut children = (0..2)
        // A retention much shorter than one step's processing, so the plateau is reached
        // within the first step and every later reading should be on it; a gatehouse without
        // retention ignores the variable and grows step after step.
        .map(|_| {
            env.gatehouse(
                &["work"],
                &[
                    ("WORKER_CONCURRENCY", "16"),
                    ("JOB_RETENTION_SECONDS", MEMORY_RETENTION_SECONDS),
                ],
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let result = async {
        let mut points = Vec::new();
        let mut processed = 0u64;
        while processed < total {
            if started.elapsed() > budget {
                eprintln!("    memory: time budget of {budget:?} spent after {processed} jobs");
                break;
            }
            let n = step.min(total - processed);
            worker::enqueue_backlog(env, tenant, n).await?;
            processed += n;
            let deadline = Instant::now() + budget;
            loop {
                // Committed effects, not the done index: a vacuum shrinks that.
                let done = worker::stored_messages(&env.pool).await? as u64;
                if done >= processed {
                    break;
                }
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "gatehouse work processed {done} of {processed} jobs in {budget:?}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Let in-flight bookkeeping settle before reading.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (keys, bytes) = namespace_memory(env).await?;
            points.push(MemoryPoint {
                processed,
                keys,
                bytes,
            });
        }
        Ok(points)
    }
    .await;
    for child in &mut children {
        kill(child);
    }
    worker::reset(env)
        .await
        .context("reset after the memory run")?;
    result
}
