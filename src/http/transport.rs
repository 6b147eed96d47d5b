//! Transport security: HTTPS redirect and security headers (SPEC "Transport security"),
//! and a request id on every request and response.

use std::net::SocketAddr;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::client_ip::client_scheme;

/// The request id, in request extensions and the `x-request-id` response header: a
/// hyphenated UUID, kept inline (every request has one; no allocation of its own).
#[derive(Debug, Clone, Copy)]
pub struct RequestId([u8; uuid::fmt::Hyphenated::LENGTH]);

impl RequestId {
    fn new(id: uuid::Uuid) -> Self {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        id.hyphenated().encode_lower(&mut text);
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        // Always ASCII: `encode_lower` wrote hex digits and hyphens.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Where a request came from and its id, in request extensions (one extension for both): the
/// socket peer (the client IP starts there, `client_ip::client_ip`) and the [`RequestId`].
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    pub peer: SocketAddr,
    pub id: RequestId,
}

impl Origin {
    /// A request's origin, or (a router served without the edge) the unspecified address,
    /// which is nobody's proxy, and no id.
    pub fn of(extensions: &axum::http::Extensions) -> (SocketAddr, Option<&RequestId>) {
        match extensions.get::<Origin>() {
            Some(origin) => (origin.peer, Some(&origin.id)),
            None => (SocketAddr::from(([0, 0, 0, 0], 0)), None),
        }
    }
}

const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

const EXEMPT: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// `Strict-Transport-Security` on every response unless `DEBUG=true` (SPEC "Transport security").
pub const HSTS: HeaderValue =
    HeaderValue::from_static("max-age=31536000; includeSubDomains; preload");

/// The operator dashboard's policy: its own stylesheet, forms posting to itself, inline SVG
/// (no `style` attributes, no scripts at all).
const ADMIN_CSP: HeaderValue = HeaderValue::from_static(
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'",
);

/// Room a response's header map needs for what [`depart`] adds (HSTS, the security headers,
/// the request id) and a content type and length: reserved once instead of grown twice.
pub const RESPONSE_HEADERS: usize = 2 + SECURITY_HEADER_COUNT + 2;

const SECURITY_HEADER_COUNT: usize = 4;

/// Headers every response carries, whatever `DEBUG` says.
pub const SECURITY_HEADERS: [(header::HeaderName, HeaderValue); SECURITY_HEADER_COUNT] = [
    (
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    ),
    (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    (
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    ),
    (
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'; base-uri 'none'"),
    ),
];

fn redirect_target(state: &AppState, req: &Request) -> Option<String> {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    // Never redirect to a host the client chose when the public URL is known.
    let host = match &state.config.public_base_url {
        Some(url) => {
            let mut host = url.host_str()?.to_owned();
            if let Some(port) = url.port()
                && url.scheme() == "https"
            {
                host.push_str(&format!(":{port}"));
            }
            host
        }
        None => {
            let host = req.headers().get(header::HOST)?.to_str().ok()?;
            let valid = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
            if !valid {
                return None;
            }
            host.split(':').next()?.to_owned()
        }
    };
    Some(format!("https://{host}{path_and_query}"))
}

/// What the edge decided about a request before its route runs, to finish its response.
pub struct Arrival {
    request_id: Option<HeaderValue>,
    admin: bool,
    debug: bool,
}

/// A request id: a UUIDv7 (milliseconds, then 74 random bits from the thread's generator).
/// `Uuid::now_v7` keeps ids ordered within a millisecond through one context shared by every
/// thread, which costs each request ~1,200 instructions and a shared lock; a request id only
/// needs to be unique and roughly time-ordered.
fn fresh_request_id() -> uuid::Uuid {
    use rand::RngCore as _;
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64);
    let mut random = [0u8; 10];
    rand::rng().fill_bytes(&mut random);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// Gives the request its [`Origin`] and decides the HTTPS redirect: plain HTTP (unless `DEBUG=true`
/// or a health endpoint) is answered here, and the route never runs.
pub fn arrive(
    state: &AppState,
    peer: SocketAddr,
    req: &mut Request,
) -> (Arrival, Option<Response>) {
    let id = RequestId::new(fresh_request_id());
    let arrival = Arrival {
        request_id: HeaderValue::from_str(id.as_str()).ok(),
        admin: req.uri().path() == "/admin" || req.uri().path().starts_with("/admin/"),
        debug: state.config.debug,
    };
    req.extensions_mut().insert(Origin { peer, id });
    let redirect = (!arrival.debug
        && !EXEMPT.contains(&req.uri().path())
        && client_scheme(peer, req.headers(), &state.config.trusted_proxies) != "https")
        .then(|| match redirect_target(state, req) {
            Some(target) => match HeaderValue::from_str(&target) {
                Ok(location) => (
                    StatusCode::MOVED_PERMANENTLY,
                    [(header::LOCATION, location)],
                )
                    .into_response(),
                Err(_) => super::error::ApiError::invalid_request("bad host").into_response(),
            },
            None => super::error::ApiError::invalid_request("missing or invalid Host header")
                .into_response(),
        });
    (arrival, redirect)
}

/// Sets the security headers and the request id on every response, whoever answered.
pub fn depart(arrival: Arrival, response: &mut Response) {
    let headers = response.headers_mut();
    headers.reserve(RESPONSE_HEADERS);
    if !arrival.debug {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, HSTS);
    }
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, value);
    }
    if arrival.admin {
        headers.insert(header::CONTENT_SECURITY_POLICY, ADMIN_CSP);
    }
    if let Some(value) = arrival.request_id {
        headers.insert(X_REQUEST_ID, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_reads_as_its_hyphenated_uuid() {
        let id = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(
            RequestId::new(id).as_str(),
            "01234567-89ab-cdef-0123-456789abcdef"
        );
    }

    #[test]
    fn request_ids_are_distinct_uuidv7s_of_the_current_millisecond() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        let ids: Vec<uuid::Uuid> = (0..1000).map(|_| fresh_request_id()).collect();
        let after = before + 1000;
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            let (secs, nanos) = id.get_timestamp().expect("a v7 timestamp").to_unix();
            let millis = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!(
                (before..=after).contains(&millis),
                "{millis} not in {before}..={after}"
            );
        }
    }
}
