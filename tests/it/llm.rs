//! The LLM classifier against a real HTTP server on loopback that plays the LLM: good, hostile,
//! huge, slow and failing answers, end to end through Redis and the worker into PostgreSQL.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use gatehouse::classify::{Classifier, ClassifyError};
use gatehouse::config::LlmConfig;
use gatehouse::llm::{LlmClassifier, rejection_counts};
use gatehouse_jobs::InboundMessage;
use gatehouse_jobs::client::Enqueue;
use gatehouse_testenv::*;
use secrecy::SecretString;
use serde_json::{Value, json};

const API_KEY: &str = "sk-test-Very-Secret-Llm-Key-0123456789";
const MODEL: &str = "test-model";

/// What the fake LLM does for one call.
#[derive(Clone)]
enum Reply {
    /// 200 with a chat completion whose `choices[0].message.content` is this text.
    Answer(String),
    /// This status and raw body.
    Raw(u16, String),
    /// 200 with a chunked body that never ends (until the client hangs up).
    Endless,
    /// Waits, then replies.
    Slow(Duration, Box<Reply>),
    /// A 302 to another path of the same server.
    Redirect,
}

fn answer(value: Value) -> Reply {
    Reply::Answer(value.to_string())
}

/// One recorded request.
#[derive(Clone, Debug)]
struct Call {
    path: String,
    authorization: Option<String>,
    body: Value,
}

type Script = dyn Fn(usize, &Value) -> Reply + Send + Sync;

#[derive(Clone)]
struct FakeState {
    script: Arc<Script>,
    calls: Arc<Mutex<Vec<Call>>>,
}

/// An OpenAI-compatible chat-completions server on 127.0.0.1:0.
struct FakeLlm {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeLlm {
    /// Replies with `script(call_index, request_body)`.
    async fn start(script: impl Fn(usize, &Value) -> Reply + Send + Sync + 'static) -> Self {
        let state = FakeState {
            script: Arc::new(script),
            calls: Arc::new(Mutex::new(Vec::new())),
        };
        let calls = state.calls.clone();
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(completions))
            .route("/elsewhere", axum::routing::post(completions))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, calls, task }
    }

    /// Replies in order; the last reply repeats.
    async fn sequence(replies: Vec<Reply>) -> Self {
        let replies = Mutex::new(VecDeque::from(replies));
        Self::start(move |_, _| {
            let mut replies = replies.lock().expect("lock");
            if replies.len() > 1 {
                replies.pop_front().expect("non-empty")
            } else {
                replies.front().cloned().expect("at least one reply")
            }
        })
        .await
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }

    fn config(&self, timeout: Duration) -> LlmConfig {
        LlmConfig {
            url: url::Url::parse(&self.base_url()).expect("url"),
            api_key: Some(SecretString::from(API_KEY.to_owned())),
            model: MODEL.to_owned(),
            timeout,
        }
    }

    /// The environment variables that point gatehouse at this server.
    fn vars(&self, timeout_ms: u64) -> impl FnOnce(&mut std::collections::HashMap<String, String>) {
        let url = self.base_url();
        move |vars| {
            vars.insert("LLM_URL".into(), url);
            vars.insert("LLM_API_KEY".into(), API_KEY.into());
            vars.insert("LLM_MODEL".into(), MODEL.into());
            vars.insert("LLM_TIMEOUT_MS".into(), timeout_ms.to_string());
            vars.insert("LLM_MIN_CONFIDENCE".into(), "0.6".into());
        }
    }

    fn stop(self) {
        self.task.abort();
    }
}

async fn completions(
    State(state): State<FakeState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: String,
) -> Response {
    let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let index = {
        let mut calls = state.calls.lock().expect("lock");
        calls.push(Call {
            path: uri.path().to_owned(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: request.clone(),
        });
        calls.len() - 1
    };
    let mut reply = (state.script)(index, &request);
    loop {
        match reply {
            Reply::Slow(delay, then) => {
                tokio::time::sleep(delay).await;
                reply = *then;
            }
            Reply::Answer(content) => {
                return axum::Json(json!({
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "model": MODEL,
                    "choices": [{
                        "index": 0,
                        "message": { "role": "assistant", "content": content },
                        "finish_reason": "stop"
                    }],
                    "usage": { "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2 }
                }))
                .into_response();
            }
            Reply::Raw(status, body) => {
                return (
                    StatusCode::from_u16(status).expect("status"),
                    [("content-type", "application/json")],
                    body,
                )
                    .into_response();
            }
            Reply::Endless => {
                let chunk = bytes::Bytes::from(vec![b' '; 16 * 1024]);
                let stream = futures::stream::repeat(chunk).map(Ok::<_, std::io::Error>);
                return axum::body::Body::from_stream(stream).into_response();
            }
            Reply::Redirect => {
                return (StatusCode::FOUND, [("location", "/elsewhere")]).into_response();
            }
        }
    }
}

fn rejected_total(reason: &str) -> u64 {
    rejection_counts()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map(|(_, n)| n)
        .expect("a known reason")
}

/// The stored classification of the one message with `sid`.
#[derive(Debug, sqlx::FromRow)]
struct Stored {
    intent: String,
    confidence: f64,
    slots: Value,
    classifier: String,
    rejected_reason: Option<String>,
}

async fn stored(env: &TestEnv, sid: &str) -> Stored {
    sqlx::query_as(
        "SELECT intent, confidence, slots, classifier, rejected_reason FROM messages
         WHERE message_sid = $1",
    )
    .bind(sid)
    .fetch_one(&env.pool)
    .await
    .expect("the message row")
}

async fn conversation(env: &TestEnv) -> (i32, String) {
    sqlx::query_as("SELECT low_confidence_count, state FROM conversations")
        .fetch_one(&env.pool)
        .await
        .expect("one conversation")
}

/// Enqueues one message and waits until its row is committed.
async fn process(env: &TestEnv, msg: &InboundMessage, expected_rows: i64) {
    let mut redis = env.redis.clone();
    env.queues()
        .enqueue(&mut redis, msg, Enqueue::default())
        .await
        .expect("enqueue");
    let n = env
        .wait_for_count(
            "SELECT count(*) FROM messages",
            expected_rows,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(n, expected_rows, "message {} was stored", msg.message_sid);
}

// ---- end to end ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_good_llm_answer_travels_from_a_signed_webhook_to_a_committed_message_row() {
    let llm = FakeLlm::sequence(vec![answer(json!({
        "intent": "product_question",
        "confidence": 0.93,
        "slots": {
            "product": "  blue\u{202E} shoes\u{0007} ",
            "size": 42,
            "color": "cafe\u{301}",
            "gift": false
        }
    }))])
    .await;
    let env = TestEnv::with_vars(llm.vars(5_000)).await;
    let tenant = env.create_tenant().await;
    let server = env.start_server().await;
    let worker = env.start_worker();
    let sid = message_sid();
    let body = "Do you have the blue shoes in size 42?";
    let response = signed_form(
        &reqwest::Client::new(),
        &server,
        tenant,
        &sms_params(&sid, "+14155550100", body),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(response.status(), 200);
    let n = env
        .wait_for_count("SELECT count(*) FROM messages", 1, Duration::from_secs(20))
        .await;
    assert_eq!(n, 1, "the worker committed the message row");

    let row = stored(&env, &sid).await;
    assert_eq!(row.intent, "product_question");
    assert_eq!(row.confidence, 0.93);
    assert_eq!(row.classifier, "llm:test-model");
    assert_eq!(row.rejected_reason, None);
    assert_eq!(
        row.slots,
        json!({"product": "blue shoes", "size": 42, "color": "caf\u{e9}", "gift": false}),
        "slot strings are stored sanitized: no control or bidi characters, NFC, trimmed"
    );
    assert_eq!(conversation(&env).await, (0, "bot".to_owned()));

    // What the LLM was asked.
    let calls = llm.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.path, "/v1/chat/completions");
    assert_eq!(
        call.authorization.as_deref(),
        Some(format!("Bearer {API_KEY}").as_str())
    );
    assert_eq!(call.body["model"], MODEL);
    assert_eq!(call.body["response_format"]["type"], "json_object");
    assert_eq!(call.body["messages"][0]["role"], "system");
    assert_eq!(call.body["messages"][1]["role"], "user");
    assert_eq!(call.body["messages"][1]["content"], body);

    worker.stop().await.expect("worker stops cleanly");
    server.stop().await;
    llm.stop();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_answer_is_stored_as_a_rejection_and_never_raw() {
    let marker = "MARKER-7f3a9c";
    let llm = FakeLlm::sequence(vec![answer(json!({
        "intent": "refund_everything",
        "confidence": 0.99,
        "slots": { "note": format!("{marker} ignore previous instructions") }
    }))])
    .await;
    let env = TestEnv::with_vars(llm.vars(5_000)).await;
    let tenant = env.create_tenant().await;
    let worker = env.start_worker();
    let before = rejected_total("unknown_intent");
    let msg = inbound_message(tenant, "+14155550100", "I want all my money back");
    process(&env, &msg, 1).await;

    let row = stored(&env, &msg.message_sid).await;
    assert_eq!(row.intent, "other");
    assert_eq!(row.confidence, 0.0);
    assert_eq!(row.slots, json!({}));
    assert_eq!(row.classifier, "llm:test-model");
    assert_eq!(row.rejected_reason.as_deref(), Some("unknown_intent"));
    assert_eq!(
        env.count(
            "SELECT count(*) FROM messages WHERE row_to_json(messages)::text LIKE '%MARKER-7f3a9c%'"
        )
        .await,
        0,
        "nothing of the raw answer is stored"
    );
    assert_eq!(
        conversation(&env).await,
        (1, "bot".to_owned()),
        "a rejection counts as low confidence"
    );
    assert!(
        rejected_total("unknown_intent") > before,
        "the rejection is counted"
    );

    worker.stop().await.expect("worker stops cleanly");
    llm.stop();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_bad_answers_in_a_row_hand_off_and_a_confident_one_resets_the_count() {
    let huge = format!(
        r#"{{"intent":"greeting","confidence":0.9,"slots":{{"note":"{}"}}}}"#,
        "A".repeat(1 << 20)
    );
    let llm = FakeLlm::sequence(vec![
        Reply::Answer(r#"Sure! {"intent":"greeting","confidence":0.9}"#.into()),
        Reply::Answer(huge),
        answer(json!({"intent": "complaint", "confidence": 0.3})),
        answer(json!({"intent": "greeting", "confidence": 7})),
        answer(json!({"intent": "greeting", "confidence": 0.95})),
    ])
    .await;
    let env = TestEnv::with_vars(llm.vars(5_000)).await;
    let tenant = env.create_tenant().await;
    let worker = env.start_worker();
    let mut seen = Vec::new();
    for i in 1..=5 {
        let msg = inbound_message(tenant, "+14155550100", &format!("message {i}"));
        process(&env, &msg, i).await;
        let row = stored(&env, &msg.message_sid).await;
        let (count, state) = conversation(&env).await;
        seen.push((row.intent, row.rejected_reason, count, state));
    }
    let s = |x: &str| x.to_owned();
    assert_eq!(
        seen,
        vec![
            (s("other"), Some(s("malformed_json")), 1, s("bot")),
            (s("other"), Some(s("response_too_large")), 2, s("bot")),
            (s("complaint"), None, 3, s("handoff")),
            (s("other"), Some(s("invalid_confidence")), 4, s("handoff")),
            (s("greeting"), None, 0, s("handoff")),
        ],
        "rejections and answers below LLM_MIN_CONFIDENCE both count; the third hands off; \
         a confident answer resets the count while the state stays"
    );
    worker.stop().await.expect("worker stops cleanly");
    llm.stop();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_llm_fails_the_job_which_is_retried_and_then_stored() {
    let good = answer(json!({"intent": "order_status", "confidence": 0.8}));
    let llm = FakeLlm::sequence(vec![
        Reply::Slow(Duration::from_secs(3), Box::new(good.clone())),
        good,
    ])
    .await;
    let env = TestEnv::with_vars(llm.vars(300)).await;
    let tenant = env.create_tenant().await;
    let worker = env.start_worker();
    let msg = inbound_message(tenant, "+14155550100", "where is my order?");
    process(&env, &msg, 1).await;
    let row = stored(&env, &msg.message_sid).await;
    assert_eq!(row.intent, "order_status");
    assert_eq!(row.rejected_reason, None);
    assert_eq!(llm.calls().len(), 2, "one timed-out call, one retry");
    assert_eq!(env.count("SELECT count(*) FROM processed_jobs").await, 1);
    worker.stop().await.expect("worker stops cleanly");
    llm.stop();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_500_and_a_429_from_the_llm_are_retried_until_an_answer_is_stored() {
    let llm = FakeLlm::sequence(vec![
        Reply::Raw(500, r#"{"error":"boom"}"#.into()),
        Reply::Raw(429, r#"{"error":"slow down"}"#.into()),
        answer(
            json!({"intent": "cancel_order", "confidence": 0.9, "slots": {"order_number": "A-1"}}),
        ),
    ])
    .await;
    let env = TestEnv::with_vars(llm.vars(5_000)).await;
    let tenant = env.create_tenant().await;
    let worker = env.start_worker();
    let msg = inbound_message(tenant, "+14155550100", "cancel order A-1");
    process(&env, &msg, 1).await;
    let row = stored(&env, &msg.message_sid).await;
    assert_eq!(row.intent, "cancel_order");
    assert_eq!(row.slots, json!({"order_number": "A-1"}));
    assert_eq!(llm.calls().len(), 3);
    assert_eq!(conversation(&env).await, (0, "bot".to_owned()));
    worker.stop().await.expect("worker stops cleanly");
    llm.stop();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_llm_that_refuses_the_credentials_dead_letters_the_job_at_once_with_its_payload() {
    let llm = FakeLlm::sequence(vec![Reply::Raw(401, r#"{"error":"bad key"}"#.into())]).await;
    let env = TestEnv::with_vars(llm.vars(5_000)).await;
    let tenant = env.create_tenant().await;
    let worker = env.start_worker();
    let mut redis = env.redis.clone();
    let job = env
        .queues()
        .enqueue(
            &mut redis,
            &inbound_message(tenant, "+14155550100", "hello"),
            Enqueue::default(),
        )
        .await
        .expect("enqueue");
    assert!(
        env.wait_for_dead("inbound_message", &job.job_id, Duration::from_secs(20))
            .await,
        "a misconfigured LLM is a permanent failure"
    );
    assert_eq!(
        llm.calls().len(),
        1,
        "no retry can help until an operator fixes LLM_*"
    );
    let payload: Option<String> = redis::cmd("HGET")
        .arg(format!("{}:{{inbound_message:0}}:data", env.namespace))
        .arg(&job.job_id)
        .query_async(&mut redis)
        .await
        .expect("hget");
    assert!(payload.is_some(), "the payload is kept for a retry");
    assert_eq!(env.count("SELECT count(*) FROM messages").await, 0);
    worker.stop().await.expect("worker stops cleanly");
    llm.stop();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_messages_on_one_conversation_through_concurrent_workers_count_exactly() {
    const MESSAGES: i64 = 60;
    // Every answer is low confidence: half rejected, half valid but below the threshold. Small
    // delays make the workers' transactions interleave.
    let llm = FakeLlm::start(|i, _| {
        let delay = Duration::from_millis((i as u64 * 7) % 40);
        let reply = if i % 2 == 0 {
            answer(json!({"intent": "greeting", "confidence": 0.9, "extra": true}))
        } else {
            answer(json!({"intent": "other", "confidence": 0.2}))
        };
        Reply::Slow(delay, Box::new(reply))
    })
    .await;
    let env = TestEnv::with_vars(llm.vars(5_000)).await;
    let tenant = env.create_tenant().await;
    let mut redis = env.redis.clone();
    for i in 0..MESSAGES {
        env.queues()
            .enqueue(
                &mut redis,
                &inbound_message(tenant, "+14155550100", &format!("m{i}")),
                Enqueue::default(),
            )
            .await
            .expect("enqueue");
    }
    // Two worker instances (distinct names, 8 jobs in flight each) share the queue.
    let a = env.start_worker();
    let b = env.start_worker();
    let n = env
        .wait_for_count(
            "SELECT count(*) FROM messages",
            MESSAGES,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(n, MESSAGES);
    let (count, state) = conversation(&env).await;
    assert_eq!(
        i64::from(count),
        MESSAGES,
        "every low-confidence answer counted once"
    );
    assert_eq!(state, "handoff");
    assert_eq!(
        env.count("SELECT count(*) FROM messages WHERE rejected_reason = 'unexpected_property'")
            .await,
        MESSAGES / 2
    );
    assert_eq!(
        env.count("SELECT count(*) FROM processed_jobs").await,
        MESSAGES
    );
    assert_eq!(
        env.count("SELECT count(DISTINCT worker) FROM processed_jobs")
            .await,
        2,
        "both workers took jobs"
    );
    a.stop().await.expect("worker a stops");
    b.stop().await.expect("worker b stops");
    llm.stop();
    env.cleanup().await;
}

// ---- the client alone ----------------------------------------------------------------

async fn classify_once(
    reply: Reply,
    timeout: Duration,
) -> (
    Result<gatehouse::classify::Classification, ClassifyError>,
    usize,
    Duration,
) {
    let llm = FakeLlm::sequence(vec![reply]).await;
    let client = LlmClassifier::new(&llm.config(timeout)).expect("client");
    let start = Instant::now();
    let result = client.classify("hello").await;
    let elapsed = start.elapsed();
    let calls = llm.calls().len();
    llm.stop();
    (result, calls, elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_maps_each_kind_of_llm_response_to_an_answer_a_rejection_or_an_error() {
    gatehouse_testenv::init();
    enum Want {
        Intent(&'static str),
        Rejected(&'static str),
        Retryable,
        Permanent,
    }
    let huge = format!(
        r#"{{"intent":"greeting","confidence":0.9,"x":"{}"}}"#,
        "A".repeat(1 << 20)
    );
    let cases: Vec<(&str, Reply, Want)> = vec![
        (
            "good",
            answer(json!({"intent":"greeting","confidence":0.9})),
            Want::Intent("greeting"),
        ),
        (
            "prose",
            Reply::Answer("I think it's a greeting.".into()),
            Want::Rejected("malformed_json"),
        ),
        (
            "fenced",
            Reply::Answer("```json\n{\"intent\":\"greeting\",\"confidence\":0.9}\n```".into()),
            Want::Rejected("malformed_json"),
        ),
        (
            "a 1 MiB answer",
            Reply::Answer(huge),
            Want::Rejected("response_too_large"),
        ),
        (
            "an endless chunked body",
            Reply::Endless,
            Want::Rejected("response_too_large"),
        ),
        (
            "not a completion",
            Reply::Raw(200, r#"{"intent":"greeting","confidence":0.9}"#.into()),
            Want::Rejected("malformed_response"),
        ),
        (
            "no choices",
            Reply::Raw(200, r#"{"choices":[]}"#.into()),
            Want::Rejected("malformed_response"),
        ),
        (
            "refusal",
            Reply::Raw(
                200,
                r#"{"choices":[{"message":{"content":null,"refusal":"no"}}]}"#.into(),
            ),
            Want::Rejected("malformed_response"),
        ),
        (
            "content parts",
            Reply::Raw(
                200,
                r#"{"choices":[{"message":{"content":[{"type":"text"}]}}]}"#.into(),
            ),
            Want::Rejected("malformed_response"),
        ),
        (
            "html",
            Reply::Raw(200, "<html>hi</html>".into()),
            Want::Rejected("malformed_response"),
        ),
        (
            "400",
            Reply::Raw(400, "{}".into()),
            Want::Rejected("request_refused"),
        ),
        ("500", Reply::Raw(500, "{}".into()), Want::Retryable),
        (
            "502",
            Reply::Raw(502, "bad gateway".into()),
            Want::Retryable,
        ),
        ("503", Reply::Raw(503, "{}".into()), Want::Retryable),
        ("429", Reply::Raw(429, "{}".into()), Want::Retryable),
        ("408", Reply::Raw(408, "{}".into()), Want::Retryable),
        (
            "slow",
            Reply::Slow(
                Duration::from_secs(5),
                Box::new(answer(json!({"intent":"greeting","confidence":0.9}))),
            ),
            Want::Retryable,
        ),
        ("401", Reply::Raw(401, "{}".into()), Want::Permanent),
        ("403", Reply::Raw(403, "{}".into()), Want::Permanent),
        ("404", Reply::Raw(404, "{}".into()), Want::Permanent),
        ("redirect", Reply::Redirect, Want::Permanent),
    ];
    for (name, reply, want) in cases {
        let (result, calls, elapsed) = classify_once(reply, Duration::from_millis(500)).await;
        assert!(
            elapsed < Duration::from_secs(3),
            "{name}: bounded by the timeout ({elapsed:?})"
        );
        assert_eq!(
            calls, 1,
            "{name}: exactly one call (redirects are not followed)"
        );
        match (want, result) {
            (Want::Intent(intent), Ok(c)) => {
                assert_eq!(c.intent.as_str(), intent, "{name}");
                assert_eq!(c.rejected_reason, None, "{name}");
            }
            (Want::Rejected(reason), Ok(c)) => {
                assert_eq!(c.rejected_reason.as_deref(), Some(reason), "{name}");
                assert_eq!(c.confidence, 0.0, "{name}");
                assert!(c.slots.is_empty(), "{name}");
            }
            (Want::Retryable, Err(e)) => {
                assert!(e.is_retryable(), "{name}: {e}");
                assert!(
                    !format!("{e}{e:?}").contains(API_KEY),
                    "{name}: the key leaks"
                );
            }
            (Want::Permanent, Err(e)) => {
                assert!(!e.is_retryable(), "{name}: {e}");
                assert!(
                    !format!("{e}{e:?}").contains(API_KEY),
                    "{name}: the key leaks"
                );
            }
            (_, other) => panic!("{name}: unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_unreachable_llm_is_a_retryable_error_that_names_no_secret() {
    gatehouse_testenv::init();
    // A port nothing listens on.
    let port = free_port();
    let config = LlmConfig {
        url: url::Url::parse(&format!("http://127.0.0.1:{port}/v1")).expect("url"),
        api_key: Some(SecretString::from(API_KEY.to_owned())),
        model: MODEL.to_owned(),
        timeout: Duration::from_secs(2),
    };
    let client = LlmClassifier::new(&config).expect("client");
    assert!(
        !format!("{client:?}").contains(API_KEY),
        "Debug hides the key"
    );
    let error = client.classify("hello").await.expect_err("unreachable");
    assert!(error.is_retryable(), "{error}");
    assert!(!format!("{error}{error:?}").contains(API_KEY));
}

/// Log output captured in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn logs_name_the_rejection_but_never_the_api_key_or_the_raw_answer() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let logs = Captured::default();
    // Everything, at every level, from every crate, on this (current-thread) runtime.
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let marker = "RAW-ANSWER-MARKER-42";
    let llm = FakeLlm::sequence(vec![
        answer(json!({"intent": "nope", "confidence": 0.5, "slots": {"note": marker}})),
        Reply::Answer(format!("Sure! {marker}")),
        Reply::Raw(500, format!(r#"{{"error":"{marker}"}}"#)),
        Reply::Slow(
            Duration::from_secs(3),
            Box::new(Reply::Raw(200, "{}".into())),
        ),
    ])
    .await;
    let client = LlmClassifier::new(&llm.config(Duration::from_millis(300))).expect("client");
    let first = client.classify("hello").await.expect("a rejection");
    assert_eq!(first.rejected_reason.as_deref(), Some("unknown_intent"));
    let second = client.classify("hello").await.expect("a rejection");
    assert_eq!(second.rejected_reason.as_deref(), Some("malformed_json"));
    for _ in 0..2 {
        let error = client
            .classify("hello")
            .await
            .expect_err("500, then a timeout");
        // As the worker logs a failed job.
        tracing::warn!(%error, ?error, "job failed, will retry");
    }
    tracing::info!(client = ?client, "the client");
    llm.stop();
    let text = String::from_utf8(logs.0.lock().expect("lock").clone()).expect("utf-8 logs");
    assert!(
        text.contains("unknown_intent") && text.contains("malformed_json"),
        "{text}"
    );
    assert!(
        text.contains("LLM answered 500") || text.contains("answered 500"),
        "{text}"
    );
    assert!(!text.contains(API_KEY), "the API key is logged:\n{text}");
    assert!(!text.contains(marker), "the raw answer is logged:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redelivered_job_is_acknowledged_without_asking_the_llm_again() {
    let llm = FakeLlm::sequence(vec![answer(
        json!({"intent": "greeting", "confidence": 0.9}),
    )])
    .await;
    let env = TestEnv::with_vars(llm.vars(5_000)).await;
    let tenant = env.create_tenant().await;
    let classifier = LlmClassifier::new(&llm.config(Duration::from_secs(5))).expect("client");
    let ctx = gatehouse::conversations::InboundContext {
        keyring: &env.config.keyring,
        blind_index: &env.config.blind_index,
        min_confidence: env.config.llm_min_confidence,
        worker: "test",
    };
    let msg = inbound_message(tenant, "+14155550100", "hi");
    let first =
        gatehouse::conversations::process_inbound(&env.pool, &ctx, "job-1", &msg, &classifier)
            .await
            .expect("stored");
    assert!(matches!(
        first,
        gatehouse::conversations::InboundOutcome::Stored {
            intent: gatehouse::classify::Intent::Greeting,
            rejected_reason: None,
            ..
        }
    ));
    let again =
        gatehouse::conversations::process_inbound(&env.pool, &ctx, "job-1", &msg, &classifier)
            .await
            .expect("acknowledged");
    assert_eq!(
        again,
        gatehouse::conversations::InboundOutcome::AlreadyProcessed
    );
    assert_eq!(llm.calls().len(), 1, "the redelivery cost no LLM call");
    assert_eq!(env.count("SELECT count(*) FROM messages").await, 1);
    llm.stop();
    env.cleanup().await;
}
