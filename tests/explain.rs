//! `wsgate explain` against the running gate: for every refusal that depends only on the
//! request and the policy, the same request through the gate and through `explain` (the
//! real binary, the same policy file) reaches the same status and reason; the steps say
//! what decided; the refusals that depend on the gate's state (rates, caps) are passed by
//! `explain`, which says it holds no state; exit codes 0, 1 and 2; `--json`.

mod support;

use std::process::Command;

use serde_json::{json, Value};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// `wsgate explain` on the gate's own policy file; returns the exit code and the JSON.
fn explain(gate: &TestGate, path: &str, headers: &[(&str, &str)]) -> (i32, Value) {
    let mut command = Command::new(BIN);
    command
        .arg("explain")
        .arg("--policy")
        .arg(&gate.policy_path)
        .arg("--url")
        .arg(gate.url(path))
        .arg("--json");
    for (name, value) in headers {
        command.arg("--header").arg(format!("{name}: {value}"));
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|_| {
        panic!(
            "explain printed no JSON: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// The gate's answer to the same upgrade: (status, reason), 101 "accepted" when admitted.
async fn through_gate(gate: &TestGate, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = gate.request(path);
    // As explain reads `--header`: the first of a name replaces the handshake's own, a
    // second one is a second field.
    let mut given = Vec::new();
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        if given.contains(&name) {
            request.headers_mut().append(name, header_value(value));
        } else {
            request
                .headers_mut()
                .insert(name.clone(), header_value(value));
            given.push(name);
        }
    }
    match gate.connect_request(request).await {
        Ok(_) => (101, "accepted".into()),
        Err(e) => {
            let (status, _, body) = refusal(Err(e));
            (status, body["error"].as_str().unwrap_or("").to_owned())
        }
    }
}

/// Through the gate and through explain: the same decision, which is `expected`; returns
/// explain's JSON.
async fn same_decision(
    gate: &TestGate,
    path: &str,
    headers: &[(&str, &str)],
    expected: (u16, &str),
) -> Value {
    let by_gate = through_gate(gate, path, headers).await;
    assert_eq!((by_gate.0, by_gate.1.as_str()), expected, "the gate");
    let (code, explained) = explain(gate, path, headers);
    let decision = &explained["decision"];
    assert_eq!(
        (
            decision["status"].as_u64().unwrap() as u16,
            decision["reason"].as_str().unwrap()
        ),
        expected,
        "explain: {explained:#}"
    );
    assert_eq!(code, if expected.0 == 101 { 0 } else { 1 }, "exit code");
    explained
}

/// The step named `step` in explain's output.
fn step<'a>(explained: &'a Value, step: &str) -> &'a Value {
    explained["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == step)
        .unwrap_or_else(|| panic!("no step {step}: {explained:#}"))
}

fn token_policy(upstream: &Upstream, route_extra: &str) -> String {
    format!(
        "version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow: [\"https://app.example.com\", \"https://*.example.org\"]}}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\nroutes:\n  - path: /ws\n{route_extra}",
        upstream.url()
    )
}

const ORIGIN: (&str, &str) = ("origin", "https://app.example.com");

/// A path, its headers and the decision expected for them.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, (u16, &'a str));

fn auth(value: &str) -> (&str, &str) {
    ("authorization", value)
}

#[tokio::test]
async fn every_request_only_refusal_is_decided_alike_by_the_gate_and_explain() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&token_policy(
        &upstream,
        "    auth: {require_claims: {role: [admin]}, deny_claims: {sub: [mallory]}}\n  - path: /closed\n    ip: {deny: [127.0.0.0/8]}\n",
    ))
    .await;
    let admin = format!(
        "Bearer {}",
        hs256_with(
            SECRET,
            json!({"sub": "alice", "role": "admin", "exp": unix_now() + 300})
        )
    );
    let user = format!(
        "Bearer {}",
        hs256_with(
            SECRET,
            json!({"sub": "alice", "role": "user", "exp": unix_now() + 300})
        )
    );
    let mallory = format!(
        "Bearer {}",
        hs256_with(
            SECRET,
            json!({"sub": "mallory", "role": "admin", "exp": unix_now() + 300})
        )
    );
    let expired = format!(
        "Bearer {}",
        hs256_with(
            SECRET,
            json!({"sub": "alice", "role": "admin", "exp": unix_now() - 300})
        )
    );

    let cases: Vec<Case> = vec![
        ("/ws", vec![ORIGIN, auth(&admin)], (101, "accepted")),
        (
            "/ws",
            vec![ORIGIN, auth(&admin), ("sec-websocket-version", "8")],
            (426, "not_websocket"),
        ),
        // Not `Upgrade: websocket`: plain HTTP, and this route takes upgrades only.
        (
            "/ws",
            vec![ORIGIN, auth(&admin), ("upgrade", "h2c")],
            (426, "not_websocket"),
        ),
        ("/ws/a;b", vec![ORIGIN], (400, "bad_request")),
        ("/nowhere", vec![ORIGIN], (404, "no_route")),
        ("/closed", vec![ORIGIN], (403, "ip_denied")),
        (
            "/ws",
            vec![("origin", "https://evil.example"), auth(&admin)],
            (403, "origin_not_allowed"),
        ),
        ("/ws", vec![ORIGIN], (401, "missing_token")),
        (
            "/ws",
            vec![ORIGIN, auth("Bearer not.a.token")],
            (401, "invalid_token"),
        ),
        ("/ws", vec![ORIGIN, auth(&expired)], (401, "token_expired")),
        // Two `Authorization` fields: the first is read, whichever scheme it has.
        (
            "/ws",
            vec![ORIGIN, auth("Basic dXNlcjpwYXNz"), auth(&admin)],
            (401, "missing_token"),
        ),
        (
            "/ws",
            vec![ORIGIN, auth(&admin), auth("Basic dXNlcjpwYXNz")],
            (101, "accepted"),
        ),
        ("/ws", vec![ORIGIN, auth(&user)], (403, "claims_denied")),
        ("/ws", vec![ORIGIN, auth(&mallory)], (403, "claims_denied")),
    ];
    for (path, headers, expected) in &cases {
        same_decision(&gate, path, headers, *expected).await;
    }
}

#[tokio::test]
async fn a_jwks_url_not_fetched_is_keys_unavailable_for_both() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow_missing: true}}\n  auth: {{algorithms: [ES256], keys: [{{jwks_url: \"https://127.0.0.1:9/jwks.json\"}}]}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    // An ES256 header: the route has no key set yet, whatever the signature.
    let token = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSJ9.c2ln";
    let bearer = format!("Bearer {token}");
    let explained = same_decision(
        &gate,
        "/ws",
        &[("authorization", &bearer)],
        (503, "keys_unavailable"),
    )
    .await;
    let token_step = step(&explained, "token");
    assert_eq!(token_step["result"], "fail");
    let detail = token_step["detail"].as_str().unwrap();
    assert!(detail.contains("alg ES256"), "{detail}");
    assert!(detail.contains("kid \"k1\""), "{detail}");
    assert!(!detail.contains(token), "the token was printed: {detail}");
}

/// A head the gate refuses before routing it (here two Origin headers) fails explain's
/// `request` step, the first, not the route's.
#[tokio::test]
async fn a_bad_head_fails_the_request_step() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&token_policy(&upstream, "")).await;
    let headers = [ORIGIN, ("origin", "https://b.example.org")];
    let explained = same_decision(&gate, "/ws", &headers, (400, "bad_request")).await;
    let steps = explained["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "{explained:#}");
    assert_eq!(steps[0]["step"], "request");
    assert_eq!(steps[0]["result"], "fail");
    let detail = steps[0]["detail"].as_str().unwrap();
    assert!(detail.contains("more than one Origin"), "{detail}");
}

/// A head over the gate's limits (more than 100 fields, more than 16 KiB) is 431
/// `bad_request` from both, at the same field and the same size: explain counts the head
/// as the client sends it.
#[tokio::test]
async fn a_head_over_the_limits_is_431_for_both() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    // The gate's answer to the upgrade with `fields` beside the handshake's own five.
    let by_gate = |fields: Vec<(String, String)>| {
        let gate = &gate;
        async move {
            let mut head = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n".to_owned();
            for (name, value) in &fields {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let answer = gate.raw(head.as_bytes()).await;
            let status = answer.get(9..12).unwrap_or("").to_owned();
            let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let reason = serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .or_else(|| Some(answer.chars().take(400).collect()));
            (status, reason)
        }
    };
    let fields = |n: usize, size: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("x-p{i}"), "a".repeat(size)))
            .collect()
    };
    for (given, expected) in [
        (fields(95, 1), 101),
        (fields(96, 1), 431),
        (fields(1, 15_000), 101),
        (fields(1, 17_000), 431),
    ] {
        let (status, reason) = by_gate(given.clone()).await;
        let headers: Vec<(&str, &str)> = given
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let (code, explained) = explain(&gate, "/ws", &headers);
        let decision = &explained["decision"];
        assert_eq!(
            decision["status"],
            expected,
            "{} fields: {explained:#}",
            given.len()
        );
        if expected == 101 {
            // Passed on by the gate (the test upstream, a hyper server, may answer a head
            // this large with its own bare 431: the gate adds its forwarded headers).
            assert!(
                status == "101" || !reason.as_deref().unwrap_or("").starts_with('{'),
                "the gate refused {} fields: {status} {reason:?}",
                given.len()
            );
            assert_ne!(reason.as_deref(), Some("bad_request"));
        } else {
            assert_eq!(
                status,
                "431",
                "the gate, {} fields: {reason:?}",
                given.len()
            );
        }
        if expected == 431 {
            assert_eq!(reason.as_deref(), Some("bad_request"));
            assert_eq!(decision["reason"], "bad_request");
            assert_eq!(explained["steps"][0]["step"], "request", "{explained:#}");
            assert_eq!(code, 1);
        }
    }
}

/// A JWT in the path or the Origin is `***` in explain's steps, as in the gate's logs.
#[tokio::test]
async fn a_token_in_the_path_or_origin_is_not_printed() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let token = hs256_with(SECRET, json!({"sub": "alice", "exp": unix_now() + 300}));
    let (_, explained) = explain(&gate, &format!("/ws/{token}"), &[("origin", &token)]);
    let text = explained.to_string();
    assert!(!text.contains(&token), "{text}");
    assert!(text.contains("/ws/***"), "{text}");
}

/// A path the gate will not put in its normal form is refused before routing: explain's
/// `request` step, as for a bad head; a path that matches no route fails `route`.
#[tokio::test]
async fn a_path_refused_before_routing_fails_the_request_step() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&token_policy(&upstream, "")).await;
    for path in ["/ws%2Fdeep", "/ws;x", "/ws/../ws"] {
        let explained = same_decision(&gate, path, &[ORIGIN], (400, "bad_request")).await;
        let steps = explained["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 1, "{path}: {explained:#}");
        assert_eq!(steps[0]["step"], "request", "{path}");
    }
    let explained = same_decision(&gate, "/elsewhere", &[ORIGIN], (404, "no_route")).await;
    assert_eq!(explained["steps"][0]["step"], "route");
}

/// Each step says what decided it: the matched route, the client, the Origin pattern that
/// matched, the token's alg and claims (never the token), the claim rules.
#[tokio::test]
async fn the_steps_name_what_decided_and_never_the_token() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&token_policy(&upstream, "    name: chat\n")).await;
    let token = hs256_with(SECRET, json!({"sub": "alice", "exp": unix_now() + 300}));
    let bearer = format!("Bearer {token}");
    let headers = [
        ("origin", "https://a.example.org"),
        ("authorization", bearer.as_str()),
    ];
    let explained = same_decision(&gate, "/ws/room", &headers, (101, "accepted")).await;
    let names: Vec<&str> = explained["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "route",
            "handshake",
            "ip",
            "global_cap",
            "upgrade_rate",
            "ip_cap",
            "origin",
            "token",
            "claims",
            "subject_cap",
            "upstream"
        ]
    );
    let detail = |name| {
        step(&explained, name)["detail"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(detail("route").contains("\"chat\""), "{}", detail("route"));
    assert!(
        detail("ip").contains("client 127.0.0.1"),
        "{}",
        detail("ip")
    );
    assert!(
        detail("origin").contains("matches https://*.example.org"),
        "{}",
        detail("origin")
    );
    assert!(detail("token").contains("alg HS256"), "{}", detail("token"));
    assert!(
        detail("claims").contains("\"sub\":\"alice\""),
        "{}",
        detail("claims")
    );
    assert_eq!(step(&explained, "upstream")["result"], "skipped");
    assert!(
        !explained.to_string().contains(&token),
        "the token was printed"
    );
}

/// Rates and caps depend on what the gate holds: a gate at `max_connections` refuses
/// with 503 `server_full` where explain, which holds nothing, passes the step and says
/// why.
#[tokio::test]
async fn explain_holds_no_state_and_says_so() {
    let upstream = Upstream::start().await;
    let policy = format!("max_connections: 1\n{}", open_policy(&upstream.url(), ""));
    let gate = TestGate::start(&policy).await;
    let (_held, _) = gate.connect("/ws").await.unwrap();
    assert_eq!(
        through_gate(&gate, "/ws", &[]).await,
        (503, "server_full".into())
    );
    let (code, explained) = explain(&gate, "/ws", &[]);
    assert_eq!(code, 0);
    let cap = step(&explained, "global_cap");
    assert_eq!(cap["result"], "pass");
    assert!(
        cap["detail"]
            .as_str()
            .unwrap()
            .contains("holds no open connection"),
        "{cap}"
    );
}

/// A route that needs no token, asked without one, still lists every step: the claims
/// and the per-subject cap, with nothing to check, are `skipped`.
#[tokio::test]
async fn an_admitted_request_without_a_token_lists_every_step() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (code, explained) = explain(&gate, "/ws", &[]);
    assert_eq!(code, 0, "{explained}");
    let steps: Vec<(&str, &str)> = explained["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("route", "pass"),
            ("handshake", "pass"),
            ("ip", "pass"),
            ("global_cap", "pass"),
            ("upgrade_rate", "pass"),
            ("ip_cap", "pass"),
            ("origin", "pass"),
            ("token", "pass"),
            ("claims", "skipped"),
            ("subject_cap", "skipped"),
            ("upstream", "skipped")
        ]
    );
}

/// Report mode: a failed check is shown as `reported` and the request admitted.
#[tokio::test]
async fn report_mode_shows_the_failures_it_lets_through() {
    let upstream = Upstream::start().await;
    let policy = format!("mode: report\n{}", token_policy(&upstream, ""));
    let gate = TestGate::start(&policy).await;
    let explained = same_decision(&gate, "/ws", &[ORIGIN], (101, "accepted")).await;
    assert_eq!(step(&explained, "token")["result"], "reported");
    // No route is reported too: the request goes on under `defaults`.
    let explained = same_decision(&gate, "/nowhere", &[ORIGIN], (101, "accepted")).await;
    assert_eq!(step(&explained, "route")["result"], "reported");
    let text = Command::new(BIN)
        .args(["explain", "--policy"])
        .arg(&gate.policy_path)
        .args([
            "--url",
            &gate.url("/ws"),
            "--header",
            "Origin: https://app.example.com",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("decision: admitted, 101 (report mode: 1 failed check(s) let through)"),
        "{text}"
    );
}

/// Every flag also reads its `WSGATE_*` variable.
#[test]
fn the_flags_read_their_environment_variables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(
        &path,
        "version: 1\ntrusted_proxies: [127.0.0.1]\ndefaults: {auth: {required: false}, origin: {allow: [\"https://ok.example\"]}}\nroutes: [{path: /ws, ip: {deny: [203.0.113.0/24]}}]\n",
    )
    .unwrap();
    let run = |env: &[(&str, &str)]| {
        let out = Command::new(BIN)
            .arg("explain")
            .env("WSGATE_POLICY", &path)
            .env("WSGATE_URL", "wss://h/ws")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = run(&[("WSGATE_HEADER", "Origin: https://ok.example")]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = run(&[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("origin_not_allowed"), "{text}");
    let (code, text) = run(&[("WSGATE_PEER", "203.0.113.5"), ("WSGATE_JSON", "true")]);
    assert_eq!(code, Some(1), "{text}");
    let json: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["decision"]["reason"], "ip_denied");
    // The usual boolean spellings of a variable.
    let (_, text) = run(&[("WSGATE_PEER", "203.0.113.5"), ("WSGATE_JSON", "1")]);
    assert!(serde_json::from_str::<Value>(&text).is_ok(), "{text}");
    let (_, text) = run(&[("WSGATE_PEER", "203.0.113.5"), ("WSGATE_JSON", "no")]);
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
}

#[test]
fn bad_input_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(
        &path,
        "version: 1\ndefaults: {auth: {required: false}}\nroutes: [{path: /ws}]\n",
    )
    .unwrap();
    // A JWT-shaped credential: never repeated in the error.
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJlc2lnbmF0dXJl";
    let in_query = format!("ws://h/ws a?access_token={jwt}");
    let in_query_ftp = format!("ftp://h/ws?access_token={jwt}");
    let in_port = format!("ws://h:99999/ws?access_token={jwt}");
    let in_userinfo = format!("ws://user:{jwt}@h/ws");
    let in_header = format!("Authorization Bearer {jwt}");
    for args in [
        vec!["--url", "not a url"],
        vec!["--url", "ftp://host/ws"],
        vec!["--url", "wss://host:99999/ws"],
        vec!["--url", "wss://host/ws", "--header", "no colon"],
        vec!["--url", &in_query],
        vec!["--url", &in_query_ftp],
        vec!["--url", &in_port],
        vec!["--url", &in_userinfo],
        vec!["--url", "wss://host/ws", "--header", &in_header],
    ] {
        let out = Command::new(BIN)
            .args(["explain", "--policy"])
            .arg(&path)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.is_empty());
        assert!(!stderr.contains("c2lnbmF0dXJl"), "{args:?}: {stderr}");
    }
    let out = Command::new(BIN)
        .args(["explain", "--policy"])
        .arg(&path)
        .args(["--url", &in_userinfo])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no user information"), "{stderr}");
    // An empty path before a query is `/` (which this policy does not route), and a
    // scheme is read in any case (the policy's default Origin rule refuses these).
    for (url, code) in [("ws://h?x=1", 1), ("WS://h/ws", 1), ("Wss://h:8443/ws", 1)] {
        let out = Command::new(BIN)
            .args(["explain", "--policy"])
            .arg(&path)
            .args(["--url", url])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(code), "{url}: {stdout}");
        let expected = match url {
            "ws://h?x=1" => "404 no_route",
            _ => "403 origin_not_allowed",
        };
        assert!(stdout.contains(expected), "{url}: {stdout}");
    }
    let out = Command::new(BIN)
        .args([
            "explain",
            "--policy",
            "/nonexistent.yaml",
            "--url",
            "ws://h/ws",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // A policy that exists but does not validate: exit 2, naming the field.
    std::fs::write(&path, "version: 1\nroutes:\n  - path: ws\n").unwrap();
    let out = Command::new(BIN)
        .args(["explain", "--policy"])
        .arg(&path)
        .args(["--url", "ws://h/ws"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("p.yaml: routes[0].path:"), "{stderr}");
}
