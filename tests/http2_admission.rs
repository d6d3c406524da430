//! The admission of WebSockets over HTTP/2 (RFC 8441) through the real gate: every
//! refusal of docs/admission.md on an extended CONNECT, with its status, JSON body and
//! headers, and the caps counting h2 streams and HTTP/1.1 connections alike; then
//! subprotocols, token carriers and what goes upstream. The relay, plain requests, the
//! `http2` block and the drain are in `http2.rs`.

mod support;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use support::h2::*;
use support::*;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------
// §3 refusals over an extended CONNECT

/// A Sec-WebSocket-Version other than 13 (or none) is 426 `not_websocket`, naming 13.
#[tokio::test]
async fn a_version_other_than_13_is_426_not_websocket() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let headers = h2
        .refused(
            "/ws",
            &[("sec-websocket-version", "8")],
            426,
            "not_websocket",
        )
        .await;
    assert_eq!(headers["sec-websocket-version"], "13");
    // `Upgrade` is a connection-specific header, which HTTP/2 forbids (RFC 9113 §8.2.2):
    // the answer carries none rather than a malformed one.
    assert!(headers.get("upgrade").is_none(), "{headers:?}");
    assert!(headers.get("connection").is_none(), "{headers:?}");
    let headers = h2
        .refused(
            "/ws",
            &[("sec-websocket-version", "")],
            426,
            "not_websocket",
        )
        .await;
    assert_eq!(headers["sec-websocket-version"], "13");
    assert_eq!(upstream.seen_count(), 0);
}

/// An extended CONNECT for another protocol (whatever its version header says), two
/// versions, or a dot-segment path is 400 `bad_request`; the connection goes on.
#[tokio::test]
async fn a_malformed_extended_connect_is_400_bad_request() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let (status, _, body) = h2
        .extended_connect("/ws", "chat", &[])
        .await
        .expect_err(":protocol chat was admitted");
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    let (status, _, body) = h2
        .extended_connect("/ws", "chat", &[("sec-websocket-version", "8")])
        .await
        .expect_err(":protocol chat was admitted");
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    h2.refused(
        "/ws",
        &[
            ("sec-websocket-version", "13"),
            ("sec-websocket-version", "13"),
        ],
        400,
        "bad_request",
    )
    .await;
    h2.refused("/ws/../admin", &[], 400, "bad_request").await;
    assert_eq!(upstream.seen_count(), 0);
    let (mut ws, _) = h2.websocket("/ws", &[]).await.unwrap();
    echoes(&mut ws, "after the refusals").await;
}

/// A header list over 16 KiB (as HTTP/2 counts it, after HPACK decoding) or with more
/// than 100 fields is 431 `bad_request` in JSON, counted under `route="none"`, as an
/// HTTP/1.1 head over the same limits is; the connection goes on, and a list just under
/// the limit is admitted.
#[tokio::test]
async fn a_header_list_over_16_kib_or_100_fields_is_431_bad_request() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let big = "a".repeat(17 * 1024);
    h2.refused("/ws", &[("x-big", &big)], 431, "bad_request")
        .await;
    let names: Vec<String> = (0..101).map(|i| format!("x-field-{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    h2.refused("/ws", &many, 431, "bad_request").await;
    assert_eq!(upstream.seen_count(), 0);
    let counted = "wsgate_upgrades_total{route=\"none\",result=\"bad_request\"}";
    assert_eq!(gate.metric(counted).await, 2.0);
    // Under both limits: admitted on the same connection.
    let under = "a".repeat(15 * 1024);
    let (mut ws, _) = h2
        .websocket("/ws", &[("x-big", &under), ("x-other", "1")])
        .await
        .expect("a 15 KiB header list is admitted");
    echoes(&mut ws, "after the 431s").await;
    assert_eq!(upstream.seen_count(), 1);
}

/// The 16 KiB is RFC 9113 §6.5.2's count of the whole list: every pseudo-header
/// (`:protocol` and `:authority` included) and field, each with 32 bytes more. A list of
/// exactly 16,384 bytes is admitted and one of 16,385 refused.
#[tokio::test]
async fn the_header_list_limit_counts_every_pseudo_header() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let (scheme, authority) = h2.origin.split_once("://").unwrap();
    let field = |name: &str, value: usize| name.len() + value + 32;
    let fixed = field(":method", "CONNECT".len())
        + field(":protocol", "websocket".len())
        + field(":scheme", scheme.len())
        + field(":path", "/ws".len())
        + field(":authority", authority.len())
        + field("sec-websocket-version", 2)
        + field("x-big", 0);
    let exact = "a".repeat(16 * 1024 - fixed);
    h2.websocket("/ws", &[("x-big", &exact)])
        .await
        .expect("a list of exactly 16 KiB is admitted");
    let over = "a".repeat(16 * 1024 - fixed + 1);
    h2.refused("/ws", &[("x-big", &over)], 431, "bad_request")
        .await;
}

/// A path no route matches is 404 `no_route`.
#[tokio::test]
async fn an_unknown_path_is_404_no_route() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    for path in ["/other", "/wsx", "/"] {
        h2.refused(path, &[], 404, "no_route").await;
    }
    assert_eq!(upstream.seen_count(), 0);
}

/// A denied client IP is 403 `ip_denied`, also when it comes from a trusted proxy's
/// X-Forwarded-For.
#[tokio::test]
async fn a_denied_ip_is_403_ip_denied() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(
        &upstream,
        TRUSTED,
        "    ip: {deny: [203.0.113.0/24]}\n",
    ))
    .await;
    let mut h2 = gate.h2().await;
    h2.refused(
        "/ws",
        &[("x-forwarded-for", "203.0.113.9")],
        403,
        "ip_denied",
    )
    .await;
    assert_eq!(upstream.seen_count(), 0);
    // Another address on the same connection is admitted.
    let (mut ws, _) = h2
        .websocket("/ws", &[("x-forwarded-for", "198.51.100.1")])
        .await
        .unwrap();
    echoes(&mut ws, "allowed").await;
}

/// Each stream is one upgrade for the per-IP rate: past the burst, 429 `rate_limited`
/// with Retry-After.
#[tokio::test]
async fn streams_over_the_upgrade_rate_are_429_rate_limited_with_retry_after() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(
        &upstream,
        "",
        "    rate: {upgrades_per_second: 0.5, burst: 2}\n",
    ))
    .await;
    let mut h2 = gate.h2().await;
    let _a = h2.websocket("/ws", &[]).await.unwrap();
    let _b = h2.websocket("/ws", &[]).await.unwrap();
    let headers = h2.refused("/ws", &[], 429, "rate_limited").await;
    let retry = retry_after(&headers);
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert_eq!(upstream.seen_count(), 2);
}

/// The per-IP cap counts an h2 stream as one connection, like an HTTP/1.1 one: with a
/// cap of 2, one of each fills it; closing the stream frees its slot.
#[tokio::test]
async fn the_per_ip_cap_counts_h2_streams_and_http1_connections_alike() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(
        &upstream,
        "",
        "    rate: {max_connections_per_ip: 2, burst: 100}\n",
    ))
    .await;
    let mut h1 = http1(&gate, &[]).await.unwrap();
    let mut h2 = gate.h2().await;
    let (stream, _) = h2.websocket("/ws", &[]).await.unwrap();
    let headers = h2.refused("/ws", &[], 429, "too_many_connections").await;
    assert!(retry_after(&headers) >= 1);
    let Err(refusal) = http1(&gate, &[]).await else {
        panic!("a third connection was admitted");
    };
    assert!(refusal.contains("too_many_connections"), "{refusal}");
    // The stream's close frees its slot for an HTTP/1.1 client.
    close_with(stream, 1000, "").await;
    let _c = admitted_soon(&gate, &[]).await;
    h1.send(Message::text("still")).await.unwrap();
    assert_eq!(next_message(&mut h1).await, Message::text("still"));
}

/// The per-subject cap counts h2 streams and HTTP/1.1 connections of one `sub` together.
#[tokio::test]
async fn the_per_subject_cap_counts_h2_streams_and_http1_connections_alike() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&token_policy(
        &upstream,
        "",
        "{upgrades_per_second: 1000, burst: 1000, max_connections_per_subject: 2}",
    ))
    .await;
    let alice = bearer(&hs256("alice"));
    let auth = [("authorization", alice.as_str())];
    let _h1 = http1(&gate, &auth).await.unwrap();
    let mut h2 = gate.h2().await;
    let (stream, _) = h2.websocket("/ws", &auth).await.unwrap();
    let headers = h2.refused("/ws", &auth, 429, "too_many_connections").await;
    assert!(retry_after(&headers) >= 1);
    // Another subject is not affected.
    let bob = bearer(&hs256("bob"));
    let _bob = h2
        .websocket("/ws", &[("authorization", bob.as_str())])
        .await
        .unwrap();
    close_with(stream, 1000, "").await;
    let _again = admitted_soon(&gate, &auth).await;
}

/// The global cap counts h2 streams: past it, 503 `server_full`.
#[tokio::test]
async fn the_global_cap_counts_h2_streams_503_server_full() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(&upstream, "max_connections: 2\n", "")).await;
    let _h1 = http1(&gate, &[]).await.unwrap();
    let mut h2 = gate.h2().await;
    let (stream, _) = h2.websocket("/ws", &[]).await.unwrap();
    h2.refused("/ws", &[], 503, "server_full").await;
    close_with(stream, 1000, "").await;
    let _again = admitted_soon(&gate, &[]).await;
}

/// An Origin not on the allow list, or none when `allow_missing` is false, is 403
/// `origin_not_allowed`.
#[tokio::test]
async fn a_foreign_or_missing_origin_is_403_origin_not_allowed() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\n  rate: {{burst: 100}}\n  origin: {{allow: [\"https://app.example.com\"]}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let mut h2 = gate.h2().await;
    h2.refused(
        "/ws",
        &[("origin", "https://evil.example.com")],
        403,
        "origin_not_allowed",
    )
    .await;
    h2.refused("/ws", &[], 403, "origin_not_allowed").await;
    assert_eq!(upstream.seen_count(), 0);
    let (mut ws, _) = h2
        .websocket("/ws", &[("origin", "https://app.example.com")])
        .await
        .unwrap();
    echoes(&mut ws, "same origin").await;
}

/// No token is 401 `missing_token` with a bare Bearer challenge; a bad one `invalid_token`
/// and an expired one `token_expired`, both with `error="invalid_token"`.
#[tokio::test]
async fn token_refusals_are_401_with_their_challenges() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&token_policy(&upstream, ", leeway_seconds: 0", ROOMY)).await;
    let mut h2 = gate.h2().await;
    let headers = h2.refused("/ws", &[], 401, "missing_token").await;
    let challenges: Vec<_> = headers.get_all("www-authenticate").iter().collect();
    assert_eq!(challenges, ["Bearer"]);

    let forged = bearer(&hs256_with(
        "another-secret-another-secret-another-secret",
        serde_json::json!({"sub": "mallory", "exp": unix_now() + 300}),
    ));
    let headers = h2
        .refused("/ws", &[("authorization", &forged)], 401, "invalid_token")
        .await;
    assert_eq!(headers["www-authenticate"], INVALID_TOKEN_CHALLENGE);

    let expired = bearer(&hs256_with(
        SECRET,
        serde_json::json!({"sub": "alice", "exp": unix_now() - 60}),
    ));
    let headers = h2
        .refused("/ws", &[("authorization", &expired)], 401, "token_expired")
        .await;
    assert_eq!(headers["www-authenticate"], INVALID_TOKEN_CHALLENGE);
    assert_eq!(upstream.seen_count(), 0);
}

/// A valid token without the required claim is 403 `claims_denied`.
#[tokio::test]
async fn a_token_without_the_required_claims_is_403_claims_denied() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&token_policy(
        &upstream,
        ", require_claims: {role: [admin]}",
        ROOMY,
    ))
    .await;
    let mut h2 = gate.h2().await;
    let user = bearer(&hs256_with(
        SECRET,
        serde_json::json!({"sub": "alice", "role": "user", "exp": unix_now() + 300}),
    ));
    h2.refused("/ws", &[("authorization", &user)], 403, "claims_denied")
        .await;
    assert_eq!(upstream.seen_count(), 0);
    let admin = bearer(&hs256_with(
        SECRET,
        serde_json::json!({"sub": "root", "role": "admin", "exp": unix_now() + 300}),
    ));
    let (mut ws, _) = h2
        .websocket("/ws", &[("authorization", &admin)])
        .await
        .unwrap();
    echoes(&mut ws, "admin").await;
}

/// A `jwks_url` that was never fetched is 503 `keys_unavailable` with Retry-After.
#[tokio::test]
async fn a_jwks_url_never_fetched_is_503_keys_unavailable() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let upstream = Upstream::start().await;
    let down = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = down.local_addr().unwrap().port();
    drop(down);
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow_missing: true}}\n  rate: {ROOMY}\n  auth: {{algorithms: [ES256], keys: [{{jwks_url: \"https://localhost:{port}/jwks.json\", refresh_seconds: 300}}]}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let pem = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/ec.key")).unwrap();
    let token = encode(
        &Header::new(Algorithm::ES256),
        &serde_json::json!({"sub": "alice", "exp": unix_now() + 300}),
        &EncodingKey::from_ec_pem(&pem).unwrap(),
    )
    .unwrap();
    let mut h2 = gate.h2().await;
    let headers = h2
        .refused(
            "/ws",
            &[("authorization", &bearer(&token))],
            503,
            "keys_unavailable",
        )
        .await;
    assert!(retry_after(&headers) >= 1);
    assert_eq!(upstream.seen_count(), 0);
}

/// An upstream that refuses connections is 502 `upstream_unavailable`.
#[tokio::test]
async fn an_upstream_down_is_502_upstream_unavailable() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", closed.local_addr().unwrap());
    drop(closed);
    let gate = TestGate::start(&open_policy(&url, "")).await;
    let mut h2 = gate.h2().await;
    h2.refused("/ws", &[], 502, "upstream_unavailable").await;
}

/// An upstream that accepts but never answers is 504 `upstream_timeout` at
/// `upstream_connect_seconds`.
#[tokio::test]
async fn a_silent_upstream_is_504_upstream_timeout() {
    let (url, held) = silent_upstream().await;
    let extra = "    timeouts: {upstream_connect_seconds: 0.5}\n";
    let gate = TestGate::start(&open_policy(&url, extra)).await;
    let mut h2 = gate.h2().await;
    let started = Instant::now();
    h2.refused("/ws", &[], 504, "upstream_timeout").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "504 after {took:?}"
    );
    held.abort();
}

/// The upstream's own non-101 answer is relayed: its status, content type and body.
#[tokio::test]
async fn the_upstreams_own_refusal_is_relayed_with_its_body() {
    let upstream = Upstream::start_with(UpstreamOptions {
        refuse: Some((403, "not for you")),
        ..Default::default()
    })
    .await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let (status, headers, body) = h2.websocket("/ws", &[]).await.expect_err("admitted");
    assert_eq!(status, 403);
    assert_eq!(body, serde_json::Value::String("not for you".into()));
    assert_eq!(headers["content-type"], "text/plain");
}

/// An upstream that answers the handshake with 200 (an app's catch-all page) has not
/// opened a WebSocket; over HTTP/2 a 200 would tell the client it had (RFC 8441 §5), so
/// the gate answers 502 `upstream_unavailable` instead.
#[tokio::test]
async fn an_upstreams_200_to_the_handshake_is_502_upstream_unavailable() {
    let upstream = Upstream::start_with(UpstreamOptions {
        refuse: Some((200, "<html>the app</html>")),
        ..Default::default()
    })
    .await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    h2.refused("/ws", &[], 502, "upstream_unavailable").await;
    assert_eq!(upstream.seen_count(), 1);
}

// ---------------------------------------------------------------------------------------
// Subprotocols, tokens and what goes upstream

/// The upstream's chosen subprotocol comes back in the 200; the upstream saw the offer.
#[tokio::test]
async fn the_upstreams_subprotocol_is_returned_in_the_200() {
    let upstream = Upstream::start_with(UpstreamOptions {
        protocol: Some("v2.chat"),
        ..Default::default()
    })
    .await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let (mut ws, headers) = h2
        .websocket("/ws", &[("sec-websocket-protocol", "v1.chat, v2.chat")])
        .await
        .unwrap();
    assert_eq!(headers["sec-websocket-protocol"], "v2.chat");
    assert_eq!(
        upstream.last_seen().headers["sec-websocket-protocol"],
        "v1.chat, v2.chat"
    );
    echoes(&mut ws, "negotiated").await;
}

/// A token is taken from the query, the Authorization header or a `bearer.` subprotocol
/// entry, and its carrier never reaches the upstream.
#[tokio::test]
async fn tokens_in_query_header_and_subprotocol_are_accepted_and_removed() {
    let upstream = Upstream::start_with(UpstreamOptions {
        protocol: Some("chat.v1"),
        ..Default::default()
    })
    .await;
    let gate = TestGate::start(&token_policy(&upstream, "", ROOMY)).await;
    let token = hs256("alice");
    let mut h2 = gate.h2().await;

    let path = format!("/ws/room?a=1&access_token={token}&b=two");
    let (mut by_query, _) = h2.websocket(&path, &[]).await.unwrap();
    echoes(&mut by_query, "query").await;
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/ws/room?a=1&b=two");
    assert!(!format!("{:?}", seen.headers).contains(&token));

    let (mut by_header, _) = h2
        .websocket("/ws?x=1", &[("authorization", &bearer(&token))])
        .await
        .unwrap();
    echoes(&mut by_header, "header").await;
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/ws?x=1");
    assert!(seen.headers.get("authorization").is_none(), "{seen:?}");

    let offer = format!("bearer.{token}, chat.v1");
    let (mut by_protocol, headers) = h2
        .websocket("/ws", &[("sec-websocket-protocol", &offer)])
        .await
        .unwrap();
    echoes(&mut by_protocol, "subprotocol").await;
    assert_eq!(headers["sec-websocket-protocol"], "chat.v1");
    let offered: Vec<_> = upstream
        .last_seen()
        .headers
        .get_all("sec-websocket-protocol")
        .iter()
        .cloned()
        .collect();
    assert_eq!(offered, ["chat.v1"]);
}

/// An HTTP/2 client may send its cookies as several `cookie` fields (RFC 9113 §8.2.3,
/// as browsers do for HPACK): the token is found in any of them, and the HTTP/1.1
/// upstream gets one Cookie header, joined with "; ", without the token cookie; on an
/// upgrade and on an `http: pass` request alike.
#[tokio::test]
async fn split_cookie_fields_reach_the_upstream_as_one_cookie_header() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "{}  - path: /static\n    http: pass\n",
        token_policy(&upstream, "", ROOMY)
    );
    let gate = TestGate::start(&policy).await;
    let token = format!("access_token={}", hs256("alice"));
    let cookies = [
        ("cookie", "theme=dark"),
        ("cookie", token.as_str()),
        ("cookie", "lang=en"),
    ];
    let mut h2 = gate.h2().await;
    let (mut ws, _) = h2.websocket("/ws", &cookies).await.unwrap();
    echoes(&mut ws, "cookies").await;
    let sent: Vec<_> = upstream
        .last_seen()
        .headers
        .get_all("cookie")
        .iter()
        .cloned()
        .collect();
    assert_eq!(sent, ["theme=dark; lang=en"]);

    let (status, _, _) = h2.get("/static/page", &cookies).await;
    assert_eq!(status, 200);
    let sent: Vec<_> = upstream
        .last_seen()
        .headers
        .get_all("cookie")
        .iter()
        .cloned()
        .collect();
    assert_eq!(sent, ["theme=dark; lang=en"]);
}

/// §8 "Real clients": an upstream that selects no subprotocol gets the client's token
/// entry selected in the 200 (the upstream never sees it).
#[tokio::test]
async fn the_token_entry_is_selected_when_the_upstream_selects_nothing() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&token_policy(&upstream, "", ROOMY)).await;
    let entry = format!("bearer.{}", hs256("alice"));
    let mut h2 = gate.h2().await;
    let (mut ws, headers) = h2
        .websocket("/ws", &[("sec-websocket-protocol", &entry)])
        .await
        .unwrap();
    assert_eq!(headers["sec-websocket-protocol"], entry.as_str());
    echoes(&mut ws, "selected").await;
    assert!(upstream
        .last_seen()
        .headers
        .get("sec-websocket-protocol")
        .is_none());
}

/// What goes upstream for an h2 stream: X-Forwarded-Host is the `:authority` (not a
/// Host field sent beside it),
/// X-Forwarded-Proto `https` over TLS and `http` over h2c, X-Forwarded-For the peer, the
/// request id and traceparent kept.
#[tokio::test]
async fn forwarded_headers_follow_the_spec_over_h2_and_h2c() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (_ws, _) = h2
        .websocket(
            "/ws/a?b=c",
            &[
                ("x-forwarded-for", "6.6.6.6"),
                ("x-request-id", "req-42"),
                ("traceparent", traceparent),
                ("x-custom", "kept"),
                // `:authority` wins over a Host field sent beside it (RFC 9113 §8.3.1).
                ("host", "evil.example"),
            ],
        )
        .await
        .unwrap();
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/ws/a?b=c");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        format!("localhost:{}", gate.addr.port())
    );
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-request-id"], "req-42");
    assert_eq!(seen.headers["traceparent"], traceparent);
    assert_eq!(seen.headers["x-custom"], "kept");

    let plain = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let mut h2c = plain.h2().await;
    let (_ws, _) = h2c.websocket("/ws", &[]).await.unwrap();
    let seen = upstream.last_seen();
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        format!("localhost:{}", plain.addr.port())
    );
    assert_eq!(seen.headers["x-request-id"].len(), 32, "a generated id");
}

/// The upstream's 101 headers reach the h2 client in the 200 (Set-Cookie included), less
/// the hop-by-hop ones and the handshake headers the gate sets itself.
#[tokio::test]
async fn the_upstreams_101_headers_reach_the_h2_client() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let (mut ws, headers) = h2.websocket("/ws", &[]).await.unwrap();
    let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
    assert_eq!(
        cookies,
        ["io=abc123; Path=/; HttpOnly", "affinity=pod-7; Path=/"]
    );
    assert_eq!(headers["x-upstream"], "yes");
    assert_eq!(headers["sec-websocket-trace"], "t-1");
    for absent in [
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "connection",
        "upgrade",
        "sec-websocket-accept",
    ] {
        assert!(headers.get(absent).is_none(), "{absent}: {headers:?}");
    }
    echoes(&mut ws, "ok").await;
}

/// The operator API treats a stream as a connection: listed with `protocol: "h2"`, and a
/// revocation closes the revoked subject's stream with 1008 "revoked" (upstream 1001) while
/// another subject's stream on the same HTTP/2 connection echoes on; then the connection
/// gets GOAWAY (it takes no new stream, and ends once the other stream has), and the
/// subject's next extended CONNECT, on a new connection, is refused with 401
/// `token_revoked`.
#[tokio::test]
async fn a_revocation_closes_one_h2_stream_and_spares_its_neighbour() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&token_policy(&upstream, "", ROOMY)).await;
    let alice = bearer(&hs256("alice"));
    let bob = bearer(&hs256("bob"));
    let mut h2 = gate.h2().await;
    let (mut alice_ws, _) = h2
        .websocket("/ws", &[("authorization", alice.as_str())])
        .await
        .unwrap();
    let (mut bob_ws, _) = h2
        .websocket("/ws", &[("authorization", bob.as_str())])
        .await
        .unwrap();
    echoes(&mut alice_ws, "before").await;

    let (status, listing) = operator(
        gate.admin,
        "GET",
        "/connections?sub=alice",
        serde_json::Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{listing}");
    assert_eq!(listing["total"], 1, "{listing}");
    assert_eq!(listing["connections"][0]["protocol"], "h2", "{listing}");
    assert_eq!(listing["connections"][0]["messages_in"], 1, "{listing}");

    let (status, answer) = operator(
        gate.admin,
        "POST",
        "/revocations",
        serde_json::json!({"sub": "alice", "ttl_seconds": 60}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["closed"], 1, "{answer}");
    assert_eq!(close_of(&mut alice_ws).await, (1008, "revoked".to_owned()));
    assert_eq!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, String::new())
    );
    echoes(&mut bob_ws, "still here").await;
    let mut fresh = gate.h2().await;
    let headers = fresh
        .refused(
            "/ws",
            &[("authorization", alice.as_str())],
            401,
            "token_revoked",
        )
        .await;
    assert_eq!(headers["www-authenticate"], INVALID_TOKEN_CHALLENGE);
    echoes(&mut bob_ws, "and still").await;
    // GOAWAY was sent: the connection ends as soon as bob's stream has (an HTTP/2
    // connection is otherwise kept for a minute of idleness).
    assert!(h2.ended_within(Duration::from_millis(50)).await.is_none());
    bob_ws.close(None).await.unwrap();
    while futures_util::StreamExt::next(&mut bob_ws).await.is_some() {}
    assert_eq!(
        h2.ended_within(Duration::from_secs(5)).await,
        Some(Ok(())),
        "the connection did not end after its last stream: no GOAWAY"
    );
}
