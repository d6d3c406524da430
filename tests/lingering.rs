//! Every close the gate promises reaches a client that is still sending (the lingering
//! close), and over TLS every connection ends with a close_notify, so that strict clients
//! see a clean end instead of a truncation. Driven with tokio-tungstenite and rustls as
//! the client library, the way an application uses them.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::wire::{accept_upgrade, frame, read_frame, upgrade_raw_path};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Send `messages` as fast as the socket takes them, then read: the close code the client
/// gets, or what stood in its way. A write that meets a reset counts as a failure: most
/// client libraries (Python's asyncio streams, browsers) abort on it with the close frame
/// unread, which tungstenite happens not to do.
async fn flood_then_read(client: &mut Client, messages: Vec<Message>) -> Result<u16, String> {
    for message in messages {
        if let Err(e) = client.feed(message).await {
            return Err(format!("a write failed: {e}"));
        }
    }
    if let Err(e) = client.flush().await {
        return Err(format!("a write failed: {e}"));
    }
    let read = async {
        loop {
            match client.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return Ok(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("{e}")),
                None => return Err("the stream ended without a close frame".into()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| Err("no close frame within 10 s".into()))
}

/// After the close handshake the stream must end cleanly: for TLS, with close_notify
/// (rustls reports a TCP close without one as an `UnexpectedEof` error).
async fn assert_clean_end(client: &mut Client) {
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match client.next().await {
                None => return Ok(()),
                Some(Ok(_)) => continue,
                Some(Err(WsError::ConnectionClosed)) => return Ok(()),
                Some(Err(e)) => return Err(e),
            }
        }
    })
    .await
    .expect("the gate did not end the connection");
    ended.expect("the connection did not end cleanly");
    // Below tungstenite: the TLS stream itself reports a clean EOF.
    let mut rest = Vec::new();
    let eof = client.get_mut().read_to_end(&mut rest).await;
    assert!(eof.is_ok(), "raw stream after the close: {eof:?}");
}

fn texts(n: usize, size: usize) -> Vec<Message> {
    (0..n).map(|_| Message::text("x".repeat(size))).collect()
}

/// A client flooding past its message rate reads its 1008, every time: the gate's close
/// is not destroyed by a reset answering the rest of the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_reads_its_1008_every_time() {
    let upstream = Upstream::start().await;
    let policy = open_policy(
        &upstream.url(),
        "    messages: {per_second: 10, burst: 20}\n    rate: {upgrades_per_second: 100000, burst: 100000}\n",
    );
    let gate = TestGate::start_with(&policy, false).await;
    let mut failures = Vec::new();
    for run in 0..200 {
        let (mut client, _) = gate.connect("/ws").await.unwrap();
        match flood_then_read(&mut client, texts(300, 4096)).await {
            Ok(1008) => {}
            other => failures.push((run, other)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 200: {failures:?}",
        failures.len()
    );
}

/// A client library that queued tens of megabytes before reading (Node's `ws`, Python's
/// `websockets` with `send` in a loop) still reads its 1008: the gate discards that much
/// while its close waits to be read, rather than resetting the connection after the first
/// few megabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_queued_megabytes_reads_its_1008() {
    let upstream = Upstream::start().await;
    let policy = open_policy(
        &upstream.url(),
        "    messages: {per_second: 1, burst: 2}\n    rate: {upgrades_per_second: 100000, burst: 100000}\n",
    );
    let gate = TestGate::start_with(&policy, false).await;
    for run in 0..3 {
        let (mut client, _) = gate.connect("/ws").await.unwrap();
        // 10 MiB: message 3 breaks the rate, the rest is in flight behind it.
        let started = std::time::Instant::now();
        let code = flood_then_read(&mut client, texts(40, 256 * 1024)).await;
        eprintln!("run {run}: {:?}", started.elapsed());
        assert_eq!(code, Ok(1008), "run {run}");
    }
}

/// A message refused at its header (over `max_frame_bytes`) while the client is still
/// sending more: the client reads its 1009.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_an_oversized_message_reads_its_1009_every_time() {
    let upstream = Upstream::start().await;
    let policy = open_policy(&upstream.url(), "    messages: {max_frame_bytes: 65536}\n    rate: {upgrades_per_second: 100000, burst: 100000}\n");
    let gate = TestGate::start_with(&policy, false).await;
    let mut failures = Vec::new();
    for run in 0..30 {
        let (mut client, _) = gate.connect("/ws").await.unwrap();
        // Message 10 is over the frame limit; the client goes on sending after it.
        let mut messages = texts(300, 4096);
        messages[10] = Message::binary(vec![7u8; 100 * 1024]);
        match flood_then_read(&mut client, messages).await {
            Ok(1009) => {}
            other => failures.push((run, other)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 30: {failures:?}",
        failures.len()
    );
}

/// The same over TLS, where the connection must also end with close_notify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_flooding_client_reads_its_1008_and_a_clean_end() {
    let upstream = Upstream::start().await;
    let policy = open_policy(
        &upstream.url(),
        "    messages: {per_second: 10, burst: 20}\n    rate: {upgrades_per_second: 100000, burst: 100000}\n",
    );
    let gate = TestGate::start(&policy).await;
    for run in 0..50 {
        let (mut client, _) = gate.connect("/ws").await.unwrap();
        let code = flood_then_read(&mut client, texts(300, 4096)).await;
        assert_eq!(code, Ok(1008), "run {run}");
        assert_clean_end(&mut client).await;
    }
}

/// A client-initiated close over TLS: the gate answers it, sends close_notify, then FIN.
#[tokio::test]
async fn a_clean_close_over_tls_ends_with_close_notify() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("hello"));
    client.close(None).await.unwrap();
    assert_clean_end(&mut client).await;
}

/// A gate-initiated close (the idle timeout) over TLS ends the same way.
#[tokio::test]
async fn a_gate_initiated_close_over_tls_ends_with_close_notify() {
    let upstream = Upstream::start().await;
    let policy = open_policy(&upstream.url(), "    timeouts: {idle_seconds: 0.3}\n");
    let gate = TestGate::start(&policy).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    let (code, reason) = next_close(&mut client).await;
    assert_eq!(
        (code, reason.as_str()),
        (u16::from(CloseCode::Away), "idle timeout")
    );
    assert_clean_end(&mut client).await;
}

/// A completed close handshake needs no linger: the drain ends once every client has
/// answered its 1001, even one that keeps its TCP connection open afterwards.
#[tokio::test]
async fn the_drain_ends_with_the_close_handshakes_not_the_linger() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    gate.running.begin_shutdown();
    let (code, reason) = next_close(&mut client).await;
    assert_eq!((code, reason.as_str()), (1001, "going away"));
    let started = tokio::time::Instant::now();
    assert!(gate.running.drain(Duration::from_secs(5)).await);
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1000),
        "the drain took {took:?}"
    );
    drop(client);
}

/// A side whose close handshake is done is let go at once, not when the other side's
/// ends: on shutdown, an upstream that answers its 1001 gets the gate's FIN right away
/// even while a silent client holds its own close open until the write deadline.
#[tokio::test]
async fn an_upstream_that_answers_is_let_go_while_a_silent_client_is_still_waited_for() {
    let (gate, _silent, mut upstream) = raw_pair("    timeouts: {write_seconds: 10}\n").await;
    gate.running.begin_shutdown();
    let close = read_frame(&mut upstream).await.unwrap();
    assert_eq!(
        (close.opcode, &close.payload[..2]),
        (8, &1001u16.to_be_bytes()[..])
    );
    // The reply, as a server sends it: unmasked.
    upstream
        .write_all(&frame(0x88, &1001u16.to_be_bytes(), false))
        .await
        .unwrap();
    let answered = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), upstream.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "no FIN {:?} after the close handshake: {read:?}",
        answered.elapsed()
    );
    assert!(
        answered.elapsed() < Duration::from_secs(2),
        "FIN after {:?}",
        answered.elapsed()
    );
}

/// An upstream that closes first and has its reply is let go within the linger time of
/// that reply, not after the client's close handshake: here the client never answers
/// the relayed close, and the gate would wait for it until the write deadline.
#[tokio::test]
async fn an_upstream_that_closed_first_is_let_go_while_a_silent_client_is_still_waited_for() {
    let (_gate, _silent, mut upstream) = raw_pair("    timeouts: {write_seconds: 10}\n").await;
    let mut close = 4003u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    upstream
        .write_all(&frame(0x88, &close, false))
        .await
        .unwrap();
    // The gate's reply (after at most a second given to the client), then nothing: this
    // upstream never closes TCP itself.
    let reply = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut upstream))
        .await
        .expect("no close reply")
        .unwrap();
    assert_eq!((reply.opcode, &reply.payload[..]), (8, &close[..]));
    let answered = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(8), upstream.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "no FIN {:?} after the close reply: {read:?}",
        answered.elapsed()
    );
    let took = answered.elapsed();
    assert!(
        took > Duration::from_millis(1500) && took < Duration::from_secs(4),
        "FIN {took:?} after the close reply (the linger time is 2 s)"
    );
}

/// A gate (with `route_extra` on its route) and one connection through it, both ends
/// raw sockets that do only what the test makes them: (gate, client, upstream).
async fn raw_pair(route_extra: &str) -> (TestGate, tokio::net::TcpStream, tokio::net::TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("ws://{}", listener.local_addr().unwrap());
    let gate = TestGate::start_with(&open_policy(&upstream, route_extra), false).await;
    let (client, upstream) = tokio::join!(
        upgrade_raw_path(gate.addr, "/ws"),
        accept_upgrade(&listener)
    );
    (gate, client, upstream)
}

/// A side that floods past the gate's close is cut off after the frames the gate reads
/// for its reply, and let go (FIN, lingering) at once, not when the other side's close
/// ends: here the upstream never answers its 1001, and would hold the client's close
/// open until the write deadline (10 s).
#[tokio::test]
async fn a_client_flooding_past_the_close_is_let_go_while_the_upstream_is_still_waited_for() {
    let (_gate, mut client, _silent) =
        raw_pair("    timeouts: {idle_seconds: 1, write_seconds: 10}\n").await;
    let close = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client))
        .await
        .expect("no idle close")
        .unwrap();
    assert_eq!(
        (close.opcode, &close.payload[..2]),
        (8, &1001u16.to_be_bytes()[..])
    );
    let closed = tokio::time::Instant::now();
    // Frames, never the close reply, until the gate's FIN (or 6 s).
    let flood = frame(0x82, b"0123456789", true).repeat(256);
    let (mut reader, mut writer) = client.split();
    let writing = async {
        while closed.elapsed() < Duration::from_secs(6) && writer.write_all(&flood).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let mut rest = Vec::new();
    let fin = tokio::select! {
        read = reader.read_to_end(&mut rest) => read,
        () = writing => Err(std::io::ErrorKind::TimedOut.into()),
    };
    assert!(matches!(fin, Ok(0)), "no FIN from the gate: {fin:?}");
    let took = closed.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "FIN {took:?} after the close (the upstream's close would end at 10 s)"
    );
}

/// A side that is lost (here: its FIN, with no close frame) is dropped at once, not once
/// the other side's close handshake has ended: its peer learns the connection is over,
/// and the gate holds no descriptor for it. Here the other side never answers its close,
/// which would keep the lost side open until the write deadline (10 s).
#[tokio::test]
async fn a_lost_side_is_dropped_at_once_while_the_other_is_still_waited_for() {
    // The client leaves; the upstream never answers its 1001.
    let (_gate, mut client, mut upstream) = raw_pair("    timeouts: {write_seconds: 10}\n").await;
    client.shutdown().await.unwrap();
    let left = tokio::time::Instant::now();
    let close = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut upstream))
        .await
        .expect("no close to the upstream")
        .unwrap();
    assert_eq!(
        (close.opcode, &close.payload[..2]),
        (8, &1001u16.to_be_bytes()[..])
    );
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(8), client.read_to_end(&mut rest)).await;
    assert!(
        matches!(end, Ok(Ok(0))),
        "the lost client's socket still open {:?} after its FIN: {end:?}",
        left.elapsed()
    );
    assert!(
        left.elapsed() < Duration::from_secs(1),
        "the lost client's socket closed {:?} after its FIN",
        left.elapsed()
    );

    // The upstream leaves; the client never answers its 1014.
    let (_gate, mut client, mut upstream) = raw_pair("    timeouts: {write_seconds: 10}\n").await;
    upstream.shutdown().await.unwrap();
    let left = tokio::time::Instant::now();
    let close = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client))
        .await
        .expect("no close to the client")
        .unwrap();
    assert_eq!(
        (close.opcode, &close.payload[..2]),
        (8, &1014u16.to_be_bytes()[..])
    );
    let end = tokio::time::timeout(Duration::from_secs(8), upstream.read_to_end(&mut rest)).await;
    assert!(
        matches!(end, Ok(Ok(0))),
        "the lost upstream's socket still open {:?} after its FIN: {end:?}",
        left.elapsed()
    );
    assert!(
        left.elapsed() < Duration::from_secs(1),
        "the lost upstream's socket closed {:?} after its FIN",
        left.elapsed()
    );
}

/// A connection leaves `wsgate_connections_active` when its close is counted, not once
/// its sockets have lingered: here the refused client never closes its side, and the
/// gate discards what it might still send for 2 s after the close.
#[tokio::test]
async fn a_lingering_connection_is_no_longer_counted_active() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(
        &open_policy(&upstream.url(), "    messages: {max_message_bytes: 1024}\n"),
        false,
    )
    .await;
    let mut client = upgrade_raw_path(gate.addr, "/ws").await;
    gate.wait_metric(
        "wsgate_connections_active{route=\"ws\"}",
        1.0,
        Duration::from_secs(5),
        "the open connection",
    )
    .await;
    client
        .write_all(&frame(0x82, &[7u8; 2048], true))
        .await
        .unwrap();
    let close = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client))
        .await
        .expect("no close")
        .unwrap();
    assert_eq!(
        (close.opcode, &close.payload[..2]),
        (8, &1009u16.to_be_bytes()[..])
    );
    gate.wait_metric(
        "wsgate_closes_total{route=\"ws\",reason=\"client_message_too_big\"}",
        1.0,
        Duration::from_secs(5),
        "the close",
    )
    .await;
    assert_eq!(
        gate.metric("wsgate_connections_active{route=\"ws\"}").await,
        0.0
    );
    drop(client);
}
