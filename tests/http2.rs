//! WebSockets over HTTP/2 (RFC 8441) through the real gate: extended CONNECT over TLS
//! (ALPN `h2`) and h2c, admitted, relayed and closed as over HTTP/1.1, several on one
//! connection.

mod support;

use futures_util::{SinkExt, StreamExt};
use support::h2::H2Socket;
use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

async fn next(ws: &mut H2Socket) -> Message {
    next_message_any(ws).await
}

/// Read until the close frame, reply, and return its code and reason.
async fn close_of(ws: &mut H2Socket) -> (u16, String) {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("no close in time")
        {
            Some(Ok(Message::Close(frame))) => {
                let _ = ws.flush().await;
                return frame.map_or((1005, String::new()), |f| {
                    (f.code.into(), f.reason.to_string())
                });
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn echoes_over_h2_with_tls() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let (mut ws, _) = h2.websocket("/ws/room?x=1", &[]).await.unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("hello"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(vec![0u8, 1, 2, 255]));
    // The upstream was reached over HTTP/1.1 with an ordinary upgrade.
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/ws/room?x=1");
    assert_eq!(
        seen.headers.get("x-forwarded-host").unwrap(),
        &format!("localhost:{}", gate.addr.port())
    );
    assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "https");
}

#[tokio::test]
async fn echoes_over_h2c_prior_knowledge() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let mut h2 = gate.h2().await;
    let (mut ws, _) = h2.websocket("/ws", &[]).await.unwrap();
    ws.send(Message::text("plain")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("plain"));
    assert_eq!(
        upstream
            .last_seen()
            .headers
            .get("x-forwarded-proto")
            .unwrap(),
        "http"
    );
}

#[tokio::test]
async fn two_websockets_on_one_connection_close_independently() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut h2 = gate.h2().await;
    let (mut first, _) = h2.websocket("/ws", &[]).await.unwrap();
    let (mut second, _) = h2.websocket("/ws", &[]).await.unwrap();
    first.send(Message::text("one")).await.unwrap();
    second.send(Message::text("two")).await.unwrap();
    assert_eq!(next(&mut first).await, Message::text("one"));
    assert_eq!(next(&mut second).await, Message::text("two"));
    first
        .close(Some(CloseFrame {
            code: CloseCode::from(4000),
            reason: "done".into(),
        }))
        .await
        .unwrap();
    assert_eq!(close_of(&mut first).await, (4000, "done".into()));
    second.send(Message::text("still here")).await.unwrap();
    assert_eq!(next(&mut second).await, Message::text("still here"));
    // A third opens on the same connection after the first closed.
    let (mut third, _) = h2.websocket("/ws", &[]).await.unwrap();
    third.send(Message::text("three")).await.unwrap();
    assert_eq!(next(&mut third).await, Message::text("three"));
}

#[tokio::test]
async fn a_refusal_over_h2_has_the_same_status_and_json() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  auth:\n    algorithms: [HS256]\n    keys: [{{hmac_secret_file: secret}}]\n  origin: {{allow_missing: true}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let mut h2 = gate.h2().await;
    let (status, headers, body) = h2.websocket("/ws", &[]).await.err().unwrap();
    assert_eq!(status, 401);
    assert_eq!(body["error"], "missing_token");
    assert_eq!(headers.get("www-authenticate").unwrap(), "Bearer");
    let (status, _, body) = h2.websocket("/nowhere", &[]).await.err().unwrap();
    assert_eq!((status, body["error"].as_str()), (404, Some("no_route")));
    // The connection survives its refusals.
    let token = hs256("alice");
    let auth = format!("Bearer {token}");
    let (mut ws, _) = h2
        .websocket("/ws", &[("authorization", &auth)])
        .await
        .unwrap();
    ws.send(Message::text("in")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("in"));
}
