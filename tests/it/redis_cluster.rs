//! Redis Cluster readiness (issue 18). The queue layer runs on a one-node cluster (no script
//! crosses a slot), and jobs an older release left in the pre-cluster key layout move into the
//! new one. The Redis users outside the queue — rate
//! limits, the scope cache, security-event budgets and alert windows — run on a one-node Redis
//! Cluster, where a command or script
//! whose keys span two slots fails (`CROSSSLOT`) and a `#!lua` script may touch only the keys
//! it declares. On a single Redis both would pass unnoticed; here they would fail the request
//! (rate limits fail closed) or silently fall back to PostgreSQL (the scope cache), so the test
//! checks the cache was really used.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;

use crate::common::*;
use gatehouse::access::{ScopeCache, Source};
use gatehouse::http::AppState;
use gatehouse::security::jwt::SubjectKind;
use gatehouse_testenv::*;
use reqwest::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_the_scope_cache_and_security_event_counters_run_on_a_one_node_cluster() {
    let cluster = OneNodeCluster::start_anywhere()
        .await
        .expect("a one-node Redis Cluster (redis-server --cluster-enabled yes)");
    let url = cluster.url();
    let env = TestEnv::with_vars(|vars| {
        vars.insert("REDIS_URL".into(), url.clone());
        // Small enough to reach within the test: the per-IP auth limit's script runs on the
        // cluster for every attempt, and its refusal proves it counted there.
        vars.insert("RATE_LIMIT_AUTH_IP".into(), "5/minute".into());
    })
    .await;
    let redis = gatehouse::redis_conn::connect_url(&secrecy::SecretString::from(cluster.url()))
        .await
        .expect("connect to the cluster node");
    let state = Arc::new(AppState::new(
        env.config.clone(),
        env.pool.clone(),
        redis.clone(),
    ));
    let server = TestServer::start(state).await;
    let http = client();

    let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
    let user = create_user(&env, &email, None).await;
    let token = login(&http, &server, &email).await;
    // The scope cache: filled on the first request, read on the second, all on the cluster.
    for _ in 0..2 {
        let r = api(&http, &server, Method::GET, "/v1/me")
            .bearer_auth(&token)
            .send()
            .await
            .expect("me");
        assert_eq!(r.status(), 200);
    }
    let key = format!("{}:scopes:{user}", env.namespace);
    let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut redis.clone())
        .await
        .expect("the cache hash");
    assert_eq!(
        fields.get("entry_version").map(String::as_str),
        Some("0"),
        "the first request filled the cache on the cluster: {fields:?}"
    );
    let cache = ScopeCache::new(env.namespace.clone());
    let resolve = |redis: gatehouse::redis_conn::RedisConn| {
        let (cache, pool) = (cache.clone(), env.pool.clone());
        async move {
            let mut redis = redis;
            cache
                .resolve(&mut redis, &pool, user, SubjectKind::User)
                .await
                .expect("resolve")
                .1
        }
    };
    assert_eq!(resolve(redis.clone()).await, Source::Cache);
    cache.bump(&mut redis.clone(), user).await.expect("bump");
    assert_eq!(
        resolve(redis.clone()).await,
        Source::Database,
        "a bump retires the entry"
    );
    assert_eq!(
        resolve(redis.clone()).await,
        Source::Cache,
        "and the next one refills it"
    );

    // The per-IP auth limit: the attempts within it are answered, the next is refused by the
    // script's own count (429, not the 503 of a limit that cannot be checked).
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = api(&http, &server, Method::POST, "/v1/auth/login")
            .json(&serde_json::json!({"email": email, "password": "wrong password"}))
            .send()
            .await
            .expect("login");
        statuses.push(r.status().as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(!statuses.contains(&503), "{statuses:?}");

    // Security events: the pair's budget (one hash tag) and the alert window (another slot)
    // in one pipeline. An invalid webhook signature always alerts.
    let events =
        gatehouse::events::SecurityLog::new(env.pool.clone(), redis.clone(), env.namespace.clone());
    let forged = || {
        let mut event = gatehouse::events::SecurityEvent::new(
            gatehouse::events::EventType::InvalidWebhookSignature,
        );
        event.ip = "203.0.113.9".parse().ok();
        event
    };
    events.record(forged()).await;
    assert!(
        env.wait_for_events("suspicious_activity", 1).await >= 1,
        "the alert fired"
    );
    let budget_keys = |pattern: String| {
        let mut redis = redis.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut redis)
                .await
                .expect("keys");
            keys
        }
    };
    let budget = budget_keys(format!(
        "{}:{{events:invalid_webhook_signature:203.0.113.9}}:budget:*",
        env.namespace
    ))
    .await;
    assert_eq!(
        budget.len(),
        1,
        "the pair's budget counted on the cluster: {budget:?}"
    );
    let alerts = budget_keys(format!("{}:alerts:*", env.namespace)).await;
    assert!(
        !alerts.is_empty(),
        "the alert window counted on the cluster"
    );
    // A server that lost its script cache (a restart, a failover): the next event still counts.
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut redis.clone())
        .await
        .expect("script flush");
    events.record(forged()).await;
    let counted = gatehouse_testenv::eventually(std::time::Duration::from_secs(10), || {
        let (mut redis, key) = (redis.clone(), budget[0].clone());
        async move {
            let n: Option<u64> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut redis)
                .await
                .unwrap_or(None);
            n == Some(2)
        }
    })
    .await;
    assert!(counted, "the second event was counted after SCRIPT FLUSH");

    server.stop().await;
    env.cleanup().await;
}

/// The queue layer on a one-node cluster: every script starts with `#!lua`, so Redis refuses a
/// key it did not declare or one in another slot — what a single Redis lets pass. A signed
/// webhook, a producer job with an `Idempotency-Key` (the dedupe key, claimed in the enqueue
/// script), a job that fails to the dead letters, `jobs dead`, `jobs retry`, `jobs purge`,
/// queue statistics and `keys status` all run there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_runs_on_a_one_node_cluster_where_no_script_may_cross_a_slot() {
    let cluster = OneNodeCluster::start_anywhere()
        .await
        .expect("a one-node Redis Cluster (redis-server --cluster-enabled yes)");
    let env = TestEnv::on_redis(&cluster.url(), |_| {}).await;
    queue_round_trip(&env).await;
    env.cleanup().await;
}

/// The same on a three-primary cluster through the cluster client (`REDIS_CLUSTER=true`, the
/// seed nodes in `REDIS_URL`): commands and scripts are routed to the node of their keys' slot,
/// and the security log's budget and alert counters (two slots) are counted apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_runs_on_a_three_primary_cluster_through_the_cluster_client() {
    let cluster = LocalCluster::start(3, 0)
        .await
        .expect("a three-primary Redis Cluster (redis-cli --cluster create)");
    let env = TestEnv::on_cluster(&cluster.seeds(), |_| {}).await;
    queue_round_trip(&env).await;
    // A forged webhook signature's security event counts on the cluster.
    let server = env.start_server().await;
    let tenant = env.create_tenant().await;
    let params = sms_params(&message_sid(), "+14155550100", "hi");
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    let r = client()
        .post(server.url(&webhook_path(tenant)))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .header("x-twilio-signature", "bCKNFa1ALlAtW1bWNwG18+MUxZY=")
        .body(body)
        .send()
        .await
        .expect("webhook");
    assert_eq!(r.status(), 403);
    assert!(env.wait_for_events("invalid_webhook_signature", 1).await >= 1);
    // A dashboard session (an atomic HSET + EXPIRE of one key) lives on the cluster too.
    let mut redis = env.redis.clone();
    let user = uuid::Uuid::new_v4();
    let session = gatehouse::http::admin::session::create(&mut redis, &env.namespace, user)
        .await
        .expect("session created on the cluster");
    assert!(
        gatehouse::http::admin::session::load(&mut redis, &env.namespace, &session)
            .await
            .expect("session read")
            .is_some(),
        "and read back"
    );
    gatehouse::http::admin::session::destroy(&mut redis, &env.namespace, &session)
        .await
        .expect("session removed");
    server.stop().await;
    env.cleanup().await;
}

/// Signed webhooks, producer jobs with an idempotency key, dead letters through the CLI,
/// statistics and `keys status`, all on `env`'s Redis.
async fn queue_round_trip(env: &TestEnv) {
    use gatehouse_jobs::client::Enqueue;
    use gatehouse_jobs::{SyncCatalog, SyncMode};
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let worker = env.start_worker();

    let sid = message_sid();
    let r = signed_form(
        &client(),
        &server,
        tenant,
        &sms_params(&sid, "+14155550100", "Where is my order?"),
    )
    .send()
    .await
    .expect("webhook");
    assert_eq!(r.status(), 200);
    let token = service_token(env, &server.url(""), &["jobs:enqueue"]).await;
    let job = serde_json::json!({
        "tenant_id": tenant,
        "message_sid": message_sid(),
        "from": "+14155550101",
        "to": "+14155550199",
        "body": "Do you have it in blue?",
        "received_at": "2026-11-28T10:00:00Z",
    });
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = client()
            .post(server.url("/v1/jobs/inbound_message"))
            .header("x-forwarded-proto", "https")
            .header("idempotency-key", "cluster-1")
            .bearer_auth(&token)
            .json(&job)
            .send()
            .await
            .expect("enqueue");
        assert_eq!(r.status(), 202);
        let body: serde_json::Value = r.json().await.expect("json");
        ids.push(body["job_id"].as_str().expect("job id").to_owned());
    }
    assert_eq!(ids[0], ids[1], "the idempotency key held on the cluster");
    assert_eq!(
        env.wait_for_count("SELECT count(*) FROM messages", 2, Duration::from_secs(20))
            .await,
        2,
        "both messages committed by a worker fetching and acknowledging on the cluster"
    );

    // A job that fails for good: dead-lettered, listed, retried, dead again, purged.
    let mut redis = env.redis.clone();
    let doomed = env
        .queues()
        .enqueue(
            &mut redis,
            &SyncCatalog {
                tenant_id: uuid::Uuid::new_v4(),
                requested_by: uuid::Uuid::new_v4(),
                mode: SyncMode::Full,
            },
            Enqueue::default(),
        )
        .await
        .expect("enqueue");
    assert!(
        env.wait_for_dead("sync_catalog", &doomed.job_id, Duration::from_secs(20))
            .await
    );
    let (code, out) = cli(env, &["jobs", "dead"]);
    assert_eq!(code, 0);
    assert!(out.contains(&doomed.job_id), "{out}");
    let (code, _) = cli(env, &["jobs", "retry", &doomed.job_id]);
    assert_eq!(code, 0);
    assert!(
        env.wait_for_dead("sync_catalog", &doomed.job_id, Duration::from_secs(20))
            .await,
        "retried, failed again"
    );
    let stats = gatehouse::queue::stats::all_queue_stats(
        &mut redis,
        env.config.layout(),
        &["inbound_message", "sync_catalog"],
    )
    .await
    .expect("stats on the cluster");
    assert_eq!(stats[1].dead, 1, "{stats:?}");
    assert!(stats[0].done >= 2, "{stats:?}");
    let (code, out) = cli(env, &["keys", "status"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("job.inbound_message.retained"), "{out}");
    let (code, _) = cli(env, &["jobs", "purge", "--queue", "sync_catalog"]);
    assert_eq!(code, 0);
    assert!(
        !env.wait_for_dead("sync_catalog", &doomed.job_id, Duration::from_millis(100))
            .await
    );

    // Every queue key carries its shard's hash tag: one slot per queue shard.
    let keys = env.queues().keys("inbound_message");
    for key in [keys.active(), keys.data(), keys.meta(), keys.done()] {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .expect("keyslot");
        assert_eq!(slot, gatehouse_jobs::keys::hash_slot(&keys.prefix), "{key}");
    }
    worker.stop().await.expect("worker stops");
    server.stop().await;
}

/// An upgrade from the pre-cluster key layout (`{ns}:{queue}:…`, a hash per job's metadata, a
/// set per worker) loses nothing: the maintenance round moves queued, due, scheduled and dead
/// jobs into the new layout, hands back the jobs of an old worker that stopped heartbeating,
/// and leaves alone a job a live old worker holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_left_in_the_pre_cluster_layout_are_moved_and_run() {
    use gatehouse_jobs::InboundMessage;
    use gatehouse_jobs::keys::LegacyKeys;
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let old = LegacyKeys::new(&env.namespace, "inbound_message");
    let key = env.config.keyring.current().clone();
    let mut redis = env.redis.clone();
    let plant = |role: &'static str| {
        let id = uuid::Uuid::now_v7().to_string();
        let job = InboundMessage {
            tenant_id: tenant,
            message_sid: message_sid(),
            from: "+14155550100".into(),
            to: "+14155550199".into(),
            body: format!("Where is my order? ({role})"),
            received_at: "2026-11-28T10:00:00Z".into(),
        };
        let payload = gatehouse_jobs::sealed::seal_job(&job, &id, Some(&key)).expect("seal");
        let mut pipe = redis::pipe();
        pipe.hset(old.key("data"), &id, payload).ignore();
        let status = if role == "dead" { "Killed" } else { "Pending" };
        let attempts = if role == "dead" { "4" } else { "0" };
        pipe.hset_multiple(
            old.meta_of(&id),
            &[
                ("attempts", attempts),
                ("max_attempts", "4"),
                ("status", status),
                ("idempotency_key", ""),
            ],
        )
        .ignore();
        match role {
            "queued" => pipe.rpush(old.key("active"), &id).ignore(),
            "scheduled" => pipe.zadd(old.key("scheduled"), &id, 1000).ignore(),
            "dead" => pipe.zadd(old.key("dead"), &id, 1000).ignore(),
            "orphan" => pipe
                .zadd(old.key("workers"), "old-gone", 1000)
                .ignore()
                .sadd(old.inflight_of("old-gone"), &id)
                .ignore(),
            _ => pipe
                .zadd(old.key("workers"), "old-alive", 4_000_000_000_000u64)
                .ignore()
                .sadd(old.inflight_of("old-alive"), &id)
                .ignore(),
        };
        (id, pipe)
    };
    let mut ids = std::collections::HashMap::new();
    for role in ["queued", "queued", "scheduled", "dead", "orphan", "held"] {
        let (id, pipe) = plant(role);
        let () = pipe.query_async(&mut redis).await.expect("plant");
        ids.entry(role).or_insert_with(Vec::new).push(id);
    }

    let worker = env.start_worker_with(Duration::from_millis(200));
    assert_eq!(
        env.wait_for_count("SELECT count(*) FROM messages", 4, Duration::from_secs(30))
            .await,
        4,
        "the queued, the scheduled and the orphaned jobs ran"
    );
    let dead = &ids["dead"][0];
    assert!(
        env.wait_for_dead("inbound_message", dead, Duration::from_secs(5))
            .await,
        "the dead job is a dead letter of the new layout"
    );
    assert_eq!(
        env.job_meta("inbound_message", dead).await.get("attempts"),
        Some("4")
    );
    let held = &ids["held"][0];
    let left: Vec<String> = redis::cmd("HKEYS")
        .arg(old.key("data"))
        .query_async(&mut redis)
        .await
        .expect("hkeys");
    assert_eq!(left, vec![held.clone()], "only the held job is left");
    let still: bool = redis::cmd("SISMEMBER")
        .arg(old.inflight_of("old-alive"))
        .arg(held)
        .query_async(&mut redis)
        .await
        .expect("sismember");
    assert!(still, "a live old worker keeps its job");
    for suffix in ["active", "scheduled", "dead"] {
        let exists: bool = redis::cmd("EXISTS")
            .arg(old.key(suffix))
            .query_async(&mut redis)
            .await
            .expect("exists");
        assert!(!exists, "old {suffix} is empty");
    }
    let meta_left: bool = redis::cmd("EXISTS")
        .arg(old.meta_of(&ids["queued"][0]))
        .query_async(&mut redis)
        .await
        .expect("exists");
    assert!(!meta_left, "moved metadata is removed");

    // The moved dead letter is retried like any other and runs.
    let retried =
        gatehouse::queue::dead::retry(&mut redis, env.config.layout(), &["inbound_message"], dead)
            .await
            .expect("retry");
    assert_eq!(retried.as_deref(), Some("inbound_message"));
    assert_eq!(
        env.wait_for_count("SELECT count(*) FROM messages", 5, Duration::from_secs(20))
            .await,
        5
    );
    worker.stop().await.expect("worker stops");
    env.cleanup().await;
}

/// `QUEUE_SHARDS_INBOUND_MESSAGE=3` on a three-primary cluster: one tenant's jobs stay on one
/// shard, the shards sit on different nodes, and one worker serves them all; the dead-letter
/// CLI and the statistics cover every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sharded_queue_spreads_tenants_over_the_nodes_and_every_shard_is_served() {
    use gatehouse_jobs::client::Enqueue;
    use gatehouse_jobs::keys::{hash_slot, shard_of};
    use gatehouse_jobs::{InboundMessage, SyncCatalog, SyncMode};
    let cluster = LocalCluster::start(3, 0)
        .await
        .expect("a three-primary Redis Cluster (redis-cli --cluster create)");
    let env = TestEnv::on_cluster(&cluster.seeds(), |vars| {
        vars.insert("QUEUE_SHARDS_INBOUND_MESSAGE".into(), "3".into());
        vars.insert("QUEUE_SHARDS_SYNC_CATALOG".into(), "3".into());
        vars.insert("JOB_MAX_ATTEMPTS_SYNC_CATALOG".into(), "1".into());
    })
    .await;
    let layout = env.config.layout().clone();
    let nodes: std::collections::HashSet<usize> = {
        let mut nodes = std::collections::HashSet::new();
        for keys in layout.all("inbound_message") {
            nodes.insert(
                cluster
                    .primary_of(hash_slot(&keys.prefix))
                    .await
                    .expect("a primary"),
            );
        }
        nodes
    };
    assert_eq!(nodes.len(), 3, "the three shards are on three nodes");

    // Tenants until every shard has some.
    let mut tenants = Vec::new();
    let mut covered = [false; 3];
    while covered.iter().any(|c| !c) || tenants.len() < 6 {
        let tenant = env.create_tenant().await;
        covered[shard_of(Some(&tenant), 3) as usize] = true;
        tenants.push(tenant);
        assert!(tenants.len() < 60, "tenants spread over three shards");
    }
    let mut redis = env.redis.clone();
    let queues = env.queues();
    for tenant in &tenants {
        for i in 0..3 {
            let job = InboundMessage {
                tenant_id: *tenant,
                message_sid: message_sid(),
                from: format!("+1415555010{i}"),
                to: "+14155550199".into(),
                body: "Where is my order?".into(),
                received_at: "2026-11-28T10:00:00Z".into(),
            };
            queues
                .enqueue(&mut redis, &job, Enqueue::default())
                .await
                .expect("enqueue");
        }
    }
    for (shard, keys) in layout.all("inbound_message").iter().enumerate() {
        let queued: u64 = redis::cmd("LLEN")
            .arg(keys.active())
            .query_async(&mut redis)
            .await
            .expect("llen");
        let expected = tenants
            .iter()
            .filter(|t| shard_of(Some(t), 3) as usize == shard)
            .count()
            * 3;
        assert_eq!(
            queued as usize, expected,
            "shard {shard}: its tenants' jobs"
        );
    }
    let doomed: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..6 {
            let job = SyncCatalog {
                tenant_id: uuid::Uuid::new_v4(),
                requested_by: uuid::Uuid::new_v4(),
                mode: SyncMode::Full,
            };
            ids.push(
                queues
                    .enqueue(&mut redis, &job, Enqueue::default())
                    .await
                    .expect("enqueue")
                    .job_id,
            );
        }
        ids
    };

    let worker = env.start_worker();
    let want = (tenants.len() * 3) as i64;
    assert_eq!(
        env.wait_for_count(
            "SELECT count(*) FROM messages",
            want,
            Duration::from_secs(30)
        )
        .await,
        want,
        "one worker served every shard"
    );
    let all_dead = gatehouse_testenv::eventually(Duration::from_secs(20), || {
        let (mut redis, layout) = (env.redis.clone(), layout.clone());
        async move {
            gatehouse::queue::stats::queue_stats(&mut redis, &layout, "sync_catalog")
                .await
                .is_ok_and(|stats| stats.dead == 6)
        }
    })
    .await;
    assert!(all_dead, "the doomed jobs of every shard are dead letters");
    let (code, out) = cli(&env, &["jobs", "dead", "--queue", "sync_catalog"]);
    assert_eq!(code, 0);
    for id in &doomed {
        assert!(out.contains(id.as_str()), "{id} listed: {out}");
    }
    let (code, out) = cli(&env, &["jobs", "purge", "--queue", "sync_catalog"]);
    assert_eq!(code, 0, "{out}");
    let stats = gatehouse::queue::stats::queue_stats(&mut redis, &layout, "sync_catalog")
        .await
        .expect("stats");
    assert_eq!(stats.dead, 0, "purged from every shard");
    worker.stop().await.expect("worker stops");
    env.cleanup().await;
}

/// Lowering `QUEUE_SHARDS_*` strands no job: a worker configured with fewer shards finds the
/// ones past them that still hold jobs and drains them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_on_shards_past_a_lowered_shard_count_are_drained() {
    use gatehouse_jobs::client::{Enqueue, Queues};
    use gatehouse_jobs::keys::{Layout, shard_of};
    let env = TestEnv::new().await;
    let wide =
        Queues::with_layout(Layout::new(env.namespace.clone()).with_shards("inbound_message", 4))
            .sealing_with(env.config.keyring.current().clone());
    let mut redis = env.redis.clone();
    let mut beyond = 0;
    for _ in 0..12 {
        let tenant = env.create_tenant().await;
        if shard_of(Some(&tenant), 4) > 0 {
            beyond += 1;
        }
        let job = gatehouse_jobs::InboundMessage {
            tenant_id: tenant,
            message_sid: message_sid(),
            from: "+14155550100".into(),
            to: "+14155550199".into(),
            body: "Where is my order?".into(),
            received_at: "2026-11-28T10:00:00Z".into(),
        };
        wide.enqueue(&mut redis, &job, Enqueue::default())
            .await
            .expect("enqueue");
    }
    assert!(beyond > 0, "some jobs sit past shard 0");
    let worker = env.start_worker();
    assert_eq!(
        env.wait_for_count("SELECT count(*) FROM messages", 12, Duration::from_secs(30))
            .await,
        12
    );
    worker.stop().await.expect("worker stops");
    env.cleanup().await;
}

/// `REDIS_MIN_REPLICA_ACKS=1`: a webhook is answered 200 only once a replica holds its job
/// (`WAIT`); with the replica gone it is answered 503 within the bound (Twilio retries), and
/// the retry, once the replica is back, is answered 200 and adds no second job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_enqueue_is_acknowledged_only_once_a_replica_has_it() {
    let mut pair = ReplicatedRedis::start()
        .await
        .expect("a primary and a replica in sync");
    let env = TestEnv::on_redis(&pair.primary.url(), |vars| {
        vars.insert("REDIS_MIN_REPLICA_ACKS".into(), "1".into());
        vars.insert("REDIS_REPLICA_ACK_TIMEOUT_MS".into(), "300".into());
    })
    .await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let send = |sid: String| {
        let server = &server;
        async move {
            signed_form(
                &client(),
                server,
                tenant,
                &sms_params(&sid, "+14155550100", "Where is my order?"),
            )
            .send()
            .await
            .expect("webhook")
        }
    };
    let queued_on = |url: String| {
        let active = env
            .queues()
            .for_tenant_keys("inbound_message", tenant)
            .active();
        async move {
            let client = redis::Client::open(url).expect("url");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            let n: u64 = redis::cmd("LLEN")
                .arg(active)
                .query_async(&mut conn)
                .await
                .expect("llen");
            n
        }
    };

    let r = send(message_sid()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        queued_on(pair.replica.url()).await,
        1,
        "answered 200 once the replica holds the job"
    );

    pair.replica.terminate();
    let sid = message_sid();
    let started = std::time::Instant::now();
    let r = send(sid.clone()).await;
    assert_eq!(r.status(), 503, "no replica confirmed it: not acknowledged");
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered within the bound"
    );

    pair.replica.start().await.expect("replica again");
    assert!(pair.replica_in_sync().await, "the replica caught up");
    let r = send(sid).await;
    assert_eq!(r.status(), 200, "Twilio's retry is acknowledged");
    assert_eq!(
        queued_on(pair.primary.url()).await,
        2,
        "and adds no second job"
    );
    assert_eq!(
        queued_on(pair.replica.url()).await,
        2,
        "both are on the replica"
    );
    server.stop().await;
    env.cleanup().await;
}

/// Three primaries and three replicas, `REDIS_MIN_REPLICA_ACKS=1`, `inbound_message` in three
/// shards; signed webhooks under load (retried like Twilio retries: the same message until it
/// is answered 200) and a real `gatehouse work` process; `kill -9` of the primary holding shard
/// 0 in the middle, started again a few seconds later (it rejoins as a replica). Every
/// acknowledged message is committed exactly once, the ingress and the worker recover by
/// themselves, and `/readyz` reports the outage while it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_killed_under_load_loses_no_acknowledged_message() {
    use gatehouse_jobs::keys::{hash_slot, shard_of};
    const MESSAGES: usize = 240;
    let mut cluster = LocalCluster::start(3, 1)
        .await
        .expect("three primaries with a replica each (redis-cli --cluster create)");
    let env = TestEnv::on_cluster(&cluster.seeds(), |vars| {
        vars.insert("REDIS_MIN_REPLICA_ACKS".into(), "1".into());
        vars.insert("REDIS_REPLICA_ACK_TIMEOUT_MS".into(), "500".into());
        vars.insert("QUEUE_SHARDS_INBOUND_MESSAGE".into(), "3".into());
        vars.insert("WORKER_HEARTBEAT_SECONDS".into(), "1".into());
    })
    .await;
    let mut tenants = Vec::new();
    let mut covered = [false; 3];
    while covered.iter().any(|c| !c) {
        let tenant = env.create_tenant().await;
        covered[shard_of(Some(&tenant), 3) as usize] = true;
        tenants.push(tenant);
        assert!(tenants.len() < 60);
    }
    let victim_slot = hash_slot(&env.config.layout().shard("inbound_message", 0).prefix);
    let victim = cluster
        .primary_of(victim_slot)
        .await
        .expect("shard 0's primary");
    let server = env.start_server().await;
    let mut work = KillOnDrop(env.spawn(&["work"], &[]));

    // Readiness, sampled all along.
    let unready = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop_probe = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (url, unready, stop) = (server.url("/readyz"), unready.clone(), stop_probe.clone());
        tokio::spawn(async move {
            let http = client();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ok = http
                    .get(&url)
                    .header("x-forwarded-proto", "https")
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if !ok {
                    unready.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // The load: each message sent until it is acknowledged, as Twilio retries.
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sends = futures::stream::iter(0..MESSAGES)
        .map(|i| {
            let (server, tenants, acked, refused) =
                (&server, &tenants, acked.clone(), refused.clone());
            async move {
                let tenant = tenants[i % tenants.len()];
                let sid = message_sid();
                let params = sms_params(&sid, "+14155550100", "Where is my order?");
                for _ in 0..120 {
                    let answered = signed_form(&client(), server, tenant, &params).send().await;
                    match answered {
                        Ok(r) if r.status() == 200 => {
                            acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return Some((tenant, sid));
                        }
                        _ => {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                None
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>();
    let chaos = async {
        while acked.load(std::sync::atomic::Ordering::Relaxed) < MESSAGES / 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster.kill(victim);
        tokio::time::sleep(Duration::from_secs(4)).await;
        cluster
            .restart(victim)
            .await
            .expect("the old primary starts again");
    };
    let (outcomes, ()) = tokio::join!(sends, chaos);
    let delivered: Vec<(uuid::Uuid, String)> = outcomes.into_iter().flatten().collect();
    assert_eq!(
        delivered.len(),
        MESSAGES,
        "every message was acknowledged in the end ({} refusals on the way)",
        refused.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(
        refused.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the failover was felt: some webhooks were answered 503 and retried"
    );

    let committed = env
        .wait_for_count(
            "SELECT count(*) FROM messages",
            MESSAGES as i64,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(
        committed, MESSAGES as i64,
        "every acknowledged message committed"
    );
    let sids: std::collections::HashSet<String> =
        sqlx::query_scalar("SELECT message_sid FROM messages")
            .fetch_all(&env.pool)
            .await
            .expect("sids")
            .into_iter()
            .collect();
    for (_, sid) in &delivered {
        assert!(sids.contains(sid), "acknowledged {sid} is committed");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM processed_jobs").await,
        MESSAGES as i64,
        "each exactly once"
    );
    assert!(
        work.0.try_wait().expect("status").is_none(),
        "the worker rode out the failover"
    );
    stop_probe.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = probe.await;
    assert!(
        unready.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "/readyz reported the outage"
    );
    let ready = gatehouse_testenv::eventually(Duration::from_secs(20), || async {
        client()
            .get(server.url("/readyz"))
            .header("x-forwarded-proto", "https")
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "and is ready again");
    assert!(gatehouse_testenv::terminate(&mut work.0).success());
    server.stop().await;
    env.cleanup().await;
}

/// With its whole cluster gone (one primary first, then the rest), a worker waits for it: the
/// cluster client's "no connection" errors are an outage (backoff and probe, as for a single
/// Redis), not a failure that spends the restart budget until the process gives up; and
/// SIGTERM stops it within the grace (a worker failing during shutdown is not restarted again
/// and again); and while it waits it does not spin a core (see
/// `a_cluster_connection_that_cannot_rebuild_its_slot_map_lets_go_instead_of_spinning`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_cluster_is_gone_waits_and_stops_on_sigterm() {
    let cluster = LocalCluster::start(3, 1)
        .await
        .expect("a three-primary Redis Cluster (redis-cli --cluster create)");
    let env = TestEnv::on_cluster(&cluster.seeds(), |vars| {
        vars.insert("WORKER_HEARTBEAT_SECONDS".into(), "1".into());
        vars.insert("REDIS_MIN_REPLICA_ACKS".into(), "1".into());
    })
    .await;
    let mut cluster = cluster;
    let mut work = KillOnDrop(env.spawn(&["work"], &[]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // One primary first (the client starts recovering its slot map), then the rest.
    let first = cluster.primary_of(0).await.expect("a primary");
    cluster.kill(first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(cluster);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = work.0.id();
    let before = process_cpu_us(pid).expect("the worker's CPU time");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let spent = process_cpu_us(pid).expect("the worker's CPU time") - before;
    assert!(
        work.0.try_wait().expect("status").is_none(),
        "the worker waits for Redis; it does not exit"
    );
    // Backing off costs a connection attempt now and then; a spinning client is a whole core
    // (4 s of CPU in these 4 s).
    assert!(
        spent < 800_000,
        "the waiting worker spent {spent} µs of CPU in 4 s: something spins"
    );
    assert!(gatehouse_testenv::terminate(&mut work.0).success());
    env.cleanup().await;
}

/// redis-rs's cluster client (1.8, and 2.0's release candidate) spins a core when it cannot
/// rebuild its slot map: once a command has asked for a rebuild (a `MOVED`, a slot with no
/// node), each failed rebuild starts the next at once and wakes its own task — for as long as
/// any clone of the connection lives, with no command pending. Here the rebuild fails because
/// the one node closes the connection on `CLUSTER SLOTS` after its first answer (with every
/// node gone the same happens, less predictably). Measured before
/// `redis_conn::Cluster` let a failed connection go: this process spent the whole 3 s below on
/// CPU (2.99 s); now the failed command's connection is dropped, its task ends, and the next
/// command opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_connection_that_cannot_rebuild_its_slot_map_lets_go_instead_of_spinning() {
    let node = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = node.local_addr().expect("addr").port();
    let slot_answers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = tokio::spawn(broken_cluster_node(node, port, slot_answers.clone()));
    let target = gatehouse::redis_conn::RedisTarget::cluster(vec![secrecy::SecretString::from(
        format!("redis://127.0.0.1:{port}"),
    )]);
    let mut conn = gatehouse::redis_conn::connect(&target)
        .await
        .expect("connect to the node");
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let answer: Result<Option<String>, _> =
            redis::cmd("GET").arg("k").query_async(&mut conn).await;
        let error = answer.expect_err("every GET is moved, and no slot map comes");
        assert!(
            matches!(
                gatehouse::fault::redis(&error),
                gatehouse::fault::Fault::Outage(_)
            ),
            "an outage, not {error}"
        );
        assert!(started.elapsed() < Duration::from_secs(15));
    }
    let pid = std::process::id();
    let before = process_cpu_us(pid).expect("this process's CPU time");
    let asked_before = slot_answers.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spent = process_cpu_us(pid).expect("this process's CPU time") - before;
    let asked = slot_answers.load(std::sync::atomic::Ordering::Relaxed) - asked_before;
    assert!(
        spent < 500_000 && asked < 10,
        "{spent} µs of CPU and {asked} CLUSTER SLOTS in 3 s with no command pending: the \
         cluster client spins"
    );
    // `conn` (still held, as a worker holds its connection) opens a new connection for the
    // next command.
    let gatehouse::redis_conn::RedisConn::Cluster(cluster_conn) = &conn else {
        panic!("a cluster connection");
    };
    assert!(
        cluster_conn.opened() > 1,
        "a new connection per failed attempt"
    );
    server.abort();
}

/// A Redis Cluster node on `listener` that answers its first `CLUSTER SLOTS` properly (it
/// serves every slot) and closes the connection on every later one, answers every `GET` with
/// a `MOVED` to itself, and anything else `+OK`. Counts the `CLUSTER SLOTS` it was asked.
async fn broken_cluster_node(
    listener: tokio::net::TcpListener,
    port: u16,
    slot_answers: Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            return;
        };
        let slot_answers = slot_answers.clone();
        tokio::spawn(async move {
            let (read, mut write) = socket.into_split();
            let mut read = tokio::io::BufReader::new(read);
            loop {
                // One command: *N, then N bulk strings.
                let mut line = String::new();
                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let Some(count) = line.trim().strip_prefix('*').and_then(|n| n.parse().ok()) else {
                    return;
                };
                let mut args: Vec<String> = Vec::with_capacity(count);
                for _ in 0..count {
                    let mut header = String::new();
                    if read.read_line(&mut header).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let Some(len) = header
                        .trim()
                        .strip_prefix('$')
                        .and_then(|n| n.parse::<usize>().ok())
                    else {
                        return;
                    };
                    let mut bytes = vec![0; len + 2];
                    if read.read_exact(&mut bytes).await.is_err() {
                        return;
                    }
                    bytes.truncate(len);
                    args.push(String::from_utf8_lossy(&bytes).to_uppercase());
                }
                let reply = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                    ["CLUSTER", "SLOTS", ..] => {
                        let n = slot_answers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if n == 0 {
                            let id = "a".repeat(40);
                            format!(
                                "*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:{port}\r\n$40\r\n{id}\r\n"
                            )
                        } else {
                            // Accepted, then closed: what a node on its way down does.
                            return;
                        }
                    }
                    ["PING", ..] => "+PONG\r\n".to_owned(),
                    ["GET", ..] => format!("-MOVED 7365 127.0.0.1:{port}\r\n"),
                    _ => "+OK\r\n".to_owned(),
                };
                if write.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}
