//! `gatehouse jobs dead [--queue Q]` / `jobs retry ID` / `jobs purge [--queue Q]`: the
//! dead-letter operations. Output is tab-separated; nothing secret and no payload is printed.

use clap::Subcommand;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Failure;
use crate::config::Config;
use crate::queue::dead;

/// Most dead jobs listed per queue.
const LIST_LIMIT: usize = 1000;

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List dead jobs, newest first: id, queue, attempts, dead since (RFC 3339), last error.
    Dead {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
    },
    /// Put a dead job back on its queue with a fresh attempt budget.
    Retry {
        /// The job id, as `jobs dead` prints it.
        id: String,
    },
    /// Delete dead jobs for good (every queue's, or one queue's with --queue); prints how many.
    Purge {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
    },
}

fn queues(filter: Option<&str>) -> Result<Vec<&'static str>, Failure> {
    match filter {
        None => Ok(gatehouse_jobs::QUEUES.to_vec()),
        Some(q) => gatehouse_jobs::QUEUES
            .iter()
            .find(|known| **known == q)
            .map(|known| vec![*known])
            .ok_or_else(|| {
                Failure::Invalid(format!(
                    "--queue must be one of: {}",
                    gatehouse_jobs::QUEUES.join(", ")
                ))
            }),
    }
}

fn time_of(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".to_owned())
}

fn unreachable(error: redis::RedisError) -> Failure {
    Failure::Service(format!("Redis cannot be reached: {error}"))
}

/// Runs a `jobs` subcommand.
pub async fn run(config: &Config, command: JobsCommand) -> anyhow::Result<()> {
    // Validate arguments before touching Redis, so a typo exits 1, not 2.
    let (selected, id) = match &command {
        JobsCommand::Dead { queue } | JobsCommand::Purge { queue } => {
            (queues(queue.as_deref())?, None)
        }
        JobsCommand::Retry { id } => {
            let ok = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(Failure::Invalid(
                    "ID must be a job id as `jobs dead` prints it".into(),
                )
                .into());
            }
            (queues(None)?, Some(id.clone()))
        }
    };
    let mut conn = crate::redis_conn::connect(&config.redis_url)
        .await
        .map_err(unreachable)?;
    let layout = config.layout();
    match command {
        JobsCommand::Dead { .. } => {
            let jobs = dead::list(&mut conn, layout, &selected, LIST_LIMIT)
                .await
                .map_err(unreachable)?;
            println!("id\tqueue\tattempts\tdead_at\tlast_error");
            for job in &jobs {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    job.id,
                    job.queue,
                    job.attempts,
                    time_of(job.dead_at_ms),
                    job.last_error.replace('\t', " ")
                );
            }
            eprintln!("{} dead job(s)", jobs.len());
            Ok(())
        }
        JobsCommand::Retry { .. } => {
            let id = id.unwrap_or_default();
            match dead::retry(&mut conn, layout, &selected, &id)
                .await
                .map_err(unreachable)?
            {
                Some(queue) => {
                    println!("requeued {id} on {queue}");
                    Ok(())
                }
                None => Err(Failure::Invalid(format!("no dead job with id {id}")).into()),
            }
        }
        JobsCommand::Purge { .. } => {
            let n = dead::purge(&mut conn, layout, &selected)
                .await
                .map_err(unreachable)?;
            println!("purged {n} dead job(s)");
            Ok(())
        }
    }
}
