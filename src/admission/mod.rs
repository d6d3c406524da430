//! Admission: everything decided before the 101, in SPEC §3's order, cheapest first:
//! route → IP allow/deny → global cap → per-IP upgrade rate → per-IP connection cap →
//! Origin → token → required claims → per-subject connection cap → upstream handshake.
//!
//! The route is matched by `http`, the upstream handshake is `upstream`; the checks in
//! between live here. Each failure is a `Rejection`.

mod origin;
mod rejection;
pub mod token;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

pub use rejection::{Rejection, UpstreamRefusal};
pub use token::Claims;

use crate::policy::{Policy, Route, TokenSource};

/// The client's address: the TCP peer, unless the peer is a trusted proxy; then the
/// right-most X-Forwarded-For address that is not itself a trusted proxy.
pub fn client_ip(policy: &Policy, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let peer = canonical(peer);
    if !policy.is_trusted_proxy(peer) {
        return peer;
    }
    let mut client = peer;
    let hops = headers
        .get_all(HeaderName::from_static("x-forwarded-for"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = canonical(ip);
                if !policy.is_trusted_proxy(client) {
                    break;
                }
            }
            // An unparseable hop ends the trusted chain: what lies left of it is unknown.
            Err(_) => break,
        }
    }
    client
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
pub fn ip_allowed(route: &Route, ip: IpAddr) -> bool {
    let within = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&ip));
    !within(&route.ip.deny) && (route.ip.allow.is_empty() || within(&route.ip.allow))
}

/// Open WebSocket connections, for the global `max_connections` cap.
#[derive(Debug, Default)]
pub struct Connections {
    active: AtomicUsize,
}

impl Connections {
    /// Take a slot if fewer than `max` are taken; the slot is freed when the guard drops.
    pub fn try_acquire(self: &Arc<Self>, max: usize) -> Option<ConnectionGuard> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionGuard(self.clone()))
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

/// One open connection's slot in the global cap, released however the connection ends.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Connections>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the upgrade request offers, as admission needs it.
pub struct Attempt<'a> {
    pub client_ip: IpAddr,
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    /// The offered `Sec-WebSocket-Protocol` entries, in order.
    pub protocols: &'a [&'a str],
}

/// An admitted upgrade: what the upstream request and the relay need from admission.
#[derive(Debug)]
pub struct Admitted<'a> {
    pub guard: ConnectionGuard,
    pub claims: Option<Claims>,
    pub claim_headers: Vec<(HeaderName, HeaderValue)>,
    pub token: Option<token::Found<'a>>,
}

impl Admitted<'_> {
    pub fn token_query(&self) -> Option<&str> {
        match self.token.as_ref()?.source {
            TokenSource::Query(name) => Some(name),
            _ => None,
        }
    }
    pub fn token_cookie(&self) -> Option<&str> {
        match self.token.as_ref()?.source {
            TokenSource::Cookie(name) => Some(name),
            _ => None,
        }
    }
    pub fn token_in_header(&self) -> bool {
        matches!(
            self.token.as_ref().map(|t| t.source),
            Some(TokenSource::Header)
        )
    }
    pub fn token_entry(&self) -> Option<&str> {
        self.token.as_ref()?.entry
    }
}

/// Run the checks between route and upstream, in order, stopping at the first failure.
pub fn admit<'a>(
    connections: &Arc<Connections>,
    policy: &Policy,
    route: &'a Route,
    attempt: &Attempt<'a>,
) -> Result<Admitted<'a>, Rejection> {
    if !ip_allowed(route, attempt.client_ip) {
        return Err(Rejection::IpDenied);
    }
    let guard = connections
        .try_acquire(policy.max_connections)
        .ok_or(Rejection::ServerFull)?;
    let origin = attempt
        .headers
        .get(http::header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    if !origin::allowed(&route.origin, origin) {
        return Err(Rejection::OriginNotAllowed);
    }

    let auth = &route.auth;
    let found = token::extract(
        &auth.token_sources,
        attempt.headers,
        attempt.query,
        attempt.protocols,
    );
    let (claims, claim_headers) = match (&found, auth.required) {
        (None, true) => return Err(Rejection::MissingToken),
        (None, false) => (None, Vec::new()),
        (Some(found), _) => {
            let claims = token::verify(found.token, auth)?;
            if !token::claims_allowed(&claims, auth) {
                return Err(Rejection::ClaimsDenied);
            }
            let headers = token::claim_headers(&claims, auth);
            (Some(claims), headers)
        }
    };
    Ok(Admitted {
        guard,
        claims,
        claim_headers,
        token: found,
    })
}
