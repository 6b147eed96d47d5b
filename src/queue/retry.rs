//! Retry delays: exponential backoff with full jitter (AWS architecture blog, "Exponential
//! Backoff And Jitter"): retry `n` waits a uniform random time in `0..=min(cap, base·2^(n-1))`.
//! The delay is a score in Redis's `scheduled` set, never a sleep in a worker slot. Each
//! queue's policy is read from its variables (`config`); the defaults are its row in
//! [`super::table`].

use std::time::Duration;

use crate::config::RetryPolicy;

/// The upper bound of the wait after failed attempt `attempt` (1-based).
pub fn backoff_ceiling(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(40);
    let ceiling = policy.base.saturating_mul(1u32 << exponent.min(31));
    let ceiling = if exponent > 31 { policy.cap } else { ceiling };
    ceiling.min(policy.cap)
}

/// The wait after failed attempt `attempt`, for a uniform `unit` in `[0, 1)`.
pub fn backoff_delay(policy: &RetryPolicy, attempt: u32, unit: f64) -> Duration {
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    backoff_ceiling(policy, attempt).mul_f64(unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(base_ms: u64, cap_ms: u64) -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(base_ms),
            cap: Duration::from_millis(cap_ms),
            max_attempts: 4,
        }
    }

    #[test]
    fn the_ceiling_doubles_per_attempt_up_to_the_cap() {
        let p = policy(60_000, 3_600_000);
        let ceilings: Vec<u64> = (1..=8).map(|n| backoff_ceiling(&p, n).as_secs()).collect();
        assert_eq!(ceilings, vec![60, 120, 240, 480, 960, 1920, 3600, 3600]);
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let p = policy(1000, 10_000);
        assert_eq!(backoff_delay(&p, 3, 0.0), Duration::ZERO);
        assert_eq!(backoff_delay(&p, 3, 0.5), Duration::from_secs(2));
        assert_eq!(backoff_delay(&p, 3, f64::NAN), Duration::ZERO);
    }

    proptest! {
        #[test]
        fn a_delay_never_exceeds_the_cap_or_its_ceiling(
            base in 1u64..100_000_000,
            extra in 0u64..1_000_000_000,
            attempt in 0u32..1000,
            unit in 0.0f64..1.0,
        ) {
            let p = policy(base, base + extra);
            let d = backoff_delay(&p, attempt, unit);
            prop_assert!(d <= p.cap);
            prop_assert!(d <= backoff_ceiling(&p, attempt));
            prop_assert!(backoff_ceiling(&p, attempt) >= p.base.min(p.cap));
        }
    }
}
