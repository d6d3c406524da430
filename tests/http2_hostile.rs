//! The known HTTP/2 attacks (SPEC §10) against the gate running as its own process, each
//! sent as raw frames (`support::h2raw`) over h2c with prior knowledge, rapid reset also
//! over TLS with ALPN `h2`. For every row: the attacking connection is closed (GOAWAY, or
//! dropped) or held by flow control; the gate's resident memory stays within a stated
//! bound of its baseline; and a WebSocket over HTTP/1.1 and one over HTTP/2, opened before
//! the attack, keep echoing through it, as do fresh ones opened while it runs.
//!
//! The rate limits are lifted (100,000 upgrades a second), so that what bounds each attack
//! is the HTTP/2 layer and not the per-IP rate.

mod support;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use support::h2::H2;
use support::h2raw::{self, *};
use support::process::{rss_kib, Log, Proc};
use support::*;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

// ---------------------------------------------------------------------------------------
// The gate as a process, its upstream, and what it costs

/// A `wsgate run` child with `--tls-cert`/`--tls-key` (`Proc` is plaintext only).
struct TlsChild(std::process::Child);

impl Drop for TlsChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

enum Child {
    Plain(Proc),
    Tls(TlsChild, Pki),
}

/// The gate process in front of a real upstream.
struct Bench {
    upstream: Upstream,
    child: Child,
    addr: std::net::SocketAddr,
    pid: u32,
    _dir: tempfile::TempDir,
}

/// `http2.max_concurrent_streams`, `timeouts.handshake_seconds` and
/// `timeouts.write_seconds` for one bench.
struct Limits {
    streams: u32,
    handshake: u64,
    write: u64,
}

const LIMITS: Limits = Limits {
    streams: 100,
    handshake: 10,
    write: 10,
};

impl Bench {
    async fn start(limits: Limits, tls: bool) -> Bench {
        let upstream = Upstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.yaml");
        std::fs::write(
            &policy,
            format!(
                "version: 1\nhttp2:\n  max_concurrent_streams: {}\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\n  origin: {{allow_missing: true}}\n  messages: {{per_second: 100000, burst: 100000}}\n  rate: {{upgrades_per_second: 100000, burst: 100000, max_connections_per_ip: 100000}}\n  timeouts: {{handshake_seconds: {}, write_seconds: {}}}\nroutes:\n  - path: /ws\n",
                limits.streams,
                upstream.url(),
                limits.handshake,
                limits.write
            ),
        )
        .unwrap();
        let (child, addr) = match tls {
            false => {
                let proc = Proc::start(&policy, &[]);
                let addr = proc.addr;
                (Child::Plain(proc), addr)
            }
            true => start_tls(&policy, dir.path()),
        };
        let pid = match &child {
            Child::Plain(p) => p.child.id(),
            Child::Tls(c, _) => c.0.id(),
        };
        Bench {
            upstream,
            child,
            addr,
            pid,
            _dir: dir,
        }
    }

    /// The client configuration for a TLS gate (its CA trusted), `None` for h2c.
    fn tls(&self) -> Option<&Arc<rustls::ClientConfig>> {
        match &self.child {
            Child::Plain(_) => None,
            Child::Tls(_, pki) => Some(&pki.client),
        }
    }

    fn authority(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    /// A raw HTTP/2 connection (preface and SETTINGS sent), split for reading and writing.
    async fn raw(&self) -> (ReadHalf<Conn>, WriteHalf<Conn>) {
        tokio::io::split(h2raw::connect(self.addr, self.tls()).await)
    }

    fn connect_block(&self) -> Vec<u8> {
        connect_block(self.tls().is_some(), &self.authority(), "/ws")
    }

    fn get_block(&self) -> Vec<u8> {
        get_block(self.tls().is_some(), &self.authority(), "/ws")
    }

    /// A WebSocket over HTTP/1.1.
    async fn h1(&self) -> Client {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let (stream, scheme) = match self.tls() {
            Some(config) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect("localhost".try_into().unwrap(), tcp)
                    .await
                    .unwrap();
                (ClientStream::Tls(Box::new(tls)), "wss")
            }
            None => (ClientStream::Plain(tcp), "ws"),
        };
        let request = format!("{scheme}://{}/ws", self.authority())
            .into_client_request()
            .unwrap();
        let connecting = tokio_tungstenite::client_async(request, stream);
        let (ws, _) = tokio::time::timeout(DEADLINE, connecting)
            .await
            .expect("HTTP/1.1 upgrade in time")
            .expect("HTTP/1.1 upgrade");
        ws
    }

    /// A WebSocket over HTTP/2 (hyper's client), with its connection.
    async fn h2(&self) -> (H2, support::h2::H2Socket) {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let mut h2 = match self.tls() {
            Some(config) => {
                let mut config = (**config).clone();
                config.alpn_protocols = vec![b"h2".to_vec()];
                let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect("localhost".try_into().unwrap(), tcp)
                    .await
                    .unwrap();
                H2::handshake(tls, format!("https://{}", self.authority())).await
            }
            None => H2::handshake(tcp, format!("http://{}", self.authority())).await,
        };
        let (ws, _) = h2.websocket("/ws", &[]).await.expect("h2 WebSocket");
        (h2, ws)
    }

    /// A fresh WebSocket over each protocol echoes once; how long that took.
    async fn fresh_echoes(&self) -> Duration {
        let started = Instant::now();
        let mut h1 = self.h1().await;
        echo(&mut h1, "fresh h1").await;
        let (_conn, mut h2) = self.h2().await;
        echo(&mut h2, "fresh h2").await;
        started.elapsed()
    }
}

fn start_tls(policy: &std::path::Path, dir: &std::path::Path) -> (Child, std::net::SocketAddr) {
    let pki = Pki::generate();
    let (cert, key) = pki.write(dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["run", "--admin", "off", "--listen", "127.0.0.1:0"])
        .args(["--log-format", "text", "--tls-cert"])
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .arg("--policy")
        .arg(policy)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let log = Log::follow(&mut child);
    let child = TlsChild(child);
    let line = log.wait_line("addr=");
    let addr = line
        .split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.parse().ok())
        .expect("the listening line's address");
    (Child::Tls(child, pki), addr)
}

async fn echo<S>(ws: &mut WebSocketStream<S>, text: &str) -> Duration
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = Instant::now();
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_message_any(ws).await, Message::text(text));
    started.elapsed()
}

/// Two WebSockets opened before the attack (one over HTTP/1.1, one over HTTP/2) echoing a
/// message each every 10 ms until stopped.
struct Healthy {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(u64, Duration)>,
}

impl Healthy {
    async fn start(bench: &Bench) -> Healthy {
        let mut h1 = bench.h1().await;
        let (conn, mut h2) = bench.h2().await;
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let _conn = conn;
                let (mut echoes, mut slowest) = (0, Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    slowest = slowest.max(echo(&mut h1, "h1 still here").await);
                    slowest = slowest.max(echo(&mut h2, "h2 still here").await);
                    echoes += 2;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (echoes, slowest)
            }
        });
        Healthy { stop, task }
    }

    /// The echoes made and the slowest of them.
    async fn stop(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("a healthy WebSocket failed")
    }
}

/// The gate's CPU time (user + system) so far.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    // utime and stime, the 14th and 15th fields, in clock ticks (100 a second on Linux).
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum());
    Duration::from_millis(ticks * 10)
}

/// What an attack cost the gate: resident memory before, at the peak (sampled every
/// 10 ms) and after, and CPU time.
struct Cost {
    pid: u32,
    rss_before: u64,
    cpu_before: Duration,
    stop: Arc<AtomicBool>,
    peak: JoinHandle<u64>,
}

struct Costed {
    rss_before: u64,
    rss_peak: u64,
    rss_after: u64,
    cpu: Duration,
}

impl Costed {
    fn grown_kib(&self) -> u64 {
        self.rss_peak.max(self.rss_after) - self.rss_before
    }
}

impl Cost {
    /// Start measuring once the gate has settled.
    async fn start(pid: u32) -> Cost {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stop = Arc::new(AtomicBool::new(false));
        let peak = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut peak = 0;
                while !stop.load(Ordering::Relaxed) {
                    peak = peak.max(rss_kib(pid));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                peak
            }
        });
        Cost {
            pid,
            rss_before: rss_kib(pid),
            cpu_before: cpu(pid),
            stop,
            peak,
        }
    }

    async fn end(self) -> Costed {
        self.stop.store(true, Ordering::Relaxed);
        let rss_peak = self.peak.await.unwrap();
        Costed {
            rss_before: self.rss_before,
            rss_peak,
            rss_after: rss_kib(self.pid),
            cpu: cpu(self.pid).saturating_sub(self.cpu_before),
        }
    }
}

/// What a row may cost the gate: resident memory over its baseline (the peak), and CPU
/// time (`None` for the SETTINGS and PING floods, which the gate processes at the
/// attacker's pace until its buffers are full: their CPU is reported per MiB).
struct Bound {
    kib: u64,
    cpu: Option<Duration>,
}

/// The bound of the rows that end an attack by closing it. Measured (debug build): +108 to
/// +760 KiB, 20 to 220 ms of CPU.
const CLOSED_QUICKLY: Bound = Bound {
    kib: 4 * 1024,
    cpu: Some(Duration::from_secs(2)),
};

/// The checks every row ends with: the healthy WebSockets kept echoing and none waited
/// long, the fresh ones were quick, and the cost stayed within `bound`.
async fn assert_unharmed(
    row: &str,
    healthy: Healthy,
    fresh: Duration,
    cost: &Costed,
    bound: Bound,
) {
    let (echoes, slowest) = healthy.stop().await;
    eprintln!(
        "{row}: RSS {} -> peak {} -> {} KiB (+{} KiB), gate CPU {:?}; {echoes} healthy echoes, slowest {slowest:?}; fresh WebSockets in {fresh:?}",
        cost.rss_before,
        cost.rss_peak,
        cost.rss_after,
        cost.grown_kib(),
        cost.cpu
    );
    assert!(echoes >= 2, "{row}: no healthy echo during the attack");
    assert!(
        slowest < Duration::from_secs(2),
        "{row}: a healthy echo took {slowest:?}"
    );
    assert!(
        fresh < Duration::from_secs(3),
        "{row}: fresh WebSockets took {fresh:?}"
    );
    assert!(
        cost.grown_kib() < bound.kib,
        "{row}: the gate grew {} KiB",
        cost.grown_kib()
    );
    if let Some(cpu) = bound.cpu {
        assert!(cost.cpu < cpu, "{row}: the gate used {:?} of CPU", cost.cpu);
    }
}

// ---------------------------------------------------------------------------------------
// Rapid reset (CVE-2023-44487)

/// One attacking connection: HEADERS (an extended CONNECT for a WebSocket, the most
/// expensive request the gate serves) and RST_STREAM, up to 10,000 times, in batches of
/// 100 pairs, without waiting for anything. h2 counts the streams reset before they were
/// accepted, and past `max_pending_accept_reset_streams` (20) closes the connection with
/// ENHANCE_YOUR_CALM. Returns the pairs written, how it was closed, and when.
async fn rapid_reset_once(bench: &Bench) -> (u32, Closed, Duration) {
    let (mut rd, mut wr) = bench.raw().await;
    let started = Instant::now();
    let closed = tokio::spawn(async move {
        let closed = until_closed(&mut rd, Duration::from_secs(10)).await;
        (closed, started.elapsed())
    });
    let block = bench.connect_block();
    let mut pairs = 0;
    while pairs < 10_000 && !closed.is_finished() {
        let batch: Vec<u8> = (pairs..pairs + 100)
            .flat_map(|i| {
                let id = 2 * i + 1;
                let mut f = frame(HEADERS, END_HEADERS, id, &block);
                f.extend(rst_stream(id, CANCEL));
                f
            })
            .collect();
        if wr.write_all(&batch).await.is_err() {
            break;
        }
        pairs += 100;
    }
    let (closed, took) = closed.await.unwrap();
    (pairs, closed, took)
}

/// 50 attacking connections one after the other (an attacker reconnects), while the
/// healthy WebSockets echo and fresh ones open.
async fn rapid_reset(bench: &Bench) {
    const ATTACKS: usize = 50;
    let healthy = Healthy::start(bench).await;
    let seen_before = bench.upstream.seen_count();
    let cost = Cost::start(bench.pid).await;
    let started = Instant::now();
    let attacks = async {
        let mut runs = Vec::new();
        for _ in 0..ATTACKS {
            runs.push(rapid_reset_once(bench).await);
        }
        runs
    };
    let (runs, fresh) = tokio::join!(attacks, async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        bench.fresh_echoes().await
    });
    let took = started.elapsed();
    let cost = cost.end().await;
    // Streams that got as far as the upstream (the fresh WebSockets are two).
    let reached = bench.upstream.seen_count() - seen_before - 2;
    let pairs: u32 = runs.iter().map(|r| r.0).sum();
    let slowest = runs.iter().map(|r| r.2).max().unwrap();
    eprintln!(
        "rapid reset: {ATTACKS} connections, {pairs} HEADERS+RST_STREAM pairs written in {took:?}; each closed within {slowest:?} ({:?}); {reached} streams reached the upstream",
        runs[0].1
    );
    for (_, closed, _) in &runs {
        assert_eq!(
            closed.goaway,
            Some((ENHANCE_YOUR_CALM, "too_many_resets".into())),
            "{closed:?}"
        );
        assert!(closed.ended, "the connection stayed open after its GOAWAY");
    }
    assert!(
        slowest < Duration::from_secs(2),
        "closed only after {slowest:?}"
    );
    assert!(
        reached <= 100,
        "{reached} reset streams reached the upstream"
    );
    assert_unharmed("rapid reset", healthy, fresh, &cost, CLOSED_QUICKLY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_closed_with_enhance_your_calm() {
    rapid_reset(&Bench::start(LIMITS, false).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_over_tls_is_closed_with_enhance_your_calm() {
    rapid_reset(&Bench::start(LIMITS, true).await).await;
}

// ---------------------------------------------------------------------------------------
// CONTINUATION flood (CVE-2024-27316)

/// HEADERS without END_HEADERS, then `piece` in CONTINUATION frames (never END_HEADERS),
/// up to 100,000 of them or until the gate closes: the frames written, how it closed, and
/// when.
async fn continuation_flood(
    bench: &Bench,
    first: &[u8],
    piece: &[u8],
) -> (usize, Closed, Duration) {
    let (mut rd, mut wr) = bench.raw().await;
    let started = Instant::now();
    let closed = tokio::spawn(async move {
        let closed = until_closed(&mut rd, Duration::from_secs(10)).await;
        (closed, started.elapsed())
    });
    let _ = wr.write_all(&frame(HEADERS, 0, 1, first)).await;
    let one = frame(CONTINUATION, 0, 1, piece);
    let per_batch = (256 * 1024 / one.len()).max(1);
    let batch = one.repeat(per_batch);
    let mut written = 0;
    while written < 100_000 && !closed.is_finished() {
        if wr.write_all(&batch).await.is_err() {
            break;
        }
        written += per_batch;
    }
    let (closed, took) = closed.await.unwrap();
    (written, closed, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_closed_with_enhance_your_calm() {
    let bench = Bench::start(LIMITS, false).await;
    let healthy = Healthy::start(&bench).await;
    let cost = Cost::start(bench.pid).await;
    let request = bench.connect_block();
    // One header field (140 bytes) in each CONTINUATION.
    let mut field = Vec::new();
    literal(&mut field, 0, "x-c", &[b'c'; 130]);
    // One value declared 16 MiB long, sent 16 KiB a frame: it never ends, so it is never
    // decoded, and the header list limit alone would not see it.
    let mut endless = request.clone();
    endless.push(0);
    hpack_str(&mut endless, b"x-endless");
    hpack_int(&mut endless, 0, 7, 1 << 24);
    let variants: [(&str, &[u8], &[u8]); 3] = [
        ("a header field per frame", &request, &field),
        (
            "one endless value, 16 KiB a frame",
            &endless,
            &[b'e'; 16_384],
        ),
        ("empty frames", &request, &[]),
    ];
    let (runs, fresh) = tokio::join!(
        async {
            let mut runs = Vec::new();
            for (name, first, piece) in variants {
                for _ in 0..10 {
                    runs.push((name, continuation_flood(&bench, first, piece).await));
                }
            }
            runs
        },
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            bench.fresh_echoes().await
        }
    );
    let cost = cost.end().await;
    for (name, (written, closed, took)) in &runs {
        eprintln!(
            "CONTINUATION flood, {name}: {written} frames written; {closed:?} after {took:?}"
        );
        assert_eq!(
            closed.goaway,
            Some((ENHANCE_YOUR_CALM, "too_many_continuations".into())),
            "{name}"
        );
        assert!(closed.ended, "{name}: open after the GOAWAY");
        assert!(
            *took < Duration::from_secs(2),
            "{name}: closed after {took:?}"
        );
    }
    assert_eq!(
        bench.upstream.seen_count(),
        4,
        "a flooded request went upstream"
    );
    assert_unharmed("CONTINUATION flood", healthy, fresh, &cost, CLOSED_QUICKLY).await;
}

// ---------------------------------------------------------------------------------------
// SETTINGS and PING floods

/// Two connections flood `one` (a SETTINGS or PING frame) without ever reading the
/// acknowledgements: one right after its preface, one after a request was answered. h2
/// writes each acknowledgement before it reads the next frame, so once the socket's buffers
/// are full the gate stops reading and the flood stalls. The first connection is then
/// dropped at `handshake_seconds` (it never made a request).
async fn control_flood(name: &str, one: Vec<u8>) {
    const HANDSHAKE: Duration = Duration::from_secs(3);
    let bench = Bench::start(
        Limits {
            handshake: HANDSHAKE.as_secs(),
            ..LIMITS
        },
        false,
    )
    .await;
    let healthy = Healthy::start(&bench).await;
    let cost = Cost::start(bench.pid).await;
    let chunk = one.repeat(64 * 1024 / one.len());
    let (mut rd_a, mut wr_a) = bench.raw().await;
    let a_opened = Instant::now();
    let (mut rd_b, mut wr_b) = bench.raw().await;
    wr_b.write_all(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &bench.get_block(),
    ))
    .await
    .unwrap();
    // B reads until its answer, and then no more.
    let answered = async {
        loop {
            let f = read_frame(&mut rd_b).await.unwrap();
            if f.kind == HEADERS && f.stream == 1 {
                return status(&f.payload);
            }
        }
    };
    assert_eq!(
        tokio::time::timeout(DEADLINE, answered).await,
        Ok(Some(426))
    );
    let (a, b, fresh) = tokio::join!(
        flood(&mut wr_a, &chunk, 1024 * MIB),
        flood(&mut wr_b, &chunk, 1024 * MIB),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            bench.fresh_echoes().await
        }
    );
    let cost = cost.end().await;
    // When A's writes failed, or else when its reads did.
    let a_ended =
        a.end == FloodEnd::Closed || to_end(&mut rd_a, HANDSHAKE + Duration::from_secs(3)).await;
    let a_closed = match a.end {
        FloodEnd::Closed => a.at - a_opened,
        _ => a_opened.elapsed(),
    };
    eprintln!(
        "{name} flood: before any request, {} KiB written in {:?}, then {:?}; {} {a_closed:?} after it opened. After a request, {} KiB written in {:?}, then {:?}",
        a.written / 1024,
        a.took,
        a.end,
        if a_ended { "closed" } else { "still open" },
        b.written / 1024,
        b.took,
        b.end,
    );
    // A is stalled, or dropped at the deadline before its buffers filled.
    assert_ne!(
        a.end,
        FloodEnd::AllWritten,
        "{name} flood before a request: {a:?}"
    );
    assert!(a.written < 64 * MIB, "{name} flood before a request: {a:?}");
    assert!(a_ended, "{name} flood: open at {a_closed:?}");
    assert!(
        a_closed < HANDSHAKE + Duration::from_secs(2),
        "{name} flood: closed after {a_closed:?}"
    );
    assert_eq!(
        b.end,
        FloodEnd::Stalled,
        "{name} flood after a request: {b:?}"
    );
    assert!(b.written < 64 * MIB, "{name} flood after a request: {b:?}");
    let mib = (a.written + b.written) as f64 / MIB as f64;
    eprintln!(
        "{name} flood: {mib:.1} MiB sent, {:.1} ms of the gate's CPU a MiB",
        cost.cpu.as_secs_f64() * 1000.0 / mib
    );
    // Measured: +148 to +228 KiB.
    let bound = Bound {
        kib: 4 * 1024,
        cpu: None,
    };
    assert_unharmed(&format!("{name} flood"), healthy, fresh, &cost, bound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_flood_stalls_and_is_dropped_at_the_handshake_deadline() {
    let one = h2raw::settings(&[(HEADER_TABLE_SIZE, 0), (INITIAL_WINDOW_SIZE, 65_535)]);
    control_flood("SETTINGS", one).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_stalls_and_is_dropped_at_the_handshake_deadline() {
    control_flood("PING", ping(*b"pingpong")).await;
}

// ---------------------------------------------------------------------------------------
// HPACK header bomb

/// `x-bomb: bbb…` (4,000 bytes) is put in the gate's dynamic table (4,038 of its 4,096
/// bytes) once, then referenced by one-byte indexed fields: each reference decodes to
/// 4 KiB. Past the 16 KiB header list the stream gets the gate's 431 with its JSON body
/// (the connection lives on, its HPACK state intact); past 64 KiB h2's own bare 431, before
/// the gate sees the request; past 256 KiB (h2's abuse limit, 4 times its list) the
/// connection is closed with ENHANCE_YOUR_CALM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_bomb_is_refused_with_431_then_enhance_your_calm() {
    const BOMB_TABLE_ENTRY: usize = 62;
    const BURST: u32 = 500;
    let bench = Bench::start(LIMITS, false).await;
    let healthy = Healthy::start(&bench).await;
    let cost = Cost::start(bench.pid).await;
    let (rd, mut wr) = bench.raw().await;
    let mut rx = frames(rd);
    let bomb = |references: usize| {
        let mut block = bench.connect_block();
        for _ in 0..references {
            indexed(&mut block, BOMB_TABLE_ENTRY);
        }
        block
    };
    // 5 copies: 20 KiB decoded from 4 KiB sent.
    let mut first = bench.connect_block();
    literal_indexing(&mut first, "x-bomb", &[b'b'; 4000]);
    for _ in 0..4 {
        indexed(&mut first, BOMB_TABLE_ENTRY);
    }
    wr.write_all(&frame(HEADERS, END_HEADERS, 1, &first))
        .await
        .unwrap();
    assert_eq!(answer(&mut rx, 1).await, Answer::Status(431));
    let body = next_frame(&mut rx, DEADLINE, |f| f.kind == DATA && f.stream == 1)
        .await
        .expect("the 431's body");
    let body = String::from_utf8_lossy(&body.payload);
    assert!(body.contains(r#""error":"bad_request""#), "{body}");
    // The connection and its dynamic table still work.
    wr.write_all(&frame(HEADERS, END_HEADERS, 3, &bench.connect_block()))
        .await
        .unwrap();
    assert_eq!(answer(&mut rx, 3).await, Answer::Status(200));
    // A burst of streams each decoding to 80 KiB (20 references in 200 bytes), refused by
    // h2 itself: a refused stream holds its slot until its 431 is written, so past
    // `max_concurrent_streams` in one burst the rest are refused at once.
    let started = Instant::now();
    let burst: Vec<u8> = (0..BURST)
        .flat_map(|i| frame(HEADERS, END_HEADERS, 5 + 2 * i, &bomb(20)))
        .collect();
    let fresh = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        bench.fresh_echoes().await
    };
    let answered = async {
        wr.write_all(&burst).await.unwrap();
        let (mut too_large, mut refused) = (0, 0);
        while too_large + refused < BURST {
            let f = next_frame(&mut rx, DEADLINE, |f| f.stream >= 5)
                .await
                .unwrap_or_else(|| panic!("{too_large} 431, {refused} refused, then nothing"));
            match (f.kind, f.code()) {
                (HEADERS, _) => {
                    assert_eq!(status(&f.payload), Some(431));
                    too_large += 1;
                }
                (RST_STREAM, REFUSED_STREAM) => refused += 1,
                // The reset that follows a 431.
                (RST_STREAM, PROTOCOL_ERROR) => {}
                _ => panic!("{f:?}"),
            }
        }
        (too_large, refused, started.elapsed())
    };
    let ((too_large, refused, took_burst), fresh) = tokio::join!(answered, fresh);
    // One stream referencing it 10,000 times (40 MiB decoded from 10 KiB).
    let started = Instant::now();
    wr.write_all(&frame(HEADERS, END_HEADERS, 5 + 2 * BURST, &bomb(10_000)))
        .await
        .unwrap();
    let closed = closed_after(&mut rx, Duration::from_secs(5)).await;
    let took = started.elapsed();
    let cost = cost.end().await;
    eprintln!(
        "HPACK bomb: a burst of {BURST} streams of 20 references: {too_large} answered 431, {refused} refused, in {took_burst:?}; 10,000 references: {closed:?} after {took:?}"
    );
    assert!(too_large >= 50, "only {too_large} streams got their 431");
    assert_eq!(
        closed.goaway,
        Some((ENHANCE_YOUR_CALM, "header_list_way_too_large".into()))
    );
    assert!(closed.ended);
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    // The one WebSocket admitted (stream 3), the fresh ones and the healthy ones.
    assert_eq!(bench.upstream.seen_count(), 5);
    assert_unharmed("HPACK bomb", healthy, fresh, &cost, CLOSED_QUICKLY).await;
}

// ---------------------------------------------------------------------------------------
// Streams that never send their headers

/// 200 connections that never complete a request: a fifth send nothing after the preface,
/// the others a header block without END_HEADERS (15 KiB of it, under the 16 KiB list),
/// then silence. A connection's first request must come within `handshake_seconds` of its
/// accept (1 s here), so all are dropped then, while the healthy WebSockets echo on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_never_end_are_dropped_at_the_handshake_deadline() {
    const CONNECTIONS: usize = 200;
    let bench = Bench::start(
        Limits {
            handshake: 1,
            ..LIMITS
        },
        false,
    )
    .await;
    let healthy = Healthy::start(&bench).await;
    let cost = Cost::start(bench.pid).await;
    let mut partial = bench.connect_block();
    literal(&mut partial, 0, "x-pending", &[b'p'; 15_000]);
    let mut waiting = Vec::new();
    for i in 0..CONNECTIONS {
        let (mut rd, mut wr) = bench.raw().await;
        let opened = Instant::now();
        if i % 5 != 0 {
            wr.write_all(&frame(HEADERS, 0, 1, &partial)).await.unwrap();
        }
        waiting.push(tokio::spawn(async move {
            let ended = to_end(&mut rd, Duration::from_secs(5)).await;
            let _hold = wr;
            ended.then(|| opened.elapsed())
        }));
    }
    let fresh = bench.fresh_echoes().await;
    let closes: Vec<Option<Duration>> = futures_util::future::join_all(waiting)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let cost = cost.end().await;
    let open = closes.iter().filter(|c| c.is_none()).count();
    let (first, last) = closes
        .iter()
        .flatten()
        .fold((Duration::MAX, Duration::ZERO), |(a, b), c| {
            (a.min(*c), b.max(*c))
        });
    eprintln!(
        "{CONNECTIONS} connections without a complete request: dropped {first:?} to {last:?} after they opened; {open} still open after 5 s; {} KiB a connection",
        cost.grown_kib() / CONNECTIONS as u64
    );
    assert_eq!(open, 0, "connections outlived the handshake deadline");
    assert!(
        first >= Duration::from_millis(900),
        "dropped after {first:?}"
    );
    assert!(last < Duration::from_secs(3), "dropped after {last:?}");
    assert_eq!(bench.upstream.seen_count(), 4);
    // Measured: +10.0 MiB, 51 KiB a connection (its 15 KiB of header block, h2's buffers
    // and state), for the 1 s they are held.
    let bound = Bound {
        kib: 16 * 1024,
        ..CLOSED_QUICKLY
    };
    assert_unharmed("headers that never end", healthy, fresh, &cost, bound).await;
}

// ---------------------------------------------------------------------------------------
// More streams than max_concurrent_streams

/// With `max_concurrent_streams: 4`, four WebSockets are opened on one connection; the
/// fifth to seventh streams are refused (REFUSED_STREAM) and never reach the upstream,
/// while the four echo on. Closing one frees its slot. Then 3,000 streams over the limit in
/// one burst: each is refused, and past 1,024 refusals (`max_local_error_reset_streams`)
/// the connection is closed with ENHANCE_YOUR_CALM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_limit_are_refused_and_the_others_echo_on() {
    let bench = Bench::start(
        Limits {
            streams: 4,
            ..LIMITS
        },
        false,
    )
    .await;
    let healthy = Healthy::start(&bench).await;
    let seen_before = bench.upstream.seen_count();
    let cost = Cost::start(bench.pid).await;
    let (rd, mut wr) = bench.raw().await;
    let mut rx = frames(rd);
    let request = bench.connect_block();
    let open = |ids: &[u32]| -> Vec<u8> {
        ids.iter()
            .flat_map(|id| frame(HEADERS, END_HEADERS, *id, &request))
            .collect()
    };
    wr.write_all(&open(&[1, 3, 5, 7])).await.unwrap();
    assert_eq!(
        answers(&mut rx, &[1, 3, 5, 7]).await,
        [const { Answer::Status(200) }; 4]
    );
    wr.write_all(&open(&[9, 11, 13])).await.unwrap();
    assert_eq!(
        answers(&mut rx, &[9, 11, 13]).await,
        [const { Answer::Reset(REFUSED_STREAM) }; 3]
    );
    echo_streams(&mut wr, &mut rx, &[1, 3, 5, 7]).await;
    wr.write_all(&rst_stream(1, CANCEL)).await.unwrap();
    wr.write_all(&open(&[15])).await.unwrap();
    assert_eq!(answers(&mut rx, &[15]).await, [Answer::Status(200)]);
    echo_streams(&mut wr, &mut rx, &[3, 5, 7, 15]).await;
    // The burst.
    let started = Instant::now();
    let burst: Vec<u32> = (0..3000).map(|i| 17 + 2 * i).collect();
    let (closed, fresh) = tokio::join!(
        async {
            wr.write_all(&open(&burst)).await.unwrap();
            closed_after(&mut rx, Duration::from_secs(5)).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            bench.fresh_echoes().await
        }
    );
    let took = started.elapsed();
    let cost = cost.end().await;
    let reached = bench.upstream.seen_count() - seen_before;
    eprintln!("3,000 streams past the limit: {closed:?} after {took:?}; {reached} WebSockets reached the upstream");
    assert_eq!(
        closed.goaway,
        Some((ENHANCE_YOUR_CALM, "too_many_internal_resets".into()))
    );
    assert!(closed.ended);
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    // Streams 1, 3, 5, 7 and 15, and the two fresh WebSockets.
    assert_eq!(reached, 7);
    assert_unharmed(
        "streams past the limit",
        healthy,
        fresh,
        &cost,
        CLOSED_QUICKLY,
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// DATA towards an upstream that does not read

/// A raw connection with one WebSocket stream (1) open whose upstream has stopped reading,
/// the gate's SETTINGS acknowledged; returns the stream's send window (the gate's
/// SETTINGS_INITIAL_WINDOW_SIZE) and the connection's, as the gate announced them.
async fn stalled_stream(bench: &Bench) -> (WriteHalf<Conn>, UnboundedReceiver<Frame>, i64, i64) {
    let (mut wr, mut rx, stream_window, conn_window) = settled(bench).await;
    wr.write_all(&frame(HEADERS, END_HEADERS, 1, &bench.connect_block()))
        .await
        .unwrap();
    assert_eq!(answer(&mut rx, 1).await, Answer::Status(200));
    let stall = support::wire::frame(0x81, b"stall", true);
    wr.write_all(&frame(DATA, 0, 1, &stall)).await.unwrap();
    let sent = stall.len() as i64;
    (wr, rx, stream_window - sent, conn_window - sent)
}

/// A raw connection whose SETTINGS exchange is done: the gate's stream window (its
/// SETTINGS_INITIAL_WINDOW_SIZE) and connection window, as it announced them.
async fn settled(bench: &Bench) -> (WriteHalf<Conn>, UnboundedReceiver<Frame>, i64, i64) {
    let (rd, mut wr) = bench.raw().await;
    let mut rx = frames(rd);
    let settings = next_frame(&mut rx, DEADLINE, |f| {
        f.kind == SETTINGS && f.flags & ACK == 0
    })
    .await
    .expect("the gate's SETTINGS");
    let stream_window = settings
        .payload
        .chunks(6)
        .find(|s| u16::from_be_bytes([s[0], s[1]]) == INITIAL_WINDOW_SIZE)
        .map_or(65_535, |s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    wr.write_all(&settings_ack()).await.unwrap();
    let update = next_frame(&mut rx, DEADLINE, |f| {
        f.kind == WINDOW_UPDATE && f.stream == 0
    })
    .await
    .expect("the gate's connection window");
    let conn_window = 65_535 + i64::from(update.code());
    (wr, rx, i64::from(stream_window), conn_window)
}

/// A client that keeps to flow control sends 16 KiB binary messages on a WebSocket stream
/// whose upstream has stopped reading: it can send what the kernel's buffers towards the
/// upstream take, plus the stream's 256 KiB window, and then gets no more window; the
/// gate's memory stays flat. At `write_seconds` (3 s here) the gate gives up on the
/// upstream and closes the stream with 1014. A second client ignores flow control: it gets
/// FLOW_CONTROL_ERROR (GOAWAY, or RST_STREAM when only the stream's window was broken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_for_an_upstream_that_does_not_read_is_held_by_the_windows() {
    let bench = Bench::start(Limits { write: 3, ..LIMITS }, false).await;
    let healthy = Healthy::start(&bench).await;
    let cost = Cost::start(bench.pid).await;
    let (mut wr, mut rx, mut stream_window, mut conn_window) = stalled_stream(&bench).await;
    let message = frame(DATA, 0, 1, &support::wire::frame(0x82, &[7; 16_376], true));
    let size = message.len() as i64 - 9;
    let (mut sent, mut last_grant) = (0, Instant::now());
    let mut grant = |f: &Frame, stream_window: &mut i64, conn_window: &mut i64| {
        match (f.kind, f.stream) {
            (WINDOW_UPDATE, 0) => *conn_window += i64::from(f.code()),
            (WINDOW_UPDATE, 1) => *stream_window += i64::from(f.code()),
            (DATA | RST_STREAM | GOAWAY, _) => panic!("the stream ended while flooding: {f:?}"),
            _ => return,
        }
        last_grant = Instant::now();
    };
    loop {
        while let Ok(f) = rx.try_recv() {
            grant(&f, &mut stream_window, &mut conn_window);
        }
        if stream_window >= size && conn_window >= size {
            wr.write_all(&message).await.unwrap();
            (stream_window, conn_window, sent) =
                (stream_window - size, conn_window - size, sent + size);
            // What the kernel's buffers towards the upstream can take (4 MiB to send and
            // 32 MiB to receive at most, here) and the windows: past that, the gate would
            // be buffering.
            assert!(sent < 40 * MIB as i64, "the windows never closed");
            continue;
        }
        // No window: wait for the gate to grant more.
        match next_frame(&mut rx, Duration::from_millis(1500), |_| true).await {
            Some(f) => grant(&f, &mut stream_window, &mut conn_window),
            None => break,
        }
    }
    let rss_stalled = rss_kib(bench.pid);
    let fresh = bench.fresh_echoes().await;
    // The gate gives up on the upstream `write_seconds` after its last write to it: a close
    // frame on the stream.
    let close = next_frame(&mut rx, Duration::from_secs(10), |f| {
        f.stream == 1 && matches!(f.kind, DATA | RST_STREAM)
    })
    .await
    .expect("the stream was never closed");
    let closed_after = last_grant.elapsed();
    assert_eq!(close.kind, DATA, "{close:?}");
    assert_eq!(close.payload[0], 0x88, "not a close frame: {close:?}");
    let code = u16::from_be_bytes([close.payload[2], close.payload[3]]);

    // A client that ignores flow control.
    let (mut wr2, mut rx2, window2, _) = stalled_stream(&bench).await;
    let burst = message.repeat(32);
    let flooded = flood(&mut wr2, &burst, 64 * MIB).await;
    let answer2 = next_frame(&mut rx2, DEADLINE, |f| {
        matches!(f.kind, RST_STREAM | GOAWAY)
    })
    .await
    .expect("a flow-control error");
    let cost = cost.end().await;
    eprintln!(
        "DATA flood on a stalled upstream: {} KiB accepted before the windows closed (RSS then {rss_stalled} KiB); closed with {code} {closed_after:?} after the last window granted; ignoring a {} KiB window: {} KiB written, then {:?}, answered {} {}",
        sent / 1024,
        window2 / 1024,
        flooded.written / 1024,
        flooded.end,
        if answer2.kind == GOAWAY { "GOAWAY" } else { "RST_STREAM" },
        answer2.code(),
    );
    assert_eq!(code, 1014);
    assert!(
        closed_after > Duration::from_secs(2) && closed_after < Duration::from_secs(5),
        "closed {closed_after:?} after the last window granted"
    );
    assert_eq!(answer2.code(), FLOW_CONTROL_ERROR, "{answer2:?}");
    // A frame past the connection's window is a connection error: GOAWAY ends the flood. A
    // frame that breaks only the stream's window (when the gate had just credited the
    // connection's) resets the stream alone; h2 then reads and drops that stream's DATA,
    // crediting the connection window back, so the flood may be written whole, at no
    // memory cost to the gate (checked below).
    if answer2.kind == GOAWAY {
        assert!(flooded.written < 64 * MIB, "{flooded:?}");
    }
    let row = "DATA flood on a stalled upstream";
    assert_unharmed(row, healthy, fresh, &cost, CLOSED_QUICKLY).await;
}

/// Streams whose upstreams have stopped reading cannot starve their siblings: four such
/// streams on one connection take every byte of window the gate grants them, and a fifth
/// stream on the same connection still has window to send on and echoes. (With a
/// connection window smaller than the streams' windows together, the four used it up and
/// the fifth could send nothing, not even a pong.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_leave_their_siblings_room_to_send() {
    let bench = Bench::start(LIMITS, false).await;
    let (mut wr, mut rx, stream_window, mut conn_window) = settled(&bench).await;
    let stalled = [1u32, 3, 5, 7];
    let mut windows = std::collections::HashMap::new();
    for &id in stalled.iter().chain([9].iter()) {
        wr.write_all(&frame(HEADERS, END_HEADERS, id, &bench.connect_block()))
            .await
            .unwrap();
        assert_eq!(answer(&mut rx, id).await, Answer::Status(200));
        windows.insert(id, stream_window);
    }
    for &id in &stalled {
        let stall = support::wire::frame(0x81, b"stall", true);
        wr.write_all(&frame(DATA, 0, id, &stall)).await.unwrap();
        conn_window -= stall.len() as i64;
        *windows.get_mut(&id).unwrap() -= stall.len() as i64;
    }
    let payload = support::wire::frame(0x82, &[7; 16_376], true);
    let size = payload.len() as i64;
    let mut sent = 0i64;
    let grant =
        |f: &Frame, windows: &mut std::collections::HashMap<u32, i64>, conn: &mut i64| match (
            f.kind, f.stream,
        ) {
            (WINDOW_UPDATE, 0) => *conn += i64::from(f.code()),
            (WINDOW_UPDATE, id) => *windows.entry(id).or_default() += i64::from(f.code()),
            (RST_STREAM | GOAWAY, _) => panic!("a stream ended while flooding: {f:?}"),
            _ => {}
        };
    // Flood the four stalled streams, keeping to flow control, until the gate grants no
    // more window for 1.5 s.
    loop {
        while let Ok(f) = rx.try_recv() {
            grant(&f, &mut windows, &mut conn_window);
        }
        let ready = stalled
            .iter()
            .copied()
            .find(|id| windows[id] >= size && conn_window >= size);
        if let Some(id) = ready {
            wr.write_all(&frame(DATA, 0, id, &payload)).await.unwrap();
            *windows.get_mut(&id).unwrap() -= size;
            conn_window -= size;
            sent += size;
            assert!(sent < 160 * MIB as i64, "the windows never closed");
            continue;
        }
        match next_frame(&mut rx, Duration::from_millis(1500), |_| true).await {
            Some(f) => grant(&f, &mut windows, &mut conn_window),
            None => break,
        }
    }
    // The fifth stream can still send, and its upstream answers.
    let hello = support::wire::frame(0x81, b"still here", true);
    assert!(
        conn_window >= hello.len() as i64,
        "{} KiB sent on the stalled streams left the connection {conn_window} bytes of window",
        sent / 1024
    );
    wr.write_all(&frame(DATA, 0, 9, &hello)).await.unwrap();
    let echo = next_frame(&mut rx, DEADLINE, |f| f.kind == DATA && f.stream == 9)
        .await
        .expect("the fifth stream's echo");
    assert_eq!(&echo.payload[..], b"\x81\x0astill here", "{echo:?}");
    eprintln!(
        "{} KiB taken by four stalled streams; {conn_window} bytes of connection window left",
        sent / 1024
    );
}

// ---------------------------------------------------------------------------------------
// Rapid reset, paced

/// A rapid reset paced slower than h2 counts: each stream is reset only once the gate has
/// begun answering it (admitted, its upstream dialled, the upstream's answer awaited), so
/// h2's count of streams reset before they were accepted never grows. The gate counts the
/// streams its client cancelled: past 100, GOAWAY and the connection is closed; the upstream
/// is dialled about 100 times, not once per pair the client cares to send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_rapid_reset_gets_goaway_after_100_cancelled_streams() {
    use std::sync::atomic::AtomicUsize;
    let upstream = Upstream::start().await;
    // An upstream that accepts and never answers: every stream waits on it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let dialled = Arc::new(AtomicUsize::new(0));
    let holder = {
        let dialled = dialled.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                dialled.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\n  origin: {{allow_missing: true}}\n  rate: {{upgrades_per_second: 100000, burst: 100000, max_connections_per_ip: 100000}}\nroutes:\n  - path: /ws\n  - path: /hang\n    upstream: ws://{silent_addr}\n",
            upstream.url()
        ),
    )
    .unwrap();
    let gate = Proc::start(&policy, &[]);
    let (mut rx, mut wr, _) = h2raw::opened(gate.addr, None).await;
    let block = connect_block(false, &format!("localhost:{}", gate.addr.port()), "/hang");
    let (mut pairs, mut goaway) = (0u32, None);
    for i in 0..300u32 {
        while let Ok(f) = rx.try_recv() {
            if f.kind == GOAWAY {
                goaway = Some(f);
            }
        }
        if goaway.is_some() {
            break;
        }
        let id = 2 * i + 1;
        wr.write_all(&frame(HEADERS, END_HEADERS, id, &block))
            .await
            .unwrap();
        // Reset once the gate is answering it: its upstream has been dialled.
        let deadline = Instant::now() + Duration::from_secs(2);
        while dialled.load(Ordering::SeqCst) <= i as usize && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        wr.write_all(&rst_stream(id, CANCEL)).await.unwrap();
        pairs += 1;
    }
    let goaway = match goaway {
        Some(f) => f,
        None => next_frame(&mut rx, DEADLINE, |f| f.kind == GOAWAY)
            .await
            .expect("no GOAWAY after 300 cancelled streams"),
    };
    // The connection ends: nothing is left open on it.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while rx.recv().await.is_some() {}
    })
    .await;
    let dialled = dialled.load(Ordering::SeqCst);
    eprintln!(
        "paced rapid reset: {pairs} pairs sent, GOAWAY {goaway:?}, the upstream dialled {dialled} times"
    );
    assert!(ended.is_ok(), "the connection stayed open after its GOAWAY");
    assert!(pairs <= 110, "{pairs} pairs before the GOAWAY");
    assert!(dialled <= 110, "the upstream was dialled {dialled} times");
    holder.abort();
}

/// The drain over HTTP/2: once the last WebSocket stream of a connection has finished its
/// close handshake, the connection is closed within the lingering close's 2 s of its
/// GOAWAY, also when the client sends nothing more (not even the answer to the GOAWAY's
/// PING, which a graceful HTTP/2 shutdown otherwise waits for), and the process exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_drained_connection_whose_client_falls_silent_is_closed_within_the_linger() {
    let mut bench = Bench::start(LIMITS, false).await;
    let (rd, mut wr) = bench.raw().await;
    let mut rx = frames(rd);
    wr.write_all(&frame(HEADERS, END_HEADERS, 1, &bench.connect_block()))
        .await
        .unwrap();
    assert_eq!(answers(&mut rx, &[1]).await, [Answer::Status(200)]);
    echo_streams(&mut wr, &mut rx, &[1]).await;
    let Child::Plain(gate) = &mut bench.child else {
        unreachable!("an h2c bench")
    };
    gate.signal("TERM");
    let close = next_frame(&mut rx, DEADLINE, |f| f.kind == DATA && f.stream == 1)
        .await
        .expect("a close frame on the stream");
    assert_eq!(close.payload.first(), Some(&0x88), "{close:?}");
    let answer = support::wire::frame(0x88, &1001u16.to_be_bytes(), true);
    wr.write_all(&frame(DATA, 0, 1, &answer)).await.unwrap();
    let answered = Instant::now();
    let closed = closed_after(&mut rx, Duration::from_secs(10)).await;
    let took = answered.elapsed();
    assert!(closed.ended, "{closed:?}");
    assert!(closed.goaway.is_some(), "{closed:?}");
    assert!(
        took < Duration::from_millis(3500),
        "closed {took:?} after the close handshake"
    );
    let (code, _) = gate.exited(Duration::from_secs(5)).await;
    assert_eq!(code, 0);
}
