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

use super::{TestGate, DEADLINE};

/// A WebSocket on one stream of an HTTP/2 connection.
pub type H2Socket = WebSocketStream<TokioIo<Upgraded>>;

/// A refused extended CONNECT: its status, headers and JSON body.
pub type H2Refusal = (u16, HeaderMap, serde_json::Value);

/// One HTTP/2 connection to the gate.
pub struct H2 {
    send: SendRequest<Empty<Bytes>>,
    /// `https://localhost:PORT` or `http://…`: the scheme and `:authority` of requests.
    pub origin: String,
    /// The connection task: it ends when the gate closes the connection.
    pub conn: tokio::task::JoinHandle<()>,
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
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        H2 { send, origin, conn }
    }

    /// An extended CONNECT for a WebSocket on `path` (with its query), with `headers`
    /// (lowercase names, as HTTP/2 has them) and `Sec-WebSocket-Version: 13`.
    pub async fn websocket(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(H2Socket, HeaderMap), H2Refusal> {
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{}{path}", self.origin))
            .header("sec-websocket-version", "13");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(Empty::new()).unwrap();
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
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

    /// A plain request on the connection: status, headers and body.
    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut request = Request::builder()
            .method(Method::GET)
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
