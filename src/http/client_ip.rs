//! The client's address: the socket peer, unless that peer is a trusted proxy; then the
//! right-most `X-Forwarded-For` hop that is not itself a trusted proxy.

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, HeaderName};
use ipnet::IpNet;

/// Header names as constants: a lookup by `&str` parses and validates the name every time.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    proxies.iter().any(|net| net.contains(&ip))
}

/// Whether forwarded headers from this peer may be believed.
pub fn peer_is_trusted(peer: SocketAddr, proxies: &[IpNet]) -> bool {
    trusted(peer.ip(), proxies)
}

/// The client IP for rate limits and security events.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, proxies: &[IpNet]) -> IpAddr {
    if !trusted(peer.ip(), proxies) {
        return peer.ip();
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in headers.get_all(X_FORWARDED_FOR) {
        let Ok(text) = value.to_str() else {
            return peer.ip();
        };
        for part in text.split(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip),
                Err(_) => return peer.ip(),
            }
        }
    }
    hops.into_iter()
        .rev()
        .find(|ip| !trusted(*ip, proxies))
        .unwrap_or(peer.ip())
}

/// The scheme the client used: `X-Forwarded-Proto` from a trusted proxy, else `http`
/// (gatehouse itself does not terminate TLS).
pub fn client_scheme(peer: SocketAddr, headers: &HeaderMap, proxies: &[IpNet]) -> &'static str {
    if trusted(peer.ip(), proxies)
        && let Some(proto) = headers.get(X_FORWARDED_PROTO).and_then(|v| v.to_str().ok())
        && proto
            .split(',')
            .next()
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
    {
        return "https";
    }
    "http"
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_str(xff).expect("header"),
        );
        h
    }

    #[test]
    fn an_untrusted_peer_cannot_choose_its_address() {
        let peer: SocketAddr = "203.0.113.9:5000".parse().expect("addr");
        let ip = client_ip(peer, &headers("1.2.3.4"), &nets(&["10.0.0.0/8"]));
        assert_eq!(ip, peer.ip());
    }

    #[test]
    fn a_trusted_proxy_yields_the_rightmost_untrusted_hop() {
        let peer: SocketAddr = "10.0.0.2:5000".parse().expect("addr");
        let ip = client_ip(
            peer,
            &headers("6.6.6.6, 198.51.100.7, 10.0.0.3"),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(ip, "198.51.100.7".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn garbage_forwarded_headers_fall_back_to_the_peer() {
        let peer: SocketAddr = "10.0.0.2:5000".parse().expect("addr");
        let ip = client_ip(peer, &headers("not-an-ip"), &nets(&["10.0.0.0/8"]));
        assert_eq!(ip, peer.ip());
    }

    #[test]
    fn forwarded_proto_counts_only_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let proxies = nets(&["10.0.0.0/8"]);
        let trusted_peer: SocketAddr = "10.1.1.1:1".parse().expect("addr");
        let stranger: SocketAddr = "192.0.2.1:1".parse().expect("addr");
        assert_eq!(client_scheme(trusted_peer, &h, &proxies), "https");
        assert_eq!(client_scheme(stranger, &h, &proxies), "http");
    }
}
