//! Rate limits shared by every ingress process: GCRA in one Lua script on Redis.
//!
//! A limit of `count/period` lets a client spend `count` at once and then one every
//! `period/count`. The state per key is one number (the theoretical arrival time, in
//! microseconds of Redis's own clock, so hosts' clocks do not matter) that expires when it
//! no longer limits anything. A check either *hits* (counts an attempt if allowed) or
//! *peeks* (says whether one more attempt would be allowed, counting nothing) — the
//! per-email login limit peeks before verifying and hits only on a failure.

use redis::Script;
use redis::aio::ConnectionLike;
use std::sync::LazyLock;

use crate::config::Rate;

static GCRA: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("ratelimit.lua")));

/// The outcome of one check, with what the `RateLimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The limit's count.
    pub limit: u32,
    /// Attempts left right now.
    pub remaining: u32,
    /// Seconds until the limit is fully restored.
    pub reset_seconds: u64,
    /// Seconds to wait before an attempt is allowed (0 when allowed; ≥ 1 when not).
    pub retry_after_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("the rate limiter's store (Redis) failed")]
pub struct RateLimitError(#[from] redis::RedisError);

/// Whether a check counts the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Hit,
    Peek,
}

/// The Redis key of limit `name` for `subject` under `namespace`. The subject is hashed-free
/// plain text (an IP, a normalized email, a user id); emails are normalized here.
pub fn key(namespace: &str, name: &str, subject: &str) -> String {
    format!("{namespace}:rl:{name}:{subject}")
}

/// An email as the per-email limit counts it: trimmed and lower-cased, so `A@x.com` and
/// ` a@x.com ` share one limit.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Checks (and with [`Mode::Hit`], counts) one attempt against `rate` on `key`.
pub async fn check<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    rate: Rate,
    mode: Mode,
) -> Result<Decision, RateLimitError> {
    let period_us = u64::try_from(rate.period.as_micros()).unwrap_or(u64::MAX);
    let interval_us = (period_us / u64::from(rate.count.max(1))).max(1);
    let (allowed, remaining, retry_us, reset_us): (i64, i64, i64, i64) = GCRA
        .key(key)
        .arg(period_us)
        .arg(interval_us)
        .arg(match mode {
            Mode::Hit => "hit",
            Mode::Peek => "peek",
        })
        .invoke_async(conn)
        .await?;
    let ceil_seconds =
        |us: i64| -> u64 { (u64::try_from(us.max(0)).unwrap_or(0)).div_ceil(1_000_000) };
    let allowed = allowed == 1;
    Ok(Decision {
        allowed,
        limit: rate.count,
        remaining: u32::try_from(remaining.max(0))
            .unwrap_or(u32::MAX)
            .min(rate.count),
        reset_seconds: ceil_seconds(reset_us),
        retry_after_seconds: if allowed {
            0
        } else {
            ceil_seconds(retry_us).max(1)
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_share_a_key_whatever_their_case_and_surrounding_space() {
        assert_eq!(normalize_email(" A@X.com "), normalize_email("a@x.com"));
        assert_eq!(
            key("ns", "login_email", &normalize_email("A@x.com ")),
            "ns:rl:login_email:a@x.com"
        );
    }
}
