//! The response body type every listener of the gate answers with (hyper's boxed body), so
//! that refusals, the admin listener and the pass proxy share it without depending on the
//! request pipeline in `http`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};

pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// A complete body from `bytes`.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// `body`, keeping `hold` until it has been sent whole or dropped: an HTTP/2 connection
/// counts a stream whose response is still streaming (a server-sent event feed, a slow
/// download) as open, so that it is not closed as idle under it.
pub fn held<T: Send + Unpin + 'static>(body: Body, hold: T) -> Body {
    Held { body, _hold: hold }.boxed_unsync()
}

struct Held<T> {
    body: Body,
    _hold: T,
}

impl<T: Unpin> hyper::body::Body for Held<T> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The body of a request the gate refused while more of it was still to come, carried in
/// the refusal's extensions to the HTTP/2 stream that answers it (see [`draining`]).
#[derive(Clone)]
pub struct Unread(Arc<Mutex<Option<Incoming>>>);

impl Unread {
    pub fn new(body: Incoming) -> Unread {
        Unread(Arc::new(Mutex::new(Some(body))))
    }

    pub fn take(self) -> Option<Incoming> {
        self.0.lock().ok()?.take()
    }
}

/// A request body lent to the upstream's side, given back when that side drops it
/// before its end: an upstream that cannot be reached, or that failed while the body was
/// still arriving, leaves the rest of it to be discarded under the gate's own answer (see
/// [`draining`]), as a refusal's is.
pub struct Lent {
    body: Option<Incoming>,
    back: Unread,
}

/// `body` lent as [`Lent`], and where it comes back: an [`Unread`] that holds it once the
/// borrower has dropped it unfinished.
pub fn lend(body: Incoming) -> (Lent, Unread) {
    let back = Unread(Arc::new(Mutex::new(None)));
    (
        Lent {
            body: Some(body),
            back: back.clone(),
        },
        back,
    )
}

impl hyper::body::Body for Lent {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().body {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body
            .as_ref()
            .is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), hyper::body::Body::size_hint)
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        if !hyper::body::Body::is_end_stream(&body) {
            if let Ok(mut slot) = self.back.0.lock() {
                *slot = Some(body);
            }
        }
    }
}

/// The most of a refused request's body [`draining`] reads, and for how long.
const DRAIN_BYTES: usize = 64 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// `body`, ended only once `unread`, the refused request's body, has arrived and been
/// discarded (at most [`DRAIN_BYTES`] within [`DRAIN_TIME`] of the answer's last byte). An
/// HTTP/2 stream whose response ends while its request is still arriving is reset
/// (RST_STREAM NO_ERROR, RFC 9113 §8.1), and clients such as curl then drop the answer
/// they were given; nginx too reads and discards the body of a request it refused.
pub fn draining(body: Body, unread: Incoming) -> Body {
    Draining {
        body,
        ended: false,
        unread: Some(unread),
        drained: 0,
        deadline: None,
    }
    .boxed_unsync()
}

struct Draining {
    body: Body,
    /// `body` has given its last frame.
    ended: bool,
    unread: Option<Incoming>,
    drained: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl hyper::body::Body for Draining {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if !this.ended {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(None) => this.ended = true,
                polled => return polled,
            }
        }
        if let Some(unread) = &mut this.unread {
            let deadline = this
                .deadline
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(DRAIN_TIME)));
            loop {
                if deadline.as_mut().poll(cx).is_ready() || this.drained > DRAIN_BYTES {
                    break;
                }
                match Pin::new(&mut *unread).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        this.drained += frame.data_ref().map_or(0, Bytes::len);
                    }
                    Poll::Ready(Some(Err(_)) | None) => break,
                    Poll::Pending => return Poll::Pending,
                }
            }
            this.unread = None;
            this.deadline = None;
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.unread.is_none() && (self.ended || self.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
