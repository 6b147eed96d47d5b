//! Figure 1's SQL floor: pgbench running the statement one `inbound_message` job commits
//! (`gatehouse::conversations::STORE_INBOUND`: the processed-job marker, the conversation
//! upsert with its streak counter, the message insert), with the same data shape (one tenant,
//! 200 customers, the figure's message, the rule classifier's answer to it) and the worker's
//! concurrency, prepared like sqlx prepares it.
//!
//! The script is committed as `bench/pgbench/inbound_message.sql` so it can be run by hand
//! (its header says how); [`render`] writes it from the worker's own statement and a test
//! checks the two agree, so the floor cannot drift from what the worker sends. Regenerate it
//! with `gatehouse-bench pgbench-script > bench/pgbench/inbound_message.sql`.

use std::process::Stdio;

use anyhow::Context as _;
use gatehouse::classify::classify_with_rules;
use gatehouse::conversations::{HANDOFF_AFTER, STORE_INBOUND};
use gatehouse_jobs::{InboundMessage, Job as _};
use uuid::Uuid;

use crate::env::BenchEnv;

/// The committed script.
pub const SCRIPT: &str = include_str!("../pgbench/inbound_message.sql");

/// `LLM_MIN_CONFIDENCE`'s default, which decides the streak flag the worker binds ($20).
const MIN_CONFIDENCE: f64 = 0.6;

/// SQL text literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What stands for each of the statement's parameters (`$1` … `$23`): pgbench variables
/// (`:jid`, one per transaction; `:customer`, one of 200; `:tenant` and `:form`, given with
/// `-D`), or the value the worker binds for the figure's message, typed as sqlx types it.
/// Sealed values and blind indexes are random or hashed bytes of the real lengths.
fn parameters() -> Vec<String> {
    let sample = crate::worker::message(Uuid::nil(), 0);
    let c = classify_with_rules(&sample.body);
    let low = c.rejected_reason.is_some() || c.confidence < MIN_CONFIDENCE;
    // A sealed 12-character number: 1 + 8 + 12 + 12 + 16 = 49 bytes.
    let sealed = |salt: &str| {
        format!(
            "substring(sha256(('{salt}' || :jid::text)::bytea) || sha256(('{salt}.' || :jid::text)::bytea) from 1 for 49)"
        )
    };
    let index = |form: &str| format!("sha256(('{form}-' || :customer::text)::bytea)");
    vec![
        "('pgbench-' || :jid::text)".into(),
        format!("{}::text", literal(InboundMessage::QUEUE)),
        "'pgbench'::text".into(),
        ":tenant::uuid".into(),
        "gen_random_uuid()".into(),
        sealed("n"),
        index("v2.conversations"),
        "('SM' || :jid::text)".into(),
        "gen_random_uuid()".into(),
        sealed("f"),
        index("v2.messages"),
        format!("{}::text", literal(&sample.to)),
        format!("{}::text", literal(&sample.body)),
        format!("{}::text", literal(c.intent.as_str())),
        format!("{}::float8", c.confidence),
        format!(
            "{}::jsonb",
            literal(&serde_json::Value::Object(c.slots.clone()).to_string())
        ),
        format!("{}::text", literal(&c.classifier)),
        match &c.rejected_reason {
            Some(r) => format!("{}::text", literal(r)),
            None => "NULL::text".into(),
        },
        format!("{}::timestamptz", literal(&sample.received_at)),
        format!("{low}"),
        format!("{HANDOFF_AFTER}::int4"),
        format!(
            "ARRAY[{}, {}]",
            index("v2.conversations"),
            index("v1.conversations")
        ),
        ":form::text".into(),
    ]
}

/// The script: a header, the two per-transaction variables, and the worker's statement with
/// its parameters replaced.
pub fn render() -> String {
    let params = parameters();
    let mut body = String::with_capacity(STORE_INBOUND.len() * 2);
    let mut chars = STORE_INBOUND.char_indices().peekable();
    while let Some((_, ch)) = chars.next() {
        if ch != '$' {
            body.push(ch);
            continue;
        }
        let mut digits = String::new();
        while let Some(&(_, d)) = chars.peek() {
            if !d.is_ascii_digit() {
                break;
            }
            digits.push(d);
            chars.next();
        }
        match digits
            .parse::<usize>()
            .ok()
            .and_then(|n| params.get(n.wrapping_sub(1)))
        {
            Some(p) => body.push_str(p),
            None => {
                body.push('$');
                body.push_str(&digits);
            }
        }
    }
    format!(
        "-- The statement one inbound_message job commits, for pgbench: generated from
-- gatehouse::conversations::STORE_INBOUND by `gatehouse-bench pgbench-script` (a test checks
-- it is current). Figure 1 runs it against the bench database as
--   pgbench -n -M prepared -c 4 -j 2 -t N -D tenant=<tenant id> -D form=<blind index form> \\
--           -f bench/pgbench/inbound_message.sql <database>
-- where the tenant exists; by hand, any tenant id of a migrated database will do.
\\set customer random(0, 199)
\\set jid random(1, 9000000000000000000)
{};
",
        body.trim()
    )
}

/// What pgbench measured.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    pub tps: f64,
    pub transactions: u64,
    /// CPU per transaction: PostgreSQL's, and pgbench's as the consumer.
    pub cpu: crate::cpu::CpuPer,
}

/// Runs the script `transactions` times over `clients` connections against the bench
/// database (the run's tenant), and returns pgbench's rate (excluding connection set-up).
pub async fn run(
    env: &BenchEnv,
    tenant: Uuid,
    transactions: u64,
    clients: usize,
) -> anyhow::Result<Floor> {
    let script = std::env::temp_dir().join(format!("gh-pgbench-{}.sql", Uuid::new_v4().simple()));
    std::fs::write(&script, SCRIPT).context("write the pgbench script")?;
    let url = url::Url::parse(&env.db_url).context("the bench database URL")?;
    let per_client = (transactions / clients as u64).max(1);
    let form = env.config.blind_index.form().to_owned();
    let mut cmd = tokio::process::Command::new("pgbench");
    cmd.args(["-n", "-M", "prepared"])
        .arg("-c")
        .arg(clients.to_string())
        .arg("-j")
        .arg(clients.min(2).to_string())
        .arg("-t")
        .arg(per_client.to_string())
        .arg("-D")
        .arg(format!("tenant={tenant}"))
        .arg("-D")
        .arg(format!("form={form}"))
        .arg("-f")
        .arg(&script)
        .arg("-h")
        .arg(url.host_str().unwrap_or("127.0.0.1"))
        .arg("-p")
        .arg(url.port().unwrap_or(5432).to_string())
        .arg("-U")
        .arg(if url.username().is_empty() {
            "postgres"
        } else {
            url.username()
        })
        .arg(url.path().trim_start_matches('/'))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(password) = url.password() {
        cmd.env("PGPASSWORD", password);
    }
    let before = crate::cpu::now(env, crate::cpu::own_us()).await?;
    let output = cmd.output().await;
    let _ = std::fs::remove_file(&script);
    let output =
        output.context("run pgbench (Debian ships it with the server package, postgresql)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let tps = stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .with_context(|| format!("no rate in pgbench's output: {stdout}"))?;
    let transactions = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let failed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    anyhow::ensure!(failed == 0, "pgbench: {failed} transactions failed");
    // The bench process's own share (idle meanwhile) rides along in the consumer's figure.
    let cpu = crate::cpu::now(env, crate::cpu::own_us())
        .await?
        .per(before, transactions);
    Ok(Floor {
        tps,
        transactions,
        cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_script_is_the_workers_statement() {
        assert!(
            SCRIPT == render(),
            "bench/pgbench/inbound_message.sql is stale: regenerate it with \
             `gatehouse-bench pgbench-script > bench/pgbench/inbound_message.sql`"
        );
    }

    #[test]
    fn every_parameter_of_the_statement_is_replaced() {
        let script = render();
        let statement = script
            .lines()
            .filter(|l| !l.starts_with("--") && !l.starts_with('\\'))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(!statement.contains('$'), "{statement}");
        assert!(statement.contains("INSERT INTO processed_jobs"));
        assert!(statement.contains(":tenant::uuid") && statement.contains(":jid::text"));
    }
}
