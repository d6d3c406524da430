//! Single values of a policy checked on their own: CIDRs, `origin.allow` entries, the port
//! and credentials of a URL, a route path as a request target.

use std::borrow::Cow;
use std::str::FromStr;

use http::Uri;
use ipnet::IpNet;

use crate::policy::OriginPattern;

/// Whether a URL carries user information (`user:password@host`). wsgate never sends it
/// (no Basic auth to an upstream or a key server), and URLs are logged and shown by
/// `/policy`.
pub(super) fn has_userinfo(uri: &Uri) -> bool {
    uri.authority().is_some_and(|a| a.as_str().contains('@'))
}

pub(super) const NO_CREDENTIALS: &str =
    "credentials in a URL are not supported (wsgate never sends them, \
                              and URLs appear in logs and /policy): remove the user:password@ part";

/// The path with every byte a request target cannot carry as it is (RFC 3986 §3.3: only
/// unreserved characters, sub-delimiters, `:`, `@`, `/` and `%` escapes) percent-encoded;
/// `None` when there is none.
pub(super) fn percent_encoded_target(path: &str) -> Option<String> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b);
    if path.bytes().all(allowed) {
        return None;
    }
    let mut out = String::with_capacity(path.len() * 3);
    for b in path.bytes() {
        if allowed(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Some(out)
}

/// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a /32 or /128). An IPv4-mapped
/// entry (`::ffff:203.0.113.0/120`, as `ss` shows a client on a dual-stack socket) is the
/// IPv4 network it maps (`203.0.113.0/24`): client addresses are compared in their IPv4
/// form, so as written it would never match, and a deny would let them in.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    IpNet::from_str(s)
        .map(|n| n.trunc())
        .ok()
        .or_else(|| std::net::IpAddr::from_str(s).ok().map(IpNet::from))
        .map(unmapped)
}

/// An IPv6 network inside `::ffff:0:0/96` as the IPv4 network it maps; any other as it is.
fn unmapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
            .network()
            .to_ipv4_mapped()
            .and_then(|v4| ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
            .map_or(net, IpNet::V4),
        _ => net,
    }
}

/// What is wrong with the port `uri`'s authority names, if anything: `:99999` or `:x`
/// parse as a URI, and a port that is not one would quietly mean the scheme's default.
pub(super) fn port_error(uri: &Uri) -> Option<&'static str> {
    let authority = uri.authority()?.as_str();
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let after_host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(_, rest)| rest),
        None => host_port.find(':').map_or("", |at| &host_port[at..]),
    };
    let port = after_host.strip_prefix(':').unwrap_or(after_host);
    match port.parse::<u16>() {
        _ if port.is_empty() => None,
        Ok(1..) => None,
        _ => Some("has a port that is not 1 to 65535"),
    }
}

/// `s` as an error message may show it: user information in what looks like a URL's
/// authority (`https://user:password@host`) as `***`, since a value in the wrong field can
/// be a URL with a password in it, and `check`'s errors and a refused reload's log line
/// show the values they are about.
pub(super) fn hide_userinfo(s: &str) -> Cow<'_, str> {
    let start = s.find("://").map_or(0, |i| i + 3);
    match crate::policy::authority_userinfo(&s[start..]).0 {
        Some(at) => Cow::Owned(format!("{}***{}", &s[..start], &s[start + at..])),
        None => Cow::Borrowed(s),
    }
}

/// Why `name` cannot name the environment variable a field points at, if it cannot: the
/// rule Kubernetes applies to a container's `env` names (printable ASCII without `=`),
/// less the space, which no shell can export, and less a URL, which is a value. The value
/// itself is never repeated in the error, since a field that should name a variable is
/// where a secret gets pasted.
pub(super) fn env_name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty: it must name an environment variable".to_owned());
    }
    if name.contains("://") {
        return Some(
            "is a URL (not shown here, in case it holds a password), not the name of the \
             environment variable that holds one"
                .to_owned(),
        );
    }
    let bad = name.chars().find(|c| !c.is_ascii_graphic() || *c == '=')?;
    let what = match bad {
        '=' => "'='",
        ' ' => "a space",
        c if c.is_ascii_control() => "a control character",
        _ => "a non-ASCII character",
    };
    Some(format!(
        "is not an environment variable name: its {} characters include {what} (a name is \
         printable ASCII without spaces or '='; the field names the variable, and the value \
         is not shown here in case it is the secret itself)",
        name.chars().count()
    ))
}

/// `name`, a valid environment variable name, as a message may show it: itself, unless it
/// looks like a secret pasted where the name belongs, which is described instead of shown:
/// 24 or more characters mixing lowercase, uppercase and digits, without the `_` that
/// names use, or 32 or more hex digits (what `openssl rand -hex` writes).
pub(super) fn env_name_shown(name: &str) -> Cow<'_, str> {
    let has = |f: fn(&char) -> bool| name.chars().any(|c| f(&c));
    let mixed = name.len() >= 24
        && !name.contains('_')
        && has(char::is_ascii_lowercase)
        && has(char::is_ascii_uppercase)
        && has(char::is_ascii_digit);
    let hex = name.len() >= 32 && name.chars().all(|c| c.is_ascii_hexdigit());
    let secret_like = mixed || hex;
    match secret_like {
        true => Cow::Owned(format!(
            "(a {}-character value that looks like a secret, not a name; not shown)",
            name.len()
        )),
        false => Cow::Borrowed(name),
    }
}

/// An `origin.allow` entry: `https://app.example.com`, `https://*.example.com:8443`.
pub fn parse_origin_pattern(s: &str) -> Result<OriginPattern, String> {
    let lower = s.trim().to_ascii_lowercase();
    let shown = hide_userinfo(s);
    if lower == "*" || lower == "null" {
        return Err(format!(
            "{shown:?} is not allowed: list the origins (a wildcard origin lets every site in)"
        ));
    }
    let Some((scheme, rest)) = lower.split_once("://") else {
        return Err(format!("{shown:?} must look like https://host[:port]"));
    };
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Err(format!("{shown:?} has an invalid scheme"));
    }
    if rest.contains('/') || rest.contains('?') || rest.contains('#') || rest.contains('@') {
        return Err(format!(
            "{shown:?}: an origin has no path, query or user info"
        ));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => match p.parse::<u16>() {
            Ok(port) if !h.is_empty() && port != 0 => (h, Some(port)),
            _ if rest.starts_with('[') && rest.ends_with(']') => (rest, None),
            _ => return Err(format!("{shown:?} has an invalid port")),
        },
        _ => (rest, None),
    };
    let port = port.filter(|p| Some(*p) != crate::policy::default_port(scheme));
    // Browsers send an internationalised host in its ASCII (punycode) form: written any
    // other way, the entry would never match.
    if !host.is_ascii() {
        return Err(format!(
            "{shown:?}: write the host in its ASCII form (xn--…, as browsers send it in Origin)"
        ));
    }
    if host.is_empty() {
        return Err(format!(
            "{shown:?} has no host: origins without one (file://) cannot be listed; use allow_missing for clients that send none"
        ));
    }
    if let Some(domain) = host.strip_prefix("*.") {
        if domain.is_empty() || domain.contains('*') {
            return Err(format!("{shown:?}: \"*.\" must be followed by a domain"));
        }
        // No empty label: `*.com.` (a trailing dot, which browsers keep in Origin) would
        // slip past the top-level rule below.
        if domain.split('.').any(str::is_empty) {
            return Err(format!(
                "{shown:?}: the domain after \"*.\" has an empty label (a trailing or double dot): write it as *.example.com"
            ));
        }
        // A host whose last label is a number is an IPv4 address to a browser (the URL
        // standard's "ends in a number": `1.2.3.4`, `0x7f.1`): it has no subdomains.
        let last = domain.rsplit('.').next().unwrap_or(domain);
        let number = last.bytes().all(|b| b.is_ascii_digit())
            || last
                .strip_prefix("0x")
                .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if number {
            return Err(format!(
                "{shown:?}: an IP address has no subdomains (list the origins with their addresses)"
            ));
        }
        // `*.com` is every .com site: as open as `*` for a cross-site attacker. Every name
        // under `localhost` is this machine (RFC 6761), so `*.localhost` stays allowed.
        if !domain.contains('.') && domain != "localhost" {
            return Err(format!(
                "{shown:?} is not allowed: a wildcard over a whole top-level domain lets every site in it (write the site's domain, *.example.com)"
            ));
        }
        return Ok(OriginPattern::Subdomains {
            scheme: scheme.to_owned(),
            domain: domain.to_owned(),
            port,
        });
    }
    if host.is_empty() || host.contains('*') {
        return Err(format!(
            "{shown:?}: '*' is only allowed as a leading \"*.\""
        ));
    }
    // A name's labels are not empty: no leading or double dot (a trailing one is a name's
    // fully qualified form, which a browser keeps when the page was reached by it).
    if host.starts_with('.') || host.contains("..") {
        return Err(format!(
            "{shown:?}: the host is not a name (an empty label)"
        ));
    }
    // An IPv6 literal, written as browsers serialise it in Origin (compressed lowercase
    // hex, RFC 5952 as the URL standard does it), so that it can match.
    let bracketed;
    let host = if host.contains(['[', ']', ':']) {
        bracketed = crate::policy::ipv6_origin_host(host).ok_or_else(|| {
            format!(
                "{shown:?}: an IPv6 host is written in brackets, as in http://[2001:db8::1]:8080"
            )
        })?;
        bracketed.as_str()
    } else {
        host
    };
    Ok(OriginPattern::Exact(match port {
        Some(p) => format!("{scheme}://{host}:{p}"),
        None => format!("{scheme}://{host}"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any name a Kubernetes `env` entry or a shell can set is accepted; what no process
    /// could have, or what is a value rather than a name, is refused without repeating it.
    #[test]
    fn environment_variable_names() {
        for name in [
            "WSGATE_JWT_SECRET",
            "_x",
            "x",
            "jwt-secret.v2",
            "9LIVES",
            "a:b/c",
        ] {
            assert_eq!(env_name_error(name), None, "{name}");
        }
        for (name, says) in [
            ("", "is empty"),
            ("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0=", "include '='"),
            ("JWT SECRET", "include a space"),
            ("JWT\tSECRET", "include a control character"),
            ("SECRET\0", "include a control character"),
            ("GEHEIMNIS_SCHLÜSSEL", "include a non-ASCII character"),
            ("redis://admin:hunter2@redis:6379", "is a URL"),
        ] {
            let why = env_name_error(name).unwrap_or_default();
            assert!(why.contains(says), "{name:?}: {why}");
            assert!(name.is_empty() || !why.contains(name), "{why}");
            assert!(!why.contains("hunter2"), "{why}");
        }
    }

    /// What looks like a pasted secret is described, never shown; names are shown.
    #[test]
    fn secret_like_names_are_not_shown() {
        for name in [
            "WSGATE_JWT_SECRET",
            "jwt-secret.v2",
            "Redis-URL-Prod-2026",
            "X",
        ] {
            assert_eq!(env_name_shown(name), name);
        }
        for secret in [
            "9fQz2LmW8xKp4RtY7vBn3CsD",
            "kT5mN8qR2wX7zA4bC9dE1fG6hJ3",
            // openssl rand -hex 32
            "ada44d35c0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8092927",
        ] {
            let shown = env_name_shown(secret);
            assert!(!shown.contains(secret), "{shown}");
            assert!(shown.contains("looks like a secret"), "{shown}");
        }
    }

    #[test]
    fn origin_patterns() {
        assert_eq!(
            parse_origin_pattern("HTTPS://App.Example.com:443"),
            Ok(OriginPattern::Exact("https://app.example.com".into()))
        );
        assert_eq!(
            parse_origin_pattern("https://*.example.com:8443"),
            Ok(OriginPattern::Subdomains {
                scheme: "https".into(),
                domain: "example.com".into(),
                port: Some(8443)
            })
        );
        assert!(parse_origin_pattern("*").is_err());
        for tld in ["https://*.com", "https://*.example", "http://*.io:8080"] {
            let refused = parse_origin_pattern(tld).unwrap_err();
            assert!(refused.contains("top-level domain"), "{tld}: {refused}");
        }
        assert!(parse_origin_pattern("https://*.localhost").is_ok());
        assert!(parse_origin_pattern("https://a*.example.com").is_err());
        // Empty labels and wildcards over addresses (an audit found `*.com.` passing the
        // top-level rule, and `*.0.0.1` letting 127.0.0.1 and 10.0.0.1 in).
        for odd in [
            "https://*.com.",
            "https://*.example.com.",
            "https://*..example.com",
            "https://*.0.0.1",
            "https://*.1",
            "https://.example.com",
            "https://a..example.com",
            "https://*.0x7f.1",
            "https://*.example.0x1f",
            "https://a.com:0",
        ] {
            assert!(parse_origin_pattern(odd).is_err(), "{odd}");
        }
        assert!(parse_origin_pattern("https://example.com.").is_ok());
        assert!(parse_origin_pattern("https://*.1password.com").is_ok());
        assert!(parse_origin_pattern("https://*.example.0xyz").is_ok());
        let trailing = parse_origin_pattern("https://*.com.").unwrap_err();
        assert!(trailing.contains("empty label"), "{trailing}");
        assert!(parse_origin_pattern("https://example.com/path").is_err());
        assert!(parse_origin_pattern("example.com").is_err());
        let idn = parse_origin_pattern("https://bücher.example").unwrap_err();
        assert!(idn.contains("xn--"), "{idn}");
        assert_eq!(
            parse_origin_pattern("https://xn--bcher-kva.example"),
            Ok(OriginPattern::Exact("https://xn--bcher-kva.example".into()))
        );
        assert!(parse_origin_pattern("file://")
            .unwrap_err()
            .contains("no host"));
        // IPv6 literals as browsers serialise them, or refused.
        for (written, origin) in [
            ("http://[0:0:0:0:0:0:0:1]:8080", "http://[::1]:8080"),
            ("http://[::1]:80", "http://[::1]"),
            ("https://[2001:DB8::1]:443", "https://[2001:db8::1]"),
            ("http://[2001:0db8::1]", "http://[2001:db8::1]"),
            (
                "http://[::ffff:127.0.0.1]:8081",
                "http://[::ffff:7f00:1]:8081",
            ),
        ] {
            assert_eq!(
                parse_origin_pattern(written),
                Ok(OriginPattern::Exact(origin.into())),
                "{written}"
            );
        }
        for bad in [
            "http://[::1",
            "http://::1:8080",
            "http://[]",
            "http://[v1.x]",
            "http://[1.2.3.4]",
            "http://[fe80::1%25eth0]",
        ] {
            assert!(parse_origin_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.1.2.3/8"),
            Some("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(parse_cidr("::1"), Some("::1/128".parse().unwrap()));
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        // IPv4-mapped entries are the IPv4 networks they map.
        assert_eq!(
            parse_cidr("::ffff:203.0.113.0/120"),
            Some("203.0.113.0/24".parse().unwrap())
        );
        assert_eq!(
            parse_cidr("::ffff:10.1.2.3"),
            Some("10.1.2.3/32".parse().unwrap())
        );
        assert_eq!(parse_cidr("::/0"), Some("::/0".parse().unwrap()));
    }

    #[test]
    fn ports_that_are_not_ports() {
        let error = |url: &str| port_error(&Uri::from_str(url).unwrap());
        for good in [
            "ws://up",
            "ws://up:8080",
            "wss://[::1]:443",
            "wss://[::1]",
            "ws://u@up:1",
            "https://keys:65535/jwks",
        ] {
            assert_eq!(error(good), None, "{good}");
        }
        for bad in [
            "ws://up:99999",
            "wss://up:70000",
            "ws://up:0",
            "wss://[::1]:65536",
            "https://keys:99999/jwks",
        ] {
            assert!(error(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn user_information_is_not_shown_in_errors() {
        for (value, hidden) in [
            ("https://u:originpw@a.com", "https://***@a.com"),
            ("u:pw@a.com", "***@a.com"),
            (
                "redis://admin:S3cret@redis:6379/0",
                "redis://***@redis:6379/0",
            ),
            ("https://a.com/path@x", "https://a.com/path@x"),
        ] {
            assert_eq!(hide_userinfo(value), hidden);
        }
        let err = parse_origin_pattern("https://u:originpw@a.com").unwrap_err();
        assert!(!err.contains("originpw"), "{err}");
        let err = parse_origin_pattern("u:originpw@a.com").unwrap_err();
        assert!(!err.contains("originpw"), "{err}");
    }
}
