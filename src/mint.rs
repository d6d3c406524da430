//! `wsgate token`: mint an HS256 token for local testing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{Map, Value};

/// The claims of a test token; `extra` are `--claim k=v` pairs (values that parse as JSON
/// are used as JSON, anything else as a string).
pub struct TokenSpec<'a> {
    pub sub: &'a str,
    pub ttl: Duration,
    pub audience: Option<&'a str>,
    pub issuer: Option<&'a str>,
    pub extra: &'a [(String, String)],
}

/// Why no token was minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("the secret is {0} bytes without the whitespace around it; wsgate refuses HMAC secrets under 32 bytes (RFC 7518 §3.2), so a token signed with it would never be accepted")]
    ShortSecret(usize),
    #[error("--sub must not be empty: the gate keys per-subject caps and revocations by it")]
    EmptySubject,
    #[error("--claim {0}=…: {0} is set by {1}")]
    Reserved(String, &'static str),
    #[error(transparent)]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// The smallest HMAC secret the gate accepts (RFC 7518 §3.2: at least the hash's size).
pub const MIN_SECRET_BYTES: usize = 32;

pub fn hs256(secret: &[u8], spec: &TokenSpec<'_>) -> Result<String, MintError> {
    // The gate's rule: whitespace around a secret is kept, but is no secret, and does
    // not count toward the 32 bytes.
    let meaningful = secret.trim_ascii().len();
    if meaningful < MIN_SECRET_BYTES {
        return Err(MintError::ShortSecret(meaningful));
    }
    if spec.sub.is_empty() {
        return Err(MintError::EmptySubject);
    }
    for (k, _) in spec.extra {
        let by = match k.as_str() {
            "sub" => "--sub",
            "iat" | "exp" => "--ttl (the token always has iat and exp)",
            "aud" => "--aud",
            "iss" => "--iss",
            _ => continue,
        };
        return Err(MintError::Reserved(k.clone(), by));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut claims = Map::new();
    claims.insert("sub".into(), spec.sub.into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), now.saturating_add(spec.ttl.as_secs()).into());
    if let Some(aud) = spec.audience {
        claims.insert("aud".into(), aud.into());
    }
    if let Some(iss) = spec.issuer {
        claims.insert("iss".into(), iss.into());
    }
    for (k, v) in spec.extra {
        let value = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.clone()));
        claims.insert(k.clone(), value);
    }
    Ok(encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

/// `90`, `45s`, `30m`, `1h`, `2d`, or parts of them together, largest first: `1h30m`,
/// `2d12h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let malformed = || format!("{s:?} is not a duration like 30m, 1h or 1h30m");
    if s.is_empty() {
        return Err(malformed());
    }
    let mut rest = s;
    let mut total: u64 = 0;
    // The size of the last unit read: each part must be of a smaller unit than the one
    // before (`30m1h` and `1h1h` are typing mistakes, not durations).
    let mut last_unit = u64::MAX;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let too_long = || format!("{s:?} is too long a duration");
        let n: u64 = match rest[..digits].parse() {
            Ok(n) => n,
            // All digits, more than 64 bits of them.
            Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => return Err(too_long()),
            Err(_) => return Err(malformed()),
        };
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let unit_secs: u64 = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m, h, d)")),
        };
        if unit_secs >= last_unit {
            return Err(malformed());
        }
        last_unit = unit_secs;
        total = n
            .checked_mul(unit_secs)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(too_long)?;
    }
    Ok(Duration::from_secs(total))
}

/// The longest lifetime `wsgate token` mints: ten years. Past it an `exp` soon leaves what
/// JavaScript and many verifiers read exactly (2^53), and up to the duration's own limit
/// it would not fit a signed 64-bit time.
pub const MAX_TTL: Duration = Duration::from_secs(3650 * 86_400);

/// A token's lifetime: a duration of at least one second (`0` would mint a token that has
/// already expired, which every gate refuses) and at most [`MAX_TTL`].
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        ttl if ttl.is_zero() => Err(format!("{s:?}: a token lives at least 1s")),
        ttl if ttl > MAX_TTL => Err(format!("{s:?}: a token lives at most 3650d (ten years)")),
        ttl => Ok(ttl),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("18446744073709551615d").is_err());
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d12h"), Ok(Duration::from_secs(216_000)));
        assert_eq!(parse_duration("1m30"), Ok(Duration::from_secs(90)));
        for bad in ["", "30m1h", "1h1h", "1h 30m", "1.5h", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    /// A lifetime is at least a second and at most ten years.
    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("3650d"), Ok(MAX_TTL));
        assert_eq!(parse_ttl("1s"), Ok(Duration::from_secs(1)));
        for bad in ["0s", "3650d1s", "100000000h", "18446744073709551615s"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
        // Past 64 bits: too long, not malformed.
        let huge = parse_ttl("99999999999999999999d").unwrap_err();
        assert!(huge.contains("too long"), "{huge}");
    }
}
