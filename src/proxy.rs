//! Plain HTTP on an `http: pass` route: reverse-proxied to the route's upstream with the
//! hyper-util client (pooled, streamed bodies both ways, hop-by-hop headers removed).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::admission::{Rejection, UpstreamFault};
use crate::body::Body;
use crate::policy::{Route, Upstream};
use crate::upstream::{self, UpstreamStream};

/// How long the upstream may take to send a response head once the request body is sent
/// (nginx's `proxy_read_timeout`).
pub const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// While the request body is sent: the longest the client may leave it without a byte
/// (nginx's `client_body_timeout`: 408), and the longest the upstream may leave it unread
/// (nginx's `proxy_send_timeout`: 504).
pub const BODY_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Marks a response as the upstream's, not the gate's own: a client that ends its
/// sending side cuts it short (see `crate::keepalive`).
#[derive(Clone, Copy, Debug)]
pub struct Proxied;

/// How long a pass connection's write may make no progress before the connection is
/// closed: past [`BODY_STALL_TIMEOUT`], so that the request that stalled has had its 504
/// `upstream_timeout` (nginx's `proxy_send_timeout`) first.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(70);
const _: () = assert!(WRITE_STALL_TIMEOUT.as_secs() > BODY_STALL_TIMEOUT.as_secs());

/// How long an unused pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// A request's body as it goes upstream: the client's, or none when a request without a
/// body is sent again (see [`forward`]).
pub type UploadBody =
    http_body_util::Either<crate::body::Lent, http_body_util::Empty<bytes::Bytes>>;

pub type PassClient = Client<Connector, Upload<UploadBody>>;

/// The pooled clients of the `http: pass` routes, one per route, made on first use. The
/// gate owns them; a route replaced by a reload keeps its client while a request it
/// admitted is in flight, and the entry is dropped on the next miss after that.
#[derive(Default)]
pub struct PassClients(Mutex<Vec<(Weak<Route>, PassClient)>>);

impl PassClients {
    /// The client of `route` (a reload's new routes get new clients, so an edited
    /// upstream is dialled from the first request on).
    fn of(&self, route: &Arc<Route>) -> PassClient {
        let mut clients = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let found = clients.iter().find(|(known, _)| {
            known
                .upgrade()
                .is_some_and(|known| Arc::ptr_eq(&known, route))
        });
        if let Some((_, client)) = found {
            return client.clone();
        }
        clients.retain(|(known, _)| known.strong_count() > 0);
        let made = client(route);
        clients.push((Arc::downgrade(route), made.clone()));
        made
    }
}

fn client(route: &Route) -> PassClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(32)
        .build(Connector {
            upstream: route.upstream.clone(),
            timeout: route.timeouts.upstream_connect,
        })
}

/// Forward a plain HTTP request whose headers were already rewritten for the upstream, to
/// `target`: the routed form of its path (see `crate::path`) and its query without the
/// token parameters.
pub async fn forward(
    clients: &PassClients,
    route: &Arc<Route>,
    target: &str,
    mut request: Request<Incoming>,
    unread: &mut Option<Incoming>,
) -> Result<Response<Body>, Rejection> {
    let scheme = if route.upstream.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = Uri::try_from(format!("{scheme}://{}{target}", route.upstream.authority))
        .map_err(|_| Rejection::BadRequest("invalid request target"))?;
    *request.uri_mut() = uri;
    // The upstream is always reached over HTTP/1.1, whatever the client spoke.
    *request.version_mut() = http::Version::HTTP_11;
    if let Ok(host) = HeaderValue::from_str(&route.upstream.host_header) {
        request.headers_mut().insert(header::HOST, host);
    }
    let client = clients.of(route);
    let (parts, body) = request.into_parts();
    // As nginx gives a request one more try when a kept-alive upstream connection fails
    // under it: an upstream may close an idle connection just as a request goes out on
    // it. Only a request without a body, of an idempotent method, is sent again.
    let again = (idempotent(&parts.method) && hyper::body::Body::is_end_stream(&body))
        .then(|| same_head(&parts));
    // A body the upstream's side did not read to its end (it could not be reached, failed,
    // stopped reading, or answered first) is taken back, so that the rest of it is
    // discarded under the answer, not cut by a reset.
    let (body, back) = crate::body::lend(body);
    let answered = async {
        let answered = exchange(&client, parts, http_body_util::Either::Left(body)).await?;
        match (answered, again) {
            (Err(e), Some(parts)) if closed_under_request(&e) => {
                let nothing = http_body_util::Either::Right(http_body_util::Empty::new());
                exchange(&client, parts, nothing).await
            }
            (answered, _) => Ok(answered),
        }
    }
    .await
    .and_then(|answered| answer(route, answered));
    match answered {
        // An answer under way while the body is still being read (by an upstream that
        // streams, or that answered first): the answer ends once the upstream's side has
        // read the body or the gate has taken the rest back and discarded it
        // (`body::draining`), so that an HTTP/1.1 connection can carry the next request
        // and an HTTP/2 stream is not reset under its answer.
        Ok(mut response) => {
            if back.unfinished() {
                response.extensions_mut().insert(back);
            }
            Ok(response)
        }
        Err(rejection) => {
            *unread = back.take();
            Err(rejection)
        }
    }
}

/// RFC 9110 §9.2.2's idempotent methods, as nginx's `proxy_next_upstream` has them.
fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// A request head to send again (`Parts` holds extensions, which are not `Clone`).
fn same_head(parts: &http::request::Parts) -> http::request::Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = parts.method.clone();
    head.uri = parts.uri.clone();
    head.version = parts.version;
    head.headers = parts.headers.clone();
    head
}

/// Whether the upstream connection closed (or was reset) after the request went out and
/// before any of a response came: what a kept-alive connection the upstream had just
/// given up does.
fn closed_under_request(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let incomplete = in_chain::<hyper::Error>(e).is_some_and(hyper::Error::is_incomplete_message);
    let reset = in_chain::<io::Error>(e).is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        )
    });
    incomplete || reset
}

/// One exchange with the upstream: the request sent (its body as the client sends it) and
/// the response head, or the client's or the upstream's stall as a refusal.
async fn exchange(
    client: &PassClient,
    parts: http::request::Parts,
    body: UploadBody,
) -> Result<Result<Response<Incoming>, hyper_util::client::legacy::Error>, Rejection> {
    let (upload, progress) = Upload::new(body, BODY_STALL_TIMEOUT);
    let sent = client.request(Request::from_parts(parts, upload));
    tokio::pin!(sent);
    // The response head's deadline starts once the body is sent: an upload of any length
    // goes through as long as its bytes keep moving both ways.
    let answered = tokio::select! {
        answered = &mut sent => Some(answered),
        () = progress.sent(BODY_STALL_TIMEOUT) => None,
    };
    match answered {
        Some(answered) => Ok(answered),
        None if progress.is_stalled_upstream(BODY_STALL_TIMEOUT) => Err(Rejection::UpstreamTimeout),
        None => tokio::time::timeout(RESPONSE_HEAD_TIMEOUT, sent)
            .await
            .map_err(|_| Rejection::UpstreamTimeout),
    }
}

/// The upstream's answer as the client gets it, or the refusal its failure makes.
fn answer(
    route: &Route,
    answered: Result<Response<Incoming>, hyper_util::client::legacy::Error>,
) -> Result<Response<Body>, Rejection> {
    let response = match answered {
        Ok(response) => response,
        Err(e) => {
            if source_is::<BodyStalled>(&e) {
                return Err(Rejection::BodyTimeout);
            }
            // The client's side, not the upstream's: a malformed chunk, or a body cut short.
            if source_is::<BadBody>(&e) {
                return Err(Rejection::BadRequest("the request body could not be read"));
            }
            let timed_out =
                in_chain::<io::Error>(&e).is_some_and(|io| io.kind() == io::ErrorKind::TimedOut);
            // The chain under hyper-util's own words ("client error (Connect)"), which
            // name the step that failed as the fault's kind already does: the system's
            // error (`Connection refused (os error 111)`), or hyper's.
            let cause = || {
                let mut source = std::error::Error::source(&e);
                let mut text = match source {
                    Some(s) => {
                        source = s.source();
                        s.to_string()
                    }
                    None => e.to_string(),
                };
                while let Some(s) = source {
                    text.push_str(&format!(": {s}"));
                    source = s.source();
                }
                text
            };
            return Err(if timed_out {
                Rejection::UpstreamTimeout
            } else if e.is_connect() {
                Rejection::UpstreamUnavailable(UpstreamFault::Connect(io::Error::other(cause())))
            } else {
                Rejection::UpstreamUnavailable(UpstreamFault::Answer(cause().into()))
            });
        }
    };
    // A 101 to a request that asked for no upgrade opens nothing the gate would relay.
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(upstream::bad_answer(
            "a 101 to a request that asked for no upgrade",
        ));
    }
    if !upstream::is_status(response.status().as_u16()) {
        return Err(upstream::bad_answer("a status above 599"));
    }
    let (mut parts, body) = response.into_parts();
    // RFC 9110 §6.2: an intermediary sends its own version. An HTTP/1.0 upstream's would
    // tell an HTTP/1.1 client to give up its kept-alive connection.
    parts.version = http::Version::HTTP_11;
    response_framing(&mut parts.headers)?;
    upstream::strip_hop_by_hop(&mut parts.headers);
    upstream::rewrite_location(&mut parts.headers, &route.upstream);
    parts.extensions.insert(Proxied);
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// The upstream response's framing, as the client will get it. hyper has read the body by
/// `Transfer-Encoding` (then re-framed toward the client) or by `Content-Length`; like
/// nginx, a response with both, or with a transfer coding other than `chunked` (which
/// would reach the client undone and unlabelled), is 502. A `Content-Length` list of one
/// repeated value (`5, 5`, or two fields), which hyper accepts (RFC 9110 §8.6), goes on
/// as that one value: the gate refuses such lists from clients and sends none.
fn response_framing(headers: &mut http::HeaderMap) -> Result<(), Rejection> {
    let codings = headers.get_all(header::TRANSFER_ENCODING);
    if codings.iter().next().is_some() {
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(upstream::bad_answer(
                "a response with both Content-Length and Transfer-Encoding",
            ));
        }
        crate::head::transfer_codings(codings.iter().map(HeaderValue::as_bytes))
            .map_err(|_| upstream::bad_answer("a response transfer coding other than chunked"))?;
    }
    let lengths = headers.get_all(header::CONTENT_LENGTH);
    let mut values = lengths.iter();
    if let Some(first) = values.next() {
        let plain = first.as_bytes().iter().all(u8::is_ascii_digit);
        if !plain || values.next().is_some() {
            let one = first
                .as_bytes()
                .split(|&b| b == b',')
                .next()
                .map(<[u8]>::trim_ascii)
                .and_then(|v| HeaderValue::from_bytes(v).ok());
            match one {
                Some(one) => {
                    headers.insert(header::CONTENT_LENGTH, one);
                }
                None => return Err(upstream::bad_answer("a malformed Content-Length")),
            }
        }
    }
    Ok(())
}

/// Whether `error`'s chain holds a `T`.
fn source_is<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    in_chain::<T>(error).is_some()
}

/// The first `T` in `error`'s chain (itself included).
fn in_chain<'e, T: std::error::Error + 'static>(
    error: &'e (dyn std::error::Error + 'static),
) -> Option<&'e T> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// The client's request body could not be read: a malformed chunk, or the connection
/// ended before the body did.
#[derive(Debug, thiserror::Error)]
#[error("the request body could not be read: {0}")]
pub struct BadBody(#[source] Box<dyn std::error::Error + Send + Sync>);

/// The client stopped sending its request body for [`BODY_STALL_TIMEOUT`].
#[derive(Debug, thiserror::Error)]
#[error("the request body stopped arriving")]
pub struct BodyStalled;

/// A request body on its way upstream, watched: it fails ([`BodyStalled`]) when the client
/// leaves it without a byte for too long, and tells [`Progress`] when it has all gone and
/// when the upstream last took some of it.
pub struct Upload<B = Incoming> {
    body: B,
    stall: Duration,
    /// The client's deadline for the next bytes: made at the first wait, reset at each
    /// later one, armed only while the client owes bytes.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    shared: Arc<Shared>,
}

/// What the request's task reads of its upload.
pub struct Progress {
    shared: Arc<Shared>,
}

struct Shared {
    /// When the upload was created (tokio's clock, which tests can pause).
    start: tokio::time::Instant,
    /// Milliseconds from `start` at which the upstream's side last asked for more.
    polled_ms: std::sync::atomic::AtomicU64,
    /// The client owes the next bytes (its stall is the upload's own deadline's).
    client_owes: std::sync::atomic::AtomicBool,
    done: tokio::sync::Notify,
    finished: std::sync::atomic::AtomicBool,
}

impl<B: hyper::body::Body> Upload<B> {
    fn new(body: B, stall: Duration) -> (Upload<B>, Progress) {
        // A request without a body (a GET) is sent as soon as its head is.
        let empty = hyper::body::Body::is_end_stream(&body);
        let shared = Arc::new(Shared {
            start: tokio::time::Instant::now(),
            polled_ms: std::sync::atomic::AtomicU64::new(0),
            client_owes: std::sync::atomic::AtomicBool::new(false),
            done: tokio::sync::Notify::new(),
            finished: std::sync::atomic::AtomicBool::new(empty),
        });
        let progress = Progress {
            shared: shared.clone(),
        };
        (
            Upload {
                body,
                stall,
                waiting: None,
                armed: false,
                shared,
            },
            progress,
        )
    }

    fn finish(&self) {
        use std::sync::atomic::Ordering;
        if !self.shared.finished.swap(true, Ordering::AcqRel) {
            self.shared.done.notify_one();
        }
    }
}

impl<B> hyper::body::Body for Upload<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::sync::atomic::Ordering;
        let this = self.get_mut();
        let elapsed = this.shared.start.elapsed().as_millis() as u64;
        this.shared.polled_ms.store(elapsed, Ordering::Release);
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(None) => {
                this.armed = false;
                this.shared.client_owes.store(false, Ordering::Release);
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => {
                this.armed = false;
                this.shared.client_owes.store(false, Ordering::Release);
                Poll::Ready(Some(
                    frame.map_err(|e| Box::new(BadBody(e.into())) as Self::Error),
                ))
            }
            Poll::Pending => {
                this.shared.client_owes.store(true, Ordering::Release);
                let deadline = tokio::time::Instant::now() + this.stall;
                let waiting = match (&mut this.waiting, this.armed) {
                    (Some(waiting), true) => waiting,
                    (Some(waiting), false) => {
                        waiting.as_mut().reset(deadline);
                        waiting
                    }
                    (slot @ None, _) => slot.insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.armed = true;
                match waiting.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.body.is_end_stream();
        if end {
            self.finish();
        }
        end
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Progress {
    /// Resolves once the whole body has gone upstream, or when the upstream has left it
    /// unread for `stall` (see [`Progress::is_stalled_upstream`]).
    async fn sent(&self, stall: Duration) {
        use std::sync::atomic::Ordering;
        loop {
            if self.shared.finished.load(Ordering::Acquire) || self.is_stalled_upstream(stall) {
                return;
            }
            // Looked at again when the upstream's stall would reach `stall` (just past it),
            // or, while the client owes the bytes, a quarter of `stall` on.
            let polled = Duration::from_millis(self.shared.polled_ms.load(Ordering::Acquire));
            let quiet = self.shared.start.elapsed().saturating_sub(polled);
            let check = match self.shared.client_owes.load(Ordering::Acquire) {
                true => stall / 4,
                false => stall.saturating_sub(quiet) + Duration::from_millis(5),
            };
            let _ = tokio::time::timeout(check, self.shared.done.notified()).await;
        }
    }

    /// The upstream has not asked for more of the body for `stall`, while the client owed
    /// it nothing (the client's own stall is the upload's deadline).
    fn is_stalled_upstream(&self, stall: Duration) -> bool {
        use std::sync::atomic::Ordering;
        if self.shared.finished.load(Ordering::Acquire)
            || self.shared.client_owes.load(Ordering::Acquire)
        {
            return false;
        }
        let polled = Duration::from_millis(self.shared.polled_ms.load(Ordering::Acquire));
        self.shared.start.elapsed().saturating_sub(polled) > stall
    }
}

/// Dials the route's upstream whatever the URI says (the URI only keys the pool).
#[derive(Clone)]
pub struct Connector {
    upstream: Upstream,
    timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = PassConn;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PassConn>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let upstream = self.upstream.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, upstream::dial(&upstream)).await {
                Ok(stream) => Ok(PassConn::new(stream?)),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "upstream connect timed out",
                )),
            }
        })
    }
}

/// A pooled pass-through connection. Its writes have a deadline, [`WRITE_STALL_TIMEOUT`]
/// without progress: the connection's task sends a request body on its own, and would
/// otherwise wait for ever on an upstream that reads none of it after the request had its
/// 504, holding the socket and what it had queued.
pub struct PassConn {
    io: TokioIo<UpstreamStream>,
    writes: crate::head::WriteDeadline,
}

impl PassConn {
    fn new(stream: UpstreamStream) -> PassConn {
        PassConn {
            io: TokioIo::new(stream),
            writes: crate::head::WriteDeadline::new(WRITE_STALL_TIMEOUT),
        }
    }
}

impl Connection for PassConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for PassConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PassConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.writes.check(cx, polled)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.writes.check(cx, polled)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A client body: `frames` chunks, one per poll, then the end (or, with `stall`,
    /// nothing more for ever).
    struct Client {
        frames: usize,
        stall: bool,
    }

    impl hyper::body::Body for Client {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
            if self.frames > 0 {
                self.frames -= 1;
                return Poll::Ready(Some(Ok(hyper::body::Frame::data(
                    bytes::Bytes::from_static(b"chunk"),
                ))));
            }
            if self.stall {
                Poll::Pending
            } else {
                Poll::Ready(None)
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_is_sent_whole_and_says_so() {
        let (upload, progress) = Upload::new(
            Client {
                frames: 3,
                stall: false,
            },
            BODY_STALL_TIMEOUT,
        );
        let collected = upload.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"chunkchunkchunk");
        tokio::time::timeout(Duration::from_millis(1), progress.sent(BODY_STALL_TIMEOUT))
            .await
            .expect("the end of the body is seen at once");
        assert!(!progress.is_stalled_upstream(BODY_STALL_TIMEOUT));
    }

    /// A client that stops sending mid-body fails the upload after the stall timeout (408
    /// to it), not the upstream (504).
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_mid_body_fails_the_upload() {
        let (mut upload, progress) = Upload::new(
            Client {
                frames: 2,
                stall: true,
            },
            BODY_STALL_TIMEOUT,
        );
        let started = tokio::time::Instant::now();
        let mut chunks = 0;
        let error = loop {
            match upload.frame().await {
                Some(Ok(_)) => chunks += 1,
                Some(Err(e)) => break e,
                None => panic!("the stalled body ended"),
            }
        };
        assert_eq!(chunks, 2);
        assert!(error.is::<BodyStalled>(), "{error}");
        assert_eq!(started.elapsed(), BODY_STALL_TIMEOUT);
        // The client owed the bytes: not the upstream's stall.
        assert!(!progress.is_stalled_upstream(BODY_STALL_TIMEOUT));
    }

    /// An upstream connection whose peer takes no bytes fails its writes once
    /// [`WRITE_STALL_TIMEOUT`] passes without progress, so that its task, which sends the
    /// body on its own, ends and closes it; after the request's own 504.
    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_takes_no_bytes_fails_the_connections_writes() {
        use hyper::rt::Write as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (_peer, _) = listener.accept().await.unwrap();
        let mut conn = PassConn::new(UpstreamStream::Plain(tcp));
        let chunk = vec![0u8; 64 * 1024];
        let started = tokio::time::Instant::now();
        let error = loop {
            match std::future::poll_fn(|cx| Pin::new(&mut conn).poll_write(cx, &chunk)).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        assert!(started.elapsed() >= WRITE_STALL_TIMEOUT);
        assert!(started.elapsed() < WRITE_STALL_TIMEOUT * 2);
    }

    /// An upstream that takes none of the body (nobody polls it) is caught by the request's
    /// wait, as an upstream timeout, when the stall reaches the timeout (not at the next
    /// quarter of it).
    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_reads_nothing_is_seen() {
        let (_upload, progress) = Upload::new(
            Client {
                frames: 2,
                stall: false,
            },
            BODY_STALL_TIMEOUT,
        );
        let started = tokio::time::Instant::now();
        progress.sent(BODY_STALL_TIMEOUT).await;
        assert!(progress.is_stalled_upstream(BODY_STALL_TIMEOUT));
        assert!(started.elapsed() > BODY_STALL_TIMEOUT);
        assert!(
            started.elapsed() < BODY_STALL_TIMEOUT + Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
}
