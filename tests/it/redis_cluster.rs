//! Redis Cluster readiness (issue 18, first slice): the Redis users outside the queue — rate
//! limits, the scope cache, security-event budgets and alert windows — run on a one-node Redis
//! Cluster, where a command or script
//! whose keys span two slots fails (`CROSSSLOT`) and a `#!lua` script may touch only the keys
//! it declares. On a single Redis both would pass unnoticed; here they would fail the request
//! (rate limits fail closed) or silently fall back to PostgreSQL (the scope cache), so the test
//! checks the cache was really used.

use std::sync::Arc;

use crate::common::*;
use gatehouse::access::{ScopeCache, Source};
use gatehouse::http::AppState;
use gatehouse::security::jwt::SubjectKind;
use gatehouse_testenv::*;
use reqwest::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_the_scope_cache_and_security_event_counters_run_on_a_one_node_cluster() {
    let cluster = OneNodeCluster::start(free_port())
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
    let redis = gatehouse::redis_conn::connect(&secrecy::SecretString::from(cluster.url()))
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
    let resolve = |redis: redis::aio::ConnectionManager| {
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
