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
