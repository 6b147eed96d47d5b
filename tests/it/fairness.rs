//! Tenant fairness (issue 19): tenants with waiting jobs take turns, one job each, and each
//! tenant's jobs stay first in, first out; a tenant at its cap of jobs in flight waits
//! without holding up anyone else, across worker processes and through orphan rescue.
//!
//! The order and the cap are the queue scripts' (`src/queue/lua/fair.lua`), so the first tests
//! drive them through `queue::consume` exactly as a worker does, one fetch at a time, and check
//! the exact order; the last runs `gatehouse work` processes against a fake LLM that counts
//! each tenant's calls in flight.

use std::collections::HashMap;
use std::time::Duration;

use gatehouse::queue::consume::{self, Ack, Fairness, Outcome, QueueOrder};
use gatehouse::queue::keys::QueueKeys;
use gatehouse_jobs::InboundMessage;
use gatehouse_testenv::*;
use uuid::Uuid;

use crate::common::{cli, message_sid, serve_loopback};

fn message(tenant: Uuid, body: &str) -> InboundMessage {
    InboundMessage {
        tenant_id: tenant,
        message_sid: message_sid(),
        from: "+14155550100".into(),
        to: "+14155550199".into(),
        body: body.into(),
        received_at: "2026-12-06T10:00:00Z".into(),
    }
}

/// Enqueues `n` messages of `tenant` (one pipeline); their job ids, in order.
async fn enqueue(env: &TestEnv, tenant: Uuid, n: usize) -> Vec<String> {
    let jobs: Vec<InboundMessage> = (0..n).map(|i| message(tenant, &format!("m{i}"))).collect();
    env.queues()
        .enqueue_batch(&mut env.redis.clone(), &jobs)
        .await
        .expect("enqueue")
}

/// One fetch of up to `batch` jobs by `worker`, as a worker makes it; the ids it took, in order.
async fn fetch(
    env: &TestEnv,
    keys: &QueueKeys,
    fairness: Fairness,
    worker: &str,
    batch: usize,
) -> Vec<String> {
    let reply = consume::fetch(&mut env.redis.clone(), keys, fairness, worker, batch)
        .await
        .expect("fetch");
    // {payloads, metas}; each meta is {job_id, field, value, ...}.
    let Some(redis::Value::Array(metas)) = reply.get(1) else {
        panic!("a fetch reply: {reply:?}");
    };
    metas
        .iter()
        .map(|meta| match meta {
            redis::Value::Array(fields) => match fields.first() {
                Some(redis::Value::BulkString(id)) => String::from_utf8_lossy(id).into_owned(),
                other => panic!("a job id: {other:?}"),
            },
            other => panic!("a job's metadata: {other:?}"),
        })
        .collect()
}

/// `worker` acknowledges `ids` as done.
async fn finish(env: &TestEnv, keys: &QueueKeys, fairness: Fairness, worker: &str, ids: &[String]) {
    let acks: Vec<Ack> = ids
        .iter()
        .map(|id| Ack::settled(id.as_str(), Outcome::Done, ""))
        .collect();
    let acked = consume::ack(
        &mut env.redis.clone(),
        keys,
        fairness,
        worker,
        Duration::from_secs(60),
        &acks,
    )
    .await
    .expect("ack");
    assert_eq!(acked.acked, ids.len(), "{worker} held them");
}

async fn register(env: &TestEnv, keys: &QueueKeys, worker: &str) {
    consume::register(&mut env.redis.clone(), keys, worker)
        .await
        .expect("register");
}

async fn hash_field(env: &TestEnv, key: &str, field: &str) -> Option<i64> {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(&mut env.redis.clone())
        .await
        .expect("HGET")
}

/// Which tenant each job id is (by the order they were enqueued in).
fn names(jobs: &[(&str, &[String])]) -> HashMap<String, String> {
    jobs.iter()
        .flat_map(|(name, ids)| {
            ids.iter()
                .enumerate()
                .map(move |(i, id)| (id.clone(), format!("{name}{}", i + 1)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_with_waiting_jobs_take_turns_and_each_tenants_jobs_stay_in_order() {
    let env = TestEnv::new().await;
    let keys = QueueKeys::new(&env.namespace, "inbound_message");
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // A noisy tenant's backlog first, then two quiet tenants' few messages.
    let a_ids = enqueue(&env, a, 40).await;
    let b_ids = enqueue(&env, b, 4).await;
    let c_ids = enqueue(&env, c, 3).await;
    let name = names(&[("A", &a_ids), ("B", &b_ids), ("C", &c_ids)]);
    register(&env, &keys, "w").await;
    let fair = Fairness::default();
    let mut order = Vec::new();
    loop {
        let taken = fetch(&env, &keys, fair, "w", 1).await;
        if taken.is_empty() {
            break;
        }
        finish(&env, &keys, fair, "w", &taken).await;
        order.extend(taken.iter().map(|id| name[id].clone()));
    }
    // One job each in turn while several tenants wait (ties broken by job id: A's are the
    // oldest), then the rest of A's backlog in its own order.
    let mut expected: Vec<String> = [
        "A1", "B1", "C1", "A2", "B2", "C2", "A3", "B3", "C3", "A4", "B4",
    ]
    .map(String::from)
    .to_vec();
    expected.extend((5..=40).map(|i| format!("A{i}")));
    assert_eq!(order, expected);
    // Nothing is left behind: no tenant counted as waiting or running.
    let waiting: i64 = redis::cmd("HLEN")
        .arg(keys.backlog())
        .query_async(&mut env.redis.clone())
        .await
        .expect("HLEN");
    let running: i64 = redis::cmd("HLEN")
        .arg(keys.running())
        .query_async(&mut env.redis.clone())
        .await
        .expect("HLEN");
    assert_eq!((waiting, running), (0, 0));

    // A tenant arriving while another's backlog drains starts within a turn, not after it.
    let a_ids = enqueue(&env, a, 30).await;
    let first = fetch(&env, &keys, fair, "w", 5).await;
    finish(&env, &keys, fair, "w", &first).await;
    let b_ids = enqueue(&env, b, 2).await;
    let name = names(&[("A", &a_ids), ("B", &b_ids)]);
    let next: Vec<String> = fetch(&env, &keys, fair, "w", 4)
        .await
        .iter()
        .map(|id| name[id].clone())
        .collect();
    assert_eq!(next, ["A6", "B1", "A7", "B2"]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_order_fifo_keeps_one_order_for_every_tenant() {
    let env = TestEnv::new().await;
    let keys = QueueKeys::new(&env.namespace, "inbound_message");
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let a_ids = enqueue(&env, a, 5).await;
    let b_ids = enqueue(&env, b, 2).await;
    let name = names(&[("A", &a_ids), ("B", &b_ids)]);
    register(&env, &keys, "w").await;
    let fifo = Fairness {
        order: QueueOrder::Fifo,
        max_in_flight: None,
    };
    let taken: Vec<String> = fetch(&env, &keys, fifo, "w", 10)
        .await
        .iter()
        .map(|id| name[id].clone())
        .collect();
    assert_eq!(taken, ["A1", "A2", "A3", "A4", "A5", "B1", "B2"]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_cap_waits_alone_and_a_dead_workers_slots_come_back_with_its_jobs() {
    let env = TestEnv::new().await;
    let keys = QueueKeys::new(&env.namespace, "inbound_message");
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let a_ids = enqueue(&env, a, 10).await;
    let b_ids = enqueue(&env, b, 2).await;
    let name = names(&[("A", &a_ids), ("B", &b_ids)]);
    let capped = Fairness {
        order: QueueOrder::Fair,
        max_in_flight: Some(2),
    };
    let named = |ids: &[String]| -> Vec<String> { ids.iter().map(|id| name[id].clone()).collect() };
    let (a_key, b_key) = (a.to_string(), b.to_string());
    register(&env, &keys, "w1").await;
    register(&env, &keys, "w2").await;

    // A batch of 10 takes two of A's and B's two; A's other eight are parked, once each.
    let w1 = fetch(&env, &keys, capped, "w1", 10).await;
    assert_eq!(named(&w1), ["A1", "B1", "A2", "B2"]);
    assert_eq!(hash_field(&env, &keys.running(), &a_key).await, Some(2));
    assert_eq!(hash_field(&env, &keys.capped(), &a_key).await, Some(8));
    // Another worker finds nothing to do and passes over nothing: A's jobs wait parked.
    assert!(fetch(&env, &keys, capped, "w2", 10).await.is_empty());
    let ready: i64 = redis::cmd("ZCARD")
        .arg(keys.ready())
        .query_async(&mut env.redis.clone())
        .await
        .expect("ZCARD");
    assert_eq!(ready, 0);

    // A slot freed is one more of A's jobs, the next in A's order, for any worker.
    finish(&env, &keys, capped, "w1", &w1[..1]).await;
    let w2 = fetch(&env, &keys, capped, "w2", 10).await;
    assert_eq!(named(&w2), ["A3"]);
    assert!(fetch(&env, &keys, capped, "w2", 10).await.is_empty());

    // w1 dies holding A2 and B's two. Orphan rescue hands them back and frees their slots at
    // once: one slot of A's comes back (w2 still holds A3), so exactly one A job runs next,
    // and B's two.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (recovered, dead) = consume::heartbeat(
        &mut env.redis.clone(),
        &keys,
        capped,
        Duration::from_millis(10),
        None,
        &["w2".to_owned()],
    )
    .await
    .expect("heartbeat");
    assert_eq!((recovered, dead), (3, 1));
    assert_eq!(hash_field(&env, &keys.running(), &a_key).await, Some(1));
    assert_eq!(hash_field(&env, &keys.running(), &b_key).await, None);
    let again_ids = fetch(&env, &keys, capped, "w2", 10).await;
    let again = named(&again_ids);
    assert_eq!(
        again.iter().filter(|job| job.starts_with('A')).count(),
        1,
        "{again:?}"
    );
    assert_eq!(
        again.iter().filter(|job| job.starts_with('B')).count(),
        2,
        "{again:?}"
    );
    assert_eq!(hash_field(&env, &keys.running(), &a_key).await, Some(2));
    // w1's late acknowledgement of A2 finds nothing: its slot is not freed twice.
    let late = consume::ack(
        &mut env.redis.clone(),
        &keys,
        capped,
        "w1",
        Duration::from_secs(60),
        &[Ack::settled(w1[2].as_str(), Outcome::Done, "")],
    )
    .await
    .expect("ack");
    assert_eq!(late.acked, 0);
    assert_eq!(hash_field(&env, &keys.running(), &a_key).await, Some(2));

    // Drain: never more than two of A's in flight, and every job runs once.
    assert!(
        fetch(&env, &keys, capped, "w2", 10).await.is_empty(),
        "A is at its cap"
    );
    let mut ran: Vec<String> = [named(&w1[..1]), named(&w2), again].concat();
    finish(&env, &keys, capped, "w2", &[w2, again_ids].concat()).await;
    loop {
        let taken = fetch(&env, &keys, capped, "w2", 10).await;
        if taken.is_empty() {
            break;
        }
        assert!(taken.len() <= 2, "A's cap: {:?}", named(&taken));
        finish(&env, &keys, capped, "w2", &taken).await;
        ran.extend(named(&taken));
    }
    ran.sort();
    let mut all: Vec<String> = name.values().cloned().collect();
    all.sort();
    assert_eq!(ran, all, "every job ran once");
    env.cleanup().await;
}

/// An OpenAI-compatible LLM on loopback that answers after `delay` and counts, per marker
/// (`alpha`, `bravo`: the start of a message's text), the calls in flight now and the most
/// ever in flight at once.
#[derive(Clone, Default)]
struct Concurrency {
    now: std::sync::Arc<std::sync::Mutex<HashMap<String, Calls>>>,
}

/// In flight now, most at once, calls in all.
type Calls = (usize, usize, usize);

impl Concurrency {
    /// (in flight now, most at once, calls) of `marker`.
    fn of(&self, marker: &str) -> (usize, usize, usize) {
        self.now
            .lock()
            .map(|m| m.get(marker).copied().unwrap_or_default())
            .unwrap_or_default()
    }

    fn enter(&self, marker: &str) {
        if let Ok(mut m) = self.now.lock() {
            let entry = m.entry(marker.to_owned()).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(entry.0);
            entry.2 += 1;
        }
    }

    fn leave(&self, marker: &str) {
        if let Ok(mut m) = self.now.lock()
            && let Some(entry) = m.get_mut(marker)
        {
            entry.0 = entry.0.saturating_sub(1);
        }
    }
}

async fn counting_llm(delay: Duration) -> (std::net::SocketAddr, Concurrency) {
    let seen = Concurrency::default();
    let counted = seen.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |request: String| {
            let counted = counted.clone();
            async move {
                let marker = ["alpha", "bravo"]
                    .into_iter()
                    .find(|m| request.contains(&format!("{m}-")))
                    .unwrap_or("other");
                counted.enter(marker);
                // Left when the answer is sent, or when the caller (a killed worker) is gone.
                struct Leave(Concurrency, &'static str);
                impl Drop for Leave {
                    fn drop(&mut self) {
                        self.0.leave(self.1);
                    }
                }
                let _leave = Leave(counted.clone(), marker);
                tokio::time::sleep(delay).await;
                axum::Json(confident_order_status())
            }
        }),
    );
    let addr = serve_loopback(app).await;
    (addr, seen)
}

/// Three `gatehouse work` processes, `TENANT_MAX_IN_FLIGHT_INBOUND_MESSAGE=3` and tenant B
/// capped at 1 by `tenants set-limits`: the LLM (each job's call to it, counted by the fake
/// itself, not by gatehouse) never has more than 3 of A's messages or 1 of B's at once, B's
/// messages run while A's backlog drains, and a worker killed with `kill -9` while it holds
/// A's jobs gives them back with their slots: every message is stored exactly once, and the
/// cap holds through the rescue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caps_hold_across_worker_processes_and_a_kill_9() {
    let (llm, seen) = counting_llm(Duration::from_millis(250)).await;
    let env = TestEnv::with_vars(|vars| {
        vars.insert("LLM_URL".into(), format!("http://{llm}/v1"));
        vars.insert("LLM_MODEL".into(), "fairness-model".into());
        vars.insert("TENANT_MAX_IN_FLIGHT_INBOUND_MESSAGE".into(), "3".into());
        vars.insert("WORKER_CONCURRENCY".into(), "4".into());
        vars.insert("WORKER_HEARTBEAT_SECONDS".into(), "1".into());
        vars.insert("WORKER_MISSED_HEARTBEATS".into(), "2".into());
    })
    .await;
    let a = env.create_tenant().await;
    let b = env.create_tenant().await;
    let (code, out) = cli(
        &env,
        &[
            "tenants",
            "set-limits",
            "--tenant",
            &b.to_string(),
            "--queue",
            "inbound_message",
            "--max-in-flight",
            "1",
        ],
    );
    assert_eq!(code, 0, "set-limits: {out}");
    let (code, out) = cli(&env, &["tenants", "show", "--tenant", &b.to_string()]);
    assert_eq!(code, 0, "show: {out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("inbound_message max_in_flight=1 (tenant)")),
        "{out}"
    );
    let (code, out) = cli(&env, &["tenants", "show", "--tenant", &a.to_string()]);
    assert_eq!(code, 0, "show: {out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("inbound_message max_in_flight=3 (default)")),
        "{out}"
    );
    let (code, _) = cli(
        &env,
        &[
            "tenants",
            "set-limits",
            "--tenant",
            &b.to_string(),
            "--queue",
            "inbound_message",
            "--max-in-flight",
            "0",
        ],
    );
    assert_eq!(code, 1, "a cap of 0 is refused");

    let alpha: Vec<InboundMessage> = (0..30)
        .map(|i| message(a, &format!("alpha-{i} where is my order?")))
        .collect();
    let bravo: Vec<InboundMessage> = (0..6)
        .map(|i| message(b, &format!("bravo-{i} where is my order?")))
        .collect();
    let queues = env.queues();
    queues
        .enqueue_batch(&mut env.redis.clone(), &alpha)
        .await
        .expect("enqueue A");
    queues
        .enqueue_batch(&mut env.redis.clone(), &bravo)
        .await
        .expect("enqueue B");

    // The first worker alone takes A's three slots (and B's one), and is killed holding them;
    // then two more start.
    let mut first = KillOnDrop(env.spawn(&["work"], &[]));
    assert!(
        eventually(Duration::from_secs(20), || async {
            seen.of("alpha").0 == 3
        })
        .await,
        "A reaches its cap: {:?}",
        seen.of("alpha")
    );
    let stats = gatehouse::queue::stats::queue_stats(
        &mut env.redis.clone(),
        env.config.layout(),
        "inbound_message",
    )
    .await
    .expect("stats");
    // Both have jobs waiting; at least one (B, whose second job came up) has some parked.
    assert_eq!(stats.tenants_waiting, 2, "{stats:?}");
    assert!(stats.tenants_capped >= 1, "{stats:?}");
    // Killed holding A's three and B's one (their LLM calls are under way).
    let holders: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(env.config.layout().shard("inbound_message", 0).inflight())
        .query_async(&mut env.redis.clone())
        .await
        .expect("HGETALL");
    let marker = format!("-{}-", first.0.id());
    kill(&mut first.0);
    assert!(
        holders.values().filter(|w| w.contains(&marker)).count() >= 3,
        "{holders:?}"
    );
    // The others wait for A's and B's slots until the dead worker's jobs are rescued with them.
    let _second = KillOnDrop(env.spawn(&["work"], &[]));
    let _third = KillOnDrop(env.spawn(&["work"], &[]));

    let stored = env
        .wait_for_count("SELECT count(*) FROM messages", 36, Duration::from_secs(90))
        .await;
    assert_eq!(stored, 36, "every message is stored");
    let processed: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_jobs")
        .fetch_one(&env.pool)
        .await
        .expect("processed_jobs");
    assert_eq!(processed, 36, "once each");
    let (_, a_most, _) = seen.of("alpha");
    let (_, b_most, _) = seen.of("bravo");
    assert_eq!(a_most, 3, "A's cap, reached and never passed");
    assert_eq!(b_most, 1, "B's override, reached and never passed");
    // Nothing is left counted: no slot leaked by the kill.
    let running: i64 = redis::cmd("HLEN")
        .arg(env.config.layout().shard("inbound_message", 0).running())
        .query_async(&mut env.redis.clone())
        .await
        .expect("HLEN");
    assert!(
        eventually(Duration::from_secs(10), || async {
            let n: i64 = redis::cmd("HLEN")
                .arg(env.config.layout().shard("inbound_message", 0).running())
                .query_async(&mut env.redis.clone())
                .await
                .unwrap_or(-1);
            n == 0
        })
        .await,
        "slots all free once the work is done (was {running})"
    );
    env.cleanup().await;
}

/// A cap raised (here: an override to `none`) releases the tenant's parked jobs at the next
/// heartbeat, without waiting for one of its jobs to finish; and the overrides in PostgreSQL
/// come back into Redis when Redis lost them (`limits::sync`, run by every worker at start and
/// each minute), stale ones removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_cap_releases_parked_jobs_and_overrides_survive_a_redis_that_lost_them() {
    use gatehouse::queue::limits::{self, Limit};
    let env = TestEnv::new().await;
    let keys = QueueKeys::new(&env.namespace, "inbound_message");
    let a = env.create_tenant().await;
    let layout = env.config.layout().clone();
    limits::set(
        &env.pool,
        &mut env.redis.clone(),
        &layout,
        a,
        "inbound_message",
        Limit::MaxInFlight(1),
    )
    .await
    .expect("set-limits");
    let ids = enqueue(&env, a, 5).await;
    register(&env, &keys, "w").await;
    let fair = Fairness::default();
    let first = fetch(&env, &keys, fair, "w", 10).await;
    assert_eq!(first, ids[..1], "the override caps A at one");
    assert_eq!(
        hash_field(&env, &keys.capped(), &a.to_string()).await,
        Some(4)
    );

    limits::set(
        &env.pool,
        &mut env.redis.clone(),
        &layout,
        a,
        "inbound_message",
        Limit::Unlimited,
    )
    .await
    .expect("set-limits none");
    consume::heartbeat(
        &mut env.redis.clone(),
        &keys,
        fair,
        Duration::from_secs(60),
        Some("w"),
        &[],
    )
    .await
    .expect("heartbeat");
    let rest = fetch(&env, &keys, fair, "w", 10).await;
    assert_eq!(rest, ids[1..], "released in A's order");

    // Redis loses its keys; a stale override of a tenant without a row is there instead.
    let () = redis::cmd("DEL")
        .arg(keys.caps())
        .query_async(&mut env.redis.clone())
        .await
        .expect("DEL");
    let stale = Uuid::new_v4().to_string();
    let () = redis::cmd("HSET")
        .arg(keys.caps())
        .arg(&stale)
        .arg(7)
        .query_async::<i64>(&mut env.redis.clone())
        .await
        .map(drop)
        .expect("HSET");
    let changed = limits::sync(&env.pool, &mut env.redis.clone(), &layout)
        .await
        .expect("sync");
    assert_eq!(changed, 2, "one restored, one removed");
    let caps: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.caps())
        .query_async(&mut env.redis.clone())
        .await
        .expect("HGETALL");
    assert_eq!(caps, HashMap::from([(a.to_string(), "0".to_owned())]));
    // A tenant that does not exist is refused, and nothing is written.
    let unknown = Uuid::new_v4();
    assert!(matches!(
        limits::set(
            &env.pool,
            &mut env.redis.clone(),
            &layout,
            unknown,
            "inbound_message",
            Limit::MaxInFlight(2),
        )
        .await,
        Err(limits::LimitError::UnknownTenant(_))
    ));
    assert!(matches!(
        limits::set(
            &env.pool,
            &mut env.redis.clone(),
            &layout,
            a,
            "no_such_queue",
            Limit::MaxInFlight(2),
        )
        .await,
        Err(limits::LimitError::Invalid(_))
    ));
    env.cleanup().await;
}

/// With Redis refusing connections, `tenants set-limits` keeps the override in PostgreSQL and
/// says Redis did not take it (exit 2: the workers copy it in once Redis answers); `tenants show`
/// still prints the caps, without the live counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_limits_with_redis_down_keeps_the_override_and_says_so() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let mut vars = env.vars.clone();
    vars.insert(
        "REDIS_URL".into(),
        format!("redis://127.0.0.1:{}", free_port()),
    );
    let out = run_cli(
        &[
            "tenants",
            "set-limits",
            "--tenant",
            &tenant.to_string(),
            "--queue",
            "sync_catalog",
            "--max-in-flight",
            "2",
        ],
        &vars,
        "",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("recorded in the database"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cap: i32 = sqlx::query_scalar(
        "SELECT max_in_flight FROM tenant_queue_limits WHERE tenant_id = $1 AND queue = 'sync_catalog'",
    )
    .bind(tenant)
    .fetch_one(&env.pool)
    .await
    .expect("the row");
    assert_eq!(cap, 2);
    let out = run_cli(
        &["tenants", "show", "--tenant", &tenant.to_string()],
        &vars,
        "",
    );
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l == "sync_catalog max_in_flight=2 (tenant)"),
        "{stdout}"
    );
    env.cleanup().await;
}
