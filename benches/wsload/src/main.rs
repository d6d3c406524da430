//! wsload: the load generator (and echo upstream) of wsgate's benchmark harness.
//!
//! `serve` is the echo upstream every target fronts; `echo`, `connect` and `hold` are the
//! three loads. Each load prints one JSON object on stdout; `benches/run.py` collects them.
//! It runs on a current-thread runtime: the harness pins it to one CPU.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, Request};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Every step of a connection (TCP, TLS, upgrade, one echo, close) gets this long.
const STEP: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(about = "WebSocket load generator and echo upstream for wsgate's benchmarks")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Echo upstream: sends every text and binary message back; prints its address.
    Serve {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// C connections in a closed loop, one message of S bytes in flight each.
    Echo {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'c', long, default_value_t = 50)]
        connections: usize,
        #[arg(short = 's', long, default_value_t = 64)]
        size: usize,
        /// Measured seconds, after the warm-up.
        #[arg(short = 'd', long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
    },
    /// C workers each looping connect, [TLS], upgrade, one echo, close.
    Connect {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'c', long, default_value_t = 16)]
        connections: usize,
        #[arg(short = 'd', long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
    },
    /// N idle connections (answering pings) held for a while; RSS and CPU of --pid.
    Hold {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'n', long, default_value_t = 9000)]
        connections: usize,
        /// How long the connections are held once all are open.
        #[arg(short = 'd', long, default_value_t = 30.0)]
        seconds: f64,
        /// The process whose RSS and CPU are measured (the proxy).
        #[arg(long)]
        pid: Option<u32>,
    },
    /// The Autobahn testee client: runs every case of a `wstest -m fuzzingserver` at
    /// --url (its base, reached directly or through a gate), echoing each message.
    Autobahn {
        #[command(flatten)]
        target: Target,
        /// The agent name the report files the results under.
        #[arg(long, default_value = "wsload")]
        agent: String,
    },
}

#[derive(Args, Clone)]
struct Target {
    /// ws:// or wss:// URL.
    #[arg(long)]
    url: String,
    /// CA certificate (PEM) that signs a wss:// server's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Extra request header, "Name: value" (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Spread connections over 127.0.0.1 ..= 127.0.0.N as source addresses.
    #[arg(long, default_value_t = 200)]
    sources: u8,
    /// Let TLS clients resume sessions (tickets); by default every handshake is full.
    #[arg(long)]
    resume: bool,
    /// Do not verify the server's certificate or handshake signature: the load generator
    /// then spends its CPU on the key exchange only, so the server is what is measured.
    #[arg(long)]
    no_verify: bool,
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(format!("runtime: {e}")),
    };
    let report = rt.block_on(async {
        match cli.mode {
            Mode::Serve { listen } => serve(listen).await,
            Mode::Echo {
                target,
                connections,
                size,
                seconds,
                warmup,
            } => echo(target, connections, size, secs(seconds), secs(warmup)).await,
            Mode::Connect {
                target,
                connections,
                seconds,
                warmup,
            } => connect(target, connections, secs(seconds), secs(warmup)).await,
            Mode::Hold {
                target,
                connections,
                seconds,
                pid,
            } => hold(target, connections, secs(seconds), pid).await,
            Mode::Autobahn { target, agent } => autobahn(target, &agent).await,
        }
    });
    match report {
        Ok(value) => println!("{value}"),
        Err(e) => fail(e),
    }
}

fn fail(message: String) -> ! {
    eprintln!("wsload: {message}");
    std::process::exit(1)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

// ----- the echo upstream -----------------------------------------------------------

async fn serve(listen: SocketAddr) -> Result<Value, String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("bind {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening {addr}");
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors or similar: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let config = ws_config(64 * 1024);
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await
            else {
                return;
            };
            // After a close frame, the next read sends tungstenite's queued reply and ends
            // the stream; a protocol error ends it without a close frame (tungstenite's
            // default, which Autobahn's direct baseline shows).
            while let Some(Ok(message)) = ws.next().await {
                if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

// ----- connecting ------------------------------------------------------------------

/// What a connection needs, parsed once: address, request, TLS.
struct Dialer {
    addr: SocketAddr,
    request: Request<()>,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    sources: u8,
    read_buffer: usize,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;

impl Dialer {
    fn new(target: &Target, read_buffer: usize) -> Result<Arc<Dialer>, String> {
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
            Some(tls_connector(target, &host)?)
        } else {
            None
        };
        Ok(Arc::new(Dialer {
            addr: SocketAddr::new(ip, port),
            request,
            tls,
            sources: target.sources.max(1),
            read_buffer,
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

    async fn open(&self, i: usize) -> Result<Ws, &'static str> {
        let tcp = timed(self.tcp(i)).await.flatten().ok_or("connect")?;
        let stream: Box<dyn Io> = match &self.tls {
            Some((connector, name)) => Box::new(
                timed(connector.connect(name.clone(), tcp))
                    .await
                    .and_then(Result::ok)
                    .ok_or("tls")?,
            ),
            None => Box::new(tcp),
        };
        let config = ws_config(self.read_buffer);
        let upgrade =
            tokio_tungstenite::client_async_with_config(self.request.clone(), stream, Some(config));
        match timed(upgrade).await {
            Some(Ok((ws, _))) => Ok(ws),
            Some(Err(tokio_tungstenite::tungstenite::Error::Http(_))) => Err("upgrade_refused"),
            Some(Err(_)) => Err("upgrade"),
            None => Err("upgrade_timeout"),
        }
    }

    async fn tcp(&self, i: usize) -> Option<tokio::net::TcpStream> {
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
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
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

async fn timed<F: std::future::Future>(f: F) -> Option<F::Output> {
    tokio::time::timeout(STEP, f).await.ok()
}

/// Sends one message and waits for the next data message back.
async fn round_trip(ws: &mut Ws, payload: &Bytes) -> Result<(), &'static str> {
    timed(ws.send(Message::Binary(payload.clone())))
        .await
        .and_then(Result::ok)
        .ok_or("send")?;
    loop {
        match timed(ws.next()).await {
            Some(Some(Ok(Message::Binary(_) | Message::Text(_)))) => return Ok(()),
            Some(Some(Ok(Message::Close(_)))) | Some(None) => return Err("closed"),
            Some(Some(Ok(_))) => continue,
            Some(Some(Err(_))) => return Err("read"),
            None => return Err("echo_timeout"),
        }
    }
}

/// Closes politely: our close frame, then wait (bounded) for the server's and its EOF.
async fn close(mut ws: Ws) {
    let _ = timed(async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 us ..= 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|e| fail(e.to_string()))
}

fn record(h: &mut Histogram<u64>, elapsed: Duration) {
    h.saturating_record(elapsed.as_micros().clamp(1, u64::MAX as u128) as u64);
}

fn latency(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

fn count(errors: &mut BTreeMap<&'static str, u64>, kind: &'static str) {
    *errors.entry(kind).or_default() += 1;
}

// ----- echo ------------------------------------------------------------------------

struct Tally {
    histogram: Histogram<u64>,
    done: u64,
    errors: BTreeMap<&'static str, u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            histogram: histogram(),
            done: 0,
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.histogram.add(&other.histogram);
        self.done += other.done;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
    }
}

async fn echo(
    target: Target,
    connections: usize,
    size: usize,
    seconds: Duration,
    warmup: Duration,
) -> Result<Value, String> {
    let dialer = Dialer::new(&target, (size + 16).clamp(4096, 256 * 1024))?;
    let payload = Bytes::from(vec![b'x'; size]);
    let mut conns = Vec::with_capacity(connections);
    for i in 0..connections {
        conns.push(
            dialer
                .open(i)
                .await
                .map_err(|kind| format!("echo: connection {i}: {kind}"))?,
        );
    }
    let start = Instant::now() + warmup;
    let end = start + seconds;
    let mut tasks = Vec::with_capacity(connections);
    for mut ws in conns {
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                if let Err(kind) = round_trip(&mut ws, &payload).await {
                    count(&mut tally.errors, kind);
                    return tally;
                }
                if t >= start {
                    record(&mut tally.histogram, t.elapsed());
                    tally.done += 1;
                }
            }
            close(ws).await;
            tally
        }));
    }
    let mut total = Tally::new();
    for task in tasks {
        total.merge(task.await.map_err(|e| e.to_string())?);
    }
    let s = seconds.as_secs_f64();
    Ok(json!({
        "mode": "echo",
        "connections": connections,
        "size": size,
        "seconds": s,
        "messages": total.done,
        "messages_per_s": total.done as f64 / s,
        "mb_per_s": (total.done as f64 * size as f64) / s / 1e6,
        "latency": latency(&total.histogram),
        "errors": total.errors,
    }))
}

// ----- connect ---------------------------------------------------------------------

async fn connect(
    target: Target,
    workers: usize,
    seconds: Duration,
    warmup: Duration,
) -> Result<Value, String> {
    let dialer = Dialer::new(&target, 4096)?;
    let payload = Bytes::from_static(b"x");
    let start = Instant::now() + warmup;
    let end = start + seconds;
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let dialer = dialer.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut i = w;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let outcome = match dialer.open(i).await {
                    Ok(mut ws) => match round_trip(&mut ws, &payload).await {
                        Ok(()) => {
                            let elapsed = t.elapsed();
                            close(ws).await;
                            Ok(elapsed)
                        }
                        Err(kind) => Err(kind),
                    },
                    Err(kind) => Err(kind),
                };
                i += workers;
                if t < start {
                    continue;
                }
                match outcome {
                    Ok(elapsed) => {
                        record(&mut tally.histogram, elapsed);
                        tally.done += 1;
                    }
                    Err(kind) => {
                        count(&mut tally.errors, kind);
                        // A refusing target must not turn this into a busy loop.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            tally
        }));
    }
    let mut total = Tally::new();
    for task in tasks {
        total.merge(task.await.map_err(|e| e.to_string())?);
    }
    let s = seconds.as_secs_f64();
    Ok(json!({
        "mode": "connect",
        "connections": workers,
        "tls": dialer.tls.is_some(),
        "seconds": s,
        "upgrades": total.done,
        "upgrades_per_s": total.done as f64 / s,
        "latency": latency(&total.histogram),
        "errors": total.errors,
    }))
}

// ----- hold ------------------------------------------------------------------------

async fn hold(
    target: Target,
    connections: usize,
    seconds: Duration,
    pid: Option<u32>,
) -> Result<Value, String> {
    // Idle connections never carry more than pings: a small read buffer keeps the
    // load generator itself at a few KiB per connection.
    let dialer = Dialer::new(&target, 1024)?;
    let settle = || tokio::time::sleep(Duration::from_secs(1));
    settle().await;
    let rss_before = pid.and_then(rss_kib);
    let mut errors = BTreeMap::new();
    let mut readers = Vec::with_capacity(connections);
    // Open with bounded parallelism (64 at a time), in order.
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let opener = {
        let dialer = dialer.clone();
        tokio::spawn(async move {
            for i in 0..connections {
                let dialer = dialer.clone();
                let attempt = tokio::spawn(async move { dialer.open(i).await });
                if tx.send(attempt).await.is_err() {
                    return;
                }
            }
        })
    };
    let opening = Instant::now();
    while let Some(attempt) = rx.recv().await {
        match attempt.await {
            Ok(Ok(mut ws)) => readers.push(tokio::spawn(async move {
                // Reading answers the proxy's pings; returns when the connection ends.
                while let Some(Ok(_)) = ws.next().await {}
            })),
            Ok(Err(kind)) => count(&mut errors, kind),
            Err(_) => count(&mut errors, "panic"),
        }
    }
    let _ = opener.await;
    let open_seconds = opening.elapsed().as_secs_f64();
    let opened = readers.len();
    settle().await;
    let rss_after = pid.and_then(rss_kib);
    let cpu_before = pid.and_then(cpu_ticks);
    tokio::time::sleep(seconds).await;
    let cpu_after = pid.and_then(cpu_ticks);
    let alive = readers.iter().filter(|r| !r.is_finished()).count();
    for reader in &readers {
        reader.abort();
    }
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if opened > 0 => Some(a.saturating_sub(b) as f64 / opened as f64),
        _ => None,
    };
    // CPU ticks are 1/100 s (USER_HZ) on Linux.
    let cpu_ms = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 * 10.0),
        _ => None,
    };
    let s = seconds.as_secs_f64();
    Ok(json!({
        "mode": "hold",
        "connections": connections,
        "opened": opened,
        "open_seconds": open_seconds,
        "alive": alive,
        "seconds": s,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "kib_per_connection": per_conn,
        "cpu_ms": cpu_ms,
        "cpu_percent_of_core": cpu_ms.map(|ms| ms / 10.0 / s),
        "errors": errors,
    }))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

// ----- autobahn ----------------------------------------------------------------------

/// Autobahn's fuzzing server sends up to 16 MiB messages and counts on the testee to
/// echo them as they come; each case gets this long.
const CASE: Duration = Duration::from_secs(60);

async fn autobahn(target: Target, agent: &str) -> Result<Value, String> {
    let base = target.url.trim_end_matches('/').to_owned();
    let at = |path: String| Target {
        url: format!("{base}{path}"),
        ..target.clone()
    };
    let mut count_ws = Dialer::new(&at("/getCaseCount".into()), 64 * 1024)?
        .open(0)
        .await
        .map_err(|e| format!("getCaseCount: {e}"))?;
    let cases: u32 = match timed(count_ws.next()).await {
        Some(Some(Ok(Message::Text(n)))) => {
            n.trim().parse().map_err(|_| format!("case count {n:?}"))?
        }
        other => return Err(format!("getCaseCount answered {other:?}")),
    };
    close(count_ws).await;
    let mut errors = BTreeMap::new();
    for case in 1..=cases {
        let url = at(format!("/runCase?case={case}&agent={agent}"));
        let mut ws = match Dialer::new(&url, 64 * 1024)?.open(0).await {
            Ok(ws) => ws,
            Err(kind) => {
                count(&mut errors, kind);
                continue;
            }
        };
        let _ = tokio::time::timeout(CASE, async {
            while let Some(Ok(message)) = ws.next().await {
                if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                    break;
                }
            }
        })
        .await;
        let _ = timed(ws.close(None)).await;
    }
    let report = Dialer::new(&at(format!("/updateReports?agent={agent}")), 64 * 1024)?
        .open(0)
        .await
        .map_err(|e| format!("updateReports: {e}"))?;
    close(report).await;
    Ok(json!({ "cases": cases, "errors": errors }))
}
