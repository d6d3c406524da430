//! The admin listener (plain HTTP): `/healthz`, `/readyz`, `/metrics`, `/policy`, open to
//! anyone who reaches it, and the [`operator`](crate::operator) endpoints, which require
//! the admin token.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{full, Body};
use crate::head::Prefixed;
use crate::Gate;

/// Admin connections open at once. Probes, scrapes and operator calls need a handful; past
/// it the oldest connection is closed to make room, so that a reachable admin port cannot
/// spend the file descriptors the proxied connections need, and so that connections held
/// open by someone else cannot keep a probe out.
pub const MAX_ADMIN_CONNECTIONS: usize = 128;

/// How often, at most, closing the oldest admin connection is logged as a warning.
const EVICTION_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a warning that repeats is due (none in the last [`EVICTION_WARNING_EVERY`]);
/// if so, `warned_at` is now.
fn warning_due(warned_at: &mut Option<std::time::Instant>) -> bool {
    let now = std::time::Instant::now();
    let due = warned_at.is_none_or(|at| now.duration_since(at) >= EVICTION_WARNING_EVERY);
    if due {
        *warned_at = Some(now);
    }
    due
}

/// The admin connections open, oldest first, each with what closes it.
#[derive(Default)]
struct Open {
    next: u64,
    connections: std::collections::VecDeque<(u64, CancellationToken)>,
    warned_at: Option<std::time::Instant>,
}

impl Open {
    /// Admit a connection: its id and what closes it. At the cap, the oldest connection
    /// is closed first.
    fn admit(&mut self, peer: std::net::SocketAddr) -> (u64, CancellationToken) {
        if self.connections.len() >= MAX_ADMIN_CONNECTIONS {
            self.close_oldest();
            if warning_due(&mut self.warned_at) {
                tracing::warn!(%peer, "{MAX_ADMIN_CONNECTIONS} admin connections are open: the oldest was closed to make room (logged at most once a minute)");
            } else {
                tracing::debug!(%peer, "admin connections at their cap: the oldest was closed");
            }
        }
        let id = self.next;
        self.next += 1;
        let close = CancellationToken::new();
        self.connections.push_back((id, close.clone()));
        (id, close)
    }

    fn lock(open: &std::sync::Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
        open.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Close the oldest connection (its task gives its descriptor back); whether there was
    /// one.
    fn close_oldest(&mut self) -> bool {
        self.connections
            .pop_front()
            .map(|(_, oldest)| oldest.cancel())
            .is_some()
    }

    fn remove(&mut self, id: u64) {
        if let Some(at) = self.connections.iter().position(|(i, _)| *i == id) {
            self.connections.remove(at);
        }
    }
}

/// How long a request's head may take to arrive, and a kept-alive connection may wait for
/// its next request; and how long a response may wait for the client to take a byte.
pub const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The read buffer of an admin connection: a request head, or a piece of a body (at most
/// 16 KiB, which the operator API reads in pieces), fits in it.
const ADMIN_BUFFER_BYTES: usize = 16 * 1024;

/// File descriptors the admin listener keeps in reserve (open on `/dev/null`): when
/// clients have taken every descriptor the process may have, one is given up to accept a
/// probe, so that `/healthz` and `/readyz` still answer and the kubelet does not restart
/// a gate that is merely full. Taken back when that connection ends, and by the gate's
/// listener before it accepts a client while the reserve is short: a descriptor that
/// comes free goes to the reserve first.
const RESERVED_FDS: usize = 4;

/// The descriptors held for the admin listener (one process, one reserve).
static RESERVE: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());

/// How many [`RESERVE`] holds, read without its lock on the gate's accept path.
static RESERVED: AtomicUsize = AtomicUsize::new(0);

/// Whether an admin listener serves (none with `--admin off`: no reserve then).
static SERVING: AtomicBool = AtomicBool::new(false);

fn reserve() -> std::sync::MutexGuard<'static, Vec<std::fs::File>> {
    RESERVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Give one reserved descriptor up; whether there was one.
fn release_reserved() -> bool {
    let mut held = reserve();
    let released = held.pop().is_some();
    RESERVED.store(held.len(), Ordering::Relaxed);
    released
}

/// Take descriptors back up to [`RESERVED_FDS`], as far as the process has them. Costs
/// nothing while the reserve is full.
pub fn refill_reserve() {
    if RESERVED.load(Ordering::Relaxed) >= RESERVED_FDS || !SERVING.load(Ordering::Relaxed) {
        return;
    }
    let mut held = reserve();
    while held.len() < RESERVED_FDS {
        match std::fs::File::open("/dev/null") {
            Ok(file) => held.push(file),
            Err(_) => break,
        }
    }
    RESERVED.store(held.len(), Ordering::Relaxed);
}

/// Out of file descriptors (EMFILE for the process, ENFILE for the system).
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// Serve the admin endpoints until the gate exits. The admin listener stays up through
/// the shutdown delay and the drain, so that `/readyz` can say 503.
pub async fn serve(listener: TcpListener, gate: Arc<Gate>) {
    let tasks = gate.shutdown.tasks.clone();
    let exit = tasks.exit();
    let open = Arc::new(std::sync::Mutex::new(Open::default()));
    SERVING.store(true, Ordering::Relaxed);
    refill_reserve();
    let mut starved_warned_at: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = exit.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            // Make room from the reserve and accept again at once.
            Err(e) if out_of_descriptors(&e) && release_reserved() => continue,
            // The reserve went to admin connections still open (idle ones, perhaps held
            // by someone else): the oldest goes, as at the cap, so that they cannot keep a
            // probe out. Its task closes its socket and takes the descriptor back into the
            // reserve; then the accept above gets it.
            Err(e) if out_of_descriptors(&e) && Open::lock(&open).close_oldest() => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            }
            Err(e) => {
                // Out of descriptors, this repeats every 100 ms until clients let some go:
                // warned about at most once a minute.
                if !out_of_descriptors(&e) || warning_due(&mut starved_warned_at) {
                    tracing::warn!(error = %e, "admin accept failed");
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                refill_reserve();
                continue;
            }
        };
        let (id, closed) = Open::lock(&open).admit(peer);
        let gate = gate.clone();
        let exit = exit.clone();
        let open = open.clone();
        tasks.spawn(async move {
            let service = service_fn(move |req| {
                respond(gate.clone(), req, crate::admission::canonical(peer.ip()))
            });
            let io = Prefixed::new(Bytes::new(), tcp, ADMIN_TIMEOUT);
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_TIMEOUT)
                .max_buf_size(ADMIN_BUFFER_BYTES)
                .serve_connection(TokioIo::new(io), service);
            tokio::select! {
                _ = connection => {}
                () = exit.cancelled() => {}
                () = closed.cancelled() => {}
            }
            Open::lock(&open).remove(id);
            // The connection's descriptor is closed: take it back into the reserve before
            // a client's accept does.
            refill_reserve();
        });
    }
}

async fn respond(
    gate: Arc<Gate>,
    req: Request<Incoming>,
    peer: std::net::IpAddr,
) -> Result<Response<Body>, Infallible> {
    if crate::operator::is_operator_path(req.uri().path()) {
        return Ok(crate::operator::respond(&gate.operator, req, peer).await);
    }
    let known = matches!(
        req.uri().path(),
        "/metrics" | "/policy" | "/healthz" | "/readyz"
    );
    if known && !matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
        return Ok(crate::operator::method_not_allowed("GET, HEAD"));
    }
    match req.uri().path() {
        "/metrics" => {
            // Expired revocations leave `wsgate_revocations_active` before it is read.
            gate.operator.revocations.evict();
            // OpenMetrics for a scraper that asks for it (Prometheus does), Prometheus'
            // text format 0.0.4 otherwise, as Prometheus' own client libraries answer.
            let accept = req.headers().get_all(http::header::ACCEPT);
            let openmetrics = wants_openmetrics(accept.iter().filter_map(|v| v.to_str().ok()));
            let (content_type, text) = if openmetrics {
                (
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    gate.metrics.encode(),
                )
            } else {
                (
                    "text/plain; version=0.0.4; charset=utf-8",
                    gate.metrics.encode_prometheus_text(),
                )
            };
            return Ok(Response::builder()
                .header(http::header::CONTENT_TYPE, content_type)
                .body(full(Bytes::from(text)))
                .unwrap_or_default());
        }
        "/policy" => {
            let described = gate.policy.load().describe();
            return Ok(Response::builder()
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(full(Bytes::from(described.to_string())))
                .unwrap_or_default());
        }
        _ => {}
    }
    let (status, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "ok\n"),
        "/readyz" if !gate.shutdown.is_ready() => (StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/readyz" => (StatusCode::OK, "ready\n"),
        _ => return Ok(crate::operator::not_found()),
    };
    Ok(Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(full(Bytes::from_static(body.as_bytes())))
        .unwrap_or_default())
}

/// Whether an `Accept` header (its values) prefers OpenMetrics to Prometheus' text format:
/// OpenMetrics with a quality above 0 and at least that of `text/plain` (or `text/*`,
/// `*/*`), as Prometheus' client libraries negotiate. Prometheus asks for OpenMetrics
/// first; `curl` (`*/*`) gets the text format.
fn wants_openmetrics<'a>(values: impl Iterator<Item = &'a str>) -> bool {
    let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
    for range in values.flat_map(|v| v.split(',')) {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, q)| q.trim().parse::<f32>().unwrap_or(0.0));
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

#[cfg(test)]
mod tests {
    use super::wants_openmetrics;

    #[test]
    fn openmetrics_is_chosen_by_quality() {
        for (accept, openmetrics) in [
            ("application/openmetrics-text", true),
            (
                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,\
                 application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;\
                 escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
                true,
            ),
            ("text/plain;q=0.1,application/openmetrics-text;q=0", false),
            ("text/plain, application/openmetrics-text;q=0.5", false),
            ("*/*", false),
            ("", false),
            ("Application/OpenMetrics-Text; Q=0.9", true),
        ] {
            assert_eq!(
                wants_openmetrics([accept].into_iter()),
                openmetrics,
                "{accept}"
            );
        }
    }
}
