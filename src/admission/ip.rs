//! The client's address, its rate/cap key, and the route's allow/deny lists.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::policy::{Policy, Route};

/// Who is on the other end of a request, worked out once per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The client's address (see [`client_ip`]).
    pub client_ip: IpAddr,
    /// Whether the TCP peer is one of the policy's trusted proxies (its forwarding
    /// headers are then extended, not replaced).
    pub trusted: bool,
}

/// The client behind a TCP peer at `addr` that sent `headers`.
pub fn peer(policy: &Policy, addr: IpAddr, headers: &HeaderMap) -> Peer {
    let addr = canonical(addr);
    let trusted = policy.is_trusted_proxy(addr);
    Peer {
        client_ip: if trusted {
            forwarded_client(policy, addr, headers)
        } else {
            addr
        },
        trusted,
    }
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy; then the
/// right-most X-Forwarded-For address that is not itself a trusted proxy.
pub fn client_ip(policy: &Policy, peer_addr: IpAddr, headers: &HeaderMap) -> IpAddr {
    peer(policy, peer_addr, headers).client_ip
}

/// The right-most X-Forwarded-For address that is not a trusted proxy, behind the trusted
/// proxy `peer`.
fn forwarded_client(policy: &Policy, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let mut client = peer;
    let hops = headers
        .get_all(HeaderName::from_static("x-forwarded-for"))
        .iter()
        // A line that is not text is one entry that does not parse: it stops the walk.
        .map(|v| v.to_str().unwrap_or("not text"))
        .flat_map(|v| v.split(','))
        // Empty elements are not entries (RFC 9110 §5.6.1): `a,` and an empty line are `a`.
        .filter(|hop| !hop.trim().is_empty())
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        match parse_hop(hop) {
            Some(ip) => {
                client = canonical(ip);
                if !policy.is_trusted_proxy(client) {
                    break;
                }
            }
            // An unparseable hop ends the trusted chain: what lies left of it is unknown.
            None => break,
        }
    }
    client
}

/// One X-Forwarded-For entry: an address, `v4:port`, `[v6]` or `[v6]:port`; anything
/// else (`[::1`, `10.0.0.1:x`) is not an address.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    let port = |p: &str| p.parse::<u16>().is_ok();
    if let Some(rest) = hop.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port)) {
            return None;
        }
        return v6.parse().ok().map(IpAddr::V6);
    }
    let (v4, p) = hop.rsplit_once(':')?;
    if !port(p) {
        return None;
    }
    v4.parse().ok().map(IpAddr::V4)
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are their IPv4 address, so IPv4 CIDRs
/// match them.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Deny wins over allow; an empty allow list allows everyone.
pub fn allowed(route: &Route, ip: IpAddr) -> bool {
    let within = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&ip));
    !within(&route.ip.deny) && (route.ip.allow.is_empty() || within(&route.ip.allow))
}

/// What rates and caps count by: the IPv4 address, or the IPv6 address's `/prefix`
/// network (one host usually holds a whole /64).
pub fn client_key(ip: IpAddr, ipv6_prefix: u8) -> IpNet {
    match ip {
        IpAddr::V4(v4) => IpNet::V4(Ipv4Net::from(v4)),
        IpAddr::V6(v6) => Ipv6Net::new(v6, ipv6_prefix.min(128))
            .map(|n| IpNet::V6(n.trunc()))
            .unwrap_or(IpNet::V6(Ipv6Net::from(v6))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops() {
        assert_eq!(parse_hop(" 10.0.0.1 "), "10.0.0.1".parse().ok());
        assert_eq!(parse_hop("10.0.0.1:443"), "10.0.0.1".parse().ok());
        assert_eq!(parse_hop("[2001:db8::1]:443"), "2001:db8::1".parse().ok());
        assert_eq!(parse_hop("2001:db8::1"), "2001:db8::1".parse().ok());
        assert_eq!(parse_hop("unknown"), None);
        assert_eq!(parse_hop("[::1"), None);
        assert_eq!(parse_hop("[::1]x"), None);
        assert_eq!(parse_hop("[10.0.0.1]"), None);
        assert_eq!(parse_hop("10.0.0.1:port"), None);
    }

    #[test]
    fn keys() {
        let a = client_key("2001:db8::1".parse().unwrap(), 64);
        let b = client_key("2001:db8::ffff".parse().unwrap(), 64);
        let c = client_key("2001:db8:0:1::1".parse().unwrap(), 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            canonical("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }
}
