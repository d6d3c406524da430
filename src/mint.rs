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

pub fn hs256(secret: &[u8], spec: &TokenSpec<'_>) -> Result<String, jsonwebtoken::errors::Error> {
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
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}

/// `90`, `45s`, `30m`, `1h`, `2d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30m or 1h"))?;
    let unit_secs: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m, h, d)")),
    };
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long a duration"))
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
    }
}
