//! The soak: long-lived sessions with mixed-size messages, a churn of short connections,
//! and a fraction of bad frames and bad upgrades, for a long time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::dial::{Dialer, Ws};
use crate::measure::{
    client_frame, close, histogram, latency, lock, record, timed, write_all, Counts, Rng, STEP,
};
use crate::Target;

// ----- soak: sessions, churn and a little malformed traffic, for a long time ----------

pub(crate) struct SoakPlan {
    pub(crate) sessions: usize,
    pub(crate) new_per_second: f64,
    pub(crate) interval: Duration,
    pub(crate) malformed: f64,
    pub(crate) max_frame: u64,
    pub(crate) seconds: Duration,
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

pub(crate) async fn soak(target: Target, plan: SoakPlan) -> Result<Value, String> {
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
