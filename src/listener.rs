//! Accept loop → TLS (or plaintext) → hyper HTTP/1.1 with upgrades, or HTTP/2 (ALPN `h2`,
//! or the h2c preface on plaintext; see [`crate::http2`]), one task per connection.
//!
//! The TLS handshake and the first request head must complete within `handshake_seconds`
//! of the accept; the first head is read and checked by [`head`] (a head over 16 KiB
//! gets 431). When it is an upgrade that is admitted, the 101 is written here and the
//! socket goes to the relay; otherwise hyper serves the connection. Accept errors such as EMFILE
//! back off instead of spinning.
//!
//! Listeners share their port (`SO_REUSEPORT`) so a replacement process can bind beside a
//! draining one. When the gate stops accepting, the listener takes what is already queued
//! and closes; a connection still silent (TLS handshake or first head) a moment after is
//! dropped rather than waited for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::admission::Rejection;
use crate::handshake::is_upgrade;
use crate::head::{self, Head, Prefixed, MAX_HEAD_BYTES};
use crate::http::{answer, handle, Asked, ConnInfo};
use crate::keepalive::{Ending, Requests};
use crate::relay::Protocol;
use crate::{http2, linger, relay, shutdown, Gate};

/// The longest the gate waits to write a 101 it answered itself (a few hundred bytes into
/// a fresh socket's buffer: only a peer that reads nothing at all could hold it up).
const SWITCH_WRITE: Duration = Duration::from_secs(5);

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The accept queue's length. tokio's `TcpListener::bind` asks for 128, which a burst of
/// upgrades overflows (a dropped SYN costs the client a 1 s retransmit); nginx and Envoy
/// ask for 511 and 1024 or more. The kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: u32 = 1024;

/// Listen on `addr` with [`BACKLOG`], address reuse on (like `TcpListener::bind`) and, on
/// Unix, port reuse: a replacement process can bind the same address while this one still
/// serves or drains, and the kernel spreads new connections over both until this one
/// closes its listener. Linux lets only sockets of the same effective user share a port.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    #[cfg(all(unix, not(target_os = "solaris"), not(target_os = "illumos")))]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accept connections until the gate stops accepting; then accept what the kernel has
/// already queued, and close the listener (a connection left in a closed listener's queue
/// is reset).
pub async fn serve(listener: TcpListener, gate: Arc<Gate>) {
    let stop = gate.shutdown.accepting();
    // Held until the listener is closed.
    let _open = gate.shutdown.opening();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // A descriptor that came free goes to the admin listener's reserve before a
        // client can take it (nothing to do while the reserve is full).
        crate::admin::refill_reserve();
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                spawn_connection(&gate, tcp, peer);
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS/ENOMEM: wait for resources to come back rather than
                // spin on a listener that stays readable.
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    () = sleep(backoff) => {}
                    () = stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    let swept = match listener.into_std() {
        Ok(std_listener) => sweep(&std_listener, &gate),
        Err(_) => 0,
    };
    tracing::info!(swept, "listener closed");
}

/// Accept, without waiting, the connections already in the accept queue (at most
/// [`BACKLOG`]); returns how many.
fn sweep(listener: &std::net::TcpListener, gate: &Arc<Gate>) -> u32 {
    let mut swept = 0;
    for _ in 0..BACKLOG {
        match listener.accept() {
            Ok((tcp, peer)) => {
                let tcp = tcp
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpStream::from_std(tcp));
                if let Ok(tcp) = tcp {
                    spawn_connection(gate, tcp, peer);
                    swept += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // ECONNABORTED and the like: that one is gone; try the next.
            Err(_) => continue,
        }
    }
    swept
}

fn spawn_connection(gate: &Arc<Gate>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let opening = gate.shutdown.opening();
    // Boxed: the connection's future is large (about 13 KiB: the TLS handshake, HTTP/1.1,
    // HTTP/2 and the admission all live in it), and the runtime moves a task's future by
    // value when it spawns it and again when it completes; moving a box moves a pointer.
    gate.shutdown
        .tracker()
        .spawn(Box::pin(connection(gate.clone(), tcp, peer, opening)));
}

/// One accepted connection. `opening` is held until its first request has been answered
/// (or it ended); until then, the drain waits for it (see `Shutdown::opened`).
async fn connection(
    gate: Arc<Gate>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    opening: TaskTrackerToken,
) {
    let (handshake, h2) = {
        let policy = &gate.policy.load().policy;
        (policy.handshake_timeout, policy.http2.enabled)
    };
    let accepted = Instant::now();
    let deadline = accepted + handshake;
    match &gate.tls {
        Some(acceptor) => {
            // nginx's answer to plain HTTP on its TLS port, rather than a TLS alert that an
            // HTTP client shows as an empty reply.
            let plain = timeout_at(deadline, sent_plain_http(&tcp));
            let plain = unless_stopped(&gate, plain).await;
            if plain.is_none() {
                tracing::debug!(%peer, "dropped before its TLS handshake: the listener has stopped");
                return;
            }
            if let Some(Ok(true)) = plain {
                drop(opening);
                gate.metrics.client_connection(false);
                let info = ConnInfo {
                    peer,
                    tls: false,
                    accepted,
                    protocol: Protocol::Http1,
                    first: true,
                };
                let refusal = Rejection::BadRequest(
                    "plain HTTP was sent to the TLS port: use https:// or wss://",
                );
                return refuse_unparsed(&gate, tcp, info, refusal).await;
            }
            let handshake = timeout_at(deadline, acceptor.accept(tcp, h2));
            match unless_stopped(&gate, handshake).await {
                Some(Ok(Ok(stream))) => {
                    let info = ConnInfo {
                        peer,
                        tls: true,
                        accepted,
                        protocol: Protocol::Http1,
                        first: true,
                    };
                    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                        // Bounded writes as for h2c: a client that stops reading is
                        // dropped after `write_seconds`, not at the keep-alive's ping.
                        let limit = write_limit(&gate);
                        let io = Prefixed::new(bytes::Bytes::new(), stream, limit);
                        http2::serve(gate, io, info, deadline, opening).await
                    } else {
                        serve_http(gate, stream, info, deadline, opening, false).await
                    }
                }
                Some(Ok(Err(e))) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Some(Err(_)) => tracing::debug!(%peer, "TLS handshake timed out"),
                None => tracing::debug!(%peer, "dropped in its TLS handshake: draining"),
            }
        }
        None => {
            let info = ConnInfo {
                peer,
                tls: false,
                accepted,
                protocol: Protocol::Http1,
                first: true,
            };
            serve_http(gate, tcp, info, deadline, opening, h2).await
        }
    }
}

/// Answer a connection whose request was refused before it could be parsed (a head over
/// the limits, or not HTTP/1.1 at all, or plain HTTP on the TLS port) with `rejection`,
/// count and log it as every other refusal, and close it gracefully.
async fn refuse_unparsed<I>(gate: &Gate, mut io: I, info: ConnInfo, rejection: Rejection)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    gate.metrics
        .upgrade(crate::metrics::NO_ROUTE, rejection.reason());
    // The same fields as every other refusal's line; the head was not parsed, so its id
    // is a fresh one and there is no path.
    let request_id = crate::http::request_id(&http::HeaderMap::new());
    tracing::info!(
        request_id = %request_id.to_str().unwrap_or("-"), client_ip = %info.peer.ip(),
        route = crate::metrics::NO_ROUTE, result = rejection.reason(),
        status = rejection.status().as_u16(),
        latency_ms = crate::http::log_millis(info.accepted.elapsed()),
        protocol = info.protocol.as_str(), "request refused"
    );
    if head::refuse(&mut io, rejection).await.is_ok() {
        linger::close(&mut io, Instant::now() + linger::LINGER_TIME).await;
    }
}

/// Whether a connection to the TLS port opened with plain HTTP: a request line starts with
/// a method's capital letter, where a TLS record starts with its content type (22, a
/// handshake). Waits for the first byte (the caller bounds the wait).
async fn sent_plain_http(tcp: &tokio::net::TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(tcp.peek(&mut first).await, Ok(1) if first[0].is_ascii_uppercase())
}

/// `work` (a TLS handshake, a first request head), unless the listener has stopped and
/// [`shutdown::SILENT_GRACE`] has passed: a connection that has not sent its request by
/// then is dropped rather than holding the drain (and every WebSocket's 1001) for its
/// handshake timeout or the first answers' wait.
async fn unless_stopped<F: std::future::Future>(gate: &Gate, work: F) -> Option<F::Output> {
    let accepting = gate.shutdown.accepting();
    let stopped = async {
        accepting.cancelled().await;
        sleep(shutdown::SILENT_GRACE).await;
    };
    tokio::select! {
        out = work => Some(out),
        () = stopped => None,
    }
}

/// An HTTP/1.1 connection, or with `h2c`, one that may turn out to be HTTP/2 with prior
/// knowledge.
async fn serve_http<I>(
    gate: Arc<Gate>,
    io: I,
    info: ConnInfo,
    deadline: Instant,
    opening: TaskTrackerToken,
    h2c: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + Into<relay::Io> + 'static,
{
    let mut io = io;
    let first = timeout_at(deadline, head::read_first(&mut io, MAX_HEAD_BYTES, h2c));
    let head = unless_stopped(&gate, first).await;
    // Counted once it has sent a request (an HTTP/2 one, at its first stream).
    if let Some(Ok(Ok(Head::Complete(_) | Head::Refused(_)))) = head {
        gate.metrics.client_connection(false);
    }
    let head = match head {
        Some(Ok(Ok(Head::Complete(head)))) => head,
        Some(Ok(Ok(Head::Preface(read)))) => {
            let io = Prefixed::new(read, io, write_limit(&gate));
            return http2::serve(gate, io, info, deadline, opening).await;
        }
        Some(Ok(Ok(Head::Refused(rejection)))) => {
            drop(opening);
            return refuse_unparsed(&gate, io, info, rejection).await;
        }
        // Closed, failed, too slow (slowloris) or still silent when the drain began:
        // dropped without an answer.
        Some(Ok(Ok(Head::Closed))) | Some(Ok(Err(_))) | Some(Err(_)) | None => return,
    };
    // An upgrade, the first request of nearly every connection, is answered here: the
    // 101 written directly and the socket handed to the relay, without hyper's connection
    // machinery. A refusal is left for hyper to write (its framing and `Connection: close`
    // handling as for every other answer), and everything else is hyper's from the start.
    let mut decided = None;
    let mut head = head;
    let mut early = Vec::new();
    if let Some((parts, len)) = head::parts(&head) {
        if is_upgrade(&parts.headers) {
            // Answering may wait for the upstream's handshake (up to
            // `upstream_connect_seconds`): a client that leaves meanwhile ends the wait, as
            // nginx answers its 499, so that its caps and its upstream connection are not
            // held for nobody. Dropping the answer logs it as abandoned.
            let answering = answer(&gate, info, Asked::Upgrade(parts));
            let left = client_left(&mut io, &mut early);
            let (response, admitted) = tokio::select! {
                biased;
                answered = answering => answered,
                () = left => return,
            };
            if !early.is_empty() {
                head = [&head[..], &early].concat().into();
            }
            match admitted {
                Some(admitted) => {
                    let headers = response.into_parts().0.headers;
                    let written = timeout(SWITCH_WRITE, head::switch(&mut io, &headers)).await;
                    drop(opening);
                    // Counted accepted already: a client gone before its 101 is ended by
                    // the relay like any lost client, its close logged and the upstream
                    // told.
                    let client = match written {
                        Ok(Ok(())) => relay::Client::new(io, &head[len..]),
                        _ => relay::Client::gone(),
                    };
                    gate.shutdown.spawn_relay(admitted.relay(client, None));
                    return;
                }
                None => decided = Some(response),
            }
        }
    }
    let io = Prefixed::new(head, io, write_limit(&gate));
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() && decided.is_none() {
        return;
    }
    let shutdown = gate.shutdown.token();
    let service_gate = gate.clone();
    // What the first request has: the drain's hold on the connection, released once its
    // answer is written (see below), and the answer already decided (a refused upgrade),
    // if any.
    let first = std::sync::Mutex::new(Some((opening, decided)));
    // A client that ends its sending side (an HTTP/1.1 half-close) still gets an answer
    // the gate decides itself; a request waiting on the upstream is abandoned.
    let requests = Requests::default();
    let io = Ending::new(io, requests.clone());
    let serving = requests.clone();
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let mut answering = serving.begin();
        let ended = serving.clone();
        let (first, decided) = first
            .lock()
            .ok()
            .and_then(|mut f| f.take())
            .map_or((None, None), |(opening, decided)| (Some(opening), decided));
        let gate = service_gate.clone();
        // A later request on a kept-alive connection is timed from its own arrival, as an
        // HTTP/2 stream is, not from the TCP accept: the idle time between is no one's.
        let info = match first {
            Some(_) => info,
            None => ConnInfo {
                accepted: Instant::now(),
                first: false,
                ..info
            },
        };
        async move {
            let answered = match decided {
                Some(response) => {
                    crate::http::close_after_refusal(hyper::upgrade::on(&mut req));
                    Ok(response)
                }
                None => tokio::select! {
                    biased;
                    answered = handle(gate, info, req, None) => {
                        answered.map_err(|never| match never {})
                    }
                    () = ended.ended() => Err(ClientEnded),
                },
            };
            // The drain waits for a first answer of known length until it has been sent
            // (a refusal, a page), so that the process does not exit with it unwritten; for
            // a streamed one (server-sent events) only until its head is ready.
            answered.map(|r| {
                // The upstream's answer, or a 101 (the relay's from here on): the client's
                // end cuts it.
                if r.extensions().get::<crate::proxy::Proxied>().is_some()
                    || r.status() == http::StatusCode::SWITCHING_PROTOCOLS
                {
                    answering.owes_nothing();
                }
                r.map(|body| {
                    let first = hyper::body::Body::size_hint(&body).exact().and(first);
                    crate::body::held(body, (answering, first))
                })
            })
        }
    });
    // Each later head gets `handshake_seconds` of its own, whatever the first one took;
    // the first is already read. The connection idle that long (no request being
    // answered) is closed here, gracefully: over TLS with close_notify, which a strict
    // client's pool expects rather than a bare FIN. hyper's own timeout, twice as long,
    // ends a later head that trickles in (slowloris) without one.
    let next_head = gate.policy.load().policy.handshake_timeout;
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout((next_head * 2).max(Duration::from_millis(1)))
        .max_buf_size(LATER_HEAD_BYTES)
        .max_headers(LATER_HEAD_FIELDS)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut check = Instant::now() + next_head;
    loop {
        // The connection first: its first request is already read (a refusal decided
        // above, or a request for hyper), and hyper must have begun answering it before a
        // drain's graceful shutdown, which would otherwise close it unanswered.
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %info.peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled() => break,
            () = sleep_until(check) => match requests.idle_since() {
                Some(since) if since + next_head <= Instant::now() => break,
                Some(since) => check = since + next_head,
                None => check = Instant::now() + next_head,
            },
        }
    }
    // Idle past its time, or draining: hyper closes an idle connection at once (its
    // writes bounded by the write deadline) and finishes a request under way first.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// The most a client may send after its upgrade request and before its 101 that is read
/// and kept for the relay (a WebSocket client sends nothing then, RFC 6455 §4.1; the rest
/// waits in the socket).
const EARLY_BYTES: usize = 16 * 1024;

/// Resolves when the client ends its connection (FIN, reset, TLS close, a broken TLS
/// record) while its upgrade is being answered. What it sends meanwhile is kept in
/// `early`, at most [`EARLY_BYTES`]; past that its socket is left unread until the answer,
/// and a departure is no longer noticed. Reading is cancel-safe: a read that has not
/// returned has taken nothing (rustls keeps what it decrypted for the next read).
async fn client_left<I: AsyncRead + Unpin>(io: &mut I, early: &mut Vec<u8>) {
    let mut chunk = [0u8; 512];
    while early.len() < EARLY_BYTES {
        let room = chunk.len().min(EARLY_BYTES - early.len());
        match io.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => early.extend_from_slice(&chunk[..n]),
        }
    }
    std::future::pending().await
}

/// A request abandoned because its client ended its sending side while it waited on the
/// upstream (hyper ends the connection with it).
#[derive(Debug)]
struct ClientEnded;

impl std::fmt::Display for ClientEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client ended its sending side while its request waited")
    }
}

impl std::error::Error for ClientEnded {}

/// How large a later head on a kept-alive connection hyper reads, so that one over
/// [`MAX_HEAD_BYTES`] reaches the gate's own check and its JSON 431: at 16 KiB, hyper's
/// buffer filled before the head ended and it answered a bare 431 itself. Its buffer grows
/// to this only while such a head arrives.
const LATER_HEAD_BYTES: usize = 2 * MAX_HEAD_BYTES;

/// How many fields hyper parses in a later head on a kept-alive connection, so that the
/// gate's own check (100 fields, as for a first head) answers with its JSON 431: at
/// hyper's default of 100 it would answer a bare 431 itself. The index is allocated per
/// later request (about 64 bytes a field), and freed with it.
const LATER_HEAD_FIELDS: usize = 512;

/// The write deadline of a connection hyper serves (plain requests, HTTP/2): the longest
/// `write_seconds` of the policy's routes, since the route is not known for the connection
/// as a whole, and no route's own deadline is cut short.
fn write_limit(gate: &Gate) -> Duration {
    gate.policy
        .load()
        .policy
        .routes
        .iter()
        .map(|r| r.timeouts.write)
        .max()
        .unwrap_or(crate::config::DEFAULT_WRITE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replacement binds beside the running listener instead of failing with
    /// `Address already in use`.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_second_listener_binds_the_same_address() {
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let second = bind(first.local_addr().unwrap()).unwrap();
        assert_eq!(first.local_addr().unwrap(), second.local_addr().unwrap());
    }

    /// 600 connections wait in the accept queue at once: with tokio's 128 the rest would
    /// have their SYNs dropped and retry after a second.
    #[tokio::test]
    async fn the_accept_queue_holds_more_than_128() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut pending = tokio::task::JoinSet::new();
        for _ in 0..600 {
            pending.spawn(tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            ));
        }
        let mut connected = Vec::new();
        while let Some(done) = pending.join_next().await {
            if let Ok(Ok(Ok(tcp))) = done {
                connected.push(tcp);
            }
        }
        assert_eq!(connected.len(), 600);
    }
}
