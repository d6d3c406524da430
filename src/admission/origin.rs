//! Origin checks: exact origins and `scheme://*.domain[:port]` patterns.

use crate::policy::{OriginPattern, OriginRules};

/// Whether a request with this `Origin` header (or none) may upgrade.
pub fn allowed(rules: &OriginRules, origin: Option<&str>) -> bool {
    matching(rules, origin).is_some()
}

/// What lets an Origin (or its absence) through: the first `allow` pattern it matches, or
/// `allow_missing` for a request without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed<'r> {
    Missing,
    Pattern(&'r OriginPattern),
}

/// The rule that admits this `Origin` header (or its absence); `None`: refused.
pub fn matching<'r>(rules: &'r OriginRules, origin: Option<&str>) -> Option<Allowed<'r>> {
    let Some(origin) = origin else {
        return rules.allow_missing.then_some(Allowed::Missing);
    };
    let origin = origin.trim().to_ascii_lowercase();
    // No scheme: includes the opaque origin "null".
    let (scheme, rest) = origin.split_once("://")?;
    let (host, port) = split_port(rest);
    let port = port.filter(|p| Some(*p) != crate::policy::default_port(scheme));
    // An IPv6 host compared in the form the rules keep (browsers send it so already).
    let canonical = host
        .starts_with('[')
        .then(|| crate::policy::ipv6_origin_host(host))
        .flatten();
    let host = canonical.as_deref().unwrap_or(host);
    rules
        .allow
        .iter()
        .find(|pattern| match pattern {
            OriginPattern::Exact(exact) => {
                let normal = match port {
                    Some(p) => format!("{scheme}://{host}:{p}"),
                    None => format!("{scheme}://{host}"),
                };
                *exact == normal
            }
            OriginPattern::Subdomains {
                scheme: s,
                domain,
                port: p,
            } => {
                // Only DNS labels may precede ".domain": `https://evil/.example.com` is no
                // subdomain of example.com.
                let labels = host
                    .strip_suffix(domain.as_str())
                    .and_then(|h| h.strip_suffix('.'));
                s == scheme && *p == port && labels.is_some_and(is_dns_labels)
            }
        })
        .map(Allowed::Pattern)
}

/// `a`, `a.b-c`: non-empty labels of letters, digits, '-' and '_'.
fn is_dns_labels(labels: &str) -> bool {
    labels.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

fn split_port(rest: &str) -> (&str, Option<u16>) {
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !port.contains(']') => match port.parse() {
            Ok(p) => (host, Some(p)),
            Err(_) => (rest, None),
        },
        _ => (rest, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::Origin;

    fn rules(allow: &[&str]) -> OriginRules {
        let _ = Origin {
            allow: None,
            allow_missing: None,
        };
        OriginRules {
            allow: allow
                .iter()
                .map(|a| crate::config::parse_origin_pattern(a).unwrap())
                .collect(),
            allow_missing: false,
        }
    }

    #[test]
    fn patterns() {
        let r = rules(&["https://app.example.com", "https://*.example.com"]);
        assert!(allowed(&r, Some("https://app.example.com")));
        assert!(allowed(&r, Some("HTTPS://APP.example.com:443")));
        assert!(allowed(&r, Some("https://a.b.example.com")));
        assert!(!allowed(&r, Some("https://example.com")));
        assert!(!allowed(&r, Some("https://example.com.evil.com")));
        assert!(!allowed(&r, Some("https://evilexample.com")));
        assert!(!allowed(&r, Some("https://evil.com/.example.com")));
        assert!(!allowed(&r, Some("http://app.example.com")));
        assert!(!allowed(&r, Some("https://app.example.com:8443")));
        assert!(!allowed(&r, Some("null")));
        assert!(!allowed(&r, None));
    }
}
