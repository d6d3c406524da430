//! `Sec-WebSocket-Extensions` at the upgrade: permessage-deflate (RFC 7692 §7) negotiated
//! end to end. With `messages.compression: pass` the client's permessage-deflate offers go
//! upstream in their order with their parameters; the upstream's answer must accept one
//! of them exactly as RFC 7692 allows (anything else is a 502), and it is what the client
//! gets. The gate adds no parameter of its own: its inflate state is bounded whatever is
//! agreed (see `relay/inflate.rs`). Extensions other than permessage-deflate are
//! never offered upstream: the gate could not check their frames.

use http::header::SEC_WEBSOCKET_EXTENSIONS;
use http::{HeaderMap, HeaderValue};

const NAME: &str = "permessage-deflate";

/// Offers kept from one request; a client has no reason to send more.
const MAX_OFFERS: usize = 8;

/// One permessage-deflate offer or answer, as its parameters say (RFC 7692 §7.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Params {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: Option<u8>,
    /// `Some(None)`: the parameter without a value (an offer saying the client can
    /// take a limit).
    pub client_max_window_bits: Option<Option<u8>>,
}

impl Params {
    /// One `permessage-deflate; …` element, or `None` when it is another extension or
    /// breaks RFC 7692 §7.1 (an unknown or repeated parameter, a bad value).
    fn parse(element: &str) -> Option<Params> {
        let mut parts = element.split(';').map(str::trim);
        if !parts.next()?.eq_ignore_ascii_case(NAME) {
            return None;
        }
        let mut p = Params::default();
        for part in parts {
            let (name, value) = match part.split_once('=') {
                Some((n, v)) => (n.trim(), Some(unquoted(v.trim())?)),
                None => (part, None),
            };
            // RFC 7692 §7.1.2: a decimal integer from 8 to 15 without leading zeroes
            // (`08` too is declined, as Python `websockets` and Node `ws` decline it).
            let bits = |v: Option<&str>| {
                v.filter(|v| {
                    (1..=2).contains(&v.len())
                        && !v.starts_with('0')
                        && v.bytes().all(|b| b.is_ascii_digit())
                })
                .and_then(|v| v.parse::<u8>().ok())
                .filter(|b| (8..=15).contains(b))
            };
            match name.to_ascii_lowercase().as_str() {
                "server_no_context_takeover"
                    if value.is_none() && !p.server_no_context_takeover =>
                {
                    p.server_no_context_takeover = true
                }
                "client_no_context_takeover"
                    if value.is_none() && !p.client_no_context_takeover =>
                {
                    p.client_no_context_takeover = true
                }
                "server_max_window_bits" if p.server_max_window_bits.is_none() => {
                    p.server_max_window_bits = Some(bits(value)?)
                }
                "client_max_window_bits" if p.client_max_window_bits.is_none() => {
                    p.client_max_window_bits = Some(match value {
                        None => None,
                        v => Some(bits(v)?),
                    })
                }
                _ => return None,
            }
        }
        Some(p)
    }

    /// Write the element as it goes on the wire.
    fn write(&self, out: &mut String) {
        out.push_str(NAME);
        if self.server_no_context_takeover {
            out.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = self.server_max_window_bits {
            out.push_str(&format!("; server_max_window_bits={bits}"));
        }
        match self.client_max_window_bits {
            Some(Some(bits)) => out.push_str(&format!("; client_max_window_bits={bits}")),
            Some(None) => out.push_str("; client_max_window_bits"),
            None => {}
        }
    }

    /// Whether this answer accepts `offer` (RFC 7692 §7.1.1–7.1.2): a server may always
    /// add `*_no_context_takeover` and a `server_max_window_bits`, must echo a
    /// `server_no_context_takeover` it was offered, stays within a window limit it names,
    /// and may name `client_max_window_bits` only when the client offered it.
    ///
    /// An answer that leaves out a `server_max_window_bits` the client offered is taken
    /// (as Node `ws` and aiohttp take it; Python `websockets` refuses it): the server then
    /// compresses with up to 15 bits, which the gate's inflater covers, and the client,
    /// which gets the answer as it came, judges whether it accepts that.
    fn accepts(&self, offer: &Params) -> bool {
        if offer.server_no_context_takeover && !self.server_no_context_takeover {
            return false;
        }
        if let (Some(limit), Some(bits)) =
            (offer.server_max_window_bits, self.server_max_window_bits)
        {
            if bits > limit {
                return false;
            }
        }
        match (offer.client_max_window_bits, self.client_max_window_bits) {
            (_, None) => true,
            (_, Some(None)) | (None, Some(_)) => false,
            (Some(None), Some(Some(_))) => true,
            (Some(Some(limit)), Some(Some(bits))) => bits <= limit,
        }
    }
}

/// A parameter's value as a token or a quoted string (RFC 9110 §5.6.6); `None` for a
/// quote that does not close, or one inside a token. A value of this extension is digits
/// either way, so a quoted-pair is not unescaped (its backslash fails the value).
fn unquoted(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').filter(|inner| !inner.contains('"')),
        None => (!value.contains('"')).then_some(value),
    }
}

/// The elements of a `Sec-WebSocket-Extensions` value: split at the commas that are not
/// inside a quoted string (`a; x="1,2"` is one element).
fn elements(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, b) in value.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&value[start..]);
    out
}

/// permessage-deflate as negotiated for the messages one side sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// The sender may refer back into earlier messages (no `*_no_context_takeover` was
    /// agreed for it): the receiver's window must outlive each message.
    pub context_takeover: bool,
    /// The sender's LZ77 window is at most 2^`window_bits` bytes (8 to 15; 15 when no
    /// `*_max_window_bits` was agreed).
    pub window_bits: u8,
}

/// The client's permessage-deflate offers, as they go upstream.
#[derive(Debug, Default)]
pub struct Offers {
    offers: Vec<Params>,
}

impl Offers {
    /// The permessage-deflate offers among the request's `Sec-WebSocket-Extensions`
    /// values, in order (at most [`MAX_OFFERS`]); malformed ones are left out, as a server
    /// would decline them.
    pub fn from_request(headers: &HeaderMap) -> Offers {
        let offers = headers
            .get_all(SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(elements)
            .filter_map(Params::parse)
            .take(MAX_OFFERS)
            .collect();
        Offers { offers }
    }

    /// The request header's value for the upstream, `None` when nothing is offered.
    pub fn header_value(&self) -> Option<String> {
        let mut out = String::new();
        for (i, offer) in self.offers.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            offer.write(&mut out);
        }
        (!out.is_empty()).then_some(out)
    }

    /// Check the upstream's answer: `Ok(None)` when it selected no extension (no header,
    /// or one with an empty value, as some servers send), the agreed compression when it
    /// accepted one of the offers as RFC 7692 allows, `Err` for anything else (another
    /// extension, two answers, a parameter no offer allows).
    pub fn accept(&self, answer: &HeaderMap) -> Result<Option<Agreed>, Unoffered> {
        // Empty list elements are ignored (RFC 9110 §5.6.1.2), so an empty list is no
        // extension, not an unoffered one.
        let mut selected = Vec::new();
        for value in answer.get_all(SEC_WEBSOCKET_EXTENSIONS) {
            let value = value.to_str().map_err(|_| Unoffered)?;
            selected.extend(elements(value).into_iter().filter(|e| !e.trim().is_empty()));
        }
        let text = match selected[..] {
            [] => return Ok(None),
            [one] => one.trim(),
            _ => return Err(Unoffered),
        };
        let params = Params::parse(text).ok_or(Unoffered)?;
        if !self.offers.iter().any(|offer| params.accepts(offer)) {
            return Err(Unoffered);
        }
        let mut canonical = String::with_capacity(text.len());
        params.write(&mut canonical);
        let header = HeaderValue::from_str(&canonical).map_err(|_| Unoffered)?;
        Ok(Some(Agreed {
            client: Deflate {
                context_takeover: !params.client_no_context_takeover,
                window_bits: params.client_max_window_bits.flatten().unwrap_or(15),
            },
            upstream: Deflate {
                context_takeover: !params.server_no_context_takeover,
                window_bits: params.server_max_window_bits.unwrap_or(15),
            },
            header,
        }))
    }
}

/// The upstream's answer accepts no offer of the client's (502 `upstream_unavailable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unoffered;

/// permessage-deflate as agreed end to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// How the client compresses what it sends.
    pub client: Deflate,
    /// How the upstream compresses what it sends.
    pub upstream: Deflate,
    /// The answer, for the client's 101.
    pub header: HeaderValue,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn deflate_offers_go_upstream_in_order_and_others_do_not() {
        let offers = Offers::from_request(&request(&[
            "permessage-deflate; client_max_window_bits, x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=\"10\"; client_no_context_takeover",
            "permessage-deflate; bogus, permessage-deflate; server_max_window_bits=16",
        ]));
        assert_eq!(
            offers.header_value().as_deref(),
            Some(
                "permessage-deflate; client_max_window_bits, \
                 permessage-deflate; client_no_context_takeover; server_max_window_bits=10"
            )
        );
        assert_eq!(
            Offers::from_request(&request(&["x-foo"])).header_value(),
            None
        );
        assert_eq!(Offers::from_request(&HeaderMap::new()).header_value(), None);
    }

    /// Values as RFC 7692 writes them: no leading zero, a quoted string closed and
    /// never split at a comma inside it (found by an audit: `08` was taken as 8, and a
    /// quoted comma made half a value an offer of its own).
    #[test]
    fn malformed_values_and_quoted_commas_are_declined() {
        for declined in [
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; client_max_window_bits=\"09\"",
            "permessage-deflate; server_max_window_bits=\"10",
            "permessage-deflate; server_max_window_bits=10\"",
            "permessage-deflate; server_max_window_bits=\"1\"0\"",
            "permessage-deflate; server_max_window_bits=\"10, permessage-deflate\"",
            "x-other; a=\"1,permessage-deflate,2\"",
            "x-other; a=\"\\\",permessage-deflate,\"",
        ] {
            assert_eq!(
                Offers::from_request(&request(&[declined])).header_value(),
                None,
                "{declined}"
            );
        }
        let offers = Offers::from_request(&request(&[
            "x-other; a=\"1,2\", permessage-deflate; server_max_window_bits=\"10\"",
        ]));
        assert_eq!(
            offers.header_value().as_deref(),
            Some("permessage-deflate; server_max_window_bits=10")
        );
        let any = Offers::from_request(&request(&["permessage-deflate"]));
        for answer in [
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; server_max_window_bits=\"10",
        ] {
            assert_eq!(any.accept(&request(&[answer])), Err(Unoffered), "{answer}");
        }
    }

    #[test]
    fn answers_are_held_to_what_was_offered() {
        let browser =
            Offers::from_request(&request(&["permessage-deflate; client_max_window_bits"]));
        let agreed = browser
            .accept(&request(&[
                "permessage-deflate; server_no_context_takeover; client_max_window_bits=12",
            ]))
            .unwrap()
            .unwrap();
        assert_eq!(
            (agreed.client, agreed.upstream),
            (
                Deflate {
                    context_takeover: true,
                    window_bits: 12
                },
                Deflate {
                    context_takeover: false,
                    window_bits: 15
                }
            )
        );
        assert_eq!(
            agreed.header,
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=12"
        );
        assert_eq!(browser.accept(&HeaderMap::new()), Ok(None));
        assert_eq!(browser.accept(&request(&[""])), Ok(None));
        assert_eq!(browser.accept(&request(&[" ", ""])), Ok(None));
        assert_eq!(browser.accept(&request(&[",", " , "])), Ok(None));
        assert_eq!(Offers::default().accept(&request(&[""])), Ok(None));
        for padded in [
            "permessage-deflate,",
            ", permessage-deflate",
            " permessage-deflate ,,",
        ] {
            let agreed = browser.accept(&request(&[padded]));
            assert_eq!(
                agreed.map(|a| a.map(|a| a.header)),
                Ok(Some(HeaderValue::from_static("permessage-deflate"))),
                "{padded}"
            );
        }
        for bad in [
            "x-webkit-deflate-frame",
            "permessage-deflate, permessage-deflate",
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; foo",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        ] {
            assert_eq!(browser.accept(&request(&[bad])), Err(Unoffered), "{bad}");
        }
        // Nothing offered: any answer is unoffered.
        let none = Offers::default();
        assert_eq!(
            none.accept(&request(&["permessage-deflate"])),
            Err(Unoffered)
        );
        // A window limit offered for either side binds the answer.
        let limited = Offers::from_request(&request(&[
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=9; server_no_context_takeover",
        ]));
        for (answer, ok) in [
            ("permessage-deflate; server_no_context_takeover; server_max_window_bits=10", true),
            ("permessage-deflate; server_no_context_takeover; server_max_window_bits=11", false),
            ("permessage-deflate; server_max_window_bits=10", false),
            ("permessage-deflate; server_no_context_takeover", true),
            ("permessage-deflate; server_no_context_takeover; server_max_window_bits=9; client_max_window_bits=9", true),
            ("permessage-deflate; server_no_context_takeover; server_max_window_bits=9; client_max_window_bits=10", false),
        ] {
            assert_eq!(limited.accept(&request(&[answer])).is_ok(), ok, "{answer}");
        }
    }
}
