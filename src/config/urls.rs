//! URL and network values: `DATABASE_URL`/`REDIS_URL` schemes, `PUBLIC_BASE_URL` (an origin
//! only), `LLM_URL` (no credentials), `SENTRY_DSN`, and the CIDR entries of
//! `TRUSTED_PROXIES` and `STORE_ALLOWED_NETWORKS`. Each rule is reported by name, never with
//! the value.

use std::net::IpAddr;

use ipnet::IpNet;
use url::Url;

use super::reader::{Lookup, Reader};

/// A CIDR (host bits cleared: `10.1.2.3/8` → `10.0.0.0/8`) or a bare IP (a /32 or /128).
pub(super) fn parse_network(entry: &str) -> Result<IpNet, String> {
    if let Ok(net) = entry.parse::<IpNet>() {
        Ok(net.trunc())
    } else if let Ok(ip) = entry.parse::<IpAddr>() {
        Ok(IpNet::from(ip))
    } else {
        Err("must be an IP address or CIDR, e.g. 10.0.0.0/8 or 2001:db8::/32".to_owned())
    }
}

pub(super) fn check_url_scheme<F: Fn(&str) -> Lookup>(
    r: &mut Reader<F>,
    name: &'static str,
    value: &str,
    schemes: &[&str],
    rule: &str,
) {
    let ok = Url::parse(value.trim()).is_ok_and(|u| {
        schemes.contains(&u.scheme()) && u.host_str().is_some_and(|h| !h.is_empty())
    });
    // A socket-path form like `postgres:///db?host=/run/postgresql` has no host
    // but is valid for PostgreSQL.
    let ok = ok
        || (name == "DATABASE_URL"
            && Url::parse(value.trim()).is_ok_and(|u| schemes.contains(&u.scheme())));
    if !ok {
        r.problem(name, rule);
    }
}

fn is_http(url: &Url) -> bool {
    matches!(url.scheme(), "http" | "https") && url.host_str().is_some_and(|h| !h.is_empty())
}

pub(super) fn parse_public_base(s: &str, debug: bool) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|_| "must be an absolute URL like https://host[:port]")?;
    if !is_http(&url) {
        return Err("must be an http(s) URL with a host, like https://host[:port]".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain user info".to_owned());
    }
    if url.path() != "/" {
        return Err("must not have a path: only https://host[:port]".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".to_owned());
    }
    if url.scheme() != "https" && !debug {
        return Err("must use https unless DEBUG=true".to_owned());
    }
    Ok(url)
}

pub(super) fn parse_llm_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|_| "must be an absolute http(s) URL")?;
    if !is_http(&url) {
        return Err("must be an http(s) URL with a host".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain credentials (use LLM_API_KEY)".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".to_owned());
    }
    Ok(url)
}

pub(super) fn is_sentry_dsn(s: &str) -> bool {
    Url::parse(s.trim()).is_ok_and(|u| {
        is_http(&u)
            && !u.username().is_empty()
            && u.path_segments()
                .and_then(|mut segs| segs.next_back())
                .is_some_and(|project| !project.is_empty())
    })
}
