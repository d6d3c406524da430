//! The validated, immutable policy and the handle through which every connection reads it.
//!
//! `Policy` is produced only by `config::validate`; once built it never changes. A reload
//! builds a whole new `Policy` and swaps it into the `PolicyHandle` (arc-swap), so a reader
//! never sees half a policy and never takes a lock. Each connection keeps the snapshot it
//! was admitted with.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::HeaderName;
use ipnet::IpNet;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

// The enums the YAML shares with the validated policy derive `JsonSchema` too: their doc
// comments are the descriptions `wsgate schema` gives editors.

/// Whether the policy's refusals are enforced, or only logged and counted (report mode).
#[derive(
    Debug, serde::Deserialize, Clone, Copy, PartialEq, Eq, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every violation is refused or closed.
    Enforce,
    /// Admission failures (except `server_full` and `draining`) and message-rate and
    /// message-type violations are logged and counted, and let through.
    Report,
}

/// What plain (non-upgrade) HTTP requests on a route get.
#[derive(
    Debug, serde::Deserialize, Clone, Copy, PartialEq, Eq, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    /// 426 `not_websocket`.
    Reject,
    /// Admitted like an upgrade (IP, Origin, token and claims; not the upgrade rate or
    /// the caps), then proxied to the upstream.
    Pass,
}

/// What an upgrade that needs the cluster store gets while the store is unreachable.
#[derive(
    Debug, serde::Deserialize, Clone, Copy, PartialEq, Eq, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Decided on this process's own limits (counted in `wsgate_cluster_fallbacks_total`).
    Open,
    /// Refused with 503 `limits_unavailable`.
    Closed,
}

/// The cluster store (`cluster:`): limits shared across the gates of a fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    /// The environment variable the URL was read from.
    pub redis_url_env: String,
    /// The URL read from it (`None`: unset, the store is unreachable); shown with its
    /// user information masked.
    #[serde(rename = "redis_url")]
    pub url: Option<RedisUrl>,
    pub key_prefix: String,
    pub on_failure: OnFailure,
    #[serde(rename = "timeout_ms", serialize_with = "shown::millis")]
    pub timeout: Duration,
    #[serde(rename = "lease_seconds", serialize_with = "shown::whole_seconds")]
    pub lease: Duration,
}

impl Cluster {
    /// Whether `other` names the same store: the same URL and key prefix, the same fleet
    /// (the timeouts, the lease and `on_failure` only say how this gate uses it).
    pub fn same_store(&self, other: &Cluster) -> bool {
        self.url == other.url && self.key_prefix == other.key_prefix
    }
}

/// A store URL, which may carry a password: its `Debug` and serialized forms mask the
/// user information; only [`RedisUrl::expose`] gives the URL itself (to the client).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(pub(crate) String);

impl RedisUrl {
    /// The URL as written, password included: for the Redis client only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_userinfo(&self.0))
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&redact_userinfo(&self.0))
    }
}

/// A whole validated policy.
#[derive(Debug)]
pub struct Policy {
    pub mode: Mode,
    pub trusted_proxies: Vec<IpNet>,
    pub max_connections: usize,
    /// Longest path first, indexed by path.
    pub routes: Routes,
    /// In report mode, what a request that matches no route is let through to: `defaults`,
    /// named `none` (the metrics' label for no route). `None` in enforce mode (404).
    pub unrouted: Option<Arc<Route>>,
    /// Every key, JWKS and CA file the policy read: a change to one of them reloads it.
    pub files: Vec<PathBuf>,
    /// The smallest handshake timeout of any route: it bounds the TLS handshake and
    /// request head, which happen before a route is known.
    pub handshake_timeout: Duration,
    pub http2: Http2,
    /// `None`: every limit is this process's own.
    pub cluster: Option<Cluster>,
}

/// The listener's HTTP/2 (RFC 8441 WebSockets on extended CONNECT streams).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Http2 {
    /// ALPN offers `h2` on TLS, and h2c with prior knowledge is accepted on plaintext.
    pub enabled: bool,
    /// Streams one TCP connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
}

impl Policy {
    /// The route whose path is the longest whole-segment prefix of `path`.
    ///
    /// `/ws` matches `/ws` and `/ws/x` but not `/wsx`; `/` matches everything.
    pub fn route_for(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.longest_prefix(path)
    }

    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

/// A policy's routes, longest path first, with an index by path: finding a request's
/// route costs a lookup per segment of its path, however many routes there are.
#[derive(Default)]
pub struct Routes {
    sorted: Vec<Arc<Route>>,
    /// Each route's position in `sorted`, by its path (validation makes paths unique).
    by_path: HashMap<String, usize>,
}

impl Routes {
    /// The route whose path is `path` or its longest whole-segment prefix: `path`
    /// itself, then each shorter prefix ending before a `/`, then `/` (which matches
    /// everything).
    fn longest_prefix(&self, path: &str) -> Option<&Arc<Route>> {
        // No prefix longer than the longest route is looked up.
        let longest = self.sorted.first().map_or(0, |r| r.path.len());
        let mut prefix = path;
        loop {
            if prefix.len() <= longest {
                if let Some(&at) = self.by_path.get(prefix) {
                    return self.sorted.get(at);
                }
            }
            match prefix.rfind('/') {
                Some(cut) if cut > 0 => prefix = &prefix[..cut],
                _ => break,
            }
        }
        let &at = self.by_path.get("/")?;
        self.sorted.get(at)
    }
}

impl From<Vec<Arc<Route>>> for Routes {
    fn from(mut sorted: Vec<Arc<Route>>) -> Routes {
        sorted.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        let by_path = sorted
            .iter()
            .enumerate()
            .map(|(at, r)| (r.path.clone(), at))
            .collect();
        Routes { sorted, by_path }
    }
}

/// The routes, longest path first; the index is derived from them (and a `HashMap`'s
/// order would make two equal policies print differently).
impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.sorted).finish()
    }
}

impl<'a> IntoIterator for &'a Routes {
    type Item = &'a Arc<Route>;
    type IntoIter = std::slice::Iter<'a, Arc<Route>>;

    fn into_iter(self) -> Self::IntoIter {
        self.sorted.iter()
    }
}

impl std::ops::Deref for Routes {
    type Target = [Arc<Route>];

    fn deref(&self) -> &[Arc<Route>] {
        &self.sorted
    }
}

/// One route with every field resolved against `defaults` and the built-in defaults.
/// Serialized, it is what `GET /policy` shows of the route (see [`Loaded::describe`]):
/// secrets cannot be shown, their types are not serializable and are skipped.
#[derive(Debug, Serialize)]
pub struct Route {
    pub path: String,
    /// The metrics' `route` label.
    pub name: String,
    #[serde(serialize_with = "shown::upstream")]
    pub upstream: Upstream,
    pub auth: Auth,
    pub origin: OriginRules,
    pub ip: IpRules,
    pub rate: Rate,
    pub messages: Messages,
    pub timeouts: Timeouts,
    pub heartbeat: Heartbeat,
    pub http: HttpMode,
    /// Every header name any route's `forward_claims` sets, this one's and the others':
    /// a client's copy never goes upstream, so that a header one route sets from a token
    /// cannot be sent by a client of another route to an upstream they share.
    #[serde(skip)]
    pub claim_header_names: Arc<[HeaderName]>,
    /// This is the policy's `unrouted`: no route matched, and report mode let it through.
    #[serde(skip)]
    pub unrouted: bool,
}

/// Where a route's connections go.
#[derive(Clone)]
pub struct Upstream {
    /// `host:port`, what the TCP connection dials.
    pub authority: String,
    /// The Host header sent upstream (the port is omitted when it is the scheme's default).
    pub host_header: String,
    /// `Some` for `wss://`.
    pub tls: Option<UpstreamTls>,
    /// The URL as written, for logs and `/policy`, passed through [`redact_userinfo`].
    pub url: String,
    /// Where `authority` was last found to be (shared by the routes that share the URL's
    /// definition; a reload starts afresh).
    pub resolved: Arc<Resolved>,
    /// The upstream handshake's fixed request lines (Host, Connection, Upgrade, version),
    /// written once here rather than on every upgrade.
    pub handshake_lines: String,
}

/// The upstream handshake's fixed request lines for an upstream whose Host header is
/// `host` (a URI's host and port: no CR or LF).
pub fn handshake_lines(host: &str) -> String {
    format!(
        "host: {host}\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n"
    )
}

/// An upstream host name's addresses, kept for [`Resolved::KEEP`] after a lookup so that
/// each upgrade does not resolve it again (a literal IP address needs no lookup at all).
#[derive(Default)]
pub struct Resolved {
    last: std::sync::Mutex<Option<(std::time::Instant, Arc<[std::net::SocketAddr]>)>>,
}

impl Resolved {
    /// How long a lookup's answer is used: Envoy's default DNS refresh rate. A Service's
    /// address that changes is dialled within this long.
    pub const KEEP: std::time::Duration = std::time::Duration::from_secs(5);

    fn last(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(std::time::Instant, Arc<[std::net::SocketAddr]>)>> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The addresses of a lookup made less than [`Resolved::KEEP`] ago.
    pub fn current(&self) -> Option<Arc<[std::net::SocketAddr]>> {
        let last = self.last();
        let (at, addresses) = last.as_ref()?;
        (at.elapsed() < Self::KEEP).then(|| addresses.clone())
    }

    pub fn store(&self, addresses: Arc<[std::net::SocketAddr]>) {
        *self.last() = Some((std::time::Instant::now(), addresses));
    }

    /// Forget them (none of them answered): the next upgrade looks the name up again.
    pub fn forget(&self) {
        *self.last() = None;
    }
}

#[derive(Clone)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: rustls_pki_types::ServerName<'static>,
    /// The CA bundle as the policy names it (`None`: the webpki roots), for `/policy`.
    pub ca_file: Option<String>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`
    Header,
    Query(String),
    Cookie(String),
    /// A `Sec-WebSocket-Protocol` entry starting with this prefix (browsers cannot set
    /// headers on a WebSocket).
    Subprotocol(String),
}

/// The source as a policy names it: `header`, `query:NAME`, `cookie:NAME`,
/// `subprotocol:PREFIX`.
impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Header => f.write_str("header"),
            TokenSource::Query(name) => write!(f, "query:{name}"),
            TokenSource::Cookie(name) => write!(f, "cookie:{name}"),
            TokenSource::Subprotocol(prefix) => write!(f, "subprotocol:{prefix}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum KeyFamily {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

impl KeyFamily {
    pub fn of(alg: Algorithm) -> KeyFamily {
        match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => KeyFamily::Hmac,
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => KeyFamily::Rsa,
            Algorithm::ES256 | Algorithm::ES384 => KeyFamily::Ec,
            Algorithm::EdDSA => KeyFamily::Ed,
        }
    }
}

/// A verification key, loaded and checked at policy load time. Shown by its family and
/// `kid` only, never by its material.
#[derive(Clone, Serialize)]
pub struct Key {
    pub kid: Option<String>,
    pub family: KeyFamily,
    /// Set when the key itself names its algorithm (a JWK's `alg`).
    #[serde(skip)]
    pub alg: Option<Algorithm>,
    #[serde(skip)]
    pub decoding: DecodingKey,
}

/// What a JWKS document holds for the gate.
pub struct KeySet {
    /// The keys a token may be verified with.
    pub keys: Vec<Key>,
    /// One line for each member the gate could not read as a key (a `kty` or `crv` it does
    /// not know, a member missing, material that does not decode): ignored, as RFC 7517 §5
    /// asks, so that an issuer publishing a new kind of key beside its signing keys does
    /// not take them all away.
    pub ignored: Vec<String>,
}

/// The keys of a JWKS document. Only a document that is not a JWKS at all is an error.
pub fn parse_jwks(text: &[u8]) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document =
        serde_json::from_slice(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut set = KeySet {
        keys: Vec::new(),
        ignored: Vec::new(),
    };
    for member in &document.keys {
        let jwk = match Jwk::deserialize(member) {
            Ok(jwk) => jwk,
            Err(_) => {
                let why = if member.is_object() {
                    "not a key type the gate knows (RSA; EC on P-256, P-384 or P-521; OKP \
                     Ed25519), or a member it needs is missing"
                } else {
                    "not a JSON object"
                };
                set.ignored
                    .push(format!("{}: {why}", describe_member(member)));
                continue;
            }
        };
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => KeyFamily::Ec,
            AlgorithmParameters::OctetKeyPair(_) => KeyFamily::Ed,
            // Symmetric keys do not belong in a published key set.
            AlgorithmParameters::OctetKey(_) => continue,
        };
        // A key published for encryption (Keycloak's `RSA-OAEP` key, `"use": "enc"`, or
        // `key_ops` without `verify`) never verifies a signature, and neither does one
        // whose `alg` is not a JWS algorithm the gate verifies with (RFC 7517 §4.2-4.4).
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) {
            continue;
        }
        if let Some(operations) = &jwk.common.key_operations {
            if !operations.contains(&KeyOperations::Verify) {
                continue;
            }
        }
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(a) => match Algorithm::from_str(&a.to_string()) {
                Ok(alg) => Some(alg),
                Err(_) => continue,
            },
        };
        match DecodingKey::from_jwk(&jwk) {
            Ok(decoding) => set.keys.push(Key {
                kid: jwk.common.key_id.clone(),
                family,
                alg,
                decoding,
            }),
            Err(e) => set.ignored.push(format!(
                "{}: its material does not decode ({e})",
                describe_member(member)
            )),
        }
    }
    Ok(set)
}

/// A JWKS member named by what it says it is: `kid`, `kty` and `crv` (never its material).
fn describe_member(member: &serde_json::Value) -> String {
    let field = |name: &str| match member.get(name) {
        Some(serde_json::Value::String(s)) => format!("{s:?}"),
        Some(other) => other.to_string(),
        None => "none".to_owned(),
    };
    let mut described = format!("key (kid {}, kty {}", field("kid"), field("kty"));
    if member.get("crv").is_some() {
        described.push_str(&format!(", crv {}", field("crv")));
    }
    described.push(')');
    described
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

/// A JWKS fetched over HTTPS at run time.
#[derive(Debug, Clone, Serialize)]
pub struct JwksUrl {
    /// The URL fetched; logs and `/policy` show it through [`redact_userinfo`].
    pub url: String,
    #[serde(rename = "refresh_seconds", serialize_with = "shown::whole_seconds")]
    pub refresh: Duration,
}

#[derive(Debug, Serialize)]
pub struct Auth {
    pub required: bool,
    #[serde(serialize_with = "shown::display_each")]
    pub token_sources: Vec<TokenSource>,
    pub algorithms: Vec<Algorithm>,
    pub keys: Vec<Key>,
    pub jwks_urls: Vec<JwksUrl>,
    pub issuer: Vec<String>,
    pub audience: Vec<String>,
    pub leeway_seconds: u64,
    #[serde(serialize_with = "shown::pairs")]
    pub require_claims: Vec<(String, Vec<String>)>,
    /// Claim → values: a token with any of them is refused (the opposite of
    /// `require_claims`, judged by the same rule).
    #[serde(serialize_with = "shown::pairs")]
    pub deny_claims: Vec<(String, Vec<String>)>,
    #[serde(serialize_with = "shown::forwarded_claims")]
    pub forward_claims: Vec<(String, HeaderName)>,
    pub close_on_expiry: bool,
    /// Keep the carrier of the verified token on the request upstream (for upstreams that
    /// verify it themselves); every other token carrier is still removed.
    pub forward_token: bool,
}

/// The port a browser leaves out of an Origin for this scheme.
pub fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "https" | "wss" => Some(443),
        "http" | "ws" => Some(80),
        _ => None,
    }
}

/// An Origin's bracketed IPv6 host (`[0:0::1]`) as browsers serialise it (`[::1]`:
/// compressed lowercase hex, a mapped IPv4 address in hex too); `None` if it is not one.
pub fn ipv6_origin_host(host: &str) -> Option<String> {
    let address = host
        .strip_prefix('[')?
        .strip_suffix(']')?
        .parse::<std::net::Ipv6Addr>()
        .ok()?;
    Some(match address.to_ipv4_mapped() {
        Some(_) => {
            let s = address.segments();
            format!("[::ffff:{:x}:{:x}]", s[6], s[7])
        }
        None => format!("[{address}]"),
    })
}

/// One `origin.allow` entry, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    /// `scheme://host[:port]`, compared whole.
    Exact(String),
    /// `scheme://*.domain[:port]`: one or more labels before `.domain`, never `domain` itself.
    Subdomains {
        scheme: String,
        domain: String,
        port: Option<u16>,
    },
}

/// The pattern as an operator writes it (`/policy` shows it so).
impl std::fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OriginPattern::Exact(origin) => f.write_str(origin),
            OriginPattern::Subdomains {
                scheme,
                domain,
                port,
            } => {
                write!(f, "{scheme}://*.{domain}")?;
                match port {
                    Some(port) => write!(f, ":{port}"),
                    None => Ok(()),
                }
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct OriginRules {
    #[serde(serialize_with = "shown::display_each")]
    pub allow: Vec<OriginPattern>,
    pub allow_missing: bool,
}

#[derive(Debug, Serialize)]
pub struct IpRules {
    #[serde(serialize_with = "shown::display_each")]
    pub allow: Vec<IpNet>,
    #[serde(serialize_with = "shown::display_each")]
    pub deny: Vec<IpNet>,
}

/// The longest time between two upgrades a rate can mean: a rate below one a year (any
/// positive number is a valid policy) counts as one a year, the same in practice, where
/// its exact period would overflow the limiters' clocks.
pub const LONGEST_UPGRADE_PERIOD: Duration = Duration::from_secs(365 * 24 * 3600);

/// The time between two upgrades at `upgrades_per_second`, at most
/// [`LONGEST_UPGRADE_PERIOD`] (the local limiter and the cluster's script both count it).
pub fn upgrade_period(upgrades_per_second: f64) -> Duration {
    Duration::try_from_secs_f64(1.0 / upgrades_per_second)
        .map_or(LONGEST_UPGRADE_PERIOD, |p| p.min(LONGEST_UPGRADE_PERIOD))
}

#[derive(Debug, Serialize)]
pub struct Rate {
    pub upgrades_per_second: f64,
    pub burst: u32,
    pub max_connections_per_ip: u32,
    pub max_connections_per_subject: u32,
    pub ipv6_prefix: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Text,
    Binary,
}

#[derive(Debug, Serialize)]
pub struct Messages {
    pub max_frame_bytes: usize,
    pub max_message_bytes: usize,
    pub per_second: f64,
    pub burst: u32,
    #[serde(rename = "text")]
    pub allow_text: bool,
    #[serde(rename = "binary")]
    pub allow_binary: bool,
    pub compression: Compression,
}

/// What a route does with permessage-deflate (RFC 7692).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// The client's permessage-deflate offers go upstream and the upstream's answer comes
    /// back, so the extension is agreed end to end; compressed messages are relayed as
    /// they are and inflated on the way only to be checked.
    Pass,
    /// The client's extension offers are not passed upstream: every message crosses both
    /// legs uncompressed.
    Off,
}

#[derive(Debug, Serialize)]
pub struct Timeouts {
    #[serde(rename = "handshake_seconds", serialize_with = "shown::seconds")]
    pub handshake: Duration,
    #[serde(rename = "upstream_connect_seconds", serialize_with = "shown::seconds")]
    pub upstream_connect: Duration,
    #[serde(rename = "idle_seconds", serialize_with = "shown::seconds")]
    pub idle: Duration,
    /// `None` = unlimited (shown as 0).
    #[serde(
        rename = "max_lifetime_seconds",
        serialize_with = "shown::seconds_or_zero"
    )]
    pub max_lifetime: Option<Duration>,
    #[serde(rename = "write_seconds", serialize_with = "shown::seconds")]
    pub write: Duration,
}

#[derive(Debug, Serialize)]
pub struct Heartbeat {
    #[serde(rename = "interval_seconds", serialize_with = "shown::seconds")]
    pub interval: Duration,
    #[serde(rename = "timeout_seconds", serialize_with = "shown::seconds")]
    pub timeout: Duration,
}

/// How `GET /policy` shows the fields whose Rust form is not their JSON form.
mod shown {
    use std::time::Duration;

    use serde::Serializer;

    pub fn upstream<S: Serializer>(u: &super::Upstream, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&u.url)
    }

    pub fn seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn seconds_or_zero<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.map_or(0.0, |d| d.as_secs_f64()))
    }

    pub fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn whole_seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn display_each<S: Serializer, T: std::fmt::Display>(
        items: &[T],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(items.iter().map(|i| i.to_string()))
    }

    /// Claim → values, as a map.
    pub fn pairs<S: Serializer>(pairs: &[(String, Vec<String>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
    }

    /// Claim → header name, as a map.
    pub fn forwarded_claims<S: Serializer>(
        pairs: &[(String, http::HeaderName)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(pairs.iter().map(|(k, v)| (k, v.as_str())))
    }
}

/// Something a valid policy does that is likely a mistake (a key no algorithm of its route
/// can use), at a field path. `wsgate check` prints it and exits 0; loading and reloading
/// log it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldWarning {
    pub field: String,
    pub message: String,
}

/// A policy as loaded: the policy plus where it came from.
#[derive(Debug)]
pub struct Loaded {
    pub policy: Policy,
    /// What validation found likely wrong but not invalid (logged when loaded).
    pub warnings: Vec<FieldWarning>,
    /// The file as loaded, as JSON (it holds names of secrets, never secrets).
    pub document: serde_json::Value,
    /// Hex sha256 of the file's bytes.
    pub sha256: String,
    pub loaded_at: SystemTime,
    pub source: PathBuf,
}

/// Where the authority at the start of `s` (what follows a URL's `://`) ends, at `/`,
/// `?`, `#`, a quote or whitespace, and where in it the user information ends (its last
/// `@`), if it has any: what every form of a URL shown in a log line, `/policy` or an
/// error hides.
pub(crate) fn authority_userinfo(s: &str) -> (Option<usize>, usize) {
    let end = s
        .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '`') || c.is_whitespace())
        .unwrap_or(s.len());
    (s[..end].rfind('@'), end)
}

/// `url` with any user information and every query value replaced by `***`
/// (`https://***@host/jwks?api_key=***`): the form in which a URL may reach a log line or
/// `/policy`. Validation refuses user information in the policy's URLs; a key server may
/// still take a key in its query (`?api_key=…`), and `/policy` has no authentication.
pub fn redact_userinfo(url: &str) -> Cow<'_, str> {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return Cow::Borrowed(url);
    };
    let rest = &url[start..];
    let (userinfo, authority_end) = authority_userinfo(rest);
    let authority = &rest[..authority_end];
    let query = rest.find('?').map(|q| {
        let end = rest[q..].find('#').map_or(rest.len(), |h| q + h);
        (q, end)
    });
    let query_has_values = query.is_some_and(|(q, end)| rest[q..end].contains('='));
    if userinfo.is_none() && !query_has_values {
        return Cow::Borrowed(url);
    }
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..start]);
    let after_authority = match userinfo {
        Some(at) => {
            out.push_str("***");
            out.push_str(&authority[at..]);
            authority_end
        }
        None => 0,
    };
    match query {
        Some((q, end)) => {
            out.push_str(&rest[after_authority..=q]);
            let pairs: Vec<String> = rest[q + 1..end]
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) => format!("{name}=***"),
                    None => pair.to_owned(),
                })
                .collect();
            out.push_str(&pairs.join("&"));
            out.push_str(&rest[end..]);
        }
        None => out.push_str(&rest[after_authority..]),
    }
    Cow::Owned(out)
}

/// Every string in `value` through [`redact_userinfo`].
fn redact_strings(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::String(s) => {
            if let Cow::Owned(redacted) = redact_userinfo(s) {
                *s = redacted;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_strings),
        Value::Object(map) => map.values_mut().for_each(redact_strings),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

impl Loaded {
    /// What `GET /policy` shows: the file as loaded, each route as resolved, the file's
    /// sha256 and the load time. Key material is never included: keys are described by
    /// kind and `kid` only; user information in any URL is redacted.
    pub fn describe(&self) -> serde_json::Value {
        let mut described = self.describe_raw();
        redact_strings(&mut described);
        described
    }

    fn describe_raw(&self) -> serde_json::Value {
        use serde_json::json;
        let loaded_at = self
            .loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({
            "sha256": self.sha256,
            "loaded_at_unix": loaded_at,
            "source": self.source.display().to_string(),
            "mode": self.policy.mode,
            "trusted_proxies": self.policy.trusted_proxies.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "max_connections": self.policy.max_connections,
            "http2": self.policy.http2,
            "cluster": self.policy.cluster,
            "routes": self.policy.routes.iter().map(|r| described_route(r)).collect::<Vec<_>>(),
            "file": self.document,
        })
    }
}

/// A route as `GET /policy` shows it, with its resolved `upstream_tls` for a wss://
/// upstream (`ca_file` as written, `null` for the webpki roots; the server name checked).
fn described_route(route: &Route) -> serde_json::Value {
    let mut value = serde_json::to_value(route).unwrap_or_default();
    if let (Some(tls), Some(map)) = (&route.upstream.tls, value.as_object_mut()) {
        map.insert(
            "upstream_tls".to_owned(),
            serde_json::json!({
                "ca_file": tls.ca_file,
                "server_name": tls.server_name.to_str(),
            }),
        );
    }
    value
}

/// The policy in force. Cheap to clone; reads are lock-free.
#[derive(Clone)]
pub struct PolicyHandle {
    current: Arc<ArcSwap<Loaded>>,
    changed: watch::Sender<u64>,
}

impl PolicyHandle {
    pub fn new(loaded: Loaded) -> PolicyHandle {
        let (changed, _) = watch::channel(0);
        PolicyHandle {
            current: Arc::new(ArcSwap::from_pointee(loaded)),
            changed,
        }
    }

    /// The policy in force now: take it once per decision and keep the snapshot.
    pub fn load(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Swap in a new, already validated policy and wake everyone watching for changes.
    pub fn store(&self, loaded: Loaded) {
        self.current.store(Arc::new(loaded));
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Notified after each swap (the open-connection re-check listens here).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The policy in force now, and a receiver that will see every swap after it: taken in
    /// that order, so that a swap landing between the two is never missed (at worst it is
    /// seen once more than needed).
    pub fn load_watched(&self) -> (Arc<Loaded>, watch::Receiver<u64>) {
        let changes = self.subscribe();
        (self.load(), changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lookup's answer is used until it is [`Resolved::KEEP`] old or forgotten.
    #[test]
    fn resolved_addresses_are_kept_then_forgotten() {
        let resolved = Resolved::default();
        assert!(resolved.current().is_none());
        let addresses: Arc<[std::net::SocketAddr]> =
            Arc::from(vec!["127.0.0.1:1".parse().unwrap()]);
        resolved.store(addresses.clone());
        assert_eq!(resolved.current().as_deref(), Some(&addresses[..]));
        resolved.forget();
        assert!(resolved.current().is_none());
        let old = std::time::Instant::now().checked_sub(Resolved::KEEP);
        if let Some(old) = old {
            *resolved.last() = Some((old, addresses));
            assert!(
                resolved.current().is_none(),
                "an answer KEEP old is looked up again"
            );
        }
    }

    /// The indexed lookup answers as a scan of every route for the longest whole-segment
    /// prefix would: `/ws` matches `/ws` and `/ws/x`, not `/wsx`; `/` matches everything.
    #[test]
    fn route_lookup_finds_the_longest_whole_segment_prefix() {
        let paths = ["/", "/a", "/a/b", "/a/b/c", "/ab", "/b/c", "/x/y/z/w"];
        let mut yaml = String::from("version: 1\ndefaults: {auth: {required: false}}\nroutes:\n");
        for path in paths {
            yaml.push_str(&format!("  - path: {path}\n"));
        }
        let loaded =
            crate::config::load_bytes(std::path::Path::new("policy.yaml"), yaml.as_bytes())
                .expect("the policy is valid");
        let policy = &loaded.policy;
        let without_root: Routes = policy
            .routes
            .iter()
            .filter(|r| r.path != "/")
            .cloned()
            .collect::<Vec<_>>()
            .into();
        let requests = [
            "/",
            "/a",
            "/a/",
            "/a/b",
            "/a/bc",
            "/a/b/",
            "/a/b/c",
            "/a/b/c/d/e",
            "/ab",
            "/ab/c",
            "/abc",
            "/b",
            "/b/c",
            "/b/cd",
            "/b/c/d",
            "/x/y/z",
            "/x/y/z/w/v",
            "/x/y/z/ww",
            "/z",
        ];
        for routes in [&policy.routes, &without_root] {
            for request in requests {
                let scanned = routes
                    .iter()
                    .filter(|r| {
                        r.path == "/"
                            || request
                                .strip_prefix(r.path.as_str())
                                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
                    })
                    .max_by_key(|r| r.path.len())
                    .map(|r| r.path.as_str());
                let found = routes.longest_prefix(request).map(|r| r.path.as_str());
                assert_eq!(found, scanned, "the route for {request}");
            }
        }
        assert_eq!(
            policy.route_for("/a/b/c/d").map(|r| r.path.as_str()),
            Some("/a/b/c")
        );
        assert_eq!(
            without_root.longest_prefix("/z").map(|r| r.path.as_str()),
            None
        );
    }

    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(
            redact_userinfo("https://u:pass@keys.example/jwks.json?a=b@c"),
            "https://***@keys.example/jwks.json?a=***"
        );
        // A key in the query is a credential too.
        assert_eq!(
            redact_userinfo("https://keys.example/jwks.json?api_key=SECRET&tenant=x&flag#f"),
            "https://keys.example/jwks.json?api_key=***&tenant=***&flag#f"
        );
        assert_eq!(redact_userinfo("ws://svc:pass@up:8080"), "ws://***@up:8080");
        assert_eq!(redact_userinfo("ws://user@up"), "ws://***@up");
        assert_eq!(redact_userinfo("ws://a@b:p@ss@up/x"), "ws://***@up/x");
        assert_eq!(redact_userinfo("ws://@up"), "ws://***@up");
        // Nothing to redact: borrowed, untouched.
        for url in [
            "ws://up:8080",
            "https://keys.example/a@b",
            "https://keys.example?flag",
            "https://keys.example#@",
            "alice@example.com",
            "",
            "://",
        ] {
            assert!(
                matches!(redact_userinfo(url), Cow::Borrowed(u) if u == url),
                "{url}"
            );
        }
    }

    #[test]
    fn policy_description_redacts_userinfo() {
        let yaml = b"version: 1\ndefaults:\n  auth: {required: false}\nroutes:\n  - path: /ws\n";
        let mut loaded =
            crate::config::load_bytes(std::path::Path::new("policy.yaml"), yaml).unwrap();
        // Validation refuses credentials in URLs; were one ever to get through:
        loaded.document["defaults"]["upstream"] = "ws://svc:hunter2@up:8080".into();
        let described = loaded.describe().to_string();
        assert!(!described.contains("hunter2"), "{described}");
        assert!(described.contains("ws://***@up:8080"), "{described}");
    }
}
