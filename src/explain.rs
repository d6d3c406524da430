//! `wsgate explain`: one upgrade request, made up from a URL, headers and a peer address,
//! put through the gate's own admission code against a policy, with no socket opened:
//! each step of the admission order with its outcome and the value that decided it, then
//! the decision. The steps are the ones the gate runs (`http::route`,
//! `handshake::check_upgrade`, `admission::admit` with a [`Trace`]), so the two cannot
//! disagree; what explain cannot know is said so: it holds no open connection and no rate
//! history (the caps and the upgrade rate pass as for a first request), and it does not
//! contact the upstream or fetch a `jwks_url` (tokens for such a route get
//! `keys_unavailable`, as from a gate that has not fetched its keys yet). With `cluster`
//! set it does not contact the store either: the rate and cap lines say that the fleet's
//! shared counts are not consulted.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, Version};
use serde::Serialize;

use crate::admission::origin::{self, Allowed};
use crate::admission::{self, Attempt, Kind, Outcome, Rejection, Step, Trace};
use crate::handshake::{
    check_head, check_header_list, check_upgrade, is_upgrade, offered_protocols,
};
use crate::http::route;
use crate::metrics::Metrics;
use crate::path::for_log;
use crate::policy::{HttpMode, OriginPattern, Policy, Route, TokenSource};
use crate::relay::Protocol;

/// The request to explain, as given on the command line.
pub struct Request {
    /// `ws://`, `wss://`, `http://` or `https://`, with a host; path and query as sent.
    pub url: String,
    /// `Name: value` each, added to (or replacing) the handshake headers a client sends.
    pub headers: Vec<String>,
    /// The TCP peer's address (the client IP unless it is a trusted proxy).
    pub peer: IpAddr,
}

/// Each step and the decision, as printed (`--json` prints it as it is).
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub steps: Vec<Line>,
    pub decision: Decision,
}

#[derive(Debug, Serialize)]
pub struct Line {
    pub step: &'static str,
    /// `pass`, `fail`, `reported` (failed, let through in report mode) or `skipped`.
    pub result: &'static str,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Decision {
    pub admitted: bool,
    /// 101 when admitted, else the refusal's status.
    pub status: u16,
    /// `accepted`, or the refusal's reason.
    pub reason: &'static str,
}

/// The request could not be made from the input (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(String);

/// Put `request` through admission against `policy`.
pub async fn explain(policy: &Policy, request: &Request) -> Result<Explanation, BadInput> {
    let parts = request_parts(request)?;
    let mut lines = Vec::new();
    let refused = |lines: Vec<Line>, rejection: Rejection| Explanation {
        steps: lines,
        decision: Decision {
            admitted: false,
            status: rejection.status().as_u16(),
            reason: rejection.reason(),
        },
    };

    // The head's own sanity (one Host, one Origin, a web target) comes before the route:
    // a failure there is the request's, not the route's.
    // Counted as the client sends it, `name: value` lines under the request line: the
    // gate's 431 past 16 KiB or 100 fields.
    let head = check_head(&parts.method, &parts.uri, &parts.headers).and_then(|()| {
        check_header_list(
            Protocol::Http1,
            false,
            (&parts.method, &parts.uri, None, &parts.headers),
        )
    });
    if let Err(rejection) = head {
        lines.push(line("request", "fail", rejection.to_string()));
        return Ok(refused(lines, rejection));
    }
    let (route, path) = match route(policy, &parts.method, &parts.uri, &parts.headers) {
        Ok(routed) => routed,
        Err(rejection) => {
            // A path refused before it could be matched (one the gate will not put in its
            // normal form: an encoded `/`, `;`, a dot segment) is the request's, like a
            // bad head; only a path that matches no route fails the route's step.
            let step = match rejection {
                Rejection::NoRoute => "route",
                _ => "request",
            };
            lines.push(line(step, "fail", rejection.to_string()));
            return Ok(refused(lines, rejection));
        }
    };
    lines.push(if route.unrouted {
        line(
            "route",
            "reported",
            format!(
                "{} matches no route → no_route; report mode lets it through under `defaults`",
                for_log(&path)
            ),
        )
    } else {
        line(
            "route",
            "pass",
            format!(
                "{} is routed to \"{}\" (prefix {})",
                for_log(&path),
                route.name,
                route.path
            ),
        )
    });
    // A request whose `Upgrade` is not `websocket` (a `--header` replaced it) is plain
    // HTTP to the gate, as it is here.
    if !is_upgrade(&parts.headers) {
        if route.http != HttpMode::Pass {
            let rejection = Rejection::NotWebsocket("this route only accepts WebSocket upgrades");
            lines.push(line("handshake", "fail", rejection.to_string()));
            return Ok(refused(lines, rejection));
        }
        return Err(BadInput(
            "without `Upgrade: websocket` this is a plain request, which this http: pass route proxies; explain follows upgrades".to_owned(),
        ));
    }
    if let Err(rejection) = check_upgrade(&parts) {
        lines.push(line("handshake", "fail", rejection.to_string()));
        return Ok(refused(lines, rejection));
    }
    lines.push(line(
        "handshake",
        "pass",
        "a WebSocket upgrade, version 13".to_owned(),
    ));

    let headers = &parts.headers;
    let peer = admission::peer(policy, request.peer, headers);
    let protocols = offered_protocols(headers);
    let attempt = Attempt {
        request_id: "-",
        path: &path,
        peer,
        headers,
        query: parts.uri.query(),
        protocols: &protocols,
    };
    let state = admission::State::new(Vec::new(), Arc::new(Metrics::new()));
    let trace = Trace::default();
    let admitted = admission::admit(
        &state,
        policy,
        &route,
        &attempt,
        Kind::Upgrade,
        Some(&trace),
    )
    .await;
    let context = Context {
        policy,
        route: &route,
        request,
        attempt: &attempt,
    };
    let traced = trace.steps();
    for (step, outcome, reason) in &traced {
        let result = match outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Reported => "reported",
        };
        let mut detail = context.detail(*step);
        if let Some(reason) = reason {
            let _ = write!(detail, " → {reason}");
        }
        lines.push(line(step_name(*step), result, detail));
    }
    match admitted {
        Ok(_) => {
            // An admitted request went through every step: those that had nothing to check
            // (no token, so no claims and no subject) are listed as skipped.
            for step in [Step::Claims, Step::SubjectCap] {
                if !traced.iter().any(|(s, ..)| *s == step) {
                    lines.push(line(
                        step_name(step),
                        "skipped",
                        "no verified token: nothing to check".to_owned(),
                    ));
                }
            }
            lines.push(line(
                "upstream",
                "skipped",
                format!(
                    "explain opens no socket; the gate would now open the upgrade to {}",
                    route.upstream.url
                ),
            ));
            Ok(Explanation {
                steps: lines,
                decision: Decision {
                    admitted: true,
                    status: 101,
                    reason: "accepted",
                },
            })
        }
        Err(rejection) => Ok(refused(lines, rejection)),
    }
}

fn line(step: &'static str, result: &'static str, detail: String) -> Line {
    Line {
        step,
        result,
        detail,
    }
}

fn step_name(step: Step) -> &'static str {
    match step {
        Step::Ip => "ip",
        Step::GlobalCap => "global_cap",
        Step::UpgradeRate => "upgrade_rate",
        Step::IpCap => "ip_cap",
        Step::Origin => "origin",
        Step::Token => "token",
        Step::Claims => "claims",
        Step::SubjectCap => "subject_cap",
    }
}

/// The request a client would send for `request.url`: GET, HTTP/1.1, Host from the URL,
/// the WebSocket handshake headers, then the given headers over them.
fn request_parts(request: &Request) -> Result<http::request::Parts, BadInput> {
    // Repeated in a message without what may be a credential: user information and query
    // values are `***`, and so is a JWT in the path.
    let redacted = crate::policy::redact_userinfo(&request.url);
    let shown = for_log(&redacted);
    let url = with_path(&request.url);
    let uri: Uri = url
        .parse()
        .map_err(|_| BadInput(format!("{shown:?} is not a URL")))?;
    // Schemes are case-insensitive (RFC 3986 §3.1).
    match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("ws" | "wss" | "http" | "https") => {}
        _ => {
            return Err(BadInput(format!(
                "{shown:?}: the URL must start with ws://, wss://, http:// or https://"
            )))
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| BadInput(format!("{shown:?} has no host")))?;
    // RFC 6455 §3: a WebSocket URI has no user information, and no client sends it.
    if authority.as_str().contains('@') {
        return Err(BadInput(format!(
            "{shown:?}: a WebSocket URL has no user information (user:password@); give \
             credentials as a --header"
        )));
    }
    // `http` parses any digits as a port and reads one above 65535 as none at all.
    let text = authority.as_str();
    let port = text.rfind(':').map(|i| &text[i + 1..]);
    if port.is_some_and(|p| !p.is_empty() && !p.contains(']')) && authority.port_u16().is_none() {
        return Err(BadInput(format!(
            "{shown:?}: the port is not a number from 0 to 65535"
        )));
    }
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut headers = HeaderMap::new();
    let value =
        |v: &str| HeaderValue::from_str(v).map_err(|_| BadInput(format!("{:?}", for_log(v))));
    headers.insert(header::HOST, value(authority.as_str())?);
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    headers.insert(
        header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
    );
    // The first `--header` of a name replaces the handshake's own; later ones of the same
    // name are more fields, as a client that sends the header twice sends them.
    let mut given_names: Vec<HeaderName> = Vec::new();
    for given in &request.headers {
        let (name, v) = given
            .split_once(':')
            .ok_or_else(|| BadInput(format!("{:?} is not 'Name: value'", for_log(given))))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| BadInput(format!("{:?} is not a header name", for_log(name))))?;
        let v = HeaderValue::from_str(v.trim())
            .map_err(|_| BadInput(format!("the value of {name} is not a header value")))?;
        if given_names.contains(&name) {
            headers.append(name, v);
        } else {
            headers.insert(name.clone(), v);
            given_names.push(name);
        }
    }
    let mut builder = http::Request::builder()
        .method(Method::GET)
        .uri(target)
        .version(Version::HTTP_11);
    if let Some(h) = builder.headers_mut() {
        *h = headers;
    }
    let (parts, ()) = builder
        .body(())
        .map_err(|e| BadInput(e.to_string()))?
        .into_parts();
    Ok(parts)
}

/// `url` with an empty path written as `/` (RFC 3986 §6.2.3: `ws://host?x` is
/// `ws://host/?x`), which `http`'s parser would refuse before a query.
fn with_path(url: &str) -> std::borrow::Cow<'_, str> {
    let Some(scheme_end) = url.find("://") else {
        return url.into();
    };
    let rest = &url[scheme_end + 3..];
    match rest.find(['/', '?', '#']) {
        Some(end) if rest.as_bytes()[end] != b'/' => {
            let at = scheme_end + 3 + end;
            format!("{}/{}", &url[..at], &url[at..]).into()
        }
        _ => url.into(),
    }
}

/// What the details of the steps are read from.
struct Context<'a> {
    policy: &'a Policy,
    route: &'a Route,
    request: &'a Request,
    attempt: &'a Attempt<'a>,
}

impl Context<'_> {
    /// With `cluster`, the note that the fleet's shared counts are not consulted.
    fn shared(&self) -> &'static str {
        match self.policy.cluster {
            Some(_) => "; with cluster set the gates count across the fleet, and explain does not contact the store",
            None => "",
        }
    }

    /// The values that decided `step` (never a token).
    fn detail(&self, step: Step) -> String {
        let route = self.route;
        let client_ip = self.attempt.peer.client_ip;
        let key = admission::ip::client_key(client_ip, route.rate.ipv6_prefix);
        match step {
            Step::Ip => {
                let forwarded = self
                    .attempt
                    .headers
                    .contains_key(HeaderName::from_static("x-forwarded-for"));
                let source = if self.attempt.peer.trusted && forwarded {
                    format!(
                        "from X-Forwarded-For (the peer {} is a trusted proxy)",
                        self.request.peer
                    )
                } else if self.attempt.peer.trusted {
                    "the TCP peer, a trusted proxy that sent no X-Forwarded-For".to_owned()
                } else {
                    "the TCP peer".to_owned()
                };
                format!(
                    "client {client_ip} ({source}); allow: {}; deny: {}",
                    list_or(&route.ip.allow, "any"),
                    list_or(&route.ip.deny, "none")
                )
            }
            Step::GlobalCap => format!(
                "max_connections {} (explain holds no open connection)",
                self.policy.max_connections
            ),
            Step::UpgradeRate => format!(
                "client key {key}: {}/s, burst {} (explain has no rate history{})",
                route.rate.upgrades_per_second,
                route.rate.burst,
                self.shared()
            ),
            Step::IpCap => format!(
                "client key {key}: at most {} open (explain holds none{})",
                route.rate.max_connections_per_ip,
                self.shared()
            ),
            Step::Origin => self.origin(),
            Step::Token => self.token(),
            Step::Claims => self.claims(),
            Step::SubjectCap => format!(
                "sub {}: at most {} open (explain holds none{})",
                self.payload()
                    .and_then(|c| c.get("sub").cloned())
                    .unwrap_or(serde_json::Value::Null),
                route.rate.max_connections_per_subject,
                self.shared()
            ),
        }
    }

    fn origin(&self) -> String {
        let sent = self
            .attempt
            .headers
            .get(header::ORIGIN)
            .map(|o| o.to_str().unwrap_or("(not text)"));
        // A token sent as the Origin by mistake is still a token.
        let shown = sent.map(for_log);
        let rules = &self.route.origin;
        match (sent, origin::matching(rules, sent)) {
            (_, Some(Allowed::Missing)) => "no Origin header, and allow_missing is true".into(),
            (_, Some(Allowed::Pattern(p))) => {
                format!("{:?} matches {}", shown.unwrap_or_default(), pattern(p))
            }
            (None, None) => "no Origin header, and allow_missing is false".into(),
            (Some(_), None) => format!(
                "{:?} matches none of [{}]",
                shown.unwrap_or_default(),
                rules
                    .allow
                    .iter()
                    .map(pattern)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn found(&self) -> Option<admission::token::Found<'_>> {
        admission::token::extract(
            &self.route.auth.token_sources,
            self.attempt.headers,
            self.attempt.query,
            self.attempt.protocols,
        )
    }

    fn token(&self) -> String {
        let auth = &self.route.auth;
        let Some(found) = self.found() else {
            return if auth.required {
                format!(
                    "no token in any of the route's sources ({})",
                    auth.token_sources
                        .iter()
                        .map(source)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                "no token, and the route does not require one".into()
            };
        };
        let described = match jsonwebtoken::decode_header(found.token) {
            Ok(h) => format!(
                "alg {:?}, kid {}",
                h.alg,
                h.kid.as_deref().map_or("none".into(), |k| format!("{k:?}"))
            ),
            Err(_) => "not a JWT".into(),
        };
        let allowed = auth
            .algorithms
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "a token from {}: {described}; the route accepts {allowed}",
            source(found.source)
        )
    }

    /// The token's claims (its payload, shown once its signature has been checked: the
    /// claims step only runs after a verified token).
    fn payload(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        let found = self.found()?;
        let payload = found.token.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn claims(&self) -> String {
        let auth = &self.route.auth;
        let rules = |list: &[(String, Vec<String>)]| {
            if list.is_empty() {
                "none".to_owned()
            } else {
                list.iter()
                    .map(|(claim, values)| format!("{claim} in [{}]", values.join(", ")))
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        };
        let payload = self.payload();
        let unforwardable = payload
            .as_ref()
            .and_then(|map| crate::admission::token::unforwardable_claim(map, auth))
            .map_or(String::new(), |claim| {
                format!("; forward_claims: {claim} cannot be sent as a header value")
            });
        format!(
            "claims {}; require_claims: {}; deny_claims: {}{unforwardable}",
            payload.map_or("(unreadable)".into(), |c| serde_json::Value::Object(c)
                .to_string()),
            rules(&auth.require_claims),
            rules(&auth.deny_claims)
        )
    }
}

fn list_or(list: &[ipnet::IpNet], empty: &str) -> String {
    if list.is_empty() {
        empty.to_owned()
    } else {
        list.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn pattern(p: &OriginPattern) -> String {
    match p {
        OriginPattern::Exact(exact) => exact.clone(),
        OriginPattern::Subdomains {
            scheme,
            domain,
            port,
        } => match port {
            Some(port) => format!("{scheme}://*.{domain}:{port}"),
            None => format!("{scheme}://*.{domain}"),
        },
    }
}

fn source(s: &TokenSource) -> String {
    match s {
        TokenSource::Header => "header".into(),
        TokenSource::Query(name) => format!("query:{name}"),
        TokenSource::Cookie(name) => format!("cookie:{name}"),
        TokenSource::Subprotocol(prefix) => format!("subprotocol:{prefix}"),
    }
}

/// The explanation as lines of text: one per step, then the decision.
pub fn to_text(explanation: &Explanation) -> String {
    let mut out = String::new();
    for l in &explanation.steps {
        let _ = writeln!(out, "{:<13} {:<9} {}", l.step, l.result, l.detail);
    }
    let d = &explanation.decision;
    let reported = explanation
        .steps
        .iter()
        .filter(|l| l.result == "reported")
        .count();
    if d.admitted && reported > 0 {
        let _ = writeln!(
            out,
            "decision: admitted, 101 (report mode: {reported} failed check(s) let through)"
        );
    } else if d.admitted {
        let _ = writeln!(out, "decision: admitted, 101");
    } else {
        let _ = writeln!(out, "decision: refused, {} {}", d.status, d.reason);
    }
    out
}
