//! What the client may send (client → upstream only): message types and a token bucket,
//! checked once per message as its first frame's header arrives.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderValue;
use tokio::time::Instant;

use super::close::CloseReason;
use crate::metrics::Metrics;
use crate::policy::Route;

/// What kind of message a token is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Text,
    Binary,
    /// A ping or a pong.
    Control,
}

pub(super) struct Inbound {
    allow_text: bool,
    allow_binary: bool,
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    /// In report mode violations are counted and the message is relayed; the connection's
    /// request id is kept for its log line (on the heap, and only then: a connection in
    /// enforce mode pays one pointer).
    report: Option<Box<HeaderValue>>,
    pub(super) violations: u64,
    /// For the report-mode log line and counter.
    route: Arc<Route>,
    metrics: Arc<Metrics>,
    client_ip: IpAddr,
}

impl Inbound {
    pub(super) fn new(
        route: Arc<Route>,
        metrics: Arc<Metrics>,
        client_ip: IpAddr,
        report: Option<Box<HeaderValue>>,
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
    pub(super) fn check(&mut self, kind: Kind, now: Instant) -> Option<CloseReason> {
        let allowed = match kind {
            Kind::Text => self.allow_text,
            Kind::Binary => self.allow_binary,
            // Pings and pongs are always allowed, but each takes a token: a ping costs
            // the gate a pong, and an unmetered flood of them starves every other
            // connection on the same thread.
            Kind::Control => true,
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
        let Some(request_id) = &self.report else {
            return Some(violation);
        };
        self.violations += 1;
        self.metrics
            .report_violation(&self.route.name, violation.label());
        if self.violations == 1 {
            // Once per connection: a flood in report mode must not flood the log.
            tracing::warn!(
                request_id = %request_id.to_str().unwrap_or("-"),
                route = self.route.name.as_str(),
                client_ip = %self.client_ip,
                reason = violation.label(),
                "report mode: this message would have closed the connection"
            );
        }
        None
    }
}
