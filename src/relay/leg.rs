//! One leg of a relay: its socket, what the gate still owes it, and where the frames read
//! from it stand.
//!
//! A leg holds no buffer while its connection is idle. Reads go into the worker thread's
//! scratch buffer ([`with_scratch`]); what a destination does not take at once is kept in
//! the leg's `backlog` until it does (the only allocation on the relay's path, made under
//! backpressure and freed once the backlog drains); partial headers (≤ 13 bytes) and
//! control frames (≤ 125 bytes) are carried inline.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::close::CloseFrame;
use super::frame::{apply_mask, write_header, Header, OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER};
use super::reader::{Control, Reader};
use crate::head::Prefixed;
use crate::upstream::UpstreamStream;

/// The most one read takes, and a worker thread holds one such buffer for all its
/// connections. 32 KiB, not more: a 16 KiB message and its header still pass in one read,
/// and the buffer stays in a core's L1 data cache between the read that fills it and the
/// write that empties it. Measured on the benchmark machine: with 64 KiB reads the 1 MiB
/// echo ran at 0.6–0.8× HAProxy's rate, with 24–48 KiB at 1.1–1.6×, nearly all of the
/// difference in kernel time (docs/performance.md).
pub const READ_BYTES: usize = 32 * 1024;

thread_local! {
    /// The worker thread's read buffer, with [`MAX_HEADER`] bytes in front for a header
    /// carried over from the last read (so that header and payload leave together).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_HEADER + READ_BYTES].into());
}

/// Run `f` over the thread's scratch buffer (or, if it is somehow in use, a fresh one).
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut vec![0; MAX_HEADER + READ_BYTES]),
    })
}

/// The socket under a leg. hyper hands the client's socket over after the 101 as a boxed
/// `Upgraded`; it is taken back out (`downcast`) so that every read and write on the
/// client leg is a direct call, not two layers of dynamic dispatch.
pub enum Io {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A stream of another type (none today): left as hyper gave it.
    Upgraded(TokioIo<Upgraded>),
    Upstream(UpstreamStream),
    /// A client that left before its 101 or 200 was written: read at its end, refusing
    /// writes, so that the relay finds it lost at once and ends the connection as for any
    /// lost client (1001 to the upstream, the close line and its count).
    Gone,
}

/// The client's socket as the relay takes it, with the bytes already read past the request
/// head (frames a client sent right behind its upgrade request).
pub struct Client {
    pub(super) io: Io,
    pub(super) read_ahead: Vec<u8>,
}

type Tls = tokio_rustls::server::TlsStream<TcpStream>;

impl Client {
    /// The socket as hyper gave it back after its 101, with whatever hyper and the
    /// listener's head reader read that is not the request.
    pub fn upgraded(upgraded: Upgraded) -> Client {
        let read_ahead = |read_buf: &[u8], unread: &[u8]| [read_buf, unread].concat();
        let upgraded = match upgraded.downcast::<TokioIo<Prefixed<TcpStream>>>() {
            Ok(parts) => {
                let (unread, io) = parts.io.into_inner().into_parts();
                return Client {
                    io: Io::Tcp(io),
                    read_ahead: read_ahead(&parts.read_buf, &unread),
                };
            }
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<Prefixed<Tls>>>() {
            Ok(parts) => {
                let (unread, io) = parts.io.into_inner().into_parts();
                Client {
                    io: Io::Tls(Box::new(io)),
                    read_ahead: read_ahead(&parts.read_buf, &unread),
                }
            }
            Err(upgraded) => Client {
                io: Io::Upgraded(TokioIo::new(upgraded)),
                read_ahead: Vec::new(),
            },
        }
    }

    /// A client whose upgrade did not complete: the 101 could not be written, or hyper
    /// could not hand the socket back. The upgrade was counted accepted, so the relay
    /// still ends the connection, at once.
    pub fn gone() -> Client {
        Client {
            io: Io::Gone,
            read_ahead: Vec::new(),
        }
    }

    /// A socket the listener answered itself, and what it read past the head.
    pub fn new(io: impl Into<Io>, read_ahead: &[u8]) -> Client {
        Client {
            io: io.into(),
            read_ahead: read_ahead.to_vec(),
        }
    }
}

impl From<TcpStream> for Io {
    fn from(io: TcpStream) -> Io {
        Io::Tcp(io)
    }
}

impl From<Tls> for Io {
    fn from(io: Tls) -> Io {
        Io::Tls(Box::new(io))
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            Io::Tls(io) => Pin::new(io).poll_read(cx, buf),
            Io::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
            Io::Upstream(io) => Pin::new(io).poll_read(cx, buf),
            Io::Gone => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            Io::Tls(io) => Pin::new(io).poll_write(cx, buf),
            Io::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
            Io::Upstream(io) => Pin::new(io).poll_write(cx, buf),
            Io::Gone => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_flush(cx),
            Io::Tls(io) => Pin::new(io).poll_flush(cx),
            Io::Upgraded(io) => Pin::new(io).poll_flush(cx),
            Io::Upstream(io) => Pin::new(io).poll_flush(cx),
            Io::Gone => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            Io::Tls(io) => Pin::new(io).poll_shutdown(cx),
            Io::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
            Io::Upstream(io) => Pin::new(io).poll_shutdown(cx),
            Io::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// The gate's own frames waiting for a frame boundary on a leg.
#[derive(Default)]
struct Owed {
    /// The answer to the latest ping (as RFC 6455 §5.5.3 allows, only the latest), when it
    /// could not go at once (on the heap: rare, and an idle leg holds none).
    pong: Option<Box<Control>>,
    /// A heartbeat ping.
    ping: bool,
}

/// One side of a relay: its socket, what is owed to it, and the frames read from it.
pub struct Leg {
    pub(super) io: Io,
    /// Frames the gate writes here are masked (this leg is the upstream, we its client).
    mask_writes: bool,
    /// Bytes the socket has accepted, so that the write deadline measures "accepts no
    /// bytes" and not "has not caught up".
    pub(super) written: u64,
    /// Relayed bytes the socket has not taken yet; no allocation unless the peer fell
    /// behind during the current burst.
    backlog: Vec<u8>,
    backlog_at: usize,
    /// The relayed byte stream stops inside a frame.
    pub(super) mid_frame: bool,
    owed: Owed,
    /// Our close frame is written; nothing more is.
    pub(super) close_sent: bool,
    /// A heartbeat ping was queued here and its pong has not come yet: that pong, which
    /// RFC 6455 obliges the peer to send, is not metered as one of its messages.
    pub(super) pong_due: bool,
    needs_flush: bool,
    /// Bytes that arrived before the relay began (after the handshake's head).
    read_ahead: Vec<u8>,
    pub(super) reader: Reader,
}

impl Leg {
    pub fn new(io: Io, read_ahead: Vec<u8>, reader: Reader) -> Leg {
        Leg {
            mask_writes: matches!(io, Io::Upstream(_)),
            io,
            written: 0,
            backlog: Vec::new(),
            backlog_at: 0,
            mid_frame: false,
            owed: Owed::default(),
            close_sent: false,
            pong_due: false,
            needs_flush: false,
            read_ahead,
            reader,
        }
    }

    /// The burst toward this leg is over (its source would block): give back the backlog's
    /// room, so that an idle connection holds no buffer.
    pub fn release(&mut self) {
        if self.caught_up() && self.backlog.capacity() > 0 {
            self.backlog = Vec::new();
            self.backlog_at = 0;
        }
    }

    /// Whether the socket has taken everything relayed to it.
    pub fn caught_up(&self) -> bool {
        self.backlog_at == self.backlog.len()
    }

    /// Answer a ping read from this leg: at once if the socket is free for a frame of
    /// ours, else once it is (as RFC 6455 §5.5.3 allows, only the latest ping is
    /// answered then).
    pub fn answer_ping(&mut self, cx: &mut Context<'_>, ping: &[u8]) -> io::Result<()> {
        let pong = Control::with_payload(OpCode::Pong, ping);
        if self.owed.pong.is_some() || !self.caught_up() || self.mid_frame || self.close_sent {
            match &mut self.owed.pong {
                Some(owed) => **owed = pong,
                None => self.owed.pong = Some(Box::new(pong)),
            }
            return Ok(());
        }
        self.write_control(cx, &pong)
    }

    pub fn queue_ping(&mut self) {
        self.owed.ping = true;
        self.pong_due = true;
    }

    /// The kernel's send queue toward this leg, when it is a TCP socket (with or without
    /// TLS) and the kernel answers.
    pub fn send_queue(&self) -> Option<super::sendq::SendQueue> {
        match &self.io {
            Io::Tcp(tcp) => super::sendq::probe(tcp),
            Io::Tls(tls) => super::sendq::probe(tls.get_ref().0),
            _ => None,
        }
    }

    /// Whether a heartbeat ping is still waiting for a frame boundary (the upstream is
    /// sending the client one large frame).
    pub fn ping_waiting(&self) -> bool {
        self.owed.ping
    }

    /// Write our close frame (`None`: one without a status code), after which nothing
    /// more is written. Call only when caught up and at a frame boundary.
    pub fn write_close(
        &mut self,
        cx: &mut Context<'_>,
        frame: Option<&CloseFrame>,
    ) -> io::Result<()> {
        self.close_sent = true;
        self.write_control(cx, &close_control(frame))
    }

    /// Read into `buf[MAX_HEADER..]`: the bytes that came with the handshake first, then
    /// the socket. `Ok(0)` is the end of the stream.
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let room = &mut buf[MAX_HEADER..];
        if !self.read_ahead.is_empty() {
            let n = self.read_ahead.len().min(room.len());
            room[..n].copy_from_slice(&self.read_ahead[..n]);
            self.read_ahead.drain(..n);
            if self.read_ahead.is_empty() {
                self.read_ahead = Vec::new();
            }
            return Poll::Ready(Ok(n));
        }
        let mut read = ReadBuf::new(room);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
        Poll::Ready(Ok(read.filled().len()))
    }

    /// Write `bytes` (relayed, or a frame of the gate's) as far as the socket takes them
    /// now; the rest goes to the backlog. Call only when caught up.
    pub fn write(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> io::Result<()> {
        let mut at = 0;
        while at < bytes.len() {
            match Pin::new(&mut self.io).poll_write(cx, &bytes[at..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    at += n;
                    self.written += n as u64;
                    self.needs_flush = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        if at < bytes.len() {
            self.backlog.extend_from_slice(&bytes[at..]);
        }
        Ok(())
    }

    /// Write what is owed: the backlog, then (at a frame boundary) the gate's own frames.
    /// Ready once the socket has taken all of it that may go now.
    pub fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while self.backlog_at < self.backlog.len() {
                let n = ready!(
                    Pin::new(&mut self.io).poll_write(cx, &self.backlog[self.backlog_at..])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.backlog_at += n;
                self.written += n as u64;
                self.needs_flush = true;
            }
            // Drained: its room is kept for the rest of the burst (see `release`).
            self.backlog.clear();
            self.backlog_at = 0;
            if self.mid_frame || self.close_sent {
                return Poll::Ready(Ok(()));
            }
            let control = if let Some(pong) = self.owed.pong.take() {
                *pong
            } else if std::mem::take(&mut self.owed.ping) {
                Control::with_payload(OpCode::Ping, &[])
            } else {
                return Poll::Ready(Ok(()));
            };
            self.write_control(cx, &control)?;
        }
    }

    /// Write a frame of the gate's, masked toward an upstream. Call only when caught up
    /// and at a frame boundary.
    fn write_control(&mut self, cx: &mut Context<'_>, control: &Control) -> io::Result<()> {
        let mut wire = [0u8; MAX_HEADER + MAX_CONTROL_PAYLOAD as usize];
        let mask = self.mask_writes.then(mask_key);
        let header = Header {
            fin: true,
            opcode: control.opcode,
            mask,
            len: control.payload().len() as u64,
            // The gate's own frames are control frames: never compressed.
            compressed: false,
        };
        let mut head = [0u8; MAX_HEADER];
        let at = write_header(&header, &mut head);
        wire[..at].copy_from_slice(&head[..at]);
        let payload = &mut wire[at..at + control.payload().len()];
        payload.copy_from_slice(control.payload());
        if let Some(key) = mask {
            apply_mask(payload, key, 0);
        }
        let len = at + payload.len();
        self.write(cx, &wire[..len])
    }

    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.needs_flush {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.needs_flush = false;
        }
        Poll::Ready(Ok(()))
    }
}

/// A close frame of the gate's own (the reason cut to fit at a character boundary).
fn close_control(frame: Option<&CloseFrame>) -> Control {
    let Some(f) = frame else {
        return Control::with_payload(OpCode::Close, &[]);
    };
    let mut cut = f.reason.len().min(MAX_CONTROL_PAYLOAD as usize - 2);
    while !f.reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD as usize];
    payload[..2].copy_from_slice(&f.code.to_be_bytes());
    payload[2..2 + cut].copy_from_slice(&f.reason.as_bytes()[..cut]);
    Control::with_payload(OpCode::Close, &payload[..2 + cut])
}

/// A masking key for the gate's own frames toward an upstream (RFC 6455 §5.3: from a
/// strong source of entropy).
fn mask_key() -> [u8; 4] {
    let mut key = [0u8; 4];
    if aws_lc_rs::rand::fill(&mut key).is_err() {
        key = [0x5a, 0x17, 0xc3, 0x9e];
    }
    key
}
