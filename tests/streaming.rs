//! The relay streams: frames go on as they arrive (a large frame's payload before the rest
//! of it has come), fragments and their boundaries reach the other side as they were sent,
//! control frames between fragments are answered at once, and the frame and message
//! limits stop a message before a byte past them leaves the gate. Raw sockets on both
//! legs, so that what crosses the gate is seen frame by frame and byte by byte.

mod support;

use std::time::Duration;

use support::wire::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// A plaintext gate in front of a raw upstream, with `route_extra` in its /ws route: the
/// test gets the gate, the client's raw socket and the upstream's.
async fn through_gate(route_extra: &str) -> (TestGate, TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = format!("ws://{}", listener.local_addr().unwrap());
    let gate = TestGate::start_with(&open_policy(&up, route_extra), false).await;
    let (client, upstream) = tokio::join!(upgrade_raw_at(gate.addr), accept_upgrade(&listener));
    (gate, client, upstream)
}

async fn next_frame(tcp: &mut TcpStream) -> WireFrame {
    timeout(Duration::from_secs(5), read_frame(tcp))
        .await
        .expect("no frame in time")
        .expect("the connection ended")
}

fn data(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> WireFrame {
    WireFrame {
        fin,
        opcode,
        masked,
        payload: payload.to_vec(),
    }
}

fn close_code_of(frame: &WireFrame) -> u16 {
    assert_eq!(frame.opcode, 0x8, "{frame:?}");
    u16::from_be_bytes([frame.payload[0], frame.payload[1]])
}

#[tokio::test]
async fn client_fragments_reach_the_upstream_byte_for_byte() {
    let (_gate, mut client, mut upstream) = through_gate("").await;
    // A text message in three fragments, split inside a character.
    let mut sent = frame(0x01, "hé".as_bytes(), true);
    sent.extend(frame(0x00, b"", true));
    sent.extend(frame(0x80, " wörld".as_bytes(), true));
    client.write_all(&sent).await.unwrap();
    // The frames go on as the client sent them, masked with the client's own keys.
    let mut got = vec![0u8; sent.len()];
    timeout(Duration::from_secs(5), upstream.read_exact(&mut got))
        .await
        .expect("the message did not arrive")
        .unwrap();
    assert_eq!(got, sent);
}

#[tokio::test]
async fn upstream_fragments_reach_the_client_as_sent() {
    let (_gate, mut client, mut upstream) = through_gate("").await;
    let mut sent = frame(0x02, &[1, 2, 3], false);
    sent.extend(frame(0x00, &[4], false));
    sent.extend(frame(0x80, &[5, 6], false));
    upstream.write_all(&sent).await.unwrap();
    assert_eq!(
        next_frame(&mut client).await,
        data(false, 0x2, &[1, 2, 3], false)
    );
    assert_eq!(next_frame(&mut client).await, data(false, 0x0, &[4], false));
    assert_eq!(
        next_frame(&mut client).await,
        data(true, 0x0, &[5, 6], false)
    );
}

#[tokio::test]
async fn a_ping_between_fragments_is_answered_before_the_message_ends() {
    let (_gate, mut client, mut upstream) = through_gate("").await;
    let mut sent = frame(0x01, b"first ", true);
    sent.extend(frame(0x89, b"are you there", true));
    client.write_all(&sent).await.unwrap();
    // The pong comes while the message is still open; the ping is the gate's to answer.
    assert_eq!(
        next_frame(&mut client).await,
        data(true, 0xA, b"are you there", false)
    );
    assert_eq!(
        next_frame(&mut upstream).await,
        data(false, 0x1, b"first ", true)
    );
    client.write_all(&frame(0x80, b"last", true)).await.unwrap();
    assert_eq!(
        next_frame(&mut upstream).await,
        data(true, 0x0, b"last", true)
    );

    // And the other way: the upstream's ping between its fragments gets a (masked) pong.
    let mut sent = frame(0x02, b"one", false);
    sent.extend(frame(0x89, b"up?", false));
    upstream.write_all(&sent).await.unwrap();
    assert_eq!(
        next_frame(&mut upstream).await,
        data(true, 0xA, b"up?", true)
    );
    assert_eq!(
        next_frame(&mut client).await,
        data(false, 0x2, b"one", false)
    );
    upstream
        .write_all(&frame(0x80, b"two", false))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut client).await,
        data(true, 0x0, b"two", false)
    );
}

#[tokio::test]
async fn a_large_frame_is_forwarded_before_all_of_it_has_arrived() {
    let (_gate, mut client, mut upstream) = through_gate("").await;
    let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let bytes = frame(0x82, &payload, true);
    // Header (2 + 8 + 4 bytes) and the first quarter of the payload, then nothing.
    let first = 14 + payload.len() / 4;
    client.write_all(&bytes[..first]).await.unwrap();
    let mut got = vec![0u8; first];
    timeout(Duration::from_secs(5), upstream.read_exact(&mut got))
        .await
        .expect("the gate held the frame back until all of it had come")
        .unwrap();
    assert_eq!(got, bytes[..first]);
    client.write_all(&bytes[first..]).await.unwrap();
    let mut rest = vec![0u8; bytes.len() - first];
    timeout(Duration::from_secs(5), upstream.read_exact(&mut rest))
        .await
        .expect("the rest did not arrive")
        .unwrap();
    assert_eq!(rest, bytes[first..]);
}

const LIMITS: &str = "    messages: {max_frame_bytes: 1000, max_message_bytes: 1500, per_second: 100000, burst: 100000}\n";

#[tokio::test]
async fn the_message_limit_stops_a_fragmented_message_before_a_byte_past_it_leaves() {
    let (_gate, mut client, mut upstream) = through_gate(LIMITS).await;
    client
        .write_all(&frame(0x02, &[7; 1000], true))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut upstream).await,
        data(false, 0x2, &[7; 1000], true)
    );
    // 1000 + 501 > 1500: refused on its header.
    client
        .write_all(&frame(0x80, &[8; 501], true))
        .await
        .unwrap();
    assert_eq!(close_code(&mut client).await, 1009);
    // The upstream's next frame is its 1001, not a byte of the refused fragment.
    assert_eq!(close_code_of(&next_frame(&mut upstream).await), 1001);
}

#[tokio::test]
async fn the_frame_limit_refuses_a_frame_on_its_header_alone() {
    let (_gate, mut client, mut upstream) = through_gate(LIMITS).await;
    // Only the header of a 1001-byte frame: the payload never needs to come.
    let bytes = frame(0x82, &[0; 1001], true);
    client.write_all(&bytes[..8]).await.unwrap();
    assert_eq!(close_code(&mut client).await, 1009);
    assert_eq!(close_code_of(&next_frame(&mut upstream).await), 1001);
}

#[tokio::test]
async fn invalid_utf8_after_a_valid_chunk_is_never_forwarded() {
    let (_gate, mut client, mut upstream) = through_gate("").await;
    // Valid text, then (in the same frame, a later read) a byte that cannot be UTF-8.
    let mut payload = vec![b'a'; 600];
    payload.push(0xFF);
    let bytes = frame(0x81, &payload, true);
    client.write_all(&bytes[..300]).await.unwrap();
    let mut head = vec![0u8; 300];
    timeout(Duration::from_secs(5), upstream.read_exact(&mut head))
        .await
        .expect("the valid start was not forwarded")
        .unwrap();
    client.write_all(&bytes[300..]).await.unwrap();
    assert_eq!(close_code(&mut client).await, 1007);
    // The upstream's message was cut inside a frame: it gets no close frame it would read
    // as payload, and never the bad byte; its connection is closed.
    let mut rest = Vec::new();
    let read = timeout(Duration::from_secs(5), upstream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the upstream connection was not closed");
    // (0xFF masked with the key's first byte, 0x12, at payload offset 600.)
    assert!(!rest.contains(&(0xFF ^ 0x12)), "{rest:?}");
}

/// A message refused in its first read (bad UTF-8 from the upstream) never crossed:
/// `wsgate_messages_total` does not count it, as it does not count its bytes.
#[tokio::test]
async fn a_message_refused_before_any_of_it_crossed_is_not_counted() {
    let (gate, mut client, mut upstream) = through_gate("").await;
    upstream
        .write_all(&frame(0x81, b"ok", false))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut client).await, data(true, 0x1, b"ok", false));
    upstream
        .write_all(&frame(0x81, b"abc\xff\xfe", false))
        .await
        .unwrap();
    assert_eq!(close_code_of(&next_frame(&mut upstream).await), 1007);
    let series = "{route=\"ws\",direction=\"upstream_to_client\"}";
    assert_eq!(
        gate.metric(&format!("wsgate_messages_total{series}")).await,
        1.0
    );
    assert_eq!(
        gate.metric(&format!("wsgate_message_bytes_total{series}"))
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_heartbeat_ping_behind_a_long_frame_is_not_a_dead_client() {
    // The upstream trickles one 64 KiB frame for longer than a heartbeat interval and its
    // timeout: the gate's ping waits for the frame's end, and the client, which could not
    // have answered a ping it never got, is not closed for it.
    let heartbeat = "    heartbeat: {interval_seconds: 1, timeout_seconds: 1}\n";
    let (_gate, mut client, mut upstream) = through_gate(heartbeat).await;
    let payload = vec![9u8; 64 * 1024];
    let bytes = frame(0x82, &payload, false);
    let reader = tokio::spawn(async move {
        let frame = next_frame(&mut client).await;
        (frame, next_frame(&mut client).await)
    });
    let chunks: Vec<&[u8]> = bytes.chunks(bytes.len() / 16 + 1).collect();
    for chunk in chunks {
        upstream.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(220)).await;
    }
    let (frame, after) = timeout(Duration::from_secs(10), reader)
        .await
        .expect("the client got nothing more")
        .unwrap();
    assert_eq!(frame, data(true, 0x2, &payload, false));
    // Then the ping that waited, not a close.
    assert_eq!(after.opcode, 0x9, "{after:?}");
}

#[tokio::test]
async fn a_client_sending_one_long_frame_is_not_a_dead_client() {
    // The client trickles one 64 KiB frame for longer than a heartbeat interval and its
    // timeout (a browser uploading on a slow link: browsers never fragment). It cannot
    // answer the gate's ping before the frame ends, and its bytes arriving prove it alive:
    // the frame reaches the upstream whole, and the client gets pings, not a close.
    let heartbeat = "    heartbeat: {interval_seconds: 1, timeout_seconds: 1}\n";
    let (_gate, mut client, mut upstream) = through_gate(heartbeat).await;
    let payload = vec![7u8; 64 * 1024];
    let bytes = frame(0x82, &payload, true);
    let receiver = tokio::spawn(async move { (next_frame(&mut upstream).await, upstream) });
    for chunk in bytes.chunks(bytes.len() / 16 + 1) {
        client.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(220)).await;
    }
    let (got, _upstream) = timeout(Duration::from_secs(10), receiver)
        .await
        .expect("the upstream got nothing")
        .unwrap();
    assert_eq!(got, data(true, 0x2, &payload, true));
    // What waited for the client: pings only; answered, the connection stays.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(frame) = tokio::time::timeout_at(until, read_frame(&mut client)).await {
        let frame = frame.expect("the connection ended");
        assert_eq!(frame.opcode, 0x9, "{frame:?}");
        pings += 1;
        let pong = support::wire::frame(0x8A, &frame.payload, true);
        client.write_all(&pong).await.unwrap();
    }
    assert!(pings >= 1, "no ping reached the client");
}

/// A side that closes while the other is still sending it a large frame gets its close
/// passed on at once (the leg it goes out on is free); the rest of the frame still
/// reaches it, then the close reply. (The close waited up to 2 s for the frame's end.)
#[tokio::test]
async fn a_close_goes_on_at_once_while_the_other_side_sends_a_large_frame() {
    let (_gate, mut client, mut upstream) = through_gate("").await;
    let payload = vec![3u8; 64 * 1024];
    let bytes = frame(0x82, &payload, true);
    client.write_all(&bytes[..1024]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    upstream
        .write_all(&frame(0x88, &[0x0f, 0xa8, b'b', b'y', b'e'], false))
        .await
        .unwrap();
    let sent = tokio::time::Instant::now();
    let close = next_frame(&mut client).await;
    assert_eq!(close_code_of(&close), 4008);
    let took = sent.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "the close came after {took:?}"
    );
    // The client ends its frame, then replies.
    client.write_all(&bytes[1024..]).await.unwrap();
    client
        .write_all(&frame(0x88, &[0x0f, 0xa8], true))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut upstream).await,
        data(true, 0x2, &payload, true)
    );
    assert_eq!(close_code_of(&next_frame(&mut upstream).await), 4008);
}

/// The bytes of a frame's header count as the frame's bytes do: a client whose header
/// arrives a byte at a time, for longer than the heartbeat's timeout after a ping or than
/// the idle timeout, is neither dead nor idle, and its frame reaches the upstream.
#[tokio::test]
async fn a_frame_header_arriving_a_byte_at_a_time_is_neither_dead_nor_idle() {
    for extra in [
        "    heartbeat: {interval_seconds: 1, timeout_seconds: 0.8}\n",
        "    timeouts: {idle_seconds: 1}\n    heartbeat: {interval_seconds: 60, timeout_seconds: 10}\n",
    ] {
        let (_gate, mut client, mut upstream) = through_gate(extra).await;
        let payload = [5u8; 16];
        let bytes = frame(0x82, &payload, true);
        // The 6 bytes of the header (2 + the mask key) over 2.1 s, then the payload. The
        // client never answers the gate's pings.
        for byte in &bytes[..6] {
            tokio::time::sleep(Duration::from_millis(350)).await;
            client.write_all(std::slice::from_ref(byte)).await.unwrap();
        }
        client.write_all(&bytes[6..]).await.unwrap();
        assert_eq!(
            next_frame(&mut upstream).await,
            data(true, 0x2, &payload, true),
            "{extra}"
        );
    }
}

#[tokio::test]
async fn an_upstream_length_not_in_its_shortest_encoding_is_1002_and_1014_to_the_client() {
    // Browsers fail a connection whose server sends a length in a longer form than needed
    // (RFC 6455 §5.2): the gate refuses it instead of passing it on.
    let (_gate, mut client, mut upstream) = through_gate("").await;
    upstream
        .write_all(&[0x82, 126, 0, 5, b'h', b'e', b'l', b'l', b'o'])
        .await
        .unwrap();
    assert_eq!(close_code_of(&next_frame(&mut client).await), 1014);
    assert_eq!(close_code_of(&next_frame(&mut upstream).await), 1002);
}

/// The header of a 100,000-byte binary frame from the upstream.
fn large_frame_header() -> Vec<u8> {
    let mut header = vec![0x82, 127];
    header.extend_from_slice(&100_000u64.to_be_bytes());
    header
}

/// The gate ends a connection (its max lifetime) while it is relaying a large frame to the
/// client: the frame is finished first, and the client then reads its close frame.
#[tokio::test]
async fn a_frame_in_flight_ends_before_the_close_frame() {
    let (_gate, mut client, mut upstream) =
        through_gate("    timeouts: {max_lifetime_seconds: 1}\n").await;
    upstream.write_all(&large_frame_header()).await.unwrap();
    upstream.write_all(&[7u8; 1000]).await.unwrap();
    // The rest comes after the lifetime has run out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    upstream.write_all(&[7u8; 99_000]).await.unwrap();
    let frame = next_frame(&mut client).await;
    assert_eq!((frame.opcode, frame.payload.len()), (0x2, 100_000));
    let close = next_frame(&mut client).await;
    assert_eq!(close_code_of(&close), 1001);
    assert_eq!(&close.payload[2..], b"max lifetime");
    assert_eq!(close_code_of(&next_frame(&mut upstream).await), 1001);
}

/// When the gate ends a connection during a large frame, only the side that frame goes to
/// waits for it: the side it comes from is sent its close at once (its leg is free), and
/// the frame's rest still reaches the other side before that side's close. In both
/// directions. (The sender's close waited for the frame's end, up to 2 s.)
#[tokio::test]
async fn the_side_a_frame_in_flight_comes_from_gets_its_close_at_once() {
    for from_client in [false, true] {
        let (_gate, mut client, mut upstream) =
            through_gate("    timeouts: {max_lifetime_seconds: 1}\n").await;
        let payload = vec![7u8; 100_000];
        let (sender, receiver) = match from_client {
            true => (&mut client, &mut upstream),
            false => (&mut upstream, &mut client),
        };
        let bytes = frame(0x82, &payload, from_client);
        sender.write_all(&bytes[..1000]).await.unwrap();
        let started = tokio::time::Instant::now();
        let close = next_frame(sender).await;
        let took = started.elapsed();
        assert_eq!(
            close_code_of(&close),
            1001,
            "from the client: {from_client}"
        );
        assert_eq!(&close.payload[2..], b"max lifetime");
        assert!(
            took < Duration::from_millis(1600),
            "from the client: {from_client}: the sender's close came after {took:?}"
        );
        // The sender ends its frame, then replies.
        sender.write_all(&bytes[1000..]).await.unwrap();
        sender
            .write_all(&frame(0x88, &[0x03, 0xe9], from_client))
            .await
            .unwrap();
        let relayed = next_frame(receiver).await;
        assert_eq!((relayed.opcode, relayed.payload.len()), (0x2, 100_000));
        assert_eq!(close_code_of(&next_frame(receiver).await), 1001);
    }
}

/// The same with an upstream that never sends the rest: once the frame has had its time,
/// no close frame can reach a client cut off inside it, so it gets its FIN, and not only
/// once the upstream's close handshake is over (this upstream never answers; that would
/// take `write_seconds`). Only the payload that crossed is counted.
#[tokio::test]
async fn a_client_cut_off_inside_a_frame_gets_its_fin() {
    let (gate, mut client, mut upstream) =
        through_gate("    timeouts: {max_lifetime_seconds: 1, write_seconds: 10}\n").await;
    let header = large_frame_header();
    upstream.write_all(&header).await.unwrap();
    upstream.write_all(&[7u8; 1000]).await.unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let read = timeout(Duration::from_secs(8), client.read_to_end(&mut got)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "no FIN within 8 s of the connection's start");
    assert_eq!(
        got.len(),
        header.len() + 1000,
        "the frame's start, then EOF"
    );
    // The lifetime (1 s), then the 2 s the frame gets to end.
    assert!(took < Duration::from_millis(4500), "FIN after {took:?}");
    // The upstream was sent its 1001.
    let close = next_frame(&mut upstream).await;
    assert_eq!(close_code_of(&close), 1001);
    assert_eq!(
        gate.metric("wsgate_message_bytes_total{route=\"ws\",direction=\"upstream_to_client\"}")
            .await,
        1000.0
    );
}

/// After a close handshake with the upstream, the gate (its client) waits for the upstream
/// to close TCP first (RFC 6455 §7.1.1), so that the TIME_WAIT is the server's and the
/// gate's ports toward the upstream are not held for a minute per connection.
#[tokio::test]
async fn the_upstream_closes_tcp_first() {
    let (_gate, mut client, mut upstream) = through_gate("").await;
    client
        .write_all(&frame(0x88, &1000u16.to_be_bytes(), true))
        .await
        .unwrap();
    assert_eq!(close_code_of(&next_frame(&mut upstream).await), 1000);
    upstream
        .write_all(&frame(0x88, &1000u16.to_be_bytes(), false))
        .await
        .unwrap();
    // The client gets the reply and the gate's FIN (the gate is its server).
    assert_eq!(close_code_of(&next_frame(&mut client).await), 1000);
    let mut rest = Vec::new();
    timeout(Duration::from_secs(3), client.read_to_end(&mut rest))
        .await
        .expect("the gate did not close the client's connection")
        .unwrap();
    // The upstream's connection stays open until the upstream closes it.
    let mut byte = [0u8; 1];
    let early = timeout(Duration::from_millis(500), upstream.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "the gate closed TCP before the upstream: {early:?}"
    );
    upstream.shutdown().await.unwrap();
    let after = timeout(Duration::from_secs(3), upstream.read(&mut byte))
        .await
        .expect("the gate did not close after the upstream's FIN");
    assert_eq!(after.unwrap(), 0);
}

/// A client that closes may still receive what the upstream sent before it read that
/// close (RFC 6455 §7.1): the gate passes the close on and relays the upstream's last
/// messages to the client until the upstream's close reply, and only then answers the
/// client, as a direct connection (or a blind proxy) would deliver them.
#[tokio::test]
async fn messages_sent_before_the_upstream_reads_a_clients_close_reach_the_client() {
    let (gate, mut client, mut upstream) = through_gate("").await;
    client
        .write_all(&frame(0x88, &close_payload(4000, "bye"), true))
        .await
        .unwrap();
    let close = next_frame(&mut upstream).await;
    assert_eq!(close_code_of(&close), 4000);
    assert_eq!(&close.payload[2..], b"bye");
    // What the upstream had queued before it read the close, then its reply.
    let mut last = frame(0x81, b"last words", false);
    last.extend(frame(0x88, &close_payload(4000, "bye"), false));
    upstream.write_all(&last).await.unwrap();
    assert_eq!(
        next_frame(&mut client).await,
        data(true, 0x1, b"last words", false)
    );
    let reply = next_frame(&mut client).await;
    assert_eq!(
        (close_code_of(&reply), &reply.payload[2..]),
        (4000, &b"bye"[..])
    );
    assert_eq!(
        gate.metric("wsgate_messages_total{route=\"ws\",direction=\"upstream_to_client\"}")
            .await,
        1.0
    );
}

/// The same the other way: the client's messages sent before it read the upstream's close
/// reach the upstream, then the client's reply.
#[tokio::test]
async fn messages_sent_before_the_client_reads_an_upstreams_close_reach_the_upstream() {
    let (_gate, mut client, mut upstream) = through_gate("").await;
    upstream
        .write_all(&frame(0x88, &close_payload(1000, ""), false))
        .await
        .unwrap();
    assert_eq!(close_code_of(&next_frame(&mut client).await), 1000);
    let mut last = frame(0x82, b"late", true);
    last.extend(frame(0x88, &close_payload(1000, ""), true));
    client.write_all(&last).await.unwrap();
    assert_eq!(
        next_frame(&mut upstream).await,
        data(true, 0x2, b"late", true)
    );
    assert_eq!(close_code_of(&next_frame(&mut upstream).await), 1000);
}

/// An upstream that never answers a client's close does not keep the client waiting for
/// its reply longer than a second.
#[tokio::test]
async fn a_client_closing_in_front_of_a_silent_upstream_gets_its_reply_within_a_second() {
    let (_gate, mut client, mut upstream) = through_gate("").await;
    let started = std::time::Instant::now();
    client
        .write_all(&frame(0x88, &close_payload(1000, ""), true))
        .await
        .unwrap();
    assert_eq!(close_code_of(&next_frame(&mut upstream).await), 1000);
    assert_eq!(close_code_of(&next_frame(&mut client).await), 1000);
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "reply after {took:?}");
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}
