//! Plain HTTP on `http: pass` routes goes through the same admission as an upgrade (IP,
//! Origin when sent, token and claims when the route requires them), without the upgrade
//! rate or the caps; token carriers are removed on the way, unless `forward_token` keeps
//! the verified one. And the upstream's 101 headers reach the client.

mod support;

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// A pass route `/app` requiring an HS256 token (the `secret` file TestGate writes), with
/// an Origin allowlist and `forward_claims`; `auth_extra` is added to its auth.
fn pass_policy(upstream: &Upstream, auth_extra: &str) -> String {
    format!(
        "version: 1\n\
         defaults:\n  \
           upstream: {}\n  \
           rate: {{upgrades_per_second: 1, burst: 1, max_connections_per_ip: 1}}\n\
         routes:\n  \
           - path: /app\n    \
             http: pass\n    \
             origin: {{allow: [\"https://app.example.com\"]}}\n    \
             auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}], forward_claims: {{sub: X-Auth-Subject}}{auth_extra}}}\n  \
           - path: /public\n    \
             http: pass\n    \
             auth: {{required: false}}\n",
        upstream.url()
    )
}

/// Status line and the JSON `error` (if the body is JSON) of a raw request's answer.
async fn send(gate: &TestGate, head: &str) -> (u16, Option<String>, String) {
    let response = gate.raw(head.as_bytes()).await;
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no answer to {head:?}: {response:?}"));
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let error = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned));
    (status, error, response)
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n")
}

/// A request whose body cannot be read is the client's fault: 400 `bad_request`, not the
/// upstream's 502 (nginx: "client sent invalid chunked body"). A later request on a kept
/// connection is held to the same transfer codings as the first.
#[tokio::test]
async fn a_malformed_request_body_or_coding_is_400_not_the_upstreams_fault() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, "")).await;
    for body in ["zz\r\nabc\r\n0\r\n\r\n", "3\r\nabcXX0\r\n\r\n"] {
        let head = format!(
            "POST /public/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}"
        );
        let (status, error, response) = send(&gate, &head).await;
        assert_eq!(
            (status, error.as_deref()),
            (400, Some("bad_request")),
            "{body:?}: {response}"
        );
    }
    let kept = "GET /public/a HTTP/1.1\r\nHost: localhost\r\n\r\n\
                POST /public/b HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n";
    let response = gate.raw(kept.as_bytes()).await;
    let (first, second) = response
        .split_once("HTTP/1.1 400")
        .unwrap_or_else(|| panic!("no 400 for the second request: {response}"));
    assert!(first.starts_with("HTTP/1.1 200"), "{response}");
    assert!(second.contains("\"bad_request\""), "{response}");
    assert_eq!(upstream.last_seen().target, "/public/a");
}

/// A head pipelined behind the first in one write is held to the same 16 KiB as the first:
/// the JSON 431, and nothing of it upstream; one of exactly 16 KiB goes through.
#[tokio::test]
async fn a_pipelined_head_over_16_kib_is_431() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, "")).await;
    let first = "GET /public/a HTTP/1.1\r\nHost: localhost\r\n\r\n";
    // `GET /public/b HTTP/1.1` + Host + Connection + X-Pad + the blank line.
    let fixed =
        "GET /public/b HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Pad: \r\n\r\n".len();
    for (size, expected) in [(16 * 1024, "HTTP/1.1 200"), (16 * 1024 + 1, "HTTP/1.1 431")] {
        let pad = "p".repeat(size - fixed);
        let second = format!(
            "GET /public/b HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Pad: {pad}\r\n\r\n"
        );
        assert_eq!(second.len(), size);
        let response = gate.raw(format!("{first}{second}").as_bytes()).await;
        let (one, two) = response[12..]
            .split_once("HTTP/1.1 ")
            .unwrap_or_else(|| panic!("one answer only: {response}"));
        assert!(response.starts_with("HTTP/1.1 200"), "{one}");
        assert!(
            format!("HTTP/1.1 {two}").starts_with(expected),
            "{size}: {two}"
        );
        if expected.ends_with("431") {
            assert!(two.contains("\"bad_request\""), "{two}");
            assert_eq!(upstream.last_seen().target, "/public/a");
        } else {
            assert_eq!(upstream.last_seen().target, "/public/b");
        }
    }
}

/// Read the kept-alive connection's answers until `expected` has come (the echo upstream
/// names the request it answered); fails if the connection closes first.
async fn read_until(stream: &mut (impl tokio::io::AsyncRead + Unpin), expected: &str) {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    while !String::from_utf8_lossy(&answer).contains(expected) {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        assert!(
            n > 0,
            "{expected}: closed: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&chunk[..n]);
    }
}

/// A later head sent after the first answer is held to the same 16 KiB: the JSON 431 just
/// past it, counted, and nothing of it upstream (hyper's own bare 431 comes only past
/// 32 KiB).
#[tokio::test]
async fn a_later_head_over_16_kib_is_the_json_431() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, "")).await;
    let fixed =
        "GET /public/b HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Pad: \r\n\r\n".len();
    for (size, expected) in [
        (16 * 1024, "HTTP/1.1 200"),
        (16 * 1024 + 1, "HTTP/1.1 431"),
        (24 * 1024, "HTTP/1.1 431"),
    ] {
        let mut tcp = gate.stream().await;
        tcp.write_all(b"GET /public/a HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut tcp, "pass GET /public/a").await;
        let pad = "p".repeat(size - fixed);
        let second = format!(
            "GET /public/b HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Pad: {pad}\r\n\r\n"
        );
        assert_eq!(second.len(), size);
        tcp.write_all(second.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let read = tcp.read_to_end(&mut out);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), read).await;
        let two = String::from_utf8_lossy(&out);
        assert!(two.starts_with(expected), "{size}: {two}");
        if expected.ends_with("431") {
            assert!(two.contains("\"bad_request\""), "{size}: {two}");
            assert_eq!(upstream.last_seen().target, "/public/a");
        } else {
            assert_eq!(upstream.last_seen().target, "/public/b");
        }
    }
    let counted = gate
        .metric(r#"wsgate_upgrades_total{route="none",result="bad_request"}"#)
        .await;
    assert_eq!(counted, 2.0, "the two JSON 431s are counted");
}

/// A later head with more than 100 fields gets the same JSON 431 as a first one (hyper's
/// own cap, higher, would answer a bare 431), pipelined or sent after the first answer.
#[tokio::test]
async fn a_later_head_over_100_fields_is_the_json_431() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, "")).await;
    let first = "GET /public/a HTTP/1.1\r\nHost: localhost\r\n\r\n";
    for (fields, expected) in [
        // The upstream (hyper) takes 100 fields, the gate's forwarding headers included.
        (90, "HTTP/1.1 200"),
        (101, "HTTP/1.1 431"),
        (150, "HTTP/1.1 431"),
    ] {
        // Host and Connection are two of them.
        let more: String = (2..fields).map(|i| format!("X-{i}: v\r\n")).collect();
        let second =
            format!("GET /public/b HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{more}\r\n");
        let response = gate.raw(format!("{first}{second}").as_bytes()).await;
        let (_, two) = response[12..]
            .split_once("HTTP/1.1 ")
            .unwrap_or_else(|| panic!("one answer only: {response}"));
        let two = format!("HTTP/1.1 {two}");
        assert!(two.starts_with(expected), "{fields} fields: {two}");
        if expected.ends_with("431") {
            assert!(two.contains("\"bad_request\""), "{fields} fields: {two}");
        }
    }
}

#[tokio::test]
async fn a_plain_request_without_a_token_is_401_and_never_reaches_the_app() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, "")).await;
    let (status, error, response) =
        send(&gate, &get("/app/socket.io/?EIO=4&transport=polling", "")).await;
    assert_eq!(
        (status, error.as_deref()),
        (401, Some("missing_token")),
        "{response}"
    );
    assert!(
        response.contains("WWW-Authenticate: Bearer")
            || response.contains("www-authenticate: Bearer"),
        "{response}"
    );
    let bad = hs256_with(
        "another-secret-another-secret-another-secret",
        serde_json::json!({"sub": "x", "exp": unix_now() + 60}),
    );
    let (status, error, _) = send(
        &gate,
        &get("/app/x", &format!("Authorization: Bearer {bad}\r\n")),
    )
    .await;
    assert_eq!((status, error.as_deref()), (401, Some("invalid_token")));
    assert_eq!(upstream.seen_count(), 0);
}

#[tokio::test]
async fn a_plain_request_with_a_token_reaches_the_app_with_the_identity_not_the_token() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, "")).await;
    let token = hs256("alice");
    let head = get(
        &format!("/app/page?access_token={token}&x=1"),
        &format!("Authorization: Bearer {token}\r\nCookie: access_token={token}; theme=dark\r\nX-Auth-Subject: mallory\r\n"),
    );
    let (status, _, response) = send(&gate, &head).await;
    assert_eq!(status, 200, "{response}");
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/app/page?x=1");
    assert_eq!(seen.headers["x-auth-subject"], "alice");
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(seen.headers["cookie"], "theme=dark");

    // A bearer value after a tab is no token to the gate, but one to an app that splits on
    // any whitespace (DRF, SimpleJWT): it never goes upstream either.
    let head = get(
        "/app/page",
        &format!("Authorization: Bearer\tforged\r\nCookie: access_token={token}\r\n"),
    );
    let (status, _, response) = send(&gate, &head).await;
    assert_eq!(status, 200, "{response}");
    assert!(upstream.last_seen().headers.get("authorization").is_none());
}

/// A public pass route reads no token from a plain request: with `forward_token: true`
/// the carriers reach the upstream, which verifies them itself; with `false` they never do.
#[tokio::test]
async fn a_public_route_forwarding_tokens_leaves_a_plain_requests_carriers_alone() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\nroutes:\n  - path: /api\n    http: pass\n    auth: {{required: false, forward_token: true}}\n  - path: /public\n    http: pass\n    auth: {{required: false}}\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let carriers =
        "Authorization: Bearer opaque-for-the-app\r\nCookie: access_token=c; theme=dark\r\n";
    let (status, _, response) = send(&gate, &get("/api/x?access_token=q&x=1", carriers)).await;
    assert_eq!(status, 200, "{response}");
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/api/x?access_token=q&x=1");
    assert_eq!(seen.headers["authorization"], "Bearer opaque-for-the-app");
    assert_eq!(seen.headers["cookie"], "access_token=c; theme=dark");
    let (status, _, response) = send(&gate, &get("/public/x?access_token=q&x=1", carriers)).await;
    assert_eq!(status, 200, "{response}");
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/public/x?x=1");
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(seen.headers["cookie"], "theme=dark");
}

#[tokio::test]
async fn forward_token_keeps_the_verified_carrier_only() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, ", forward_token: true")).await;
    let token = hs256("alice");
    let head = get(
        "/app/page?access_token=stale&x=1",
        &format!("Authorization: Bearer {token}\r\n"),
    );
    let (status, _, response) = send(&gate, &head).await;
    assert_eq!(status, 200, "{response}");
    let seen = upstream.last_seen();
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {token}").as_str()
    );
    // The other carrier did not hold the verified token: removed as always.
    assert_eq!(seen.target, "/app/page?x=1");
    // A second bearer field is not the token the gate verified: it never goes upstream.
    let head = get(
        "/app/page",
        &format!("Authorization: Bearer {token}\r\nAuthorization: Bearer unchecked\r\n"),
    );
    let (status, _, response) = send(&gate, &head).await;
    assert_eq!(status, 200, "{response}");
    let seen = upstream.last_seen();
    let authorization: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(authorization, [format!("Bearer {token}").as_str()]);

    // On an upgrade the same: the verified query token stays, the upstream verifies it.
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow_missing: true}}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}], forward_token: true}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let (mut client, _) = gate
        .connect(&format!("/ws?access_token={token}"))
        .await
        .unwrap();
    client.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("hi"));
    assert_eq!(
        upstream.last_seen().target,
        format!("/ws?access_token={token}")
    );

    // A second copy of the carrier is not the token the gate verified: an upstream that
    // reads the last one (Django, PHP, Rack) must never see it.
    let (mut client, _) = gate
        .connect(&format!(
            "/ws?access_token={token}&x=1&access_token=unchecked&access%5Ftoken=unchecked"
        ))
        .await
        .unwrap();
    client.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("hi"));
    assert_eq!(
        upstream.last_seen().target,
        format!("/ws?access_token={token}&x=1")
    );
}

#[tokio::test]
async fn a_plain_request_is_checked_for_origin_only_when_it_sends_one() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, "")).await;
    let auth = format!("Authorization: Bearer {}\r\n", hs256("alice"));
    let (status, error, _) = send(
        &gate,
        &get(
            "/app/x",
            &format!("{auth}Origin: https://evil.example.org\r\n"),
        ),
    )
    .await;
    assert_eq!(
        (status, error.as_deref()),
        (403, Some("origin_not_allowed"))
    );
    let (status, _, _) = send(
        &gate,
        &get(
            "/app/x",
            &format!("{auth}Origin: https://app.example.com\r\n"),
        ),
    )
    .await;
    assert_eq!(status, 200);
    // A navigation sends no Origin.
    let (status, _, _) = send(&gate, &get("/app/x", &auth)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn plain_requests_are_not_held_to_the_upgrade_rate_or_the_caps() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, "")).await;
    // A page load is dozens of requests: the upgrade rate here is 1/s with a burst of 1.
    for _ in 0..20 {
        let (status, _, response) = send(&gate, &get("/public/asset.js", "")).await;
        assert_eq!(status, 200, "{response}");
    }
}

#[tokio::test]
async fn the_upstreams_101_headers_reach_the_client() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut client, response) = gate.connect("/ws").await.unwrap();
    let headers = response.headers();
    let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
    assert_eq!(
        cookies,
        ["io=abc123; Path=/; HttpOnly", "affinity=pod-7; Path=/"]
    );
    assert_eq!(headers["x-upstream"], "yes");
    // A `Sec-WebSocket-*` header the gate does not set itself goes on too.
    assert_eq!(headers["sec-websocket-trace"], "t-1");
    // Hop-by-hop ones do not, and the handshake headers are the gate's own, once.
    assert!(headers.get("x-hop").is_none(), "{headers:?}");
    assert!(headers.get("keep-alive").is_none(), "{headers:?}");
    assert!(headers.get("proxy-connection").is_none(), "{headers:?}");
    assert_eq!(headers.get_all("sec-websocket-accept").iter().count(), 1);
    assert_eq!(headers.get_all("connection").iter().count(), 1);
    client.send(Message::text("ok")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("ok"));
}

/// An HTTP/1.1 request without Host is refused, 400 (RFC 9112 §3.2), as nginx refuses it;
/// an HTTP/1.0 one need not send Host.
#[tokio::test]
async fn a_redirect_to_the_apps_own_address_becomes_a_path_on_the_gate() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, "")).await;
    let (status, _, response) = send(&gate, &get("/public/old", "")).await;
    assert_eq!(status, 302, "{response}");
    // The app wrote `http://127.0.0.1:PORT/app/new?from=old`, an address only the gate
    // can reach.
    assert!(
        response.contains("\r\nlocation: /app/new?from=old\r\n"),
        "{response}"
    );
    assert!(!response.contains(&upstream.addr.to_string()), "{response}");
}

#[tokio::test]
async fn an_http_1_1_request_without_host_is_400() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\nroutes:\n  - path: /app\n    http: pass\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let (status, error, _) = send(&gate, "GET /app/x HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!((status, error.as_deref()), (400, Some("bad_request")));
    let (status, _, response) = send(&gate, "GET /app/x HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200, "{response}");
}

/// A raw upstream that answers each connection's first request with `answer(its request
/// line)` ([`support::raw_http_upstream`]), and a gate whose route `/app` passes plain
/// requests to it.
async fn raw_upstream(
    answer: fn(&str) -> &'static [u8],
) -> (TestGate, tokio::task::JoinHandle<()>) {
    let (addr, server) = support::raw_http_upstream(answer).await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: ws://{addr}\n  auth: {{required: false}}\nroutes:\n  - path: /app\n    http: pass\n"
    );
    (TestGate::start(&policy).await, server)
}

/// An upstream that answers the first request of each connection and keeps it alive, then
/// closes the connection under the next request without answering: a kept-alive
/// connection it gave up just as the gate used it again. A request without a body, of an
/// idempotent method, is sent once more on a new connection (as nginx does); one with a
/// body is not, and is 502.
#[tokio::test]
async fn a_kept_alive_upstream_connection_closed_under_a_get_is_tried_once_more() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = Vec::new();
                for answered in [true, false] {
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    got.clear();
                    if !answered {
                        return;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if tcp.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: ws://{addr}\n  auth: {{required: false}}\nroutes:\n  - path: /app\n    http: pass\n"
    );
    let gate = TestGate::start(&policy).await;
    for _ in 0..3 {
        let (status, _, response) = send(&gate, &get("/app/x", "")).await;
        assert_eq!(status, 200, "{response}");
    }
    let post = "POST /app/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi";
    let (status, error, response) = send(&gate, post).await;
    assert_eq!(
        (status, error.as_deref()),
        (502, Some("upstream_unavailable")),
        "{response}"
    );
    // Each GET after the first met a connection given up and went out again on a new one.
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 3);
    server.abort();
}

/// The gate answers in its own HTTP version (RFC 9110 §6.2), whatever the upstream
/// spoke: an HTTP/1.0 app's answer does not end the client's kept-alive connection.
#[tokio::test]
async fn an_http_1_0_upstreams_answer_goes_out_as_http_1_1() {
    let (gate, server) =
        raw_upstream(|_| b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello").await;
    let (status, _, response) = send(&gate, &get("/app/x", "")).await;
    assert_eq!(status, 200, "{response}");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    server.abort();
}

/// An HTTP/1.0 client that asked to keep its connection is told `Connection: close` when
/// its answer has no length (HTTP/1.0 has no chunks: the end of the connection is the end
/// of the body), as nginx tells it, not `keep-alive` before a close.
#[tokio::test]
async fn an_http_1_0_answer_without_a_length_says_the_connection_closes() {
    let (gate, server) = raw_upstream(|_| {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    })
    .await;
    let (status, _, response) = send(
        &gate,
        "GET /app/x HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{response}");
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.0 200"), "{head}");
    assert!(head.contains("\r\nconnection: close"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");
    assert_eq!(body, "hello");
    server.abort();
}

/// An upstream that answers before it has read the request's body (its own 502, here):
/// its answer reaches the client at once, the rest of the body is read and discarded (not
/// taken for a next request), and the connection carries the next request, as nginx's
/// does. Closing it instead would catch a client such as Python's `http.client` sending
/// its next request into the close.
#[tokio::test]
async fn an_answer_before_the_body_is_read_leaves_the_connection_usable() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gate, server) =
        raw_upstream(|_| b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 4\r\n\r\nbusy").await;
    let mut stream = gate.stream().await;
    let size = 8 << 20;
    let chunk = vec![b'x'; 64 * 1024];
    stream
        .write_all(
            format!(
                "POST /app/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {size}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream.write_all(&chunk).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read_until_busy =
        async |stream: &mut ClientStream, response: &mut Vec<u8>, n: usize| {
            while response.windows(4).filter(|w| w == b"busy").count() < n {
                match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => response.extend_from_slice(&buf[..n]),
                    other => panic!(
                        "no whole answer ({other:?}): {:?}",
                        String::from_utf8_lossy(response)
                    ),
                }
            }
        };
    read_until_busy(&mut stream, &mut response, 1).await;
    let first = String::from_utf8_lossy(&response).to_ascii_lowercase();
    assert!(first.starts_with("http/1.1 502"), "{first}");
    assert!(!first.contains("connection: close"), "{first}");
    // The rest of the body, then a second request on the same connection.
    for _ in 1..size / chunk.len() {
        stream.write_all(&chunk).await.unwrap();
    }
    stream
        .write_all(b"GET /app/again HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    read_until_busy(&mut stream, &mut response, 2).await;
    let both = String::from_utf8_lossy(&response).to_ascii_lowercase();
    assert_eq!(both.matches("http/1.1 502").count(), 2, "{both}");
    server.abort();
}

/// An upstream that streams: it answers at once and echoes the body as it reads it, to
/// its end. The connection is kept alive for the next request (nothing was left unread).
#[tokio::test]
async fn a_streaming_upstreams_answer_keeps_the_connection_alive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut held = Vec::new();
                loop {
                    // One request: its head (with a Content-Length), answered at once.
                    let end = loop {
                        if let Some(end) = held.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                        match tcp.read(&mut buf).await {
                            Ok(n) if n > 0 => held.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    };
                    let head = String::from_utf8_lossy(&held[..end]).to_ascii_lowercase();
                    let mut left: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap_or(0));
                    held.drain(..end);
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                        .await;
                    while left > 0 {
                        if held.is_empty() {
                            match tcp.read(&mut buf).await {
                                Ok(n) if n > 0 => held.extend_from_slice(&buf[..n]),
                                _ => return,
                            }
                        }
                        let take = left.min(held.len());
                        let chunk: Vec<u8> = held.drain(..take).collect();
                        left -= take;
                        let _ = tcp.write_all(format!("{take:x}\r\n").as_bytes()).await;
                        let _ = tcp.write_all(&chunk).await;
                        let _ = tcp.write_all(b"\r\n").await;
                    }
                    let _ = tcp.write_all(b"0\r\n\r\n").await;
                }
            });
        }
    });
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: ws://{addr}\n  auth: {{required: false}}\nroutes:\n  - path: /app\n    http: pass\n"
    );
    let gate = TestGate::start(&policy).await;
    let mut stream = gate.stream().await;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    for (i, size) in [100, 300_000, 5].into_iter().enumerate() {
        stream
            .write_all(
                format!(
                    "POST /app/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: {size}\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        stream.write_all(&vec![b'x'; size]).await.unwrap();
        while response.windows(5).filter(|w| w == b"0\r\n\r\n").count() <= i {
            match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => response.extend_from_slice(&buf[..n]),
                other => panic!("request {i}: no whole answer ({other:?})"),
            }
        }
    }
    let text = String::from_utf8_lossy(&response).to_ascii_lowercase();
    assert_eq!(text.matches("http/1.1 200").count(), 3);
    assert!(!text.contains("connection: close"));
    assert_eq!(text.matches('x').count(), 300_105);
    server.abort();
}

/// An upstream that answers a plain request with 101 opens nothing: 502, not a bare 101.
#[tokio::test]
async fn a_101_to_a_plain_request_is_502() {
    let (gate, server) = raw_upstream(|_| {
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: tunnel\r\n\r\n"
    })
    .await;
    let (status, error, response) = send(&gate, &get("/app/x", "")).await;
    assert_eq!(
        (status, error.as_deref()),
        (502, Some("upstream_unavailable")),
        "{response}"
    );
    server.abort();
}

/// An upstream response framed two ways (Content-Length and Transfer-Encoding), or with a
/// transfer coding other than chunked, is 502, as nginx answers it (the client would get
/// a length its body does not have, or gzip bytes unlabelled); a Content-Length list of
/// one repeated value reaches the client as that one value. A status past 599 (RFC 9110
/// §15) is 502 too.
#[tokio::test]
async fn an_upstream_response_framed_ambiguously_is_502() {
    let (gate, server) = raw_upstream(|line| {
        if line.contains("/app/both") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        } else if line.contains("/app/gzip") {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        } else if line.contains("/app/999") {
            b"HTTP/1.1 999 Weird\r\nContent-Length: 5\r\n\r\nhello"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello"
        }
    })
    .await;
    for path in ["/app/both", "/app/gzip", "/app/999"] {
        let (status, error, response) = send(&gate, &get(path, "")).await;
        assert_eq!(
            (status, error.as_deref()),
            (502, Some("upstream_unavailable")),
            "{path}: {response}"
        );
    }
    let (status, _, response) = send(&gate, &get("/app/list", "")).await;
    assert_eq!(status, 200, "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("content-length: 5\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nhello"), "{response}");
    server.abort();
}

/// A client that stops reading a response is dropped after `write_seconds`, and the
/// upstream's connection with it (nginx's `send_timeout`): neither is held for ever.
#[tokio::test]
async fn a_client_that_stops_reading_a_response_is_dropped() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Bytes the upstream wrote before its connection failed; u64::MAX while it writes.
    let written = Arc::new(AtomicU64::new(u64::MAX));
    let seen = written.clone();
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = [0u8; 4096];
        let _ = tcp.read(&mut head).await;
        let _ = tcp
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
            .await;
        let chunk = vec![b'x'; 64 * 1024];
        let mut total = 0u64;
        while tcp.write_all(&chunk).await.is_ok() {
            total += chunk.len() as u64;
        }
        seen.store(total, Ordering::SeqCst);
    });
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: ws://{addr}\n  auth: {{required: false}}\n  timeouts: {{write_seconds: 1}}\nroutes:\n  - path: /app\n    http: pass\n"
    );
    let gate = TestGate::start_with(&policy, false).await;
    let mut client = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    client
        .write_all(b"GET /app/big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    // Read nothing. The gate's writes stall once the socket buffers are full.
    let started = std::time::Instant::now();
    while written.load(Ordering::SeqCst) == u64::MAX {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "the upstream is still being read for a client that reads nothing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    eprintln!(
        "upstream cut after {:?}, {} bytes",
        started.elapsed(),
        written.load(Ordering::SeqCst)
    );
    // The client's connection is closed too: reading it to the end finishes.
    let mut sink = vec![0u8; 1 << 20];
    let drained = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the client's connection stayed open");
    server.abort();
}

/// An upgrade that follows a plain request on a kept-alive connection is timed from its
/// own request, not from the TCP accept: the pause between is not upgrade latency.
#[tokio::test]
async fn an_upgrade_after_a_kept_alive_request_is_timed_from_its_own_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), "    http: pass\n"), false).await;
    let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    tcp.write_all(b"GET /ws/page HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut tcp, "pass GET /ws/page").await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    let sum = gate.metric("wsgate_upgrade_duration_seconds_sum").await;
    assert!(
        sum > 0.0 && sum < 1.0,
        "the upgrade took {sum} s by the histogram"
    );
}

/// A kept-alive connection gets `handshake_seconds` to send each next head, however long
/// its first one took: a first request sent late does not shorten the wait for the next.
#[tokio::test]
async fn a_late_first_request_leaves_the_next_its_whole_handshake_time() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(
        &open_policy(
            &upstream.url(),
            "    http: pass\n    timeouts: {handshake_seconds: 2}\n",
        ),
        false,
    )
    .await;
    let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    // Two requests, the first 1.5 s after the accept, the second 1 s after its answer.
    for (pause, path) in [(1500, "/ws/one"), (1000, "/ws/two")] {
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_until(&mut tcp, &format!("pass GET {path}")).await;
    }
}

/// A kept-alive connection idle for `handshake_seconds` is closed gracefully: over TLS with
/// close_notify, so that a strict client's pool sees the connection end, not a truncation.
#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_with_close_notify() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let policy = open_policy(
        &upstream.url(),
        "    http: pass\n    timeouts: {handshake_seconds: 1}\n",
    );
    let gate = TestGate::start(&policy).await;
    let mut tls = gate.stream().await;
    tls.write_all(b"GET /ws/page HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut tls, "pass GET /ws/page").await;
    let idle = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tls.read_to_end(&mut rest),
    )
    .await
    .expect("the idle connection was not closed");
    // Without close_notify, rustls reports the end as `UnexpectedEof`.
    assert!(read.is_ok(), "{read:?}");
    let took = idle.elapsed();
    assert!(
        took > std::time::Duration::from_millis(800)
            && took < std::time::Duration::from_millis(2500),
        "closed after {took:?}"
    );
}
