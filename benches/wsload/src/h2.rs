//! HTTP/2 (RFC 8441) for `echo --h2 N` and `connect --h2 N`: WebSockets opened as
//! extended CONNECT streams over N shared connections (h2c with prior knowledge for ws://,
//! TLS with ALPN `h2` for wss://), by hyper's HTTP/2 client; tungstenite speaks WebSocket
//! on each stream, so what is measured on a stream is what the HTTP/1.1 loads measure on a
//! connection.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Empty;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWrite;
use tokio_tungstenite::tungstenite::http::{header, HeaderMap, Method, Request, StatusCode, Uri};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::dial::{ws_config, Dialer, Io, Ws};
use crate::measure::{close, timed, STEP};
use crate::Target;

/// How the WebSockets of a load are opened: each on a connection of its own (HTTP/1.1
/// upgrade), or as streams over a few HTTP/2 connections opened beforehand.
pub(crate) enum Opener {
    Http1(Arc<Dialer>),
    H2(Box<H2Dialer>, Vec<H2Conn>),
}

/// When an HTTP/2 WebSocket's client ends its half of the stream (END_STREAM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum H2End {
    /// Right behind its close frame, before the close reply: the stream is then closed
    /// both ways as soon as the server ends its half.
    Early,
    /// Once the close handshake is over, when the stream is dropped (what tungstenite
    /// over hyper does by itself). A server that resets the stream right after its own
    /// END_STREAM then gets the client's END_STREAM on a stream it may have forgotten.
    Late,
}

impl Opener {
    /// HTTP/1.1, or with `h2` (a number of connections, at least 1) HTTP/2: those
    /// connections are opened here, before any WebSocket.
    pub(crate) async fn new(
        target: &Target,
        read_buffer: usize,
        h2: Option<(usize, H2End)>,
    ) -> Result<Opener, String> {
        let Some((n, end)) = h2 else {
            return Ok(Opener::Http1(Dialer::new(target, read_buffer)?));
        };
        let dialer = H2Dialer::new(target, read_buffer, end)?;
        let mut conns = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            conns.push(
                dialer
                    .connect(i)
                    .await
                    .map_err(|kind| format!("HTTP/2 connection {i}: {kind}"))?,
            );
        }
        Ok(Opener::H2(Box::new(dialer), conns))
    }

    /// The i-th WebSocket: a new connection and its upgrade, or a stream on HTTP/2
    /// connection i mod N and its extended CONNECT.
    pub(crate) async fn open(&self, i: usize) -> Result<Ws, &'static str> {
        match self {
            Opener::Http1(dialer) => dialer.open(i).await,
            Opener::H2(dialer, conns) => dialer.open(&conns[i % conns.len()], i).await,
        }
    }

    /// Closes politely (see `measure::close`); on HTTP/2 with END_STREAM as `H2End` says.
    pub(crate) async fn close(&self, mut ws: Ws) {
        match self {
            Opener::H2(dialer, _) if dialer.end == H2End::Early => {
                let _ = timed(async {
                    let _ = ws.close(None).await;
                    // END_STREAM, once the close frame has gone (hyper's send task writes
                    // in order).
                    let _ = poll_fn(|cx| Pin::new(ws.get_mut()).poll_shutdown(cx)).await;
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
            }
            _ => close(ws).await,
        }
    }

    pub(crate) fn tls(&self) -> bool {
        match self {
            Opener::Http1(dialer) => dialer.tls.is_some(),
            Opener::H2(dialer, _) => dialer.dialer.tls.is_some(),
        }
    }

    /// HTTP/2 connections in use, if any.
    pub(crate) fn h2_connections(&self) -> Option<usize> {
        match self {
            Opener::Http1(_) => None,
            Opener::H2(_, conns) => Some(conns.len()),
        }
    }
}

/// What an extended CONNECT needs, parsed once.
pub(crate) struct H2Dialer {
    dialer: Arc<Dialer>,
    /// `http://` or `https://`, the URL's authority, path and query: the request's
    /// `:scheme`, `:authority` and `:path`.
    uri: Uri,
    /// The URL's request headers that HTTP/2 carries: not Host (the `:authority`), nor the
    /// HTTP/1.1 upgrade's Connection, Upgrade and Sec-WebSocket-Key. `--header`s and
    /// Sec-WebSocket-Version: 13 stay.
    headers: HeaderMap,
    end: H2End,
}

/// One HTTP/2 connection; hyper's connection task (spawned) reads and writes its socket.
#[derive(Clone)]
pub(crate) struct H2Conn {
    send: SendRequest<Empty<Bytes>>,
}

impl H2Dialer {
    pub(crate) fn new(target: &Target, read_buffer: usize, end: H2End) -> Result<H2Dialer, String> {
        let dialer = Dialer::with_alpn(target, read_buffer, b"h2")?;
        let url = dialer.request.uri();
        let scheme = if dialer.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let authority = url.authority().ok_or("url without a host")?;
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let uri = format!("{scheme}://{authority}{path}")
            .parse()
            .map_err(|e| format!("url {}: {e}", target.url))?;
        let mut headers = HeaderMap::new();
        for (name, value) in dialer.request.headers() {
            let hop = [
                header::HOST,
                header::CONNECTION,
                header::UPGRADE,
                header::SEC_WEBSOCKET_KEY,
            ];
            if !hop.contains(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        Ok(H2Dialer {
            dialer,
            uri,
            headers,
            end,
        })
    }

    /// The i-th HTTP/2 connection (from the i-th HTTP/1.1 connection's source address):
    /// TCP, TLS with ALPN `h2` for wss:// (the server must choose it), the preface, and the
    /// server's SETTINGS, which must enable extended CONNECT (they arrive after hyper's
    /// handshake has returned: the connection is driven until they have).
    pub(crate) async fn connect(&self, i: usize) -> Result<H2Conn, &'static str> {
        let tcp = timed(self.dialer.tcp(i)).await.flatten().ok_or("connect")?;
        let io: Box<dyn Io> = match &self.dialer.tls {
            Some((connector, name)) => {
                let tls = timed(connector.connect(name.clone(), tcp))
                    .await
                    .and_then(Result::ok)
                    .ok_or("tls")?;
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err("no_h2_alpn");
                }
                Box::new(tls)
            }
            None => Box::new(tcp),
        };
        let (send, conn) = timed(Builder::new(TokioExecutor::new()).handshake(TokioIo::new(io)))
            .await
            .and_then(Result::ok)
            .ok_or("h2_handshake")?;
        let mut conn = Box::pin(conn);
        let deadline = tokio::time::Instant::now() + STEP;
        while !conn.is_extended_connect_protocol_enabled() {
            if tokio::time::Instant::now() >= deadline {
                // The server never sent SETTINGS_ENABLE_CONNECT_PROTOCOL.
                return Err("no_extended_connect");
            }
            tokio::select! {
                _ = &mut conn => return Err("h2_closed"),
                () = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
        }
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H2Conn { send })
    }

    /// A WebSocket on a new stream of `conn`: an extended CONNECT (`:protocol websocket`)
    /// with client i's token if there is a pool, answered 200.
    pub(crate) async fn open(&self, conn: &H2Conn, i: usize) -> Result<Ws, &'static str> {
        let mut request = Request::new(Empty::new());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        if let Some(bearer) = self.dialer.bearer(i) {
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, bearer.clone());
        }
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let mut send = conn.send.clone();
        let response = timed(async move {
            // The connection is gone (the server's GOAWAY, or its socket closed).
            send.ready().await.map_err(|_| "h2_closed")?;
            send.send_request(request).await.map_err(|_| "upgrade")
        })
        .await
        .ok_or("upgrade_timeout")??;
        if response.status() != StatusCode::OK {
            return Err("upgrade_refused");
        }
        let upgraded = timed(hyper::upgrade::on(response))
            .await
            .ok_or("upgrade_timeout")?
            .map_err(|_| "upgrade")?;
        let io: Box<dyn Io> = Box::new(TokioIo::new(upgraded));
        let config = ws_config(self.dialer.read_buffer);
        Ok(WebSocketStream::from_raw_socket(io, Role::Client, Some(config)).await)
    }
}
