//! A Rust producer service enqueuing gatehouse jobs.
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 QUEUE_NAMESPACE=gatehouse \
//!     cargo run -p gatehouse-jobs --features redis --example enqueue -- <tenant-uuid> <user-uuid>
//! ```
//!
//! It enqueues one full catalog sync for the tenant (deduplicated for ten minutes, so running
//! it twice enqueues one job) and prints the job id; `gatehouse work` processes it.

use gatehouse_jobs::client::{Enqueue, Queues};
use gatehouse_jobs::{Job, SyncCatalog, SyncMode};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(tenant), Some(user)) = (args.next(), args.next()) else {
        eprintln!("usage: enqueue <tenant-uuid> <requested-by-uuid>");
        std::process::exit(1);
    };
    let job = SyncCatalog {
        tenant_id: tenant.parse()?,
        requested_by: user.parse()?,
        mode: SyncMode::Full,
    };
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let namespace = std::env::var("QUEUE_NAMESPACE").unwrap_or_else(|_| "gatehouse".into());

    // Any redis::aio::ConnectionLike works; a ConnectionManager reconnects by itself.
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let queues = Queues::new(namespace);
    let options = Enqueue {
        // Namespaced by purpose; within its TTL the same key returns the first job's id.
        dedupe: Some((
            queues.dedupe_key(&format!("catalog-sync:{}", job.tenant_id)),
            600,
        )),
        request_id: Some("example-producer".into()),
        ..Enqueue::default()
    };
    let enqueued = queues.enqueue(&mut conn, &job, options).await?;
    println!(
        "{} job {} on {}",
        if enqueued.created {
            "enqueued"
        } else {
            "already queued:"
        },
        enqueued.job_id,
        queues.queue_key(SyncCatalog::QUEUE)
    );
    Ok(())
}
