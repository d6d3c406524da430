//! `wsgate demo`: the quick start. A built-in demo server (a WebSocket echo upstream that
//! also serves a browser page and a few loopback-only helper endpoints), a generated
//! policy and HMAC secret in a temporary directory, and the gate on TLS with the
//! development certificate in front of it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::body::{full, Body};
use crate::{mint, Gate};

mod reflect;
mod start;

pub use start::{start, StartError, Started};

/// The development certificate and key (certs/), for the quick start only.
pub const DEV_CERT: &str = include_str!("../../certs/localhost.pem");
pub const DEV_KEY: &str = include_str!("../../certs/localhost.key");
/// The CA that signed [`DEV_CERT`]: the demo server trusts it when it replays an upgrade.
const DEV_CA: &str = include_str!("../../certs/dev-ca.pem");

/// The demo page (static: it fetches its token from `GET /demo/token`).
pub const PAGE: &str = include_str!("page.html");

/// Lifetime of the token printed for command-line clients.
pub const PRINTED_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Lifetime of a token from `GET /demo/token`: the page fetches one per connect.
pub const PAGE_TOKEN_TTL: Duration = Duration::from_secs(600);
/// The only Origin the demo's `partner` route allows: never the page's own.
pub const PARTNER_ORIGIN: &str = "https://partner.example";
/// Bound on one replayed upgrade, connect to response body.
const REPLAY_DEADLINE: Duration = Duration::from_secs(5);

/// What the demo server needs besides its listener: the secret (to mint page tokens),
/// the gate's address (to replay upgrades), and, once it runs, the gate (for its metrics).
pub struct Demo {
    secret: String,
    gate_addr: SocketAddr,
    gate: OnceLock<Arc<Gate>>,
}

impl Demo {
    pub fn new(secret: String, gate_addr: SocketAddr) -> Demo {
        Demo {
            secret,
            gate_addr,
            gate: OnceLock::new(),
        }
    }

    /// Hand over the started gate; `/demo/metrics` answers 503 until then.
    pub fn set_gate(&self, gate: Arc<Gate>) {
        let _ = self.gate.set(gate);
    }

    /// An HS256 token for `demo-user`, valid for `ttl`, with a random `jti` (returned too)
    /// so that two tokens minted in the same second differ.
    pub fn mint(&self, ttl: Duration) -> Result<(String, String), MintError> {
        let mut random = [0u8; 8];
        aws_lc_rs::rand::fill(&mut random).map_err(|_| MintError::NoRandomness)?;
        let id: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let extra = [("jti".to_owned(), format!("\"{id}\""))];
        let token = mint::hs256(
            self.secret.as_bytes(),
            &mint::TokenSpec {
                sub: "demo-user",
                ttl,
                audience: None,
                issuer: None,
                extra: &extra,
            },
        )?;
        Ok((token, id))
    }

    fn port(&self) -> u16 {
        self.gate_addr.port()
    }

    /// The origin the page is served from (the policy also allows `127.0.0.1`).
    fn page_origin(&self) -> String {
        format!("https://localhost:{}", self.port())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("no randomness available")]
    NoRandomness,
    #[error(transparent)]
    Mint(#[from] mint::MintError),
}

/// Serve the demo server on `listener` until the process exits. WebSocket upgrades on any
/// path are echoed; plain requests are [`respond`]ed to.
pub async fn serve(listener: TcpListener, demo: Arc<Demo>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let demo = demo.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| service(req, demo.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn service(req: Request<Incoming>, demo: Arc<Demo>) -> Result<Response<Body>, Infallible> {
    if req.headers().contains_key(header::SEC_WEBSOCKET_KEY) {
        return Ok(echo(req));
    }
    Ok(respond(&req, &demo).await)
}

/// The plain endpoints. All but `/` sit under `/demo`, which the demo policy opens to
/// loopback clients only: `/demo/token` hands out live tokens.
///
/// - `GET /`: the page;
/// - `GET /demo/token`: a fresh token (`{token, id, expires_in}`);
/// - `GET /demo/metrics`: the gate's own counters, parsed from its metrics text;
/// - `GET /demo/try/missing-token`, `GET /demo/try/foreign-origin`: the demo server sends
///   the gate the upgrade request the try describes and returns the gate's answer
///   (`{request, status, body}`), which a script in a browser cannot read.
async fn respond(req: &Request<Incoming>, demo: &Demo) -> Response<Body> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let path = req.uri().path();
    if path.starts_with("/demo/") && !for_loopback_name(req) {
        // A page on a rebound DNS name reaches a loopback gate as same-origin; it must
        // not read a token.
        return text(
            StatusCode::FORBIDDEN,
            "the demo's helpers answer only requests for localhost, 127.0.0.1 or [::1]\n",
        );
    }
    match path {
        "/" => Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(full(Bytes::from_static(PAGE.as_bytes())))
            .unwrap_or_default(),
        "/demo/token" => match demo.mint(PAGE_TOKEN_TTL) {
            Ok((token, id)) => json_response(json!({
                "token": token,
                "id": id,
                "expires_in": PAGE_TOKEN_TTL.as_secs(),
            })),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
        },
        "/demo/metrics" => match demo.gate.get() {
            Some(gate) => json_response(gate_counters(&gate.metrics.encode())),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "the gate is starting\n"),
        },
        "/demo/try/missing-token" => json_response(replay(demo, "/ws", false).await),
        "/demo/try/foreign-origin" => json_response(replay(demo, "/partner", true).await),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Whether the client asked for a loopback name (the gate forwards its `Host` as
/// `X-Forwarded-Host`).
fn for_loopback_name(req: &Request<Incoming>) -> bool {
    let Some(host) = req
        .headers()
        .get("x-forwarded-host")
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    matches!(
        name.to_ascii_lowercase().as_str(),
        "localhost" | "127.0.0.1" | "[::1]"
    )
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(Bytes::from(body.to_owned())))
        .unwrap_or_default()
}

fn json_response(value: Value) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(Bytes::from(value.to_string())))
        .unwrap_or_default()
}

/// Echo text and binary messages; select the first subprotocol offered (after the gate
/// took its token entry out), and accept permessage-deflate (see [`reflect`]).
fn echo(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return text(StatusCode::BAD_REQUEST, "not an upgrade\n");
    };
    let protocol = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|p| p.trim().to_owned());
    let deflate = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(reflect::deflate_offered);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            reflect::echo(TokioIo::new(upgraded), deflate).await;
        }
    });
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        );
    if let Some(p) = protocol {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    if deflate {
        response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, reflect::DEFLATE_ANSWER);
    }
    response.body(full(Bytes::new())).unwrap_or_default()
}

/// Send the gate an upgrade request for `path` with the page's Origin, and a fresh token
/// (as the `bearer.` subprotocol, as the page sends it) when `with_token`. Returns what
/// was sent and what the gate answered.
async fn replay(demo: &Demo, path: &str, with_token: bool) -> Value {
    let origin = demo.page_origin();
    let mut described = format!("GET {path} with Origin: {origin}");
    let token = if with_token {
        match demo.mint(Duration::from_secs(60)) {
            Ok((token, _)) => Some(token),
            Err(e) => return json!({ "request": described, "error": e.to_string() }),
        }
    } else {
        None
    };
    described += if with_token {
        " and a valid token"
    } else {
        " and no token"
    };
    let answer = tokio::time::timeout(
        REPLAY_DEADLINE,
        upgrade_attempt(demo, path, &origin, token.as_deref()),
    )
    .await;
    match answer {
        Ok(Ok((status, body))) => json!({ "request": described, "status": status, "body": body }),
        Ok(Err(e)) => json!({ "request": described, "error": e }),
        Err(_) => json!({ "request": described, "error": "the gate did not answer in 5 s" }),
    }
}

async fn upgrade_attempt(
    demo: &Demo,
    path: &str,
    origin: &str,
    token: Option<&str>,
) -> Result<(u16, Value), String> {
    let connector = tokio_rustls::TlsConnector::from(dev_ca_client()?);
    let tcp = TcpStream::connect(dialable(demo.gate_addr))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let server_name = rustls_pki_types::ServerName::try_from("localhost")
        .map_err(|e| e.to_string())?
        .to_owned();
    let tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    let mut request = Request::get(path)
        .header(header::HOST, format!("localhost:{}", demo.port()))
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, generate_key())
        .header(header::ORIGIN, origin);
    if let Some(token) = token {
        request = request.header(header::SEC_WEBSOCKET_PROTOCOL, format!("bearer.{token}"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok((status, body))
}

/// A TLS client that trusts only the development CA.
fn dev_ca_client() -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(DEV_CA.as_bytes()) {
        let cert = cert.map_err(|e| format!("certs/dev-ca.pem: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("certs/dev-ca.pem: {e}"))?;
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `addr`, with an unspecified IP (`0.0.0.0`, `::`) replaced by loopback.
fn dialable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// The counters the page shows, from the gate's OpenMetrics text: open connections, and
/// upgrades by result and closes by reason, each summed over routes; and the client
/// connections accepted by protocol (`http/1.1`, `h2`).
pub fn gate_counters(metrics: &str) -> Value {
    let mut open = 0;
    let mut connections = BTreeMap::<String, u64>::new();
    let mut upgrades = BTreeMap::<String, u64>::new();
    let mut closes = BTreeMap::<String, u64>::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        // Counts only: a gauge or counter of whole connections and upgrades.
        let Ok(value) = value.parse::<f64>().map(|v| v as u64) else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        match name {
            "wsgate_connections_active" => open += value,
            "wsgate_upgrades_total" => {
                if let Some(result) = label(labels, "result") {
                    *upgrades.entry(result.to_owned()).or_default() += value;
                }
            }
            "wsgate_closes_total" => {
                if let Some(reason) = label(labels, "reason") {
                    *closes.entry(reason.to_owned()).or_default() += value;
                }
            }
            "wsgate_client_connections_total" => {
                if let Some(protocol) = label(labels, "protocol") {
                    *connections.entry(protocol.to_owned()).or_default() += value;
                }
            }
            _ => {}
        }
    }
    json!({ "open": open, "upgrades": upgrades, "closes": closes, "connections": connections })
}

/// The value of label `key` in `k="v",k2="v2"}` (the gate's values need no unescaping).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let rest = &labels[start..];
    rest.find('"').map(|end| &rest[..end])
}

/// Write the demo's policy and secret into `dir`, which must not exist yet: it is made
/// private (0700) and its files 0600, so that no other user reads the secret or swaps in a
/// policy or a symlink of theirs. Returns the policy path.
pub fn write_policy(
    dir: &Path,
    gate: SocketAddr,
    upstream: SocketAddr,
    secret: &str,
) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    let create = |path: &Path, contents: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?
            .write_all(contents.as_bytes())
    };
    create(&dir.join("jwt-secret"), secret)?;
    let port = gate.port();
    let policy = format!(
        r#"# wsgate demo policy (generated). Edit it while the demo runs: it is reloaded live.
version: 1
defaults:
  upstream: ws://{upstream}
  auth:
    required: true
    algorithms: [HS256]
    keys: [{{hmac_secret_file: jwt-secret}}]
    forward_claims: {{sub: X-Auth-Subject}}
  origin:
    allow: ["https://localhost:{port}", "https://127.0.0.1:{port}"]
    allow_missing: true   # so command-line clients work; browsers always send Origin
  rate:
    upgrades_per_second: 20   # the page's tries open several sockets from one address
    burst: 40
  messages:
    max_frame_bytes: 65536
    max_message_bytes: 65536  # the page's oversized try sends 100,000 bytes: close 1009
    per_second: 20            # the page's flood try sends 200 at once: close 1008
    burst: 40
routes:
  - path: /ws
    name: echo
  - path: /partner            # the page's foreign-Origin try: 403 origin_not_allowed
    name: partner
    origin: {{allow: ["{PARTNER_ORIGIN}"], allow_missing: false}}
  - path: /demo               # the page's helpers; /demo/token mints tokens: loopback only
    name: demo
    http: pass
    ip: {{allow: [127.0.0.0/8, "::1/128"]}}
    auth: {{required: false}}   # it hands out tokens: loopback only, no token needed
  - path: /
    name: page
    http: pass
    auth: {{required: false}}   # the page itself is public; its WebSocket is not
"#
    );
    let path = dir.join("policy.yaml");
    create(&path, &policy)?;
    Ok(path)
}

/// What `wsgate demo` prints once it serves. Every URL in a command is single-quoted
/// (`?` is a glob in zsh); the client runs from a virtual environment, because Debian 12
/// and other PEP 668 systems refuse `pip install` outside one.
pub fn banner(port: u16, policy: &Path, token: &str) -> String {
    let socket = format!("wss://localhost:{port}/ws");
    format!(
        "\nwsgate demo is running (development certificate: trust certs/dev-ca.pem or accept the warning)\n\n  \
         page:    https://localhost:{port}/\n  \
         socket:  {socket}\n  \
         policy:  {policy} (edit it: it reloads live)\n  \
         token:   {token}\n\n\
         command-line client, from this checkout (Python's websockets in a virtual environment;\n\
         on Debian and Ubuntu, `sudo apt install python3-venv` first):\n  \
         python3 -m venv /tmp/wsgate-venv && /tmp/wsgate-venv/bin/pip install websockets\n  \
         SSL_CERT_FILE=certs/dev-ca.pem /tmp/wsgate-venv/bin/python -m websockets \\\n    \
         '{socket}?access_token={token}'\n",
        policy = policy.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_banner_quotes_every_url_in_a_command_and_installs_into_a_venv() {
        let printed = banner(8443, Path::new("/tmp/p/policy.yaml"), "a.b.c");
        assert!(printed.contains("  token:   a.b.c\n"), "{printed}");
        assert!(
            printed.contains("\n    'wss://localhost:8443/ws?access_token=a.b.c'\n"),
            "{printed}"
        );
        assert!(
            printed.contains(
                "python3 -m venv /tmp/wsgate-venv && /tmp/wsgate-venv/bin/pip install websockets"
            ),
            "{printed}"
        );
        assert!(!printed.contains("\npip install"), "{printed}");
        assert!(
            printed.contains("/tmp/wsgate-venv/bin/python -m websockets"),
            "{printed}"
        );
    }

    #[test]
    fn the_policy_opens_the_demo_helpers_to_loopback_clients_only() {
        let dir = std::env::temp_dir().join(format!("wsgate-demo-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let gate: SocketAddr = ([0, 0, 0, 0], 8443).into();
        let upstream: SocketAddr = ([127, 0, 0, 1], 9000).into();
        let path = write_policy(&dir, gate, upstream, &"ab".repeat(32)).unwrap();
        let loaded = crate::config::load(&path);
        // Private, and never reused.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("jwt-secret")), 0o600);
        assert!(write_policy(&dir, gate, upstream, "x").is_err());
        let _ = std::fs::remove_dir_all(&dir);
        let policy = loaded.unwrap().policy;
        let helpers = policy.route_for("/demo/token").unwrap();
        assert_eq!(helpers.name, "demo");
        let allowed = |ip: &str| crate::admission::ip::allowed(helpers, ip.parse().unwrap());
        assert!(allowed("127.0.0.1"));
        assert!(allowed("::1"));
        assert!(!allowed("192.0.2.7"));
        assert!(!allowed("2001:db8::7"));
        // The page itself is open to all; the partner route allows another origin only.
        let page = policy.route_for("/").unwrap();
        assert!(crate::admission::ip::allowed(
            page,
            "192.0.2.7".parse().unwrap()
        ));
        assert_eq!(policy.route_for("/partner").unwrap().name, "partner");
    }

    #[test]
    fn counters_sum_over_routes() {
        let text = "# HELP x\n\
            wsgate_connections_active{route=\"echo\"} 2\n\
            wsgate_connections_active{route=\"partner\"} 1\n\
            wsgate_upgrades_total{route=\"echo\",result=\"accepted\"} 3\n\
            wsgate_upgrades_total{route=\"partner\",result=\"accepted\"} 1\n\
            wsgate_upgrades_total{route=\"echo\",result=\"missing_token\"} 1\n\
            wsgate_closes_total{route=\"echo\",reason=\"message_rate_exceeded\"} 1\n\
            wsgate_messages_total{route=\"echo\",direction=\"client_to_upstream\"} 9\n\
            wsgate_client_connections_total{protocol=\"http/1.1\"} 0\n\
            wsgate_client_connections_total{protocol=\"h2\"} 2\n\
            # EOF\n";
        assert_eq!(
            gate_counters(text),
            json!({
                "open": 3,
                "upgrades": {"accepted": 4, "missing_token": 1},
                "closes": {"message_rate_exceeded": 1},
                "connections": {"http/1.1": 0, "h2": 2},
            })
        );
    }
}
