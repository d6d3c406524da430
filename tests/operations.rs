//! What an operator sees: `/metrics` after real traffic, `/policy`, logs that never hold a
//! token, and `wsgate token`.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use support::process::Log;
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

#[tokio::test]
async fn metrics_carry_every_spec_name_after_traffic() {
    let upstream = Upstream::start().await;
    let extra = "    heartbeat: {interval_seconds: 0.1, timeout_seconds: 0.5}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), extra)).await;

    let (mut client, _) = gate.connect("/ws").await.unwrap();
    for _ in 0..3 {
        client.send(Message::text("12345")).await.unwrap();
        assert_eq!(next_message(&mut client).await, Message::text("12345"));
    }
    // Let a heartbeat round trip complete (reading answers the ping).
    let until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < until {
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            futures_util::StreamExt::next(&mut client),
        )
        .await;
    }
    let (_, live) = admin_fetch(gate.admin, "/metrics").await;
    assert_eq!(
        metric_sample(&live, "wsgate_connections_active{route=\"ws\"}"),
        Some(1.0),
        "{live}"
    );
    client.close(None).await.unwrap();
    upstream.wait_ended(0).await;
    assert_eq!(refusal(gate.connect("/nope").await).0, 404);
    gate.write_policy(&format!(
        "{}  - path: /v2\n",
        open_policy(&upstream.url(), extra)
    ));
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (_, m) = admin_fetch(gate.admin, "/metrics").await;
        if metric_sample(&m, "wsgate_policy_reloads_total{result=\"success\"}") == Some(1.0)
            && metric_sample(
                &m,
                "wsgate_closes_total{route=\"ws\",reason=\"client_closed\"}",
            ) == Some(1.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reload or close not counted:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (status, m) = admin_fetch(gate.admin, "/metrics").await;
    assert_eq!(status, 200);
    if std::env::var_os("WSGATE_SHOW_METRICS").is_some() {
        eprintln!("{m}");
    }
    let expect = [
        ("wsgate_connections_active{route=\"ws\"}", 0.0),
        (
            "wsgate_upgrades_total{route=\"ws\",result=\"accepted\"}",
            1.0,
        ),
        (
            "wsgate_upgrades_total{route=\"none\",result=\"no_route\"}",
            1.0,
        ),
        (
            "wsgate_messages_total{route=\"ws\",direction=\"client_to_upstream\"}",
            3.0,
        ),
        (
            "wsgate_messages_total{route=\"ws\",direction=\"upstream_to_client\"}",
            3.0,
        ),
        (
            "wsgate_message_bytes_total{route=\"ws\",direction=\"client_to_upstream\"}",
            15.0,
        ),
        (
            "wsgate_message_bytes_total{route=\"ws\",direction=\"upstream_to_client\"}",
            15.0,
        ),
        (
            "wsgate_closes_total{route=\"ws\",reason=\"client_closed\"}",
            1.0,
        ),
        ("wsgate_policy_reloads_total{result=\"success\"}", 1.0),
        ("wsgate_upgrade_duration_seconds_count", 1.0),
        (
            "wsgate_connection_duration_seconds_count{route=\"ws\"}",
            1.0,
        ),
    ];
    for (series, value) in expect {
        assert_eq!(metric_sample(&m, series), Some(value), "{series}\n{m}");
    }
    assert!(
        metric_sample(&m, "wsgate_ping_rtt_seconds_count{route=\"ws\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );

    // Without an Accept for OpenMetrics: Prometheus' text format 0.0.4, where a counter's
    // HELP and TYPE lines name its `_total` series, and no `# EOF`.
    assert!(
        m.contains("\n# TYPE wsgate_upgrades_total counter\n"),
        "{m}"
    );
    assert!(m.contains("\n# HELP wsgate_closes_total "), "{m}");
    assert!(!m.contains("# TYPE wsgate_upgrades counter"), "{m}");
    assert!(!m.contains("# EOF"), "{m}");
    // A scraper asking for OpenMetrics (as Prometheus does) gets it.
    let (status, head, om) = admin_request(
        gate.admin,
        "GET",
        "/metrics",
        &["Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(om.contains("\n# TYPE wsgate_upgrades counter\n"), "{om}");
    assert!(om.trim_end().ends_with("# EOF"));
    let (_, head, _) = admin_request(gate.admin, "GET", "/metrics", &[], b"").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
}

/// Every documented name, as a 0.0.4 scraper sees it.
const EXPOSED: [(&str, &str); 17] = [
    ("wsgate_connections_active", "gauge"),
    ("wsgate_upgrades_total", "counter"),
    ("wsgate_messages_total", "counter"),
    ("wsgate_message_bytes_total", "counter"),
    ("wsgate_message_inflated_bytes_total", "counter"),
    ("wsgate_closes_total", "counter"),
    ("wsgate_policy_reloads_total", "counter"),
    ("wsgate_report_violations_total", "counter"),
    ("wsgate_upgrade_duration_seconds", "histogram"),
    ("wsgate_ping_rtt_seconds", "histogram"),
    ("wsgate_connection_duration_seconds", "histogram"),
    ("wsgate_tls_reloads_total", "counter"),
    ("wsgate_revocations_active", "gauge"),
    ("wsgate_cluster_up", "gauge"),
    ("wsgate_cluster_errors_total", "counter"),
    ("wsgate_cluster_fallbacks_total", "counter"),
    ("wsgate_client_connections_total", "counter"),
];

#[tokio::test]
async fn every_name_is_exposed_before_its_first_series() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (status, m) = admin_fetch(gate.admin, "/metrics").await;
    assert_eq!(status, 200);
    for (name, kind) in EXPOSED {
        assert!(
            m.contains(&format!("\n# TYPE {name} {kind}\n")),
            "{name}\n{m}"
        );
        assert!(m.contains(&format!("# HELP {name} ")), "{name}\n{m}");
    }
    // Names, not invented series: no connection has been seen yet.
    assert!(!m.contains("wsgate_connections_active{"), "{m}");
    let (_, _, om) = admin_request(
        gate.admin,
        "GET",
        "/metrics",
        &["Accept: application/openmetrics-text;version=1.0.0"],
        b"",
    )
    .await;
    assert!(om.contains("\n# TYPE wsgate_closes counter\n"), "{om}");
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
}

#[tokio::test]
async fn report_violations_are_counted_by_route_and_reason() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\nmode: report\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\n  origin: {{allow: [\"https://ok.example\"]}}\nroutes:\n  - path: /ws\n    name: chat\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let _c = gate.connect("/ws").await.unwrap();
    let (_, m) = admin_fetch(gate.admin, "/metrics").await;
    assert_eq!(
        metric_sample(
            &m,
            "wsgate_report_violations_total{route=\"chat\",reason=\"origin_not_allowed\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn policy_endpoint_shows_the_policy_and_no_secret() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow: [\"https://app.example.com\", \"https://*.Example.com:8443\"]}}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret, kid: k1}}], token_sources: [header, \"query:t\"], require_claims: {{role: [a, b]}}, forward_claims: {{sub: X-Sub}}}}\nroutes:\n  - path: /ws\n    name: chat\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let (status, body) = admin_fetch(gate.admin, "/policy").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let file_sha = wsgate::config::sha256_hex(policy.as_bytes());
    assert_eq!(json["sha256"], file_sha);
    assert!(json["loaded_at_unix"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(json["routes"][0]["name"], "chat");
    assert_eq!(json["routes"][0]["auth"]["keys"][0]["kid"], "k1");
    assert_eq!(json["file"]["routes"][0]["path"], "/ws");
    // Resolved values read as the operator writes them, never as Rust's Debug output.
    assert_eq!(
        json["routes"][0]["origin"]["allow"],
        serde_json::json!(["https://app.example.com", "https://*.example.com:8443"])
    );
    let auth = &json["routes"][0]["auth"];
    assert_eq!(
        auth["token_sources"],
        serde_json::json!(["header", "query:t"])
    );
    assert_eq!(
        auth["require_claims"],
        serde_json::json!({"role": ["a", "b"]})
    );
    assert_eq!(auth["deny_claims"], serde_json::json!({}));
    assert_eq!(auth["forward_claims"], serde_json::json!({"sub": "x-sub"}));
    for debug in ["Some(", "None", "Exact(", "Subdomains", "{ "] {
        assert!(!body.contains(debug), "{debug:?} in /policy: {body}");
    }
    assert!(
        !body.contains(SECRET),
        "the HMAC secret leaked into /policy"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_never_reach_the_logs() {
    // The token subprotocol is never selected, so the client offers a real one beside it.
    let upstream = Upstream::start_with(UpstreamOptions {
        protocol: Some("chat"),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow_missing: true}}\n  rate: {{burst: 100}}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\nroutes:\n  - path: /ws\n",
            upstream.url()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--plaintext",
            "--admin",
            "off",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--policy",
        ])
        .arg(&policy)
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Log::follow(&mut child);
    let pid = child.id();
    // Stops the gate even if an assertion below fails first.
    let mut child = KillOnDrop(child);
    let mut log = Vec::new();
    let addr: std::net::SocketAddr = loop {
        let line = stderr.next_line(DEADLINE).expect("no listening line");
        log.push(line.clone());
        if line.contains("listening") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            break v["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    let tokens: Vec<String> = (0..5).map(|i| hs256(&format!("user{i}"))).collect();
    let bad = format!("{}x", tokens[4]);
    let connect =
        |mutate: Box<dyn Fn(&mut tokio_tungstenite::tungstenite::handshake::client::Request)>,
         path: String| async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
            mutate(&mut request);
            tokio_tungstenite::client_async(request, tcp)
                .await
                .map(|(c, _)| c)
        };
    let t = tokens.clone();
    let mut c1 = connect(
        Box::new(move |r| {
            r.headers_mut()
                .insert("authorization", header_value(&format!("Bearer {}", t[0])));
        }),
        "/ws".into(),
    )
    .await
    .unwrap();
    let mut c2 = connect(
        Box::new(|_| {}),
        format!("/ws?access_token={}&room=1", tokens[1]),
    )
    .await
    .unwrap();
    let t = tokens.clone();
    let mut c3 = connect(
        Box::new(move |r| {
            r.headers_mut().insert(
                "cookie",
                header_value(&format!("a=b; access_token={}", t[2])),
            );
        }),
        "/ws".into(),
    )
    .await
    .unwrap();
    let t = tokens.clone();
    let mut c4 = connect(
        Box::new(move |r| {
            r.headers_mut().insert(
                "sec-websocket-protocol",
                header_value(&format!("bearer.{}, chat", t[3])),
            );
        }),
        "/ws".into(),
    )
    .await
    .unwrap();
    let b = bad.clone();
    assert!(connect(
        Box::new(move |r| {
            r.headers_mut()
                .insert("authorization", header_value(&format!("Bearer {b}")));
        }),
        "/ws".into()
    )
    .await
    .is_err());
    // A token where no carrier reads it, in the path, is refused and not logged either.
    let in_path: Vec<String> = (5..9).map(|i| hs256(&format!("user{i}"))).collect();
    for path in [
        format!("/ws;access_token={}", in_path[0]),
        format!("/ws%3Faccess_token={}", in_path[1]),
        format!("/ws/{}", in_path[2]),
        format!("/ws/{}", in_path[3].replace('.', "%2E")),
    ] {
        assert!(connect(Box::new(|_| {}), path).await.is_err());
    }
    for c in [&mut c1, &mut c2, &mut c3, &mut c4] {
        c.send(Message::text("hi")).await.unwrap();
        assert_eq!(next_message_any(c).await, Message::text("hi"));
        c.close(None).await.unwrap();
    }
    // The gate logs one close line per connection as each relay ends.
    let is_close = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .is_ok_and(|v| v["fields"]["message"] == "close" || v["message"] == "close")
    };
    while log.iter().filter(|l| is_close(l)).count() < 4 {
        let line = stderr
            .next_line(DEADLINE)
            .unwrap_or_else(|| panic!("not four close lines:\n{}", log.join("\n")));
        log.push(line);
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = child.0.wait();
    while let Some(line) = stderr.next_line(Duration::from_millis(500)) {
        log.push(line);
    }
    let all = log.join("\n");
    assert!(
        all.contains("\"result\":\"accepted\""),
        "expected upgrade decisions in the log:\n{all}"
    );
    assert!(
        all.contains("\"message\":\"close\"") || all.contains("close"),
        "{all}"
    );
    // The upgrade and close lines say which HTTP version carried the WebSocket.
    for message in ["upgrade", "close"] {
        let line = log
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["fields"]["message"] == message || v["message"] == message)
            .unwrap_or_else(|| panic!("no {message} line:\n{all}"));
        let protocol = &line["fields"]["protocol"];
        let protocol = if protocol.is_null() {
            &line["protocol"]
        } else {
            protocol
        };
        assert_eq!(protocol, "http/1.1", "{line}");
    }
    for (i, token) in tokens.iter().take(4).chain(&in_path).enumerate() {
        assert!(
            !all.contains(token.as_str()),
            "token {i} appears in the log"
        );
        // Not even its signature part.
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !all.contains(signature),
            "token {i}'s signature appears in the log"
        );
    }
    assert!(!all.contains(&bad), "the refused token appears in the log");
    assert!(!all.contains(SECRET), "the HMAC secret appears in the log");
    assert!(
        !all.contains("?access_token="),
        "a token query string appears in the log"
    );
    // The path is still logged, the token in it masked.
    assert!(all.contains("/ws;access_token=***"), "{all}");
}

/// The token `wsgate token` printed, run as `command`; fails on any other outcome.
fn minted(command: &mut Command) -> String {
    let out = command.env("TEST_SECRET", SECRET).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `text` goes through `gate` on /ws on a connection admitted with `token`.
async fn echoes_with(gate: &TestGate, token: &str, text: &str) {
    let mut request = gate.request("/ws");
    request
        .headers_mut()
        .insert("authorization", header_value(&format!("Bearer {token}")));
    let (mut client, _) = gate.connect_request(request).await.unwrap();
    client.send(Message::text(text)).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text(text));
}

#[tokio::test]
async fn wsgate_token_mints_a_token_the_gate_accepts() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow_missing: true}}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}], audience: [chat], issuer: [wsgate-dev], require_claims: {{role: [tester]}}}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let token = minted(Command::new(BIN).args([
        "token",
        "--secret-env",
        "TEST_SECRET",
        "--sub",
        "alice",
        "--ttl",
        "10m",
        "--aud",
        "chat",
        "--iss",
        "wsgate-dev",
        "--claim",
        "role=tester",
    ]));
    echoes_with(&gate, &token, "minted").await;
    assert_eq!(
        upstream
            .last_seen()
            .headers
            .get("x-auth-subject")
            .map(|v| v.to_str().unwrap()),
        None
    );
    // Every flag from its environment variable instead: the gate requires the audience,
    // the issuer and the claim, so each was read.
    let token = minted(
        Command::new(BIN)
            .arg("token")
            .env("WSGATE_SECRET_ENV", "TEST_SECRET")
            .env("WSGATE_SUB", "bob")
            .env("WSGATE_TTL", "10m")
            .env("WSGATE_AUD", "chat")
            .env("WSGATE_ISS", "wsgate-dev")
            .env("WSGATE_CLAIM", "role=tester"),
    );
    echoes_with(&gate, &token, "from env").await;
    // A missing secret variable is a clear error, not a token.
    let out = Command::new(BIN)
        .args([
            "token",
            "--secret-env",
            "NOT_SET_ANYWHERE_XYZ",
            "--sub",
            "a",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_SET_ANYWHERE_XYZ"));
    // No token the gate would refuse anyway, and no claim that undoes a flag: exit 2. (A
    // secret padded to 32 bytes with spaces is as short as the gate counts it.)
    let padded = format!("   {}   ", &SECRET[..29]);
    let spaces = " ".repeat(32);
    for (secret, args, says) in [
        ("short", vec!["--sub", "a"], "32 bytes"),
        (
            padded.as_str(),
            vec!["--sub", "a"],
            "29 bytes without the whitespace",
        ),
        (
            spaces.as_str(),
            vec!["--sub", "a"],
            "0 bytes without the whitespace",
        ),
        (SECRET, vec!["--sub", ""], "--sub"),
        (SECRET, vec!["--sub", "a", "--claim", "sub=bob"], "--sub"),
        (SECRET, vec!["--sub", "a", "--claim", "exp=1"], "--ttl"),
        (SECRET, vec!["--sub", "a", "--ttl", "0"], "at least 1s"),
        (SECRET, vec!["--sub", "a", "--ttl", "0h0m"], "at least 1s"),
        (SECRET, vec!["--sub", "a", "--claim", "=v"], "no claim name"),
    ] {
        let out = Command::new(BIN)
            .args(["token", "--secret-env", "TEST_SECRET"])
            .args(&args)
            .env("TEST_SECRET", secret)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

async fn handshake_with(
    addr: std::net::SocketAddr,
    client: &std::sync::Arc<rustls::ClientConfig>,
) -> bool {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let connector = tokio_rustls::TlsConnector::from(client.clone());
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.is_ok()
}

fn write_atomically(path: &std::path::Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_for_certificate(
    addr: std::net::SocketAddr,
    client: &std::sync::Arc<rustls::ClientConfig>,
) -> Duration {
    let started = Instant::now();
    while !handshake_with(addr, client).await {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the new certificate is not served after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    started.elapsed()
}

/// The kind of a TLS handshake a client with `client`'s session cache makes.
async fn handshake_kind(
    addr: std::net::SocketAddr,
    client: &std::sync::Arc<rustls::ClientConfig>,
) -> Option<rustls::HandshakeKind> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let connector = tokio_rustls::TlsConnector::from(client.clone());
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.ok()?;
    // An exchange, so that the session ticket sent after the handshake is read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    tls.write_all(request).await.ok()?;
    let _ = tls.read_to_end(&mut Vec::new()).await;
    tls.get_ref().1.handshake_kind()
}

/// A re-read of the same pair (a SIGHUP sent for a policy key file, a `touch`) keeps the
/// certificate and with it the clients' sessions: a returning client still resumes.
#[tokio::test]
async fn an_unchanged_certificate_reread_keeps_the_sessions() {
    use rustls::HandshakeKind;
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let client = gate.pki.as_ref().unwrap().client.clone();
    assert_eq!(
        handshake_kind(gate.addr, &client).await,
        Some(HandshakeKind::Full)
    );
    assert_eq!(
        handshake_kind(gate.addr, &client).await,
        Some(HandshakeKind::Resumed)
    );
    let cert = gate.dir.path().join("cert.pem");
    write_atomically(&cert, &std::fs::read_to_string(&cert).unwrap());
    let reloaded = "wsgate_tls_reloads_total{result=\"success\"}";
    gate.wait_metric(
        reloaded,
        1.0,
        Duration::from_secs(2),
        "the re-read was not seen",
    )
    .await;
    assert_eq!(
        handshake_kind(gate.addr, &client).await,
        Some(HandshakeKind::Resumed)
    );
}

#[tokio::test]
async fn a_rotated_certificate_is_used_for_new_handshakes() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let old = gate.pki.as_ref().unwrap();
    let (mut open, _) = gate.connect("/ws").await.unwrap();

    let new = Pki::generate();
    write_atomically(&gate.dir.path().join("key.pem"), &new.key_pem);
    write_atomically(&gate.dir.path().join("cert.pem"), &new.cert_pem);
    let took = wait_for_certificate(gate.addr, &new.client).await;
    eprintln!("rotated certificate served after {took:?}");
    assert!(
        !handshake_with(gate.addr, &old.client).await,
        "the old certificate is still served"
    );
    open.send(Message::text("same connection")).await.unwrap();
    assert_eq!(
        next_message(&mut open).await,
        Message::text("same connection")
    );

    // A broken pair is refused, counted, and the working one stays.
    write_atomically(
        &gate.dir.path().join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (_, m) = admin_fetch(gate.admin, "/metrics").await;
        if metric_sample(&m, "wsgate_tls_reloads_total{result=\"failure\"}").unwrap_or(0.0) >= 1.0 {
            assert!(
                metric_sample(&m, "wsgate_tls_reloads_total{result=\"success\"}").unwrap_or(0.0)
                    >= 1.0,
                "{m}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broken certificate was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        handshake_with(gate.addr, &new.client).await,
        "the working certificate was dropped"
    );

    // So is a chain whose second block was copied in half: served short, it would fail
    // every client that checks the chain. And one whose second block lost two lines from
    // the middle: still base64 with its END line, but not a certificate; served, every
    // handshake would fail.
    let cut = &new.cert_pem[..new.cert_pem.len() / 2];
    let mut lines: Vec<&str> = new.cert_pem.lines().collect();
    lines.drain(2..4);
    let damaged = format!("{}\n", lines.join("\n"));
    for (failures, (second, what)) in [
        (cut, "the chain cut in half"),
        (damaged.as_str(), "the damaged intermediate"),
    ]
    .into_iter()
    .enumerate()
    {
        write_atomically(
            &gate.dir.path().join("cert.pem"),
            &format!("{}{second}", new.cert_pem),
        );
        let refused = 2.0 + failures as f64;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let (_, m) = admin_fetch(gate.admin, "/metrics").await;
            let failed = metric_sample(&m, "wsgate_tls_reloads_total{result=\"failure\"}");
            if failed.unwrap_or(0.0) >= refused {
                break;
            }
            assert!(Instant::now() < deadline, "{what} was not refused");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            handshake_with(gate.addr, &new.client).await,
            "the working certificate was dropped after {what}"
        );
    }
}

/// A gate in this process on TLS with `cert` and `key`, watching them and its policy file
/// for changes (no SIGHUP), with an admin listener.
async fn start_watching(
    policy_path: &std::path::Path,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
) -> wsgate::Running {
    wsgate::start(
        wsgate::config::load(policy_path).unwrap(),
        wsgate::Options {
            policy_path: policy_path.to_owned(),
            listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            tls: Some(wsgate::tls::server_config(&cert, &key).unwrap().0),
            tls_validity: None,
            sighup: false,
            tls_files: Some((cert, key)),
            jwks_roots: Vec::new(),
            admin_token_file: None,
        },
    )
    .unwrap()
}

#[tokio::test]
async fn a_kubernetes_secret_swap_rotates_the_certificate() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.yaml");
    std::fs::write(&policy_path, open_policy(&upstream.url(), "")).unwrap();
    // kubelet's layout: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>/
    let secret = dir.path().join("tls");
    std::fs::create_dir(&secret).unwrap();
    let version = |name: &str, pki: &Pki| {
        let real = secret.join(name);
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("tls.crt"), &pki.cert_pem).unwrap();
        std::fs::write(real.join("tls.key"), &pki.key_pem).unwrap();
        let tmp = secret.join("..data_tmp");
        std::os::unix::fs::symlink(name, &tmp).unwrap();
        std::fs::rename(&tmp, secret.join("..data")).unwrap();
    };
    let first = Pki::generate();
    version("..2026_11_21_16_00_00.1", &first);
    std::os::unix::fs::symlink("..data/tls.crt", secret.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", secret.join("tls.key")).unwrap();
    let (cert, key) = (secret.join("tls.crt"), secret.join("tls.key"));
    let running = start_watching(&policy_path, cert, key).await;
    assert!(handshake_with(running.addr, &first.client).await);
    let policy_before = running.gate.policy.load();
    let second = Pki::generate();
    version("..2026_11_21_16_05_00.2", &second);
    wait_for_certificate(running.addr, &second.client).await;
    // The Secret's swap is no reason to read the policy again (its directory is another).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        std::sync::Arc::ptr_eq(&policy_before, &running.gate.policy.load()),
        "the policy was reloaded for a swap in the certificate's directory"
    );
    running.begin_shutdown();
}

/// A ConfigMap's `..data` swap in the policy's directory reloads the policy and not the
/// certificate in its own directory (a reload would start new session tickets, so every
/// client would lose TLS resumption on each policy edit).
#[tokio::test]
async fn a_configmap_swap_reloads_the_policy_and_not_the_certificate() {
    let upstream = Upstream::start().await;
    let base = tempfile::tempdir().unwrap();
    let (config, tls) = (base.path().join("policy"), base.path().join("tls"));
    std::fs::create_dir(&config).unwrap();
    std::fs::create_dir(&tls).unwrap();
    let pki = Pki::generate();
    let (cert, key) = pki.write(&tls);
    let version = |name: &str, extra: &str| {
        let real = config.join(name);
        std::fs::create_dir(&real).unwrap();
        std::fs::write(
            real.join("policy.yaml"),
            open_policy(&upstream.url(), extra),
        )
        .unwrap();
        let tmp = config.join("..data_tmp");
        std::os::unix::fs::symlink(name, &tmp).unwrap();
        std::fs::rename(&tmp, config.join("..data")).unwrap();
    };
    version("..2026_11_21_16_00_00.1", "");
    std::os::unix::fs::symlink("..data/policy.yaml", config.join("policy.yaml")).unwrap();
    let running = start_watching(&config.join("policy.yaml"), cert, key).await;
    let sha = |r: &wsgate::Running| r.gate.policy.load().describe()["sha256"].clone();
    let before = sha(&running);
    version("..2026_11_21_16_05_00.2", "# the next version\n");
    let deadline = Instant::now() + Duration::from_secs(2);
    while sha(&running) == before {
        assert!(Instant::now() < deadline, "the new policy was not loaded");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, metrics) = admin_fetch(running.admin_addr.unwrap(), "/metrics").await;
    assert_eq!(
        metric_sample(&metrics, "wsgate_tls_reloads_total{result=\"success\"}").unwrap_or(0.0),
        0.0,
        "{metrics}"
    );
    running.begin_shutdown();
}

/// The policy and the certificate in one directory, replaced whole (the old one renamed
/// away, a new one renamed in, as a deploy tool does): both are read again.
#[tokio::test]
async fn a_directory_shared_by_policy_and_certificate_replaced_whole_reloads_both() {
    let upstream = Upstream::start().await;
    let base = tempfile::tempdir().unwrap();
    let config = |name: &str, pki: &Pki, route: &str| {
        let dir = base.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("policy.yaml"), open_policy(&upstream.url(), route)).unwrap();
        std::fs::write(dir.join("cert.pem"), &pki.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &pki.key_pem).unwrap();
        dir
    };
    let first = Pki::generate();
    let dir = config("cfg", &first, "");
    let (policy_path, cert, key) = (
        dir.join("policy.yaml"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    let running = start_watching(&policy_path, cert, key).await;
    assert!(handshake_with(running.addr, &first.client).await);
    let second = Pki::generate();
    let sha = |r: &wsgate::Running| r.gate.policy.load().describe()["sha256"].clone();
    let before = sha(&running);
    let next = config("cfg.next", &second, "# the next version\n");
    std::fs::rename(&dir, base.path().join("cfg.old")).unwrap();
    std::fs::rename(&next, &dir).unwrap();
    wait_for_certificate(running.addr, &second.client).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while sha(&running) == before {
        assert!(Instant::now() < deadline, "the new policy was not loaded");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    running.begin_shutdown();
}

/// Kills the child process when dropped, so a failing test leaves nothing running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Nothing outlives the gate: once the connections have drained, its own tasks (the
/// listener, the admin listener and a kept-alive admin connection, the reloader, the
/// upkeep loop) stop when told to, and the admin connection is closed.
#[tokio::test]
async fn the_gates_own_tasks_all_stop_at_exit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let mut admin = tokio::net::TcpStream::connect(gate.admin).await.unwrap();
    admin
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 512];
    let n = admin.read(&mut answer).await.unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        &answer[..n]
    );
    let tasks = &gate.running.gate.shutdown.tasks;
    // The listener, the admin listener and its connection, the reloader, the upkeep loop.
    assert!(tasks.running() >= 5, "{} tasks", tasks.running());

    gate.running.begin_shutdown();
    assert!(gate.running.drain(Duration::from_secs(5)).await);
    assert!(
        gate.running.exit(Duration::from_secs(2)).await,
        "{} of the gate's tasks still running",
        tasks.running()
    );
    assert_eq!(tasks.running(), 0);
    // The kept-alive admin connection was closed with them.
    let read = tokio::time::timeout(Duration::from_secs(2), admin.read(&mut answer)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
}
