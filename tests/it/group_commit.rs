//! Group commit for `inbound_message` (`GROUP_COMMIT_MAX_JOBS`, `gatehouse::worker::group_commit`):
//! a group's statement stores exactly what storing its messages one by one would, in one
//! transaction; a group that fails applies nothing and its messages are stored one by one, so
//! a poison message fails alone; through real worker processes, groups form and a poison job
//! is dead-lettered while its neighbours commit. The kill -9 and exactly-once tests run in
//! both modes (`reliability.rs`, `worker.rs`).

use std::time::Duration;

use crate::common::*;
use gatehouse::classify::classify_with_rules;
use gatehouse::conversations::{
    CUSTOMER_NUMBER_DOMAIN, InboundContext, InboundError, InboundOutcome, PreparedInbound,
    store_group, store_inbound,
};
use gatehouse::worker::group_commit::GroupCommit;
use gatehouse_jobs::InboundMessage;
use gatehouse_testenv::*;
use uuid::Uuid;

const LOW: &str = "qwzx vbnm";
const CONFIDENT: &str = "where is my order 12345?";

fn context(env: &TestEnv) -> InboundContext<'_> {
    InboundContext {
        keyring: &env.config.keyring,
        blind_index: &env.config.blind_index,
        min_confidence: env.config.llm_min_confidence,
        worker: "test",
    }
}

fn prepare(env: &TestEnv, job_id: &str, msg: &InboundMessage) -> PreparedInbound {
    PreparedInbound::new(&context(env), job_id, msg, &classify_with_rules(&msg.body))
        .expect("prepared")
}

async fn store_alone(env: &TestEnv, job_id: &str, msg: &InboundMessage) -> InboundOutcome {
    let classification = classify_with_rules(&msg.body);
    store_inbound(&env.pool, &context(env), job_id, msg, &classification)
        .await
        .expect("stored")
}

async fn streak(env: &TestEnv, tenant: Uuid, from: &str) -> (i32, String) {
    let index =
        env.config
            .blind_index
            .compute_for_tenant(CUSTOMER_NUMBER_DOMAIN, tenant, from.as_bytes());
    sqlx::query_as(
        "SELECT low_confidence_count, state FROM conversations
         WHERE tenant_id = $1 AND customer_number_index = $2",
    )
    .bind(tenant)
    .bind(index.to_vec())
    .fetch_one(&env.pool)
    .await
    .expect("conversation")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_stores_exactly_what_one_statement_per_message_would_in_one_transaction() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    // Earlier history, stored one by one: a customer two low answers from handoff, one whose
    // streak a confident answer will reset, one whose conversation still holds the index form
    // written before per-tenant indexes, a job already applied, a MessageSid already stored.
    let (near, reset, legacy, fresh) = (
        "+14155550101",
        "+14155550102",
        "+14155550103",
        "+14155550104",
    );
    for _ in 0..2 {
        store_alone(
            &env,
            &format!("old-{}", Uuid::new_v4()),
            &inbound_message(tenant, near, LOW),
        )
        .await;
    }
    store_alone(&env, "old-reset", &inbound_message(tenant, reset, LOW)).await;
    let InboundOutcome::Stored {
        conversation_id: legacy_conversation,
        ..
    } = store_alone(&env, "old-legacy", &inbound_message(tenant, legacy, LOW)).await
    else {
        panic!("stored");
    };
    let v1 = env
        .config
        .blind_index
        .lookups(CUSTOMER_NUMBER_DOMAIN, tenant, legacy.as_bytes())[1]
        .clone();
    sqlx::query("UPDATE conversations SET customer_number_index = $1, customer_number_index_form = NULL WHERE id = $2")
        .bind(v1)
        .bind(legacy_conversation)
        .execute(&env.pool)
        .await
        .expect("legacy index");
    let applied = inbound_message(tenant, fresh, LOW);
    store_alone(&env, "applied", &applied).await;
    let twin = inbound_message(tenant, "+14155550105", LOW);
    store_alone(&env, "first-of-twin", &twin).await;
    let stranger = inbound_message(Uuid::new_v4(), fresh, LOW);

    let group = vec![
        prepare(&env, "g-near", &inbound_message(tenant, near, LOW)),
        prepare(&env, "g-reset", &inbound_message(tenant, reset, CONFIDENT)),
        prepare(&env, "g-legacy", &inbound_message(tenant, legacy, LOW)),
        prepare(&env, "g-new", &inbound_message(tenant, "+14155550106", LOW)),
        prepare(&env, "applied", &applied),
        prepare(&env, "g-twin", &twin),
        prepare(&env, "g-stranger", &stranger),
    ];
    let outcomes = store_group(&env.pool, &group)
        .await
        .expect("the group's statement");
    assert_eq!(outcomes.len(), group.len());
    let stored = |i: usize| match &outcomes[i] {
        Ok(InboundOutcome::Stored {
            low_confidence_count,
            handoff,
            conversation_id,
            ..
        }) => (*low_confidence_count, *handoff, *conversation_id),
        other => panic!("message {i}: {other:?}"),
    };
    assert_eq!(stored(0).0, 3, "the third low answer in a row");
    assert!(stored(0).1, "hands the conversation to a person");
    assert_eq!(
        (stored(1).0, stored(1).1),
        (0, false),
        "a confident answer resets the streak"
    );
    assert_eq!(
        stored(2).2,
        legacy_conversation,
        "found by its older index form"
    );
    assert_eq!(stored(2).0, 2);
    assert_eq!(
        (stored(3).0, stored(3).1),
        (1, false),
        "a new customer's conversation"
    );
    assert!(
        matches!(outcomes[4], Ok(InboundOutcome::AlreadyProcessed)),
        "{:?}",
        outcomes[4]
    );
    assert!(
        matches!(outcomes[5], Ok(InboundOutcome::DuplicateMessage)),
        "{:?}",
        outcomes[5]
    );
    assert!(
        matches!(&outcomes[6], Err(InboundError::Permanent(m)) if m.contains("unknown tenant")),
        "{:?}",
        outcomes[6]
    );

    assert_eq!(streak(&env, tenant, near).await, (3, "handoff".into()));
    assert_eq!(streak(&env, tenant, reset).await.0, 0);
    // Four new messages and four new markers (the twin's job is marked: it is done), all
    // committed by one transaction; nothing of the stranger's.
    let group_rows = env
        .count("SELECT count(*) FROM messages WHERE job_id LIKE 'g-%'")
        .await;
    assert_eq!(group_rows, 4);
    let transactions = env
        .count("SELECT count(DISTINCT xmin::text) FROM messages WHERE job_id LIKE 'g-%'")
        .await;
    assert_eq!(transactions, 1, "one commit for the whole group");
    assert_eq!(
        env.count("SELECT count(*) FROM processed_jobs WHERE job_id LIKE 'g-%'")
            .await,
        5
    );
    assert_eq!(env.count("SELECT count(*) FROM messages").await, 5 + 4 + 1);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_fails_alone_and_its_group_neighbours_commit_once() {
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    // PostgreSQL refuses a NUL in text (22021): the group's statement fails as a whole.
    let poison = inbound_message(tenant, "+14155550100", "nul \0 byte");
    let good: Vec<InboundMessage> = (0..5)
        .map(|i| inbound_message(tenant, &format!("+1415555020{i}"), LOW))
        .collect();
    let mut group: Vec<PreparedInbound> = good
        .iter()
        .enumerate()
        .map(|(i, m)| prepare(&env, &format!("good-{i}"), m))
        .collect();
    group.insert(2, prepare(&env, "poison", &poison));
    let failed = store_group(&env.pool, &group).await;
    assert!(failed.is_err(), "the group's one statement fails");
    assert_eq!(
        env.count("SELECT count(*) FROM messages").await,
        0,
        "and applies nothing"
    );
    assert_eq!(env.count("SELECT count(*) FROM processed_jobs").await, 0);

    // Through the committer, sent at once so they share a group: the poison message fails
    // for good, each neighbour commits exactly once.
    let commit = std::sync::Arc::new(GroupCommit::new(env.pool.clone(), 16));
    let tasks: Vec<_> = group
        .into_iter()
        .map(|p| {
            let commit = commit.clone();
            tokio::spawn(async move {
                let job = p.job_id().to_owned();
                (job, commit.store(p).await)
            })
        })
        .collect();
    for task in tasks {
        let (job, outcome) = task.await.expect("task");
        if job == "poison" {
            let error = outcome.expect_err("the poison message fails");
            assert_eq!(error.fault(), gatehouse::fault::Fault::Permanent, "{error}");
        } else {
            assert!(
                matches!(outcome, Ok(InboundOutcome::Stored { .. })),
                "{job}: {outcome:?}"
            );
        }
    }
    assert_eq!(env.count("SELECT count(*) FROM messages").await, 5);
    assert_eq!(env.count("SELECT count(*) FROM processed_jobs").await, 5);
    assert_eq!(
        env.count("SELECT sum(low_confidence_count)::int8 FROM conversations")
            .await,
        5
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_commits_in_groups_and_dead_letters_a_poison_job_without_its_neighbours() {
    const CUSTOMERS: usize = 25;
    const JOBS: usize = 400;
    let env = TestEnv::new().await;
    let tenant = env.create_tenant().await;
    let mut jobs: Vec<InboundMessage> = (0..JOBS)
        .map(|i| inbound_message(tenant, &format!("+141555503{:02}", i % CUSTOMERS), LOW))
        .collect();
    for at in [50, 200, 350] {
        jobs.insert(at, inbound_message(tenant, "+14155550999", "nul \0 byte"));
    }
    let mut redis = env.redis.clone();
    env.queues()
        .enqueue_batch(&mut redis, &jobs)
        .await
        .expect("enqueue");
    let mut worker = env.spawn(&["work"], &[("WORKER_CONCURRENCY", "8")]);
    let n = env
        .wait_for_count(
            "SELECT count(*) FROM messages",
            JOBS as i64,
            Duration::from_secs(90),
        )
        .await;
    assert_eq!(n, JOBS as i64, "every good job stored its message");
    let dead = eventually(Duration::from_secs(30), || async {
        inbound_dead_letters(&env).await == 3
    })
    .await;
    assert!(dead, "the three poison jobs are dead letters");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.count("SELECT count(*) FROM messages").await,
        JOBS as i64
    );
    assert_eq!(
        env.count("SELECT count(*) FROM processed_jobs").await,
        JOBS as i64
    );
    assert_eq!(
        env.count("SELECT sum(low_confidence_count)::int8 FROM conversations")
            .await,
        JOBS as i64,
        "no effect applied twice"
    );
    let commits = env
        .count("SELECT count(DISTINCT xmin::text) FROM messages")
        .await;
    assert!(
        commits < JOBS as i64,
        "jobs shared commits ({commits} commits for {JOBS} messages)"
    );
    assert!(terminate(&mut worker).success());
    env.cleanup().await;
}
