//! The upstream side: dial (TCP, then TLS for `wss://`), build the request that goes
//! upstream (SPEC §3 "What goes upstream"), and complete the upstream's WebSocket
//! handshake before the client gets its 101.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

use crate::admission::{Rejection, UpstreamRefusal};
use crate::policy::{Route, TokenSource, Upstream};

/// Largest upstream error body relayed to the client.
pub const MAX_RELAYED_BODY: usize = 64 * 1024;

/// A connection to an upstream, plain or TLS.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// TCP (and TLS, for `wss://`) to the route's upstream.
pub async fn dial(upstream: &Upstream) -> io::Result<UpstreamStream> {
    let tcp = TcpStream::connect(&upstream.authority).await?;
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
    /// Every header the route's `forward_claims` may set: a client's copy is always
    /// dropped, whether or not the token carries that claim, so it cannot be spoofed.
    pub claim_header_names: &'a [(String, HeaderName)],
    /// The route's token sources: every carrier they name (bearer header, query
    /// parameter, cookie) is kept from the upstream, whichever one held the token.
    pub token_sources: &'a [TokenSource],
}

/// Headers that belong to one connection (RFC 9110 §7.6.1), never forwarded either way.
pub const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
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

/// The headers that go upstream: the client's end-to-end headers minus anything reserved,
/// spoofable or carrying the token, plus X-Forwarded-*, X-Request-Id and claim headers.
pub fn forward_headers(client: &HeaderMap, fwd: &Forwarding<'_>) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client.len() + 6);
    let connection_listed = connection_listed(client);
    for (name, value) in client {
        if is_reserved_header(name)
            || connection_listed.contains(name)
            || fwd.claim_header_names.iter().any(|(_, h)| h == name)
            || (name == header::AUTHORIZATION
                && is_bearer(value)
                && fwd.token_sources.contains(&TokenSource::Header))
        {
            continue;
        }
        if name == header::COOKIE {
            if let Some(v) = strip_cookies(value, fwd.token_sources) {
                out.append(name, v);
            }
            continue;
        }
        out.append(name, value.clone());
    }

    let xff_peer = fwd.peer.to_string();
    let xff = match client.get(HeaderName::from_static("x-forwarded-for")) {
        Some(prior) if fwd.peer_trusted => match prior.to_str() {
            Ok(p) if !p.trim().is_empty() => format!("{}, {xff_peer}", p.trim()),
            _ => xff_peer,
        },
        _ => xff_peer,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        out.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    out.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if fwd.tls { "https" } else { "http" }),
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

fn is_bearer(value: &HeaderValue) -> bool {
    value
        .as_bytes()
        .get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"bearer "))
}

/// The Cookie header without the token cookies; `None` if nothing is left.
fn strip_cookies(value: &HeaderValue, sources: &[TokenSource]) -> Option<HeaderValue> {
    let is_token = |name: &str| {
        sources
            .iter()
            .any(|s| matches!(s, TokenSource::Cookie(c) if c == name))
    };
    let Ok(s) = value.to_str() else {
        return Some(value.clone());
    };
    let kept: Vec<&str> = s
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty() && !is_token(c.split('=').next().unwrap_or("").trim()))
        .collect();
    if kept.is_empty() {
        None
    } else {
        HeaderValue::from_str(&kept.join("; ")).ok()
    }
}

/// The path and query without the token query parameters.
pub fn strip_token_params(path_and_query: &str, sources: &[TokenSource]) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_owned();
    };
    let is_token = |name: &str| {
        sources
            .iter()
            .any(|s| matches!(s, TokenSource::Query(q) if q == name))
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.is_empty() && !is_token(kv.split('=').next().unwrap_or("")))
        .collect();
    if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// The offered subprotocols without token entries (`subprotocol:` prefixes).
pub fn strip_token_protocols<'p>(protocols: &[&'p str], sources: &[TokenSource]) -> Vec<&'p str> {
    protocols
        .iter()
        .copied()
        .filter(|p| {
            !sources.iter().any(
                |s| matches!(s, TokenSource::Subprotocol(prefix) if p.starts_with(prefix.as_str())),
            )
        })
        .collect()
}

/// An upstream WebSocket, handshake completed.
pub struct UpstreamSocket {
    pub io: TokioIo<Upgraded>,
    /// The subprotocol the upstream selected, returned to the client.
    pub protocol: Option<HeaderValue>,
}

/// Connect to the route's upstream and complete its WebSocket handshake, all within
/// `upstream_connect_seconds`. A non-101 answer is relayed to the client as it came.
pub async fn open(
    route: &Route,
    path_and_query: &str,
    headers: HeaderMap,
    protocols: &[&str],
) -> Result<UpstreamSocket, Rejection> {
    let deadline = Instant::now() + route.timeouts.upstream_connect;
    match timeout_at(
        deadline,
        handshake(route, path_and_query, headers, protocols, deadline),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(Rejection::UpstreamTimeout),
    }
}

async fn handshake(
    route: &Route,
    path_and_query: &str,
    mut headers: HeaderMap,
    protocols: &[&str],
    deadline: Instant,
) -> Result<UpstreamSocket, Rejection> {
    let stream = dial(&route.upstream).await.map_err(|e| {
        tracing::debug!(upstream = %route.upstream.url, error = %e, "upstream connect failed");
        Rejection::UpstreamUnavailable
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| Rejection::UpstreamUnavailable)?;
    // Ends by itself once the connection upgrades or closes.
    tokio::spawn(conn.with_upgrades());

    let key = generate_key();
    let h = &mut headers;
    h.insert(header::HOST, header_value(&route.upstream.host_header)?);
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    h.insert(header::SEC_WEBSOCKET_KEY, header_value(&key)?);
    if !protocols.is_empty() {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            header_value(&protocols.join(", "))?,
        );
    }
    let uri = Uri::from_str(path_and_query)
        .map_err(|_| Rejection::BadRequest("invalid request target"))?;
    let mut request = Request::get(uri)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|_| Rejection::BadRequest("invalid request"))?;
    *request.headers_mut() = headers;

    let response = sender.send_request(request).await.map_err(|e| {
        tracing::debug!(upstream = %route.upstream.url, error = %e, "upstream handshake failed");
        Rejection::UpstreamUnavailable
    })?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(relay_refusal(response, deadline).await);
    }
    let accept = response.headers().get(header::SEC_WEBSOCKET_ACCEPT);
    if accept.map(|a| a.as_bytes()) != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
        tracing::warn!(upstream = %route.upstream.url, "upstream 101 with a wrong Sec-WebSocket-Accept");
        return Err(Rejection::UpstreamUnavailable);
    }
    if response
        .headers()
        .contains_key(header::SEC_WEBSOCKET_EXTENSIONS)
    {
        tracing::warn!(upstream = %route.upstream.url, "upstream selected an extension it was not offered");
        return Err(Rejection::UpstreamUnavailable);
    }
    let protocol = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .cloned();
    if let Some(p) = &protocol {
        if !protocols.iter().any(|o| p.as_bytes() == o.as_bytes()) {
            tracing::warn!(upstream = %route.upstream.url, "upstream selected a subprotocol it was not offered");
            return Err(Rejection::UpstreamUnavailable);
        }
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|_| Rejection::UpstreamUnavailable)?;
    Ok(UpstreamSocket {
        io: TokioIo::new(upgraded),
        protocol,
    })
}

fn header_value(s: &str) -> Result<HeaderValue, Rejection> {
    HeaderValue::from_str(s).map_err(|_| Rejection::BadRequest("invalid header value"))
}

/// The upstream's own answer, with at most `MAX_RELAYED_BODY` of its body.
async fn relay_refusal(response: Response<Incoming>, deadline: Instant) -> Rejection {
    let (parts, mut body) = response.into_parts();
    let mut collected = BytesMut::new();
    while collected.len() < MAX_RELAYED_BODY {
        match timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    let room = MAX_RELAYED_BODY - collected.len();
                    collected.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            _ => break,
        }
    }
    Rejection::UpstreamStatus(Box::new(UpstreamRefusal {
        status: parts.status,
        headers: parts.headers,
        body: collected.freeze(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Vec<TokenSource> {
        vec![
            TokenSource::Header,
            TokenSource::Query("access_token".into()),
            TokenSource::Cookie("access_token".into()),
            TokenSource::Subprotocol("bearer.".into()),
        ]
    }

    #[test]
    fn token_carriers_removed() {
        let s = sources();
        assert_eq!(strip_token_params("/ws?access_token=x&a=1", &s), "/ws?a=1");
        assert_eq!(strip_token_params("/ws?access_token=x", &s), "/ws");
        assert_eq!(strip_token_params("/ws?a=1", &[]), "/ws?a=1");
        let v = HeaderValue::from_static("a=1; access_token=x; b=2");
        assert_eq!(strip_cookies(&v, &s).unwrap(), "a=1; b=2");
        assert!(strip_cookies(&HeaderValue::from_static("access_token=x"), &s).is_none());
        assert_eq!(
            strip_token_protocols(&["bearer.abc", "chat"], &s),
            vec!["chat"]
        );
    }

    #[test]
    fn forwarded_for_is_replaced_unless_trusted() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-auth-subject", HeaderValue::from_static("spoofed"));
        h.insert("x-auth-role", HeaderValue::from_static("admin"));
        let id = HeaderValue::from_static("req-1");
        let claims = [(
            HeaderName::from_static("x-auth-subject"),
            HeaderValue::from_static("alice"),
        )];
        let names = [
            ("sub".to_owned(), HeaderName::from_static("x-auth-subject")),
            ("role".to_owned(), HeaderName::from_static("x-auth-role")),
        ];
        let mut fwd = Forwarding {
            peer: "10.0.0.1".parse().unwrap(),
            peer_trusted: false,
            tls: true,
            request_id: &id,
            claim_headers: &claims,
            claim_header_names: &names,
            token_sources: &[],
        };
        let out = forward_headers(&h, &fwd);
        assert_eq!(out["x-forwarded-for"], "10.0.0.1");
        assert_eq!(out["x-auth-subject"], "alice");
        assert_eq!(out.get_all("x-auth-subject").iter().count(), 1);
        // No role claim in the token: the client's copy is dropped all the same.
        assert!(out.get("x-auth-role").is_none());
        fwd.peer_trusted = true;
        assert_eq!(
            forward_headers(&h, &fwd)["x-forwarded-for"],
            "1.2.3.4, 10.0.0.1"
        );
    }
}
