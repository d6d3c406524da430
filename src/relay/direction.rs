//! One direction of a relayed connection: one read from its source at a time, the frames
//! in it checked and passed on to its destination in one write, and what it has relayed
//! (counts, the last data, the last pong, whether the destination keeps up).

use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::Instant;

use super::close::{CloseFrame, CloseReason, Side};
use super::frame::{parse_close, write_header, ClosePayload, OpCode, Violation, MAX_HEADER};
use super::inbound::{Inbound, Kind};
use super::leg::{with_scratch, Leg};
use super::reader::{Control, Step};
use super::Counts;
use crate::metrics::MessageCounters;
use crate::registry::{Entry, LiveCounts};

/// One direction of the relay: what it has relayed, when, and whether its destination is
/// keeping up.
pub(super) struct Direction {
    pub(super) from: Side,
    /// When the destination last refused bytes and has accepted none since.
    pub(super) stalled_since: Option<Instant>,
    /// The destination's byte count when the stall began (or last made progress).
    stall_written: u64,
    /// How many times the destination has started refusing bytes (heartbeat liveness:
    /// a client the gate had to wait for, and that took bytes since, is reading).
    pub(super) stalls: u64,
    pub(super) counts: Counts,
    /// Frames of any kind read from the source, and pieces of a data frame's payload
    /// (heartbeat liveness: a client sending a large frame cannot pong until its end,
    /// and its bytes arriving prove it alive).
    pub(super) frames: u64,
    /// When text or binary bytes last passed (idle timeout).
    pub(super) last_data: Instant,
    /// The client's message policy, on the client → upstream direction only.
    pub(super) inbound: Option<Box<Inbound>>,
    /// When the source last sent a pong (heartbeat round trip).
    pub(super) last_pong: Option<Instant>,
    /// A pong was read that the heartbeat has not looked at yet.
    pub(super) pong_unseen: bool,
    /// The stall is the destination's flush (a TLS connection's buffered records): nothing
    /// more is read from the source, nor counted as taken, until it completes.
    flush_stalled: bool,
    metrics: MessageCounters,
    /// The connection's registry entry, where `counts` is published for the operator API.
    pub(super) entry: Arc<Entry>,
}

pub(super) enum Event {
    End(CloseReason),
    /// A destination just started refusing bytes: arm the write deadline.
    Stalled,
    /// The client sent a pong: the heartbeat may stop waiting before its deadline.
    Pong,
}

impl Direction {
    pub(super) fn new(
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
    pub(super) fn poll(
        &mut self,
        src: &mut Leg,
        dst: &mut Leg,
        cx: &mut Context<'_>,
    ) -> Poll<Event> {
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
        let mut start = src.reader.uncarry(buf);
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
        // Messages begun in this read, and whether the current frame began one: a message
        // whose first frame goes back is not counted either.
        let (mut messages, mut frame_begins_message) = (0u64, false);
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
                    // More of a frame begun (a header still arriving, or one waiting for
                    // its payload's first byte) shows the source alive, as payload bytes
                    // do; a data frame's (its opcode is in the first byte) is activity.
                    let rest = &buf[r..end];
                    self.frames += 1;
                    if rest[0] & 0x0f < 0x8 {
                        self.last_data = now;
                    }
                    src.reader.carry(rest);
                    break;
                }
                Step::DataHeader {
                    len,
                    header,
                    starts,
                    piece,
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
                        messages += 1;
                    }
                    frame_begins_message = starts;
                    self.frames += 1;
                    self.last_data = now;
                    frame_start = src.reader.in_data_frame().then_some(w);
                    frame_payload = 0;
                    if let Some(piece) = piece {
                        // The fragment's header in place of the frame's own (never longer).
                        let mut head = [0u8; MAX_HEADER];
                        let h = write_header(&piece, &mut head);
                        buf[w..w + h].copy_from_slice(&head[..h]);
                        r += len;
                        w += h;
                        open = src.reader.in_data_frame();
                        continue;
                    }
                    len
                }
                Step::Piece { len, header } => {
                    // The first step of a read (nothing carried, nothing written yet): the
                    // fragment's header goes in the room kept before the read's bytes.
                    let mut head = [0u8; MAX_HEADER];
                    let h = write_header(&header, &mut head);
                    if w != start || start < h {
                        // Not where a piece can be: the reader promises otherwise.
                        ended = Some(CloseReason::Protocol(self.from, 1011));
                        break;
                    }
                    start -= h;
                    buf[start..w].copy_from_slice(&head[..h]);
                    self.frames += 1;
                    self.last_data = now;
                    payload += len as u64;
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
            if frame_begins_message {
                messages -= 1;
            }
        }
        if messages != 0 {
            self.counts.messages += messages;
            self.metrics.messages.inc_by(messages);
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
                // The pong our heartbeat asked for is not the client's doing: only pings
                // and unasked-for pongs take a token of its message rate.
                let asked_for = opcode == OpCode::Pong && mem::take(&mut src.pong_due);
                if !asked_for {
                    if let Some(reason) = self.admit(Kind::Control, now) {
                        return Some(reason);
                    }
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
    pub(super) fn note_progress(&mut self, dst: &Leg, now: Instant) {
        if self.stalled_since.is_some() && dst.written != self.stall_written {
            self.stall_written = dst.written;
            self.stalled_since = Some(now);
        }
    }
}
