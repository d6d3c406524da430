//! The echo upstream (`serve`) and the simple loads: `echo`, `connect`, `hold` and `big`
//! of `benches/run.py`, and the Autobahn testee client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use crate::dial::{ws_config, Dialer};
use crate::h2::{H2End, Opener};
use crate::measure::{
    close, count, cpu_ticks, cpu_window, histogram, latency, record, round_trip, rss_kib, timed,
    RssPeak,
};
use crate::Target;

// ----- the echo upstream -----------------------------------------------------------

/// The echo upstream: tungstenite's, or with `deflate` the reflecting one that accepts
/// permessage-deflate (see `deflate`).
pub(crate) async fn serve(listen: SocketAddr, deflate: bool) -> Result<Value, String> {
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
        if deflate {
            tokio::spawn(crate::deflate::reflector(tcp));
            continue;
        }
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

// ----- echo ------------------------------------------------------------------------

pub(crate) struct Tally {
    pub(crate) histogram: Histogram<u64>,
    pub(crate) done: u64,
    /// Payload bytes on the wire, where they differ from the messages' (compressed).
    pub(crate) wire: u64,
    pub(crate) errors: BTreeMap<&'static str, u64>,
}

impl Tally {
    pub(crate) fn new() -> Tally {
        Tally {
            histogram: histogram(),
            done: 0,
            wire: 0,
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.histogram.add(&other.histogram);
        self.done += other.done;
        self.wire += other.wire;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
    }

    /// The tallies of `tasks`, merged once each has finished.
    pub(crate) async fn sum(tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Result<Tally, String> {
        let mut total = Tally::new();
        for task in tasks {
            total.merge(task.await.map_err(|e| e.to_string())?);
        }
        Ok(total)
    }
}

/// With `h2` (a number of connections), the C WebSockets are streams over that many
/// HTTP/2 connections (stream i on connection i mod N) instead of C connections.
pub(crate) async fn echo(
    target: Target,
    connections: usize,
    size: usize,
    seconds: Duration,
    warmup: Duration,
    h2: Option<(usize, H2End)>,
    pid: Option<u32>,
) -> Result<Value, String> {
    let opener = Arc::new(Opener::new(&target, (size + 16).clamp(4096, 256 * 1024), h2).await?);
    let payload = Bytes::from(vec![b'x'; size]);
    let mut conns = Vec::with_capacity(connections);
    for i in 0..connections {
        conns.push(
            opener
                .open(i)
                .await
                .map_err(|kind| format!("echo: connection {i}: {kind}"))?,
        );
    }
    let start = Instant::now() + warmup;
    let end = start + seconds;
    let cpu = cpu_window(pid, start, end);
    let mut tasks = Vec::with_capacity(connections);
    for mut ws in conns {
        let payload = payload.clone();
        let opener = opener.clone();
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
            opener.close(ws).await;
            tally
        }));
    }
    let total = Tally::sum(tasks).await?;
    let cpu = cpu.await.map_err(|e| e.to_string())?;
    let s = seconds.as_secs_f64();
    Ok(json!({
        "mode": "echo",
        "connections": connections,
        "h2_connections": opener.h2_connections(),
        "size": size,
        "seconds": s,
        "messages": total.done,
        "messages_per_s": total.done as f64 / s,
        "mb_per_s": (total.done as f64 * size as f64) / s / 1e6,
        "latency": latency(&total.histogram),
        "load_cpu_percent_of_core": cpu["load_cpu_percent_of_core"],
        "target_cpu_percent_of_core": cpu["target_cpu_percent_of_core"],
        "errors": total.errors,
    }))
}

// ----- connect ---------------------------------------------------------------------

/// With `h2` (a number of connections, opened before the load), each upgrade is an
/// extended CONNECT on a new stream of one of them (worker w's on connection w mod N), and
/// the time is to its 200.
pub(crate) async fn connect(
    target: Target,
    workers: usize,
    seconds: Duration,
    warmup: Duration,
    h2: Option<(usize, H2End)>,
    pid: Option<u32>,
) -> Result<Value, String> {
    let opener = Arc::new(Opener::new(&target, 4096, h2).await?);
    let payload = Bytes::from_static(b"x");
    let start = Instant::now() + warmup;
    let end = start + seconds;
    let cpu = cpu_window(pid, start, end);
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let dialer = opener.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut i = w;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                // Timed to the 101 (the 200 over HTTP/2); one message each way then proves
                // the relay works.
                let outcome = match dialer.open(i).await {
                    Ok(mut ws) => {
                        let to_101 = t.elapsed();
                        match round_trip(&mut ws, &payload).await {
                            Ok(()) => {
                                dialer.close(ws).await;
                                Ok(to_101)
                            }
                            Err(kind) => Err(kind),
                        }
                    }
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
    let total = Tally::sum(tasks).await?;
    let cpu = cpu.await.map_err(|e| e.to_string())?;
    let s = seconds.as_secs_f64();
    Ok(json!({
        "mode": "connect",
        "connections": workers,
        "h2_connections": opener.h2_connections(),
        "tls": opener.tls(),
        "seconds": s,
        "upgrades": total.done,
        "upgrades_per_s": total.done as f64 / s,
        "latency": latency(&total.histogram),
        "load_cpu_percent_of_core": cpu["load_cpu_percent_of_core"],
        "target_cpu_percent_of_core": cpu["target_cpu_percent_of_core"],
        "errors": total.errors,
    }))
}

// ----- hold ------------------------------------------------------------------------

/// With `deflate` (the size of a message), each connection negotiates permessage-deflate
/// and echoes one compressed message of that size before it idles, so that whatever a
/// target keeps per compressed connection once it has carried a message is counted.
pub(crate) async fn hold(
    target: Target,
    connections: usize,
    seconds: Duration,
    pid: Option<u32>,
    deflate: Option<usize>,
) -> Result<Value, String> {
    // Idle connections never carry more than pings: a small read buffer keeps the
    // load generator itself at a few KiB per connection.
    let dialer = Dialer::new(&target, 1024)?;
    let messages = deflate
        .map(|size| crate::deflate::messages(size, crate::deflate::DISTINCT))
        .transpose()?;
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
                let messages = messages.clone();
                let attempt = tokio::spawn(async move {
                    // Reading answers the proxy's pings; returns when the connection ends.
                    if let Some(messages) = messages {
                        let mut c = crate::deflate::open(&dialer, i, 4096).await?;
                        let m = &messages[i % messages.len()];
                        crate::deflate::round_trip(&mut c, m, &mut Vec::new()).await?;
                        return Ok(tokio::spawn(crate::deflate::idle(c)));
                    }
                    let mut ws = dialer.open(i).await?;
                    Ok(tokio::spawn(async move {
                        while let Some(Ok(_)) = ws.next().await {}
                    }))
                });
                if tx.send(attempt).await.is_err() {
                    return;
                }
            }
        })
    };
    let opening = Instant::now();
    while let Some(attempt) = rx.recv().await {
        match attempt.await {
            Ok(Ok(reader)) => readers.push(reader),
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
        "deflate": deflate.is_some(),
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

// ----- big -------------------------------------------------------------------------

/// One connection sends `messages` messages of `size` bytes, one at a time, each timed
/// until its echo is read; the RSS of --pid is sampled during each round trip. A proxy
/// that streams frames grows by its buffers; one that holds whole messages grows by the
/// message once for every buffer that holds it.
pub(crate) async fn big(
    target: Target,
    size: usize,
    messages: usize,
    pid: Option<u32>,
) -> Result<Value, String> {
    let dialer = Dialer::new(&target, 256 * 1024)?;
    let mut ws = dialer
        .open(0)
        .await
        .map_err(|kind| format!("big: {kind}"))?;
    let payload = Bytes::from(vec![b'x'; size]);
    let mut errors = BTreeMap::new();
    let mut growth = Vec::with_capacity(messages);
    let mut round_trips = Vec::with_capacity(messages);
    let mut rss_before = None;
    for _ in 0..messages {
        // The target settles after the upgrade or the previous echo (its writes drain,
        // its buffers are freed) before its RSS is taken as this message's baseline.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = pid.and_then(rss_kib);
        rss_before = rss_before.or(before);
        let peak = pid.map(RssPeak::start);
        let t = Instant::now();
        let outcome = round_trip(&mut ws, &payload).await;
        let elapsed = t.elapsed();
        let peak = peak.and_then(RssPeak::stop);
        if let Err(kind) = outcome {
            count(&mut errors, kind);
            break;
        }
        round_trips.push(elapsed.as_secs_f64());
        if let (Some(b), Some(p)) = (before, peak) {
            growth.push(p.saturating_sub(b));
        }
    }
    if errors.is_empty() {
        close(ws).await;
    }
    let seconds: f64 = round_trips.iter().sum();
    Ok(json!({
        "mode": "big",
        "size": size,
        "messages": round_trips.len(),
        "round_trip_ms": round_trips.iter().map(|s| s * 1000.0).collect::<Vec<_>>(),
        // Message bytes (one way) over the time of their round trips.
        "mb_per_s": (seconds > 0.0).then(|| round_trips.len() as f64 * size as f64 / seconds / 1e6),
        "rss_before_kib": rss_before,
        "rss_growth_per_message_kib": growth,
        // The first message usually costs the most: what a target allocates for it, its
        // allocator may keep for the next.
        "rss_growth_kib": growth.iter().max(),
        "errors": errors,
    }))
}

// ----- autobahn ----------------------------------------------------------------------

/// Autobahn's fuzzing server sends up to 16 MiB messages and counts on the testee to
/// echo them as they come; each case gets this long.
const CASE: Duration = Duration::from_secs(60);

pub(crate) async fn autobahn(target: Target, agent: &str) -> Result<Value, String> {
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
