//! After the upgrade: relay frames between the client and the upstream, one task and one
//! `select!` loop per connection, and close both sides with the right codes.
//!
//! Read in this order: [`frame`] (the codec: headers, masks, UTF-8, close payloads, the
//! message rules, over byte slices), [`leg`] (a socket, what is owed to it, and the frames
//! read from it), this file's [`Direction`] (one read relayed: frames checked and
//! forwarded as they arrive), [`inbound`] (the client's message policy), [`deadlines`]
//! (the one timer), and [`close`] (why a connection ended and what each side is sent).
//!
//! Frames are forwarded cut-through: each read's data frames go on as they came (client
//! frames stay masked with the client's key; upstream frames go to the client unmasked, as
//! they came), checked on the way — limits from the header before anything of the frame
//! leaves, UTF-8 of text chunk by chunk — and control frames are answered or acted on by
//! the gate. Backpressure: a direction reads its source only once its destination has
//! taken everything relayed so far, so at most one read (32 KiB) is held per direction,
//! and only while the destination is behind.

mod checked;
mod close;
mod deadlines;
pub mod frame;
mod inbound;
pub mod inflate;
mod leg;
mod quiet;

use std::future::{poll_fn, Future};
use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;

use tokio::sync::watch;
use tokio::time::{sleep_until, timeout_at, Instant};

pub use close::{CloseFrame, CloseReason, Side};

use crate::admission::{self, Standing};
use crate::linger;
use crate::metrics::{ConnectionMetrics, MessageCounters, Metrics};
use crate::policy::{Mode, PolicyHandle, Route};
use crate::registry::{Entry, LiveCounts};
use crate::shutdown::Stop;
use crate::upstream::UpstreamSocket;
use close::Ending;
use deadlines::{Deadlines, Heartbeat};
use frame::{parse_close, ClosePayload, Control, OpCode, Reader, Step, Violation, MAX_HEADER};
use inbound::{Inbound, Kind};
use leg::{with_scratch, Leg};
pub use leg::{Client, Io};

/// Messages and bytes relayed in one direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub messages: u64,
    pub bytes: u64,
    /// Inflated bytes of compressed messages (`bytes` counts them as they crossed).
    pub inflated: u64,
}

/// One direction of the relay: what it has relayed, when, and whether its destination is
/// keeping up.
pub(crate) struct Direction {
    from: Side,
    /// When the destination last refused bytes and has accepted none since.
    stalled_since: Option<Instant>,
    /// The destination's byte count when the stall began (or last made progress).
    stall_written: u64,
    /// How many times the destination has started refusing bytes (heartbeat liveness:
    /// a client the gate had to wait for, and that took bytes since, is reading).
    stalls: u64,
    counts: Counts,
    /// Frames of any kind read from the source, and pieces of a data frame's payload
    /// (heartbeat liveness: a client sending a large frame cannot pong until its end,
    /// and its bytes arriving prove it alive).
    frames: u64,
    /// When text or binary bytes last passed (idle timeout).
    last_data: Instant,
    /// The client's message policy, on the client → upstream direction only.
    inbound: Option<Box<Inbound>>,
    /// When the source last sent a pong (heartbeat round trip).
    last_pong: Option<Instant>,
    /// A pong was read that the heartbeat has not looked at yet.
    pong_unseen: bool,
    /// The stall is the destination's flush (a TLS connection's buffered records): nothing
    /// more is read from the source, nor counted as taken, until it completes.
    flush_stalled: bool,
    metrics: MessageCounters,
    /// The connection's registry entry, where `counts` is published for the operator API.
    entry: Arc<Entry>,
}

enum Event {
    End(CloseReason),
    /// A destination just started refusing bytes: arm the write deadline.
    Stalled,
    /// The client sent a pong: the heartbeat may stop waiting before its deadline.
    Pong,
}

impl Direction {
    fn new(
        from: Side,
        now: Instant,
        inbound: Option<Box<Inbound>>,
        metrics: MessageCounters,
        entry: Arc<Entry>,
    ) -> Direction {
        Direction {
            from,
            stalled_since: None,
            stall_written: 0,
            stalls: 0,
            counts: Counts::default(),
            frames: 0,
            last_data: now,
            inbound,
            last_pong: None,
            pong_unseen: false,
            flush_stalled: false,
            metrics,
            entry,
        }
    }

    /// Relay from `src` to `dst` until one of them would block.
    fn poll(&mut self, src: &mut Leg, dst: &mut Leg, cx: &mut Context<'_>) -> Poll<Event> {
        let to = self.from.other();
        // A flush that was pending comes first: until the destination has taken what was
        // relayed, the source is not read (a TLS stream would otherwise keep taking
        // plaintext into its own buffer while its socket takes nothing, which the write
        // deadline would count as the peer's progress).
        if self.flush_stalled {
            match dst.poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.flush_stalled = false;
                    self.stalled_since = None;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Event::End(CloseReason::Lost(to))),
                Poll::Pending => return Poll::Pending,
            }
        }
        loop {
            let before = dst.written;
            let owed = dst.poll_owed(cx);
            if dst.written != before {
                self.progressed(dst);
            }
            match owed {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(Event::End(CloseReason::Lost(to))),
                Poll::Pending => return self.stall(dst),
            }
            match with_scratch(|buf| self.relay_read(src, dst, buf, cx)) {
                Poll::Ready(Some(reason)) => return Poll::Ready(Event::End(reason)),
                Poll::Ready(None) => {}
                Poll::Pending => {
                    dst.release();
                    break;
                }
            }
        }
        match dst.poll_flush(cx) {
            Poll::Ready(Ok(())) => self.stalled_since = None,
            Poll::Ready(Err(_)) => return Poll::Ready(Event::End(CloseReason::Lost(to))),
            Poll::Pending => {
                self.flush_stalled = true;
                return self.stall(dst);
            }
        }
        Poll::Pending
    }

    /// One read from `src`, its frames checked and its data frames written to `dst` in one
    /// write (what `dst` does not take stays in its backlog). Ready(Some) ends the relay;
    /// whatever came before the end in this read is still passed on.
    fn relay_read(
        &mut self,
        src: &mut Leg,
        dst: &mut Leg,
        buf: &mut [u8],
        cx: &mut Context<'_>,
    ) -> Poll<Option<CloseReason>> {
        let n = match src.poll_read_into(cx, buf) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                return Poll::Ready(Some(CloseReason::Lost(self.from)))
            }
            Poll::Ready(Ok(n)) => n,
            Poll::Pending => return Poll::Pending,
        };
        let now = Instant::now();
        let start = src.reader.uncarry(buf);
        let end = MAX_HEADER + n;
        // Data frames are compacted in place over the control frames cut out of the
        // stream (rare), so what goes on is `buf[start..w]`.
        let (mut r, mut w) = (start, start);
        // Where the data frame begun in this read starts in the output: if it breaks a
        // rule, none of it goes on.
        let mut frame_start = None;
        // Whether the bytes written so far stop inside a data frame.
        let mut open = dst.mid_frame;
        let mut ended = None;
        // Payload bytes passed on in this read, and of them the current frame's, which go
        // back if the frame breaks a rule (`wsgate_message_bytes_total` counts what
        // crosses, not what a header announced).
        let (mut payload, mut frame_payload) = (0u64, 0u64);
        while r < end {
            let step = match src.reader.next(&buf[r..end]) {
                Ok(step) => step,
                Err(violation) => {
                    ended = Some(match violation {
                        Violation::TooBig => CloseReason::TooBig(self.from),
                        other => CloseReason::Protocol(self.from, other.code()),
                    });
                    break;
                }
            };
            let len = match step {
                Step::Incomplete => {
                    src.reader.carry(&buf[r..end]);
                    break;
                }
                Step::DataHeader {
                    len,
                    header,
                    starts,
                } => {
                    if starts {
                        let kind = match header.opcode {
                            OpCode::Text => Kind::Text,
                            _ => Kind::Binary,
                        };
                        if let Some(reason) = self.admit(kind, now) {
                            ended = Some(reason);
                            break;
                        }
                        self.counts.messages += 1;
                        self.metrics.messages.inc();
                    }
                    self.frames += 1;
                    self.last_data = now;
                    frame_start = src.reader.in_data_frame().then_some(w);
                    frame_payload = 0;
                    len
                }
                Step::Payload(len) => {
                    self.frames += 1;
                    self.last_data = now;
                    payload += len as u64;
                    frame_payload += len as u64;
                    if !src.reader.in_data_frame() {
                        frame_start = None;
                    }
                    len
                }
                Step::Control(len, control) => {
                    r += len;
                    if let Some(control) = control {
                        self.frames += 1;
                        if let Some(reason) = self.control(src, &control, now, cx) {
                            ended = Some(reason);
                            break;
                        }
                    }
                    continue;
                }
            };
            // Bytes move only once a control frame has been cut out before them.
            if r != w {
                buf.copy_within(r..r + len, w);
            }
            r += len;
            w += len;
            open = src.reader.in_data_frame();
        }
        if let Some(at) = frame_start.filter(|_| ended.is_some()) {
            w = at;
            open = false;
            payload -= frame_payload;
        }
        if payload != 0 {
            self.counts.bytes += payload;
            self.metrics.bytes.inc_by(payload);
        }
        // Once per read, not per message: the operator API's view of this direction.
        self.live().publish(self.counts.messages, self.counts.bytes);
        let inflated = src.reader.inflated();
        if inflated != self.counts.inflated {
            self.metrics
                .inflated
                .inc_by(inflated - self.counts.inflated);
            self.counts.inflated = inflated;
        }
        dst.mid_frame = open;
        if w > start && dst.write(cx, &buf[start..w]).is_err() {
            return Poll::Ready(Some(ended.unwrap_or(CloseReason::Lost(self.from.other()))));
        }
        Poll::Ready(ended)
    }

    /// A control frame from the source: a close ends the relay, a ping is answered on the
    /// source's own leg, a pong is noted; pings and pongs from the client take a token.
    fn control(
        &mut self,
        src: &mut Leg,
        control: &Control,
        now: Instant,
        cx: &mut Context<'_>,
    ) -> Option<CloseReason> {
        let (opcode, payload) = (control.opcode, control.payload());
        match opcode {
            OpCode::Close => Some(match parse_close(payload) {
                Ok(ClosePayload::Empty) => CloseReason::Closed {
                    by: self.from,
                    frame: None,
                },
                Ok(ClosePayload::Code(code, reason)) => CloseReason::Closed {
                    by: self.from,
                    frame: Some(CloseFrame {
                        code,
                        reason: reason.to_owned().into(),
                    }),
                },
                Err(e) => CloseReason::Protocol(self.from, e.code()),
            }),
            OpCode::Ping | OpCode::Pong => {
                if let Some(reason) = self.admit(Kind::Control, now) {
                    return Some(reason);
                }
                if opcode == OpCode::Ping {
                    if src.answer_ping(cx, payload).is_err() {
                        return Some(CloseReason::Lost(self.from));
                    }
                } else {
                    self.last_pong = Some(now);
                    self.pong_unseen = true;
                }
                None
            }
            OpCode::Continuation | OpCode::Text | OpCode::Binary => None,
        }
    }

    /// Where this direction's counts are published: "in" is client → upstream, "out"
    /// upstream → client.
    fn live(&self) -> &LiveCounts {
        match self.from {
            Side::Client => &self.entry.inbound,
            Side::Upstream => &self.entry.outbound,
        }
    }

    /// The client's message policy applied to one message (always `None` upstream).
    fn admit(&mut self, kind: Kind, now: Instant) -> Option<CloseReason> {
        self.inbound.as_mut()?.check(kind, now)
    }

    fn stall(&mut self, dst: &Leg) -> Poll<Event> {
        if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
            self.stall_written = dst.written;
            self.stalls += 1;
            return Poll::Ready(Event::Stalled);
        }
        Poll::Pending
    }

    /// A stalled destination just accepted some bytes (and may refuse the rest): its write
    /// deadline starts again from this moment, not from whenever the deadline next looks
    /// (which would give a peer that took a few bytes right after the stall began nearly
    /// two `write_seconds`: seen over TLS, whose buffer flushes late).
    fn progressed(&mut self, dst: &Leg) {
        if self.stalled_since.is_some() {
            self.stalled_since = Some(Instant::now());
            self.stall_written = dst.written;
        }
    }

    /// A stalled destination that accepted some bytes since is not stalled for long: its
    /// write deadline starts again from `now`.
    fn note_progress(&mut self, dst: &Leg, now: Instant) {
        if self.stalled_since.is_some() && dst.written != self.stall_written {
            self.stall_written = dst.written;
            self.stalled_since = Some(now);
        }
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
    /// For the close log line: the request's id and the protocol it came on.
    pub request_id: HeaderValue,
    pub protocol: Protocol,
    /// Its entry in the gate's registry of open connections: the live counts, and the
    /// operator's close request.
    pub entry: Arc<Entry>,
}

/// The protocol a relayed connection came on (the close line's `protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// An RFC 8441 extended CONNECT stream of an HTTP/2 connection.
    H2,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1.1",
            Protocol::H2 => "h2",
        }
    }
}

/// Everything a relayed connection holds, in one allocation made at the upgrade: the
/// legs, both directions and the deadlines. The future that drives it holds only this box
/// and its waits.
struct Relay {
    client: Leg,
    upstream: Leg,
    c2u: Direction,
    u2c: Direction,
    deadlines: Deadlines,
    started: Instant,
    route: Arc<Route>,
    policy: PolicyHandle,
    standing: Standing,
    request_id: HeaderValue,
    protocol: Protocol,
    metrics: ConnectionMetrics,
    stop: Stop,
}

/// Relay between the two legs until one ends, then close both as the close table says.
/// The legs come back for their lingering close, which the caller awaits after logging
/// the close.
pub fn run(
    client: Client,
    upstream: UpstreamSocket,
    route: Arc<Route>,
    stop: Stop,
    conn: Connection,
) -> impl std::future::Future<Output = (Outcome, Ended)> + Send {
    let started = Instant::now();
    let m = &route.messages;
    let (max_frame, max_message) = (m.max_frame_bytes as u64, m.max_message_bytes as u64);
    let deflate = upstream.deflate.as_ref();
    let client = Leg::new(
        client.io,
        client.read_ahead,
        Reader::new(frame::From::Client, max_frame, max_message)
            .with_deflate(deflate.map(|d| d.client)),
    );
    // `max_message_bytes` applies both ways; `max_frame_bytes` is for client frames only.
    let upstream = Leg::new(
        Io::Upstream(upstream.io),
        upstream.read_ahead,
        Reader::new(frame::From::Server, max_message, max_message)
            .with_deflate(deflate.map(|d| d.upstream)),
    );
    let inbound = Inbound::new(
        route.clone(),
        conn.registry.clone(),
        conn.standing.client_ip,
        conn.report,
        started,
    );
    let c2u = Direction::new(
        Side::Client,
        started,
        Some(Box::new(inbound)),
        conn.metrics.client_to_upstream.clone(),
        conn.entry.clone(),
    );
    let u2c = Direction::new(
        Side::Upstream,
        started,
        None,
        conn.metrics.upstream_to_client.clone(),
        conn.entry.clone(),
    );
    let deadlines = Deadlines {
        route: route.clone(),
        lifetime_end: route.timeouts.max_lifetime.map(|l| started + l),
        expires_at: conn.expires_at,
        heartbeat: Heartbeat::ping_at(started + route.heartbeat.interval, route.heartbeat.interval),
        ping_rtt: conn.metrics.ping_rtt.clone(),
    };
    let relay = Box::new(Relay {
        client,
        upstream,
        c2u,
        u2c,
        deadlines,
        started,
        route,
        policy: conn.policy,
        standing: conn.standing,
        metrics: conn.metrics,
        request_id: conn.request_id,
        protocol: conn.protocol,
        stop,
    });
    relay.run(conn.changes)
}

impl Relay {
    async fn run(mut self: Box<Self>, changes: watch::Receiver<u64>) -> (Outcome, Ended) {
        let (reason, linger_client, linger_upstream) = self.relay(changes).await;
        let duration = self.started.elapsed();
        self.metrics.closed(reason.label(), duration.as_secs_f64());
        let outcome = Outcome {
            reason,
            client_to_upstream: self.c2u.counts,
            upstream_to_client: self.u2c.counts,
            duration,
            report_violations: self.c2u.inbound.as_ref().map_or(0, |i| i.violations),
        };
        let (client_code, upstream_code) = outcome.reason.codes();
        // A side whose close frame never went (cut off inside a frame, lost, stalled, or
        // the process stopping first) is logged without a code: none reached it.
        let client_code = client_code.filter(|_| self.client.close_sent);
        let upstream_code = upstream_code.filter(|_| self.upstream.close_sent);
        tracing::info!(
            request_id = %self.request_id.to_str().unwrap_or("-"),
            client_ip = %self.standing.client_ip, route = %self.route.name,
            reason = outcome.reason.label(), side = outcome.reason.side(),
            client_code, upstream_code,
            duration_ms = outcome.duration.as_millis() as u64,
            messages_in = outcome.client_to_upstream.messages,
            bytes_in = outcome.client_to_upstream.bytes,
            inflated_bytes_in = outcome.client_to_upstream.inflated,
            messages_out = outcome.upstream_to_client.messages,
            bytes_out = outcome.upstream_to_client.bytes,
            inflated_bytes_out = outcome.upstream_to_client.inflated,
            protocol = self.protocol.as_str(), "close"
        );
        let ended = Ended {
            relay: self,
            client: linger_client,
            upstream: linger_upstream,
        };
        (outcome, ended)
    }

    /// The relay loop, then the close of both sides: why it ended, and how each leg is let
    /// go.
    async fn relay(&mut self, changes: watch::Receiver<u64>) -> (CloseReason, Finish, Finish) {
        let Relay {
            client,
            upstream,
            c2u,
            u2c,
            deadlines,
            route,
            policy,
            standing,
            stop,
            request_id,
            ..
        } = &mut *self;
        // The one timer of this connection, always set to the earliest deadline.
        let timer = sleep_until(deadlines.next(c2u, u2c));
        tokio::pin!(timer);

        // Both waits live as long as the loop: re-creating them per message would register
        // and unregister a waiter (under the channel's and the token's locks) every time.
        let mut policy_change = Box::pin(next_change(changes));
        let cancelled = stop.drain.cancelled();
        tokio::pin!(cancelled);
        let revoked = c2u.entry.revoked().clone().cancelled_owned();
        tokio::pin!(revoked);
        let mut watching_policy = true;
        // Those three waits are polled only after one of them woke (see `quiet`).
        let quiet = quiet::Quiet::new();
        let reason = loop {
            tokio::select! {
                event = poll_fn(|cx| {
                    if let Poll::Ready(e) = c2u.poll(client, upstream, cx) {
                        return Poll::Ready(e);
                    }
                    match u2c.poll(upstream, client, cx) {
                        Poll::Pending if mem::take(&mut c2u.pong_unseen) => Poll::Ready(Event::Pong),
                        polled => polled,
                    }
                }) => match event {
                    Event::End(reason) => break reason,
                    Event::Stalled => timer.as_mut().reset(deadlines.next(c2u, u2c)),
                    // The answer ends the wait at once, rather than at the timeout: an idle
                    // connection wakes once per heartbeat interval, not twice.
                    Event::Pong => {
                        if deadlines.answered(c2u.last_pong) {
                            timer.as_mut().reset(deadlines.next(c2u, u2c));
                        }
                    }
                },
                () = &mut timer => {
                    if let Some(reason) = deadlines.due(Instant::now(), client, upstream, c2u, u2c) {
                        break reason;
                    }
                    timer.as_mut().reset(deadlines.next(c2u, u2c));
                },
                signal = poll_fn(|cx| quiet.poll(cx, |cx| {
                    if cancelled.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Signal::Drain);
                    }
                    if revoked.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Signal::Revoked);
                    }
                    // Not once its channel has closed: that future has finished.
                    if !watching_policy {
                        return Poll::Pending;
                    }
                    policy_change.as_mut().poll(cx).map(Signal::Policy)
                })) => match signal {
                    Signal::Drain => break CloseReason::Shutdown,
                    Signal::Revoked => break CloseReason::Revoked,
                    Signal::Policy((changed, changes)) => {
                        if changed.is_err() {
                            watching_policy = false;
                            continue;
                        }
                        policy_change.set(next_change(changes));
                        let loaded = policy.load();
                        if let Err(why) = admission::recheck(&loaded.policy, standing) {
                            let (route, ip) = (&route.name, standing.client_ip);
                            // The request id ties it to the connection's upgrade and close lines.
                            let request_id = request_id.to_str().unwrap_or("-");
                            if loaded.policy.mode == Mode::Report {
                                tracing::warn!(request_id = %request_id, route = %route, client_ip = %ip, reason = why.reason(), "report mode: the new policy would close this connection");
                            } else {
                                tracing::info!(request_id = %request_id, route = %route, client_ip = %ip, reason = why.reason(), "the new policy no longer admits this connection");
                                break CloseReason::PolicyChanged;
                            }
                        }
                    }
                },
            }
        };

        let deadline = Instant::now() + deadlines.write();
        // A draining gate does not wait for upstreams to close TCP first: the drain ends
        // with the close handshakes.
        let after_peer = !stop.drain.is_cancelled();
        // Boxed: the closing futures (the drain and both ends) would otherwise be part of
        // every connection's task for all its life.
        let closing = Box::pin(close_both(
            client, upstream, c2u, u2c, &reason, deadline, after_peer,
        ));
        let (client_finish, upstream_finish) = tokio::select! {
            finishes = closing => finishes,
            // The process is about to exit: no more waiting for a peer's close reply.
            () = stop.cut.cancelled() => (Finish::Drop, Finish::Drop),
        };
        (reason, client_finish, upstream_finish)
    }
}

/// Close both sides as the close table says for `reason`, never past `deadline`; returns
/// how each leg is then let go.
async fn close_both(
    client: &mut Leg,
    upstream: &mut Leg,
    c2u: &mut Direction,
    u2c: &mut Direction,
    reason: &CloseReason,
    deadline: Instant,
    after_peer: bool,
) -> (Finish, Finish) {
    let (mut to_client, mut to_upstream) = reason.endings();
    // A side in the middle of a relayed frame can be sent no close frame: the frame is
    // finished first where its source can finish it.
    let (to_client_frame, to_upstream_frame) = reason.frames_to_finish();
    let finish = (
        to_client_frame && client.mid_frame,
        to_upstream_frame && upstream.mid_frame,
    );
    if finish.0 || finish.1 {
        let deadline = deadline.min(Instant::now() + FINISH_FRAME);
        let closed_by = finish_frames(client, upstream, c2u, u2c, finish, deadline).await;
        // A side that sent its own close meanwhile is answered, not waited on.
        let reply = |ending: &mut Ending| {
            if let Ending::Close(frame) = ending {
                *ending = Ending::Reply(frame.take());
            }
        };
        match closed_by {
            Some(Side::Client) => reply(&mut to_client),
            Some(Side::Upstream) => reply(&mut to_upstream),
            None => {}
        }
    }
    // A violator's peer is closed first, and what it had already sent is still delivered
    // to the violator: the messages it sent before the bad frame arrived get their answers
    // (as from an endpoint that had answered them before reading it).
    match reason.violator() {
        Some(Side::Client) => {
            to_upstream = drain(upstream, client, u2c, to_upstream, deadline).await;
        }
        Some(Side::Upstream) => {
            to_client = drain(client, upstream, c2u, to_client, deadline).await;
        }
        None => {}
    }
    // Each side is shut as soon as its own close is done: an upstream that answered is
    // not kept open while a silent client is waited for.
    tokio::join!(
        end_and_shut(client, to_client, deadline, false),
        end_and_shut(upstream, to_upstream, deadline, after_peer)
    )
}

/// How long a frame begun toward a side gets to end, so that the side's close frame can
/// follow it, before that side is cut off without one.
const FINISH_FRAME: Duration = Duration::from_secs(2);

/// Relay on, with every check, toward each side `finish` names that is in the middle of a
/// frame, until that frame has ended (what follows it in the same read goes too), for at
/// most until `deadline`. Returns the side whose own close came meanwhile, if one did;
/// anything else that ends a direction (its source lost or breaking a rule) stops the
/// finishing, and that side's close fares as it would have.
async fn finish_frames(
    client: &mut Leg,
    upstream: &mut Leg,
    c2u: &mut Direction,
    u2c: &mut Direction,
    finish: (bool, bool),
    deadline: Instant,
) -> Option<Side> {
    let finished = timeout_at(
        deadline,
        poll_fn(|cx| loop {
            let to_client = finish.0 && client.mid_frame;
            let to_upstream = finish.1 && upstream.mid_frame;
            if !to_client && !to_upstream {
                return Poll::Ready(None);
            }
            let mut polled = Poll::Pending;
            if to_client {
                polled = u2c.poll(upstream, client, cx);
            }
            if polled.is_pending() && to_upstream {
                polled = c2u.poll(client, upstream, cx);
            }
            match polled {
                Poll::Ready(Event::End(CloseReason::Closed { by, .. })) => {
                    return Poll::Ready(Some(by))
                }
                Poll::Ready(Event::End(_)) => return Poll::Ready(None),
                // A stall arms nothing here (the deadline bounds it); poll again.
                Poll::Ready(Event::Stalled | Event::Pong) => continue,
                Poll::Pending => {
                    // A direction that ended its frame and then had nothing more to read.
                    if (!to_client || !client.mid_frame) && (!to_upstream || !upstream.mid_frame) {
                        return Poll::Ready(None);
                    }
                    return Poll::Pending;
                }
            }
        }),
    )
    .await;
    finished.unwrap_or(None)
}

/// [`end`], then, after a completed close handshake, the write side shut at once (or,
/// with `after_peer`, once the peer has shut its own: see [`Finish::AfterPeer`]); and at
/// once for a side cut off inside a relayed frame, which no close frame can reach.
async fn end_and_shut(
    leg: &mut Leg,
    ending: Ending,
    deadline: Instant,
    after_peer: bool,
) -> Finish {
    match end(leg, ending, deadline).await {
        Finish::Shutdown if after_peer => Finish::AfterPeer,
        Finish::Shutdown => {
            linger::shutdown(&mut leg.io, Instant::now() + linger::LINGER_TIME).await;
            Finish::Shut
        }
        // Its FIN goes now, not once the other side's close handshake is done (up to
        // `write_seconds` later): it learns at once that the connection is over. What it
        // still sends is discarded while the connection lingers.
        Finish::Linger if leg.mid_frame && !leg.close_sent => {
            linger::shutdown(&mut leg.io, deadline).await;
            Finish::Discard
        }
        finish => finish,
    }
}

/// How a leg's socket is let go once its close frames are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    /// Lost or stalled: dropped at once, without a close frame.
    Drop,
    /// The close handshake completed, so the peer sends nothing more: TLS close_notify
    /// and FIN, then the socket goes.
    Shutdown,
    /// As `Shutdown`, already done: only the socket's drop is left.
    Shut,
    /// Our close frame may still be unread behind the peer's input: close_notify and FIN,
    /// then input is discarded until the peer closes ([`linger::close`]).
    Linger,
    /// As `Linger`, with close_notify and FIN already sent: only the discarding is left.
    Discard,
    /// The close handshake completed with the upstream: wait for its FIN (discarding
    /// anything else), then send ours. The gate is the upstream's client, and a WebSocket
    /// client lets the server close TCP first (RFC 6455 §7.1.1), so that the server, not
    /// the gate, holds the TIME_WAIT: a gate that closed first would keep one of its ports
    /// toward the upstream for a minute per connection, and run out of them under churn.
    AfterPeer,
}

/// The two legs of a relay that has ended, each with how it is let go.
pub struct Ended {
    relay: Box<Relay>,
    client: Finish,
    upstream: Finish,
}

impl Ended {
    /// Let both legs go (see [`Finish`]), within the linger bounds; the sockets are
    /// dropped afterwards.
    pub async fn linger(mut self) {
        let deadline = Instant::now() + linger::LINGER_TIME;
        let relay = &mut *self.relay;
        tokio::join!(
            let_go(&mut relay.client, self.client, deadline),
            let_go(&mut relay.upstream, self.upstream, deadline)
        );
    }
}

async fn let_go(leg: &mut Leg, finish: Finish, deadline: Instant) {
    match finish {
        Finish::Drop | Finish::Shut => {}
        Finish::Shutdown => linger::shutdown(&mut leg.io, deadline).await,
        Finish::Linger => linger::close(&mut leg.io, deadline).await,
        Finish::Discard => linger::discard_until(&mut leg.io, deadline).await,
        Finish::AfterPeer => {
            linger::discard_until(&mut leg.io, deadline).await;
            linger::shutdown(&mut leg.io, deadline).await;
        }
    }
}

/// One of the relay's seldom waits finished.
enum Signal {
    /// The gate's drain has begun.
    Drain,
    /// The operator closed the connection.
    Revoked,
    /// The policy changed (or its channel closed), with the receiver for the next wait.
    Policy((Result<(), watch::error::RecvError>, watch::Receiver<u64>)),
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

/// Close `peer` (the side that did nothing wrong) with `ending`, after what the violator
/// had sent it before the violation, relaying what the peer still sends to `violator`
/// (through `direction`, with every check) until its close reply, for at most [`DRAIN`].
/// Returns what is left to do with `peer`.
async fn drain(
    peer: &mut Leg,
    violator: &mut Leg,
    direction: &mut Direction,
    ending: Ending,
    deadline: Instant,
) -> Ending {
    let Ending::Close(frame) = ending else {
        return ending;
    };
    let from = direction.from;
    let mut sent = false;
    let replied = timeout_at(deadline.min(Instant::now() + DRAIN), async {
        if !send_close(peer, frame.clone()).await {
            return None;
        }
        sent = true;
        loop {
            match poll_fn(|cx| direction.poll(peer, violator, cx)).await {
                Event::Stalled | Event::Pong => continue,
                Event::End(CloseReason::Closed { by, .. }) if by == from => return Some(()),
                Event::End(_) => return None,
            }
        }
    })
    .await;
    match (sent, replied) {
        (false, _) => Ending::Close(frame),
        (true, Ok(Some(()))) => Ending::Done,
        (true, _) => Ending::AwaitReply,
    }
}

/// End one side of a relay, never past `deadline`; returns how its socket is let go.
/// Closing TCP is our job afterwards: as the server of the client leg, once the
/// handshake is complete.
async fn end(leg: &mut Leg, ending: Ending, deadline: Instant) -> Finish {
    let finished = timeout_at(deadline, async {
        match ending {
            Ending::Close(frame) => {
                if send_close(leg, frame).await && await_close_reply(leg).await {
                    return Finish::Shutdown;
                }
                Finish::Linger
            }
            Ending::Reply(frame) => {
                send_close(leg, frame).await;
                Finish::Shutdown
            }
            Ending::CloseAndDrop(frame) => {
                send_close(leg, Some(frame)).await;
                Finish::Linger
            }
            Ending::AwaitReply if await_close_reply(leg).await => Finish::Shutdown,
            Ending::AwaitReply => Finish::Linger,
            Ending::Done => {
                let _ = poll_fn(|cx| leg.poll_flush(cx)).await;
                Finish::Shutdown
            }
            Ending::Drop => Finish::Drop,
        }
    })
    .await;
    finished.unwrap_or(Finish::Linger)
}

/// Send our close frame after what is still owed to `leg` (or the rest of one begun
/// before). Returns whether it went: it cannot once a close is sent whole, nor while the
/// relayed stream stops inside a frame (a peer cut off mid-frame reads the rest of the
/// connection as that frame's payload, so it gets a FIN and no close frame).
async fn send_close(leg: &mut Leg, frame: Option<CloseFrame>) -> bool {
    if leg.close_sent && !leg.caught_up() {
        // Our close frame was begun and the peer took only part of it (a drain that timed
        // out): nothing is written after it, so what is left is its rest. Finish it rather
        // than leave the peer a truncated frame before the FIN.
        return poll_fn(|cx| {
            std::task::ready!(leg.poll_owed(cx))?;
            leg.poll_flush(cx)
        })
        .await
        .is_ok();
    }
    if leg.close_sent || leg.mid_frame {
        return false;
    }
    let mut close = Some(frame);
    let written = poll_fn(|cx| {
        // What is owed goes first; the close frame once the leg has caught up.
        loop {
            std::task::ready!(leg.poll_owed(cx))?;
            match close.take() {
                Some(frame) => leg.write_close(cx, frame.as_ref())?,
                None => break,
            }
        }
        leg.poll_flush(cx)
    })
    .await;
    written.is_ok()
}

/// Frames read (and discarded) while waiting for a close reply before the gate gives up
/// and drops the connection: a peer still flooding after our close is not worth the
/// CPU. A well-behaved peer's in-flight messages fit many times over.
const CLOSE_WAIT_FRAMES: u64 = 1024;

/// Read (and discard messages already in flight) until the peer's close reply, for at
/// most [`CLOSE_WAIT_FRAMES`] frames. Returns whether the reply came.
async fn await_close_reply(leg: &mut Leg) -> bool {
    let mut frames = 0;
    poll_fn(|cx| loop {
        let read = with_scratch(|buf| {
            let n = match leg.poll_read_into(cx, buf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Some(false)),
                Poll::Ready(Ok(n)) => n,
                Poll::Pending => return Poll::Pending,
            };
            let mut r = leg.reader.uncarry(buf);
            let end = MAX_HEADER + n;
            while r < end {
                match leg.reader.next(&buf[r..end]) {
                    Err(_) => return Poll::Ready(Some(false)),
                    Ok(Step::Incomplete) => {
                        leg.reader.carry(&buf[r..end]);
                        break;
                    }
                    Ok(Step::DataHeader { len, .. }) => {
                        frames += 1;
                        r += len;
                    }
                    Ok(Step::Payload(len)) => r += len,
                    Ok(Step::Control(len, control)) => {
                        r += len;
                        if let Some(control) = control {
                            frames += 1;
                            if control.opcode == OpCode::Close {
                                return Poll::Ready(Some(true));
                            }
                        }
                    }
                }
                if frames >= CLOSE_WAIT_FRAMES {
                    return Poll::Ready(Some(false));
                }
            }
            Poll::Ready(None)
        });
        match read {
            Poll::Ready(Some(replied)) => return Poll::Ready(replied),
            Poll::Ready(None) => continue,
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}
