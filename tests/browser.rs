//! End-to-end: `wsgate demo`'s page in headless Chromium. On an allowed origin it
//! exchanges messages through the gate, sends on Enter, fetches a fresh token for each
//! connect, and shows the gate's answer to each refused try (401, 403, close 1009, close
//! 1008) beside the gate's counters; the same page served from a disallowed origin is
//! refused with 403. `WSGATE_DEMO_SCREENSHOT=PATH` saves the page after the tries.
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
    // permessage-deflate, offered by the browser, agreed by the demo's upstream through
    // the gate.
    assert!(
        lines.contains(
            &"extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ),
        "{log}"
    );
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

/// The page comes over HTTP/2 (ALPN h2) from the gate's `http: pass` route, and the
/// browser opens the page's WebSocket on that same connection (RFC 8441): the gate logs
/// the upgrade with protocol h2, and one client connection in all sent it requests, an h2
/// one. (Chromium may also open a spare connection that never carries a request.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_over_h2_opens_its_websocket_on_the_same_connection() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let demo = Demo::start();
    let mut page = Page::open(&chromium, &format!("https://localhost:{}/", demo.port)).await;
    let received = format!("received: {GREETING}");
    let log = page
        .wait_text("log", |log| lines(log).contains(&received.as_str()))
        .await;
    assert!(lines(&log).contains(&received.as_str()), "no echo:\n{log}");

    let protocol = page
        .eval("performance.getEntriesByType('navigation')[0].nextHopProtocol")
        .await;
    assert_eq!(protocol, "h2", "the page did not load over HTTP/2");
    let accepted = demo
        .wait_log(|v| v["message"] == "upgrade" && v["result"] == "accepted")
        .await;
    assert_eq!(accepted["protocol"], "h2", "{accepted}");
    // Asked from the page, so on its own connection.
    let counters = page
        .eval_async("fetch('/demo/metrics').then((r) => r.json())")
        .await;
    assert_eq!(
        counters["connections"],
        json!({"h2": 1, "http/1.1": 0}),
        "{counters}"
    );
    assert_eq!(counters["open"], 1, "{counters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_on_a_disallowed_origin_is_refused_with_403() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let demo = Demo::start();
    // The same page, with a valid token, served over plain HTTP from another origin
    // (http://127.0.0.1:OTHER), pointed at the gate with ?gate=.
    // Its /demo/token hands out the demo's printed token.
    let token = json!({ "token": demo.token, "id": "printed", "expires_in": 3600 });
    let other = serve_page(wsgate::demo::PAGE.to_owned(), Some(token.to_string())).await;
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
async fn demo_page_sends_on_enter_and_reconnects_with_a_fresh_token() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let demo = Demo::start();
    let mut page = Page::open(&chromium, &format!("https://localhost:{}/", demo.port)).await;
    let received = format!("received: {GREETING}");
    let log = page
        .wait_text("log", |log| lines(log).contains(&received.as_str()))
        .await;
    assert!(lines(&log).contains(&received.as_str()), "no echo:\n{log}");

    // Enter in the message box sends it.
    page.type_and_enter("msg", "typed, then Enter").await;
    let log = page
        .wait_text("log", |log| {
            lines(log).contains(&"received: typed, then Enter")
        })
        .await;
    assert!(lines(&log).contains(&"sent: typed, then Enter"), "{log}");
    assert!(
        lines(&log).contains(&"received: typed, then Enter"),
        "{log}"
    );

    // Close, connect again: a second token, fetched for the new connection.
    page.click("close").await;
    page.wait_text("log", |log| lines(log).contains(&"closed: code 1000 bye"))
        .await;
    page.click("connect").await;
    let opened = |log: &str| lines(log).iter().filter(|l| **l == "open").count();
    let log = page.wait_text("log", |log| opened(log) == 2).await;
    assert_eq!(opened(&log), 2, "no second open:\n{log}");
    let ids: Vec<&str> = lines(&log)
        .into_iter()
        .filter_map(|l| l.strip_prefix("token: fresh (id "))
        .filter_map(|rest| rest.split(',').next())
        .collect();
    assert_eq!(ids.len(), 2, "{log}");
    assert_ne!(ids[0], ids[1], "the reconnect reused the token:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_tries_show_the_gates_answers_beside_its_counters() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let demo = Demo::start();
    let mut page = Page::open(&chromium, &format!("https://localhost:{}/", demo.port)).await;
    page.wait_text("log", |log| lines(log).contains(&"open"))
        .await;
    let upgrades = page
        .wait_text("upgrades", |t| lines(t).contains(&"accepted 1"))
        .await;
    assert!(lines(&upgrades).contains(&"accepted 1"), "{upgrades}");

    let tries = [
        ("missing-token", "HTTP 401 missing_token: "),
        ("foreign-origin", "HTTP 403 origin_not_allowed: "),
        ("oversized", "close 1009 message too big"),
        ("flood", "close 1008 message rate exceeded"),
    ];
    for (name, expected) in tries {
        page.click(&format!("try-{name}")).await;
        let answer = format!("answer-{name}");
        let shown = page
            .wait_text(&answer, |t| t.starts_with("HTTP") || t.starts_with("close"))
            .await;
        assert!(shown.starts_with(expected), "{name}: {shown}");
    }

    // The gate's own counters moved: one page connection open, two more accepted (the
    // oversized and flood sockets), two refused, two closed by the message policy.
    let wanted = ["accepted 3", "missing_token 1", "origin_not_allowed 1"];
    let upgrades = page
        .wait_text("upgrades", |t| wanted.iter().all(|w| lines(t).contains(w)))
        .await;
    for w in wanted {
        assert!(lines(&upgrades).contains(&w), "{w}:\n{upgrades}");
    }
    let wanted = ["client_message_too_big 1", "message_rate_exceeded 1"];
    let closes = page
        .wait_text("closes", |t| wanted.iter().all(|w| lines(t).contains(w)))
        .await;
    for w in wanted {
        assert!(lines(&closes).contains(&w), "{w}:\n{closes}");
    }
    let open = page.wait_text("open", |t| t == "1").await;
    assert_eq!(open, "1", "open connections");
    if let Some(path) = std::env::var_os("WSGATE_DEMO_SCREENSHOT") {
        page.screenshot(Path::new(&path)).await;
    }
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
    serve_page_on(listener, html, None);

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

/// Standard base64 (DevTools' screenshots); no dependency for one test helper.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let sextets: Vec<u8> = text.bytes().filter_map(value).collect();
    sextets
        .chunks(4)
        .flat_map(|c| {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, s)| n | u32::from(*s) << (18 - 6 * i));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes.into_iter().take(c.len().saturating_sub(1))
        })
        .collect()
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

/// A headless Chromium with a fresh profile and DevTools on an ephemeral port; stopped (SIGTERM)
/// on drop.
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
                "--window-size=1200,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            // Its scratch directories too, which it leaves behind even after SIGTERM.
            .env("TMPDIR", profile.path())
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
        support::process::terminate(&mut self.child, Duration::from_secs(3));
    }
}

/// Open `url` in a fresh headless Chromium and poll the page's `#log` until `done` holds
/// for its lines or [`CHROMIUM_DEADLINE`] passes; returns the last log read.
async fn page_log(chromium: &Path, url: &str, done: impl Fn(&[&str]) -> bool) -> String {
    let mut page = Page::open(chromium, url).await;
    page.wait_text("log", |log| done(&lines(log))).await
}

/// One page in a fresh headless Chromium, driven over DevTools; the browser is stopped on
/// drop. Every call is bounded: a browser that stops answering fails the test.
struct Page {
    cdp: Cdp,
    session: String,
    browser: Browser,
}

impl Page {
    async fn open(chromium: &Path, url: &str) -> Page {
        let mut browser = Browser::launch(chromium);
        let opened = timeout(CHROMIUM_DEADLINE, async {
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
            (cdp, session)
        })
        .await;
        match opened {
            Ok((cdp, session)) => Page {
                cdp,
                session,
                browser,
            },
            Err(_) => panic!(
                "chromium did not open the page within {CHROMIUM_DEADLINE:?}:\n{}",
                browser.stderr.lock().unwrap()
            ),
        }
    }

    /// Send a DevTools command to the page's session.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let answered = timeout(DEADLINE, self.cdp.call(Some(&self.session), method, params)).await;
        match answered {
            Ok(v) => v,
            Err(_) => panic!(
                "chromium did not answer {method} within {DEADLINE:?}:\n{}",
                self.browser.stderr.lock().unwrap()
            ),
        }
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let evaluated = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        evaluated["result"]["value"].clone()
    }

    /// The value a JavaScript promise resolves to in the page.
    async fn eval_async(&mut self, expression: &str) -> Value {
        let evaluated = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        evaluated["result"]["value"].clone()
    }

    /// The text of the element with this id ("" while there is none).
    async fn text(&mut self, id: &str) -> String {
        let expression = format!("document.getElementById('{id}')?.innerText ?? ''");
        self.eval(&expression)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Poll the element's text until `done` holds or [`CHROMIUM_DEADLINE`] passes; returns
    /// the last text read.
    async fn wait_text(&mut self, id: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + CHROMIUM_DEADLINE;
        loop {
            let text = self.text(id).await;
            if done(&text) || Instant::now() >= deadline {
                return text;
            }
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// Save a PNG of the page (for a person to look at: `WSGATE_DEMO_SCREENSHOT=PATH`).
    async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64_decode(shot["data"].as_str().unwrap_or_default());
        std::fs::write(path, png).unwrap();
    }

    async fn click(&mut self, id: &str) {
        self.eval(&format!("document.getElementById('{id}').click()"))
            .await;
    }

    /// Focus the element, type `text` into it and press Enter, as a user would.
    async fn type_and_enter(&mut self, id: &str, text: &str) {
        self.eval(&format!(
            "(() => {{ const e = document.getElementById('{id}'); e.value = ''; e.focus(); }})()"
        ))
        .await;
        self.call("Input.insertText", json!({ "text": text })).await;
        for kind in ["keyDown", "keyUp"] {
            let mut event = json!({
                "type": kind,
                "key": "Enter",
                "code": "Enter",
                "windowsVirtualKeyCode": 13,
            });
            if kind == "keyDown" {
                event["text"] = json!("\r");
            }
            self.call("Input.dispatchKeyEvent", event).await;
        }
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

/// `wsgate demo --listen 127.0.0.1:0` with JSON logs (stderr is a pipe) collected; stopped
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
        support::process::terminate(&mut self.child, Duration::from_secs(3));
    }
}

/// Serve `html` at `/`, and `token` (JSON) at `/demo/token`, over plain HTTP on
/// 127.0.0.1:0 (404 elsewhere); returns the port.
async fn serve_page(html: String, token: Option<String>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    serve_page_on(listener, html, token);
    port
}

/// Serve `html` at `/`, and `token` (JSON) at `/demo/token`, over plain HTTP on
/// `listener` (404 elsewhere).
fn serve_page_on(listener: TcpListener, html: String, token: Option<String>) {
    let html = Arc::new(html);
    let token = Arc::new(token);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (html, token) = (html.clone(), token.clone());
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
                let (status, kind, body) = match (target, token.as_deref()) {
                    ("/", _) => ("200 OK", "text/html", html.as_str()),
                    (t, _) if t.starts_with("/?") => ("200 OK", "text/html", html.as_str()),
                    ("/demo/token", Some(token)) => ("200 OK", "application/json", token),
                    _ => ("404 Not Found", "text/plain", "not found\n"),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(response.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
}
