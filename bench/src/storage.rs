//! Figures 6 and 7: re-encryption rows/s (the real `rotate_keys` job in a `gatehouse work`
//! process, beside its baselines) and the Redis memory that processed jobs leave behind.

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
    /// The SQL-only floor: the `rotate_keys` job's own statements
    /// (`gatehouse::rotation::BatchStatements`) over the same number of sealed customer
    /// numbers, from Rust on one connection, one transaction per batch of the job's size, with
    /// the new envelopes computed before the clock starts.
    pub sql_floor_rows_per_s: f64,
    /// The real thing: a four-eyes-approved rotation run by one `gatehouse work` process over
    /// the same number of sealed customer numbers (`conversations.customer_number`), timed
    /// from the rotation's `started_at` to its `completed_at` (process start-up excluded).
    pub rotate_keys_rows_per_s: f64,
}

const BATCH: i64 = gatehouse::config::DEFAULT_KEY_ROTATION_BATCH_SIZE as i64;

/// The key figure 6's rotation moves to (a fixed bench value, not a secret).
const ROTATION_TARGET_KEY: &str = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=";

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

/// Figure 6, one run; `batch` is the job's `KEY_ROTATION_BATCH_SIZE` (and the SQL-only
/// floor's).
pub async fn reencrypt_run(env: &BenchEnv, rows: u64, batch: usize) -> anyhow::Result<Reencrypt> {
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
    let officers = officers(env).await?;
    let floor = sql_floor(env, &officers, rows, batch).await?;
    let rotated = rotate_keys(env, &officers, rows, batch).await?;
    Ok(Reencrypt {
        plain_update_rows_per_s: plain,
        reseal_rows_per_s: resealed,
        sql_floor_rows_per_s: floor,
        rotate_keys_rows_per_s: rotated,
    })
}

/// A new tenant with `rows` conversations whose customer numbers are sealed under the run's
/// key, as the worker stores them; returns the tenant.
async fn seed_conversations(env: &BenchEnv, rows: u64) -> anyhow::Result<Uuid> {
    let tenant = env.try_create_tenant().await?;
    let keyring = &env.config.keyring;
    let mut ids = Vec::with_capacity(rows as usize);
    let mut values = Vec::with_capacity(rows as usize);
    let mut indexes = Vec::with_capacity(rows as usize);
    for i in 0..rows {
        let id = Uuid::new_v4();
        let number = format!("+1415{i:07}");
        values.push(keyring.seal(
            number.as_bytes(),
            &aad("conversations", "customer_number", &id.to_string()),
        ));
        indexes.push(
            env.config
                .blind_index
                .compute("conversations.customer_number", number.as_bytes())
                .to_vec(),
        );
        ids.push(id);
    }
    sqlx::query(
        "INSERT INTO conversations (id, tenant_id, customer_number, customer_number_index)
         SELECT u.id, $1, u.v, u.i FROM unnest($2::uuid[], $3::bytea[], $4::bytea[]) AS u(id, v, i)",
    )
    .bind(tenant)
    .bind(&ids)
    .bind(&values)
    .bind(&indexes)
    .execute(&env.pool)
    .await?;
    // Both measurements start from a table without the other's dead tuples.
    sqlx::query("VACUUM ANALYZE conversations")
        .execute(&env.pool)
        .await?;
    Ok(tenant)
}

/// Two security officers (one requests a rotation, the other approves it).
async fn officers(env: &BenchEnv) -> anyhow::Result<[Uuid; 2]> {
    let mut officers = [Uuid::nil(); 2];
    for officer in &mut officers {
        *officer = sqlx::query_scalar(
            "INSERT INTO users (email, password_hash, first_name, last_name, platform_role)
             VALUES ($1, 'unused', 'Bench', 'Officer', 'security_officer') RETURNING id",
        )
        .bind(format!("{}@bench.example.com", Uuid::new_v4().simple()))
        .fetch_one(&env.pool)
        .await?;
    }
    Ok(officers)
}

fn target_key() -> anyhow::Result<EncryptionKey> {
    EncryptionKey::from_base64(ROTATION_TARGET_KEY).map_err(|e| anyhow::anyhow!("bench key: {e}"))
}

/// The SQL-only floor: the job's own sweep (`gatehouse::rotation::Sweep`: the same batches,
/// statements, progress counts and final count, one connection) over `rows` sealed customer
/// numbers, with every pending value's new envelope sealed before the clock starts — what
/// PostgreSQL alone costs the job. The rotation row the counts go to is never approved (no
/// job runs for it) and is deleted afterwards, with the tenant.
async fn sql_floor(
    env: &BenchEnv,
    officers: &[Uuid; 2],
    rows: u64,
    batch: usize,
) -> anyhow::Result<f64> {
    let tenant = seed_conversations(env, rows).await?;
    let target = Keyring::new(target_key()?, Vec::new());
    let keyring = &env.config.keyring;
    // Every value the sweep will meet (other figures' tenants too), opened and sealed again
    // now, off the clock.
    let mut sealed: std::collections::HashMap<(&'static str, Uuid), Vec<u8>> =
        std::collections::HashMap::new();
    for col in &gatehouse::rotation::SEALED_COLUMNS {
        let values: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, {c} FROM {t} WHERE {c} IS NOT NULL AND substring({c} from 2 for 8) <> $1",
            c = col.column,
            t = col.table,
        )))
        .bind(&target.current_id().0[..])
        .fetch_all(&env.pool)
        .await?;
        for (id, value) in values {
            let cell = aad(col.table, col.column, &id.to_string());
            let plain = keyring
                .open(&value, &cell)
                .map_err(|e| anyhow::anyhow!("{}: {e}", col.name()))?;
            sealed.insert((col.column, id), target.seal(&plain, &cell));
        }
    }
    let rotation: Uuid = sqlx::query_scalar(
        "INSERT INTO key_rotations (initiated_by, target_key_id, expires_at)
         VALUES ($1, $2, now() + interval '1 hour') RETURNING id",
    )
    .bind(officers[0])
    .bind(target.current_id().to_hex())
    .fetch_one(&env.pool)
    .await?;
    let events = env.events();
    let lookup = |col: &gatehouse::rotation::SealedColumn, id: Uuid, _: &[u8]| {
        sealed
            .get(&(col.column, id))
            .cloned()
            .ok_or_else(|| "not sealed before the clock".to_owned())
    };
    let sweep = gatehouse::rotation::Sweep {
        rotation_id: rotation,
        current: target.current_id(),
        batch_size: batch,
        stall_limit: Duration::from_secs(60),
        events: &events,
        reseal: &lookup,
    };
    // A pool of its own, opened now: like the worker's, its connection has never touched the
    // sealed tables (the bench pool's has: it seeded and read them), so both start with the
    // same cold caches and unprepared statements.
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&env.db_url)
        .await?;
    let start = Instant::now();
    let swept = sweep.run(&own).await;
    let seconds = start.elapsed().as_secs_f64();
    own.close().await;
    swept.map_err(|e| anyhow::anyhow!("the SQL-only sweep: {e}"))?;
    let (done, failed): (i64, i64) =
        sqlx::query_as("SELECT done, failed FROM key_rotations WHERE id = $1")
            .bind(rotation)
            .fetch_one(&env.pool)
            .await?;
    anyhow::ensure!(
        failed == 0 && done as u64 >= rows,
        "the SQL-only floor moved {done} of {rows} values ({failed} failed)"
    );
    sqlx::query("DELETE FROM key_rotations WHERE id = $1")
        .bind(rotation)
        .execute(&env.pool)
        .await?;
    sqlx::query("DELETE FROM tenants WHERE id = $1")
        .bind(tenant)
        .execute(&env.pool)
        .await?;
    Ok(done as f64 / seconds)
}

/// `rows` sealed customer numbers under the run's key (the tenant's token is one more sealed
/// value), then a rotation to a fixed key requested and approved by two security officers
/// and run by a real worker process with `KEY_ROTATION_BATCH_SIZE=batch`.
async fn rotate_keys(
    env: &BenchEnv,
    officers: &[Uuid; 2],
    rows: u64,
    batch: usize,
) -> anyhow::Result<f64> {
    let tenant = seed_conversations(env, rows.saturating_sub(1)).await?;
    // The same target key in every run: what an earlier run re-sealed (other figures'
    // tenants) is already current and simply not counted again, never "unknown".
    let new_key = target_key()?;
    let new_b64 = {
        use secrecy::ExposeSecret;
        new_key.to_base64().expose_secret().to_owned()
    };
    let old_b64 = env
        .vars
        .get("ENCRYPTION_KEY")
        .cloned()
        .context("the bench environment has ENCRYPTION_KEY")?;
    let batch = batch.to_string();
    // A worker that has been up a while, as a real rotation meets it: its start-up (the
    // first connections, the maintenance tasks' first round) is not in the window.
    let mut worker = env.gatehouse(
        &["work"],
        &[
            ("ENCRYPTION_KEY", &new_b64),
            ("ENCRYPTION_OLD_KEYS", &old_b64),
            ("KEY_ROTATION_BATCH_SIZE", &batch),
        ],
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The worker relays the approval's outbox entry, then runs the job.
    let approved = async {
        let requested = gatehouse::rotation::request(
            &env.pool,
            officers[0],
            new_key.id(),
            gatehouse::rotation::APPROVAL_TTL,
        )
        .await
        .map_err(|e| anyhow::anyhow!("request rotation: {e}"))?;
        gatehouse::rotation::approve(&env.pool, requested.id, officers[1])
            .await
            .map_err(|e| anyhow::anyhow!("approve rotation: {e}"))?;
        anyhow::Ok(requested)
    }
    .await;
    let requested = match approved {
        Ok(requested) => requested,
        Err(error) => {
            kill(&mut worker);
            return Err(error);
        }
    };
    let finished = crate::env::wait_until(Duration::from_secs(600), || async {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM key_rotations WHERE id = $1")
                .bind(requested.id)
                .fetch_optional(&env.pool)
                .await
                .ok()
                .flatten();
        matches!(status.as_deref(), Some("completed" | "failed"))
    })
    .await;
    kill(&mut worker);
    anyhow::ensure!(finished, "the rotation did not finish within 10 minutes");
    let (status, done, seconds): (String, i64, f64) = sqlx::query_as(
        "SELECT status, done, extract(epoch FROM completed_at - started_at)::float8
         FROM key_rotations WHERE id = $1",
    )
    .bind(requested.id)
    .fetch_one(&env.pool)
    .await?;
    anyhow::ensure!(status == "completed", "the rotation ended {status}");
    // `rows` seeded here, plus whatever the run's other figures sealed (their tenants).
    anyhow::ensure!(done as u64 >= rows, "re-encrypted {done} of {rows} values");
    // Leave nothing sealed under this run's fresh key for the next run.
    sqlx::query("DELETE FROM tenants WHERE id = $1")
        .bind(tenant)
        .execute(&env.pool)
        .await?;
    Ok(done as f64 / seconds.max(1e-6))
}

/// Redis memory held by the run's namespace after some number of processed jobs.
#[derive(Debug, Clone, Copy)]
pub struct MemoryPoint {
    pub processed: u64,
    pub keys: u64,
    pub bytes: u64,
}

/// Sums `MEMORY USAGE … SAMPLES 0` over every key of the namespace: exact (by default Redis
/// estimates a hash or sorted set from five of its elements, which moved figure 7 by ±10 %).
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
                pipe.cmd("MEMORY")
                    .arg("USAGE")
                    .arg(key)
                    .arg("SAMPLES")
                    .arg(0);
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
/// The plateau holds about jobs/s x (retention + heartbeat) finished jobs; it must stay well
/// below one step, or the readings measure the warm-up still filling. At 15 s and the default
/// 5 s heartbeat a 2-core machine doing 3k jobs/s needed ~60k jobs to reach it (2026-11-29).
pub const MEMORY_RETENTION_SECONDS: &str = "3";
/// The memory run's worker heartbeat, which is also how often the vacuum runs.
pub const MEMORY_HEARTBEAT_SECONDS: &str = "1";

/// Readings of the namespace's memory after each step of the memory run, and the pause
/// between two: together they span a little more than one heartbeat.
const MEMORY_READINGS: usize = 5;
const MEMORY_READING_GAP: Duration = Duration::from_millis(250);

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
                    ("WORKER_HEARTBEAT_SECONDS", MEMORY_HEARTBEAT_SECONDS),
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
            // Let in-flight bookkeeping settle before reading; then the median of readings
            // spread over one vacuum cycle (a heartbeat), since a single reading falls
            // anywhere between two vacuums.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut readings = Vec::with_capacity(MEMORY_READINGS);
            for _ in 0..MEMORY_READINGS {
                readings.push(namespace_memory(env).await?);
                tokio::time::sleep(MEMORY_READING_GAP).await;
            }
            readings.sort_by_key(|&(_, bytes)| bytes);
            let (keys, bytes) = readings[MEMORY_READINGS / 2];
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
