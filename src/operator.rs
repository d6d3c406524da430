//! The operator API on the admin listener: list the open connections, close some of them
//! now, and revoke a token subject or id for a while. Every endpoint here requires the
//! bearer token of `--admin-token-file` (compared in constant time; the file is re-read
//! when it changes); without that flag they answer 403 `admin_token_not_configured`.
//!
//! Bodies are JSON objects of at most [`MAX_BODY`] bytes (a larger one is a malformed
//! body too: 400 `bad_request`); refusals have the admission refusals' JSON shape,
//! `{"error": …, "message": …}`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use ipnet::IpNet;
use serde::Deserialize;

use crate::body::{full, Body};
use crate::cluster::Cluster;
use crate::registry::{Filter, Registry};
use crate::revocations::{
    Revocations, Revoked, MAX_REVOCATIONS, MAX_REVOKED_BYTES, MAX_TTL_SECONDS,
};

/// How long a request's body may take to arrive once its head has: an operator's client
/// sends 16 KiB at most, and a body that never ends must not hold the connection.
const BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The largest request body accepted (16 KiB).
pub const MAX_BODY: usize = 16 * 1024;
/// `limit` of `GET /connections` when none is given, and the most it may be.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// The operator API's state: the token file, the registry and the revocations.
pub struct Operator {
    /// `None` without `--admin-token-file`: every endpoint answers 403.
    pub token: Option<AdminToken>,
    pub registry: Arc<Registry>,
    pub revocations: Arc<Revocations>,
    /// Shares revocations with the fleet when the policy has `cluster`.
    pub cluster: Arc<Cluster>,
}

/// Whether `path` is one of the operator endpoints.
pub fn is_operator_path(path: &str) -> bool {
    matches!(path, "/connections" | "/connections/close" | "/revocations")
}

/// Why an operator request was refused.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("the operator API is off: the gate runs without --admin-token-file")]
    NotConfigured,
    #[error("a valid admin bearer token is required")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("the body is larger than 16 KiB")]
    TooLarge,
    #[error("this endpoint allows {0}")]
    MethodNotAllowed(&'static str),
    #[error("no such endpoint on the admin listener")]
    NotFound,
    #[error("{MAX_REVOCATIONS} revocations are already in force")]
    TooManyRevocations,
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::NotConfigured => StatusCode::FORBIDDEN,
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
            // A body over the limit is a bad request like any other the API refuses: the
            // status goes with the JSON reason, `bad_request`, and the message says what
            // is wrong.
            Refusal::BadRequest(_) | Refusal::TooLarge => StatusCode::BAD_REQUEST,
            Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::NotFound => StatusCode::NOT_FOUND,
            Refusal::TooManyRevocations => StatusCode::INSUFFICIENT_STORAGE,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Refusal::NotConfigured => "admin_token_not_configured",
            Refusal::Unauthorized => "unauthorized",
            Refusal::BadRequest(_) | Refusal::TooLarge => "bad_request",
            Refusal::MethodNotAllowed(_) => "method_not_allowed",
            Refusal::NotFound => "not_found",
            Refusal::TooManyRevocations => "too_many_revocations",
        }
    }

    fn into_response(self) -> Response<Body> {
        let json = serde_json::json!({ "error": self.reason(), "message": self.to_string() });
        let mut response = json_response(self.status(), &json);
        let headers = response.headers_mut();
        match self {
            Refusal::Unauthorized => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Refusal::MethodNotAllowed(allow) => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            _ => {}
        }
        response
    }
}

/// 405 in the operator API's shape (`Allow` and the JSON body), for the admin listener's
/// other endpoints too.
pub fn method_not_allowed(allow: &'static str) -> Response<Body> {
    Refusal::MethodNotAllowed(allow).into_response()
}

/// 404 in the operator API's shape, for any path the admin listener does not serve.
pub fn not_found() -> Response<Body> {
    Refusal::NotFound.into_response()
}

fn bad(message: impl Into<String>) -> Refusal {
    Refusal::BadRequest(message.into())
}

fn json_response(status: StatusCode, json: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from(json.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Answer one request to an operator endpoint (see [`is_operator_path`]).
/// Answer an operator request from `peer`. A request refused for its token is logged with
/// the caller's address, and so is every change made.
pub async fn respond(operator: &Operator, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    match serve(operator, req, peer).await {
        Ok(json) => json_response(StatusCode::OK, &json),
        Err(refusal) => {
            if matches!(refusal, Refusal::Unauthorized) {
                let path = crate::path::for_log(&path);
                tracing::warn!(%peer, %method, %path, "operator: request refused without a valid admin token");
            }
            refusal.into_response()
        }
    }
}

async fn serve(
    operator: &Operator,
    req: Request<Incoming>,
    peer: IpAddr,
) -> Result<serde_json::Value, Refusal> {
    let token = operator.token.as_ref().ok_or(Refusal::NotConfigured)?;
    if !token.allows(req.headers().get(AUTHORIZATION)).await {
        return Err(Refusal::Unauthorized);
    }
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (path.as_str(), &method) {
        ("/connections", &Method::GET | &Method::HEAD) => {
            list(&operator.registry, req.uri().query())
        }
        ("/connections", _) => Err(Refusal::MethodNotAllowed("GET, HEAD")),
        ("/connections/close", &Method::POST) => {
            // A selector put in the URL by mistake must not leave the body's alone.
            no_query(req.uri(), "the selector goes in the JSON body")?;
            let body: CloseBody = read_json(req).await?;
            let filter = body.filter()?;
            let closed = operator.registry.close(&filter);
            let (kind, value) = filter.parts();
            // A JWT pasted as the `sub` by mistake is still a token: never logged.
            let value = crate::path::for_log(&value);
            tracing::info!(%peer, kind, %value, closed, "operator: connections closed");
            Ok(serde_json::json!({ "closed": closed }))
        }
        ("/connections/close", _) => Err(Refusal::MethodNotAllowed("POST")),
        ("/revocations", &Method::GET | &Method::HEAD) => {
            no_query(req.uri(), "GET /revocations takes none")?;
            Ok(list_revocations(&operator.revocations))
        }
        ("/revocations", &Method::POST) => {
            no_query(req.uri(), "the revocation goes in the JSON body")?;
            let body: RevocationBody = read_json(req).await?;
            let which = body.which()?;
            let ttl = match body.ttl_seconds.as_ref().and_then(whole_number) {
                Some(t) if (1..=MAX_TTL_SECONDS).contains(&t) => Duration::from_secs(t),
                _ => {
                    return Err(bad(format!(
                        "ttl_seconds must be a whole number from 1 to {MAX_TTL_SECONDS}"
                    )))
                }
            };
            let expires_at_unix = operator
                .revocations
                .add(which.clone(), ttl)
                .map_err(|_| Refusal::TooManyRevocations)?;
            let closed = operator.registry.close(&Filter::revoked(&which));
            let (kind, value) = which.parts();
            tracing::info!(
                %peer,
                kind,
                value = %crate::path::for_log(value),
                ttl_seconds = ttl.as_secs(),
                closed,
                "operator: token revoked"
            );
            let mut answer =
                serde_json::json!({ "closed": closed, "expires_at_unix": expires_at_unix });
            if operator.cluster.configured() {
                let shared = operator
                    .cluster
                    .share_revocation(&which, ttl, expires_at_unix)
                    .await;
                if shared.is_ok() {
                    operator.revocations.mark_shared(&which);
                }
                answer["shared"] = shared_field(shared);
            }
            Ok(answer)
        }
        ("/revocations", &Method::DELETE) => {
            no_query(req.uri(), "the revocation goes in the JSON body")?;
            let body: RevocationBody = read_json(req).await?;
            let which = body.which()?;
            let lifted = operator.revocations.lift(&which);
            tracing::info!(
                %peer,
                kind = which.parts().0,
                value = %crate::path::for_log(which.parts().1),
                lifted,
                "operator: revocation lifted"
            );
            let mut answer = serde_json::json!({ "lifted": lifted });
            if operator.cluster.configured() {
                let shared = operator.cluster.share_lift(&which).await;
                answer["shared"] = shared_field(shared);
            }
            Ok(answer)
        }
        ("/revocations", _) => Err(Refusal::MethodNotAllowed("GET, HEAD, POST, DELETE")),
        _ => Err(bad("no such operator endpoint")),
    }
}

/// The answer's `shared` field with `cluster` set: whether the other gates were told
/// (`false`: this gate applied it, the store did not take it; it is logged and counted).
fn shared_field(shared: Result<(), crate::cluster::StoreError>) -> serde_json::Value {
    match shared {
        Ok(()) => serde_json::Value::Bool(true),
        Err(e) => {
            tracing::warn!(error = %e, "operator: the cluster store did not take the change; other gates do not know it");
            serde_json::Value::Bool(false)
        }
    }
}

/// The body as JSON of type `T`: at most [`MAX_BODY`] bytes.
async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Refusal> {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(Refusal::TooLarge);
    }
    let body = tokio::time::timeout(BODY_WAIT, Limited::new(req.into_body(), MAX_BODY).collect());
    let bytes = match body.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(Refusal::TooLarge)
        }
        Ok(Err(_)) => return Err(bad("the body could not be read")),
        Err(_) => return Err(bad("the body did not arrive within 5 seconds")),
    };
    // serde would take an array for a struct, field by field in order: `[null, "bob"]`
    // would revoke a jti by its place in the list, not by a name the operator wrote.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(bad("the body must be a JSON object"));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        bad(match e.classify() {
            serde_json::error::Category::Data => format!("the body is not a valid request: {e}"),
            _ => format!("the body is not valid JSON: {e}"),
        })
    })
}

/// `POST /connections/close`: exactly one of the fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    id: Option<Id>,
    sub: Option<String>,
    ip: Option<String>,
    route: Option<String>,
}

/// A connection id as listed (`812`), written as a whole number any way JSON allows
/// (`812.0`, as `ttl_seconds` is), or as its decimal string (`"812"`), which is how
/// clients that keep ids as strings send them back.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "id must be a connection id: a number or its decimal string"
)]
enum Id {
    Number(serde_json::Number),
    Digits(String),
}

impl Id {
    fn number(self) -> Result<u64, Refusal> {
        match self {
            Id::Number(n) => {
                whole_number(&n).ok_or_else(|| bad(format!("{n} is not a connection id")))
            }
            Id::Digits(s) => s
                .parse()
                .map_err(|_| bad(format!("{s:?} is not a connection id"))),
        }
    }
}

impl CloseBody {
    fn filter(self) -> Result<Filter, Refusal> {
        let given = usize::from(self.id.is_some())
            + usize::from(self.sub.is_some())
            + usize::from(self.ip.is_some())
            + usize::from(self.route.is_some());
        let empty = [&self.sub, &self.ip, &self.route]
            .into_iter()
            .any(|s| s.as_deref() == Some(""));
        if given != 1 || empty {
            return Err(bad(
                "exactly one of id, sub, ip and route, not empty, is required",
            ));
        }
        Ok(Filter {
            id: self.id.map(Id::number).transpose()?,
            sub: self.sub,
            route: self.route,
            ip: self.ip.as_deref().map(parse_net).transpose()?,
            jti: None,
        })
    }
}

/// `POST` and `DELETE /revocations`: one of `sub` and `jti`, and for `POST` the TTL.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevocationBody {
    sub: Option<String>,
    jti: Option<String>,
    /// A JSON number: `60.0` (as Python's `json.dumps(60.0)` writes it) is the whole
    /// number 60.
    ttl_seconds: Option<serde_json::Number>,
}

/// A JSON number that is a whole number at least 0, written as an integer or not
/// (`60`, `60.0`, `6e1`).
fn whole_number(n: &serde_json::Number) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(f))
            .map(|f| f as u64)
    })
}

impl RevocationBody {
    fn which(&self) -> Result<Revoked, Refusal> {
        let (field, revoked) = match (&self.sub, &self.jti) {
            (Some(s), None) if !s.is_empty() => ("sub", Revoked::Sub(s.clone())),
            (None, Some(j)) if !j.is_empty() => ("jti", Revoked::Jti(j.clone())),
            _ => return Err(bad("exactly one of sub and jti, not empty, is required")),
        };
        let (Revoked::Sub(name) | Revoked::Jti(name)) = &revoked;
        if name.len() > MAX_REVOKED_BYTES {
            return Err(bad(format!(
                "{field} is {} bytes; at most {MAX_REVOKED_BYTES} are accepted",
                name.len()
            )));
        }
        Ok(revoked)
    }
}

/// A CIDR (`10.0.0.0/8`) or a single address.
/// As the policy reads its CIDRs: an IPv4-mapped one (`::ffff:10.0.0.1`) is the IPv4
/// network it maps, since client addresses are kept in their IPv4 form.
fn parse_net(s: &str) -> Result<IpNet, Refusal> {
    crate::config::parse_cidr(s)
        .ok_or_else(|| bad(format!("{s:?} is not an address or a CIDR block")))
}

/// 400 for a request whose query has a parameter (`why` says where it belongs).
fn no_query(uri: &http::Uri, why: &str) -> Result<(), Refusal> {
    match uri
        .query()
        .and_then(|q| q.split('&').find(|p| !p.is_empty()))
    {
        Some(pair) => {
            let key = pair.split_once('=').map_or(pair, |(key, _)| key);
            Err(bad(format!("unknown query parameter {key:?} ({why})")))
        }
        None => Ok(()),
    }
}

/// `GET /connections`: the filters from the query, newest first, at most `limit`.
fn list(registry: &Registry, query: Option<&str>) -> Result<serde_json::Value, Refusal> {
    let mut filter = Filter::default();
    let mut limit = DEFAULT_LIMIT;
    let mut seen: Vec<&str> = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        // Which of two values would count? Neither: each filter is given once.
        if seen.contains(&key) {
            return Err(bad(format!("the query parameter {key:?} is given twice")));
        }
        seen.push(key);
        let value = percent_decode(value)
            .ok_or_else(|| bad(format!("the query parameter {key:?} is not valid UTF-8")))?;
        if value.is_empty() && matches!(key, "route" | "sub" | "ip") {
            // As an empty selector in a close request: it would match nothing.
            return Err(bad(format!("the filter {key:?} is empty")));
        }
        match key {
            "route" => filter.route = Some(value),
            "sub" => filter.sub = Some(value),
            "ip" => filter.ip = Some(parse_net(&value)?),
            // Any whole number, however many digits: past 1,000 it counts as 1,000.
            "limit" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                limit = value
                    .parse::<usize>()
                    .map_or(MAX_LIMIT, |n| n.min(MAX_LIMIT));
            }
            "limit" => return Err(bad("limit must be a whole number")),
            other => {
                return Err(bad(format!(
                    "unknown query parameter {other:?} (route, sub, ip and limit are known)"
                )))
            }
        }
    }
    let mut found = registry.matching(&filter);
    let total = found.len();
    found.sort_unstable_by_key(|e| std::cmp::Reverse(e.id));
    let connections: Vec<serde_json::Value> =
        found.iter().take(limit).map(|e| e.listing()).collect();
    Ok(serde_json::json!({ "total": total, "connections": connections }))
}

fn list_revocations(revocations: &Revocations) -> serde_json::Value {
    let listed: Vec<serde_json::Value> = revocations
        .list()
        .into_iter()
        .map(|(which, expires_at_unix)| {
            let (key, value) = which.parts();
            let mut entry = serde_json::Map::new();
            entry.insert(key.to_owned(), value.into());
            entry.insert("expires_at_unix".to_owned(), expires_at_unix.into());
            serde_json::Value::Object(entry)
        })
        .collect();
    serde_json::json!({ "total": listed.len(), "revocations": listed })
}

/// A query value form-decoded (`%XX`, `+` as a space); `None` if not UTF-8 afterwards.
fn percent_decode(s: &str) -> Option<String> {
    let raw = s.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let hex = |b: Option<&u8>| b.and_then(|b| char::from(*b).to_digit(16));
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(raw.get(i + 1)), hex(raw.get(i + 2))) {
                (Some(h), Some(l)) => {
                    out.push(u8::try_from(h * 16 + l).ok()?);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The operator's bearer token, read from its file and read again whenever the file's
/// identity, size or modification time changes (checked on each request: one `stat`).
pub struct AdminToken {
    path: PathBuf,
    current: Mutex<Option<Cached>>,
}

#[derive(Clone)]
struct Cached {
    stamp: Stamp,
    token: Arc<[u8]>,
}

/// An admin token shorter than this is warned about at start-up (the operator API can close
/// every connection and revoke tokens).
const SHORT_TOKEN: usize = 16;

/// What tells a changed file: device, inode, size, modification time.
#[derive(Clone, PartialEq, Eq)]
struct Stamp(u64, u64, u64, Option<SystemTime>);

/// Why the token file cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no token")]
    Empty { path: PathBuf },
}

impl AdminToken {
    /// Whether the token file can serve (read, and not empty), without keeping it: the
    /// start's check before the gate loads it, which warns about a short token once.
    pub fn check(path: &Path) -> Result<(), TokenFileError> {
        read_token(path).map(drop)
    }

    /// Read the token file once now, so that a missing or empty file is a start-up error.
    pub fn load(path: PathBuf) -> Result<AdminToken, TokenFileError> {
        let cached = read_token(&path)?;
        if cached.token.len() < SHORT_TOKEN {
            tracing::warn!(
                path = %path.display(), bytes = cached.token.len(),
                "the admin token is short: anyone who can reach the admin listener can guess it; use at least 32 random bytes (openssl rand -hex 32)"
            );
        }
        Ok(AdminToken {
            path,
            current: Mutex::new(Some(cached)),
        })
    }

    /// The token in force: re-read if the file changed. A file that was emptied, removed
    /// or cannot be read holds no token, and none is accepted until it holds one again:
    /// emptying or removing it is how an operator takes a leaked token back, so the last
    /// token it held is not kept, as a bad policy edit keeps the last good policy.
    async fn current(&self) -> Option<Arc<[u8]>> {
        let path = self.path.clone();
        let stamp = tokio::task::spawn_blocking(move || stamp(&path)).await.ok();
        let known = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let fresh = match (&known, stamp.and_then(Result::ok)) {
            (Some(k), Some(s)) if k.stamp == s => return Some(k.token.clone()),
            _ => {
                let path = self.path.clone();
                tokio::task::spawn_blocking(move || read_token(&path)).await
            }
        };
        match fresh {
            Ok(Ok(cached)) => {
                let token = cached.token.clone();
                *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(cached);
                if known.is_some() {
                    tracing::info!(path = %self.path.display(), "admin token file re-read");
                }
                Some(token)
            }
            Ok(Err(e)) => {
                let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
                if current.take().is_some() {
                    tracing::warn!(error = %e, "admin token file unusable; the operator API refuses every token until it holds one");
                }
                None
            }
            Err(_) => None,
        }
    }

    /// Whether `authorization` is `Bearer <the token>`.
    async fn allows(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(presented) = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().as_bytes().to_vec())
        else {
            return false;
        };
        let Some(expected) = self.current().await else {
            return false;
        };
        // Digests first, so that not even the token's length shows in the time taken.
        let digest = |bytes: &[u8]| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
        let (presented, expected) = (digest(&presented), digest(&expected));
        aws_lc_rs::constant_time::verify_slices_are_equal(presented.as_ref(), expected.as_ref())
            .is_ok()
    }
}

fn stamp(path: &std::path::Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(Stamp(m.dev(), m.ino(), m.len(), m.modified().ok()))
}

/// The file's contents without surrounding whitespace (a trailing newline is usual).
fn read_token(path: &std::path::Path) -> Result<Cached, TokenFileError> {
    let read = |source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    };
    // Stamped before reading: a write between the two is seen as a change next time.
    let stamp = stamp(path).map_err(read)?;
    let bytes = std::fs::read(path).map_err(read)?;
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(Cached {
        stamp,
        token: Arc::from(token),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_form_decoded() {
        assert_eq!(percent_decode("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(
            percent_decode("10.0.0.0%2F8").as_deref(),
            Some("10.0.0.0/8")
        );
        assert_eq!(percent_decode("%zz%").as_deref(), Some("%zz%"));
        assert_eq!(percent_decode("%ff"), None);
    }

    #[test]
    fn networks() {
        assert!(parse_net("10.0.0.0/8").is_ok());
        assert!(parse_net("::1").is_ok());
        assert!(parse_net("nope").is_err());
    }

    #[tokio::test]
    async fn the_token_file_is_re_read_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let token = AdminToken::load(path.clone()).unwrap();
        let bearer = |t: &str| HeaderValue::from_str(&format!("Bearer {t}")).unwrap();
        assert!(token.allows(Some(&bearer("first"))).await);
        assert!(!token.allows(Some(&bearer("firs"))).await);
        assert!(!token.allows(None).await);
        // Replaced the way a Secret or an editor does: a new file renamed over it.
        let tmp = dir.path().join("token.tmp");
        std::fs::write(&tmp, "second").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(token.allows(Some(&bearer("second"))).await);
        assert!(!token.allows(Some(&bearer("first"))).await);
        // Emptied, or removed: no token is accepted until the file holds one again.
        std::fs::write(&path, "").unwrap();
        assert!(!token.allows(Some(&bearer("second"))).await);
        assert!(AdminToken::load(path.clone()).is_err());
        std::fs::write(&path, "third").unwrap();
        assert!(token.allows(Some(&bearer("third"))).await);
        std::fs::remove_file(&path).unwrap();
        assert!(!token.allows(Some(&bearer("third"))).await);
    }
}
