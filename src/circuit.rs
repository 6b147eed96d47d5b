//! Circuit breakers for shared remote endpoints: the LLM (one per process) and each store host
//! (one per host, so one tenant's dead store never pauses another's sync).
//!
//! Closed: requests go through; connection-level failures (refused, reset, closed, no answer
//! in time) are counted, any answer resets the count. After [`Settings::threshold`]
//! consecutive failures the circuit opens: nothing is sent for the open period (exponential
//! from [`Settings::open_base`], capped at [`Settings::open_cap`]), and jobs that need the
//! endpoint are rescheduled without using an attempt (`crate::fault::Fault::Outage`). When the
//! period ends, exactly one request is let through as the probe (half-open): an answer
//! closes the circuit, a failure opens it again for a longer period. A probe that never
//! reports (its job was cancelled) is forgotten after [`Settings::probe_timeout`].
//!
//! Answers from a reachable endpoint (an LLM 500, a store 503 for this request) close the
//! circuit like any answer: they count as the job's attempts, as before, not as an outage.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a circuit opens and probes.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Consecutive connection-level failures that open the circuit.
    pub threshold: u32,
    /// The first open period; each failed probe doubles it.
    pub open_base: Duration,
    /// The longest open period.
    pub open_cap: Duration,
    /// How long a probe may take before another request may probe instead.
    pub probe_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            threshold: 5,
            open_base: Duration::from_secs(2),
            open_cap: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(120),
        }
    }
}

/// Whether a request may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The circuit is closed.
    Go,
    /// The circuit is half-open and this request is its one probe.
    Probe,
    /// The circuit is open: try again after this long.
    Wait(Duration),
}

impl Admit {
    pub fn allowed(self) -> bool {
        !matches!(self, Self::Wait(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_since: Instant },
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Times opened in a row without a success (sets the open period).
    opened: u32,
    /// When the current outage began (the first open).
    since: Option<time::OffsetDateTime>,
}

/// One endpoint's breaker.
#[derive(Debug)]
pub struct Circuit {
    settings: Settings,
    state: Mutex<State>,
}

impl Circuit {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            state: Mutex::new(State {
                phase: Phase::Closed { failures: 0 },
                opened: 0,
                since: None,
            }),
        }
    }

    /// Asks to send a request now.
    pub fn admit(&self) -> Admit {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Admit {
        let Ok(mut state) = self.state.lock() else {
            return Admit::Go;
        };
        match state.phase {
            Phase::Closed { .. } => Admit::Go,
            Phase::Open { until } if now < until => Admit::Wait(until - now),
            Phase::HalfOpen { probe_since }
                if now.duration_since(probe_since) < self.settings.probe_timeout =>
            {
                Admit::Wait(self.settings.open_base)
            }
            Phase::Open { .. } | Phase::HalfOpen { .. } => {
                state.phase = Phase::HalfOpen { probe_since: now };
                Admit::Probe
            }
        }
    }

    /// The endpoint answered (whatever it answered). Returns whether this closed the circuit.
    pub fn success(&self) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        let was_open = !matches!(state.phase, Phase::Closed { .. });
        state.phase = Phase::Closed { failures: 0 };
        state.opened = 0;
        state.since = None;
        was_open
    }

    /// A connection-level failure. Returns whether this opened the circuit (from closed, or
    /// again after a failed probe).
    pub fn failure(&self) -> bool {
        self.failure_at(Instant::now())
    }

    fn failure_at(&self, now: Instant) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        let open = match state.phase {
            Phase::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= self.settings.threshold.max(1) {
                    true
                } else {
                    state.phase = Phase::Closed { failures };
                    false
                }
            }
            Phase::HalfOpen { .. } => true,
            // Requests admitted before it opened, failing late: already open.
            Phase::Open { .. } => false,
        };
        if open {
            let period = self
                .settings
                .open_base
                .saturating_mul(1u32 << state.opened.min(16))
                .min(self.settings.open_cap);
            state.opened = state.opened.saturating_add(1);
            state.phase = Phase::Open {
                until: now + period,
            };
            state
                .since
                .get_or_insert_with(time::OffsetDateTime::now_utc);
        }
        open
    }

    /// How long until the circuit lets a probe through: `None` while it is closed.
    pub fn retry_after(&self) -> Option<Duration> {
        let state = self.state.lock().ok()?;
        match state.phase {
            Phase::Closed { .. } => None,
            Phase::Open { until } => Some(until.saturating_duration_since(Instant::now())),
            Phase::HalfOpen { .. } => Some(self.settings.open_base),
        }
    }

    /// Whether the circuit is open or half-open, and since when.
    pub fn open_since(&self) -> Option<time::OffsetDateTime> {
        let state = self.state.lock().ok()?;
        match state.phase {
            Phase::Closed { .. } => None,
            _ => state.since,
        }
    }
}

/// Circuits keyed by host, created on first use. Only circuits that are not closed are worth
/// keeping: past [`Self::MAX_KEPT`] hosts, closed circuits are forgotten (a host the size of a
/// tenant list never grows the map without bound).
#[derive(Debug, Clone)]
pub struct Circuits {
    settings: Settings,
    by_host: Arc<Mutex<HashMap<String, Arc<Circuit>>>>,
}

impl Circuits {
    pub const MAX_KEPT: usize = 10_000;

    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            by_host: Arc::default(),
        }
    }

    /// The circuit of `host` (lower-cased; with its port when not the default).
    pub fn get(&self, host: &str) -> Arc<Circuit> {
        let Ok(mut map) = self.by_host.lock() else {
            return Arc::new(Circuit::new(self.settings));
        };
        let host = host.to_ascii_lowercase();
        if let Some(circuit) = map.get(&host) {
            return circuit.clone();
        }
        if map.len() >= Self::MAX_KEPT {
            map.retain(|_, c| c.open_since().is_some() || Arc::strong_count(c) > 1);
        }
        let circuit = Arc::new(Circuit::new(self.settings));
        map.insert(host, circuit.clone());
        circuit
    }

    /// How many hosts' circuits are open (or half-open), and since when the oldest is.
    pub fn open(&self) -> (usize, Option<time::OffsetDateTime>) {
        let Ok(map) = self.by_host.lock() else {
            return (0, None);
        };
        let mut count = 0;
        let mut oldest: Option<time::OffsetDateTime> = None;
        for since in map.values().filter_map(|c| c.open_since()) {
            count += 1;
            oldest = Some(oldest.map_or(since, |o| o.min(since)));
        }
        (count, oldest)
    }
}

impl Default for Circuits {
    fn default() -> Self {
        Self::new(Settings::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            threshold: 3,
            open_base: Duration::from_secs(2),
            open_cap: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn repeated_failures_open_it_and_one_probe_tests_it() {
        let circuit = Circuit::new(settings());
        let t0 = Instant::now();
        assert_eq!(circuit.admit_at(t0), Admit::Go);
        assert!(!circuit.failure_at(t0));
        assert!(!circuit.failure_at(t0));
        assert!(
            circuit.failure_at(t0),
            "the third failure in a row opens it"
        );
        assert!(circuit.open_since().is_some());
        assert_eq!(circuit.admit_at(t0), Admit::Wait(Duration::from_secs(2)));
        let later = t0 + Duration::from_secs(2);
        assert_eq!(circuit.admit_at(later), Admit::Probe, "one probe");
        assert!(
            matches!(circuit.admit_at(later), Admit::Wait(_)),
            "and only one"
        );
        // The probe fails: open again, for twice as long (capped).
        assert!(circuit.failure_at(later));
        assert_eq!(circuit.admit_at(later), Admit::Wait(Duration::from_secs(4)));
        let t2 = later + Duration::from_secs(4);
        assert_eq!(circuit.admit_at(t2), Admit::Probe);
        assert!(circuit.failure_at(t2));
        assert_eq!(
            circuit.admit_at(t2),
            Admit::Wait(Duration::from_secs(5)),
            "capped"
        );
        let t3 = t2 + Duration::from_secs(5);
        assert_eq!(circuit.admit_at(t3), Admit::Probe);
        assert!(circuit.success(), "an answer closes it");
        assert_eq!(circuit.admit_at(t3), Admit::Go);
        assert!(circuit.open_since().is_none());
    }

    #[test]
    fn an_answer_resets_the_count_and_a_lost_probe_is_replaced() {
        let circuit = Circuit::new(settings());
        let t0 = Instant::now();
        circuit.failure_at(t0);
        circuit.failure_at(t0);
        assert!(!circuit.success(), "it was closed");
        assert!(!circuit.failure_at(t0), "the count started again");
        circuit.failure_at(t0);
        assert!(circuit.failure_at(t0));
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(circuit.admit_at(t1), Admit::Probe);
        let t2 = t1 + Duration::from_secs(31);
        assert_eq!(
            circuit.admit_at(t2),
            Admit::Probe,
            "the probe never reported"
        );
    }

    #[test]
    fn each_host_has_its_own_circuit() {
        let circuits = Circuits::new(settings());
        let a = circuits.get("a.example");
        for _ in 0..3 {
            a.failure();
        }
        assert!(!circuits.get("a.example").admit().allowed());
        assert!(circuits.get("b.example").admit().allowed());
        assert_eq!(circuits.open().0, 1);
        assert!(
            Arc::ptr_eq(&a, &circuits.get("A.EXAMPLE")),
            "hosts are case-blind"
        );
    }
}
