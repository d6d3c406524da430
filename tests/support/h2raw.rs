//! HTTP/2 on the wire, for tests that must send what no client library would: frames built
//! by hand (the 9-byte header and a payload, RFC 9113 §4.1), header blocks encoded by hand
//! (RFC 7541: indexed fields and literals, no Huffman), over h2c with prior knowledge or
//! TLS with ALPN `h2`, and the gate's frames read back raw.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;

use super::DEADLINE;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types (RFC 9113 §6).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

// Flags.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

// Settings.
pub const HEADER_TABLE_SIZE: u16 = 0x1;
pub const INITIAL_WINDOW_SIZE: u16 = 0x4;

// Error codes (RFC 9113 §7).
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Either side of a raw connection: TCP, or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Conn = Box<dyn Io>;

/// One frame: its 9-byte header (length, type, flags, stream) and the payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    assert!(len < 1 << 24, "a frame's length has 24 bits");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn settings(values: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = values
        .iter()
        .flat_map(|(id, value)| {
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(&value.to_be_bytes());
            p
        })
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

pub fn settings_ack() -> Vec<u8> {
    frame(SETTINGS, ACK, 0, &[])
}

pub fn ping(data: [u8; 8]) -> Vec<u8> {
    frame(PING, 0, 0, &data)
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

// ---------------------------------------------------------------------------------------
// HPACK (RFC 7541), encoding only the representations the tests need.

/// An integer with an `n`-bit prefix; `first` holds the representation's leading bits.
pub fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A string literal, not Huffman-coded.
pub fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// An indexed header field (§6.1): entry `index` of the static or dynamic table.
pub fn indexed(out: &mut Vec<u8>, index: usize) {
    hpack_int(out, 0x80, 7, index);
}

/// A literal header field with incremental indexing and a new name (§6.2.1): added to the
/// decoder's dynamic table as entry 62 (the newest).
pub fn literal_indexing(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x40);
    hpack_str(out, name.as_bytes());
    hpack_str(out, value);
}

/// A literal header field without indexing (§6.2.2), its name the static table's entry
/// `name_index`, or a new name when `name_index` is 0.
pub fn literal(out: &mut Vec<u8>, name_index: usize, name: &str, value: &[u8]) {
    hpack_int(out, 0x00, 4, name_index);
    if name_index == 0 {
        hpack_str(out, name.as_bytes());
    }
    hpack_str(out, value);
}

// Static table entries (RFC 7541 Appendix A).
const AUTHORITY: usize = 1;
const METHOD_GET: usize = 2;
const PATH: usize = 4;
const SCHEME_HTTP: usize = 6;
const SCHEME_HTTPS: usize = 7;

/// The pseudo-header fields of a request, `method` given as a literal value (or `GET`).
fn pseudo(out: &mut Vec<u8>, method: &str, tls: bool, authority: &str, path: &str) {
    match method {
        "GET" => indexed(out, METHOD_GET),
        other => literal(out, METHOD_GET, "", other.as_bytes()),
    }
    indexed(out, if tls { SCHEME_HTTPS } else { SCHEME_HTTP });
    literal(out, AUTHORITY, "", authority.as_bytes());
    literal(out, PATH, "", path.as_bytes());
}

/// The header block of an RFC 8441 extended CONNECT for a WebSocket on `path`.
pub fn connect_block(tls: bool, authority: &str, path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    pseudo(&mut out, "CONNECT", tls, authority, path);
    literal(&mut out, 0, ":protocol", b"websocket");
    literal(&mut out, 0, "sec-websocket-version", b"13");
    out
}

/// The header block of a GET for `path`.
pub fn get_block(tls: bool, authority: &str, path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    pseudo(&mut out, "GET", tls, authority, path);
    out
}

/// The header block of a POST for `path`, with its body's length.
pub fn post_block(tls: bool, authority: &str, path: &str, length: usize) -> Vec<u8> {
    let mut out = Vec::new();
    pseudo(&mut out, "POST", tls, authority, path);
    literal(&mut out, 0, "content-length", length.to_string().as_bytes());
    out
}

/// `:status` of a response header block: its first field, as the gate's encoder writes it
/// to a client that set `SETTINGS_HEADER_TABLE_SIZE` to 0 (so never from the dynamic
/// table): an indexed static entry, or a literal whose name is `:status` and whose value
/// is plain or Huffman-coded digits.
pub fn status(block: &[u8]) -> Option<u16> {
    let mut at = 0;
    // Dynamic table size updates (001xxxxx) may come first.
    while block.get(at)? & 0xe0 == 0x20 {
        read_int(block, &mut at, 5)?;
    }
    let first = *block.get(at)?;
    if first & 0x80 != 0 {
        return match read_int(block, &mut at, 7)? {
            8 => Some(200),
            9 => Some(204),
            10 => Some(206),
            11 => Some(304),
            12 => Some(400),
            13 => Some(404),
            14 => Some(500),
            _ => None,
        };
    }
    // A literal with an indexed name: 01xxxxxx, 0000xxxx or 0001xxxx; `:status` is 8..=14.
    let name = match first & 0x40 {
        0 => read_int(block, &mut at, 4)?,
        _ => read_int(block, &mut at, 6)?,
    };
    if !(8..=14).contains(&name) {
        return None;
    }
    let huffman = block.get(at)? & 0x80 != 0;
    let len = read_int(block, &mut at, 7)?;
    let value = block.get(at..at + len)?;
    let digits = match huffman {
        false => value.to_vec(),
        true => huffman_digits(value)?,
    };
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// An integer with an `n`-bit prefix at `block[*at]`, `*at` moved past it.
fn read_int(block: &[u8], at: &mut usize, n: u32) -> Option<usize> {
    let max = (1usize << n) - 1;
    let mut value = usize::from(*block.get(*at)?) & max;
    *at += 1;
    if value < max {
        return Some(value);
    }
    let mut shift = 0;
    loop {
        let b = *block.get(*at)?;
        *at += 1;
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// Huffman-coded digits (RFC 7541 Appendix B: `0`-`2` in 5 bits, `3`-`9` in 6).
fn huffman_digits(coded: &[u8]) -> Option<Vec<u8>> {
    const CODES: [(u32, u32); 10] = [
        (0b00000, 5),
        (0b00001, 5),
        (0b00010, 5),
        (0b011001, 6),
        (0b011010, 6),
        (0b011011, 6),
        (0b011100, 6),
        (0b011101, 6),
        (0b011110, 6),
        (0b011111, 6),
    ];
    let bits: Vec<u32> = coded
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| u32::from((b >> i) & 1)))
        .collect();
    let mut out = Vec::new();
    let mut at = 0;
    'next: while at < bits.len() {
        for (digit, (code, len)) in CODES.iter().enumerate() {
            let len = *len as usize;
            if at + len <= bits.len() {
                let v = bits[at..at + len].iter().fold(0, |v, b| v << 1 | b);
                if v == *code {
                    out.push(b'0' + digit as u8);
                    at += len;
                    continue 'next;
                }
            }
        }
        // Padding: fewer than 8 bits, all ones (the start of EOS).
        return (bits.len() - at < 8 && bits[at..].iter().all(|b| *b == 1)).then_some(out);
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------
// Connections and reading

/// A raw HTTP/2 connection to `addr`: over TLS with ALPN `h2` (asserted) when `tls` is
/// given, else h2c with prior knowledge. The preface and a SETTINGS frame asking for no
/// dynamic table (so that responses can be read without one) are sent.
pub async fn connect(addr: SocketAddr, tls: Option<&Arc<rustls::ClientConfig>>) -> Conn {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut conn: Conn = match tls {
        Some(config) => {
            let mut config = (**config).clone();
            config.alpn_protocols = vec![b"h2".to_vec()];
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tls = connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            Box::new(tls)
        }
        None => Box::new(tcp),
    };
    let mut opening = PREFACE.to_vec();
    opening.extend(settings(&[(HEADER_TABLE_SIZE, 0)]));
    conn.write_all(&opening).await.unwrap();
    conn
}

/// A frame from the gate.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A GOAWAY's error code, or a RST_STREAM's.
    pub fn code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }

    /// A GOAWAY's debug data.
    pub fn debug(&self) -> String {
        String::from_utf8_lossy(self.payload.get(8..).unwrap_or_default()).into_owned()
    }
}

/// The next frame; an error at EOF or a reset.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> io::Result<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
        payload,
    })
}

/// How the gate ended a connection, as far as `until_closed` saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The first GOAWAY's error code and debug data, if one came.
    pub goaway: Option<(u32, String)>,
    /// Whether the connection ended (EOF or a reset) within the time given.
    pub ended: bool,
}

/// Read (and discard) frames until the gate closes the connection, for at most `within`.
pub async fn until_closed<R: AsyncRead + Unpin + ?Sized>(r: &mut R, within: Duration) -> Closed {
    let deadline = tokio::time::Instant::now() + within;
    let mut goaway = None;
    loop {
        match tokio::time::timeout_at(deadline, read_frame(r)).await {
            Ok(Ok(f)) => {
                if f.kind == GOAWAY && goaway.is_none() {
                    goaway = Some((f.code(), f.debug()));
                }
            }
            Ok(Err(_)) => {
                return Closed {
                    goaway,
                    ended: true,
                }
            }
            Err(_) => {
                return Closed {
                    goaway,
                    ended: false,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Floods

/// Write `chunk` over and over until `total` bytes are written, the gate stops reading
/// (a write makes no progress for a second: `stalled`), or the connection ends.
pub async fn flood<W: AsyncWrite + Unpin>(wr: &mut W, chunk: &[u8], total: usize) -> Flooded {
    let started = Instant::now();
    let mut written = 0;
    while written < total {
        match tokio::time::timeout(Duration::from_secs(1), wr.write_all(chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            Ok(Err(_)) => {
                return Flooded {
                    written,
                    end: FloodEnd::Closed,
                    took: started.elapsed(),
                    at: Instant::now(),
                }
            }
            Err(_) => {
                return Flooded {
                    written,
                    end: FloodEnd::Stalled,
                    took: started.elapsed() - Duration::from_secs(1),
                    at: Instant::now(),
                }
            }
        }
    }
    Flooded {
        written,
        end: FloodEnd::AllWritten,
        took: started.elapsed(),
        at: Instant::now(),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum FloodEnd {
    AllWritten,
    Stalled,
    Closed,
}

#[derive(Debug)]
pub struct Flooded {
    pub written: usize,
    pub end: FloodEnd,
    /// From the first write to the last that made progress.
    pub took: Duration,
    /// When the flood ended.
    pub at: Instant,
}

pub const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// The gate's frames, read by a task

/// Read and discard whatever comes until EOF or a reset (true), for at most `within`.
pub async fn to_end<R: AsyncRead + Unpin>(rd: &mut R, within: Duration) -> bool {
    let mut sink = vec![0u8; 256 * 1024];
    let drain = async { while let Ok(1..) = rd.read(&mut sink).await {} };
    tokio::time::timeout(within, drain).await.is_ok()
}

/// The gate's frames on a raw connection, read by a task as they come; the channel ends
/// with the connection.
pub fn frames(mut rd: ReadHalf<Conn>) -> UnboundedReceiver<Frame> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(f) = read_frame(&mut rd).await {
            if tx.send(f).is_err() {
                break;
            }
        }
    });
    rx
}

/// A raw connection past its opening: the gate's SETTINGS read (and returned) and
/// acknowledged; its frames as [`frames`] gives them, and the side to write on.
pub async fn opened(
    addr: SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> (UnboundedReceiver<Frame>, WriteHalf<Conn>, Frame) {
    let (rd, mut wr) = tokio::io::split(connect(addr, tls).await);
    let mut rx = frames(rd);
    let settings = next_frame(&mut rx, DEADLINE, |f| {
        f.kind == SETTINGS && f.flags & ACK == 0
    })
    .await
    .expect("the gate's SETTINGS");
    wr.write_all(&settings_ack()).await.unwrap();
    (rx, wr, settings)
}

/// The next frame `keep` accepts, skipping the others; `None` at EOF or after `within`.
pub async fn next_frame(
    rx: &mut UnboundedReceiver<Frame>,
    within: Duration,
    keep: impl Fn(&Frame) -> bool,
) -> Option<Frame> {
    let wait = async {
        while let Some(f) = rx.recv().await {
            if keep(&f) {
                return Some(f);
            }
        }
        None
    };
    tokio::time::timeout(within, wait).await.ok().flatten()
}

/// The response to `stream`: its status, or the code of the RST_STREAM or GOAWAY that came
/// instead.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Status(u16),
    Reset(u32),
    GoAway(u32, String),
    Nothing,
}

pub async fn answer(rx: &mut UnboundedReceiver<Frame>, stream: u32) -> Answer {
    let f = next_frame(rx, DEADLINE, |f| {
        f.kind == GOAWAY || (f.stream == stream && matches!(f.kind, HEADERS | RST_STREAM))
    })
    .await;
    match f {
        Some(f) if f.kind == HEADERS => Answer::Status(status(&f.payload).expect("a :status")),
        Some(f) if f.kind == RST_STREAM => Answer::Reset(f.code()),
        Some(f) => Answer::GoAway(f.code(), f.debug()),
        None => Answer::Nothing,
    }
}

/// Wait for the connection to end after a GOAWAY (or without one).
pub async fn closed_after(rx: &mut UnboundedReceiver<Frame>, within: Duration) -> Closed {
    let deadline = tokio::time::Instant::now() + within;
    let mut goaway = None;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(f)) if f.kind == GOAWAY && goaway.is_none() => {
                goaway = Some((f.code(), f.debug()))
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return Closed {
                    goaway,
                    ended: true,
                }
            }
            Err(_) => {
                return Closed {
                    goaway,
                    ended: false,
                }
            }
        }
    }
}

/// The first HEADERS or RST_STREAM for each of `streams`, whatever their order.
pub async fn answers(rx: &mut UnboundedReceiver<Frame>, streams: &[u32]) -> Vec<Answer> {
    let mut got: Vec<Option<Answer>> = streams.iter().map(|_| None).collect();
    while got.iter().any(Option::is_none) {
        let f = next_frame(rx, DEADLINE, |f| {
            matches!(f.kind, HEADERS | RST_STREAM | GOAWAY)
        })
        .await
        .unwrap_or_else(|| panic!("no answer for all of {streams:?}: {got:?}"));
        let answer = match f.kind {
            HEADERS => Answer::Status(status(&f.payload).expect("a :status")),
            RST_STREAM => Answer::Reset(f.code()),
            _ => panic!("GOAWAY {}: {}", f.code(), f.debug()),
        };
        if let Some(i) = streams.iter().position(|s| *s == f.stream) {
            got[i].get_or_insert(answer);
        }
    }
    got.into_iter().flatten().collect()
}

/// Send a text message on each WebSocket stream and read its echo back.
pub async fn echo_streams(
    wr: &mut WriteHalf<Conn>,
    rx: &mut UnboundedReceiver<Frame>,
    streams: &[u32],
) {
    for s in streams {
        let ws = super::wire::frame(0x81, format!("echo {s}").as_bytes(), true);
        wr.write_all(&frame(DATA, 0, *s, &ws)).await.unwrap();
    }
    let mut received: Vec<Vec<u8>> = streams.iter().map(|_| Vec::new()).collect();
    let complete = |b: &Vec<u8>| b.len() >= 2 && b.len() >= 2 + usize::from(b[1] & 0x7f);
    while !received.iter().all(complete) {
        let f = next_frame(rx, DEADLINE, |f| f.kind == DATA)
            .await
            .expect("an echo on every stream");
        if let Some(i) = streams.iter().position(|s| *s == f.stream) {
            received[i].extend_from_slice(&f.payload);
        }
    }
    for (s, got) in streams.iter().zip(received) {
        assert_eq!(got[0], 0x81, "stream {s}: {got:?}");
        assert_eq!(&got[2..], format!("echo {s}").as_bytes());
    }
}
