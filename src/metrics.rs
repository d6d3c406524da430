//! Prometheus metrics (prometheus-client): the names of docs/operations.md (Metrics) plus ping round-trip
//! time, connection duration and certificate reloads.
//!
//! Labels are bounded: route names come from the policy, reasons and results from fixed
//! enums; nothing a client sends becomes a label. The per-message path takes no lock: a
//! connection resolves its counters once when it opens and then only adds to atomics.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `route` label before a route is chosen.
pub const NO_ROUTE: &str = "none";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpgradeLabels {
    pub route: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub route: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub route: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// A family whose `# HELP` and `# TYPE` lines are written before its first series too:
/// prometheus-client leaves an empty family out, and every documented name is exposed
/// from the start, so that a dashboard or an `absent()` alert finds it on a fresh gate
/// (a family with no sample is valid in both text formats).
#[derive(Debug)]
struct Exposed<M>(M);

impl<M: EncodeMetric> EncodeMetric for Exposed<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn duration_histogram() -> Histogram {
    // 1 s .. ~16 h (3^10 s)
    Histogram::new(exponential_buckets(1.0, 3.0, 11))
}

/// Every metric the gate exposes.
pub struct Metrics {
    registry: Registry,
    pub connections_active: Family<RouteLabel, Gauge>,
    pub upgrades: Family<UpgradeLabels, Counter>,
    pub messages: Family<DirectionLabels, Counter>,
    pub message_bytes: Family<DirectionLabels, Counter>,
    pub message_inflated_bytes: Family<DirectionLabels, Counter>,
    pub closes: Family<ReasonLabels, Counter>,
    pub policy_reloads: Family<ResultLabel, Counter>,
    pub report_violations: Family<ReasonLabels, Counter>,
    pub upgrade_duration: Histogram,
    pub ping_rtt: HistogramFamily<RouteLabel>,
    pub connection_duration: HistogramFamily<RouteLabel>,
    pub tls_reloads: Family<ResultLabel, Counter>,
    /// When the served chain expires: its certificates' earliest notAfter, in Unix seconds
    /// (exposed only when known: see [`Metrics::expose_certificate_expiry`]).
    pub tls_certificate_expiry: Gauge,
    /// Revocations in force (the operator API).
    pub revocations_active: Gauge,
    /// 1 when the last cluster store operation succeeded.
    pub cluster_up: Gauge,
    /// Failed or timed-out cluster store operations by `op`.
    pub cluster_errors: Family<OpLabel, Counter>,
    /// Upgrade decisions (the address checks, the subject's cap, the revocations not loaded
    /// yet) taken on this process's own limits because the store was unreachable: up to
    /// three per upgrade.
    pub cluster_fallbacks: Counter,
    /// `wsgate_client_connections_total{protocol}`'s two series, made once: HTTP/1.1, h2.
    client_connections: [Counter; 2],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let client_connections = Family::<ProtocolLabel, Counter>::default();
        let m = Metrics {
            connections_active: Family::default(),
            upgrades: Family::default(),
            messages: Family::default(),
            message_bytes: Family::default(),
            message_inflated_bytes: Family::default(),
            closes: Family::default(),
            policy_reloads: Family::default(),
            report_violations: Family::default(),
            upgrade_duration: latency_histogram(),
            ping_rtt: Family::new_with_constructor(latency_histogram),
            connection_duration: Family::new_with_constructor(duration_histogram),
            tls_reloads: Family::default(),
            tls_certificate_expiry: Gauge::default(),
            revocations_active: Gauge::default(),
            cluster_up: Gauge::default(),
            cluster_errors: Family::default(),
            cluster_fallbacks: Counter::default(),
            client_connections: ["http/1.1", "h2"].map(|protocol| {
                client_connections.get_or_create_owned(&ProtocolLabel { protocol })
            }),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counters itself.
        registry.register(
            "wsgate_connections_active",
            "Open WebSocket connections",
            Exposed(m.connections_active.clone()),
        );
        registry.register(
            "wsgate_upgrades",
            "Upgrade requests by result: accepted or the refusal reason",
            Exposed(m.upgrades.clone()),
        );
        registry.register(
            "wsgate_messages",
            "Relayed text and binary messages",
            Exposed(m.messages.clone()),
        );
        registry.register(
            "wsgate_message_bytes",
            "Payload bytes of relayed messages",
            Exposed(m.message_bytes.clone()),
        );
        registry.register(
            "wsgate_message_inflated_bytes",
            "Inflated payload bytes of relayed compressed (permessage-deflate) messages",
            Exposed(m.message_inflated_bytes.clone()),
        );
        registry.register(
            "wsgate_closes",
            "Relayed connections closed, by reason",
            Exposed(m.closes.clone()),
        );
        registry.register(
            "wsgate_policy_reloads",
            "Policy reloads after start-up",
            m.policy_reloads.clone(),
        );
        registry.register(
            "wsgate_report_violations",
            "Violations let through in report mode",
            Exposed(m.report_violations.clone()),
        );
        registry.register(
            "wsgate_upgrade_duration_seconds",
            "Accept to 101",
            m.upgrade_duration.clone(),
        );
        registry.register(
            "wsgate_ping_rtt_seconds",
            "Heartbeat ping to pong round trip",
            Exposed(m.ping_rtt.clone()),
        );
        registry.register(
            "wsgate_connection_duration_seconds",
            "Lifetime of relayed connections",
            Exposed(m.connection_duration.clone()),
        );
        registry.register(
            "wsgate_tls_reloads",
            "Certificate reloads after start-up",
            m.tls_reloads.clone(),
        );
        registry.register(
            "wsgate_revocations_active",
            "Revocations (sub or jti) in force, set through the operator API",
            m.revocations_active.clone(),
        );
        registry.register(
            "wsgate_cluster_up",
            "1 when the last cluster store operation succeeded, else 0",
            m.cluster_up.clone(),
        );
        registry.register(
            "wsgate_cluster_errors",
            "Cluster store operations that failed or timed out, by operation",
            Exposed(m.cluster_errors.clone()),
        );
        registry.register(
            "wsgate_cluster_fallbacks",
            "Upgrade decisions (the address checks, the subject's cap, the revocations not loaded yet) taken on this process's own limits because the cluster store was unreachable",
            m.cluster_fallbacks.clone(),
        );
        registry.register(
            "wsgate_client_connections",
            "Client connections that sent a request, by protocol (http/1.1 or h2)",
            client_connections,
        );
        // Reload series exist from the start at 0, so a first failure shows in increase().
        for result in ["success", "failure"] {
            m.policy_reloads
                .get_or_create_owned(&ResultLabel { result });
            m.tls_reloads.get_or_create_owned(&ResultLabel { result });
        }
        Metrics { registry, ..m }
    }

    /// Expose `wsgate_tls_certificate_expiry_timestamp_seconds`, starting at `not_after`:
    /// only on a gate serving TLS whose certificate's dates are known, so that a plaintext
    /// gate shows no expiry of 0 for an alert on it to fire.
    pub fn expose_certificate_expiry(&mut self, not_after: i64) {
        self.tls_certificate_expiry.set(not_after);
        self.registry.register(
            "wsgate_tls_certificate_expiry_timestamp_seconds",
            "When the served TLS certificate chain expires (its earliest notAfter), in Unix seconds",
            self.tls_certificate_expiry.clone(),
        );
    }

    /// The text exposition (OpenMetrics) of every metric.
    /// The exposition in OpenMetrics' text format (prometheus-client's own).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The exposition in Prometheus' text format 0.0.4, for a scraper that does not ask
    /// for OpenMetrics (see [`to_prometheus_text`]).
    pub fn encode_prometheus_text(&self) -> String {
        to_prometheus_text(&self.encode())
    }

    pub fn upgrade(&self, route: &str, result: &'static str) {
        self.upgrades
            .get_or_create_owned(&UpgradeLabels {
                route: route.to_owned(),
                result,
            })
            .inc();
    }

    /// A client connection sent its first request, over HTTP/1.1 or, with `h2`, HTTP/2.
    pub fn client_connection(&self, h2: bool) {
        self.client_connections[usize::from(h2)].inc();
    }

    pub fn report_violation(&self, route: &str, reason: &'static str) {
        self.report_violations
            .get_or_create_owned(&ReasonLabels {
                route: route.to_owned(),
                reason,
            })
            .inc();
    }

    /// The counters one connection updates, resolved once when it opens.
    pub fn connection(self: &Arc<Self>, route: &str) -> ConnectionMetrics {
        let direction = |d| DirectionLabels {
            route: route.to_owned(),
            direction: d,
        };
        let label = RouteLabel {
            route: route.to_owned(),
        };
        // `get_or_create` hands out a read guard on the family; two of them alive in one
        // statement deadlock when the second must insert. Owned lookups hold no guard.
        let active = self.connections_active.get_or_create_owned(&label);
        active.inc();
        ConnectionMetrics {
            client_to_upstream: MessageCounters {
                messages: self
                    .messages
                    .get_or_create_owned(&direction("client_to_upstream")),
                bytes: self
                    .message_bytes
                    .get_or_create_owned(&direction("client_to_upstream")),
                inflated: self
                    .message_inflated_bytes
                    .get_or_create_owned(&direction("client_to_upstream")),
            },
            upstream_to_client: MessageCounters {
                messages: self
                    .messages
                    .get_or_create_owned(&direction("upstream_to_client")),
                bytes: self
                    .message_bytes
                    .get_or_create_owned(&direction("upstream_to_client")),
                inflated: self
                    .message_inflated_bytes
                    .get_or_create_owned(&direction("upstream_to_client")),
            },
            ping_rtt: self.ping_rtt.get_or_create_owned(&label),
            open: OpenConnection {
                active: Some(active),
                metrics: self.clone(),
            },
        }
    }
}

/// Messages and bytes in one direction.
#[derive(Clone, Debug)]
pub struct MessageCounters {
    pub messages: Counter,
    pub bytes: Counter,
    /// Inflated bytes of compressed messages.
    pub inflated: Counter,
}

impl MessageCounters {
    pub fn count(&self, bytes: usize) {
        self.messages.inc();
        self.bytes.inc_by(bytes as u64);
    }
}

/// One open connection's metrics, taken apart by the relay: each direction's counters go
/// to that direction, the round-trip histogram to the heartbeat.
pub struct ConnectionMetrics {
    pub client_to_upstream: MessageCounters,
    pub upstream_to_client: MessageCounters,
    pub ping_rtt: Histogram,
    pub open: OpenConnection,
}

/// A connection's place in `wsgate_connections_active`, left when its close is counted
/// (or when this drops).
pub struct OpenConnection {
    active: Option<Gauge>,
    metrics: Arc<Metrics>,
}

impl OpenConnection {
    /// Count the close and the connection's lifetime; it leaves
    /// `wsgate_connections_active` with them, not once its sockets have lingered.
    pub fn closed(&mut self, route: &str, reason: &'static str, seconds: f64) {
        if let Some(active) = self.active.take() {
            active.dec();
        }
        self.metrics
            .closes
            .get_or_create_owned(&ReasonLabels {
                route: route.to_owned(),
                reason,
            })
            .inc();
        self.metrics
            .connection_duration
            .get_or_create_owned(&RouteLabel {
                route: route.to_owned(),
            })
            .observe(seconds);
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(active) = self.active.take() {
            active.dec();
        }
    }
}

/// OpenMetrics text as Prometheus' text format 0.0.4: a counter's `# HELP` and `# TYPE`
/// lines name its `_total` series (OpenMetrics names the family without the suffix, which
/// a 0.0.4 parser reads as a different, empty metric), `unknown` becomes `untyped`, and
/// the `# UNIT` and `# EOF` lines go. Samples are the same in both formats.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 1024);
    // prometheus-client writes a family's HELP line just before its TYPE line; the HELP
    // waits here until the TYPE says whether the name needs its suffix.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(waiting) = help.replace(rest) {
                push_line(&mut out, &["# HELP ", waiting]);
            }
            continue;
        }
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|t| t.split_once(' ')) {
            let (suffix, kind) = match kind {
                "counter" => ("_total", kind),
                "unknown" => ("", "untyped"),
                _ => ("", kind),
            };
            if let Some(waiting) = help.take() {
                match waiting.split_once(' ') {
                    Some((of, text)) if of == name => {
                        push_line(&mut out, &["# HELP ", name, suffix, " ", text]);
                    }
                    _ => push_line(&mut out, &["# HELP ", waiting]),
                }
            }
            push_line(&mut out, &["# TYPE ", name, suffix, " ", kind]);
            continue;
        }
        if let Some(waiting) = help.take() {
            push_line(&mut out, &["# HELP ", waiting]);
        }
        push_line(&mut out, &[line]);
    }
    if let Some(waiting) = help {
        push_line(&mut out, &["# HELP ", waiting]);
    }
    out
}

fn push_line(out: &mut String, parts: &[&str]) {
    parts.iter().for_each(|p| out.push_str(p));
    out.push('\n');
}

#[cfg(test)]
mod text_format_tests {
    use super::to_prometheus_text;

    #[test]
    fn counters_are_named_by_their_series_and_eof_goes() {
        let om = "# HELP wsgate_upgrades Upgrade requests.\n# TYPE wsgate_upgrades counter\nwsgate_upgrades_total{route=\"ws\",result=\"accepted\"} 3\n# HELP wsgate_connections_active Open connections.\n# TYPE wsgate_connections_active gauge\nwsgate_connections_active{route=\"ws\"} 1\n# TYPE x unknown\nx 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP wsgate_upgrades_total Upgrade requests.\n# TYPE wsgate_upgrades_total counter\nwsgate_upgrades_total{route=\"ws\",result=\"accepted\"} 3\n# HELP wsgate_connections_active Open connections.\n# TYPE wsgate_connections_active gauge\nwsgate_connections_active{route=\"ws\"} 1\n# TYPE x untyped\nx 1\n"
        );
    }
}
