//! Coalesced enqueues (`gatehouse::queue::coalesce`, the webhook's path to Redis) and the
//! group call under them (`Queues::enqueue_prepared`), against a real Redis: each job keeps its
//! own outcome and dedupe claim when jobs travel together, a job whose request has gone is not
//! sent, and a group that cannot reach Redis fails its jobs without stopping the next group.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use gatehouse::queue::coalesce::Coalescer;
use gatehouse_jobs::client::{Enqueue, Queues};
use gatehouse_jobs::keys::Layout;
use gatehouse_testenv::fault_proxy::{FaultProxy, Mode};
use gatehouse_testenv::*;
use uuid::Uuid;

const QUEUE: &str = "inbound_message";

fn deduped(tenant: Uuid, sid: &str) -> Enqueue {
    Enqueue {
        job_id: None,
        dedupe: Some((
            gatehouse::http::webhook::dedupe_purpose(tenant, sid),
            gatehouse::http::webhook::DEDUPE_TTL_SECONDS,
        )),
        request_id: Some(format!("req-{sid}")),
    }
}

/// The job ids in the queue's `:data` hash (every shard).
async fn stored_ids(env: &TestEnv, queues: &Queues) -> Vec<String> {
    let mut redis = env.redis.clone();
    let mut ids = Vec::new();
    for keys in queues.layout().all(QUEUE) {
        let found: Vec<String> = redis::cmd("HKEYS")
            .arg(keys.data())
            .query_async(&mut redis)
            .await
            .expect("HKEYS");
        ids.extend(found);
    }
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_share_script_calls_and_each_keeps_its_own_outcome() {
    let env = TestEnv::new().await;
    let queues = env.queues();
    let redis = env.redis.clone();
    let coalescer = Arc::new(Coalescer::new(queues.clone(), move || redis.clone()));
    let tenant = Uuid::new_v4();

    // 150 messages, 50 of them sent twice at the same moment (Twilio's retry racing the
    // original): 200 enqueues at once.
    let sids: Vec<String> = (0..150).map(|_| message_sid()).collect();
    let mut sends = Vec::new();
    for (n, sid) in sids.iter().chain(sids.iter().take(50)).enumerate() {
        let mut job = inbound_message(tenant, "+14155550100", &format!("message {n}"));
        job.message_sid = sid.clone();
        let prepared = queues.prepare(&job, deduped(tenant, sid)).expect("sealed");
        let coalescer = coalescer.clone();
        sends.push(tokio::spawn(async move {
            (job.message_sid.clone(), coalescer.enqueue(prepared).await)
        }));
    }
    let mut by_sid: HashMap<String, Vec<gatehouse_jobs::client::Enqueued>> = HashMap::new();
    for send in sends {
        let (sid, outcome) = send.await.expect("task");
        by_sid
            .entry(sid)
            .or_default()
            .push(outcome.expect("enqueued"));
    }

    // Each message: one job created; its twin, if any, names that job.
    let mut created = Vec::new();
    for (sid, outcomes) in &by_sid {
        let first: Vec<_> = outcomes.iter().filter(|o| o.created).collect();
        assert_eq!(first.len(), 1, "{sid}: exactly one job created");
        for outcome in outcomes {
            assert_eq!(outcome.job_id, first[0].job_id, "{sid}: the twin names it");
        }
        created.push(first[0].job_id.clone());
    }
    created.sort();
    assert_eq!(created.len(), 150);
    assert_eq!(
        stored_ids(&env, &queues).await,
        created,
        "exactly those in Redis"
    );
    assert_eq!(env.queued(QUEUE).await, 150, "each listed once");

    // Each job's metadata is its own (the request id travelled with it).
    for (sid, outcomes) in &by_sid {
        let meta = env.job_meta(QUEUE, &outcomes[0].job_id).await;
        assert_eq!(meta.get("request_id"), Some(format!("req-{sid}").as_str()));
        assert_eq!(meta.get("tenant"), Some(tenant.to_string().as_str()));
        assert_eq!(meta.get("status"), Some("Pending"));
    }

    // They travelled in fewer script calls than jobs.
    let (groups, jobs) = coalescer.sent();
    assert_eq!(jobs, 200, "every enqueue was sent once");
    assert!(
        groups < jobs,
        "200 enqueues at once went in {groups} script calls"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_group_call_keeps_each_jobs_order_shard_and_dedupe_claim() {
    let env = TestEnv::new().await;
    let layout = Layout::new(env.namespace.clone()).with_shards(QUEUE, 4);
    let queues = Queues::with_layout(layout).sealing_with(env.config.keyring.current().clone());
    // Tenants on different shards, and one message sent twice in the same call.
    let tenants: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    let twin = message_sid();
    let mut jobs = Vec::new();
    for (n, tenant) in tenants.iter().enumerate() {
        let mut job = inbound_message(*tenant, "+14155550100", "hello");
        if n == 0 {
            job.message_sid = twin.clone();
        }
        jobs.push(
            queues
                .prepare(&job, deduped(*tenant, &job.message_sid))
                .expect("sealed"),
        );
    }
    let mut again = inbound_message(tenants[0], "+14155550100", "hello again");
    again.message_sid = twin.clone();
    jobs.insert(
        3,
        queues
            .prepare(&again, deduped(tenants[0], &twin))
            .expect("sealed"),
    );

    let mut redis = env.redis.clone();
    let outcomes = queues
        .enqueue_prepared(&mut redis, &jobs)
        .await
        .expect("sent");
    assert_eq!(outcomes.len(), jobs.len(), "one outcome a job, in order");
    for (n, (job, outcome)) in jobs.iter().zip(&outcomes).enumerate() {
        if n == 3 {
            assert!(!outcome.created, "the twin found the first");
            assert_eq!(outcome.job_id, jobs[0].job_id());
        } else {
            assert!(outcome.created, "job {n} created");
            assert_eq!(outcome.job_id, job.job_id());
        }
    }
    // Each created job on its tenant's shard, and nowhere else.
    // (The twin has the first's id: a dedupe purpose fixes the job id.)
    assert_eq!(jobs[3].job_id(), jobs[0].job_id());
    for (job, tenant) in jobs
        .iter()
        .enumerate()
        .filter(|(n, _)| *n != 3)
        .map(|(_, job)| job)
        .zip(&tenants)
    {
        let keys = queues.for_tenant_keys(QUEUE, *tenant);
        assert_eq!(job.shard(), (QUEUE, keys.shard));
        let there: bool = redis::cmd("HEXISTS")
            .arg(keys.data())
            .arg(job.job_id())
            .query_async(&mut redis)
            .await
            .expect("HEXISTS");
        assert!(there, "{} on shard {}", job.job_id(), keys.shard);
    }
    assert_eq!(stored_ids(&env, &queues).await.len(), 6);

    // Sent again (a retry after an error that named no job): nothing more.
    let retried = queues
        .enqueue_prepared(&mut redis, &jobs)
        .await
        .expect("sent");
    assert!(retried.iter().all(|o| !o.created), "nothing created twice");
    assert_eq!(stored_ids(&env, &queues).await.len(), 6);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_whose_request_left_before_its_group_is_not_sent_and_a_stuck_redis_fails_only_its_groups()
 {
    let env = TestEnv::new().await;
    let proxy = FaultProxy::start(address_of(&redis_url())).await;
    let redis =
        gatehouse::redis_conn::connect_lazy_url(&secrecy::SecretString::from(proxy.redis_url()))
            .expect("redis url");
    let queues = env.queues();
    let coalescer = Arc::new(Coalescer::new(queues.clone(), move || redis.clone()));
    let tenant = Uuid::new_v4();
    let prepare = |body: &str| {
        let job = inbound_message(tenant, "+14155550100", body);
        queues
            .prepare(&job, deduped(tenant, &job.message_sid))
            .expect("sealed")
    };

    let first = prepare("through the proxy");
    coalescer.enqueue(first).await.expect("enqueued");

    // Redis stops answering: three calls wait in flight (the first sent by its own request,
    // the coalescer idle; then the task's two, each leaving while the others wait), so the
    // next job waits its turn in the queue — and its request gives up.
    proxy.set(Mode::Blackhole);
    let mut stuck = Vec::new();
    for n in 0..3 {
        let coalescer = coalescer.clone();
        let job = prepare(&format!("stuck {n}"));
        stuck.push(tokio::spawn(async move { coalescer.enqueue(job).await }));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let abandoned = prepare("abandoned");
    let abandoned_id = abandoned.job_id().to_owned();
    let gave_up =
        tokio::time::timeout(Duration::from_millis(200), coalescer.enqueue(abandoned)).await;
    assert!(gave_up.is_err(), "the request gave up while Redis hung");

    // Redis answers again: the hung connections are reset, their groups fail (each of their
    // requests gets an error), the abandoned job's turn comes — and it is skipped, where
    // sending it would now reach Redis.
    proxy.set(Mode::Pass);
    for send in stuck {
        let outcome = tokio::time::timeout(Duration::from_secs(30), send)
            .await
            .expect("answered")
            .expect("task");
        assert!(outcome.is_err(), "a group Redis never answered fails");
    }
    let after = prepare("after the outage");
    let after_id = after.job_id().to_owned();
    assert!(
        eventually(Duration::from_secs(15), || {
            let coalescer = coalescer.clone();
            let job = after.clone();
            async move { coalescer.enqueue(job).await.is_ok() }
        })
        .await,
        "the next group is sent once Redis answers"
    );
    let ids = stored_ids(&env, &queues).await;
    assert!(ids.contains(&after_id), "the job after the outage is there");
    assert!(
        !ids.contains(&abandoned_id),
        "the job whose request left was never sent"
    );
    drop(proxy);
    env.cleanup().await;
}
