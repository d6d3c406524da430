//! Once the relay has ended: each side closed as the close table says (a frame in flight
//! finished first, a violator's peer closed before the violator), and each socket let go
//! (close_notify and FIN, lingering, or dropped).

use std::future::{poll_fn, Future};
use std::sync::OnceLock;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{timeout_at, Instant};

use super::close::{CloseFrame, CloseReason, Ending, Side};
use super::direction::{Direction, Event};
use super::frame::{OpCode, MAX_HEADER};
use super::leg::{with_scratch, Io, Leg};
use super::reader::Step;
use super::Relay;
use crate::linger;

/// Close both sides as the close table says for `reason`, never past `deadline`; returns
/// how each leg is then let go.
pub(super) async fn close_both(
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
    // finished first where its source can finish it. The frame toward a side whose peer
    // is drained below (the side that closed first, or a violator) is not waited for
    // here: the drain relays its rest while the peer is being closed, so the peer's close
    // goes out at once, not after that frame; what is still left of it after the drain
    // is finished then.
    let frames = reason.frames_to_finish();
    let drained = reason.relayed_until_reply();
    let started = Instant::now();
    let finish_by = deadline.min(started + FINISH_FRAME);
    let now = mid_frame_sides(client, upstream, frames, |side| drained != Some(side));
    let endings = (&mut to_client, &mut to_upstream);
    finish_and_answer(client, upstream, c2u, u2c, now, finish_by, endings).await;
    // A violator's peer is closed first, and what it had already sent is still delivered
    // to the violator: the messages it sent before the bad frame arrived get their answers
    // (as from an endpoint that had answered them before reading it). So is what a side
    // that closed first is still sent before its peer's close reply.
    match drained {
        Some(Side::Client) => {
            to_upstream = drain(upstream, client, u2c, to_upstream, deadline).await;
        }
        Some(Side::Upstream) => {
            to_client = drain(client, upstream, c2u, to_client, deadline).await;
        }
        None => {}
    }
    let rest = mid_frame_sides(client, upstream, frames, |side| drained == Some(side));
    let endings = (&mut to_client, &mut to_upstream);
    finish_and_answer(client, upstream, c2u, u2c, rest, finish_by, endings).await;
    // Each side is let go as soon as its own close is done, not when the other side's
    // ends: an upstream that answered is not kept open while a silent client is waited
    // for, and a client that flooded past our close gets its FIN while an upstream that
    // does not answer is still waited for. If one side's close ends while the other is
    // still being let go, the rest of that is left to the linger (the close is logged
    // first).
    let (client_rest, upstream_rest) = (OnceLock::new(), OnceLock::new());
    let client_end = async {
        let finish = end_and_shut(client, to_client, deadline, false).await;
        let_go_now(client, finish, &client_rest).await
    };
    let upstream_end = async {
        let finish = end_and_shut(upstream, to_upstream, deadline, after_peer).await;
        let_go_now(upstream, finish, &upstream_rest).await
    };
    tokio::pin!(client_end, upstream_end);
    let (mut client_finish, mut upstream_finish) = (None, None);
    poll_fn(|cx| {
        if client_finish.is_none() {
            if let Poll::Ready(finish) = client_end.as_mut().poll(cx) {
                client_finish = Some(finish);
            }
        }
        if upstream_finish.is_none() {
            if let Poll::Ready(finish) = upstream_end.as_mut().poll(cx) {
                upstream_finish = Some(finish);
            }
        }
        let client_finish = client_finish.or_else(|| client_rest.get().copied());
        let upstream_finish = upstream_finish.or_else(|| upstream_rest.get().copied());
        match (client_finish, upstream_finish) {
            (Some(c), Some(u)) => Poll::Ready((c, u)),
            _ => Poll::Pending,
        }
    })
    .await
}

/// The sides among `frames` (toward the client, toward the upstream) that are in the
/// middle of a frame and that `chosen` picks.
fn mid_frame_sides(
    client: &Leg,
    upstream: &Leg,
    frames: (bool, bool),
    chosen: impl Fn(Side) -> bool,
) -> (bool, bool) {
    (
        frames.0 && client.mid_frame && chosen(Side::Client),
        frames.1 && upstream.mid_frame && chosen(Side::Upstream),
    )
}

/// Finish the frames toward the sides `sides` names (see [`finish_frames`]); a side that
/// sent its own close meanwhile is then answered, not waited on.
async fn finish_and_answer(
    client: &mut Leg,
    upstream: &mut Leg,
    c2u: &mut Direction,
    u2c: &mut Direction,
    sides: (bool, bool),
    deadline: Instant,
    (to_client, to_upstream): (&mut Ending, &mut Ending),
) {
    if !sides.0 && !sides.1 {
        return;
    }
    // Only the side a frame goes to waits for it: the side a lone frame comes from, if it
    // is to be sent a close, is sent it at once, while the frame's rest is relayed.
    let source = match sides {
        (true, false) => Some((Side::Upstream, &mut *to_upstream)),
        (false, true) => Some((Side::Client, &mut *to_client)),
        _ => None,
    };
    let early = source.and_then(|(side, ending)| match ending {
        Ending::Close(frame) => Some((side, frame.clone())),
        _ => None,
    });
    let (closed_by, early_sent) =
        finish_frames(client, upstream, c2u, u2c, sides, early, deadline).await;
    if let Some(side) = early_sent {
        let ending = match side {
            Side::Client => &mut *to_client,
            Side::Upstream => &mut *to_upstream,
        };
        *ending = Ending::AwaitReply;
    }
    let ending = match closed_by {
        Some(Side::Client) => to_client,
        Some(Side::Upstream) => to_upstream,
        None => return,
    };
    match ending {
        Ending::Close(frame) => *ending = Ending::Reply(frame.take()),
        // Its close was the reply a drain waited for.
        Ending::AwaitReply => *ending = Ending::Done,
        _ => {}
    }
}

/// Let `leg` go at once if `finish` has it wait on its peer (the lingering close, or the
/// upstream's FIN): recorded in `rest` first is what is left of that for [`Ended::linger`]
/// should the other side's close end meanwhile. A leg to be dropped is dropped now.
async fn let_go_now(leg: &mut Leg, finish: Finish, rest: &OnceLock<Finish>) -> Finish {
    let until = Instant::now() + linger::LINGER_TIME;
    let left = match finish {
        Finish::AfterPeer(None) => Finish::AfterPeer(Some(until)),
        Finish::Linger | Finish::Discard => Finish::LingerUntil(until),
        // Lost, or accepting nothing: nothing more goes to it, so its socket is closed now
        // rather than when the other side's close handshake has ended (up to
        // `write_seconds` and a linger later), which would hold the descriptor and leave a
        // peer that half-closed waiting for our FIN.
        Finish::Drop => {
            leg.io = Io::Gone;
            return Finish::Drop;
        }
        finish => return finish,
    };
    let _ = rest.set(left);
    let_go(leg, finish, until).await;
    Finish::Shut
}

/// How long a frame begun toward a side gets to end, so that the side's close frame can
/// follow it, before that side is cut off without one.
const FINISH_FRAME: Duration = Duration::from_secs(2);

/// Relay on, with every check, toward each side `finish` names that is in the middle of a
/// frame, until that frame has ended (what follows it in the same read goes too), for at
/// most until `deadline`; meanwhile the side `early` names, if free for a frame of ours, is
/// sent that close frame. Returns the side whose own close came meanwhile, if one did
/// (anything else that ends a direction, its source lost or breaking a rule, stops the
/// finishing, and that side's close fares as it would have), and the side `early` names
/// if its close went whole (one begun and not done is finished by [`send_close`]).
async fn finish_frames(
    client: &mut Leg,
    upstream: &mut Leg,
    c2u: &mut Direction,
    u2c: &mut Direction,
    finish: (bool, bool),
    early: Option<(Side, Option<CloseFrame>)>,
    deadline: Instant,
) -> (Option<Side>, Option<Side>) {
    let free = |side: Side, client: &Leg, upstream: &Leg| {
        let leg = if side == Side::Client {
            client
        } else {
            upstream
        };
        !leg.mid_frame && !leg.close_sent
    };
    // Nothing is relayed toward it here, so it stays free for its close.
    let (mut early, mut close) = match early.filter(|(side, _)| free(*side, client, upstream)) {
        Some((side, frame)) => (Some(side), Some(frame)),
        None => (None, None),
    };
    let mut early_sent = None;
    let finished = timeout_at(
        deadline,
        poll_fn(|cx| loop {
            if let Some(side) = early.filter(|_| early_sent.is_none()) {
                let leg = match side {
                    Side::Client => &mut *client,
                    Side::Upstream => &mut *upstream,
                };
                match poll_close(leg, &mut close, cx) {
                    Poll::Ready(Ok(())) => early_sent = Some(side),
                    // Its write side is broken: its close fares as it would have.
                    Poll::Ready(Err(_)) => early = None,
                    Poll::Pending => {}
                }
            }
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
    (finished.unwrap_or(None), early_sent)
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
        Finish::Shutdown if after_peer => Finish::AfterPeer(None),
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
pub(super) enum Finish {
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
    /// The rest of a `Linger` or `Discard` begun before the relay ended: until the
    /// instant given (close_notify and FIN again are no-ops if they went).
    LingerUntil(Instant),
    /// The close handshake completed with the upstream: wait for its FIN (discarding
    /// anything else), then send ours. The gate is the upstream's client, and a WebSocket
    /// client lets the server close TCP first (RFC 6455 §7.1.1), so that the server, not
    /// the gate, holds the TIME_WAIT: a gate that closed first would keep one of its ports
    /// toward the upstream for a minute per connection, and run out of them under churn.
    /// The wait ends at the instant given, if it began before the relay ended (at most
    /// the linger time after the upstream's close reply).
    AfterPeer(Option<Instant>),
}

/// The two legs of a relay that has ended, each with how it is let go.
pub struct Ended {
    pub(super) relay: Box<Relay>,
    pub(super) client: Finish,
    pub(super) upstream: Finish,
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
        Finish::LingerUntil(until) => linger::close(&mut leg.io, until.min(deadline)).await,
        Finish::AfterPeer(until) => {
            let deadline = until.map_or(deadline, |until| until.min(deadline));
            linger::discard_until(&mut leg.io, deadline).await;
            linger::shutdown(&mut leg.io, deadline).await;
        }
    }
}

/// How long a peer gets to answer our close, while what it sends is relayed, before the
/// other side is failed (a violator) or answered (a side that closed first).
const DRAIN: Duration = Duration::from_secs(1);

/// Close `peer` (the side that did nothing wrong, or did not close first) with `ending`,
/// after what the other side had sent it, relaying what the peer still sends to `other`
/// (through `direction`, with every check) until its close reply, for at most [`DRAIN`].
/// Returns what is left to do with `peer`.
async fn drain(
    peer: &mut Leg,
    other: &mut Leg,
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
            match poll_fn(|cx| direction.poll(peer, other, cx)).await {
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
    // Our close frame may have been begun, and the peer taken only part of it (a drain
    // that timed out, or a close sent while a frame toward the other side was finished):
    // nothing is written after it, so what is left is its rest. It is finished rather than
    // leave the peer a truncated frame before the FIN.
    let mut close = (!leg.close_sent).then_some(frame);
    if leg.mid_frame && close.is_some() {
        return false;
    }
    poll_fn(|cx| poll_close(leg, &mut close, cx)).await.is_ok()
}

/// Write what is owed to `leg`, then `close` (taken) once the leg has caught up, and flush.
fn poll_close(
    leg: &mut Leg,
    close: &mut Option<Option<CloseFrame>>,
    cx: &mut std::task::Context<'_>,
) -> Poll<std::io::Result<()>> {
    loop {
        std::task::ready!(leg.poll_owed(cx))?;
        match close.take() {
            Some(frame) => leg.write_close(cx, frame.as_ref())?,
            None => break,
        }
    }
    leg.poll_flush(cx)
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
                    Ok(Step::Payload(len) | Step::Piece { len, .. }) => r += len,
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
