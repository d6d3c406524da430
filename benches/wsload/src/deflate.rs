//! permessage-deflate (RFC 7692) for the compressed rows: the JSON-like messages and their
//! compressed frames, the reflecting echo upstream (`serve --deflate`), and the client's
//! side of `echo --deflate` and `hold --deflate`.
//!
//! tungstenite refuses frames with RSV1 set, so both ends speak frames by hand over a
//! small codec. Both legs negotiate no context takeover: every message is a deflate stream
//! of its own, which the upstream sends back as it came (RSV1 and payload unchanged,
//! unmasked) without inflating it. The upstream then costs the same behind every target,
//! and what the load measures is the relay.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::basic::Tally;
use crate::dial::{Dialer, Io};
use crate::measure::{
    client_frame, close_frame, count, latency, read_some, record, timed, write_all, Rng,
};
use crate::Target;

/// The client's offer: no context takeover either way, so that each message stands alone.
const OFFER: &str = "permessage-deflate; client_no_context_takeover; server_no_context_takeover";
/// The upstream's answer to an offer it can honour (RFC 7692 7.1.1.1 and 7.1.1.2 let a
/// server add both parameters unasked).
const ACCEPT: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// What a sync flush ends with, and what a compressed message leaves out (RFC 7692 7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// The largest message the client reads back.
const MAX_MESSAGE: u64 = 64 << 20;
/// The largest request or response head either side reads.
const MAX_HEAD: usize = 16 * 1024;
/// How many distinct messages a load sends in turn, unless told otherwise.
pub(crate) const DISTINCT: usize = 8;
/// The largest frame the upstream takes (each is buffered whole), as tungstenite's.
const MAX_FRAME: u64 = 64 << 20;
/// The upstream sends what it has once this much is waiting.
const WRITE_CHUNK: usize = 64 * 1024;

// A frame's first byte: FIN, RSV1, the opcodes.
const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

// ----- the messages --------------------------------------------------------------------

/// One message of a compressed load: its text, its payload on the wire, and the whole
/// masked frame that carries it (compressed and masked once, before the load starts).
pub(crate) struct Message {
    text: Vec<u8>,
    wire: Vec<u8>,
    frame: Vec<u8>,
}

/// `distinct` JSON-like texts of `size` bytes, compressed; each checked to inflate back.
pub(crate) fn messages(size: usize, distinct: usize) -> Result<Arc<Vec<Message>>, String> {
    let mut out = Vec::with_capacity(distinct);
    for seed in 0..distinct.max(1) as u64 {
        let text = json_like(size, seed);
        let wire = deflate(&text)?;
        if inflate(&wire, size).map_err(|e| format!("deflate: {e}"))? != text {
            return Err("deflate: a message does not inflate back to itself".into());
        }
        let frame = client_frame(FIN | RSV1 | TEXT, &wire, None, true);
        out.push(Message { text, wire, frame });
    }
    Ok(Arc::new(out))
}

/// A JSON array of `size` bytes (whitespace pads it to the byte) of event-like records:
/// the same keys in every record, numbers and names that vary, a few words of free text.
/// Deflate shrinks it several times, as it does real feeds, not to almost nothing as it
/// would a run of one byte.
pub(crate) fn json_like(size: usize, seed: u64) -> Vec<u8> {
    const SYMBOLS: [&str; 8] = [
        "AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "ORCL",
    ];
    const STATUS: [&str; 4] = ["new", "filled", "partial", "cancelled"];
    const WORDS: [&str; 16] = [
        "order", "venue", "retry", "limit", "market", "client", "book", "depth", "quote", "spread",
        "auction", "close", "open", "route", "hedge", "sweep",
    ];
    let mut rng = Rng::new(seed + 1);
    let mut id = 1_000_000 + rng.below(1_000_000);
    let mut ts = 1_718_000_000_000 + rng.below(1_000_000_000);
    let mut out = Vec::with_capacity(size);
    out.push(b'[');
    loop {
        id += 1 + rng.below(9);
        ts += rng.below(400);
        let note: Vec<&str> = (0..2 + rng.below(5))
            .map(|_| WORDS[rng.below(WORDS.len())])
            .collect();
        let record = format!(
            concat!(
                r#"{{"id":{},"ts":{},"user":"user-{:05}","symbol":"{}","side":"{}","#,
                r#""price":{}.{:02},"qty":{},"status":"{}","note":"{}"}}"#
            ),
            id,
            ts,
            rng.below(100_000),
            SYMBOLS[rng.below(SYMBOLS.len())],
            if rng.chance(0.5) { "buy" } else { "sell" },
            10 + rng.below(990),
            rng.below(100),
            1 + rng.below(5000),
            STATUS[rng.below(STATUS.len())],
            note.join(" "),
        );
        // A comma, the record and the closing bracket must fit.
        if out.len() + record.len() + 2 > size {
            break;
        }
        if out.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(record.as_bytes());
    }
    out.resize(size.saturating_sub(1).max(out.len()), b' ');
    out.push(b']');
    out.truncate(size);
    out
}

/// `text` as one permessage-deflate payload: a raw deflate stream, sync-flushed, without
/// its final 00 00 ff ff.
pub(crate) fn deflate(text: &[u8]) -> Result<Vec<u8>, String> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(text.len() + 64);
    loop {
        let consumed = c.total_in() as usize;
        c.compress_vec(&text[consumed..], &mut out, FlushCompress::Sync)
            .map_err(|e| format!("deflate: {e}"))?;
        // Room left over after a sync flush means the flush is complete.
        if c.total_in() as usize == text.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    if !out.ends_with(&TAIL) {
        return Err("deflate: a sync flush that does not end in 00 00 ff ff".into());
    }
    out.truncate(out.len() - TAIL.len());
    Ok(out)
}

/// A permessage-deflate payload inflated (its 00 00 ff ff put back), up to `limit` bytes.
pub(crate) fn inflate(wire: &[u8], limit: usize) -> Result<Vec<u8>, &'static str> {
    let input = [wire, &TAIL].concat();
    let mut d = Decompress::new(false);
    let mut out = Vec::with_capacity(limit.min(wire.len().saturating_mul(8)) + 64);
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.len().max(4096));
        }
        let (consumed, produced) = (d.total_in(), out.len());
        let status = d
            .decompress_vec(&input[consumed as usize..], &mut out, FlushDecompress::Sync)
            .map_err(|_| "inflate")?;
        if out.len() > limit {
            return Err("inflate_too_large");
        }
        let all_in = d.total_in() as usize == input.len();
        if status == Status::StreamEnd || (all_in && out.len() < out.capacity()) {
            return Ok(out);
        }
        if d.total_in() == consumed && out.len() == produced {
            return Err("inflate");
        }
    }
}

// ----- frames ----------------------------------------------------------------------------

/// A frame header: the first byte (FIN, RSV, opcode), the mask key if any, the payload
/// length, and the header's own length.
#[derive(Clone, Copy)]
struct Head {
    first: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    size: usize,
}

impl Head {
    /// The header at the start of `buf`, or None while it is incomplete.
    fn parse(buf: &[u8]) -> Option<Head> {
        let (&first, &second) = (buf.first()?, buf.get(1)?);
        let (len, mut size) = match second & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
                4,
            ),
            127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
            n => (u64::from(n), 2),
        };
        let mask = if second & 0x80 != 0 {
            let key = buf.get(size..size + 4)?.try_into().ok()?;
            size += 4;
            Some(key)
        } else {
            None
        };
        Some(Head {
            first,
            mask,
            len,
            size,
        })
    }

    fn opcode(&self) -> u8 {
        self.first & 0x0f
    }

    fn is_control(&self) -> bool {
        self.opcode() & 0x8 != 0
    }
}

/// An unmasked (server-to-client) frame header.
fn put_head(out: &mut Vec<u8>, first: u8, len: u64) {
    out.push(first);
    if len < 126 {
        out.push(len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// XORs `data` with `mask`, `offset` bytes into the frame's payload; eight bytes a step.
fn unmask(data: &mut [u8], mask: [u8; 4], offset: u64) {
    let m: [u8; 4] = std::array::from_fn(|i| mask[(offset as usize + i) & 3]);
    let wide = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// A raw WebSocket connection: its stream, and the bytes read from it but not yet used
/// (`buf[start..end]`).
pub(crate) struct Conn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Conn {
    fn new(io: Box<dyn Io>, capacity: usize) -> Conn {
        Conn {
            io,
            buf: vec![0; capacity.max(64)],
            start: 0,
            end: 0,
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more. Unused bytes move to the front first; a buffer full of them doubles.
    async fn fill(&mut self) -> Result<(), &'static str> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        match read_some(&mut self.io, &mut self.buf[self.end..]).await {
            Ok(0) => Err("closed"),
            Ok(n) => {
                self.end += n;
                Ok(())
            }
            Err(_) => Err("read"),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        write_all(&mut self.io, bytes).await.map_err(|_| "send")
    }

    /// A request or response head, through its blank line, as text.
    async fn head(&mut self) -> Result<String, &'static str> {
        loop {
            if let Some(at) = self.buffered().windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buffered()[..at]).into_owned();
                self.start += at + 4;
                return Ok(head);
            }
            if self.end - self.start > MAX_HEAD {
                return Err("head_too_large");
            }
            self.fill().await?;
        }
    }

    async fn frame_head(&mut self) -> Result<Head, &'static str> {
        loop {
            if let Some(head) = Head::parse(self.buffered()) {
                self.start += head.size;
                return Ok(head);
            }
            self.fill().await?;
        }
    }

    /// The next `n` bytes, appended to `out` as they are (masked or not).
    async fn payload(&mut self, mut n: u64, out: &mut Vec<u8>) -> Result<(), &'static str> {
        while n > 0 {
            if self.start == self.end {
                self.fill().await?;
            }
            let take = (self.end - self.start).min(usize::try_from(n).unwrap_or(usize::MAX));
            out.extend_from_slice(&self.buf[self.start..self.start + take]);
            self.start += take;
            n -= take as u64;
        }
        Ok(())
    }
}

// ----- the handshake's headers --------------------------------------------------------------

/// The values of header `name` in `head`, comma-joined as HTTP lets repeated fields be.
fn header(head: &str, name: &str) -> Option<String> {
    let values: Vec<&str> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// The extensions of a `Sec-WebSocket-Extensions` value: each name with its parameters,
/// lower case, whitespace removed ("server_max_window_bits=10").
fn extensions(value: &str) -> Vec<(String, Vec<String>)> {
    value
        .split(',')
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut parts = e.split(';').map(|p| {
                p.split_whitespace()
                    .collect::<String>()
                    .to_ascii_lowercase()
            });
            let name = parts.next().unwrap_or_default();
            (name, parts.collect())
        })
        .collect()
}

/// An offer the upstream can take: it sends the client's own compressed bytes back, so it
/// cannot honour a limit on its window below the client's (`server_max_window_bits` < 15).
fn acceptable(params: &[String]) -> bool {
    params.iter().all(|p| {
        matches!(
            p.as_str(),
            "client_no_context_takeover"
                | "server_no_context_takeover"
                | "server_max_window_bits=15"
                | "client_max_window_bits"
        ) || p.starts_with("client_max_window_bits=")
    })
}

/// The client's check of the 101: permessage-deflate accepted, alone, with no context
/// takeover from the server (each echo is inflated on its own) and no parameter it did
/// not offer.
fn check_accepted(value: Option<String>) -> Result<(), &'static str> {
    let value = value.ok_or("deflate_not_accepted")?;
    let [(name, params)] = extensions(&value)
        .try_into()
        .map_err(|_| "extension_not_offered")?;
    if name != "permessage-deflate" {
        return Err("extension_not_offered");
    }
    if !params.iter().any(|p| p == "server_no_context_takeover") {
        return Err("deflate_context_takeover");
    }
    let known = |p: &String| {
        matches!(
            p.as_str(),
            "server_no_context_takeover" | "client_no_context_takeover"
        ) || p
            .strip_prefix("server_max_window_bits=")
            .and_then(|bits| bits.parse::<u8>().ok())
            .is_some_and(|bits| (8..=15).contains(&bits))
    };
    if !params.iter().all(known) {
        return Err("deflate_parameters");
    }
    Ok(())
}

// ----- the upstream: `serve --deflate` --------------------------------------------------------

/// One upstream connection: the upgrade, then frames reflected until the close.
pub(crate) async fn reflector(tcp: TcpStream) {
    let mut c = Conn::new(Box::new(tcp), 32 * 1024);
    if let Ok(deflate) = upgrade(&mut c).await {
        let _ = reflect(&mut c, deflate).await;
    }
}

/// Answers an upgrade request: 101, with permessage-deflate when one of its offers can be
/// honoured; 400 to anything else. Whether permessage-deflate was negotiated.
async fn upgrade(c: &mut Conn) -> Result<bool, &'static str> {
    let head = c.head().await?;
    let websocket = header(&head, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let key = header(&head, "sec-websocket-key").filter(|_| head.starts_with("GET ") && websocket);
    let Some(key) = key else {
        let _ = c
            .send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return Err("not_an_upgrade");
    };
    let deflate = header(&head, "sec-websocket-extensions").is_some_and(|v| {
        extensions(&v)
            .iter()
            .any(|(name, params)| name == "permessage-deflate" && acceptable(params))
    });
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n{}\r\n",
        derive_accept_key(key.as_bytes()),
        if deflate {
            format!("Sec-WebSocket-Extensions: {ACCEPT}\r\n")
        } else {
            String::new()
        }
    );
    c.send(response.as_bytes()).await?;
    Ok(deflate)
}

/// Sends every data frame back as it came (FIN, RSV1, opcode and payload; unmasked), a
/// pong for each ping and a close for the close, which ends the connection; a protocol
/// error gets a 1002 close, a frame over MAX_FRAME a 1009. Fragments are reflected one by
/// one, each once it is whole: a client that writes a large frame before it reads (as
/// tungstenite's does) is not answered while it is still writing. (Text is not checked
/// for UTF-8: compressed text cannot be without inflating it, and the client compares.)
async fn reflect(c: &mut Conn, deflate: bool) -> Result<(), &'static str> {
    let rsv_allowed = if deflate { RSV1 } else { 0 };
    // Grown by the first messages, not allocated for a connection that sends none.
    let mut out = Vec::new();
    let mut fragmented = false;
    loop {
        let whole = Head::parse(c.buffered())
            .filter(|h| h.len > MAX_FRAME || c.end - c.start >= h.size + h.len as usize);
        let Some(h) = whole else {
            // No whole frame left: send what is ready, then read.
            if !out.is_empty() {
                c.send(&out).await?;
                out.clear();
            }
            c.fill().await?;
            continue;
        };
        if h.len > MAX_FRAME {
            return refuse(c, out, 1009).await;
        }
        let Some(mask) = h.mask.filter(|_| h.first & 0x70 & !rsv_allowed == 0) else {
            return refuse(c, out, 1002).await;
        };
        let at = c.start + h.size;
        c.start = at + h.len as usize;
        let payload = &mut c.buf[at..c.start];
        unmask(payload, mask, 0);
        if h.is_control() {
            if h.len > 125 || h.first & (FIN | RSV1) != FIN {
                return refuse(c, out, 1002).await;
            }
            match h.opcode() {
                PING => {
                    put_head(&mut out, FIN | PONG, h.len);
                    out.extend_from_slice(payload);
                }
                PONG => {}
                CLOSE => {
                    let code = payload.get(..2).unwrap_or_default();
                    put_head(&mut out, FIN | CLOSE, code.len() as u64);
                    out.extend_from_slice(code);
                    return c.send(&out).await;
                }
                _ => return refuse(c, out, 1002).await,
            }
            continue;
        }
        // A message starts with text or binary, goes on with continuations, and only its
        // first frame may carry RSV1.
        let in_order = match h.opcode() {
            TEXT | BINARY => !fragmented,
            CONTINUATION => fragmented && h.first & RSV1 == 0,
            _ => false,
        };
        if !in_order {
            return refuse(c, out, 1002).await;
        }
        fragmented = h.first & FIN == 0;
        put_head(&mut out, h.first, h.len);
        out.extend_from_slice(payload);
        if out.len() >= WRITE_CHUNK {
            c.send(&out).await?;
            out.clear();
        }
    }
}

/// Ends a connection that broke the protocol (1002) or sent too large a frame (1009):
/// what was ready, then the close.
async fn refuse(c: &mut Conn, mut out: Vec<u8>, code: u16) -> Result<(), &'static str> {
    put_head(&mut out, FIN | CLOSE, 2);
    out.extend_from_slice(&code.to_be_bytes());
    c.send(&out).await?;
    Err("protocol")
}

// ----- the client: `echo --deflate`, `hold --deflate` ---------------------------------------

/// Opens the i-th connection with a permessage-deflate offer; fails unless the 101 accepts
/// it (see `check_accepted`).
pub(crate) async fn open(
    dialer: &Dialer,
    i: usize,
    read_buffer: usize,
) -> Result<Conn, &'static str> {
    let mut c = Conn::new(dialer.stream(i).await?, read_buffer);
    let mut extra = format!("Sec-WebSocket-Extensions: {OFFER}\r\n");
    if let Some(bearer) = dialer.bearer(i) {
        let bearer = bearer.to_str().map_err(|_| "token")?;
        extra.push_str(&format!("Authorization: {bearer}\r\n"));
    }
    let request = dialer.raw_request(&["sec-websocket-extensions"], &extra);
    let head = timed(async {
        c.send(&request).await?;
        c.head().await
    })
    .await
    .ok_or("upgrade_timeout")??;
    if head.split_whitespace().nth(1) != Some("101") {
        return Err("upgrade_refused");
    }
    let key = dialer.request.headers().get("sec-websocket-key");
    let expected = key.map(|k| derive_accept_key(k.as_bytes()));
    if expected.is_none() || header(&head, "sec-websocket-accept") != expected {
        return Err("upgrade");
    }
    check_accepted(header(&head, "sec-websocket-extensions"))?;
    Ok(c)
}

/// Reads the next data message's payload into `out` (cleared first), answering pings;
/// returns the first byte of its first frame.
async fn message(c: &mut Conn, out: &mut Vec<u8>) -> Result<u8, &'static str> {
    out.clear();
    let mut first = None;
    loop {
        let h = c.frame_head().await?;
        if h.mask.is_some() {
            return Err("masked_by_server");
        }
        if h.is_control() {
            if h.len > 125 {
                return Err("protocol");
            }
            let mut payload = Vec::with_capacity(h.len as usize);
            c.payload(h.len, &mut payload).await?;
            match h.opcode() {
                PING => {
                    c.send(&client_frame(FIN | PONG, &payload, None, true))
                        .await?
                }
                CLOSE => return Err("closed"),
                _ => {}
            }
            continue;
        }
        match (first, h.opcode()) {
            (None, TEXT | BINARY) => first = Some(h.first),
            (Some(_), CONTINUATION) => {}
            _ => return Err("protocol"),
        }
        if (out.len() as u64).saturating_add(h.len) > MAX_MESSAGE {
            return Err("echo_too_large");
        }
        c.payload(h.len, out).await?;
        if h.first & FIN != 0 {
            return first.ok_or("protocol");
        }
    }
}

/// Sends `m` and reads its echo, which must be compressed text that inflates to `m`'s
/// text. Every target relays the frames unchanged, so comparing the bytes suffices; an
/// echo compressed differently is inflated and compared.
pub(crate) async fn round_trip(
    c: &mut Conn,
    m: &Message,
    echo: &mut Vec<u8>,
) -> Result<(), &'static str> {
    timed(c.send(&m.frame)).await.ok_or("send")??;
    let first = timed(message(c, echo)).await.ok_or("echo_timeout")??;
    if first & (RSV1 | 0x0f) != RSV1 | TEXT {
        return Err("echo_not_compressed_text");
    }
    if *echo != m.wire && inflate(echo, m.text.len())? != m.text {
        return Err("echo_mismatch");
    }
    Ok(())
}

/// Reads until the connection ends, answering pings: an idle connection of `hold`.
pub(crate) async fn idle(mut c: Conn) {
    let mut sink = Vec::new();
    while message(&mut c, &mut sink).await.is_ok() {
        sink = Vec::new();
    }
}

/// Closes politely: our close frame, then wait (bounded) for the server's and its EOF.
async fn close(mut c: Conn) {
    let _ = timed(async {
        if c.send(&close_frame()).await.is_ok() {
            loop {
                c.start = c.end;
                if c.fill().await.is_err() {
                    break;
                }
            }
        }
    })
    .await;
}

/// `echo --deflate`: C connections in a closed loop, one compressed S-byte JSON-like text
/// message in flight each, `distinct` different messages sent in turn. Connection i
/// starts at the (i × distinct / C)-th, so that the connections spread over the messages
/// and a message comes back about `distinct` messages later, whoever sends it (starting
/// at the i-th, message m went out from C connections in C consecutive rounds: traffic
/// shaped like a broadcast, which a gate that remembers recent messages recognises).
pub(crate) async fn echo(
    target: Target,
    connections: usize,
    size: usize,
    seconds: Duration,
    warmup: Duration,
    distinct: usize,
) -> Result<Value, String> {
    let dialer = Dialer::new(&target, 4096)?;
    let messages = messages(size, distinct)?;
    let read_buffer = (size / 2).clamp(4096, 256 * 1024);
    let mut conns = Vec::with_capacity(connections);
    for i in 0..connections {
        conns.push(
            open(&dialer, i, read_buffer)
                .await
                .map_err(|kind| format!("echo --deflate: connection {i}: {kind}"))?,
        );
    }
    let start = Instant::now() + warmup;
    let end = start + seconds;
    let mut tasks = Vec::with_capacity(connections);
    let spread = messages.len() / connections.max(1);
    for (i, mut c) in conns.into_iter().enumerate() {
        let messages = messages.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut echo = Vec::with_capacity(size);
            for k in i * spread.max(1).. {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let m = &messages[k % messages.len()];
                if let Err(kind) = round_trip(&mut c, m, &mut echo).await {
                    count(&mut tally.errors, kind);
                    return tally;
                }
                if t >= start {
                    record(&mut tally.histogram, t.elapsed());
                    tally.done += 1;
                    tally.wire += m.wire.len() as u64;
                }
            }
            close(c).await;
            tally
        }));
    }
    let total = Tally::sum(tasks).await?;
    let s = seconds.as_secs_f64();
    let text: usize = messages.iter().map(|m| m.text.len()).sum();
    let wire: usize = messages.iter().map(|m| m.wire.len()).sum();
    Ok(json!({
        "mode": "echo",
        "deflate": OFFER,
        "connections": connections,
        "size": size,
        "distinct": messages.len(),
        "wire_size": wire as f64 / messages.len() as f64,
        "compression_ratio": text as f64 / wire.max(1) as f64,
        "seconds": s,
        "messages": total.done,
        "messages_per_s": total.done as f64 / s,
        // Message (inflated) bytes one way, as the other echo rows count them; and the
        // compressed payload bytes the relay carried, one way.
        "mb_per_s": (total.done as f64 * size as f64) / s / 1e6,
        "wire_mb_per_s": total.wire as f64 / s / 1e6,
        "latency": latency(&total.histogram),
        "errors": total.errors,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_like_is_exact_json_that_compresses_realistically() {
        for size in [64, 1000, 16384] {
            let text = json_like(size, 3);
            assert_eq!(text.len(), size);
            let parsed: Value = serde_json::from_slice(&text).expect("valid JSON");
            // Too small for one record, it is an empty array padded.
            assert!(parsed
                .as_array()
                .is_some_and(|a| a.is_empty() == (size < 200)));
        }
        let text = json_like(16384, 0);
        let ratio = text.len() as f64 / deflate(&text).unwrap().len() as f64;
        assert!((3.0..=10.0).contains(&ratio), "ratio {ratio}");
        assert_ne!(json_like(16384, 0), json_like(16384, 1));
    }

    #[test]
    fn deflate_round_trips_without_the_tail() {
        let text = json_like(5000, 7);
        let wire = deflate(&text).unwrap();
        assert!(!wire.ends_with(&TAIL));
        assert_eq!(inflate(&wire, text.len()).unwrap(), text);
        assert_eq!(inflate(&wire, 100), Err("inflate_too_large"));
        assert_eq!(inflate(&deflate(b"").unwrap(), 10).unwrap(), b"");
    }

    #[test]
    fn headers_parse_and_unmask_at_any_offset() {
        for len in [0u64, 125, 126, 65535, 65536] {
            let mut out = Vec::new();
            put_head(&mut out, FIN | RSV1 | TEXT, len);
            let h = Head::parse(&out).unwrap();
            assert_eq!(
                (h.first, h.len, h.size, h.mask),
                (0xC1, len, out.len(), None)
            );
            assert!(Head::parse(&out[..out.len() - 1]).is_none() || out.len() == 2);
        }
        let payload: Vec<u8> = (0..=255).collect();
        let frame = client_frame(FIN | BINARY, &payload, None, true);
        let h = Head::parse(&frame).unwrap();
        let mut body = frame[h.size..].to_vec();
        let (a, b) = body.split_at_mut(13);
        unmask(a, h.mask.unwrap(), 0);
        unmask(b, h.mask.unwrap(), 13);
        assert_eq!(body, payload);
    }

    #[test]
    fn negotiation() {
        let offers = |v| {
            extensions(v)
                .into_iter()
                .map(|(_, p)| acceptable(&p))
                .collect::<Vec<_>>()
        };
        assert_eq!(offers(OFFER), [true]);
        assert_eq!(offers("permessage-deflate; client_max_window_bits"), [true]);
        assert_eq!(
            offers("permessage-deflate; server_max_window_bits=10, permessage-deflate"),
            [false, true]
        );
        assert_eq!(check_accepted(Some(ACCEPT.into())), Ok(()));
        assert_eq!(check_accepted(None), Err("deflate_not_accepted"));
        assert_eq!(
            check_accepted(Some("permessage-deflate".into())),
            Err("deflate_context_takeover")
        );
        assert_eq!(
            check_accepted(Some(
                "permessage-deflate; server_no_context_takeover; client_max_window_bits=9".into()
            )),
            Err("deflate_parameters")
        );
        assert_eq!(
            check_accepted(Some("x-webkit-deflate-frame".into())),
            Err("extension_not_offered")
        );
    }
}
