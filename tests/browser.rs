//! End-to-end: `wsgate demo`'s page in headless Chromium. On an allowed origin it
//! exchanges messages through the gate; the same page served from a disallowed origin is
//! refused with 403.
//!
//! Chromium is driven over the DevTools protocol and the page's `#log` is polled in real
//! time. (`--dump-dom --virtual-time-budget` races the echo: virtual time keeps the
//! WebSocket handshake in view but not the round trip after it, so the dump sometimes
//! comes before `received:`.)
//!
//! A page of its own opens `new WebSocket(url, ['bearer.' + token])` through the gate in
//! front of an upstream that selects no subprotocol: the handshake must answer the offer.
//!
//! Without Chromium the tests are skipped, except under `CI=true`, where `.ci/run`
//! installs it and its absence is a failure.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

mod support;
use support::{TestGate, Upstream, SECRET};

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");
/// Bound on one Chromium run, from launch to the page's last expected line.
const CHROMIUM_DEADLINE: Duration = Duration::from_secs(30);
/// Bound on the demo's start-up and on waiting for one of its log lines.
const DEADLINE: Duration = Duration::from_secs(10);
/// What the demo page sends once its socket opens.
const GREETING: &str = "hello from the browser";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_on_an_allowed_origin_exchanges_messages() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let demo = Demo::start();
    let url = format!("https://localhost:{}/", demo.port);
    let received = format!("received: {GREETING}");

    let log = page_log(&chromium, &url, |lines| {
        lines.contains(&received.as_str()) || lines.iter().any(|l| l.starts_with("closed:"))
    })
    .await;

    let lines = lines(&log);
    assert!(lines.contains(&"open"), "the socket did not open:\n{log}");
    assert!(
        lines.contains(&"subprotocol: echo"),
        "the upstream's subprotocol did not come back:\n{log}"
    );
    assert!(lines.contains(&received.as_str()), "no echo:\n{log}");
    assert!(!lines.contains(&"error"), "{log}");
    let accepted = demo
        .wait_log(|v| v["message"] == "upgrade" && v["result"] == "accepted")
        .await;
    assert_eq!(accepted["route"], "echo", "{accepted}");
    assert_eq!(accepted["path"], "/ws", "{accepted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_on_a_disallowed_origin_is_refused_with_403() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let demo = Demo::start();
    // The same page, with a valid token, served over plain HTTP from another origin
    // (http://127.0.0.1:OTHER), pointed at the gate with ?gate=.
    let other = serve_page(wsgate::demo::page(&demo.token)).await;
    let url = format!("http://127.0.0.1:{other}/?gate=localhost:{}", demo.port);

    let log = page_log(&chromium, &url, |lines| {
        lines.iter().any(|l| l.starts_with("closed:"))
    })
    .await;

    // Browsers hide the status from scripts: the page sees an error and an abnormal close.
    let lines = lines(&log);
    assert!(
        lines.contains(&format!("connecting: wss://localhost:{}/ws", demo.port).as_str()),
        "the page did not use ?gate=:\n{log}"
    );
    assert!(lines.contains(&"error"), "no error event:\n{log}");
    assert!(lines.contains(&"closed: code 1006"), "{log}");
    assert!(!lines.contains(&"open"), "the socket opened:\n{log}");
    assert!(
        !lines.iter().any(|l| l.starts_with("received:")),
        "a message came through:\n{log}"
    );
    // The gate's log has the status.
    let refused = demo
        .wait_log(|v| v["message"] == "upgrade refused" && v["path"] == "/ws")
        .await;
    assert_eq!(refused["result"], "origin_not_allowed", "{refused}");
    assert_eq!(refused["status"], 403, "{refused}");
    assert_eq!(refused["route"], "echo", "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_only_subprotocol_offer_opens_when_the_upstream_selects_none() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    // The upstream selects no subprotocol; the browser offers only its token entry.
    let upstream = Upstream::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_port = listener.local_addr().unwrap().port();
    let policy = format!(
        "version: 1\n\
         defaults:\n  \
           upstream: {}\n  \
           origin: {{allow: [\"http://127.0.0.1:{page_port}\"]}}\n  \
           auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\n\
         routes:\n  \
           - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let token = support::hs256_with(
        SECRET,
        json!({"sub": "browser", "exp": support::unix_now() + 300}),
    );
    let entry = format!("bearer.{token}");
    let html = format!(
        r#"<!doctype html><pre id="log"></pre><script>
const log = (l) => {{ document.getElementById("log").textContent += l + "\n"; }};
const ws = new WebSocket("wss://localhost:{port}/ws", ["{entry}"]);
ws.onopen = () => {{ log("open"); log("protocol: " + ws.protocol); ws.send("one"); }};
ws.onmessage = (e) => log("received: " + e.data);
ws.onerror = () => log("error");
ws.onclose = (e) => log("closed: code " + e.code);
</script>"#,
        port = gate.addr.port()
    );
    serve_page_on(listener, html);

    let url = format!("http://127.0.0.1:{page_port}/");
    let log = page_log(&chromium, &url, |lines| {
        lines.contains(&"received: one") || lines.iter().any(|l| l.starts_with("closed:"))
    })
    .await;

    let lines = lines(&log);
    assert!(lines.contains(&"open"), "the socket did not open:\n{log}");
    assert!(
        lines.contains(&format!("protocol: {entry}").as_str()),
        "ws.protocol is not the token entry:\n{log}"
    );
    assert!(lines.contains(&"received: one"), "no echo:\n{log}");
    assert!(!lines.contains(&"error"), "{log}");
    // The upstream never saw the token entry.
    let seen = upstream.last_seen();
    assert!(
        seen.headers.get("sec-websocket-protocol").is_none(),
        "{:?}",
        seen.headers
    );
}

fn lines(log: &str) -> Vec<&str> {
    log.lines().map(str::trim).collect()
}

// ---------------------------------------------------------------------------------------
// Chromium

fn chromium_or_skip() -> Option<PathBuf> {
    let found = find_chromium();
    if found.is_none() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "chromium is not installed (CI=true: .ci/run installs Debian's chromium package)"
        );
        eprintln!("skipping: chromium not installed (apt-get install chromium)");
    }
    found
}

fn find_chromium() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/bin/chromium");
    if debian.is_file() {
        return Some(debian);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file())
}

/// A headless Chromium with a fresh profile and DevTools on an ephemeral port; killed on
/// drop.
struct Browser {
    child: Child,
    profile: tempfile::TempDir,
    stderr: Arc<Mutex<String>>,
}

impl Browser {
    fn launch(chromium: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--ignore-certificate-errors",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Browser {
            child,
            profile,
            stderr,
        }
    }

    /// The browser's DevTools WebSocket URL, from the `DevToolsActivePort` file Chromium
    /// writes into its profile once it listens.
    async fn devtools_url(&mut self) -> String {
        let file = self.profile.path().join("DevToolsActivePort");
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut parts = text.lines();
                if let (Some(port), Some(path)) = (parts.next(), parts.next()) {
                    return format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "chromium exited ({status}) before listening:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open `url` in a fresh headless Chromium and poll the page's `#log` until `done` holds
/// for its lines or [`CHROMIUM_DEADLINE`] passes; returns the last log read.
async fn page_log(chromium: &Path, url: &str, done: impl Fn(&[&str]) -> bool) -> String {
    let mut browser = Browser::launch(chromium);
    let deadline = Instant::now() + CHROMIUM_DEADLINE;
    let run = async {
        let mut cdp = Cdp::connect(&browser.devtools_url().await).await;
        let target = cdp
            .call(None, "Target.createTarget", json!({ "url": url }))
            .await;
        let target_id = target["targetId"].as_str().unwrap().to_owned();
        let attached = cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await;
        let session = attached["sessionId"].as_str().unwrap().to_owned();
        let mut log = String::new();
        while Instant::now() < deadline {
            let evaluated = cdp
                .call(
                    Some(&session),
                    "Runtime.evaluate",
                    json!({
                        "expression": "document.getElementById('log')?.textContent ?? ''",
                        "returnByValue": true,
                    }),
                )
                .await;
            log = evaluated["result"]["value"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if done(&lines(&log)) {
                break;
            }
            sleep(Duration::from_millis(100)).await;
        }
        log
    };
    // The poll loop stops at the deadline; this bounds a browser that stops answering.
    let finished = timeout(CHROMIUM_DEADLINE + Duration::from_secs(1), run).await;
    match finished {
        Ok(log) => log,
        Err(_) => panic!(
            "chromium did not answer within {CHROMIUM_DEADLINE:?}:\n{}",
            browser.stderr.lock().unwrap()
        ),
    }
}

/// A minimal DevTools protocol client: one command at a time, events ignored.
struct Cdp {
    ws: WebSocketStream<TcpStream>,
    next_id: u64,
}

impl Cdp {
    async fn connect(url: &str) -> Cdp {
        let authority = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .unwrap();
        let tcp = TcpStream::connect(authority).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        Cdp { ws, next_id: 0 }
    }

    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        self.ws
            .send(Message::text(command.to_string()))
            .await
            .unwrap();
        loop {
            let message = self
                .ws
                .next()
                .await
                .expect("DevTools closed the connection")
                .unwrap();
            let Ok(text) = message.to_text() else {
                continue;
            };
            let Ok(reply) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if reply["id"] == id {
                assert!(reply["error"].is_null(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The demo, and a plain HTTP origin that is not allowed

/// `wsgate demo --listen 127.0.0.1:0` with JSON logs (stderr is a pipe) collected; killed
/// on drop.
struct Demo {
    child: Child,
    port: u16,
    token: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Demo {
    fn start() -> Demo {
        let mut child = Command::new(BIN)
            .args(["demo", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // From here on the child is killed even if parsing its output fails.
        let mut demo = Demo {
            child,
            port: 0,
            token: String::new(),
            logs,
        };
        let deadline = std::time::Instant::now() + DEADLINE;
        while demo.port == 0 || demo.token.is_empty() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .expect("the demo printed no socket URL and token");
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("socket:") {
                demo.port = rest
                    .trim()
                    .trim_end_matches("/ws")
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("no port in {line:?}"));
            }
            if let Some(rest) = line.strip_prefix("token:") {
                demo.token = rest.trim().to_owned();
            }
        }
        demo
    }

    /// The first JSON log line that satisfies `matches`, waiting up to [`DEADLINE`].
    async fn wait_log(&self, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let found = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .find(|v| matches(v));
            if let Some(v) = found {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no such line in the demo's log:\n{}",
                    self.logs.lock().unwrap().join("\n")
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serve `html` at `/` over plain HTTP on 127.0.0.1:0 (404 elsewhere); returns the port.
async fn serve_page(html: String) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    serve_page_on(listener, html);
    port
}

/// Serve `html` at `/` over plain HTTP on `listener` (404 elsewhere).
fn serve_page_on(listener: TcpListener, html: String) {
    let html = Arc::new(html);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 2048];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk).await {
                        Ok(n @ 1..) if head.len() < 64 * 1024 => {
                            head.extend_from_slice(&chunk[..n])
                        }
                        _ => return,
                    }
                }
                let request = String::from_utf8_lossy(&head);
                let target = request.split(' ').nth(1).unwrap_or_default();
                let (status, body) = if target == "/" || target.starts_with("/?") {
                    ("200 OK", html.as_str())
                } else {
                    ("404 Not Found", "not found\n")
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(response.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
}
