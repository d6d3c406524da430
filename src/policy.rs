//! The validated, immutable policy and the handle through which every connection reads it.
//!
//! `Policy` is produced only by `config::validate`; once built it never changes. A reload
//! builds a whole new `Policy` and swaps it into the `PolicyHandle` (arc-swap), so a reader
//! never sees half a policy and never takes a lock. Each connection keeps the snapshot it
//! was admitted with.

use std::borrow::Cow;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::HeaderName;
use ipnet::IpNet;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::watch;

/// Whether the policy's refusals are enforced, or only logged and counted (report mode).
#[derive(Debug, serde::Deserialize, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Report,
}

/// What plain (non-upgrade) HTTP requests on a route get.
#[derive(Debug, serde::Deserialize, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    Reject,
    Pass,
}

/// A whole validated policy.
#[derive(Debug)]
pub struct Policy {
    pub mode: Mode,
    pub trusted_proxies: Vec<IpNet>,
    pub max_connections: usize,
    /// Sorted longest path first, so the first match is the longest prefix.
    pub routes: Vec<Arc<Route>>,
    /// Every key, JWKS and CA file the policy read: a change to one of them reloads it.
    pub files: Vec<PathBuf>,
    /// The smallest handshake timeout of any route: it bounds the TLS handshake and
    /// request head, which happen before a route is known.
    pub handshake_timeout: Duration,
}

impl Policy {
    /// The route whose path is the longest whole-segment prefix of `path`.
    ///
    /// `/ws` matches `/ws` and `/ws/x` but not `/wsx`; `/` matches everything.
    pub fn route_for(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| path_has_prefix(path, &r.path))
    }

    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// One route with every field resolved against `defaults` and the built-in defaults.
#[derive(Debug)]
pub struct Route {
    pub path: String,
    /// The metrics' `route` label.
    pub name: String,
    pub upstream: Upstream,
    pub auth: Auth,
    pub origin: OriginRules,
    pub ip: IpRules,
    pub rate: Rate,
    pub messages: Messages,
    pub timeouts: Timeouts,
    pub heartbeat: Heartbeat,
    pub http: HttpMode,
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
}

#[derive(Clone)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: rustls_pki_types::ServerName<'static>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// A verification key, loaded and checked at policy load time.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    pub family: KeyFamily,
    /// Set when the key itself names its algorithm (a JWK's `alg`).
    pub alg: Option<Algorithm>,
    pub decoding: DecodingKey,
}

/// The usable verification keys of a JWKS document.
pub fn parse_jwks(text: &[u8]) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_slice(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => KeyFamily::Ec,
            AlgorithmParameters::OctetKeyPair(_) => KeyFamily::Ed,
            // Symmetric keys do not belong in a published key set.
            AlgorithmParameters::OctetKey(_) => continue,
        };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| Algorithm::from_str(&a.to_string()).ok());
        match DecodingKey::from_jwk(jwk) {
            Ok(decoding) => keys.push(Key {
                kid: jwk.common.key_id.clone(),
                family,
                alg,
                decoding,
            }),
            Err(e) => return Err(format!("key {:?}: {e}", jwk.common.key_id)),
        }
    }
    Ok(keys)
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
#[derive(Debug, Clone)]
pub struct JwksUrl {
    /// The URL fetched; logs and `/policy` show it through [`redact_userinfo`].
    pub url: String,
    pub refresh: Duration,
}

#[derive(Debug)]
pub struct Auth {
    pub required: bool,
    pub token_sources: Vec<TokenSource>,
    pub algorithms: Vec<Algorithm>,
    pub keys: Vec<Key>,
    pub jwks_urls: Vec<JwksUrl>,
    pub issuer: Vec<String>,
    pub audience: Vec<String>,
    pub leeway_seconds: u64,
    pub require_claims: Vec<(String, Vec<String>)>,
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

#[derive(Debug)]
pub struct OriginRules {
    pub allow: Vec<OriginPattern>,
    pub allow_missing: bool,
}

#[derive(Debug)]
pub struct IpRules {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

#[derive(Debug)]
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

#[derive(Debug)]
pub struct Messages {
    pub max_frame_bytes: usize,
    pub max_message_bytes: usize,
    pub per_second: f64,
    pub burst: u32,
    pub allow_text: bool,
    pub allow_binary: bool,
    pub compression: Compression,
}

/// What a route does with permessage-deflate (RFC 7692). Only `off` exists so far: the
/// client's extension offers are not passed upstream, and every message crosses both legs
/// uncompressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Off,
}

#[derive(Debug)]
pub struct Timeouts {
    pub handshake: Duration,
    pub upstream_connect: Duration,
    pub idle: Duration,
    /// `None` = unlimited.
    pub max_lifetime: Option<Duration>,
    pub write: Duration,
}

#[derive(Debug)]
pub struct Heartbeat {
    pub interval: Duration,
    pub timeout: Duration,
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

/// `url` with any user information replaced by `***` (`https://***@host/…`): the form in
/// which a URL may reach a log line or `/policy`. Validation refuses credentials in the
/// policy's URLs; this keeps them out of sight should one ever get through.
pub fn redact_userinfo(url: &str) -> Cow<'_, str> {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return Cow::Borrowed(url);
    };
    let rest = &url[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => Cow::Owned(format!("{}***{}", &url[..start], &rest[at..])),
        None => Cow::Borrowed(url),
    }
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
        let routes: Vec<_> = self
            .policy
            .routes
            .iter()
            .map(|r| {
                let keys: Vec<_> = r
                    .auth
                    .keys
                    .iter()
                    .map(|k| json!({"family": format!("{:?}", k.family), "kid": k.kid}))
                    .collect();
                json!({
                    "name": r.name,
                    "path": r.path,
                    "upstream": r.upstream.url,
                    "http": r.http,
                    "auth": {
                        "required": r.auth.required,
                        "algorithms": r.auth.algorithms.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>(),
                        "keys": keys,
                        "jwks_urls": r.auth.jwks_urls.iter().map(|j| json!({"url": j.url, "refresh_seconds": j.refresh.as_secs()})).collect::<Vec<_>>(),
                        "issuer": r.auth.issuer,
                        "audience": r.auth.audience,
                        "leeway_seconds": r.auth.leeway_seconds,
                        "close_on_expiry": r.auth.close_on_expiry,
                        "forward_token": r.auth.forward_token,
                    },
                    "origin": {
                        "allow": r.origin.allow.iter().map(|o| format!("{o:?}")).collect::<Vec<_>>(),
                        "allow_missing": r.origin.allow_missing,
                    },
                    "ip": {
                        "allow": r.ip.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                        "deny": r.ip.deny.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                    },
                    "rate": {
                        "upgrades_per_second": r.rate.upgrades_per_second,
                        "burst": r.rate.burst,
                        "max_connections_per_ip": r.rate.max_connections_per_ip,
                        "max_connections_per_subject": r.rate.max_connections_per_subject,
                        "ipv6_prefix": r.rate.ipv6_prefix,
                    },
                    "messages": {
                        "max_frame_bytes": r.messages.max_frame_bytes,
                        "max_message_bytes": r.messages.max_message_bytes,
                        "per_second": r.messages.per_second,
                        "burst": r.messages.burst,
                        "text": r.messages.allow_text,
                        "binary": r.messages.allow_binary,
                        "compression": r.messages.compression,
                    },
                    "timeouts": {
                        "handshake_seconds": r.timeouts.handshake.as_secs_f64(),
                        "upstream_connect_seconds": r.timeouts.upstream_connect.as_secs_f64(),
                        "idle_seconds": r.timeouts.idle.as_secs_f64(),
                        "max_lifetime_seconds": r.timeouts.max_lifetime.map_or(0.0, |d| d.as_secs_f64()),
                        "write_seconds": r.timeouts.write.as_secs_f64(),
                    },
                    "heartbeat": {
                        "interval_seconds": r.heartbeat.interval.as_secs_f64(),
                        "timeout_seconds": r.heartbeat.timeout.as_secs_f64(),
                    },
                })
            })
            .collect();
        json!({
            "sha256": self.sha256,
            "loaded_at_unix": loaded_at,
            "source": self.source.display().to_string(),
            "mode": self.policy.mode,
            "trusted_proxies": self.policy.trusted_proxies.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "max_connections": self.policy.max_connections,
            "routes": routes,
            "file": self.document,
        })
    }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(
            redact_userinfo("https://u:pass@keys.example/jwks.json?a=b@c"),
            "https://***@keys.example/jwks.json?a=b@c"
        );
        assert_eq!(redact_userinfo("ws://svc:pass@up:8080"), "ws://***@up:8080");
        assert_eq!(redact_userinfo("ws://user@up"), "ws://***@up");
        assert_eq!(redact_userinfo("ws://a@b:p@ss@up/x"), "ws://***@up/x");
        assert_eq!(redact_userinfo("ws://@up"), "ws://***@up");
        // Nothing to redact: borrowed, untouched.
        for url in [
            "ws://up:8080",
            "https://keys.example/a@b",
            "https://keys.example?x=@",
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
