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

/// The body of a request whose answer may end before it has all arrived: one the gate
/// refused (on HTTP/2), or one lent to the upstream's side (see [`lend`]). Carried in the
/// answer's extensions to the answer's body, which reads and discards what is left of it
/// before it ends (see [`draining`]): an HTTP/2 stream is then not reset under its answer,
/// and an HTTP/1.1 connection is ready for its next request.
#[derive(Clone)]
pub struct Unread(Arc<Mutex<Option<Incoming>>>);

impl Unread {
    pub fn new(body: Incoming) -> Unread {
        Unread(Arc::new(Mutex::new(Some(body))))
    }

    /// The body, taken from whoever was reading it (a [`Lent`] then fails its reader).
    pub fn take(self) -> Option<Incoming> {
        self.0.lock().ok()?.take()
    }

    /// Some of the body is still to come, and no one has read it to its end.
    pub fn unfinished(&self) -> bool {
        self.0.lock().is_ok_and(|slot| {
            slot.as_ref()
                .is_some_and(|body| !hyper::body::Body::is_end_stream(body))
        })
    }
}

/// A request body lent to the upstream's side, which the gate can take back (its
/// [`Unread`]): from an upstream that could not be reached, that failed or stopped reading
/// it, or that answered before reading it all, the rest of it is discarded under the
/// answer (see [`draining`]), as a refused request's is. Taken back, it fails its reader.
pub struct Lent {
    slot: Unread,
    /// Read to its end (and let go).
    ended: bool,
}

/// `body` lent as [`Lent`], and the [`Unread`] that can take it back.
pub fn lend(body: Incoming) -> (Lent, Unread) {
    let slot = Unread::new(body);
    (
        Lent {
            slot: slot.clone(),
            ended: false,
        },
        slot,
    )
}

/// What a [`Lent`] body's reader gets once the gate has taken the body back.
#[derive(Debug)]
pub struct TakenBack;

impl std::fmt::Display for TakenBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body was taken back: the exchange is over")
    }
}

impl std::error::Error for TakenBack {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl hyper::body::Body for Lent {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let Ok(mut slot) = this.slot.0.lock() else {
            return Poll::Ready(Some(Err(TakenBack.into())));
        };
        let Some(body) = slot.as_mut() else {
            return Poll::Ready(Some(Err(TakenBack.into())));
        };
        let polled = Pin::new(body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.ended = true;
            *slot = None;
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.ended
            || self
                .slot
                .0
                .lock()
                .is_ok_and(|slot| slot.as_ref().is_some_and(hyper::body::Body::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        self.slot
            .0
            .lock()
            .ok()
            .and_then(|slot| slot.as_ref().map(hyper::body::Body::size_hint))
            .unwrap_or_default()
    }
}

/// The most of a refused request's body [`draining`] reads, and for how long.
const DRAIN_BYTES: usize = 64 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// `body`, ended only once `unread`, the request's body, has arrived and been discarded (at
/// most [`DRAIN_BYTES`] within [`DRAIN_TIME`] of the answer's last byte; a body lent to the
/// upstream's side is taken back when the answer has ended). An HTTP/2 stream whose
/// response ends while its request is still arriving is reset (RST_STREAM NO_ERROR, RFC
/// 9113 §8.1), and clients such as curl then drop the answer they were given; an HTTP/1.1
/// connection is closed, and clients such as Python's `http.client` send their next
/// request into the close. nginx too reads and discards such a body.
pub fn draining(body: Body, unread: Unread) -> Body {
    Draining {
        body,
        owed: Some(unread),
        discarding: None,
    }
    .boxed_unsync()
}

/// `body`, after which `unread`, a lent request body the upstream's side did not read to
/// its end, is taken back and discarded in a task of its own (at most [`DRAIN_BYTES`]
/// within [`DRAIN_TIME`]): HTTP/1.1's answer for an upstream that answered first. hyper
/// reads a request's body after its answer and serves the connection's next request once
/// the body has ended; dropped unread, the body would close the connection instead. The
/// answer itself is not held back: a client that stops sending once it has its answer
/// (curl does) reads all of it at once.
pub fn discarding_after(body: Body, unread: Unread) -> Body {
    held(body, DiscardOnDrop(unread))
}

struct DiscardOnDrop(Unread);

impl Drop for DiscardOnDrop {
    fn drop(&mut self) {
        let Some(body) = self.0.clone().take() else {
            return;
        };
        if hyper::body::Body::is_end_stream(&body) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(discard(body));
        }
    }
}

async fn discard(mut body: Incoming) {
    let reading = async {
        let mut drained = 0;
        while drained <= DRAIN_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => drained += frame.data_ref().map_or(0, Bytes::len),
                Some(Err(_)) | None => break,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, reading).await;
}

struct Draining {
    body: Body,
    /// The request's body until `body` has ended; then taken (from the upstream's side,
    /// if it was lent) and discarded by `discarding`.
    owed: Option<Unread>,
    discarding: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl hyper::body::Body for Draining {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if this.owed.is_some() {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(None) => {}
                polled => return polled,
            }
            let unread = this.owed.take().and_then(Unread::take);
            this.discarding = unread.map(|body| Box::pin(discard(body)) as _);
        }
        if let Some(discarding) = &mut this.discarding {
            std::task::ready!(discarding.as_mut().poll(cx));
            this.discarding = None;
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.owed.is_none() && self.discarding.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
