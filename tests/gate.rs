//! End to end through the real gate over TLS: relay, close codes, size limits, the
//! upstream's answers, routing and malformed requests.

mod support;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn echoes_text_and_binary_over_tls() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut client, response) = gate.connect("/ws/room?x=1").await.unwrap();
    assert_eq!(response.status(), 101);
    client.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("hello"));
    client
        .send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut client).await,
        Message::binary(vec![0u8, 1, 2, 255])
    );
    assert_eq!(upstream.last_seen().target, "/ws/room?x=1");
}

#[tokio::test]
async fn client_close_code_and_reason_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client
        .close(Some(CloseFrame {
            code: CloseCode::from(4000),
            reason: "bye now".into(),
        }))
        .await
        .unwrap();
    // The gate completes the client's close handshake...
    let (code, reason) = next_close(&mut client).await;
    assert_eq!((code, reason.as_str()), (4000, "bye now"));
    // ...and relays code and reason upstream.
    assert_eq!(
        upstream.wait_ended(0).await,
        Ended::Close(4000, "bye now".into())
    );
}

#[tokio::test]
async fn upstream_close_code_and_reason_reach_the_client() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client
        .send(Message::text("close 4001 all done"))
        .await
        .unwrap();
    assert_eq!(next_close(&mut client).await, (4001, "all done".into()));
}

#[tokio::test]
async fn oversized_client_message_gets_1009_and_upstream_1001() {
    let upstream = Upstream::start().await;
    let extra = "    messages: {max_frame_bytes: 1024, max_message_bytes: 1024}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client.send(Message::text("small")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("small"));
    client.send(Message::binary(vec![1u8; 2000])).await.unwrap();
    assert_eq!(next_close(&mut client).await.0, 1009);
    assert!(matches!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, _)
    ));
}

/// Browsers and client libraries send each message as one frame: with the built-in limits
/// a 1 MiB message in one frame goes through, and one byte more is 1009.
#[tokio::test]
async fn a_one_mib_message_in_one_frame_passes_with_the_built_in_limits() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    let mib = vec![6u8; 1024 * 1024];
    client.send(Message::binary(mib.clone())).await.unwrap();
    match next_message(&mut client).await {
        Message::Binary(b) => assert!(b == mib, "the echo differs"),
        other => panic!(
            "expected the echo, got a {} byte {:?}",
            other.len(),
            other.is_close()
        ),
    }
    client
        .send(Message::binary(vec![6u8; 1024 * 1024 + 1]))
        .await
        .unwrap();
    assert_eq!(
        next_close(&mut client).await,
        (1009, "message too big".into())
    );
    assert!(matches!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, _)
    ));
}

#[tokio::test]
async fn oversized_message_split_in_small_frames_gets_1009() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
    let upstream = Upstream::start().await;
    let extra = "    messages: {max_frame_bytes: 512, max_message_bytes: 1024}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    // Three 500-byte fragments: each frame is allowed, the message is not.
    for (i, fin) in [(0, false), (1, false), (2, true)] {
        let opcode = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        let header = FrameHeader {
            is_final: fin,
            opcode,
            ..FrameHeader::default()
        };
        let frame = Frame::from_payload(header, vec![3u8; 500].into());
        if client.send(Message::Frame(frame)).await.is_err() {
            break;
        }
    }
    assert_eq!(next_close(&mut client).await.0, 1009);
    assert!(matches!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, _)
    ));
}

#[tokio::test]
async fn oversized_upstream_message_gets_1009_and_client_1001() {
    let upstream = Upstream::start().await;
    let extra = "    messages: {max_frame_bytes: 1024, max_message_bytes: 4096}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client.send(Message::text("big 4000")).await.unwrap();
    assert_eq!(next_message(&mut client).await.len(), 4000);
    client.send(Message::text("big 5000")).await.unwrap();
    assert_eq!(next_close(&mut client).await.0, 1001);
    // The upstream sees 1009 for its oversized message.
    assert!(matches!(
        upstream.wait_ended(0).await,
        Ended::Close(1009, _)
    ));
}

#[tokio::test]
async fn upstream_lost_without_close_gets_1014() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client.send(Message::text("drop")).await.unwrap();
    // tungstenite refuses to parse 1014 (registered after its table), so read the wire.
    assert_eq!(
        raw_close(&mut client).await,
        (1014, "upstream unavailable".into())
    );
}

#[tokio::test]
async fn upstream_down_is_502() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", closed.local_addr().unwrap());
    drop(closed);
    let gate = TestGate::start(&open_policy(&url, "")).await;
    let (status, _, body) = refusal(gate.connect("/ws").await);
    assert_eq!(status, 502);
    assert_eq!(body["error"], "upstream_unavailable");
}

#[tokio::test]
async fn silent_upstream_is_504() {
    let (url, held) = silent_upstream().await;
    let extra = "    timeouts: {upstream_connect_seconds: 0.5}\n";
    let gate = TestGate::start(&open_policy(&url, extra)).await;
    let started = std::time::Instant::now();
    let (status, _, body) = refusal(gate.connect("/ws").await);
    assert_eq!(status, 504);
    assert_eq!(body["error"], "upstream_timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    held.abort();
}

#[tokio::test]
async fn upstream_refusal_is_relayed_with_its_body() {
    let upstream = Upstream::start_with(UpstreamOptions {
        refuse: Some((403, "not for you")),
        ..Default::default()
    })
    .await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (status, headers, body) = refusal(gate.connect("/ws").await);
    assert_eq!(status, 403);
    assert_eq!(body, serde_json::Value::String("not for you".into()));
    assert_eq!(headers["content-type"], "text/plain");
    // Its end-to-end headers too (a redirect to a login page, a cookie), as nginx and
    // Envoy relay them; not its hop-by-hop or handshake headers, and the framing is the
    // gate's. The redirect pointed at the app's own address (`http://127.0.0.1:PORT/login`):
    // it becomes a path on the gate's origin, as nginx's `proxy_redirect default` does.
    assert_eq!(headers["location"], "/login");
    assert_eq!(headers["set-cookie"], "next=/ws; Path=/");
    assert_eq!(headers["cache-control"], "no-store");
    assert!(headers.get("keep-alive").is_none(), "{headers:?}");
    assert!(headers.get("proxy-connection").is_none(), "{headers:?}");
    assert!(
        headers.get("sec-websocket-version").is_none(),
        "{headers:?}"
    );
    assert_eq!(headers["content-length"], "11");
}

/// An upstream refusal's body is relayed up to 64 KiB: a longer one (by Content-Length) is
/// cut there, and the client's Content-Length says what it gets.
#[tokio::test]
async fn upstream_refusal_body_is_cut_at_64_kib() {
    let long: &'static str = Box::leak("x".repeat(100 * 1024).into_boxed_str());
    let upstream = Upstream::start_with(UpstreamOptions {
        refuse: Some((403, long)),
        ..Default::default()
    })
    .await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    // Read raw: a WebSocket client keeps only the body bytes of its first read.
    let answer = gate
        .raw(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 65536"),
        "{head}"
    );
    assert_eq!(body.len(), 64 * 1024);
    assert!(body.bytes().all(|b| b == b'x'));
}

#[tokio::test]
async fn subprotocol_chosen_by_the_upstream_is_returned() {
    let upstream = Upstream::start_with(UpstreamOptions {
        protocol: Some("v2.chat"),
        ..Default::default()
    })
    .await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut request = gate.request("/ws");
    request
        .headers_mut()
        .insert("sec-websocket-protocol", header_value("v1.chat, v2.chat"));
    let (mut client, response) = gate.connect_request(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "v2.chat");
    assert_eq!(
        upstream.last_seen().headers["sec-websocket-protocol"],
        "v1.chat, v2.chat"
    );
    client.send(Message::text("ok")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("ok"));
}

#[tokio::test]
async fn forwarded_headers_follow_the_spec() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut request = gate.request("/ws/a?b=c");
    let h = request.headers_mut();
    h.insert("x-forwarded-for", header_value("6.6.6.6"));
    h.insert("x-request-id", header_value("req-42"));
    h.insert(
        "traceparent",
        header_value("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    );
    h.insert("x-custom", header_value("kept"));
    let (_client, _) = gate.connect_request(request).await.unwrap();
    let seen = upstream.last_seen();
    // Not a trusted proxy: the client's X-Forwarded-For is replaced by the peer.
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        format!("localhost:{}", gate.addr.port())
    );
    assert_eq!(seen.headers["x-request-id"], "req-42");
    assert_eq!(
        seen.headers["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(seen.headers["x-custom"], "kept");
    assert_eq!(seen.target, "/ws/a?b=c");
    // Without a client id, one is generated.
    let (_c2, _) = gate.connect("/ws").await.unwrap();
    let id = upstream.last_seen().headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 32);
}

#[tokio::test]
async fn trusted_proxy_forwarded_for_is_extended() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "trusted_proxies: [127.0.0.1/32]\n{}",
        open_policy(&upstream.url(), "")
    );
    let gate = TestGate::start(&policy).await;
    let mut request = gate.request("/ws");
    request
        .headers_mut()
        .insert("x-forwarded-for", header_value("203.0.113.7"));
    let (_client, _) = gate.connect_request(request).await.unwrap();
    assert_eq!(
        upstream.last_seen().headers["x-forwarded-for"],
        "203.0.113.7, 127.0.0.1"
    );

    // A chain in several fields (a client's forged one, then its proxy's own, as HAProxy's
    // `option forwardfor` adds it) reaches the upstream whole: the app sees the address
    // the gate admitted, not only the first field's.
    let mut request = gate.request("/ws");
    let headers = request.headers_mut();
    headers.append("x-forwarded-for", header_value("8.8.8.8"));
    headers.append("x-forwarded-for", header_value("198.51.100.9"));
    let (_client, _) = gate.connect_request(request).await.unwrap();
    assert_eq!(
        upstream.last_seen().headers["x-forwarded-for"],
        "8.8.8.8, 198.51.100.9, 127.0.0.1"
    );
    assert_eq!(
        upstream
            .last_seen()
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .count(),
        1
    );
}

/// X-Forwarded-Proto is the gate's own scheme, unless a trusted proxy in front (a mesh
/// that terminated TLS before a plaintext gate) says which scheme the client used.
#[tokio::test]
async fn forwarded_proto_is_kept_only_from_a_trusted_proxy() {
    let upstream = Upstream::start().await;
    for (trusted, sent, expected) in [
        (true, "https", "https"),
        (true, "HTTP", "http"),
        (true, "gopher", "http"),
        (false, "https", "http"),
    ] {
        let policy = if trusted {
            format!(
                "trusted_proxies: [127.0.0.1/32]\n{}",
                open_policy(&upstream.url(), "")
            )
        } else {
            open_policy(&upstream.url(), "")
        };
        let gate = TestGate::start_with(&policy, false).await;
        let mut request = gate.request("/ws");
        request
            .headers_mut()
            .insert("x-forwarded-proto", header_value(sent));
        let (_client, _) = gate.connect_request(request).await.unwrap();
        assert_eq!(
            upstream.last_seen().headers["x-forwarded-proto"],
            expected,
            "trusted {trusted}, sent {sent}"
        );
    }
}

#[tokio::test]
async fn unknown_path_is_404_no_route() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    for path in ["/other", "/wsx", "/"] {
        let (status, _, body) = refusal(gate.connect(path).await);
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"], "no_route");
    }
    assert_eq!(
        upstream.seen_count(),
        0,
        "a refused client never costs the upstream a socket"
    );
}

#[tokio::test]
async fn longest_prefix_wins_on_whole_segments() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let policy = format!(
        "{}  - path: /ws/special\n    upstream: {}\n",
        open_policy(&a.url(), ""),
        b.url()
    );
    let gate = TestGate::start(&policy).await;
    gate.connect("/ws/special/x").await.unwrap();
    assert_eq!(b.seen_count(), 1);
    gate.connect("/ws/specialist").await.unwrap();
    assert_eq!(a.seen_count(), 1);
}

/// A refusal to an HTTP/1.0 client that asked for keep-alive says `close` alone (not
/// `close, keep-alive`) and closes.
#[tokio::test]
async fn refusals_to_http10_keep_alive_requests_say_close_alone() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    for (request, connection) in [
        (
            "GET /nope HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            "close",
        ),
        (
            "GET /ws HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            "upgrade, close",
        ),
    ] {
        let mut stream = gate.stream().await;
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out));
        assert!(read.await.is_ok(), "{request:?}: the connection was kept");
        let response = String::from_utf8_lossy(&out).to_ascii_lowercase();
        let said: Vec<&str> = response
            .lines()
            .filter_map(|l| l.strip_prefix("connection: "))
            .collect();
        assert_eq!(said, [connection], "{request:?}: {response}");
    }
}

#[tokio::test]
async fn plain_http_on_a_reject_route_is_426() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let response = gate
        .raw(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    assert!(response.starts_with("HTTP/1.1 426"), "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{response}");
    assert!(lower.contains("connection: upgrade, close"), "{response}");
    assert!(lower.contains("sec-websocket-version: 13"), "{response}");
    assert!(
        response.contains("\"error\":\"not_websocket\""),
        "{response}"
    );
}

#[tokio::test]
async fn websocket_version_8_is_426() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let response = gate
        .raw(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await;
    assert!(response.starts_with("HTTP/1.1 426"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{response}"
    );
    assert!(
        response.contains("\"error\":\"not_websocket\""),
        "{response}"
    );
}

#[tokio::test]
async fn malformed_upgrades_are_400_bad_request() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let cases: [&[u8]; 6] = [
        // no key
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
        // a key that is not 16 bytes of base64
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n",
        // two keys, each valid (RFC 6455 §11.3.1: once)
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        // not GET
        b"POST /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 0\r\n\r\n",
        // HTTP/1.0
        b"GET /ws HTTP/1.0\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        // dot segments that an upstream could normalise into another route
        b"GET /ws/../admin HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    ];
    for case in cases {
        let response = gate.raw(case).await;
        assert!(
            response.contains(" 400 "),
            "{}\n{response}",
            String::from_utf8_lossy(case)
        );
        assert!(response.contains("\"error\":\"bad_request\""), "{response}");
    }
    // Each key fault says which it is.
    for (case, message) in cases[..3].iter().zip([
        "Sec-WebSocket-Key is missing",
        "Sec-WebSocket-Key must be 16 bytes in base64",
        "Sec-WebSocket-Key must appear once",
    ]) {
        let response = gate.raw(case).await;
        assert!(response.contains(message), "{message}: {response}");
    }
    assert_eq!(upstream.seen_count(), 0);
}

#[tokio::test]
async fn request_head_over_16_kib_is_431() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let big = "a".repeat(17 * 1024);
    let request = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n");
    let response = gate.raw(request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
}

#[tokio::test]
async fn plain_http_is_proxied_on_a_pass_route() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "{}  - path: /static\n    http: pass\n",
        open_policy(&upstream.url(), "")
    );
    let gate = TestGate::start(&policy).await;
    let response = gate
        .raw(b"POST /static/page?q=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nConnection: close\r\nX-Forwarded-For: 9.9.9.9\r\n\r\nhello")
        .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("pass POST /static/page?q=1\nhello"),
        "{response}"
    );
    assert!(
        response.to_ascii_lowercase().contains("x-upstream: yes"),
        "{response}"
    );
    // Hop-by-hop headers named in the upstream's Connection header are removed.
    assert!(
        !response.to_ascii_lowercase().contains("x-hop"),
        "{response}"
    );
    let seen = upstream.last_seen();
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
}

/// Headers with which Symfony and IIS let a request name another URL than its own are
/// dropped, on upgrades and plain requests: the app would route past the gate's route.
#[tokio::test]
async fn url_override_headers_never_reach_the_app() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "{}  - path: /static\n    http: pass\n",
        open_policy(&upstream.url(), "")
    );
    let gate = TestGate::start(&policy).await;
    let response = gate
        .raw(b"GET /static/page HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Original-URL: /admin\r\nx-rewrite-url: /admin\r\nX-Other: kept\r\n\r\n")
        .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let plain = upstream.last_seen();
    assert_eq!(plain.headers["x-other"], "kept");
    let mut upgrade = gate.request("/ws");
    for name in ["x-original-url", "x-rewrite-url"] {
        upgrade.headers_mut().insert(name, header_value("/admin"));
    }
    let (_client, _) = gate.connect_request(upgrade).await.unwrap();
    for seen in [plain, upstream.last_seen()] {
        assert!(
            seen.headers.get("x-original-url").is_none(),
            "{:?}",
            seen.headers
        );
        assert!(
            seen.headers.get("x-rewrite-url").is_none(),
            "{:?}",
            seen.headers
        );
    }
}

#[tokio::test]
async fn underscored_headers_are_dropped_on_a_pass_route() {
    // CGI, WSGI and Rack read X_Auth_Subject as X-Auth-Subject (CVE-2015-0219).
    let upstream = Upstream::start().await;
    let policy = format!(
        "{}  - path: /static\n    http: pass\n    auth: {{forward_claims: {{sub: X-Auth-Subject}}}}\n",
        open_policy(&upstream.url(), "")
    );
    let gate = TestGate::start(&policy).await;
    let response = gate
        .raw(b"GET /static/page HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX_Auth_Subject: admin\r\nX_Forwarded_For: 6.6.6.6\r\nX-Other: kept\r\n\r\n")
        .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.last_seen();
    assert!(
        seen.headers.keys().all(|name| !name.as_str().contains('_')),
        "{:?}",
        seen.headers
    );
    assert!(seen.headers.get("x-auth-subject").is_none());
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-other"], "kept");
}

#[tokio::test]
async fn health_and_readiness() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    assert_eq!(admin_get(gate.admin, "/healthz").await, 200);
    assert_eq!(admin_get(gate.admin, "/readyz").await, 200);
    gate.running.begin_shutdown();
    assert_eq!(admin_get(gate.admin, "/readyz").await, 503);
    assert_eq!(admin_get(gate.admin, "/healthz").await, 200);
}

#[tokio::test]
async fn shutdown_sends_1001_going_away_to_both_sides() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("hi"));
    gate.running.begin_shutdown();
    assert_eq!(next_close(&mut client).await, (1001, "going away".into()));
    assert_eq!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, "going away".into())
    );
    assert!(gate.running.drain(std::time::Duration::from_secs(5)).await);
    // The listener is closed.
    assert!(tokio::net::TcpStream::connect(gate.addr).await.is_err());
}

#[tokio::test]
async fn many_messages_both_ways_keep_order() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (client, _) = gate.connect("/ws").await.unwrap();
    let (mut tx, mut rx) = client.split();
    let sender = tokio::spawn(async move {
        for i in 0..2000u32 {
            tx.send(Message::binary(i.to_be_bytes().repeat(64)))
                .await
                .unwrap();
        }
        tx
    });
    for i in 0..2000u32 {
        let m = loop {
            match rx.next().await.unwrap().unwrap() {
                Message::Binary(b) => break b,
                _ => continue,
            }
        };
        assert_eq!(&m[..4], &i.to_be_bytes());
        assert_eq!(m.len(), 256);
    }
    drop(sender.await.unwrap());
}

#[tokio::test]
async fn wss_upstream_is_verified_against_upstream_tls_ca_file() {
    let upstream_pki = Pki::generate();
    let upstream = Upstream::start_with(UpstreamOptions {
        tls: Some(std::sync::Arc::new(upstream_pki.server_config())),
        ..Default::default()
    })
    .await;
    // Trusted through ca_file: relayed.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca, &upstream_pki.ca_pem).unwrap();
    let extra = format!("    upstream_tls: {{ca_file: {}}}\n", ca.display());
    let gate = TestGate::start(&open_policy(&upstream.wss_url(), &extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client.send(Message::text("over wss")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("over wss"));
    // `/policy` shows the route's resolved upstream_tls.
    let (_, shown) = admin_fetch(gate.admin, "/policy").await;
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let tls = &shown["routes"][0]["upstream_tls"];
    assert_eq!(tls["ca_file"], ca.display().to_string(), "{shown}");
    assert_eq!(tls["server_name"], "localhost", "{shown}");

    // Without the CA the upstream's certificate is not trusted: 502.
    let untrusted = TestGate::start(&open_policy(&upstream.wss_url(), "")).await;
    let (status, _, body) = refusal(untrusted.connect("/ws").await);
    assert_eq!(status, 502);
    assert_eq!(body["error"], "upstream_unavailable");
}

#[tokio::test]
async fn handshake_deadline_covers_tls_and_the_request_head() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\n  origin: {{allow_missing: true}}\n  timeouts: {{handshake_seconds: 0.5}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let closed_within = |started: std::time::Instant| {
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(3),
            "not dropped in time: {took:?}"
        );
    };
    // No ClientHello at all.
    let started = std::time::Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    closed_within(started);
    // TLS completes, then a request head that never finishes (slowloris).
    let started = std::time::Instant::now();
    let mut stream = gate.stream().await;
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out))
        .await
        .unwrap();
    closed_within(started);
    assert_eq!(upstream.seen_count(), 0);
}

#[tokio::test]
async fn client_that_stops_reading_is_dropped_after_write_seconds() {
    let upstream = Upstream::start().await;
    let extra = "    timeouts: {write_seconds: 1}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    // 64 MiB of messages: far more than socket buffers hold, so the gate must stop reading
    // the upstream (backpressure) and then give up on the client.
    client
        .send(Message::text("flood 1024 65536"))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let ended = upstream.wait_ended(0).await;
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(900),
        "dropped too early: {took:?}"
    );
    assert!(
        took < std::time::Duration::from_secs(8),
        "not dropped in time: {took:?}"
    );
    assert!(
        matches!(ended, Ended::Close(1001, _) | Ended::Dropped),
        "{ended:?}"
    );
    // The client's connection is gone: draining what the kernel buffered ends in an error
    // or end of stream, never a clean close frame.
    let drained = tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(m)) = client.next().await {
            assert!(!m.is_close(), "a stalled client gets no close frame");
        }
    })
    .await;
    assert!(drained.is_ok());
}

/// A client that comes back resumes its TLS session (no certificate, no signature): by
/// ticket with TLS 1.3, and with TLS 1.2 too, and its WebSocket works as on a full
/// handshake, even after hundreds of other clients' sessions.
#[tokio::test]
async fn a_returning_client_resumes_its_tls_session() {
    use rustls::HandshakeKind;
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let pki = gate.pki.as_ref().unwrap();
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_protocol_versions(&[version])
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let mut kinds = Vec::new();
        for round in 0..2 {
            if round == 1 {
                // Others come and go in between: the session is in the client's ticket,
                // not in a table on the gate that they could push it out of.
                others(&gate, 300).await;
            }
            let tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            let (mut client, response) = tokio_tungstenite::client_async(gate.url("/ws"), tls)
                .await
                .unwrap();
            assert_eq!(response.status(), 101);
            client.send(Message::text("again")).await.unwrap();
            assert_eq!(next_message_any(&mut client).await, Message::text("again"));
            kinds.push(client.get_ref().get_ref().1.handshake_kind());
            client.close(None).await.unwrap();
            while client.next().await.is_some() {}
        }
        assert_eq!(
            kinds,
            [Some(HandshakeKind::Full), Some(HandshakeKind::Resumed)],
            "{version:?}"
        );
    }
}

/// The gate answers in its own cipher suite order, AES-128-GCM first, whatever the client
/// prefers (OpenSSL and rustls clients put AES-256-GCM first), unless the client puts
/// ChaCha20 first: then the client's order. TLS 1.3 and 1.2 alike; a client that offers
/// only AES-256-GCM still gets it, and the WebSocket works on each.
#[tokio::test]
async fn the_cipher_suite_is_aes_128_unless_the_client_puts_chacha20_first() {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let pki = gate.pki.as_ref().unwrap();
    let cases = [
        (
            &rustls::version::TLS13,
            vec![
                TLS13_AES_256_GCM_SHA384,
                TLS13_AES_128_GCM_SHA256,
                TLS13_CHACHA20_POLY1305_SHA256,
            ],
            TLS13_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS13,
            vec![
                TLS13_CHACHA20_POLY1305_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_AES_128_GCM_SHA256,
            ],
            TLS13_CHACHA20_POLY1305_SHA256,
        ),
        (
            &rustls::version::TLS13,
            vec![TLS13_AES_256_GCM_SHA384],
            TLS13_AES_256_GCM_SHA384,
        ),
        (
            &rustls::version::TLS12,
            vec![
                TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ],
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS12,
            vec![
                TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            ],
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ];
    for (version, offered, expected) in cases {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: offered.clone(),
            ..rustls::crypto::aws_lc_rs::default_provider()
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let chosen = tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
        assert_eq!(
            chosen,
            Some(expected.suite()),
            "{version:?} offering {offered:?}"
        );
        let (mut client, _) = tokio_tungstenite::client_async(gate.url("/ws"), tls)
            .await
            .unwrap();
        client.send(Message::text("suite")).await.unwrap();
        assert_eq!(next_message_any(&mut client).await, Message::text("suite"));
    }
}

/// `n` clients of their own (each a full TLS handshake), one after another.
async fn others(gate: &TestGate, n: usize) {
    let pki = gate.pki.as_ref().unwrap();
    for _ in 0..n {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        // The server's tickets come after the handshake: read until it closes.
        tokio::io::AsyncWriteExt::write_all(
            &mut tls,
            b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut sink).await;
    }
}

/// An upstream named by a host name (`localhost`) is dialled through its looked-up
/// addresses, upgrade after upgrade.
#[tokio::test]
async fn an_upstream_host_name_is_dialled_upgrade_after_upgrade() {
    let upstream = Upstream::start().await;
    let url = format!("ws://localhost:{}", upstream.addr.port());
    let gate = TestGate::start(&open_policy(&url, "")).await;
    for i in 0..3 {
        let (mut client, _) = gate.connect("/ws").await.unwrap();
        let text = format!("hello {i}");
        client.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next_message(&mut client).await, Message::text(text));
    }
    assert_eq!(upstream.seen_count(), 3);
}

/// An upstream that sends a message every few milliseconds to a TLS client that reads
/// nothing: the client is dropped at write_seconds, not twice it. (Each message wakes the
/// relay; plaintext taken into the TLS stream's own buffer while its socket takes nothing
/// was counted as the client's progress, which restarted the deadline once.)
#[tokio::test]
async fn a_tls_client_that_stops_reading_a_trickle_is_dropped_at_write_seconds() {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
    let upstream = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let chunk = Message::binary(vec![7u8; 64 * 1024]);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(5));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if ws.send(chunk.clone()).await.is_err() {
                        break;
                    }
                }
                got = ws.next() => match got {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        let _ = ended_tx.send(std::time::Instant::now());
    });
    let extra = "    timeouts: {write_seconds: 1}\n";
    let gate = TestGate::start(&open_policy(&format!("ws://{addr}"), extra)).await;
    assert!(gate.pki.is_some(), "the client leg is TLS");
    let (_client, _) = gate.connect("/ws").await.unwrap();
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), ended_rx)
        .await
        .expect("the stalled client was never dropped")
        .unwrap();
    let took = ended - started;
    // The buffers fill within a few hundred milliseconds of the start, then write_seconds.
    assert!(
        took >= std::time::Duration::from_millis(900)
            && took < std::time::Duration::from_millis(1900),
        "dropped after {took:?}"
    );
    upstream.abort();
}

/// On a dual-stack listener (`[::]:PORT`, as on IPv6 Kubernetes clusters), an IPv4 client
/// arrives as `::ffff:a.b.c.d`; the upstream is told its IPv4 address, as admission sees
/// it, not the mapped form.
#[tokio::test]
async fn an_ipv4_client_on_a_dual_stack_listener_is_forwarded_as_ipv4() {
    let Ok(listener) = tokio::net::TcpListener::bind("[::]:0").await else {
        eprintln!("skipped: no IPv6 on this machine");
        return;
    };
    let upstream = Upstream::start().await;
    let gate = TestGate::start_listening(&open_policy(&upstream.url(), ""), listener).await;
    let port = gate.addr.port();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (_ws, response) = tokio_tungstenite::client_async(
        format!("ws://127.0.0.1:{port}/ws"),
        ClientStream::Plain(tcp),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(upstream.last_seen().headers["x-forwarded-for"], "127.0.0.1");
}
