//! Property-based tests (proptest) of the code that reads untrusted or hand-edited input:
//! policy files, the token carriers, Origin, X-Forwarded-For, the upgrade request and the
//! request path's normal form.
//!
//! Every property runs proptest's case count: 256, or `PROPTEST_CASES` (proptest reads the
//! variable itself, and `PROPTEST_RNG_SEED` too). The upgrade property speaks to a real
//! gate over a socket. A long run: `PROPTEST_CASES=100000 cargo test --release --test
//! properties -- --nocapture`, or `benches/fuzz.sh MINUTES`. A failure prints the shrunk
//! input; inputs that once failed are kept as plain `#[test]`s at the end of this file.

mod support;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, COOKIE};
use ipnet::IpNet;
use proptest::prelude::*;
use proptest::sample::{select, subsequence, Index};
use proptest::test_runner::{Config, TestCaseResult, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsgate::admission::origin;
use wsgate::admission::token::{self, MAX_TOKEN_BYTES};
use wsgate::admission::{canonical, client_ip, jwks::JwksCache, Rejection};
use wsgate::config::{self, parse_origin_pattern, ConfigError};
use wsgate::policy::{Mode, OriginRules, Policy, Route, TokenSource};

/// Run `property` on proptest's case count of values from `strategy`; panics with the
/// shrunk failing value.
fn check<S>(name: &str, strategy: S, property: impl Fn(S::Value) -> TestCaseResult)
where
    S: Strategy,
{
    let config = Config {
        // A failure is kept as a plain #[test] below instead of a regressions file.
        failure_persistence: None,
        ..Config::default()
    };
    let cases = config.cases;
    let started = Instant::now();
    if let Err(e) = TestRunner::new(config).run(&strategy, property) {
        panic!("property {name:?} failed: {e}");
    }
    eprintln!(
        "property {name:?}: {cases} cases passed in {:.2?}",
        started.elapsed()
    );
}

/// Insert `items` one by one, each at the place its `Index` picks: a generated order.
fn interleave<T>(items: impl IntoIterator<Item = T>, places: &[Index]) -> Vec<T> {
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let at = places
            .get(i % places.len().max(1))
            .map_or(out.len(), |p| p.index(out.len() + 1));
        out.insert(at, item);
    }
    out
}

fn places() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 8)
}

// ---------------------------------------------------------------------------------------
// 1. Policy files: parse + validate

/// Bytes loaded as if read from `path` (relative key files resolve beside it), shown as
/// text when a property fails.
#[derive(Clone)]
struct PolicyBytes {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl fmt::Debug for PolicyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = String::from_utf8_lossy(&self.bytes);
        write!(f, "{} = {text:?}", self.path.display())
    }
}

/// The HMAC secret the examples read from `WSGATE_JWT_SECRET`, as a file instead: setting
/// the variable here would race with other test threads reading the environment. Any file
/// of 32 bytes or more is a valid secret.
const SECRET_ENV: &str = "hmac_secret_env: WSGATE_JWT_SECRET";
const SECRET_FILE: &str = "hmac_secret_file: ../certs/example-jwt/example-es256.pub.pem";

/// Every file in `policies/`, as written and with its comment lines left out (so that
/// more edits land on fields).
fn seed_policies() -> &'static [PolicyBytes] {
    static SEEDS: OnceLock<Vec<PolicyBytes>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        paths.sort();
        let mut seeds = Vec::new();
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap();
            let bytes = text.replace(SECRET_ENV, SECRET_FILE).into_bytes();
            let fields: Vec<&[u8]> = bytes
                .split(|b| *b == b'\n')
                .filter(|l| !l.trim_ascii().starts_with(b"#") && !l.trim_ascii().is_empty())
                .collect();
            let fields = fields.join(&b'\n');
            seeds.push(PolicyBytes {
                path: path.clone(),
                bytes,
            });
            seeds.push(PolicyBytes {
                path,
                bytes: fields,
            });
        }
        seeds
    })
}

/// One edit of a policy file.
#[derive(Debug, Clone)]
enum Edit {
    /// XOR one byte with a non-zero mask.
    FlipByte(Index, u8),
    Truncate(Index),
    DeleteLine(Index),
    DuplicateLine(Index),
    /// Replace what follows a line's first ':'.
    SetValue(Index, String),
    InsertLine(Index, String),
    /// Indent a line by this many spaces instead.
    Reindent(Index, usize),
}

fn apply(bytes: &[u8], edit: &Edit) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = bytes.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    let count = lines.len();
    let line = |at: &Index| at.index(count);
    match edit {
        Edit::FlipByte(at, mask) => {
            let mut bytes = bytes.to_vec();
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] ^= mask;
            }
            return bytes;
        }
        Edit::Truncate(at) => return bytes[..at.index(bytes.len() + 1)].to_vec(),
        Edit::DeleteLine(at) => {
            lines.remove(line(at));
        }
        Edit::DuplicateLine(at) => {
            let i = line(at);
            lines.insert(i, lines[i].clone());
        }
        Edit::SetValue(at, value) => {
            let l = &mut lines[line(at)];
            if let Some(colon) = l.iter().position(|b| *b == b':') {
                l.truncate(colon + 1);
                l.push(b' ');
                l.extend_from_slice(value.as_bytes());
            }
        }
        Edit::InsertLine(at, text) => {
            let i = at.index(lines.len() + 1);
            lines.insert(i, text.clone().into_bytes());
        }
        Edit::Reindent(at, n) => {
            let i = line(at);
            let body = lines[i].trim_ascii_start().to_vec();
            lines[i] = [vec![b' '; *n], body].concat();
        }
    }
    lines.join(&b'\n')
}

#[rustfmt::skip]
const FIELDS: &[&str] = &[
    "version", "mode", "trusted_proxies", "max_connections", "defaults", "routes", "- path",
    "path", "name", "upstream", "upstream_tls", "ca_file", "server_name", "auth",
    "required", "token_sources", "algorithms", "keys", "- hmac_secret_env",
    "hmac_secret_file", "public_key_file", "jwks_file", "jwks_url", "refresh_seconds",
    "kid", "issuer", "audience", "leeway_seconds", "require_claims", "forward_claims",
    "close_on_expiry", "origin", "allow", "allow_missing", "ip", "deny", "rate",
    "upgrades_per_second", "burst", "max_connections_per_ip", "max_connections_per_subject",
    "ipv6_prefix", "messages", "max_frame_bytes", "max_message_bytes", "per_second",
    "types", "timeouts", "handshake_seconds", "upstream_connect_seconds", "idle_seconds",
    "max_lifetime_seconds", "write_seconds", "heartbeat", "interval_seconds",
    "timeout_seconds", "http", "role", "sub", "upstreams", "Version", "routes[0]",
];

#[rustfmt::skip]
const VALUES: &[&str] = &[
    "", "0", "1", "-1", "2", "0.5", "-0.0", "1e400", "1e3", ".nan", ".inf", "-.inf", "255",
    "256", "129", "4294967296", "18446744073709551615", "18446744073709551616", "0x10",
    "null", "~", "true", "no", "[]", "{}", "[HS256]", "[none]", "[NONE]", "[RS256, HS256]",
    "[EdDSA]", "[HS512, HS256]", "[text]", "[binary, video]", "[header]", "[\"query:\"]",
    "[\"cookie:c\", \"subprotocol:p.\"]", "[body]", "\"*\"", "[\"*\"]", "[\"null\"]",
    "[\"https://*.\"]", "[\"https://*.example.com:8443\"]", "[\"https://a*.example.com\"]",
    "[\"example.com\"]", "[\"https://x.com/path\"]", "ws://", "wss://", "ws://h:99999",
    "ws://h/p", "ws://h?q", "wss://[::1]:9", "wss://127.0.0.1", "http://x", "ws://[::1",
    "https://issuer/jwks", "http://issuer/jwks", "10.0.0.0/33", "\"::\"",
    "[10.0.0.0/8, bad]", "[\"::ffff:10.0.0.1/128\"]", "/", "/ws/", "/ws", "ws", "enforce",
    "report", "Report", "pass", "reject", "WSGATE_JWT_SECRET", "WSGATE_UNSET_VARIABLE",
    "../certs/example-jwt/example-es256.pub.pem", "../certs/example-jwt/example-jwks.json", "keys/missing.pem",
    "../README.md", "/dev/null", "[{hmac_secret_env: WSGATE_JWT_SECRET}]",
    "[{jwks_url: \"https://x/\", refresh_seconds: 0}]",
    "[{public_key_file: ../certs/example-jwt/example-es256.pub.pem, kid: a}]",
    "[{jwks_file: ../certs/example-jwt/example-jwks.json, kid: a}]", "{role: []}", "{role: [a, b]}",
    "{sub: Host}", "{sub: \"bad header\"}", "{sub: X-Forwarded-For}", "{sub: X-Ok}",
    "{ca_file: ../certs/example-jwt/example-es256.pub.pem}", "{server_name: \"not a name\"}",
    "!!binary aGk=", "!tag x", "&anchor x", "*anchor", "|\n  text", ">", "'", "\"", "[",
    "{", "- x", "? x", ": x", "%TAG", "@x", "`x`", "\t", "\"\\u0000\"", "é", "\u{feff}",
];

fn field_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => select(VALUES).prop_map(str::to_owned),
        1 => "[ -~]{0,24}",
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|n| n.to_string()),
    ]
}

fn field_line() -> impl Strategy<Value = String> {
    (0..4usize, select(FIELDS), field_value())
        .prop_map(|(depth, key, value)| format!("{}{key}: {value}", "  ".repeat(depth)))
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        1 => (any::<Index>(), 1..=255u8).prop_map(|(at, mask)| Edit::FlipByte(at, mask)),
        1 => any::<Index>().prop_map(Edit::Truncate),
        1 => any::<Index>().prop_map(Edit::DeleteLine),
        1 => any::<Index>().prop_map(Edit::DuplicateLine),
        4 => (any::<Index>(), field_value()).prop_map(|(at, v)| Edit::SetValue(at, v)),
        2 => (any::<Index>(), field_line()).prop_map(|(at, l)| Edit::InsertLine(at, l)),
        1 => (any::<Index>(), 0..7usize).prop_map(|(at, n)| Edit::Reindent(at, n)),
    ]
}

/// Arbitrary bytes, YAML-ish text, or an example policy after a few edits.
fn policy_bytes() -> impl Strategy<Value = PolicyBytes> {
    let seeds = seed_policies();
    let path = seeds[0].path.clone();
    let raw = prop::collection::vec(any::<u8>(), 0..400);
    let yamlish = prop::collection::vec(
        prop_oneof![
            field_line().prop_map(|l| l + "\n"),
            select(
                &[
                    "version: 1\n",
                    "routes:\n",
                    "  - path: /ws\n",
                    "defaults:\n",
                    "\n",
                    " "
                ][..]
            )
            .prop_map(str::to_owned),
            select(&[":", "-", "[", "]", "{", "}", ",", "#", "&a", "*a", "!", "|", "'", "\""][..])
                .prop_map(str::to_owned),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat().into_bytes());
    let edited = (0..seeds.len(), prop::collection::vec(edit(), 1..4)).prop_map(|(i, edits)| {
        let mut p = seeds[i].clone();
        for e in &edits {
            p.bytes = apply(&p.bytes, e);
        }
        p
    });
    let unedited = (0..seeds.len()).prop_map(|i| seeds[i].clone());
    prop_oneof![
        1 => (Just(path.clone()), raw).prop_map(|(path, bytes)| PolicyBytes { path, bytes }),
        1 => (Just(path), yamlish).prop_map(|(path, bytes)| PolicyBytes { path, bytes }),
        1 => unedited,
        8 => edited,
    ]
}

/// `routes[1].auth.keys[0].jwks_file`: known top-level key, then `name` or `name[i]`
/// segments; the claim names under `require_claims.`, `deny_claims.` and `forward_claims.`
/// are the file's own.
fn is_field_path(path: &str) -> bool {
    const TOP: &[&str] = &[
        "version",
        "mode",
        "trusted_proxies",
        "max_connections",
        "defaults",
        "routes",
        "http2",
        "cluster",
    ];
    let path = ["require_claims.", "deny_claims.", "forward_claims."]
        .iter()
        .find_map(|map| path.find(map).map(|i| &path[..i + map.len() - 1]))
        .unwrap_or(path);
    let segment_ok = |s: &str| {
        let (name, indexes) = s.split_at(s.find('[').unwrap_or(s.len()));
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && indexes.split_terminator(']').all(|i| {
                i.strip_prefix('[')
                    .is_some_and(|n| n.parse::<usize>().is_ok())
            })
            && (indexes.is_empty() || indexes.ends_with(']'))
    };
    let top = path.split(['.', '[']).next().unwrap_or("");
    TOP.contains(&top) && path.split('.').all(segment_ok)
}

/// Lines as YAML counts them: LF, CR and CR LF end a line, and so do NEL, LS and PS.
fn yaml_lines(bytes: &[u8]) -> usize {
    let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n");
    let breaks = ['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'];
    1 + text.chars().filter(|c| breaks.contains(c)).count()
}

/// `wsgate check` (docs/running.md): `file:line:column` from the parser, or the field path of each semantic error.
fn error_is_located(e: &ConfigError, input: &PolicyBytes) -> TestCaseResult {
    let shown = e.to_string();
    let prefix = format!("{}:", input.path.display());
    prop_assert!(
        shown.starts_with(&prefix),
        "{shown:?} does not name the file"
    );
    match e {
        ConfigError::Syntax {
            line, column, more, ..
        } => {
            // libyaml puts the end of the input on a line of its own.
            let lines = yaml_lines(&input.bytes) + 1;
            prop_assert!(
                (1..=lines).contains(line) && *column >= 1,
                "{shown:?}: {line}:{column} is outside the file's {lines} lines"
            );
            // The errors after the first: a field path each, and a place in the file when
            // they have one.
            for after in more {
                // An unknown field's own name is the file's; where it sits is a field path.
                // (That name may hold dots itself: `routes[1]..essages` is the key
                // `.essages` of `routes[1]`.) A name with no field path before it is a
                // top-level key, and may look like a path itself: the key `routes[0]`.
                let field = after.error.field.as_str();
                let message = after.error.message.as_str();
                let located = match message.starts_with("unknown field") {
                    true => {
                        let parents: Vec<&str> =
                            field.match_indices('.').map(|(i, _)| &field[..i]).collect();
                        let first = field.split(['.', '[']).next().unwrap_or("");
                        parents.iter().any(|p| is_field_path(p))
                            || !is_field_path(first)
                            || message.starts_with(&format!("unknown field `{field}`"))
                    }
                    false => is_field_path(field),
                };
                prop_assert!(located, "{:?} is not a field path", field);
                if let Some((line, column)) = after.at {
                    prop_assert!(
                        (1..=lines).contains(&line) && column >= 1,
                        "{shown:?}: {line}:{column} is outside the file's {lines} lines"
                    );
                }
            }
        }
        ConfigError::Invalid { errors, .. } => {
            prop_assert!(!errors.is_empty(), "invalid, but no error listed");
            for fe in errors {
                prop_assert!(
                    is_field_path(&fe.field),
                    "{:?} is not a field path",
                    fe.field
                );
                prop_assert!(!fe.message.is_empty(), "{}: empty message", fe.field);
            }
        }
        // The one error serde_yaml gives no location for (a location is given
        // where the YAML parser gives one): more than one document, located by the gate
        // at a `---`, a `...` or a line indented less than the first key, not otherwise.
        ConfigError::SyntaxNoLocation { message, .. }
            if message.contains("more than one document") => {}
        ConfigError::SyntaxNoLocation { .. } | ConfigError::Unreadable { .. } => {
            prop_assert!(false, "{shown:?} has no location");
        }
    }
    Ok(())
}

/// Everything `validate` resolved, as text (keys by kind and kid only).
fn resolved(policy: &Policy) -> String {
    format!("{policy:?}")
}

#[test]
fn policy_loading_never_panics_and_locates_every_error() {
    check("policy loading", policy_bytes(), |input| {
        let loaded = config::load_bytes(&input.path, &input.bytes);
        // Validation is a function of the file: the same bytes, the same policy or errors.
        let again = config::load_bytes(&input.path, &input.bytes);
        let loaded = match (loaded, again) {
            (Err(e), Err(again)) => {
                prop_assert_eq!(e.to_string(), again.to_string());
                return error_is_located(&e, &input);
            }
            (Ok(loaded), Ok(again)) => {
                prop_assert_eq!(resolved(&loaded.policy), resolved(&again.policy));
                loaded
            }
            (first, then) => {
                let (first, then) = (first.map(|_| "valid"), then.map(|_| "valid"));
                return Err(TestCaseError::fail(format!("{first:?}, then {then:?}")));
            }
        };
        // The schema walk that names every error of a refused file finds none in a file
        // the typed parse accepts.
        let mut document: serde_yaml::Value =
            serde_yaml::from_slice(&input.bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        document
            .apply_merge()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let found = config::schema_errors(&document);
        prop_assert!(found.is_empty(), "{:?} in a valid file", found);
        // `/policy` shows the file itself (it showed `null` for a file that only the typed
        // parse accepted, with a key repeated in a map).
        prop_assert!(
            loaded.document.get("version").is_some(),
            "/policy shows {}",
            loaded.document
        );
        Ok(())
    });
}

/// Mutations start from valid policies.
#[test]
fn every_seed_policy_is_valid() {
    for seed in seed_policies() {
        if let Err(e) = config::load_bytes(&seed.path, &seed.bytes) {
            panic!("{e}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. Token extraction

const QUERY_NAMES: &[&str] = &["access_token", "token", "t"];
const COOKIE_NAMES: &[&str] = &["access_token", "jwt"];
/// No prefix starts another, so an entry can only match its own prefix.
const PREFIXES: &[&str] = &["bearer.", "token.", "jwt."];

fn all_sources() -> Vec<TokenSource> {
    let mut all = vec![TokenSource::Header];
    all.extend(QUERY_NAMES.iter().map(|n| TokenSource::Query((*n).into())));
    all.extend(
        COOKIE_NAMES
            .iter()
            .map(|n| TokenSource::Cookie((*n).into())),
    );
    all.extend(
        PREFIXES
            .iter()
            .map(|p| TokenSource::Subprotocol((*p).into())),
    );
    all
}

/// RFC 6750's b64token alphabet (JWTs use a subset), sometimes longer than 8 KiB.
fn token_text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[A-Za-z0-9._~+/-]{1,64}={0,2}",
        // Built from a repeated unit: generating 8 KiB character by character is slow.
        1 => ("[A-Za-z0-9_-]{16}", 8_180..8_200usize).prop_map(|(unit, len)| {
            unit.repeat(len / 16 + 1)[..len].to_owned()
        }),
    ]
}

/// A request that carries tokens in some carriers, with unrelated parameters, cookies and
/// subprotocols around them, and a `token_sources` list.
#[derive(Debug, Clone)]
struct Carried {
    sources: Vec<TokenSource>,
    /// `Authorization: <scheme spelling><spaces><token>`.
    bearer: Option<(&'static str, usize, String)>,
    /// With no bearer token: `Authorization: Basic …` (not a token).
    basic: bool,
    query: BTreeMap<&'static str, String>,
    cookies: BTreeMap<&'static str, String>,
    protocols: BTreeMap<&'static str, String>,
    other_params: Vec<(String, String)>,
    other_cookies: Vec<(String, String)>,
    other_protocols: Vec<&'static str>,
    /// Where each carrier sits among the others.
    places: Vec<Index>,
    cookie_headers: Index,
}

impl Carried {
    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let authorization = match (&self.bearer, self.basic) {
            (Some((scheme, spaces, token)), _) => {
                Some(format!("{scheme}{}{token}", " ".repeat(*spaces)))
            }
            (None, true) => Some("Basic dXNlcjpwYXNzd29yZA==".to_owned()),
            (None, false) => None,
        };
        if let Some(value) = authorization {
            headers.insert(AUTHORIZATION, HeaderValue::from_str(&value).unwrap());
        }
        let pairs = self
            .cookies
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()));
        let cookies = interleave(pairs.chain(self.other_cookies.clone()), &self.places);
        let cookies: Vec<String> = cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // Split across Cookie headers, as HTTP/2 clients do.
        let split = self.cookie_headers.index(cookies.len() + 1);
        for part in [&cookies[..split], &cookies[split..]] {
            if !part.is_empty() {
                let value = HeaderValue::from_str(&part.join("; ")).unwrap();
                headers.append(COOKIE, value);
            }
        }
        headers
    }

    fn query(&self) -> Option<String> {
        let pairs = self.query.iter().map(|(k, v)| ((*k).to_owned(), v.clone()));
        let params = interleave(pairs.chain(self.other_params.clone()), &self.places);
        let params: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        (!params.is_empty()).then(|| params.join("&"))
    }

    fn protocols(&self) -> Vec<String> {
        let entries = self.protocols.iter().map(|(p, t)| format!("{p}{t}"));
        let others = self.other_protocols.iter().map(|p| (*p).to_owned());
        interleave(entries.chain(others), &self.places)
    }

    /// The first source, in `sources` order, whose carrier holds a token.
    fn expected(&self) -> Option<(&TokenSource, &str, Option<String>)> {
        self.sources.iter().find_map(|source| {
            let (token, entry) = match source {
                TokenSource::Header => (self.bearer.as_ref().map(|b| &b.2)?, None),
                TokenSource::Query(name) => (self.query.get(name.as_str())?, None),
                TokenSource::Cookie(name) => (self.cookies.get(name.as_str())?, None),
                TokenSource::Subprotocol(prefix) => {
                    let token = self.protocols.get(prefix.as_str())?;
                    (token, Some(format!("{prefix}{token}")))
                }
            };
            Some((source, token.as_str(), entry))
        })
    }
}

fn carried() -> impl Strategy<Value = Carried> {
    let sources = subsequence(all_sources(), 0..=6).prop_shuffle();
    let scheme = select(&["Bearer", "bearer", "BEARER", "bEaReR"][..]);
    let bearer = prop::option::of((scheme, 1..3usize, token_text()));
    let carriers = (
        prop::collection::btree_map(select(QUERY_NAMES), token_text(), 0..=3),
        prop::collection::btree_map(select(COOKIE_NAMES), token_text(), 0..=2),
        prop::collection::btree_map(select(PREFIXES), token_text(), 0..=3),
    );
    let others = (
        prop::collection::vec(("x[a-z_]{0,6}", "[a-z0-9.=]{0,8}"), 0..3),
        prop::collection::vec(("n[a-z_]{0,6}", "[a-z0-9.=]{0,8}"), 0..3),
        prop::collection::vec(select(&["chat", "v2.chat", "graphql-ws", "mqtt"][..]), 0..3),
    );
    (
        sources,
        bearer,
        any::<bool>(),
        carriers,
        others,
        places(),
        any::<Index>(),
    )
        .prop_map(
            |(sources, bearer, basic, (query, cookies, protocols), others, places, split)| {
                Carried {
                    sources,
                    bearer,
                    basic,
                    query,
                    cookies,
                    protocols,
                    other_params: others.0,
                    other_cookies: others.1,
                    other_protocols: others.2,
                    places,
                    cookie_headers: split,
                }
            },
        )
}

#[test]
fn token_extraction_returns_the_first_configured_carrier() {
    check("token round trip", carried(), |carried| {
        let headers = carried.headers();
        let query = carried.query();
        let protocols = carried.protocols();
        let protocols: Vec<&str> = protocols.iter().map(String::as_str).collect();
        let found = token::extract(&carried.sources, &headers, query.as_deref(), &protocols);
        let found = found.map(|f| (f.source, f.token, f.entry.map(str::to_owned)));
        prop_assert_eq!(found, carried.expected());
        Ok(())
    });
}

/// Arbitrary carriers: whatever `extract` returns is a non-empty part of the carrier that
/// its source names.
#[test]
fn token_extraction_never_panics_on_garbage() {
    let source = prop_oneof![
        Just(TokenSource::Header),
        "\\PC{0,4}".prop_map(TokenSource::Query),
        "\\PC{0,4}".prop_map(TokenSource::Cookie),
        "\\PC{0,4}".prop_map(TokenSource::Subprotocol),
    ];
    let header = (
        select(&["authorization", "cookie", "x-other"][..]),
        prop::collection::vec(any::<u8>(), 0..48),
    );
    let strategy = (
        prop::collection::vec(source, 0..5),
        prop::collection::vec(header, 0..5),
        prop::option::of("\\PC{0,64}"),
        prop::collection::vec("\\PC{0,24}", 0..4),
    );
    check(
        "token garbage",
        strategy,
        |(sources, raw, query, protocols)| {
            let mut headers = HeaderMap::new();
            for (name, value) in raw {
                if let Ok(value) = HeaderValue::from_bytes(&value) {
                    headers.append(name, value);
                }
            }
            let protocols: Vec<&str> = protocols.iter().map(String::as_str).collect();
            let Some(found) = token::extract(&sources, &headers, query.as_deref(), &protocols)
            else {
                return Ok(());
            };
            prop_assert!(!found.token.is_empty());
            prop_assert!(sources.contains(found.source));
            // Headers as bytes: a cookie header may carry other cookies' raw UTF-8, and
            // the token is still read from it.
            let values = |name| {
                headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.as_bytes().to_vec())
                    .collect::<Vec<_>>()
            };
            let carrier = match found.source {
                TokenSource::Header => values(AUTHORIZATION),
                TokenSource::Query(_) => query.iter().map(|q| q.as_bytes().to_vec()).collect(),
                TokenSource::Cookie(_) => values(COOKIE),
                TokenSource::Subprotocol(prefix) => {
                    let entry = found.entry.unwrap_or_default();
                    prop_assert_eq!(entry, format!("{prefix}{}", found.token));
                    vec![entry.as_bytes().to_vec()]
                }
            };
            let token = found.token.as_bytes();
            prop_assert!(carrier
                .iter()
                .any(|c| c.windows(token.len()).any(|w| w == token)));
            Ok(())
        },
    );
}

/// A test runtime: the properties themselves are synchronous.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A correctly signed, unexpired token is accepted exactly when it is at most 8 KiB.
#[test]
fn tokens_over_8_kib_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), support::SECRET).unwrap();
    let policy = "version: 1\ndefaults:\n  auth: {algorithms: [HS256], keys: [{hmac_secret_file: secret}]}\nroutes:\n  - path: /ws\n";
    let path = dir.path().join("policy.yaml");
    let loaded = config::load_bytes(&path, policy.as_bytes()).unwrap();
    let route = loaded.policy.routes[0].clone();
    let jwks = JwksCache::new(Vec::new());
    // The padding that puts the token around 8 KiB (4/3 base64 growth, ~80 bytes of rest).
    let padding = 5_980..6_180usize;
    check("token size limit", padding, |pad| {
        let claims = serde_json::json!({
            "sub": "p",
            "exp": support::unix_now() + 300,
            "pad": "a".repeat(pad),
        });
        let token = support::hs256_with(support::SECRET, claims);
        let verified = runtime().block_on(token::verify(&token, &route.auth, &jwks));
        if token.len() <= MAX_TOKEN_BYTES {
            prop_assert!(verified.is_ok(), "{} bytes: {verified:?}", token.len());
        } else {
            prop_assert!(
                matches!(verified, Err(Rejection::InvalidToken)),
                "{} bytes: {verified:?}",
                token.len()
            );
        }
        Ok(())
    });
}

/// A JSON number anywhere in its range, and the edges by name.
fn json_number() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        any::<u64>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        select(vec![
            serde_json::json!(-1),
            serde_json::json!(0),
            serde_json::json!(0.5),
            serde_json::json!(1u64 << 53),
            serde_json::json!(1u64 << 63),
            serde_json::json!(u64::MAX),
            serde_json::json!(1.8446744073709552e19),
        ]),
        (0u64..100_000).prop_map(|d| serde_json::json!(support::unix_now() + d)),
    ]
}

/// `exp`, `nbf` and `iat` anywhere in the range of JSON numbers: verification answers
/// (admitted, invalid or expired) without a panic, and an admitted token's close deadline
/// saturates instead of overflowing: a far-future `exp` is never "already expired".
#[test]
fn numeric_claims_never_panic_or_wrap() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), support::SECRET).unwrap();
    let policy = "version: 1\ndefaults:\n  auth: {algorithms: [HS256], keys: [{hmac_secret_file: secret}], leeway_seconds: 3600}\nroutes:\n  - path: /ws\n";
    let path = dir.path().join("policy.yaml");
    let loaded = config::load_bytes(&path, policy.as_bytes()).unwrap();
    let route = loaded.policy.routes[0].clone();
    let jwks = JwksCache::new(Vec::new());
    let claims = (
        json_number(),
        proptest::option::of(json_number()),
        proptest::option::of(json_number()),
    );
    check("numeric claims", claims, |(exp, nbf, iat)| {
        let mut claims = serde_json::json!({"sub": "p", "exp": exp});
        if let Some(nbf) = nbf {
            claims["nbf"] = nbf;
        }
        if let Some(iat) = iat {
            claims["iat"] = iat;
        }
        let token = support::hs256_with(support::SECRET, claims);
        match runtime().block_on(token::verify(&token, &route.auth, &jwks)) {
            Ok(verified) => {
                let deadline = verified.expires_at(route.auth.leeway_seconds);
                let left =
                    deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
                let far = verified.exp >= support::unix_now() + 1_000_000;
                prop_assert!(
                    !far || left.is_none_or(|l| l > Duration::from_secs(900_000)),
                    "exp {} closes in {left:?}",
                    verified.exp
                );
            }
            Err(Rejection::InvalidToken | Rejection::TokenExpired) => {}
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
        Ok(())
    });
    // The deadline arithmetic alone, over every u64 and leeway.
    let now = tokio::time::Instant::now();
    let unix_now = Duration::from_secs(support::unix_now());
    check(
        "expiry deadline",
        (any::<u64>(), 0u64..=3600),
        |(exp, leeway)| {
            let deadline = token::deadline(exp, leeway, unix_now, now);
            if exp.saturating_add(leeway) <= unix_now.as_secs() {
                prop_assert!(
                    exp == 0 || deadline == Some(now),
                    "{exp} + {leeway}: {deadline:?}"
                );
            } else {
                prop_assert!(
                    deadline.is_none_or(|d| d > now),
                    "{exp} + {leeway}: {deadline:?}"
                );
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// 3. Origin matching

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?"
}

fn dns_name() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..4).prop_map(|labels| labels.join("."))
}

/// A name a wildcard rule may cover: two labels at least (`*.com` is refused), the last
/// not a number (`*.0.0.1`, `*.a.0x1` are refused: to a browser such a host is an IPv4
/// address, which has no subdomains).
fn registrable_name() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 2..4)
        .prop_filter("an address, not a name", |labels| {
            let last = labels.last().map_or("", String::as_str);
            let number = last.bytes().all(|b| b.is_ascii_digit())
                || last
                    .strip_prefix("0x")
                    .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
            !number
        })
        .prop_map(|labels| labels.join("."))
}

/// A DNS name, an IPv4 literal or a bracketed IPv6 literal.
fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => dns_name(),
        1 => any::<Ipv4Addr>().prop_map(|a| a.to_string()),
        1 => any::<Ipv6Addr>().prop_map(|a| format!("[{a}]")),
    ]
}

fn scheme() -> impl Strategy<Value = &'static str> {
    select(&["https", "http", "wss", "app"][..])
}

/// A port an origin can name: 0 is no port, and a rule naming it is refused.
fn port() -> impl Strategy<Value = Option<u16>> {
    prop::option::of(prop_oneof![select(&[80u16, 443, 8443][..]), 1..=u16::MAX])
}

/// A serialised origin (RFC 6454 §6.2): scheme, host and the port when it is not the
/// scheme's default, all lower case.
#[derive(Debug, Clone, PartialEq)]
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl Origin {
    fn new(scheme: &str, host: &str, port: Option<u16>) -> Origin {
        let default = match scheme {
            "https" | "wss" => Some(443),
            "http" | "ws" => Some(80),
            _ => None,
        };
        Origin {
            scheme: scheme.to_owned(),
            host: host.to_owned(),
            port: port.filter(|p| Some(*p) != default),
        }
    }

    /// As written in a header, the port spelled out when `port` says so.
    fn text(&self, port: Option<u16>) -> String {
        match port.or(self.port) {
            Some(p) => format!("{}://{}:{p}", self.scheme, self.host),
            None => format!("{}://{}", self.scheme, self.host),
        }
    }

    /// Strictly `scheme://host[:port]` with a lower-case DNS host (letters, digits, '-',
    /// '_'), or nothing.
    fn parse(text: &str) -> Option<Origin> {
        let (scheme, rest) = text.split_once("://")?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                (host, Some(port.parse().ok()?))
            }
            _ => (rest, None),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b))
        };
        let scheme_ok = scheme.bytes().all(|b| b.is_ascii_lowercase());
        (!scheme.is_empty() && scheme_ok && host.split('.').all(label_ok))
            .then(|| Origin::new(scheme, host, port))
    }
}

fn origin() -> impl Strategy<Value = Origin> {
    (scheme(), host(), port()).prop_map(|(s, h, p)| Origin::new(s, &h, p))
}

/// Upper-case the letters that `mask` picks: scheme and host compare case-insensitively.
fn recase(text: &str, mask: u64) -> String {
    text.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

fn rules(allow: &[&str], allow_missing: bool) -> OriginRules {
    OriginRules {
        allow: allow
            .iter()
            .map(|a| parse_origin_pattern(a).unwrap())
            .collect(),
        allow_missing,
    }
}

#[test]
fn origin_matching_never_panics() {
    let text = "\\PC{0,40}|[a-z*:/.\\[\\]0-9@?#]{0,30}";
    check("origin garbage", (text, text), |(pattern, origin)| {
        if let Ok(pattern) = parse_origin_pattern(&pattern) {
            let rules = OriginRules {
                allow: vec![pattern],
                allow_missing: false,
            };
            origin::allowed(&rules, Some(&origin));
        }
        Ok(())
    });
}

/// An exact rule allows its own origin (any case, default port spelled out or not) and
/// exactly the origins that serialise the same.
#[test]
fn an_exact_origin_rule_allows_exactly_its_origin() {
    let other = prop_oneof![
        origin(),
        (origin(), label()).prop_map(|(o, l)| Origin::new(
            &o.scheme,
            &format!("{l}.{}", o.host),
            o.port
        )),
        (origin(), label()).prop_map(|(o, l)| Origin::new(
            &o.scheme,
            &format!("{}{l}", o.host),
            o.port
        )),
        (origin(), scheme()).prop_map(|(o, s)| Origin::new(s, &o.host, o.port)),
        (origin(), port()).prop_map(|(o, p)| Origin::new(&o.scheme, &o.host, p)),
    ];
    let strategy = (origin(), other, any::<u64>(), any::<bool>());
    check(
        "exact origin",
        strategy,
        |(rule, other, mask, spell_port)| {
            let rules = rules(&[&rule.text(None)], false);
            let default = match rule.scheme.as_str() {
                "https" | "wss" => Some(443),
                "http" | "ws" => Some(80),
                _ => None,
            };
            let port = if spell_port {
                rule.port.or(default)
            } else {
                None
            };
            let spelled = recase(&rule.text(port), mask);
            prop_assert!(
                origin::allowed(&rules, Some(&spelled)),
                "{spelled:?} refused"
            );
            let shown = other.text(None);
            prop_assert_eq!(
                origin::allowed(&rules, Some(&shown)),
                other == rule,
                "{:?}",
                shown
            );
            prop_assert!(!origin::allowed(&rules, None));
            prop_assert!(!origin::allowed(&rules, Some("null")));
            Ok(())
        },
    );
}

/// `https://*.DOMAIN` allows every `https://SUB.DOMAIN`, and nothing else: not the domain
/// itself, nor look-alikes, nor another scheme or port.
#[test]
fn a_wildcard_origin_rule_allows_only_subdomains() {
    let look_alike = select(
        &[
            "https://{domain}",
            "https://{sub}{domain}",
            "https://{domain}.{sub}",
            "https://{sub}.{domain}.evil",
            "https://{sub}.{domain}.",
            "https://{sub}-{domain}",
            "http://{sub}.{domain}",
            "wss://{sub}.{domain}",
            "https://{sub}.{domain}:8443",
            "https://{sub}.{domain}:80",
            "https://{sub}/.{domain}",
            "https://{sub}?.{domain}",
            "https://{sub}#.{domain}",
            "https://{sub}\\.{domain}",
            "https://{sub}:1.{domain}",
            "https://{sub}%2e{domain}",
            "https://.{domain}",
            "https://{sub}..{domain}",
            "https:// {sub}.{domain}",
            "https://{sub}.{domain} .evil",
            "null",
            "{sub}.{domain}",
        ][..],
    );
    let strategy = (
        registrable_name(),
        dns_name(),
        look_alike,
        any::<u64>(),
        any::<bool>(),
    );
    check(
        "wildcard origin",
        strategy,
        |(domain, sub, look_alike, mask, port)| {
            let rules = rules(&[&format!("https://*.{domain}")], false);
            let port = if port { ":443" } else { "" };
            let good = recase(&format!("https://{sub}.{domain}{port}"), mask);
            prop_assert!(origin::allowed(&rules, Some(&good)), "{good:?} refused");
            let bad = look_alike
                .replace("{sub}", &sub)
                .replace("{domain}", &domain);
            // With a short `sub` and `domain`, a template can spell a real subdomain.
            if !https_subdomain(&bad, &domain) {
                prop_assert!(!origin::allowed(&rules, Some(&bad)), "{bad:?} allowed");
            }
            Ok(())
        },
    );
}

/// Whether `text` is strictly `https://LABELS.domain` (any case, `:443` or no port).
fn https_subdomain(text: &str, domain: &str) -> bool {
    Origin::parse(&text.trim().to_ascii_lowercase()).is_some_and(|o| {
        o.scheme == "https" && o.port.is_none() && o.host.ends_with(&format!(".{domain}"))
    })
}

/// Whatever a wildcard rule allows is a well-formed origin under its domain.
#[test]
fn a_wildcard_origin_rule_allows_nothing_malformed() {
    let start = select(
        &[
            "https://",
            "HTTPS://",
            "http://",
            "https:/",
            " https://",
            "",
        ][..],
    );
    let piece = select(
        &[
            "x", "a-b", "example", ".", "/", ":", "@", "?", "#", "\\", " ", "*", "%2e", "[", "]",
            "443", "",
        ][..],
    );
    let end = select(
        &[
            ".example.com",
            "example.com",
            ".example.com:443",
            ".example.com.",
            "",
        ][..],
    );
    let text = (start, prop::collection::vec(piece, 0..5), end)
        .prop_map(|(start, middle, end)| format!("{start}{}{end}", middle.concat()));
    check("wildcard malformed", text, |text| {
        let rules = rules(&["https://*.example.com"], false);
        if origin::allowed(&rules, Some(&text)) {
            prop_assert!(https_subdomain(&text, "example.com"), "{text:?} allowed");
        }
        Ok(())
    });
}

#[test]
fn no_origin_rules_refuse_every_origin() {
    let strategy = ("\\PC{0,40}", any::<bool>());
    check("no origin rules", strategy, |(origin, allow_missing)| {
        let rules = OriginRules {
            allow: Vec::new(),
            allow_missing,
        };
        prop_assert!(!origin::allowed(&rules, Some(&origin)));
        prop_assert_eq!(origin::allowed(&rules, None), allow_missing);
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// 4. X-Forwarded-For and the client IP

const TRUSTED: &[&str] = &[
    "10.0.0.0/8",
    "192.168.0.0/16",
    "2001:db8::/32",
    "127.0.0.1/32",
    "::1/128",
];

fn policy_trusting(nets: &[IpNet]) -> Policy {
    Policy {
        mode: Mode::Enforce,
        trusted_proxies: nets.to_vec(),
        max_connections: 1,
        routes: Vec::<Arc<Route>>::new().into(),
        unrouted: None,
        files: Vec::new(),
        handshake_timeout: std::time::Duration::from_secs(10),
        http2: wsgate::policy::Http2 {
            enabled: true,
            max_concurrent_streams: 100,
        },
        cluster: None,
    }
}

/// Addresses that often fall inside (or just outside) the trusted ranges; sometimes
/// written IPv4-mapped.
fn address() -> impl Strategy<Value = IpAddr> {
    let v4 = prop_oneof![
        (any::<u16>()).prop_map(|n| Ipv4Addr::new(10, 0, (n >> 8) as u8, n as u8)),
        (any::<u16>()).prop_map(|n| Ipv4Addr::new(192, 168, (n >> 8) as u8, n as u8)),
        Just(Ipv4Addr::LOCALHOST),
        any::<Ipv4Addr>(),
    ];
    let v6 = prop_oneof![
        any::<u64>().prop_map(|n| Ipv6Addr::from((0x2001_0db8_u128 << 96) | u128::from(n))),
        Just(Ipv6Addr::LOCALHOST),
        any::<Ipv6Addr>(),
    ];
    prop_oneof![
        3 => v4.clone().prop_map(IpAddr::V4),
        1 => v4.prop_map(|a| IpAddr::V6(a.to_ipv6_mapped())),
        2 => v6.prop_map(IpAddr::V6),
    ]
}

/// One X-Forwarded-For entry.
#[derive(Debug, Clone)]
enum Hop {
    /// An address, written as `ip`, `ip:port` / `[v6]:port`, or `[v6]`, padded with spaces.
    Address(IpAddr, u8, Option<u16>, usize),
    /// Something that is not an address.
    Junk(&'static str),
}

impl Hop {
    fn text(&self) -> String {
        match self {
            Hop::Address(ip, style, port, pad) => {
                let pad = " ".repeat(*pad);
                let ip = match (ip, style % 3, port) {
                    (IpAddr::V4(a), _, Some(p)) => format!("{a}:{p}"),
                    (IpAddr::V6(a), _, Some(p)) => format!("[{a}]:{p}"),
                    (IpAddr::V6(a), 1, None) => format!("[{a}]"),
                    (ip, _, None) => ip.to_string(),
                };
                format!("{pad}{ip}{pad}")
            }
            Hop::Junk(text) => (*text).to_owned(),
        }
    }
}

fn hop() -> impl Strategy<Value = Hop> {
    let junk = select(
        &[
            "",
            " ",
            "unknown",
            "_hidden",
            "1.2.3",
            "300.1.1.1",
            "[::1",
            "[::1]x",
            "[::1]:port",
            "[::1]:65536",
            "[10.0.0.1]",
            "10.0.0.1:port",
            "10.0.0.1:",
            "abc:def",
            "1.2.3.4.5",
            "::ffff:1.2.3",
            "fe80::1%eth0",
        ][..],
    );
    prop_oneof![
        6 => (address(), any::<u8>(), prop::option::of(any::<u16>()), 0..2usize)
            .prop_map(|(ip, style, port, pad)| Hop::Address(ip, style, port, pad)),
        1 => junk.prop_map(Hop::Junk),
    ]
}

/// One X-Forwarded-For header line.
#[derive(Debug, Clone)]
enum Line {
    Text(Vec<Hop>),
    /// Bytes that are not text (obs-text): an entry that cannot be read.
    Binary,
}

/// The X-Forwarded-For header lines, in order.
#[derive(Debug, Clone)]
struct Forwarded(Vec<Line>);

impl Forwarded {
    /// The entries left to right; `None` for one that is not an address.
    fn entries(&self) -> Vec<Option<IpAddr>> {
        let mut entries = Vec::new();
        for line in &self.0 {
            match line {
                Line::Text(hops) => entries.extend(hops.iter().filter_map(|h| match h {
                    Hop::Address(ip, ..) => Some(Some(*ip)),
                    // An empty list element is no entry (RFC 9110 §5.6.1).
                    Hop::Junk(text) if text.trim().is_empty() => None,
                    Hop::Junk(_) => Some(None),
                })),
                Line::Binary => entries.push(None),
            }
        }
        entries
    }

    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in &self.0 {
            let bytes = match line {
                Line::Text(hops) => hops.iter().map(Hop::text).collect::<Vec<_>>().join(","),
                Line::Binary => "\u{fffd}10.0.0.1".to_owned(),
            };
            let value = HeaderValue::from_bytes(bytes.as_bytes()).unwrap();
            headers.append(HeaderName::from_static("x-forwarded-for"), value);
        }
        headers
    }
}

fn forwarded() -> impl Strategy<Value = Forwarded> {
    let line = prop_oneof![
        12 => prop::collection::vec(hop(), 1..4).prop_map(Line::Text),
        1 => Just(Line::Binary),
    ];
    prop::collection::vec(line, 0..4).prop_map(Forwarded)
}

fn trusted_nets() -> impl Strategy<Value = Vec<IpNet>> {
    subsequence(TRUSTED, 0..=TRUSTED.len())
        .prop_map(|nets| nets.iter().map(|n| n.parse().unwrap()).collect())
}

/// Without trusted proxies the client is the TCP peer, whatever X-Forwarded-For says.
#[test]
fn without_trusted_proxies_the_client_is_the_peer() {
    let policy = policy_trusting(&[]);
    check("xff untrusted", (address(), forwarded()), |(peer, fwd)| {
        prop_assert_eq!(client_ip(&policy, peer, &fwd.headers()), canonical(peer));
        Ok(())
    });
}

/// With trusted proxies, the documented walk (policies/default.yaml, `trusted_proxies`):
/// from the right, skip trusted addresses; the first untrusted one is the client; an
/// entry that is not an address stops the walk at the last trusted address reached; an
/// empty element is skipped.
#[test]
fn the_client_is_the_rightmost_untrusted_forwarded_address() {
    let strategy = (trusted_nets(), address(), forwarded());
    check("xff walk", strategy, |(nets, peer, fwd)| {
        let policy = policy_trusting(&nets);
        let trusted = |ip: IpAddr| nets.iter().any(|n| n.contains(&ip));
        let mut expected = canonical(peer);
        if trusted(expected) {
            for entry in fwd.entries().iter().rev() {
                let Some(ip) = entry else { break };
                expected = canonical(*ip);
                if !trusted(expected) {
                    break;
                }
            }
        }
        let got = client_ip(&policy, peer, &fwd.headers());
        prop_assert_eq!(got, expected);
        prop_assert!(!matches!(got, IpAddr::V6(a) if a.to_ipv4_mapped().is_some()));
        Ok(())
    });
}

#[test]
fn ipv4_mapped_addresses_are_ipv4() {
    check(
        "canonical",
        (any::<Ipv4Addr>(), any::<Ipv6Addr>()),
        |(v4, v6)| {
            prop_assert_eq!(canonical(IpAddr::V6(v4.to_ipv6_mapped())), IpAddr::V4(v4));
            prop_assert_eq!(canonical(IpAddr::V4(v4)), IpAddr::V4(v4));
            if v6.to_ipv4_mapped().is_none() {
                prop_assert_eq!(canonical(IpAddr::V6(v6)), IpAddr::V6(v6));
            }
            let peer = IpAddr::V6(v4.to_ipv6_mapped());
            let policy = policy_trusting(&[]);
            prop_assert_eq!(client_ip(&policy, peer, &HeaderMap::new()), IpAddr::V4(v4));
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// 5. The upgrade request, over a real socket

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| n << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(BASE64[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        out.push_str(&"=="[..3 - chunk.len()]);
    }
    out
}

/// RFC 4648 §4 decoding, padding required.
fn unbase64(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::new();
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let last = i == bytes.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|b| **b == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for b in &chunk[..4 - pad] {
            n = n << 6 | BASE64.iter().position(|c| c == b)? as u32;
        }
        n <<= 6 * pad;
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    Some(out)
}

/// RFC 6455 §4.2.1 item 5: a base64 value that decodes to 16 bytes (in its canonical
/// encoding, RFC 4648 §3.5).
fn is_websocket_key(text: &str) -> bool {
    unbase64(text).is_some_and(|b| b.len() == 16 && base64(&b) == text)
}

/// RFC 3986 §3.2.2 `host [ ":" port ]` as a Host header carries it: a bracketed IP
/// literal or a reg-name (unreserved, `%`, sub-delims), and a port of at most 5 digits.
fn is_host(text: &str) -> bool {
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((literal, tail)) => {
                let literal_ok = !literal.is_empty()
                    && literal
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.');
                match (literal_ok, tail) {
                    (false, _) => return false,
                    (true, "") => return true,
                    (true, tail) => ("x", tail.strip_prefix(':').unwrap_or("?")),
                }
            }
            None => return false,
        },
        None => text.rsplit_once(':').unwrap_or((text, "")),
    };
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~%!$&'()*+,;=".contains(c))
        && port.len() <= 5
        && port.chars().all(|c| c.is_ascii_digit())
}

/// A comma-separated header containing this token, in any case.
fn lists(values: &[String], token: &str) -> bool {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// An opening handshake with some of its headers missing, repeated or wrong.
#[derive(Debug, Clone)]
struct Handshake {
    method: &'static str,
    version: &'static str,
    host: Vec<String>,
    upgrade: Vec<String>,
    connection: Vec<String>,
    key: Vec<String>,
    ws_version: Vec<String>,
    origin: Vec<String>,
    lower_case: bool,
    places: Vec<Index>,
}

const ALLOWED_ORIGIN: &str = "https://app.example.com";

impl Handshake {
    fn bytes(&self) -> Vec<u8> {
        let named = |name: &'static str, values: &[String]| {
            values
                .iter()
                .map(move |v| (name, v.clone()))
                .collect::<Vec<_>>()
        };
        let headers = [
            named("Host", &self.host),
            named("Upgrade", &self.upgrade),
            named("Connection", &self.connection),
            named("Sec-WebSocket-Key", &self.key),
            named("Sec-WebSocket-Version", &self.ws_version),
            named("Origin", &self.origin),
        ]
        .concat();
        let mut head = format!("{} /ws {}\r\n", self.method, self.version);
        for (name, value) in interleave(headers, &self.places) {
            let name = if self.lower_case {
                name.to_ascii_lowercase()
            } else {
                name.to_owned()
            };
            head += &format!("{name}: {value}\r\n");
        }
        head += "\r\n";
        head.into_bytes()
    }

    /// The statuses docs/admission.md allows for this request: 101 when RFC 6455 §4.2.1 allows it
    /// (and the Origin is allowed), else the status of any check it fails.
    fn allowed_statuses(&self) -> Vec<u16> {
        let one = |values: &[String], ok: &dyn Fn(&str) -> bool| {
            values.len() == 1 && ok(values[0].trim_matches([' ', '\t']))
        };
        let failures = [
            (!lists(&self.upgrade, "websocket"), 426),
            (
                self.ws_version.len() < 2 && !one(&self.ws_version, &|v| v == "13"),
                426,
            ),
            // RFC 6455 §11.3.5: at most once in a request.
            (self.ws_version.len() > 1, 400),
            (self.method != "GET", 400),
            (self.version != "HTTP/1.1", 400),
            (!one(&self.host, &is_host), 400),
            // RFC 6454 §7.3: one Origin.
            (self.origin.len() > 1, 400),
            (!lists(&self.connection, "upgrade"), 400),
            (!one(&self.key, &is_websocket_key), 400),
            (self.origin.iter().any(|o| o != ALLOWED_ORIGIN), 403),
        ];
        let statuses: Vec<u16> = failures.iter().filter(|f| f.0).map(|f| f.1).collect();
        if statuses.is_empty() {
            vec![101]
        } else {
            statuses
        }
    }
}

fn printable() -> impl Strategy<Value = String> {
    "[!-~]([ -~]{0,16}[!-~])?"
}

/// Mostly one good value, so that most requests break at most one rule; sometimes a
/// bad value, printable noise, no header or two.
fn header(
    good: impl Strategy<Value = String> + Clone + 'static,
    bad: impl Strategy<Value = String> + Clone + 'static,
) -> BoxedStrategy<Vec<String>> {
    let value = prop_oneof![12 => good, 1 => bad, 1 => printable()];
    prop_oneof![
        1 => Just(Vec::new()),
        18 => prop::collection::vec(value.clone(), 1..=1),
        1 => prop::collection::vec(value, 2..=2),
    ]
    .boxed()
}

fn spelled(values: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
    select(values).prop_map(str::to_owned)
}

fn handshake() -> impl Strategy<Value = Handshake> {
    let key = prop::array::uniform16(any::<u8>()).prop_map(|b| base64(&b));
    let bad_key = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..20).prop_map(|b| base64(&b)),
        "[A-Za-z0-9+/]{21,23}={0,2}",
        spelled(&[
            "dGhlIHNhbXBsZSBub25jZR==",
            "dGhlIHNhbXBsZSBub25jZQ",
            "not a key"
        ]),
    ];
    let method = prop_oneof![6 => Just("GET"), 1 => select(&["POST", "HEAD", "PUT"][..])];
    let version = prop_oneof![9 => Just("HTTP/1.1"), 1 => Just("HTTP/1.0")];
    let headers = (
        // The gate answers to any name: a missing, second or malformed Host is wrong.
        header(
            spelled(&[
                "localhost",
                "127.0.0.1:8443",
                "gate.example.com",
                "[::1]:8443",
                "x",
            ]),
            spelled(&["a b", "evil/x?y", "user@host", "host:http", "[::1", ""]),
        ),
        header(
            spelled(&["websocket", "WebSocket", "h2c, websocket"]),
            spelled(&["h2c", "websocket/13", "websockets"]),
        ),
        header(
            spelled(&["Upgrade", "upgrade", "keep-alive, Upgrade"]),
            spelled(&["keep-alive", "upgrades", "close"]),
        ),
        header(key, bad_key),
        header(spelled(&["13"]), spelled(&["8", "13, 8", "013", "14", ""])),
        prop_oneof![
            2 => Just(Vec::new()),
            2 => Just(vec![ALLOWED_ORIGIN.to_owned()]),
            1 => Just(vec!["https://evil.example.org".to_owned()]),
        ],
    );
    (method, version, headers, any::<bool>(), places()).prop_map(
        |(method, version, (host, upgrade, connection, key, ws_version, origin), lower, places)| {
            Handshake {
                method,
                version,
                host,
                upgrade,
                connection,
                key,
                ws_version,
                origin,
                lower_case: lower,
                places,
            }
        },
    )
}

/// Send `request` and return the response's status (0 if none came).
async fn status_of(addr: SocketAddr, request: &[u8]) -> u16 {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut head = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    let head = String::from_utf8_lossy(&head);
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_gate_upgrades_only_what_rfc_6455_allows() {
    let (upstream, gate) = runtime().block_on(async {
        let upstream = support::Upstream::start().await;
        let policy = format!(
            "version: 1\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\n  origin: {{allow: [\"{ALLOWED_ORIGIN}\"], allow_missing: true}}\n  rate: {{upgrades_per_second: 1000000, burst: 1000000, max_connections_per_ip: 1000000}}\nroutes:\n  - path: /ws\n",
            upstream.url()
        );
        let gate = support::TestGate::start_with(&policy, false).await;
        (upstream, gate)
    });
    check("upgrade request", handshake(), |handshake| {
        let status = runtime().block_on(status_of(gate.addr, &handshake.bytes()));
        let allowed = handshake.allowed_statuses();
        prop_assert!(
            allowed.contains(&status),
            "got {status}, expected one of {allowed:?} for\n{}",
            String::from_utf8_lossy(&handshake.bytes())
        );
        Ok(())
    });
    drop((gate, upstream));
}

#[test]
fn base64_helpers_agree_with_rfc_4648() {
    assert_eq!(base64(b"foob"), "Zm9vYg==");
    assert_eq!(base64(b"fooba"), "Zm9vYmE=");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    assert_eq!(unbase64("Zm9vYmE=").unwrap(), b"fooba");
    assert!(is_websocket_key("dGhlIHNhbXBsZSBub25jZQ=="));
    assert!(!is_websocket_key("dGhlIHNhbXBsZSBub25jZR=="));
    assert!(!is_websocket_key("dGhlIHNhbXBsZSBub25jZQ"));
    check(
        "base64 round trip",
        prop::collection::vec(any::<u8>(), 0..40),
        |b| {
            prop_assert_eq!(unbase64(&base64(&b)), Some(b));
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// 6. Request paths: the normal form that is routed and sent upstream

/// Routes whose prefixes nest and hold unreserved punctuation that can be percent-encoded.
const PATH_ROUTES: &[&str] = &[
    "/api",
    "/api/admin",
    "/api/admin-x",
    "/ws",
    "/ws/v1.2",
    "/a~b/c_d",
];

fn path_policy() -> &'static Policy {
    static LOADED: OnceLock<wsgate::policy::Loaded> = OnceLock::new();
    &LOADED
        .get_or_init(|| {
            let mut yaml = "version: 1\ndefaults: {auth: {required: false}}\nroutes:\n".to_owned();
            for route in PATH_ROUTES {
                yaml.push_str(&format!("  - path: {route}\n"));
            }
            config::load_bytes(Path::new("policy.yaml"), yaml.as_bytes()).unwrap()
        })
        .policy
}

fn route_name(path: &str) -> Option<String> {
    path_policy().route_for(path).map(|r| r.name.clone())
}

/// `word` with the characters whose bit is set in `encode` percent-encoded, in lowercase
/// hex where `lower` has the bit set.
fn encoded(word: &str, encode: u16, lower: u16) -> String {
    let mut out = String::new();
    for (i, c) in word.chars().enumerate() {
        if encode >> i & 1 == 1 {
            let hex = format!("%{:02X}", c as u32);
            out.push_str(&if lower >> i & 1 == 1 {
                hex.to_ascii_lowercase()
            } else {
                hex
            });
        } else {
            out.push(c);
        }
    }
    out
}

/// A word of a route prefix (or a near miss), about a quarter of its characters
/// percent-encoded.
fn encoded_word() -> impl Strategy<Value = String> {
    let words = select(
        &[
            "api", "admin", "admin-x", "ws", "v1.2", "a~b", "c_d", "API", "x", "",
        ][..],
    );
    (words, any::<[u16; 3]>()).prop_map(|(word, [a, b, lower])| encoded(word, a & b, lower))
}

/// Segments that a server or framework might read differently from the gate.
#[rustfmt::skip]
const TRICKY_SEGMENTS: &[&str] = &[
    ".", "..", "%2e", "%2E%2e", ".%2e", ";x", "x;y", "%3B", "%3bx", "%2f", "%2F", "%5C", "\\",
    "%00", "%zz", "%4", "%", "%+1", "%25", "%2561", "%2561dmin", "%C3%A9", "%c3%a9", "é",
    "%20", "%3A", "%3a", "%7E", "%2D",
];

fn separator() -> impl Strategy<Value = &'static str> {
    select(&["/", "/", "/", "//", "///"][..])
}

/// A `;` parameter (or its encoding), now and then.
fn param() -> impl Strategy<Value = &'static str> {
    select(&["", "", "", "", "", "", "", "", ";p", ";", "%3Bp"][..])
}

/// Mostly a route's prefix spelled some other way, then more segments: encodings, repeated
/// slashes, `;` parameters and the tricky segments.
fn request_path() -> impl Strategy<Value = String> {
    let prefix = (
        select(PATH_ROUTES),
        prop::collection::vec((separator(), any::<[u16; 3]>(), param()), 2),
    )
        .prop_map(|(route, words)| {
            let mut out = String::new();
            for (word, (sep, [a, b, lower], param)) in route.split('/').skip(1).zip(words) {
                out.push_str(sep);
                out.push_str(&encoded(word, a & b, lower));
                out.push_str(param);
            }
            out
        });
    let segment = (
        prop_oneof![4 => encoded_word(), 1 => select(TRICKY_SEGMENTS).prop_map(str::to_owned)],
        param(),
    )
        .prop_map(|(s, param)| format!("{s}{param}"));
    (
        prop_oneof![4 => prefix, 1 => Just(String::new())],
        prop::collection::vec((separator(), segment), 0..4),
        select(&["", "", "/", "//"][..]),
    )
        .prop_map(|(prefix, parts, end)| {
            let mut path = prefix;
            for (sep, seg) in parts {
                path.push_str(sep);
                path.push_str(&seg);
            }
            path.push_str(end);
            if !path.starts_with('/') {
                path.insert(0, '/');
            }
            path
        })
}

fn percent_decode(path: &str, only_unreserved: bool) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| path.get(i + 1..i + 3))
            .flatten()
            .and_then(hex_byte)
            .filter(|b| !only_unreserved || b.is_ascii_alphanumeric() || b"-._~".contains(b));
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The byte two hex digits spell (`from_str_radix` alone would take `+1`).
fn hex_byte(hex: &str) -> Option<u8> {
    if hex.len() == 2 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        u8::from_str_radix(hex, 16).ok()
    } else {
        None
    }
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::new();
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// What servlet containers do with `;params`: cut from each segment.
fn drop_params(path: &str) -> String {
    let segments: Vec<&str> = path
        .split('/')
        .map(|s| s.split(';').next().unwrap_or(""))
        .collect();
    segments.join("/")
}

/// RFC 3986 §5.2.4, on a path.
fn resolve_dots(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." | ".." => {
                if *seg == ".." && !kept.is_empty() {
                    kept.pop();
                }
                if i == last {
                    kept.push("");
                }
            }
            other => kept.push(other),
        }
    }
    format!("/{}", kept.join("/"))
}

/// Every reading of `path` that a server or framework behind the gate might route on: each
/// rule alone, and in the orders frameworks apply them.
fn readings(path: &str) -> Vec<(&'static str, String)> {
    let decoded = percent_decode(path, false);
    let mut all = vec![
        ("decode unreserved", percent_decode(path, true)),
        ("merge slashes", merge_slashes(path)),
        ("drop ;params", drop_params(path)),
        ("percent-decode", decoded.clone()),
        ("resolve dots", resolve_dots(path)),
    ];
    all.extend(framework_readings(path));
    all
}

fn framework_readings(path: &str) -> Vec<(&'static str, String)> {
    let decoded = percent_decode(path, false);
    vec![
        (
            "params, decode, merge, dots (servlet)",
            resolve_dots(&merge_slashes(&percent_decode(&drop_params(path), false))),
        ),
        (
            "decode, params, merge, dots",
            resolve_dots(&merge_slashes(&drop_params(&decoded))),
        ),
    ]
}

/// The test's own model of the normal form: unreserved escapes decoded, slashes merged,
/// other escapes in uppercase.
fn modelled_normal(raw: &str) -> String {
    let merged = merge_slashes(&percent_decode(raw, true));
    let mut out = String::new();
    let mut rest = merged.as_str();
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3).unwrap_or(&rest[at..]);
        out.push_str(&escape.to_ascii_uppercase());
        rest = &rest[at + escape.len()..];
    }
    out.push_str(rest);
    // A character sent raw goes on percent-encoded, byte by byte.
    out.chars()
        .map(|c| match c.is_ascii() {
            true => c.to_string(),
            false => c.to_string().bytes().map(|b| format!("%{b:02X}")).collect(),
        })
        .collect()
}

/// What the gate admits it routes as every reading of what it sends upstream would be, and
/// as a framework reading the client's own spelling would: no spelling reaches one route's
/// upstream under another route's policy. The normal form is a fixed point.
#[test]
fn a_path_is_routed_as_every_reading_of_it_would_be() {
    check("path readings", request_path(), |raw| {
        let Ok(normal) = wsgate::path::normalize(&raw) else {
            return Ok(());
        };
        prop_assert_eq!(&*normal, modelled_normal(&raw), "from {:?}", raw);
        let again = wsgate::path::normalize(&normal);
        prop_assert!(
            matches!(&again, Ok(std::borrow::Cow::Borrowed(p)) if *p == normal),
            "{raw:?} -> {normal:?} -> {again:?}"
        );
        let routed = route_name(&normal);
        let sent = readings(&normal).into_iter().map(|r| ("sent", r));
        let asked = framework_readings(&raw).into_iter().map(|r| ("asked", r));
        for (whose, (how, reading)) in sent.chain(asked) {
            prop_assert_eq!(
                &route_name(&reading),
                &routed,
                "{:?} -> {:?} is routed under {:?}, but {} of the {} path reads {:?}",
                raw,
                normal,
                routed,
                how,
                whose,
                reading
            );
        }
        Ok(())
    });
}

/// On any input, normalize refuses or answers a path in normal form: one `/` at a time, no
/// `;`, `\` or dot segment, and every `%` starting an uppercase escape of a reserved byte.
#[test]
fn normalize_answers_normal_paths_or_refuses() {
    let input = prop_oneof!["/[a-zA-Z0-9%/;.~_\\-\\\\]{0,24}", "\\PC{0,24}",];
    check("normal form", input, |raw| {
        let Ok(normal) = wsgate::path::normalize(&raw) else {
            return Ok(());
        };
        prop_assert!(normal.starts_with('/'), "{raw:?} -> {normal:?}");
        prop_assert!(normal.is_ascii(), "{raw:?} -> {normal:?}");
        prop_assert!(
            !normal.contains("//") && !normal.contains([';', '\\']),
            "{raw:?} -> {normal:?}"
        );
        prop_assert!(
            !normal.split('/').any(|s| s == "." || s == ".."),
            "{raw:?} -> {normal:?}"
        );
        for (i, _) in normal.match_indices('%') {
            let hex = normal.get(i + 1..i + 3).unwrap_or("");
            let byte = hex_byte(hex);
            prop_assert!(
                hex.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
                    && byte.is_some_and(|b| !(b.is_ascii_alphanumeric() || b"-._~;/\\\0".contains(&b))),
                "{raw:?} -> {normal:?}"
            );
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// Inputs the properties failed on (shrunk), fixed in the same commit.

/// `https://*.0` allowed `https://0/.0`: `https://*.example.com` let in
/// `https://evil.com/.example.com`. (A one-label wildcard is refused since; the shrunk
/// case is kept with two.)
#[test]
fn regression_a_path_is_not_a_subdomain() {
    // (Found with `*.0.0`, which is refused now: an address has no subdomains.)
    let shrunk = rules(&["https://*.0.a"], false);
    assert!(!origin::allowed(&shrunk, Some("https://0/.0.a")));
    let example = rules(&["https://*.example.com"], false);
    for look_alike in [
        "https://evil.com/.example.com",
        "https://evil.com:1.example.com",
        "https://x..example.com",
        "https:// x.example.com",
    ] {
        assert!(!origin::allowed(&example, Some(look_alike)), "{look_alike}");
    }
    assert!(origin::allowed(&example, Some("https://a.b-c.example.com")));
}

/// `[::1` (no closing bracket) was read as `::1` instead of stopping the walk.
#[test]
fn regression_a_malformed_forwarded_entry_stops_the_walk() {
    let policy = policy_trusting(&["10.0.0.0/8".parse().unwrap()]);
    let mut headers = HeaderMap::new();
    headers.insert("x-forwarded-for", HeaderValue::from_static("[::1"));
    let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0));
    assert_eq!(client_ip(&policy, peer, &headers), peer);
}

/// A non-text X-Forwarded-For line was skipped, so the address left of it was believed.
#[test]
fn regression_a_binary_forwarded_line_stops_the_walk() {
    let policy = policy_trusting(&["::1/128".parse().unwrap()]);
    let mut headers = HeaderMap::new();
    headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.0"));
    let binary = HeaderValue::from_bytes("\u{fffd}10.0.0.1".as_bytes()).unwrap();
    headers.append("x-forwarded-for", binary);
    let peer = IpAddr::V6(Ipv6Addr::LOCALHOST);
    assert_eq!(client_ip(&policy, peer, &headers), peer);
}

/// A cookie token beside another cookie's raw (non-ASCII) bytes is read from the header's
/// bytes; the property once looked for it only in headers that were valid text.
#[test]
fn regression_a_cookie_token_beside_raw_bytes_is_found_in_them() {
    let mut headers = HeaderMap::new();
    headers.append(COOKIE, HeaderValue::from_bytes(b"=!;\x80").unwrap());
    let sources = [TokenSource::Cookie(String::new())];
    let found = token::extract(&sources, &headers, None, &[]).expect("the token cookie");
    assert_eq!(found.token, "!");
}

/// A key repeated in a map (`require_claims`) was accepted with the last value silently
/// winning, and `/policy` showed the file as `null`.
#[test]
fn regression_a_repeated_map_key_is_a_located_error() {
    let policy = "version: 1\ndefaults:\n  auth:\n    required: false\n    require_claims:\n      role: [admin]\n      role: [user]\nroutes:\n  - path: /ws\n";
    match config::load_bytes(Path::new("policy.yaml"), policy.as_bytes()) {
        Err(ConfigError::Syntax { line, message, .. }) => {
            assert!((6..=7).contains(&line), "line {line}");
            assert!(message.contains("duplicate"), "{message}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a repeated key was accepted"),
    }
}

/// Two `Sec-WebSocket-Version: 13` (RFC 6455 §11.3.5: at most once in a request), or no
/// Host at all (§4.2.1), were upgraded.
#[tokio::test]
async fn regression_a_repeated_version_or_a_missing_host_is_refused() {
    let upstream = support::Upstream::start().await;
    let gate =
        support::TestGate::start_with(&support::open_policy(&upstream.url(), ""), false).await;
    let rest = "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let version = "Sec-WebSocket-Version: 13\r\n";
    let twice = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\n{version}{version}{rest}");
    assert_eq!(status_of(gate.addr, twice.as_bytes()).await, 400);
    let no_host = format!("GET /ws HTTP/1.1\r\n{version}{rest}");
    assert_eq!(status_of(gate.addr, no_host.as_bytes()).await, 400);
    let good = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\n{version}{rest}");
    assert_eq!(status_of(gate.addr, good.as_bytes()).await, 101);
}

/// An origin's generator named port 0, which a rule may not: the property tripped on its
/// own input (`https://0:0`). The rule is refused by name; an origin naming port 0 is
/// allowed by no rule.
#[test]
fn regression_a_rule_naming_port_0_is_refused() {
    let refused = parse_origin_pattern("https://0:0").expect_err("port 0 accepted");
    assert!(refused.contains("invalid port"), "{refused}");
    let rule = rules(&["https://0"], false);
    assert!(!origin::allowed(&rule, Some("https://0:0")));
}

/// A top-level key written like a field path (`routes[0]:`) is reported under its own
/// name; the property took that name for a path the gate had made up.
#[test]
fn regression_a_key_that_looks_like_a_path_is_located() {
    let input = PolicyBytes {
        path: PathBuf::from("policy.yaml"),
        bytes: b"&aversion: \nroutes[0]: \n".to_vec(),
    };
    let e = config::load_bytes(&input.path, &input.bytes).expect_err("an unknown key accepted");
    assert!(e.to_string().contains("unknown field `routes[0]`"), "{e}");
    error_is_located(&e, &input).unwrap();
}

/// A value of the wrong type under a claim name holding dots or brackets (Auth0 names its
/// claims `https://app.example.com/roles`) had no line and column: the name was read as a
/// path of its own.
#[test]
fn regression_a_claim_name_with_dots_is_located() {
    for (claim, at) in [("\"https://app.example.com/roles\"", 40), ("routes[0]", 18)] {
        let policy =
            format!("version: 1\ndefaults:\n  auth:\n    forward_claims:\n      {claim}: 0\n");
        match config::load_bytes(Path::new("policy.yaml"), policy.as_bytes()) {
            Err(ConfigError::Syntax { line, column, .. }) => assert_eq!((line, column), (5, at)),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a number accepted as a header name"),
        }
    }
}
