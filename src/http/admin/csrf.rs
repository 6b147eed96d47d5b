//! CSRF protection of the dashboard's forms: a token bound to the session (or, on the login
//! form, to a nonce cookie), `HMAC-SHA256(key, purpose ‖ 0x00 ‖ session id)` under a key
//! derived from `SECRET_KEY` (`HMAC-SHA256(SECRET_KEY, "gatehouse/admin-csrf/v1")`), compared
//! in constant time; plus an `Origin` / `Sec-Fetch-Site` check for browsers that send them.

use axum::http::{HeaderMap, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use url::Url;

use crate::security::blind_index::hmac_sha256;

/// Derives the CSRF key from `SECRET_KEY`.
const KEY_LABEL: &[u8] = b"gatehouse/admin-csrf/v1";

/// The token for `purpose` (`"session"`, `"login"`) bound to `bound` (a session id or nonce).
pub fn token(secret_key: &SecretString, purpose: &str, bound: &[u8]) -> String {
    let key = hmac_sha256(secret_key.expose_secret().as_bytes(), &[KEY_LABEL]);
    let mac = hmac_sha256(&key, &[purpose.as_bytes(), &[0], bound]);
    URL_SAFE_NO_PAD.encode(mac)
}

/// Whether `presented` is the token for `purpose` and `bound` (constant time).
pub fn verify(secret_key: &SecretString, purpose: &str, bound: &[u8], presented: &str) -> bool {
    let expected = token(secret_key, purpose, bound);
    expected.len() == presented.len() && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

/// Whether the request may come from our own pages: a browser's `Sec-Fetch-Site` must say
/// `same-origin` (a sibling port or subdomain is same-site, not same-origin), and an `Origin`
/// must be this host's (or `PUBLIC_BASE_URL`'s). Under the dashboard's `no-referrer` policy
/// browsers send `Origin: null` even for their own forms; that is accepted only beside
/// `Sec-Fetch-Site: same-origin`. Clients that send neither header (no browser) pass this
/// check and still need the token.
pub fn same_origin(headers: &HeaderMap, public_base: Option<&Url>) -> bool {
    let fetch_site = headers.get("sec-fetch-site");
    if let Some(site) = fetch_site
        && site.as_bytes() != b"same-origin"
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if origin == "null" {
        return fetch_site.is_some();
    }
    let Ok(origin) = Url::parse(origin) else {
        return false;
    };
    if let Some(base) = public_base
        && base.origin() == origin.origin()
    {
        return true;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let authority = match (origin.host_str(), origin.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => return false,
    };
    authority.eq_ignore_ascii_case(host)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn secret() -> SecretString {
        SecretString::from("test-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz")
    }

    #[test]
    fn a_token_verifies_only_for_its_purpose_and_session() {
        let t = token(&secret(), "session", b"one");
        assert!(verify(&secret(), "session", b"one", &t));
        assert!(!verify(&secret(), "session", b"two", &t));
        assert!(!verify(&secret(), "login", b"one", &t));
        assert!(!verify(&secret(), "session", b"one", ""));
        assert!(!verify(&secret(), "session", b"one", &t[1..]));
        let other = SecretString::from("another-secret-key-0123456789-abcdefghijklmnop");
        assert!(!verify(&other, "session", b"one", &t));
    }

    #[test]
    fn cross_site_and_sibling_origins_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&h, None), "no browser headers");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&h, None));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9090"),
        );
        assert!(!same_origin(&h, None), "another port");
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h, None), "an opaque origin alone");
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(same_origin(&h, None), "no-referrer forms of our own");
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h, None), "a sandboxed or foreign form");
        h.remove("sec-fetch-site");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://gh.example.com"),
        );
        let base = Url::parse("https://gh.example.com").expect("url");
        assert!(same_origin(&h, Some(&base)));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-site"));
        assert!(!same_origin(&h, Some(&base)));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(same_origin(&h, Some(&base)));
    }
}
