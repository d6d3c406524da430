//! Shared helpers: timeouts, a round trip and a polite close, latency histograms and
//! error counts, /proc readings, randomness, bulk opening, and raw-socket I/O and frames.

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::Message;

use crate::dial::{Dialer, Ws};
use crate::fail;

/// Every step of a connection (TCP, TLS, upgrade, one echo, close) gets this long.
pub(crate) const STEP: Duration = Duration::from_secs(10);

pub(crate) async fn timed<F: std::future::Future>(f: F) -> Option<F::Output> {
    tokio::time::timeout(STEP, f).await.ok()
}

/// Sends one message and waits for the next data message back.
pub(crate) async fn round_trip(ws: &mut Ws, payload: &Bytes) -> Result<(), &'static str> {
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
pub(crate) async fn close(mut ws: Ws) {
    let _ = timed(async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

pub(crate) fn histogram() -> Histogram<u64> {
    // Microseconds, 1 us ..= 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|e| fail(e.to_string()))
}

pub(crate) fn record(h: &mut Histogram<u64>, elapsed: Duration) {
    h.saturating_record(elapsed.as_micros().clamp(1, u64::MAX as u128) as u64);
}

pub(crate) fn latency(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

pub(crate) fn count(errors: &mut BTreeMap<&'static str, u64>, kind: &'static str) {
    *errors.entry(kind).or_default() += 1;
}

pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A `/proc/PID/status` field given in kB, such as "VmRSS:".
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The peak RSS of a process over a window: sampled every 2 ms on a thread of its own,
/// because the load's one runtime thread can be busy with a large message for longer
/// than that.
pub(crate) struct RssPeak {
    pid: u32,
    hwm_before: Option<u64>,
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<Option<u64>>,
}

impl RssPeak {
    pub(crate) fn start(pid: u32) -> RssPeak {
        let hwm_before = status_kib(pid, "VmHWM:");
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = rss_kib(pid);
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(2));
                    peak = peak.max(rss_kib(pid));
                }
                peak
            })
        };
        RssPeak {
            pid,
            hwm_before,
            stop,
            sampler,
        }
    }

    /// Ends the window. VmHWM is the process's lifetime peak, so it says nothing about
    /// the window unless it rose during it; then it also catches a peak shorter than the
    /// sampling period.
    pub(crate) fn stop(self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let sampled = self.sampler.join().ok().flatten();
        let hwm_after = status_kib(self.pid, "VmHWM:");
        match (self.hwm_before, hwm_after) {
            (Some(before), Some(after)) if after > before => sampled.max(Some(after)),
            _ => sampled,
        }
    }
}

/// The CPU used over the measured window [start, end], as percentages of one core: by this
/// load generator (a load that saturates its own CPU measures itself, not the target) and
/// by --pid's process. Read when the returned task ends (at `end`).
pub(crate) fn cpu_window(
    pid: Option<u32>,
    start: Instant,
    end: Instant,
) -> tokio::task::JoinHandle<Value> {
    tokio::spawn(async move {
        let me = std::process::id();
        tokio::time::sleep_until(start.into()).await;
        let before = (cpu_ticks(me), pid.and_then(cpu_ticks));
        tokio::time::sleep_until(end.into()).await;
        let after = (cpu_ticks(me), pid.and_then(cpu_ticks));
        let seconds = end.saturating_duration_since(start).as_secs_f64().max(0.01);
        // Ticks are 1/100 s (USER_HZ): ticks per second are percent of a core.
        let percent = |b: Option<u64>, a: Option<u64>| -> Option<f64> {
            Some(a?.saturating_sub(b?) as f64 / seconds)
        };
        json!({
            "load_cpu_percent_of_core": percent(before.0, after.0),
            "target_cpu_percent_of_core": percent(before.1, after.1),
        })
    })
}

pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

// ----- shared by the soak-script modes ------------------------------------------------

pub(crate) type Counts = BTreeMap<String, u64>;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// xorshift64*: reproducible, dependency-free randomness for the traffic mixes.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
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

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// Opens N connections, 64 at a time, in order; failures are counted by kind.
pub(crate) async fn open_many(
    dialer: &Arc<Dialer>,
    n: usize,
) -> (Vec<Ws>, BTreeMap<&'static str, u64>) {
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
pub(crate) async fn write_all<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    mut buf: &[u8],
) -> io::Result<()> {
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
pub(crate) async fn read_some<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(&mut *buf);
        Pin::new(&mut *r)
            .poll_read(cx, &mut rb)
            .map_ok(|()| rb.filled().len())
    })
    .await
}

/// Reads and ignores bytes until the peer closes (true) or `end` comes (false).
pub(crate) async fn wait_closed<R: AsyncRead + Unpin + ?Sized>(r: &mut R, end: Instant) -> bool {
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
pub(crate) async fn read_status<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<u16, &'static str> {
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
pub(crate) fn client_frame(
    first: u8,
    payload: &[u8],
    declared: Option<u64>,
    masked: bool,
) -> Vec<u8> {
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

pub(crate) fn close_frame() -> Vec<u8> {
    client_frame(0x88, &1000u16.to_be_bytes(), None, true)
}
