//! Group commit for `inbound_message` (`GROUP_COMMIT_MAX_JOBS`): the messages that a process's
//! jobs have classified and sealed at about the same moment are stored by one statement
//! (`conversations::store_group`), so they share one plan, one round trip and one commit, each
//! still with its own processed-job marker. The same idea as River's batch completer and
//! graphile-worker's batched jobs, applied to the job's effect rather than its completion.
//!
//! - **Who joins a group.** Whatever is waiting when the committer is free, up to the maximum,
//!   oldest first; nothing waits for a group to fill (a lone job commits alone, at once). Two
//!   messages sharing a [`GroupKey`] (the same job, `MessageSid` or customer) never share a
//!   group: the later one waits for the next, so one customer's messages still apply one at a
//!   time.
//! - **Failure.** A group's statement that fails applied nothing (one statement is one
//!   transaction); its messages are then stored one statement each, concurrently, so a poison
//!   message (a value PostgreSQL refuses, a `MessageSid` twin committed by another process, a
//!   deadlock with another process's group) fails alone and its neighbours commit. No effect
//!   can apply twice: each message's marker is in the same statement as its effect.
//! - **Acknowledgement.** A job's handler returns only once its message committed (or failed),
//!   so its acknowledgement in Redis follows the commit; a process killed before that leaves
//!   the job to be taken over, and the marker makes the second run a no-op.
//! - **Cancellation.** An attempt cancelled while it waits (its time limit, shutdown) is left
//!   out of the group if it has not started; one already in a committing group may still
//!   commit, and the job's next attempt finds its marker.
//! - **One group at a time** per process: what arrives while a group commits forms the next.
//!   A group is bounded in time (a job's allowance for PostgreSQL): one whose connection stops
//!   answering is abandoned, its jobs' attempts end (to be retried; the marker tells whether
//!   the abandoned statement committed), and the next group starts.

use std::collections::{HashSet, VecDeque};
use std::sync::OnceLock;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::conversations::{GroupKey, InboundError, InboundOutcome, PreparedInbound, store_group};

/// The longest a group (its statement, or its fallback one message at a time) may take: a job's
/// own allowance for PostgreSQL (`super::ATTEMPT_DB_ALLOWANCE`).
const GROUP_LIMIT: std::time::Duration = super::ATTEMPT_DB_ALLOWANCE;

type Reply = oneshot::Sender<Result<InboundOutcome, InboundError>>;

struct Waiting {
    message: PreparedInbound,
    keys: [GroupKey; 3],
    reply: Reply,
}

/// Stores classified inbound messages, in groups when `max_jobs` > 1.
pub struct GroupCommit {
    pool: PgPool,
    max_jobs: usize,
    /// The committer task's inbox, started on first use (so building the worker state needs
    /// no runtime).
    inbox: OnceLock<mpsc::UnboundedSender<Waiting>>,
}

impl GroupCommit {
    /// `max_jobs` = 1: every message is stored by its own statement, as without group commit.
    pub fn new(pool: PgPool, max_jobs: usize) -> Self {
        Self {
            pool,
            max_jobs: max_jobs.max(1),
            inbox: OnceLock::new(),
        }
    }

    /// Stores one message and answers its outcome once it committed (or failed).
    pub async fn store(&self, message: PreparedInbound) -> Result<InboundOutcome, InboundError> {
        if self.max_jobs == 1 {
            return message.store(&self.pool).await;
        }
        let inbox = self.inbox.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(committer(self.pool.clone(), rx, self.max_jobs));
            tx
        });
        let (reply, answer) = oneshot::channel();
        let keys = message.group_keys();
        if let Err(mpsc::error::SendError(waiting)) = inbox.send(Waiting {
            message,
            keys,
            reply,
        }) {
            // The committer is gone (its task panicked): store alone rather than lose the job.
            return waiting.message.store(&self.pool).await;
        }
        match answer.await {
            Ok(outcome) => outcome,
            Err(_) => Err(InboundError::Unanswered(format!(
                "its group commit ran past {GROUP_LIMIT:?} (or its committer stopped)"
            ))),
        }
    }
}

/// The committer: forms a group from what waits, commits it, and again; ends when every
/// sender is gone and nothing is left. One group at a time: what arrives meanwhile forms the
/// next one (measured: a second group in flight made groups smaller and the drain no faster,
/// BENCHMARKS.md §16).
async fn committer(pool: PgPool, mut inbox: mpsc::UnboundedReceiver<Waiting>, max_jobs: usize) {
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match inbox.recv().await {
                Some(w) => waiting.push_back(w),
                None => return,
            }
        }
        while let Ok(w) = inbox.try_recv() {
            waiting.push_back(w);
        }
        // Attempts cancelled while they waited are not applied.
        waiting.retain(|w| !w.reply.is_closed());
        let group = take_group(&mut waiting, |w| &w.keys, max_jobs);
        let jobs = group.len();
        if jobs > 0
            && tokio::time::timeout(GROUP_LIMIT, commit(&pool, group))
                .await
                .is_err()
        {
            // A connection that stopped answering must not hold up every later group: the
            // statement is abandoned (its connection dropped) and its jobs' attempts end.
            tracing::warn!(
                jobs,
                limit_s = GROUP_LIMIT.as_secs(),
                "a group commit ran past its time limit; its jobs will be tried again"
            );
        }
    }
}

/// Takes the oldest waiting messages that share no key with each other, up to `max_jobs`;
/// the others keep their place.
fn take_group<T>(
    waiting: &mut VecDeque<T>,
    keys_of: impl Fn(&T) -> &[GroupKey],
    max_jobs: usize,
) -> Vec<T> {
    let mut taken: HashSet<GroupKey> = HashSet::new();
    let mut group = Vec::new();
    let mut left = VecDeque::with_capacity(waiting.len());
    for w in waiting.drain(..) {
        let keys = keys_of(&w);
        if group.len() < max_jobs && keys.iter().all(|k| !taken.contains(k)) {
            taken.extend(keys.iter().cloned());
            group.push(w);
        } else {
            left.push_back(w);
        }
    }
    *waiting = left;
    group
}

/// Commits one group and answers each of its messages; a failed group falls back to one
/// statement per message.
async fn commit(pool: &PgPool, group: Vec<Waiting>) {
    ::metrics::histogram!("gatehouse_group_commit_jobs").record(group.len() as f64);
    if let [_] = group.as_slice() {
        for w in group {
            let _ = w.reply.send(w.message.store(pool).await);
        }
        return;
    }
    let jobs = group.len();
    let (messages, replies): (Vec<PreparedInbound>, Vec<Reply>) =
        group.into_iter().map(|w| (w.message, w.reply)).unzip();
    match store_group(pool, &messages).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        Err(error) => {
            ::metrics::counter!("gatehouse_group_commit_fallbacks_total").increment(1);
            tracing::warn!(
                jobs,
                %error,
                "a group commit failed and applied nothing; storing its messages one by one"
            );
            let singles = messages
                .iter()
                .zip(replies)
                .map(|(message, reply)| async move {
                    let _ = reply.send(message.store(pool).await);
                });
            futures::future::join_all(singles).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    /// A waiting message as `take_group` sees it: its name and keys.
    fn msg(name: &'static str, sid: &str, customer: u8) -> (&'static str, Vec<GroupKey>) {
        let tenant = Uuid::nil();
        (
            name,
            vec![
                GroupKey::Job(name.into()),
                GroupKey::MessageSid(tenant, sid.into()),
                GroupKey::Customer(tenant, vec![customer]),
            ],
        )
    }

    fn names(group: &[(&'static str, Vec<GroupKey>)]) -> Vec<&'static str> {
        group.iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn a_group_takes_the_oldest_messages_that_share_no_key_and_leaves_the_rest_in_order() {
        let mut waiting: VecDeque<_> = [
            msg("a1", "s1", 1),
            msg("a2", "s2", 1), // the same customer as a1: next group
            msg("b1", "s3", 2),
            msg("c1", "s3", 3), // b1's MessageSid: next group
            msg("d1", "s5", 4),
            msg("e1", "s6", 5), // past the maximum
        ]
        .into();
        let group = take_group(&mut waiting, |w| &w.1, 3);
        assert_eq!(names(&group), ["a1", "b1", "d1"]);
        assert_eq!(names(waiting.make_contiguous()), ["a2", "c1", "e1"]);
        let group = take_group(&mut waiting, |w| &w.1, 3);
        assert_eq!(names(&group), ["a2", "c1", "e1"]);
        assert!(waiting.is_empty());
    }
}
