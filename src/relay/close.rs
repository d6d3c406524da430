//! Why a relayed connection ended, and what each side is sent for it: one table
//! ([`CloseReason::endings`]) from which the close frames, the codes in the close log line
//! and the metric label are all read.

use std::borrow::Cow;

/// The codes the gate sends of its own (1002 and 1007 come from [`super::frame`]).
pub const GOING_AWAY: u16 = 1001;
pub const POLICY_VIOLATION: u16 = 1008;
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// 1014 "Bad Gateway" (RFC 6455 §7.4.1 registry): the upstream failed.
pub const UPSTREAM_UNAVAILABLE: u16 = 1014;

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

    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// A close frame's status code and reason (at most 123 bytes of UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    pub code: u16,
    pub reason: Cow<'static, str>,
}

fn frame(code: u16, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: Cow::Borrowed(reason),
    }
}

/// Why a relayed connection ended: one variant per row of the close table. Feeds the close
/// frames sent to each side, the close log line and the metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// A side sent a close frame (`None`: one without a status code); it is relayed to
    /// the other side.
    Closed { by: Side, frame: Option<CloseFrame> },
    /// A frame or message above the limit (1009 to the sender, 1001 to the other side).
    TooBig(Side),
    /// A protocol violation (1002) or invalid UTF-8 (1007) from that side.
    Protocol(Side, u16),
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
    /// The operator closed it through the admin API (a close request or a revocation).
    Revoked,
}

/// What to do with one side when the relay ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ending {
    /// Send this close frame and wait for the peer's close reply.
    Close(Option<CloseFrame>),
    /// The peer closed first: send this reply (its own code, echoed), and the handshake
    /// is complete.
    Reply(Option<CloseFrame>),
    /// Send this close frame, then let the connection go without waiting for a reply.
    CloseAndDrop(CloseFrame),
    /// Drop the TCP connection at once.
    Drop,
    /// Our close frame is already sent: wait for the peer's close reply.
    AwaitReply,
    /// Both close frames have passed: nothing is left to say.
    Done,
}

impl Ending {
    /// The close code this ending sends, if any.
    fn code(&self) -> Option<u16> {
        match self {
            Ending::Close(frame) | Ending::Reply(frame) => frame.as_ref().map(|f| f.code),
            Ending::CloseAndDrop(f) => Some(f.code),
            Ending::Drop | Ending::AwaitReply | Ending::Done => None,
        }
    }
}

impl CloseReason {
    /// The label of `wsgate_closes_total{reason}`.
    pub fn label(&self) -> &'static str {
        use Side::{Client, Upstream};
        match self {
            CloseReason::Closed { by: Client, .. } => "client_closed",
            CloseReason::Closed { by: Upstream, .. } => "upstream_closed",
            CloseReason::TooBig(Client) => "client_message_too_big",
            CloseReason::TooBig(Upstream) => "upstream_message_too_big",
            CloseReason::Protocol(Client, _) => "client_protocol_error",
            CloseReason::Protocol(Upstream, _) => "upstream_protocol_error",
            CloseReason::Lost(Client) => "client_lost",
            CloseReason::Lost(Upstream) => "upstream_lost",
            CloseReason::Stalled(Client) => "client_write_timeout",
            CloseReason::Stalled(Upstream) => "upstream_write_timeout",
            CloseReason::PolicyChanged => "policy_changed",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::RateExceeded => "message_rate_exceeded",
            CloseReason::TypeNotAllowed => "message_type_not_allowed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Revoked => "revoked",
        }
    }

    /// The close codes sent to (client, upstream); `None` where that side is dropped
    /// without a close frame (or, for a relayed close without a code, gets none).
    pub fn codes(&self) -> (Option<u16>, Option<u16>) {
        let (client, upstream) = self.endings();
        (client.code(), upstream.code())
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
            | CloseReason::Revoked
            | CloseReason::Shutdown => "gate",
        }
    }

    /// The side that broke the protocol or a size limit, if that is why the relay ended.
    pub(super) fn violator(&self) -> Option<Side> {
        match self {
            CloseReason::Protocol(side, _) | CloseReason::TooBig(side) => Some(*side),
            _ => None,
        }
    }

    /// The side that is still relayed what the other sends, until the other's close reply:
    /// a violator (what its peer had sent before the violation still reaches it), or the
    /// side that closed first (RFC 6455 §7.1: an endpoint that has sent its close may still
    /// receive data until the peer's close; a direct connection would deliver it).
    pub(super) fn relayed_until_reply(&self) -> Option<Side> {
        match self {
            CloseReason::Closed { by, .. } => Some(*by),
            _ => self.violator(),
        }
    }

    /// Toward which sides (client, upstream) a frame the relay was in the middle of
    /// passing on is finished before that side's close frame is sent: where its source is
    /// still there and trusted (not a violator, a lost or stalled side, or a dead client),
    /// and the side it goes to is still to be sent a close.
    pub(super) fn frames_to_finish(&self) -> (bool, bool) {
        match self {
            CloseReason::Closed { .. }
            | CloseReason::PolicyChanged
            | CloseReason::IdleTimeout
            | CloseReason::MaxLifetime
            | CloseReason::TokenExpired
            | CloseReason::Shutdown
            | CloseReason::Revoked => (true, true),
            // The client is refused; the upstream's frame toward it still ends first.
            CloseReason::RateExceeded | CloseReason::TypeNotAllowed => (true, false),
            CloseReason::TooBig(_)
            | CloseReason::Protocol(..)
            | CloseReason::Lost(_)
            | CloseReason::Stalled(_)
            | CloseReason::HeartbeatTimeout => (false, false),
        }
    }

    /// How each side is ended: (client, upstream). The close table.
    pub(super) fn endings(&self) -> (Ending, Ending) {
        use Side::{Client, Upstream};
        let going_away = || Ending::Close(Some(frame(GOING_AWAY, "")));
        let unavailable =
            || Ending::Close(Some(frame(UPSTREAM_UNAVAILABLE, "upstream unavailable")));
        let both = |code, reason| {
            (
                Ending::Close(Some(frame(code, reason))),
                Ending::Close(Some(frame(code, reason))),
            )
        };
        // A side that broke the protocol, a limit or the message policy is not waited on:
        // a flooder would keep the gate reading its flood until the write deadline (a
        // ping flood at 12 M frames/s did, in soak.py's attack).
        let refuse = |code, reason| Ending::CloseAndDrop(frame(code, reason));
        match self {
            CloseReason::Closed { by: Client, frame } => {
                (Ending::Reply(frame.clone()), Ending::Close(frame.clone()))
            }
            CloseReason::Closed {
                by: Upstream,
                frame,
            } => (Ending::Close(frame.clone()), Ending::Reply(frame.clone())),
            CloseReason::TooBig(Client) => {
                (refuse(MESSAGE_TOO_BIG, "message too big"), going_away())
            }
            CloseReason::TooBig(Upstream) => {
                (going_away(), refuse(MESSAGE_TOO_BIG, "message too big"))
            }
            CloseReason::Protocol(Client, code) => {
                (refuse(*code, protocol_text(*code)), going_away())
            }
            CloseReason::Protocol(Upstream, code) => {
                (unavailable(), refuse(*code, protocol_text(*code)))
            }
            CloseReason::Lost(Client) | CloseReason::Stalled(Client) => {
                (Ending::Drop, going_away())
            }
            CloseReason::Lost(Upstream) | CloseReason::Stalled(Upstream) => {
                (unavailable(), Ending::Drop)
            }
            CloseReason::PolicyChanged => (
                Ending::Close(Some(frame(POLICY_VIOLATION, "policy changed"))),
                going_away(),
            ),
            // A dead client gets its close without waiting for an answer.
            CloseReason::HeartbeatTimeout => {
                (refuse(GOING_AWAY, "heartbeat timeout"), going_away())
            }
            CloseReason::IdleTimeout => both(GOING_AWAY, "idle timeout"),
            CloseReason::MaxLifetime => both(GOING_AWAY, "max lifetime"),
            CloseReason::TokenExpired => (
                Ending::Close(Some(frame(POLICY_VIOLATION, "token expired"))),
                going_away(),
            ),
            CloseReason::RateExceeded => (
                refuse(POLICY_VIOLATION, "message rate exceeded"),
                going_away(),
            ),
            CloseReason::TypeNotAllowed => (
                refuse(POLICY_VIOLATION, "message type not allowed"),
                going_away(),
            ),
            CloseReason::Shutdown => both(GOING_AWAY, "going away"),
            CloseReason::Revoked => (
                Ending::Close(Some(frame(POLICY_VIOLATION, "revoked"))),
                going_away(),
            ),
        }
    }
}

/// The close reason for a protocol failure's code: 1007 is bad data inside a message
/// (invalid UTF-8, a corrupt deflate stream, a close reason that is not UTF-8), 1002 a
/// broken frame.
fn protocol_text(code: u16) -> &'static str {
    match code {
        1007 => "invalid payload data",
        _ => "protocol error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(code: u16, reason: &'static str) -> Option<CloseFrame> {
        Some(frame(code, reason))
    }

    /// The close table: the codes each side gets, and who caused it.
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
            (
                Closed {
                    by: Side::Client,
                    frame: None,
                },
                (None, None),
                "client",
            ),
            (TooBig(Side::Client), (Some(1009), Some(1001)), "client"),
            (TooBig(Side::Upstream), (Some(1001), Some(1009)), "upstream"),
            (
                Protocol(Side::Client, 1007),
                (Some(1007), Some(1001)),
                "client",
            ),
            (
                Protocol(Side::Upstream, 1002),
                (Some(1014), Some(1002)),
                "upstream",
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
            (Revoked, (Some(1008), Some(1001)), "gate"),
        ];
        for (reason, codes, side) in rows {
            assert_eq!(reason.codes(), codes, "{reason:?}");
            assert_eq!(reason.side(), side, "{reason:?}");
            assert!(!reason.label().is_empty());
        }
    }
}
