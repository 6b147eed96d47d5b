//! Where a job's failure belongs: to a dependency that is down (an outage), to the moment (a
//! transient fault), or to the job itself. Errors are classified by where they happen — the
//! error's kind, a SQLSTATE, an HTTP status — never by their text. ARCHITECTURE.md has the
//! table; the tests below check each row.
//!
//! | class | what happens to the job | counts an attempt |
//! |---|---|---|
//! | [`Fault::Outage`] | given back at once, rescheduled; the worker stops fetching until the dependency answers (PostgreSQL, Redis) or the circuit lets a probe through (LLM, store) | no, for at most `OUTAGE_MAX_WAIT_SECONDS` |
//! | [`Fault::Transient`] | rescheduled after a short jittered delay | no, for at most `OUTAGE_MAX_WAIT_SECONDS` |
//! | [`Fault::Retry`] | retried on the queue's backoff schedule | yes |
//! | [`Fault::Permanent`] | dead-lettered now | yes (its last) |
//!
//! [`Reachability`] is a process's view of one dependency: down from the first failure that is
//! an outage until the next success.

use std::fmt;
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

/// Something a job depends on that is not the job's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dependency {
    Postgres,
    Redis,
    /// The LLM endpoint (`LLM_API_URL`).
    Llm,
    /// A tenant's store (one circuit per host).
    Store,
}

impl Dependency {
    /// The label on `/healthz`'s `outages` and on the `dependency` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Redis => "redis",
            Self::Llm => "llm",
            Self::Store => "store",
        }
    }
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a failed attempt means for its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The dependency cannot be reached or cannot serve now: not the job's fault.
    Outage(Dependency),
    /// A fault of the moment that running again resolves (a serialization failure, a
    /// deadlock, a lock wait that gave up): not the job's fault.
    Transient,
    /// The job's own failure that a later attempt may not repeat (a reachable endpoint's 5xx
    /// for this request, a query this job's data made slow).
    Retry,
    /// The job's own failure that no attempt fixes (its data is invalid, a constraint on its
    /// rows refuses it, no key opens its ciphertext).
    Permanent,
}

impl Fault {
    /// Whether the attempt counts against the job's retry budget.
    pub fn counts(self) -> bool {
        matches!(self, Self::Retry | Self::Permanent)
    }
}

/// Classifies a PostgreSQL (sqlx) error by where it happened.
///
/// Outage: anything on the way to a usable connection or transaction — I/O (refused, reset,
/// closed, timed out), TLS, protocol garbage (`unexpected response from SSLRequest`), the pool
/// timing out or closed, a connection lost mid-statement, and the server saying it cannot
/// serve now: SQLSTATE class 08 (connection exception), 53 (insufficient resources: too many
/// connections, disk full, out of memory), 57P01-57P05 (shutdown, crash, cannot connect now,
/// idle session timeout) and 25006 (read-only transaction: a failover left us on a standby).
/// Transient: 40001 (serialization failure), 40P01 (deadlock), 55P03 (lock not available).
/// Permanent: class 23 (integrity constraint violation) and 22 (data exception): the job's
/// own rows or values — except 23505 (unique violation), which a concurrent insert of the
/// same key can cause and a rerun resolves (it sees the row), so it is retried on the job's
/// attempts. Everything else (a query this build got wrong, a statement timeout, a row that
/// does not decode) is retried on the job's attempts, as before.
pub fn postgres(error: &sqlx::Error) -> Fault {
    use sqlx::Error as E;
    match error {
        E::Io(_) | E::Tls(_) | E::Protocol(_) | E::PoolTimedOut | E::PoolClosed => {
            Fault::Outage(Dependency::Postgres)
        }
        E::WorkerCrashed => Fault::Outage(Dependency::Postgres),
        E::Database(db) => match db.code() {
            Some(code) => sqlstate(&code),
            None => Fault::Retry,
        },
        _ => Fault::Retry,
    }
}

/// Classifies a SQLSTATE (see [`postgres`]).
pub fn sqlstate(code: &str) -> Fault {
    match code {
        "40001" | "40P01" | "55P03" => Fault::Transient,
        "23505" => Fault::Retry,
        "25006" | "57P01" | "57P02" | "57P03" | "57P04" | "57P05" => {
            Fault::Outage(Dependency::Postgres)
        }
        _ if code.starts_with("08") || code.starts_with("53") => {
            Fault::Outage(Dependency::Postgres)
        }
        _ if code.starts_with("23") || code.starts_with("22") => Fault::Permanent,
        _ => Fault::Retry,
    }
}

/// Classifies a Redis error by where it happened: anything on the way to a usable answer —
/// connect, I/O (refused, reset, closed, timed out), protocol garbage — and a server that says
/// it cannot serve now (`LOADING`, `BUSY`, `TRYAGAIN`, `READONLY`, `MASTERDOWN`, a Redis
/// Cluster's `MOVED`/`ASK` past the client's redirections or no connection to a slot's node,
/// `CLUSTERDOWN`) is an outage; anything else (a script error, a wrong type) is a failure of
/// its own.
pub fn redis(error: &redis::RedisError) -> Fault {
    use redis::{ErrorKind, ServerErrorKind};
    let outage = match error.kind() {
        // A Redis Cluster client with no connection to the slot's node (all of them gone, or
        // a failover under way) is an outage too.
        ErrorKind::Io | ErrorKind::Parse | ErrorKind::ClusterConnectionNotFound => true,
        // MOVED/ASK reach the caller only when the client ran out of redirections to follow
        // (slots moving during a resharding or a failover): transient.
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        ) => true,
        _ => error.code() == Some("BUSY"),
    };
    if outage {
        Fault::Outage(Dependency::Redis)
    } else {
        Fault::Retry
    }
}

/// The log target of outage transitions: where they were logged before [`Reachability`] moved
/// here, and what operators filter on (`RUST_LOG=warn,gatehouse::worker::outage=info`).
pub const REACHABILITY_LOG_TARGET: &str = "gatehouse::worker::outage";

/// Whether this process reaches a dependency: not until something first has, then down from
/// the first failure that is an outage ([`Self::outage`]) until the next success
/// ([`Self::reached`]). Each transition is logged once (an ERROR line when the outage starts,
/// an INFO line with its length when it ends) and sets the `gatehouse_dependency_up{dependency}`
/// gauge and `gatehouse_dependency_down_since_seconds{dependency}` (the outage's start as a Unix
/// time, 0 while up); failures in between log nothing.
#[derive(Debug, Clone)]
pub struct Reachability {
    dependency: Dependency,
    reach: Arc<Mutex<Reach>>,
}

#[derive(Debug, Default)]
struct Reach {
    reached: bool,
    down_since: Option<OffsetDateTime>,
}

impl Reachability {
    pub fn new(dependency: Dependency) -> Self {
        Self {
            dependency,
            reach: Arc::default(),
        }
    }

    pub fn dependency(&self) -> Dependency {
        self.dependency
    }

    /// A round's result: `true` as [`Self::reached`], `false` as an outage.
    pub fn set(&self, ok: bool) {
        if ok {
            self.reached();
        } else {
            self.outage(&"the maintenance round (heartbeat, vacuum) failed");
        }
    }

    /// Whether the dependency was reached and is not down now.
    pub fn get(&self) -> bool {
        self.reach
            .lock()
            .map(|r| r.reached && r.down_since.is_none())
            .unwrap_or(false)
    }

    /// Whether an outage is on (false before the first contact).
    pub fn is_down(&self) -> bool {
        self.down_since().is_some()
    }

    /// Since when the dependency has been down, if it is.
    pub fn down_since(&self) -> Option<OffsetDateTime> {
        self.reach.lock().ok().and_then(|r| r.down_since)
    }

    /// Something just reached the dependency: ends an outage (logged once).
    pub fn reached(&self) {
        let Ok(mut reach) = self.reach.lock() else {
            return;
        };
        let was_down = reach.down_since.take();
        let first = !reach.reached;
        reach.reached = true;
        drop(reach);
        let name = self.dependency.as_str();
        if let Some(since) = was_down {
            let seconds = (OffsetDateTime::now_utc() - since).as_seconds_f64();
            tracing::info!(
                target: REACHABILITY_LOG_TARGET,
                dependency = name,
                outage.seconds = (seconds * 10.0).round() / 10.0,
                "{name} is reachable again; workers resume"
            );
        }
        if first || was_down.is_some() {
            ::metrics::gauge!("gatehouse_dependency_up", "dependency" => name).set(1.0);
            ::metrics::gauge!("gatehouse_dependency_down_since_seconds", "dependency" => name)
                .set(0.0);
        }
    }

    /// The dependency is unreachable or answers that it cannot serve: starts an outage
    /// (logged once, with this first error).
    pub fn outage(&self, error: &dyn std::fmt::Display) {
        let Ok(mut reach) = self.reach.lock() else {
            return;
        };
        if reach.down_since.is_some() {
            return;
        }
        let since = OffsetDateTime::now_utc();
        reach.down_since = Some(since);
        drop(reach);
        let name = self.dependency.as_str();
        ::metrics::gauge!("gatehouse_dependency_up", "dependency" => name).set(0.0);
        ::metrics::gauge!("gatehouse_dependency_down_since_seconds", "dependency" => name)
            .set(since.unix_timestamp() as f64);
        tracing::error!(
            target: REACHABILITY_LOG_TARGET,
            dependency = name,
            since = %rfc3339(since),
            %error,
            "{name} is unreachable; workers stop fetching and probe it with backoff until it answers"
        );
    }
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_level_postgres_errors_are_outages() {
        let outage = Fault::Outage(Dependency::Postgres);
        let io = |kind| sqlx::Error::Io(std::io::Error::new(kind, "x"));
        for kind in [
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::ConnectionAborted,
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::TimedOut,
        ] {
            assert_eq!(postgres(&io(kind)), outage, "{kind:?}");
        }
        assert_eq!(
            postgres(&sqlx::Error::Protocol(
                "unexpected response from SSLRequest: 0x00".into()
            )),
            outage
        );
        assert_eq!(postgres(&sqlx::Error::Tls("handshake".into())), outage);
        assert_eq!(postgres(&sqlx::Error::PoolTimedOut), outage);
        assert_eq!(postgres(&sqlx::Error::PoolClosed), outage);
        assert_eq!(postgres(&sqlx::Error::WorkerCrashed), outage);
    }

    #[test]
    fn sqlstates_are_classified_by_class_and_code() {
        let outage = Fault::Outage(Dependency::Postgres);
        for code in [
            "08000", "08003", "08006", "08001", "08004", "57P01", "57P02", "57P03", "53300",
            "53100", "53200", "25006",
        ] {
            assert_eq!(sqlstate(code), outage, "{code}");
        }
        for code in ["40001", "40P01", "55P03"] {
            assert_eq!(sqlstate(code), Fault::Transient, "{code}");
        }
        for code in ["23503", "23502", "23514", "22001", "22P02", "22003"] {
            assert_eq!(sqlstate(code), Fault::Permanent, "{code}");
        }
        for code in ["23505", "42P01", "42703", "57014", "XX000"] {
            assert_eq!(sqlstate(code), Fault::Retry, "{code}");
        }
    }

    #[test]
    fn decoding_and_missing_rows_count_as_attempts() {
        assert_eq!(postgres(&sqlx::Error::RowNotFound), Fault::Retry);
        assert_eq!(
            postgres(&sqlx::Error::ColumnNotFound("x".into())),
            Fault::Retry
        );
        assert!(Fault::Retry.counts() && Fault::Permanent.counts());
        assert!(!Fault::Transient.counts() && !Fault::Outage(Dependency::Llm).counts());
    }
}
