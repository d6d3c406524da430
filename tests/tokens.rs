//! Tokens end to end through the real gate over TLS (docs/policy.md `auth`, docs/admission.md): where a token
//! may come from and what of it reaches the upstream, every key kind (HMAC, RSA, EC,
//! Ed25519, JWKS file, JWKS URL with rotation), the classic JWT attacks, the registered
//! claims, `require_claims` and `forward_claims`.
//!
//! Tokens are minted with jsonwebtoken from the committed test keys in `tests/keys/`. The
//! JWKS URL tests run a real HTTPS key server on 127.0.0.1:0 with a certificate from
//! `jwks_pki()`, which every test gate trusts.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::SinkExt;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyOperations};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::*;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::handshake::client::Request as WsRequest;

// ---------------------------------------------------------------------------------------
// Keys, tokens, policies

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");
const INVALID_TOKEN_CHALLENGE: &str = "Bearer error=\"invalid_token\"";

/// Absolute path of a committed test key.
fn key_path(name: &str) -> String {
    format!("{MANIFEST}/tests/keys/{name}")
}

fn read_key(name: &str) -> Vec<u8> {
    std::fs::read(key_path(name)).unwrap_or_else(|e| panic!("test key {name}: {e}"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `{"sub": "alice", "exp": now + 300}` with `extra` merged over it (a `null` removes).
fn claims(extra: Value) -> Value {
    let mut map = json!({"sub": "alice", "exp": now() + 300});
    let target = map.as_object_mut().unwrap();
    for (k, v) in extra.as_object().expect("extra claims are an object") {
        if v.is_null() {
            target.remove(k);
        } else {
            target.insert(k.clone(), v.clone());
        }
    }
    map
}

fn encoding_key(alg: Algorithm, key_file: &str) -> EncodingKey {
    let pem = read_key(key_file);
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).unwrap(),
        other => panic!("no key file for {other:?}"),
    }
}

/// An HS256 token signed with the gate's `secret` file.
fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A token signed with a committed private key, with an optional `kid`.
fn signed(alg: Algorithm, key_file: &str, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &encoding_key(alg, key_file)).unwrap()
}

/// An ES256 token signed by `tests/keys/<key_file>`.
fn es256(key_file: &str, kid: Option<&str>) -> String {
    signed(Algorithm::ES256, key_file, kid, &claims(json!({})))
}

/// Unpadded base64url, for hand-made tokens (no base64 crate among the dependencies).
fn b64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A JWKS document holding the public halves of EC P-256 keys, each with its `kid`.
fn ec_jwks(keys: &[(&str, &str)]) -> String {
    let set = JwkSet {
        keys: keys
            .iter()
            .map(|(key_file, kid)| {
                let ek = encoding_key(Algorithm::ES256, key_file);
                let mut jwk = Jwk::from_encoding_key(&ek, Algorithm::ES256).unwrap();
                jwk.common.key_id = Some((*kid).to_owned());
                jwk
            })
            .collect(),
    };
    serde_json::to_string(&set).unwrap()
}

/// One `/ws` route in front of `upstream` with `auth` (a YAML flow mapping) in defaults;
/// no Origin needed and an upgrade rate no test comes near.
fn auth_policy(upstream: &str, auth: &str) -> String {
    format!(
        "version: 1\n\
         defaults:\n  \
           upstream: {upstream}\n  \
           origin: {{allow_missing: true}}\n  \
           rate: {{upgrades_per_second: 1000, burst: 1000}}\n  \
           auth: {auth}\n\
         routes:\n  \
           - path: /ws\n"
    )
}

/// HS256 with the `secret` file TestGate writes beside the policy, plus `extra` auth fields.
fn hmac_auth(extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { ", " };
    format!("{{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]{sep}{extra}}}")
}

async fn hmac_gate(upstream: &Upstream, extra: &str) -> TestGate {
    TestGate::start(&auth_policy(&upstream.url(), &hmac_auth(extra))).await
}

// ---------------------------------------------------------------------------------------
// Requests and verdicts

fn bearer(gate: &TestGate, path: &str, token: &str) -> WsRequest {
    let mut req = gate.request(path);
    req.headers_mut()
        .insert("authorization", header_value(&format!("Bearer {token}")));
    req
}

/// The upgrade with `token` in `Authorization` is accepted.
async fn admitted(gate: &TestGate, token: &str) -> Client {
    match gate.connect_request(bearer(gate, "/ws", token)).await {
        Ok((client, response)) => {
            assert_eq!(response.status(), 101);
            client
        }
        Err(tungstenite::Error::Http(r)) => panic!(
            "expected 101, got {} {:?}",
            r.status(),
            r.body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
        ),
        Err(e) => panic!("expected 101, got {e}"),
    }
}

/// The upgrade is refused with `status` and JSON `error` `reason`; returns the headers.
async fn refused_request(gate: &TestGate, req: WsRequest, status: u16, reason: &str) -> HeaderMap {
    let (got_status, headers, body) = refusal(gate.connect_request(req).await);
    assert_eq!(
        (got_status, body["error"].as_str()),
        (status, Some(reason)),
        "body: {body}"
    );
    assert!(body["message"].is_string(), "body: {body}");
    headers
}

async fn refused(gate: &TestGate, token: &str, status: u16, reason: &str) -> HeaderMap {
    refused_request(gate, bearer(gate, "/ws", token), status, reason).await
}

/// 401 `invalid_token` with `WWW-Authenticate: Bearer error="invalid_token"`.
async fn invalid(gate: &TestGate, token: &str) {
    let headers = refused(gate, token, 401, "invalid_token").await;
    assert_eq!(
        headers.get("www-authenticate").unwrap(),
        INVALID_TOKEN_CHALLENGE
    );
}

/// Retry the upgrade while the gate answers 503 (key set not fetched yet), up to 5 s.
async fn admitted_once_keys_fetched(gate: &TestGate, token: &str) -> Client {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match gate.connect_request(bearer(gate, "/ws", token)).await {
            Ok((client, response)) => {
                assert_eq!(response.status(), 101);
                return client;
            }
            Err(tungstenite::Error::Http(r))
                if r.status() == 503 && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(tungstenite::Error::Http(r)) => panic!(
                "expected 101 once the key set is fetched, got {} {:?}",
                r.status(),
                r.body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
            ),
            Err(e) => panic!("expected 101, got {e}"),
        }
    }
}

/// A gate on `/ws` whose ES256 keys come from `server`, refreshed every second.
async fn refreshing_gate(upstream: &Upstream, server: &KeyServer) -> TestGate {
    let policy = auth_policy(
        &upstream.url(),
        &format!(
            "{{algorithms: [ES256], keys: [{{jwks_url: \"{}\", refresh_seconds: 1}}]}}",
            server.url()
        ),
    );
    TestGate::start(&policy).await
}

/// Retry the upgrade while the gate answers 401 (a refresh has not brought the token's
/// key in yet), up to 5 s.
async fn admitted_once_refreshed(gate: &TestGate, token: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match gate.connect_request(bearer(gate, "/ws", token)).await {
            Ok((_, response)) => {
                assert_eq!(response.status(), 101);
                return;
            }
            Err(tungstenite::Error::Http(r))
                if r.status() == 401 && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the refreshed key set was not used: {e}"),
        }
    }
}

fn header_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------
// A real HTTPS key server (and request counter)

/// Serves `body` at `/jwks.json` over TLS (certificate from `jwks_pki()`); counts TCP
/// connections and HTTP requests, whatever their path.
struct KeyServer {
    port: u16,
    body: Arc<Mutex<String>>,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl KeyServer {
    async fn start(body: String) -> KeyServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = Arc::new(Mutex::new(body));
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(jwks_pki().server_config()));
        let (b, c, r) = (body.clone(), connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (acceptor, b, r) = (acceptor.clone(), b.clone(), r.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: Request<Incoming>| {
                        r.fetch_add(1, Ordering::SeqCst);
                        let response = if req.uri().path() == "/jwks.json" {
                            let text = b.lock().unwrap().clone();
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(text)))
                        } else {
                            Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::new()))
                        };
                        async move { Ok::<_, Infallible>(response.unwrap()) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        KeyServer {
            port,
            body,
            connections,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/jwks.json", self.port)
    }

    fn serve(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn jwks_url_policy(upstream: &Upstream, url: &str) -> String {
    auth_policy(
        &upstream.url(),
        &format!("{{algorithms: [ES256], keys: [{{jwks_url: \"{url}\", refresh_seconds: 300}}]}}"),
    )
}

// ---------------------------------------------------------------------------------------
// 1. Token sources, and what of the token reaches the upstream

#[tokio::test]
async fn bearer_header_is_accepted_and_not_forwarded() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let token = hs256(&claims(json!({})));
    let mut req = bearer(&gate, "/ws?x=1", &token);
    req.headers_mut().insert("x-other", header_value("kept"));
    let (_client, response) = gate.connect_request(req).await.unwrap();
    assert_eq!(response.status(), 101);
    let seen = upstream.last_seen();
    assert!(
        seen.headers.get("authorization").is_none(),
        "the Authorization header carrying the token went upstream: {:?}",
        seen.headers
    );
    assert_eq!(seen.headers.get("x-other").unwrap(), "kept");
    assert_eq!(seen.target, "/ws?x=1");
}

#[tokio::test]
async fn query_token_is_accepted_and_removed_from_the_target() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let token = hs256(&claims(json!({})));
    let path = format!("/ws/room?a=1&access_token={token}&b=two");
    let (_client, response) = gate.connect(&path).await.unwrap();
    assert_eq!(response.status(), 101);
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/ws/room?a=1&b=two");
    assert!(!format!("{:?}", seen.headers).contains(&token));
}

#[tokio::test]
async fn query_token_alone_leaves_no_empty_query() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let token = hs256(&claims(json!({})));
    let (_client, response) = gate
        .connect(&format!("/ws?access_token={token}"))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(upstream.last_seen().target, "/ws");
}

#[tokio::test]
async fn escaped_token_parameter_names_are_removed_beside_a_header_token() {
    // The upstream's query parser reads access%5Ftoken as access_token.
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let token = hs256(&claims(json!({})));
    let path = "/ws?access%5Ftoken=second-copy&a=1&access%5ftoken=third&%61ccess_token=4th";
    let (_client, response) = gate
        .connect_request(bearer(&gate, path, &token))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(upstream.last_seen().target, "/ws?a=1");
}

#[tokio::test]
async fn escaped_token_parameter_names_carry_the_token() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let token = hs256(&claims(json!({})));
    for name in ["access%5Ftoken", "access%5ftoken"] {
        let (_client, response) = gate
            .connect(&format!("/ws?{name}={token}&b=2"))
            .await
            .unwrap_or_else(|e| panic!("?{name}=<token>: {e}"));
        assert_eq!(response.status(), 101);
        assert_eq!(upstream.last_seen().target, "/ws?b=2");
    }
}

#[tokio::test]
async fn a_percent_encoded_query_token_is_not_decoded() {
    // A JWT is base64url and dots: it never needs escaping, and an escaped one is refused.
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let escaped = hs256(&claims(json!({}))).replace('.', "%2E");
    let (status, _, body) = refusal(gate.connect(&format!("/ws?access_token={escaped}")).await);
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
    assert_eq!(upstream.seen_count(), 0);
}

#[tokio::test]
async fn cookie_token_is_accepted_and_only_that_cookie_is_removed() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let token = hs256(&claims(json!({})));
    let mut req = gate.request("/ws");
    req.headers_mut().insert(
        "cookie",
        header_value(&format!("theme=dark; access_token={token}; lang=en")),
    );
    let (_client, response) = gate.connect_request(req).await.unwrap();
    assert_eq!(response.status(), 101);
    let seen = upstream.last_seen();
    let cookies = header_values(&seen.headers, "cookie").join("; ");
    assert!(
        !cookies.contains("access_token"),
        "cookies upstream: {cookies}"
    );
    assert!(!cookies.contains(&token), "cookies upstream: {cookies}");
    assert!(
        cookies.contains("theme=dark"),
        "cookies upstream: {cookies}"
    );
    assert!(cookies.contains("lang=en"), "cookies upstream: {cookies}");
}

/// Browsers send a cookie's UTF-8 value unencoded (`document.cookie = "pref=café"`): such
/// a byte elsewhere in the header neither hides the token cookie nor keeps it going
/// upstream, and the other cookies go on byte for byte.
#[tokio::test]
async fn a_cookie_header_with_utf8_values_still_yields_and_loses_its_token() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let token = hs256(&claims(json!({})));
    let mut req = gate.request("/ws");
    let cookie = format!("pref=caf\u{e9}; access_token={token}; lang=en");
    req.headers_mut().insert(
        "cookie",
        http::HeaderValue::from_bytes(cookie.as_bytes()).unwrap(),
    );
    let (_client, response) = gate.connect_request(req).await.unwrap();
    assert_eq!(response.status(), 101);
    let seen = upstream.last_seen();
    let cookies: Vec<String> = seen
        .headers
        .get_all("cookie")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let cookies = cookies.join("; ");
    assert!(!cookies.contains(&token), "cookies upstream: {cookies}");
    assert!(
        !cookies.contains("access_token"),
        "cookies upstream: {cookies}"
    );
    assert!(
        cookies.contains("pref=caf\u{e9}"),
        "cookies upstream: {cookies}"
    );
    assert!(cookies.contains("lang=en"), "cookies upstream: {cookies}");
}

#[tokio::test]
async fn subprotocol_token_is_accepted_and_the_real_subprotocol_negotiated() {
    let upstream = Upstream::start_with(UpstreamOptions {
        protocol: Some("chat.v1"),
        ..Default::default()
    })
    .await;
    let gate = hmac_gate(&upstream, "").await;
    let token = hs256(&claims(json!({})));
    let mut req = gate.request("/ws");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        header_value(&format!("bearer.{token}, chat.v1")),
    );
    let (_client, response) = gate.connect_request(req).await.unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "chat.v1"
    );
    let seen = upstream.last_seen();
    assert_eq!(
        header_values(&seen.headers, "sec-websocket-protocol"),
        vec!["chat.v1".to_owned()]
    );
}

/// A browser's `new WebSocket(url, ['bearer.' + token])` in front of an upstream that
/// selects no subprotocol: the 101 selects the token entry, since a client whose offer got
/// no answer fails the handshake (tungstenite does, as browsers do). The upstream never
/// sees the entry.
#[tokio::test]
async fn the_token_entry_is_selected_when_the_upstream_selects_nothing() {
    let (entry, seen) = token_entry_only_offer("").await;
    assert!(
        header_values(&seen.headers, "sec-websocket-protocol").is_empty(),
        "{entry}"
    );
}

/// Offer only a `bearer.` token entry, on a route with `auth_extra`, to an upstream that
/// selects nothing: the handshake completes with the entry selected and the socket
/// echoes. Returns the entry and what the upstream saw.
async fn token_entry_only_offer(auth_extra: &str) -> (String, Seen) {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, auth_extra).await;
    let token = hs256(&claims(json!({})));
    let entry = format!("bearer.{token}");
    let mut req = gate.request("/ws");
    req.headers_mut()
        .insert("sec-websocket-protocol", header_value(&entry));
    let (mut client, response) = gate
        .connect_request(req)
        .await
        .expect("the handshake must complete");
    assert_eq!(response.headers()["sec-websocket-protocol"], entry.as_str());
    client.send(tungstenite::Message::text("hi")).await.unwrap();
    assert_eq!(
        next_message(&mut client).await,
        tungstenite::Message::text("hi")
    );
    (entry, upstream.last_seen())
}

/// The same with `forward_token: true`: the upstream is offered the entry and selects
/// nothing, and the 101 still answers the client's offer with it (Node `ws` and browsers
/// fail a handshake whose offer got no answer).
#[tokio::test]
async fn the_token_entry_is_selected_when_a_forwarding_route_s_upstream_selects_nothing() {
    let (entry, seen) = token_entry_only_offer("forward_token: true").await;
    assert_eq!(
        header_values(&seen.headers, "sec-websocket-protocol"),
        vec![entry]
    );
}

// ---------------------------------------------------------------------------------------
// 2. No token

#[tokio::test]
async fn missing_token_is_401_with_a_bare_bearer_challenge() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let (status, headers, body) = refusal(gate.connect("/ws").await);
    assert_eq!(status, 401);
    assert_eq!(body["error"], "missing_token", "body: {body}");
    assert_eq!(
        header_values(&headers, "www-authenticate"),
        vec!["Bearer".to_owned()]
    );
    assert_eq!(upstream.seen_count(), 0);
}

#[tokio::test]
async fn non_bearer_authorization_is_a_missing_token() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let mut req = gate.request("/ws");
    req.headers_mut()
        .insert("authorization", header_value("Basic YWxpY2U6c2VjcmV0"));
    let headers = refused_request(&gate, req, 401, "missing_token").await;
    assert_eq!(headers.get("www-authenticate").unwrap(), "Bearer");
}

/// A query parameter is read at its first copy, also when that copy is empty or bare
/// (`?access_token`, which URL parsers read as an empty value): a later copy is not tried.
#[tokio::test]
async fn an_empty_or_bare_first_query_copy_is_a_missing_token() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let token = hs256(&claims(json!({})));
    for query in [
        format!("access_token=&access_token={token}"),
        format!("access_token&access_token={token}"),
        format!("x=1;access_token&access_token={token}"),
    ] {
        let req = gate.request(&format!("/ws?{query}"));
        refused_request(&gate, req, 401, "missing_token").await;
    }
    assert_eq!(upstream.seen_count(), 0);
    // A bare parameter of another name is no copy of the token's.
    let (_, response) = gate
        .connect(&format!("/ws?x&access_token={token}"))
        .await
        .expect("a token after a bare parameter of another name is read");
    assert_eq!(response.status(), 101);
}

// ---------------------------------------------------------------------------------------
// 3. Every key kind

#[tokio::test]
async fn hs256_with_secret_file_is_accepted() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    admitted(&gate, &hs256(&claims(json!({})))).await;
    // The same claims signed with another secret are not.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(b"another-secret-another-secret-0123456789"),
    )
    .unwrap();
    invalid(&gate, &forged).await;
}

#[tokio::test]
async fn rs256_with_public_key_file_is_accepted() {
    let upstream = Upstream::start().await;
    let auth = format!(
        "{{algorithms: [RS256], keys: [{{public_key_file: \"{}\"}}]}}",
        key_path("rsa.pub.pem")
    );
    let gate = TestGate::start(&auth_policy(&upstream.url(), &auth)).await;
    let token = signed(Algorithm::RS256, "rsa.key", None, &claims(json!({})));
    admitted(&gate, &token).await;
}

#[tokio::test]
async fn es256_with_public_key_file_is_accepted_and_another_ec_key_is_not() {
    let upstream = Upstream::start().await;
    let auth = format!(
        "{{algorithms: [ES256], keys: [{{public_key_file: \"{}\"}}]}}",
        key_path("ec.pub.pem")
    );
    let gate = TestGate::start(&auth_policy(&upstream.url(), &auth)).await;
    admitted(&gate, &es256("ec.key", None)).await;
    invalid(&gate, &es256("ec2.key", None)).await;
}

#[tokio::test]
async fn eddsa_ed25519_with_public_key_file_is_accepted() {
    let upstream = Upstream::start().await;
    let auth = format!(
        "{{algorithms: [EdDSA], keys: [{{public_key_file: \"{}\"}}]}}",
        key_path("ed.pub.pem")
    );
    let gate = TestGate::start(&auth_policy(&upstream.url(), &auth)).await;
    let token = signed(Algorithm::EdDSA, "ed.key", None, &claims(json!({})));
    admitted(&gate, &token).await;
}

// ---------------------------------------------------------------------------------------
// 4. JWKS file

#[tokio::test]
async fn jwks_file_keys_are_chosen_by_kid() {
    let upstream = Upstream::start().await;
    let keys_dir = tempfile::tempdir().unwrap();
    let jwks = keys_dir.path().join("jwks.json");
    std::fs::write(&jwks, ec_jwks(&[("ec.key", "k1")])).unwrap();
    let auth = format!(
        "{{algorithms: [ES256], keys: [{{jwks_file: \"{}\"}}]}}",
        jwks.display()
    );
    let gate = TestGate::start(&auth_policy(&upstream.url(), &auth)).await;
    admitted(&gate, &es256("ec.key", Some("k1"))).await;
    // A kid naming no configured key.
    invalid(&gate, &es256("ec.key", Some("nope"))).await;
    // The right kid, the wrong key.
    invalid(&gate, &es256("ec2.key", Some("k1"))).await;
}

/// A published key meant for encryption (`"use": "enc"`, as Keycloak publishes its
/// `RSA-OAEP` key, or `key_ops` without `verify`) or whose `alg` is not a signature
/// algorithm verifies no token.
#[tokio::test]
async fn jwks_keys_for_encryption_verify_nothing() {
    let upstream = Upstream::start().await;
    let keys_dir = tempfile::tempdir().unwrap();
    let jwk = |key_file: &str, kid: &str| {
        let ek = encoding_key(Algorithm::ES256, key_file);
        let mut jwk = Jwk::from_encoding_key(&ek, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        jwk
    };
    let mut enc = jwk("ec.key", "enc");
    enc.common.key_algorithm = None;
    enc.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Encryption);
    let mut oaep = jwk("ec2.key", "oaep");
    oaep.common.key_algorithm = Some(jsonwebtoken::jwk::KeyAlgorithm::RSA_OAEP);
    let mut wraps = jwk("ec.key", "wraps");
    wraps.common.key_operations = Some(vec![KeyOperations::Encrypt, KeyOperations::WrapKey]);
    let mut verifies = jwk("ec2.key", "verifies");
    verifies.common.key_operations = Some(vec![KeyOperations::Sign, KeyOperations::Verify]);
    let set = JwkSet {
        keys: vec![jwk("ec.key", "sig"), enc, oaep, wraps, verifies],
    };
    let jwks = keys_dir.path().join("jwks.json");
    std::fs::write(&jwks, serde_json::to_string(&set).unwrap()).unwrap();
    let auth = format!(
        "{{algorithms: [ES256], keys: [{{jwks_file: \"{}\"}}]}}",
        jwks.display()
    );
    let gate = TestGate::start(&auth_policy(&upstream.url(), &auth)).await;
    admitted(&gate, &es256("ec.key", Some("sig"))).await;
    invalid(&gate, &es256("ec.key", Some("enc"))).await;
    invalid(&gate, &es256("ec2.key", Some("oaep"))).await;
    invalid(&gate, &es256("ec.key", Some("wraps"))).await;
    admitted(&gate, &es256("ec2.key", Some("verifies"))).await;
}

/// A key set that also publishes members the gate cannot read as keys (a `kty` or `crv`
/// it does not know, a required member missing, an RSA modulus that is not base64url,
/// a member that is not an object) still loads, from a file and from a URL: those members
/// are ignored (RFC 7517 §5), with a warning from `wsgate check` naming each one.
#[tokio::test]
async fn jwks_members_the_gate_cannot_read_are_ignored_not_fatal() {
    let sig = serde_json::to_value(
        serde_json::from_str::<JwkSet>(&ec_jwks(&[("ec.key", "sig")]))
            .unwrap()
            .keys[0]
            .clone(),
    )
    .unwrap();
    let set = json!({"keys": [
        {"kty": "AKP", "kid": "pq", "alg": "ML-DSA-65", "pub": "AAAA"},
        {"kty": "EC", "kid": "k1", "crv": "secp256k1", "x": "AAAA", "y": "AAAA"},
        {"kty": "OKP", "kid": "xdh", "crv": "X25519", "x": "AAAA"},
        {"kty": "RSA", "kid": "no-e", "n": "AQAB"},
        {"kty": "RSA", "kid": "bad-n", "n": "not base64!", "e": "AQAB"},
        "not a key",
        sig,
    ]})
    .to_string();
    let upstream = Upstream::start().await;
    let keys_dir = tempfile::tempdir().unwrap();
    let jwks = keys_dir.path().join("jwks.json");
    std::fs::write(&jwks, &set).unwrap();
    let policy = auth_policy(
        &upstream.url(),
        &format!(
            "{{algorithms: [ES256], keys: [{{jwks_file: \"{}\"}}]}}",
            jwks.display()
        ),
    );

    let (code, stderr) = check(keys_dir.path(), &policy);
    assert_eq!(code, Some(0), "{stderr}");
    for kid in [
        "\"pq\"",
        "\"k1\"",
        "\"xdh\"",
        "\"no-e\"",
        "\"bad-n\"",
        "none",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("warning: key (kid ") && l.contains(&format!("kid {kid}"))),
            "no warning for kid {kid}: {stderr}"
        );
    }

    let gate = TestGate::start(&policy).await;
    admitted(&gate, &es256("ec.key", Some("sig"))).await;
    invalid(&gate, &es256("ec2.key", Some("sig"))).await;

    let server = KeyServer::start(set).await;
    let gate = TestGate::start(&jwks_url_policy(&upstream, &server.url())).await;
    admitted_once_keys_fetched(&gate, &es256("ec.key", Some("sig"))).await;
}

/// A JWKS key that names its `alg` verifies only that algorithm: one pinned to PS256 on a
/// route that lists only RS256 is never used, and `wsgate check` says so, as it does for a
/// key of a family no algorithm names; with PS256 listed, it is used and nothing is said.
#[tokio::test]
async fn check_warns_about_a_jwks_key_pinned_to_an_algorithm_not_listed() {
    let ek = encoding_key(Algorithm::PS256, "rsa.key");
    let mut jwk = Jwk::from_encoding_key(&ek, Algorithm::PS256).unwrap();
    jwk.common.key_id = Some("pin".to_owned());
    let keys_dir = tempfile::tempdir().unwrap();
    let jwks = keys_dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap(),
    )
    .unwrap();
    let policy = |algorithms: &str| {
        auth_policy(
            "ws://127.0.0.1:9",
            &format!(
                "{{algorithms: [{algorithms}], keys: [{{jwks_file: \"{}\"}}]}}",
                jwks.display()
            ),
        )
    };

    let (code, stderr) = check(keys_dir.path(), &policy("RS256"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(
            "defaults.auth.keys[0].jwks_file: warning: a key whose alg is PS256, which is not in \
             defaults.auth.algorithms (for routes[0]): the key is never used"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("every token on routes[0] is refused"),
        "{stderr}"
    );

    let (code, stderr) = check(keys_dir.path(), &policy("RS256, PS256"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// `wsgate check` on `policy`, written into `dir`: its exit code and stderr.
fn check(dir: &std::path::Path, policy: &str) -> (Option<i32>, String) {
    let policy_file = dir.join("policy.yaml");
    std::fs::write(&policy_file, policy).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .arg("check")
        .arg(&policy_file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------
// 5. JWKS URL

#[tokio::test]
async fn jwks_url_keys_are_used_once_fetched() {
    let upstream = Upstream::start().await;
    let server = KeyServer::start(ec_jwks(&[("ec.key", "a")])).await;
    let gate = TestGate::start(&jwks_url_policy(&upstream, &server.url())).await;
    admitted_once_keys_fetched(&gate, &es256("ec.key", Some("a"))).await;
    assert!(server.requests() >= 1);
    // A known kid with the wrong signature is a forgery, not a rotation: no refetch.
    let fetched = server.requests();
    for _ in 0..3 {
        invalid(&gate, &es256("ec2.key", Some("a"))).await;
    }
    assert_eq!(server.requests(), fetched, "refetched for a kid it has");
}

/// A rotation is found by refetching on an unknown kid, also right after a token signed with
/// a key not published yet; refetches are budgeted per URL (4 in 30 s), after which an
/// unknown kid is `invalid_token` without a fetch.
#[tokio::test]
async fn jwks_url_rotation_refetches_for_unknown_kids_within_a_budget() {
    let upstream = Upstream::start().await;
    let server = KeyServer::start(ec_jwks(&[("ec.key", "a")])).await;
    let gate = TestGate::start(&jwks_url_policy(&upstream, &server.url())).await;
    // Wait for the first fetch with a kid-less token: it can only get 503 before the set
    // is there, and cannot spend an unknown-kid refetch.
    admitted_once_keys_fetched(&gate, &es256("ec.key", None)).await;
    admitted(&gate, &es256("ec.key", Some("a"))).await;
    let fetched = server.requests();
    assert_eq!(fetched, 1, "one fetch at start-up, refresh_seconds is 300");

    // The issuer rotates to ec2 under kid "b": the unknown kid triggers one refetch.
    server.serve(ec_jwks(&[("ec2.key", "b")]));
    admitted(&gate, &es256("ec2.key", Some("b"))).await;
    assert_eq!(server.requests(), fetched + 1, "one refetch for kid b");

    // A token under kid "c" before the issuer publishes it: a refetch, invalid_token; once
    // published, the next one is admitted after another refetch.
    invalid(&gate, &es256("ec.key", Some("c"))).await;
    assert_eq!(server.requests(), fetched + 2, "one refetch for kid c");
    server.serve(ec_jwks(&[("ec2.key", "b"), ("ec.key", "c")]));
    admitted(&gate, &es256("ec.key", Some("c"))).await;
    assert_eq!(server.requests(), fetched + 3, "one more refetch for kid c");

    // The fourth refetch in 30 s is the budget's last.
    invalid(&gate, &es256("ec.key", Some("d"))).await;
    assert_eq!(server.requests(), fetched + 4, "one refetch for kid d");
    server.serve(ec_jwks(&[("ec.key", "e")]));
    invalid(&gate, &es256("ec.key", Some("e"))).await;
    assert_eq!(
        server.requests(),
        fetched + 4,
        "no fifth refetch within 30 s"
    );
    // The old key is gone with the rotation.
    invalid(&gate, &es256("ec.key", Some("a"))).await;
}

/// A refetch for an unknown kid that succeeds while fetches are failing ends the failure's
/// retries: the next fetch is `refresh_seconds` after it.
#[tokio::test]
async fn a_refetch_that_succeeds_ends_the_failure_retries() {
    let upstream = Upstream::start().await;
    let server = KeyServer::start("not a key set".into()).await;
    let gate = TestGate::start(&jwks_url_policy(&upstream, &server.url())).await;
    // The first fetch fails, and its retry 1 s later; the next retry is due 2 s after that.
    let started = Instant::now();
    while server.requests() < 2 {
        assert!(started.elapsed() < Duration::from_secs(5), "no retry");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.serve(ec_jwks(&[("ec.key", "a")]));
    admitted(&gate, &es256("ec.key", Some("a"))).await;
    assert_eq!(server.requests(), 3, "one refetch for kid a");
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(
        server.requests(),
        3,
        "a failure's retry after the refetch that succeeded"
    );
}

#[tokio::test]
async fn jwks_url_never_fetched_is_503_keys_unavailable() {
    let upstream = Upstream::start().await;
    let down = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = down.local_addr().unwrap().port();
    drop(down);
    let url = format!("https://localhost:{port}/jwks.json");
    // The gate starts all the same.
    let gate = TestGate::start(&jwks_url_policy(&upstream, &url)).await;
    assert_eq!(admin_get(gate.admin, "/readyz").await, 200);
    for token in [es256("ec.key", Some("a")), es256("ec.key", None)] {
        let headers = refused(&gate, &token, 503, "keys_unavailable").await;
        let retry: u64 = headers
            .get("retry-after")
            .expect("Retry-After")
            .to_str()
            .unwrap()
            .parse()
            .expect("Retry-After in seconds");
        assert!(retry >= 1, "Retry-After: {retry}");
    }
    assert_eq!(upstream.seen_count(), 0);
}

/// Beside a `jwks_url` never fetched, an HS256 token that the route's secret does not
/// verify is 401 `invalid_token`, not 503: a key set never holds an HMAC secret, so the
/// fetch could not change the answer, and a forger is not told to retry.
#[tokio::test]
async fn an_hmac_token_is_judged_without_waiting_for_a_key_set() {
    let upstream = Upstream::start().await;
    let down = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = down.local_addr().unwrap().port();
    drop(down);
    let url = format!("https://localhost:{port}/jwks.json");
    let auth = format!(
        "{{algorithms: [ES256, HS256], keys: [{{jwks_url: \"{url}\"}}, {{hmac_secret_file: secret}}]}}"
    );
    let gate = TestGate::start(&auth_policy(&upstream.url(), &auth)).await;
    admitted(&gate, &hs256(&claims(json!({})))).await;
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(&[b'x'; 40]),
    )
    .unwrap();
    invalid(&gate, &forged).await;
    refused(&gate, &es256("ec.key", None), 503, "keys_unavailable").await;
}

// ---------------------------------------------------------------------------------------
// 6. Attacks

#[tokio::test]
async fn alg_none_is_invalid() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let payload = serde_json::to_vec(&claims(json!({}))).unwrap();
    for alg in ["none", "None", "NONE"] {
        let header = format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#);
        let token = format!("{}.{}.", b64url(header.as_bytes()), b64url(&payload));
        invalid(&gate, &token).await;
    }
    // Also with a real token's signature pasted on.
    let real = hs256(&claims(json!({})));
    let signature = real.rsplit('.').next().unwrap();
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    invalid(&gate, &format!("{header}.{}.{signature}", b64url(&payload))).await;
    assert_eq!(upstream.seen_count(), 0);
}

#[test]
fn b64url_matches_jsonwebtoken() {
    // The hand-made encoder agrees with a header jsonwebtoken encodes itself.
    let token = hs256(&json!({"exp": 1}));
    let header = token.split('.').next().unwrap();
    assert_eq!(header, b64url(br#"{"typ":"JWT","alg":"HS256"}"#));
    assert_eq!(b64url(b"f"), "Zg");
    assert_eq!(b64url(b"fo"), "Zm8");
    assert_eq!(b64url(b"foo"), "Zm9v");
    assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_invalid() {
    let upstream = Upstream::start().await;
    let auth = format!(
        "{{algorithms: [RS256], keys: [{{public_key_file: \"{}\"}}]}}",
        key_path("rsa.pub.pem")
    );
    let gate = TestGate::start(&auth_policy(&upstream.url(), &auth)).await;
    let public_pem = read_key("rsa.pub.pem");
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    invalid(&gate, &forged).await;
    // The same HMAC signature under a header claiming RS256.
    let mut parts: Vec<String> = forged.split('.').map(str::to_owned).collect();
    parts[0] = b64url(br#"{"typ":"JWT","alg":"RS256"}"#);
    invalid(&gate, &parts.join(".")).await;
    // The genuine article still passes.
    admitted(
        &gate,
        &signed(Algorithm::RS256, "rsa.key", None, &claims(json!({}))),
    )
    .await;
}

/// An issuer moving from HS256 to RS256: one route lists both, with a secret and a public
/// key. Each token is verified with keys of its own algorithm's family only, so the public
/// key never serves as an HMAC secret.
#[tokio::test]
async fn a_route_listing_hs256_and_rs256_accepts_both_and_keeps_the_families_apart() {
    let upstream = Upstream::start().await;
    let auth = format!(
        "{{algorithms: [HS256, RS256], keys: [{{hmac_secret_file: secret}}, {{public_key_file: \"{}\"}}]}}",
        key_path("rsa.pub.pem")
    );
    let gate = TestGate::start(&auth_policy(&upstream.url(), &auth)).await;
    admitted(&gate, &hs256(&claims(json!({})))).await;
    admitted(
        &gate,
        &signed(Algorithm::RS256, "rsa.key", None, &claims(json!({}))),
    )
    .await;
    // Key confusion: an HS256 MAC computed with the public key's PEM as the secret.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(&read_key("rsa.pub.pem")),
    )
    .unwrap();
    invalid(&gate, &forged).await;
    // The same MAC under a header claiming RS256.
    let mut parts: Vec<String> = forged.split('.').map(str::to_owned).collect();
    parts[0] = b64url(br#"{"typ":"JWT","alg":"RS256"}"#);
    invalid(&gate, &parts.join(".")).await;
    assert_eq!(upstream.seen_count(), 2);
}

/// A route that requires auth and has no key of a family its algorithms name loads (with
/// warnings) and refuses every token: the HMAC secret it lists verifies nothing.
#[tokio::test]
async fn a_route_left_without_a_usable_key_refuses_every_token() {
    let upstream = Upstream::start().await;
    let auth = "{algorithms: [RS256], keys: [{hmac_secret_file: secret}]}";
    let gate = TestGate::start(&auth_policy(&upstream.url(), auth)).await;
    invalid(&gate, &hs256(&claims(json!({})))).await;
    let rs256 = signed(Algorithm::RS256, "rsa.key", None, &claims(json!({})));
    invalid(&gate, &rs256).await;
    assert_eq!(upstream.seen_count(), 0);
}

/// A key no algorithm of its route can use is a warning, not an error, even when it leaves
/// a route that requires auth with no usable key (one more warning; every token refused).
#[test]
fn a_key_of_a_family_no_algorithm_names_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let policy_path = dir.path().join("policy.yaml");
    let policy = auth_policy(
        "ws://127.0.0.1:9",
        &format!(
            "{{algorithms: [RS256], keys: [{{hmac_secret_file: secret}}, {{public_key_file: \"{}\"}}]}}",
            key_path("rsa.pub.pem")
        ),
    );
    let loaded = wsgate::config::load_bytes(&policy_path, policy.as_bytes())
        .unwrap_or_else(|e| panic!("refused: {e}"));
    let fields: Vec<&str> = loaded.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(fields, ["defaults.auth.keys[0].hmac_secret_file"]);
    assert!(
        loaded.warnings[0].message.contains("HS*"),
        "{:?}",
        loaded.warnings
    );

    let only_hmac = auth_policy(
        "ws://127.0.0.1:9",
        "{algorithms: [RS256], keys: [{hmac_secret_file: secret}]}",
    );
    let loaded = wsgate::config::load_bytes(&policy_path, only_hmac.as_bytes())
        .unwrap_or_else(|e| panic!("refused: {e}"));
    let warnings: Vec<(&str, &str)> = loaded
        .warnings
        .iter()
        .map(|w| (w.field.as_str(), w.message.as_str()))
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert_eq!(warnings[0].0, "defaults.auth.keys[0].hmac_secret_file");
    assert_eq!(warnings[1].0, "defaults.auth.keys");
    // Inherited from `defaults`, so it names the route it leaves without a key.
    assert!(
        warnings[1].1.contains("every token on routes[0]"),
        "{warnings:?}"
    );
}

#[tokio::test]
async fn kid_path_traversal_is_invalid_and_harmless() {
    let upstream = Upstream::start().await;
    let keys_dir = tempfile::tempdir().unwrap();
    let jwks = keys_dir.path().join("jwks.json");
    std::fs::write(&jwks, ec_jwks(&[("ec.key", "k1")])).unwrap();
    let auth = format!(
        "{{algorithms: [ES256], keys: [{{jwks_file: \"{}\"}}, {{public_key_file: \"{}\"}}]}}",
        jwks.display(),
        key_path("ec2.pub.pem")
    );
    let gate = TestGate::start(&auth_policy(&upstream.url(), &auth)).await;
    for kid in [
        "../../etc/passwd",
        "/etc/passwd",
        "..\\..\\windows\\win.ini",
        "k1/../k1",
        "k1\u{0}",
        "' OR '1'='1",
    ] {
        invalid(&gate, &es256("ec.key", Some(kid))).await;
    }
    // The gate is still serving.
    admitted(&gate, &es256("ec.key", Some("k1"))).await;
    admitted(&gate, &es256("ec2.key", None)).await;
}

#[tokio::test]
async fn jku_x5u_and_embedded_jwk_headers_are_never_followed() {
    let upstream = Upstream::start().await;
    // The attacker's key server, publishing the attacker's key (ec2).
    let attacker = KeyServer::start(ec_jwks(&[("ec2.key", "evil")])).await;
    let auth = format!(
        "{{algorithms: [ES256], keys: [{{public_key_file: \"{}\"}}]}}",
        key_path("ec.pub.pem")
    );
    let gate = TestGate::start(&auth_policy(&upstream.url(), &auth)).await;
    let attacker_jwk = serde_json::from_str::<JwkSet>(&ec_jwks(&[("ec2.key", "evil")]))
        .unwrap()
        .keys
        .remove(0);
    let mut header = Header::new(Algorithm::ES256);
    header.jku = Some(attacker.url());
    header.x5u = Some(format!("https://localhost:{}/cert.pem", attacker.port));
    header.jwk = Some(attacker_jwk);
    let forged = encode(
        &header,
        &claims(json!({})),
        &encoding_key(Algorithm::ES256, "ec2.key"),
    )
    .unwrap();
    invalid(&gate, &forged).await;
    // With a kid naming the attacker's key too.
    header.kid = Some("evil".into());
    let forged = encode(
        &header,
        &claims(json!({})),
        &encoding_key(Algorithm::ES256, "ec2.key"),
    )
    .unwrap();
    invalid(&gate, &forged).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        attacker.connections(),
        0,
        "the gate contacted a jku/x5u URL"
    );
    assert_eq!(attacker.requests(), 0);
}

#[tokio::test]
async fn oversized_token_is_invalid_even_when_correctly_signed() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let token = hs256(&claims(json!({"pad": "x".repeat(9 * 1024)})));
    assert!(token.len() > 8 * 1024 && token.len() < 14 * 1024);
    invalid(&gate, &token).await;
    // Just under the limit passes.
    let token = hs256(&claims(json!({"pad": "x".repeat(5 * 1024)})));
    assert!(token.len() < 8 * 1024);
    admitted(&gate, &token).await;
}

#[tokio::test]
async fn garbage_tokens_are_invalid() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let real = hs256(&claims(json!({})));
    let truncated = &real[..real.len() - 5];
    let two_parts = real.rsplit_once('.').unwrap().0;
    for token in [
        "garbage",
        "not.a.jwt",
        "a.b.c.d",
        "....",
        truncated,
        two_parts,
        "eyJhbGciOiJIUzI1NiJ9.%%%%.AAAA",
    ] {
        invalid(&gate, token).await;
    }
    admitted(&gate, &real).await;
}

// ---------------------------------------------------------------------------------------
// 7. Registered claims

#[tokio::test]
async fn issuer_must_match_and_be_present() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(
        &upstream,
        "issuer: [\"https://issuer.example.com\", \"https://other.example.com\"]",
    )
    .await;
    admitted(
        &gate,
        &hs256(&claims(json!({"iss": "https://other.example.com"}))),
    )
    .await;
    invalid(
        &gate,
        &hs256(&claims(json!({"iss": "https://evil.example.com"}))),
    )
    .await;
    invalid(&gate, &hs256(&claims(json!({})))).await;
}

/// `sub` and `jti` are strings (RFC 7519 §4.1.2, §4.1.7): a numeric one would escape the
/// per-subject cap and a revocation by `sub` or `jti` (the operator API names them as
/// strings).
#[tokio::test]
async fn a_sub_or_jti_that_is_not_a_string_is_an_invalid_token() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    invalid(&gate, &hs256(&claims(json!({"sub": 123})))).await;
    invalid(&gate, &hs256(&claims(json!({"sub": ["alice"]})))).await;
    admitted(&gate, &hs256(&claims(json!({"sub": null})))).await;
    invalid(&gate, &hs256(&claims(json!({"jti": 777})))).await;
    invalid(&gate, &hs256(&claims(json!({"jti": ["a"]})))).await;
    invalid(&gate, &hs256(&claims(json!({"jti": {"id": "a"}})))).await;
    admitted(&gate, &hs256(&claims(json!({"jti": "777"})))).await;
}

#[tokio::test]
async fn audience_must_match_and_be_present() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "audience: [chat]").await;
    admitted(&gate, &hs256(&claims(json!({"aud": "chat"})))).await;
    admitted(&gate, &hs256(&claims(json!({"aud": ["billing", "chat"]})))).await;
    invalid(&gate, &hs256(&claims(json!({"aud": "billing"})))).await;
    invalid(&gate, &hs256(&claims(json!({"aud": ["billing"]})))).await;
    invalid(&gate, &hs256(&claims(json!({})))).await;
}

#[tokio::test]
async fn not_yet_valid_token_is_invalid() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "leeway_seconds: 30").await;
    invalid(&gate, &hs256(&claims(json!({"nbf": now() + 120})))).await;
    // Within the leeway it passes.
    admitted(&gate, &hs256(&claims(json!({"nbf": now() + 10})))).await;
}

#[tokio::test]
async fn token_without_exp_is_invalid() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    invalid(&gate, &hs256(&claims(json!({"exp": null})))).await;
}

#[tokio::test]
async fn expired_within_leeway_is_accepted() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "leeway_seconds: 30, close_on_expiry: false").await;
    admitted(&gate, &hs256(&claims(json!({"exp": now() - 10})))).await;
}

#[tokio::test]
async fn expired_beyond_leeway_is_401_token_expired() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "leeway_seconds: 30").await;
    let headers = refused(
        &gate,
        &hs256(&claims(json!({"exp": now() - 100}))),
        401,
        "token_expired",
    )
    .await;
    assert_eq!(
        header_values(&headers, "www-authenticate"),
        vec![INVALID_TOKEN_CHALLENGE.to_owned()]
    );
}

#[tokio::test]
async fn expired_token_with_a_bad_signature_is_invalid_not_expired() {
    // Expiry is only reported for a token whose signature checks out.
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({"exp": now() - 100})),
        &EncodingKey::from_secret(b"another-secret-another-secret-0123456789"),
    )
    .unwrap();
    invalid(&gate, &forged).await;
}

// ---------------------------------------------------------------------------------------
// 8. require_claims

#[tokio::test]
async fn require_claims_string_and_array_claims() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "require_claims: {role: [admin]}").await;
    admitted(&gate, &hs256(&claims(json!({"role": "admin"})))).await;
    refused(
        &gate,
        &hs256(&claims(json!({"role": "user"}))),
        403,
        "claims_denied",
    )
    .await;
    refused(&gate, &hs256(&claims(json!({}))), 403, "claims_denied").await;
    refused(
        &gate,
        &hs256(&claims(json!({"role": ["user", "guest"]}))),
        403,
        "claims_denied",
    )
    .await;
}

#[tokio::test]
async fn require_claims_array_claim_matches_any_element() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "require_claims: {roles: [admin]}").await;
    admitted(&gate, &hs256(&claims(json!({"roles": ["user", "admin"]})))).await;
    let headers = refused(
        &gate,
        &hs256(&claims(json!({"roles": ["user"]}))),
        403,
        "claims_denied",
    )
    .await;
    assert!(headers.get("www-authenticate").is_none());
    refused(&gate, &hs256(&claims(json!({}))), 403, "claims_denied").await;
}

/// `scope` (RFC 8693 §4.2, as Auth0 and Keycloak send it) and `scp` (Azure AD) are
/// space-delimited lists in one string: required and denied values match any word of it.
#[tokio::test]
async fn scope_and_scp_claims_match_by_their_words() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(
        &upstream,
        "require_claims: {scope: [chat:write]}, deny_claims: {scp: [Admin.All]}",
    )
    .await;
    let scoped = |scope: &str, scp: &str| hs256(&claims(json!({"scope": scope, "scp": scp})));
    admitted(&gate, &scoped("openid chat:write profile", "User.Read")).await;
    admitted(&gate, &scoped("chat:write", "")).await;
    refused(
        &gate,
        &scoped("openid chat:read", "User.Read"),
        403,
        "claims_denied",
    )
    .await;
    // Words, not substrings.
    refused(
        &gate,
        &scoped("openid chat:writer", ""),
        403,
        "claims_denied",
    )
    .await;
    refused(
        &gate,
        &scoped("chat:write", "User.Read Admin.All"),
        403,
        "claims_denied",
    )
    .await;
    // Other claims are matched whole, as before.
    let gate = hmac_gate(&upstream, "require_claims: {role: [admin]}").await;
    refused(
        &gate,
        &hs256(&claims(json!({"role": "user admin"}))),
        403,
        "claims_denied",
    )
    .await;
}

/// `deny_claims`: a string claim equal to a denied value, or an array claim holding one,
/// is 403 `claims_denied`; other values and an absent claim pass.
#[tokio::test]
async fn deny_claims_refuse_a_matching_string_or_array_claim() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "deny_claims: {role: [banned, suspended]}").await;
    admitted(&gate, &hs256(&claims(json!({"role": "user"})))).await;
    admitted(&gate, &hs256(&claims(json!({})))).await;
    let headers = refused(
        &gate,
        &hs256(&claims(json!({"role": "suspended"}))),
        403,
        "claims_denied",
    )
    .await;
    assert!(headers.get("www-authenticate").is_none());
    refused(
        &gate,
        &hs256(&claims(json!({"role": ["user", "banned"]}))),
        403,
        "claims_denied",
    )
    .await;
}

/// `require_claims` and `deny_claims` together: both must hold.
#[tokio::test]
async fn deny_claims_apply_beside_require_claims() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(
        &upstream,
        "require_claims: {roles: [admin]}, deny_claims: {sub: [mallory]}",
    )
    .await;
    admitted(&gate, &hs256(&claims(json!({"roles": ["admin"]})))).await;
    let mallory = json!({"sub": "mallory", "roles": ["admin"], "exp": now() + 300});
    refused(&gate, &hs256(&mallory), 403, "claims_denied").await;
}

/// A reload that adds `deny_claims` cuts off the open connections whose token matches
/// with 1008 "policy changed" (the upstream gets 1001), through the same re-check as
/// `require_claims`, and leaves the others open.
#[tokio::test]
async fn a_reload_adding_deny_claims_cuts_off_matching_connections() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let alice = json!({"sub": "alice", "exp": now() + 300});
    let bob = json!({"sub": "bob", "exp": now() + 300});
    let mut doomed = admitted(&gate, &hs256(&alice)).await;
    let mut kept = admitted(&gate, &hs256(&bob)).await;
    gate.write_policy(&auth_policy(
        &upstream.url(),
        &hmac_auth("deny_claims: {sub: [alice]}"),
    ));
    assert_eq!(
        next_close(&mut doomed).await,
        (1008, "policy changed".into())
    );
    let ended = upstream.wait_ended(0).await;
    assert!(matches!(ended, Ended::Close(1001, _)), "{ended:?}");
    kept.send(tungstenite::Message::text("still here"))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut kept).await,
        tungstenite::Message::text("still here")
    );
    refused(&gate, &hs256(&alice), 403, "claims_denied").await;
}

// ---------------------------------------------------------------------------------------
// 9. forward_claims

#[tokio::test]
async fn forward_claims_set_headers_that_cannot_be_spoofed() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(
        &upstream,
        "forward_claims: {sub: X-Auth-Subject, role: X-Auth-Role}",
    )
    .await;
    let token = hs256(&claims(json!({"sub": "user-42"})));
    let mut req = bearer(&gate, "/ws", &token);
    req.headers_mut()
        .append("x-auth-subject", header_value("spoofed"));
    req.headers_mut()
        .append("x-auth-subject", header_value("spoofed-again"));
    req.headers_mut()
        .append("x-auth-role", header_value("admin"));
    let (_client, response) = gate.connect_request(req).await.unwrap();
    assert_eq!(response.status(), 101);
    let seen = upstream.last_seen();
    assert_eq!(
        header_values(&seen.headers, "x-auth-subject"),
        vec!["user-42".to_owned()]
    );
    // The token has no role claim: the client's copy is dropped, nothing replaces it.
    assert!(
        seen.headers.get("x-auth-role").is_none(),
        "{:?}",
        seen.headers
    );
    // Non-ASCII text is a header value (obs-text); a control character cannot be one, and
    // the upstream would get the connection without the identity: refused. A space or tab
    // at either end would be stripped by the upstream's parser, which would then read
    // another identity than the one admitted (RFC 9110 §5.5): refused too. Inside the
    // value, and a no-break space at its end (not HTTP whitespace), they are kept.
    let token = hs256(&claims(json!({"sub": "José"})));
    let (_client, _) = gate
        .connect_request(bearer(&gate, "/ws", &token))
        .await
        .unwrap();
    let seen = upstream.last_seen();
    assert_eq!(seen.headers["x-auth-subject"].as_bytes(), "José".as_bytes());
    for sub in ["jo se", "a\tb", "alice\u{a0}"] {
        let token = hs256(&claims(json!({"sub": sub})));
        let (_client, _) = gate
            .connect_request(bearer(&gate, "/ws", &token))
            .await
            .unwrap();
        let seen = upstream.last_seen();
        assert_eq!(seen.headers["x-auth-subject"].as_bytes(), sub.as_bytes());
    }
    for sub in [
        "a\r\nX-Injected: yes",
        "a\u{0}b",
        "a\u{7f}",
        " alice",
        "alice ",
        "\talice",
        "alice\t",
        " ",
    ] {
        let token = hs256(&claims(json!({"sub": sub})));
        refused(&gate, &token, 403, "claims_denied").await;
        let token = hs256(&claims(json!({"sub": "user-1", "role": sub})));
        refused(&gate, &token, 403, "claims_denied").await;
    }
    // A claim that is not forwarded may hold anything.
    let token = hs256(&claims(json!({"sub": "user-1", "note": "a\r\nb"})));
    assert!(gate
        .connect_request(bearer(&gate, "/ws", &token))
        .await
        .is_ok());
}

/// A route whose `forward_claims` replaces the inherited one still drops the client's
/// copies of the headers other routes set: the routes may share an upstream that trusts
/// every one of them.
#[tokio::test]
async fn a_claim_header_another_route_sets_cannot_be_spoofed_either() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "{}  - path: /admin\n    auth: {{forward_claims: {{sub: X-Auth-Subject}}}}\n",
        auth_policy(
            &upstream.url(),
            &hmac_auth("forward_claims: {tenant: X-Auth-Tenant}")
        )
    );
    let gate = TestGate::start(&policy).await;
    let token = hs256(&claims(json!({"sub": "user-42", "tenant": "acme"})));
    let mut req = bearer(&gate, "/admin", &token);
    req.headers_mut()
        .append("x-auth-tenant", header_value("victim-tenant"));
    let (_client, response) = gate.connect_request(req).await.unwrap();
    assert_eq!(response.status(), 101);
    let seen = upstream.last_seen();
    assert_eq!(
        header_values(&seen.headers, "x-auth-subject"),
        vec!["user-42".to_owned()]
    );
    assert!(
        seen.headers.get("x-auth-tenant").is_none(),
        "{:?}",
        seen.headers
    );
    // On the route that sets it, the header is the token's.
    let mut req = bearer(&gate, "/ws", &token);
    req.headers_mut()
        .append("x-auth-tenant", header_value("victim-tenant"));
    let (_client, response) = gate.connect_request(req).await.unwrap();
    assert_eq!(response.status(), 101);
    let seen = upstream.last_seen();
    assert_eq!(
        header_values(&seen.headers, "x-auth-tenant"),
        vec!["acme".to_owned()]
    );
    assert!(seen.headers.get("x-auth-subject").is_none());
}

#[tokio::test]
async fn underscored_spellings_of_identity_headers_are_dropped() {
    // CGI, WSGI and Rack read X_Auth_Subject as X-Auth-Subject (CVE-2015-0219).
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "forward_claims: {sub: X-Auth-Subject}").await;
    let token = hs256(&claims(json!({"sub": "user-42"})));
    let mut req = bearer(&gate, "/ws", &token);
    req.headers_mut()
        .append("x_auth_subject", header_value("admin"));
    req.headers_mut()
        .append("x_forwarded_for", header_value("6.6.6.6"));
    req.headers_mut().append("x-other", header_value("kept"));
    let (_client, response) = gate.connect_request(req).await.unwrap();
    assert_eq!(response.status(), 101);
    let seen = upstream.last_seen();
    assert!(
        seen.headers.keys().all(|name| !name.as_str().contains('_')),
        "{:?}",
        seen.headers
    );
    assert_eq!(
        header_values(&seen.headers, "x-auth-subject"),
        vec!["user-42".to_owned()]
    );
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-other"], "kept");
}

// ---------------------------------------------------------------------------------------
// More: periodic JWKS refresh, a failed refresh, tokens in a second source, expiry close

#[tokio::test]
async fn jwks_url_is_refreshed_every_refresh_seconds() {
    let upstream = Upstream::start().await;
    let server = KeyServer::start(ec_jwks(&[("ec.key", "a")])).await;
    let gate = refreshing_gate(&upstream, &server).await;
    admitted_once_keys_fetched(&gate, &es256("ec.key", None)).await;
    // Rotate; a kid-less token cannot trigger a refetch, so only the refresh can let the
    // new key in.
    server.serve(ec_jwks(&[("ec2.key", "b")]));
    admitted_once_refreshed(&gate, &es256("ec2.key", None)).await;
    invalid(&gate, &es256("ec.key", None)).await;
}

#[tokio::test]
async fn jwks_url_failed_refresh_keeps_the_last_good_set() {
    let upstream = Upstream::start().await;
    let server = KeyServer::start(ec_jwks(&[("ec.key", "a")])).await;
    let gate = refreshing_gate(&upstream, &server).await;
    admitted_once_keys_fetched(&gate, &es256("ec.key", None)).await;
    server.serve("{ this is not a key set".to_owned());
    // Every request counted from here on is answered with the broken document.
    let before = server.requests();
    // Wait for a refresh to have read the broken document and then for the next request:
    // the refresher fetches one at a time, so by then the broken one has been dealt with.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.requests() < before + 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refresh and retry within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admitted(&gate, &es256("ec.key", Some("a"))).await;
    admitted(&gate, &es256("ec.key", None)).await;
}

#[tokio::test]
async fn token_copies_in_other_sources_are_not_forwarded() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let token = hs256(&claims(json!({})));
    let mut req = bearer(&gate, &format!("/ws?a=1&access_token={token}"), &token);
    req.headers_mut().insert(
        "cookie",
        header_value(&format!("theme=dark; access_token={token}")),
    );
    let (_client, response) = gate.connect_request(req).await.unwrap();
    assert_eq!(response.status(), 101);
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/ws?a=1");
    assert_eq!(
        header_values(&seen.headers, "cookie"),
        vec!["theme=dark".to_owned()]
    );
}

#[tokio::test]
async fn token_expiry_closes_the_connection_with_1008() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "leeway_seconds: 2, close_on_expiry: true").await;
    // Expires (with leeway) about one second from now.
    let mut client = admitted(&gate, &hs256(&claims(json!({"exp": now() - 1})))).await;
    let (code, reason) = tokio::time::timeout(Duration::from_secs(5), next_close(&mut client))
        .await
        .expect("no close within 5 s of exp + leeway");
    assert_eq!((code, reason.as_str()), (1008, "token expired"));
    assert!(matches!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, _)
    ));
}

#[tokio::test]
async fn close_on_expiry_false_keeps_the_connection_open() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "leeway_seconds: 2, close_on_expiry: false").await;
    // The same token at a gate that does close on expiry shows when expiry has passed.
    let strict = hmac_gate(&upstream, "leeway_seconds: 2, close_on_expiry: true").await;
    let token = hs256(&claims(json!({"exp": now() - 1})));
    let mut client = admitted(&gate, &token).await;
    let mut closed = admitted(&strict, &token).await;
    let (code, _) = tokio::time::timeout(Duration::from_secs(5), next_close(&mut closed))
        .await
        .expect("the close_on_expiry gate did not close within 5 s of exp + leeway");
    assert_eq!(code, 1008);
    client
        .send(tungstenite::Message::text("still here"))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut client).await,
        tungstenite::Message::text("still here")
    );
}

// ---------------------------------------------------------------------------------------
// Numeric claims across their whole range

/// `exp`, `nbf` and `iat` at the edges of JSON numbers: every upgrade gets its answer (an
/// HTTP status, never a dropped socket), and a far-future `exp` neither panics nor wraps
/// into "already expired": the connection stays open.
#[tokio::test]
async fn numeric_claims_at_the_edges_get_an_answer_and_never_wrap() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "close_on_expiry: true, leeway_seconds: 3600").await;
    let now = now();
    let far = [
        json!(1u64 << 53),
        json!(1u64 << 63),
        json!(u64::MAX),
        json!(u64::MAX - 3599),
    ];
    for exp in far {
        let token = hs256(&json!({"sub": "far", "exp": exp}));
        let mut client = admitted(&gate, &token).await;
        // Not closed at once as "token expired" (a wrapped exp + leeway would be).
        tokio::time::sleep(Duration::from_millis(300)).await;
        client
            .send(tungstenite::Message::text("still here"))
            .await
            .unwrap();
        assert_eq!(
            next_message(&mut client).await,
            tungstenite::Message::text("still here"),
            "exp {exp}"
        );
    }
    // Negative, past u64 or not a number: invalid_token.
    for exp in [
        json!(-1),
        json!(1.8446744073709552e19),
        json!(1e300),
        json!("soon"),
    ] {
        invalid(&gate, &hs256(&json!({"sub": "odd", "exp": exp}))).await;
    }
    // In the past (0 is the epoch, 0.5 rounds to 1): token_expired.
    for exp in [json!(0), json!(0.5)] {
        refused(
            &gate,
            &hs256(&json!({"sub": "old", "exp": exp})),
            401,
            "token_expired",
        )
        .await;
    }
    // A fractional NumericDate (RFC 7519 allows them) is admitted.
    admitted(
        &gate,
        &hs256(&json!({"sub": "frac", "exp": now as f64 + 300.5})),
    )
    .await;
    // nbf far in the future: not yet valid; iat is not checked.
    for nbf in [json!(u64::MAX), json!(1u64 << 63), json!(-1)] {
        invalid(
            &gate,
            &hs256(&json!({"sub": "nbf", "exp": now + 300, "nbf": nbf})),
        )
        .await;
    }
    for iat in [
        json!(-1),
        json!(0),
        json!(0.5),
        json!(u64::MAX),
        json!(1e300),
    ] {
        admitted(
            &gate,
            &hs256(&json!({"sub": "iat", "exp": now + 300, "iat": iat})),
        )
        .await;
    }
    for nbf in [json!(0), json!(0.5)] {
        admitted(
            &gate,
            &hs256(&json!({"sub": "nbf0", "exp": now + 300, "nbf": nbf})),
        )
        .await;
    }
}

/// A fractional `exp` is a deadline like any other: the connection closes at it.
#[tokio::test]
async fn a_fractional_exp_closes_the_connection_at_expiry() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "close_on_expiry: true, leeway_seconds: 0").await;
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 1.5;
    let mut client = admitted(&gate, &hs256(&json!({"sub": "frac", "exp": exp}))).await;
    let (code, reason) = next_close(&mut client).await;
    assert_eq!((code, reason.as_str()), (1008, "token expired"));
}

// ---------------------------------------------------------------------------------------
// Verified tokens are kept (docs/admission.md, "Verified tokens"): the same token again is
// not verified again, but never outlives its expiry, its key or its policy.

#[tokio::test]
async fn a_kept_token_is_refused_once_it_expires() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "leeway_seconds: 0, close_on_expiry: false").await;
    let exp = now() + 2;
    let token = hs256(&claims(json!({ "exp": exp })));
    admitted(&gate, &token).await;
    // The second time from the table of verified tokens.
    admitted(&gate, &token).await;
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    refused(&gate, &token, 401, "token_expired").await;
}

#[tokio::test]
async fn a_kept_token_is_refused_once_its_key_leaves_the_fetched_set() {
    let upstream = Upstream::start().await;
    let server = KeyServer::start(ec_jwks(&[("ec.key", "a")])).await;
    let gate = refreshing_gate(&upstream, &server).await;
    let kept = es256("ec.key", None);
    admitted_once_keys_fetched(&gate, &kept).await;
    admitted(&gate, &kept).await;
    // The issuer rotates to ec2; once the refresh has brought it in, the token signed by
    // the key that left is refused, though it was verified (and kept) before.
    server.serve(ec_jwks(&[("ec2.key", "b")]));
    admitted_once_refreshed(&gate, &es256("ec2.key", None)).await;
    invalid(&gate, &kept).await;
}

#[tokio::test]
async fn a_kept_token_is_refused_once_a_reload_changes_the_key() {
    let upstream = Upstream::start().await;
    let gate = hmac_gate(&upstream, "").await;
    let token = hs256(&claims(json!({})));
    admitted(&gate, &token).await;
    admitted(&gate, &token).await;
    std::fs::write(
        gate.dir.path().join("rotated"),
        "another-secret-another-secret-0123456789",
    )
    .unwrap();
    gate.write_policy(&auth_policy(
        &upstream.url(),
        "{algorithms: [HS256], keys: [{hmac_secret_file: rotated}]}",
    ));
    gate.wait_metric(
        "wsgate_policy_reloads_total{result=\"success\"}",
        1.0,
        Duration::from_secs(5),
        "the reload with the new secret",
    )
    .await;
    invalid(&gate, &token).await;
}

/// Policies that would load and then not do what they say are refused by `check`: a
/// private key where the public key goes (every token would be refused), a forwarded
/// claim's header with an underscore (its dash spelling, which a client may send, is what
/// CGI, WSGI and Rack servers read) or shared by two claims (one would be lost). And a
/// `trusted_proxies` entry that trusts every peer is a warning.
#[test]
fn check_refuses_policies_that_would_not_do_what_they_say() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let policy_path = dir.path().join("policy.yaml");
    let refused = |auth: &str, expected: &str| {
        let policy = auth_policy("ws://127.0.0.1:9", auth);
        let error = match wsgate::config::load_bytes(&policy_path, policy.as_bytes()) {
            Ok(_) => panic!("{auth}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(expected), "{auth}: {error}");
    };
    refused(
        &format!(
            "{{algorithms: [RS256], keys: [{{public_key_file: \"{}\"}}]}}",
            key_path("rsa.key")
        ),
        "is a private key",
    );
    refused(
        "{algorithms: [HS256], keys: [{hmac_secret_file: secret}], forward_claims: {sub: X_User}}",
        "\"X-User\", a header any client can send",
    );
    refused(
        "{algorithms: [HS256], keys: [{hmac_secret_file: secret}], forward_claims: {role: x-auth, tenant: X-Auth}}",
        "one of them would be lost",
    );

    let open = auth_policy(
        "ws://127.0.0.1:9",
        "{algorithms: [HS256], keys: [{hmac_secret_file: secret}]}",
    )
    .replace(
        "version: 1\n",
        "version: 1\ntrusted_proxies: [10.0.0.0/8, 0.0.0.0/0, \"::/0\", \"::ffff:0.0.0.0/96\"]\n",
    );
    let loaded = wsgate::config::load_bytes(&policy_path, open.as_bytes())
        .unwrap_or_else(|e| panic!("refused: {e}"));
    let fields: Vec<&str> = loaded.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "trusted_proxies[1]",
            "trusted_proxies[2]",
            "trusted_proxies[3]"
        ]
    );
    // Named as written, not as the IPv4 network it is kept as.
    assert!(
        loaded.warnings[2].message.starts_with("::ffff:0.0.0.0/96 "),
        "{:?}",
        loaded.warnings
    );
    // Every address made of halves, in either family, is warned about as well; a list that
    // leaves any address out is not.
    for (list, warned) in [
        ("[0.0.0.0/1, 10.0.0.1, 128.0.0.0/1]", true),
        ("[\"::/1\", \"8000::/1\"]", true),
        ("[0.0.0.0/1, 128.0.0.0/2, 192.0.0.0/3, 224.0.0.0/4]", false),
        ("[0.0.0.0/1, \"8000::/1\"]", false),
    ] {
        let policy = auth_policy(
            "ws://127.0.0.1:9",
            "{algorithms: [HS256], keys: [{hmac_secret_file: secret}]}",
        )
        .replace(
            "version: 1\n",
            &format!("version: 1\ntrusted_proxies: {list}\n"),
        );
        let loaded = wsgate::config::load_bytes(&policy_path, policy.as_bytes())
            .unwrap_or_else(|e| panic!("refused: {e}"));
        let fields: Vec<&str> = loaded.warnings.iter().map(|w| w.field.as_str()).collect();
        let expected: &[&str] = if warned { &["trusted_proxies"] } else { &[] };
        assert_eq!(fields, expected, "{list}");
    }
}
