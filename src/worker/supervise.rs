//! Supervision of a process's apalis workers: a worker that stops is restarted under a new
//! name, never a silent clean exit. A Redis outage ([`redis_outage`]) restarts it after a
//! capped, jittered [`Backoff`] and a probe, without ever giving up; any other failure (a bug,
//! a script error) restarts it at once and spends the [`RestartBudget`], past which the
//! process exits non-zero for its own supervisor.

use std::time::Duration;

use apalis_core::error::WorkerError as ApalisWorkerError;

use super::{SharedRedis, backend, outage};

/// The Redis error inside a worker's failure, if the failure is a Redis outage: anything on
/// the way to a usable answer — connect, I/O (refused, reset, closed, timed out), protocol
/// garbage — or a server that says it cannot serve now (`LOADING`, `BUSY`, `TRYAGAIN`,
/// `READONLY`, `MASTERDOWN`, `CLUSTERDOWN`). Classified by where it happens (the error's kind
/// and the server's error code), never by its text. Anything else (a script error, "worker
/// not registered", a panic) is not an outage.
pub fn redis_outage<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a redis::RedisError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(redis) = e.downcast_ref::<redis::RedisError>() {
            let outage = matches!(crate::fault::redis(redis), crate::fault::Fault::Outage(_));
            return outage.then_some(redis);
        }
        current = e.source();
    }
    None
}

/// Whether a worker's failure is a Redis outage (see [`redis_outage`]).
pub(super) fn failure_is_outage(error: &ApalisWorkerError) -> Option<&redis::RedisError> {
    /// What apalis wraps a durable backend's errors in (it gives no `source()`).
    type Durable =
        apalis_core::backend::finalize::DurableError<backend::BackendError, serde_json::Error>;
    match error {
        ApalisWorkerError::BackendError(inner) => match inner.downcast_ref::<Durable>() {
            Some(Durable::PollNextError(backend)) => redis_outage(backend),
            Some(_) => None,
            None => redis_outage(inner.as_ref()),
        },
        other => redis_outage(other),
    }
}

/// Restarts allowed within a sliding window, for failures that are not outages (a bug, a
/// script error): past it the process exits non-zero, for its supervisor to restart, instead
/// of spinning or stopping silently. Outages never count here (see [`Supervisor`]).
#[derive(Debug, Default)]
pub(super) struct RestartBudget {
    recent: std::collections::VecDeque<std::time::Instant>,
}

impl RestartBudget {
    const WINDOW: Duration = Duration::from_secs(60);
    const MAX_IN_WINDOW: usize = 60;

    fn allow(&mut self) -> bool {
        let now = std::time::Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > Self::WINDOW)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= Self::MAX_IN_WINDOW {
            return false;
        }
        self.recent.push_back(now);
        true
    }
}

/// The backoff between restarts of one queue's worker during an outage: exponential from
/// [`Self::BASE`] with equal jitter (half fixed, half random), capped at [`Self::CAP`] so the
/// drain resumes within seconds of the dependency's return, and forgotten after
/// [`Self::HEALTHY`] without a failure.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    failures: u32,
    last: Option<std::time::Instant>,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(100);
    pub(super) const CAP: Duration = Duration::from_secs(5);
    const HEALTHY: Duration = Duration::from_secs(30);

    /// Records a failure at `now`; returns the delay before the next start. `jitter` in [0, 1).
    fn next(&mut self, now: std::time::Instant, jitter: f64) -> Duration {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) > Self::HEALTHY)
        {
            self.failures = 0;
        }
        self.last = Some(now);
        let exp = Self::BASE.saturating_mul(1u32 << self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        let ceiling = exp.min(Self::CAP);
        ceiling / 2 + ceiling.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }
}

/// The restart policy of a process's workers: a failure that is a Redis outage is restarted
/// after a backoff (per queue), the restarted worker first probing Redis, and never exhausts
/// anything (the outage is logged and shown on `/healthz` once); any other failure is
/// restarted at once and spends the [`RestartBudget`].
#[derive(Debug, Default)]
pub(super) struct Supervisor {
    budget: RestartBudget,
    /// Per queue worker ("{base}-{queue}"): its backoff, the delay its next start waits, and
    /// the generation of the shared Redis connection its current instance was built with.
    queues: std::collections::HashMap<String, (Backoff, Duration, u64)>,
}

/// A worker's name without its restart suffix ("{base}-{queue}").
fn queue_key(name: &str) -> &str {
    name.rsplit_once("-r").map_or(name, |(key, _)| key)
}

impl Supervisor {
    /// Whether to restart after `error`; records the delay the restarted worker waits.
    /// `generation`: the shared connection's current generation ([`SharedRedis`]).
    pub(super) fn on_failure(
        &mut self,
        name: &str,
        error: &ApalisWorkerError,
        redis: &outage::Reachability,
        generation: u64,
    ) -> bool {
        let outage = failure_is_outage(error);
        let (backoff, delay, built) = self.queues.entry(queue_key(name).to_owned()).or_default();
        match outage {
            // A worker whose command failed on a connection that was renewed since it was built
            // (by this very failure — workers share the renewing connection — or another's):
            // the error is that stuck connection's, not news about Redis. Restart at once; the
            // new instance's commands use the new connection. A failure on the current one
            // backs off (next arm), and renewals are at most one a second, so a fault that
            // lasts settles into the backoff.
            Some(cause) if !cause.is_io_error() && *built < generation => {
                *delay = Duration::ZERO;
                tracing::debug!(worker.name = name, %error, "worker stopped on a renewed redis connection; restarting on the new one");
                true
            }
            Some(cause) => {
                *delay = backoff.next(std::time::Instant::now(), rand::random::<f64>());
                redis.outage(cause);
                tracing::debug!(worker.name = name, %error, delay_ms = delay.as_millis() as u64, "worker stopped by a redis outage; probing again after the delay");
                true
            }
            None => {
                *delay = Duration::ZERO;
                let allowed = self.budget.allow();
                if allowed {
                    tracing::error!(worker.name = name, %error, "worker failed, restarting");
                } else {
                    tracing::error!(worker.name = name, %error, "worker keeps failing, giving up");
                }
                allowed
            }
        }
    }

    /// The delay the next start of a queue's worker waits (taken: a later start without a
    /// failure waits nothing); records the connection generation it is built with.
    pub(super) fn take_delay(&mut self, key: &str, generation: u64) -> Duration {
        let (_, delay, built) = self.queues.entry(key.to_owned()).or_default();
        *built = generation;
        std::mem::take(delay)
    }
}

/// Before a restarted worker registers: waits its backoff, then probes Redis (PING). A failed
/// probe fails the start, which the supervisor counts as the outage's next failure; a
/// successful one ends the outage.
pub(super) async fn probe_redis(
    delay: Duration,
    redis: SharedRedis,
    health: outage::Reachability,
) -> Result<(), backend::BackendError> {
    if delay.is_zero() {
        return Ok(());
    }
    tokio::time::sleep(delay).await;
    let mut conn = redis.get();
    match redis::cmd("PING").query_async::<String>(&mut conn).await {
        Ok(_) => {
            health.reached();
            Ok(())
        }
        Err(error) => {
            if !error.is_io_error() {
                redis.renew();
            }
            Err(error.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restart_budget_refuses_a_burst_and_counts_only_the_window() {
        let mut budget = RestartBudget::default();
        for _ in 0..RestartBudget::MAX_IN_WINDOW {
            assert!(budget.allow());
        }
        assert!(!budget.allow(), "a burst past the budget is refused");
        // Restarts older than the window no longer count.
        let old = std::time::Instant::now() - RestartBudget::WINDOW - Duration::from_secs(1);
        budget.recent.iter_mut().for_each(|t| *t = old);
        assert!(budget.allow());
    }

    /// The error a Redis reply `-{line}` becomes.
    fn server_error(line: &str) -> redis::RedisError {
        let reply = format!("-{line}\r\n");
        redis::parse_redis_value(reply.as_bytes())
            .and_then(redis::Value::extract_error)
            .expect_err("an error reply")
    }

    /// A worker's failure as apalis reports it: the backend's error inside `DurableError`.
    fn failed(error: redis::RedisError) -> ApalisWorkerError {
        ApalisWorkerError::BackendError(Box::new(apalis_core::backend::finalize::DurableError::<
            _,
            serde_json::Error,
        >::PollNextError(
            backend::BackendError::Redis(error)
        )))
    }

    #[test]
    fn redis_errors_on_the_way_to_an_answer_or_servers_that_cannot_serve_are_outages() {
        let io = |kind| redis::RedisError::from(std::io::Error::from(kind));
        let garbage = redis::parse_redis_value(b"\x01\x02garbage\r\n").expect_err("garbage");
        for error in [
            io(std::io::ErrorKind::ConnectionRefused),
            io(std::io::ErrorKind::ConnectionReset),
            io(std::io::ErrorKind::UnexpectedEof),
            io(std::io::ErrorKind::TimedOut),
            io(std::io::ErrorKind::BrokenPipe),
            garbage,
            server_error("LOADING Redis is loading the dataset in memory"),
            server_error(
                "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
            ),
            server_error("TRYAGAIN Multiple keys request during rehashing of slot"),
            server_error("READONLY You can't write against a read only replica."),
            server_error(
                "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            ),
            server_error("CLUSTERDOWN The cluster is down"),
            server_error("MOVED 3999 127.0.0.1:6381"),
            server_error("ASK 3999 127.0.0.1:6381"),
            redis::RedisError::from((
                redis::ErrorKind::ClusterConnectionNotFound,
                "No connections found",
            )),
        ] {
            let text = error.to_string();
            assert!(failure_is_outage(&failed(error)).is_some(), "{text}");
        }
    }

    #[test]
    fn script_errors_and_panics_are_worker_failures_not_outages() {
        for error in [
            server_error("gatehouse: worker w-r0 is not registered (declared dead?)"),
            server_error("ERR Error running script"),
            server_error("NOSCRIPT No matching script"),
            server_error("WRONGTYPE Operation against a key holding the wrong kind of value"),
            server_error("CROSSSLOT Keys in request don't hash to the same slot"),
        ] {
            let text = error.to_string();
            assert!(failure_is_outage(&failed(error)).is_none(), "{text}");
        }
        assert!(failure_is_outage(&ApalisWorkerError::PanicError("boom".into())).is_none());
        assert!(
            failure_is_outage(&ApalisWorkerError::BackendError(Box::new(
                backend::BackendError::Unsupported
            )))
            .is_none()
        );
    }

    #[test]
    fn restart_delays_grow_with_jitter_up_to_the_cap_and_reset_after_a_healthy_period() {
        let mut backoff = Backoff::default();
        let start = std::time::Instant::now();
        let low: Vec<Duration> = (0..12).map(|_| backoff.next(start, 0.0)).collect();
        assert_eq!(low[0], Backoff::BASE / 2);
        assert_eq!(low[1], Backoff::BASE);
        assert!(
            low.windows(2).all(|w| w[0] <= w[1]),
            "never shrinks: {low:?}"
        );
        assert_eq!(*low.last().expect("delays"), Backoff::CAP / 2);
        assert_eq!(
            backoff.next(start, 0.999_999).max(Backoff::CAP),
            Backoff::CAP
        );
        assert!(backoff.next(start, 0.999_999) > Backoff::CAP * 9 / 10);
        // A failure long after the last one starts from the base again.
        let later = start + Backoff::HEALTHY + Duration::from_secs(1);
        assert_eq!(backoff.next(later, 0.0), Backoff::BASE / 2);
    }

    #[test]
    fn a_redis_outage_never_exhausts_the_restarts_but_other_failures_do() {
        let mut supervisor = Supervisor::default();
        let health = outage::Reachability::new(crate::fault::Dependency::Redis);
        let refused = || {
            failed(redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )))
        };
        for restart in 0..1000 {
            let name = format!("host-1-ab-inbound_message-r{restart}");
            assert!(supervisor.on_failure(&name, &refused(), &health, 0));
            assert!(
                !supervisor
                    .take_delay("host-1-ab-inbound_message", 0)
                    .is_zero()
            );
        }
        assert!(health.down_since().is_some(), "the outage shows");
        assert!(!health.get());
        health.reached();
        assert!(health.down_since().is_none() && health.get());

        let bug = || ApalisWorkerError::PanicError("bug".into());
        for restart in 0..RestartBudget::MAX_IN_WINDOW {
            let name = format!("host-1-ab-sync_catalog-r{restart}");
            assert!(supervisor.on_failure(&name, &bug(), &health, 0));
            assert!(supervisor.take_delay("host-1-ab-sync_catalog", 0).is_zero());
        }
        assert!(
            !supervisor.on_failure("host-1-ab-sync_catalog-r99", &bug(), &health, 0),
            "a worker failing for another reason still gives up past the budget"
        );
        assert!(health.get(), "and that is no redis outage");
    }

    #[test]
    fn a_worker_failing_on_a_connection_renewed_since_restarts_at_once_without_an_outage() {
        let mut supervisor = Supervisor::default();
        let health = outage::Reachability::new(crate::fault::Dependency::Redis);
        health.reached();
        let garbled =
            || failed(redis::parse_redis_value(b"\x01\x02garbage\r\n").expect_err("garbage"));
        assert!(supervisor.take_delay("h-1-ab-inbound_message", 0).is_zero());
        // Built on generation 0; the connection is now at generation 1.
        assert!(supervisor.on_failure("h-1-ab-inbound_message-r0", &garbled(), &health, 1));
        assert!(supervisor.take_delay("h-1-ab-inbound_message", 1).is_zero());
        assert!(health.get(), "no outage from a stale connection");
        // Built on the current connection: the same error is an outage.
        assert!(supervisor.on_failure("h-1-ab-inbound_message-r1", &garbled(), &health, 1));
        assert!(!supervisor.take_delay("h-1-ab-inbound_message", 1).is_zero());
        assert!(!health.get());
    }

    #[test]
    fn the_queue_key_is_the_worker_name_without_its_restart_suffix() {
        assert_eq!(
            queue_key("h-12-0af3-inbound_message-r0"),
            "h-12-0af3-inbound_message"
        );
        assert_eq!(
            queue_key("my-r-host-1-ab-rotate_keys-r17"),
            "my-r-host-1-ab-rotate_keys"
        );
    }
}
