//! WebSocket on the wire, for tests that must send what no client library would: client
//! frames built byte by byte (masked or not, any opcode and length), the gate's frames
//! read back raw, and upgrades over bare TCP.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw socket upgraded on /ws at `addr` (no token, no Origin).
pub async fn upgrade_raw_at(addr: SocketAddr) -> TcpStream {
    upgrade_raw_path(addr, "/ws").await
}

/// A raw socket upgraded on `path` at `addr` (no token, no Origin).
pub async fn upgrade_raw_path(addr: SocketAddr, path: &str) -> TcpStream {
    let mut tcp = send_upgrade(addr, path, "").await;
    let head = read_head(&mut tcp).await.expect("no response head");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// An upgrade request for `path` with the `extra` header lines (each ending in CRLF).
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// A raw socket to `addr` that has sent [`upgrade_request`]; its answer is left unread.
pub async fn send_upgrade(addr: SocketAddr, path: &str, extra: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(upgrade_request(path, extra).as_bytes())
        .await
        .unwrap();
    tcp
}

/// An HTTP head read byte by byte, so that no bytes after it are consumed.
pub async fn read_head(tcp: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.ok()?;
        head.push(b[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// One client frame: `first` is FIN/RSV/opcode; masked unless `masked` is false.
pub fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12u8, 0x34, 0x56, 0x78];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// `n` masked control frames with `opcode` (0x89 ping, 0x8A pong), numbered payloads.
pub fn control_frames(opcode: u8, n: u32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| frame(opcode, &i.to_be_bytes(), true))
        .collect()
}

/// The next frame the gate sends (unmasked, server to client): opcode and payload.
pub async fn server_frame<R: AsyncRead + Unpin>(tcp: &mut R) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    tcp.read_exact(&mut h)
        .await
        .expect("the gate dropped TCP without a close frame");
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            tcp.read_exact(&mut l).await.unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            tcp.read_exact(&mut l).await.unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.unwrap();
    (h[0] & 0x0f, payload)
}

/// The code of the next close frame the gate sends.
pub async fn close_code(tcp: &mut TcpStream) -> u16 {
    let read = async {
        loop {
            if let (0x8, payload) = server_frame(tcp).await {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("no close frame in time")
}

/// Reads server frames until a close; returns (pongs seen, close code, close reason).
pub async fn pongs_until_close<R: AsyncRead + Unpin>(tcp: &mut R) -> (usize, u16, String) {
    let read = async {
        let mut pongs = 0;
        loop {
            match server_frame(tcp).await {
                (0xA, _) => pongs += 1,
                (0x8, payload) => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
                    return (pongs, code, reason);
                }
                (op, _) => panic!("unexpected opcode {op:#x}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("no close frame in time")
}

/// The `Sec-WebSocket-Accept` value that answers the request `head` (its key's, or an empty
/// key's when it has none).
pub fn accept_value(head: &str) -> String {
    let key = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes())
}

/// Accept one upgrade on `listener` as a raw upstream: answer its handshake with a 101
/// and return the socket, at the first frame.
pub async fn accept_upgrade(listener: &tokio::net::TcpListener) -> TcpStream {
    let (mut tcp, _) = listener.accept().await.unwrap();
    let head = read_head(&mut tcp).await.unwrap();
    let accept = accept_value(&head);
    let head = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp
}

/// A frame as read off the wire, its payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireFrame {
    pub fin: bool,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

/// The next frame on `tcp`, from either side; `None` at the end of the stream.
pub async fn read_frame<R: AsyncRead + Unpin>(tcp: &mut R) -> Option<WireFrame> {
    let mut h = [0u8; 2];
    tcp.read_exact(&mut h).await.ok()?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            tcp.read_exact(&mut l).await.ok()?;
            u64::from(u16::from_be_bytes(l))
        }
        127 => {
            let mut l = [0u8; 8];
            tcp.read_exact(&mut l).await.ok()?;
            u64::from_be_bytes(l)
        }
        n => u64::from(n),
    };
    let masked = h[1] & 0x80 != 0;
    let mut key = [0u8; 4];
    if masked {
        tcp.read_exact(&mut key).await.ok()?;
    }
    let mut payload = vec![0u8; len as usize];
    tcp.read_exact(&mut payload).await.ok()?;
    if masked {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= key[i % 4]);
    }
    Some(WireFrame {
        fin: h[0] & 0x80 != 0,
        opcode: h[0] & 0x0f,
        masked,
        payload,
    })
}
