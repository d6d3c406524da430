//! Every deadline of a relayed connection — write, idle, lifetime, token expiry and the
//! heartbeat — behind one timer set to the earliest of them.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::close::{CloseReason, Side};
use super::leg::Leg;
use super::Direction;
use crate::policy::Route;

/// The heartbeat towards the client.
#[derive(Debug, Clone, Copy)]
pub(super) enum Heartbeat {
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

pub(super) struct Deadlines {
    /// Its timeouts and heartbeat settings (read from the route, not copied per connection).
    pub route: Arc<Route>,
    pub lifetime_end: Option<Instant>,
    pub expires_at: Option<Instant>,
    pub heartbeat: Heartbeat,
    pub ping_rtt: prometheus_client::metrics::histogram::Histogram,
}

impl Deadlines {
    pub fn write(&self) -> Duration {
        self.route.timeouts.write
    }

    /// The earliest deadline.
    pub fn next(&self, c2u: &Direction, u2c: &Direction) -> Instant {
        let mut next = c2u.last_data.max(u2c.last_data) + self.route.timeouts.idle;
        for t in [self.lifetime_end, self.expires_at].into_iter().flatten() {
            next = next.min(t);
        }
        next = next.min(match self.heartbeat {
            Heartbeat::PingAt(t) => t,
            Heartbeat::Awaiting { sent, .. } => sent + self.route.heartbeat.timeout,
        });
        for since in [c2u.stalled_since, u2c.stalled_since].into_iter().flatten() {
            next = next.min(since + self.write());
        }
        next
    }

    /// A pong from the client at `pong`: if it answers the ping being waited for, record
    /// the round trip and schedule the next ping. Whether the heartbeat changed.
    pub fn answered(&mut self, pong: Option<Instant>) -> bool {
        match (self.heartbeat, pong) {
            (Heartbeat::Awaiting { sent, .. }, Some(pong)) if pong >= sent => {
                self.ping_rtt.observe((pong - sent).as_secs_f64());
                self.heartbeat =
                    Heartbeat::PingAt((sent + self.route.heartbeat.interval).max(pong));
                true
            }
            _ => false,
        }
    }

    /// What is due at `now`: a reason to close, or `None` (maybe after queueing a ping).
    pub fn due(
        &mut self,
        now: Instant,
        client: &mut Leg,
        upstream: &Leg,
        c2u: &mut Direction,
        u2c: &mut Direction,
    ) -> Option<CloseReason> {
        c2u.note_progress(upstream, now);
        u2c.note_progress(client, now);
        let write = self.write();
        let expired = |d: &Direction| d.stalled_since.is_some_and(|s| now >= s + write);
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
        if now >= c2u.last_data.max(u2c.last_data) + self.route.timeouts.idle {
            return Some(CloseReason::IdleTimeout);
        }
        match self.heartbeat {
            Heartbeat::Awaiting {
                sent,
                frames,
                stalls,
            } if now >= sent + self.route.heartbeat.timeout => {
                // While the upstream takes nothing the gate reads nothing from the client,
                // so its pong may be waiting unread: the write deadline judges that case.
                let upstream_behind = c2u.stalled_since.is_some();
                // A client behind on what the gate sends it reads the ping (or gets it)
                // only after the backlog: if writes to it stalled since the ping, it either
                // took bytes since (it is reading, however slowly) or is stalled now, and
                // the write deadline judges it. Bytes the kernel takes into a buffer that
                // never filled prove nothing, so they do not count.
                let client_behind = u2c.stalled_since.is_some() || u2c.stalls != stalls;
                // A ping still waiting behind a large frame the upstream is sending has not
                // reached the client: nothing is owed yet.
                let ping_unsent = client.ping_waiting();
                if c2u.frames == frames && !upstream_behind && !client_behind && !ping_unsent {
                    return Some(CloseReason::HeartbeatTimeout);
                }
                if let Some(rtt) = c2u.last_pong.filter(|p| *p >= sent).map(|p| p - sent) {
                    self.ping_rtt.observe(rtt.as_secs_f64());
                }
                self.heartbeat = Heartbeat::PingAt((sent + self.route.heartbeat.interval).max(now));
            }
            Heartbeat::PingAt(t) if now >= t => {
                // Queue the ping only if the client takes bytes now (the upstream → client
                // direction writes it at the next frame boundary); a client that does not
                // is the write deadline's to drop.
                if client.caught_up() {
                    client.queue_ping();
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
