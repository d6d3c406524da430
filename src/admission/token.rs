//! Bearer tokens: where a request carries one (`token_sources`), and whether it is valid
//! (jsonwebtoken, with the policy's explicit algorithms and keys).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{crypto, decode_header};
use serde_json::{Map, Value};

use super::jwks::JwksCache;
use super::Rejection;
use crate::policy::{Auth, Key, KeyFamily, TokenSource};
use std::sync::Arc;

/// `Retry-After` while a `jwks_url` key set is not available.
pub const KEYS_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Tokens longer than this are rejected without being parsed.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A token found in a request, and where, so it can be kept from the upstream.
#[derive(Debug)]
pub struct Found<'a> {
    pub token: &'a str,
    pub source: &'a TokenSource,
    /// For a subprotocol token: the whole `Sec-WebSocket-Protocol` entry.
    pub entry: Option<&'a str>,
}

/// The token carriers of a request that the upstream must not see.
#[derive(Debug, Clone, Copy)]
pub struct Carriers<'a> {
    /// Every carrier the route names: each copy of each is removed, whichever held the
    /// token.
    pub sources: &'a [TokenSource],
    /// The verified token's carrier, when the route forwards the token: its first copy,
    /// the one the gate read and verified, goes upstream; every later copy is removed, so
    /// an upstream that reads the last of `?access_token=A&access_token=B` (Django, PHP,
    /// Rack) cannot act on a token the gate never checked.
    pub kept: Option<&'a TokenSource>,
}

impl Carriers<'_> {
    /// Nothing to remove.
    pub const NONE: Carriers<'static> = Carriers {
        sources: &[],
        kept: None,
    };
}

/// The first token found in `sources` order.
pub fn extract<'a>(
    sources: &'a [TokenSource],
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    protocols: &[&'a str],
) -> Option<Found<'a>> {
    for source in sources {
        let found = match source {
            TokenSource::Header => headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    let (scheme, token) = v.trim().split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                })
                .map(|token| (token, None)),
            TokenSource::Query(name) => query.and_then(|q| {
                // A bare name (`?access_token`) is the parameter with an empty value, as
                // URL parsers (WHATWG, Go's, Python's with blanks kept) read it.
                q.split(QUERY_SEPARATORS)
                    .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                    .find(|(k, _)| query_name_is(k, name))
                    .map(|(_, v)| (v, None))
            }),
            // Read as bytes: browsers send other cookies' UTF-8 values unencoded, and
            // such a byte anywhere in the header must not hide the token cookie.
            TokenSource::Cookie(name) => headers
                .get_all(header::COOKIE)
                .iter()
                .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
                .filter_map(|c| {
                    let eq = c.iter().position(|&b| b == b'=')?;
                    Some((&c[..eq], &c[eq + 1..]))
                })
                .find(|(k, _)| k.trim_ascii() == name.as_bytes())
                .and_then(|(_, v)| std::str::from_utf8(v.trim_ascii()).ok())
                .map(|v| (v, None)),
            TokenSource::Subprotocol(prefix) => protocols
                .iter()
                .find_map(|p| p.strip_prefix(prefix.as_str()).map(|t| (t, Some(*p)))),
        };
        if let Some((token, entry)) = found.filter(|(t, _)| !t.is_empty()) {
            return Some(Found {
                token,
                source,
                entry,
            });
        }
    }
    None
}

/// What separates a query's parameters for the token's purposes: `&`, and the `;` that
/// some frameworks also split on (Rack 2, Python before 3.9.2, Go before 1.17).
pub const QUERY_SEPARATORS: [char; 2] = ['&', ';'];

/// Whether a query parameter name, as sent, is `name`: as it is, or once form-decoded
/// (`%XX` escapes in either case, `+` as a space), which is how the upstream's query parser
/// reads it, so `access%5Ftoken` is `access_token`. Decoded once, as an upstream does; an
/// escape that is not two hex digits stays as it is. Allocates nothing.
pub fn query_name_is(raw: &str, name: &str) -> bool {
    fn hex(b: Option<&u8>) -> Option<u8> {
        b.and_then(|b| char::from(*b).to_digit(16))
            .and_then(|d| u8::try_from(d).ok())
    }
    if raw == name {
        return true;
    }
    let raw = raw.as_bytes();
    let mut want = name.as_bytes().iter().copied();
    let mut i = 0;
    while i < raw.len() {
        let (byte, len) = match raw[i] {
            b'+' => (b' ', 1),
            b'%' => match (hex(raw.get(i + 1)), hex(raw.get(i + 2))) {
                (Some(high), Some(low)) => ((high << 4) | low, 3),
                _ => (b'%', 1),
            },
            b => (b, 1),
        };
        if want.next() != Some(byte) {
            return false;
        }
        i += len;
    }
    want.next().is_none()
}

/// A verified token's claims (cheap to clone: the map is shared).
#[derive(Debug, Clone)]
pub struct Claims {
    pub map: Arc<Map<String, Value>>,
    /// `exp`, seconds since the epoch (a fraction rounded).
    pub exp: u64,
}

impl Claims {
    /// A string claim (`sub`, `jti`, …), if the token has it as a string that is not
    /// empty: `"sub": ""` names no subject (no subject cap, nothing to revoke or close by),
    /// as a token without `sub` does.
    pub fn claim_str(&self, name: &str) -> Option<&str> {
        self.map
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// When a connection admitted with this token must close: `exp` plus `leeway`, as a
    /// monotonic instant (now, if that has passed). `None` when the token has no `exp` or
    /// the time is beyond what the clock can represent (never, in practice). Every step
    /// saturates: `exp` is the client's number, up to 2^64 - 1.
    pub fn expires_at(&self, leeway_seconds: u64) -> Option<tokio::time::Instant> {
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        deadline(
            self.exp,
            leeway_seconds,
            unix_now,
            tokio::time::Instant::now(),
        )
    }
}

/// `exp + leeway` (Unix seconds) as an instant on the clock that reads `now` at
/// `unix_now`; see [`Claims::expires_at`].
pub fn deadline(
    exp: u64,
    leeway_seconds: u64,
    unix_now: std::time::Duration,
    now: tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    if exp == 0 {
        return None;
    }
    let at = std::time::Duration::from_secs(exp.saturating_add(leeway_seconds));
    now.checked_add(at.saturating_sub(unix_now))
}

/// Verify signature, algorithm, `exp`, `nbf`, `iss` and `aud` against the route's policy.
/// Keys are the route's own plus its fetched JWKS; a `kid` none of them has triggers at
/// most one refetch. The header is decoded once, the payload once, after a signature
/// verified.
pub async fn verify(token: &str, auth: &Auth, jwks: &JwksCache) -> Result<Claims, Rejection> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Rejection::InvalidToken);
    }
    let header = decode_header(token).map_err(|_| Rejection::InvalidToken)?;
    if !auth.algorithms.contains(&header.alg) {
        return Err(Rejection::InvalidToken);
    }
    // `decode_header` split the token the same way: `header.payload.signature`.
    let Some((message, signature)) = token.rsplit_once('.') else {
        return Err(Rejection::InvalidToken);
    };
    let Some((_, payload)) = message.rsplit_once('.') else {
        return Err(Rejection::InvalidToken);
    };
    let signed = Signed {
        header: &header,
        message,
        signature,
    };
    let mut refetched = false;
    loop {
        let fetched: Vec<Arc<Vec<Key>>> = auth
            .jwks_urls
            .iter()
            .filter_map(|u| jwks.keys(&u.url))
            .collect();
        let never_fetched = fetched.len() < auth.jwks_urls.len();
        let keys = auth
            .keys
            .iter()
            .chain(fetched.iter().flat_map(|set| set.iter()));
        let verified = match signed.verify(keys) {
            Ok(()) => validate(payload, auth, unix_now()),
            Err(failure) => Err(failure),
        };
        match verified {
            Ok(claims) => return Ok(claims),
            Err(Failure::Expired) => return Err(Rejection::TokenExpired),
            Err(Failure::Invalid) => return Err(Rejection::InvalidToken),
            Err(Failure::NoKey) => {
                // Only a `kid` no loaded key has is a reason to refetch (a rotation): a known
                // one with a bad signature is a forgery, which must not spend the refetch
                // budget a rotation needs.
                let kid_known = header.kid.is_some()
                    && auth
                        .keys
                        .iter()
                        .chain(fetched.iter().flat_map(|set| set.iter()))
                        .any(|k| k.kid == header.kid);
                if header.kid.is_some() && !kid_known && !refetched && !auth.jwks_urls.is_empty() {
                    refetched = true;
                    let mut any = false;
                    for source in &auth.jwks_urls {
                        any |= jwks.refetch(&source.url).await;
                    }
                    if any {
                        continue;
                    }
                }
                // Only keys a key set can hold are missing: a JWKS never gives an HMAC
                // secret, so an HS* token that no configured secret verifies is invalid
                // now and will be once the sets are fetched.
                if never_fetched && KeyFamily::of(header.alg) != KeyFamily::Hmac {
                    return Err(Rejection::KeysUnavailable {
                        retry_after: KEYS_RETRY_AFTER,
                    });
                }
                return Err(Rejection::InvalidToken);
            }
        }
    }
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// No key matched the token's `kid`/algorithm, or none verified its signature.
    NoKey,
    /// A key verified the signature but the token has expired.
    Expired,
    /// The token is malformed, or a key verified the signature but the claims are wrong
    /// (iss, aud, nbf, a missing or unreadable exp).
    Invalid,
}

/// A token's signed part and signature, with its decoded header.
struct Signed<'t> {
    header: &'t jsonwebtoken::Header,
    /// `header.payload`, as sent.
    message: &'t str,
    signature: &'t str,
}

impl Signed<'_> {
    /// Whether one of `keys` (of the header's algorithm and, when it names one, its `kid`)
    /// verifies the signature.
    fn verify<'k>(&self, keys: impl Iterator<Item = &'k Key>) -> Result<(), Failure> {
        let header = self.header;
        let family = KeyFamily::of(header.alg);
        let candidates = keys.filter(|k| {
            k.family == family
                && k.alg.is_none_or(|a| a == header.alg)
                && match (&header.kid, &k.kid) {
                    (Some(wanted), Some(have)) => wanted == have,
                    // A token naming a key may only use that key.
                    (Some(_), None) => false,
                    (None, _) => true,
                }
        });
        for key in candidates {
            match crypto::verify(
                self.signature,
                self.message.as_bytes(),
                &key.decoding,
                header.alg,
            ) {
                Ok(true) => return Ok(()),
                Ok(false) => continue,
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature
                    | ErrorKind::InvalidAlgorithm
                    | ErrorKind::InvalidKeyFormat
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidRsaKey(_) => continue,
                    // The signature is not base64url.
                    _ => return Err(Failure::Invalid),
                },
            }
        }
        Err(Failure::NoKey)
    }
}

/// A claim read as jsonwebtoken's validation reads it.
enum Parsed<T> {
    Absent,
    Unreadable,
    Is(T),
}

/// A NumericDate (`exp`, `nbf`): an integer, or a non-negative fraction rounded; a
/// negative number, a string or `null` is unreadable.
fn numeric(value: Option<&Value>) -> Parsed<u64> {
    match value {
        None => Parsed::Absent,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Parsed::Is(v),
            None => match n.as_f64() {
                Some(f) if n.is_f64() && f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                    Parsed::Is(f.round() as u64)
                }
                _ => Parsed::Unreadable,
            },
        },
        Some(_) => Parsed::Unreadable,
    }
}

/// `iss`: one string (RFC 7519 §4.1.1: a StringOrURI), as Envoy's jwt_authn requires;
/// an array, which jsonwebtoken would search, is unreadable (`null`: absent).
fn issuer(value: Option<&Value>) -> Parsed<Vec<&str>> {
    match value {
        None | Some(Value::Null) => Parsed::Absent,
        Some(Value::String(s)) => Parsed::Is(vec![s.as_str()]),
        Some(_) => Parsed::Unreadable,
    }
}

/// `aud`: a string, or an array of strings (`null`: absent).
fn names(value: Option<&Value>) -> Parsed<Vec<&str>> {
    match value {
        None | Some(Value::Null) => Parsed::Absent,
        Some(Value::String(s)) => Parsed::Is(vec![s.as_str()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(Value::as_str)
            .collect::<Option<Vec<_>>>()
            .map_or(Parsed::Unreadable, Parsed::Is),
        Some(_) => Parsed::Unreadable,
    }
}

/// The payload's claims, checked as jsonwebtoken's `Validation` checks them, in its order:
/// `exp` required (and `iss`/`aud` when the route names them), `exp` and `nbf` against
/// `now` with the leeway, then issuer and audience (any one listed value matching). Two
/// differences, both stricter: a token is expired from `exp + leeway` on, and an `iss`
/// must be one string.
fn validate(payload: &str, auth: &Auth, now: u64) -> Result<Claims, Failure> {
    use base64::Engine as _;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| Failure::Invalid)?;
    let map: Map<String, Value> = serde_json::from_slice(&json).map_err(|_| Failure::Invalid)?;
    let Parsed::Is(exp) = numeric(map.get("exp")) else {
        return Err(Failure::Invalid);
    };
    let iss = issuer(map.get("iss"));
    let aud = names(map.get("aud"));
    let required = |claim: &Parsed<Vec<&str>>, configured: &[String]| {
        configured.is_empty() || matches!(claim, Parsed::Is(_))
    };
    if !required(&iss, &auth.issuer) || !required(&aud, &auth.audience) {
        return Err(Failure::Invalid);
    }
    let nbf = numeric(map.get("nbf"));
    if matches!(nbf, Parsed::Unreadable) {
        return Err(Failure::Invalid);
    }
    // Expired once `exp + leeway` is reached (RFC 7519 §4.1.4: the current time must be
    // before `exp`), not a second later: `now` is whole seconds, and a connection admitted
    // within that second would be closed at once by the relay's expiry timer, which keeps
    // exact time. (jsonwebtoken still admits at `exp + leeway == now`.)
    if exp.saturating_add(auth.leeway_seconds) <= now {
        return Err(Failure::Expired);
    }
    if matches!(nbf, Parsed::Is(nbf) if nbf > now.saturating_add(auth.leeway_seconds)) {
        return Err(Failure::Invalid);
    }
    let listed = |claim: &Parsed<Vec<&str>>, configured: &[String]| match claim {
        Parsed::Is(values) => values.iter().any(|v| configured.iter().any(|c| c == v)),
        // Not required: the route names none.
        _ => true,
    };
    if !auth.issuer.is_empty() && !listed(&iss, &auth.issuer) {
        return Err(Failure::Invalid);
    }
    if !auth.audience.is_empty() && !listed(&aud, &auth.audience) {
        return Err(Failure::Invalid);
    }
    // RFC 7519 §4.1.2, §4.1.7: `sub` and `jti` are strings. A number would slip past the
    // per-subject cap and a revocation by `sub` or `jti`, which key on the string (and the
    // operator API takes only a string); Envoy's jwt_authn refuses such a `sub` too.
    for name in ["sub", "jti"] {
        if !matches!(map.get(name), None | Some(Value::Null | Value::String(_))) {
            return Err(Failure::Invalid);
        }
    }
    Ok(Claims {
        map: Arc::new(map),
        exp,
    })
}

/// Claims that hold a space-delimited list in one string (RFC 8693 §4.2 `scope`; Azure
/// AD's `scp`): `"openid chat:write"` matches `chat:write`, as Istio reads them.
const SPACE_DELIMITED: [&str; 2] = ["scope", "scp"];

/// Every `require_claims` entry must match and no `deny_claims` entry may. An entry
/// matches a string claim equal to one of its values, or an array claim with any element
/// equal to one of them; a `scope` or `scp` string also matches by any of its
/// space-delimited words.
pub fn claims_allowed(claims: &Claims, auth: &Auth) -> bool {
    let has = |name: &String, values: &[String]| {
        let matches = |v: &Value| values.iter().any(|a| scalar_text(v).as_deref() == Some(a));
        match claims.map.get(name) {
            Some(Value::Array(items)) => items.iter().any(matches),
            Some(Value::String(list)) if SPACE_DELIMITED.contains(&name.as_str()) => {
                values.iter().any(|a| a == list)
                    || list
                        .split_ascii_whitespace()
                        .any(|word| values.iter().any(|a| a == word))
            }
            Some(v) => matches(v),
            None => false,
        }
    };
    auth.require_claims
        .iter()
        .all(|(name, values)| has(name, values))
        && !auth
            .deny_claims
            .iter()
            .any(|(name, values)| has(name, values))
}

/// The first `forward_claims` claim that the token has as a scalar whose text cannot be a
/// header value as it is: a control character (CR, LF, NUL, DEL), which no header value
/// may hold, or a space or tab at either end, which every HTTP parser strips (RFC 9110
/// §5.5). Sent without it, the connection would reach the upstream without the identity
/// the gate vouches for; sent as it is, the upstream would read `alice` where the gate
/// admitted, capped and would revoke ` alice `. So the claims step refuses such a token.
pub fn unforwardable_claim<'a>(claims: &Map<String, Value>, auth: &'a Auth) -> Option<&'a str> {
    auth.forward_claims.iter().find_map(|(claim, _)| {
        let text = scalar_text(claims.get(claim)?)?;
        let padded = [text.bytes().next(), text.bytes().next_back()]
            .iter()
            .any(|end| matches!(end, Some(b' ' | b'\t')));
        (padded || HeaderValue::from_str(&text).is_err()).then_some(claim.as_str())
    })
}

/// The `forward_claims` headers for these claims (scalar claims only).
pub fn claim_headers(claims: &Claims, auth: &Auth) -> Vec<(HeaderName, HeaderValue)> {
    auth.forward_claims
        .iter()
        .filter_map(|(claim, header)| {
            let text = scalar_text(claims.map.get(claim)?)?;
            Some((header.clone(), HeaderValue::from_str(&text).ok()?))
        })
        .collect()
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_match_once_form_decoded() {
        for raw in [
            "access_token",
            "access%5Ftoken",
            "access%5ftoken",
            "%61ccess%5F%74oken",
        ] {
            assert!(query_name_is(raw, "access_token"), "{raw}");
        }
        assert!(query_name_is("a+b", "a b"));
        assert!(query_name_is("a%20b", "a b"));
        // A name as configured matches as sent too.
        assert!(query_name_is("a+b", "a+b"));
        assert!(query_name_is("a%2Bb", "a+b"));
        for raw in [
            "access_tokens",
            "access_toke",
            "access%5",
            "access%5Gtoken",
            "access%255Ftoken",
            "access%",
            "%",
            "",
            "accèss_token",
        ] {
            assert!(!query_name_is(raw, "access_token"), "{raw}");
        }
        assert!(query_name_is("100%", "100%"));
        assert!(query_name_is("%zz", "%zz"));
        assert!(!query_name_is("%C3", "é"));
        assert!(query_name_is("%C3%A9", "é"));
    }

    fn auth(issuer: &[&str], audience: &[&str], leeway_seconds: u64) -> Auth {
        Auth {
            required: true,
            token_sources: vec![TokenSource::Header],
            algorithms: vec![jsonwebtoken::Algorithm::HS256],
            keys: Vec::new(),
            jwks_urls: Vec::new(),
            issuer: issuer.iter().map(|s| s.to_string()).collect(),
            audience: audience.iter().map(|s| s.to_string()).collect(),
            leeway_seconds,
            require_claims: Vec::new(),
            deny_claims: Vec::new(),
            forward_claims: Vec::new(),
            close_on_expiry: true,
            forward_token: false,
        }
    }

    /// jsonwebtoken's own validation, as the gate configured it before it checked the
    /// claims itself.
    fn jsonwebtoken_validation(auth: &Auth) -> jsonwebtoken::Validation {
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.leeway = auth.leeway_seconds;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = std::collections::HashSet::from(["exp".to_owned()]);
        if auth.issuer.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&auth.issuer);
            required.insert("iss".to_owned());
        }
        if auth.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&auth.audience);
            required.insert("aud".to_owned());
        }
        validation.required_spec_claims = required;
        validation
    }

    /// The claims check reads every claim as jsonwebtoken's `Validation` did: the same
    /// verdict (valid, expired, invalid) for every combination of good, bad, odd and
    /// missing `exp`, `nbf`, `iss` and `aud`, under routes with and without issuer,
    /// audience and leeway.
    #[test]
    fn claims_are_judged_as_jsonwebtoken_judges_them() {
        use serde_json::json;
        let now = jsonwebtoken::get_current_timestamp();
        let secret = jsonwebtoken::EncodingKey::from_secret(b"s");
        let decoding = jsonwebtoken::DecodingKey::from_secret(b"s");
        let exps = [
            None,
            Some(json!(now + 100)),
            Some(json!(now - 100)),
            Some(json!(now - 10)),
            Some(json!((now + 100) as f64 + 0.4)),
            Some(json!(1.5e9)),
            Some(json!(-5)),
            Some(json!("123")),
            Some(json!(null)),
            Some(json!(1e30)),
        ];
        let nbfs = [
            None,
            Some(json!(now - 10)),
            Some(json!(now + 100)),
            Some(json!(now + 10)),
            Some(json!("x")),
            Some(json!(-1)),
            Some(json!(null)),
        ];
        let names = |one: &str, other: &str| {
            [
                None,
                Some(json!(one)),
                Some(json!("z")),
                Some(json!([one, "z"])),
                Some(json!(["z"])),
                Some(json!([])),
                Some(json!(5)),
                Some(json!(null)),
                Some(json!([other, 3])),
            ]
        };
        let routes = [
            auth(&[], &[], 0),
            auth(&[], &[], 30),
            auth(&["a", "b"], &[], 0),
            auth(&[], &["x"], 30),
            auth(&["a"], &["x", "y"], 30),
        ];
        let mut compared = 0;
        for exp in &exps {
            for nbf in &nbfs {
                for iss in &names("a", "b") {
                    for aud in &names("x", "y") {
                        let mut claims = Map::new();
                        for (name, value) in
                            [("exp", exp), ("nbf", nbf), ("iss", iss), ("aud", aud)]
                        {
                            if let Some(v) = value {
                                claims.insert(name.to_owned(), v.clone());
                            }
                        }
                        let token = jsonwebtoken::encode(
                            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                            &claims,
                            &secret,
                        )
                        .unwrap();
                        let payload = token.split('.').nth(1).unwrap();
                        for route in &routes {
                            let theirs = match jsonwebtoken::decode::<Map<String, Value>>(
                                &token,
                                &decoding,
                                &jsonwebtoken_validation(route),
                            ) {
                                Ok(_) => Ok(()),
                                Err(e) if *e.kind() == ErrorKind::ExpiredSignature => {
                                    Err(Failure::Expired)
                                }
                                Err(_) => Err(Failure::Invalid),
                            };
                            // Stricter than jsonwebtoken: an `iss` array is refused
                            // where the route names issuers.
                            let theirs = match iss {
                                Some(Value::Array(_)) if !route.issuer.is_empty() => {
                                    Err(Failure::Invalid)
                                }
                                _ => theirs,
                            };
                            let ours = validate(payload, route, now).map(|_| ());
                            assert_eq!(
                                ours,
                                theirs,
                                "{claims:?} under {:?}",
                                (&route.issuer, &route.audience, route.leeway_seconds)
                            );
                            compared += 1;
                        }
                    }
                }
            }
        }
        assert!(compared > 20_000);
    }

    /// Expired from `exp + leeway` on, in whole seconds: a token is never admitted in the
    /// second its connection would be closed for expiry.
    #[test]
    fn a_token_is_expired_from_exp_plus_leeway_on() {
        use base64::Engine as _;
        let now = jsonwebtoken::get_current_timestamp();
        for (leeway, exp, expired) in [
            (0, now, true),
            (0, now + 1, false),
            (30, now - 30, true),
            (30, now - 29, false),
        ] {
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::json!({ "exp": exp }).to_string());
            let verdict = validate(&payload, &auth(&[], &[], leeway), now).map(|_| ());
            let want = if expired {
                Err(Failure::Expired)
            } else {
                Ok(())
            };
            assert_eq!(
                verdict,
                want,
                "exp now{:+} leeway {leeway}",
                exp as i64 - now as i64
            );
        }
    }

    /// `iss` is one string: an array is refused even when an element is listed.
    #[test]
    fn an_issuer_array_is_invalid() {
        use base64::Engine as _;
        let now = jsonwebtoken::get_current_timestamp();
        let route = auth(&["https://a.example"], &[], 0);
        for (iss, valid) in [
            (serde_json::json!("https://a.example"), true),
            (
                serde_json::json!(["https://evil.example", "https://a.example"]),
                false,
            ),
            (serde_json::json!(["https://a.example"]), false),
        ] {
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::json!({"exp": now + 100, "iss": iss}).to_string());
            assert_eq!(validate(&payload, &route, now).is_ok(), valid, "{iss}");
        }
    }

    #[test]
    fn a_sub_that_is_not_a_string_is_invalid() {
        use base64::Engine as _;
        let now = jsonwebtoken::get_current_timestamp();
        let route = auth(&[], &[], 0);
        for (sub, valid) in [
            (serde_json::json!("alice"), true),
            (serde_json::json!(null), true),
            (serde_json::json!(123), false),
            (serde_json::json!(["alice"]), false),
            (serde_json::json!({"id": 1}), false),
        ] {
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::json!({"exp": now + 100, "sub": sub}).to_string());
            assert_eq!(validate(&payload, &route, now).is_ok(), valid, "{sub}");
        }
    }

    /// The signature is checked with the header decoded once: a good token passes, a
    /// tampered payload or signature and a wrong key do not, and a malformed signature is
    /// invalid rather than "no key".
    #[test]
    fn signatures_are_checked_once_per_candidate_key() {
        let secret = jsonwebtoken::EncodingKey::from_secret(b"right");
        let key = |secret: &[u8]| Key {
            kid: None,
            family: KeyFamily::Hmac,
            alg: None,
            decoding: jsonwebtoken::DecodingKey::from_secret(secret),
        };
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"exp": 4_000_000_000u64}),
            &secret,
        )
        .unwrap();
        let check = |token: &str, keys: &[Key]| {
            let header = decode_header(token).unwrap();
            let (message, signature) = token.rsplit_once('.').unwrap();
            Signed {
                header: &header,
                message,
                signature,
            }
            .verify(keys.iter())
        };
        assert_eq!(check(&token, &[key(b"wrong"), key(b"right")]), Ok(()));
        assert_eq!(check(&token, &[key(b"wrong")]), Err(Failure::NoKey));
        let (head, signature) = token.rsplit_once('.').unwrap();
        let tampered = format!("{head}x.{signature}");
        assert_eq!(check(&tampered, &[key(b"right")]), Err(Failure::NoKey));
        let bad_base64 = format!("{head}.***");
        assert_eq!(check(&bad_base64, &[key(b"right")]), Err(Failure::Invalid));
    }

    #[test]
    fn escaped_query_names_carry_the_token() {
        let sources = [TokenSource::Query("access_token".into())];
        let headers = HeaderMap::new();
        let found = extract(&sources, &headers, Some("a=1&access%5ftoken=t.k.n"), &[]);
        assert_eq!(found.map(|f| f.token), Some("t.k.n"));
    }
}
