//! The hostile-client modes of `benches/soak.py` and the healthy traffic timed around
//! them: `sessions` (alone, then under attack), `attack`, `storm` and `exhaust`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::dial::Dialer;
use crate::measure::{
    client_frame, close, close_frame, count, histogram, latency, lock, open_many, read_some,
    record, round_trip, timed, wait_closed, write_all, Counts, STEP,
};
use crate::Target;

// ----- sessions: healthy traffic, alone and then under attack -------------------------

struct SessionStats {
    alone: Histogram<u64>,
    attack: Histogram<u64>,
    dropped: u64,
    errors: BTreeMap<&'static str, u64>,
}

pub(crate) async fn sessions(
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

pub(crate) struct AttackPlan {
    pub(crate) slowloris: usize,
    pub(crate) trickle: Duration,
    pub(crate) stalled: usize,
    pub(crate) frame_bytes: u64,
    pub(crate) ping_flood: usize,
    pub(crate) ramp: Duration,
    pub(crate) seconds: Duration,
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

pub(crate) async fn attack(target: Target, plan: AttackPlan) -> Result<Value, String> {
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

pub(crate) async fn storm(
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

pub(crate) async fn exhaust(
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
