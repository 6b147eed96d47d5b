//! Password hashing: argon2id PHC strings, the wrapped form of the platform's legacy bare
//! SHA-256 hashes, and upgrades of both at the next successful login.
//!
//! Stored forms (`users.password_hash`, `service_accounts.secret_hash`):
//! - `$argon2id$v=19$m=…,t=…,p=…$salt$hash`: a plain argon2id PHC string;
//! - `legacy-sha256:$argon2id$…`: argon2id over the lower-case hex SHA-256 digest of the
//!   password, made by `gatehouse migrate` from a legacy row ([`wrap_legacy`]);
//! - 64 hex characters: a bare legacy digest. Never accepted: `migrate` wraps it first.
//!
//! Hashing costs ~19 MiB and tens of milliseconds of CPU, so [`Hasher`] runs it on a few
//! threads of its own, at the lowest scheduling priority (nice +19 on Linux): a login flood
//! queues there, and whatever else wants the CPU meanwhile (the async workers that serve
//! webhooks, Redis, PostgreSQL) gets it first. The queue in front of them is bounded
//! (`PASSWORD_HASH_QUEUE`): a full queue refuses at once, and a queued hash whose request has
//! gone is skipped.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// The marker in front of a wrapped legacy hash.
pub const LEGACY_PREFIX: &str = "legacy-sha256:";

/// OWASP's minimum for argon2id: m = 19 MiB, t = 2, p = 1.
pub const MIN_M_COST_KIB: u32 = 19 * 1024;
pub const MIN_T_COST: u32 = 2;
pub const P_COST: u32 = 1;

/// Longest password accepted (bytes): argon2 takes any length, but an unbounded one is free
/// work for an attacker.
pub const MAX_PASSWORD_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("the stored hash is malformed")]
    Malformed,
    #[error("password hashing failed")]
    Hashing,
    #[error("the password hashing pool is gone")]
    PoolClosed,
    #[error("too many password hashes are waiting; retry shortly")]
    Busy,
}

/// What a verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// The password is right and the stored hash is current.
    Ok,
    /// The password is right; store this new hash in place of the old one.
    OkRehash(String),
    /// The password is wrong (or the stored hash cannot be accepted).
    Mismatch,
}

/// The argon2id parameters new hashes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

impl Cost {
    /// OWASP's recommended minimum.
    pub const OWASP: Cost = Cost {
        m_kib: MIN_M_COST_KIB,
        t: MIN_T_COST,
        p: P_COST,
    };

    fn argon2(self) -> Result<Argon2<'static>, PasswordError> {
        let params =
            Params::new(self.m_kib, self.t, self.p, None).map_err(|_| PasswordError::Hashing)?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

/// Hashes `password` with argon2id, a fresh 16-byte salt and `cost`. Blocking.
pub fn hash_blocking(password: &[u8], cost: Cost) -> Result<String, PasswordError> {
    let hash = cost
        .argon2()?
        .hash_password(password)
        .map_err(|_| PasswordError::Hashing)?;
    Ok(hash.to_string())
}

/// The lower-case hex SHA-256 digest the legacy platform stored.
pub fn legacy_digest(password: &[u8]) -> String {
    hex::encode(Sha256::digest(password))
}

/// Whether `stored` is a bare legacy SHA-256 hex digest (what `migrate` must wrap).
pub fn is_bare_legacy(stored: &str) -> bool {
    stored.len() == 64 && stored.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Wraps a bare legacy digest: argon2id over the digest's lower-case hex text. Blocking.
pub fn wrap_legacy(bare: &str, cost: Cost) -> Result<String, PasswordError> {
    if !is_bare_legacy(bare) {
        return Err(PasswordError::Malformed);
    }
    let inner = hash_blocking(bare.to_ascii_lowercase().as_bytes(), cost)?;
    Ok(format!("{LEGACY_PREFIX}{inner}"))
}

fn weaker_than(hash: &PasswordHash, cost: Cost) -> bool {
    let Ok(params) = Params::try_from(hash) else {
        return true;
    };
    hash.algorithm.as_str() != "argon2id"
        || hash.version != Some(Version::V0x13 as u32)
        || params.m_cost() < cost.m_kib
        || params.t_cost() < cost.t
        || params.p_cost() != cost.p
}

/// Checks `password` against `stored`. Blocking. A right password under a wrapped legacy
/// hash or under weaker parameters than `cost` comes back with the replacement hash.
pub fn verify_blocking(
    stored: &str,
    password: &[u8],
    cost: Cost,
) -> Result<Verified, PasswordError> {
    if password.len() > MAX_PASSWORD_BYTES || is_bare_legacy(stored) {
        // A bare digest is refused outright: `migrate` wraps every one it finds.
        return Ok(Verified::Mismatch);
    }
    let (phc, legacy) = match stored.strip_prefix(LEGACY_PREFIX) {
        Some(inner) => (inner, true),
        None => (stored, false),
    };
    let parsed = PasswordHash::new(phc).map_err(|_| PasswordError::Malformed)?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(PasswordError::Malformed);
    }
    let candidate = if legacy {
        legacy_digest(password).into_bytes()
    } else {
        password.to_vec()
    };
    match Argon2::default().verify_password(&candidate, &parsed) {
        Ok(()) => {}
        Err(argon2::password_hash::Error::PasswordInvalid) => return Ok(Verified::Mismatch),
        Err(_) => return Err(PasswordError::Malformed),
    }
    if legacy || weaker_than(&parsed, cost) {
        Ok(Verified::OkRehash(hash_blocking(password, cost)?))
    } else {
        Ok(Verified::Ok)
    }
}

/// How much lower than the rest of the process the hashing threads run (a nice increment;
/// Linux caps the result at 19). The bench measured +10 too weak: the webhook p99 under a
/// login flood still rose 2.8x on 2 cores; at +19, 1.7x.
const HASH_NICENESS: i32 = 19;

/// A queued hash: `run` does the work; `abandoned` says whether the request that queued it
/// has gone (its answer would be read by nobody), and then the job is skipped.
struct HashJob {
    run: Box<dyn FnOnce() + Send>,
    abandoned: Box<dyn Fn() -> bool + Send>,
}

/// Lowers the calling thread's scheduling priority. Best effort: where it is refused (or
/// not Linux) the thread just runs at the normal priority.
fn lower_own_priority() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        let current = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
        if let Err(error) = rustix::process::setpriority_process(Some(tid), current + HASH_NICENESS)
        {
            tracing::debug!(%error, "cannot lower the priority of a password hashing thread");
        }
    }
}

/// What the pool has done, for tests and metrics.
#[derive(Debug, Default)]
struct Counters {
    /// Jobs waiting for a thread right now.
    waiting: AtomicUsize,
    /// Callers awaiting an answer right now (a dropped caller no longer counts).
    callers: AtomicUsize,
    /// Jobs a thread ran (counted as it starts one).
    computed: AtomicU64,
    /// Jobs dropped unrun because their request had gone.
    skipped: AtomicU64,
    /// Jobs refused because the queue was full.
    refused: AtomicU64,
}

/// A snapshot of the pool's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Jobs waiting for a hashing thread right now (abandoned ones included until a thread
    /// skips them).
    pub waiting: usize,
    /// Callers still awaiting an answer (queued or being hashed); a caller whose future was
    /// dropped no longer counts.
    pub callers: usize,
    /// Jobs a thread has run or is running.
    pub computed: u64,
    /// Queued jobs skipped because the request that queued them had gone.
    pub skipped: u64,
    /// Jobs refused at once because the queue was full.
    pub refused: u64,
}

/// The hashing threads: each takes the next job off one shared, bounded queue. They end when
/// the last [`Hasher`] clone is dropped (the queue's sender with it).
struct Pool {
    jobs: SyncSender<HashJob>,
    counters: Arc<Counters>,
}

impl Pool {
    fn start(threads: usize, queue: usize) -> Self {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<HashJob>(queue.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        let counters = Arc::new(Counters::default());
        for i in 0..threads.max(1) {
            let receiver: Arc<Mutex<Receiver<HashJob>>> = Arc::clone(&receiver);
            let counters = Arc::clone(&counters);
            let spawned = std::thread::Builder::new()
                .name(format!("gatehouse-argon2-{i}"))
                .spawn(move || {
                    lower_own_priority();
                    loop {
                        let job = match receiver.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        counters.waiting.fetch_sub(1, Ordering::SeqCst);
                        if (job.abandoned)() {
                            counters.skipped.fetch_add(1, Ordering::SeqCst);
                            ::metrics::counter!("gatehouse_password_hashes_skipped_total")
                                .increment(1);
                            continue;
                        }
                        counters.computed.fetch_add(1, Ordering::SeqCst);
                        (job.run)();
                    }
                });
            if let Err(error) = spawned {
                tracing::error!(%error, "cannot start a password hashing thread");
            }
        }
        Self {
            jobs: sender,
            counters,
        }
    }
}

/// Counts a caller awaiting its answer for as long as its future lives.
struct CallerGuard(Arc<Counters>);

impl CallerGuard {
    fn new(counters: Arc<Counters>) -> Self {
        counters.callers.fetch_add(1, Ordering::SeqCst);
        Self(counters)
    }
}

impl Drop for CallerGuard {
    fn drop(&mut self) {
        self.0.callers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many hashes may wait for a thread when no `PASSWORD_HASH_QUEUE` applies (the CLI).
pub const DEFAULT_QUEUE: usize = 1024;

/// Runs argon2 off the async runtime, on `concurrency` threads of lowered priority, behind a
/// bounded queue: when `queue` hashes already wait, a new one is refused at once
/// ([`PasswordError::Busy`]) rather than waiting; a queued hash whose caller has gone (its
/// future dropped: the client disconnected or the request timed out) is skipped, not computed.
#[derive(Clone)]
pub struct Hasher {
    cost: Cost,
    pool: Arc<Pool>,
    /// A hash of a random password, verified against when the account does not exist so
    /// that an unknown email costs the same time as a wrong password. Made on first use.
    dummy: Arc<OnceLock<String>>,
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hasher")
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

impl Hasher {
    /// A hasher with `cost`, `concurrency` hashing threads (at least 1) and room for
    /// [`DEFAULT_QUEUE`] waiting hashes.
    pub fn new(cost: Cost, concurrency: usize) -> Self {
        Self::with_queue(cost, concurrency, DEFAULT_QUEUE)
    }

    /// A hasher with `cost`, `concurrency` hashing threads and room for `queue` (at least 1)
    /// hashes waiting for one.
    pub fn with_queue(cost: Cost, concurrency: usize, queue: usize) -> Self {
        Self {
            cost,
            pool: Arc::new(Pool::start(concurrency, queue)),
            dummy: Arc::new(OnceLock::new()),
        }
    }

    /// OWASP's cost, with one CPU fewer hashing than the machine has (at least one): a login
    /// flood then always leaves a core to the async runtime. (With one slot per CPU the
    /// benchmark harness measured `/healthz` p99 rising 7× during a flood on 2 cores; with
    /// one slot, 1.5×.)
    pub fn owasp() -> Self {
        Self::owasp_with_queue(DEFAULT_QUEUE)
    }

    /// [`Hasher::owasp`] with room for `queue` waiting hashes (`PASSWORD_HASH_QUEUE`).
    pub fn owasp_with_queue(queue: usize) -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::with_queue(Cost::OWASP, cpus.saturating_sub(1).max(1), queue)
    }

    pub fn cost(&self) -> Cost {
        self.cost
    }

    /// What the pool has done so far.
    pub fn stats(&self) -> PoolStats {
        let c = &self.pool.counters;
        PoolStats {
            waiting: c.waiting.load(Ordering::SeqCst),
            callers: c.callers.load(Ordering::SeqCst),
            computed: c.computed.load(Ordering::SeqCst),
            skipped: c.skipped.load(Ordering::SeqCst),
            refused: c.refused.load(Ordering::SeqCst),
        }
    }

    /// Runs `f` on a hashing thread: refused at once with [`PasswordError::Busy`] when the
    /// queue is full; skipped if this future is dropped before a thread takes it.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let reply = Arc::new(Mutex::new(Some(reply)));
        let watched = Arc::clone(&reply);
        let job = HashJob {
            abandoned: Box::new(move || {
                watched
                    .lock()
                    .map(|r| r.as_ref().is_none_or(|r| r.is_closed()))
                    .unwrap_or(true)
            }),
            run: Box::new(move || {
                // A panic fails this one call (its reply is dropped), not the thread.
                if let Ok(value) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                    && let Ok(mut slot) = reply.lock()
                    && let Some(reply) = slot.take()
                {
                    let _ = reply.send(value);
                }
            }),
        };
        let counters = &self.pool.counters;
        // Counted before it is visible to the threads, which count it down when they take it.
        counters.waiting.fetch_add(1, Ordering::SeqCst);
        match self.pool.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                counters.waiting.fetch_sub(1, Ordering::SeqCst);
                counters.refused.fetch_add(1, Ordering::SeqCst);
                ::metrics::counter!("gatehouse_password_hash_queue_full_total").increment(1);
                return Err(PasswordError::Busy);
            }
            Err(TrySendError::Disconnected(_)) => {
                counters.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(PasswordError::PoolClosed);
            }
        }
        let _caller = CallerGuard::new(Arc::clone(&self.pool.counters));
        answer.await.map_err(|_| PasswordError::PoolClosed)
    }

    /// Hashes a new password.
    pub async fn hash(&self, password: &SecretString) -> Result<String, PasswordError> {
        let password = password.clone();
        let cost = self.cost;
        self.run(move || hash_blocking(password.expose_secret().as_bytes(), cost))
            .await?
    }

    /// Verifies `password` against `stored`, or against the dummy hash when `stored` is
    /// `None` (then always [`Verified::Mismatch`], after the same work).
    pub async fn verify(
        &self,
        stored: Option<String>,
        password: &SecretString,
    ) -> Result<Verified, PasswordError> {
        let password = password.clone();
        let cost = self.cost;
        let dummy = Arc::clone(&self.dummy);
        self.run(move || match stored {
            Some(stored) => verify_blocking(&stored, password.expose_secret().as_bytes(), cost),
            None => {
                let dummy = dummy.get_or_init(|| {
                    let random: [u8; 32] = rand::random();
                    hash_blocking(&random, cost).unwrap_or_default()
                });
                let _ = verify_blocking(dummy, password.expose_secret().as_bytes(), cost);
                Ok(Verified::Mismatch)
            }
        })
        .await?
    }

    /// Wraps a bare legacy digest.
    pub async fn wrap_legacy(&self, bare: String) -> Result<String, PasswordError> {
        let cost = self.cost;
        self.run(move || wrap_legacy(&bare, cost)).await?
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // Cheap parameters keep unit tests fast; the OWASP floor is tested once.
    const WEAK: Cost = Cost {
        m_kib: 64,
        t: 1,
        p: 1,
    };

    #[test]
    fn a_new_hash_is_argon2id_with_at_least_owasp_parameters() {
        let h = hash_blocking(b"correct horse battery staple", Cost::OWASP).unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert_eq!(
            verify_blocking(&h, b"correct horse battery staple", Cost::OWASP).unwrap(),
            Verified::Ok
        );
        assert_eq!(
            verify_blocking(&h, b"wrong", Cost::OWASP).unwrap(),
            Verified::Mismatch
        );
    }

    #[test]
    fn two_hashes_of_one_password_have_different_salts() {
        let a = hash_blocking(b"same", WEAK).unwrap();
        let b = hash_blocking(b"same", WEAK).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn a_weaker_hash_is_upgraded_on_a_right_password_only() {
        let h = hash_blocking(b"pw", WEAK).unwrap();
        let stronger = Cost {
            m_kib: 128,
            t: 2,
            p: 1,
        };
        match verify_blocking(&h, b"pw", stronger).unwrap() {
            Verified::OkRehash(new) => assert!(new.contains("m=128,t=2,p=1"), "{new}"),
            other => panic!("expected a rehash, got {other:?}"),
        }
        assert_eq!(
            verify_blocking(&h, b"nope", stronger).unwrap(),
            Verified::Mismatch
        );
    }

    #[test]
    fn a_wrapped_legacy_hash_verifies_and_is_replaced_by_a_plain_one() {
        let bare = legacy_digest(b"hunter2");
        assert!(is_bare_legacy(&bare));
        let wrapped = wrap_legacy(&bare, WEAK).unwrap();
        assert!(wrapped.starts_with(LEGACY_PREFIX));
        assert!(!wrapped.contains(&bare));
        match verify_blocking(&wrapped, b"hunter2", WEAK).unwrap() {
            Verified::OkRehash(new) => {
                assert!(new.starts_with("$argon2id$"));
                assert_eq!(
                    verify_blocking(&new, b"hunter2", WEAK).unwrap(),
                    Verified::Ok
                );
            }
            other => panic!("expected a rehash, got {other:?}"),
        }
        assert_eq!(
            verify_blocking(&wrapped, b"hunter3", WEAK).unwrap(),
            Verified::Mismatch
        );
    }

    #[test]
    fn a_bare_legacy_digest_is_never_accepted() {
        let bare = legacy_digest(b"hunter2");
        assert_eq!(
            verify_blocking(&bare, b"hunter2", WEAK).unwrap(),
            Verified::Mismatch
        );
        // nor is the digest itself accepted as the password of a wrapped hash's inner form
        let wrapped = wrap_legacy(&bare, WEAK).unwrap();
        assert_eq!(
            verify_blocking(&wrapped, bare.as_bytes(), WEAK).unwrap(),
            Verified::Mismatch
        );
    }

    #[test]
    fn garbage_stored_hashes_are_errors_not_panics() {
        for stored in [
            "",
            "$argon2id$",
            "$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
            "legacy-sha256:",
            "plain",
        ] {
            assert!(verify_blocking(stored, b"x", WEAK).is_err(), "{stored}");
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn hashing_runs_on_its_own_threads_at_a_lower_priority_than_the_runtime() {
        let here = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let hasher = Hasher::new(WEAK, 2);
        let (name, nice) = hasher
            .run(|| {
                let nice =
                    rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
                (std::thread::current().name().map(str::to_owned), nice)
            })
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("gatehouse-argon2-"));
        assert_eq!(nice, (here + HASH_NICENESS).min(19));
    }

    #[tokio::test]
    async fn a_panicking_job_fails_that_call_and_the_pool_keeps_working() {
        let hasher = Hasher::new(WEAK, 1);
        let failed = hasher.run(|| -> u8 { panic!("boom") }).await;
        assert!(matches!(failed, Err(PasswordError::PoolClosed)));
        assert_eq!(hasher.run(|| 7u8).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn an_unknown_account_costs_a_real_argon2_verification() {
        let hasher = Hasher::new(WEAK, 1);
        assert!(hasher.dummy.get().is_none());
        let got = hasher
            .verify(None, &SecretString::from("anything at all"))
            .await
            .unwrap();
        assert_eq!(got, Verified::Mismatch);
        // The dummy hash was made and verified against: the same work as a wrong password.
        assert!(
            hasher
                .dummy
                .get()
                .is_some_and(|d| d.starts_with("$argon2id$"))
        );
    }

    /// Occupies the hasher's (single) thread until the returned sender is used or dropped.
    async fn occupy(hasher: &Hasher) -> std::sync::mpsc::Sender<()> {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let h = hasher.clone();
        tokio::spawn(async move {
            let _ = h
                .run(move || {
                    let _ = started_tx.send(());
                    let _ = wait.recv();
                })
                .await;
        });
        for _ in 0..200 {
            if started_rx.try_recv().is_ok() {
                return release;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("the hashing thread never took the blocking job");
    }

    async fn until(hasher: &Hasher, what: &str, done: impl Fn(PoolStats) -> bool) {
        for _ in 0..400 {
            if done(hasher.stats()) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("{what}: {:?}", hasher.stats());
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_abandoned_hashes_are_skipped() {
        let hasher = Hasher::with_queue(WEAK, 1, 3);
        let release = occupy(&hasher).await;
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let h = hasher.clone();
                tokio::spawn(async move { h.verify(None, &SecretString::from("guess")).await })
            })
            .collect();
        until(&hasher, "three hashes wait", |s| s.waiting == 3).await;
        // The queue is full: the next one is refused without waiting for anything.
        let refused = hasher.hash(&SecretString::from("one more")).await;
        assert!(matches!(refused, Err(PasswordError::Busy)), "{refused:?}");
        // Two of the waiting requests go away (their futures are dropped); one stays.
        let mut waiting = waiting.into_iter();
        let kept = waiting.next().expect("a task");
        for gone in waiting {
            gone.abort();
            assert!(gone.await.is_err_and(|e| e.is_cancelled()));
        }
        until(&hasher, "two callers are gone", |s| s.callers == 2).await;
        let _ = release.send(());
        assert_eq!(
            kept.await.expect("task").expect("verified"),
            Verified::Mismatch
        );
        until(&hasher, "the queue drains", |s| {
            s.waiting == 0 && s.skipped == 2
        })
        .await;
        let stats = hasher.stats();
        // The blocker and the kept request were computed; the two abandoned ones were not.
        assert_eq!(stats.computed, 2, "{stats:?}");
        assert_eq!(stats.skipped, 2, "{stats:?}");
        assert_eq!(stats.refused, 1, "{stats:?}");
        // And the pool keeps working.
        assert!(hasher.hash(&SecretString::from("after")).await.is_ok());
        assert_eq!(hasher.stats().computed, 3);
    }

    #[test]
    fn an_overlong_password_is_a_mismatch_without_hashing() {
        let h = hash_blocking(b"x", WEAK).unwrap();
        let long = vec![b'a'; MAX_PASSWORD_BYTES + 1];
        assert_eq!(
            verify_blocking(&h, &long, WEAK).unwrap(),
            Verified::Mismatch
        );
    }
}
