//! What makes a request a well-formed WebSocket handshake: an HTTP/1.1 `Upgrade:
//! websocket` GET (RFC 6455 §4.2.1) or an RFC 8441 extended CONNECT, and the subprotocols
//! it offers; and what every request on the listener must be, upgrade or not (a request
//! line within 8 KiB, one sane Host, one Origin, an HTTP/2 header list within bounds).

use http::header::{self, HeaderMap};
use http::{Method, Version};

use crate::admission::Rejection;
use crate::relay::Protocol;

/// `Upgrade: websocket` (any case, possibly among other tokens).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    crate::head::lists_token(headers, header::UPGRADE, "websocket")
}

/// Longest request line accepted (nginx's default `large_client_header_buffers` size);
/// longer gets 414.
const MAX_REQUEST_LINE: usize = 8 * 1024;

/// What hyper lets through but a front proxy must refuse, on every request: a request
/// line over 8 KiB (414) and more than one Host (400, RFC 9112 §3.2). (With both
/// Content-Length and Transfer-Encoding, hyper drops the Content-Length, RFC 9112 §6.3,
/// so a request is only ever framed one way; an upgrade with either is refused below.)
pub(crate) fn check_head(
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Result<(), Rejection> {
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme_str().map_or(0, |s| s.len() + 3);
    // "GET " + target + " HTTP/1.1"
    if method.as_str().len() + 1 + target + 9 > MAX_REQUEST_LINE {
        return Err(Rejection::UriTooLong);
    }
    // An absolute-form target (RFC 9112 §3.2.2), whose authority the listener made the
    // Host: a web scheme, and no user information (RFC 9110 §4.2.4).
    if let Some(scheme) = uri.scheme_str() {
        if !["http", "https", "ws", "wss"]
            .iter()
            .any(|web| scheme.eq_ignore_ascii_case(web))
        {
            return Err(Rejection::BadRequest(
                "the request target's scheme is not http, https, ws or wss",
            ));
        }
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(Rejection::BadRequest(
            "the request target's authority has user information",
        ));
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    if let Some(host) = hosts.next() {
        if hosts.next().is_some() {
            return Err(Rejection::BadRequest("more than one Host header"));
        }
        // It is copied into X-Forwarded-Host: a value that is no authority is refused.
        if !is_valid_host(host.as_bytes()) {
            return Err(Rejection::BadRequest("the Host header is not a valid host"));
        }
    }
    // RFC 6454 §7.3: a user agent sends one Origin; with two, which one was checked?
    if headers.get_all(header::ORIGIN).iter().nth(1).is_some() {
        return Err(Rejection::BadRequest("more than one Origin header"));
    }
    Ok(())
}

/// An HTTP/2 request's header list is held to an HTTP/1.1 head's limits: 16 KiB, counted
/// as RFC 9113 §6.5.2 counts it (each field's name and value and 32 more, the
/// pseudo-headers included, `:protocol` too; `:authority` by the Host it became), and 100
/// fields. h2 itself
/// lets lists up to 4 times that through (`http2::PEER_HEADER_LIST`), so that one just
/// over the limit gets this JSON answer, logged and counted, and not h2's bare 431.
/// An HTTP/1.1 connection's first head was checked as it was read; a later one, which
/// hyper read (and whose buffer lets a head pipelined behind the first grow past 16 KiB),
/// is counted here as it was sent: its request line and each `name: value` line. `first`:
/// whether the request is its connection's first.
pub(crate) fn check_header_list(
    protocol: Protocol,
    first: bool,
    (method, uri, extended, headers): (&Method, &http::Uri, Option<&str>, &HeaderMap),
) -> Result<(), Rejection> {
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len());
    let (start, per_field) = match protocol {
        Protocol::H2 => {
            const FIELD_OVERHEAD: usize = 32;
            let pseudo = [
                Some(":method".len() + method.as_str().len()),
                Some(":path".len() + target),
                Some(":scheme".len() + uri.scheme_str().map_or(0, str::len)),
                extended.map(|p| ":protocol".len() + p.len()),
            ];
            // The Host header `:authority` became counts by the longer name it came under.
            let authority = match uri.authority() {
                Some(_) if headers.contains_key(http::header::HOST) => {
                    ":authority".len() - "host".len()
                }
                _ => 0,
            };
            let pseudo = pseudo.iter().flatten().map(|p| p + FIELD_OVERHEAD);
            (pseudo.sum::<usize>() + authority, FIELD_OVERHEAD)
        }
        // `GET /path HTTP/1.1\r\n`, then `name: value\r\n` each, and the blank line.
        Protocol::Http1 if !first => (method.as_str().len() + target + 14, 4),
        Protocol::Http1 => return Ok(()),
    };
    if headers.len() > crate::head::MAX_HEADERS {
        return Err(Rejection::HeadTooLarge);
    }
    let size: usize = start
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + per_field)
            .sum::<usize>();
    if size > crate::head::MAX_HEAD_BYTES {
        return Err(Rejection::HeadTooLarge);
    }
    Ok(())
}

/// RFC 9112 §3.2 / RFC 3986 §3.2.2: `uri-host [ ":" port ]`, where the host is an IP
/// literal in brackets or a reg-name (unreserved, percent-encoded or sub-delims), and the
/// port is at most five digits. No userinfo, path, query or whitespace; not empty.
pub fn is_valid_host(host: &[u8]) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix(b"[") {
        let Some(close) = rest.iter().position(|&c| c == b']') else {
            return false;
        };
        let literal = &rest[..close];
        let valid_literal = !literal.is_empty()
            && literal
                .iter()
                .all(|&c| c.is_ascii_hexdigit() || matches!(c, b':' | b'.'));
        if !valid_literal {
            return false;
        }
        match &rest[close + 1..] {
            [] => return true,
            [b':', port @ ..] => (&b"x"[..], port),
            _ => return false,
        }
    } else {
        match host.iter().rposition(|&c| c == b':') {
            Some(colon) => (&host[..colon], &host[colon + 1..]),
            None => (host, &b""[..]),
        }
    };
    let reg_name = |c: &u8| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            )
    };
    !name.is_empty()
        && name.iter().all(reg_name)
        && port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
}

/// How a client asked for its WebSocket, and so how the gate answers.
pub(crate) enum Handshake {
    /// HTTP/1.1 `Upgrade: websocket`, answered 101 with the key's accept value.
    Http1 { key: String },
    /// HTTP/2 extended CONNECT with `:protocol = websocket` (RFC 8441), answered 200.
    H2,
}

/// RFC 6455 §4.2.1 (or RFC 8441 §4–5 on HTTP/2): the checks on a client's opening
/// handshake.
pub(crate) fn check_upgrade(parts: &http::request::Parts) -> Result<Handshake, Rejection> {
    // On HTTP/2, what is asked for comes first: a CONNECT for another protocol is refused
    // as that, not as a WebSocket request with a wrong or missing version.
    if parts.version == Version::HTTP_2 {
        check_extended_connect(parts)?;
    }
    let headers = &parts.headers;
    // RFC 6455 §11.3.5: at most once in a request.
    let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    let version = versions.next();
    if versions.next().is_some() {
        return Err(Rejection::BadRequest(
            "Sec-WebSocket-Version must appear once",
        ));
    }
    if version.map(|v| v.as_bytes()) != Some(b"13") {
        return Err(Rejection::NotWebsocket(
            "only Sec-WebSocket-Version 13 is supported",
        ));
    }
    if parts.version == Version::HTTP_2 {
        return Ok(Handshake::H2);
    }
    if parts.method != Method::GET {
        return Err(Rejection::BadRequest("a WebSocket upgrade must be a GET"));
    }
    if parts.version != Version::HTTP_11 {
        return Err(Rejection::BadRequest("a WebSocket upgrade needs HTTP/1.1"));
    }
    // RFC 6455 §4.2.1 item 2, RFC 9112 §3.2 (a second Host is refused in `check_head`).
    if !headers.contains_key(header::HOST) {
        return Err(Rejection::BadRequest("the Host header is missing"));
    }
    // Bytes after the head belong to the WebSocket: a body would be read as frames.
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Err(Rejection::BadRequest("a WebSocket upgrade has no body"));
    }
    if !crate::head::lists_token(headers, header::CONNECTION, "upgrade") {
        return Err(Rejection::BadRequest("Connection: Upgrade is missing"));
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    match (keys.next(), keys.next()) {
        (Some(key), None) if is_valid_key(key.as_bytes()) => Ok(Handshake::Http1 {
            key: String::from_utf8_lossy(key.as_bytes()).into_owned(),
        }),
        (None, _) => Err(Rejection::BadRequest("Sec-WebSocket-Key is missing")),
        // RFC 6455 §11.3.1: it must not appear more than once.
        (Some(_), Some(_)) => Err(Rejection::BadRequest("Sec-WebSocket-Key must appear once")),
        (Some(_), None) => Err(Rejection::BadRequest(
            "Sec-WebSocket-Key must be 16 bytes in base64",
        )),
    }
}

/// RFC 8441 §4–5: a CONNECT whose `:protocol` is `websocket`, with `:authority` (here,
/// the Host it became). h2 has already refused an extended CONNECT without `:scheme` or
/// `:path`. There is no Sec-WebSocket-Key (one sent anyway is ignored), and the stream's
/// DATA frames are the WebSocket's bytes, not a body.
fn check_extended_connect(parts: &http::request::Parts) -> Result<(), Rejection> {
    if parts.method != Method::CONNECT {
        return Err(Rejection::BadRequest(
            "a WebSocket over HTTP/2 is an extended CONNECT",
        ));
    }
    let websocket = parts
        .extensions
        .get::<hyper::ext::Protocol>()
        .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if !websocket {
        return Err(Rejection::BadRequest(
            "only an extended CONNECT with :protocol websocket is accepted",
        ));
    }
    if !parts.headers.contains_key(header::HOST) {
        return Err(Rejection::BadRequest("the :authority is missing"));
    }
    Ok(())
}

/// A base64 encoding of exactly 16 bytes: 22 alphabet characters (the last with its low
/// bits zero) and `==`.
fn is_valid_key(key: &[u8]) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    key.len() == 24
        && key[22..] == *b"=="
        && key[..22].iter().all(|c| ALPHABET.contains(c))
        && b"AQgw".contains(&key[21])
}

/// The offered subprotocols, in order.
pub(crate) fn offered_protocols(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ="));
        assert!(!is_valid_key(b"dGhlIHNhbXBsZSBub25jZR=="));
        assert!(!is_valid_key(b"not a key"));
    }

    #[test]
    fn hosts() {
        for good in [
            "example.com",
            "example.com:8443",
            "localhost:",
            "127.0.0.1",
            "[::1]",
            "[::1]:443",
            "a-b_c.d~e",
        ] {
            assert!(is_valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "a b",
            "evil/x?y",
            "u@host",
            "host:http",
            "host:123456",
            "[::1",
            "[]",
            "[::1]x",
            "ex\tample",
            "host#frag",
            ":80",
        ] {
            assert!(!is_valid_host(bad.as_bytes()), "{bad}");
        }
    }
}
