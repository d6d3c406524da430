//! Hostile frames over a raw socket (a first part of the robustness catalogue): the gate
//! answers each protocol violation with the close code RFC 6455 gives it, rather than
//! just dropping TCP, and the upstream is told 1001.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A plaintext gate, an upgraded raw socket to it, and the upstream behind it.
async fn upgraded() -> (TestGate, Upstream, TcpStream) {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let mut tcp = TcpStream::connect(gate.addr).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    // Read the response head byte by byte, so no frame bytes are consumed with it.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    (gate, upstream, tcp)
}

/// One client frame: `first` is FIN/RSV/opcode; masked unless `masked` is false.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12u8, 0x34, 0x56, 0x78];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// The next close frame the gate sends (unmasked, server to client).
async fn close_code(tcp: &mut TcpStream) -> u16 {
    let read = async {
        loop {
            let mut h = [0u8; 2];
            tcp.read_exact(&mut h)
                .await
                .expect("the gate dropped TCP without a close frame");
            let len = match h[1] & 0x7f {
                126 => {
                    let mut l = [0u8; 2];
                    tcp.read_exact(&mut l).await.unwrap();
                    u16::from_be_bytes(l) as usize
                }
                127 => {
                    let mut l = [0u8; 8];
                    tcp.read_exact(&mut l).await.unwrap();
                    u64::from_be_bytes(l) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.unwrap();
            if h[0] & 0x0f == 0x8 {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("no close frame in time")
}

async fn assert_closed_with(bytes: Vec<u8>, expected: &[u16]) {
    let (_gate, upstream, mut tcp) = upgraded().await;
    tcp.write_all(&bytes).await.unwrap();
    let code = close_code(&mut tcp).await;
    assert!(
        expected.contains(&code),
        "got close {code}, expected one of {expected:?}"
    );
    assert!(matches!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, _)
    ));
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
