//! Node's client libraries against the gate. Socket.IO 4 (the npm `socket.io` server and
//! `socket.io-client`) on an `http: pass` route, in both transports: long-polling is plain
//! HTTP, so it must be held to the same policy as the WebSocket, and the app must get the
//! forwarded identity. And `ws`, offering only its `bearer.` token entry as a browser page
//! does, in front of a `ws` server that selects no subprotocol; and `ws` on both legs agreeing
//! permessage-deflate through the gate.
//!
//! The packages come from `tests/node/package.json` (`.ci/run` installs them with npm).
//! Without Node or the packages the tests are skipped, except under `CI=true`.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use support::*;

fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

/// Whether Node and the packages are there; under CI their absence is a failure.
fn available() -> bool {
    let ok = Command::new("node").arg("--version").output().is_ok()
        && node_dir().join("node_modules/socket.io-client").is_dir();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "node and tests/node/node_modules are required under CI (npm ci --prefix tests/node)"
        );
        eprintln!("skipped: node or tests/node/node_modules missing (npm ci --prefix tests/node)");
    }
    ok
}

/// The Socket.IO server, killed when dropped; its stdout lines arrive on `lines`.
struct Server {
    child: Child,
    port: u16,
    lines: mpsc::Receiver<Value>,
}

impl Server {
    /// `script`'s server mode (`socketio.js` or `ws.js`).
    fn start(script: &str) -> Server {
        Server::start_with(script, &[])
    }

    /// `script`'s server mode with `args`.
    fn start_with(script: &str, args: &[&str]) -> Server {
        let mut child = Command::new("node")
            .arg(node_dir().join(script))
            .arg("server")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs");
        let lines = json_lines(child.stdout.take().unwrap());
        let first = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the Socket.IO server did not start");
        let port = first["port"].as_u64().expect("a port") as u16;
        Server { child, port, lines }
    }

    /// The next connection the server saw.
    fn connection(&self) -> Value {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(5))
                .expect("no connection reached the server");
            if line["event"] == "connection" {
                return line;
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json_lines(stdout: ChildStdout) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// One Socket.IO client run (it gives up by itself after 8 s); its result line.
async fn client(url: &str, transports: &str, token: Option<&str>, carrier: &str) -> Value {
    let mut args = vec!["client".to_owned(), url.to_owned(), transports.to_owned()];
    args.extend(
        token
            .map(|t| [t.to_owned(), carrier.to_owned()])
            .into_iter()
            .flatten(),
    );
    node_client("socketio.js", args).await
}

/// `script`'s client mode with `args` (each client gives up by itself after 8 s).
async fn node_client(script: &str, args: Vec<String>) -> Value {
    let mut command = Command::new("node");
    command
        .arg(node_dir().join(script))
        .args(args)
        .stdout(Stdio::piped());
    let run = tokio::task::spawn_blocking(move || command.output());
    let output = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the Socket.IO client did not finish")
        .expect("the client task")
        .expect("node runs");
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| panic!("client said: {text:?}"))
}

fn policy(upstream_port: u16) -> String {
    format!(
        "version: 1\n\
         defaults:\n  \
           upstream: ws://127.0.0.1:{upstream_port}\n  \
           origin: {{allow_missing: true}}\n  \
           auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}], forward_claims: {{sub: X-Auth-Subject}}}}\n\
         routes:\n  \
           - path: /socket.io\n    \
             http: pass\n"
    )
}

/// Without a token neither transport gets a session: polling is refused with 401 like the
/// WebSocket upgrade, and no connection reaches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_without_a_token_gets_no_session_in_either_transport() {
    if !available() {
        return;
    }
    let server = Server::start("socketio.js");
    let gate = TestGate::start_with(&policy(server.port), false).await;
    let url = format!("http://127.0.0.1:{}", gate.addr.port());
    for transports in ["polling,websocket", "polling", "websocket"] {
        let result = client(&url, transports, None, "").await;
        assert_eq!(result["connected"], false, "{transports}: {result}");
    }
    assert!(
        server
            .lines
            .recv_timeout(Duration::from_millis(300))
            .is_err(),
        "a connection reached the app"
    );
}

/// With a token, polling and then the WebSocket upgrade both pass; the app sees the
/// forwarded subject, never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_with_a_token_connects_upgrades_and_the_app_sees_the_subject() {
    if !available() {
        return;
    }
    let server = Server::start("socketio.js");
    let gate = TestGate::start_with(&policy(server.port), false).await;
    let url = format!("http://127.0.0.1:{}", gate.addr.port());
    let token = hs256("alice");
    for (transports, carrier) in [
        ("polling,websocket", "header"),
        ("polling,websocket", "query"),
        ("websocket", "query"),
    ] {
        let result = client(&url, transports, Some(&token), carrier).await;
        assert_eq!(
            result["connected"], true,
            "{transports} {carrier}: {result}"
        );
        assert_eq!(
            result["transport"], "websocket",
            "{transports} {carrier}: {result}"
        );
        assert_eq!(result["echo"], "hello through the gate");
        let seen = server.connection();
        assert_eq!(seen["subject"], "alice", "{seen}");
        assert_eq!(seen["authorization"], Value::Null, "{seen}");
        assert!(
            !seen["url"].as_str().unwrap_or("").contains("access_token"),
            "{seen}"
        );
    }
}

/// `new WebSocket(url, ['bearer.' + token])` with Node's `ws` in front of a `ws` server that
/// selects no subprotocol: the handshake completes (the 101 selects the token entry; `ws`
/// fails a handshake whose offer got no answer, as browsers do), and the server never
/// sees the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_offering_only_its_token_entry_connects_to_a_server_that_selects_none() {
    if !available() {
        return;
    }
    let server = Server::start("ws.js");
    let gate = TestGate::start_with(
        &format!(
            "version: 1\ndefaults:\n  upstream: ws://127.0.0.1:{}\n  origin: {{allow_missing: true}}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\nroutes:\n  - path: /ws\n",
            server.port
        ),
        false,
    )
    .await;
    let url = format!("ws://127.0.0.1:{}/ws", gate.addr.port());
    let token = hs256("alice");
    let result = node_client("ws.js", vec!["client".into(), url, token.clone()]).await;
    assert_eq!(result["open"], true, "{result}");
    assert_eq!(result["protocol"], format!("bearer.{token}").as_str());
    assert_eq!(result["echo"], "hello from ws");
    let seen = server.connection();
    assert_eq!(seen["protocol"], Value::Null, "{seen}");
}

/// Node's `ws` on both legs with permessage-deflate (on by default in `ws` clients,
/// enabled on the server): the extension is agreed end to end through the gate, the
/// server sees the client's offer, and a 16 KiB JSON message (above `ws`'s 1 KiB
/// compression threshold) crosses compressed both ways and comes back intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_clients_and_servers_agree_permessage_deflate_through_the_gate() {
    if !available() {
        return;
    }
    let server = Server::start_with("ws.js", &["deflate"]);
    let gate = TestGate::start_with(
        &format!(
            "version: 1\ndefaults:\n  upstream: ws://127.0.0.1:{}\n  origin: {{allow_missing: true}}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\nroutes:\n  - path: /ws\n    name: ws\n",
            server.port
        ),
        false,
    )
    .await;
    let url = format!("ws://127.0.0.1:{}/ws", gate.addr.port());
    let result = node_client(
        "ws.js",
        vec!["client".into(), url, hs256("alice"), "16384".into()],
    )
    .await;
    assert_eq!(result["open"], true, "{result}");
    assert_eq!(result["same"], true, "{result}");
    assert!(
        result["extensions"]
            .as_str()
            .is_some_and(|e| e.starts_with("permessage-deflate")),
        "{result}"
    );
    let seen = server.connection();
    assert!(
        seen["extensions"]
            .as_str()
            .is_some_and(|e| e.starts_with("permessage-deflate")),
        "{seen}"
    );
    for direction in ["client_to_upstream", "upstream_to_client"] {
        gate.wait_metric(
            &format!(
                "wsgate_message_inflated_bytes_total{{route=\"ws\",direction=\"{direction}\"}}"
            ),
            16384.0,
            Duration::from_secs(5),
            "the message inflated by the gate",
        )
        .await;
    }
}
