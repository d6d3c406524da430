//! The first request head of a connection, read and checked before hyper sees it, so that
//! a head hyper's parser would refuse with a bare 400 or 431 gets the same JSON answer as
//! every other refusal. The bytes read are handed to hyper in front of the socket
//! ([`Prefixed`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::admission::Rejection;

/// Largest request head (request line and headers) accepted; larger gets 431. An
/// HTTP/2 header list is held to the same size, counted as RFC 9113 §6.5.2 counts it.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Most header fields in a request head (hyper's limit too); more gets 431.
pub const MAX_HEADERS: usize = 100;

/// The first read's room: a typical upgrade head (300–800 bytes) fits in one read.
const FIRST_READ: usize = 2 * 1024;

/// What the first bytes of a connection were.
pub enum Head {
    /// A complete, parseable head (and whatever followed it in the same reads).
    Complete(Bytes),
    /// The peer closed before sending a complete head.
    Closed,
    /// A head to refuse with this answer.
    Refused(Rejection),
    /// The HTTP/2 connection preface (h2c with prior knowledge), and what followed it.
    Preface(Bytes),
}

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Read until the first request head is complete (at most `max_bytes`), and check that
/// it parses as hyper will parse it: refuse what hyper would refuse, with a JSON body.
/// With `h2c`, the HTTP/2 preface is recognised instead of refused.
pub async fn read_first<I: AsyncRead + Unpin>(
    io: &mut I,
    max_bytes: usize,
    h2c: bool,
) -> io::Result<Head> {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    loop {
        if buf.len() == buf.capacity() {
            // Doubling; the loop ends once more than `max_bytes` are held.
            buf.reserve(buf.len());
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Ok(Head::Closed);
        }
        if h2c && PREFACE.starts_with(&buf[..buf.len().min(PREFACE.len())]) {
            if buf.len() >= PREFACE.len() {
                return Ok(Head::Preface(buf.freeze()));
            }
            continue;
        }
        match check(&buf, max_bytes) {
            Ok(true) => return Ok(Head::Complete(buf.freeze())),
            Ok(false) if buf.len() > max_bytes => {
                return Ok(Head::Refused(Rejection::HeadTooLarge))
            }
            Ok(false) => {}
            Err(rejection) => return Ok(Head::Refused(rejection)),
        }
    }
}

/// Whether `buf` starts with a complete head of at most `max_bytes` (`Ok(false)`: not
/// yet), or why it is refused.
fn check(buf: &[u8], max_bytes: usize) -> Result<bool, Rejection> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > max_bytes => {
            return Err(Rejection::HeadTooLarge)
        }
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Ok(false),
        Err(httparse::Error::TooManyHeaders) => return Err(Rejection::HeadTooLarge),
        Err(_) => return Err(Rejection::BadRequest("the request head is malformed")),
    }
    let target = request.path.unwrap_or("");
    if http::Uri::try_from(target).is_err() {
        return Err(Rejection::BadRequest("the request target is malformed"));
    }
    let mut content_length = false;
    let mut transfer_encoding = false;
    for field in request.headers.iter() {
        if field.name.eq_ignore_ascii_case("content-length") {
            // One plain number of at most 19 digits, once: a list ("0, 0") or a repeat is
            // refused, as nginx refuses it, rather than reconciled, and so is a number
            // of 20 digits, even with leading zeros (hyper, which reads the body, takes
            // no larger one).
            let fits = std::str::from_utf8(field.value)
                .ok()
                .filter(|v| v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .is_some();
            if content_length || !fits {
                return Err(Rejection::BadRequest(
                    "the Content-Length header is malformed",
                ));
            }
            content_length = true;
        } else if field.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
        }
    }
    if transfer_encoding {
        // HTTP/1.0 has no transfer codings (RFC 9112 §6.1).
        if request.version == Some(0) {
            return Err(Rejection::BadRequest(
                "an HTTP/1.0 request cannot carry Transfer-Encoding",
            ));
        }
        let codings = request
            .headers
            .iter()
            .filter(|field| field.name.eq_ignore_ascii_case("transfer-encoding"))
            .map(|field| field.value);
        transfer_codings(codings).map_err(Rejection::BadRequest)?;
    }
    Ok(true)
}

/// Check a request's `Transfer-Encoding` field values: one coding in all, `chunked`, is
/// what the gate reads. A final coding other than chunked leaves the request without a
/// framing (RFC 9112 §6.1, which hyper refuses with a bare 400); any other coding before
/// it (`gzip, chunked`, or chunked twice) the gate would undo only in part, handing the
/// upstream a body re-framed as chunked but still gzip with nothing to say so. nginx
/// refuses both.
pub fn transfer_codings<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<(), &'static str> {
    let (mut count, mut chunked) = (0, false);
    for coding in values.flat_map(|value| value.split(|&b| b == b',')) {
        let coding = coding.trim_ascii();
        // An empty element (`chunked,`, or an empty field beside one that says `chunked`):
        // hyper takes the last element for the final coding and refuses with a bare 400,
        // and nginx refuses any value but `chunked`. Refused here, with the JSON 400.
        if coding.is_empty() {
            return Err("the Transfer-Encoding header is malformed");
        }
        count += 1;
        chunked = coding.eq_ignore_ascii_case(b"chunked");
    }
    match count {
        0 => Ok(()),
        1 if chunked => Ok(()),
        _ => Err("only one transfer coding, chunked, is supported"),
    }
}

/// Write `rejection` as a complete HTTP/1.1 response (for a head hyper never saw).
pub async fn refuse<I: AsyncWrite + Unpin>(io: &mut I, rejection: Rejection) -> io::Result<()> {
    let (parts, body) = rejection.into_response().into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    write_fields(&mut out, &parts.headers);
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(&body);
    io.write_all(&out).await?;
    io.flush().await
}

/// A complete head (as [`read_first`] returns it) as `http` request parts, read as hyper
/// reads a head, and its length (the bytes after it are the client's, sent early). `None`
/// for a head hyper should see instead: it answers those as it always has.
pub fn parts(head: &Bytes) -> Option<(http::request::Parts, usize)> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    let httparse::Status::Complete(len) = request.parse(head).ok()? else {
        return None;
    };
    let version = match request.version? {
        1 => http::Version::HTTP_11,
        0 => http::Version::HTTP_10,
        _ => return None,
    };
    let mut builder = http::Request::builder()
        .method(http::Method::from_bytes(request.method?.as_bytes()).ok()?)
        .uri(http::Uri::try_from(request.path?).ok()?)
        .version(version);
    let headers = builder.headers_mut()?;
    headers.reserve(request.headers.len());
    for field in request.headers.iter() {
        // The value shares the head's buffer, as hyper's do: no copy per header.
        headers.append(
            http::HeaderName::from_bytes(field.name.as_bytes()).ok()?,
            http::HeaderValue::from_maybe_shared(head.slice_ref(field.value)).ok()?,
        );
    }
    let (mut parts, ()) = builder.body(()).ok()?.into_parts();
    // An absolute-form target's authority is the host (RFC 9112 §3.2.2), as for the
    // requests hyper reads (`http::handle`); a Host is still required.
    if parts.headers.contains_key(http::header::HOST) {
        if let Some(authority) = authority_host(&parts.uri) {
            parts.headers.insert(http::header::HOST, authority);
        }
    }
    Some((parts, len))
}

/// The target's authority as a Host value, when it has one: an absolute-form target's
/// (RFC 9112 §3.2.2) or an HTTP/2 request's `:authority`, which take the place of Host.
pub(crate) fn authority_host(uri: &http::Uri) -> Option<http::HeaderValue> {
    uri.authority()
        .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
}

/// Write a `101 Switching Protocols` head as hyper writes one: the status line, the
/// headers in order, then `date` unless they have one.
pub async fn switch<I: AsyncWrite + Unpin>(
    io: &mut I,
    headers: &http::HeaderMap,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    write_fields(&mut out, headers);
    // The upstream's own `date`, when it sent one, is the answer's (hyper adds none then).
    if !headers.contains_key(http::header::DATE) {
        out.extend_from_slice(b"date: ");
        http_date(&mut out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    io.write_all(&out).await?;
    io.flush().await
}

/// Header fields as they go on the wire, `name: value` and CRLF each, in the map's order
/// (values cannot hold CR or LF: `HeaderValue` refuses them).
/// Whether the comma-separated lists of `name`'s fields hold `token` (ASCII case-insensitive),
/// as `Connection: keep-alive, Upgrade` holds `upgrade`.
pub fn lists_token(headers: &http::HeaderMap, name: http::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

pub fn write_fields(out: &mut Vec<u8>, headers: &http::HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Now as an HTTP date (`Wed, 02 Dec 2026 00:07:00 GMT`), formatted once a second per
/// thread.
fn http_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut date = cell.borrow_mut();
        if date.0 != second {
            *date = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(date.1.as_bytes());
    });
}

/// A socket with bytes already read from it in front: hyper reads `prefix` first. Its
/// writes have a deadline: a peer that accepts no byte for `write_limit` fails them
/// (`TimedOut`), so that a client that stops reading a response cannot hold the
/// connection (and its upstream's) for ever, as nginx's `send_timeout` drops it.
pub struct Prefixed<T> {
    prefix: Bytes,
    io: T,
    writes: WriteDeadline,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, io: T, write_limit: Duration) -> Prefixed<T> {
        Prefixed {
            prefix,
            io,
            writes: WriteDeadline::new(write_limit),
        }
    }

    /// The bytes hyper has not read yet, and the socket.
    pub fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.io)
    }
}

/// A deadline on a socket's writes: a write (or flush) that the peer lets make no
/// progress for `limit` fails with `TimedOut`, as nginx's `send_timeout` and
/// `proxy_send_timeout` end such a connection. The timer is boxed, and armed only while a
/// write waits, so that an idle connection holds none.
pub struct WriteDeadline {
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteDeadline {
    pub fn new(limit: Duration) -> WriteDeadline {
        WriteDeadline {
            limit,
            stalled: None,
        }
    }

    /// `polled`, a write's outcome; `Pending` past the deadline becomes `TimedOut`.
    pub fn check<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer accepted no bytes within the write deadline",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.writes.check(cx, polled)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.writes.check(cx, polled)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
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

    fn reason(head: &str) -> Option<&'static str> {
        check(head.as_bytes(), 16 * 1024).err().map(|r| r.reason())
    }

    /// A head becomes the parts hyper would have made of it: names lower-cased, repeated
    /// fields kept in order, the target as sent, the length of the head alone.
    #[test]
    fn heads_become_parts_as_hyper_reads_them() {
        let head = Bytes::from_static(
            b"GET /ws?a=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\n\r\n\x81\x00",
        );
        let (request, len) = parts(&head).unwrap();
        assert_eq!(len, head.len() - 2);
        assert_eq!(request.method, http::Method::GET);
        assert_eq!(request.uri, "/ws?a=1");
        assert_eq!(request.version, http::Version::HTTP_11);
        let values: Vec<_> = request.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(request.headers.len(), 3);
        // What hyper should see instead: left to it.
        assert!(parts(&Bytes::from_static(b"GET /ws HTTP/1.1\r\nHost: h\r\n")).is_none());
        assert!(parts(&Bytes::from_static(
            b"GET /ws HTTP/1.1\r\nX: \xff\x01\r\n\r\n"
        ))
        .is_none());
    }

    /// The 101's head: the headers in order, then a `date` only when they have none.
    #[tokio::test]
    async fn the_101_gets_a_date_unless_it_has_one() {
        let mut headers = http::HeaderMap::new();
        headers.insert("upgrade", http::HeaderValue::from_static("websocket"));
        let mut out = Vec::new();
        switch(&mut out, &headers).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\ndate: ")
        );
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text:?}");
        headers.insert(
            "date",
            http::HeaderValue::from_static("Tue, 01 Dec 2026 00:00:00 GMT"),
        );
        let mut out = Vec::new();
        switch(&mut out, &headers).await.unwrap();
        assert_eq!(
            out,
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\ndate: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n"
        );
    }

    #[test]
    fn heads_hyper_would_refuse_are_refused_here() {
        let ok = "GET /ws HTTP/1.1\r\nHost: h\r\n\r\n";
        assert!(matches!(check(ok.as_bytes(), 16 * 1024), Ok(true)));
        assert!(matches!(
            check(b"GET /ws HTTP/1.1\r\nHost: h\r\n", 16 * 1024),
            Ok(false)
        ));
        for bad in [
            "GET /ws HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n  folded\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: h\r\nno colon here\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: h\r\nContent-Length: 0, 0\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551615\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: h\r\nContent-Length: 00000000000000000003\r\n\r\n",
            "GET /ws HTTP/2.0\r\nHost: h\r\n\r\n",
            "hello\r\n\r\n",
        ] {
            assert_eq!(reason(bad), Some("bad_request"), "{bad:?}");
        }
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        let head = format!("GET /ws HTTP/1.1\r\nHost: h\r\n{many}\r\n");
        assert!(matches!(
            check(head.as_bytes(), 16 * 1024),
            Err(Rejection::HeadTooLarge)
        ));
    }
}
