//! The upstream side: dial (TCP, then TLS for `wss://`), build the request that goes
//! upstream (docs/admission.md, "The request sent upstream"), and complete the upstream's WebSocket
//! handshake before the client gets its 101.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

use crate::admission::token::{query_name_is, Carriers, QUERY_SEPARATORS};
use crate::admission::{Rejection, UpstreamFault, UpstreamRefusal};
use crate::extensions::{Agreed, Offers};
use crate::policy::{Route, TokenSource, Upstream};

/// Largest upstream error body relayed to the client.
pub const MAX_RELAYED_BODY: usize = 64 * 1024;

/// Largest upstream response head (the client's is capped at 16 KiB the same way).
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Interim responses (`100 Continue`, `103 Early Hints`) read past before the upstream's
/// final answer; more are a broken upstream, not a slow one.
const MAX_INTERIM: u32 = 8;

/// A connection to an upstream, plain or TLS.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// TCP (and TLS, for `wss://`) to the route's upstream.
pub async fn dial(upstream: &Upstream) -> io::Result<UpstreamStream> {
    let tcp = connect(upstream).await?;
    tcp.set_nodelay(true)?;
    match &upstream.tls {
        None => Ok(UpstreamStream::Plain(tcp)),
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            let stream = connector.connect(tls.server_name.clone(), tcp).await?;
            Ok(UpstreamStream::Tls(Box::new(stream)))
        }
    }
}

/// TCP to the upstream's address: a literal IP as it is, a host name through its last
/// lookup (see [`crate::policy::Resolved`]), each address in turn until one answers.
async fn connect(upstream: &Upstream) -> io::Result<TcpStream> {
    if let Ok(address) = upstream.authority.parse::<SocketAddr>() {
        return TcpStream::connect(address).await;
    }
    let addresses = match upstream.resolved.current() {
        Some(addresses) => addresses,
        None => {
            let found: Arc<[SocketAddr]> = tokio::net::lookup_host(&upstream.authority)
                .await?
                .collect();
            upstream.resolved.store(found.clone());
            found
        }
    };
    let connected = TcpStream::connect(&addresses[..]).await;
    if connected.is_err() {
        upstream.resolved.forget();
    }
    connected
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// What the gate knows about the client request, for the headers it sends upstream.
pub struct Forwarding<'a> {
    /// The TCP peer.
    pub peer: IpAddr,
    /// Whether the peer is a trusted proxy (its X-Forwarded-For is extended, not replaced).
    pub peer_trusted: bool,
    pub tls: bool,
    pub request_id: &'a HeaderValue,
    /// Headers derived from the token's claims (`forward_claims`).
    pub claim_headers: &'a [(HeaderName, HeaderValue)],
    /// Every header any route's `forward_claims` may set: a client's copy is always
    /// dropped, whether or not the token carries that claim, so it cannot be spoofed.
    pub claim_header_names: &'a [HeaderName],
    /// The token carriers (bearer header, query parameter, cookie) kept from the upstream,
    /// whichever one held the token.
    pub carriers: Carriers<'a>,
}

/// Headers that belong to one connection (RFC 9110 §7.6.1), never forwarded either way;
/// `Proxy-Connection` is the old non-standard spelling of `Connection` that RFC 9110 has
/// intermediaries remove as well.
pub const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers named in the `Connection` header: hop-by-hop too (RFC 9110 §7.6.1).
pub fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| HeaderName::try_from(s.trim()).ok())
        .collect()
}

/// Remove hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in connection_listed(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// nginx's `proxy_redirect default`: a `Location` that points at the upstream's own
/// address (the Host the gate sent it, or the address it dials, under the scheme the app
/// was reached by) becomes the same path on the client's origin, so that a redirect never
/// sends a browser to an address only the gate can reach. Any other `Location` is kept.
pub fn rewrite_location(headers: &mut HeaderMap, upstream: &Upstream) {
    let Some(location) = headers.get(header::LOCATION) else {
        return;
    };
    let scheme: &[u8] = if upstream.tls.is_some() {
        b"https://"
    } else {
        b"http://"
    };
    let Some(rest) = strip_prefix_ignore_case(location.as_bytes(), scheme) else {
        return;
    };
    let path = [&upstream.host_header, &upstream.authority]
        .into_iter()
        .filter_map(|host| strip_prefix_ignore_case(rest, host.as_bytes()))
        .find(|path| matches!(path.first(), None | Some(b'/' | b'?' | b'#')));
    let Some(path) = path else {
        return;
    };
    let rewritten = match path.first() {
        Some(b'/') => HeaderValue::from_bytes(path),
        _ => HeaderValue::from_bytes(&[b"/", path].concat()),
    };
    if let Ok(rewritten) = rewritten {
        headers.insert(header::LOCATION, rewritten);
    }
}

fn strip_prefix_ignore_case<'a>(bytes: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = bytes.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &bytes[prefix.len()..])
}

/// Headers only wsgate sets upstream; a client's copy is dropped and `forward_claims`
/// may not name them.
pub fn is_reserved_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    HOP_BY_HOP.contains(name)
        || n == "host"
        || n.starts_with("sec-websocket-")
        || n.starts_with("x-forwarded-")
        || n == "forwarded"
        || n == "x-real-ip"
        || n == "x-request-id"
}

/// Headers with which some app servers let a request name another path than its own
/// (Symfony and IIS read `X-Original-URL` and `X-Rewrite-URL` as the request's URL): the
/// upstream would route it past the route the gate chose, and checked, by its path.
const ROUTING_OVERRIDES: [&str; 2] = ["x-original-url", "x-rewrite-url"];

/// A header name with an underscore. CGI, WSGI and Rack turn `-` into `_` when they make
/// a header into a variable, so `X_Auth_Subject` would reach the app as `X-Auth-Subject`
/// does (CVE-2015-0219): a client's copy is dropped, like nginx's `underscores_in_headers
/// off`.
fn has_underscore(name: &HeaderName) -> bool {
    name.as_str().as_bytes().contains(&b'_')
}

/// The headers that go upstream: the client's end-to-end headers minus anything reserved,
/// spoofable (underscored names included) or carrying the token, plus X-Forwarded-*,
/// X-Request-Id and claim headers.
pub fn forward_headers(client: &HeaderMap, fwd: &Forwarding<'_>) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client.len() + 6);
    let connection_listed = connection_listed(client);
    let mut cookies: Vec<HeaderValue> = Vec::new();
    let strips_bearer = fwd.carriers.sources.contains(&TokenSource::Header);
    // The gate verified the first Authorization field's token; only that one may stay.
    let mut keep_authorization = fwd.carriers.kept == Some(&TokenSource::Header);
    let mut keep_cookie = match fwd.carriers.kept {
        Some(TokenSource::Cookie(name)) => Some(name.as_str()),
        _ => None,
    };
    for (name, value) in client {
        if is_reserved_header(name)
            || has_underscore(name)
            || ROUTING_OVERRIDES.contains(&name.as_str())
            || connection_listed.contains(name)
            || fwd.claim_header_names.contains(name)
        {
            continue;
        }
        if name == header::AUTHORIZATION
            && strips_bearer
            && !std::mem::take(&mut keep_authorization)
            && is_bearer(value)
        {
            continue;
        }
        if name == header::COOKIE {
            cookies.extend(strip_cookies(value, fwd.carriers.sources, &mut keep_cookie));
            continue;
        }
        out.append(name, value.clone());
    }
    // RFC 9113 §8.2.3: an HTTP/2 client may split its cookies over several fields, which
    // go to the HTTP/1.1 upstream as one header (RFC 6265 §5.4), joined with "; ".
    if let Some(joined) = join_cookies(cookies) {
        out.insert(header::COOKIE, joined);
    }

    // A trusted proxy's chain is extended, every field of it in order (RFC 9110 §5.3: the
    // fields are one comma-separated list; HAProxy's `option forwardfor` adds a field of its
    // own), so the upstream sees the chain the client IP was taken from.
    let mut xff = String::new();
    if fwd.peer_trusted {
        for prior in client.get_all(HeaderName::from_static("x-forwarded-for")) {
            match prior.to_str().map(str::trim) {
                Ok("") => {}
                Ok(p) => {
                    xff.push_str(p);
                    xff.push_str(", ");
                }
                // Not text: dropped, as a single such field always was.
                Err(_) => {}
            }
        }
    }
    xff.push_str(&fwd.peer.to_string());
    if let Ok(v) = HeaderValue::from_str(&xff) {
        out.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    // A trusted proxy in front (a mesh or load balancer that terminated TLS, with the gate
    // on --plaintext) knows the scheme the client used; anyone else's claim is replaced.
    let proto = client
        .get(HeaderName::from_static("x-forwarded-proto"))
        .filter(|_| fwd.peer_trusted)
        .and_then(|v| match v.as_bytes().trim_ascii() {
            p if p.eq_ignore_ascii_case(b"https") => Some("https"),
            p if p.eq_ignore_ascii_case(b"http") => Some("http"),
            _ => None,
        })
        .unwrap_or(if fwd.tls { "https" } else { "http" });
    out.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    );
    if let Some(host) = client.get(header::HOST) {
        out.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
    out.insert(
        HeaderName::from_static("x-request-id"),
        fwd.request_id.clone(),
    );
    for (name, value) in fwd.claim_headers {
        out.insert(name.clone(), value.clone());
    }
    out
}

/// `Bearer <token>`, or a bare `Bearer` (an empty carrier, removed like a full one). A tab
/// after the scheme counts too: the gate reads no token there, but DRF, SimpleJWT and
/// Flask-JWT-Extended split the value on any whitespace and would read one nobody checked.
fn is_bearer(value: &HeaderValue) -> bool {
    let v = value.as_bytes();
    v.get(..6)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"bearer"))
        && v.get(6).is_none_or(|&b| b == b' ' || b == b'\t')
}

/// Cookie header values as one value, in order, separated by "; ".
fn join_cookies(mut values: Vec<HeaderValue>) -> Option<HeaderValue> {
    if values.len() <= 1 {
        return values.pop();
    }
    let joined = values
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    // Visible bytes joined with "; " are a valid value.
    HeaderValue::from_bytes(&joined).ok()
}

/// The Cookie header without the token cookies; `None` if nothing is left. `keep` names
/// the verified token's cookie until its first `name=value` copy, the one the gate read,
/// has been kept.
fn strip_cookies(
    value: &HeaderValue,
    sources: &[TokenSource],
    keep: &mut Option<&str>,
) -> Option<HeaderValue> {
    let is_token = |name: &[u8]| {
        sources
            .iter()
            .any(|s| matches!(s, TokenSource::Cookie(c) if c.as_bytes() == name))
    };
    // As bytes: another cookie's unencoded UTF-8 value must not keep the token cookie in.
    fn name_of(c: &[u8]) -> &[u8] {
        let end = c.iter().position(|&b| b == b'=').unwrap_or(c.len());
        c[..end].trim_ascii()
    }
    let kept: Vec<&[u8]> = value
        .as_bytes()
        .split(|&b| b == b';')
        .map(<[u8]>::trim_ascii)
        .filter(|c| {
            let name = name_of(c);
            if c.is_empty() || !is_token(name) {
                return !c.is_empty();
            }
            let verified = keep.is_some_and(|k| k.as_bytes() == name) && c.contains(&b'=');
            verified && keep.take().is_some()
        })
        .collect();
    if kept.is_empty() {
        None
    } else {
        HeaderValue::from_bytes(&kept.join(&b"; "[..])).ok()
    }
}

/// The path and query without the token query parameters, however their names are
/// escaped (`access%5Ftoken` is `access_token` to the upstream) and whichever separator
/// comes before them (`;` as well as `&`: Rack and older Python split on both, and would
/// read a token the gate never saw). The verified token's parameter, when it is forwarded,
/// keeps its first `name=value` copy, the one the gate read. Everything else goes on
/// byte for byte, empty pieces and separators included; a query with no token parameter
/// is not touched.
pub fn strip_token_params(path_and_query: &str, carriers: &Carriers<'_>) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_owned();
    };
    let is_token = |name: &str| {
        carriers
            .sources
            .iter()
            .any(|s| matches!(s, TokenSource::Query(q) if query_name_is(name, q)))
    };
    let mut keep = match carriers.kept {
        Some(TokenSource::Query(name)) => Some(name.as_str()),
        _ => None,
    };
    let mut removed = false;
    // Each piece with the separator that ends it (none for the last).
    let mut kept: Vec<&str> = Vec::new();
    let mut rest = query;
    loop {
        let (piece, sep_len) = match rest.find(QUERY_SEPARATORS) {
            Some(i) => (&rest[..=i], 1),
            None => (rest, 0),
        };
        let pair = &piece[..piece.len() - sep_len];
        let name = pair.split('=').next().unwrap_or("");
        let token = !pair.is_empty() && is_token(name);
        let verified = token && keep.is_some_and(|k| query_name_is(name, k)) && pair.contains('=');
        if !token || (verified && keep.take().is_some()) {
            kept.push(piece);
        } else {
            removed = true;
        }
        if sep_len == 0 {
            break;
        }
        rest = &rest[piece.len()..];
    }
    if !removed {
        return path_and_query.to_owned();
    }
    let mut out = String::with_capacity(path_and_query.len());
    out.push_str(path);
    if let Some((last, init)) = kept.split_last() {
        out.push('?');
        init.iter().for_each(|piece| out.push_str(piece));
        // What ended the last kept piece went with the piece removed after it.
        out.push_str(last.strip_suffix(QUERY_SEPARATORS).unwrap_or(last));
    }
    out
}

/// The offered subprotocols without token entries (`subprotocol:` prefixes). The verified
/// token's entry, when it is forwarded, keeps its first copy, the one the gate read.
pub fn strip_token_protocols<'p>(protocols: &[&'p str], carriers: &Carriers<'_>) -> Vec<&'p str> {
    let mut keep = match carriers.kept {
        Some(TokenSource::Subprotocol(prefix)) => Some(prefix.as_str()),
        _ => None,
    };
    protocols
        .iter()
        .copied()
        .filter(|p| {
            if !is_token_protocol(p, carriers.sources) {
                return true;
            }
            keep.is_some_and(|k| p.starts_with(k)) && keep.take().is_some()
        })
        .collect()
}

/// Whether an offered subprotocol is a token entry (starts with a `subprotocol:` prefix).
pub fn is_token_protocol(protocol: &str, sources: &[TokenSource]) -> bool {
    sources.iter().any(
        |s| matches!(s, TokenSource::Subprotocol(prefix) if protocol.starts_with(prefix.as_str())),
    )
}

/// An upstream WebSocket, handshake completed.
pub struct UpstreamSocket {
    pub io: UpstreamStream,
    /// Bytes that arrived after the 101's head: the start of the first frames.
    pub read_ahead: Vec<u8>,
    /// The subprotocol the upstream selected, returned to the client.
    pub protocol: Option<HeaderValue>,
    /// The other headers of the upstream's 101 (`Set-Cookie`, affinity cookies, …), for
    /// the client's 101: without hop-by-hop headers and the `Sec-WebSocket-*` ones the gate
    /// sets itself.
    pub headers: HeaderMap,
    /// permessage-deflate, when the upstream accepted one of the client's offers.
    pub deflate: Option<Agreed>,
}

/// Connect to the route's upstream and complete its WebSocket handshake, all within
/// `upstream_connect_seconds`. A non-101 answer is relayed to the client as it came.
pub async fn open(
    route: &Route,
    path_and_query: &str,
    headers: HeaderMap,
    protocols: &[&str],
    offers: &Offers,
) -> Result<UpstreamSocket, Rejection> {
    let deadline = Instant::now() + route.timeouts.upstream_connect;
    match timeout_at(
        deadline,
        handshake(route, path_and_query, headers, protocols, offers, deadline),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(Rejection::UpstreamTimeout),
    }
}

/// Whether an upstream's status code is one: 100 to 599 (RFC 9110 §15). `http` and hyper
/// take any three digits, and a `999` would reach the client with no meaning and no reason
/// phrase.
pub fn is_status(code: u16) -> bool {
    (100..600).contains(&code)
}

/// A refusal for an upstream answer that broke the handshake's rules.
pub fn bad_answer(what: &'static str) -> Rejection {
    Rejection::UpstreamUnavailable(UpstreamFault::Answer(what.into()))
}

async fn handshake(
    route: &Route,
    path_and_query: &str,
    headers: HeaderMap,
    protocols: &[&str],
    offers: &Offers,
    deadline: Instant,
) -> Result<UpstreamSocket, Rejection> {
    let stream = dial(&route.upstream)
        .await
        .map_err(|e| Rejection::UpstreamUnavailable(UpstreamFault::Connect(e)))?;
    let key = generate_key();
    let uri = Uri::from_str(path_and_query)
        .map_err(|_| Rejection::BadRequest("invalid request target"))?;
    let mut stream = stream;
    let head = request_head(&uri, &headers, &route.upstream, &key, protocols, offers);
    let sent = async {
        stream.write_all(&head).await?;
        stream.flush().await
    };
    let broken = |what: &str, e: io::Error| {
        Rejection::UpstreamUnavailable(UpstreamFault::Answer(format!("{what}: {e}").into()))
    };
    sent.await.map_err(|e| broken("sending the handshake", e))?;
    let (mut response, mut rest) = read_head(&mut stream, BytesMut::new())
        .await
        .map_err(|e| broken("reading the handshake's answer", e))?;
    // RFC 9110 §15.2: a client must read past interim responses (`100 Continue`,
    // `103 Early Hints`) to the final one. They are not passed on: a WebSocket client
    // expects its 101 first. At most `MAX_INTERIM`, all within the handshake's deadline.
    let mut interim = 0;
    while response.status.is_informational() && response.status != StatusCode::SWITCHING_PROTOCOLS {
        interim += 1;
        if interim > MAX_INTERIM {
            return Err(bad_answer("too many interim responses to the handshake"));
        }
        (response, rest) = read_head(&mut stream, rest)
            .await
            .map_err(|e| broken("reading the handshake's answer", e))?;
    }
    if response.status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(relay_refusal(stream, response, rest, &route.upstream, deadline).await);
    }
    // RFC 9110 §15.2.2: no HTTP/1.0 server switches protocols; the request was HTTP/1.1.
    if response.minor_version != 1 {
        return Err(bad_answer("a 101 in HTTP/1.0"));
    }
    // RFC 6455 §4.1: a 101 that does not switch to WebSocket, or whose one
    // Sec-WebSocket-Accept is not the key's, fails the connection.
    let lists = |name, token| crate::head::lists_token(&response.headers, name, token);
    if !lists(header::UPGRADE, "websocket") || !lists(header::CONNECTION, "upgrade") {
        return Err(bad_answer(
            "a 101 without Upgrade: websocket and Connection: Upgrade",
        ));
    }
    let mut accepts = response
        .headers
        .get_all(header::SEC_WEBSOCKET_ACCEPT)
        .iter();
    let expected = derive_accept_key(key.as_bytes());
    match (accepts.next(), accepts.next()) {
        (Some(accept), None) if accept.as_bytes() == expected.as_bytes() => {}
        _ => return Err(bad_answer("a 101 with a wrong Sec-WebSocket-Accept")),
    }
    let deflate = offers
        .accept(&response.headers)
        .map_err(|_| bad_answer("a 101 selecting an extension or parameter it was not offered"))?;
    // RFC 6455 §4.1, §11.3.4: one Sec-WebSocket-Protocol at most, naming an offered one.
    let mut selected = response
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter();
    let protocol = match (selected.next(), selected.next()) {
        (None, _) => None,
        (Some(p), None) if protocols.iter().any(|o| p.as_bytes() == o.as_bytes()) => {
            Some(p.clone())
        }
        (Some(_), None) => {
            return Err(bad_answer(
                "a 101 selecting a subprotocol it was not offered",
            ))
        }
        (Some(_), Some(_)) => return Err(bad_answer("a 101 selecting two subprotocols")),
    };
    let mut passed = response.headers;
    strip_hop_by_hop(&mut passed);
    // The handshake headers the gate sets itself in the client's 101 (or h2 200) are its
    // own, never the upstream's copies; any other `Sec-WebSocket-*` header goes on.
    for name in [
        header::CONTENT_LENGTH,
        header::SEC_WEBSOCKET_ACCEPT,
        header::SEC_WEBSOCKET_PROTOCOL,
        header::SEC_WEBSOCKET_EXTENSIONS,
    ] {
        passed.remove(name);
    }
    Ok(UpstreamSocket {
        io: stream,
        read_ahead: rest.to_vec(),
        protocol,
        headers: passed,
        deflate,
    })
}

/// The request head, written as it goes on the wire: the forwarded headers (which hold
/// none of the handshake's: `forward_headers` drops them), then the upstream's fixed
/// handshake lines (Host, Connection, Upgrade, version; made once with the policy), the
/// key, the offered subprotocols and extensions. Header values cannot hold CR or LF (`HeaderValue`
/// refuses them, and the subprotocols are pieces of one), and the target is a parsed
/// origin-form URI.
fn request_head(
    uri: &Uri,
    headers: &HeaderMap,
    upstream: &Upstream,
    key: &str,
    protocols: &[&str],
    offers: &Offers,
) -> Vec<u8> {
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = Vec::with_capacity(
        160 + target.len() + upstream.handshake_lines.len() + headers.len() * 48,
    );
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    crate::head::write_fields(&mut head, headers);
    head.extend_from_slice(upstream.handshake_lines.as_bytes());
    head.extend_from_slice(b"sec-websocket-key: ");
    head.extend_from_slice(key.as_bytes());
    head.extend_from_slice(b"\r\n");
    for (i, protocol) in protocols.iter().enumerate() {
        head.extend_from_slice(if i == 0 {
            b"sec-websocket-protocol: "
        } else {
            b", "
        });
        head.extend_from_slice(protocol.as_bytes());
    }
    if !protocols.is_empty() {
        head.extend_from_slice(b"\r\n");
    }
    if let Some(offers) = offers.header_value() {
        head.extend_from_slice(b"sec-websocket-extensions: ");
        head.extend_from_slice(offers.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// The upstream's response head.
struct Head {
    /// The minor version of the status line's `HTTP/1.x`.
    minor_version: u8,
    status: StatusCode,
    headers: HeaderMap,
}

/// Reads and parses a response head of at most `MAX_RESPONSE_HEAD` bytes (and 64 header
/// fields), starting with the bytes in `buf` (what came after an interim response);
/// returns it with whatever arrived after it.
async fn read_head(stream: &mut UpstreamStream, mut buf: BytesMut) -> io::Result<(Head, BytesMut)> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut parse_first = !buf.is_empty();
    loop {
        if !std::mem::take(&mut parse_first) {
            buf.reserve(1024);
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut slots);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response
                    .code
                    .filter(|&c| is_status(c))
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| invalid("bad status"))?;
                let mut headers = HeaderMap::with_capacity(response.headers.len());
                for field in response.headers.iter() {
                    let name = HeaderName::from_bytes(field.name.as_bytes())
                        .map_err(|_| invalid("bad header name"))?;
                    let value = HeaderValue::from_bytes(field.value)
                        .map_err(|_| invalid("bad header value"))?;
                    headers.append(name, value);
                }
                let minor_version = response.version.unwrap_or(0);
                let rest = buf.split_off(len);
                return Ok((
                    Head {
                        minor_version,
                        status,
                        headers,
                    },
                    rest,
                ));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(invalid("response head too large")),
            Err(e) => return Err(invalid(&e.to_string())),
        }
    }
}

/// The upstream's own answer, with at most `MAX_RELAYED_BODY` of its body (by
/// Content-Length, chunked, or up to EOF), read within the upstream deadline.
async fn relay_refusal(
    mut stream: UpstreamStream,
    head: Head,
    mut raw: BytesMut,
    upstream: &Upstream,
    deadline: Instant,
) -> Rejection {
    let codings = head.headers.get_all(header::TRANSFER_ENCODING);
    let chunked = codings.iter().next().is_some();
    let bodiless = head.status == StatusCode::NO_CONTENT || head.status == StatusCode::NOT_MODIFIED;
    // RFC 9112 §6.3, as `http: pass` answers them: framing a smuggler would use, a coding
    // the client would get undone and unlabelled, or lengths that disagree, is 502.
    if !bodiless && chunked && head.headers.contains_key(header::CONTENT_LENGTH) {
        return bad_answer("a refusal with both Content-Length and Transfer-Encoding");
    }
    if chunked && crate::head::transfer_codings(codings.iter().map(HeaderValue::as_bytes)).is_err()
    {
        return bad_answer("a refusal transfer coding other than chunked");
    }
    let mut lengths = head
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|v| {
            std::str::from_utf8(v.trim_ascii())
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
        });
    let length = match lengths.next() {
        None => None,
        Some(Some(n)) if lengths.all(|other| other == Some(n)) => Some(n),
        Some(_) => return bad_answer("a malformed Content-Length"),
    };
    // Chunk framing comes on top of the data: read a little past the cap.
    let want = match (bodiless, chunked, length) {
        (true, _, _) => 0,
        (false, true, _) => MAX_RELAYED_BODY + 4096,
        (false, false, Some(n)) => n.min(MAX_RELAYED_BODY),
        (false, false, None) => MAX_RELAYED_BODY,
    };
    let close_delimited = !bodiless && !chunked && length.is_none();
    let mut failed = false;
    while raw.len() < want && !(chunked && dechunk(&raw).1) {
        raw.reserve((want - raw.len()).min(16 * 1024));
        match timeout_at(deadline, stream.read_buf(&mut raw)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => break,
            Ok(Err(_)) => {
                failed = true;
                break;
            }
            // One that never closes is passed on as far as it came by the deadline (its
            // status is the answer); a body of announced size still short is a timeout.
            Err(_) if close_delimited => break,
            Err(_) => return Rejection::UpstreamTimeout,
        }
    }
    // Whether the body came whole (or up to the cap): a refusal cut short is not passed
    // on as if it were complete. One without length or chunks ends where the upstream
    // closes.
    let whole = raw.len() >= want || (chunked && dechunk(&raw).1) || (close_delimited && !failed);
    if !whole {
        return bad_answer("a refusal whose body was cut short");
    }
    let body = if chunked {
        Bytes::from(dechunk(&raw).0)
    } else {
        raw.truncate(want);
        raw.freeze()
    };
    // Its end-to-end headers go to the client (`Location`, `Set-Cookie`, `Cache-Control`, …,
    // as nginx and Envoy relay them); the framing is the gate's own (the body may have
    // been cut at 64 KiB), and the handshake headers mean nothing on a refusal.
    let mut headers = head.headers;
    strip_hop_by_hop(&mut headers);
    rewrite_location(&mut headers, upstream);
    for name in [header::CONTENT_LENGTH, header::TRANSFER_ENCODING] {
        headers.remove(name);
    }
    let handshake: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("sec-websocket-"))
        .cloned()
        .collect();
    for name in handshake {
        headers.remove(name);
    }
    Rejection::UpstreamStatus(Box::new(UpstreamRefusal {
        status: head.status,
        headers,
        body,
    }))
}

/// Decodes a chunked body as far as it goes: the data (at most `MAX_RELAYED_BODY`) and
/// whether the last chunk was seen.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    while out.len() < MAX_RELAYED_BODY {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|line| line.split(';').next())
            .and_then(|hex| usize::from_str_radix(hex.trim(), 16).ok());
        let Some(size) = size else {
            return (out, true);
        };
        if size == 0 {
            return (out, true);
        }
        raw = &raw[eol + 2..];
        let take = size.min(raw.len()).min(MAX_RELAYED_BODY - out.len());
        out.extend_from_slice(&raw[..take]);
        // The size is the upstream's: `ffffffffffffffff` must not overflow.
        match size.checked_add(2) {
            Some(end) if raw.len() >= end => raw = &raw[end..],
            _ => return (out, false),
        }
    }
    (out, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunk_takes_any_chunk_size_an_upstream_sends() {
        assert_eq!(dechunk(b"3\r\nabc\r\n0\r\n\r\n"), (b"abc".to_vec(), true));
        assert_eq!(
            dechunk(b"ffffffffffffffff\r\nabc"),
            (b"abc".to_vec(), false)
        );
        assert_eq!(dechunk(b"fffffffffffffffff\r\nabc"), (Vec::new(), true));
    }

    /// What a plain client's request from 10.0.0.1 over TLS is forwarded with.
    fn forwarding<'a>(id: &'a HeaderValue, carriers: Carriers<'a>) -> Forwarding<'a> {
        Forwarding {
            peer: "10.0.0.1".parse().unwrap(),
            peer_trusted: false,
            tls: true,
            request_id: id,
            claim_headers: &[],
            claim_header_names: &[],
            carriers,
        }
    }

    fn sources() -> Vec<TokenSource> {
        vec![
            TokenSource::Header,
            TokenSource::Query("access_token".into()),
            TokenSource::Cookie("access_token".into()),
            TokenSource::Subprotocol("bearer.".into()),
        ]
    }

    #[test]
    fn chunked_bodies_decoded_and_capped() {
        assert_eq!(
            dechunk(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"),
            (b"hello world".to_vec(), true)
        );
        // Incomplete: what has arrived so far, not finished.
        assert_eq!(dechunk(b"5\r\nhel"), (b"hel".to_vec(), false));
        assert_eq!(dechunk(b"5\r\nhello\r\n"), (b"hello".to_vec(), false));
        // Garbage size line: stop there.
        assert_eq!(dechunk(b"zz\r\nhello\r\n"), (Vec::new(), true));
        let big = format!(
            "{:x}\r\n{}\r\n",
            MAX_RELAYED_BODY * 2,
            "x".repeat(MAX_RELAYED_BODY * 2)
        );
        let (body, done) = dechunk(big.as_bytes());
        assert_eq!((body.len(), done), (MAX_RELAYED_BODY, true));
    }

    #[test]
    fn a_location_at_the_upstreams_own_address_becomes_a_path() {
        let upstream = Upstream {
            authority: "app:80".into(),
            host_header: "app".into(),
            tls: None,
            url: "ws://app".into(),
            resolved: Default::default(),
            handshake_lines: crate::policy::handshake_lines("app"),
        };
        let rewritten = |location: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::LOCATION, HeaderValue::from_str(location).unwrap());
            rewrite_location(&mut headers, &upstream);
            headers[header::LOCATION].to_str().unwrap().to_owned()
        };
        assert_eq!(rewritten("http://app/login?next=%2F"), "/login?next=%2F");
        assert_eq!(rewritten("HTTP://APP:80/a"), "/a");
        assert_eq!(rewritten("http://app"), "/");
        assert_eq!(rewritten("http://app?x=1"), "/?x=1");
        // Not the upstream: another host, a longer name, another scheme, a relative path.
        for kept in [
            "http://application/a",
            "http://app.example.com/a",
            "https://app/a",
            "https://idp.example.com/authorize",
            "/already/relative",
        ] {
            assert_eq!(rewritten(kept), kept);
        }
    }

    #[test]
    fn request_head_is_origin_form() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        let upstream = Upstream {
            authority: "up:8080".into(),
            host_header: "up:8080".into(),
            tls: None,
            url: "ws://up:8080".into(),
            resolved: Default::default(),
            handshake_lines: crate::policy::handshake_lines("up:8080"),
        };
        let head = request_head(
            &Uri::from_static("/ws?a=1"),
            &h,
            &upstream,
            "k==",
            &[],
            &Offers::default(),
        );
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /ws?a=1 HTTP/1.1\r\nx-a: 1\r\nhost: up:8080\r\nconnection: Upgrade\r\n\
             upgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: k==\r\n\r\n"
        );
        let head = request_head(
            &Uri::from_static("/"),
            &h,
            &upstream,
            "k==",
            &["a", "b"],
            &Offers::default(),
        );
        assert!(String::from_utf8(head)
            .unwrap()
            .ends_with("sec-websocket-key: k==\r\nsec-websocket-protocol: a, b\r\n\r\n"));
    }

    #[test]
    fn token_carriers_removed() {
        let s = sources();
        let s = Carriers {
            sources: &s,
            kept: None,
        };
        assert_eq!(strip_token_params("/ws?access_token=x&a=1", &s), "/ws?a=1");
        assert_eq!(strip_token_params("/ws?access_token=x", &s), "/ws");
        assert_eq!(strip_token_params("/ws?a=1", &Carriers::NONE), "/ws?a=1");
        assert_eq!(
            strip_token_params("/ws?access%5Ftoken=x&a=1&access%5ftoken=y", &s),
            "/ws?a=1"
        );
        // Behind `;` too (Rack, older Python), and the rest byte for byte.
        assert_eq!(
            strip_token_params("/ws?a=1;access_token=z&b", &s),
            "/ws?a=1;b"
        );
        assert_eq!(
            strip_token_params("/ws?x=1&&access_token=z&y=2&", &s),
            "/ws?x=1&&y=2&"
        );
        assert_eq!(strip_token_params("/ws?x=1&access_token=z", &s), "/ws?x=1");
        // No token parameter: untouched, empty pieces and a bare `?` included.
        for q in ["/ws?x=1&&y=2&", "/ws?", "/ws?a;b", "/ws"] {
            assert_eq!(strip_token_params(q, &s), q);
        }
        let v = HeaderValue::from_static("a=1; access_token=x; b=2");
        assert_eq!(strip_cookies(&v, s.sources, &mut None).unwrap(), "a=1; b=2");
        assert!(strip_cookies(
            &HeaderValue::from_static("access_token=x"),
            s.sources,
            &mut None
        )
        .is_none());
        // Several Cookie fields (an HTTP/2 client's) go upstream as one.
        let mut h = HeaderMap::new();
        for v in ["a=1", "access_token=x", "b=2; c=3"] {
            h.append(header::COOKIE, HeaderValue::from_static(v));
        }
        let id = HeaderValue::from_static("req-1");
        let fwd = forwarding(&id, s);
        let cookies: Vec<_> = forward_headers(&h, &fwd)
            .get_all(header::COOKIE)
            .iter()
            .cloned()
            .collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        assert_eq!(
            strip_token_protocols(&["bearer.abc", "chat"], &s),
            vec!["chat"]
        );
    }

    /// With `forward_token`, the verified carrier's first copy, the one the gate read,
    /// goes upstream and no later copy does: a last-wins upstream must not read a token
    /// the gate never checked.
    #[test]
    fn a_forwarded_token_keeps_only_its_first_copy() {
        let s = sources();
        let keep = |source: &TokenSource| Carriers {
            sources: &s,
            kept: Some(s.iter().find(|x| *x == source).unwrap()),
        };
        let query = keep(&TokenSource::Query("access_token".into()));
        assert_eq!(
            strip_token_params(
                "/ws?access_token&access_token=A&x=1&access%5Ftoken=B",
                &query
            ),
            "/ws?access_token=A&x=1"
        );
        let cookie = keep(&TokenSource::Cookie("access_token".into()));
        let mut h = HeaderMap::new();
        h.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer C"));
        for v in [
            "a=1; access_token",
            "access_token=A; access_token=B",
            "access_token=D",
        ] {
            h.append(header::COOKIE, HeaderValue::from_static(v));
        }
        let id = HeaderValue::from_static("req-1");
        let mut fwd = forwarding(&id, cookie);
        let out = forward_headers(&h, &fwd);
        assert_eq!(out[header::COOKIE], "a=1; access_token=A");
        assert!(out.get(header::AUTHORIZATION).is_none());

        h.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer B"));
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eDp5"),
        );
        fwd.carriers = keep(&TokenSource::Header);
        let out = forward_headers(&h, &fwd);
        let authorization: Vec<_> = out.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(authorization, ["Bearer C", "Basic eDp5"]);
        assert_eq!(out[header::COOKIE], "a=1");

        let protocol = keep(&TokenSource::Subprotocol("bearer.".into()));
        assert_eq!(
            strip_token_protocols(&["chat", "bearer.A", "bearer.B"], &protocol),
            vec!["chat", "bearer.A"]
        );
    }

    #[test]
    fn forwarded_for_is_replaced_unless_trusted_and_underscores_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-auth-subject", HeaderValue::from_static("spoofed"));
        h.insert("x-auth-role", HeaderValue::from_static("admin"));
        // CGI, WSGI and Rack read these as X-Auth-Subject and X-Forwarded-For.
        h.insert("x_auth_subject", HeaderValue::from_static("admin"));
        h.insert("x_forwarded_for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-other", HeaderValue::from_static("kept"));
        let id = HeaderValue::from_static("req-1");
        let claims = [(
            HeaderName::from_static("x-auth-subject"),
            HeaderValue::from_static("alice"),
        )];
        let names = [
            HeaderName::from_static("x-auth-subject"),
            HeaderName::from_static("x-auth-role"),
        ];
        let mut fwd = Forwarding {
            claim_headers: &claims,
            claim_header_names: &names,
            ..forwarding(&id, Carriers::NONE)
        };
        let out = forward_headers(&h, &fwd);
        assert_eq!(out["x-forwarded-for"], "10.0.0.1");
        assert_eq!(out["x-auth-subject"], "alice");
        assert_eq!(out.get_all("x-auth-subject").iter().count(), 1);
        // No role claim in the token: the client's copy is dropped all the same.
        assert!(out.get("x-auth-role").is_none());
        assert!(out.keys().all(|n| !n.as_str().contains('_')), "{out:?}");
        assert_eq!(out["x-other"], "kept");
        fwd.peer_trusted = true;
        assert_eq!(
            forward_headers(&h, &fwd)["x-forwarded-for"],
            "1.2.3.4, 10.0.0.1"
        );
        // Every field of the chain, in order (a proxy that adds a field of its own).
        h.append("x-forwarded-for", HeaderValue::from_static(" "));
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("5.6.7.8, 9.9.9.9"),
        );
        assert_eq!(
            forward_headers(&h, &fwd)["x-forwarded-for"],
            "1.2.3.4, 5.6.7.8, 9.9.9.9, 10.0.0.1"
        );
        fwd.peer_trusted = false;
        assert_eq!(forward_headers(&h, &fwd)["x-forwarded-for"], "10.0.0.1");
    }

    #[test]
    fn bearer_carriers_full_or_empty() {
        for (value, carrier) in [
            ("Bearer abc", true),
            ("bearer abc", true),
            ("Bearer", true),
            ("BEARER ", true),
            ("Bearer\tabc", true),
            ("Bearerish x", false),
            ("Basic YTpi", false),
            ("Bear", false),
        ] {
            assert_eq!(
                is_bearer(&HeaderValue::from_static(value)),
                carrier,
                "{value}"
            );
        }
    }
}
