//! `wsgate demo`: the quick start. A built-in echo upstream (which also serves a small
//! browser page), a generated policy and HMAC secret in a temporary directory, and the
//! gate on TLS with the development certificate in front of it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::http::{full, Body};

/// The development certificate and key (certs/), for the quick start only.
pub const DEV_CERT: &str = include_str!("../certs/localhost.pem");
pub const DEV_KEY: &str = include_str!("../certs/localhost.key");

/// Serve the demo echo upstream on `listener` until the process exits: WebSocket upgrades
/// on any path are echoed; `GET /` is the demo page.
pub async fn echo_upstream(listener: TcpListener, page: Arc<String>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let page = page.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| echo_service(req, page.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn echo_service(
    mut req: Request<Incoming>,
    page: Arc<String>,
) -> Result<Response<Body>, Infallible> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(full(Bytes::from(page.as_bytes().to_vec())))
            .unwrap_or_default();
        return Ok(response);
    };
    let protocol = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|p| p.trim().to_owned());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        );
    if let Some(p) = protocol {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    Ok(response.body(full(Bytes::new())).unwrap_or_default())
}

/// Write the demo's policy and secret into `dir`; returns the policy path.
pub fn write_policy(
    dir: &Path,
    gate: SocketAddr,
    upstream: SocketAddr,
    secret: &str,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("jwt-secret"), secret)?;
    let port = gate.port();
    let policy = format!(
        r#"# wsgate demo policy (generated). Edit it while the demo runs: it is reloaded live.
version: 1
defaults:
  upstream: ws://{upstream}
  auth:
    required: true
    algorithms: [HS256]
    keys: [{{hmac_secret_file: jwt-secret}}]
    forward_claims: {{sub: X-Auth-Subject}}
  origin:
    allow: ["https://localhost:{port}", "https://127.0.0.1:{port}"]
    allow_missing: true   # so command-line clients work; browsers always send Origin
routes:
  - path: /ws
    name: echo
  - path: /
    name: page
    http: pass
    auth: {{required: false}}   # the page itself is public; its WebSocket is not
"#
    );
    let path = dir.join("policy.yaml");
    std::fs::write(&path, policy)?;
    Ok(path)
}

/// The demo page: connects with `wss://` to the gate that served it (or, with
/// `?gate=HOST:PORT`, to a gate on another loopback origin), passing the token as a
/// subprotocol beside a real `echo` one (browsers cannot set headers on a WebSocket). On
/// open it sends one greeting. `#log` holds one machine-readable line per event (`open`,
/// `sent: …`, `received: …`, `error`, `closed: code N …`) and `#state` the latest state.
pub fn page(token: &str) -> String {
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>wsgate demo</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:2em auto}}#log{{white-space:pre-wrap;border:1px solid #ccc;padding:.5em;min-height:10em}}</style>
</head><body>
<h1>wsgate demo</h1>
<p>This page talks to an echo server through wsgate at <code id="url"></code>, with its token as the <code>bearer.</code> subprotocol. State: <b id="state">connecting</b></p>
<input id="msg" value="hello through the gate"> <button id="send">Send</button> <button id="close">Close</button>
<pre id="log"></pre>
<script>
"use strict";
const token = "{token}";
const $ = (id) => document.getElementById(id);
const log = (line) => {{ $("log").textContent += line + "\n"; }};
const state = (s) => {{ $("state").textContent = s; }};
// ?gate=HOST:PORT connects to another gate, loopback only: the page holds a token.
const gate = new URLSearchParams(location.search).get("gate");
const loopback = /^(localhost|127\.0\.0\.1|\[::1\]):[0-9]{{1,5}}$/;
const host = gate && loopback.test(gate) ? gate : location.host;
if (gate && host !== gate) log("ignored gate: " + gate + " (loopback HOST:PORT only)");
const url = `wss://${{host}}/ws`;
$("url").textContent = url;
log("connecting: " + url);
const ws = new WebSocket(url, ["bearer." + token, "echo"]);
const send = (text) => {{ ws.send(text); log("sent: " + text); }};
ws.onopen = () => {{ state("open"); log("open"); log("subprotocol: " + ws.protocol); send("hello from the browser"); }};
ws.onmessage = (e) => log("received: " + e.data);
ws.onerror = () => {{ state("error"); log("error"); log("(the gate refused the connection or it failed; the browser hides the HTTP status: see the gate's log)"); }};
ws.onclose = (e) => {{ state("closed"); log("closed: code " + e.code + (e.reason ? " " + e.reason : "")); }};
$("send").onclick = () => send($("msg").value);
$("close").onclick = () => ws.close(1000, "bye");
</script>
</body></html>
"#
    )
}
