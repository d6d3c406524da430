//! Every deadline of a relayed connection — write, idle, lifetime, token expiry and the
//! heartbeat — behind one timer set to the earliest of them.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use super::close::{CloseReason, Side};
use super::direction::Direction;
use super::leg::Leg;
use super::sendq::SendQueue;
use crate::policy::Route;

/// The heartbeat towards the client.
#[derive(Debug, Clone, Copy)]
pub(super) enum Heartbeat {
    /// Send the next ping at this time.
    PingAt(Instant),
    /// A ping went out at `sent` and its pong is due by `due`; by then `frames` client
    /// frames (and payload pieces) had been read and writes to the client had stalled
    /// `stalls` times. `kernel`: the client socket's send queue at the last late look;
    /// `read_at`: the last look that saw the client's kernel take a backlog.
    Awaiting {
        sent: Instant,
        due: Instant,
        frames: u64,
        stalls: u64,
        kernel: Option<SendQueue>,
        read_at: Option<Instant>,
    },
}

impl Heartbeat {
    /// The next ping, at `t` rounded up to a grid the whole process shares (a tenth of the
    /// interval, at most 100 ms), so that one timer wakeup sends the pings of every
    /// connection that fell due in that slot instead of one wakeup each: 9,000 idle
    /// connections cost a few dozen wakeups per interval, not thousands.
    pub fn ping_at(t: Instant, interval: Duration) -> Heartbeat {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let epoch = *EPOCH.get_or_init(Instant::now);
        let grid = (interval / 10).min(PING_GRID).as_nanos();
        let since = t.saturating_duration_since(epoch).as_nanos();
        if grid == 0 || since == 0 {
            return Heartbeat::PingAt(t);
        }
        let rounded = since.div_ceil(grid) * grid;
        Heartbeat::PingAt(epoch + Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX)))
    }
}

/// The coarsest rounding of a ping time (see [`Heartbeat::ping_at`]).
const PING_GRID: Duration = Duration::from_millis(100);

pub(super) struct Deadlines {
    /// Its timeouts and heartbeat settings (read from the route, not copied per connection).
    pub route: Arc<Route>,
    /// Bytes the client's socket had taken when the last ping was queued.
    pub written_at_ping: u64,
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
            Heartbeat::Awaiting { due, .. } => due,
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
                let interval = self.route.heartbeat.interval;
                self.heartbeat = Heartbeat::ping_at((sent + interval).max(pong), interval);
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
                due,
                frames,
                stalls,
                kernel,
                read_at,
            } if now >= due => {
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
                    // The last witness: bytes the kernel took may still be on their way to
                    // a client that reads them slowly, the ping behind them.
                    let queue = client.send_queue();
                    let timeout = self.route.heartbeat.timeout;
                    let Some((due, read_at)) =
                        late_pong(kernel, queue, read_at, now, timeout, self.write())
                    else {
                        return Some(CloseReason::HeartbeatTimeout);
                    };
                    self.heartbeat = Heartbeat::Awaiting {
                        sent,
                        due,
                        frames,
                        stalls,
                        kernel: queue,
                        read_at,
                    };
                    return None;
                }
                if let Some(rtt) = c2u.last_pong.filter(|p| *p >= sent).map(|p| p - sent) {
                    self.ping_rtt.observe(rtt.as_secs_f64());
                }
                let interval = self.route.heartbeat.interval;
                self.heartbeat = Heartbeat::ping_at((sent + interval).max(now), interval);
            }
            Heartbeat::PingAt(t) if now >= t => {
                // Queue the ping only if the client takes bytes now (the upstream → client
                // direction writes it at the next frame boundary). One that does not is the
                // write deadline's to drop, and this ping is skipped: a client never pinged
                // owes no pong.
                let interval = self.route.heartbeat.interval;
                self.heartbeat = if client.caught_up() {
                    client.queue_ping();
                    // After a burst, the ping may wait behind it in the socket buffers: ask
                    // the kernel how much, so that a late pong can be judged by how much of
                    // it the client has taken since. (Never for an idle connection.)
                    let burst = client.written.saturating_sub(self.written_at_ping) > BACKLOG;
                    self.written_at_ping = client.written;
                    Heartbeat::Awaiting {
                        sent: now,
                        due: now + self.route.heartbeat.timeout,
                        frames: c2u.frames,
                        stalls: u2c.stalls,
                        kernel: if burst { client.send_queue() } else { None },
                        read_at: None,
                    }
                } else {
                    Heartbeat::ping_at(now + interval, interval)
                };
            }
            _ => {}
        }
        None
    }
}

/// The backlog in the client's socket that makes a late pong a question for the kernel:
/// more than a few segments that a client's delayed acknowledgements hold back (64 KiB
/// each on loopback), so that a trickle into a client that reads nothing proves nothing.
const BACKLOG: u64 = 256 * 1024;

/// A late pong's look at its deadline `now`, from the client socket's send queue at the
/// look before (`before`: when the ping was queued after a burst, or the previous deadline
/// of the same ping) and now, and the last look that saw the client's kernel take a backlog
/// (`read_at`). The next deadline and `read_at`, or `None`: the pong is late.
///
/// - A backlog that the client's kernel acknowledged some of since the look before shows
///   the client reading, however slowly: from then on it has `write` (`write_seconds`, the
///   time a client that takes nothing gets) to read out what its own buffers hold, the ping
///   behind it, and answer; looked at again every `timeout`.
/// - A backlog first seen at a deadline earns one `timeout` to show progress.
/// - Anything else, or a kernel that cannot say, leaves the timeout as it was.
fn late_pong(
    before: Option<SendQueue>,
    queue: Option<SendQueue>,
    read_at: Option<Instant>,
    now: Instant,
    timeout: Duration,
    write: Duration,
) -> Option<(Instant, Option<Instant>)> {
    let backlog = |q: SendQueue| u64::from(q.queued) > BACKLOG;
    let taking = match (before, queue) {
        (Some(before), Some(queue)) => backlog(before) && queue.acked > before.acked,
        _ => false,
    };
    let read_at = if taking { Some(now) } else { read_at };
    match read_at {
        Some(t) if now < t + write => Some(((now + timeout).min(t + write), read_at)),
        Some(_) => None,
        None if before.is_none() && queue.is_some_and(backlog) => Some((now + timeout, None)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: Heartbeat) -> Instant {
        match h {
            Heartbeat::PingAt(t) => t,
            Heartbeat::Awaiting { .. } => unreachable!(),
        }
    }

    #[test]
    fn pings_due_in_one_slot_share_a_time_and_none_is_early_or_a_slot_late() {
        let interval = Duration::from_secs(20);
        let base = Instant::now() + interval;
        let times: Vec<Instant> = (0..500)
            .map(|ms| {
                at(Heartbeat::ping_at(
                    base + Duration::from_millis(ms),
                    interval,
                ))
            })
            .collect();
        for (ms, t) in times.iter().enumerate() {
            let due = base + Duration::from_millis(ms as u64);
            assert!(*t >= due && *t < due + PING_GRID, "{ms} ms");
        }
        let mut distinct = times.clone();
        distinct.dedup();
        assert!(distinct.len() <= 6, "{} slots for 500 ms", distinct.len());
    }

    #[test]
    fn a_late_pong_waits_only_while_the_kernel_sees_the_client_read() {
        let q = |queued, acked| Some(SendQueue { queued, acked });
        let big = 1 << 20;
        let (timeout, write) = (Duration::from_secs(1), Duration::from_secs(10));
        let now = Instant::now();
        let look = |before, queue, read_at| late_pong(before, queue, read_at, now, timeout, write);
        // Nothing held for the client, or no answer from the kernel: the pong is late.
        assert_eq!(look(None, q(0, 100), None), None);
        assert_eq!(look(None, None, None), None);
        assert_eq!(look(q(big, 100), None, None), None);
        // A few segments held back by delayed acknowledgements (a trickle into a client
        // that reads nothing, its kernel taking each): no sign of reading.
        assert_eq!(look(None, q(2000, 100), None), None);
        assert_eq!(look(q(2000, 100), q(1000, 3100), None), None);
        // A backlog first seen: one more timeout to show progress; none shown, late.
        assert_eq!(look(None, q(big, 100), None), Some((now + timeout, None)));
        assert_eq!(look(q(big, 100), q(big, 100), None), None);
        // The kernel took some of it, or all of it (the ping with it): the client reads,
        // and has write_seconds from now, looked at every timeout.
        let reading = Some((now + timeout, Some(now)));
        assert_eq!(look(q(big, 100), q(big - 5, 105), None), reading);
        assert_eq!(look(q(big, 100), q(0, big as u64 + 100), None), reading);
        // Seen reading 9.5 s ago and nothing since: the last half second; at 10 s, late,
        // whatever the kernel says now.
        let earlier = now - Duration::from_millis(9500);
        assert_eq!(
            look(q(0, 110), q(0, 110), Some(earlier)),
            Some((earlier + write, Some(earlier)))
        );
        let long_ago = now - write;
        assert_eq!(look(q(0, 110), None, Some(long_ago)), None);
        assert_eq!(look(None, q(big, 100), Some(long_ago)), None);
    }

    #[test]
    fn a_short_interval_is_rounded_by_a_tenth_of_it() {
        let interval = Duration::from_millis(50);
        let due = Instant::now() + Duration::from_millis(123);
        let t = at(Heartbeat::ping_at(due, interval));
        assert!(t >= due && t < due + interval / 10);
        let zero = Duration::ZERO;
        assert_eq!(at(Heartbeat::ping_at(due, zero)), due);
    }
}
