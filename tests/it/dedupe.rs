//! Dedupe purposes (`Enqueue::dedupe`, the webhook's MessageSid and a producer's
//! `Idempotency-Key`), against a real Redis: the purpose fixes the job id, so the job is its own
//! claim while it is in Redis; the vacuum and a purge that remove it before the purpose's time
//! is up leave a tombstone (its id in the shard's `:gone`) that keeps the claim.

use std::time::Duration;

use crate::common::*;
use gatehouse::queue::{consume, dead};
use gatehouse_jobs::client::{Enqueue, EnqueueError, Queues, dedupe_job_id};
use gatehouse_jobs::keys::QueueKeys;
use gatehouse_testenv::*;
use uuid::Uuid;

const QUEUE: &str = "inbound_message";
const WEEK: u64 = 7 * 24 * 3600;

fn deduped(purpose: &str, ttl: u64) -> Enqueue {
    Enqueue {
        job_id: None,
        dedupe: Some((purpose.to_owned(), ttl)),
        request_id: None,
    }
}

fn shard(queues: &Queues, tenant: Uuid) -> QueueKeys {
    queues.for_tenant_keys(QUEUE, tenant)
}

/// Moves `id` from wherever it waits to `zset` (`:done` or `:dead`), scored `age` ago, as a
/// worker that finished or killed it long ago would have left it.
async fn finish(env: &TestEnv, keys: &QueueKeys, zset: &str, id: &str, age: Duration) {
    let mut redis = env.redis.clone();
    let _: () = redis::pipe()
        .cmd("LREM")
        .arg(keys.active())
        .arg(0)
        .arg(id)
        .ignore()
        .cmd("ZADD")
        .arg(zset)
        .arg(now_ms() - age.as_millis() as u64)
        .arg(id)
        .ignore()
        .query_async(&mut redis)
        .await
        .expect("moved");
}

/// When `id`'s tombstone says its claim ends (ms), if it has one.
async fn tombstone(env: &TestEnv, keys: &QueueKeys, id: &str) -> Option<u64> {
    let mut redis = env.redis.clone();
    redis::cmd("ZSCORE")
        .arg(keys.gone())
        .arg(id)
        .query_async(&mut redis)
        .await
        .expect("ZSCORE")
}

async fn gone_count(env: &TestEnv, keys: &QueueKeys) -> u64 {
    let mut redis = env.redis.clone();
    redis::cmd("ZCARD")
        .arg(keys.gone())
        .query_async(&mut redis)
        .await
        .expect("ZCARD")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

async fn has_data(env: &TestEnv, keys: &QueueKeys, id: &str) -> bool {
    let mut redis = env.redis.clone();
    redis::cmd("HEXISTS")
        .arg(keys.data())
        .arg(id)
        .query_async(&mut redis)
        .await
        .expect("HEXISTS")
}

#[tokio::test]
async fn the_purpose_fixes_the_job_id_and_the_job_is_its_own_claim_without_a_key() {
    let env = TestEnv::new().await;
    let queues = env.queues();
    let tenant = Uuid::new_v4();
    let purpose = format!("inbound_message:{tenant}:{}", message_sid());
    let keys = shard(&queues, tenant);
    let mut redis = env.redis.clone();

    let job = inbound_message(tenant, "+14155550100", "hello");
    let first = queues
        .enqueue(&mut redis, &job, deduped(&purpose, WEEK))
        .await
        .expect("enqueued");
    assert!(first.created);
    assert_eq!(first.job_id, dedupe_job_id(&purpose));
    assert_eq!(
        Uuid::parse_str(&first.job_id)
            .expect("a UUID")
            .get_version_num(),
        8
    );
    // The claim is the job itself: no key of its own, no tombstone while the job is in Redis.
    assert_eq!(tombstone(&env, &keys, &first.job_id).await, None);
    let own_key: bool = redis::cmd("EXISTS")
        .arg(keys.dedupe(&purpose))
        .query_async(&mut redis)
        .await
        .expect("EXISTS");
    assert!(!own_key);

    let again = queues
        .enqueue(&mut redis, &job, deduped(&purpose, WEEK))
        .await
        .expect("answered");
    assert_eq!(
        (again.job_id.as_str(), again.created),
        (first.job_id.as_str(), false)
    );

    // An id and a purpose together are refused before anything is sent.
    let both = Enqueue {
        job_id: Some("chosen".into()),
        ..deduped(&purpose, WEEK)
    };
    assert!(matches!(
        queues.enqueue(&mut redis, &job, both).await,
        Err(EnqueueError::IdAndDedupe)
    ));
    env.cleanup().await;
}

#[tokio::test]
async fn the_vacuum_and_a_purge_leave_a_tombstone_until_the_purposes_time_is_up() {
    let env = TestEnv::new().await;
    let queues = env.queues();
    let tenant = Uuid::new_v4();
    let keys = shard(&queues, tenant);
    let mut redis = env.redis.clone();
    let job = inbound_message(tenant, "+14155550100", "hello");

    // One finished long ago (vacuumed), one dead (purged), one without a purpose (vacuumed,
    // no tombstone), one whose claim ran out before the vacuum (no tombstone).
    let vacuumed = format!("inbound_message:{tenant}:{}", message_sid());
    let purged = format!("inbound_message:{tenant}:{}", message_sid());
    let expired = format!("inbound_message:{tenant}:{}", message_sid());
    // A purpose with characters JSON escapes (`/`, `"`, `\`): the tombstone is its id's.
    let escaped = format!("idempotency:a/b\"c\\d:{}", message_sid());
    let mut ids = Vec::new();
    for (purpose, ttl) in [
        (&vacuumed, WEEK),
        (&purged, WEEK),
        (&expired, 1),
        (&escaped, WEEK),
    ] {
        let enqueued = queues
            .enqueue(&mut redis, &job, deduped(purpose, ttl))
            .await
            .expect("enqueued");
        ids.push(enqueued.job_id);
    }
    let plain = queues
        .enqueue(&mut redis, &job, Enqueue::default())
        .await
        .expect("enqueued")
        .job_id;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let hours = Duration::from_secs(2 * 3600);
    finish(&env, &keys, &keys.done(), &ids[0], hours).await;
    finish(&env, &keys, &keys.dead(), &ids[1], hours).await;
    finish(&env, &keys, &keys.done(), &ids[2], hours).await;
    finish(&env, &keys, &keys.done(), &plain, hours).await;
    finish(&env, &keys, &keys.done(), &ids[3], hours).await;

    let removed = consume::vacuum(&mut redis, &keys, Duration::from_secs(3600), 100)
        .await
        .expect("vacuumed");
    assert_eq!(removed, 4);
    let purged_n = dead::purge(&mut redis, queues.layout(), &[QUEUE])
        .await
        .expect("purged");
    assert_eq!(purged_n, 1);
    for id in [&ids[0], &ids[1], &ids[2], &ids[3], &plain] {
        assert!(!has_data(&env, &keys, id).await, "{id} removed");
    }

    // The live claims are tombstones now, until about a week from their enqueue.
    for purpose in [&vacuumed, &purged, &escaped] {
        let ends = tombstone(&env, &keys, &dedupe_job_id(purpose))
            .await
            .expect("a tombstone");
        let week_ms = WEEK * 1000;
        assert!(
            ends > now_ms() + week_ms - 600_000 && ends <= now_ms() + week_ms,
            "{purpose} ends at {ends}"
        );
        let again = queues
            .enqueue(&mut redis, &job, deduped(purpose, WEEK))
            .await
            .expect("answered");
        assert_eq!(again.job_id, dedupe_job_id(purpose));
        assert!(!again.created, "{purpose} still claimed");
        assert!(!has_data(&env, &keys, &again.job_id).await);
    }
    // The claim that ran out left nothing (nor did the job without a purpose): the purpose may
    // be used again.
    assert_eq!(tombstone(&env, &keys, &ids[2]).await, None);
    assert_eq!(tombstone(&env, &keys, &plain).await, None);
    let again = queues
        .enqueue(&mut redis, &job, deduped(&expired, WEEK))
        .await
        .expect("enqueued");
    assert!(again.created);
    env.cleanup().await;
}

#[tokio::test]
async fn ended_tombstones_are_dropped_a_bounded_number_a_call() {
    let env = TestEnv::new().await;
    let queues = env.queues();
    let keys = shard(&queues, Uuid::new_v4());
    let mut redis = env.redis.clone();
    // 2,500 tombstones that ended and one that has not.
    let mut pipe = redis::pipe();
    for n in 0..2500u64 {
        pipe.cmd("ZADD")
            .arg(keys.gone())
            .arg(1000 + n)
            .arg(format!("ended-{n}"))
            .ignore();
    }
    pipe.cmd("ZADD")
        .arg(keys.gone())
        .arg(now_ms() + 3_600_000)
        .arg("live")
        .ignore();
    let _: () = pipe.query_async(&mut redis).await.expect("ZADD");
    // A vacuum call of 1,000 drops at most 2,000 ended ones; the next drops the rest.
    consume::vacuum(&mut redis, &keys, Duration::from_secs(3600), 1000)
        .await
        .expect("vacuumed");
    assert_eq!(gone_count(&env, &keys).await, 501);
    consume::vacuum(&mut redis, &keys, Duration::from_secs(3600), 1000)
        .await
        .expect("vacuumed");
    assert_eq!(gone_count(&env, &keys).await, 1);
    assert!(tombstone(&env, &keys, "live").await.is_some());
    env.cleanup().await;
}
