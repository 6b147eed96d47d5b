//! Rate limits shared by every ingress process: GCRA in one Lua script on Redis.
//!
//! A limit of `count/period` lets a client spend `count` at once and then one every
//! `period/count`. The state per key is one number (the theoretical arrival time, in
//! microseconds of Redis's own clock, so hosts' clocks do not matter) that expires when it
//! no longer limits anything. A check either *hits* (counts an attempt if allowed) or
//! *peeks* (says whether one more attempt would be allowed, counting nothing); a *refund*
//! gives one hit back (the per-email login limit reserves an attempt before the password
//! check and refunds it on success, so concurrent guesses cannot overrun it).
//!
//! Subjects: every per-IP limit keys an address through [`ip_subject`] (IPv6 by its /64,
//! IPv4-mapped IPv6 as IPv4); the per-email limit through [`email_subject`]. [`reset`] lifts
//! a lockout (`gatehouse limits reset`).

use redis::Script;
use redis::aio::ConnectionLike;
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::sync::LazyLock;

use crate::config::Rate;

static GCRA: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("ratelimit.lua")));
static REFUND: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("ratelimit_refund.lua")));

/// The limits' names, as they appear in keys, metrics and events.
pub mod names {
    /// Every register, login and token attempt, per client IP (`RATE_LIMIT_LOGIN_IP`).
    pub const AUTH_IP: &str = "auth_ip";
    /// Refused unauthenticated requests, per client IP (`RATE_LIMIT_UNAUTHENTICATED_IP`).
    pub const UNAUTHENTICATED_IP: &str = "unauthenticated_ip";
    /// Failed logins per email (`RATE_LIMIT_LOGIN_EMAIL`).
    pub const FAILED_LOGIN: &str = "failed_login";
    /// Authenticated writes per user or service account (`RATE_LIMIT_USER`).
    pub const USER: &str = "user";
    /// Every limit keyed by a client address.
    pub const PER_IP: [&str; 2] = [AUTH_IP, UNAUTHENTICATED_IP];
}

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

/// The subject of a per-IP limit: [`client_key`] (IPv4 as is, IPv6 by its /64).
pub use crate::security::net::client_key as ip_subject;

/// The subject of the per-email limit: the normalized email when it has an email's shape;
/// otherwise (a password typed into the email box, say) a digest of it, so the value never
/// rests in a Redis key name.
pub fn email_subject(email: &str) -> String {
    let email = normalize_email(email);
    if crate::accounts::looks_like_email(&email) {
        email
    } else {
        format!("sha256:{}", hex::encode(Sha256::digest(email.as_bytes())))
    }
}

fn interval_us(rate: Rate) -> (u64, u64) {
    let period_us = u64::try_from(rate.period.as_micros()).unwrap_or(u64::MAX);
    let interval_us = (period_us / u64::from(rate.count.max(1))).max(1);
    (period_us, interval_us)
}

/// Gives back one attempt previously counted on `key` (never restoring more than the limit's
/// burst). Returns whether anything was given back.
pub async fn refund<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    rate: Rate,
) -> Result<bool, RateLimitError> {
    let (_, interval_us) = interval_us(rate);
    let given: i64 = REFUND.key(key).arg(interval_us).invoke_async(conn).await?;
    Ok(given == 1)
}

/// Whose lockout `gatehouse limits reset` lifts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetTarget {
    Email(String),
    Ip(IpAddr),
    ClientId(String),
}

/// One limit key a reset looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetKey {
    /// The limit's name (see [`names`]), or `failed_login (legacy client id)`.
    pub limit: &'static str,
    /// The subject within the limit.
    pub subject: String,
    /// Whether a key existed and was deleted.
    pub removed: bool,
}

/// The keys (limit name, subject) a reset of `target` deletes.
pub fn reset_keys(target: &ResetTarget) -> Vec<(&'static str, String)> {
    match target {
        ResetTarget::Email(email) => vec![(names::FAILED_LOGIN, email_subject(email))],
        ResetTarget::Ip(ip) => {
            let mut keys: Vec<(&'static str, String)> = names::PER_IP
                .iter()
                .map(|name| (*name, ip_subject(*ip)))
                .collect();
            // Keys written before IPv6 was keyed by its /64 (they expire within the period).
            if ip_subject(*ip) != ip.to_string() {
                keys.push((names::AUTH_IP, ip.to_string()));
            }
            keys
        }
        // Token requests are limited per IP only; a per-client-id key can only be one left
        // from before that change (it expires within RATE_LIMIT_LOGIN_EMAIL's period).
        ResetTarget::ClientId(id) => vec![(names::FAILED_LOGIN, format!("client:{id}"))],
    }
}

/// Deletes the limit keys of `target` under `namespace`; says which existed.
pub async fn reset<C: ConnectionLike + Send>(
    conn: &mut C,
    namespace: &str,
    target: &ResetTarget,
) -> Result<Vec<ResetKey>, RateLimitError> {
    let mut out = Vec::new();
    for (limit, subject) in reset_keys(target) {
        let deleted: i64 = redis::cmd("DEL")
            .arg(key(namespace, limit, &subject))
            .query_async(conn)
            .await?;
        out.push(ResetKey {
            limit,
            subject,
            removed: deleted > 0,
        });
    }
    Ok(out)
}

/// Checks (and with [`Mode::Hit`], counts) one attempt against `rate` on `key`.
pub async fn check<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    rate: Rate,
    mode: Mode,
) -> Result<Decision, RateLimitError> {
    let (period_us, interval_us) = interval_us(rate);
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("{s} is an address"))
    }

    #[test]
    fn ipv6_clients_share_one_subject_per_64_and_ipv4_is_unchanged() {
        assert_eq!(
            ip_subject(ip("2001:db8:1:2::1")),
            ip_subject(ip("2001:db8:1:2:ffff::9"))
        );
        assert_eq!(ip_subject(ip("2001:db8:1:2::1")), "2001:db8:1:2::/64");
        assert_ne!(
            ip_subject(ip("2001:db8:1:2::1")),
            ip_subject(ip("2001:db8:1:3::1"))
        );
        assert_eq!(ip_subject(ip("198.51.100.7")), "198.51.100.7");
        assert_eq!(ip_subject(ip("::ffff:198.51.100.7")), "198.51.100.7");
        assert_ne!(
            ip_subject(ip("198.51.100.7")),
            ip_subject(ip("198.51.100.8"))
        );
    }

    #[test]
    fn a_value_without_an_emails_shape_never_appears_in_a_key() {
        assert_eq!(email_subject(" Ada@Example.com"), "ada@example.com");
        let subject = email_subject("hunter2 my password");
        assert!(subject.starts_with("sha256:"), "{subject}");
        assert!(!subject.contains("hunter2"));
    }

    #[test]
    fn a_reset_by_ip_covers_every_per_ip_limit_of_the_64() {
        let keys = reset_keys(&ResetTarget::Ip(ip("2001:db8:1:2::77")));
        for name in names::PER_IP {
            assert!(
                keys.contains(&(name, "2001:db8:1:2::/64".to_owned())),
                "{name}"
            );
        }
        let v4 = reset_keys(&ResetTarget::Ip(ip("203.0.113.5")));
        assert_eq!(v4.len(), names::PER_IP.len());
    }
}
