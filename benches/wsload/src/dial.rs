//! Connecting: the `Dialer` (TCP, TLS, WebSocket upgrade, and the hand-made raw
//! upgrades of the soak-script modes), its TLS setup and the WebSocket config.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, Request};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

use crate::measure::{read_status, timed, write_all};
use crate::Target;

// ----- connecting ------------------------------------------------------------------

/// What a connection needs, parsed once: address, request, TLS.
pub(crate) struct Dialer {
    pub(crate) addr: SocketAddr,
    pub(crate) request: Request<()>,
    pub(crate) tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    sources: u8,
    pub(crate) read_buffer: usize,
    /// `Authorization` values, one per client of the pool (`--tokens`).
    bearers: Vec<HeaderValue>,
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(crate) type Ws = WebSocketStream<Box<dyn Io>>;

impl Dialer {
    pub(crate) fn new(target: &Target, read_buffer: usize) -> Result<Arc<Dialer>, String> {
        Dialer::with_alpn(target, read_buffer, b"http/1.1")
    }

    /// A dialer whose TLS handshakes offer `alpn` (the HTTP/2 client's offer `h2`).
    pub(crate) fn with_alpn(
        target: &Target,
        read_buffer: usize,
        alpn: &[u8],
    ) -> Result<Arc<Dialer>, String> {
        let mut request = target
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("url {}: {e}", target.url))?;
        for header in &target.headers {
            let (name, value) = header
                .split_once(':')
                .ok_or_else(|| format!("header {header:?}: expected \"Name: value\""))?;
            let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| e.to_string())?;
            let value = HeaderValue::from_str(value.trim()).map_err(|e| e.to_string())?;
            request.headers_mut().append(name, value);
        }
        let uri = request.uri().clone();
        let secure = uri.scheme_str() == Some("wss");
        let host = uri.host().ok_or("url without a host")?.to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .unwrap_or(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST));
        let tls = if secure {
            Some(tls_connector(target, &host, alpn)?)
        } else {
            None
        };
        let bearers = match &target.tokens {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|t| HeaderValue::from_str(&format!("Bearer {}", t.trim())))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--tokens: {e}"))?,
            None => Vec::new(),
        };
        Ok(Arc::new(Dialer {
            addr: SocketAddr::new(ip, port),
            request,
            tls,
            sources: target.sources.max(1),
            read_buffer,
            bearers,
        }))
    }

    /// The source address for the i-th connection: loopback only spreads over 127/8.
    fn source(&self, i: usize) -> Option<SocketAddr> {
        if !self.addr.ip().is_loopback() || !self.addr.is_ipv4() {
            return None;
        }
        let host = (i % self.sources as usize) as u8 + 1;
        Some(SocketAddr::new(Ipv4Addr::new(127, 0, 0, host).into(), 0))
    }

    pub(crate) async fn open(&self, i: usize) -> Result<Ws, &'static str> {
        let stream = self.stream(i).await?;
        let config = ws_config(self.read_buffer);
        let mut request = self.request.clone();
        if let Some(bearer) = self.bearer(i) {
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::header::AUTHORIZATION,
                bearer.clone(),
            );
        }
        let upgrade = tokio_tungstenite::client_async_with_config(request, stream, Some(config));
        match timed(upgrade).await {
            Some(Ok((ws, _))) => Ok(ws),
            Some(Err(tokio_tungstenite::tungstenite::Error::Http(_))) => Err("upgrade_refused"),
            Some(Err(_)) => Err("upgrade"),
            None => Err("upgrade_timeout"),
        }
    }

    /// The i-th connection's byte stream, before the upgrade: TCP, and TLS for wss://.
    pub(crate) async fn stream(&self, i: usize) -> Result<Box<dyn Io>, &'static str> {
        let tcp = timed(self.tcp(i)).await.flatten().ok_or("connect")?;
        Ok(match &self.tls {
            Some((connector, name)) => Box::new(
                timed(connector.connect(name.clone(), tcp))
                    .await
                    .and_then(Result::ok)
                    .ok_or("tls")?,
            ),
            None => Box::new(tcp),
        })
    }

    /// The `Authorization` value of the i-th client of the pool (`--tokens`), if any.
    pub(crate) fn bearer(&self, i: usize) -> Option<&HeaderValue> {
        (!self.bearers.is_empty()).then(|| &self.bearers[i % self.bearers.len()])
    }

    pub(crate) async fn tcp(&self, i: usize) -> Option<tokio::net::TcpStream> {
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .ok()?;
        if let Some(source) = self.source(i) {
            socket.bind(source).ok()?;
        }
        let tcp = socket.connect(self.addr).await.ok()?;
        tcp.set_nodelay(true).ok()?;
        Some(tcp)
    }
}

fn tls_connector(
    target: &Target,
    host: &str,
    alpn: &[u8],
) -> Result<
    (
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    ),
    String,
> {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = if target.no_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let ca = target
            .ca
            .as_ref()
            .ok_or("wss:// needs --ca (or --no-verify)")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("{}: {e}", ca.display()))?
        {
            let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
            roots.add(cert).map_err(|e| e.to_string())?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    if !target.resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = rustls_pki_types::ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
    .map_err(|e| e.to_string())?;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
}

/// Accepts any certificate and signature (`--no-verify`, for load generation only).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls_pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls_pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub(crate) fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

// ----- raw sockets: hand-made upgrade requests ----------------------------------------

impl Dialer {
    /// Hand-made clients speak plaintext HTTP/1.1 only.
    pub(crate) fn raw(target: &Target) -> Result<Arc<Dialer>, String> {
        let dialer = Dialer::new(target, 4096)?;
        if dialer.tls.is_some() {
            return Err(format!("{}: this mode needs a ws:// URL", target.url));
        }
        Ok(dialer)
    }

    /// The upgrade request as bytes: this dialer's headers minus those named in `skip`
    /// (lower case), plus `extra` header lines (each ending in CRLF).
    pub(crate) fn raw_request(&self, skip: &[&str], extra: &str) -> Vec<u8> {
        let uri = self.request.uri();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = format!("GET {path} HTTP/1.1\r\n");
        for (name, value) in self.request.headers() {
            if skip.contains(&name.as_str()) {
                continue;
            }
            head.push_str(name.as_str());
            head.push_str(": ");
            head.push_str(value.to_str().unwrap_or_default());
            head.push_str("\r\n");
        }
        head.push_str(extra);
        head.push_str("\r\n");
        head.into_bytes()
    }

    /// Connects, sends `request` and reads the response head, all within `limit`: the
    /// status and the socket (after a 101, the WebSocket is ours to speak by hand).
    pub(crate) async fn raw_upgrade(
        &self,
        i: usize,
        request: &[u8],
        limit: Duration,
    ) -> Result<(u16, tokio::net::TcpStream), &'static str> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut tcp = tokio::time::timeout_at(deadline, self.tcp(i))
            .await
            .map_err(|_| "connect_timeout")?
            .ok_or("connect")?;
        let status = tokio::time::timeout_at(deadline, async {
            write_all(&mut tcp, request).await.map_err(|_| "write")?;
            read_status(&mut tcp).await
        })
        .await
        .map_err(|_| "timeout")??;
        Ok((status, tcp))
    }
}
