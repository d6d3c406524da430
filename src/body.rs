//! The response body type every listener of the gate answers with (hyper's boxed body), so
//! that refusals, the admin listener and the pass proxy share it without depending on the
//! request pipeline in `http`.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

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
