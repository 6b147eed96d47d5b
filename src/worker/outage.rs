//! What a worker process knows about its dependencies' outages, shared by its job handlers,
//! its queue backends, its probes and its health port.
//!
//! - [`Reachability`] of PostgreSQL and of Redis: down from the first failure that is an outage
//!   until the next success, logged once at each end, on `/healthz` (`outages`) and the
//!   `gatehouse_dependency_up{dependency}` gauge. While PostgreSQL is down the backends fetch
//!   nothing and handlers give back at once what was already fetched; a probe
//!   ([`watch_postgres`]) ends the outage.
//! - The circuits of the LLM and of each store host (`crate::circuit`).
//! - [`Deferrals`]: the jobs whose attempt failed for an outage or a transient fault; their
//!   acknowledgement reschedules them without counting the attempt (for at most
//!   `OUTAGE_MAX_WAIT_SECONDS` of waiting, see `lua/ack.lua`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;

use crate::circuit::{Circuit, Circuits};
use crate::fault::{Dependency, Fault, rfc3339};

/// Lives in `crate::fault` (the retention round, in the core, notes PostgreSQL outages on it).
pub use crate::fault::Reachability;

/// Job ids whose current attempt failed for an outage or a transient fault, with the delay
/// before they run again: a handler records one just before returning its error, the
/// backend's acknowledgement takes it (and reschedules the job without counting the attempt).
#[derive(Debug, Clone, Default)]
pub struct Deferrals(Arc<Mutex<HashMap<String, Duration>>>);

impl Deferrals {
    pub fn defer(&self, job_id: &str, delay: Duration) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(job_id.to_owned(), delay);
        }
    }

    /// The deferral of `job_id`'s attempt, removing it.
    pub fn take(&self, job_id: &str) -> Option<Duration> {
        self.0.lock().ok().and_then(|mut map| map.remove(job_id))
    }
}

/// Everything a worker process knows about its dependencies (see the module docs).
#[derive(Debug, Clone)]
pub struct Outages {
    pub postgres: Reachability,
    pub redis: Reachability,
    pub llm: Arc<Circuit>,
    pub stores: Circuits,
    pub deferrals: Deferrals,
    /// `OUTAGE_MAX_WAIT_SECONDS`: how long a job may wait out outages before its attempts
    /// count again.
    pub max_wait: Duration,
}

impl Outages {
    pub fn new(max_wait: Duration) -> Self {
        Self {
            postgres: Reachability::new(Dependency::Postgres),
            redis: Reachability::new(Dependency::Redis),
            llm: Arc::new(Circuit::new(crate::circuit::Settings::default())),
            stores: Circuits::default(),
            deferrals: Deferrals::default(),
            max_wait,
        }
    }

    /// Whether this process should fetch nothing (PostgreSQL is down: every job needs it).
    pub fn paused(&self) -> bool {
        self.postgres.is_down()
    }

    /// How long a job deferred for `fault` waits before it runs again; `jitter` in [0, 1)
    /// spreads a backlog's deferrals.
    pub fn delay(&self, fault: Fault, jitter: f64) -> Duration {
        let jitter = jitter.clamp(0.0, 1.0);
        let (base, spread) = match fault {
            // The worker stops fetching until the probe says PostgreSQL is back; the job is
            // due soon after, so the drain starts within seconds of the return.
            Fault::Outage(Dependency::Postgres | Dependency::Redis) => {
                (Duration::from_millis(500), Duration::from_millis(1500))
            }
            Fault::Outage(Dependency::Llm) => {
                let wait = self.llm.retry_after().unwrap_or(Duration::from_secs(1));
                (wait, wait.max(Duration::from_secs(1)))
            }
            Fault::Outage(Dependency::Store) => (Duration::from_secs(2), Duration::from_secs(8)),
            Fault::Transient => (Duration::from_millis(50), Duration::from_millis(950)),
            Fault::Retry | Fault::Permanent => (Duration::ZERO, Duration::ZERO),
        };
        base + spread.mul_f64(jitter)
    }

    /// `/healthz`'s `outages`: each dependency that is down or whose circuit is open, since when.
    pub fn report(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for reach in [&self.redis, &self.postgres] {
            if let Some(since) = reach.down_since() {
                out.push(serde_json::json!({
                    "dependency": reach.dependency().as_str(),
                    "since": rfc3339(since),
                }));
            }
        }
        if let Some(since) = self.llm.open_since() {
            out.push(serde_json::json!({
                "dependency": Dependency::Llm.as_str(),
                "since": rfc3339(since),
                "circuit": "open",
            }));
        }
        let (stores, oldest) = self.stores.open();
        if let Some(since) = oldest {
            out.push(serde_json::json!({
                "dependency": Dependency::Store.as_str(),
                "since": rfc3339(since),
                "circuit": "open",
                "hosts": stores,
            }));
        }
        out
    }

    /// Sets the circuit gauges (`gatehouse_circuits_open{dependency}`), for a scrape.
    pub fn export_circuits(&self) {
        let llm = if self.llm.open_since().is_some() {
            1.0
        } else {
            0.0
        };
        ::metrics::gauge!("gatehouse_circuits_open", "dependency" => Dependency::Llm.as_str())
            .set(llm);
        ::metrics::gauge!("gatehouse_circuits_open", "dependency" => Dependency::Store.as_str())
            .set(self.stores.open().0 as f64);
    }
}

impl Default for Outages {
    fn default() -> Self {
        Self::new(Duration::from_secs(86_400))
    }
}

/// How often an idle probe looks whether PostgreSQL was declared down, and the first and the
/// longest wait between two probes during an outage (short: the drain resumes within
/// seconds of PostgreSQL's return, never after a backoff that grew during the outage).
const PROBE_IDLE: Duration = Duration::from_millis(200);
const PROBE_FIRST: Duration = Duration::from_millis(250);
const PROBE_CAP: Duration = Duration::from_secs(2);
/// A probe that takes longer than this failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes PostgreSQL (`SELECT 1` through the workers' pool) once at start and then whenever it
/// is down, with backoff, ending the outage when it answers. Runs until aborted.
pub async fn watch_postgres(pool: PgPool, health: Reachability) {
    let probe = || async {
        match tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&pool)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        }
    };
    match probe().await {
        Ok(()) => health.reached(),
        Err(error) => health.outage(&error),
    }
    let mut wait = PROBE_FIRST;
    loop {
        if !health.is_down() {
            wait = PROBE_FIRST;
            tokio::time::sleep(PROBE_IDLE).await;
            continue;
        }
        tokio::time::sleep(wait).await;
        match probe().await {
            Ok(()) => health.reached(),
            Err(error) => {
                tracing::debug!(%error, "postgres probe failed");
                wait = (wait * 2).min(PROBE_CAP);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_keeps_its_first_start_until_it_is_reached_again() {
        let health = Reachability::new(Dependency::Redis);
        assert!(!health.get(), "not healthy before it was ever reached");
        assert!(!health.is_down(), "nor down");
        health.reached();
        assert!(health.get() && health.down_since().is_none());
        health.outage(&"connection refused");
        let since = health.down_since().expect("down");
        health.outage(&"connection refused again");
        health.set(false);
        assert_eq!(health.down_since(), Some(since), "one outage, one start");
        assert!(!health.get() && health.is_down());
        health.set(true);
        assert!(health.get() && health.down_since().is_none());
    }

    #[test]
    fn a_deferral_is_taken_once() {
        let deferrals = Deferrals::default();
        deferrals.defer("a", Duration::from_secs(1));
        assert_eq!(deferrals.take("a"), Some(Duration::from_secs(1)));
        assert_eq!(deferrals.take("a"), None);
        assert_eq!(deferrals.take("b"), None);
    }

    #[test]
    fn delays_are_short_for_the_databases_and_follow_the_llm_circuit() {
        let outages = Outages::default();
        let pg = outages.delay(Fault::Outage(Dependency::Postgres), 0.999);
        assert!(pg <= Duration::from_secs(2), "{pg:?}");
        assert!(outages.delay(Fault::Transient, 0.0) >= Duration::from_millis(50));
        for _ in 0..5 {
            outages.llm.failure();
        }
        let llm = outages.delay(Fault::Outage(Dependency::Llm), 0.0);
        assert!(
            llm > Duration::from_secs(1) && llm <= Duration::from_secs(2),
            "{llm:?}"
        );
        assert_eq!(outages.report().len(), 1, "{:?}", outages.report());
    }
}
