//! Test support: a generated CA and localhost certificate, a real WebSocket upstream on
//! 127.0.0.1:0 that tests can steer with text commands, and the gate itself started from
//! the library on 127.0.0.1:0 with real TLS.
#![allow(dead_code)]

pub mod h2;
pub mod h2raw;
pub mod process;
pub mod wire;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

pub const DEADLINE: Duration = Duration::from_secs(10);
pub const SECRET: &str = "test-secret-test-secret-test-secret-0123456789";

// ---------------------------------------------------------------------------------------
// Certificates

pub struct Pki {
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub client: Arc<rustls::ClientConfig>,
}

impl Pki {
    pub fn generate() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let mut client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Pki {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
            client: Arc::new(client),
        }
    }

    pub fn server_config(&self) -> rustls::ServerConfig {
        use rustls_pki_types::pem::PemObject;
        let certs = vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap(),
        );
        wsgate::tls::server_config_from(certs, key).unwrap()
    }

    /// The leaf certificate's validity, as the gate reads it.
    pub fn validity(&self) -> Option<wsgate::tls::Validity> {
        use rustls_pki_types::pem::PemObject;
        let leaf = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap();
        wsgate::tls::Validity::of(&[leaf])
    }

    pub fn write(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }
}

// ---------------------------------------------------------------------------------------
// The upstream

/// One upgrade request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub target: String,
    pub headers: HeaderMap,
}

/// How a relayed connection ended, as the upstream saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Close(u16, String),
    CloseWithoutCode,
    Dropped,
}

#[derive(Clone, Default)]
pub struct UpstreamOptions {
    /// Answer every upgrade with this status and body instead of 101.
    pub refuse: Option<(u16, &'static str)>,
    /// Select this subprotocol when it is offered.
    pub protocol: Option<&'static str>,
    /// Serve wss:// with this certificate.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A real WebSocket (and plain HTTP) upstream. Text commands: `close CODE REASON`,
/// `big N` (sends N bytes), `flood N SIZE` (sends N messages as fast as the gate takes
/// them), `drop` (TCP reset), `stall` (never reads again); anything else echoes.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub ended: Arc<Mutex<Vec<Ended>>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        Upstream::start_with(UpstreamOptions::default()).await
    }

    pub async fn start_with(options: UpstreamOptions) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(Vec::new()));
        let (s, e) = (seen.clone(), ended.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (s, e, o) = (s.clone(), e.clone(), options.clone());
                tokio::spawn(async move {
                    let tls = o.tls.clone();
                    let service = service_fn(move |req| {
                        upstream_service(req, s.clone(), e.clone(), o.clone())
                    });
                    let builder = http1::Builder::new();
                    match tls {
                        Some(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            let Ok(stream) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let io = TokioIo::new(stream);
                            let _ = builder.serve_connection(io, service).with_upgrades().await;
                        }
                        None => {
                            let io = TokioIo::new(tcp);
                            let _ = builder.serve_connection(io, service).with_upgrades().await;
                        }
                    }
                });
            }
        });
        Upstream { addr, seen, ended }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// `wss://localhost:PORT`, for an upstream started with `tls`.
    pub fn wss_url(&self) -> String {
        format!("wss://localhost:{}", self.addr.port())
    }

    pub fn last_seen(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream saw no request")
    }

    pub fn seen_count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Wait for the next relayed connection to end at the upstream.
    pub async fn wait_ended(&self, index: usize) -> Ended {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(e) = self.ended.lock().unwrap().get(index) {
                return e.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "upstream connection {index} did not end"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn upstream_service(
    mut req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    ended: Arc<Mutex<Vec<Ended>>>,
    options: UpstreamOptions,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    seen.lock().unwrap().push(Seen {
        target: target.clone(),
        headers: req.headers().clone(),
    });
    // Redirects are absolute, at the Host the app was reached by, as app frameworks write
    // them.
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let own = format!("http://{}", host.unwrap_or("-"));
    let own_url = |path: &str| format!("{own}{path}");
    if target.ends_with("/old") {
        return Ok(Response::builder()
            .status(302)
            .header(header::LOCATION, own_url("/app/new?from=old"))
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        // Plain HTTP: say what arrived, echo the body, and add a hop-by-hop header.
        let method = req.method().to_string();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut text = format!("pass {method} {target}\n").into_bytes();
        text.extend_from_slice(&body);
        return Ok(Response::builder()
            .header("x-upstream", "yes")
            .header(header::CONNECTION, "x-hop")
            .header("x-hop", "secret")
            .body(Full::new(Bytes::from(text)))
            .unwrap());
    };
    if let Some((status, body)) = options.refuse {
        return Ok(Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain")
            .header(header::LOCATION, own_url("/login"))
            .header(header::SET_COOKIE, "next=/ws; Path=/")
            .header(header::CACHE_CONTROL, "no-store")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap());
    }
    let offered: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    let protocol = options.protocol.filter(|p| offered.iter().any(|o| o == p));
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let end = loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => {
                    // Complete the close handshake as a well-behaved peer does.
                    let _ = ws.flush().await;
                    break match frame {
                        Some(f) => Ended::Close(f.code.into(), f.reason.to_string()),
                        None => Ended::CloseWithoutCode,
                    };
                }
                Some(Ok(Message::Text(text))) => {
                    let mut words = text.as_str().splitn(3, ' ');
                    match words.next() {
                        Some("close") => {
                            let code: u16 =
                                words.next().and_then(|c| c.parse().ok()).unwrap_or(1000);
                            let reason = words.next().unwrap_or("").to_owned();
                            let _ = ws
                                .send(Message::Close(Some(CloseFrame {
                                    code: CloseCode::from(code),
                                    reason: reason.into(),
                                })))
                                .await;
                            // Wait for the gate's close reply.
                            while let Some(Ok(_)) = ws.next().await {}
                            break Ended::Close(code, "initiated".into());
                        }
                        Some("big") => {
                            let n: usize = words.next().and_then(|c| c.parse().ok()).unwrap_or(0);
                            if ws.send(Message::Binary(vec![7u8; n].into())).await.is_err() {
                                break Ended::Dropped;
                            }
                        }
                        Some("flood") => {
                            let n: usize = words.next().and_then(|c| c.parse().ok()).unwrap_or(0);
                            let size: usize =
                                words.next().and_then(|c| c.parse().ok()).unwrap_or(1024);
                            let payload = Bytes::from(vec![9u8; size]);
                            let mut failed = false;
                            for _ in 0..n {
                                if ws.send(Message::Binary(payload.clone())).await.is_err() {
                                    failed = true;
                                    break;
                                }
                            }
                            if failed {
                                break Ended::Dropped;
                            }
                        }
                        Some("drop") => break Ended::Dropped,
                        // Stop reading (and answering) altogether, holding the socket.
                        Some("stall") => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            break Ended::Dropped;
                        }
                        _ => {
                            if ws.send(Message::Text(text)).await.is_err() {
                                break Ended::Dropped;
                            }
                        }
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    if ws.send(Message::Binary(b)).await.is_err() {
                        break Ended::Dropped;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break Ended::Dropped,
            }
        };
        ended.lock().unwrap().push(end);
    });
    // Besides the handshake: two cookies (an app session and an affinity cookie), an
    // end-to-end header, and hop-by-hop ones the gate must not pass on.
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade, x-hop")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .header(header::SET_COOKIE, "io=abc123; Path=/; HttpOnly")
        .header(header::SET_COOKIE, "affinity=pod-7; Path=/")
        .header("x-upstream", "yes")
        .header("sec-websocket-trace", "t-1")
        .header("x-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive");
    if let Some(p) = protocol {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    Ok(response.body(Full::new(Bytes::new())).unwrap())
}

// ---------------------------------------------------------------------------------------
// The gate

pub struct TestGate {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub running: wsgate::Running,
    pub dir: tempfile::TempDir,
    pub policy_path: PathBuf,
    pub pki: Option<Pki>,
}

pub type Client = WebSocketStream<ClientStream>;

/// A client connection: TLS when the gate has TLS.
pub enum ClientStream {
    Tls(Box<TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl tokio::io::AsyncRead for ClientStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            ClientStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for ClientStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            ClientStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
            ClientStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            ClientStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An upstream that accepts connections and never answers: its `ws://` URL, and the task
/// holding its sockets (abort it to let them go).
pub async fn silent_upstream() -> (String, tokio::task::JoinHandle<()>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    (url, held)
}

/// A plain HTTP/1.1 upstream that reads each connection's request head, answers it with
/// the bytes `answer` gives for its request line, reads none of the request's body and
/// holds the connection until its peer sends a byte more or leaves: its address, and the
/// task serving it (abort it to stop).
pub async fn raw_http_upstream(
    answer: fn(&str) -> &'static [u8],
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = wire::read_head(&mut tcp).await else {
                    return;
                };
                let line = head.lines().next().unwrap_or("");
                let _ = tcp.write_all(answer(line)).await;
                let _ = tcp.read(&mut [0u8; 1]).await;
            });
        }
    });
    (addr, server)
}

/// A policy with auth off, no Origin needed and no practical message-rate limit, in front
/// of `upstream`, plus `extra` YAML appended under the `/ws` route.
pub fn open_policy(upstream: &str, route_extra: &str) -> String {
    format!(
        "version: 1\ndefaults:\n  upstream: {upstream}\n  auth: {{required: false}}\n  origin: {{allow_missing: true}}\n  messages: {{per_second: 100000, burst: 100000}}\nroutes:\n  - path: /ws\n    name: ws\n{route_extra}"
    )
}

/// [`open_policy`] for `upstream`, written to `policy.yaml` in a directory of its own, for
/// a gate run as a process.
pub fn open_policy_file(upstream: &Upstream, route_extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, open_policy(&upstream.url(), route_extra)).unwrap();
    (dir, policy)
}

impl TestGate {
    /// The gate over TLS with `policy`.
    pub async fn start(policy: &str) -> TestGate {
        TestGate::start_with(policy, true).await
    }

    pub async fn start_with(policy: &str, tls: bool) -> TestGate {
        let dir = tempfile::tempdir().unwrap();
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).unwrap();
        TestGate::start_at(dir, policy_path, tls).await
    }

    /// The gate with the policy already at `policy_path` (inside `dir`).
    pub async fn start_at(dir: tempfile::TempDir, policy_path: PathBuf, tls: bool) -> TestGate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestGate::start_on(dir, policy_path, tls, listener).await
    }

    /// A plaintext gate with `policy`, serving on `listener` (e.g. a dual-stack `[::]:0`).
    pub async fn start_listening(policy: &str, listener: TcpListener) -> TestGate {
        let dir = tempfile::tempdir().unwrap();
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).unwrap();
        TestGate::start_on(dir, policy_path, false, listener).await
    }

    async fn start_on(
        dir: tempfile::TempDir,
        policy_path: PathBuf,
        tls: bool,
        listener: TcpListener,
    ) -> TestGate {
        let token_file = dir.path().join("admin-token");
        std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
        TestGate::start_full(dir, policy_path, tls, listener, Some(token_file)).await
    }

    /// A plaintext gate with `policy` and no `--admin-token-file`.
    pub async fn start_without_admin_token(policy: &str) -> TestGate {
        let dir = tempfile::tempdir().unwrap();
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestGate::start_full(dir, policy_path, false, listener, None).await
    }

    async fn start_full(
        dir: tempfile::TempDir,
        policy_path: PathBuf,
        tls: bool,
        listener: TcpListener,
        admin_token_file: Option<PathBuf>,
    ) -> TestGate {
        let _ = tracing_subscriber_init();
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        let loaded =
            wsgate::config::load(&policy_path).unwrap_or_else(|e| panic!("test policy: {e}"));
        let pki = tls.then(Pki::generate);
        // The certificate is served from files beside the policy, watched for rotation.
        let tls_files = pki.as_ref().map(|p| p.write(dir.path()));
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = wsgate::start(
            loaded,
            wsgate::Options {
                policy_path: policy_path.clone(),
                listener,
                admin: Some(admin),
                tls: pki.as_ref().map(Pki::server_config),
                tls_validity: pki.as_ref().and_then(Pki::validity),
                sighup: false,
                tls_files,
                jwks_roots: jwks_roots(),
                admin_token_file,
            },
        )
        .unwrap();
        TestGate {
            addr: running.addr,
            admin: running.admin_addr.unwrap(),
            running,
            dir,
            policy_path,
            pki,
        }
    }

    /// Replace the policy file atomically (write + rename), as editors and kubectl do.
    pub fn write_policy(&self, policy: &str) {
        let tmp = self.dir.path().join(".policy.yaml.tmp");
        std::fs::write(&tmp, policy).unwrap();
        std::fs::rename(&tmp, &self.policy_path).unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.pki.is_some() { "wss" } else { "ws" };
        format!("{scheme}://localhost:{}{path}", self.addr.port())
    }

    /// A TCP (+TLS) connection to the gate.
    pub async fn stream(&self) -> ClientStream {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        match &self.pki {
            Some(pki) => {
                let connector = tokio_rustls::TlsConnector::from(pki.client.clone());
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                    .unwrap();
                ClientStream::Tls(Box::new(tls))
            }
            None => ClientStream::Plain(tcp),
        }
    }

    pub fn request(&self, path: &str) -> tungstenite::handshake::client::Request {
        self.url(path).into_client_request().unwrap()
    }

    pub async fn connect(
        &self,
        path: &str,
    ) -> Result<(Client, tungstenite::handshake::client::Response), tungstenite::Error> {
        self.connect_request(self.request(path)).await
    }

    pub async fn connect_request(
        &self,
        request: tungstenite::handshake::client::Request,
    ) -> Result<(Client, tungstenite::handshake::client::Response), tungstenite::Error> {
        let stream = self.stream().await;
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        tokio::time::timeout(
            DEADLINE,
            tokio_tungstenite::client_async_with_config(request, stream, Some(config)),
        )
        .await
        .expect("handshake timed out")
    }

    /// The value of `series` in the gate's `/metrics` (fetched over its admin listener),
    /// 0 when it is absent; see [`metric_at`].
    pub async fn metric(&self, series: &str) -> f64 {
        metric_at(self.admin, series).await
    }

    /// Wait until `series` is at least `at_least`, failing the test with `what` if it is
    /// not within `within`; returns the value seen.
    pub async fn wait_metric(
        &self,
        series: &str,
        at_least: f64,
        within: Duration,
        what: &str,
    ) -> f64 {
        wait_metric_at(self.admin, series, within, what, |v| v >= at_least).await
    }

    /// Send raw bytes and read the response until the server closes or `DEADLINE`.
    pub async fn raw(&self, bytes: &[u8]) -> String {
        let mut stream = self.stream().await;
        stream.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// A refused handshake's status, headers and JSON body.
pub fn refusal(
    result: Result<(Client, tungstenite::handshake::client::Response), tungstenite::Error>,
) -> (u16, HeaderMap, serde_json::Value) {
    match result {
        Ok(_) => panic!("expected the upgrade to be refused, but it was accepted"),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.body().clone().unwrap_or_default();
            let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::String(
                String::from_utf8_lossy(&body).into_owned(),
            ));
            (status, headers, json)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// The next data message, skipping pings and pongs; panics on anything else.
pub async fn next_message(client: &mut Client) -> Message {
    loop {
        match tokio::time::timeout(DEADLINE, client.next())
            .await
            .expect("no message in time")
        {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return m,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// Read until the close frame arrives and send the close reply, as a well-behaved client
/// does; returns the frame's code and reason.
pub async fn next_close<S>(client: &mut WebSocketStream<S>) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(DEADLINE, client.next())
            .await
            .expect("no close in time")
        {
            Some(Ok(Message::Close(frame))) => {
                let _ = client.flush().await;
                return frame.map_or((1005, String::new()), |f| {
                    (f.code.into(), f.reason.to_string())
                });
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// GET on the admin listener; returns the status code and the body.
pub async fn admin_fetch(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The operator API's token of every [`TestGate`] (in `admin-token` beside its policy).
pub const ADMIN_TOKEN: &str = "operator-test-token";

/// A request on the admin listener with `headers` (whole lines, without the CRLF) and
/// `body`; returns the status code, the response head and the body.
pub async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> (u16, String, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    if !body.is_empty() || method != "GET" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    // The gate may answer (400) before taking the whole body.
    let _ = tcp.write_all(body).await;
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_owned(), body.to_owned())
}

/// An operator request with the right token and a JSON body (`Value::Null`: none);
/// returns the status and the JSON answer.
pub async fn operator(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let auth = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let (status, _, text) = admin_request(addr, method, path, &[&auth], &body).await;
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, json)
}

/// GET on the admin listener; returns the status code.
pub async fn admin_get(addr: SocketAddr, path: &str) -> u16 {
    admin_fetch(addr, path).await.0
}

/// The value of the first sample line starting with `series` (name and labels).
pub fn metric_sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The value of `series` in `/metrics` on the admin listener at `admin`, 0 when it is
/// absent. `series` is a name with its labels (`wsgate_policy_reloads_total{result="success"}`),
/// or a bare name, which sums the family's samples over every label set.
pub async fn metric_at(admin: SocketAddr, series: &str) -> f64 {
    let (status, text) = admin_fetch(admin, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {text}");
    metric_total(&text, series)
}

/// Poll `series` on the admin listener at `admin` until `done` holds for it, failing the
/// test with `what` (and the last value) if it does not within `within`.
pub async fn wait_metric_at(
    admin: SocketAddr,
    series: &str,
    within: Duration,
    what: &str,
    done: impl Fn(f64) -> bool,
) -> f64 {
    let start = tokio::time::Instant::now();
    loop {
        let value = metric_at(admin, series).await;
        if done(value) {
            return value;
        }
        assert!(
            start.elapsed() < within,
            "{what}: {series} is still {value} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of the samples of `series` in a text exposition: the one sample with exactly
/// that name and labels, or, for a bare name, every sample of that name; 0 if none.
pub fn metric_total(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(s, _)| {
            *s == series || (!series.contains('{') && s.split('{').next() == Some(series))
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

pub fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap()
}

fn tracing_subscriber_init() -> Result<(), ()> {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
    Ok(())
}

/// Read the next frame off the wire without tungstenite and return a close frame's code
/// and reason. For codes tungstenite refuses to parse (1014, registered after its table).
pub async fn raw_close(client: &mut Client) -> (u16, String) {
    let stream = client.get_mut();
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

/// The next data message on any WebSocket stream, skipping pings and pongs.
pub async fn next_message_any<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("no message in time")
        {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return m,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// The certificate authority of the test JWKS servers, trusted by every test gate.
pub fn jwks_pki() -> &'static Pki {
    static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
    PKI.get_or_init(Pki::generate)
}

fn jwks_roots() -> Vec<CertificateDer<'static>> {
    vec![jwks_pki().ca_der.clone()]
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token over `claims`, signed with `secret`.
pub fn hs256_with(secret: &str, claims: serde_json::Value) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// An HS256 token for `sub`, valid for 5 minutes, signed with the test `SECRET`.
pub fn hs256(sub: &str) -> String {
    hs256_with(
        SECRET,
        serde_json::json!({"sub": sub, "exp": unix_now() + 300}),
    )
}

/// The Python of the virtualenv `target/pyclients` (Python `websockets`, made by
/// `.ci/run`), or `None` when it is missing, which fails the test under `CI=true`.
pub fn python() -> Option<PathBuf> {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pyclients/bin/python");
    if python.is_file() {
        return Some(python);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "target/pyclients is required under CI (.ci/run makes it)"
    );
    eprintln!("skipped: no target/pyclients virtualenv (python3 -m venv target/pyclients && target/pyclients/bin/pip install -r tests/python/requirements.txt)");
    None
}
