//! The request path as routed and as sent upstream: normalised once, or refused.
//!
//! Routing on the raw path would let a client reach one route's upstream with a spelling
//! that the upstream reads as another route's path (`/api//admin`, `/api/%61dmin`), past
//! that route's policy. So the gate routes on a normal form, sends upstream exactly that
//! form, and refuses what it cannot make unambiguous:
//!
//! - a percent-encoded unreserved character (`A-Z a-z 0-9 - _ ~`) is decoded, RFC 3986
//!   §6.2.2.2; any other percent-encoding is kept, with uppercase hex (§6.2.2.1);
//! - a byte outside ASCII (a character sent raw: `/wß`) is percent-encoded with uppercase
//!   hex (`/w%C3%9F`), as browsers send it and as RFC 3986 §2.1 requires of a URI;
//! - runs of `/` are merged into one, as nginx's `merge_slashes` does;
//! - refused: a malformed percent-encoding (`%zz`, `%4` at the end); an encoded `.`, `/`,
//!   `\`, `;` or NUL (`%2E`, `%2F`, `%5C`, `%3B`, `%00`, either case); a literal `\` or
//!   `;`; a `.` or `..` segment; a target that does not start with `/` (`*`).
//!
//! `;` is refused rather than kept because servlet containers and Spring cut `;params`
//! out of each segment before routing (`/admin;x` is `/admin` there). They cut before
//! decoding, so `%3B` is a literal `;` to them, but other stacks decode first: `%3B` is
//! refused too.

use std::borrow::Cow;

/// `path` as a log line shows it: every run that looks like a JWT (base64url characters
/// joined by dots, the first part a JSON object's start: `eyJ`, or `eyAi`, `ewoi` where the
/// header's JSON has whitespace) is `***`, read as a client's parser reads it, so that
/// `%2E` for a dot or `%65` for the `e` does not hide one. The query is never logged,
/// since it may carry a token; a client that puts one in the path instead
/// (`/ws;access_token=…`, an encoded `?`, a segment of its own) must not see it written
/// to the logs either. The operator API's logged `sub` and `jti` go through it too: a
/// token pasted there by mistake is a token.
pub fn for_log(path: &str) -> Cow<'_, str> {
    // A JSON object's `{` is `e` in base64url, and the `"`, space, tab, CR or LF after it
    // make the next character `y` or `w`.
    if !path.contains("ey") && !path.contains("ew") && !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let raw = path.as_bytes();
    // Each byte as decoded (one `%XX` is one byte), with where it starts in `raw`.
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match (raw[i], hex_digit(raw, i + 1), hex_digit(raw, i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                decoded.push((hi << 4 | lo, i));
                i += 3;
            }
            (byte, _, _) => {
                decoded.push((byte, i));
                i += 1;
            }
        }
    }
    let is_token_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let raw_at = |at: usize| decoded.get(at).map_or(raw.len(), |&(_, i)| i);
    let mut shown: Option<String> = None;
    let (mut copied, mut at) = (0, 0);
    while at + 3 <= decoded.len() {
        if decoded[at].0 != b'e' || !matches!(decoded[at + 1].0, b'y' | b'w') {
            at += 1;
            continue;
        }
        let len = decoded[at..]
            .iter()
            .position(|&(b, _)| !is_token_byte(b))
            .unwrap_or(decoded.len() - at);
        let run = &decoded[at..at + len];
        let header = run.iter().position(|&(b, _)| b == b'.');
        if header.is_some_and(|end| starts_a_json_object(run[..end].iter().map(|&(b, _)| b))) {
            let (from, to) = (raw_at(at), raw_at(at + len));
            let out = shown.get_or_insert_with(String::new);
            out.push_str(&path[copied..from]);
            out.push_str("***");
            copied = to;
        }
        at += len;
    }
    match shown {
        None => Cow::Borrowed(path),
        Some(mut out) => {
            out.push_str(&path[copied..]);
            Cow::Owned(out)
        }
    }
}

/// Whether base64url `chars` decode to the start of a JSON object with a member: `{`, any
/// JSON whitespace, then `"` (a JWT's header, whose first member jsonwebtoken reads however
/// it is spaced).
fn starts_a_json_object(chars: impl Iterator<Item = u8>) -> bool {
    let (mut bits, mut held, mut first) = (0u32, 0u32, true);
    for c in chars {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return false,
        };
        bits = (bits << 6 | u32::from(value)) & 0xfff;
        held += 6;
        if held >= 8 {
            held -= 8;
            let byte = (bits >> held) as u8;
            match (first, byte) {
                (true, b'{') => first = false,
                (false, b' ' | b'\t' | b'\r' | b'\n') => {}
                (false, b'"') => return true,
                _ => return false,
            }
        }
    }
    false
}

/// The path in normal form (borrowed when it already is), or why it is refused (400).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, &'static str> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err("the request target is not a path");
    }
    // `None` while the output equals the input so far; the rewritten prefix after that.
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (hex_digit(bytes, i + 1), hex_digit(bytes, i + 2))
                else {
                    return Err("the path has a malformed percent-encoding");
                };
                let byte = hi << 4 | lo;
                if matches!(byte, b'.' | b'/' | b'\\' | b';' | 0) {
                    return Err("the path has an encoded '.', '/', '\\', ';' or NUL");
                }
                if is_unreserved(byte) {
                    rewrite(&mut out, bytes, i).push(byte);
                } else {
                    let upper = percent_encoded(byte);
                    if bytes[i..i + 3] != upper {
                        rewrite(&mut out, bytes, i).extend_from_slice(&upper);
                    } else if let Some(out) = &mut out {
                        out.extend_from_slice(&upper);
                    }
                }
                i += 3;
            }
            b'/' => {
                let after_slash = match &out {
                    Some(out) => out.last() == Some(&b'/'),
                    None => i > 0 && bytes[i - 1] == b'/',
                };
                if after_slash {
                    rewrite(&mut out, bytes, i);
                } else if let Some(out) = &mut out {
                    out.push(b'/');
                }
                i += 1;
            }
            b';' => return Err("the path has a ';' parameter"),
            b'\\' => return Err("the path has a backslash"),
            high @ 0x80.. => {
                rewrite(&mut out, bytes, i).extend_from_slice(&percent_encoded(high));
                i += 1;
            }
            other => {
                if let Some(out) = &mut out {
                    out.push(other);
                }
                i += 1;
            }
        }
    }
    let normal = match out {
        None => Cow::Borrowed(path),
        // Only whole UTF-8 sequences are copied and only ASCII is added: this never fails.
        Some(out) => {
            Cow::Owned(String::from_utf8(out).map_err(|_| "the path is not UTF-8 after decoding")?)
        }
    };
    if normal.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("the path has dot segments");
    }
    Ok(normal)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// `%XX` for `byte`, uppercase hex.
fn percent_encoded(byte: u8) -> [u8; 3] {
    [
        b'%',
        HEX[usize::from(byte >> 4)],
        HEX[usize::from(byte & 0xF)],
    ]
}

/// The value of the hex digit at `bytes[at]`, if there is one.
fn hex_digit(bytes: &[u8], at: usize) -> Option<u8> {
    let c = *bytes.get(at)?;
    char::from(c)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// RFC 3986 §2.3.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// The output buffer, started with the input's first `at` bytes if it was not yet.
fn rewrite<'o>(out: &'o mut Option<Vec<u8>>, bytes: &[u8], at: usize) -> &'o mut Vec<u8> {
    out.get_or_insert_with(|| {
        let mut started = Vec::with_capacity(bytes.len());
        started.extend_from_slice(&bytes[..at]);
        started
    })
}

/// `path?query`, or `path` when there is no query; a byte of the query outside ASCII
/// percent-encoded, as in the path.
pub fn with_query<'p>(path: &'p str, query: Option<&str>) -> Cow<'p, str> {
    let Some(query) = query else {
        return Cow::Borrowed(path);
    };
    let mut out = String::with_capacity(path.len() + 1 + query.len());
    out.push_str(path);
    out.push('?');
    for &byte in query.as_bytes() {
        match byte.is_ascii() {
            true => out.push(char::from(byte)),
            false => out.extend(percent_encoded(byte).map(char::from)),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_in_a_logged_path_is_masked() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
        for (path, shown) in [
            (
                format!("/ws;access_token={jwt}"),
                "/ws;access_token=***".to_owned(),
            ),
            (format!("/ws/{jwt}/x"), "/ws/***/x".to_owned()),
            (
                format!("/a%3Ft={jwt}&u={jwt}"),
                "/a%3Ft=***&u=***".to_owned(),
            ),
            (
                "/ws/eyJust-a-name".to_owned(),
                "/ws/eyJust-a-name".to_owned(),
            ),
            ("/ws/eyJ".to_owned(), "/ws/eyJ".to_owned()),
            // Dots, or the token's first letters, percent-encoded.
            (
                format!("/ws/{}/x", jwt.replace('.', "%2E")),
                "/ws/***/x".to_owned(),
            ),
            (
                format!("/ws/{}", jwt.replace('.', "%2e")),
                "/ws/***".to_owned(),
            ),
            (format!("/ws/%65%79J{}", &jwt[3..]), "/ws/***".to_owned()),
            ("/ws/%2E%zz%".to_owned(), "/ws/%2E%zz%".to_owned()),
            ("/ws/caf%C3%A9".to_owned(), "/ws/caf%C3%A9".to_owned()),
            // A header whose JSON has whitespace, as jsonwebtoken reads it.
            (
                "/ws/eyAiYWxnIjoiSFMyNTYifQ.eyAic3ViIjoieCJ9.c2ln".to_owned(),
                "/ws/***".to_owned(),
            ),
            (
                "/ws/ewoiYWxnIjoiSFMyNTYifQ.e30.c2ln/x".to_owned(),
                "/ws/***/x".to_owned(),
            ),
            // Words that begin the same way, with a dot after them.
            (
                "/keys/key.pem/they.json/eyes.png".to_owned(),
                "/keys/key.pem/they.json/eyes.png".to_owned(),
            ),
        ] {
            assert_eq!(for_log(&path), shown);
        }
        assert!(matches!(for_log("/ws/chat"), Cow::Borrowed(_)));
    }

    fn normal(path: &str) -> String {
        normalize(path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .into_owned()
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for path in ["/", "/ws/room/1", "/a/%C3%A9/b", "/a-b_c~d.e/", "/x..y/.z"] {
            assert!(
                matches!(normalize(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_slashes_merged() {
        assert_eq!(normal("/api/%61dmin"), "/api/admin");
        assert_eq!(normal("/api//admin"), "/api/admin");
        assert_eq!(normal("//api///admin//"), "/api/admin/");
        assert_eq!(normal("/%7e%7E%2d%5F%30"), "/~~-_0");
        assert_eq!(normal("/a/%c3%a9%3a%20"), "/a/%C3%A9%3A%20");
        assert_eq!(normal("/a/%25%2561"), "/a/%25%2561");
        // A character sent raw is sent on encoded, as browsers send it.
        assert_eq!(normal("/é//x"), "/%C3%A9/x");
        assert_eq!(normal("/a/ß%c3%a9"), "/a/%C3%9F%C3%A9");
    }

    #[test]
    fn suspicious_paths_are_refused() {
        for path in [
            "/ws/../admin",
            "/ws/./admin",
            "/ws/..",
            "/ws/%2e%2e/admin",
            "/ws/%2E/admin",
            "/ws/.%2e/admin",
            "/ws%2Fadmin",
            "/ws%2fadmin",
            "/ws%5cadmin",
            "/ws\\admin",
            "/ws%00",
            "/ws/admin;x",
            "/ws;x/admin",
            "/ws/%3Bx",
            "/ws/%3b",
            "/ws/%zz",
            "/ws/%4",
            "/ws/%",
            "/ws/%g1",
            "/ws/%+1",
            "*",
            "",
        ] {
            assert!(normalize(path).is_err(), "{path} was not refused");
        }
    }

    #[test]
    fn normalizing_is_idempotent() {
        for path in ["/api//%61dmin/", "/%c3%a9", "//", "/a/%25", "/wß"] {
            let once = normal(path);
            assert!(matches!(normalize(&once), Ok(Cow::Borrowed(p)) if p == once));
        }
    }

    #[test]
    fn queries_are_appended() {
        assert_eq!(with_query("/ws", Some("a=1")), "/ws?a=1");
        assert_eq!(with_query("/ws", Some("")), "/ws?");
        assert_eq!(with_query("/ws", None), "/ws");
        assert_eq!(with_query("/ws", Some("q=é&r=1")), "/ws?q=%C3%A9&r=1");
    }
}
