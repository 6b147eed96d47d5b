//! The harness works end to end at toy sizes: its own database and namespace are created
//! and removed, every figure produces a row. No timing is asserted (the machine is shared).

use std::process::Command;

#[test]
fn a_smoke_run_produces_every_figure_and_leaves_no_database_or_keys_behind() {
    let bin = env!("CARGO_BIN_EXE_gatehouse-bench");
    let dir = std::path::Path::new(bin)
        .parent()
        .expect("binary directory");
    // `cargo test --workspace` builds the gatehouse binary; `-p gatehouse-bench` alone
    // does not, so build it here, in the same target directory and profile.
    if !dir.join("gatehouse").is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = Command::new(cargo);
        build
            .args(["build", "-p", "gatehouse", "--bin", "gatehouse"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building the gatehouse binary failed");
    }
    assert!(
        dir.join("gatehouse").is_file(),
        "the gatehouse binary must be built next to gatehouse-bench"
    );
    let out = tempfile_path();
    let output = Command::new(bin)
        .args(["--markdown", out.to_str().expect("utf-8 path"), "smoke"])
        .output()
        .expect("run gatehouse-bench smoke");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "smoke run failed:\n{stderr}");
    let table = std::fs::read_to_string(&out).expect("markdown written");
    let _ = std::fs::remove_file(&out);
    for figure in [
        "1. worker jobs/s",
        "2. backlog sensitivity",
        "3. scale-out",
        "4. webhook req/s",
        "5. /healthz p99",
        "6. re-encryption",
        "7. Redis memory",
        "8. genuine webhook p99, forged flood, 1 IP",
        "8. genuine webhook p99, forged flood, many IPs",
        "8. genuine webhook p99, login flood",
        "8. cost per 1,000 flood requests",
        "8. answers to the flood",
        "8. legitimate requests refused",
        "10. quiet tenant's",
        "10. the whole drain's jobs/s",
        "10. a capped tenant's jobs in flight",
    ] {
        assert!(table.contains(figure), "no row for {figure:?} in:\n{table}");
    }
    let word_after = |prefix: &str| {
        stderr
            .split_whitespace()
            .find(|w| w.starts_with(prefix))
            .map(|w| w.trim_end_matches(',').to_owned())
            .unwrap_or_else(|| panic!("no {prefix}* named in:\n{stderr}"))
    };
    let db = word_after("gh_bench_");
    let namespace = word_after("ghbench-");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let admin = sqlx::PgPool::connect(&gatehouse_testenv::admin_url())
            .await
            .expect("PostgreSQL");
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&db)
            .fetch_one(&admin)
            .await
            .expect("query pg_database");
        assert_eq!(left, 0, "database {db} was not dropped");
        let client = redis::Client::open(gatehouse_testenv::redis_url()).expect("Redis URL");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{namespace}:*"))
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        assert!(keys.is_empty(), "keys left behind: {keys:?}");
    });
}

fn tempfile_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "gatehouse-bench-smoke-{}-{}.md",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ))
}
