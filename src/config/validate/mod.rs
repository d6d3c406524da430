//! `PolicyFile` → `Policy`: resolve each route against `defaults` and the built-in
//! defaults, check every value, load every key, and name the field path of each error.
//!
//! Merging is per field: a route inherits each leaf field (`auth.algorithms`,
//! `timeouts.idle_seconds`, …) from `defaults` unless it sets it; a list or map it sets
//! replaces the inherited one whole.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Uri};
use ipnet::IpNet;
use jsonwebtoken::{Algorithm, DecodingKey};

use super::file::{self, Compression, HttpMode, Mode, PolicyFile, RouteFieldsRef};
use super::*;
use crate::policy::{
    parse_jwks, redact_userinfo, Auth, Heartbeat, IpRules, JwksUrl, Key, KeyFamily, Messages,
    OriginRules, Policy, Rate, Route, Timeouts, TokenSource, Upstream, UpstreamTls,
};

/// Validate a parsed policy file; relative file paths are resolved against `base`. A valid
/// policy comes with the warnings found (things that work but are likely mistakes).
/// A policy that does not validate: every error found, and the files it names (read or
/// not), so that the creation of one it waits for is seen.
#[derive(Debug)]
pub struct Refused {
    pub errors: Vec<FieldError>,
    pub files: Vec<PathBuf>,
}

/// What a policy is validated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// To be put in force (`wsgate run`, a reload, `explain`): everything it names must be
    /// there.
    Run,
    /// `wsgate check`, which usually runs where the gate's secrets are not (a CI job, an
    /// operator's laptop): an `hmac_secret_env` variable that is not set is a warning, and
    /// the key is judged as one that will be there.
    Check,
}

/// The policy and its warnings, or why it is refused.
pub fn validate(file: &PolicyFile, base: &Path) -> Result<(Policy, Vec<FieldWarning>), Refused> {
    validate_for(file, base, Purpose::Run)
}

/// [`validate`] for `purpose`.
pub fn validate_for(
    file: &PolicyFile,
    base: &Path,
    purpose: Purpose,
) -> Result<(Policy, Vec<FieldWarning>), Refused> {
    let mut v = Validator {
        errors: Vec::new(),
        warnings: Vec::new(),
        base,
        files: Vec::new(),
        purpose,
    };
    if file.version != 1 {
        v.err(
            "version",
            format!("unsupported version {}; expected 1", file.version),
        );
    }
    let mode = file.mode.unwrap_or(Mode::Enforce);
    let trusted_proxies = v.cidrs("trusted_proxies", file.trusted_proxies.as_deref());
    // Every peer trusted: any client names its own address in X-Forwarded-For, and the
    // IP lists, rates and caps judge that instead.
    // (An IPv4-mapped entry is kept as the IPv4 network it maps: `::ffff:0.0.0.0/96` is
    // `0.0.0.0/0`; the warning names the entry as written.)
    let written = file.trusted_proxies.as_deref().unwrap_or_default();
    for (i, text) in written.iter().enumerate() {
        if parse_cidr(text).is_some_and(|net| net.prefix_len() == 0) {
            v.warn(
                format!("trusted_proxies[{i}]"),
                format!(
                    "{text} trusts every peer: any client can name its own address in \
                     X-Forwarded-For; list the proxies in front of wsgate instead"
                ),
            );
        }
    }
    // The same made of pieces (`0.0.0.0/1` and `128.0.0.0/1`), when no entry says it whole.
    let nets: Vec<IpNet> = written.iter().filter_map(|t| parse_cidr(t)).collect();
    if !nets.iter().any(|net| net.prefix_len() == 0)
        && IpNet::aggregate(&nets)
            .iter()
            .any(|net| net.prefix_len() == 0)
    {
        v.warn(
            "trusted_proxies",
            "together these entries trust every peer of an address family: any client can \
             name its own address in X-Forwarded-For; list the proxies in front of wsgate \
             instead",
        );
    }
    let max_connections = file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        v.err("max_connections", "must be at least 1");
    }
    let http2 = v.http2(file.http2.as_ref());
    let cluster = file.cluster.as_ref().and_then(|c| v.cluster(c));

    let defaults = file
        .defaults
        .as_ref()
        .map(|d| d.as_ref())
        .unwrap_or_default();
    let mut routes = Vec::new();
    let mut paths = HashSet::new();
    let mut names = HashSet::new();
    match file.routes.as_deref() {
        None | Some([]) => {
            v.err("routes", "at least one route is required");
            // `defaults` is checked through the routes that inherit it: with none, it is
            // checked as a route of its own, so that its errors are reported beside this one.
            v.route(
                "defaults",
                "/",
                "defaults".to_owned(),
                RouteFieldsRef::default(),
                defaults,
            );
        }
        Some(list) => {
            for (i, r) in list.iter().enumerate() {
                let at = format!("routes[{i}]");
                if !paths.insert(r.path.clone()) {
                    v.err(
                        format!("{at}.path"),
                        format!("duplicate route path {:?}", r.path),
                    );
                }
                let name = r.name.clone().unwrap_or_else(|| r.path.clone());
                if !names.insert(name.clone()) {
                    v.err(
                        format!("{at}.name"),
                        format!("duplicate route name {name:?}"),
                    );
                }
                if let Some(route) = v.route(&at, &r.path, name, r.fields(), defaults) {
                    routes.push(route);
                }
            }
        }
    }
    // Report mode lets through a request that matches no route, as every other admission
    // failure it reports: to what `defaults` says, under the label of no route. Where
    // `defaults` alone is not a valid route (every route sets its own upstream or keys),
    // that request is refused as in enforce mode, and `wsgate check` says why: a policy
    // valid in enforce mode is never refused for being in report mode.
    // Nor does an upstream the file never names: with routes that each name their own and
    // `defaults` none, the built-in one is no upstream of this policy's.
    let routes_name_their_own = file.routes.iter().flatten().any(|r| r.upstream.is_some());
    let unrouted = if mode != Mode::Report {
        None
    } else if defaults.upstream.is_none() && routes_name_their_own {
        v.warn(
            "defaults.upstream",
            "not set, while routes set their own: so in report mode a path that matches no \
             route gets 404 no_route (set it to let such a path go on under `defaults`)",
        );
        None
    } else {
        let errors_before = v.errors.len();
        let fields = RouteFieldsRef::default();
        let route = v.route("defaults", "/", "defaults".to_owned(), fields, defaults);
        let mut found = v.errors.split_off(errors_before);
        // One the routes met too is already an error.
        found.retain(|e| !v.errors.contains(e));
        for e in found {
            v.warn(
                e.field,
                format!(
                    "{}; so in report mode a path that matches no route gets 404 no_route \
                     instead of going on under `defaults`",
                    e.message
                ),
            );
        }
        route.map(|route| Route {
            name: crate::metrics::NO_ROUTE.to_owned(),
            unrouted: true,
            ..route
        })
    };

    if !v.errors.is_empty() {
        // A default that is wrong is reported once, not once per route that inherits it.
        let mut seen = HashSet::new();
        v.errors.retain(|e| seen.insert(e.clone()));
        return Err(Refused {
            errors: v.errors,
            files: v.files,
        });
    }
    let mut claim_header_names: Vec<HeaderName> = Vec::new();
    for (_, name) in routes.iter().flat_map(|r| &r.auth.forward_claims) {
        if !claim_header_names.contains(name) {
            claim_header_names.push(name.clone());
        }
    }
    let claim_header_names: Arc<[HeaderName]> = claim_header_names.into();
    let with_claim_headers = |route| {
        Arc::new(Route {
            claim_header_names: claim_header_names.clone(),
            ..route
        })
    };
    let unrouted = unrouted.map(with_claim_headers);
    let routes: Vec<Arc<Route>> = routes.into_iter().map(with_claim_headers).collect();
    v.files.sort();
    v.files.dedup();
    let mut seen = HashSet::new();
    v.warnings.retain(|w| seen.insert(w.clone()));
    let handshake_timeout = routes
        .iter()
        .map(|r| r.timeouts.handshake)
        .min()
        .unwrap_or(DEFAULT_HANDSHAKE);
    let policy = Policy {
        mode,
        trusted_proxies,
        max_connections: max_connections as usize,
        routes: routes.into(),
        unrouted,
        files: v.files,
        handshake_timeout,
        http2,
        cluster,
    };
    Ok((policy, v.warnings))
}

struct Validator<'a> {
    errors: Vec<FieldError>,
    warnings: Vec<FieldWarning>,
    base: &'a Path,
    /// Files read while validating.
    files: Vec<PathBuf>,
    purpose: Purpose,
}

/// Picks a leaf field from the route, else from `defaults`, remembering which one it was
/// so that errors name the line the operator must edit.
struct Pick<'a> {
    route: RouteFieldsRef<'a>,
    defaults: RouteFieldsRef<'a>,
    at: &'a str,
}

impl<'a> Pick<'a> {
    fn get<S, T: ?Sized>(
        &self,
        section: fn(&RouteFieldsRef<'a>) -> Option<&'a S>,
        leaf: fn(&'a S) -> Option<&'a T>,
        name: &str,
    ) -> Option<(&'a T, String)> {
        if let Some(value) = section(&self.route).and_then(leaf) {
            return Some((value, format!("{}.{name}", self.at)));
        }
        section(&self.defaults)
            .and_then(leaf)
            .map(|value| (value, format!("defaults.{name}")))
    }

    /// Where an error about an unset (built-in default) field is reported.
    fn path(&self, name: &str) -> String {
        format!("{}.{name}", self.at)
    }
}

macro_rules! pick {
    ($p:expr, $section:ident . $leaf:ident) => {
        $p.get(
            |r| r.$section,
            |s| s.$leaf.as_ref(),
            concat!(stringify!($section), ".", stringify!($leaf)),
        )
    };
}

/// `pick!`, or the built-in default (reported at the route): the value and its field.
macro_rules! pick_or {
    ($p:expr, $section:ident . $leaf:ident, $default:expr) => {
        pick!($p, $section.$leaf).map_or_else(
            || {
                (
                    $default,
                    $p.path(concat!(stringify!($section), ".", stringify!($leaf))),
                )
            },
            |(value, field)| (*value, field),
        )
    };
}

// After `pick!` and `pick_or!`, which it uses (a macro is in scope only below its
// definition).
mod auth;
mod upstream;
mod values;

use values::{has_userinfo, percent_encoded_target, port_error, NO_CREDENTIALS};
pub use values::{parse_cidr, parse_origin_pattern};

impl Validator<'_> {
    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let message = message.into();
        self.warnings.push(FieldWarning {
            field: field.into(),
            message: super::hide_userinfo_in(&message).into_owned(),
        });
    }

    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// The path of a file the policy names (relative to the policy's directory), noted
    /// so that a change to it reloads the policy.
    fn resolve(&mut self, path: &str) -> PathBuf {
        let p = Path::new(path);
        let resolved = if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        };
        self.files.push(resolved.clone());
        resolved
    }

    fn route(
        &mut self,
        at: &str,
        path: &str,
        name: String,
        route: RouteFieldsRef<'_>,
        defaults: RouteFieldsRef<'_>,
    ) -> Option<Route> {
        let errors_before = self.errors.len();
        if !path.starts_with('/') {
            self.err(format!("{at}.path"), "must start with '/'");
        } else if path.len() > 1 && path.ends_with('/') {
            self.err(
                format!("{at}.path"),
                "must not end with '/' (prefixes match whole segments)",
            );
        } else if let Some(encoded) = percent_encoded_target(path) {
            // A request target carries no raw space, control or non-ASCII byte: a client
            // sends `/w%C3%9F` for `/wß`, which a route written raw would never match.
            self.err(
                format!("{at}.path"),
                format!("must be written as a request carries it, percent-encoded: {encoded:?}"),
            );
        } else {
            // Requests are routed on their normal form: a route in any other spelling
            // could never match.
            match crate::path::normalize(path) {
                Ok(normal) if normal != path => self.err(
                    format!("{at}.path"),
                    format!("must be written in normal form: {normal:?}"),
                ),
                Ok(_) => {}
                Err(why) => self.err(
                    format!("{at}.path"),
                    format!("is not a path a request could be routed to: {why}"),
                ),
            }
        }
        if name.is_empty() {
            self.err(format!("{at}.name"), "must not be empty");
        }
        if name == crate::metrics::NO_ROUTE {
            self.warn(
                format!("{at}.name"),
                format!(
                    "{name:?} is also the metrics' route label of requests that matched no \
                     route; this route's series will be added to theirs"
                ),
            );
        }
        let p = Pick {
            route,
            defaults,
            at,
        };

        let upstream = self.upstream(&p);
        let auth = self.auth(&p);
        let origin = self.origin(&p);
        let ip = IpRules {
            allow: pick!(p, ip.allow)
                .map(|(l, f)| self.cidrs(&f, Some(l)))
                .unwrap_or_default(),
            deny: pick!(p, ip.deny)
                .map(|(l, f)| self.cidrs(&f, Some(l)))
                .unwrap_or_default(),
        };
        let rate = self.rate(&p);
        let messages = self.messages(&p);
        let timeouts = self.timeouts(&p);
        let heartbeat = Heartbeat {
            interval: self.seconds(
                pick!(p, heartbeat.interval_seconds),
                DEFAULT_HEARTBEAT_INTERVAL,
                false,
            ),
            timeout: self.seconds(
                pick!(p, heartbeat.timeout_seconds),
                DEFAULT_HEARTBEAT_TIMEOUT,
                false,
            ),
        };
        let http = p
            .route
            .http
            .or(p.defaults.http)
            .copied()
            .unwrap_or(HttpMode::Reject);

        if self.errors.len() != errors_before {
            return None;
        }
        Some(Route {
            path: path.to_owned(),
            name,
            upstream: upstream?,
            auth,
            origin,
            ip,
            rate,
            messages,
            timeouts,
            heartbeat,
            http,
            claim_header_names: Arc::from([]),
            unrouted: false,
        })
    }

    fn origin(&mut self, p: &Pick<'_>) -> OriginRules {
        let mut allow = Vec::new();
        if let Some((list, field)) = pick!(p, origin.allow) {
            for (i, s) in list.iter().enumerate() {
                match parse_origin_pattern(s) {
                    Ok(pattern) => allow.push(pattern),
                    Err(e) => self.err(format!("{field}[{i}]"), e),
                }
            }
        }
        OriginRules {
            allow,
            allow_missing: pick!(p, origin.allow_missing)
                .map(|(b, _)| *b)
                .unwrap_or(false),
        }
    }

    fn rate(&mut self, p: &Pick<'_>) -> Rate {
        let (upgrades_per_second, field) =
            pick_or!(p, rate.upgrades_per_second, DEFAULT_UPGRADES_PER_SECOND);
        if !(upgrades_per_second.is_finite() && upgrades_per_second > 0.0) {
            self.err(field, "must be a positive number");
        }
        let (ipv6_prefix, field) = pick_or!(p, rate.ipv6_prefix, DEFAULT_IPV6_PREFIX);
        if !(1..=128).contains(&ipv6_prefix) {
            self.err(field, "must be between 1 and 128");
        }
        Rate {
            upgrades_per_second,
            burst: self.positive(pick!(p, rate.burst), DEFAULT_UPGRADE_BURST),
            max_connections_per_ip: self.positive(
                pick!(p, rate.max_connections_per_ip),
                DEFAULT_MAX_CONNECTIONS_PER_IP,
            ),
            max_connections_per_subject: self.positive(
                pick!(p, rate.max_connections_per_subject),
                DEFAULT_MAX_CONNECTIONS_PER_SUBJECT,
            ),
            ipv6_prefix,
        }
    }

    fn messages(&mut self, p: &Pick<'_>) -> Messages {
        let bytes = |v: &mut Self, found: Option<(&u64, String)>, default: u64| -> usize {
            let n = found.as_ref().map(|(n, _)| **n).unwrap_or(default);
            if !(1..=MAX_MESSAGE_BYTES_LIMIT).contains(&n) {
                if let Some((_, field)) = found {
                    v.err(
                        field,
                        format!("must be between 1 and {MAX_MESSAGE_BYTES_LIMIT}"),
                    );
                }
            }
            n.clamp(1, MAX_MESSAGE_BYTES_LIMIT) as usize
        };
        let message_limit = pick!(p, messages.max_message_bytes);
        let message_limit_inherited = message_limit
            .as_ref()
            .is_none_or(|(_, field)| field.starts_with("defaults."));
        let max_message_bytes = bytes(self, message_limit, DEFAULT_MAX_MESSAGE_BYTES);
        // Unset in the route and in `defaults`, the frame limit is the route's resolved
        // message limit (a route that raises only max_message_bytes raises both).
        let max_frame_bytes = match pick!(p, messages.max_frame_bytes) {
            Some(found) => {
                let field = found.1.clone();
                let n = bytes(self, Some(found), DEFAULT_MAX_MESSAGE_BYTES);
                if n > max_message_bytes {
                    // A frame limit from `defaults` over one route's own message limit:
                    // the route is the place to look.
                    let message = if field.starts_with("defaults.") && !message_limit_inherited {
                        format!(
                            "must not exceed messages.max_message_bytes: {} inherits it with a message limit of {max_message_bytes}",
                            p.at
                        )
                    } else {
                        "must not exceed messages.max_message_bytes".to_owned()
                    };
                    self.err(field, message);
                }
                n
            }
            None => max_message_bytes,
        };
        let (per_second, field) = pick_or!(p, messages.per_second, DEFAULT_MESSAGES_PER_SECOND);
        if !(per_second.is_finite() && per_second > 0.0) {
            self.err(field, "must be a positive number");
        }
        let (mut allow_text, mut allow_binary) = (true, true);
        if let Some((types, field)) = pick!(p, messages.types) {
            allow_text = false;
            allow_binary = false;
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "text" => allow_text = true,
                    "binary" => allow_binary = true,
                    other => self.err(
                        format!("{field}[{i}]"),
                        format!("unknown message type {other:?} (text or binary)"),
                    ),
                }
            }
            if types.is_empty() {
                self.err(field, "must list at least one of text, binary");
            }
        }
        Messages {
            max_frame_bytes,
            max_message_bytes,
            per_second,
            burst: self.positive(pick!(p, messages.burst), DEFAULT_MESSAGE_BURST),
            allow_text,
            allow_binary,
            compression: pick!(p, messages.compression).map_or(Compression::Pass, |(c, _)| *c),
        }
    }

    fn timeouts(&mut self, p: &Pick<'_>) -> Timeouts {
        let lifetime = self.seconds(
            pick!(p, timeouts.max_lifetime_seconds),
            Duration::ZERO,
            true,
        );
        Timeouts {
            handshake: self.seconds(
                pick!(p, timeouts.handshake_seconds),
                DEFAULT_HANDSHAKE,
                false,
            ),
            upstream_connect: self.seconds(
                pick!(p, timeouts.upstream_connect_seconds),
                DEFAULT_UPSTREAM_CONNECT,
                false,
            ),
            idle: self.seconds(pick!(p, timeouts.idle_seconds), DEFAULT_IDLE, false),
            max_lifetime: (!lifetime.is_zero()).then_some(lifetime),
            write: self.seconds(pick!(p, timeouts.write_seconds), DEFAULT_WRITE, false),
        }
    }

    fn seconds(
        &mut self,
        found: Option<(&f64, String)>,
        default: Duration,
        zero_ok: bool,
    ) -> Duration {
        let Some((secs, field)) = found else {
            return default;
        };
        match Duration::try_from_secs_f64(*secs) {
            Ok(d) if d.is_zero() && !zero_ok => {
                self.err(field, "must be greater than 0");
                default
            }
            Ok(d) if d > Duration::from_secs(30 * 24 * 3600) => {
                self.err(field, "must be at most 30 days");
                default
            }
            Ok(d) => d,
            Err(_) => {
                self.err(field, "must be a non-negative number of seconds");
                default
            }
        }
    }

    fn positive(&mut self, found: Option<(&u32, String)>, default: u32) -> u32 {
        match found {
            Some((0, field)) => {
                self.err(field, "must be at least 1");
                default
            }
            Some((n, _)) => *n,
            None => default,
        }
    }

    /// `cluster`: the URL is read from the named environment variable now. Unset, it is a
    /// warning, not an error (`wsgate check` runs where the secret is not): the gate then
    /// runs as with the store unreachable, and `on_failure` applies.
    fn cluster(&mut self, file: &file::ClusterFile) -> Option<crate::policy::Cluster> {
        let env = file.redis_url_env.as_str();
        if let Some(why) = values::env_name_error(env) {
            self.err("cluster.redis_url_env", why);
            return None;
        }
        let shown = values::env_name_shown(env);
        let url = match std::env::var(env) {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                self.warn(
                    "cluster.redis_url_env",
                    format!(
                        "{shown} is not set: the cluster store is unreachable for this gate and \
                         cluster.on_failure applies"
                    ),
                );
                None
            }
        };
        // The variable's value is never repeated (a wrong name could point at a secret).
        if let Some(url) = &url {
            let why = if !url.starts_with("redis://") && !url.starts_with("rediss://") {
                Some("does not hold a redis:// or rediss:// URL")
            } else if url.contains("#insecure") {
                Some("asks for TLS without certificate verification (#insecure), refused")
            } else if redis::Client::open(url.as_str()).is_err() {
                Some("does not hold a valid redis:// or rediss:// URL")
            } else {
                None
            };
            if let Some(why) = why {
                self.err("cluster.redis_url_env", format!("{shown} {why}"));
            }
        }
        let key_prefix = file
            .key_prefix
            .clone()
            .unwrap_or_else(|| DEFAULT_CLUSTER_KEY_PREFIX.to_owned());
        if key_prefix.is_empty() || key_prefix.chars().count() > 64 {
            self.err("cluster.key_prefix", "must be 1 to 64 characters");
        }
        let timeout_ms = file.timeout_ms.unwrap_or(DEFAULT_CLUSTER_TIMEOUT_MS);
        if !(1..=10_000).contains(&timeout_ms) {
            self.err("cluster.timeout_ms", "must be from 1 to 10000");
        }
        let lease_seconds = file.lease_seconds.unwrap_or(DEFAULT_CLUSTER_LEASE_SECONDS);
        if !(3..=3600).contains(&lease_seconds) {
            self.err(
                "cluster.lease_seconds",
                "must be from 3 to 3600 (slots are renewed every third of it)",
            );
        }
        Some(crate::policy::Cluster {
            redis_url_env: env.to_owned(),
            url: url.map(crate::policy::RedisUrl),
            key_prefix,
            on_failure: file.on_failure.unwrap_or(crate::policy::OnFailure::Open),
            timeout: Duration::from_millis(timeout_ms),
            lease: Duration::from_secs(lease_seconds),
        })
    }

    fn http2(&mut self, file: Option<&file::Http2>) -> crate::policy::Http2 {
        let max_concurrent_streams = file
            .and_then(|h| h.max_concurrent_streams)
            .unwrap_or(DEFAULT_H2_MAX_CONCURRENT_STREAMS);
        if max_concurrent_streams == 0 {
            self.err(
                "http2.max_concurrent_streams",
                "must be at least 1 (to turn HTTP/2 off, set http2.enabled: false)",
            );
        }
        crate::policy::Http2 {
            enabled: file.and_then(|h| h.enabled).unwrap_or(true),
            max_concurrent_streams,
        }
    }

    fn cidrs(&mut self, field: &str, list: Option<&[String]>) -> Vec<IpNet> {
        let mut out = Vec::new();
        for (i, s) in list.unwrap_or_default().iter().enumerate() {
            match parse_cidr(s) {
                Some(net) => out.push(net),
                None => self.err(
                    format!("{field}[{i}]"),
                    format!("{s:?} is not a CIDR or IP address"),
                ),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Report mode lets unrouted paths through under `defaults` when `defaults` alone is a
    /// valid route; when it is not (its keys missing, or no upstream named while the
    /// routes name their own), the policy is still valid, unrouted paths get 404, and a
    /// warning says why.
    #[test]
    fn report_mode_routes_the_unrouted_to_defaults_only_when_they_make_a_route() {
        let check = |mode: &str, defaults: &str, route: &str| {
            let yaml = format!(
                "version: 1\nmode: {mode}\ndefaults: {{{defaults}}}\nroutes: [{{path: /ws{route}}}]\n"
            );
            let file: PolicyFile = serde_yaml::from_str(&yaml).unwrap();
            validate(&file, Path::new(".")).unwrap()
        };
        let open = "auth: {required: false}";
        let own = ", upstream: \"ws://127.0.0.1:9/\", auth: {required: false}";
        let named = "upstream: \"ws://127.0.0.1:9/\"";

        // Upstream and auth from defaults (the built-in upstream when no route names one).
        for defaults in [format!("{named}, {open}"), open.to_owned()] {
            let (policy, warnings) = check("report", &defaults, "");
            let unrouted = policy.unrouted.expect("defaults make a route");
            assert_eq!((unrouted.name.as_str(), unrouted.unrouted), ("none", true));
            assert!(warnings.is_empty(), "{warnings:?}");
        }

        // Built-in defaults require a token and name no key: no route of their own.
        let (policy, warnings) = check("report", named, own);
        assert!(policy.unrouted.is_none());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].field, "defaults.auth.keys");
        assert!(warnings[0].message.contains("404 no_route"), "{warnings:?}");

        // Routes that name their own upstream, and `defaults` none: not the built-in one.
        let (policy, warnings) = check("report", open, own);
        assert!(policy.unrouted.is_none());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].field, "defaults.upstream");

        // Enforce mode builds none, and warns of nothing.
        let (policy, warnings) = check("enforce", "", own);
        assert!(policy.unrouted.is_none() && warnings.is_empty());
    }

    /// `cluster`: defaults, range errors, the variable's name. (A variable that is set is
    /// exercised by tests/cluster.rs, with no process-wide environment change here.)
    #[test]
    fn cluster_fields() {
        let check = |cluster: &str| {
            let yaml = format!(
                "version: 1\ndefaults: {{auth: {{required: false}}}}\nroutes: [{{path: /ws}}]\ncluster: {cluster}\n"
            );
            let file: PolicyFile = serde_yaml::from_str(&yaml).unwrap();
            validate(&file, Path::new(".")).map_err(|r| r.errors)
        };
        let (policy, warnings) = check("{redis_url_env: WSGATE_TEST_UNSET_REDIS_URL}").unwrap();
        let cluster = policy.cluster.unwrap();
        assert_eq!(cluster.key_prefix, "wsgate:");
        assert_eq!(cluster.on_failure, crate::policy::OnFailure::Open);
        assert_eq!(cluster.timeout, Duration::from_millis(50));
        assert_eq!(cluster.lease, Duration::from_secs(30));
        assert!(cluster.url.is_none());
        assert_eq!(warnings.len(), 1, "an unset variable is a warning");
        assert!(check("null").unwrap().0.cluster.is_none());
        let errors =
            check("{redis_url_env: 'not a name', lease_seconds: 1, timeout_ms: 0, key_prefix: ''}")
                .unwrap_err();
        assert_eq!(errors.len(), 1, "a bad name stops there: {errors:?}");
        let errors = check("{redis_url_env: X, lease_seconds: 2, timeout_ms: 0, key_prefix: ''}")
            .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "cluster.key_prefix",
                "cluster.timeout_ms",
                "cluster.lease_seconds"
            ]
        );
        // Characters, not bytes: 64 two-byte letters are a prefix, 65 are not.
        let prefix = |n| format!("{{redis_url_env: X, key_prefix: '{}'}}", "é".repeat(n));
        assert!(check(&prefix(64)).is_ok());
        let errors = check(&prefix(65)).unwrap_err();
        assert_eq!(errors[0].field, "cluster.key_prefix");
        assert!(serde_yaml::from_str::<PolicyFile>(
            "version: 1\ncluster: {redis_url_env: X, on_failure: maybe}\n"
        )
        .is_err());
    }

    /// Values that parse but would quietly mean something else are errors at their field.
    #[test]
    fn values_that_would_mean_something_else_are_refused() {
        let fields = |route: &str| {
            let yaml = format!("version: 1\nroutes:\n  - path: /ws\n{route}");
            let file: PolicyFile = serde_yaml::from_str(&yaml).unwrap();
            match validate(&file, Path::new(".")) {
                Ok(_) => Vec::new(),
                Err(refused) => refused
                    .errors
                    .into_iter()
                    .map(|e| e.field)
                    .collect::<Vec<_>>(),
            }
        };
        // Dialled at :80 and :443, the scheme's defaults, before.
        assert_eq!(
            fields("    upstream: ws://127.0.0.1:99999\n    auth: {required: false}\n"),
            ["routes[0].upstream"]
        );
        let jwks = |url: &str| {
            fields(&format!(
                "    auth: {{algorithms: [RS256], keys: [{{jwks_url: \"{url}\"}}]}}\n"
            ))
        };
        assert_eq!(
            jwks("https://keys:99999/jwks"),
            ["routes[0].auth.keys[0].jwks_url"]
        );
        assert_eq!(
            jwks("https://:8443/jwks"),
            ["routes[0].auth.keys[0].jwks_url"]
        );
        assert_eq!(jwks("https://keys:8443/jwks"), Vec::<String>::new());
        // A claim as the request's framing header.
        assert_eq!(
            fields("    auth: {required: false, forward_claims: {sub: Content-Length}}\n"),
            ["routes[0].auth.forward_claims.sub"]
        );
    }

    fn messages_of(yaml: &str) -> Result<Vec<(usize, usize)>, Vec<FieldError>> {
        let file: PolicyFile = serde_yaml::from_str(yaml).unwrap();
        let (policy, _) = validate(&file, Path::new(".")).map_err(|r| r.errors)?;
        Ok(policy
            .routes
            .iter()
            .map(|r| (r.messages.max_frame_bytes, r.messages.max_message_bytes))
            .collect())
    }

    /// Unset everywhere, the frame limit is the route's own message limit; set in
    /// `defaults`, it is inherited like any other field.
    #[test]
    fn the_frame_limit_follows_the_message_limit() {
        let head = "version: 1\ndefaults:\n  auth: {required: false}\n";
        let routes = "routes:\n  - path: /a\n  - path: /b\n    messages: {max_message_bytes: 4194304}\n  - path: /c\n    messages: {max_frame_bytes: 1000}\n";
        assert_eq!(
            messages_of(&format!("{head}{routes}")),
            Ok(vec![
                (1 << 20, 1 << 20),
                (4 << 20, 4 << 20),
                (1000, 1 << 20)
            ])
        );
        let defaults = "  messages: {max_frame_bytes: 65536, max_message_bytes: 2097152}\n";
        assert_eq!(
            messages_of(&format!("{head}{defaults}{routes}")),
            Ok(vec![(65536, 2 << 20), (65536, 4 << 20), (1000, 2 << 20)])
        );
        let low = "routes:\n  - path: /a\n    messages: {max_message_bytes: 100}\n";
        let errors = messages_of(&format!(
            "{head}  messages: {{max_frame_bytes: 200}}\n{low}"
        ))
        .unwrap_err();
        assert_eq!(errors[0].field, "defaults.messages.max_frame_bytes");
    }
}
