//! The HTTP client for tenants' stores: bounded (per-request timeout, page size), no redirects,
//! no proxies, and connections only to addresses the network policy allows — names go through
//! a resolver that drops forbidden addresses (so a name that resolves, or is rebound, to an
//! internal address cannot be reached), and literal addresses are checked before the request.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::events::{EventType, SecurityEvent, SecurityLog};
use crate::security::keyring::{Keyring, aad};
use crate::security::net::{AddressClass, check_address};

use super::CatalogError;

/// Bounds on what a store may send and cost.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Each request (`STORE_TIMEOUT_MS`).
    pub timeout: Duration,
    pub max_page_bytes: usize,
    pub max_pages: u32,
    pub max_products: usize,
    /// The whole attempt, every page fetched and staged and the listing applied
    /// (`CATALOG_SYNC_DEADLINE_SECONDS`).
    pub deadline: Duration,
}

impl StoreLimits {
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            timeout,
            max_page_bytes: 4 * 1024 * 1024,
            max_pages: 1000,
            max_products: 100_000,
            deadline: Duration::from_secs(600),
        }
    }
}

/// Every address a store name resolved to is forbidden (the resolver's error, found again in
/// reqwest's error chain).
#[derive(Debug, thiserror::Error)]
#[error("every address of the store host is forbidden ({0})")]
struct ForbiddenAddress(AddressClass);

/// Resolves store host names with the system resolver, keeping only the addresses the policy
/// allows. reqwest calls it for every new connection to a name (never for literal addresses,
/// which `fetch_page` checks itself).
#[derive(Debug)]
struct FilteringResolver {
    allowed: Arc<[IpNet]>,
}

impl reqwest::dns::Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allowed = self.allowed.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let mut refused = None;
            let kept: Vec<SocketAddr> = resolved
                .filter(|addr| match check_address(addr.ip(), &allowed) {
                    Ok(()) => true,
                    Err(class) => {
                        refused.get_or_insert(class);
                        false
                    }
                })
                .collect();
            if kept.is_empty() {
                return Err(match refused {
                    Some(class) => Box::new(ForbiddenAddress(class)) as _,
                    None => "the store host has no address".into(),
                });
            }
            if let Some(class) = refused {
                tracing::warn!(
                    address.class = class.as_str(),
                    "some addresses of a store host are forbidden and were skipped"
                );
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The HTTP client for tenants' stores.
#[derive(Debug, Clone)]
pub struct StoreClient {
    http: reqwest::Client,
    limits: StoreLimits,
    allowed: Arc<[IpNet]>,
    /// One circuit breaker per store host (`crate::circuit`).
    circuits: crate::circuit::Circuits,
}

impl StoreClient {
    /// A client that connects only to public addresses and to `allowed_networks`
    /// (`STORE_ALLOWED_NETWORKS`).
    pub fn new(limits: StoreLimits, allowed_networks: Vec<IpNet>) -> Result<Self, reqwest::Error> {
        let allowed: Arc<[IpNet]> = allowed_networks.into();
        let http = reqwest::Client::builder()
            .connect_timeout(limits.timeout.min(Duration::from_secs(5)))
            .timeout(limits.timeout)
            // A redirect could lead anywhere; a proxy would resolve the name itself.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(FilteringResolver {
                allowed: allowed.clone(),
            })
            .user_agent(concat!("gatehouse/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            limits,
            allowed,
            circuits: crate::circuit::Circuits::default(),
        })
    }

    /// The per-host circuit breakers (for `/healthz` and the metrics).
    pub fn circuits(&self) -> &crate::circuit::Circuits {
        &self.circuits
    }

    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }
}

/// Why fetching from the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store request timed out on page {page}")]
    Timeout { page: u32 },
    #[error("store could not be reached on page {page}")]
    Unreachable { page: u32 },
    /// The store's host failed at the connection level repeatedly: its circuit is open and
    /// no request is sent until the next probe.
    #[error(
        "the store's circuit is open (it failed to answer repeatedly); next probe in {retry_after_ms} ms"
    )]
    CircuitOpen { retry_after_ms: u64 },
    #[error("store answered HTTP {status} on page {page}")]
    Status { page: u32, status: u16 },
    #[error("store page {page} is not a valid listing: {why}")]
    Malformed { page: u32, why: &'static str },
    #[error("store page {page} is larger than {limit} bytes")]
    PageTooLarge { page: u32, limit: usize },
    #[error("store listing exceeds {0}")]
    ListingTooLarge(&'static str),
    /// The store's address (literal, or every address its name resolved to) is not public
    /// and not inside `STORE_ALLOWED_NETWORKS`.
    #[error(
        "store_url_forbidden: the store's address is {class} and not inside STORE_ALLOWED_NETWORKS"
    )]
    Forbidden { class: AddressClass },
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        self.fault() != crate::fault::Fault::Permanent
    }

    /// Where the failure belongs (`crate::fault`): not reaching the store (refused, reset,
    /// closed, no answer in time, its circuit open) is the store's outage; whatever it
    /// answered is this job's.
    pub fn fault(&self) -> crate::fault::Fault {
        use crate::fault::{Dependency, Fault};
        match self {
            Self::Timeout { .. } | Self::Unreachable { .. } | Self::CircuitOpen { .. } => {
                Fault::Outage(Dependency::Store)
            }
            Self::Malformed { .. } => Fault::Retry,
            Self::Status { status, .. } if *status >= 500 || *status == 408 || *status == 429 => {
                Fault::Retry
            }
            Self::Status { .. }
            | Self::PageTooLarge { .. }
            | Self::ListingTooLarge(_)
            | Self::Forbidden { .. } => Fault::Permanent,
        }
    }
}

/// A tenant's store endpoint and key, opened.
pub struct StoreCredentials {
    pub base_url: url::Url,
    pub api_key: SecretString,
}

impl std::fmt::Debug for StoreCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCredentials")
            .field("base_url", &self.base_url.as_str())
            .finish_non_exhaustive()
    }
}

/// Loads and opens a tenant's store settings.
pub async fn store_credentials(
    pool: &PgPool,
    keyring: &Keyring,
    events: &SecurityLog,
    tenant_id: Uuid,
) -> Result<StoreCredentials, CatalogError> {
    let row: Option<(Option<String>, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT store_url, store_api_key FROM tenants WHERE id = $1")
            .bind(tenant_id)
            .fetch_optional(pool)
            .await?;
    let (url, sealed) = row.ok_or(CatalogError::UnknownTenant)?;
    let (Some(url), Some(sealed)) = (url, sealed) else {
        return Err(CatalogError::NoStore);
    };
    let base_url = url::Url::parse(&url)
        .ok()
        .filter(|u| u.scheme() == "https" || u.scheme() == "http")
        .ok_or(CatalogError::BadStore("store_url is not an http(s) URL"))?;
    let plain = match keyring.open(
        &sealed,
        &aad("tenants", "store_api_key", &tenant_id.to_string()),
    ) {
        Ok(plain) => plain,
        Err(error) => {
            // Fail closed: no plaintext fallback, no request to the store; an event names the
            // cell and the check that failed, never the value.
            tracing::error!(tenant.id = %tenant_id, %error, "cannot open the store API key");
            let mut event = SecurityEvent::new(EventType::EncryptionError);
            event.tenant_id = Some(tenant_id);
            event.details = serde_json::json!({
                "operation": "sync_catalog",
                "table": "tenants",
                "column": "store_api_key",
                "row_id": tenant_id,
                "reason": error.to_string(),
            });
            events.record(event).await;
            return Err(CatalogError::BadStore("store_api_key could not be opened"));
        }
    };
    let key = String::from_utf8(plain.to_vec())
        .map_err(|_| CatalogError::BadStore("store_api_key is not UTF-8"))?;
    Ok(StoreCredentials {
        base_url,
        api_key: SecretString::from(key),
    })
}

pub(super) fn page_url(base: &url::Url, page: u32) -> url::Url {
    let mut url = base.clone();
    let path = format!("{}/products", base.path().trim_end_matches('/'));
    url.set_path(&path);
    url.query_pairs_mut()
        .clear()
        .append_pair("page", &page.to_string());
    url
}

/// The forbidden-address refusal somewhere in a request error's chain of causes.
fn forbidden_cause(error: &(dyn std::error::Error + 'static)) -> Option<AddressClass> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(ForbiddenAddress(class)) = e.downcast_ref::<ForbiddenAddress>() {
            return Some(*class);
        }
        current = e.source();
    }
    None
}

/// Refuses a literal host address the policy forbids (reqwest connects to literals without
/// asking the resolver).
fn check_literal_host(url: &url::Url, allowed: &[IpNet]) -> Result<(), StoreError> {
    let ip = match url.host() {
        Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
        _ => return Ok(()),
    };
    check_address(ip, allowed).map_err(|class| StoreError::Forbidden { class })
}

/// Fetches one page of the listing and parses it as JSON (bounded by `max_page_bytes`).
pub(super) async fn fetch_page(
    client: &StoreClient,
    creds: &StoreCredentials,
    page: u32,
) -> Result<Value, StoreError> {
    let url = page_url(&creds.base_url, page);
    check_literal_host(&url, &client.allowed)?;
    let limit = client.limits.max_page_bytes;
    // One circuit per host and port: one tenant's dead store never pauses another's sync.
    let host = match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        (None, _) => String::new(),
    };
    let circuit = client.circuits.get(&host);
    if let crate::circuit::Admit::Wait(wait) = circuit.admit() {
        return Err(StoreError::CircuitOpen {
            retry_after_ms: wait.as_millis() as u64,
        });
    }
    let map_send = |e: reqwest::Error| {
        if let Some(class) = forbidden_cause(&e) {
            return StoreError::Forbidden { class };
        }
        if circuit.failure() {
            tracing::warn!(
                store.host = %host,
                "a store fails to answer repeatedly; its circuit is open: its syncs wait (no attempt used) and one probe tests it"
            );
        }
        if e.is_timeout() {
            StoreError::Timeout { page }
        } else {
            StoreError::Unreachable { page }
        }
    };
    let mut response = client
        .http
        .get(url)
        .bearer_auth(creds.api_key.expose_secret())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(map_send)?;
    if circuit.success() {
        tracing::info!(store.host = %host, "a store answers again; its circuit is closed");
    }
    let status = response.status();
    if !status.is_success() {
        return Err(StoreError::Status {
            page,
            status: status.as_u16(),
        });
    }
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(StoreError::PageTooLarge { page, limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(map_send)? {
        if body.len() + chunk.len() > limit {
            return Err(StoreError::PageTooLarge { page, limit });
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|_| StoreError::Malformed {
        page,
        why: "not JSON",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_urls_keep_the_base_path() {
        let base = url::Url::parse("https://store.example/api/v2/").expect("url");
        assert_eq!(
            page_url(&base, 3).as_str(),
            "https://store.example/api/v2/products?page=3"
        );
    }

    #[test]
    fn only_transient_store_failures_are_retried() {
        assert!(
            StoreError::Status {
                page: 1,
                status: 503
            }
            .is_retryable()
        );
        assert!(
            StoreError::Status {
                page: 1,
                status: 429
            }
            .is_retryable()
        );
        assert!(
            !StoreError::Status {
                page: 1,
                status: 401
            }
            .is_retryable()
        );
        assert!(StoreError::Malformed { page: 1, why: "x" }.is_retryable());
        assert!(!StoreError::PageTooLarge { page: 1, limit: 1 }.is_retryable());
        assert!(
            !StoreError::Forbidden {
                class: AddressClass::Loopback
            }
            .is_retryable()
        );
        assert!(!CatalogError::UnknownTenant.is_retryable());
    }

    #[test]
    fn literal_hosts_are_checked_before_any_request() {
        let allowed: Vec<IpNet> = vec!["10.1.0.0/16".parse().expect("net")];
        let check = |raw: &str| check_literal_host(&url::Url::parse(raw).expect("url"), &allowed);
        assert!(matches!(
            check("http://127.0.0.1:8080/"),
            Err(StoreError::Forbidden {
                class: AddressClass::Loopback
            })
        ));
        assert!(matches!(
            check("http://[::ffff:169.254.169.254]/"),
            Err(StoreError::Forbidden {
                class: AddressClass::LinkLocal
            })
        ));
        assert!(check("https://10.1.2.3/").is_ok());
        assert!(check("https://93.184.215.14/").is_ok());
        assert!(
            check("https://shop.example.com/").is_ok(),
            "names go to the resolver"
        );
    }

    #[test]
    fn the_forbidden_refusal_is_found_in_a_chain_of_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect")]
        struct Outer(#[source] ForbiddenAddress);
        let outer = Outer(ForbiddenAddress(AddressClass::Private));
        assert_eq!(forbidden_cause(&outer), Some(AddressClass::Private));
        assert_eq!(forbidden_cause(&std::io::Error::other("nope")), None);
    }

    #[tokio::test]
    async fn the_resolver_drops_forbidden_addresses_and_errors_when_none_remain() {
        use reqwest::dns::Resolve;
        let strict = FilteringResolver {
            allowed: Vec::new().into(),
        };
        let name: reqwest::dns::Name = "localhost".parse().expect("name");
        let error = match strict.resolve(name).await {
            Ok(_) => panic!("localhost resolves to loopback only"),
            Err(error) => error,
        };
        assert!(matches!(
            forbidden_cause(error.as_ref()),
            Some(AddressClass::Loopback)
        ));
        let open = FilteringResolver {
            allowed: vec!["127.0.0.0/8".parse().expect("net")].into(),
        };
        let name: reqwest::dns::Name = "localhost".parse().expect("name");
        let addrs: Vec<SocketAddr> = open.resolve(name).await.expect("resolves").collect();
        assert!(!addrs.is_empty());
        assert!(
            addrs.iter().all(|a| a.ip().is_loopback() && a.is_ipv4()),
            "only the allowed IPv4 loopback is kept: {addrs:?}"
        );
    }
}
