//! Dashboard sessions: server-side in Redis, a random 256-bit id in a `__Host-` cookie.
//!
//! Redis holds `{ns}:admin:session:{sha256(id) hex}` → hash `{user, created}` with the idle
//! expiry as its TTL (refreshed on each use); an entry older than the absolute lifetime is
//! deleted when read. Redis never holds the id itself, so a copy of Redis yields no cookie.
//! Logout deletes the entry; scopes are checked per request, so role changes apply at once.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use redis::aio::ConnectionLike;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The session cookie.
pub const COOKIE: &str = "__Host-gh_admin";
/// The login form's anti-CSRF nonce cookie (before there is a session).
pub const LOGIN_COOKIE: &str = "__Host-gh_login";
/// A session unused this long is gone.
pub const IDLE_SECONDS: u64 = 30 * 60;
/// A session this old is gone however busy.
pub const ABSOLUTE_SECONDS: u64 = 12 * 60 * 60;
/// How long a login form may be left open.
pub const LOGIN_SECONDS: u64 = 30 * 60;

/// 32 random bytes: a session id or a login nonce. `Debug` shows nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Token([u8; 32]);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    pub fn random() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Parses a cookie value (unpadded base64url of 32 bytes).
    pub fn parse(value: &str) -> Option<Self> {
        if value.len() != 43 {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(value).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn redis_key(&self, namespace: &str) -> String {
        format!(
            "{namespace}:admin:session:{}",
            hex::encode(Sha256::digest(self.0))
        )
    }
}

/// A live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user_id: Uuid,
    pub created: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Creates a session for `user_id`; returns its id.
pub async fn create<C: ConnectionLike>(
    redis: &mut C,
    namespace: &str,
    user_id: Uuid,
) -> Result<Token, redis::RedisError> {
    let id = Token::random();
    let key = id.redis_key(namespace);
    redis::pipe()
        .atomic()
        .cmd("HSET")
        .arg(&key)
        .arg("user")
        .arg(user_id.to_string())
        .arg("created")
        .arg(now())
        .ignore()
        .cmd("EXPIRE")
        .arg(&key)
        .arg(IDLE_SECONDS)
        .ignore()
        .query_async::<()>(redis)
        .await?;
    Ok(id)
}

/// The session `id`, if it lives; refreshes its idle expiry.
pub async fn load<C: ConnectionLike>(
    redis: &mut C,
    namespace: &str,
    id: &Token,
) -> Result<Option<Session>, redis::RedisError> {
    let key = id.redis_key(namespace);
    let (user, created): (Option<String>, Option<u64>) = redis::cmd("HMGET")
        .arg(&key)
        .arg("user")
        .arg("created")
        .query_async(redis)
        .await?;
    let (Some(user), Some(created)) = (user, created) else {
        return Ok(None);
    };
    let Ok(user_id) = Uuid::parse_str(&user) else {
        destroy(redis, namespace, id).await?;
        return Ok(None);
    };
    if now().saturating_sub(created) >= ABSOLUTE_SECONDS {
        destroy(redis, namespace, id).await?;
        return Ok(None);
    }
    redis::cmd("EXPIRE")
        .arg(&key)
        .arg(IDLE_SECONDS)
        .query_async::<()>(redis)
        .await?;
    Ok(Some(Session { user_id, created }))
}

/// Deletes the session `id` (logout).
pub async fn destroy<C: ConnectionLike>(
    redis: &mut C,
    namespace: &str,
    id: &Token,
) -> Result<(), redis::RedisError> {
    redis::cmd("DEL")
        .arg(id.redis_key(namespace))
        .query_async::<()>(redis)
        .await
}

/// The value of cookie `name` in the request, if sent once.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut found = None;
    for value in headers.get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=')
                && k == name
            {
                if found.is_some() {
                    // Two cookies of one name (e.g. one planted by a sibling host): trust neither.
                    return None;
                }
                found = Some(v);
            }
        }
    }
    found
}

/// The token in cookie `name`, if well-formed.
pub fn token_cookie(headers: &HeaderMap, name: &str) -> Option<Token> {
    cookie(headers, name).and_then(Token::parse)
}

/// `Set-Cookie` for `name`: `__Host-` rules (Secure, Path=/, no Domain), HttpOnly,
/// SameSite=Strict; a browser-session cookie unless `max_age` is given.
pub fn set_cookie(name: &str, value: &str, max_age: Option<u64>) -> HeaderValue {
    let mut cookie = format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        cookie.push_str(&format!("; Max-Age={age}"));
    }
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `Set-Cookie` that removes `name`.
pub fn clear_cookie(name: &str) -> HeaderValue {
    set_cookie(name, "", Some(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_malformed_cookies_are_refused() {
        let t = Token::random();
        assert_eq!(Token::parse(&t.encode()), Some(t.clone()));
        assert_eq!(Token::parse("short"), None);
        assert_eq!(Token::parse(&"!".repeat(43)), None);
        assert_eq!(format!("{t:?}"), "Token(..)");
    }

    #[test]
    fn a_cookie_sent_twice_is_trusted_in_neither_copy() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-gh_admin=x"),
        );
        assert_eq!(cookie(&headers, COOKIE), Some("x"));
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("__Host-gh_admin=y"),
        );
        assert_eq!(cookie(&headers, COOKIE), None);
    }

    #[test]
    fn cookies_carry_every_required_attribute() {
        let v = set_cookie(COOKIE, "abc", None);
        assert_eq!(
            v.to_str().expect("ascii"),
            "__Host-gh_admin=abc; Path=/; Secure; HttpOnly; SameSite=Strict"
        );
    }
}
