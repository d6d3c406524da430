//! The operator API on the admin listener, over real sockets: the admin token, the
//! listing of open connections, closing them, and revocations.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// A policy with HS256 tokens required, X-Forwarded-For believed from 127.0.0.1 (so each
/// test client can have its own address), caps and rates out of the way, and a second
/// route `/other`.
fn token_policy(upstream: &str) -> String {
    format!(
        "version: 1\n\
         trusted_proxies: [127.0.0.1/32]\n\
         max_connections: 5000\n\
         defaults:\n  \
           upstream: {upstream}\n  \
           origin: {{allow_missing: true}}\n  \
           rate: {{upgrades_per_second: 100000, burst: 100000, max_connections_per_ip: 5000, max_connections_per_subject: 5000}}\n  \
           auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\n\
         routes:\n  \
           - path: /ws\n    name: ws\n  \
           - path: /other\n    name: other\n"
    )
}

/// Connect to `path` as `sub` (token in the Authorization header) from `ip`.
async fn connect_as(
    gate: &TestGate,
    path: &str,
    token: &str,
    ip: &str,
) -> Result<
    (
        Client,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    let mut request = gate.request(path);
    let headers = request.headers_mut();
    headers.insert("authorization", header_value(&format!("Bearer {token}")));
    headers.insert("x-forwarded-for", header_value(ip));
    gate.connect_request(request).await
}

async fn open(gate: &TestGate, path: &str, sub: &str, ip: &str) -> Client {
    connect_as(gate, path, &hs256(sub), ip)
        .await
        .unwrap_or_else(|e| panic!("{sub} from {ip}: {e}"))
        .0
}

/// One message each way still passes on `client`.
async fn echoes(client: &mut Client) {
    client.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(client).await, Message::text("still here"));
}

/// Poll `GET /connections{query}` until its total is `want`.
async fn wait_total(gate: &TestGate, query: &str, want: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, listing) = operator(
            gate.admin,
            "GET",
            &format!("/connections{query}"),
            Value::Null,
        )
        .await;
        assert_eq!(status, 200, "{listing}");
        if listing["total"] == want {
            return listing;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{query}: total {} rather than {want}",
            listing["total"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every operator endpoint, as (method, path, body).
fn endpoints() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        ("GET", "/connections", Value::Null),
        ("POST", "/connections/close", json!({"sub": "nobody"})),
        ("GET", "/revocations", Value::Null),
        (
            "POST",
            "/revocations",
            json!({"sub": "nobody", "ttl_seconds": 60}),
        ),
        ("DELETE", "/revocations", json!({"sub": "nobody"})),
    ]
}

#[tokio::test]
async fn every_endpoint_requires_the_admin_token() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&token_policy(&upstream.url()), false).await;
    for (method, path, body) in endpoints() {
        let body = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let wrong = ["Authorization: Bearer not-the-token"];
        let basic = [format!("Authorization: Basic {ADMIN_TOKEN}")];
        let prefix = [format!(
            "Authorization: Bearer {}",
            &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]
        )];
        let attempts: [&[&str]; 4] = [&[], &wrong, &[&basic[0]], &[&prefix[0]]];
        for headers in attempts {
            let (status, head, text) =
                admin_request(gate.admin, method, path, headers, &body).await;
            assert_eq!(status, 401, "{method} {path} {headers:?}: {text}");
            let json: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(json["error"], "unauthorized");
            assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(head
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"));
        }
        let right = format!("Authorization: Bearer {ADMIN_TOKEN}");
        let (status, _, text) = admin_request(gate.admin, method, path, &[&right], &body).await;
        assert_eq!(status, 200, "{method} {path}: {text}");
        // The scheme is case-insensitive.
        let lower = format!("Authorization: bearer {ADMIN_TOKEN}");
        let (status, _, _) = admin_request(gate.admin, method, path, &[&lower], &body).await;
        assert_eq!(status, 200, "{method} {path}");
    }
    // The open endpoints stay open.
    for path in ["/healthz", "/readyz", "/metrics", "/policy"] {
        assert_eq!(admin_get(gate.admin, path).await, 200, "{path}");
    }
}

#[tokio::test]
async fn a_changed_token_file_takes_effect() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let file = gate.dir.path().join("admin-token");
    let tmp = gate.dir.path().join("admin-token.tmp");
    std::fs::write(&tmp, "rotated-token\n").unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    // The status and error `GET /connections` gets with `token`.
    let listed = |token: &'static str| async move {
        let auth = format!("Authorization: Bearer {token}");
        let (status, _, body) =
            admin_request(gate.admin, "GET", "/connections", &[&auth], b"").await;
        let error = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned));
        (status, error)
    };
    assert_eq!(
        listed(ADMIN_TOKEN).await,
        (401, Some("unauthorized".into()))
    );
    assert_eq!(listed("rotated-token").await.0, 200);

    // Emptied, to take a leaked token back: no token is accepted until it holds one.
    std::fs::write(&file, "").unwrap();
    assert_eq!(
        listed("rotated-token").await,
        (401, Some("unauthorized".into()))
    );
}

#[tokio::test]
async fn without_a_token_file_the_operator_api_is_off() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_without_admin_token(&open_policy(&upstream.url(), "")).await;
    for (method, path, body) in endpoints() {
        let (status, json) = operator(gate.admin, method, path, body).await;
        assert_eq!(status, 403, "{method} {path}");
        assert_eq!(json["error"], "admin_token_not_configured");
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(admin_get(gate.admin, "/metrics").await, 200);
}

/// A body that never finishes is answered (400) within the body's deadline, not held.
#[tokio::test]
async fn a_body_that_never_ends_is_refused_in_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let mut tcp = tokio::net::TcpStream::connect(gate.admin).await.unwrap();
    let head = format!(
        "POST /revocations HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"sub\":"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut out))
        .await
        .expect("the gate held the request past its body deadline")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains(r#""error":"bad_request""#), "{text}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn malformed_oversized_and_misdirected_requests() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let auth = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let bad_bodies: Vec<(&str, &str, &[u8])> = vec![
        ("POST", "/connections/close", b"{"),
        ("POST", "/connections/close", b""),
        ("POST", "/connections/close", b"[]"),
        ("POST", "/connections/close", b"{}"),
        (
            "POST",
            "/connections/close",
            br#"{"sub": "a", "route": "ws"}"#,
        ),
        ("POST", "/connections/close", br#"{"user": "a"}"#),
        ("POST", "/connections/close", br#"{"ip": "not-an-ip"}"#),
        ("POST", "/connections/close", br#"{"id": "seven"}"#),
        ("POST", "/connections/close", br#"{"id": 1.5}"#),
        ("POST", "/connections/close", br#"{"id": -1}"#),
        // An array would fill the fields by their order, not by name.
        ("POST", "/connections/close", br#"[null, "bob"]"#),
        ("POST", "/revocations", br#"[null, "bob", 5]"#),
        ("POST", "/connections/close", br#"{"sub": ""}"#),
        ("POST", "/connections/close", br#"{"route": ""}"#),
        ("POST", "/revocations", br#"{"sub": "a"}"#),
        ("POST", "/revocations", br#"{"sub": "a", "ttl_seconds": 0}"#),
        (
            "POST",
            "/revocations",
            br#"{"sub": "a", "ttl_seconds": 2592001}"#,
        ),
        (
            "POST",
            "/revocations",
            br#"{"sub": "a", "ttl_seconds": -1}"#,
        ),
        (
            "POST",
            "/revocations",
            br#"{"sub": "a", "jti": "b", "ttl_seconds": 5}"#,
        ),
        ("POST", "/revocations", br#"{"sub": "", "ttl_seconds": 5}"#),
        (
            "POST",
            "/revocations",
            br#"{"sub": "a", "ttl_seconds": 5.5}"#,
        ),
        (
            "POST",
            "/revocations",
            br#"{"sub": "a", "ttl_seconds": "5"}"#,
        ),
        ("POST", "/revocations", b"\xff\xfe"),
        ("DELETE", "/revocations", br#"{"ttl_seconds": 5}"#),
    ];
    for (method, path, body) in bad_bodies {
        let (status, _, text) = admin_request(gate.admin, method, path, &[&auth], body).await;
        assert_eq!(
            status,
            400,
            "{method} {path} {:?}",
            String::from_utf8_lossy(body)
        );
        let json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["error"], "bad_request");
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
        // JSON that is not the request is not called invalid JSON.
        if serde_json::from_slice::<Value>(body).is_ok() {
            assert!(
                !json["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("not valid JSON"),
                "{method} {path} {:?}: {text}",
                String::from_utf8_lossy(body)
            );
        }
    }
    // A whole number written as a JSON float (Python's `json.dumps(60.0)`) is one.
    for ttl in ["60.0", "6e1"] {
        let body = format!(r#"{{"sub": "float-ttl", "ttl_seconds": {ttl}}}"#);
        let (status, _, text) = admin_request(
            gate.admin,
            "POST",
            "/revocations",
            &[&auth],
            body.as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{ttl}: {text}");
    }
    // A revoked sub or jti of more than 1,024 bytes is refused; 1,024 are accepted.
    for (method, field) in [("POST", "sub"), ("POST", "jti"), ("DELETE", "sub")] {
        let ttl = if method == "POST" {
            r#", "ttl_seconds": 5"#
        } else {
            ""
        };
        let long = format!(r#"{{"{field}": "{}"{ttl}}}"#, "x".repeat(1025));
        let (status, _, text) = admin_request(
            gate.admin,
            method,
            "/revocations",
            &[&auth],
            long.as_bytes(),
        )
        .await;
        assert_eq!(status, 400, "{method} {field}: {text}");
        let json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["error"], "bad_request");
        assert!(json["message"].as_str().unwrap().contains("1024"), "{text}");
    }
    let longest = format!(r#"{{"jti": "{}", "ttl_seconds": 5}}"#, "x".repeat(1024));
    let (status, _, text) = admin_request(
        gate.admin,
        "POST",
        "/revocations",
        &[&auth],
        longest.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    // Larger than 16 KiB: 400 bad_request; exactly 16 KiB is read (and parsed).
    let big = format!(r#"{{"sub": "{}"}}"#, "a".repeat(17 * 1024));
    let (status, _, text) = admin_request(
        gate.admin,
        "POST",
        "/connections/close",
        &[&auth],
        big.as_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    let refusal = serde_json::from_str::<Value>(&text).unwrap();
    assert_eq!(refusal["error"], "bad_request");
    assert_eq!(refusal["message"], "the body is larger than 16 KiB");
    let fits = format!(r#"{{"sub": "{}"}}"#, "a".repeat(16 * 1024 - 11));
    assert_eq!(fits.len(), 16 * 1024);
    let (status, _, text) = admin_request(
        gate.admin,
        "POST",
        "/connections/close",
        &[&auth],
        fits.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    // A chunked body over the limit (no Content-Length to refuse it by).
    let chunk = "b".repeat(9000);
    let chunked = format!(
        "{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    let mut tcp = tokio::net::TcpStream::connect(gate.admin).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST /revocations HTTP/1.1\r\nHost: admin\r\n{auth}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let _ = tcp.write_all(chunked.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    assert!(
        out.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );

    // Query parameters.
    for path in [
        "/connections?limit=lots",
        "/connections?limit=-1",
        "/connections?limit=",
        "/connections?who=me",
        "/connections?ip=10.0.0.0/33",
        "/connections?sub=%ff",
        "/connections?route=chat&route=open",
        "/connections?sub=",
        "/connections?route=",
        "/revocations?sub=me",
    ] {
        let (status, json) = operator(gate.admin, "GET", path, Value::Null).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(json["error"], "bad_request");
    }
    // The body endpoints take no query: a selector put in the URL is not left out.
    for (method, path, body) in [
        (
            "POST",
            "/connections/close?sub=alice",
            json!({"route": "ws"}),
        ),
        (
            "POST",
            "/revocations?x=1",
            json!({"sub": "q", "ttl_seconds": 60}),
        ),
        ("DELETE", "/revocations?x=1", json!({"sub": "q"})),
    ] {
        let (status, json) = operator(gate.admin, method, path, body).await;
        assert_eq!(
            (status, json["error"].as_str()),
            (400, Some("bad_request")),
            "{method} {path}: {json}"
        );
    }
    // A limit too large for any integer type is still a whole number: 1,000 at most.
    let (status, json) = operator(
        gate.admin,
        "GET",
        "/connections?limit=100000000000000000000000",
        Value::Null,
    )
    .await;
    assert_eq!((status, json["total"].as_u64()), (200, Some(0)), "{json}");
    // A method the endpoint does not have.
    for (method, path, allow) in [
        ("POST", "/connections", "GET, HEAD"),
        ("GET", "/connections/close", "POST"),
        ("PUT", "/revocations", "GET, HEAD, POST, DELETE"),
        // The read-only endpoints too, with or without the token.
        ("POST", "/metrics", "GET, HEAD"),
        ("DELETE", "/healthz", "GET, HEAD"),
        ("PUT", "/readyz", "GET, HEAD"),
        ("POST", "/policy", "GET, HEAD"),
    ] {
        let (status, head, text) = admin_request(gate.admin, method, path, &[&auth], b"{}").await;
        assert_eq!(status, 405, "{method} {path}");
        assert!(head.contains(&format!("allow: {allow}")), "{head}");
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap()["error"],
            "method_not_allowed"
        );
    }
    // A path the admin listener does not serve: 404 in the same JSON shape.
    for path in ["/nope", "/connections/x", "/revocations/x"] {
        let (status, head, text) = admin_request(gate.admin, "GET", path, &[&auth], b"").await;
        assert_eq!(status, 404, "{path}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap()["error"],
            "not_found",
            "{path}"
        );
    }
    // HEAD wherever GET is: the GET's status, no body.
    for path in [
        "/connections",
        "/revocations",
        "/metrics",
        "/healthz",
        "/policy",
    ] {
        let (status, _, text) = admin_request(gate.admin, "HEAD", path, &[&auth], b"").await;
        assert_eq!(status, 200, "HEAD {path}");
        assert!(text.is_empty(), "HEAD {path}: {text}");
    }
}

/// 1,000 open connections from 4 subjects and 4 /24s; the listing filters by sub and ip,
/// honours `limit` and lists the newest first, with each one's live counts.
#[tokio::test]
async fn listing_a_thousand_connections() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&token_policy(&upstream.url()), false).await;
    let tokens: Vec<String> = (0..4).map(|u| hs256(&format!("user{u}"))).collect();
    let mut clients = Vec::with_capacity(1000);
    for batch in 0..20 {
        let opening = (0..50).map(|k| {
            let i = batch * 50 + k;
            let ip = format!("10.0.{}.{}", i / 250, i % 250 + 1);
            let token = &tokens[i % 4];
            let gate = &gate;
            async move { connect_as(gate, "/ws", token, &ip).await.unwrap().0 }
        });
        clients.extend(futures_util::future::join_all(opening).await);
    }
    let all = wait_total(&gate, "?limit=5000", 1000).await;
    let listed = all["connections"].as_array().unwrap();
    assert_eq!(listed.len(), 1000, "limit is capped at 1000");
    let ids: Vec<u64> = listed.iter().map(|c| c["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first");
    // The default limit.
    let (_, first) = operator(gate.admin, "GET", "/connections", Value::Null).await;
    assert_eq!(first["total"], 1000);
    assert_eq!(first["connections"].as_array().unwrap().len(), 100);
    assert_eq!(first["connections"][0]["id"], ids[0]);

    let by_sub = wait_total(&gate, "?sub=user1&limit=1000", 250).await;
    assert!(by_sub["connections"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["sub"] == "user1"));
    let by_ip = wait_total(&gate, "?ip=10.0.2.0%2F24&limit=1000", 250).await;
    assert!(by_ip["connections"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["client_ip"].as_str().unwrap().starts_with("10.0.2.")));
    // i in 500..750 with i % 4 == 1: 501, 505, …, 749.
    wait_total(&gate, "?sub=user1&ip=10.0.2.0/24&limit=1000", 63).await;
    wait_total(&gate, "?ip=10.0.3.7", 1).await;
    // Written IPv4-mapped, as `ss` shows a dual-stack socket's client: the same one.
    wait_total(&gate, "?ip=::ffff:10.0.3.7", 1).await;
    wait_total(&gate, "?route=ws&limit=1", 1000).await;
    wait_total(&gate, "?route=other", 0).await;

    // The last client opened is the newest; one message each way shows in its counts.
    let newest = clients.last_mut().unwrap();
    echoes(newest).await;
    let (_, one) = operator(gate.admin, "GET", "/connections?ip=10.0.3.250", Value::Null).await;
    let entry = &one["connections"][0];
    assert_eq!(entry["id"], ids[0]);
    assert_eq!(entry["route"], "ws");
    assert_eq!(entry["sub"], "user3");
    assert_eq!(entry["protocol"], "http/1.1");
    assert_eq!(entry["messages_in"], 1);
    assert_eq!(entry["bytes_in"], "still here".len());
    assert_eq!(entry["messages_out"], 1);
    assert_eq!(entry["bytes_out"], "still here".len());
    let opened = entry["opened_at_unix"].as_u64().unwrap();
    assert!(opened.abs_diff(unix_now()) < 60, "{opened}");
    let mut keys: Vec<&str> = entry
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "bytes_in",
            "bytes_out",
            "client_ip",
            "id",
            "messages_in",
            "messages_out",
            "opened_at_unix",
            "protocol",
            "route",
            "sub"
        ]
    );

    // Closed connections leave the registry.
    for client in clients.iter_mut().take(10) {
        client.close(None).await.unwrap();
    }
    wait_total(&gate, "?limit=1", 990).await;
}

/// Two of alice's sockets and one of bob's: revoking alice closes hers with 1008 "revoked"
/// (the upstream gets 1001), refuses her reconnect with 401 token_revoked until the TTL
/// ends, then admits her again.
#[tokio::test]
async fn a_revocation_closes_and_refuses_until_it_expires() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&token_policy(&upstream.url()), false).await;
    let mut alice1 = open(&gate, "/ws", "alice", "10.0.0.1").await;
    let mut alice2 = open(&gate, "/other", "alice", "10.0.0.2").await;
    let mut bob = open(&gate, "/ws", "bob", "10.0.0.3").await;
    wait_total(&gate, "", 3).await;

    let (status, answer) = operator(
        gate.admin,
        "POST",
        "/revocations",
        json!({"sub": "alice", "ttl_seconds": 600}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["closed"], 2);
    let expires = answer["expires_at_unix"].as_u64().unwrap();
    assert!(
        (unix_now() + 599..=unix_now() + 601).contains(&expires),
        "{expires}"
    );

    for alice in [&mut alice1, &mut alice2] {
        assert_eq!(next_close(alice).await, (1008, "revoked".to_owned()));
    }
    for i in 0..2 {
        assert_eq!(
            upstream.wait_ended(i).await,
            Ended::Close(1001, String::new())
        );
    }
    echoes(&mut bob).await;
    let (status, headers, body) =
        refusal(connect_as(&gate, "/ws", &hs256("alice"), "10.0.0.9").await);
    assert_eq!(status, 401);
    assert_eq!(body["error"], "token_revoked");
    assert_eq!(
        headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    let (_, listed) = operator(gate.admin, "GET", "/revocations", Value::Null).await;
    assert_eq!(
        listed,
        json!({"total": 1, "revocations": [{"sub": "alice", "expires_at_unix": expires}]})
    );
    assert_eq!(gate.metric("wsgate_revocations_active").await, 1.0);
    gate.wait_metric(
        "wsgate_closes_total{route=\"ws\",reason=\"revoked\"}",
        1.0,
        Duration::from_secs(5),
        "the revoked close on ws",
    )
    .await;
    gate.wait_metric(
        "wsgate_closes_total{route=\"other\",reason=\"revoked\"}",
        1.0,
        Duration::from_secs(5),
        "the revoked close on other",
    )
    .await;
    wait_total(&gate, "", 1).await;

    // Revoked again with a TTL of 1 s (it replaces the first): then alice is back.
    let (status, answer) = operator(
        gate.admin,
        "POST",
        "/revocations",
        json!({"sub": "alice", "ttl_seconds": 1}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer["closed"], 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut again = loop {
        match connect_as(&gate, "/ws", &hs256("alice"), "10.0.0.9").await {
            Ok((client, _)) => break client,
            Err(e) => {
                let (status, _, body) = refusal(Err(e));
                assert_eq!(
                    (status, body["error"].as_str()),
                    (401, Some("token_revoked"))
                );
                assert!(tokio::time::Instant::now() < deadline, "still revoked");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    echoes(&mut again).await;
    let (_, listed) = operator(gate.admin, "GET", "/revocations", Value::Null).await;
    assert_eq!(listed["total"], 0);
    assert_eq!(gate.metric("wsgate_revocations_active").await, 0.0);
}

/// A `jti` revocation refuses only that token; DELETE lifts it.
#[tokio::test]
async fn delete_lifts_a_revocation() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&token_policy(&upstream.url()), false).await;
    let claims = |jti: &str| json!({"sub": "carol", "jti": jti, "exp": unix_now() + 300});
    let (revoked, other) = (
        hs256_with(SECRET, claims("j-1")),
        hs256_with(SECRET, claims("j-2")),
    );
    let mut open_one = connect_as(&gate, "/ws", &revoked, "10.0.0.1")
        .await
        .unwrap()
        .0;
    let (status, answer) = operator(
        gate.admin,
        "POST",
        "/revocations",
        json!({"jti": "j-1", "ttl_seconds": 600}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer["closed"], 1);
    assert_eq!(
        next_close(&mut open_one).await,
        (1008, "revoked".to_owned())
    );
    let (status, _, body) = refusal(connect_as(&gate, "/ws", &revoked, "10.0.0.1").await);
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_revoked"))
    );
    let mut fine = connect_as(&gate, "/ws", &other, "10.0.0.1")
        .await
        .unwrap()
        .0;
    echoes(&mut fine).await;

    let (status, answer) =
        operator(gate.admin, "DELETE", "/revocations", json!({"jti": "j-1"})).await;
    assert_eq!(status, 200);
    assert_eq!(answer, json!({"lifted": true}));
    let mut back = connect_as(&gate, "/ws", &revoked, "10.0.0.1")
        .await
        .unwrap()
        .0;
    echoes(&mut back).await;
    let (_, answer) = operator(gate.admin, "DELETE", "/revocations", json!({"jti": "j-1"})).await;
    assert_eq!(answer, json!({"lifted": false}));
    assert_eq!(gate.metric("wsgate_revocations_active").await, 0.0);
}

/// `POST /connections/close` by id, sub, ip and route closes just those, with 1008
/// "revoked" to the client and 1001 to the upstream.
#[tokio::test]
async fn close_by_id_sub_ip_and_route() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&token_policy(&upstream.url()), false).await;
    let mut by_id = open(&gate, "/ws", "dora", "10.4.0.1").await;
    let mut by_sub = open(&gate, "/ws", "erin", "10.1.0.1").await;
    let mut by_ip = open(&gate, "/ws", "finn", "10.2.0.1").await;
    let mut by_route = open(&gate, "/other", "gus", "10.3.0.1").await;
    let mut stays = open(&gate, "/ws", "hal", "10.5.0.1").await;
    let listing = wait_total(&gate, "?sub=dora", 1).await;
    let id = listing["connections"][0]["id"].clone();

    let cases: [(Value, &mut Client); 4] = [
        (json!({"id": id}), &mut by_id),
        (json!({"sub": "erin"}), &mut by_sub),
        (json!({"ip": "10.2.0.0/16"}), &mut by_ip),
        (json!({"route": "other"}), &mut by_route),
    ];
    for (n, (body, client)) in cases.into_iter().enumerate() {
        let (status, answer) =
            operator(gate.admin, "POST", "/connections/close", body.clone()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(answer, json!({"closed": 1}), "{body}");
        assert_eq!(
            next_close(client).await,
            (1008, "revoked".to_owned()),
            "{body}"
        );
        assert_eq!(
            upstream.wait_ended(n).await,
            Ended::Close(1001, String::new())
        );
    }
    let (_, answer) = operator(
        gate.admin,
        "POST",
        "/connections/close",
        json!({"sub": "nobody"}),
    )
    .await;
    assert_eq!(answer, json!({"closed": 0}));
    echoes(&mut stays).await;
    let left = wait_total(&gate, "", 1).await;
    assert_eq!(left["connections"][0]["sub"], "hal");
    // A close request is not a revocation: the same subject may come back at once.
    let mut back = open(&gate, "/ws", "erin", "10.1.0.1").await;
    echoes(&mut back).await;
    // An id sent back as its decimal string, as clients that keep ids as strings do.
    let listing = wait_total(&gate, "?sub=erin", 1).await;
    let id = listing["connections"][0]["id"].to_string();
    let (status, answer) =
        operator(gate.admin, "POST", "/connections/close", json!({"id": id})).await;
    assert_eq!((status, answer), (200, json!({"closed": 1})), "id {id:?}");
    assert_eq!(next_close(&mut back).await, (1008, "revoked".to_owned()));
    // And as a whole number written with a fraction, as `json.dumps(812.0)` writes it.
    let mut again = open(&gate, "/ws", "erin", "10.1.0.1").await;
    echoes(&mut again).await;
    let listing = wait_total(&gate, "?sub=erin", 1).await;
    let id = listing["connections"][0]["id"]
        .as_u64()
        .expect("a numeric id") as f64;
    let (status, answer) =
        operator(gate.admin, "POST", "/connections/close", json!({"id": id})).await;
    assert_eq!((status, answer), (200, json!({"closed": 1})), "id {id:?}");
    assert_eq!(next_close(&mut again).await, (1008, "revoked".to_owned()));
}

/// In report mode a revoked token is a violation like an invalid one: logged and counted,
/// and the upgrade goes on (without its claims). The operator's close still closes.
#[tokio::test]
async fn report_mode_counts_a_revoked_token_and_lets_it_on() {
    let upstream = Upstream::start().await;
    let policy =
        token_policy(&upstream.url()).replace("version: 1\n", "version: 1\nmode: report\n");
    let gate = TestGate::start_with(&policy, false).await;
    let (status, _) = operator(
        gate.admin,
        "POST",
        "/revocations",
        json!({"sub": "ivan", "ttl_seconds": 600}),
    )
    .await;
    assert_eq!(status, 200);
    let mut ivan = open(&gate, "/ws", "ivan", "10.0.0.1").await;
    echoes(&mut ivan).await;
    assert_eq!(
        gate.metric("wsgate_report_violations_total{route=\"ws\",reason=\"token_revoked\"}")
            .await,
        1.0
    );
    // Let on as an unverified token: listed without its `sub`.
    let listing = wait_total(&gate, "?ip=10.0.0.1", 1).await;
    assert_eq!(listing["connections"][0]["sub"], Value::Null);
    let (_, answer) = operator(
        gate.admin,
        "POST",
        "/connections/close",
        json!({"ip": "10.0.0.1"}),
    )
    .await;
    assert_eq!(answer, json!({"closed": 1}));
    assert_eq!(next_close(&mut ivan).await, (1008, "revoked".to_owned()));
}

/// The table of revocations is bounded: with 100,000 in force, one more is 507
/// `too_many_revocations`, and the ones in force still hold. (Sent pipelined on one
/// connection, 100,000 requests in a few seconds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_100000_revocations_another_is_507_too_many_revocations() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const FULL: usize = 100_000;
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&token_policy(&upstream.url()), false).await;
    let tcp = tokio::net::TcpStream::connect(gate.admin).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(256 * 1024);
        for i in 0..FULL {
            let body = format!("{{\"sub\":\"s{i}\",\"ttl_seconds\":600}}");
            batch.extend_from_slice(
                format!(
                    "POST /revocations HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            if batch.len() > 200 * 1024 {
                wr.write_all(&batch).await.unwrap();
                batch.clear();
            }
        }
        wr.write_all(&batch).await.unwrap();
        wr
    });
    // Count the answers' status lines until every request has one.
    let (mut answered, mut refused, mut tail) = (0, 0, Vec::new());
    let mut buf = vec![0u8; 256 * 1024];
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while answered < FULL {
        assert!(std::time::Instant::now() < deadline, "{answered} answered");
        let n = tokio::time::timeout(Duration::from_secs(30), rd.read(&mut buf))
            .await
            .expect("answers in time")
            .unwrap();
        assert!(n > 0, "closed after {answered} answers");
        tail.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&tail);
        let mut consumed = 0;
        while let Some(at) = text[consumed..].find("HTTP/1.1 ") {
            let start = consumed + at;
            if text.len() < start + 12 {
                break;
            }
            answered += 1;
            if &text[start + 9..start + 12] != "200" {
                refused += 1;
            }
            consumed = start + 12;
        }
        tail.drain(..consumed);
    }
    let _wr = writer.await.unwrap();
    assert_eq!(refused, 0, "revocations refused below the bound");
    let (status, json) = operator(
        gate.admin,
        "POST",
        "/revocations",
        json!({"sub": "one-too-many", "ttl_seconds": 600}),
    )
    .await;
    assert_eq!(
        (status, &json["error"]),
        (507, &json!("too_many_revocations"))
    );
    assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    // Those in force still hold: a revoked subject is refused.
    let refused = connect_as(&gate, "/ws", &hs256("s99999"), "10.9.0.1").await;
    let (status, _, body) = refusal(refused);
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_revoked"))
    );
}
