//! The YAML shape of a policy file: serde structs that mirror docs/policy.md field for field.
//!
//! Every struct denies unknown fields, so a typo is an error instead of a silently weaker
//! policy. Every field is optional here; `validate` fills in the documented defaults and
//! resolves each route's fields against `defaults`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A whole policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub version: u32,
    pub mode: Option<Mode>,
    pub trusted_proxies: Option<Vec<String>>,
    pub max_connections: Option<u64>,
    pub defaults: Option<RouteFields>,
    pub routes: Option<Vec<RouteFile>>,
    pub http2: Option<Http2>,
}

/// `http2`: the listener's HTTP/2 (top level: it is the listener's, not a route's).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http2 {
    pub enabled: Option<bool>,
    pub max_concurrent_streams: Option<u32>,
}

pub use crate::policy::{Compression, HttpMode, Mode};

/// The per-route fields, declared once: `defaults` ([`RouteFields`]), each route
/// ([`RouteFile`]: its identity, then the same fields) and the borrowed view both resolve
/// through ([`RouteFieldsRef`]) are generated from this one list. (serde cannot combine
/// `flatten` with `deny_unknown_fields`, or `RouteFile` would embed `RouteFields`.) A new
/// route field is one line here, its rule in `validate`, and its doc.
macro_rules! route_fields {
    ($($(#[$doc:meta])* $field:ident: $ty:ty,)*) => {
        /// The per-route settings that `defaults` provides and a route may override.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct RouteFields {
            $($(#[$doc])* pub $field: Option<$ty>,)*
        }

        /// One route: its path and name, then the fields it overrides.
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct RouteFile {
            pub path: String,
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
    upstream: String,
    upstream_tls: UpstreamTls,
    auth: Auth,
    origin: Origin,
    ip: Ip,
    rate: Rate,
    messages: Messages,
    timeouts: Timeouts,
    heartbeat: Heartbeat,
    http: HttpMode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub required: Option<bool>,
    pub token_sources: Option<Vec<String>>,
    pub algorithms: Option<Vec<String>>,
    pub keys: Option<Vec<KeyFile>>,
    pub issuer: Option<Vec<String>>,
    pub audience: Option<Vec<String>>,
    pub leeway_seconds: Option<u64>,
    pub require_claims: Option<BTreeMap<String, Vec<String>>>,
    pub deny_claims: Option<BTreeMap<String, Vec<String>>>,
    pub forward_claims: Option<BTreeMap<String, String>>,
    pub close_on_expiry: Option<bool>,
    pub forward_token: Option<bool>,
}

/// One entry of `auth.keys`: exactly one source field must be set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub hmac_secret_env: Option<String>,
    pub hmac_secret_file: Option<String>,
    pub public_key_file: Option<String>,
    pub jwks_file: Option<String>,
    pub jwks_url: Option<String>,
    pub refresh_seconds: Option<u64>,
    /// Names a single (non-JWKS) key, so tokens carrying a `kid` can select it.
    pub kid: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    pub allow: Option<Vec<String>>,
    pub allow_missing: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ip {
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub upgrades_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub max_connections_per_ip: Option<u32>,
    pub max_connections_per_subject: Option<u32>,
    pub ipv6_prefix: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Messages {
    pub max_frame_bytes: Option<u64>,
    pub max_message_bytes: Option<u64>,
    pub per_second: Option<f64>,
    pub burst: Option<u32>,
    pub types: Option<Vec<String>>,
    pub compression: Option<Compression>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub handshake_seconds: Option<f64>,
    pub upstream_connect_seconds: Option<f64>,
    pub idle_seconds: Option<f64>,
    pub max_lifetime_seconds: Option<f64>,
    pub write_seconds: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub interval_seconds: Option<f64>,
    pub timeout_seconds: Option<f64>,
}
