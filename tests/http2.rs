//! WebSockets over HTTP/2 (RFC 8441) through the real gate: extended CONNECT over TLS
//! (ALPN `h2`) and h2c, relayed and closed exactly as over HTTP/1.1, several on one
//! connection; plain requests; the `http2` policy block; metrics, log lines and the
//! SIGTERM drain (README "HTTP/2"). Admission over h2 is in `http2_admission.rs`.

mod support;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use support::h2::*;
use support::process::Proc;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------
// Relay over h2 and h2c

/// An extended CONNECT over TLS is relayed; the upstream is reached over HTTP/1.1.
#[tokio::test]
async fn echoes_over_h2_with_tls() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let (mut ws, _) = h2.websocket("/ws/room?x=1", &[]).await.unwrap();
    echoes(&mut ws, "hello").await;
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        next_message_any(&mut ws).await,
        Message::binary(vec![0u8, 1, 2, 255])
    );
    // The upstream was reached over HTTP/1.1 with an ordinary upgrade.
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/ws/room?x=1");
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert!(seen.headers.contains_key("sec-websocket-key"));
}

/// h2c with prior knowledge on a plaintext listener is relayed too.
#[tokio::test]
async fn echoes_over_h2c_prior_knowledge() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let mut h2 = gate.h2().await;
    let (mut ws, _) = h2.websocket("/ws", &[]).await.unwrap();
    echoes(&mut ws, "plain").await;
}

/// Streams of one connection close independently, and a new one opens after a close.
#[tokio::test]
async fn two_websockets_on_one_connection_close_independently() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let (mut first, _) = h2.websocket("/ws", &[]).await.unwrap();
    let (mut second, _) = h2.websocket("/ws", &[]).await.unwrap();
    first.send(Message::text("one")).await.unwrap();
    second.send(Message::text("two")).await.unwrap();
    assert_eq!(next_message_any(&mut first).await, Message::text("one"));
    assert_eq!(next_message_any(&mut second).await, Message::text("two"));
    close_with(first, 4000, "done").await;
    echoes(&mut second, "still here").await;
    // A third opens on the same connection after the first closed.
    let (mut third, _) = h2.websocket("/ws", &[]).await.unwrap();
    echoes(&mut third, "three").await;
}

// ---------------------------------------------------------------------------------------
// §4 close codes over h2

/// The client's close code and reason reach the upstream, and the gate completes the
/// client's close handshake.
#[tokio::test]
async fn the_clients_close_code_and_reason_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let (ws, _) = h2.websocket("/ws", &[]).await.unwrap();
    close_with(ws, 4000, "bye now").await;
    assert_eq!(
        upstream.wait_ended(0).await,
        Ended::Close(4000, "bye now".into())
    );
}

/// The upstream's close code and reason reach the client.
#[tokio::test]
async fn the_upstreams_close_code_and_reason_reach_the_client() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let (mut ws, _) = h2.websocket("/ws", &[]).await.unwrap();
    ws.send(Message::text("close 4001 all done")).await.unwrap();
    assert_eq!(close_of(&mut ws).await, (4001, "all done".into()));
}

/// A client message over `max_message_bytes` is 1009 to the client and 1001 upstream;
/// the other stream of the connection goes on.
#[tokio::test]
async fn an_oversized_client_message_is_1009_and_the_upstream_gets_1001() {
    let upstream = Upstream::start().await;
    let extra = "    messages: {max_frame_bytes: 1024, max_message_bytes: 1024}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let mut h2 = gate.h2().await;
    let (mut big, _) = h2.websocket("/ws", &[]).await.unwrap();
    let (mut small, _) = h2.websocket("/ws", &[]).await.unwrap();
    echoes(&mut big, "small first").await;
    big.send(Message::binary(vec![1u8; 2000])).await.unwrap();
    assert_eq!(close_of(&mut big).await, (1009, "message too big".into()));
    assert!(
        matches!(upstream.wait_ended(0).await, Ended::Close(1001, _)),
        "{:?}",
        upstream.ended.lock().unwrap()
    );
    echoes(&mut small, "unaffected").await;
}

/// An upstream message over the limit is 1009 to the upstream and 1001 to the client.
#[tokio::test]
async fn an_oversized_upstream_message_is_1009_to_it_and_1001_to_the_client() {
    let upstream = Upstream::start().await;
    let extra = "    messages: {max_frame_bytes: 1024, max_message_bytes: 4096}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let mut h2 = gate.h2().await;
    let (mut ws, _) = h2.websocket("/ws", &[]).await.unwrap();
    ws.send(Message::text("big 4000")).await.unwrap();
    assert_eq!(next_message_any(&mut ws).await.len(), 4000);
    ws.send(Message::text("big 5000")).await.unwrap();
    assert_eq!(close_of(&mut ws).await.0, 1001);
    assert!(matches!(
        upstream.wait_ended(0).await,
        Ended::Close(1009, _)
    ));
}

/// Messages over the rate's burst are 1008 "message rate exceeded"; the upstream 1001.
#[tokio::test]
async fn messages_over_the_rate_are_1008() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\n  origin: {{allow_missing: true}}\n  messages: {{per_second: 1, burst: 3}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let mut h2 = gate.h2().await;
    let (mut ws, _) = h2.websocket("/ws", &[]).await.unwrap();
    for i in 0..3 {
        echoes(&mut ws, &format!("{i}")).await;
    }
    ws.send(Message::text("one too many")).await.unwrap();
    assert_eq!(
        close_of(&mut ws).await,
        (1008, "message rate exceeded".into())
    );
    assert!(matches!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, _)
    ));
}

/// An upstream lost without a close frame is 1014 to its client; the connection's other
/// stream is untouched.
#[tokio::test]
async fn an_upstream_lost_is_1014_and_the_sibling_stream_goes_on() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let (mut lost, _) = h2.websocket("/ws", &[]).await.unwrap();
    let (mut sibling, _) = h2.websocket("/ws", &[]).await.unwrap();
    lost.send(Message::text("drop")).await.unwrap();
    assert_eq!(
        raw_close_of(&mut lost).await,
        (1014, "upstream unavailable".into())
    );
    echoes(&mut sibling, "still here").await;
}

/// A stream with no message either way for `idle_seconds` is closed 1001 "idle timeout",
/// both sides.
#[tokio::test]
async fn an_idle_stream_is_closed_1001_idle_timeout() {
    let upstream = Upstream::start().await;
    let extra = "    timeouts: {idle_seconds: 1}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let mut h2 = gate.h2().await;
    let (mut ws, _) = h2.websocket("/ws", &[]).await.unwrap();
    let started = Instant::now();
    assert_eq!(close_of(&mut ws).await, (1001, "idle timeout".into()));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "idle close after {took:?}"
    );
    assert_eq!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, "idle timeout".into())
    );
}

/// A stream the client resets (no close frame) ends its relay: the upstream is closed and
/// the stream's cap slot freed, while its sibling goes on.
#[tokio::test]
async fn a_stream_reset_by_the_client_frees_its_slot_and_spares_its_sibling() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(
        &upstream,
        "",
        "    rate: {max_connections_per_ip: 2, burst: 100}\n",
    ))
    .await;
    let mut h2 = gate.h2().await;
    let (mut reset, _) = h2.websocket("/ws", &[]).await.unwrap();
    let (mut sibling, _) = h2.websocket("/ws", &[]).await.unwrap();
    echoes(&mut reset, "before the reset").await;
    h2.refused("/ws", &[], 429, "too_many_connections").await;
    // Dropping both halves of the stream resets it (RST_STREAM CANCEL).
    drop(reset);
    let ended = upstream.wait_ended(0).await;
    assert!(matches!(ended, Ended::Close(1001, _)), "{ended:?}");
    echoes(&mut sibling, "unaffected").await;
    let started = Instant::now();
    let (mut again, _) = loop {
        match h2.websocket("/ws", &[]).await {
            Ok(admitted) => break admitted,
            Err(refusal) => assert!(
                started.elapsed() < Duration::from_secs(2),
                "the reset stream's slot was not freed: {refusal:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    echoes(&mut again, "in its slot").await;
}

/// A stream whose client stops reading is dropped after `write_seconds` (the gate holds
/// no more than the stream's flow-control window for it), and its sibling goes on.
#[tokio::test]
async fn a_stream_that_stops_reading_is_dropped_after_write_seconds() {
    let upstream = Upstream::start().await;
    let extra = "    timeouts: {write_seconds: 1}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let mut h2 = gate.h2().await;
    let (mut stalled, _) = h2.websocket("/ws", &[]).await.unwrap();
    let (mut sibling, _) = h2.websocket("/ws", &[]).await.unwrap();
    // 64 MiB towards a stream that is never read again.
    stalled
        .send(Message::text("flood 1024 65536"))
        .await
        .unwrap();
    let started = Instant::now();
    let ended = upstream.wait_ended(0).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "dropped after {took:?}"
    );
    assert!(
        matches!(ended, Ended::Close(1001, _) | Ended::Dropped),
        "{ended:?}"
    );
    echoes(&mut sibling, "unaffected").await;
}

/// A reload that no longer admits one stream's client closes that stream 1008 "policy
/// changed" (its upstream 1001), while a sibling stream on the same connection, still
/// admitted, keeps working.
#[tokio::test]
async fn a_reload_cuts_off_one_stream_and_keeps_its_sibling() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(&upstream, TRUSTED, "")).await;
    let mut h2 = gate.h2().await;
    let (mut doomed, _) = h2
        .websocket("/ws", &[("x-forwarded-for", "203.0.113.5")])
        .await
        .unwrap();
    let (mut kept, _) = h2
        .websocket("/ws", &[("x-forwarded-for", "198.51.100.7")])
        .await
        .unwrap();
    echoes(&mut doomed, "before").await;

    gate.write_policy(&policy(
        &upstream,
        TRUSTED,
        "    ip: {deny: [203.0.113.0/24]}\n",
    ));
    let started = Instant::now();
    assert_eq!(close_of(&mut doomed).await, (1008, "policy changed".into()));
    assert!(started.elapsed() < Duration::from_secs(3));
    let ended = upstream.wait_ended(0).await;
    assert!(matches!(ended, Ended::Close(1001, _)), "{ended:?}");
    echoes(&mut kept, "still welcome").await;
    // New streams from the denied network are refused on the same connection.
    h2.refused(
        "/ws",
        &[("x-forwarded-for", "203.0.113.6")],
        403,
        "ip_denied",
    )
    .await;
    echoes(&mut kept, "and after").await;
}

// ---------------------------------------------------------------------------------------
// Plain HTTP and the `http2` policy block

/// `/ws` (reject) and `/static` (`http: pass`).
fn pass_policy(upstream: &Upstream, top: &str) -> String {
    format!(
        "{top}{}  - path: /static\n    http: pass\n",
        open_policy(&upstream.url(), "")
    )
}

/// A GET on an `http: pass` route is proxied upstream (over HTTP/1.1) and answered over
/// h2, hop-by-hop headers removed.
#[tokio::test]
async fn a_get_on_a_pass_route_is_proxied() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, "")).await;
    let mut h2 = gate.h2().await;
    let (status, headers, body) = h2
        .get("/static/page?q=1", &[("x-forwarded-for", "9.9.9.9")])
        .await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"pass GET /static/page?q=1\n");
    assert_eq!(headers["x-upstream"], "yes");
    assert!(headers.get("x-hop").is_none(), "{headers:?}");
    let seen = upstream.last_seen();
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        format!("localhost:{}", gate.addr.port())
    );
    // Several on one connection, beside a WebSocket.
    let (mut ws, _) = h2.websocket("/ws", &[]).await.unwrap();
    let (status, _, body) = h2.get("/static/other", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"pass GET /static/other\n");
    echoes(&mut ws, "beside").await;
}

/// A HEAD that the gate answers itself (a refusal) gets the status and headers and no
/// body: DATA on a HEAD response is a protocol error to HTTP/2 clients (`curl -I`).
#[tokio::test]
async fn a_head_the_gate_refuses_has_no_body() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, "")).await;
    let mut h2 = gate.h2().await;
    for (path, status) in [("/ws", 426), ("/nowhere", 404)] {
        let (got, headers, body) = h2.request(http::Method::HEAD, path, &[]).await;
        assert_eq!(got, status, "{path}");
        assert!(body.is_empty(), "{path}: {body:?}");
        assert_eq!(headers["content-type"], "application/json", "{path}");
    }
    // The connection is still good.
    let (status, _, body) = h2.get("/ws", &[]).await;
    assert_eq!(status, 426);
    assert!(!body.is_empty());
}

/// A GET on a `reject` route is 426 `not_websocket`, naming version 13.
#[tokio::test]
async fn a_get_on_a_reject_route_is_426_not_websocket() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&pass_policy(&upstream, "")).await;
    let mut h2 = gate.h2().await;
    let (status, headers, body) = h2.get("/ws", &[]).await;
    assert_eq!(status, 426);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "not_websocket");
    assert_eq!(headers["sec-websocket-version"], "13");
    assert_eq!(upstream.seen_count(), 0);
}

/// On HTTP/1.1, `Upgrade: h2c` is not honoured: the request is served as HTTP/1.1.
/// A refusal of a request whose body is still arriving is answered whole and ended once
/// the body has arrived, not followed by a RST_STREAM (RFC 9113 §8.1 allows NO_ERROR
/// there, and curl then drops the answer it was given: exit 92), as nginx reads and
/// discards such a body. So is the 502 of a pass route whose upstream cannot be reached.
#[tokio::test]
async fn a_refusal_of_a_request_with_a_body_still_arriving_ends_without_a_reset() {
    use support::h2raw::{self, *};
    let upstream = Upstream::start().await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = format!(
        "  - path: /down\n    http: pass\n    upstream: ws://{}\n",
        closed.local_addr().unwrap()
    );
    drop(closed);
    // An upstream that answers as soon as it has the request's head, reading none of its body.
    let (early, early_server) = support::raw_http_upstream(|_| {
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 16\r\n\r\n{\"error\":\"busy\"}"
    })
    .await;
    let early_route = format!("  - path: /early\n    http: pass\n    upstream: ws://{early}\n");
    let policy = pass_policy(&upstream, "") + &down + &early_route;
    let gate = TestGate::start_with(&policy, false).await;
    let authority = format!("localhost:{}", gate.addr.port());
    // Refused on its route (an upgrade-only one: 426), before it has one (404), by an
    // upstream that is down (502), and answered by one that read none of the body.
    for (path, status, reason) in [
        ("/ws", 426, "not_websocket"),
        ("/nowhere", 404, "no_route"),
        ("/down/upload", 502, "upstream_unavailable"),
        ("/early/upload", 503, "busy"),
    ] {
        let (mut rx, mut wr, _) = h2raw::opened(gate.addr, None).await;
        let chunk = vec![b'x'; 16 * 1024];
        let block = post_block(false, &authority, path, 3 * chunk.len());
        wr.write_all(&frame(HEADERS, END_HEADERS, 1, &block))
            .await
            .unwrap();
        wr.write_all(&frame(DATA, 0, 1, &chunk)).await.unwrap();
        let head = next_frame(&mut rx, DEADLINE, |f| f.kind == HEADERS && f.stream == 1)
            .await
            .expect("the refusal's head");
        assert_eq!(h2raw::status(&head.payload), Some(status), "{path}");
        // The rest of the body, after the answer's head.
        wr.write_all(&frame(DATA, 0, 1, &chunk)).await.unwrap();
        wr.write_all(&frame(DATA, END_STREAM, 1, &chunk))
            .await
            .unwrap();
        let mut body = Vec::new();
        let mut ended = false;
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(f) = next_frame(&mut rx, left, |f| f.stream == 1).await else {
                break;
            };
            assert_ne!(f.kind, RST_STREAM, "{path}: reset with {}", f.code());
            if f.kind == DATA {
                body.extend_from_slice(&f.payload);
                ended |= f.flags & END_STREAM != 0;
            }
        }
        assert!(ended, "{path}: the answer never ended");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"], reason, "{path}");
    }
    early_server.abort();
}

#[tokio::test]
async fn an_h2c_upgrade_on_http1_is_served_as_http1() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&pass_policy(&upstream, ""), false).await;
    let response = gate
        .raw(b"GET /static/x HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("pass GET /static/x\n"), "{response}");
    let seen = upstream.last_seen();
    assert!(seen.headers.get("http2-settings").is_none(), "{seen:?}");
}

/// With `http2.enabled: false`, ALPN picks http/1.1 though the client offers h2 first
/// (and picks h2 when enabled), and the WebSocket is an HTTP/1.1 upgrade.
#[tokio::test]
async fn with_http2_disabled_alpn_negotiates_http1() {
    let upstream = Upstream::start().await;
    let offer: [&[u8]; 2] = [b"h2", b"http/1.1"];
    let enabled = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let tls = enabled.tls_offering(&offer).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    let disabled = TestGate::start(&policy(&upstream, "http2: {enabled: false}\n", "")).await;
    let tls = disabled.tls_offering(&offer).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut ws, response) = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::client_async(disabled.url("/ws"), tls),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), 101);
    ws.send(Message::text("http/1.1")).await.unwrap();
    assert_eq!(next_message_any(&mut ws).await, Message::text("http/1.1"));
}

/// A client that offers only ALPN `http/1.0` (`curl --http1.0 https://…`) completes its
/// TLS handshake and gets the gate's HTTP answer: 400 `bad_request` for an HTTP/1.0
/// upgrade, not a TLS alert.
#[tokio::test]
async fn alpn_http10_is_answered_over_http() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut tls = gate.tls_offering(&[b"http/1.0"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.0"[..]));
    tls.write_all(b"GET /ws HTTP/1.0\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(DEADLINE, tls.read_to_end(&mut response))
        .await
        .expect("the answer in time")
        .ok();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.0 400"), "{response}");
    assert!(response.contains(r#""error":"bad_request""#), "{response}");
}

/// The HTTP/2 preface and a SETTINGS frame, as an h2c client with prior knowledge sends
/// them.
const PREFACE_AND_SETTINGS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// What a plaintext gate answers to an h2c preface, until it closes or 3 s.
async fn answer_to_preface(gate: &TestGate) -> Vec<u8> {
    let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    tcp.write_all(PREFACE_AND_SETTINGS).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buf = [0u8; 4096];
        // An HTTP/2 server answers with its SETTINGS and keeps the connection: stop at
        // the first frame header.
        while out.len() < 9 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        if !out.starts_with(b"HTTP/1.1") {
            return;
        }
        let _ = tcp.read_to_end(&mut out).await;
    })
    .await;
    out
}

/// With `http2.enabled: false`, an h2c preface gets no HTTP/2 (an HTTP/1.1 400); with it
/// enabled, the same bytes get the server's SETTINGS frame.
#[tokio::test]
async fn with_http2_disabled_an_h2c_preface_gets_no_http2() {
    let upstream = Upstream::start().await;
    let enabled = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let answer = answer_to_preface(&enabled).await;
    assert!(answer.len() >= 9, "{answer:?}");
    assert_eq!(answer[3], 0x4, "not a SETTINGS frame: {answer:?}");

    let disabled =
        TestGate::start_with(&policy(&upstream, "http2: {enabled: false}\n", ""), false).await;
    let answer = String::from_utf8_lossy(&answer_to_preface(&disabled).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(answer.contains("\"error\":\"bad_request\""), "{answer:?}");
}

/// `http2.max_concurrent_streams: 2`: the client sees the bound, so a third stream waits
/// until one of the two closes.
#[tokio::test]
async fn max_concurrent_streams_holds_a_third_stream_until_one_closes() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(
        &upstream,
        "http2: {max_concurrent_streams: 2}\n",
        "",
    ))
    .await;
    let mut h2 = gate.h2().await;
    let (first, _) = h2.websocket("/ws", &[]).await.unwrap();
    let (mut second, _) = h2.websocket("/ws", &[]).await.unwrap();
    let mut other = h2.clone();
    let third = tokio::spawn(async move { other.websocket("/ws", &[]).await.map(|(ws, _)| ws) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third stream opened beside two");
    assert_eq!(upstream.seen_count(), 2);
    close_with(first, 1000, "").await;
    let mut third = tokio::time::timeout(DEADLINE, third)
        .await
        .expect("the third stream did not open once the first closed")
        .unwrap()
        .unwrap();
    echoes(&mut third, "third").await;
    echoes(&mut second, "second").await;
    assert_eq!(upstream.seen_count(), 3);
}

/// An h2 connection that sends no request within `handshake_seconds` of its accept is
/// closed; one whose stream is open is not.
#[tokio::test]
async fn an_h2_connection_without_a_request_is_closed_at_handshake_seconds() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\n  origin: {{allow_missing: true}}\n  timeouts: {{handshake_seconds: 0.5}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let started = Instant::now();
    let silent = gate.h2().await;
    let mut busy = gate.h2().await;
    let (mut ws, _) = busy.websocket("/ws", &[]).await.unwrap();
    assert!(
        silent.ended_within(DEADLINE).await.is_some(),
        "the silent connection was not closed"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    echoes(&mut ws, "past the deadline").await;
    assert!(busy.ended_within(Duration::ZERO).await.is_none());
}

// ---------------------------------------------------------------------------------------
// Metrics, logs and the drain

/// Two streams on one connection are two active connections and two accepted upgrades,
/// and the gauge goes back to 0 as they close (each close counted); a refused stream
/// counts its reason.
#[tokio::test]
async fn two_streams_count_as_two_connections_and_two_upgrades() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let active = "wsgate_connections_active{route=\"ws\"}";
    let accepted = "wsgate_upgrades_total{route=\"ws\",result=\"accepted\"}";
    let mut h2 = gate.h2().await;
    let (first, _) = h2.websocket("/ws", &[]).await.unwrap();
    let (second, _) = h2.websocket("/ws", &[]).await.unwrap();
    assert_eq!(gate.metric(active).await, 2.0);
    assert_eq!(gate.metric(accepted).await, 2.0);
    close_with(first, 1000, "").await;
    wait_metric_at(
        gate.admin,
        active,
        DEADLINE,
        "the first is still counted",
        |v| v == 1.0,
    )
    .await;
    close_with(second, 1000, "").await;
    wait_metric_at(
        gate.admin,
        active,
        DEADLINE,
        "the second is still counted",
        |v| v == 0.0,
    )
    .await;
    assert_eq!(gate.metric(accepted).await, 2.0);
    let closed = "wsgate_closes_total{route=\"ws\",reason=\"client_closed\"}";
    assert_eq!(gate.metric(closed).await, 2.0);
    h2.refused("/nowhere", &[], 404, "no_route").await;
    let no_route = "wsgate_upgrades_total{route=\"none\",result=\"no_route\"}";
    assert_eq!(gate.metric(no_route).await, 1.0);
}

/// A policy file for a gate run as a process.
fn policy_file(upstream: &Upstream) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, pass_policy(upstream, "")).unwrap();
    (dir, path)
}

/// The upgrade and close log lines of a stream say `protocol="h2"`; an HTTP/1.1
/// connection's say `http/1.1`.
#[tokio::test(flavor = "multi_thread")]
async fn the_upgrade_and_close_lines_say_the_protocol() {
    let upstream = Upstream::start().await;
    let (_dir, path) = policy_file(&upstream);
    let mut gate = Proc::start(&path, &[]);
    let mut h2 = H2::h2c(gate.addr).await;
    let (ws, _) = h2
        .websocket("/ws", &[("x-request-id", "h2-stream")])
        .await
        .unwrap();
    let line = gate.wait_line("request_id=h2-stream");
    assert!(line.contains(" upgrade "), "{line}");
    assert!(line.contains("result=\"accepted\""), "{line}");
    assert!(line.contains("protocol=\"h2\""), "{line}");
    close_with(ws, 1000, "").await;
    let line = gate.wait_line("request_id=h2-stream");
    assert!(line.contains(" close "), "{line}");
    assert!(line.contains("protocol=\"h2\""), "{line}");

    let mut h1 = gate.connect("/ws").await.unwrap();
    let line = gate.wait_line("result=\"accepted\"");
    assert!(line.contains("protocol=\"http/1.1\""), "{line}");
    h1.close(None).await.unwrap();
}

/// A WebSocket stream the client resets (RST_STREAM) while the gate waits for an upstream
/// that never answers ends at once, and is logged as abandoned by the client
/// (`result="client_lost"`, as nginx logs its 499), not dropped from the logs; it is not
/// an upgrade decision of the gate's, so no `upstream_timeout` line follows for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_reset_while_the_upstream_is_awaited_is_logged_as_abandoned() {
    let (mut gate, _dir, held) = support::process::gate_before_a_silent_upstream(1, &[]).await;
    let mut h2 = H2::h2c(gate.addr).await;
    let waiting = h2.websocket("/ws", &[("x-request-id", "left-early")]);
    // Dropping the pending request resets its stream.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), waiting)
            .await
            .is_err(),
        "the silent upstream answered"
    );
    let line = gate.wait_line("request_id=left-early");
    assert!(line.contains("upgrade abandoned by the client"), "{line}");
    assert!(line.contains("result=\"client_lost\""), "{line}");
    assert!(line.contains("protocol=\"h2\""), "{line}");
    gate.no_line("request_id=left-early", Duration::from_millis(1500));
    held.abort();
}

/// SIGTERM on a gate process with two streams open on one h2c connection: both get 1001
/// "going away" (their upstreams too), a new stream meanwhile gets 503 `draining` (a
/// WebSocket or a plain request on a pass route), then
/// the connection ends (GOAWAY) and the process exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_each_stream_1001_then_goaway_and_exit_0() {
    let upstream = Upstream::start().await;
    let (_dir, path) = policy_file(&upstream);
    let mut gate = Proc::start(&path, &["--drain-seconds", "5"]);
    let mut h2 = H2::h2c(gate.addr).await;
    let (mut a, _) = h2.websocket("/ws", &[]).await.unwrap();
    let (mut b, _) = h2.websocket("/ws", &[]).await.unwrap();
    echoes(&mut a, "a").await;
    echoes(&mut b, "b").await;

    gate.signal("TERM");
    let sent = Instant::now();
    assert_eq!(close_of(&mut a).await, (1001, "going away".into()));
    // b has not answered its close yet: the connection is still served, and a new
    // WebSocket on it is refused, as is a plain request on a pass route.
    h2.refused("/ws", &[], 503, "draining").await;
    let (status, _, body) = h2.get("/static/page", &[]).await;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status.as_u16(), &json["error"]), (503, &"draining".into()));
    assert_eq!(close_of(&mut b).await, (1001, "going away".into()));
    drop((a, b));
    for i in 0..2 {
        assert_eq!(
            upstream.wait_ended(i).await,
            Ended::Close(1001, "going away".into())
        );
    }
    let ended = h2
        .ended_within(DEADLINE)
        .await
        .expect("the connection was not closed after the drain");
    assert!(
        ended.is_ok(),
        "the connection ended with an error: {ended:?}"
    );
    let (code, _) = gate.exited(Duration::from_secs(5)).await;
    assert_eq!(code, 0);
    assert!(
        sent.elapsed() < Duration::from_secs(4),
        "exit {:?} after SIGTERM: the drain waited for its deadline",
        sent.elapsed()
    );
}

/// During `--shutdown-delay-seconds` the gate still serves h2: a new stream on an open
/// connection and a new connection are admitted; the drain then counts and closes every
/// stream, 1001 "going away", and the process exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn during_the_shutdown_delay_new_streams_are_admitted_then_drained() {
    let upstream = Upstream::start().await;
    let (_dir, path) = policy_file(&upstream);
    let mut gate = Proc::start(
        &path,
        &["--shutdown-delay-seconds", "1", "--drain-seconds", "5"],
    );
    let mut h2 = H2::h2c(gate.addr).await;
    let (mut a, _) = h2.websocket("/ws", &[]).await.unwrap();

    gate.signal("TERM");
    let sent = Instant::now();
    gate.wait_line("still serving until the delay ends");
    let (mut b, _) = h2.websocket("/ws", &[]).await.unwrap();
    let mut other = H2::h2c(gate.addr).await;
    let (mut c, _) = other.websocket("/ws", &[]).await.unwrap();
    for ws in [&mut a, &mut b, &mut c] {
        echoes(ws, "in the delay").await;
    }
    let line = gate.wait_line("draining connections");
    assert!(line.contains("open=3"), "{line}");
    for ws in [&mut a, &mut b, &mut c] {
        assert_eq!(close_of(ws).await, (1001, "going away".into()));
    }
    assert!(
        sent.elapsed() >= Duration::from_millis(900),
        "closed {:?} after SIGTERM, within the delay",
        sent.elapsed()
    );
    drop((a, b, c));
    let (code, _) = gate.exited(Duration::from_secs(5)).await;
    assert_eq!(code, 0);
}

/// A drain cut short counts the WebSockets still open, not the tasks under them: one
/// stream whose client never answers its 1001 is `open=1`, as over HTTP/1.1, although
/// its HTTP/2 connection has tasks of its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_cut_short_counts_an_h2_websocket_once() {
    let upstream = Upstream::start().await;
    let (_dir, path) = policy_file(&upstream);
    let mut gate = Proc::start(&path, &["--drain-seconds", "20"]);
    let mut h2 = H2::h2c(gate.addr).await;
    // Never read: its 1001 is never answered.
    let (_silent, _) = h2.websocket("/ws", &[]).await.unwrap();
    gate.signal("TERM");
    let line = gate.wait_line("draining connections");
    assert!(line.contains("open=1"), "{line}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.signal("INT");
    let cut = gate.wait_line("the drain is cut short");
    assert!(cut.contains("open=1"), "{cut}");
    let (code, _) = gate.exited(Duration::from_secs(5)).await;
    assert_eq!(code, 0);
}

/// When the listener stops, an HTTP/2 connection's first stream, sent a moment after, is
/// answered as an HTTP/1.1 connection's first request is, not with 503 `draining`: the
/// connection keeps the drain waiting until that stream is answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_stream_sent_as_the_listener_stops_is_answered() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&pass_policy(&upstream, ""), false).await;
    let mut h2 = H2::h2c(gate.addr).await;
    // As `wsgate run` does on SIGTERM: the first answers, then the drain.
    let drain = async {
        gate.running.stop_accepting(Duration::from_secs(1)).await;
        gate.running.begin_shutdown();
    };
    let first = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        h2.get("/static/page", &[]).await
    };
    let ((), (status, _, body)) = tokio::join!(drain, first);
    assert_eq!(status.as_u16(), 200, "{}", String::from_utf8_lossy(&body));
}

/// On the TLS port, a connection that has sent nothing is let go 200 ms after the listener
/// stops (not once for the plain-HTTP check and again for the handshake).
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_connection_on_the_tls_port_is_let_go_after_200_ms() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut silent = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = Instant::now();
    assert!(gate.running.stop_accepting(Duration::from_secs(1)).await);
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_millis(350),
        "the listener's first answers took {took:?}"
    );
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, silent.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the silent connection is still open");
}
