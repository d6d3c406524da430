//! wsload: the load generator (and echo upstream) of wsgate's benchmark harness.
//!
//! `serve` is the echo upstream every target fronts; `echo`, `connect` and `hold` are the
//! three loads of `benches/run.py`; `sessions`, `attack`, `storm`, `exhaust` and `soak` are
//! the healthy traffic and the hostile clients of `benches/soak.py`. Each load prints one
//! JSON object on stdout (progress, if any, goes to stderr). It runs on a current-thread
//! runtime: the harness pins it to one CPU.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, Request};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
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
    /// N healthy sessions, each sending one S-byte message every --interval-ms and timing
    /// its echo; latency is reported separately for the "alone" window and for the
    /// "attack" window that follows it (after --ramp seconds that are not measured).
    /// Prints "wsload: attack phase begins" on stderr when the alone window ends.
    Sessions {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'n', long, default_value_t = 1000)]
        connections: usize,
        #[arg(short = 's', long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 20.0)]
        alone: f64,
        #[arg(long, default_value_t = 5.0)]
        ramp: f64,
        #[arg(long, default_value_t = 20.0)]
        attack: f64,
    },
    /// Hostile clients for --seconds, each reconnecting when the gate cuts it: slowloris
    /// sockets trickling a request head that never ends, upgraded connections that declare
    /// a frame of --frame-bytes and never send its payload, and ping floods.
    Attack {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 2000)]
        slowloris: usize,
        /// One more byte of the request head every this many milliseconds.
        #[arg(long, default_value_t = 500)]
        trickle_ms: u64,
        #[arg(long, default_value_t = 200)]
        stalled: usize,
        /// The length the stalled connections' frame header declares.
        #[arg(long, default_value_t = 65535)]
        frame_bytes: u64,
        #[arg(long, default_value_t = 10)]
        ping_flood: usize,
        /// The first connections are spread over this many seconds.
        #[arg(long, default_value_t = 1.0)]
        ramp: f64,
        #[arg(short = 'd', long, default_value_t = 20.0)]
        seconds: f64,
    },
    /// N upgrade attempts spread evenly over --seconds, each timed from connect to the
    /// response head; accepted ones are held until the storm is over (+ --hold).
    Storm {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'n', long, default_value_t = 5000)]
        attempts: usize,
        #[arg(short = 'd', long, default_value_t = 1.0)]
        seconds: f64,
        /// Send "X-Forwarded-For: A+i" on attempt i (distinct addresses from A on).
        #[arg(long)]
        xff_from: Option<Ipv4Addr>,
        #[arg(long, default_value_t = 0.5)]
        hold: f64,
        /// Each attempt gets this long for connect and response head.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// Opens N upgrades at once (more than the target can hold), holds the ones that
    /// succeed for --seconds, closes everything, then probes until an upgrade succeeds
    /// again and reports how long that took.
    Exhaust {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'n', long, default_value_t = 400)]
        connections: usize,
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
        #[arg(short = 'd', long, default_value_t = 3.0)]
        seconds: f64,
        /// Give up probing after this many seconds.
        #[arg(long, default_value_t = 30.0)]
        recover_within: f64,
    },
    /// The soak: N sessions sending mixed-size messages every --interval seconds, R new
    /// short connections per second, and a --malformed fraction of messages and new
    /// connections replaced by bad frames (the session then reconnects) or bad upgrades.
    Soak {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'n', long, default_value_t = 2000)]
        sessions: usize,
        #[arg(long, default_value_t = 50.0)]
        new_per_second: f64,
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[arg(long, default_value_t = 0.01)]
        malformed: f64,
        /// The target's max_frame_bytes: the "oversize" bad frame declares one more.
        #[arg(long, default_value_t = 65536)]
        max_frame: u64,
        #[arg(short = 'd', long, default_value_t = 1800.0)]
        seconds: f64,
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
            Mode::Sessions {
                target,
                connections,
                size,
                interval_ms,
                alone,
                ramp,
                attack,
            } => {
                let phases = [secs(alone), secs(ramp), secs(attack)];
                let interval = Duration::from_millis(interval_ms.max(1));
                sessions(target, connections, size, interval, phases).await
            }
            Mode::Attack {
                target,
                slowloris,
                trickle_ms,
                stalled,
                frame_bytes,
                ping_flood,
                ramp,
                seconds,
            } => {
                let plan = AttackPlan {
                    slowloris,
                    trickle: Duration::from_millis(trickle_ms.max(1)),
                    stalled,
                    frame_bytes,
                    ping_flood,
                    ramp: secs(ramp),
                    seconds: secs(seconds),
                };
                attack(target, plan).await
            }
            Mode::Storm {
                target,
                attempts,
                seconds,
                xff_from,
                hold,
                timeout,
            } => {
                storm(
                    target,
                    attempts,
                    secs(seconds),
                    xff_from,
                    secs(hold),
                    secs(timeout),
                )
                .await
            }
            Mode::Exhaust {
                target,
                connections,
                timeout,
                seconds,
                recover_within,
            } => {
                let limits = [secs(timeout), secs(seconds), secs(recover_within)];
                exhaust(target, connections, limits).await
            }
            Mode::Soak {
                target,
                sessions,
                new_per_second,
                interval,
                malformed,
                max_frame,
                seconds,
            } => {
                let plan = SoakPlan {
                    sessions,
                    new_per_second,
                    interval: secs(interval).max(Duration::from_millis(1)),
                    malformed: malformed.clamp(0.0, 1.0),
                    max_frame,
                    seconds: secs(seconds),
                };
                soak(target, plan).await
            }
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

// ----- shared by the soak-script modes ------------------------------------------------

type Counts = BTreeMap<String, u64>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// xorshift64*: reproducible, dependency-free randomness for the traffic mixes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// Opens N connections, 64 at a time, in order; failures are counted by kind.
async fn open_many(dialer: &Arc<Dialer>, n: usize) -> (Vec<Ws>, BTreeMap<&'static str, u64>) {
    let mut opened = Vec::with_capacity(n);
    let mut errors = BTreeMap::new();
    let mut pending = std::collections::VecDeque::with_capacity(64);
    let mut collect =
        |result: Result<Result<Ws, &'static str>, tokio::task::JoinError>| match result {
            Ok(Ok(ws)) => opened.push(ws),
            Ok(Err(kind)) => count(&mut errors, kind),
            Err(_) => count(&mut errors, "panic"),
        };
    for i in 0..n {
        let dialer = dialer.clone();
        pending.push_back(tokio::spawn(async move { dialer.open(i).await }));
        if pending.len() >= 64 {
            if let Some(attempt) = pending.pop_front() {
                collect(attempt.await);
            }
        }
    }
    for attempt in pending {
        collect(attempt.await);
    }
    (opened, errors)
}

// ----- raw sockets: hand-made requests and frames -------------------------------------

/// Writes all of `buf` (tokio's `io-util` extension traits are not compiled in here).
async fn write_all<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *w).poll_write(cx, buf)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// One read: the number of bytes read, 0 at end of stream.
async fn read_some<R: AsyncRead + Unpin + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(&mut *buf);
        Pin::new(&mut *r)
            .poll_read(cx, &mut rb)
            .map_ok(|()| rb.filled().len())
    })
    .await
}

/// Reads and ignores bytes until the peer closes (true) or `end` comes (false).
async fn wait_closed<R: AsyncRead + Unpin + ?Sized>(r: &mut R, end: Instant) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout_at(end.into(), async {
        while let Ok(n) = read_some(r, &mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .is_ok()
}

/// Reads a response head and returns its status code.
async fn read_status<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<u16, &'static str> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > 64 * 1024 {
            return Err("head_too_large");
        }
        match read_some(r, &mut buf).await {
            Ok(0) => return Err("eof"),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(_) => return Err("read"),
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    std::str::from_utf8(line)
        .ok()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or("bad_response")
}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame: `first` is FIN, RSV and opcode; `declared`, when set, replaces the
/// payload's length in the header (a promise of bytes that never come).
fn client_frame(first: u8, payload: &[u8], declared: Option<u64>, masked: bool) -> Vec<u8> {
    let len = declared.unwrap_or(payload.len() as u64);
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(first);
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().zip(MASK.iter().cycle()).map(|(b, m)| b ^ m));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

fn close_frame() -> Vec<u8> {
    client_frame(0x88, &1000u16.to_be_bytes(), None, true)
}

impl Dialer {
    /// Hand-made clients speak plaintext HTTP/1.1 only.
    fn raw(target: &Target) -> Result<Arc<Dialer>, String> {
        let dialer = Dialer::new(target, 4096)?;
        if dialer.tls.is_some() {
            return Err(format!("{}: this mode needs a ws:// URL", target.url));
        }
        Ok(dialer)
    }

    /// The upgrade request as bytes: this dialer's headers minus those named in `skip`
    /// (lower case), plus `extra` header lines (each ending in CRLF).
    fn raw_request(&self, skip: &[&str], extra: &str) -> Vec<u8> {
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
    async fn raw_upgrade(
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

// ----- sessions: healthy traffic, alone and then under attack -------------------------

struct SessionStats {
    alone: Histogram<u64>,
    attack: Histogram<u64>,
    dropped: u64,
    errors: BTreeMap<&'static str, u64>,
}

async fn sessions(
    target: Target,
    connections: usize,
    size: usize,
    interval: Duration,
    [alone, ramp, attack]: [Duration; 3],
) -> Result<Value, String> {
    let dialer = Dialer::new(&target, 4096)?;
    let payload = Bytes::from(vec![b'x'; size]);
    let (conns, open_errors) = open_many(&dialer, connections).await;
    let opened = conns.len();
    eprintln!("wsload: {opened} sessions open");
    let start = Instant::now() + Duration::from_secs(1);
    let alone_end = start + alone;
    let attack_start = alone_end + ramp;
    let end = attack_start + attack;
    let stats = Arc::new(Mutex::new(SessionStats {
        alone: histogram(),
        attack: histogram(),
        dropped: 0,
        errors: BTreeMap::new(),
    }));
    let marker = tokio::spawn(async move {
        tokio::time::sleep_until(alone_end.into()).await;
        eprintln!("wsload: attack phase begins");
    });
    let mut tasks = Vec::with_capacity(opened);
    for (i, mut ws) in conns.into_iter().enumerate() {
        let payload = payload.clone();
        let stats = stats.clone();
        // Spread the sessions' sends evenly over the interval.
        let mut next = start + interval.mul_f64(i as f64 / opened.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep_until(next.into()).await;
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let outcome = round_trip(&mut ws, &payload).await;
                {
                    let mut s = lock(&stats);
                    match outcome {
                        Ok(()) if t < alone_end => record(&mut s.alone, t.elapsed()),
                        Ok(()) if t >= attack_start => record(&mut s.attack, t.elapsed()),
                        Ok(()) => {}
                        Err(kind) => {
                            s.dropped += 1;
                            count(&mut s.errors, kind);
                            return;
                        }
                    }
                }
                next = (next + interval).max(Instant::now());
            }
            close(ws).await;
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())?;
    }
    let _ = marker.await;
    let s = lock(&stats);
    let window = |h: &Histogram<u64>, d: Duration| json!({ "seconds": d.as_secs_f64(), "messages": h.len(), "latency": latency(h) });
    Ok(json!({
        "mode": "sessions",
        "connections": connections,
        "opened": opened,
        "open_errors": open_errors,
        "size": size,
        "interval_ms": interval.as_millis() as u64,
        "alone": window(&s.alone, alone),
        "attack": window(&s.attack, attack),
        "dropped": s.dropped,
        "errors": s.errors,
    }))
}

// ----- attack: slowloris, stalled frames, ping floods ---------------------------------

struct AttackPlan {
    slowloris: usize,
    trickle: Duration,
    stalled: usize,
    frame_bytes: u64,
    ping_flood: usize,
    ramp: Duration,
    seconds: Duration,
}

/// What happened to one kind of hostile client: connections made, cut by the target
/// (and after how long), still open at the end, failures to get a connection.
struct Hostile {
    opened: u64,
    cut: u64,
    survived: u64,
    cut_after: Histogram<u64>,
    errors: Counts,
}

impl Hostile {
    fn new() -> Mutex<Hostile> {
        Mutex::new(Hostile {
            opened: 0,
            cut: 0,
            survived: 0,
            cut_after: histogram(),
            errors: Counts::new(),
        })
    }

    fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    fn ended(&mut self, cut: bool, opened: Instant) {
        if cut {
            self.cut += 1;
            record(&mut self.cut_after, opened.elapsed());
        } else {
            self.survived += 1;
        }
    }

    fn report(&self, clients: usize) -> Value {
        let s = |us: u64| us as f64 / 1e6;
        let h = &self.cut_after;
        json!({
            "clients": clients,
            "opened": self.opened,
            "cut": self.cut,
            "survived": self.survived,
            "cut_after_s": {
                "p50": s(h.value_at_quantile(0.5)),
                "p99": s(h.value_at_quantile(0.99)),
                "max": s(h.max()),
            },
            "errors": self.errors,
        })
    }
}

/// Sleep before retrying a connection that could not be made.
const RETRY: Duration = Duration::from_millis(100);

async fn attack(target: Target, plan: AttackPlan) -> Result<Value, String> {
    let dialer = Dialer::raw(&target)?;
    let began = Instant::now();
    let end = began + plan.seconds;
    let slow = Arc::new(Hostile::new());
    let stalled = Arc::new(Hostile::new());
    let flood = Arc::new(Hostile::new());
    let pings = Arc::new(AtomicU64::new(0));
    let pong_bytes = Arc::new(AtomicU64::new(0));
    let total = plan.slowloris + plan.stalled + plan.ping_flood;
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let first = began + plan.ramp.mul_f64(i as f64 / total.max(1) as f64);
        let d = dialer.clone();
        tasks.push(if i < plan.slowloris {
            tokio::spawn(slowloris(d, i, first, end, plan.trickle, slow.clone()))
        } else if i < plan.slowloris + plan.stalled {
            let frame = plan.frame_bytes;
            tokio::spawn(stalled_frame(d, i, first, end, frame, stalled.clone()))
        } else {
            let counters = (pings.clone(), pong_bytes.clone());
            tokio::spawn(ping_flood(d, i, first, end, flood.clone(), counters))
        });
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())?;
    }
    let mut flood_report = lock(&flood).report(plan.ping_flood);
    flood_report["pings_sent"] = json!(pings.load(Ordering::Relaxed));
    // The target's pongs echo our 4-byte payloads: 6 bytes each, unmasked.
    flood_report["pongs_received"] = json!(pong_bytes.load(Ordering::Relaxed) / 6);
    Ok(json!({
        "mode": "attack",
        "seconds": plan.seconds.as_secs_f64(),
        "slowloris": lock(&slow).report(plan.slowloris),
        "trickle_ms": plan.trickle.as_millis() as u64,
        "stalled_frames": lock(&stalled).report(plan.stalled),
        "frame_bytes": plan.frame_bytes,
        "ping_flood": flood_report,
    }))
}

/// A request head that never ends: one more byte every `trickle` until the target hangs up.
async fn slowloris(
    dialer: Arc<Dialer>,
    i: usize,
    first: Instant,
    end: Instant,
    trickle: Duration,
    stats: Arc<Mutex<Hostile>>,
) {
    tokio::time::sleep_until(first.into()).await;
    let path = dialer.request.uri().path().to_owned();
    let head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nX-Slow: ", dialer.addr);
    let mut buf = [0u8; 1024];
    while Instant::now() < end {
        let Some(mut tcp) = timed(dialer.tcp(i)).await.flatten() else {
            lock(&stats).error("connect");
            tokio::time::sleep(RETRY).await;
            continue;
        };
        let opened = Instant::now();
        lock(&stats).opened += 1;
        let mut cut = write_all(&mut tcp, head.as_bytes()).await.is_err();
        let mut next = opened + trickle;
        while !cut {
            let wake = next.min(end);
            tokio::select! {
                _ = read_some(&mut tcp, &mut buf) => cut = true,
                () = tokio::time::sleep_until(wake.into()) => {
                    if wake >= end {
                        break;
                    }
                    cut = write_all(&mut tcp, b"a").await.is_err();
                    next += trickle;
                }
            }
        }
        lock(&stats).ended(cut, opened);
    }
}

/// An upgraded connection that sends a frame header declaring `frame_bytes` and no payload.
async fn stalled_frame(
    dialer: Arc<Dialer>,
    i: usize,
    first: Instant,
    end: Instant,
    frame_bytes: u64,
    stats: Arc<Mutex<Hostile>>,
) {
    tokio::time::sleep_until(first.into()).await;
    let request = dialer.raw_request(&[], "");
    let header = client_frame(0x82, &[], Some(frame_bytes), true);
    while Instant::now() < end {
        let Some(mut tcp) = hostile_upgrade(&dialer, i, &request, &stats).await else {
            continue;
        };
        let opened = Instant::now();
        lock(&stats).opened += 1;
        let cut = write_all(&mut tcp, &header).await.is_err() || wait_closed(&mut tcp, end).await;
        lock(&stats).ended(cut, opened);
    }
}

/// A hostile client's next upgrade; a refusal or error is counted and backed off from.
async fn hostile_upgrade(
    dialer: &Dialer,
    i: usize,
    request: &[u8],
    stats: &Mutex<Hostile>,
) -> Option<tokio::net::TcpStream> {
    let error = match dialer.raw_upgrade(i, request, STEP).await {
        Ok((101, tcp)) => return Some(tcp),
        Ok((status, _)) => format!("status_{status}"),
        Err(kind) => kind.into(),
    };
    lock(stats).error(error);
    tokio::time::sleep(RETRY).await;
    None
}

/// Pings written as fast as the target takes them, pongs read and counted.
async fn ping_flood(
    dialer: Arc<Dialer>,
    i: usize,
    first: Instant,
    end: Instant,
    stats: Arc<Mutex<Hostile>>,
    (pings, pong_bytes): (Arc<AtomicU64>, Arc<AtomicU64>),
) {
    const PER_BATCH: u64 = 6553;
    tokio::time::sleep_until(first.into()).await;
    let request = dialer.raw_request(&[], "");
    let batch: Arc<Vec<u8>> = Arc::new(
        (0..PER_BATCH as u32)
            .flat_map(|k| client_frame(0x89, &k.to_be_bytes(), None, true))
            .collect(),
    );
    while Instant::now() < end {
        let Some(tcp) = hostile_upgrade(&dialer, i, &request, &stats).await else {
            continue;
        };
        let opened = Instant::now();
        lock(&stats).opened += 1;
        let (mut rd, mut wr) = tcp.into_split();
        let writer = {
            let (batch, pings) = (batch.clone(), pings.clone());
            tokio::spawn(async move {
                while write_all(&mut wr, &batch).await.is_ok() {
                    pings.fetch_add(PER_BATCH, Ordering::Relaxed);
                }
            })
        };
        let pong_bytes = pong_bytes.clone();
        let cut = tokio::time::timeout_at(end.into(), async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = read_some(&mut rd, &mut buf).await {
                if n == 0 {
                    break;
                }
                pong_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
        .await
        .is_ok();
        writer.abort();
        lock(&stats).ended(cut, opened);
    }
}

// ----- storm: many upgrade attempts in a short time -----------------------------------

struct Attempts {
    statuses: BTreeMap<u16, Histogram<u64>>,
    errors: BTreeMap<&'static str, u64>,
    held: Vec<tokio::net::TcpStream>,
}

impl Attempts {
    fn new() -> Arc<Mutex<Attempts>> {
        Arc::new(Mutex::new(Attempts {
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            held: Vec::new(),
        }))
    }

    fn record(&mut self, outcome: Result<(u16, tokio::net::TcpStream), &'static str>, t: Instant) {
        match outcome {
            Ok((status, tcp)) => {
                record(
                    self.statuses.entry(status).or_insert_with(histogram),
                    t.elapsed(),
                );
                if status == 101 {
                    self.held.push(tcp);
                }
            }
            Err(kind) => count(&mut self.errors, kind),
        }
    }

    fn report(&self) -> (Value, Value) {
        let counts: BTreeMap<String, u64> = self
            .statuses
            .iter()
            .map(|(status, h)| (status.to_string(), h.len()))
            .collect();
        let latencies: BTreeMap<String, Value> = self
            .statuses
            .iter()
            .map(|(status, h)| (status.to_string(), latency(h)))
            .collect();
        (json!(counts), json!(latencies))
    }
}

/// Sends a close frame to each held connection, then drops them all.
async fn release(held: Vec<tokio::net::TcpStream>) {
    let bye = close_frame();
    for mut tcp in held {
        let _ = tokio::time::timeout(Duration::from_millis(100), write_all(&mut tcp, &bye)).await;
    }
}

async fn storm(
    target: Target,
    attempts: usize,
    spread: Duration,
    xff_from: Option<Ipv4Addr>,
    hold: Duration,
    timeout: Duration,
) -> Result<Value, String> {
    let dialer = Dialer::raw(&target)?;
    let stats = Attempts::new();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(attempts);
    for i in 0..attempts {
        tokio::time::sleep_until((start + spread.mul_f64(i as f64 / attempts as f64)).into()).await;
        let extra = xff_from
            .map(|base| {
                let address = Ipv4Addr::from(u32::from(base).wrapping_add(i as u32));
                format!("X-Forwarded-For: {address}\r\n")
            })
            .unwrap_or_default();
        let request = dialer.raw_request(&[], &extra);
        let (dialer, stats) = (dialer.clone(), stats.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let outcome = dialer.raw_upgrade(i, &request, timeout).await;
            lock(&stats).record(outcome, t);
        }));
    }
    let sent = start.elapsed();
    for task in tasks {
        task.await.map_err(|e| e.to_string())?;
    }
    let finished = start.elapsed();
    tokio::time::sleep(hold).await;
    let held = std::mem::take(&mut lock(&stats).held);
    let n_held = held.len();
    release(held).await;
    let s = lock(&stats);
    let (statuses, latencies) = s.report();
    Ok(json!({
        "mode": "storm",
        "attempts": attempts,
        "spread_seconds": spread.as_secs_f64(),
        "sent_seconds": sent.as_secs_f64(),
        "finished_seconds": finished.as_secs_f64(),
        "xff_from": xff_from.map(|a| a.to_string()),
        "statuses": statuses,
        "latency": latencies,
        "errors": s.errors,
        "held": n_held,
    }))
}

// ----- exhaust: more connections than the target has descriptors for -----------------

async fn exhaust(
    target: Target,
    connections: usize,
    [timeout, hold, recover_within]: [Duration; 3],
) -> Result<Value, String> {
    let dialer = Dialer::raw(&target)?;
    let request = Arc::new(dialer.raw_request(&[], ""));
    let stats = Attempts::new();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(connections);
    for i in 0..connections {
        tokio::time::sleep_until((start + Duration::from_millis(i as u64)).into()).await;
        let (dialer, stats, request) = (dialer.clone(), stats.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let outcome = dialer.raw_upgrade(i, &request, timeout).await;
            lock(&stats).record(outcome, t);
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())?;
    }
    tokio::time::sleep(hold).await;
    let mut held = std::mem::take(&mut lock(&stats).held);
    // Still open after the hold: nothing read means no close from the target.
    let mut alive = 0;
    for tcp in &mut held {
        let mut buf = [0u8; 64];
        if tcp.try_read(&mut buf).is_err() {
            alive += 1;
        }
    }
    let opened = held.len();
    drop(held);
    let released = Instant::now();
    let mut probes = 0;
    let mut recovered = None;
    while released.elapsed() < recover_within {
        probes += 1;
        let probe = dialer.raw_upgrade(connections + probes, &request, Duration::from_secs(1));
        if let Ok((101, tcp)) = probe.await {
            recovered = Some(released.elapsed().as_secs_f64());
            release(vec![tcp]).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = lock(&stats);
    let (statuses, latencies) = s.report();
    Ok(json!({
        "mode": "exhaust",
        "connections": connections,
        "opened": opened,
        "alive_after_hold": alive,
        "statuses": statuses,
        "latency": latencies,
        "errors": s.errors,
        "recovered_after_s": recovered,
        "probes": probes,
    }))
}

// ----- soak: sessions, churn and a little malformed traffic, for a long time ----------

struct SoakPlan {
    sessions: usize,
    new_per_second: f64,
    interval: Duration,
    malformed: f64,
    max_frame: u64,
    seconds: Duration,
}

struct SoakStats {
    histogram: Histogram<u64>,
    bytes: u64,
    counts: Counts,
}

/// Bad frames a session may send instead of a message; the target closes the session.
const BAD_FRAMES: [&str; 5] = [
    "unmasked",
    "reserved_opcode",
    "rsv1",
    "oversize",
    "bad_utf8",
];
/// Bad upgrade requests a new connection may send instead of a good one.
const BAD_UPGRADES: [&str; 3] = ["no_key", "version_12", "garbage"];

fn bad_frame(kind: &str, max_frame: u64) -> Vec<u8> {
    match kind {
        "unmasked" => client_frame(0x82, b"unmasked", None, false),
        "reserved_opcode" => client_frame(0x83, b"opcode 3", None, true),
        "rsv1" => client_frame(0xC2, b"rsv1 set", None, true),
        "oversize" => client_frame(0x82, &[], Some(max_frame + 1), true),
        _ => client_frame(0x81, &[0xff, 0xfe, 0xfd], None, true),
    }
}

fn bad_upgrade(dialer: &Dialer, kind: &str) -> Vec<u8> {
    match kind {
        "no_key" => dialer.raw_request(&["sec-websocket-key"], ""),
        "version_12" => {
            dialer.raw_request(&["sec-websocket-version"], "Sec-WebSocket-Version: 12\r\n")
        }
        _ => b"HELLO \x00\x01\x02 not http\r\n\r\n".to_vec(),
    }
}

/// 60 % 16-255 B, 30 % 1-8 KiB, 10 % 16-60 KiB; one in five as text.
fn mixed_message(rng: &mut Rng, payload: &Bytes) -> Message {
    let size = match rng.below(100) {
        0..=59 => 16 + rng.below(240),
        60..=89 => 1024 + rng.below(7 * 1024),
        _ => 16 * 1024 + rng.below(44 * 1024),
    };
    let bytes = payload.slice(..size.min(payload.len()));
    if rng.chance(0.2) {
        if let Ok(text) = Utf8Bytes::try_from(bytes.clone()) {
            return Message::Text(text);
        }
    }
    Message::Binary(bytes)
}

/// Sends `message` and waits for an echo of the same length.
async fn echo_message(ws: &mut Ws, message: Message) -> Result<usize, &'static str> {
    let size = message.len();
    timed(ws.send(message))
        .await
        .and_then(Result::ok)
        .ok_or("send")?;
    loop {
        match timed(ws.next()).await {
            Some(Some(Ok(m @ (Message::Binary(_) | Message::Text(_))))) if m.len() == size => {
                return Ok(size)
            }
            Some(Some(Ok(Message::Binary(_) | Message::Text(_)))) => return Err("echo_mismatch"),
            Some(Some(Ok(Message::Close(_)))) | Some(None) => return Err("closed"),
            Some(Some(Ok(_))) => continue,
            Some(Some(Err(_))) => return Err("read"),
            None => return Err("echo_timeout"),
        }
    }
}

/// Writes `frame` beneath the WebSocket layer and returns what the peer answered: its
/// close code, "close" (a close frame without a code), "eof" or "no_answer".
async fn send_bad_frame(ws: &mut Ws, frame: &[u8]) -> String {
    if timed(write_all(ws.get_mut(), frame))
        .await
        .and_then(Result::ok)
        .is_none()
    {
        return "write_failed".into();
    }
    let answer = timed(async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code).to_string(),
                Some(Ok(Message::Close(None))) => return "close".to_owned(),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return "eof".to_owned(),
            }
        }
    })
    .await;
    answer.unwrap_or_else(|| "no_answer".to_owned())
}

fn soak_record(stats: &Mutex<SoakStats>, t: Instant, size: usize) {
    let mut s = lock(stats);
    record(&mut s.histogram, t.elapsed());
    s.bytes += size as u64;
}

fn soak_bump(stats: &Mutex<SoakStats>, key: impl Into<String>) {
    *lock(stats).counts.entry(key.into()).or_default() += 1;
}

async fn soak(target: Target, plan: SoakPlan) -> Result<Value, String> {
    let dialer = Dialer::raw(&target)?;
    let plan = Arc::new(plan);
    let payload = Bytes::from(vec![b'x'; 60 * 1024]);
    let stats = Arc::new(Mutex::new(SoakStats {
        histogram: histogram(),
        bytes: 0,
        counts: Counts::new(),
    }));
    let start = Instant::now();
    let end = start + plan.seconds;
    let mut sessions = Vec::with_capacity(plan.sessions);
    for i in 0..plan.sessions {
        // Sessions open at 200 per second, so the start is not a storm of its own.
        let first = start + Duration::from_secs_f64(i as f64 / 200.0);
        let (dialer, plan, stats, payload) =
            (dialer.clone(), plan.clone(), stats.clone(), payload.clone());
        sessions.push(tokio::spawn(soak_session(
            dialer, i, first, end, plan, stats, payload,
        )));
    }
    let inflight = Arc::new(AtomicU64::new(0));
    let mut churned = 0usize;
    if plan.new_per_second > 0.0 {
        let period = Duration::from_secs_f64(1.0 / plan.new_per_second);
        loop {
            let at = start + period.mul_f64(churned as f64);
            if at >= end {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
            inflight.fetch_add(1, Ordering::Relaxed);
            let id = plan.sessions + churned;
            let (dialer, plan, stats, payload, inflight) = (
                dialer.clone(),
                plan.clone(),
                stats.clone(),
                payload.clone(),
                inflight.clone(),
            );
            tokio::spawn(async move {
                soak_churn(&dialer, id, &plan, &stats, &payload).await;
                inflight.fetch_sub(1, Ordering::Relaxed);
            });
            churned += 1;
        }
    }
    for session in sessions {
        session.await.map_err(|e| e.to_string())?;
    }
    let drain = Instant::now() + Duration::from_secs(20);
    while inflight.load(Ordering::Relaxed) > 0 && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = lock(&stats);
    let seconds = plan.seconds.as_secs_f64();
    Ok(json!({
        "mode": "soak",
        "sessions": plan.sessions,
        "seconds": seconds,
        "interval_s": plan.interval.as_secs_f64(),
        "new_per_second": plan.new_per_second,
        "malformed": plan.malformed,
        "new_connections": churned,
        "unfinished_new_connections": inflight.load(Ordering::Relaxed),
        "messages": s.histogram.len(),
        "messages_per_s": s.histogram.len() as f64 / seconds,
        "mb": s.bytes as f64 / 1e6,
        "latency": latency(&s.histogram),
        "counts": s.counts,
    }))
}

/// One long-lived session: a mixed message every interval; a bad frame instead, once in
/// a while, after which the target closes it and it reconnects.
async fn soak_session(
    dialer: Arc<Dialer>,
    i: usize,
    first: Instant,
    end: Instant,
    plan: Arc<SoakPlan>,
    stats: Arc<Mutex<SoakStats>>,
    payload: Bytes,
) {
    let mut rng = Rng::new(i as u64 + 1);
    tokio::time::sleep_until(first.into()).await;
    let mut next = Instant::now() + plan.interval.mul_f64(rng.unit());
    'connection: while Instant::now() < end {
        let mut ws = match dialer.open(i).await {
            Ok(ws) => {
                soak_bump(&stats, "session_opens");
                ws
            }
            Err(kind) => {
                soak_bump(&stats, format!("session_open_errors.{kind}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            tokio::time::sleep_until(next.into()).await;
            next = (next + plan.interval).max(Instant::now());
            if Instant::now() >= end {
                close(ws).await;
                return;
            }
            if rng.chance(plan.malformed) {
                let kind = BAD_FRAMES[rng.below(BAD_FRAMES.len())];
                let answer = send_bad_frame(&mut ws, &bad_frame(kind, plan.max_frame)).await;
                soak_bump(&stats, format!("bad_frames.{kind}.{answer}"));
                continue 'connection;
            }
            let t = Instant::now();
            match echo_message(&mut ws, mixed_message(&mut rng, &payload)).await {
                Ok(size) => soak_record(&stats, t, size),
                Err(kind) => {
                    soak_bump(&stats, format!("session_drops.{kind}"));
                    continue 'connection;
                }
            }
        }
    }
}

/// One new connection: one to three messages and a polite close, or a bad upgrade.
async fn soak_churn(
    dialer: &Dialer,
    id: usize,
    plan: &SoakPlan,
    stats: &Mutex<SoakStats>,
    payload: &Bytes,
) {
    let mut rng = Rng::new(0x5eed_0000 + id as u64);
    if rng.chance(plan.malformed) {
        let kind = BAD_UPGRADES[rng.below(BAD_UPGRADES.len())];
        let answer = match dialer
            .raw_upgrade(id, &bad_upgrade(dialer, kind), STEP)
            .await
        {
            Ok((status, _)) => status.to_string(),
            Err(e) => e.to_owned(),
        };
        soak_bump(stats, format!("bad_upgrades.{kind}.{answer}"));
        return;
    }
    let mut ws = match dialer.open(id).await {
        Ok(ws) => ws,
        Err(kind) => {
            soak_bump(stats, format!("new_open_errors.{kind}"));
            return;
        }
    };
    for _ in 0..1 + rng.below(3) {
        let t = Instant::now();
        match echo_message(&mut ws, mixed_message(&mut rng, payload)).await {
            Ok(size) => soak_record(stats, t, size),
            Err(kind) => {
                soak_bump(stats, format!("new_drops.{kind}"));
                return;
            }
        }
    }
    close(ws).await;
    soak_bump(stats, "new_ok");
}
