//! permessage-deflate (RFC 7692) through the gate: agreed end to end between real peers
//! (Python `websockets` on both legs, with and without context takeover, with window
//! limits), compressed frames relayed byte for byte, and what the gate inflates on the
//! way held to the route's rules: bombs (in one frame or split across fragments, either
//! way) cut with 1009/1001 at the limit while the gate's memory stays flat, invalid
//! deflate data 1007, RSV1 where it has no meaning 1002, and an upstream answer no offer
//! allowed 502; messages sent again byte for byte (as broadcasts are) pass and are still
//! judged by their kind. `compression: off` strips the offer.
//!
//! The Python peers need `target/pyclients` (made by `.ci/run`); without it those tests
//! are skipped, except under `CI=true`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use flate2::{Compress, Compression, FlushCompress};
use serde_json::Value;
use support::process::{rss_kib, Proc};
use support::wire::{accept_value, close_code, frame, read_frame, read_head};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/deflate.py")
}

/// A Python `websockets` echo server with permessage-deflate `settings`; stopped (stdin
/// closed, then killed) when dropped.
struct PyServer {
    child: Child,
    stdin: Option<ChildStdin>,
    port: u16,
}

impl PyServer {
    fn start(python: &PathBuf, settings: &str) -> PyServer {
        let mut child = Command::new(python)
            .arg(script())
            .args(["server", settings])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = serde_json::from_str::<Value>(&line).expect("the server's port line")["port"]
            .as_u64()
            .unwrap() as u16;
        let stdin = child.stdin.take();
        PyServer { child, stdin, port }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python client's JSON result, within 30 s.
async fn py_client(python: &PathBuf, url: String, settings: &str) -> Value {
    let mut command = Command::new(python);
    command
        .arg(script())
        .args(["client", &url, settings])
        .stdout(Stdio::piped());
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .expect("the Python client did not finish")
    .unwrap()
    .expect("python runs");
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| panic!("the client said: {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_peers_agree_permessage_deflate_through_the_gate() {
    let Some(python) = python() else { return };
    for settings in ["default", "no_context", "windows"] {
        let server = PyServer::start(&python, settings);
        let gate = TestGate::start_with(&open_policy(&server.url(), ""), false).await;
        let result = py_client(&python, format!("ws://{}/ws", gate.addr), settings).await;
        assert_eq!(result["ok"], true, "{settings}: {result}");
        assert_eq!(result["echoed"], 20, "{settings}: {result}");
        let upstream = &result["upstream"];
        // The upstream saw the client's offer, and the client got the upstream's answer.
        assert!(
            upstream["offered"]
                .as_str()
                .is_some_and(|o| o.starts_with("permessage-deflate")),
            "{settings}: {result}"
        );
        assert_eq!(
            result["answer"], upstream["answered"],
            "{settings}: {result}"
        );
        for direction in ["client_to_upstream", "upstream_to_client"] {
            let series = format!(
                "wsgate_message_inflated_bytes_total{{route=\"ws\",direction=\"{direction}\"}}"
            );
            let inflated = gate
                .wait_metric(&series, 100_000.0, Duration::from_secs(5), "inflated bytes")
                .await;
            let wire = gate
                .metric(&format!(
                    "wsgate_message_bytes_total{{route=\"ws\",direction=\"{direction}\"}}"
                ))
                .await;
            // JSON compresses: the wire carried far less than what it inflated to.
            assert!(
                wire * 3.0 < inflated,
                "{settings} {direction}: {wire} vs {inflated}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_off_strips_the_offer() {
    let Some(python) = python() else { return };
    let server = PyServer::start(&python, "default");
    let policy = open_policy(&server.url(), "    messages: {compression: off}\n");
    let gate = TestGate::start_with(&policy, false).await;
    let result = py_client(&python, format!("ws://{}/ws", gate.addr), "default").await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["answer"], Value::Null, "{result}");
    assert_eq!(result["upstream"]["offered"], Value::Null, "{result}");
}

// ----- raw peers ---------------------------------------------------------------------

/// What a permessage-deflate sender puts in a message: raw deflate, sync-flushed, its
/// trailing 00 00 FF FF removed.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut out = sync_flushed(&mut Compress::new(Compression::best(), false), data);
    out.truncate(out.len() - 4);
    out
}

fn sync_flushed(state: &mut Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 100 + 1024);
    let start = state.total_in();
    loop {
        let consumed = (state.total_in() - start) as usize;
        state
            .compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
            .unwrap();
        if (state.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// A message of 1 GiB of zeros, deflated to about 1 MiB: the first MiB's blocks, then the
/// second MiB's 1,023 times (they refer back only into zeros, so they repeat validly).
fn gigabyte_bomb() -> Vec<u8> {
    let zeros = vec![0u8; 1 << 20];
    let mut state = Compress::new(Compression::best(), false);
    let first = sync_flushed(&mut state, &zeros);
    let next = sync_flushed(&mut state, &zeros);
    let mut bomb = first;
    for _ in 0..1023 {
        bomb.extend_from_slice(&next);
    }
    bomb.truncate(bomb.len() - 4);
    bomb
}

/// An upstream that answers one upgrade with `answer` as its `Sec-WebSocket-Extensions`
/// (none when empty); returns the request head and the socket.
async fn raw_deflate_upstream(
    answer: &'static str,
) -> (String, tokio::task::JoinHandle<(String, TcpStream)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let head = read_head(&mut tcp).await.unwrap();
        let accept = accept_value(&head);
        let extension = if answer.is_empty() {
            String::new()
        } else {
            format!("Sec-WebSocket-Extensions: {answer}\r\n")
        };
        let response = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{extension}\r\n");
        tcp.write_all(response.as_bytes()).await.unwrap();
        (head, tcp)
    });
    (url, task)
}

/// A raw client upgraded on /ws offering `offer`; the socket and the gate's 101 head.
async fn raw_deflate_client(addr: SocketAddr, offer: &str) -> (TcpStream, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: {offer}\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut tcp).await.expect("no response head");
    (tcp, head)
}

/// Server frames (the gate's, toward the client) until a close: its code.
async fn upstream_close_code(tcp: &mut TcpStream) -> u16 {
    let read = async {
        loop {
            match support::wire::read_frame(tcp).await {
                Some(f) if f.opcode == 0x8 => {
                    return u16::from_be_bytes([f.payload[0], f.payload[1]])
                }
                Some(_) => {}
                None => return 0,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no close frame at the upstream in time")
}

fn bomb_policy(upstream: &str, dir: &tempfile::TempDir) -> PathBuf {
    let policy = open_policy(
        upstream,
        "    messages: {max_frame_bytes: 16777216, max_message_bytes: 16777216}\n",
    );
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, policy).unwrap();
    path
}

/// A client's compressed message that would inflate to 1 GiB is cut at the 16 MiB limit
/// — in one frame or split over 64 fragments — with 1009 to the client and 1001 to the
/// upstream, and the gate's resident memory grows by less than 2 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_bomb_is_cut_at_the_limit_with_flat_memory() {
    let bomb = gigabyte_bomb();
    assert!(bomb.len() < 2 << 20, "{}", bomb.len());
    for fragments in [1usize, 64] {
        let (url, upstream) = raw_deflate_upstream("permessage-deflate").await;
        let dir = tempfile::tempdir().unwrap();
        let mut gate = Proc::start(&bomb_policy(&url, &dir), &[]);
        let (mut client, head) = raw_deflate_client(gate.addr, "permessage-deflate").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-extensions: permessage-deflate\r\n"),
            "{head}"
        );
        let (request, mut up) = upstream.await.unwrap();
        assert!(
            request.contains("sec-websocket-extensions: permessage-deflate\r\n"),
            "{request}"
        );
        let before = rss_kib(gate.child.id());
        let piece = bomb.len().div_ceil(fragments);
        let mut wire = Vec::with_capacity(bomb.len() + fragments * 14);
        for (i, chunk) in bomb.chunks(piece).enumerate() {
            let fin = if (i + 1) * piece >= bomb.len() {
                0x80
            } else {
                0
            };
            let first = match i {
                0 => fin | 0x40 | 0x2, // RSV1 on the first frame only
                _ => fin,
            };
            wire.extend_from_slice(&frame(first, chunk, true));
        }
        // The gate may close while the bomb is still being written.
        let _ = client.write_all(&wire).await;
        assert_eq!(close_code(&mut client).await, 1009, "{fragments} fragments");
        assert_eq!(
            upstream_close_code(&mut up).await,
            1001,
            "{fragments} fragments"
        );
        let grown = rss_kib(gate.child.id()).saturating_sub(before);
        assert!(
            grown < 2048,
            "{fragments} fragments: the gate grew by {grown} KiB"
        );
        eprintln!("{fragments} fragments: the gate grew by {grown} KiB");
        // The close line counts what was inflated: just past the limit, no more.
        let line = gate.wait_line("client_message_too_big");
        let inflated: u64 = line
            .split("inflated_bytes_in=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        assert!(
            (16 << 20..=(16 << 20) + 8192).contains(&inflated),
            "{inflated}: {line}"
        );
    }
}

/// The same from the upstream's side: its bomb toward the client gets it 1009, and the
/// client 1001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_bomb_is_cut_at_the_limit() {
    let bomb = gigabyte_bomb();
    let (url, upstream) = raw_deflate_upstream("permessage-deflate").await;
    let dir = tempfile::tempdir().unwrap();
    let gate = Proc::start(&bomb_policy(&url, &dir), &[]);
    let (mut client, head) = raw_deflate_client(gate.addr, "permessage-deflate").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (_, mut up) = upstream.await.unwrap();
    let before = rss_kib(gate.child.id());
    let _ = up.write_all(&frame(0x80 | 0x40 | 0x1, &bomb, false)).await;
    assert_eq!(upstream_close_code(&mut up).await, 1009);
    assert_eq!(close_code(&mut client).await, 1001);
    let grown = rss_kib(gate.child.id()).saturating_sub(before);
    assert!(grown < 2048, "the gate grew by {grown} KiB");
    eprintln!("upstream bomb: the gate grew by {grown} KiB");
}

/// A message whose deflate data ends with a final block, as RFC 7692 §7.2.3.4 has it sent:
/// the block, then the octet that starts an empty stored block.
fn with_final_block(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    Compress::new(Compression::default(), false)
        .compress_vec(data, &mut out, FlushCompress::Finish)
        .unwrap();
    out.push(0x00);
    out
}

/// A final block hides nothing: what follows it in the message starts a new deflate stream,
/// which Chromium's inflater delivers, so the gate inflates it and holds it to the limit
/// (1009). A message must end at a block boundary (without context takeover, and with it
/// while the gate keeps a short history in place of its state): one that stops inside a
/// block (or an empty one, which the appended tail leaves inside a stored block's header)
/// would have a receiver that keeps its state (Chromium's) read the next message as that
/// block's rest, unchecked (1007). Both ways, the other side gets
/// 1001 (1014 for the client when the upstream sent bad data); a message ending with a
/// final block as the RFC has it passes first, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_block_hides_nothing_and_messages_end_at_a_block_boundary() {
    let good = with_final_block(b"{\"hello\":1}");
    // The final block, then a new stream straight after it (no octet between).
    let mut bomb_after_final = with_final_block(b"ok");
    bomb_after_final.pop();
    bomb_after_final.extend_from_slice(&gigabyte_bomb());
    let open_stored = vec![0x00, 0xFF, 0xFF, 0x00, 0x00, b'h', b'i'];
    let cases = [
        ("bomb after a final block", false, bomb_after_final, 1009),
        (
            "stops inside a stored block",
            true,
            open_stored.clone(),
            1007,
        ),
        // With context takeover too while the gate keeps a short history in place of
        // its state, which would start the next message afresh.
        (
            "stops inside a stored block, with takeover",
            false,
            open_stored,
            1007,
        ),
        ("no deflate data, with takeover", false, Vec::new(), 1007),
    ];
    for (what, no_takeover, payload, code) in cases {
        for from_client in [true, false] {
            let answer = match (no_takeover, from_client) {
                (false, _) => "permessage-deflate",
                (true, true) => "permessage-deflate; client_no_context_takeover",
                (true, false) => "permessage-deflate; server_no_context_takeover",
            };
            let (url, upstream) = raw_deflate_upstream(answer).await;
            let dir = tempfile::tempdir().unwrap();
            let gate = Proc::start(&bomb_policy(&url, &dir), &[]);
            let (mut client, head) = raw_deflate_client(gate.addr, "permessage-deflate").await;
            assert!(head.starts_with("HTTP/1.1 101"), "{what}: {head}");
            let (_, mut up) = upstream.await.unwrap();
            let (sender, receiver) = match from_client {
                true => (&mut client, &mut up),
                false => (&mut up, &mut client),
            };
            sender
                .write_all(&frame(0xC1, &good, from_client))
                .await
                .unwrap();
            let passed = tokio::time::timeout(Duration::from_secs(10), read_frame(receiver))
                .await
                .expect("the good message in time")
                .expect("the good message");
            assert_eq!((passed.opcode, &passed.payload), (0x1, &good), "{what}");
            // The gate may close while the message is still being written.
            let _ = sender.write_all(&frame(0xC2, &payload, from_client)).await;
            let codes = (
                close_code(&mut client).await,
                upstream_close_code(&mut up).await,
            );
            let expected = match (from_client, code) {
                (true, _) => (code, 1001),
                (false, 1009) => (1001, 1009),
                // An upstream that breaks the protocol: the client is told 1014.
                (false, _) => (1014, code),
            };
            assert_eq!(codes, expected, "{what}, from the client: {from_client}");
        }
    }
}

/// Compressed frames cross the gate byte for byte, both ways; the inflated size is what
/// the limit holds (a message inflating to exactly the limit passes, one byte more is
/// 1009), on the wire and inflated counted in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_frames_pass_unchanged_and_the_limit_is_on_the_inflated_size() {
    let (url, upstream) =
        raw_deflate_upstream("permessage-deflate; client_no_context_takeover").await;
    let policy = open_policy(&url, "    messages: {max_message_bytes: 65536}\n");
    let gate = TestGate::start_with(&policy, false).await;
    let (mut client, head) =
        raw_deflate_client(gate.addr, "permessage-deflate; client_max_window_bits").await;
    assert!(
        head.to_ascii_lowercase().contains(
            "sec-websocket-extensions: permessage-deflate; client_no_context_takeover\r\n"
        ),
        "{head}"
    );
    let (_, mut up) = upstream.await.unwrap();

    // Client to upstream: the masked frame arrives exactly as sent.
    let text = "{\"a\":1}".repeat(65536 / 7);
    let text = format!("{text}{}", "x".repeat(65536 - text.len()));
    let sent = frame(0x80 | 0x40 | 0x1, &deflate(text.as_bytes()), true);
    client.write_all(&sent).await.unwrap();
    let mut got = vec![0u8; sent.len()];
    up.read_exact(&mut got).await.unwrap();
    assert_eq!(got, sent);

    // Upstream to client, unmasked as sent.
    let sent = frame(0x80 | 0x40 | 0x2, &deflate(&[7u8; 40_000]), false);
    up.write_all(&sent).await.unwrap();
    let mut got = vec![0u8; sent.len()];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(got, sent);
    gate.wait_metric(
        "wsgate_message_inflated_bytes_total{route=\"ws\",direction=\"client_to_upstream\"}",
        65536.0,
        Duration::from_secs(5),
        "inflated bytes in",
    )
    .await;
    gate.wait_metric(
        "wsgate_message_inflated_bytes_total{route=\"ws\",direction=\"upstream_to_client\"}",
        40_000.0,
        Duration::from_secs(5),
        "inflated bytes out",
    )
    .await;

    // Data that does not compress comes out a little larger on the wire than inflated: a
    // message of exactly the limit still passes.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let payload = deflate(&noise);
    assert!(payload.len() > 65536, "{}", payload.len());
    client
        .write_all(&frame(0x80 | 0x40 | 0x2, &payload, true))
        .await
        .unwrap();
    // A frame larger than a read goes on as fragments, with the same payload.
    let mut got = Vec::new();
    loop {
        let f = support::wire::read_frame(&mut up)
            .await
            .expect("the message");
        assert!(matches!(f.opcode, 0x2 | 0x0), "opcode {}", f.opcode);
        got.extend_from_slice(&f.payload);
        if f.fin {
            break;
        }
    }
    assert!(got == payload, "the payload changed on the way");

    // One byte over the limit, inflated: 1009, though it is a few hundred bytes on the wire.
    let over = format!("{text}y");
    client
        .write_all(&frame(0x80 | 0x40 | 0x1, &deflate(over.as_bytes()), true))
        .await
        .unwrap();
    assert_eq!(close_code(&mut client).await, 1009);
    assert_eq!(upstream_close_code(&mut up).await, 1001);
}

/// A compressed message that arrives over several reads and inflates past the limit only
/// in a later one: the sender gets 1009 and the other side, which was passed the message's
/// first reads as fragments of their own, still gets its 1001 close frame (not a FIN in
/// the middle of a frame, which its library reports as 1006). Both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_found_over_the_limit_in_a_later_read_leaves_the_other_side_its_close() {
    // 90,000 bytes that barely compress, then 50,000 that vanish: about 90 KB on the wire
    // (under the 100,000-byte limit), 140,000 inflated (over it, from the third read on).
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut plain: Vec<u8> = (0..90_000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            b'a' + (seed % 26) as u8
        })
        .collect();
    plain.extend_from_slice(&[b'x'; 50_000]);
    let compressed = deflate(&plain);
    assert!(
        (40_000..100_000).contains(&compressed.len()),
        "{}",
        compressed.len()
    );
    for from_client in [true, false] {
        let (url, upstream) = raw_deflate_upstream("permessage-deflate").await;
        let policy = open_policy(&url, "    messages: {max_message_bytes: 100000}\n");
        let gate = TestGate::start_with(&policy, false).await;
        let (mut client, head) = raw_deflate_client(gate.addr, "permessage-deflate").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let (_, mut up) = upstream.await.unwrap();
        let wire = frame(0x80 | 0x40 | 0x1, &compressed, from_client);
        let sender = if from_client { &mut client } else { &mut up };
        // In three writes apart, so that the gate reads it in three or more pieces.
        for piece in wire.chunks(wire.len().div_ceil(3)) {
            sender.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (to_client, to_upstream) = if from_client {
            (1009, 1001)
        } else {
            (1001, 1009)
        };
        assert_eq!(
            close_code(&mut client).await,
            to_client,
            "from client {from_client}"
        );
        assert_eq!(
            upstream_close_code(&mut up).await,
            to_upstream,
            "from client {from_client}"
        );
    }
}

/// What the gate cannot inflate or read: invalid deflate data 1007, compressed text that
/// inflates to invalid UTF-8 1007, RSV1 on a control or continuation frame 1002, and RSV1
/// where no extension was agreed 1002; the upstream gets 1001 each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_inflated_or_has_rsv1_where_it_means_nothing_is_refused() {
    let bad_utf8 = deflate(&[b'a', 0xFF, b'b']);
    let cases: Vec<(&str, &'static str, Vec<u8>, u16)> = vec![
        (
            "invalid deflate",
            "permessage-deflate",
            frame(0xC2, &[0xFF, 0xFF, 0xFF], true),
            1007,
        ),
        (
            // Each `03 00` an empty final block: 2 bytes, a restart, nothing inflated.
            "a message of 65 deflate streams",
            "permessage-deflate",
            frame(0xC2, &[[0x03, 0x00].repeat(65), vec![0x00]].concat(), true),
            1007,
        ),
        (
            "invalid UTF-8 inflated",
            "permessage-deflate",
            frame(0xC1, &bad_utf8, true),
            1007,
        ),
        (
            "compressed ping",
            "permessage-deflate",
            frame(0xC9, b"", true),
            1002,
        ),
        (
            "compressed continuation",
            "permessage-deflate",
            [frame(0x41, &deflate(b"ab"), true), frame(0xC0, b"", true)].concat(),
            1002,
        ),
        (
            "RSV1 without the extension",
            "",
            frame(0xC1, &deflate(b"hi"), true),
            1002,
        ),
    ];
    for (what, answer, bytes, code) in cases {
        let (url, upstream) = raw_deflate_upstream(answer).await;
        let gate = TestGate::start_with(&open_policy(&url, ""), false).await;
        let (mut client, head) = raw_deflate_client(gate.addr, "permessage-deflate").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{what}: {head}");
        let (_, mut up) = upstream.await.unwrap();
        client.write_all(&bytes).await.unwrap();
        assert_eq!(close_code(&mut client).await, code, "{what}");
        assert_eq!(upstream_close_code(&mut up).await, 1001, "{what}");
    }
}

/// An upstream answer that no offer allowed is a 502 `upstream_unavailable`: a parameter
/// the client did not offer, a window wider than the client asked for, another extension.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_no_offer_allowed_is_502() {
    for (offer, answer) in [
        (
            "permessage-deflate",
            "permessage-deflate; client_max_window_bits=10",
        ),
        (
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=12",
        ),
        (
            "permessage-deflate; server_no_context_takeover",
            "permessage-deflate",
        ),
        ("permessage-deflate", "x-webkit-deflate-frame"),
        ("x-webkit-deflate-frame", "x-webkit-deflate-frame"),
    ] {
        let (url, _upstream) = raw_deflate_upstream(answer).await;
        let gate = TestGate::start_with(&open_policy(&url, ""), false).await;
        let (mut client, head) = raw_deflate_client(gate.addr, offer).await;
        assert!(
            head.starts_with("HTTP/1.1 502"),
            "{offer} / {answer}: {head}"
        );
        let mut body = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut body)).await;
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("\"upstream_unavailable\""),
            "{offer} / {answer}: {body}"
        );
    }
}

/// An answer that leaves out the `server_max_window_bits` the client offered (aiohttp
/// answers `server_max_window_bits=15` so) is taken and goes to the client as it came;
/// the upstream may then compress with a 15-bit window, which the gate inflates: a
/// message that refers back 12,000 bytes reaches the client whole, not a 1007.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_leaving_out_the_offered_server_window_is_taken() {
    let (url, upstream) = raw_deflate_upstream("permessage-deflate").await;
    let gate = TestGate::start_with(&open_policy(&url, ""), false).await;
    let offer = "permessage-deflate; server_max_window_bits=10";
    let (mut client, head) = raw_deflate_client(gate.addr, offer).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-extensions: permessage-deflate\r\n"),
        "{head}"
    );
    let (_, mut up) = upstream.await.unwrap();
    let mut text: Vec<u8> = (0u32..12_000)
        .map(|i| b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8 % 26)
        .collect();
    text.extend_from_slice(&text.clone());
    let payload = deflate(&text);
    up.write_all(&frame(0x80 | 0x40 | 0x1, &payload, false))
        .await
        .unwrap();
    // One frame, or one fragment per read of the gate's if it came in several.
    let message = async {
        let mut opcodes = Vec::new();
        let mut received = Vec::new();
        loop {
            let frame = support::wire::read_frame(&mut client).await?;
            opcodes.push(frame.opcode);
            received.extend_from_slice(&frame.payload);
            if frame.fin {
                return Some((opcodes[0], received));
            }
        }
    };
    let received = tokio::time::timeout(Duration::from_secs(5), message)
        .await
        .expect("no message in time");
    assert_eq!(
        received,
        Some((0x1, payload)),
        "the message did not pass whole"
    );
}

/// The gate's own frames are never compressed: its pings on a compressed connection have
/// no RSV1 bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gates_own_frames_are_never_compressed() {
    let (url, upstream) = raw_deflate_upstream("permessage-deflate").await;
    let policy = open_policy(
        &url,
        "    heartbeat: {interval_seconds: 0.2, timeout_seconds: 5}\n",
    );
    let gate = TestGate::start_with(&policy, false).await;
    let (mut client, _) = raw_deflate_client(gate.addr, "permessage-deflate").await;
    let (_, _up) = upstream.await.unwrap();
    let mut first = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut first))
        .await
        .expect("a ping in time")
        .unwrap();
    assert_eq!(first[0], 0x89, "a ping, FIN set, no RSV bit");
}

/// Messages compressed without context takeover and sent again byte for byte, as a
/// broadcasting server sends them (the gate checks such a message once and then
/// recognises it): each still passes unchanged and is counted at its inflated size, and
/// bytes that were good as a binary message are still refused as text (1007 to the
/// upstream that sent them, 1014 to the client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_compressed_messages_pass_and_are_still_judged_by_their_kind() {
    let (url, upstream) = raw_deflate_upstream(
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    )
    .await;
    let policy = open_policy(&url, "    messages: {max_message_bytes: 65536}\n");
    let gate = TestGate::start_with(&policy, false).await;
    let (mut client, head) = raw_deflate_client(
        gate.addr,
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (_, mut up) = upstream.await.unwrap();

    let text = "{\"symbol\":\"NVDA\",\"price\":131.5,\"note\":\"ÅÄÖ\"}".repeat(400);
    let payload = deflate(text.as_bytes());
    let not_utf8 = deflate(&[0xFF, 0xFE, 0x80].repeat(100));
    for round in 0..3 {
        let sent = frame(0x80 | 0x40 | 0x1, &payload, true);
        client.write_all(&sent).await.unwrap();
        let mut got = vec![0u8; sent.len()];
        up.read_exact(&mut got).await.unwrap();
        assert_eq!(got, sent, "round {round}, client to upstream");
        let sent = frame(0x80 | 0x40 | 0x1, &payload, false);
        up.write_all(&sent).await.unwrap();
        let mut got = vec![0u8; sent.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, sent, "round {round}, upstream to client");
    }
    // Good as binary, both ways.
    let sent = frame(0x80 | 0x40 | 0x2, &not_utf8, true);
    client.write_all(&sent).await.unwrap();
    let mut got = vec![0u8; sent.len()];
    up.read_exact(&mut got).await.unwrap();
    assert_eq!(got, sent);
    let inflated = 3.0 * text.len() as f64 + 300.0;
    gate.wait_metric(
        "wsgate_message_inflated_bytes_total{route=\"ws\",direction=\"client_to_upstream\"}",
        inflated,
        Duration::from_secs(5),
        "inflated bytes in",
    )
    .await;
    gate.wait_metric(
        "wsgate_message_inflated_bytes_total{route=\"ws\",direction=\"upstream_to_client\"}",
        3.0 * text.len() as f64,
        Duration::from_secs(5),
        "inflated bytes out",
    )
    .await;
    // The same bytes as text from the upstream: not UTF-8.
    up.write_all(&frame(0x80 | 0x40 | 0x1, &not_utf8, false))
        .await
        .unwrap();
    assert_eq!(upstream_close_code(&mut up).await, 1007);
    // The upstream broke the protocol: the client is told its upstream failed.
    assert_eq!(close_code(&mut client).await, 1014);
}
