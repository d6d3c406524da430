//! HTTP/2 on the listener: one TCP (or TLS) connection carrying many streams, each a plain
//! request or an RFC 8441 WebSocket (an extended CONNECT). Each stream is handled by
//! [`crate::http::handle`] exactly as an HTTP/1.1 request is; what lives here is the
//! connection: hyper's HTTP/2 server with the limits that keep the known attacks bounded,
//! and the connection's own deadlines (first request, idle, drain).
//!
//! The limits (see the README, "HTTP/2"): streams open at once (`http2.max_concurrent_streams`),
//! a 16 KiB header list and 100 fields (as for an HTTP/1.1 head; checked by the gate, which
//! answers 431 in JSON, with h2's own limit at 64 KiB behind it), 20 streams reset by the client before
//! they were answered (rapid reset, CVE-2023-44487: past that the connection is closed
//! with ENHANCE_YOUR_CALM), 64 KiB of receive window per stream (what a client can make
//! the gate hold for a stream that is not being read) and room for all of them in the
//! connection's window (so stalled streams cannot starve their siblings), 64 KiB of send
//! buffer per stream, and keep-alive pings after 20 s without a
//! request, data or pong, to be answered within 20 s (which also ends a connection stuck
//! in a header block that never ends). h2 itself caps a header block at 5 CONTINUATION
//! frames and closes a connection whose header list passes 256 KiB; SETTINGS and PING
//! floods stall on their own acknowledgements, which h2 writes before it reads on. A
//! rapid reset paced slower than h2 counts (each stream reset once the gate is answering
//! it) is counted here: past 100 cancelled streams the connection is closed.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

use crate::http::{handle, ConnInfo, H2Stream};
use crate::linger::LINGER_TIME;
use crate::relay::Protocol;
use crate::{shutdown, Gate};

/// The header list (HPACK-decoded, as RFC 9113 counts it) h2 lets through to the gate:
/// 4 times the 16 KiB an HTTP/1.1 head may have, which the gate checks itself so that a
/// list over it gets the same JSON 431 as an HTTP/1.1 head. Past this h2 answers a bare
/// 431, and past 4 times this (h2's abuse limit) it closes the connection.
pub const PEER_HEADER_LIST: u32 = 64 * 1024;

/// Streams the client may reset before the gate has answered them, at once (hyper's
/// default, made explicit: the rapid-reset bound).
const MAX_PENDING_RESETS: usize = 20;

/// Streams the client may cancel (reset while the gate was still answering them: checking,
/// connecting upstream) over the connection's life before it is closed (GOAWAY). h2 counts only
/// the streams reset before they were accepted; a rapid reset paced just slower than that
/// would otherwise make the gate admit, and dial the upstream for, every stream it is sent,
/// for the price of two frames each (nginx closes after `keepalive_requests`, 1,000).
const MAX_CANCELLED: u64 = 100;

/// How long a connection closed for cancelling too many streams has to write its GOAWAY.
const CALM_FLUSH: Duration = Duration::from_millis(250);

/// Streams the gate may reset because of the client's errors before it closes the
/// connection (h2's default, made explicit).
const MAX_ERROR_RESETS: usize = 1024;

/// Receive window per stream: how much a client may send on a stream that the gate has not
/// read yet (nginx's `http2_body_preread_size`). The connection's window is this times
/// the streams it may have open ([`connection_window`]).
const STREAM_WINDOW: u32 = 64 * 1024;

/// The connection's receive window: room for every stream's full window, so that streams
/// whose upstreams have stopped reading (the relay then stops reading them) cannot use up
/// the window the connection's other streams need for their data and pongs. What a client
/// can make the gate hold is bounded per stream, and streams count against the
/// connection caps as HTTP/1.1 connections do (a socket's own receive buffer holds more).
fn connection_window(max_streams: u32) -> u32 {
    // RFC 9113 §6.9.1: a window is at most 2^31 - 1.
    (u64::from(max_streams.max(1)) * u64::from(STREAM_WINDOW)).min((1 << 31) - 1) as u32
}

/// Data a stream may have queued for sending beyond what the client's window admits.
const SEND_BUFFER: usize = 64 * 1024;

/// Keep-alive: a ping after this long without a frame from the client, and the connection
/// is closed if the ping is not answered within the same time.
const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// A connection with no stream open and none started for this long (checked at this
/// interval, so idle for between one and two of them) is closed with GOAWAY, as nginx's
/// `keepalive_timeout` (75 s) closes an idle HTTP/2 connection.
const IDLE_CHECK: Duration = Duration::from_secs(60);

/// How long a connection that was sent GOAWAY is given to finish before it is dropped.
const GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// hyper spawns each stream's service future (and, for a WebSocket, its send half) through
/// this: on the gate's task tracker, so the drain waits for them as for every other task.
#[derive(Clone)]
struct Spawner(TaskTracker);

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// Serve one HTTP/2 connection (after its TLS handshake chose `h2`, or after its h2c
/// preface) until it ends, is idle, or the drain closes it. `deadline`: its first request
/// must arrive by then. `opening` is the drain's hold on a connection that has not been
/// answered yet, released once its first stream is answered, or 200 ms after the listener
/// stops while it has none.
pub async fn serve<I>(
    gate: Arc<Gate>,
    io: I,
    info: ConnInfo,
    deadline: Instant,
    opening: TaskTrackerToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = gate.policy.load().policy.http2;
    // This connection's streams that are still being answered or relayed.
    let streams = TaskTracker::new();
    let started = Arc::new(AtomicU64::new(0));
    // Cancelled when a revocation closes one of its WebSockets.
    let revoked = CancellationToken::new();
    // Cancelled when the client has cancelled more than `MAX_CANCELLED` streams.
    let calm = Cancels::new();
    let opening = Arc::new(Mutex::new(Some(opening)));
    let service = {
        let gate = gate.clone();
        let streams = streams.clone();
        let started = started.clone();
        let revoked = revoked.clone();
        let calm = calm.clone();
        let opening = opening.clone();
        service_fn(move |req| {
            let first = started.fetch_add(1, Ordering::Relaxed) == 0;
            // The drain's hold, kept until the first stream is answered (as an HTTP/1.1
            // connection's first request is), so that the drain does not begin under it.
            let opened = if first {
                gate.metrics.client_connection(true);
                opening.lock().ok().and_then(|mut o| o.take())
            } else {
                None
            };
            let info = ConnInfo {
                accepted: Instant::now(),
                protocol: Protocol::H2,
                first,
                ..info
            };
            let stream = H2Stream {
                hold: streams.token(),
                revoked: revoked.clone(),
            };
            let answering = calm.answering();
            let answer = handle(gate.clone(), info, req, Some(stream));
            async move {
                let answer = answer.await;
                answering.done();
                drop(opened);
                answer
            }
        })
    };
    let conn = http2::Builder::new(Spawner(gate.shutdown.tracker().clone()))
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(PEER_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_ERROR_RESETS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window(limits.max_concurrent_streams))
        .max_send_buf_size(SEND_BUFFER)
        .keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let shutdown = gate.shutdown.token();
    let peer = info.peer;
    let ended = |result: Result<(), hyper::Error>| {
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "HTTP/2 connection ended with an error");
        }
    };
    let mut check = deadline;
    let mut seen = 0;
    let mut going_away = false;
    // The listener has stopped and a moment passed: a connection with no stream yet no
    // longer holds the drain back (the drain's GOAWAY closes it).
    let accepting = gate.shutdown.accepting();
    let stopped = async {
        accepting.cancelled().await;
        sleep(shutdown::SILENT_GRACE).await;
    };
    tokio::pin!(stopped);
    let mut silent_released = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => return ended(result),
            () = shutdown.cancelled() => break,
            () = &mut stopped, if !silent_released => {
                silent_released = true;
                drop(opening.lock().ok().and_then(|mut o| o.take()));
            }
            // A revocation closed one of its WebSockets (with 1008, like any other): GOAWAY,
            // so that the connection takes no new stream; the others finish as they go.
            () = revoked.cancelled(), if !going_away => {
                going_away = true;
                conn.as_mut().graceful_shutdown();
            }
            // As h2 treats a rapid reset it counts itself: a connection error. GOAWAY, a
            // moment to write it, and the connection is closed with its streams (a
            // client that ignores the GOAWAY's ping would keep opening streams).
            () = calm.over.cancelled() => {
                tracing::info!(%peer, cancelled = MAX_CANCELLED + 1, "HTTP/2 client cancelled too many streams: closed");
                conn.as_mut().graceful_shutdown();
                if let Ok(result) = timeout(CALM_FLUSH, conn.as_mut()).await {
                    ended(result);
                }
                return;
            }
            () = sleep_until(check) => {
                let now = started.load(Ordering::Relaxed);
                if now == 0 {
                    // No request within `handshake_seconds` of the accept.
                    tracing::debug!(%peer, "HTTP/2 connection sent no request in time");
                    return;
                }
                if now == seen && streams.is_empty() {
                    conn.as_mut().graceful_shutdown();
                    // A stream that raced the GOAWAY is served to its end (its relay and
                    // its response have deadlines of their own); an idle connection that
                    // does not close is dropped after the grace.
                    loop {
                        match timeout(GOAWAY_GRACE, conn.as_mut()).await {
                            Ok(result) => return ended(result),
                            Err(_) if streams.is_empty() => return,
                            Err(_) => {}
                        }
                    }
                }
                seen = now;
                check = Instant::now() + IDLE_CHECK;
            }
        }
    }
    // Draining: each WebSocket stream has been told to close (its relay watches the same
    // token) and finishes its close handshake over this connection, which keeps being
    // served; once they are all done, GOAWAY. A graceful HTTP/2 shutdown waits for the
    // answer to the GOAWAY's PING before it closes; a client that falls silent after its
    // close handshakes is given what an HTTP/1.1 client is after its own, the lingering
    // close's time, not the idle connection's grace. One that never opened a stream is
    // given what a silent HTTP/1.1 connection is, so that it does not hold the exit.
    streams.close();
    tokio::select! {
        result = conn.as_mut() => return ended(result),
        () = streams.wait() => {}
    }
    conn.as_mut().graceful_shutdown();
    let linger = match started.load(Ordering::Relaxed) {
        0 => shutdown::SILENT_GRACE,
        _ => LINGER_TIME,
    };
    if let Ok(result) = timeout(linger, conn.as_mut()).await {
        ended(result);
    }
}

/// A connection's count of the streams its client cancelled, and the signal once there
/// were more than [`MAX_CANCELLED`].
#[derive(Clone)]
struct Cancels {
    count: Arc<AtomicU64>,
    over: CancellationToken,
}

impl Cancels {
    fn new() -> Cancels {
        Cancels {
            count: Arc::new(AtomicU64::new(0)),
            over: CancellationToken::new(),
        }
    }

    /// Held while a stream is being answered: dropped before [`Answering::done`], the
    /// stream was cancelled (h2 drops the answer's future when the client resets it).
    fn answering(&self) -> Answering {
        Answering(Some(self.clone()))
    }
}

struct Answering(Option<Cancels>);

impl Answering {
    fn done(mut self) {
        self.0 = None;
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        if let Some(cancels) = self.0.take() {
            if cancels.count.fetch_add(1, Ordering::Relaxed) >= MAX_CANCELLED {
                cancels.over.cancel();
            }
        }
    }
}
