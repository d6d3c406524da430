//! Rows of the hostile-input catalogue over raw sockets: protocol violations get the close
//! code RFC 6455 gives them (not just a TCP drop) and the upstream is told; bad close
//! frames, pong and ping floods, a close without a TCP close; hostile upgrade requests and
//! plain HTTP on the TLS port; upstreams that answer the handshake wrongly or break the
//! protocol. Other connections keep working.

mod support;

use std::time::Duration;

use support::process::{rss_kib, Proc};
use support::wire::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A plaintext gate, an upgraded raw socket to it, and the upstream behind it.
async fn upgraded() -> (TestGate, Upstream, TcpStream) {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let tcp = upgrade_raw(&gate).await;
    (gate, upstream, tcp)
}

/// A raw socket upgraded through `gate` on /ws.
async fn upgrade_raw(gate: &TestGate) -> TcpStream {
    upgrade_raw_at(gate.addr).await
}

/// Another client still gets its messages echoed through `gate`.
async fn assert_still_serving(gate: &TestGate) {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut good, _) = gate.connect("/ws").await.unwrap();
    good.send(Message::text("fine")).await.unwrap();
    assert_eq!(next_message(&mut good).await, Message::text("fine"));
}

async fn assert_closed_with(bytes: Vec<u8>, expected: &[u16]) {
    let (_gate, upstream, mut tcp) = upgraded().await;
    tcp.write_all(&bytes).await.unwrap();
    let code = close_code(&mut tcp).await;
    assert!(
        expected.contains(&code),
        "got close {code}, expected one of {expected:?}"
    );
    let ended = upstream.wait_ended(0).await;
    assert!(
        matches!(ended, Ended::Close(1001, _)),
        "upstream: {ended:?}"
    );
}

#[tokio::test]
async fn unmasked_client_frame_is_1002() {
    assert_closed_with(frame(0x81, b"hello", false), &[1002]).await;
}

#[tokio::test]
async fn invalid_utf8_text_is_1007() {
    assert_closed_with(frame(0x81, &[0xc3, 0x28, 0xff], true), &[1007]).await;
}

#[tokio::test]
async fn invalid_utf8_split_across_fragments_is_1007() {
    // "é" is c3 a9: the first fragment ends mid-character, the second breaks it.
    let mut bytes = frame(0x01, &[b'a', 0xc3], true);
    bytes.extend(frame(0x80, &[0x28], true));
    assert_closed_with(bytes, &[1007]).await;
}

#[tokio::test]
async fn rsv_bits_without_an_extension_are_1002() {
    assert_closed_with(frame(0xc1, b"x", true), &[1002]).await;
}

#[tokio::test]
async fn a_length_not_in_its_shortest_encoding_is_1002() {
    // RFC 6455 §5.2: 5 bytes announced in the 16-bit form, then in the 64-bit form.
    let key = [1u8, 2, 3, 4];
    let masked: Vec<u8> = b"hello"
        .iter()
        .zip(key.iter().cycle())
        .map(|(b, k)| b ^ k)
        .collect();
    let mut short16 = vec![0x82, 0x80 | 126, 0, 5];
    short16.extend_from_slice(&key);
    short16.extend_from_slice(&masked);
    assert_closed_with(short16, &[1002]).await;
    let mut short64 = vec![0x82, 0x80 | 127];
    short64.extend_from_slice(&5u64.to_be_bytes());
    short64.extend_from_slice(&key);
    short64.extend_from_slice(&masked);
    assert_closed_with(short64, &[1002]).await;
}

#[tokio::test]
async fn reserved_opcode_is_1002() {
    assert_closed_with(frame(0x83, b"x", true), &[1002]).await;
}

#[tokio::test]
async fn control_frame_over_125_bytes_is_1002() {
    assert_closed_with(frame(0x89, &[0u8; 126], true), &[1002]).await;
}

#[tokio::test]
async fn fragmented_control_frame_is_1002() {
    assert_closed_with(frame(0x09, b"ping", true), &[1002]).await;
}

#[tokio::test]
async fn continuation_without_a_start_is_1002() {
    assert_closed_with(frame(0x80, b"orphan", true), &[1002]).await;
}

#[tokio::test]
async fn data_frame_inside_a_fragmented_message_is_1002() {
    let mut bytes = frame(0x01, b"start", true);
    bytes.extend(frame(0x81, b"intruder", true));
    assert_closed_with(bytes, &[1002]).await;
}

#[tokio::test]
async fn a_64_bit_length_with_the_top_bit_set_is_refused_before_allocation() {
    let mut bytes = vec![0x82, 0x80 | 127];
    bytes.extend_from_slice(&(1u64 << 63).to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 0, 0]);
    assert_closed_with(bytes, &[1002, 1009]).await;
}

#[tokio::test]
async fn one_byte_fragments_past_the_message_limit_are_1009() {
    let upstream = Upstream::start().await;
    let limits = "    messages: {max_frame_bytes: 512, max_message_bytes: 1024}\n";
    let gate = TestGate::start_with(&open_policy(&upstream.url(), limits), false).await;
    let mut tcp = upgrade_raw(&gate).await;
    let mut bytes = frame(0x02, b"x", true); // binary, not final
    for _ in 0..1100 {
        bytes.extend(frame(0x00, b"x", true)); // continuation, not final
    }
    // The gate may close before reading them all: a failed write is fine.
    let _ = tcp.write_all(&bytes).await;
    assert_eq!(close_code(&mut tcp).await, 1009);
    let ended = upstream.wait_ended(0).await;
    assert!(matches!(ended, Ended::Close(1001, _)), "{ended:?}");
}

#[tokio::test]
async fn other_connections_are_unaffected_by_a_violation() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (gate, _upstream, mut bad) = upgraded().await;
    let (mut good, _) = gate.connect("/ws").await.unwrap();
    bad.write_all(&frame(0x81, b"unmasked", false))
        .await
        .unwrap();
    assert_eq!(close_code(&mut bad).await, 1002);
    good.send(Message::text("fine")).await.unwrap();
    assert_eq!(next_message(&mut good).await, Message::text("fine"));
}

// ----- close frames -------------------------------------------------------------------

#[tokio::test]
async fn close_with_a_one_byte_payload_is_1002() {
    assert_closed_with(frame(0x88, &[0x03], true), &[1002]).await;
}

#[tokio::test]
async fn close_codes_a_peer_may_not_send_are_its_protocol_error() {
    // 1005, 1006 and 1015 are for APIs only; 999 and 5000 are outside every range; 1004
    // and 1016-2999 are reserved. Such a close is the client's protocol error: it gets
    // 1002, and the upstream, which did nothing wrong, 1001 (not a 1002 blaming it).
    for code in [999u16, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
        let (gate, upstream, mut tcp) = upgraded().await;
        tcp.write_all(&frame(0x88, &code.to_be_bytes(), true))
            .await
            .unwrap();
        assert_eq!(close_code(&mut tcp).await, 1002, "close code {code}");
        let ended = upstream.wait_ended(0).await;
        assert!(
            matches!(ended, Ended::Close(1001, _)),
            "close code {code}: upstream {ended:?}"
        );
        let series = "wsgate_closes_total{route=\"ws\",reason=\"client_protocol_error\"}";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let (_, metrics) = admin_fetch(gate.admin, "/metrics").await;
            if metric_sample(&metrics, series) == Some(1.0) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "close code {code}: {metrics}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn upstream_close_codes_it_may_not_send_are_1014_to_the_client() {
    // An upstream's invalid close code is the upstream's failure: the client is told
    // 1014 "upstream unavailable", not a 1002 that blames it.
    for code in [999u16, 1004, 1015, 2999] {
        let up = raw_upstream(match code {
            999 => |a: &str| upstream_close(a, 999),
            1004 => |a: &str| upstream_close(a, 1004),
            1015 => |a: &str| upstream_close(a, 1015),
            _ => |a: &str| upstream_close(a, 2999),
        })
        .await;
        let gate = TestGate::start_with(&open_policy(&up, ""), false).await;
        let mut tcp = upgrade_raw(&gate).await;
        assert_eq!(
            close_code(&mut tcp).await,
            1014,
            "upstream close code {code}"
        );
    }
}

/// 1014 is a code a peer may send: an upstream that is itself a gateway has it relayed,
/// and a client that echoes the gate's own 1014 (as Python `websockets` does) completes the
/// close handshake at once rather than being held to the close deadline as a protocol
/// error.
#[tokio::test]
async fn a_1014_is_relayed_and_a_client_echoing_it_is_let_go_at_once() {
    let up = raw_upstream(|a: &str| upstream_close(a, 1014)).await;
    let gate = TestGate::start_with(&open_policy(&up, ""), false).await;
    let mut tcp = upgrade_raw(&gate).await;
    assert_eq!(close_code(&mut tcp).await, 1014);
    // An upstream failing its frames: the gate's own 1014, echoed.
    let up = raw_upstream(|accept: &str| {
        let mut out = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes();
        out.extend_from_slice(&[0xC1, 0x01, b'x']);
        out
    })
    .await;
    let gate = TestGate::start_with(&open_policy(&up, ""), false).await;
    let mut tcp = upgrade_raw(&gate).await;
    assert_eq!(close_code(&mut tcp).await, 1014);
    tcp.write_all(&frame(0x88, &1014u16.to_be_bytes(), true))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the gate held the socket {:?} after the echoed 1014",
        started.elapsed()
    );
    // Nothing more was written: no 1002 for the echo.
    assert!(rest.is_empty(), "{rest:?}");
}

/// The close line names the codes sent to each side, and no code for a side that was cut
/// off inside a frame and got none: here the client's large text frame turns out not to be
/// UTF-8 after its first chunk has gone to the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn the_close_line_has_no_code_for_a_side_cut_off_inside_a_frame() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let mut gate = Proc::start(&policy, &[]);
    let mut tcp = upgrade_raw_at(gate.addr).await;
    // A clean close first: both codes.
    tcp.write_all(&frame(0x88, &4000u16.to_be_bytes(), true))
        .await
        .unwrap();
    assert_eq!(close_code(&mut tcp).await, 4000);
    let line = gate.wait_line("reason=\"client_closed\"");
    assert!(line.contains("client_code=4000"), "{line}");
    assert!(line.contains("upstream_code=4000"), "{line}");

    let mut tcp = upgrade_raw_at(gate.addr).await;
    let mut payload = vec![b'a'; 200 * 1024];
    payload[150 * 1024] = 0xff;
    let bytes = frame(0x81, &payload, true);
    // The first part alone, so that it is relayed before the bad byte arrives.
    tcp.write_all(&bytes[..100 * 1024]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tcp.write_all(&bytes[100 * 1024..]).await.unwrap();
    let (_, close) = server_frame(&mut tcp).await;
    assert_eq!(close[..2], 1007u16.to_be_bytes());
    assert_eq!(&close[2..], b"invalid payload data");
    let line = gate.wait_line("reason=\"client_protocol_error\"");
    assert!(line.contains("client_code=1007"), "{line}");
    assert!(!line.contains("upstream_code="), "{line}");
}

/// A 101, then at once a close frame with `code`.
fn upstream_close(accept: &str, code: u16) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes();
    out.extend_from_slice(&[0x88, 0x02]);
    out.extend_from_slice(&code.to_be_bytes());
    out
}

#[tokio::test]
async fn close_reason_that_is_not_utf8_is_1007() {
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&[0xff, 0xfe]);
    assert_closed_with(frame(0x88, &payload, true), &[1007, 1002]).await;
}

/// Reads server frames until a data frame arrives; returns (pongs seen, its payload).
async fn next_data(tcp: &mut TcpStream) -> (usize, Vec<u8>) {
    let read = async {
        let mut pongs = 0;
        loop {
            match server_frame(tcp).await {
                (0xA, _) => pongs += 1,
                (0x1 | 0x2, payload) => return (pongs, payload),
                (0x8, payload) => panic!("closed with {:?}", &payload[..2.min(payload.len())]),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("no data frame in time")
}

#[tokio::test]
async fn unsolicited_pong_is_ignored() {
    let (_gate, _upstream, mut tcp) = upgraded().await;
    tcp.write_all(&frame(0x8A, b"nobody asked", true))
        .await
        .unwrap();
    tcp.write_all(&frame(0x81, b"still here", true))
        .await
        .unwrap();
    assert_eq!(next_data(&mut tcp).await.1, b"still here");
}

/// `n` pings and a text message in one write: some pings are answered, and the message is
/// echoed after them.
async fn assert_flood_answered(tcp: &mut TcpStream, n: u32) {
    let mut flood = control_frames(0x89, n);
    flood.extend_from_slice(&frame(0x81, b"after the flood", true));
    tcp.write_all(&flood).await.unwrap();
    let (pongs, data) = next_data(tcp).await;
    assert_eq!(data, b"after the flood");
    assert!(pongs > 0, "no ping was answered");
}

#[tokio::test]
async fn ping_flood_is_answered_and_the_connection_keeps_working() {
    let (gate, _upstream, mut tcp) = upgraded().await;
    assert_flood_answered(&mut tcp, 2000).await;
    // Another client is served meanwhile.
    assert_still_serving(&gate).await;
}

/// A policy whose route allows 10 messages a second with a burst of 20.
fn metered(upstream: &Upstream, mode: &str) -> String {
    open_policy(
        &upstream.url(),
        "    messages: {per_second: 10, burst: 20}\n",
    )
    .replacen("version: 1\n", &format!("version: 1\nmode: {mode}\n"), 1)
}

#[tokio::test]
async fn ping_and_pong_floods_past_the_message_rate_are_1008() {
    // Each ping costs the gate a pong: unmetered, 10 flooding connections starved every
    // other connection (benches/soak.py's attack). Pings and pongs take a message token.
    for opcode in [0x89u8, 0x8A] {
        let upstream = Upstream::start().await;
        let gate = TestGate::start_with(&metered(&upstream, "enforce"), false).await;
        let mut tcp = upgrade_raw(&gate).await;
        let flood = control_frames(opcode, 2000);
        // The gate may close before reading them all: a failed write is fine.
        let _ = tcp.write_all(&flood).await;
        let (pongs, code, reason) = pongs_until_close(&mut tcp).await;
        assert_eq!(
            (code, reason.as_str()),
            (1008, "message rate exceeded"),
            "opcode {opcode:#x}"
        );
        assert!(
            pongs <= 20,
            "opcode {opcode:#x}: {pongs} pongs past a burst of 20"
        );
        let ended = upstream.wait_ended(0).await;
        assert!(matches!(ended, Ended::Close(1001, _)), "{ended:?}");
        assert_still_serving(&gate).await;
    }
}

/// The pongs a client library sends to the gate's own heartbeat pings (RFC 6455 obliges
/// it) are not its messages: a client keeping under its message rate is not cut off with
/// 1008 for answering them.
#[tokio::test]
async fn the_pongs_our_heartbeat_asks_for_are_not_metered() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let upstream = Upstream::start().await;
    let policy = open_policy(
        &upstream.url(),
        "    messages: {per_second: 1, burst: 1}\n    heartbeat: {interval_seconds: 1, timeout_seconds: 1}\n",
    );
    let gate = TestGate::start_with(&policy, false).await;
    let (client, _) = gate.connect("/ws").await.unwrap();
    let (mut tx, mut rx) = client.split();
    // The reader answers every ping at once (tungstenite does) and keeps what came.
    let reader = tokio::spawn(async move {
        let mut echoes = 0;
        while let Some(Ok(message)) = rx.next().await {
            match message {
                Message::Text(_) => echoes += 1,
                Message::Close(frame) => return (echoes, frame.map(|f| u16::from(f.code))),
                _ => {}
            }
        }
        (echoes, None)
    });
    // 0.8 messages a second for 6 s, against a rate of 1: six heartbeat pings meanwhile.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1250)).await;
        tx.send(Message::text("m")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tx.send(Message::Close(None)).await.unwrap();
    let (echoes, code) = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the close in time")
        .unwrap();
    // Our close's answer (tungstenite may end the stream on it instead of showing it).
    assert_eq!(echoes, 5);
    assert!(matches!(code, None | Some(1000)), "closed with {code:?}");
}

/// Writes `frames` pings, `batch` at a time with `pause` between batches, until the gate
/// stops taking them; meanwhile reads until the gate's close frame. Returns the close code
/// and how long the gate kept the connection open after it (to EOF or a reset).
async fn flood_past_a_close(tcp: &mut TcpStream, batch: u32, pause: Duration) -> (u16, Duration) {
    let (mut rd, mut wr) = tcp.split();
    let pings = control_frames(0x89, batch);
    let flood = async {
        while wr.write_all(&pings).await.is_ok() {
            tokio::time::sleep(pause).await;
        }
    };
    let read = async {
        let (_, code, _) = pongs_until_close(&mut rd).await;
        let closed = std::time::Instant::now();
        let mut sink = vec![0u8; 64 * 1024];
        while let Ok(1..) = rd.read(&mut sink).await {}
        (code, closed.elapsed())
    };
    let both = async { tokio::join!(flood, read).1 };
    tokio::time::timeout(Duration::from_secs(8), both)
        .await
        .expect("the gate kept a flooding connection open")
}

#[tokio::test]
async fn a_flooder_cut_off_by_the_message_rate_is_dropped_without_a_wait() {
    // Waiting for its close reply while it floods kept the gate reading 12 M frames/s
    // until write_seconds (10 s here).
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&metered(&upstream, "enforce"), false).await;
    let mut tcp = upgrade_raw(&gate).await;
    let (code, open_after) = flood_past_a_close(&mut tcp, 1000, Duration::ZERO).await;
    assert_eq!(code, 1008);
    assert!(open_after < Duration::from_secs(1), "{open_after:?}");
    assert_still_serving(&gate).await;
}

#[tokio::test]
async fn a_close_reply_is_awaited_for_at_most_1024_frames() {
    // The idle timeout closes with a handshake; a client that keeps pinging (10,000 a
    // second, under the rate; pings are not activity) never sends its reply.
    let upstream = Upstream::start().await;
    let extra = "    timeouts: {idle_seconds: 1, write_seconds: 10}\n";
    let gate = TestGate::start_with(&open_policy(&upstream.url(), extra), false).await;
    let mut tcp = upgrade_raw(&gate).await;
    let pause = Duration::from_millis(10);
    let (code, open_after) = flood_past_a_close(&mut tcp, 100, pause).await;
    assert_eq!(code, 1001);
    assert!(open_after < Duration::from_secs(2), "{open_after:?}");
}

#[tokio::test]
async fn pings_within_the_message_rate_are_answered() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&metered(&upstream, "enforce"), false).await;
    let mut tcp = upgrade_raw(&gate).await;
    for i in 0..10u32 {
        tcp.write_all(&frame(0x89, &i.to_be_bytes(), true))
            .await
            .unwrap();
        assert_eq!(
            server_frame(&mut tcp).await,
            (0xA, i.to_be_bytes().to_vec())
        );
    }
    tcp.write_all(&frame(0x81, b"after ten pings", true))
        .await
        .unwrap();
    assert_eq!(next_data(&mut tcp).await.1, b"after ten pings");
}

#[tokio::test]
async fn report_mode_answers_a_ping_flood_and_counts_it() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&metered(&upstream, "report"), false).await;
    let mut tcp = upgrade_raw(&gate).await;
    assert_flood_answered(&mut tcp, 200).await;
    let (_, metrics) = admin_fetch(gate.admin, "/metrics").await;
    let series = "wsgate_report_violations_total{route=\"ws\",reason=\"message_rate_exceeded\"}";
    let counted = metric_sample(&metrics, series).unwrap_or(0.0);
    assert!(counted >= 180.0, "{counted} violations counted:\n{metrics}");
}

#[tokio::test]
async fn close_frame_without_tcp_close_is_answered_and_tcp_closed() {
    let (_gate, upstream, mut tcp) = upgraded().await;
    tcp.write_all(&frame(0x88, &1000u16.to_be_bytes(), true))
        .await
        .unwrap();
    assert_eq!(close_code(&mut tcp).await, 1000);
    // The client keeps its socket open; the gate, as the server, closes TCP.
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(
        eof.is_ok(),
        "the gate kept TCP open after the close handshake"
    );
    assert!(matches!(
        upstream.wait_ended(0).await,
        Ended::Close(1000, _)
    ));
}

// ----- upgrade requests ---------------------------------------------------------------

#[tokio::test]
async fn permessage_deflate_offered_gets_a_101_without_it() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let response = gate
        .raw(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n")
        .await;
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    assert!(
        !response
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "{response}"
    );
}

#[tokio::test]
async fn more_than_100_header_fields_are_431() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let mut request = String::from("GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
    for i in 0..120 {
        request.push_str(&format!("X-Filler-{i}: {i}\r\n"));
    }
    request.push_str("\r\n");
    let response = gate.raw(request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    assert_eq!(upstream.seen_count(), 0, "the upstream saw the request");
}

/// Plain HTTP on the TLS port gets nginx's answer, a 400 that says so (in the JSON of
/// every refusal, counted under `route="none"`), rather than a TLS alert that an HTTP
/// client shows as an empty reply; the connection is closed and the upstream never sees it.
#[tokio::test]
async fn plain_http_to_the_tls_port_is_400_bad_request_and_the_gate_serves_on() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), true).await;
    let mut tcp = TcpStream::connect(gate.addr).await.unwrap();
    tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    assert!(ended.is_ok(), "the gate kept a non-TLS connection open");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    assert!(out.contains(r#""error":"bad_request""#), "{out}");
    assert!(out.contains("plain HTTP was sent to the TLS port"), "{out}");
    let counted = "wsgate_upgrades_total{route=\"none\",result=\"bad_request\"}";
    assert_eq!(gate.metric(counted).await, 1.0);
    // A ClientHello that does not start like a request still goes to TLS (and fails there).
    let mut tcp = TcpStream::connect(gate.addr).await.unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01, 0x00, 0x02, 0x01, 0x00])
        .await
        .unwrap();
    tcp.shutdown().await.unwrap();
    let mut out = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    assert!(ended.is_ok(), "the gate kept a broken TLS connection open");
    assert!(!String::from_utf8_lossy(&out).contains("HTTP/1.1"));
    assert_eq!(upstream.seen_count(), 0);
    assert_still_serving(&gate).await;
}

// ----- hostile upstreams --------------------------------------------------------------

/// A raw upstream: reads one request head and answers with what `answer` makes of the
/// request's Sec-WebSocket-Accept value, then keeps the socket open for a while.
async fn raw_upstream(answer: fn(&str) -> Vec<u8>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = read_head(&mut tcp).await else {
                    return;
                };
                let _ = tcp.write_all(&answer(&accept_value(&head))).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
        }
    });
    format!("ws://{addr}")
}

/// The upgrade through an upstream that answers with `answer` is 502 upstream_unavailable.
async fn assert_upstream_unavailable(answer: fn(&str) -> Vec<u8>) {
    let (status, body, _) = upgrade_through(&raw_upstream(answer).await).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("upstream_unavailable"))
    );
}

async fn upgrade_through(upstream: &str) -> (u16, serde_json::Value, String) {
    let gate = TestGate::start_with(&open_policy(upstream, ""), false).await;
    let (status, headers, body) = refusal(gate.connect("/ws").await);
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, body, content_type)
}

#[tokio::test]
async fn upstream_101_with_a_wrong_accept_is_502() {
    assert_upstream_unavailable(|_| {
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n".to_vec()
    })
    .await;
}

/// A status outside 100–599 (RFC 9110 §15) is no answer to relay: 502, not `999 <none>`.
#[tokio::test]
async fn upstream_status_outside_100_to_599_is_502() {
    assert_upstream_unavailable(|_| b"HTTP/1.1 999 Weird\r\nContent-Length: 2\r\n\r\nok".to_vec())
        .await;
    assert_upstream_unavailable(|_| b"HTTP/1.1 600 Weird\r\nContent-Length: 0\r\n\r\n".to_vec())
        .await;
    // The highest valid status is relayed as it came.
    let up = raw_upstream(|_| b"HTTP/1.1 599 Odd\r\nContent-Length: 2\r\n\r\nok".to_vec()).await;
    assert_eq!(upgrade_through(&up).await.0, 599);
}

/// RFC 6455 §4.1: a 101 that does not say it switches to WebSocket, or that carries a
/// second Sec-WebSocket-Accept, fails the connection.
#[tokio::test]
async fn upstream_101_without_upgrade_websocket_or_with_two_accepts_is_502() {
    assert_upstream_unavailable(|accept| {
        format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes()
    })
    .await;
    assert_upstream_unavailable(|accept| {
        format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes()
    })
    .await;
    assert_upstream_unavailable(|accept| {
        format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes()
    })
    .await;
    assert_upstream_unavailable(|accept| {
        format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n").into_bytes()
    })
    .await;
    // Case and lists are as RFC 9110 has them.
    let up = raw_upstream(|accept| {
        format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: keep-alive, UPGRADE\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes()
    })
    .await;
    let gate = TestGate::start_with(&open_policy(&up, ""), false).await;
    assert!(gate.connect("/ws").await.is_ok());
}

/// RFC 9110 §15.2: interim responses before the 101 (`100 Continue`, `103 Early Hints`)
/// are read past, and the frames that came right behind the 101 still reach the client; a
/// ninth interim response is a broken upstream.
#[tokio::test]
async fn upstream_interim_responses_before_the_101_are_read_past() {
    use tokio_tungstenite::tungstenite::Message;
    let up = raw_upstream(|accept| {
        let mut out = format!(
            "HTTP/1.1 100 Continue\r\n\r\n\
             HTTP/1.1 103 Early Hints\r\nLink: </app.js>; rel=preload\r\n\r\n\
             HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        out.extend_from_slice(&[0x81, 0x02, b'h', b'i']);
        out
    })
    .await;
    let gate = TestGate::start_with(&open_policy(&up, ""), false).await;
    let (mut ws, response) = gate.connect("/ws").await.expect("upgrade");
    assert_eq!(response.status(), 101);
    assert!(response.headers().get("link").is_none());
    assert_eq!(next_message(&mut ws).await, Message::text("hi"));

    assert_upstream_unavailable(|accept| {
        let mut out = "HTTP/1.1 103 Early Hints\r\n\r\n".repeat(9).into_bytes();
        out.extend_from_slice(format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").as_bytes());
        out
    })
    .await;
}

#[tokio::test]
async fn upstream_101_with_an_unoffered_extension_is_502() {
    assert_upstream_unavailable(|accept| {
        format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n").into_bytes()
    })
    .await;
    // An empty value selects nothing: the upgrade goes on, with no extension.
    let up = raw_upstream(|accept| {
        format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Extensions: \r\n\r\n").into_bytes()
    })
    .await;
    let gate = TestGate::start_with(&open_policy(&up, ""), false).await;
    let (_ws, response) = gate.connect("/ws").await.expect("upgrade");
    assert!(response.headers().get("sec-websocket-extensions").is_none());
}

#[tokio::test]
async fn upstream_101_with_an_unoffered_subprotocol_is_502() {
    assert_upstream_unavailable(|accept| {
        format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: chat\r\n\r\n").into_bytes()
    })
    .await;
}

/// RFC 6455 §11.3.4: Sec-WebSocket-Protocol appears at most once in the 101, even when
/// both copies name the protocol the client offered. One copy of it is the upgrade.
#[tokio::test]
async fn upstream_101_selecting_a_subprotocol_twice_is_502() {
    let offering_chat = |gate: &TestGate| {
        let mut request = gate.request("/ws");
        request
            .headers_mut()
            .insert("sec-websocket-protocol", "chat".parse().unwrap());
        request
    };
    let up = raw_upstream(|accept| {
        format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: chat\r\n\r\n").into_bytes()
    })
    .await;
    let gate = TestGate::start_with(&open_policy(&up, ""), false).await;
    let (status, _, body) = refusal(gate.connect_request(offering_chat(&gate)).await);
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("upstream_unavailable"))
    );

    let up = raw_upstream(|accept| {
        format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: chat\r\n\r\n").into_bytes()
    })
    .await;
    let gate = TestGate::start_with(&open_policy(&up, ""), false).await;
    let (_ws, response) = gate
        .connect_request(offering_chat(&gate))
        .await
        .expect("upgrade");
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
}

/// RFC 9110 §15.2.2: a server does not switch protocols in HTTP/1.0.
#[tokio::test]
async fn upstream_101_in_http_1_0_is_502() {
    assert_upstream_unavailable(|accept| {
        format!("HTTP/1.0 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes()
    })
    .await;
}

#[tokio::test]
async fn upstream_garbage_instead_of_a_response_is_502() {
    assert_upstream_unavailable(|_| b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()).await;
}

#[tokio::test]
async fn upstream_chunked_refusal_is_relayed_decoded() {
    let up = raw_upstream(|_| {
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nnot yo\r\n2\r\nu!\r\n0\r\n\r\n".to_vec()
    })
    .await;
    let (status, body, content_type) = upgrade_through(&up).await;
    assert_eq!(status, 403);
    assert_eq!(body, serde_json::Value::String("not you!".into()));
    assert_eq!(content_type, "text/plain");
}

#[tokio::test]
async fn upstream_302_is_relayed() {
    let up = raw_upstream(|_| {
        b"HTTP/1.1 302 Found\r\nLocation: https://elsewhere.example/\r\nContent-Length: 0\r\n\r\n"
            .to_vec()
    })
    .await;
    let (status, _, _) = upgrade_through(&up).await;
    assert_eq!(status, 302);
}

#[tokio::test]
async fn upstream_200_and_500_are_relayed_as_they_came() {
    let up = raw_upstream(|_| {
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello".to_vec()
    })
    .await;
    let (status, body, _) = upgrade_through(&up).await;
    assert_eq!((status, body), (200, serde_json::json!("hello")));
    let up = raw_upstream(|_| {
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\noops"
            .to_vec()
    })
    .await;
    let (status, body, _) = upgrade_through(&up).await;
    assert_eq!((status, body), (500, serde_json::json!("oops")));
}

/// A refusal whose body is cut short is not passed on as if it were whole: the client
/// could not tell. Closed early it is 502; still short at the deadline, 504; framed both
/// by length and by chunks (a smuggler's framing), 502 at once.
#[tokio::test]
async fn upstream_refusal_cut_short_is_not_relayed_as_whole() {
    let closing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closing_url = format!("ws://{}", closing.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = closing.accept().await {
            let _ = read_head(&mut tcp).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\n0123456789")
                .await;
        }
    });
    let (status, body, _) = upgrade_through(&closing_url).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("upstream_unavailable"))
    );
    let short = "    timeouts: {upstream_connect_seconds: 1}\n";
    for answer in [
        (|_: &str| b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\n0123456789".to_vec())
            as fn(&str) -> Vec<u8>,
        |_| b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec(),
    ] {
        let gate =
            TestGate::start_with(&open_policy(&raw_upstream(answer).await, short), false).await;
        let (status, _, body) = refusal(gate.connect("/ws").await);
        assert_eq!(
            (status, body["error"].as_str()),
            (504, Some("upstream_timeout"))
        );
    }
    assert_upstream_unavailable(|_| {
        b"HTTP/1.1 500 Oops\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
    })
    .await;
    // Lengths that disagree, or a coding the client would get undone and unlabelled: 502,
    // as `http: pass` answers them. One length repeated is that length.
    assert_upstream_unavailable(|_| {
        b"HTTP/1.1 403 No\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec()
    })
    .await;
    assert_upstream_unavailable(|_| {
        b"HTTP/1.1 403 No\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n".to_vec()
    })
    .await;
    let up =
        raw_upstream(|_| b"HTTP/1.1 403 No\r\nContent-Length: 5, 5\r\n\r\nhello".to_vec()).await;
    let (status, body, _) = upgrade_through(&up).await;
    assert_eq!((status, body), (403, serde_json::json!("hello")));
    // Without length or chunks the body ends where the upstream closes: whole.
    let up = raw_upstream(|_| b"HTTP/1.1 403 Forbidden\r\n\r\nno".to_vec()).await;
    let gate = TestGate::start_with(&open_policy(&up, short), false).await;
    let (status, _, body) = refusal(gate.connect("/ws").await);
    assert_eq!((status, body), (403, serde_json::json!("no")));
}

#[tokio::test]
async fn upstream_masked_frame_closes_the_client_with_1014() {
    let up = raw_upstream(|accept| {
        let mut out = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes();
        // A masked text frame: servers must not mask.
        out.extend_from_slice(&frame(0x81, b"masked", true));
        out
    })
    .await;
    let gate = TestGate::start_with(&open_policy(&up, ""), false).await;
    let mut tcp = upgrade_raw(&gate).await;
    let code = close_code(&mut tcp).await;
    // The upstream broke the protocol: the client is told 1014 "upstream unavailable".
    assert_eq!(code, 1014);
}

#[tokio::test]
async fn answers_in_flight_reach_a_client_before_its_1002() {
    // Autobahn 3.2 and 5.15, strict: the echo of a message sent before the bad frame is
    // delivered first, as from an endpoint that answered it before reading the bad frame.
    let (_gate, upstream, mut tcp) = upgraded().await;
    let mut bytes = frame(0x81, b"before", true);
    bytes.extend(frame(0xA1, b"rsv", true));
    tcp.write_all(&bytes).await.unwrap();
    assert_eq!(next_data(&mut tcp).await.1, b"before");
    assert_eq!(close_code(&mut tcp).await, 1002);
    let ended = upstream.wait_ended(0).await;
    assert!(matches!(ended, Ended::Close(1001, _)), "{ended:?}");
}

/// The next frame a client (the gate, on its upstream leg) sends, unmasked.
async fn client_frame(tcp: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    tcp.read_exact(&mut h).await.unwrap();
    assert_ne!(h[1] & 0x80, 0, "a client frame must be masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            tcp.read_exact(&mut l).await.unwrap();
            u16::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut key = [0u8; 4];
    tcp.read_exact(&mut key).await.unwrap();
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.unwrap();
    payload
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b ^= key[i % 4]);
    (h[0] & 0x0f, payload)
}

#[tokio::test]
async fn answers_in_flight_reach_an_upstream_before_its_1002() {
    // The upstream sends a message, then a bad frame: the client's answer to the message
    // still reaches the upstream, then the upstream gets 1002 and the client 1014.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = format!("ws://{}", listener.local_addr().unwrap());
    let upstream = tokio::spawn(async move {
        let mut tcp = accept_upgrade(&listener).await;
        let mut out = Vec::new();
        out.extend_from_slice(&frame(0x81, b"question", false));
        out.extend_from_slice(&frame(0xA1, b"rsv", false));
        tcp.write_all(&out).await.unwrap();
        let mut frames = Vec::new();
        loop {
            let (op, payload) = client_frame(&mut tcp).await;
            frames.push((op, payload.clone()));
            if op == 0x8 {
                return frames;
            }
        }
    });
    let gate = TestGate::start_with(&open_policy(&up, ""), false).await;
    let mut tcp = upgrade_raw(&gate).await;
    assert_eq!(next_data(&mut tcp).await.1, b"question");
    // The answer is sent after the bad frame reached the gate: it is in flight.
    tcp.write_all(&frame(0x81, b"answer", true)).await.unwrap();
    assert_eq!(close_code(&mut tcp).await, 1014);
    tcp.write_all(&frame(0x88, &1014u16.to_be_bytes(), true))
        .await
        .unwrap();
    let frames = tokio::time::timeout(Duration::from_secs(5), upstream)
        .await
        .expect("the upstream got no close")
        .unwrap();
    assert_eq!(frames[0], (0x1, b"answer".to_vec()), "{frames:?}");
    let (op, payload) = frames.last().unwrap();
    assert_eq!((*op, &payload[..2]), (0x8, &1002u16.to_be_bytes()[..]));
}

// ----- tokens and addresses ------------------------------------------------------------

#[tokio::test]
async fn one_mib_token_is_refused_after_16_kib_and_the_gate_serves_on() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(
        &open_policy(
            &upstream.url(),
            "    auth: {required: true, algorithms: [HS256], keys: [{hmac_secret_file: secret}]}\n",
        ),
        false,
    )
    .await;
    let token = "A".repeat(1 << 20);
    for (request, status) in [
        (format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n{UPGRADE_HEADERS}\r\n"), 431),
        (format!("GET /ws?access_token={token} HTTP/1.1\r\nHost: localhost\r\n{UPGRADE_HEADERS}\r\n"), 431),
    ] {
        let mut tcp = TcpStream::connect(gate.addr).await.unwrap();
        // The gate answers and closes long before the megabyte is sent: ignore the reset.
        let (mut rx, mut tx) = tcp.split();
        let (_, head) = tokio::join!(tx.write_all(request.as_bytes()), async {
            let mut buf = vec![0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), rx.read(&mut buf))
                .await
                .expect("no answer in time")
                .unwrap_or(0);
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head:?}");
    }
    assert_eq!(upstream.seen_count(), 0);
    let (mut good, _) = gate
        .connect_request({
            let mut req = gate.request("/ws");
            req.headers_mut().insert(
                "authorization",
                header_value(&format!("Bearer {}", hs256("ok"))),
            );
            req
        })
        .await
        .unwrap();
    use futures_util::SinkExt;
    good.send(tokio_tungstenite::tungstenite::Message::text("fine"))
        .await
        .unwrap();
}

#[tokio::test]
async fn ipv4_mapped_peer_on_a_dual_stack_listener_matches_a_denied_ipv4_cidr() {
    let upstream = Upstream::start().await;
    let listener = match tokio::net::TcpListener::bind("[::]:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("no IPv6 here ({e}); skipped");
            return;
        }
    };
    let gate = TestGate::start_listening(
        &open_policy(&upstream.url(), "    ip: {deny: [127.0.0.0/8]}\n"),
        listener,
    )
    .await;
    // Connecting to 127.0.0.1 on a [::] listener: the peer is ::ffff:127.0.0.1.
    let mut tcp = TcpStream::connect(("127.0.0.1", gate.addr.port()))
        .await
        .unwrap();
    tcp.write_all(
        format!("GET /ws HTTP/1.1\r\nHost: localhost\r\n{UPGRADE_HEADERS}\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut tcp).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(upstream.seen_count(), 0);
}

#[tokio::test]
async fn upstream_reserved_opcode_closes_the_client_with_1014() {
    let up = raw_upstream(|accept| {
        let mut out = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes();
        out.extend_from_slice(&frame(0x83, b"reserved", false));
        out
    })
    .await;
    let gate = TestGate::start_with(&open_policy(&up, ""), false).await;
    let mut tcp = upgrade_raw(&gate).await;
    assert_eq!(close_code(&mut tcp).await, 1014);
    assert_still_serving_elsewhere().await;
}

/// A fresh gate and upstream still relay: nothing global was harmed.
async fn assert_still_serving_elsewhere() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    assert_still_serving(&gate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_frames_whose_payload_never_comes_cost_little_and_close_at_idle() {
    // Each connection declares a 64,000-byte binary frame (under the 1 MiB max_frame_bytes)
    // and sends 10 bytes of it. tungstenite reserves the declared length (address space,
    // bounded by max_frame_bytes), but only bytes that arrive are ever written, so the
    // resident memory is what the attackers actually sent. The idle deadline closes all.
    // The gate runs as its own process, so that its memory is measured alone.
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    let limits = "    rate: {upgrades_per_second: 100000, burst: 100000, max_connections_per_ip: 2000}\n    timeouts: {idle_seconds: 2}\n";
    std::fs::write(&policy, open_policy(&upstream.url(), limits)).unwrap();
    let gate = Proc::start(&policy, &[]);
    let pid = gate.child.id();
    let mut declared = vec![0x82u8, 0x80 | 126];
    declared.extend_from_slice(&64_000u16.to_be_bytes());
    declared.extend_from_slice(&[1, 2, 3, 4]); // mask
    declared.extend_from_slice(&[0u8; 10]);
    let before = rss_kib(pid);
    let started = std::time::Instant::now();
    let mut sockets = Vec::new();
    for _ in 0..1000 {
        let mut tcp = upgrade_raw_at(gate.addr).await;
        tcp.write_all(&declared).await.unwrap();
        sockets.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let grown = rss_kib(pid).saturating_sub(before);
    eprintln!("1,000 connections with a pending 64,000-byte frame: the gate grew {grown} KiB");
    // About 25 MiB measured (a debug build); touching the declared payloads would add
    // 62.5 MiB.
    assert!(grown < 48 * 1024, "the gate grew {grown} KiB");
    let closes = sockets
        .into_iter()
        .map(|mut tcp| tokio::spawn(async move { close_code(&mut tcp).await }));
    let codes = futures_util::future::join_all(closes).await;
    let waited = started.elapsed();
    assert!(
        codes.iter().all(|c| matches!(c, Ok(1001))),
        "not all closed with 1001"
    );
    assert!(waited < Duration::from_secs(10), "closing took {waited:?}");
    let mut good = gate.connect("/ws").await.unwrap();
    use futures_util::SinkExt;
    good.send(tokio_tungstenite::tungstenite::Message::text("fine"))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut good).await,
        tokio_tungstenite::tungstenite::Message::text("fine")
    );
}

// ----- TLS ----------------------------------------------------------------------------

/// A TLS 1.0 ClientHello offering only TLS_RSA_WITH_AES_128_CBC_SHA and no extensions.
fn tls10_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x01]; // client_version TLS 1.0
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0, (body.len() >> 8) as u8, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![
        0x16,
        0x03,
        0x01,
        (handshake.len() >> 8) as u8,
        handshake.len() as u8,
    ];
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn tls_1_0_only_client_is_refused_and_the_gate_serves_on() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), true).await;
    let mut tcp = TcpStream::connect(gate.addr).await.unwrap();
    tcp.write_all(&tls10_client_hello()).await.unwrap();
    let mut out = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    assert!(ended.is_ok(), "the gate kept a TLS 1.0 connection open");
    // Nothing but (at most) an alert record: no ServerHello.
    assert!(out.is_empty() || out[0] == 0x15, "{out:02x?}");
    assert_still_serving(&gate).await;
}

#[tokio::test]
async fn trickled_client_hello_is_cut_at_the_handshake_deadline() {
    let upstream = Upstream::start().await;
    let policy = open_policy(&upstream.url(), "").replace(
        "defaults:\n",
        "defaults:\n  timeouts: {handshake_seconds: 1}\n",
    );
    let gate = TestGate::start_with(&policy, true).await;
    let mut tcp = TcpStream::connect(gate.addr).await.unwrap();
    let hello = tls10_client_hello();
    let started = std::time::Instant::now();
    // One byte every 200 ms: each read makes progress, but the deadline is for the whole
    // handshake (TLS and the request head), so the gate must still cut it at ~1 s.
    let mut closed = false;
    for byte in hello.iter().take(40) {
        if tcp.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    let took = started.elapsed();
    assert!(
        closed,
        "the gate waited for a trickled ClientHello for {took:?}"
    );
    assert!(took < Duration::from_secs(3), "cut only after {took:?}");
    assert_eq!(upstream.seen_count(), 0);
}

// ----- hostile upgrade heads ------------------------------------------------------------

const UPGRADE_HEADERS: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// Sends `head` (and what follows it) to a fresh gate; the upstream must not see it.
async fn refused_head(request: String, status: u16, message: &str) {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let response = gate.raw(request.as_bytes()).await;
    assert!(
        response.starts_with(&format!("HTTP/1.1 {status}")),
        "{response}"
    );
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(body).expect(body);
    assert_eq!(json["error"], "bad_request");
    assert!(
        json["message"].as_str().unwrap().contains(message),
        "{json}"
    );
    assert_eq!(upstream.seen_count(), 0, "the upstream saw the request");
    assert_still_serving(&gate).await;
}

#[tokio::test]
async fn request_line_over_8_kib_is_414() {
    let target = format!("/ws?pad={}", "a".repeat(8 * 1024));
    let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n{UPGRADE_HEADERS}\r\n");
    refused_head(request, 414, "8 KiB").await;
}

#[tokio::test]
async fn request_line_just_under_8_kib_is_served() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    // "GET " + target + " HTTP/1.1" is exactly 8 KiB.
    let target = format!("/ws?pad={}", "a".repeat(8 * 1024 - 4 - 9 - 8));
    let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n{UPGRADE_HEADERS}\r\n");
    let response = gate.raw(request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
}

#[tokio::test]
async fn duplicate_host_is_400() {
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n{UPGRADE_HEADERS}\r\n"
    );
    refused_head(request, 400, "Host").await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_400() {
    let request = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n{UPGRADE_HEADERS}\r\n0\r\n\r\n");
    // hyper keeps only the Transfer-Encoding (RFC 9112 §6.3); an upgrade has no body.
    refused_head(request, 400, "no body").await;
}

#[tokio::test]
async fn upgrade_with_a_body_is_400() {
    // The body's bytes would otherwise be read as the client's first WebSocket frames.
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nContent-Length: 6\r\n{UPGRADE_HEADERS}\r\nhello!"
    );
    refused_head(request, 400, "no body").await;
}

/// The admin listener holds at most 128 connections: past them the oldest is closed, so a
/// reachable admin port cannot spend the file descriptors proxied connections need, and
/// connections someone holds open cannot keep the kubelet's probes out.
#[tokio::test]
async fn the_admin_listener_closes_its_oldest_connection_past_its_cap() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut held = Vec::new();
    for _ in 0..128 {
        held.push(TcpStream::connect(gate.admin).await.unwrap());
    }
    // A probe still gets its answer, on a new connection each time.
    for _ in 0..3 {
        let (status, _) = admin_fetch(gate.admin, "/healthz").await;
        assert_eq!(status, 200);
    }
    // The first took the place of the oldest connection (and the place its own end freed
    // served the next two).
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(3), held[0].read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the oldest admin connection was not closed: {read:?}"
    );
    // The others are served.
    held[1]
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    held[1].read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    held[127]
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    held[127].read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
}

/// An admin client that sends requests and never reads the answers is dropped once no
/// byte has left for 10 s, as a proxied client is at `write_seconds`.
#[tokio::test]
async fn an_admin_client_that_reads_nothing_is_dropped() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut tcp = TcpStream::connect(gate.admin).await.unwrap();
    // Far more answers than the socket buffers hold.
    let requests = 4000;
    let pipelined = "GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n".repeat(requests);
    let (mut rd, mut wr) = tcp.split();
    let write = async {
        // The gate stops reading requests once its answers back up: write what it takes.
        let _ =
            tokio::time::timeout(Duration::from_secs(13), wr.write_all(pipelined.as_bytes())).await;
    };
    let wait = tokio::time::sleep(Duration::from_secs(13));
    tokio::join!(write, wait);
    // Now read everything: only what was buffered when the gate gave up comes.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection was still open");
    let answers = got.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
    assert!(
        answers < requests,
        "every one of {answers} answers was sent"
    );
    assert_eq!(admin_get(gate.admin, "/healthz").await, 200);
}

/// A client gone when its 101 is to be written was counted accepted; its 101 cannot be
/// written, and the connection still ends as a lost client's does: the upstream gets 1001
/// and the close is counted. (A client that leaves while the upstream is still answering
/// is noticed and its upgrade abandoned, unless it sent more than the gate keeps before a
/// 101, 16 KiB: this one sends a frame past that, then resets, unnoticed.)
#[tokio::test]
async fn a_client_gone_before_its_101_is_closed_like_any_lost_client() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let upstream = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let head = read_head(&mut tcp).await.unwrap();
        // Slow to answer: the client is gone by then.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let accept = accept_value(&head);
        tcp.write_all(format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        loop {
            match read_frame(&mut tcp).await {
                Some(f) if f.opcode == 0x8 => {
                    break u16::from_be_bytes([f.payload[0], f.payload[1]])
                }
                Some(_) => {}
                None => break 0,
            }
        }
    });
    let gate = TestGate::start_with(&open_policy(&url, ""), false).await;
    let mut tcp = TcpStream::connect(gate.addr).await.unwrap();
    tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    tcp.write_all(&frame(0x82, &[7u8; 20 * 1024], true))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A reset, not a FIN: the gate's write of the 101 fails.
    tcp.set_zero_linger().unwrap();
    drop(tcp);
    let code = tokio::time::timeout(Duration::from_secs(10), upstream)
        .await
        .expect("the upstream was never closed")
        .unwrap();
    assert_eq!(code, 1001);
    gate.wait_metric(
        "wsgate_closes_total{route=\"ws\",reason=\"client_lost\"}",
        1.0,
        Duration::from_secs(5),
        "the lost client's close",
    )
    .await;
    assert_eq!(gate.metric("wsgate_connections_active").await, 0.0);
}
