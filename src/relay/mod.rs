//! After the upgrade: relay frames between the client and the upstream, one task and one
//! `select!` loop per connection, and close both sides with the right codes.
//!
//! Read in this order: [`frame`] (the codec: headers, masks, UTF-8, close payloads, the
//! message rules, over byte slices), [`reader`] (a leg's reads walked frame by frame: what
//! passes on, what control frames arrived), [`leg`] (a socket, what is owed to it, and the
//! frames read from it), [`direction`] (one read relayed: frames checked and forwarded as they
//! arrive), [`inbound`] (the client's message policy), [`deadlines`] (the one timer, and
//! [`sendq`], what it asks the kernel when a pong is late), this
//! file's [`Relay`] (the `select!` loop over all of them), [`close`] (why a connection
//! ended and what each side is sent) and [`finish`] (the close handshakes, and how each
//! socket is let go).
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
mod direction;
mod finish;
pub mod frame;
mod inbound;
pub mod inflate;
mod leg;
pub mod reader;
mod sendq;

use std::future::poll_fn;
use std::mem;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::HeaderValue;

use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

pub use close::{CloseFrame, CloseReason, Side};

use crate::admission::{self, Slots, Standing};
use crate::metrics::{ConnectionMetrics, Metrics, OpenConnection};
use crate::policy::{Mode, PolicyHandle, Route};
use crate::registry::{Entry, Signal};
use crate::shutdown::Stop;
use crate::upstream::UpstreamSocket;
use deadlines::{Deadlines, Heartbeat};
use direction::{Direction, Event};
pub use finish::Ended;
use finish::{close_both, Finish};
use inbound::Inbound;
use leg::Leg;
pub use leg::{Client, Io};
use reader::Reader;

/// Messages and bytes relayed in one direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub messages: u64,
    pub bytes: u64,
    /// Inflated bytes of compressed messages (`bytes` counts them as they crossed).
    pub inflated: u64,
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
    /// The caps it holds (global, per IP, per subject; shared ones under `cluster`).
    pub slots: Slots,
    /// How long freeing a shared cap may wait for the store (zero without `cluster`).
    pub release_within: Duration,
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
    /// Its place in `wsgate_connections_active` (the counters went to the directions).
    open: OpenConnection,
    stop: Stop,
    slots: Slots,
    release_within: Duration,
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
        conn.report.then(|| Box::new(conn.request_id.clone())),
        started,
    );
    let c2u = Direction::new(
        Side::Client,
        started,
        Some(Box::new(inbound)),
        conn.metrics.client_to_upstream,
        conn.entry.clone(),
    );
    let u2c = Direction::new(
        Side::Upstream,
        started,
        None,
        conn.metrics.upstream_to_client,
        conn.entry.clone(),
    );
    let deadlines = Deadlines {
        route: route.clone(),
        written_at_ping: 0,
        lifetime_end: route.timeouts.max_lifetime.map(|l| started + l),
        expires_at: conn.expires_at,
        heartbeat: Heartbeat::ping_at(started + route.heartbeat.interval, route.heartbeat.interval),
        ping_rtt: conn.metrics.ping_rtt,
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
        open: conn.metrics.open,
        request_id: conn.request_id,
        protocol: conn.protocol,
        stop,
        slots: conn.slots,
        release_within: conn.release_within,
    });
    // What happened before the relay began, which the registry's broadcasts may have
    // found it too early for: a policy swapped in since the one it was admitted under, the
    // drain begun. (Its entry was registered at admission; every later swap and the drain
    // are raised on it.)
    if conn.changes.has_changed().unwrap_or(false) {
        conn.entry.raise(Signal::Policy);
    }
    if relay.stop.drain.is_cancelled() {
        conn.entry.raise(Signal::Drain);
    }
    relay.run()
}

impl Relay {
    async fn run(mut self: Box<Self>) -> (Outcome, Ended) {
        let (reason, linger_client, linger_upstream) = self.relay().await;
        let duration = self.started.elapsed();
        self.open
            .closed(&self.route.name, reason.label(), duration.as_secs_f64());
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
            client_ip = %self.standing.client_ip, route = self.route.name.as_str(),
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
    async fn relay(&mut self) -> (CloseReason, Finish, Finish) {
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
            slots,
            release_within,
            ..
        } = &mut *self;
        // The one timer of this connection, always set to the earliest deadline.
        let timer = sleep_until(deadlines.next(c2u, u2c));
        tokio::pin!(timer);

        // The drain, the operator's close and a policy change arrive as signals raised on
        // the connection's registry entry (see `registry`): one waker slot for the three.
        let entry = c2u.entry.clone();
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
                raised = poll_fn(|cx| entry.poll_raised(cx)) => {
                    if raised.has(Signal::Drain) {
                        break CloseReason::Shutdown;
                    }
                    if raised.has(Signal::Revoked) {
                        break CloseReason::Revoked;
                    }
                    if raised.has(Signal::Policy) {
                        let loaded = policy.load();
                        if let Err(why) = admission::recheck(&loaded.policy, standing) {
                            let (route, ip) = (&route.name, standing.client_ip);
                            // The request id ties it to the connection's upgrade and close lines.
                            let request_id = request_id.to_str().unwrap_or("-");
                            if loaded.policy.mode == Mode::Report {
                                tracing::warn!(request_id = %request_id, route = route.as_str(), client_ip = %ip, reason = why.reason(), "report mode: the new policy would close this connection");
                            } else {
                                tracing::info!(request_id = %request_id, route = route.as_str(), client_ip = %ip, reason = why.reason(), "the new policy no longer admits this connection");
                                break CloseReason::PolicyChanged;
                            }
                        }
                    }
                },
            }
        };

        // The caps are freed before the close handshakes, not after them: a client that
        // reconnects as soon as it has its close reply finds its slot free, on any gate of
        // a cluster (a shared one waits, at most one store round trip, until the store has
        // heard; it was freed a few milliseconds after the client saw the close).
        // Boxed, as the closing futures below: its timer would otherwise be part of every
        // connection's task for all its life (+0.5 KiB per idle connection, measured).
        Box::pin(mem::take(slots).release(*release_within)).await;
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
