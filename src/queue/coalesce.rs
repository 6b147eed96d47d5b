//! Coalesced enqueues: jobs that are ready at the same moment travel to Redis together.
//!
//! The ingress prepares (seals) each job on the request's own task, then hands it here. One
//! task sends what is waiting: at most [`MAX_IN_FLIGHT`] script calls at once
//! ([`MAX_IN_FLIGHT_ACKED`] when each waits for replicas), each carrying
//! every job waiting when it leaves (up to [`MAX_GROUP`], one call per queue shard). When
//! nothing is in flight a request sends its job itself, at once, alone (no hand-over: an idle
//! or lightly loaded ingress pays no extra hop); under load the jobs that arrive while calls
//! are in flight leave together in the next one — the same idea as the worker's group commit.
//! A group is one `EVALSHA` (and, with `REDIS_MIN_REPLICA_ACKS`, one `WAIT`) instead of one
//! per job: fewer round trips, script calls and wake-up signals for Redis and for this
//! process, and each job still exactly what it would be alone (its dedupe claim made in the
//! same atomic script, its answer its own).
//!
//! A request answers only after its job's group is in Redis (and, with replica acks, on the
//! replicas), and a failed group fails every request in it (each answers 503; a retry adds
//! nothing that is there: job ids, which carry the dedupe claims, are fixed before sending). A
//! job whose request has gone (its client left, or the request timed out) before its group
//! leaves is not sent.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use gatehouse_jobs::client::{EnqueueError, Enqueued, Prepared, Queues, SendError};
use redis::aio::ConnectionLike;
use tokio::sync::{mpsc, oneshot};

/// Most jobs in one script call: a group's script runs in Redis as one unit (~1 ms at this
/// size), which blocks every other client of that Redis for as long.
pub const MAX_GROUP: usize = 64;

/// Most script calls in flight at once: under load the next group gathers while these run.
/// Measured at figure 4's load (BENCHMARKS.md §16, "Coalesced enqueues"): two, with the
/// yield below, gave the most webhooks a second (~5 jobs a call); one made bigger groups
/// (~8) but each job waited for the call before it; three or four, or no yield, made smaller
/// groups and cost Redis more per webhook.
pub const MAX_IN_FLIGHT: usize = 2;

/// Most script calls in flight when each waits for replicas (`REDIS_MIN_REPLICA_ACKS`): a
/// call's `WAIT` holds it until a replica confirms, up to the timeout, so a lagging replica
/// lets at most this × [`MAX_GROUP`] webhooks through per wait. Each call goes on its own
/// connection of the ingress's acknowledged pool (16). Figure 4b with a healthy replica:
/// 0.87× of not waiting with 2, 0.83× with 4, 0.74× with 8 (smaller groups, more waits).
pub const MAX_IN_FLIGHT_ACKED: usize = 4;

/// Jobs waiting for a group before a sender waits for room (the request timeout bounds that).
const WAITING: usize = 4096;

type Answer = oneshot::Sender<Result<Enqueued, SendError>>;

/// Sends prepared jobs in groups over connections from `connect` (called once per group: a
/// renewed or rotated connection is used from the next group on). One per process: share it
/// (the ingress keeps it in its `AppState`).
pub struct Coalescer<C> {
    queues: Arc<Queues>,
    connect: Arc<dyn Fn() -> C + Send + Sync>,
    /// The sending task's queue, started on first use (inside the runtime) and again if the
    /// task has ended.
    waiting: Mutex<Option<mpsc::Sender<(Prepared, Answer)>>>,
    sent: Arc<Sent>,
}

/// Script calls made and jobs they carried since the coalescer was made, and the calls in
/// flight now (the task's and a lone request's).
#[derive(Debug, Default)]
struct Sent {
    groups: AtomicU64,
    jobs: AtomicU64,
    active: AtomicUsize,
}

/// `gatehouse_enqueue_group_jobs`, registered once: a lookup by name builds and hashes the
/// metric's key (and allocates) on every script call.
static GROUP_JOBS: std::sync::LazyLock<::metrics::Histogram> =
    std::sync::LazyLock::new(|| ::metrics::histogram!("gatehouse_enqueue_group_jobs"));

impl Sent {
    /// One script call of `jobs` jobs, in `gatehouse_enqueue_group_jobs` too.
    fn count(&self, jobs: usize) {
        GROUP_JOBS.record(jobs as f64);
        self.groups.fetch_add(1, Ordering::Relaxed);
        self.jobs.fetch_add(jobs as u64, Ordering::Relaxed);
    }
}

/// A call counted in [`Sent::active`] while it lives (a dropped request's too).
struct Alone<'a>(&'a AtomicUsize);

impl<'a> Alone<'a> {
    /// Counts a lone request's call if nothing is in flight.
    fn claim(active: &'a AtomicUsize) -> Option<Self> {
        active
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| Self(active))
    }
}

impl Drop for Alone<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<C: ConnectionLike + Send + 'static> Coalescer<C> {
    /// Groups for `queues` (its replica acknowledgement applies to each group).
    pub fn new(queues: Queues, connect: impl Fn() -> C + Send + Sync + 'static) -> Self {
        Self {
            queues: Arc::new(queues),
            connect: Arc::new(connect),
            waiting: Mutex::new(None),
            sent: Arc::default(),
        }
    }

    /// Script calls this coalescer has made, and the jobs they carried (the same figures as
    /// `gatehouse_enqueue_group_jobs`, for this coalescer alone).
    pub fn sent(&self) -> (u64, u64) {
        (
            self.sent.groups.load(Ordering::Relaxed),
            self.sent.jobs.load(Ordering::Relaxed),
        )
    }

    /// Enqueue `job` with whatever else is waiting; its own outcome.
    pub async fn enqueue(&self, job: Prepared) -> Result<Enqueued, EnqueueError> {
        // Nothing in flight: this job goes now, alone, from this request — no hop to the
        // sending task and no wait (an idle ingress, or one webhook at a time). Only one
        // request at a time may do so; the rest wait for the task's next group.
        if let Some(_alone) = Alone::claim(&self.sent.active) {
            self.sent.count(1);
            let mut conn = (self.connect)();
            let mut sent = self
                .queues
                .enqueue_prepared(&mut conn, std::slice::from_ref(&job))
                .await?;
            return sent.pop().ok_or(EnqueueError::Redis(stopped()));
        }
        let (answer, answered) = oneshot::channel();
        self.sender()
            .send((job, answer))
            .await
            .map_err(|_| SendError::Redis(stopped()))?;
        match answered.await {
            Ok(outcome) => Ok(outcome?),
            Err(_) => Err(EnqueueError::Redis(stopped())),
        }
    }

    /// The sending task's queue, started if it is not running.
    fn sender(&self) -> mpsc::Sender<(Prepared, Answer)> {
        let mut waiting = match self.waiting.lock() {
            Ok(waiting) => waiting,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(sender) = waiting.as_ref().filter(|s| !s.is_closed()) {
            return sender.clone();
        }
        let (sender, receiver) = mpsc::channel(WAITING);
        let in_flight = match self.queues.replica_acks() {
            Some(_) => MAX_IN_FLIGHT_ACKED,
            None => MAX_IN_FLIGHT,
        };
        tokio::spawn(send_groups(
            in_flight,
            self.queues.clone(),
            self.connect.clone(),
            receiver,
            self.sent.clone(),
        ));
        *waiting = Some(sender.clone());
        sender
    }
}

/// The sending task: until every sender is dropped, and then until the groups in flight end.
async fn send_groups<C: ConnectionLike + Send + 'static>(
    max_in_flight: usize,
    queues: Arc<Queues>,
    connect: Arc<dyn Fn() -> C + Send + Sync>,
    mut waiting: mpsc::Receiver<(Prepared, Answer)>,
    sent: Arc<Sent>,
) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            next = waiting.recv(), if in_flight.len() < max_in_flight => {
                let Some(first) = next else { break };
                let mut group = Vec::with_capacity(8);
                group.push(first);
                // Busy (a call in flight): let the requests that are ready on this thread (and
                // the sockets the runtime polls meanwhile) add their jobs first — a group of one
                // under load costs Redis a script call per job. Idle: no wait.
                if sent.active.load(Ordering::Acquire) > 0 {
                    tokio::task::yield_now().await;
                }
                while group.len() < MAX_GROUP {
                    match waiting.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
                // A job whose request has gone is not sent (its client was answered, or
                // will be retried by Twilio, which finds nothing of it).
                group.retain(|(_, answer)| !answer.is_closed());
                if group.is_empty() {
                    continue;
                }
                sent.count(group.len());
                sent.active.fetch_add(1, Ordering::AcqRel);
                in_flight.push(send(queues.clone(), connect(), group, sent.clone()));
            }
            else => break,
        }
    }
    while in_flight.next().await.is_some() {}
}

/// One group: sent, and each job's outcome to its request.
async fn send<C: ConnectionLike>(
    queues: Arc<Queues>,
    mut conn: C,
    group: Vec<(Prepared, Answer)>,
    sent: Arc<Sent>,
) {
    let (jobs, answers): (Vec<Prepared>, Vec<Answer>) = group.into_iter().unzip();
    let outcome = queues.enqueue_prepared(&mut conn, &jobs).await;
    sent.active.fetch_sub(1, Ordering::AcqRel);
    match outcome {
        Ok(outcomes) => {
            for (answer, outcome) in answers.into_iter().zip(outcomes) {
                // A request that has gone by now drops its answer: nothing to do.
                let _ = answer.send(Ok(outcome));
            }
        }
        Err(error) => {
            for answer in answers {
                let _ = answer.send(Err(error.clone()));
            }
        }
    }
}

fn stopped() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "the enqueue task stopped before answering",
    ))
}
