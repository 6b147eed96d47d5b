//! Which network addresses gatehouse may connect to on a tenant's behalf (store URLs): one pure
//! classification of IP addresses, the operator's allow-list (`STORE_ALLOWED_NETWORKS`) on top,
//! and the checks a tenant-supplied URL passes before it is stored.
//!
//! Refused, unless inside an allowed network: loopback, private (RFC 1918, `fc00::/7`, the
//! deprecated site-local `fec0::/10`), link-local (`169.254.0.0/16`, `fe80::/10`), CGNAT
//! (`100.64.0.0/10`), multicast, unspecified (`0.0.0.0/8`, `::`), broadcast, documentation
//! ranges, and reserved ranges that no public store lives in (`192.0.0.0/24`, `198.18.0.0/15`,
//! `240.0.0.0/4`, the deprecated IPv4-compatible `::/96`, discard-only `100::/64`, Teredo
//! `2001::/32`, local-use NAT64 `64:ff9b:1::/48`). Addresses that carry an IPv4 address inside
//! an IPv6 one (IPv4-mapped `::ffff:0:0/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged by
//! the IPv4 address they lead to.
//!
//! The URL text is parsed by the `url` crate (WHATWG rules), which turns the numeric tricks
//! (`0x7f.1`, `2130706433`, `127.1`, `017700000001`, a trailing dot) into the dotted address they
//! mean, and maps full-width or other confusable host names through IDNA, before the host is
//! judged.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use url::{Host, Url};

/// Why an address is not a public one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Loopback,
    Private,
    LinkLocal,
    Cgnat,
    Multicast,
    Unspecified,
    Broadcast,
    Documentation,
    Reserved,
}

impl AddressClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link-local",
            Self::Cgnat => "CGNAT",
            Self::Multicast => "multicast",
            Self::Unspecified => "unspecified",
            Self::Broadcast => "broadcast",
            Self::Documentation => "documentation",
            Self::Reserved => "reserved",
        }
    }
}

impl std::fmt::Display for AddressClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    use AddressClass::*;
    let ranges: [([u8; 4], u32, AddressClass); 16] = [
        ([255, 255, 255, 255], 32, Broadcast),
        ([0, 0, 0, 0], 8, Unspecified),
        ([127, 0, 0, 0], 8, Loopback),
        ([10, 0, 0, 0], 8, Private),
        ([172, 16, 0, 0], 12, Private),
        ([192, 168, 0, 0], 16, Private),
        ([100, 64, 0, 0], 10, Cgnat),
        ([169, 254, 0, 0], 16, LinkLocal),
        ([192, 0, 0, 0], 24, Reserved),
        ([192, 0, 2, 0], 24, Documentation),
        ([198, 51, 100, 0], 24, Documentation),
        ([203, 0, 113, 0], 24, Documentation),
        ([198, 18, 0, 0], 15, Reserved),
        ([192, 88, 99, 0], 24, Reserved),
        ([224, 0, 0, 0], 4, Multicast),
        ([240, 0, 0, 0], 4, Reserved),
    ];
    ranges
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, class)| *class)
}

/// The IPv4 address an IPv6 address stands for, when it embeds one that routers act on.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    if in_v6(ip, [0, 0, 0, 0, 0, 0xffff, 0, 0], 96)
        || in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96)
    {
        // IPv4-mapped, or the well-known NAT64 prefix (RFC 6052).
        Some(low32)
    } else if in_v6(ip, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        // 6to4: the IPv4 address sits in bits 16..48.
        Some(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32))
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    use AddressClass::*;
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    if ip.is_unspecified() {
        return Some(Unspecified);
    }
    if ip.is_loopback() {
        return Some(Loopback);
    }
    let ranges: [([u16; 8], u32, AddressClass); 11] = [
        ([0, 0, 0, 0, 0, 0, 0, 0], 96, Reserved),
        ([0x100, 0, 0, 0, 0, 0, 0, 0], 64, Reserved),
        ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, Private),
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, Reserved),
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, Documentation),
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, Documentation),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, Private),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, LinkLocal),
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, Private),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, Multicast),
        // Anything outside global unicast 2000::/3 is not assigned to anyone's store.
        ([0x2000, 0, 0, 0, 0, 0, 0, 0], 3, Reserved),
    ];
    for (net, prefix, class) in &ranges[..10] {
        if in_v6(ip, *net, *prefix) {
            return Some(*class);
        }
    }
    let (global, prefix, _) = ranges[10];
    (!in_v6(ip, global, prefix)).then_some(Reserved)
}

/// The class of a non-public address; `None` for an address a public store may have.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// Whether gatehouse may connect to `ip`: public addresses always, others only inside one of
/// `allowed` (an IPv4-mapped address also matches the IPv4 network it stands for).
pub fn check_address(ip: IpAddr, allowed: &[IpNet]) -> Result<(), AddressClass> {
    let Some(class) = classify(ip) else {
        return Ok(());
    };
    let canonical = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    if allowed
        .iter()
        .any(|net| net.contains(&ip) || net.contains(&canonical))
    {
        Ok(())
    } else {
        Err(class)
    }
}

/// Whether a host name is a loopback name by definition (RFC 6761): `localhost` and
/// `*.localhost`, with or without the final dot, in any case.
pub fn is_localhost_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Why a URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefusal {
    #[error("is not a URL")]
    NotAUrl,
    #[error("must use https")]
    NotHttps,
    #[error("must use https (or http with DEBUG=true)")]
    BadScheme,
    #[error("must name a host")]
    NoHost,
    #[error("must not carry a user name or password")]
    UserInfo,
    #[error("points at a {0} address")]
    Address(AddressClass),
    #[error("points at localhost")]
    Localhost,
}

/// The rules an outbound URL chosen by a tenant must pass when it is stored.
#[derive(Debug, Clone, Default)]
pub struct UrlPolicy {
    /// Plain `http` is accepted too (`DEBUG=true`).
    pub allow_http: bool,
    /// Non-public networks the operator opened (`STORE_ALLOWED_NETWORKS`).
    pub allowed_networks: Vec<IpNet>,
}

impl UrlPolicy {
    /// Parses and checks `raw`: scheme, no user info, a host that is not a non-public address
    /// literal (unless allowed) nor `localhost` (unless loopback is allowed). Names other than
    /// `localhost` are judged again, by what they resolve to, at connect time.
    pub fn check(&self, raw: &str) -> Result<Url, UrlRefusal> {
        let url = Url::parse(raw).map_err(|_| UrlRefusal::NotAUrl)?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => return Err(UrlRefusal::NotHttps),
            _ => return Err(UrlRefusal::BadScheme),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UrlRefusal::UserInfo);
        }
        let ip = match url.host() {
            None => return Err(UrlRefusal::NoHost),
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
            Some(Host::Domain(name)) => {
                let loopback_allowed = [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
                    .into_iter()
                    .any(|ip| check_address(ip, &self.allowed_networks).is_ok());
                if is_localhost_name(name) && !loopback_allowed {
                    return Err(UrlRefusal::Localhost);
                }
                return Ok(url);
            }
        };
        check_address(ip, &self.allowed_networks).map_err(UrlRefusal::Address)?;
        Ok(url)
    }
}

/// One client as per-client budgets count it (rate limits, the security-event budget, alert
/// subjects): an IPv4 address as is (also when it arrives IPv4-mapped, `::ffff:a.b.c.d`), an
/// IPv6 address by its /64 (`2001:db8:1:2::/64`) — one client commonly holds a whole /64, so
/// keying on the full address would give it 2^64 allowances.
pub fn client_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let prefix = u128::from(v6) & (u128::MAX << 64);
                format!("{}/64", Ipv6Addr::from(prefix))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressClass::*;

    fn class(ip: &str) -> Option<AddressClass> {
        classify(ip.parse().expect("an IP address"))
    }

    #[test]
    fn every_non_public_ipv4_class_is_named() {
        let cases = [
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("10.0.0.1", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("169.254.169.254", Some(LinkLocal)),
            ("100.64.0.1", Some(Cgnat)),
            ("100.127.255.255", Some(Cgnat)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("255.255.255.255", Some(Broadcast)),
            ("192.0.2.10", Some(Documentation)),
            ("198.51.100.10", Some(Documentation)),
            ("203.0.113.10", Some(Documentation)),
            ("192.0.0.8", Some(Reserved)),
            ("198.18.0.1", Some(Reserved)),
            ("198.19.255.255", Some(Reserved)),
            ("240.0.0.1", Some(Reserved)),
            // The neighbours of each range are public.
            ("172.15.255.255", None),
            ("172.32.0.0", None),
            ("100.63.255.255", None),
            ("100.128.0.0", None),
            ("169.253.255.255", None),
            ("198.20.0.0", None),
            ("223.255.255.255", None),
            ("1.1.1.1", None),
            ("93.184.215.14", None),
        ];
        for (ip, want) in cases {
            assert_eq!(class(ip), want, "{ip}");
        }
    }

    #[test]
    fn every_non_public_ipv6_class_is_named_and_embedded_ipv4_is_judged_as_ipv4() {
        let cases = [
            ("::1", Some(Loopback)),
            ("::", Some(Unspecified)),
            ("fc00::1", Some(Private)),
            ("fd12:3456::1", Some(Private)),
            ("fec0::1", Some(Private)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("ff02::1", Some(Multicast)),
            ("2001:db8::1", Some(Documentation)),
            ("3fff::1", Some(Documentation)),
            ("100::1", Some(Reserved)),
            ("2001::1", Some(Reserved)),
            ("::127.0.0.1", Some(Reserved)),
            ("64:ff9b:1::a00:1", Some(Private)),
            ("4000::1", Some(Reserved)),
            // IPv4-mapped, NAT64 and 6to4 forms of internal IPv4 addresses
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("64:ff9b::7f00:1", Some(Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(LinkLocal)),
            ("2002:7f00:1::1", Some(Loopback)),
            ("2002:c0a8:101::", Some(Private)),
            // ... and of public ones
            ("::ffff:1.1.1.1", None),
            ("64:ff9b::101:101", None),
            ("2002:101:101::1", None),
            ("2606:4700:4700::1111", None),
            ("2a00:1450:4001:80e::200e", None),
        ];
        for (ip, want) in cases {
            assert_eq!(class(ip), want, "{ip}");
        }
    }

    #[test]
    fn allowed_networks_open_exactly_their_addresses() {
        let allowed: Vec<IpNet> = vec![
            "127.0.0.0/8".parse().expect("literal"),
            "fd00::/8".parse().expect("literal"),
        ];
        let ok = |ip: &str| check_address(ip.parse().expect("literal"), &allowed);
        assert_eq!(ok("127.0.0.1"), Ok(()));
        assert_eq!(
            ok("::ffff:127.0.0.1"),
            Ok(()),
            "the mapped form of an allowed address"
        );
        assert_eq!(ok("fd00::5"), Ok(()));
        assert_eq!(ok("::1"), Err(Loopback), "::1 is not inside 127.0.0.0/8");
        assert_eq!(ok("10.0.0.1"), Err(Private));
        assert_eq!(ok("169.254.169.254"), Err(LinkLocal));
        assert_eq!(ok("8.8.8.8"), Ok(()), "public addresses need no allowance");
        assert_eq!(
            check_address("127.0.0.1".parse().expect("literal"), &[]),
            Err(Loopback)
        );
    }

    fn strict() -> UrlPolicy {
        UrlPolicy::default()
    }

    #[test]
    fn the_url_crate_normalizes_numeric_host_tricks_before_they_are_judged() {
        // What the `url` crate makes of each form: the check sees the address it means.
        let normalized = [
            ("https://0x7f.1/", "127.0.0.1"),
            ("https://2130706433/", "127.0.0.1"),
            ("https://127.1/", "127.0.0.1"),
            ("https://017700000001/", "127.0.0.1"),
            ("https://0177.0.0.1/", "127.0.0.1"),
            ("https://127.0.0.1./", "127.0.0.1"),
            ("https://0/", "0.0.0.0"),
            ("https://0xa9.0xfe.0xa9.0xfe/", "169.254.169.254"),
            ("https://[::ffff:127.0.0.1]/", "[::ffff:7f00:1]"),
            ("https://[0:0:0:0:0:0:0:1]/", "[::1]"),
            ("https://LOCALHOST/", "localhost"),
            ("https://\u{24db}ocalhost/", "localhost"),
            ("https://localhost./", "localhost."),
        ];
        for (raw, host) in normalized {
            let url = Url::parse(raw).expect("parses");
            assert_eq!(url.host_str(), Some(host), "{raw}");
            assert!(strict().check(raw).is_err(), "{raw} is refused");
        }
        assert_eq!(
            strict().check("https://0x7f.1/"),
            Err(UrlRefusal::Address(Loopback))
        );
        assert_eq!(
            strict().check("https://2130706433/shop"),
            Err(UrlRefusal::Address(Loopback))
        );
        assert_eq!(
            strict().check("https://[::ffff:127.0.0.1]:8443/"),
            Err(UrlRefusal::Address(Loopback))
        );
        assert_eq!(
            strict().check("https://[::ffff:a9fe:a9fe]/"),
            Err(UrlRefusal::Address(LinkLocal))
        );
    }

    #[test]
    fn store_urls_are_https_without_user_info_and_not_internal() {
        let p = strict();
        assert!(p.check("https://shop.example.com/api/").is_ok());
        assert!(p.check("https://93.184.215.14:8443/").is_ok());
        assert!(p.check("https://[2606:4700:4700::1111]/").is_ok());
        assert_eq!(
            p.check("http://shop.example.com/"),
            Err(UrlRefusal::NotHttps)
        );
        assert_eq!(
            p.check("ftp://shop.example.com/"),
            Err(UrlRefusal::BadScheme)
        );
        assert_eq!(p.check("file:///etc/passwd"), Err(UrlRefusal::BadScheme));
        assert_eq!(p.check("not a url"), Err(UrlRefusal::NotAUrl));
        assert_eq!(
            p.check("https://user:pw@shop.example.com/"),
            Err(UrlRefusal::UserInfo)
        );
        assert_eq!(
            p.check("https://user@shop.example.com/"),
            Err(UrlRefusal::UserInfo)
        );
        for (raw, class) in [
            ("https://127.0.0.1/", Loopback),
            ("https://[::1]/", Loopback),
            ("https://10.0.0.5/", Private),
            ("https://172.20.1.1/", Private),
            ("https://192.168.0.10/", Private),
            ("https://[fd00::1]/", Private),
            ("https://169.254.169.254/latest/meta-data/", LinkLocal),
            ("https://[fe80::1]/", LinkLocal),
            ("https://100.100.100.200/", Cgnat),
            ("https://224.0.0.251/", Multicast),
            ("https://[ff02::1]/", Multicast),
            ("https://0.0.0.0/", Unspecified),
            ("https://[::]/", Unspecified),
            ("https://255.255.255.255/", Broadcast),
            ("https://192.0.2.1/", Documentation),
            ("https://240.1.2.3/", Reserved),
        ] {
            assert_eq!(p.check(raw), Err(UrlRefusal::Address(class)), "{raw}");
        }
        for raw in [
            "https://localhost/",
            "https://localhost:8080/",
            "https://LocalHost./",
            "https://shop.localhost/",
            "https://a.b.localhost./",
        ] {
            assert_eq!(p.check(raw), Err(UrlRefusal::Localhost), "{raw}");
        }
        // Names that merely contain "localhost" are judged at connect time.
        assert!(p.check("https://localhost.example.com/").is_ok());
        assert!(p.check("https://notlocalhost/").is_ok());
    }

    #[test]
    fn debug_allows_http_and_allowed_networks_open_internal_hosts() {
        let p = UrlPolicy {
            allow_http: true,
            allowed_networks: vec![
                "127.0.0.0/8".parse().expect("literal"),
                "10.1.0.0/16".parse().expect("literal"),
            ],
        };
        assert!(p.check("http://shop.example.com/").is_ok());
        assert!(p.check("http://127.0.0.1:8080/shop/").is_ok());
        assert!(p.check("http://0x7f.1/").is_ok());
        assert!(p.check("http://[::ffff:127.0.0.1]/").is_ok());
        assert!(
            p.check("http://localhost:8080/").is_ok(),
            "loopback is allowed"
        );
        assert!(p.check("https://10.1.2.3/").is_ok());
        assert_eq!(
            p.check("https://10.2.0.1/"),
            Err(UrlRefusal::Address(Private))
        );
        assert_eq!(
            p.check("https://[::1]/"),
            Err(UrlRefusal::Address(Loopback))
        );
        assert_eq!(p.check("https://u:p@127.0.0.1/"), Err(UrlRefusal::UserInfo));
    }
}
