//! Request heads the gate refuses before anything else looks at them: every refusal is a
//! complete HTTP response with the JSON body (`error`, `message`), also for the heads the
//! HTTP parser itself cannot read; an invalid Host and a second Origin are refused.

mod support;

use std::time::Duration;

use support::*;

const UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// Status and JSON body of the gate's answer to `head`.
async fn answer(gate: &TestGate, head: &str) -> (u16, serde_json::Value) {
    let response = gate.raw(head.as_bytes()).await;
    let status = response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response to {head:?}: {response:?}"));
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body)
        .unwrap_or_else(|_| panic!("no JSON body in the answer to {head:?}: {response:?}"));
    (status, json)
}

/// The head of the gate's answer to `head`, the connection left open (an upgrade's 101).
async fn answer_head(gate: &TestGate, head: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes())
        .await
        .unwrap();
    wire::read_head(&mut tcp).await.unwrap()
}

async fn gate() -> (TestGate, Upstream) {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    (gate, upstream)
}

/// Heads the HTTP parser refuses still get 400 with `bad_request` in JSON, not a bare 400.
#[tokio::test]
async fn unparseable_heads_get_the_json_400() {
    let (gate, upstream) = gate().await;
    for head in [
        // obs-fold (RFC 9112 §5.2: a server must refuse or unfold it)
        format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nX-Folded: a\r\n  b\r\n{UPGRADE}\r\n"),
        format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nthis line has no colon\r\n{UPGRADE}\r\n"),
        format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0, 0\r\n{UPGRADE}\r\n"),
        format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nContent-Length: 0\r\n{UPGRADE}\r\n"),
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nContent-Length: x\r\n\r\n".to_owned(),
        // What hyper refuses with a bare 400: a length past 64 bits, a final transfer
        // coding that is not chunked, transfer codings on HTTP/1.0.
        "POST /ws/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_owned(),
        "POST /ws/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".to_owned(),
        "POST /ws/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n".to_owned(),
        // What hyper would take and half undo: a coding before chunked (the upstream would
        // get the body re-framed but still gzip, with nothing to say so), chunked twice.
        "POST /ws/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_owned(),
        "POST /ws/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_owned(),
        "POST /ws/x HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
        // Empty list elements, which hyper takes for a final coding that is not chunked.
        "POST /ws/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n".to_owned(),
        "POST /ws/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n0\r\n\r\n".to_owned(),
        "POST /ws/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: , chunked\r\n\r\n0\r\n\r\n".to_owned(),
        "POST /ws/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding:\r\nContent-Length: 3\r\n\r\nabc".to_owned(),
        format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n{UPGRADE}\r\n"),
        "GET /ws HTTP/2.0\r\nHost: localhost\r\n\r\n".to_owned(),
        "not http at all\r\n\r\n".to_owned(),
    ] {
        let (status, body) = answer(&gate, &head).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "{head:?}");
        assert!(body["message"].is_string(), "{head:?}: {body}");
    }
    assert_eq!(upstream.seen_count(), 0);
}

/// Over 16 KiB, or over 100 fields: 431 with `bad_request` in JSON.
#[tokio::test]
async fn oversized_heads_get_the_json_431() {
    let (gate, _upstream) = gate().await;
    let big = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n{UPGRADE}\r\n",
        "a".repeat(17 * 1024)
    );
    let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
    let many = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\n{many}{UPGRADE}\r\n");
    for head in [big, many] {
        let (status, body) = answer(&gate, &head).await;
        assert_eq!((status, body["error"].as_str()), (431, Some("bad_request")));
    }
}

/// A Host that is no `host[:port]` is refused, never copied into X-Forwarded-Host.
#[tokio::test]
async fn an_invalid_host_is_400() {
    let (gate, upstream) = gate().await;
    for host in ["a b", "evil/x?y", "user@evil", "host:port", "[::1", ""] {
        let head = format!("GET /ws HTTP/1.1\r\nHost: {host}\r\n{UPGRADE}\r\n");
        let (status, body) = answer(&gate, &head).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_request")),
            "Host: {host:?}"
        );
    }
    assert_eq!(upstream.seen_count(), 0);
    // Valid spellings still pass, and the upstream sees the Host as sent.
    for host in [
        "localhost",
        "localhost:8443",
        "127.0.0.1",
        "[::1]:8443",
        "gate.example.com",
    ] {
        let head = format!("GET /ws HTTP/1.1\r\nHost: {host}\r\n{UPGRADE}\r\n");
        let response = answer_head(&gate, &head).await;
        assert!(
            response.starts_with("HTTP/1.1 101"),
            "Host: {host}: {response}"
        );
        let seen = upstream.last_seen();
        assert_eq!(seen.headers["x-forwarded-host"], host);
    }
}

/// An absolute-form target (RFC 9112 §3.2.2): its authority is the request's host, not
/// the Host header (as nginx and Envoy take it); a scheme that is not a web one, or user
/// information, is refused.
#[tokio::test]
async fn an_absolute_form_target_names_the_host() {
    let (gate, upstream) = gate().await;
    for target in [
        "ftp://localhost/ws",
        "http://user:pw@localhost/ws",
        "http://evil/x?y",
    ] {
        let head = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}\r\n");
        let (status, body) = answer(&gate, &head).await;
        let expected = if target.starts_with("http://evil") {
            (404, Some("no_route"))
        } else {
            (400, Some("bad_request"))
        };
        assert_eq!((status, body["error"].as_str()), expected, "{target}");
    }
    assert_eq!(upstream.seen_count(), 0);
    for target in ["http://other.example:8080/ws", "wss://other.example/ws"] {
        let head = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}\r\n");
        let response = answer_head(&gate, &head).await;
        assert!(response.starts_with("HTTP/1.1 101"), "{target}: {response}");
        let seen = upstream.last_seen();
        let host = target.split('/').nth(2).unwrap();
        assert_eq!(seen.headers["x-forwarded-host"], host, "{target}");
        assert_eq!(seen.target, "/ws", "{target}");
    }
}

/// A fragment in the target (which a client never sends, RFC 9112 §3.2) is dropped, as nginx
/// drops it: the request is routed, and forwarded, without it.
#[tokio::test]
async fn a_fragment_in_the_target_is_dropped() {
    let (gate, upstream) = gate().await;
    for (target, forwarded) in [("/ws/room#frag", "/ws/room"), ("/ws#?x=1", "/ws")] {
        let head = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}\r\n");
        let response = answer_head(&gate, &head).await;
        assert!(response.starts_with("HTTP/1.1 101"), "{target}: {response}");
        assert_eq!(upstream.last_seen().target, forwarded, "{target}");
    }
}

/// Two Origin headers: which one would be checked? Refused.
#[tokio::test]
async fn two_origin_headers_are_400() {
    let upstream = Upstream::start().await;
    let policy = open_policy(
        &upstream.url(),
        "    origin: {allow: [\"https://app.example.com\"]}\n",
    );
    let gate = TestGate::start_with(&policy, false).await;
    let head = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nOrigin: https://app.example.com\r\nOrigin: https://evil.example.org\r\n{UPGRADE}\r\n");
    let (status, body) = answer(&gate, &head).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    assert_eq!(upstream.seen_count(), 0);
    // One allowed Origin is still admitted.
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nOrigin: https://app.example.com\r\n{UPGRADE}\r\n"
    );
    let response = answer_head(&gate, &head).await;
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
}

/// Bytes a client sends right behind its head (its first frame) still reach the relay.
#[tokio::test]
async fn a_frame_sent_with_the_head_is_relayed() {
    let (gate, _upstream) = gate().await;
    let mut bytes = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}\r\n").into_bytes();
    bytes.extend(wire::frame(0x81, b"early", true));
    let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &bytes)
        .await
        .unwrap();
    let response = wire::read_head(&mut tcp).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    let (opcode, payload) = wire::server_frame(&mut tcp).await;
    assert_eq!((opcode, payload.as_slice()), (0x1, &b"early"[..]));
}

/// Refusals over TLS end with close_notify too, whether hyper wrote them or the head
/// reader did: a strict client reads the whole answer and a clean end.
#[tokio::test]
async fn refusals_over_tls_end_cleanly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    for head in [
        "GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n".to_owned(),
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nX: a\r\n  b\r\n\r\n".to_owned(),
        format!(
            "GET /ws HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
            "a".repeat(17 * 1024)
        ),
    ] {
        let mut stream = gate.stream().await;
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stream.read_to_end(&mut out),
        )
        .await
        .expect("the gate kept the connection open");
        assert!(
            read.is_ok(),
            "{read:?} after {:?}",
            String::from_utf8_lossy(&out)
        );
        assert!(
            out.starts_with(b"HTTP/1.1 4"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
}

/// The 101 is written as hyper writes every other answer: status line, then the headers
/// (lower-case names: the upstream's own, then the handshake's), and one `date` (here the
/// upstream's, which it sent); the key's accept value is RFC 6455's.
#[tokio::test]
async fn the_101_is_framed_as_every_other_answer() {
    let (gate, _upstream) = gate().await;
    let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let head = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes())
        .await
        .unwrap();
    let response = wire::read_head(&mut tcp).await.unwrap();
    let lines: Vec<&str> = response.trim_end().split("\r\n").collect();
    assert_eq!(lines[0], "HTTP/1.1 101 Switching Protocols");
    let upstreams = &lines[1..lines.len() - 3];
    for own in ["x-upstream: yes", "sec-websocket-trace: t-1"] {
        assert!(upstreams.contains(&own), "{own}: {response:?}");
    }
    let handshake = [
        "connection: Upgrade",
        "upgrade: websocket",
        "sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
    ];
    assert_eq!(lines[lines.len() - 3..], handshake, "{response:?}");
    let dates: Vec<_> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("date: "))
        .collect();
    assert_eq!(dates.len(), 1, "{response:?}");
    assert!(
        dates[0].ends_with(" GMT") && dates[0].len() == 29,
        "{response:?}"
    );
}

/// A client that leaves (FIN, over TLS too) while the gate waits for the upstream's
/// handshake ends the wait at once, as nginx answers its 499: the upstream's half-done
/// connection is closed and the client's place under the per-IP cap is free again, long
/// before `upstream_connect_seconds`.
#[tokio::test]
async fn a_client_that_leaves_while_the_upstream_is_awaited_frees_its_place_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", upstream.local_addr().unwrap());
    let extra =
        "    timeouts: {upstream_connect_seconds: 10}\n    rate: {max_connections_per_ip: 1}\n";
    for tls in [false, true] {
        let gate = TestGate::start_with(&open_policy(&url, extra), tls).await;
        let head = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}\r\n");
        let mut client = gate.stream().await;
        client.write_all(head.as_bytes()).await.unwrap();
        let (mut held, _) = upstream.accept().await.unwrap();
        wire::read_head(&mut held).await.unwrap();
        drop(client);
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(2), held.read_to_end(&mut rest));
        assert!(
            closed.await.is_ok(),
            "tls {tls}: the upstream's connection outlived the client's"
        );
        // The place under the cap of 1 is free: the next client is relayed.
        let mut client = gate.stream().await;
        client.write_all(head.as_bytes()).await.unwrap();
        let _upstream_leg = wire::accept_upgrade(&upstream).await;
        let mut answer = vec![0u8; 12];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 101", "tls {tls}");
        let accepted = "wsgate_upgrades_total{route=\"ws\",result=\"accepted\"}";
        assert_eq!(gate.metric(accepted).await, 1.0, "tls {tls}");
    }
}

/// What a client sends after its upgrade request while the upstream's handshake is under
/// way (a frame sent without waiting for the 101) is kept and relayed in order, over TLS
/// too.
#[tokio::test]
async fn bytes_sent_while_the_upstream_is_awaited_are_relayed_after_the_101() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", upstream.local_addr().unwrap());
    for tls in [false, true] {
        let gate = TestGate::start_with(&open_policy(&url, ""), tls).await;
        let head = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}\r\n");
        let mut client = gate.stream().await;
        client.write_all(head.as_bytes()).await.unwrap();
        let (mut leg, _) = upstream.accept().await.unwrap();
        let request = wire::read_head(&mut leg).await.unwrap();
        client
            .write_all(&wire::frame(0x81, b"sent early", true))
            .await
            .unwrap();
        client
            .write_all(&wire::frame(0x81, b"and again", true))
            .await
            .unwrap();
        // Long enough for the gate to have read both frames while it waited.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let accept = wire::accept_value(&request);
        let switch = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
        leg.write_all(switch.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 12];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 101", "tls {tls}");
        for expected in [&b"sent early"[..], b"and again"] {
            let frame = tokio::time::timeout(DEADLINE, wire::read_frame(&mut leg))
                .await
                .expect("no frame in time")
                .expect("the upstream's leg ended");
            assert_eq!((frame.opcode, frame.masked), (1, true), "tls {tls}");
            assert_eq!(frame.payload, expected, "tls {tls}");
        }
    }
}

/// The departure is logged as nginx logs its 499: `upgrade abandoned by the client`,
/// `result="client_lost"`, and no `upstream_timeout` line follows for the request.
#[tokio::test]
async fn a_client_that_leaves_while_the_upstream_is_awaited_is_logged_as_abandoned() {
    let (mut gate, _dir, held) = support::process::gate_before_a_silent_upstream(1, &[]).await;
    let client = wire::send_upgrade(gate.addr, "/ws", "X-Request-Id: left-early\r\n").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(client);
    let line = gate.wait_line("request_id=left-early");
    assert!(line.contains("upgrade abandoned by the client"), "{line}");
    assert!(line.contains("result=\"client_lost\""), "{line}");
    assert!(line.contains("protocol=\"http/1.1\""), "{line}");
    gate.no_line("request_id=left-early", Duration::from_millis(1500));
    held.abort();
}

/// A client may shut its sending side once its request is out (an HTTP/1.1 half-close):
/// a refusal the gate decides is still written to it whole, over TLS too, every time, and
/// then the connection is closed. Upgrades refused for a token, an Origin or a route, and
/// plain requests refused (426 on an upgrade-only route, 404, 403), each as the first
/// request of its connection and as a later one after a kept-alive page. (hyper alone
/// closed such a connection on reading its end, often before the answer went out, and
/// always for a later request.)
#[tokio::test]
async fn a_refusal_reaches_a_client_that_half_closed_after_any_request() {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
    /// One answer: its head, then as many body bytes as its Content-Length says.
    async fn one_answer<S: AsyncRead + Unpin>(client: &mut S) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(client.read_u8().await.expect("an answer"));
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0; length];
        client.read_exact(&mut body).await.unwrap();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            let mut chunks = Vec::new();
            while !(chunks.starts_with(b"0\r\n\r\n") || chunks.ends_with(b"\r\n0\r\n\r\n")) {
                chunks.push(client.read_u8().await.unwrap());
            }
        }
        head
    }
    let upstream = Upstream::start().await;
    let key = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/ec.pub.pem");
    let policy = format!(
        "{}  - path: /page\n    name: page\n    http: pass\n    origin: {{allow: [\"https://good.example\"], allow_missing: true}}\n  - path: /auth\n    name: auth\n    auth: {{required: true, algorithms: [ES256], keys: [{{public_key_file: {key}}}]}}\n",
        open_policy(&upstream.url(), "")
    );
    let evil = "Origin: https://evil.example\r\n";
    let evil_upgrade = format!("{evil}{UPGRADE}");
    for tls in [false, true] {
        let gate = TestGate::start_with(&policy, tls).await;
        for (path, extra, status) in [
            ("/auth", UPGRADE, "401"),
            ("/ws", evil_upgrade.as_str(), "403"),
            ("/elsewhere", UPGRADE, "404"),
            ("/ws", "", "426"),
            ("/elsewhere", "", "404"),
            ("/page", evil, "403"),
        ] {
            let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n");
            for i in 0..15 {
                let mut client = gate.stream().await;
                // Every other time, as a later request: a first one (a page from the
                // upstream) answered and its connection kept.
                let later = i % 2 == 1;
                if later {
                    client
                        .write_all(b"GET /page HTTP/1.1\r\nHost: localhost\r\n\r\n")
                        .await
                        .unwrap();
                    let first = tokio::time::timeout(DEADLINE, one_answer(&mut client)).await;
                    let first = first.unwrap_or_else(|_| panic!("tls {tls}: no first answer"));
                    assert!(
                        !first.to_ascii_lowercase().contains("connection: close"),
                        "{first}"
                    );
                }
                client.write_all(request.as_bytes()).await.unwrap();
                client.shutdown().await.unwrap();
                let mut answer = Vec::new();
                let read = tokio::time::timeout(DEADLINE, client.read_to_end(&mut answer)).await;
                assert!(read.is_ok(), "tls {tls} {path} #{i}: no end");
                let answer = String::from_utf8_lossy(&answer);
                assert!(
                    answer.starts_with(&format!("HTTP/1.1 {status}")),
                    "tls {tls} {path} later {later} #{i}: {answer:?}"
                );
                assert!(answer.contains("\"error\":"), "{answer:?}");
            }
        }
    }
}

/// A refusal of a request whose body the gate does not read (here 24 MiB, sent whole
/// before the client reads, as Python's http.client sends it) reaches the client: the
/// connection lingers, discarding the body, instead of meeting the rest of it with a reset
/// that would destroy the answer (nginx's lingering close).
#[tokio::test]
async fn a_refusal_reaches_a_client_still_sending_its_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let body = vec![b'x'; 24 * 1024 * 1024];
    for tls in [false, true] {
        let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), tls).await;
        for (path, status) in [("/ws", "426"), ("/elsewhere", "404")] {
            let mut client = gate.stream().await;
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            client.write_all(head.as_bytes()).await.unwrap();
            let sent = tokio::time::timeout(DEADLINE, client.write_all(&body)).await;
            assert!(
                matches!(sent, Ok(Ok(()))),
                "tls {tls} {path}: the body met {sent:?}"
            );
            let mut answer = Vec::new();
            let read = tokio::time::timeout(DEADLINE, client.read_to_end(&mut answer)).await;
            assert!(
                matches!(read, Ok(Ok(_))),
                "tls {tls} {path}: the answer met {read:?}"
            );
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "tls {tls} {path}: {answer:?}"
            );
        }
    }
}

/// A half-closed client's plain request waiting on an `http: pass` upstream is abandoned
/// at once, as nginx answers its 499: the upstream's connection is closed, not held until
/// the upstream answers.
#[tokio::test]
async fn a_half_closed_clients_plain_request_waiting_on_the_upstream_is_abandoned() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that takes the request and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", silent.local_addr().unwrap());
    let gate = TestGate::start_with(&open_policy(&url, "    http: pass\n"), false).await;
    let mut client = gate.stream().await;
    client
        .write_all(b"GET /ws/page HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (mut leg, _) = tokio::time::timeout(DEADLINE, silent.accept())
        .await
        .expect("the request reached the upstream")
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(leg.read_u8().await.unwrap());
    }
    client.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut answer)).await;
    assert!(ended.is_ok(), "the client's connection was held");
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), leg.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the upstream's connection was held");
}
