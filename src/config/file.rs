//! The YAML shape of a policy file: serde structs that mirror docs/policy.md field for field.
//!
//! Every struct denies unknown fields, so a typo is an error instead of a silently weaker
//! policy. Every field is optional here; `validate` fills in the documented defaults and
//! resolves each route's fields against `defaults`.
//!
//! The same structs derive the policy's JSON Schema (`wsgate schema`, through schemars,
//! which reads the serde attributes: `deny_unknown_fields` becomes
//! `additionalProperties: false`), so the schema cannot drift from what is parsed. The doc
//! comments on the fields become the schema's descriptions, which editors show: keep them
//! in step with docs/policy.md.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

/// A wsgate policy file (format version 1). Unknown fields are errors, so a typo never
/// silently weakens a policy; `wsgate check` also applies the rules no schema can express
/// (CIDRs, Origin patterns, key files, limits).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "wsgate policy")]
pub struct PolicyFile {
    /// The policy format version: must be 1.
    #[schemars(extend("const" = 1))]
    pub version: u32,
    /// `enforce` (default): refusals are enforced. `report`: admission failures other than
    /// `server_full` and `draining`, and message-rate and message-type violations, are
    /// logged and counted but let through (a path that matches no route goes on under
    /// `defaults`); size limits and timeouts are always enforced.
    pub mode: Option<Mode>,
    /// CIDRs or bare IPs (default none). X-Forwarded-For is believed only when the TCP peer
    /// is in this list.
    pub trusted_proxies: Option<Vec<String>>,
    /// The global cap on open WebSocket connections, across all routes (default 10000, at
    /// least 1); an upgrade above it gets 503 `server_full`.
    #[schemars(range(min = 1))]
    pub max_connections: Option<u64>,
    /// What every route inherits, field by field: any route field except `path` and `name`.
    /// A list or map a route sets replaces the inherited one whole.
    pub defaults: Option<RouteFields>,
    /// The routes (required, at least one). The longest prefix on whole path segments
    /// wins; a request that matches none gets 404 `no_route` (in report mode it goes on
    /// under `defaults`).
    pub routes: Option<Vec<RouteFile>>,
    /// The listener's HTTP/2 (WebSockets over extended CONNECT, RFC 8441).
    pub http2: Option<Http2>,
    /// Limits shared across replicas through a Redis store: the per-IP upgrade rate and
    /// the per-IP and per-subject connection caps count across every gate with the same
    /// store and `key_prefix`, and revocations reach every gate. Absent or null: every
    /// limit is this process's own.
    pub cluster: Option<ClusterFile>,
}

/// `cluster`: the store shared by the gates of one fleet (top level).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// The environment variable holding the store's `redis://` or `rediss://` (TLS) URL
    /// (required; the URL, which may carry a password, is never written in the policy).
    /// A `rediss://` store's certificate is verified against the system's roots, or the
    /// bundle named by `SSL_CERT_FILE`.
    pub redis_url_env: String,
    /// Prefix of every key and channel the gate uses (default `wsgate:`): gates with the
    /// same store and prefix share their limits. 1 to 64 characters.
    #[schemars(length(min = 1, max = 64))]
    pub key_prefix: Option<String>,
    /// What an upgrade that needs the store gets while the store is unreachable: `open`
    /// (default) falls back to this process's own limits, `closed` refuses with 503
    /// `limits_unavailable`.
    pub on_failure: Option<OnFailure>,
    /// The longest one store round trip may take on the upgrade path, in milliseconds
    /// (default 50, 1 to 10000).
    #[schemars(range(min = 1, max = 10000))]
    pub timeout_ms: Option<u64>,
    /// How long a connection slot outlives the gate that held it, in seconds (default 30,
    /// 3 to 3600): a live gate renews its slots every third of this.
    #[schemars(range(min = 3, max = 3600))]
    pub lease_seconds: Option<u64>,
}

/// `http2`: the listener's HTTP/2 (top level: it is the listener's, not a route's).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Http2 {
    /// HTTP/2 on the listener (default true): ALPN `h2` with TLS, the h2c preface with
    /// `--plaintext`. `false`: HTTP/1.1 only.
    pub enabled: Option<bool>,
    /// Streams one HTTP/2 connection may have open at once, requests and WebSockets
    /// together (default 100, at least 1).
    #[schemars(range(min = 1))]
    pub max_concurrent_streams: Option<u32>,
}

pub use crate::policy::{Compression, HttpMode, Mode, OnFailure};

/// The per-route fields, declared once: `defaults` ([`RouteFields`]), each route
/// ([`RouteFile`]: its identity, then the same fields) and the borrowed view both resolve
/// through ([`RouteFieldsRef`]) are generated from this one list. (serde cannot combine
/// `flatten` with `deny_unknown_fields`, or `RouteFile` would embed `RouteFields`.) A new
/// route field is one line here, its rule in `validate`, and its doc.
macro_rules! route_fields {
    ($($(#[$doc:meta])* $field:ident: $ty:ty,)*) => {
        /// The per-route settings that `defaults` provides and a route may override.
        #[derive(Debug, Default, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct RouteFields {
            $($(#[$doc])* pub $field: Option<$ty>,)*
        }

        /// One route: its path and name, then the fields it overrides.
        #[derive(Debug, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct RouteFile {
            /// The path prefix this route serves (required): starts with `/`, no trailing
            /// `/` (except `/` itself), unique, in normal form. `/ws` matches `/ws` and
            /// `/ws/x` but not `/wsx`.
            pub path: String,
            /// The route's name in logs and the metrics' `route` label (default: the
            /// path); non-empty and unique.
            pub name: Option<String>,
            $($(#[$doc])* pub $field: Option<$ty>,)*
        }

        /// Borrowed view of route settings, so `defaults` and a route resolve the same way.
        #[derive(Debug, Default, Clone, Copy)]
        pub struct RouteFieldsRef<'a> {
            $(pub $field: Option<&'a $ty>,)*
        }

        impl RouteFile {
            /// The overridable part of the route, in the same shape as `defaults`.
            pub fn fields(&self) -> RouteFieldsRef<'_> {
                RouteFieldsRef { $($field: self.$field.as_ref(),)* }
            }
        }

        impl RouteFields {
            pub fn as_ref(&self) -> RouteFieldsRef<'_> {
                RouteFieldsRef { $($field: self.$field.as_ref(),)* }
            }
        }
    };
}

route_fields! {
    /// `ws://` or `wss://` with a host and no path or query (default
    /// `ws://127.0.0.1:8080`); the client's path and query are forwarded. No credentials.
    upstream: String,
    /// TLS to a `wss://` upstream (an error on a `ws://` one).
    upstream_tls: UpstreamTls,
    /// Token checks: where the token is looked for, how it is verified, which claims it
    /// needs and which go upstream.
    auth: Auth,
    /// Which browser origins may upgrade.
    origin: Origin,
    /// Client IP allow and deny lists.
    ip: Ip,
    /// Upgrade rate and connection caps, per client key (IPv4 address or IPv6 prefix).
    rate: Rate,
    /// Size, rate and type limits on the messages the client sends.
    messages: Messages,
    /// Handshake, upstream connect, idle, lifetime and write deadlines, in seconds.
    timeouts: Timeouts,
    /// Pings to the client and how long it has to answer, in seconds.
    heartbeat: Heartbeat,
    /// What plain (non-upgrade) HTTP requests get: `reject` (default, 426 `not_websocket`)
    /// or `pass` (admitted like an upgrade, then proxied to the upstream).
    http: HttpMode,
}

/// `upstream_tls`: how a `wss://` upstream's certificate is checked.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// A PEM CA bundle the upstream's certificate must chain to (default: the compiled-in
    /// Mozilla roots). Relative to the policy file's directory.
    pub ca_file: Option<String>,
    /// The name the upstream's certificate is checked against and sent as SNI (default:
    /// the upstream URL's host).
    pub server_name: Option<String>,
}

/// `auth`: where the token is found, how it is verified, which claims it must carry.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// `true` (default): an upgrade without a token gets 401 `missing_token`. `false`:
    /// tokenless upgrades pass, but a token that is present is still verified.
    pub required: Option<bool>,
    /// Where to look for the token, in order: `header` (Authorization: Bearer),
    /// `query:NAME`, `cookie:NAME`, `subprotocol:PREFIX` (default all four, with
    /// `access_token` and `bearer.`). Every carrier listed is removed before the request
    /// goes upstream.
    pub token_sources: Option<Vec<String>>,
    /// The accepted JWT algorithms, an explicit list (default [RS256, ES256]): HS256 HS384
    /// HS512 RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA. `none` is refused.
    pub algorithms: Option<Vec<String>>,
    /// The verification keys (default none: with `required: true` keys must be set).
    pub keys: Option<Vec<KeyFile>>,
    /// Accepted `iss` values, any of (default: not checked).
    pub issuer: Option<Vec<String>>,
    /// Accepted `aud` values, any of (default: not checked).
    pub audience: Option<Vec<String>>,
    /// Clock skew allowed on `exp` and `nbf`, whole seconds (default 30, at most 3600).
    #[schemars(range(max = 3600))]
    pub leeway_seconds: Option<u64>,
    /// Claim -> accepted values: every listed claim must match one (an array claim: any
    /// element), or 403 `claims_denied`. Default `{}`.
    #[schemars(with = "Option<BTreeMap<String, Vec<ClaimValue>>>")]
    pub require_claims: Option<BTreeMap<String, Vec<String>>>,
    /// Claim -> denied values: a token with any listed claim matching one (an array
    /// claim: any element) gets 403 `claims_denied`, and a reload that adds a match closes
    /// the open connections holding such a token. Default `{}`.
    #[schemars(with = "Option<BTreeMap<String, Vec<ClaimValue>>>")]
    pub deny_claims: Option<BTreeMap<String, Vec<String>>>,
    /// Claim -> request header sent upstream, scalar claims only (default `{}`).
    pub forward_claims: Option<BTreeMap<String, String>>,
    /// Close the connection (1008 "token expired") when `exp` + leeway passes (default
    /// true).
    pub close_on_expiry: Option<bool>,
    /// Keep the carrier that held the verified token on the request sent upstream, for an
    /// upstream that verifies it itself (default false).
    pub forward_token: Option<bool>,
}

/// One entry of `auth.keys`: exactly one source field must be set.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// An environment variable holding an HMAC secret of at least 32 bytes; it must be set
    /// when the policy is loaded.
    pub hmac_secret_env: Option<String>,
    /// A file holding an HMAC secret of at least 32 bytes (trailing whitespace removed).
    pub hmac_secret_file: Option<String>,
    /// An RSA, EC (P-256/P-384) or Ed25519 public key, PEM.
    pub public_key_file: Option<String>,
    /// A JSON Web Key Set file; each key's `kid` (and `alg`, when present) is used.
    pub jwks_file: Option<String>,
    /// An `https://` JWKS URL without credentials, fetched in the background and every
    /// `refresh_seconds`.
    pub jwks_url: Option<String>,
    /// How often a `jwks_url` is refetched, whole seconds (default 300, at least 1; only
    /// with `jwks_url`).
    #[schemars(range(min = 1))]
    pub refresh_seconds: Option<u64>,
    /// Names a single (non-JWKS) key, so tokens carrying a `kid` can select it.
    pub kid: Option<String>,
}

/// `origin`: the browser origins allowed to upgrade.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// `scheme://host[:port]` entries; `https://*.example.com` allows any subdomain.
    /// `"*"`, `null` and a whole top-level domain (`https://*.com`) are refused. Default
    /// none: every request with an Origin is refused.
    pub allow: Option<Vec<String>>,
    /// Whether requests without an Origin header (non-browser clients) may upgrade
    /// (default false).
    pub allow_missing: Option<bool>,
}

/// `ip`: client IP allow and deny lists.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ip {
    /// CIDRs or bare IPs; empty (the default) allows everyone.
    pub allow: Option<Vec<String>>,
    /// CIDRs or bare IPs refused with 403 `ip_denied`; deny wins over allow.
    pub deny: Option<Vec<String>>,
}

/// `rate`: per route, per client key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Upgrades per second per client key, a token bucket (default 20, fractions allowed);
    /// above it 429 `rate_limited`.
    pub upgrades_per_second: Option<f64>,
    /// The upgrade bucket's size (default 100, at least 1).
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
    /// Open connections per client key (default 200, at least 1); above it 429
    /// `too_many_connections`.
    #[schemars(range(min = 1))]
    pub max_connections_per_ip: Option<u32>,
    /// Open connections per token `sub`, across addresses (default 10, at least 1).
    #[schemars(range(min = 1))]
    pub max_connections_per_subject: Option<u32>,
    /// IPv6 clients are keyed by this prefix length (default 64, 1-128).
    #[schemars(range(min = 1, max = 128))]
    pub ipv6_prefix: Option<u8>,
}

/// `messages`: limits on what the client sends (sizes apply both ways).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Messages {
    /// The largest frame accepted from the client (default: the route's
    /// `max_message_bytes`; at most that, 1 to 64 MiB); above it 1009.
    #[schemars(range(min = 1, max = 67108864))]
    pub max_frame_bytes: Option<u64>,
    /// The largest reassembled message, in both directions (default 1048576, 1 to 64 MiB);
    /// above it 1009.
    #[schemars(range(min = 1, max = 67108864))]
    pub max_message_bytes: Option<u64>,
    /// Client messages per second per connection, pings and pongs included, a token bucket
    /// (default 100); above it 1008 "message rate exceeded".
    pub per_second: Option<f64>,
    /// The message bucket's size (default 200, at least 1).
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
    /// The message types the client may send: `text` and/or `binary` (default both).
    pub types: Option<Vec<String>>,
    /// permessage-deflate (RFC 7692): `pass` (default, agreed end to end) or `off`.
    pub compression: Option<Compression>,
}

/// `timeouts`: seconds, fractions allowed, greater than 0 (`max_lifetime_seconds` may be 0)
/// and at most 30 days.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// From TCP accept to a complete request head, TLS included (default 10); the smallest
    /// of all routes applies.
    pub handshake_seconds: Option<f64>,
    /// TCP + TLS + the upstream's WebSocket handshake (default 5); above it 504
    /// `upstream_timeout`.
    pub upstream_connect_seconds: Option<f64>,
    /// No text or binary message either way for this long: 1001 "idle timeout" (default
    /// 300).
    pub idle_seconds: Option<f64>,
    /// The longest a connection may stay open: 1001 "max lifetime" (default 0, unlimited).
    pub max_lifetime_seconds: Option<f64>,
    /// A peer that accepts no bytes for this long is dropped (default 10).
    pub write_seconds: Option<f64>,
}

/// `heartbeat`: seconds, fractions allowed, greater than 0 and at most 30 days.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// How often wsgate pings the client (default 20).
    pub interval_seconds: Option<f64>,
    /// No frame from the client within this long after a ping: 1001 "heartbeat timeout"
    /// (default 10).
    pub timeout_seconds: Option<f64>,
}

/// A claim value as a policy writes it, for the schema only: YAML reads `5` and `true` as a
/// number and a boolean, and the parser takes them as the text it compares with the
/// token's claim (`email_verified: [true]`).
#[derive(schemars::JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum ClaimValue {
    Text(String),
    Number(f64),
    Flag(bool),
}
