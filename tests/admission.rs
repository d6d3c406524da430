//! Admission over real TLS: each refusal of docs/admission.md with its status, JSON reason and
//! headers; the order of the checks; client IP trust; rates and caps and their release;
//! report mode; and the live cut-off of an open connection on reload.

mod support;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// `open_policy` with `top` prepended (top-level fields) and `extra` under the route.
fn policy(upstream: &Upstream, top: &str, extra: &str) -> String {
    format!("{top}{}", open_policy(&upstream.url(), extra))
}

fn with_xff(
    gate: &TestGate,
    xff: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = gate.request("/ws");
    request
        .headers_mut()
        .insert("x-forwarded-for", header_value(xff));
    request
}

fn with_origin(
    gate: &TestGate,
    origin: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = gate.request("/ws");
    request.headers_mut().insert("origin", header_value(origin));
    request
}

const TRUSTED: &str = "trusted_proxies: [127.0.0.1/32]\n";

#[tokio::test]
async fn denied_ip_is_403_ip_denied() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(&upstream, "", "    ip: {deny: [127.0.0.0/8]}\n")).await;
    let (status, _, body) = refusal(gate.connect("/ws").await);
    assert_eq!((status, body["error"].as_str()), (403, Some("ip_denied")));
    assert!(body["message"].is_string());
    assert_eq!(upstream.seen_count(), 0);
}

/// A deny entry written IPv4-mapped, as `ss` shows a client on a dual-stack socket,
/// denies that IPv4 client: it used to be accepted and never match.
#[tokio::test]
async fn an_ipv4_mapped_deny_entry_denies_the_ipv4_client() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(
        &upstream,
        "",
        "    ip: {deny: [\"::ffff:127.0.0.0/104\"]}\n",
    ))
    .await;
    let (status, _, body) = refusal(gate.connect("/ws").await);
    assert_eq!((status, body["error"].as_str()), (403, Some("ip_denied")));
    assert_eq!(upstream.seen_count(), 0);
}

#[tokio::test]
async fn allow_list_admits_only_listed_networks() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(
        &upstream,
        TRUSTED,
        "    ip: {allow: [10.0.0.0/8]}\n",
    ))
    .await;
    assert!(gate
        .connect_request(with_xff(&gate, "10.1.2.3"))
        .await
        .is_ok());
    let (status, _, body) = refusal(gate.connect_request(with_xff(&gate, "192.0.2.1")).await);
    assert_eq!((status, body["error"].as_str()), (403, Some("ip_denied")));
    // Deny wins over allow.
    let gate = TestGate::start(&policy(
        &upstream,
        TRUSTED,
        "    ip: {allow: [10.0.0.0/8], deny: [10.9.0.0/16]}\n",
    ))
    .await;
    assert_eq!(
        refusal(gate.connect_request(with_xff(&gate, "10.9.1.1")).await).0,
        403
    );
}

#[tokio::test]
async fn ipv4_mapped_ipv6_client_matches_ipv4_cidrs() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(
        &upstream,
        TRUSTED,
        "    ip: {deny: [10.0.0.0/8]}\n",
    ))
    .await;
    let (status, _, body) = refusal(
        gate.connect_request(with_xff(&gate, "::ffff:10.1.2.3"))
            .await,
    );
    assert_eq!((status, body["error"].as_str()), (403, Some("ip_denied")));
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let upstream = Upstream::start().await;
    let deny = "    ip: {deny: [203.0.113.0/24]}\n";
    // Untrusted peer: its X-Forwarded-For is ignored, the peer (127.0.0.1) is the client.
    let untrusted = TestGate::start(&policy(&upstream, "", deny)).await;
    assert!(untrusted
        .connect_request(with_xff(&untrusted, "203.0.113.9"))
        .await
        .is_ok());
    // Trusted peer: the right-most untrusted hop is the client.
    let trusted = TestGate::start(&policy(
        &upstream,
        "trusted_proxies: [127.0.0.1/32, 10.0.0.0/8]\n",
        deny,
    ))
    .await;
    let (status, _, _) = refusal(
        trusted
            .connect_request(with_xff(&trusted, "203.0.113.9"))
            .await,
    );
    assert_eq!(status, 403);
    let (status, _, _) = refusal(
        trusted
            .connect_request(with_xff(&trusted, "198.51.100.1, 203.0.113.9, 10.1.1.1"))
            .await,
    );
    assert_eq!(status, 403, "trusted hops are skipped from the right");
    // Empty list elements are skipped, not read as an entry that stops the walk.
    for xff in ["203.0.113.9,", "203.0.113.9, ,10.1.1.1", "203.0.113.9,,"] {
        let (status, _, _) = refusal(trusted.connect_request(with_xff(&trusted, xff)).await);
        assert_eq!(status, 403, "{xff:?}");
    }
    let mut lines = with_xff(&trusted, "203.0.113.9");
    lines
        .headers_mut()
        .append("x-forwarded-for", header_value(" "));
    let (status, _, _) = refusal(trusted.connect_request(lines).await);
    assert_eq!(status, 403, "an empty X-Forwarded-For line is no entry");
    // A client cannot hide behind an address it writes further left.
    assert!(trusted
        .connect_request(with_xff(&trusted, "203.0.113.9, 198.51.100.1"))
        .await
        .is_ok());
}

/// Headers that belong to the client's connection (RFC 9110 §7.6.1) stay at the gate:
/// the upstream gets its own handshake's, not the client's.
#[tokio::test]
async fn hop_by_hop_request_headers_do_not_go_upstream() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(&upstream, "", "")).await;
    let mut request = gate.request("/ws");
    let headers = request.headers_mut();
    headers.insert("connection", header_value("Upgrade, x-hop"));
    for (name, value) in [
        ("x-hop", "secret"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("x-end-to-end", "kept"),
    ] {
        headers.insert(name, header_value(value));
    }
    let (_client, _) = gate.connect_request(request).await.unwrap();
    let seen = upstream.last_seen().headers;
    for absent in ["x-hop", "keep-alive", "proxy-connection", "te"] {
        assert!(seen.get(absent).is_none(), "{absent}: {seen:?}");
    }
    assert_eq!(seen["x-end-to-end"], "kept");
}

#[tokio::test]
async fn over_the_upgrade_rate_is_429_rate_limited_with_retry_after() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(
        &upstream,
        "",
        "    rate: {upgrades_per_second: 0.5, burst: 2}\n",
    ))
    .await;
    let _a = gate.connect("/ws").await.unwrap();
    let _b = gate.connect("/ws").await.unwrap();
    let (status, headers, body) = refusal(gate.connect("/ws").await);
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert_eq!(upstream.seen_count(), 2);
}

/// Any positive rate is a valid policy: one so small that its period would overflow a
/// clock (1e-30 a second) admits its burst and then refuses, as a rate of one a year would.
#[tokio::test]
async fn a_vanishing_upgrade_rate_admits_its_burst_then_refuses() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(
        &upstream,
        "",
        "    rate: {upgrades_per_second: 1.0e-30, burst: 1}\n",
    ))
    .await;
    let _a = gate.connect("/ws").await.unwrap();
    let (status, headers, body) = refusal(gate.connect("/ws").await);
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert_eq!(upstream.seen_count(), 1);
}

/// With the built-in rate and caps, a reconnect storm of 100 clients behind one address
/// (an office NAT after a restart) gets through at once and stays connected, while the
/// same address flooding afterwards is held to the steady rate.
#[tokio::test]
async fn a_reconnect_storm_behind_one_address_passes_and_a_flood_is_held_to_the_rate() {
    const RATE: f64 = 20.0;
    const BURST: usize = 100;
    let upstream = Upstream::start().await;
    let gate = TestGate::start_with(&open_policy(&upstream.url(), ""), false).await;
    let started = Instant::now();
    let storm = futures_util::future::join_all((0..BURST).map(|_| gate.connect("/ws"))).await;
    let held: Vec<_> = storm.into_iter().filter_map(Result::ok).collect();
    assert_eq!(held.len(), BURST, "the storm was refused in part");
    drop(held);
    // Then 10 concurrent loops, 400 attempts in all, as fast as the gate answers.
    let attempts = 400;
    let results = futures_util::future::join_all((0..10).map(|_| async {
        let mut admitted = 0;
        let mut refused = Vec::new();
        for _ in 0..attempts / 10 {
            match gate.connect("/ws").await {
                Ok(_) => admitted += 1,
                Err(e) => refused.push(refusal(Err(e))),
            }
        }
        (admitted, refused)
    }))
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let admitted: usize = results.iter().map(|r| r.0).sum();
    for (status, _, body) in results.iter().flat_map(|r| &r.1) {
        assert_eq!(
            (*status, body["error"].as_str()),
            (429, Some("rate_limited"))
        );
    }
    // The bucket refills at RATE from the start of the storm: nothing more gets through.
    let allowed = (RATE * elapsed).ceil() as usize + 1;
    assert!(
        admitted <= allowed,
        "{admitted} of {attempts} admitted in {elapsed:.2} s after the storm (at most {allowed})"
    );
    eprintln!("flood: {admitted} of {attempts} admitted, {elapsed:.2} s");
}

#[tokio::test]
async fn ipv6_clients_share_a_bucket_per_prefix() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(
        &upstream,
        TRUSTED,
        "    rate: {upgrades_per_second: 0.1, burst: 1, ipv6_prefix: 64}\n",
    ))
    .await;
    assert!(gate
        .connect_request(with_xff(&gate, "2001:db8::1"))
        .await
        .is_ok());
    // Same /64: same bucket, already empty.
    let (status, _, body) = refusal(
        gate.connect_request(with_xff(&gate, "2001:db8::ffff"))
            .await,
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    // Another /64: its own bucket.
    assert!(gate
        .connect_request(with_xff(&gate, "2001:db8:0:1::1"))
        .await
        .is_ok());
}

#[tokio::test]
async fn connections_per_ip_are_capped_and_released_on_close() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(
        &upstream,
        "",
        "    rate: {max_connections_per_ip: 2, burst: 100}\n",
    ))
    .await;
    let (mut a, _) = gate.connect("/ws").await.unwrap();
    let (mut b, _) = gate.connect("/ws").await.unwrap();
    let (status, headers, body) = refusal(gate.connect("/ws").await);
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_connections"))
    );
    assert!(headers.contains_key("retry-after"));
    // A clean close frees the slot...
    a.close(None).await.unwrap();
    upstream.wait_ended(0).await;
    wait_until_admitted(&gate).await;
    // ...and so does an upstream that vanishes.
    b.send(Message::text("drop")).await.unwrap();
    assert_eq!(raw_close(&mut b).await.0, 1014);
    drop(b);
    let _c = wait_until_admitted(&gate).await;
    let _d = wait_until_admitted(&gate).await;
    assert_eq!(refusal(gate.connect("/ws").await).0, 429);
}

/// The slot is freed when the relay task ends, just after the close: allow a moment.
async fn wait_until_admitted(gate: &TestGate) -> Client {
    let started = Instant::now();
    loop {
        match gate.connect("/ws").await {
            Ok((client, _)) => return client,
            Err(_) if started.elapsed() < Duration::from_secs(2) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("slot not released: {e}"),
        }
    }
}

#[tokio::test]
async fn connections_per_subject_are_capped_across_addresses() {
    let upstream = Upstream::start().await;
    let top = TRUSTED;
    let policy = format!(
        "{top}version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow_missing: true}}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\n  rate: {{max_connections_per_subject: 1}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    let token = hs256("alice");
    let request = |ip: &str| {
        let mut r = with_xff(&gate, ip);
        r.headers_mut()
            .insert("authorization", header_value(&format!("Bearer {token}")));
        r
    };
    let (mut first, _) = gate.connect_request(request("192.0.2.1")).await.unwrap();
    let (status, headers, body) = refusal(gate.connect_request(request("192.0.2.2")).await);
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_connections"))
    );
    assert!(headers.contains_key("retry-after"));
    first.close(None).await.unwrap();
    let started = Instant::now();
    while gate.connect_request(request("192.0.2.2")).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "subject slot not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An empty `sub` names no subject, as a token without one: it has no cap.
    let nobody = hs256_with(
        SECRET,
        serde_json::json!({"sub": "", "exp": unix_now() + 300}),
    );
    let mut held = Vec::new();
    for ip in ["192.0.2.3", "192.0.2.4"] {
        let mut r = with_xff(&gate, ip);
        r.headers_mut()
            .insert("authorization", header_value(&format!("Bearer {nobody}")));
        let admitted = gate.connect_request(r).await;
        assert!(admitted.is_ok(), "an empty sub was capped: {ip}");
        held.push(admitted);
    }
}

#[tokio::test]
async fn global_cap_is_503_server_full() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(&upstream, "max_connections: 1\n", "")).await;
    let (mut a, _) = gate.connect("/ws").await.unwrap();
    let (status, _, body) = refusal(gate.connect("/ws").await);
    assert_eq!((status, body["error"].as_str()), (503, Some("server_full")));
    a.close(None).await.unwrap();
    wait_until_admitted(&gate).await;
}

#[tokio::test]
async fn origin_patterns_and_look_alikes() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\n  rate: {{burst: 100}}\n  origin: {{allow: [\"https://app.example.com\", \"https://*.example.com\"]}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    for ok in [
        "https://app.example.com",
        "https://a.b.example.com",
        "HTTPS://APP.EXAMPLE.COM:443",
    ] {
        assert!(
            gate.connect_request(with_origin(&gate, ok)).await.is_ok(),
            "{ok}"
        );
    }
    for bad in [
        "https://example.com",
        "https://example.com.evil.com",
        "https://evilexample.com",
        "https://app.example.com:8443",
        "http://app.example.com",
        "null",
    ] {
        let (status, _, body) = refusal(gate.connect_request(with_origin(&gate, bad)).await);
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("origin_not_allowed")),
            "{bad}"
        );
    }
    // No Origin and allow_missing false (the default).
    let (status, _, body) = refusal(gate.connect("/ws").await);
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("origin_not_allowed"))
    );
}

#[tokio::test]
async fn checks_run_in_order_and_stop_at_the_first_failure() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\ndefaults:\n  upstream: {}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\n  origin: {{allow: [\"https://ok.example\"]}}\n  rate: {{upgrades_per_second: 0.1, burst: 1}}\nroutes:\n  - path: /ws\n  - path: /denied\n    ip: {{deny: [0.0.0.0/0]}}\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    // Denied IP, bad Origin, no token: the IP check comes first.
    let mut r = gate.request("/denied");
    r.headers_mut()
        .insert("origin", header_value("https://bad.example"));
    assert_eq!(
        refusal(gate.connect_request(r).await).2["error"],
        "ip_denied"
    );
    // Bad Origin and no token: Origin before token (this uses the bucket's one token).
    assert_eq!(
        refusal(
            gate.connect_request(with_origin(&gate, "https://bad.example"))
                .await
        )
        .2["error"],
        "origin_not_allowed"
    );
    // Rate before Origin: the bucket is empty now.
    assert_eq!(
        refusal(
            gate.connect_request(with_origin(&gate, "https://bad.example"))
                .await
        )
        .2["error"],
        "rate_limited"
    );
    // Good Origin, no token, fresh route bucket is per route: use another gate.
    let gate = TestGate::start(&policy).await;
    let (status, headers, body) = refusal(
        gate.connect_request(with_origin(&gate, "https://ok.example"))
            .await,
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("missing_token"))
    );
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(
        upstream.seen_count(),
        0,
        "no refused client costs the upstream a socket"
    );
}

#[tokio::test]
async fn report_mode_lets_violations_through_but_not_caps() {
    let upstream = Upstream::start().await;
    let policy = format!(
        "version: 1\nmode: report\nmax_connections: 2\ndefaults:\n  upstream: {}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\n  origin: {{allow: [\"https://ok.example\"]}}\n  ip: {{deny: [127.0.0.0/8]}}\n  rate: {{upgrades_per_second: 0.1, burst: 1}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start(&policy).await;
    // Denied IP, no Origin, no token: all logged, all let through.
    let (mut a, _) = gate.connect("/ws").await.unwrap();
    a.send(Message::text("reported")).await.unwrap();
    assert_eq!(next_message(&mut a).await, Message::text("reported"));
    // Second: also over the upgrade rate; still through.
    let (_b, _) = gate.connect("/ws").await.unwrap();
    // Every reason on every route: `wsgate_report_violations_total{route,reason}` summed.
    let violations = gate.metric("wsgate_report_violations_total").await;
    assert!(violations >= 7.0, "violations counted: {violations}");
    // The global cap is enforced even in report mode.
    let (status, _, body) = refusal(gate.connect("/ws").await);
    assert_eq!((status, body["error"].as_str()), (503, Some("server_full")));
}

/// Report mode lets a path that matches no route through as well, to `defaults`' upstream
/// under the label of no route (`none`); enforce mode answers the same request 404.
#[tokio::test]
async fn report_mode_lets_a_path_with_no_route_through_to_the_defaults() {
    let fallback = Upstream::start().await;
    let routed = Upstream::start().await;
    let policy = |mode: &str| {
        format!(
            "version: 1\nmode: {mode}\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\n  origin: {{allow_missing: true}}\nroutes:\n  - path: /ws\n    name: chat\n    upstream: {}\n",
            fallback.url(),
            routed.url()
        )
    };
    let gate = TestGate::start(&policy("report")).await;
    let (mut client, _) = gate.connect("/elsewhere/x?a=1").await.unwrap();
    client.send(Message::text("unrouted")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("unrouted"));
    assert_eq!((fallback.seen_count(), routed.seen_count()), (1, 0));
    assert_eq!(fallback.last_seen().target, "/elsewhere/x?a=1");
    for (series, value) in [
        (
            "wsgate_report_violations_total{route=\"none\",reason=\"no_route\"}",
            1.0,
        ),
        (
            "wsgate_upgrades_total{route=\"none\",result=\"accepted\"}",
            1.0,
        ),
        ("wsgate_connections_active{route=\"none\"}", 1.0),
        (
            "wsgate_upgrades_total{route=\"none\",result=\"no_route\"}",
            0.0,
        ),
    ] {
        assert_eq!(gate.metric(series).await, value, "{series}");
    }
    // A routed path still goes to its own route.
    let (_chat, _) = gate.connect("/ws").await.unwrap();
    assert_eq!((fallback.seen_count(), routed.seen_count()), (1, 1));

    // The same request under enforce: 404, and the upstream never sees it.
    gate.write_policy(&policy("enforce"));
    gate.wait_metric(
        "wsgate_policy_reloads_total{result=\"success\"}",
        1.0,
        Duration::from_secs(2),
        "the enforce policy was not loaded",
    )
    .await;
    let (status, _, body) = refusal(gate.connect("/elsewhere").await);
    assert_eq!((status, body["error"].as_str()), (404, Some("no_route")));
    assert_eq!(fallback.seen_count(), 1);
}

#[tokio::test]
async fn reload_cuts_off_a_newly_denied_client_and_keeps_the_others() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(&upstream, TRUSTED, "")).await;
    let (mut doomed, _) = gate
        .connect_request(with_xff(&gate, "203.0.113.5"))
        .await
        .unwrap();
    let (mut kept, _) = gate
        .connect_request(with_xff(&gate, "198.51.100.7"))
        .await
        .unwrap();

    gate.write_policy(&policy(
        &upstream,
        TRUSTED,
        "    ip: {deny: [203.0.113.0/24]}\n",
    ));
    let started = Instant::now();
    assert_eq!(
        next_close(&mut doomed).await,
        (1008, "policy changed".into())
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let ended = upstream.wait_ended(0).await;
    assert!(matches!(ended, Ended::Close(1001, _)), "{ended:?}");
    kept.send(Message::text("still welcome")).await.unwrap();
    assert_eq!(
        next_message(&mut kept).await,
        Message::text("still welcome")
    );
    // New upgrades from the denied network are refused too.
    assert_eq!(
        refusal(gate.connect_request(with_xff(&gate, "203.0.113.6")).await).0,
        403
    );
}

#[tokio::test]
async fn a_reload_that_changes_nothing_for_a_client_keeps_it() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&policy(&upstream, "", "")).await;
    let (mut client, _) = gate.connect("/ws").await.unwrap();
    gate.write_policy(&format!("{}  - path: /other\n", policy(&upstream, "", "")));
    gate.wait_metric(
        "wsgate_policy_reloads_total{result=\"success\"}",
        1.0,
        Duration::from_secs(2),
        "the new policy was not loaded",
    )
    .await;
    client.send(Message::text("unaffected")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("unaffected"));
}

#[tokio::test]
async fn limiter_keys_from_an_address_flood_are_evicted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    // Every attempt passes the rate check (a fresh key) and is refused at Origin, so no
    // upstream socket is used; rate 10/s and burst 1 make a key idle again after 0.1 s.
    let policy = format!(
        "{TRUSTED}version: 1\ndefaults:\n  upstream: {}\n  auth: {{required: false}}\n  origin: {{allow: [\"https://only.example\"]}}\n  rate: {{upgrades_per_second: 10, burst: 1}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    );
    let gate = TestGate::start_with(&policy, false).await;
    let flood = 3000u32;
    for i in 0..flood {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-For: {ip}\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).await.unwrap();
        assert!(response.starts_with(b"HTTP/1.1 403"));
    }
    let tracked = gate.running.gate.admission.limiters.tracked_keys();
    assert!(tracked <= flood as usize);
    // The sweep runs every second; keys idle for 0.1 s go.
    let deadline = Instant::now() + Duration::from_secs(3);
    while gate.running.gate.admission.limiters.tracked_keys() > 0 {
        assert!(Instant::now() < deadline, "limiter keys not evicted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gate.running.gate.admission.caps.tracked_keys(), 0);
}

// ----- routing on the normalised path ------------------------------------------------

/// `/api` is open, `/api/admin` needs a token with `role: admin` (plus `admin_extra`),
/// `/files` proxies plain HTTP.
fn split_policy(upstream: &Upstream, admin_extra: &str) -> String {
    format!(
        "version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow_missing: true}}\n  rate: {{burst: 100}}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\nroutes:\n  - path: /api\n    auth: {{required: false}}\n  - path: /api/admin\n    auth: {{require_claims: {{role: [admin]}}}}\n{admin_extra}  - path: /files\n    http: pass\n    auth: {{required: false}}\n",
        upstream.url()
    )
}

#[tokio::test]
async fn other_spellings_of_a_protected_path_are_routed_to_its_route() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&split_policy(&upstream, "")).await;
    for path in [
        "/api/admin",
        "/api//admin",
        "/api/%61dmin",
        "//api/admin",
        "/api/%61%64min/x",
        "/api///admin//x",
    ] {
        let (status, _, body) = refusal(gate.connect(path).await);
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("missing_token")),
            "{path}"
        );
    }
    assert_eq!(upstream.seen_count(), 0);
    // The open route still admits without a token.
    assert!(gate.connect("/api/x").await.is_ok());
}

#[tokio::test]
async fn the_upstream_gets_the_path_that_was_routed() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&split_policy(&upstream, "")).await;
    let (_client, _) = gate.connect("/api//x/%7euser/%c3%a9?a=1").await.unwrap();
    assert_eq!(upstream.last_seen().target, "/api/x/~user/%C3%A9?a=1");
    // Plain HTTP on a pass route too.
    let response = gate
        .raw(b"GET /files//a/%62%2a?q=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    assert!(
        response.contains("pass GET /files/a/b%2A?q=1\n"),
        "{response}"
    );
}

/// A character sent raw (a hand-written client, not a browser, which encodes it) goes
/// upstream percent-encoded, in the path and the query: an upstream that parses URIs
/// strictly (Python's `websockets`) refused the raw bytes, and the client got 502.
#[tokio::test]
async fn a_character_sent_raw_goes_upstream_percent_encoded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&split_policy(&upstream, "")).await;
    let upgrade = "GET /api/é//ß?q=é&r=1 HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n";
    let mut stream = gate.stream().await;
    stream.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    assert_eq!(
        upstream.last_seen().target,
        "/api/%C3%A9/%C3%9F?q=%C3%A9&r=1"
    );
    let response = gate
        .raw("GET /files/é?q=ü HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".as_bytes())
        .await;
    assert!(
        response.contains("pass GET /files/%C3%A9?q=%C3%BC\n"),
        "{response}"
    );
}

#[tokio::test]
async fn a_reload_rechecks_the_route_that_was_routed() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&split_policy(&upstream, "")).await;
    let token = hs256_with(
        SECRET,
        serde_json::json!({"sub": "a", "role": "admin", "exp": unix_now() + 300}),
    );
    let mut request = gate.request("/api//admin");
    request
        .headers_mut()
        .insert("authorization", header_value(&format!("Bearer {token}")));
    let (mut client, _) = gate.connect_request(request).await.unwrap();
    assert_eq!(upstream.last_seen().target, "/api/admin");
    // Denying the client on /api/admin cuts it off, though `/api//admin` has `/api` as a
    // prefix.
    gate.write_policy(&split_policy(&upstream, "    ip: {deny: [127.0.0.0/8]}\n"));
    assert_eq!(
        next_close(&mut client).await,
        (1008, "policy changed".into())
    );
}

#[tokio::test]
async fn path_parameters_and_malformed_escapes_are_400() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&split_policy(&upstream, "")).await;
    for path in [
        "/api/x;y",
        "/api/admin;x",
        "/api;x/admin",
        "/api/%3Badmin",
        "/api/%zz",
        "/api/x%4",
        "/api/%2e%2e/admin",
        "/api/x/%2E",
    ] {
        let (status, _, body) = refusal(gate.connect(path).await);
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_request")),
            "{path}"
        );
    }
    let response = gate
        .raw(b"GET /files/a;jsessionid=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("\"error\":\"bad_request\""), "{response}");
    assert_eq!(upstream.seen_count(), 0, "the upstream saw a refused path");
}

/// A refused upgrade's TLS connection ends as every answered one does, with close_notify
/// after the answer: strict clients (OpenSSL, Python's `ssl`) take an end without it for
/// a truncated answer.
#[tokio::test]
async fn a_refused_upgrade_over_tls_ends_with_close_notify() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let upgrade = |path: &str, version: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n\r\n"
        )
    };
    for (request, status) in [
        (upgrade("/nope", "13"), "404"),
        (upgrade("/ws", "8"), "426"),
    ] {
        let mut tls = gate.stream().await;
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        // rustls reports an end without close_notify as an UnexpectedEof error.
        let read = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            matches!(read, Ok(Ok(_))),
            "{status}: {read:?} after {answer:?}"
        );
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
    }
}
