//! Bearer tokens: where a request carries one (`token_sources`), and whether it is valid
//! (jsonwebtoken, with the policy's explicit algorithms and keys).

use std::collections::HashSet;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, decode_header, Validation};
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
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| query_name_is(k, name))
                    .map(|(_, v)| (v, None))
            }),
            TokenSource::Cookie(name) => headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .find(|(k, _)| k.trim() == name)
                .map(|(_, v)| (v.trim(), None)),
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

/// A verified token's claims.
#[derive(Debug, Clone)]
pub struct Claims {
    pub map: Map<String, Value>,
    /// `exp`, seconds since the epoch (a fraction rounded).
    pub exp: u64,
}

impl Claims {
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
/// most one refetch.
pub async fn verify(token: &str, auth: &Auth, jwks: &JwksCache) -> Result<Claims, Rejection> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Rejection::InvalidToken);
    }
    let header = decode_header(token).map_err(|_| Rejection::InvalidToken)?;
    if !auth.algorithms.contains(&header.alg) {
        return Err(Rejection::InvalidToken);
    }
    let validation = validation(header.alg, auth);
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
        match try_keys(token, &header, &validation, keys) {
            Ok(claims) => return Ok(claims),
            Err(Failure::Expired) => return Err(Rejection::TokenExpired),
            Err(Failure::Invalid) => return Err(Rejection::InvalidToken),
            Err(Failure::NoKey) => {
                if header.kid.is_some() && !refetched && !auth.jwks_urls.is_empty() {
                    refetched = true;
                    let mut any = false;
                    for source in &auth.jwks_urls {
                        any |= jwks.refetch(&source.url).await;
                    }
                    if any {
                        continue;
                    }
                }
                if never_fetched {
                    return Err(Rejection::KeysUnavailable {
                        retry_after: KEYS_RETRY_AFTER,
                    });
                }
                return Err(Rejection::InvalidToken);
            }
        }
    }
}

fn validation(alg: jsonwebtoken::Algorithm, auth: &Auth) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = auth.leeway_seconds;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required: HashSet<String> = HashSet::from(["exp".to_owned()]);
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

enum Failure {
    /// No key matched the token's `kid`/algorithm, or none verified its signature.
    NoKey,
    /// A key verified the signature but the token has expired.
    Expired,
    /// A key verified the signature but the claims are wrong (iss, aud, nbf, missing exp).
    Invalid,
}

fn try_keys<'k>(
    token: &str,
    header: &jsonwebtoken::Header,
    validation: &Validation,
    keys: impl Iterator<Item = &'k Key>,
) -> Result<Claims, Failure> {
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
        match decode::<Map<String, Value>>(token, &key.decoding, validation) {
            Ok(data) => {
                let exp = data.claims.get("exp").map_or(0, numeric_date);
                return Ok(Claims {
                    map: data.claims,
                    exp,
                });
            }
            Err(e) => match e.kind() {
                ErrorKind::ExpiredSignature => return Err(Failure::Expired),
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidKeyFormat
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidRsaKey(_) => continue,
                _ => return Err(Failure::Invalid),
            },
        }
    }
    Err(Failure::NoKey)
}

/// A NumericDate claim in whole seconds, read as jsonwebtoken validated it: an integer,
/// or a fraction rounded (RFC 7519 §2 allows them); 0 for anything else.
fn numeric_date(value: &Value) -> u64 {
    value
        .as_u64()
        .or_else(|| {
            let f = value.as_f64()?;
            (f.is_finite() && f >= 0.0 && f < u64::MAX as f64).then(|| f.round() as u64)
        })
        .unwrap_or(0)
}

/// Every `require_claims` entry must match: a string claim equal to one of the values, or
/// an array claim with any element equal to one of them.
pub fn claims_allowed(claims: &Claims, auth: &Auth) -> bool {
    auth.require_claims.iter().all(|(name, accepted)| {
        let matches = |v: &Value| {
            accepted
                .iter()
                .any(|a| scalar_text(v).as_deref() == Some(a))
        };
        match claims.map.get(name) {
            Some(Value::Array(items)) => items.iter().any(matches),
            Some(v) => matches(v),
            None => false,
        }
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

    #[test]
    fn escaped_query_names_carry_the_token() {
        let sources = [TokenSource::Query("access_token".into())];
        let headers = HeaderMap::new();
        let found = extract(&sources, &headers, Some("a=1&access%5ftoken=t.k.n"), &[]);
        assert_eq!(found.map(|f| f.token), Some("t.k.n"));
    }
}
