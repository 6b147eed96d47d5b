//! A Rust producer service enqueuing gatehouse jobs.
//!
//! ```sh
//! ENCRYPTION_KEY=… REDIS_URL=redis://127.0.0.1:6379 QUEUE_NAMESPACE=gatehouse \
//!     cargo run -p gatehouse-jobs --features redis --example enqueue -- <tenant-uuid> <user-uuid>
//! ```
//!
//! It enqueues one full catalog sync for the tenant (deduplicated for ten minutes, so running
//! it twice enqueues one job) and one inbound message, and prints the job ids; `gatehouse work`
//! processes them. The message's `from`, `to` and `body` identify a customer, so the client
//! seals them with `ENCRYPTION_KEY` (gatehouse's current key) before they reach Redis: without
//! the key the enqueue fails, it never falls back to plaintext.

use gatehouse_jobs::client::{Enqueue, Queues};
use gatehouse_jobs::envelope::EncryptionKey;
use gatehouse_jobs::{InboundMessage, Job, SyncCatalog, SyncMode};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(tenant), Some(user)) = (args.next(), args.next()) else {
        eprintln!("usage: enqueue <tenant-uuid> <requested-by-uuid>");
        std::process::exit(1);
    };
    let tenant_id = tenant.parse()?;
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let namespace = std::env::var("QUEUE_NAMESPACE").unwrap_or_else(|_| "gatehouse".into());
    // The key is a secret: from the environment (or a secret store), never from argv. The error
    // names the rule a bad key breaks, never the key.
    let key = EncryptionKey::from_base64(&std::env::var("ENCRYPTION_KEY")?)?;

    // Any redis::aio::ConnectionLike works; a ConnectionManager reconnects by itself.
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let queues = Queues::new(namespace).sealing_with(key);

    let sync = SyncCatalog {
        tenant_id,
        requested_by: user.parse()?,
        mode: SyncMode::Full,
    };
    let options = Enqueue {
        // A purpose: within its TTL (seconds) the same purpose returns the first job's id.
        dedupe: Some((format!("catalog-sync:{tenant_id}"), 600)),
        request_id: Some("example-producer".into()),
        ..Enqueue::default()
    };
    let enqueued = queues.enqueue(&mut conn, &sync, options).await?;
    report(&queues, SyncCatalog::QUEUE, &enqueued);

    let message = InboundMessage {
        tenant_id,
        message_sid: format!("SM{}", uuid::Uuid::new_v4().simple()),
        from: "+14155550100".into(),
        to: "+14155550199".into(),
        body: "hello from the example producer".into(),
        received_at: "2026-12-05T10:00:00Z".into(),
    };
    // Sealed on the way: Redis holds `sealed`, never the number or the text.
    let enqueued = queues
        .enqueue(&mut conn, &message, Enqueue::default())
        .await?;
    report(&queues, InboundMessage::QUEUE, &enqueued);
    Ok(())
}

fn report(queues: &Queues, queue: &str, enqueued: &gatehouse_jobs::client::Enqueued) {
    println!(
        "{} job {} on {}",
        if enqueued.created {
            "enqueued"
        } else {
            "already queued:"
        },
        enqueued.job_id,
        queues.queue_key(queue)
    );
}
