//! After the upgrade: heartbeats, idle and lifetime limits, token expiry, the message
//! policy and slow peers, each closing with the codes of docs/relay.md. Short real deadlines.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::Message;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_dropped() {
    let upstream = Upstream::start().await;
    let extra = "    heartbeat: {interval_seconds: 0.3, timeout_seconds: 0.3}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    let started = Instant::now();
    // The client reads nothing, so it never answers the gate's ping.
    let ended = upstream.wait_ended(0).await;
    let took = started.elapsed();
    assert_eq!(ended, Ended::Close(1001, String::new()));
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(3),
        "dropped after {}",
        secs(took)
    );
    // On the wire: the ping, then the close, sent without waiting for an answer.
    assert_eq!(
        raw_close(&mut client).await,
        (1001, "heartbeat timeout".into())
    );
}

/// Read for `window` (tungstenite answers each ping as it is read); how many pings came.
/// Anything but a ping fails the test.
async fn pings_read_within(client: &mut Client, window: Duration) -> usize {
    let mut pings = 0;
    let until = Instant::now() + window;
    while Instant::now() < until {
        if let Ok(Some(Ok(m))) =
            tokio::time::timeout(Duration::from_millis(50), client.next()).await
        {
            assert!(m.is_ping(), "unexpected {m:?}");
            pings += 1;
        }
    }
    pings
}

/// The next ping follows an answered one by the interval, not by the timeout: a pong ends
/// the wait at once.
#[tokio::test]
async fn pings_come_every_interval_when_the_timeout_is_longer() {
    let upstream = Upstream::start().await;
    let extra = "    heartbeat: {interval_seconds: 0.2, timeout_seconds: 1}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    let pings = pings_read_within(&mut client, Duration::from_millis(1500)).await;
    // Every 0.2 s that is about 7; waiting out the timeout after each pong would give 2.
    assert!(pings >= 5, "only {pings} pings in 1.5 s");
}

#[tokio::test]
async fn a_client_that_answers_pings_survives_many_intervals() {
    let upstream = Upstream::start().await;
    let extra = "    heartbeat: {interval_seconds: 0.1, timeout_seconds: 0.1}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    // Reading lets tungstenite answer each ping; 15 intervals pass.
    let pings = pings_read_within(&mut client, Duration::from_millis(1500)).await;
    assert!(pings >= 5, "only {pings} pings in 1.5 s");
    client.send(Message::text("alive")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("alive"));
    assert!(upstream.ended.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_gates_pongs_and_pings_are_not_forwarded() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client
        .send(Message::Ping(b"hello?".to_vec().into()))
        .await
        .unwrap();
    // The gate answers the client's ping itself.
    match tokio::time::timeout(DEADLINE, client.next()).await.unwrap() {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"hello?"),
        other => panic!("expected the gate's pong, got {other:?}"),
    }
    client.send(Message::text("after")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("after"));
}

#[tokio::test]
async fn idle_connections_close_and_chatty_ones_stay() {
    let upstream = Upstream::start().await;
    let extra = "    timeouts: {idle_seconds: 1}\n    heartbeat: {interval_seconds: 0.2, timeout_seconds: 0.5}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut quiet, _) = gate.connect("/ws").await.unwrap();
    let (mut chatty, _) = gate.connect("/ws").await.unwrap();
    let started = Instant::now();
    let talker = tokio::spawn(async move {
        for i in 0..8 {
            chatty.send(Message::text(format!("m{i}"))).await.unwrap();
            assert_eq!(
                next_message(&mut chatty).await,
                Message::text(format!("m{i}"))
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        chatty
    });
    // Pings and pongs flow on the quiet one (next_close answers them) but do not count.
    assert_eq!(next_close(&mut quiet).await, (1001, "idle timeout".into()));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "idle close after {}",
        secs(took)
    );
    let mut chatty = talker.await.unwrap();
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "the chatty one outlived the idle timeout"
    );
    chatty.send(Message::text("still")).await.unwrap();
    assert_eq!(next_message(&mut chatty).await, Message::text("still"));
    assert!(matches!(upstream.wait_ended(0).await, Ended::Close(1001, r) if r == "idle timeout"));
}

/// A message that arrives slowly is traffic, not idleness: its bytes reset the idle timeout
/// as they come, so a large message on a slow link is not cut off.
#[tokio::test]
async fn a_message_arriving_slowly_is_not_idle() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let extra = "    timeouts: {idle_seconds: 0.6}\n";
    let gate = TestGate::start_with(&open_policy(&upstream.url(), extra), false).await;
    let mut tcp = wire::upgrade_raw_path(gate.addr, "/ws").await;
    let bytes = wire::frame(0x82, b"slow-bytes", true);
    // The header and the key at once, then the payload a byte every 0.25 s: 2.5 s in all,
    // four idle timeouts.
    let (head, payload) = bytes.split_at(6);
    tcp.write_all(head).await.unwrap();
    for byte in payload {
        tokio::time::sleep(Duration::from_millis(250)).await;
        tcp.write_all(&[*byte]).await.unwrap();
    }
    let (opcode, echoed) = wire::server_frame(&mut tcp).await;
    assert_eq!((opcode, echoed.as_slice()), (2, &b"slow-bytes"[..]));
}

#[tokio::test]
async fn max_lifetime_closes_both_sides() {
    let upstream = Upstream::start().await;
    let extra = "    timeouts: {max_lifetime_seconds: 0.8}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    let started = Instant::now();
    client.send(Message::text("busy")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("busy"));
    assert_eq!(next_close(&mut client).await, (1001, "max lifetime".into()));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(2),
        "after {}",
        secs(took)
    );
    assert_eq!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, "max lifetime".into())
    );
}

#[tokio::test]
async fn an_expiring_token_closes_with_1008_without_traffic() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow_missing: true}}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}], leeway_seconds: 0}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let exp = now.as_secs() + 3;
    let token = hs256_with(SECRET, serde_json::json!({"sub": "soon", "exp": exp}));
    let mut request = gate.request("/ws");
    request
        .headers_mut()
        .insert("authorization", header_value(&format!("Bearer {token}")));
    let (mut client, _) = gate.connect_request(request).await.unwrap();
    let until_exp = Duration::from_secs(exp) - now;
    let started = Instant::now();
    assert_eq!(
        next_close(&mut client).await,
        (1008, "token expired".into())
    );
    let took = started.elapsed();
    assert!(
        took + Duration::from_millis(200) >= until_exp && took < until_exp + Duration::from_secs(1),
        "closed after {} s; the token had {} s left",
        secs(took),
        secs(until_exp)
    );
    assert!(matches!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, _)
    ));
}

fn rate_policy(upstream: &Upstream, mode: &str) -> String {
    format!(
        "version: 1\nmode: {mode}\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\n  origin: {{allow_missing: true}}\n  messages: {{per_second: 1, burst: 3, types: [text]}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    )
}

#[tokio::test]
async fn message_rate_over_the_burst_is_1008() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&rate_policy(&upstream, "enforce")).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    for i in 0..3 {
        client.send(Message::text(format!("{i}"))).await.unwrap();
        assert_eq!(
            next_message(&mut client).await,
            Message::text(format!("{i}"))
        );
    }
    client.send(Message::text("one too many")).await.unwrap();
    assert_eq!(
        next_close(&mut client).await,
        (1008, "message rate exceeded".into())
    );
    assert!(matches!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, _)
    ));
}

#[tokio::test]
async fn a_disallowed_message_type_is_1008() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&rate_policy(&upstream, "enforce")).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        next_close(&mut client).await,
        (1008, "message type not allowed".into())
    );
    assert!(matches!(
        upstream.wait_ended(0).await,
        Ended::Close(1001, _)
    ));
}

#[tokio::test]
async fn report_mode_relays_rate_and_type_violations() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&rate_policy(&upstream, "report")).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    for i in 0..10 {
        client.send(Message::text(format!("{i}"))).await.unwrap();
        assert_eq!(
            next_message(&mut client).await,
            Message::text(format!("{i}"))
        );
    }
    client.send(Message::binary(vec![9u8])).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::binary(vec![9u8]));
}

#[tokio::test]
async fn an_upstream_that_stops_reading_gets_the_client_closed_with_1014() {
    let upstream = Upstream::start().await;
    let extra = "    timeouts: {write_seconds: 1}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client.send(Message::text("stall")).await.unwrap();
    // Flood until the gate, whose upstream no longer reads, stops reading us too.
    let chunk = Message::binary(vec![5u8; 64 * 1024]);
    let started = Instant::now();
    while let Ok(Ok(())) =
        tokio::time::timeout(Duration::from_millis(300), client.send(chunk.clone())).await
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the gate never pushed back"
        );
    }
    let pushed_back = Instant::now();
    // tungstenite refuses to parse 1014, so read the wire.
    assert_eq!(
        raw_close(&mut client).await,
        (1014, "upstream unavailable".into())
    );
    let took = pushed_back.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "closed {} s after the push-back",
        secs(took)
    );
}

#[tokio::test]
async fn a_slow_reader_that_keeps_taking_bytes_is_not_dropped() {
    let upstream = Upstream::start().await;
    let extra = "    timeouts: {write_seconds: 1}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    // 64 MiB towards a client that reads one message every 20 ms (about 3 MB/s): always
    // behind the flood, but taking bytes, so write_seconds must not drop it. (Much slower
    // readers free too little of loopback's multi-megabyte socket buffers for the kernel
    // to take any bytes from the gate for a whole second, which is a real stall.)
    client
        .send(Message::text("flood 1024 65536"))
        .await
        .unwrap();
    let started = Instant::now();
    let mut got = 0;
    while started.elapsed() < Duration::from_secs(3) {
        match next_message(&mut client).await {
            Message::Binary(b) => assert_eq!(b.len(), 65536),
            other => panic!("unexpected {other:?}"),
        }
        got += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(got >= 50, "read only {got} messages");
    assert!(
        upstream.ended.lock().unwrap().is_empty(),
        "the slow reader was dropped"
    );
}

#[tokio::test]
async fn a_stalled_upstream_is_not_blamed_on_the_clients_heartbeat() {
    let upstream = Upstream::start().await;
    let extra = "    timeouts: {write_seconds: 2}\n    heartbeat: {interval_seconds: 0.3, timeout_seconds: 0.3}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client.send(Message::text("stall")).await.unwrap();
    let chunk = Message::binary(vec![5u8; 64 * 1024]);
    while let Ok(Ok(())) =
        tokio::time::timeout(Duration::from_millis(300), client.send(chunk.clone())).await
    {}
    // The client's pongs wait unread behind the stalled upstream: the verdict must be the
    // upstream's (1014 after write_seconds), not a heartbeat timeout.
    assert_eq!(
        raw_close(&mut client).await,
        (1014, "upstream unavailable".into())
    );
}

/// How many connections of route `ws` closed with `reason`, from the admin metrics.
async fn closes(gate: &TestGate, reason: &str) -> f64 {
    let (_, metrics) = admin_fetch(gate.admin, "/metrics").await;
    let series = format!("wsgate_closes_total{{route=\"ws\",reason=\"{reason}\"}}");
    metric_sample(&metrics, &series).unwrap_or(0.0)
}

/// A heartbeat much faster than the write deadline (which is generous, so that a slow
/// reader on a busy machine still takes some bytes within it). Its timeout leaves a slow
/// reader whose test thread the machine starves for a moment time for the gate's writes
/// to it to stall (the sign that it is behind, not dead): at 0.2 s one CI run in many
/// closed it.
const FAST_HEARTBEAT: &str =
    "    timeouts: {write_seconds: 2}\n    heartbeat: {interval_seconds: 0.2, timeout_seconds: 0.5}\n";

#[tokio::test]
async fn a_slow_reader_outlives_many_heartbeat_timeouts() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), FAST_HEARTBEAT)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    // The upstream floods; the client reads one 16 KiB message every 5 ms (about 3 MB/s),
    // always behind, so the gate's pings wait behind the backlog (or cannot be written at
    // all) far longer than the 0.2 s heartbeat timeout. It reads, so it is alive.
    client
        .send(Message::text("flood 1000000 16384"))
        .await
        .unwrap();
    let started = Instant::now();
    let mut got = 0;
    while started.elapsed() < Duration::from_secs(3) {
        match tokio::time::timeout(DEADLINE, client.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => assert_eq!(b.len(), 16384),
            Ok(Some(Ok(m))) if m.is_ping() || m.is_pong() => continue,
            Ok(other) => panic!(
                "closed after {:.2} s and {got} messages: {other:?}",
                secs(started.elapsed())
            ),
            Err(_) => panic!("no message in time"),
        }
        got += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(got >= 100, "read only {got} messages");
    assert!(
        upstream.ended.lock().unwrap().is_empty(),
        "the slow reader was closed"
    );
    assert_eq!(closes(&gate, "heartbeat_timeout").await, 0.0);
}

#[tokio::test]
async fn a_slow_reader_of_a_backlog_the_socket_buffers_hold_is_alive() {
    let upstream = Upstream::start().await;
    let extra = "    heartbeat: {interval_seconds: 0.3, timeout_seconds: 1}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    // One burst of 5 MB, which the kernel's socket buffers take nearly whole: the gate's
    // writes finish at once and then see no progress, and each ping waits behind seconds
    // of backlog. The kernel still sees the client acknowledge bytes as it reads them.
    client.send(Message::text("flood 320 16384")).await.unwrap();
    let started = Instant::now();
    for got in 0..320 {
        match tokio::time::timeout(DEADLINE, client.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => assert_eq!(b.len(), 16384),
            other => panic!(
                "after {:.2} s and {got} messages: {other:?}",
                secs(started.elapsed())
            ),
        }
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
    // Read at about 2 MB/s: the backlog took far longer than the heartbeat timeout.
    assert!(started.elapsed() > Duration::from_secs(2));
    client.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("still here"));
    assert_eq!(closes(&gate, "heartbeat_timeout").await, 0.0);
}

#[tokio::test]
async fn a_reader_that_stops_is_dropped_at_write_seconds_not_by_the_heartbeat() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), FAST_HEARTBEAT)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    client
        .send(Message::text("flood 1000000 16384"))
        .await
        .unwrap();
    for _ in 0..20 {
        next_message(&mut client).await;
    }
    // Now it reads nothing more: the gate's writes stall for good.
    let stopped = Instant::now();
    let ended = upstream.wait_ended(0).await;
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(9),
        "dropped after {} s",
        secs(took)
    );
    // The upstream, busy sending its flood, may see the connection go before the 1001.
    assert!(
        matches!(ended, Ended::Close(1001, _) | Ended::Dropped),
        "{ended:?}"
    );
    assert_eq!(closes(&gate, "client_write_timeout").await, 1.0);
    assert_eq!(closes(&gate, "heartbeat_timeout").await, 0.0);
}

#[tokio::test]
async fn a_client_that_reads_nothing_is_closed_by_the_heartbeat_though_its_buffers_take_bytes() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), FAST_HEARTBEAT)).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    // A few small messages the kernel takes without the client reading: bytes accepted
    // into buffers that never fill are no sign of life.
    client.send(Message::text("flood 5 1024")).await.unwrap();
    let started = Instant::now();
    let ended = upstream.wait_ended(0).await;
    let took = started.elapsed();
    assert_eq!(ended, Ended::Close(1001, String::new()));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "closed after {} s",
        secs(took)
    );
    assert_eq!(closes(&gate, "heartbeat_timeout").await, 1.0);
}
