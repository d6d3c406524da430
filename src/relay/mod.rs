//! After the upgrade: relay messages between the client and the upstream, one task and
//! one `select!` loop per connection, and close both sides with the right codes.
//!
//! Backpressure: a direction reads its source only while its destination accepts writes,
//! so at most one message plus the (small) write buffer is held per direction. Size limits
//! are tungstenite's, enforced on the frame header before the payload is allocated.

pub mod frame;

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use tokio::sync::watch;

use crate::admission::{self, Standing};
use crate::head::Prefixed;
use crate::linger;
use crate::metrics::{ConnectionMetrics, MessageCounters, Metrics};
use crate::policy::{Messages, Mode, PolicyHandle, Route};
use crate::upstream::{UpstreamSocket, UpstreamStream};

pub type Ws = WebSocketStream<Counted<Leg>>;

/// The socket under a leg. hyper hands the client's socket over after the 101 as a boxed
/// `Upgraded`; it is taken back out (`downcast`) so that every read and write on the
/// client leg is a direct call, not two layers of dynamic dispatch.
pub enum Leg {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A stream of another type (none today): left as hyper gave it.
    Upgraded(TokioIo<Upgraded>),
    Upstream(UpstreamStream),
}

impl Leg {
    /// The client's socket and the bytes read past the request head (by hyper, and any
    /// the listener's head reader read that hyper did not take).
    fn client(upgraded: Upgraded) -> (Leg, Vec<u8>) {
        let read_ahead = |read_buf: &[u8], unread: &[u8]| [read_buf, unread].concat();
        let upgraded = match upgraded.downcast::<TokioIo<Prefixed<TcpStream>>>() {
            Ok(parts) => {
                let (unread, io) = parts.io.into_inner().into_parts();
                return (Leg::Tcp(io), read_ahead(&parts.read_buf, &unread));
            }
            Err(upgraded) => upgraded,
        };
        type Tls = tokio_rustls::server::TlsStream<TcpStream>;
        match upgraded.downcast::<TokioIo<Prefixed<Tls>>>() {
            Ok(parts) => {
                let (unread, io) = parts.io.into_inner().into_parts();
                (Leg::Tls(Box::new(io)), read_ahead(&parts.read_buf, &unread))
            }
            Err(upgraded) => (Leg::Upgraded(TokioIo::new(upgraded)), Vec::new()),
        }
    }
}

impl AsyncRead for Leg {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Leg::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            Leg::Tls(io) => Pin::new(io).poll_read(cx, buf),
            Leg::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
            Leg::Upstream(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Leg {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Leg::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            Leg::Tls(io) => Pin::new(io).poll_write(cx, buf),
            Leg::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
            Leg::Upstream(io) => Pin::new(io).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Leg::Tcp(io) => Pin::new(io).poll_flush(cx),
            Leg::Tls(io) => Pin::new(io).poll_flush(cx),
            Leg::Upgraded(io) => Pin::new(io).poll_flush(cx),
            Leg::Upstream(io) => Pin::new(io).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Leg::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            Leg::Tls(io) => Pin::new(io).poll_shutdown(cx),
            Leg::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
            Leg::Upstream(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// A leg's socket, counting the bytes the peer has accepted, so that the write deadline
/// measures "accepts no bytes" and not "has not caught up".
pub struct Counted<T> {
    io: T,
    written: u64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            this.written += n as u64;
        }
        result
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The read buffer of each leg, allocated (and zero-filled) up front by tungstenite, and
/// also the most one read call takes. Measured with 4,000 idle connections and echo
/// loads (benches/run.py): 8 KiB cost 22 KiB of RSS per proxied connection, 4 KiB 14 KiB,
/// 2 KiB 10 KiB and 1 KiB 8 KiB, while 1 MiB echo fell from 424 to 383, 319 and 222 MB/s
/// and 1 KiB also halved 64-byte echo. 4 KiB is the knee.
pub const READ_BUFFER_BYTES: usize = 4 * 1024;

/// Frames are written out once this much is buffered (and at every flush).
pub const WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// 1014 "Bad Gateway" (RFC 6455 §7.4.1 registry): the upstream failed.
const UPSTREAM_UNAVAILABLE: CloseCode = CloseCode::Bad(1014);

/// The close frame tungstenite substitutes (and replies with) for a close code that may
/// not be sent.
const INVALID_CODE_REPLY: &str = "Protocol violation";

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
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(WRITE_BUFFER_BYTES + max_message + FRAME_OVERHEAD)
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
    /// The client answered no heartbeat ping (nor sent anything) within the timeout.
    HeartbeatTimeout,
    /// No text or binary message either way for `idle_seconds`.
    IdleTimeout,
    /// `max_lifetime_seconds` reached.
    MaxLifetime,
    /// The token's `exp` (plus leeway) passed, with `close_on_expiry`.
    TokenExpired,
    /// The client sent messages (pings and pongs included) faster than
    /// `messages.per_second`/`burst` allow.
    RateExceeded,
    /// The client sent a message type the route does not allow.
    TypeNotAllowed,
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
    /// Our close frame is already sent: wait for the peer's close reply.
    AwaitReply,
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
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::RateExceeded => "message_rate_exceeded",
            CloseReason::TypeNotAllowed => "message_type_not_allowed",
            CloseReason::Shutdown => "shutdown",
        }
    }

    /// The close codes sent to (client, upstream); `None` where that side is dropped
    /// without a close frame (or, for a relayed close without a code, gets none).
    pub fn codes(&self) -> (Option<u16>, Option<u16>) {
        let code = |e: Ending| match e {
            Ending::Close(frame) => frame.map(|f| u16::from(f.code)),
            Ending::CloseAndDrop(f) => Some(u16::from(f.code)),
            Ending::Reply | Ending::Drop | Ending::AwaitReply => None,
        };
        let (client, upstream) = self.endings();
        let relayed = |by| match self {
            CloseReason::Closed { by: b, frame } if *b == by => {
                frame.as_ref().map(|f| u16::from(f.code))
            }
            _ => None,
        };
        // A side that closed first gets its own code echoed in the reply.
        (
            code(client).or(relayed(Side::Client)),
            code(upstream).or(relayed(Side::Upstream)),
        )
    }

    /// Which side caused the end: `client`, `upstream`, or `gate` (timers, policy,
    /// shutdown).
    pub fn side(&self) -> &'static str {
        match self {
            CloseReason::Closed { by, .. }
            | CloseReason::TooBig(by)
            | CloseReason::Protocol(by, _)
            | CloseReason::Lost(by)
            | CloseReason::Stalled(by) => by.as_str(),
            CloseReason::HeartbeatTimeout
            | CloseReason::RateExceeded
            | CloseReason::TypeNotAllowed => "client",
            CloseReason::IdleTimeout
            | CloseReason::MaxLifetime
            | CloseReason::TokenExpired
            | CloseReason::PolicyChanged
            | CloseReason::Shutdown => "gate",
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
            // A dead client gets its close without waiting for an answer.
            CloseReason::HeartbeatTimeout => (
                Ending::CloseAndDrop(frame(CloseCode::Away, "heartbeat timeout")),
                going_away(),
            ),
            CloseReason::IdleTimeout => (
                Ending::Close(Some(frame(CloseCode::Away, "idle timeout"))),
                Ending::Close(Some(frame(CloseCode::Away, "idle timeout"))),
            ),
            CloseReason::MaxLifetime => (
                Ending::Close(Some(frame(CloseCode::Away, "max lifetime"))),
                Ending::Close(Some(frame(CloseCode::Away, "max lifetime"))),
            ),
            CloseReason::TokenExpired => (
                Ending::Close(Some(frame(CloseCode::Policy, "token expired"))),
                going_away(),
            ),
            // A client that broke the message policy, like one that broke the protocol,
            // is not waited on: a flooder would keep the gate reading its flood until the
            // write deadline (a ping flood at 12 M frames/s did, in soak.py's attack).
            CloseReason::RateExceeded => (
                Ending::CloseAndDrop(frame(CloseCode::Policy, "message rate exceeded")),
                going_away(),
            ),
            CloseReason::TypeNotAllowed => (
                Ending::CloseAndDrop(frame(CloseCode::Policy, "message type not allowed")),
                going_away(),
            ),
            CloseReason::Shutdown => (
                Ending::Close(Some(frame(CloseCode::Away, "going away"))),
                Ending::Close(Some(frame(CloseCode::Away, "going away"))),
            ),
        }
    }

    /// The side that broke the protocol or a size limit, if that is why the relay ended.
    fn violator(&self) -> Option<Side> {
        match self {
            CloseReason::Protocol(side, _) | CloseReason::TooBig(side) => Some(*side),
            _ => None,
        }
    }

    /// A close frame read from `by`. One with a code that may not be sent (RFC 6455
    /// §7.4.1/§7.4.2: below 1000, 1004-1006, 1014-2999 as tungstenite reads the registry)
    /// reaches us as tungstenite's substitute, 1002 "Protocol violation", which it has
    /// already queued as its reply: that is the side's protocol error, not a close to
    /// relay (the other side gets 1001 or 1014, not a 1002 that would blame it).
    fn closed(by: Side, frame: Option<CloseFrame>) -> CloseReason {
        match &frame {
            Some(f) if f.code == CloseCode::Protocol && f.reason.as_str() == INVALID_CODE_REPLY => {
                CloseReason::Protocol(by, CloseCode::Protocol)
            }
            _ => CloseReason::Closed { by, frame },
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

/// What the client may send (client → upstream only): message types and a token bucket.
struct Inbound {
    allow_text: bool,
    allow_binary: bool,
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    /// In report mode violations are counted and the message is relayed.
    report: bool,
    violations: u64,
    /// For the report-mode log line and counter.
    route: Arc<Route>,
    metrics: Arc<Metrics>,
    client_ip: std::net::IpAddr,
}

impl Inbound {
    fn new(
        route: Arc<Route>,
        metrics: Arc<Metrics>,
        client_ip: std::net::IpAddr,
        report: bool,
        now: Instant,
    ) -> Inbound {
        let m = &route.messages;
        Inbound {
            allow_text: m.allow_text,
            allow_binary: m.allow_binary,
            rate: m.per_second,
            burst: f64::from(m.burst),
            tokens: f64::from(m.burst),
            refilled: now,
            report,
            violations: 0,
            route: route.clone(),
            metrics,
            client_ip,
        }
    }

    /// `None` when the message may go on (or report mode lets it), else why not.
    fn check(&mut self, msg: &Message, now: Instant) -> Option<CloseReason> {
        let allowed = match msg {
            Message::Text(_) => self.allow_text,
            Message::Binary(_) => self.allow_binary,
            // Pings and pongs are always allowed, but each takes a token: a ping costs
            // the gate a pong, and an unmetered flood of them starves every other
            // connection on the same thread.
            _ => true,
        };
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let violation = if !allowed {
            Some(CloseReason::TypeNotAllowed)
        } else if self.tokens < 1.0 {
            Some(CloseReason::RateExceeded)
        } else {
            self.tokens -= 1.0;
            None
        };
        let violation = violation?;
        if !self.report {
            return Some(violation);
        }
        self.violations += 1;
        self.metrics
            .report_violation(&self.route.name, violation.label());
        if self.violations == 1 {
            // Once per connection: a flood in report mode must not flood the log.
            tracing::warn!(
                route = %self.route.name,
                client_ip = %self.client_ip,
                reason = violation.label(),
                "report mode: this message would have closed the connection"
            );
        }
        None
    }
}

/// One direction of the relay: a message read from the source, waiting for the
/// destination to accept it, and whether the destination needs a flush.
struct Direction {
    pending: Option<Message>,
    needs_flush: bool,
    /// When the destination last refused bytes and has accepted none since.
    stalled_since: Option<Instant>,
    /// The destination's byte count when the stall began (or last made progress).
    stall_written: u64,
    /// How many times the destination has started refusing bytes (heartbeat liveness:
    /// a client the gate had to wait for, and that took bytes since, is reading).
    stalls: u64,
    counts: Counts,
    /// Frames of any kind read from the source (heartbeat liveness).
    frames: u64,
    /// When the last text or binary message was read from the source (idle timeout).
    last_data: Instant,
    /// The client's message policy, on the client → upstream direction only.
    inbound: Option<Inbound>,
    /// When the source last sent a pong (heartbeat round trip).
    last_pong: Option<Instant>,
    metrics: MessageCounters,
}

enum Event {
    End(CloseReason),
    /// A destination just started refusing bytes: arm the write deadline.
    Stalled,
}

impl Direction {
    fn new(now: Instant, inbound: Option<Inbound>, metrics: MessageCounters) -> Direction {
        Direction {
            pending: None,
            needs_flush: false,
            stalled_since: None,
            stall_written: 0,
            stalls: 0,
            counts: Counts::default(),
            frames: 0,
            last_data: now,
            inbound,
            last_pong: None,
            metrics,
        }
    }

    /// The client's message policy applied to one message (always `None` upstream).
    fn admit(&mut self, msg: &Message, now: Instant) -> Option<CloseReason> {
        self.inbound.as_mut()?.check(msg, now)
    }

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
                        return self.stall(dst);
                    }
                }
            }
            match Pin::new(&mut *src).poll_next(cx) {
                Poll::Ready(Some(Ok(msg))) => {
                    self.frames += 1;
                    if let Message::Close(frame) = msg {
                        return Poll::Ready(Event::End(CloseReason::closed(from, frame)));
                    }
                    // Everything else the client sends, pings and pongs included, takes a
                    // token from its message rate.
                    let now = Instant::now();
                    if let Some(reason) = self.admit(&msg, now) {
                        return Poll::Ready(Event::End(reason));
                    }
                    match msg {
                        Message::Text(_) | Message::Binary(_) => {
                            self.last_data = now;
                            self.counts.messages += 1;
                            self.counts.bytes += msg.len() as u64;
                            self.metrics.count(msg.len());
                            self.pending = Some(msg);
                        }
                        Message::Pong(_) => self.last_pong = Some(now),
                        // Pings are answered by tungstenite itself (it keeps at most one
                        // pong queued).
                        Message::Ping(_) | Message::Frame(_) | Message::Close(_) => {}
                    }
                }
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
                Poll::Pending => return self.stall(dst),
            }
        } else if self.pending.is_none() {
            self.stalled_since = None;
        }
        Poll::Pending
    }

    fn stall(&mut self, dst: &Ws) -> Poll<Event> {
        if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
            self.stall_written = dst.get_ref().written;
            self.stalls += 1;
            return Poll::Ready(Event::Stalled);
        }
        Poll::Pending
    }

    /// A stalled destination that accepted some bytes since is not stalled for long: its
    /// write deadline starts again from `now`.
    fn note_progress(&mut self, dst: &Ws, now: Instant) {
        if self.stalled_since.is_some() && dst.get_ref().written != self.stall_written {
            self.stall_written = dst.get_ref().written;
            self.stalled_since = Some(now);
        }
    }
}

/// The heartbeat towards the client.
#[derive(Debug, Clone, Copy)]
enum Heartbeat {
    /// Send the next ping at this time.
    PingAt(Instant),
    /// A ping went out (or was due, if the client was taking no bytes) at `sent`; by then
    /// `frames` client frames had been read and writes to the client had stalled `stalls`
    /// times.
    Awaiting {
        sent: Instant,
        frames: u64,
        stalls: u64,
    },
}

/// Every deadline a connection has; one `Sleep` is set to the earliest of them.
struct Deadlines {
    write: Duration,
    idle: Duration,
    lifetime_end: Option<Instant>,
    expires_at: Option<Instant>,
    heartbeat: Heartbeat,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    ping_rtt: prometheus_client::metrics::histogram::Histogram,
}

impl Deadlines {
    fn next(&self, c2u: &Direction, u2c: &Direction) -> Instant {
        let mut next = c2u.last_data.max(u2c.last_data) + self.idle;
        for t in [self.lifetime_end, self.expires_at].into_iter().flatten() {
            next = next.min(t);
        }
        next = next.min(match self.heartbeat {
            Heartbeat::PingAt(t) => t,
            Heartbeat::Awaiting { sent, .. } => sent + self.heartbeat_timeout,
        });
        for since in [c2u.stalled_since, u2c.stalled_since].into_iter().flatten() {
            next = next.min(since + self.write);
        }
        next
    }

    /// What is due at `now`: a reason to close, or `None` (maybe after sending a ping).
    fn due(
        &mut self,
        now: Instant,
        client: &mut Ws,
        upstream: &Ws,
        c2u: &mut Direction,
        u2c: &mut Direction,
    ) -> Option<CloseReason> {
        c2u.note_progress(upstream, now);
        u2c.note_progress(client, now);
        let expired = |d: &Direction| d.stalled_since.is_some_and(|s| now >= s + self.write);
        if expired(c2u) {
            return Some(CloseReason::Stalled(Side::Upstream));
        }
        if expired(u2c) {
            return Some(CloseReason::Stalled(Side::Client));
        }
        if self.expires_at.is_some_and(|t| now >= t) {
            return Some(CloseReason::TokenExpired);
        }
        if self.lifetime_end.is_some_and(|t| now >= t) {
            return Some(CloseReason::MaxLifetime);
        }
        if now >= c2u.last_data.max(u2c.last_data) + self.idle {
            return Some(CloseReason::IdleTimeout);
        }
        match self.heartbeat {
            Heartbeat::Awaiting {
                sent,
                frames,
                stalls,
            } if now >= sent + self.heartbeat_timeout => {
                // While the upstream takes nothing the gate reads nothing from the client,
                // so its pong may be waiting unread: the write deadline judges that case.
                let upstream_behind = c2u.stalled_since.is_some();
                // A client behind on what the gate sends it reads the ping (or gets it)
                // only after the backlog: if writes to it stalled since the ping, it either
                // took bytes since (it is reading, however slowly) or is stalled now, and
                // the write deadline judges it. Bytes the kernel takes into a buffer that
                // never filled prove nothing, so they do not count.
                let client_behind = u2c.stalled_since.is_some() || u2c.stalls != stalls;
                if c2u.frames == frames && !upstream_behind && !client_behind {
                    return Some(CloseReason::HeartbeatTimeout);
                }
                if let Some(rtt) = c2u.last_pong.filter(|p| *p >= sent).map(|p| p - sent) {
                    self.ping_rtt.observe(rtt.as_secs_f64());
                }
                self.heartbeat = Heartbeat::PingAt((sent + self.heartbeat_interval).max(now));
            }
            Heartbeat::PingAt(t) if now >= t => {
                // Queue the ping only if the client takes bytes now; a client that does
                // not is the write deadline's to drop.
                let ready = Pin::new(&mut *client).poll_ready(&mut Context::from_waker(
                    futures_util::task::noop_waker_ref(),
                ));
                match ready {
                    Poll::Ready(Ok(())) => {
                        if Pin::new(&mut *client)
                            .start_send(Message::Ping(Default::default()))
                            .is_err()
                        {
                            return Some(CloseReason::Lost(Side::Client));
                        }
                        u2c.needs_flush = true;
                    }
                    Poll::Ready(Err(_)) => return Some(CloseReason::Lost(Side::Client)),
                    Poll::Pending => {}
                }
                self.heartbeat = Heartbeat::Awaiting {
                    sent: now,
                    frames: c2u.frames,
                    stalls: u2c.stalls,
                };
            }
            _ => {}
        }
        None
    }
}

/// The outcome of one relayed connection, for the close log line and metrics.
#[derive(Debug)]
pub struct Outcome {
    pub reason: CloseReason,
    pub client_to_upstream: Counts,
    pub upstream_to_client: Counts,
    pub duration: Duration,
    /// Client messages let through in report mode that would otherwise have closed it.
    pub report_violations: u64,
}

/// What the relay knows about its connection beyond the route.
pub struct Connection {
    /// This connection's counters (resolved once; then only atomics per message).
    pub metrics: ConnectionMetrics,
    pub registry: Arc<Metrics>,
    pub policy: PolicyHandle,
    /// Wakes the relay when a new policy is swapped in.
    pub changes: watch::Receiver<u64>,
    /// What it was admitted with, re-checked against each new policy.
    pub standing: Standing,
    /// When the token expires (`exp` + leeway), if the route closes on expiry.
    pub expires_at: Option<Instant>,
    /// `mode: report` when it was admitted.
    pub report: bool,
}

/// Relay between the two legs until one ends, then close both as SPEC §4 says. The legs
/// come back for their lingering close, which the caller awaits after logging the close.
pub async fn run(
    client: Upgraded,
    upstream: UpstreamSocket,
    route: Arc<Route>,
    shutdown: CancellationToken,
    conn: Connection,
) -> (Outcome, Ended) {
    let started = Instant::now();
    let (client, read_ahead) = Leg::client(client);
    let mut client = WebSocketStream::from_partially_read(
        Counted {
            io: client,
            written: 0,
        },
        read_ahead,
        Role::Server,
        Some(client_config(&route.messages)),
    )
    .await;
    let mut upstream = WebSocketStream::from_partially_read(
        Counted {
            io: Leg::Upstream(upstream.io),
            written: 0,
        },
        upstream.read_ahead,
        Role::Client,
        Some(upstream_config(&route.messages)),
    )
    .await;
    let t = &route.timeouts;
    let inbound = Inbound::new(
        route.clone(),
        conn.registry.clone(),
        conn.standing.client_ip,
        conn.report,
        started,
    );
    let mut c2u = Direction::new(
        started,
        Some(inbound),
        conn.metrics.client_to_upstream.clone(),
    );
    let mut u2c = Direction::new(started, None, conn.metrics.upstream_to_client.clone());
    let mut deadlines = Deadlines {
        write: t.write,
        idle: t.idle,
        lifetime_end: t.max_lifetime.map(|l| started + l),
        expires_at: conn.expires_at,
        heartbeat: Heartbeat::PingAt(started + route.heartbeat.interval),
        heartbeat_interval: route.heartbeat.interval,
        heartbeat_timeout: route.heartbeat.timeout,
        ping_rtt: conn.metrics.ping_rtt.clone(),
    };
    // The one timer of this connection, always set to the earliest deadline.
    let timer = sleep_until(deadlines.next(&c2u, &u2c));
    tokio::pin!(timer);

    // Both waits live as long as the loop: re-creating them per message would register
    // and unregister a waiter (under the channel's and the token's locks) every time.
    let mut policy_change = Box::pin(next_change(conn.changes));
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut watching_policy = true;
    let reason = loop {
        tokio::select! {
            event = poll_fn(|cx| {
                if let Poll::Ready(e) = c2u.poll(&mut client, &mut upstream, Side::Client, Side::Upstream, cx) {
                    return Poll::Ready(e);
                }
                u2c.poll(&mut upstream, &mut client, Side::Upstream, Side::Client, cx)
            }) => match event {
                Event::End(reason) => break reason,
                Event::Stalled => timer.as_mut().reset(deadlines.next(&c2u, &u2c)),
            },
            () = &mut timer => {
                if let Some(reason) = deadlines.due(Instant::now(), &mut client, &upstream, &mut c2u, &mut u2c) {
                    break reason;
                }
                timer.as_mut().reset(deadlines.next(&c2u, &u2c));
            },
            (changed, changes) = &mut policy_change, if watching_policy => {
                if changed.is_err() {
                    watching_policy = false;
                    continue;
                }
                policy_change.set(next_change(changes));
                let loaded = conn.policy.load();
                if let Err(why) = admission::recheck(&loaded.policy, &conn.standing) {
                    let (route, ip) = (&route.name, conn.standing.client_ip);
                    if loaded.policy.mode == Mode::Report {
                        tracing::warn!(route = %route, client_ip = %ip, reason = why.reason(), "report mode: the new policy would close this connection");
                    } else {
                        tracing::info!(route = %route, client_ip = %ip, reason = why.reason(), "the new policy no longer admits this connection");
                        break CloseReason::PolicyChanged;
                    }
                }
            },
            () = &mut cancelled => break CloseReason::Shutdown,
        }
    };

    let (mut to_client, mut to_upstream) = reason.endings();
    let deadline = Instant::now() + t.write;
    // A violator's peer is closed first, and what it had already sent is still delivered
    // to the violator: the messages it sent before the bad frame arrived get their answers
    // (as from an endpoint that had answered them before reading the bad frame).
    match reason.violator() {
        Some(Side::Client) => {
            let unsent = c2u.pending.take();
            to_upstream = drain(
                &mut upstream,
                &mut client,
                &mut u2c,
                to_upstream,
                unsent,
                Side::Upstream,
                deadline,
            )
            .await;
        }
        Some(Side::Upstream) => {
            let unsent = u2c.pending.take();
            to_client = drain(
                &mut client,
                &mut upstream,
                &mut c2u,
                to_client,
                unsent,
                Side::Client,
                deadline,
            )
            .await;
        }
        None => {}
    }
    let (linger_client, linger_upstream) = tokio::join!(
        end(&mut client, to_client, deadline),
        end(&mut upstream, to_upstream, deadline)
    );
    let duration = started.elapsed();
    conn.metrics.closed(reason.label(), duration.as_secs_f64());
    let outcome = Outcome {
        reason,
        client_to_upstream: c2u.counts,
        upstream_to_client: u2c.counts,
        duration,
        report_violations: c2u.inbound.map_or(0, |i| i.violations),
    };
    let ended = Ended {
        client: (client, linger_client),
        upstream: (upstream, linger_upstream),
    };
    (outcome, ended)
}

/// How a leg's socket is let go once its close frames are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    /// Lost or stalled: dropped at once, without a close frame.
    Drop,
    /// The close handshake completed, so the peer sends nothing more: TLS close_notify
    /// and FIN, then the socket goes.
    Shutdown,
    /// Our close frame may still be unread behind the peer's input: close_notify and FIN,
    /// then input is discarded until the peer closes ([`linger::close`]).
    Linger,
}

/// The two legs of a relay that has ended, each with how it is let go.
pub struct Ended {
    client: (Ws, Finish),
    upstream: (Ws, Finish),
}

impl Ended {
    /// Let both legs go (see [`Finish`]), within the linger bounds; the sockets are
    /// dropped afterwards.
    pub async fn linger(self) {
        let deadline = Instant::now() + linger::LINGER_TIME;
        let side = |(mut ws, finish): (Ws, Finish)| async move {
            match finish {
                Finish::Drop => {}
                Finish::Shutdown => linger::shutdown(ws.get_mut(), deadline).await,
                Finish::Linger => linger::close(ws.get_mut(), deadline).await,
            }
        };
        tokio::join!(side(self.client), side(self.upstream));
    }
}
/// The next policy change, owning its receiver so that the wait can outlive one turn of
/// the relay loop; the receiver comes back for the wait after.
async fn next_change(
    mut changes: watch::Receiver<u64>,
) -> (Result<(), watch::error::RecvError>, watch::Receiver<u64>) {
    let changed = changes.changed().await;
    (changed, changes)
}

/// How long a violator's peer gets to answer our close before the violator is failed.
const DRAIN: Duration = Duration::from_secs(1);

/// Close `peer` (the side that did nothing wrong) with `ending`, relaying what it still
/// sends to `violator` (through `direction`, with every check) until its close reply,
/// for at most [`DRAIN`]. Returns what is left to do with `peer`.
async fn drain(
    peer: &mut Ws,
    violator: &mut Ws,
    direction: &mut Direction,
    ending: Ending,
    unsent: Option<Message>,
    from: Side,
    deadline: Instant,
) -> Ending {
    let Ending::Close(frame) = ending else {
        return ending;
    };
    let to = match from {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    };
    let mut sent = false;
    let replied = timeout_at(deadline.min(Instant::now() + DRAIN), async {
        if let Some(msg) = unsent {
            peer.feed(msg).await.ok()?;
        }
        peer.close(frame.clone()).await.ok()?;
        sent = true;
        loop {
            match poll_fn(|cx| direction.poll(peer, violator, from, to, cx)).await {
                Event::Stalled => continue,
                Event::End(CloseReason::Closed { by, .. }) if by == from => return Some(()),
                Event::End(_) => return None,
            }
        }
    })
    .await;
    match (sent, replied) {
        (false, _) => Ending::Close(frame),
        (true, Ok(Some(()))) => Ending::Reply,
        (true, _) => Ending::AwaitReply,
    }
}

/// End one side of a relay, never past `deadline`; returns how its socket is let go.
/// Closing TCP is our job afterwards: as the server of the client leg, once the
/// handshake is complete.
async fn end(ws: &mut Ws, ending: Ending, deadline: Instant) -> Finish {
    let finished = timeout_at(deadline, async {
        match ending {
            Ending::Close(frame) => {
                if ws.close(frame).await.is_ok() && await_close_reply(ws).await {
                    return Finish::Shutdown;
                }
                Finish::Linger
            }
            // tungstenite queued the reply when it read the peer's close; send it.
            Ending::Reply => {
                let _ = ws.flush().await;
                Finish::Shutdown
            }
            Ending::CloseAndDrop(frame) => {
                // A side whose close frame broke the protocol already has tungstenite's
                // 1002 reply queued (and may not be sent another close): flush that.
                if ws.close(Some(frame)).await.is_err() {
                    let _ = ws.flush().await;
                }
                Finish::Linger
            }
            Ending::AwaitReply if await_close_reply(ws).await => Finish::Shutdown,
            Ending::AwaitReply => Finish::Linger,
            Ending::Drop => Finish::Drop,
        }
    })
    .await;
    finished.unwrap_or(Finish::Linger)
}

/// Frames read (and discarded) while waiting for a close reply before the gate gives up
/// and drops the connection: a peer still flooding after our close is not worth the
/// CPU. A well-behaved peer's in-flight messages fit many times over.
const CLOSE_WAIT_FRAMES: usize = 1024;

/// Read (and discard messages already in flight) until the peer's close reply, for at
/// most [`CLOSE_WAIT_FRAMES`] frames. Returns whether the reply came.
async fn await_close_reply(ws: &mut Ws) -> bool {
    let mut frames = 0;
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_close() {
            return true;
        }
        frames += 1;
        if frames >= CLOSE_WAIT_FRAMES {
            break;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(code: u16, reason: &'static str) -> Option<CloseFrame> {
        Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        })
    }

    /// SPEC §4's close table: the codes each side gets, and who caused it.
    #[test]
    fn close_table() {
        use CloseReason::*;
        type Codes = (Option<u16>, Option<u16>);
        let rows: Vec<(CloseReason, Codes, &str)> = vec![
            (
                Closed {
                    by: Side::Client,
                    frame: close(4000, "bye"),
                },
                (Some(4000), Some(4000)),
                "client",
            ),
            (
                Closed {
                    by: Side::Upstream,
                    frame: close(4001, "done"),
                },
                (Some(4001), Some(4001)),
                "upstream",
            ),
            (TooBig(Side::Client), (Some(1009), Some(1001)), "client"),
            (TooBig(Side::Upstream), (Some(1001), Some(1009)), "upstream"),
            (
                Protocol(Side::Client, CloseCode::Invalid),
                (Some(1007), Some(1001)),
                "client",
            ),
            (Lost(Side::Upstream), (Some(1014), None), "upstream"),
            (Lost(Side::Client), (None, Some(1001)), "client"),
            (Stalled(Side::Upstream), (Some(1014), None), "upstream"),
            (Stalled(Side::Client), (None, Some(1001)), "client"),
            (RateExceeded, (Some(1008), Some(1001)), "client"),
            (TypeNotAllowed, (Some(1008), Some(1001)), "client"),
            (TokenExpired, (Some(1008), Some(1001)), "gate"),
            (IdleTimeout, (Some(1001), Some(1001)), "gate"),
            (MaxLifetime, (Some(1001), Some(1001)), "gate"),
            (HeartbeatTimeout, (Some(1001), Some(1001)), "client"),
            (PolicyChanged, (Some(1008), Some(1001)), "gate"),
            (Shutdown, (Some(1001), Some(1001)), "gate"),
        ];
        for (reason, codes, side) in rows {
            assert_eq!(reason.codes(), codes, "{reason:?}");
            assert_eq!(reason.side(), side, "{reason:?}");
            assert!(!reason.label().is_empty());
        }
    }
}
