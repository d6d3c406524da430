//! One request on the gate's listener, HTTP/1.1 or HTTP/2: route it, check that it is a
//! well-formed upgrade (an HTTP/1.1 `Upgrade: websocket` or an RFC 8441 extended CONNECT),
//! admit it, open the upstream (always over HTTP/1.1), answer 101 or 200 and hand both
//! sockets to the relay. Plain requests on an `http: pass` route go to `proxy`. Both
//! protocols reach the same [`answer`]: an HTTP/2 request is only made to look like the
//! HTTP/1.1 one first (its `:authority` becomes its Host).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::admission::{self, Attempt, Kind, Rejection};
use crate::body::{full, Body};
use crate::extensions::Offers;
use crate::handshake::{
    check_head, check_header_list, check_upgrade, is_upgrade, offered_protocols, Handshake,
};
use crate::policy::{Compression, HttpMode, Route};
use crate::registry::Opened;
use crate::relay::Protocol;
use crate::upstream::{self, Forwarding};
use crate::{relay, Gate};

/// A duration for a log line's `latency_ms`: milliseconds to the microsecond (a float
/// product would print `0.025507000000000002`).
pub fn log_millis(elapsed: std::time::Duration) -> f64 {
    elapsed.as_micros() as f64 / 1000.0
}

/// What the listener knows about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// When the TCP connection was accepted, or for an HTTP/2 stream or a later request
    /// on a kept-alive HTTP/1.1 connection when its request arrived
    /// (`wsgate_upgrade_duration_seconds` starts here).
    pub accepted: Instant,
    /// `http/1.1` or `h2`, for the upgrade and close log lines.
    pub protocol: Protocol,
    /// The connection's first request (an HTTP/2 connection's first stream): the one the
    /// drain waits to answer. A later one that arrives once the listener has stopped gets
    /// 503 `draining`.
    pub first: bool,
}

impl ConnInfo {
    /// Whether the drain refuses this request: any once the drain has begun, and from the
    /// moment the listener stops, any but a connection's first.
    fn refused_by_drain(&self, gate: &Gate) -> bool {
        gate.shutdown.is_draining() || (!self.first && gate.shutdown.stopped_accepting())
    }
}

/// hyper's service function: every request gets a response, never an error. An upgrade's
/// relay starts once hyper has written the 101 (or, on HTTP/2, the 200) and handed the
/// stream back; `hold` (an HTTP/2 connection's count of its open streams) is kept until the
/// relay ends, or for a plain request until its response body has been sent.
pub async fn handle(
    gate: Arc<Gate>,
    conn: ConnInfo,
    mut req: Request<Incoming>,
    stream: Option<H2Stream>,
) -> Result<Response<Body>, Infallible> {
    let http10 = req.version() == http::Version::HTTP_10;
    let upgrade = match conn.protocol {
        Protocol::Http1 => {
            // RFC 9112 §3.2.2: an absolute-form target's authority is the request's host,
            // whatever Host says (one is still required, as RFC 9112 §3.2 says).
            if req.headers().contains_key(header::HOST) {
                authority_as_host(&mut req);
            }
            is_upgrade(req.headers())
        }
        Protocol::H2 => {
            authority_as_host(&mut req);
            // Every CONNECT is taken for a WebSocket: `check_upgrade` refuses the others.
            req.method() == Method::CONNECT
        }
    };
    if !upgrade {
        let head = req.method() == Method::HEAD;
        let (mut response, _) = answer(&gate, conn, Asked::Plain(req)).await;
        // A response to HEAD has no body (RFC 9110 §9.3.2): hyper's HTTP/1.1 leaves it out
        // by itself, its HTTP/2 would send it as DATA, which clients take for a protocol
        // error. (What an upstream answers a passed HEAD has none anyway.)
        if head {
            *response.body_mut() = full(Bytes::new());
        }
        if http10 {
            // HTTP/1.0 has no chunks: an answer without a length ends with the connection,
            // which the client is told, as nginx tells it, whatever it asked for.
            if hyper::body::Body::size_hint(response.body())
                .exact()
                .is_none()
            {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            closing_for_http10(&mut response);
        }
        // A request body still arriving: discarded, on HTTP/2 before the answer's stream
        // ends, on HTTP/1.1 after the answer (see `crate::body::Unread`).
        if let Some(unread) = response.extensions_mut().remove::<crate::body::Unread>() {
            response = if stream.is_some() {
                response.map(|body| crate::body::draining(body, unread))
            } else {
                response.map(|body| crate::body::discarding_after(body, unread))
            };
        }
        return Ok(match stream {
            Some(H2Stream { hold, .. }) => response.map(|body| crate::body::held(body, hold)),
            None => response,
        });
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (parts, _) = req.into_parts();
    let (mut response, admitted) = answer(&gate, conn, Asked::Upgrade(parts)).await;
    if http10 {
        closing_for_http10(&mut response);
    }
    if let Some(admitted) = admitted {
        gate.shutdown.spawn_relay(async move {
            // (Not a `match` around the relay's await: its scrutinee would be kept beside
            // the relay for the connection's life.)
            // Counted accepted already: a client gone before its upgrade completed is ended
            // by the relay like any lost client, its close logged and the upstream told.
            let client = match on_upgrade.await {
                Ok(upgraded) => relay::Client::upgraded(upgraded),
                Err(e) => {
                    tracing::debug!(error = %e, "client upgrade did not complete");
                    relay::Client::gone()
                }
            };
            let (hold, revoked) = match stream {
                Some(H2Stream { hold, revoked }) => (Some(hold), Some(revoked)),
                None => (None, None),
            };
            admitted.relay(client, revoked).await;
            drop(hold);
        });
    } else if stream.is_none() {
        close_after_refusal(on_upgrade);
    }
    Ok(response)
}

/// The longest a refused upgrade's connection is given to end cleanly after its answer.
const REFUSED_CLOSE: std::time::Duration = std::time::Duration::from_secs(2);

/// End the connection of a refused HTTP/1.1 upgrade as every other answered connection
/// ends: hyper hands an upgrade request's socket to its (never claimed) upgrade once the
/// refusal is written, and dropped there a TLS connection would end without close_notify,
/// which strict clients read as a truncated answer. Taken and shut down here instead.
pub fn close_after_refusal(on_upgrade: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let closed = async {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
            }
        };
        let _ = tokio::time::timeout(REFUSED_CLOSE, closed).await;
    });
}

/// RFC 9113 §8.3.1: an HTTP/2 request names its host in `:authority`, which takes the
/// place of Host (and wins over a Host header sent beside it); so does the authority of
/// an HTTP/1.1 absolute-form target. Everything after this reads the Host header.
fn authority_as_host(req: &mut Request<Incoming>) {
    if let Some(authority) = crate::head::authority_host(req.uri()) {
        req.headers_mut().insert(header::HOST, authority);
    }
}

/// A request as the listener has it: a plain one whole (its body may go upstream), an
/// upgrade by its head.
pub enum Asked {
    Plain(Request<Incoming>),
    Upgrade(http::request::Parts),
}

impl Asked {
    fn head(&self) -> (&Method, &http::Uri, &HeaderMap) {
        match self {
            Asked::Plain(req) => (req.method(), req.uri(), req.headers()),
            Asked::Upgrade(parts) => (&parts.method, &parts.uri, &parts.headers),
        }
    }

    /// An HTTP/2 extended CONNECT's `:protocol` (RFC 8441).
    fn protocol(&self) -> Option<&str> {
        let extensions = match self {
            Asked::Plain(req) => req.extensions(),
            Asked::Upgrade(parts) => &parts.extensions,
        };
        extensions
            .get::<hyper::ext::Protocol>()
            .map(hyper::ext::Protocol::as_str)
    }
}

/// A response that closes its connection (a refusal's `Connection: close`), to an HTTP/1.0
/// request, goes out as HTTP/1.0: hyper adds `keep-alive` to an HTTP/1.1 response's
/// `Connection` when the request asked for it, which would read `close, keep-alive`.
fn closing_for_http10(response: &mut Response<Body>) {
    let closes = crate::head::lists_token(response.headers(), header::CONNECTION, "close");
    if closes {
        *response.version_mut() = http::Version::HTTP_10;
    }
}

/// A request whose answer is never reached: its future was dropped while the gate waited
/// (for the upstream, mostly), because an HTTP/2 client reset the stream (RST_STREAM), or
/// the connection ended (on HTTP/1.1, noticed by the listener for an upgrade that is the
/// connection's first request, and by hyper for every other request), or the drain's
/// deadline passed. Logged when dropped armed, as nginx logs its 499, so that such a
/// request does not vanish from the logs; not counted in `wsgate_upgrades_total`, whose
/// results are the gate's own decisions.
struct Abandoned<'a> {
    request_id: &'a HeaderValue,
    client_ip: IpAddr,
    route: &'a str,
    path: &'a str,
    started: Instant,
    protocol: Protocol,
    upgrade: bool,
    armed: bool,
    /// The gate's shutdown: a request still unanswered when the drain's deadline passes is
    /// dropped by the gate, not abandoned by its client.
    shutdown: &'a crate::shutdown::Shutdown,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (result, message) = match (self.shutdown.is_cut(), self.upgrade) {
            (true, true) => (
                "shutdown",
                "upgrade unanswered: the drain's deadline passed",
            ),
            (true, false) => (
                "shutdown",
                "request unanswered: the drain's deadline passed",
            ),
            (false, true) => ("client_lost", "upgrade abandoned by the client"),
            (false, false) => ("client_lost", "request abandoned by the client"),
        };
        tracing::info!(
            request_id = %self.request_id.to_str().unwrap_or("-"), client_ip = %self.client_ip,
            route = self.route, path = %self.path, result,
            latency_ms = log_millis(self.started.elapsed()), protocol = self.protocol.as_str(),
            "{message}"
        );
    }
}

/// Route, check and admit a request, log and count the decision, and answer it: the
/// response, and for an admitted upgrade what its relay needs once the 101 is written.
pub async fn answer(
    gate: &Arc<Gate>,
    conn: ConnInfo,
    asked: Asked,
) -> (Response<Body>, Option<Admitted>) {
    let started = Instant::now();
    let (method, uri, headers) = asked.head();
    let request_id = request_id(headers);
    let upgrade = matches!(asked, Asked::Upgrade(_));
    // An upgrade's relay re-checks the connection on every later swap: watched from before
    // the policy it is admitted under is read.
    let (loaded, changes) = gate.policy.load_watched();
    let peer = admission::peer(&loaded.policy, conn.peer.ip(), headers);
    let client_ip = peer.client_ip;
    // The path only, as logs show it: a query may carry a token, and tokens are never
    // logged (one in the path is masked).
    let path = crate::path::for_log(uri.path()).into_owned();
    // For a plain request's access line (standard methods are copied without allocating).
    let method = method.clone();

    let list = (&method, uri, asked.protocol(), headers);
    let routed = check_header_list(conn.protocol, conn.first, list)
        .and_then(|()| route(&loaded.policy, &method, uri, headers));
    let matched = routed.as_ref().ok().map(|(route, _)| route.clone());
    let route_name = matched
        .as_ref()
        .map_or(crate::metrics::NO_ROUTE, |r| r.name.as_str());
    let mut abandoned = Abandoned {
        request_id: &request_id,
        client_ip,
        route: route_name,
        path: &path,
        started,
        protocol: conn.protocol,
        upgrade,
        armed: true,
        shutdown: &gate.shutdown,
    };
    // A refused request's body still on its way (HTTP/2 only: see `crate::body::Unread`).
    let mut unread = None;
    let result = match routed {
        Ok((route, path)) => {
            let request = Routed {
                policy: &loaded.policy,
                conn,
                request_id: &request_id,
                peer,
                route,
                path,
            };
            match asked {
                Asked::Plain(req) => respond(gate, request, req, &mut unread)
                    .await
                    .map(|r| (r, None)),
                Asked::Upgrade(parts) => switch(gate, request, &parts, changes)
                    .await
                    .map(|(r, admitted)| (r, Some(admitted))),
            }
        }
        Err(rejection) => {
            if let Asked::Plain(req) = asked {
                unread = Some(req.into_body());
            }
            Err(rejection)
        }
    };
    abandoned.armed = false;
    let latency_ms = log_millis(started.elapsed());
    match result {
        Ok(answer) => {
            if upgrade {
                gate.metrics.upgrade(route_name, "accepted");
                let since_accept = conn.accepted.elapsed().as_secs_f64();
                gate.metrics.upgrade_duration.observe(since_accept);
                let limits = answer.1.as_ref().map_or("process", |a| a.limits.as_str());
                tracing::info!(
                    request_id = %request_id.to_str().unwrap_or("-"), client_ip = %client_ip,
                    route = route_name, path = %path, result = "accepted", latency_ms,
                    protocol = conn.protocol.as_str(), limits, "upgrade"
                );
            } else {
                // nginx's access line: what the upstream answered, and when its head came.
                tracing::info!(
                    request_id = %request_id.to_str().unwrap_or("-"), client_ip = %client_ip,
                    route = route_name, method = %method, path = %path, result = "passed",
                    status = answer.0.status().as_u16(), latency_ms,
                    protocol = conn.protocol.as_str(), "request passed"
                );
            }
            answer
        }
        Err(mut rejection) => {
            // On HTTP/2 a 2xx to an extended CONNECT is the tunnel's success (RFC 8441 §5):
            // an upstream that answered a WebSocket handshake with one (an app's catch-all
            // page) would look like an open WebSocket that then ends. Over HTTP/1.1 only a
            // 101 opens one, so its 200 is relayed as the refusal it is.
            if upgrade
                && conn.protocol == crate::relay::Protocol::H2
                && rejection.status().is_success()
            {
                rejection = crate::upstream::bad_answer(
                    "a success status, not 101, to the WebSocket handshake",
                );
            }
            gate.metrics.upgrade(route_name, rejection.reason());
            tracing::info!(
                request_id = %request_id.to_str().unwrap_or("-"), client_ip = %client_ip,
                route = route_name, path = %path, result = rejection.reason(),
                status = rejection.status().as_u16(), latency_ms, protocol = conn.protocol.as_str(),
                cause = rejection.cause().as_deref(),
                "{}", if upgrade { "upgrade refused" } else { "request refused" }
            );
            let mut response = rejection.into_response();
            let arriving = unread.filter(|body| !hyper::body::Body::is_end_stream(body));
            if let (Some(body), crate::relay::Protocol::H2) = (arriving, conn.protocol) {
                response
                    .extensions_mut()
                    .insert(crate::body::Unread::new(body));
            }
            (response, None)
        }
    }
}

/// The head's sanity, then the route of the path's normal form (the form that is routed,
/// re-checked on reload and sent upstream: never the raw one). In report mode a path that
/// matches no route gets the policy's `unrouted` (admission reports its `no_route`).
pub(crate) fn route(
    policy: &crate::policy::Policy,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Result<(Arc<Route>, String), Rejection> {
    check_head(method, uri, headers)?;
    let path = crate::path::normalize(uri.path())
        .map_err(Rejection::BadRequest)?
        .into_owned();
    let route = policy
        .route_for(&path)
        .or(policy.unrouted.as_ref())
        .cloned()
        .ok_or(Rejection::NoRoute)?;
    Ok((route, path))
}

/// A request that has a route: what the rest of its handling needs.
struct Routed<'a> {
    policy: &'a crate::policy::Policy,
    conn: ConnInfo,
    request_id: &'a HeaderValue,
    peer: admission::Peer,
    route: Arc<Route>,
    path: String,
}

/// A plain request on an `http: pass` route: admitted as an upgrade is, less the upgrade
/// rate and the caps, and proxied. Refused, or failed by its upstream, the request's body
/// is given back in `unread` when it has more to come (see [`crate::body::Unread`]).
async fn respond(
    gate: &Arc<Gate>,
    routed: Routed<'_>,
    mut req: Request<Incoming>,
    unread: &mut Option<Incoming>,
) -> Result<Response<Body>, Rejection> {
    let route = routed.route.clone();
    match admit_plain(gate, routed, &mut req).await {
        Ok(target) => crate::proxy::forward(&gate.pass_clients, &route, &target, req, unread).await,
        Err(rejection) => {
            *unread = Some(req.into_body());
            Err(rejection)
        }
    }
}

/// [`respond`]'s admission: the request's headers made those that go upstream; its
/// target upstream.
async fn admit_plain(
    gate: &Arc<Gate>,
    routed: Routed<'_>,
    req: &mut Request<Incoming>,
) -> Result<String, Rejection> {
    let Routed {
        policy,
        conn,
        request_id,
        peer,
        route,
        path,
    } = routed;
    // RFC 9112 §3.2: an HTTP/1.1 request without Host gets 400 (HTTP/2 has `:authority`,
    // copied into Host on arrival; HTTP/1.0 need not send one).
    if req.version() == http::Version::HTTP_11 && !req.headers().contains_key(header::HOST) {
        return Err(Rejection::BadRequest("the Host header is missing"));
    }
    // A connection's first request was checked as it arrived (`crate::head`); a later one
    // on a kept connection is checked here.
    let codings = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .map(HeaderValue::as_bytes);
    crate::head::transfer_codings(codings).map_err(Rejection::BadRequest)?;
    if route.http != HttpMode::Pass {
        return Err(Rejection::NotWebsocket(
            "this route only accepts WebSocket upgrades",
        ));
    }
    // As an upgrade is: an HTTP/2 connection kept for its WebSockets' close handshakes, or
    // an HTTP/1.1 one whose next request arrived as the drain began, starts nothing new.
    if conn.refused_by_drain(gate) {
        return Err(Rejection::Draining);
    }
    let attempt = Attempt {
        request_id: request_id.to_str().unwrap_or("-"),
        path: &path,
        peer,
        headers: req.headers(),
        query: req.uri().query(),
        protocols: &[],
    };
    let ticket =
        admission::admit(&gate.admission, policy, &route, &attempt, Kind::Plain, None).await?;
    let strip = ticket.carriers();
    let (headers, target) = upstream_request(
        conn,
        request_id,
        &ticket,
        &strip,
        &path,
        req.uri(),
        req.headers(),
    );
    *req.headers_mut() = headers;
    Ok(target)
}

/// What goes upstream for an admitted request: its headers (forwarded, with the gate's
/// own) and its target, both without the token carriers in `strip`.
fn upstream_request(
    conn: ConnInfo,
    request_id: &HeaderValue,
    ticket: &admission::Ticket,
    strip: &admission::token::Carriers<'_>,
    path: &str,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> (HeaderMap, String) {
    let fwd = Forwarding {
        peer: admission::canonical(conn.peer.ip()),
        peer_trusted: ticket.peer.trusted,
        tls: conn.tls,
        request_id,
        claim_headers: &ticket.claim_headers,
        claim_header_names: &ticket.route.claim_header_names,
        carriers: *strip,
    };
    let headers = upstream::forward_headers(headers, &fwd);
    let target = upstream::strip_token_params(&crate::path::with_query(path, uri.query()), strip);
    (headers, target)
}

/// An upgrade: checked, admitted, the upstream's handshake done; the 101 to write and what
/// the relay needs afterwards.
async fn switch(
    gate: &Arc<Gate>,
    routed: Routed<'_>,
    parts: &http::request::Parts,
    policy_changes: tokio::sync::watch::Receiver<u64>,
) -> Result<(Response<Body>, Admitted), Rejection> {
    let Routed {
        policy,
        conn,
        request_id,
        peer,
        route,
        path,
    } = routed;
    let handshake = check_upgrade(parts)?;
    if conn.refused_by_drain(gate) {
        return Err(Rejection::Draining);
    }
    let protocols = offered_protocols(&parts.headers);
    let attempt = Attempt {
        request_id: request_id.to_str().unwrap_or("-"),
        path: &path,
        peer,
        headers: &parts.headers,
        query: parts.uri.query(),
        protocols: &protocols,
    };
    let mut ticket = admission::admit(
        &gate.admission,
        policy,
        &route,
        &attempt,
        Kind::Upgrade,
        None,
    )
    .await?;

    let strip = ticket.carriers();
    let to_upstream = upstream::strip_token_protocols(&protocols, &strip);
    let (headers, target) = upstream_request(
        conn,
        request_id,
        &ticket,
        &strip,
        &path,
        &parts.uri,
        &parts.headers,
    );
    let offers = match route.messages.compression {
        Compression::Pass => Offers::from_request(&parts.headers),
        Compression::Off => Offers::default(),
    };
    let mut socket = match upstream::open(&route, &target, headers, &to_upstream, &offers).await {
        Ok(socket) => socket,
        Err(rejection) => {
            if let Some(cluster) = &gate.admission.cluster {
                std::mem::take(&mut ticket.slots)
                    .release(cluster.round_trip())
                    .await;
            }
            return Err(rejection);
        }
    };

    let mut response = Response::builder();
    if let Some(headers) = response.headers_mut() {
        // The upstream's own 101 headers (`Set-Cookie`, …), less hop-by-hop and
        // Sec-WebSocket-* ones: the gate's handshake headers are added below.
        *headers = std::mem::take(&mut socket.headers);
    }
    let mut response = match handshake {
        Handshake::Http1 { key } => response
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header(
                header::SEC_WEBSOCKET_ACCEPT,
                derive_accept_key(key.as_bytes()),
            ),
        // RFC 8441 §5: a 2xx accepts the extended CONNECT; there is no key to answer.
        Handshake::H2 => response.status(StatusCode::OK),
    };
    // A browser fails a handshake whose non-empty offer got no answer: when the upstream
    // selects nothing, the client's token entry is selected (the upstream never sees it,
    // unless the route forwards the token; then it was offered the entry and chose none).
    let token_entry = || {
        protocols
            .iter()
            .find(|p| upstream::is_token_protocol(p, &route.auth.token_sources))
            .and_then(|p| HeaderValue::from_str(p).ok())
    };
    if let Some(protocol) = socket.protocol.clone().or_else(token_entry) {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    if let Some(agreed) = &socket.deflate {
        response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, agreed.header.clone());
    }
    let response = response
        .body(full(Bytes::new()))
        .map_err(|_| crate::upstream::bad_answer("a 101 whose headers cannot be relayed"))?;

    // The caps go to the relay, which frees them as the connection ends.
    let slots = std::mem::take(&mut ticket.slots);
    let release_within = gate
        .admission
        .cluster
        .as_ref()
        .map_or(std::time::Duration::ZERO, |cluster| cluster.round_trip());
    let limits = ticket.limits;
    let claim = |name| {
        ticket
            .standing
            .claims
            .as_ref()
            .and_then(|c| c.claim_str(name))
            .map(str::to_owned)
    };
    let (sub, jti) = (claim("sub"), claim("jti"));
    let registered = gate.operator.registry.register(Opened {
        route: route.name.clone(),
        client_ip: ticket.standing.client_ip,
        sub,
        jti,
        protocol: conn.protocol.as_str(),
    });
    // A revocation made while this upgrade was being admitted: it found no entry to close,
    // so the entry closes itself (the registry is written before revocations are read).
    let opened = &registered.entry().opened;
    if gate
        .admission
        .revocations
        .revoked(opened.sub.as_deref(), opened.jti.as_deref())
    {
        registered.revoke();
    }
    let connection = relay::Connection {
        entry: registered.entry().clone(),
        metrics: gate.metrics.connection(&route.name),
        registry: gate.metrics.clone(),
        policy: gate.policy.clone(),
        changes: policy_changes,
        standing: ticket.standing,
        expires_at: ticket.expires_at,
        report: ticket.report,
        // A copy: the client's value shares the buffer its whole request head was read
        // into, which the connection must not keep for its life.
        request_id: HeaderValue::from_bytes(request_id.as_bytes())
            .unwrap_or_else(|_| request_id.clone()),
        protocol: conn.protocol,
        slots,
        release_within,
    };
    let stop = gate.shutdown.relay_stop();
    // What the relay needs, in one allocation until the upgrade completes: the task's
    // captures are kept beside every later state, so they stay a pointer.
    let held = Box::new(Held {
        socket,
        connection,
        registered,
    });
    Ok((
        response,
        Admitted {
            held,
            route,
            stop,
            limits,
        },
    ))
}

/// A stream of an HTTP/2 connection: the connection's hold on it (kept while its
/// WebSocket is relayed or its response body is being sent; the drain and the idle check
/// wait for the connection's streams), and the connection's signal that a revocation closed one of them (then
/// GOAWAY: the connection takes no new stream).
pub struct H2Stream {
    pub hold: TaskTrackerToken,
    pub revoked: tokio_util::sync::CancellationToken,
}

/// An admitted upgrade: what its relay needs once the 101 is on its way.
pub struct Admitted {
    held: Box<Held>,
    route: Arc<Route>,
    stop: crate::shutdown::Stop,
    /// Whose limits admitted it (the upgrade line's `limits`).
    limits: admission::Limits,
}

impl Admitted {
    /// Relay between the client's socket and the upstream until the connection ends; the
    /// relay counts and logs the close.
    ///
    /// Not an `async fn`, whose future would keep its arguments (the boxed `Held`, the
    /// client) and what was moved out of them beside the relay's own state for the
    /// connection's whole life: the parts are handed on before the future exists, and it
    /// keeps only the relay, the caps and the registry place (`-Zprint-type-sizes`).
    /// `revoked` (an HTTP/2 connection's) is cancelled when the operator's revocation is
    /// what closed it.
    pub fn relay(
        self,
        client: relay::Client,
        revoked: Option<tokio_util::sync::CancellationToken>,
    ) -> impl std::future::Future<Output = ()> + Send {
        use futures_util::FutureExt;
        let Admitted {
            held, route, stop, ..
        } = self;
        let Held {
            socket,
            connection,
            registered,
        } = *held;
        relay::run(client, socket, route, stop, connection).then(move |(outcome, ended)| {
            if let (relay::CloseReason::Revoked, Some(revoked)) = (&outcome.reason, revoked) {
                revoked.cancel();
            }
            // Its registry place goes as it is logged closed; its sockets then linger a
            // while. Boxed: the lingering future (both legs' closes at once, 840 bytes) is
            // twice the relay's, and in its place it would size every connection's task
            // for its whole life (`-Zprint-type-sizes`).
            drop(registered);
            Box::pin(ended.linger())
        })
    }
}

/// What an admitted upgrade waits with until the client's upgrade completes: the parts the
/// relay takes (the caps with them), and the registry place that the task then keeps until
/// its close line.
struct Held {
    socket: crate::upstream::UpstreamSocket,
    connection: relay::Connection,
    /// Its place in the registry of open connections, left as the close is logged.
    registered: crate::registry::Registered,
}

/// Seed the generator behind [`request_id`] before serving: aws-lc's first draw takes
/// tens of milliseconds, which would otherwise land on the first upgrade.
pub fn warm_up() {
    let _ = aws_lc_rs::rand::fill(&mut [0u8; 16]);
}

/// The client's `X-Request-Id` when it is sane (1–128 visible ASCII characters), or a new one.
pub(crate) fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get("x-request-id") {
        let b = id.as_bytes();
        if (1..=128).contains(&b.len()) && b.iter().all(|c| c.is_ascii_graphic()) {
            return id.clone();
        }
    }
    let mut raw = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut raw).is_err() {
        raw = rand_fallback();
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 32];
    for (i, b) in raw.iter().enumerate() {
        hex[2 * i] = HEX[usize::from(b >> 4)];
        hex[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

fn rand_fallback() -> [u8; 16] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    nanos.to_le_bytes()
}
