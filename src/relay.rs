//! After the upgrade: relay messages between the client and the upstream, one task and
//! one `select!` loop per connection, and close both sides with the right codes.
//!
//! Backpressure: a direction reads its source only while its destination accepts writes,
//! so at most one message plus the (small) write buffer is held per direction. Size limits
//! are tungstenite's, enforced on the frame header before the payload is allocated.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use tokio::sync::watch;

use crate::admission::{self, Standing};
use crate::policy::{Messages, Mode, PolicyHandle, Route};

pub type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Bytes read from a socket per read call, and the write buffer target: small, because a
/// sidecar holds tens of thousands of mostly idle connections (tungstenite's default is
/// 128 KiB each way).
pub const IO_BUFFER_BYTES: usize = 8 * 1024;

/// 1014 "Bad Gateway" (RFC 6455 §7.4.1 registry): the upstream failed.
const UPSTREAM_UNAVAILABLE: CloseCode = CloseCode::Bad(1014);

/// Room for a frame header on top of a maximal message in the write buffer.
const FRAME_OVERHEAD: usize = 14;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

/// The WebSocket settings of the client leg: frame and message limits from the policy.
pub fn client_config(m: &Messages) -> WebSocketConfig {
    leg_config(m.max_frame_bytes, m.max_message_bytes)
}

/// The upstream leg: `max_message_bytes` applies both ways; `max_frame_bytes` is for
/// client frames only.
pub fn upstream_config(m: &Messages) -> WebSocketConfig {
    leg_config(m.max_message_bytes, m.max_message_bytes)
}

fn leg_config(max_frame: usize, max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(IO_BUFFER_BYTES)
        .write_buffer_size(IO_BUFFER_BYTES)
        .max_write_buffer_size(IO_BUFFER_BYTES + max_message + FRAME_OVERHEAD)
        .max_frame_size(Some(max_frame))
        .max_message_size(Some(max_message))
}

/// Why a relayed connection ended: one variant per row of SPEC §4's close table. Feeds the
/// close frames sent to each side, the close log line and the metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// A side sent a close frame; it is relayed to the other side.
    Closed { by: Side, frame: Option<CloseFrame> },
    /// A frame or message above the limit (1009 to the sender, 1001 to the other side).
    TooBig(Side),
    /// A protocol violation (1002) or invalid UTF-8 (1007) from that side.
    Protocol(Side, CloseCode),
    /// The side's TCP connection ended without a close frame.
    Lost(Side),
    /// The side accepted no bytes for `write_seconds`; it is dropped.
    Stalled(Side),
    /// A reloaded policy no longer admits the connection (IP, Origin or claims).
    PolicyChanged,
    /// The gate is shutting down.
    Shutdown,
}

/// What to do with one side when the relay ends.
#[derive(Debug)]
enum Ending {
    /// Send this close frame and wait for the peer's close reply.
    Close(Option<CloseFrame>),
    /// The peer closed first: flush our reply and wait for the end of the stream.
    Reply,
    /// Send this close frame, then drop the connection without waiting.
    CloseAndDrop(CloseFrame),
    /// Drop the TCP connection at once.
    Drop,
}

fn frame(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

impl CloseReason {
    /// The label of `wsgate_closes_total{reason}`.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::Closed {
                by: Side::Client, ..
            } => "client_closed",
            CloseReason::Closed {
                by: Side::Upstream, ..
            } => "upstream_closed",
            CloseReason::TooBig(Side::Client) => "client_message_too_big",
            CloseReason::TooBig(Side::Upstream) => "upstream_message_too_big",
            CloseReason::Protocol(Side::Client, _) => "client_protocol_error",
            CloseReason::Protocol(Side::Upstream, _) => "upstream_protocol_error",
            CloseReason::Lost(Side::Client) => "client_lost",
            CloseReason::Lost(Side::Upstream) => "upstream_lost",
            CloseReason::Stalled(Side::Client) => "client_write_timeout",
            CloseReason::Stalled(Side::Upstream) => "upstream_write_timeout",
            CloseReason::PolicyChanged => "policy_changed",
            CloseReason::Shutdown => "shutdown",
        }
    }

    /// How each side is ended: (client, upstream).
    fn endings(&self) -> (Ending, Ending) {
        let going_away = || Ending::Close(Some(frame(CloseCode::Away, "")));
        let unavailable =
            || Ending::Close(Some(frame(UPSTREAM_UNAVAILABLE, "upstream unavailable")));
        match self {
            CloseReason::Closed {
                by: Side::Client,
                frame,
            } => (Ending::Reply, Ending::Close(frame.clone())),
            CloseReason::Closed {
                by: Side::Upstream,
                frame,
            } => (Ending::Close(frame.clone()), Ending::Reply),
            CloseReason::TooBig(Side::Client) => (
                Ending::CloseAndDrop(frame(CloseCode::Size, "message too big")),
                going_away(),
            ),
            CloseReason::TooBig(Side::Upstream) => (
                going_away(),
                Ending::CloseAndDrop(frame(CloseCode::Size, "message too big")),
            ),
            CloseReason::Protocol(Side::Client, code) => (
                Ending::CloseAndDrop(frame(*code, "protocol error")),
                going_away(),
            ),
            CloseReason::Protocol(Side::Upstream, code) => (
                unavailable(),
                Ending::CloseAndDrop(frame(*code, "protocol error")),
            ),
            CloseReason::Lost(Side::Client) => (Ending::Drop, going_away()),
            CloseReason::Lost(Side::Upstream) => (unavailable(), Ending::Drop),
            CloseReason::Stalled(Side::Client) => (Ending::Drop, going_away()),
            CloseReason::Stalled(Side::Upstream) => (unavailable(), Ending::Drop),
            CloseReason::PolicyChanged => (
                Ending::Close(Some(frame(CloseCode::Policy, "policy changed"))),
                going_away(),
            ),
            CloseReason::Shutdown => (
                Ending::Close(Some(frame(CloseCode::Away, "going away"))),
                Ending::Close(Some(frame(CloseCode::Away, "going away"))),
            ),
        }
    }

    /// Classify an error read from (or written to) `side`.
    fn from_error(side: Side, error: &WsError) -> CloseReason {
        match error {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => CloseReason::TooBig(side),
            WsError::Capacity(_) => CloseReason::Protocol(side, CloseCode::Protocol),
            WsError::Utf8(_) => CloseReason::Protocol(side, CloseCode::Invalid),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
            | WsError::Io(_)
            | WsError::ConnectionClosed
            | WsError::AlreadyClosed => CloseReason::Lost(side),
            WsError::Protocol(_) => CloseReason::Protocol(side, CloseCode::Protocol),
            _ => CloseReason::Lost(side),
        }
    }
}

/// Messages and bytes relayed in one direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub messages: u64,
    pub bytes: u64,
}

/// One direction of the relay: a message read from the source, waiting for the
/// destination to accept it, and whether the destination needs a flush.
#[derive(Default)]
struct Direction {
    pending: Option<Message>,
    needs_flush: bool,
    /// When the destination last refused bytes and has not caught up since.
    stalled_since: Option<Instant>,
    counts: Counts,
}

enum Event {
    End(CloseReason),
    /// A destination just started refusing bytes: arm the write deadline.
    Stalled,
}

impl Direction {
    /// Move messages from `src` to `dst` until one of them would block.
    fn poll(
        &mut self,
        src: &mut Ws,
        dst: &mut Ws,
        from: Side,
        to: Side,
        cx: &mut Context<'_>,
    ) -> Poll<Event> {
        loop {
            if let Some(msg) = self.pending.take() {
                match Pin::new(&mut *dst).poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        if let Err(e) = Pin::new(&mut *dst).start_send(msg) {
                            return Poll::Ready(Event::End(CloseReason::from_error(to, &e)));
                        }
                        self.needs_flush = true;
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Event::End(CloseReason::from_error(to, &e)))
                    }
                    Poll::Pending => {
                        self.pending = Some(msg);
                        return self.stall();
                    }
                }
            }
            match Pin::new(&mut *src).poll_next(cx) {
                Poll::Ready(Some(Ok(msg))) => match msg {
                    Message::Text(_) | Message::Binary(_) => {
                        self.counts.messages += 1;
                        self.counts.bytes += msg.len() as u64;
                        self.pending = Some(msg);
                    }
                    Message::Close(frame) => {
                        return Poll::Ready(Event::End(CloseReason::Closed { by: from, frame }));
                    }
                    // Pings are answered by tungstenite itself; pongs end here.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                },
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Event::End(CloseReason::from_error(from, &e)))
                }
                Poll::Ready(None) => return Poll::Ready(Event::End(CloseReason::Lost(from))),
                Poll::Pending => break,
            }
        }
        if self.needs_flush {
            match Pin::new(&mut *dst).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.needs_flush = false;
                    self.stalled_since = None;
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Event::End(CloseReason::from_error(to, &e)))
                }
                Poll::Pending => return self.stall(),
            }
        } else if self.pending.is_none() {
            self.stalled_since = None;
        }
        Poll::Pending
    }

    fn stall(&mut self) -> Poll<Event> {
        if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
            return Poll::Ready(Event::Stalled);
        }
        Poll::Pending
    }
}

/// The outcome of one relayed connection, for the close log line and metrics.
#[derive(Debug)]
pub struct Outcome {
    pub reason: CloseReason,
    pub client_to_upstream: Counts,
    pub upstream_to_client: Counts,
    pub duration: Duration,
}

/// What the relay needs to apply a reloaded policy to its connection.
pub struct Recheck {
    pub policy: PolicyHandle,
    pub changes: watch::Receiver<u64>,
    pub standing: Standing,
}

/// Relay between the two legs until one ends, then close both as SPEC §4 says.
pub async fn run(
    client: TokioIo<Upgraded>,
    upstream: TokioIo<Upgraded>,
    route: Arc<Route>,
    shutdown: CancellationToken,
    mut recheck: Recheck,
) -> Outcome {
    let started = Instant::now();
    let mut client = WebSocketStream::from_raw_socket(
        client,
        Role::Server,
        Some(client_config(&route.messages)),
    )
    .await;
    let mut upstream = WebSocketStream::from_raw_socket(
        upstream,
        Role::Client,
        Some(upstream_config(&route.messages)),
    )
    .await;
    let write_timeout = route.timeouts.write;

    let mut c2u = Direction::default();
    let mut u2c = Direction::default();
    let write_deadline = sleep_until(started + write_timeout);
    tokio::pin!(write_deadline);

    let mut watching_policy = true;
    let reason = loop {
        let stalled = c2u.stalled_since.is_some() || u2c.stalled_since.is_some();
        tokio::select! {
            event = poll_fn(|cx| {
                if let Poll::Ready(e) = c2u.poll(&mut client, &mut upstream, Side::Client, Side::Upstream, cx) {
                    return Poll::Ready(e);
                }
                u2c.poll(&mut upstream, &mut client, Side::Upstream, Side::Client, cx)
            }) => match event {
                Event::End(reason) => break reason,
                Event::Stalled => {
                    let oldest = [c2u.stalled_since, u2c.stalled_since].into_iter().flatten().min();
                    if let Some(since) = oldest {
                        write_deadline.as_mut().reset(since + write_timeout);
                    }
                }
            },
            () = &mut write_deadline, if stalled => {
                let now = Instant::now();
                let expired = |d: &Direction| d.stalled_since.is_some_and(|s| now >= s + write_timeout);
                if expired(&c2u) {
                    break CloseReason::Stalled(Side::Upstream);
                }
                if expired(&u2c) {
                    break CloseReason::Stalled(Side::Client);
                }
                let oldest = [c2u.stalled_since, u2c.stalled_since].into_iter().flatten().min();
                write_deadline.as_mut().reset(oldest.unwrap_or(now) + write_timeout);
            },
            changed = recheck.changes.changed(), if watching_policy => {
                if changed.is_err() {
                    watching_policy = false;
                    continue;
                }
                let loaded = recheck.policy.load();
                if let Err(why) = admission::recheck(&loaded.policy, &recheck.standing) {
                    if loaded.policy.mode == Mode::Report {
                        tracing::warn!(reason = why.reason(), "report mode: the new policy would close this connection");
                    } else {
                        tracing::info!(reason = why.reason(), "the new policy no longer admits this connection");
                        break CloseReason::PolicyChanged;
                    }
                }
            },
            () = shutdown.cancelled() => break CloseReason::Shutdown,
        }
    };

    let (to_client, to_upstream) = reason.endings();
    let deadline = Instant::now() + write_timeout;
    tokio::join!(
        end(&mut client, to_client, deadline),
        end(&mut upstream, to_upstream, deadline)
    );
    Outcome {
        reason,
        client_to_upstream: c2u.counts,
        upstream_to_client: u2c.counts,
        duration: started.elapsed(),
    }
}

/// End one side of a relay, never past `deadline`. Dropping the socket afterwards closes
/// TCP: as the server of the client leg that is our job once the handshake is complete.
async fn end(ws: &mut Ws, ending: Ending, deadline: Instant) {
    let _ = timeout_at(deadline, async {
        match ending {
            Ending::Close(frame) => {
                if ws.close(frame).await.is_ok() {
                    await_close_reply(ws).await;
                }
            }
            // tungstenite queued the reply when it read the peer's close; send it.
            Ending::Reply => {
                let _ = ws.flush().await;
            }
            Ending::CloseAndDrop(frame) => {
                let _ = ws.close(Some(frame)).await;
            }
            Ending::Drop => {}
        }
    })
    .await;
}

/// Read (and discard messages already in flight) until the peer's close reply.
async fn await_close_reply(ws: &mut Ws) {
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_close() {
            break;
        }
    }
}
