//! An HTTP/2 client for the tests: hyper's client connection (the `h2` crate under it)
//! doing RFC 8441 extended CONNECTs, over TLS with ALPN `h2` or over h2c with prior
//! knowledge, and tungstenite speaking WebSocket on each stream it opens.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use std::time::Instant;

use super::{
    header_value, next_message_any, open_policy, refusal, wire, Client, TestGate, Upstream,
    DEADLINE,
};

/// A WebSocket on one stream of an HTTP/2 connection.
pub type H2Socket = WebSocketStream<TokioIo<Upgraded>>;

/// A refused extended CONNECT: its status, headers and JSON body.
pub type H2Refusal = (u16, HeaderMap, serde_json::Value);

/// How the client's connection task ended: `Ok` for a clean end (the gate's GOAWAY and
/// the last stream done), or hyper's error.
pub type H2Ended = Result<(), String>;

/// One HTTP/2 connection to the gate. A clone is another handle on the same connection,
/// for opening streams from several tasks at once.
#[derive(Clone)]
pub struct H2 {
    send: SendRequest<Empty<Bytes>>,
    /// `https://localhost:PORT` or `http://…`: the scheme and `:authority` of requests.
    pub origin: String,
    /// Set once the connection task has ended.
    ended: tokio::sync::watch::Receiver<Option<H2Ended>>,
}

impl TestGate {
    /// A new HTTP/2 connection: ALPN `h2` with TLS (asserted), h2c prior knowledge without.
    pub async fn h2(&self) -> H2 {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let port = self.addr.port();
        match &self.pki {
            Some(pki) => {
                let mut config = (*pki.client).clone();
                config.alpn_protocols = vec![b"h2".to_vec()];
                let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                    .unwrap();
                assert_eq!(
                    tls.get_ref().1.alpn_protocol(),
                    Some(&b"h2"[..]),
                    "the gate did not choose h2 in ALPN"
                );
                H2::handshake(tls, format!("https://localhost:{port}")).await
            }
            None => H2::handshake(tcp, format!("http://localhost:{port}")).await,
        }
    }

    /// A TLS connection to the gate offering `alpn` (in order of preference).
    pub async fn tls_offering(&self, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
        let pki = self.pki.as_ref().expect("a gate with TLS");
        let mut config = (*pki.client).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }
}

impl H2 {
    pub async fn handshake<I>(io: I, origin: String) -> H2
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
        // The server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) arrive after the handshake:
        // drive the connection until they have.
        let mut conn = Box::pin(conn);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !conn.is_extended_connect_protocol_enabled() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gate never sent SETTINGS_ENABLE_CONNECT_PROTOCOL"
            );
            tokio::select! {
                ended = &mut conn => panic!("the connection ended during its handshake: {ended:?}"),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        let (done, ended) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let result = conn.await.map_err(|e| e.to_string());
            let _ = done.send(Some(result));
        });
        H2 {
            send,
            origin,
            ended,
        }
    }

    /// An h2c (prior knowledge) connection to a plaintext gate at `addr`.
    pub async fn h2c(addr: std::net::SocketAddr) -> H2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        H2::handshake(tcp, format!("http://localhost:{}", addr.port())).await
    }

    /// How the connection ended, once it has; `None` if it is still open after `within`.
    pub async fn ended_within(&self, within: Duration) -> Option<H2Ended> {
        let mut ended = self.ended.clone();
        tokio::time::timeout(within, ended.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|seen| seen.ok().and_then(|e| e.clone()))
    }

    /// An extended CONNECT for a WebSocket on `path` (with its query), with `headers`
    /// (lowercase names, as HTTP/2 has them) and `Sec-WebSocket-Version: 13` unless
    /// `headers` has a version of its own.
    pub async fn websocket(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(H2Socket, HeaderMap), H2Refusal> {
        self.extended_connect(path, "websocket", headers).await
    }

    /// An extended CONNECT with `:protocol` set to `protocol`; see [`H2::websocket`].
    pub async fn extended_connect(
        &mut self,
        path: &str,
        protocol: &'static str,
        headers: &[(&str, &str)],
    ) -> Result<(H2Socket, HeaderMap), H2Refusal> {
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{}{path}", self.origin));
        if !headers
            .iter()
            .any(|(name, _)| *name == "sec-websocket-version")
        {
            request = request.header("sec-websocket-version", "13");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(Empty::new()).unwrap();
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static(protocol));
        let response = self.send_request(request).await;
        if response.status() != StatusCode::OK {
            return Err(refused(response).await);
        }
        let headers = response.headers().clone();
        let upgraded = tokio::time::timeout(DEADLINE, hyper::upgrade::on(response))
            .await
            .expect("upgrade in time")
            .expect("the 200 gave a stream");
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, Some(config))
                .await;
        Ok((socket, headers))
    }

    /// The extended CONNECT on `path` with `headers` is refused with `status` and JSON
    /// `error` `reason` (and a human `message`); returns the response headers.
    pub async fn refused(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        status: u16,
        reason: &str,
    ) -> HeaderMap {
        let (got, response_headers, body) = match self.websocket(path, headers).await {
            Ok(_) => panic!("{path}: expected {status} {reason}, but the stream was admitted"),
            Err(refusal) => refusal,
        };
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(reason)),
            "{path}: {body}"
        );
        assert!(body["message"].is_string(), "{path}: {body}");
        response_headers
    }

    /// A plain GET on the connection: status, headers and body.
    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Bytes) {
        self.request(Method::GET, path, headers).await
    }

    /// A plain request without a body on the connection: status, headers and body.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.origin));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self.send_request(request.body(Empty::new()).unwrap()).await;
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(DEADLINE, body.collect())
            .await
            .expect("body in time")
            .expect("body")
            .to_bytes();
        (parts.status, parts.headers, body)
    }

    async fn send_request(
        &mut self,
        request: Request<Empty<Bytes>>,
    ) -> http::Response<hyper::body::Incoming> {
        tokio::time::timeout(DEADLINE, async {
            self.send.ready().await.expect("connection ready");
            self.send.send_request(request).await
        })
        .await
        .expect("response in time")
        .expect("a response")
    }
}

async fn refused(response: http::Response<hyper::body::Incoming>) -> H2Refusal {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::String(
        String::from_utf8_lossy(&body).into_owned(),
    ));
    (parts.status.as_u16(), parts.headers, json)
}

/// Send `text` on `ws` and expect it back.
pub async fn echoes(ws: &mut H2Socket, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_message_any(ws).await, Message::text(text));
}

/// Read until the close frame, reply, and return its code and reason.
pub async fn close_of(ws: &mut H2Socket) -> (u16, String) {
    super::next_close(ws).await
}

/// The next close frame read off the stream without tungstenite, which refuses to parse
/// 1014 (registered after its table).
pub async fn raw_close_of(ws: &mut H2Socket) -> (u16, String) {
    let stream = ws.get_mut();
    let read = async {
        loop {
            if let (0x8, payload) = wire::server_frame(stream).await {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("no close frame in time")
}

/// Close `ws` with `code` and `reason`, see the gate echo the close, and drop the stream.
pub async fn close_with(mut ws: H2Socket, code: u16, reason: &str) {
    // The result is not checked: once the gate has answered the close it ends the stream
    // (END_STREAM, then RST_STREAM NO_ERROR, RFC 9113 §8.1), and hyper's client reports
    // that reset to a flush still waiting on the close frame it already sent. The echoed
    // close below proves the frame arrived.
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_owned().into(),
        }))
        .await;
    assert_eq!(close_of(&mut ws).await, (code, reason.to_owned()));
}

// ---------------------------------------------------------------------------------------
// Policies and HTTP/1.1 companions for the HTTP/2 tests

pub const TRUSTED: &str = "trusted_proxies: [127.0.0.1/32]\n";
pub const INVALID_TOKEN_CHALLENGE: &str = "Bearer error=\"invalid_token\"";
/// An upgrade rate no test comes near.
pub const ROOMY: &str = "{upgrades_per_second: 1000, burst: 1000}";

/// `Retry-After` in whole seconds.
pub fn retry_after(headers: &http::HeaderMap) -> u64 {
    headers
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds")
}

/// `open_policy` with `top` prepended (top-level fields) and `extra` under the route.
pub fn policy(upstream: &Upstream, top: &str, extra: &str) -> String {
    format!("{top}{}", open_policy(&upstream.url(), extra))
}

/// One `/ws` route in front of `upstream` requiring an HS256 token (the `secret` file
/// TestGate writes), with `auth_extra` in its auth and `rate` as its rate.
pub fn token_policy(upstream: &Upstream, auth_extra: &str, rate: &str) -> String {
    format!(
        "version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow_missing: true}}\n  rate: {rate}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]{auth_extra}}}\nroutes:\n  - path: /ws\n    name: ws\n",
        upstream.url()
    )
}

/// `Authorization` for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// An HTTP/1.1 upgrade on `/ws` with `headers`.
pub async fn http1(gate: &TestGate, headers: &[(&str, &str)]) -> Result<Client, String> {
    let mut request = gate.request("/ws");
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().insert(name, header_value(value));
    }
    match gate.connect_request(request).await {
        Ok((client, _)) => Ok(client),
        Err(e) => Err(format!("{}", refusal(Err(e)).2)),
    }
}

/// Retry an HTTP/1.1 upgrade until it is admitted (a slot is freed just after the close),
/// at most 2 s.
pub async fn admitted_soon(gate: &TestGate, headers: &[(&str, &str)]) -> Client {
    let started = Instant::now();
    loop {
        match http1(gate, headers).await {
            Ok(client) => return client,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(2),
                "no slot was released: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
