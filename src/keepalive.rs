//! The requests of one HTTP/1.1 connection that hyper serves: how long it has been idle,
//! and what to do when its client ends its sending side.
//!
//! A client may shut its sending side once its request is out (an HTTP/1.1 half-close,
//! `shutdown(SHUT_WR)`, a TLS `close_notify`) and still read the answer. hyper either
//! closes such a connection on reading its end, whatever answer is under way, or (with
//! its half-close allowed) stops watching for the end at all. The gate does as nginx does
//! instead: an answer the gate decides itself (a refusal) is written first, and only
//! then is the connection closed; a request waiting on the upstream is abandoned at once
//! (nginx's 499), so that nobody's caps and upstream connection are held for a client
//! that left. [`Ending`] keeps the end from hyper while such an answer is owed, and
//! [`Requests::ended`] tells the requests under way.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The requests of one connection, shared by its reader ([`Ending`]) and its service.
#[derive(Clone)]
pub struct Requests(Arc<Shared>);

struct Shared {
    state: Mutex<State>,
    /// Set once the client has ended its sending side (read without the lock: every read
    /// of an upgraded connection passes here).
    ended: AtomicBool,
    /// Cancelled at that end, for the requests under way.
    ended_token: CancellationToken,
}

struct State {
    /// Requests being answered, their response bodies included.
    answering: usize,
    /// Since when none has been.
    since: Instant,
    /// Answers the gate owes the client before it may act on the client's end.
    owed: usize,
    /// hyper's read, waiting for the end it was not given yet.
    reader: Option<Waker>,
}

impl Default for Requests {
    fn default() -> Requests {
        Requests(Arc::new(Shared {
            state: Mutex::new(State {
                answering: 0,
                since: Instant::now(),
                owed: 0,
                reader: None,
            }),
            ended: AtomicBool::new(false),
            ended_token: CancellationToken::new(),
        }))
    }
}

impl Requests {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request is being answered until the guard (held by its response body) drops.
    /// Its answer is owed until [`Answering::owes_nothing`] or the drop.
    pub fn begin(&self) -> Answering {
        let mut state = self.lock();
        state.answering += 1;
        state.owed += 1;
        Answering {
            requests: self.clone(),
            owed: true,
        }
    }

    /// Since when no request has been answered; `None` while one is.
    pub fn idle_since(&self) -> Option<Instant> {
        let state = self.lock();
        (state.answering == 0).then_some(state.since)
    }

    /// Resolves once the client has ended its sending side (at once if it has).
    pub async fn ended(&self) {
        self.0.ended_token.cancelled().await
    }

    /// The client's end was read: given to hyper (`Ready`) unless an answer is owed, when
    /// hyper's read waits for it (`Pending`) until none is.
    fn end_read(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.0.ended.swap(true, Ordering::AcqRel) {
            self.0.ended_token.cancel();
        }
        let mut state = self.lock();
        if state.owed == 0 {
            return Poll::Ready(());
        }
        state.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// One answer is no longer owed (`owed`), or no longer under way (`answering`), or
    /// both; hyper's read gets the client's end once nothing is owed.
    fn settle(&self, owed: bool, answering: bool) {
        let reader = {
            let mut state = self.lock();
            if answering {
                state.answering = state.answering.saturating_sub(1);
                state.since = Instant::now();
            }
            if !owed {
                return;
            }
            state.owed = state.owed.saturating_sub(1);
            match state.owed {
                0 => state.reader.take(),
                _ => None,
            }
        };
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

/// One request being answered (see [`Requests::begin`]).
pub struct Answering {
    requests: Requests,
    owed: bool,
}

impl Answering {
    /// The answer is not the gate's own (a proxied response): the client's end may cut
    /// it, as it cuts a wait for the upstream.
    pub fn owes_nothing(&mut self) {
        if std::mem::take(&mut self.owed) {
            self.requests.settle(true, false);
        }
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.requests.settle(self.owed, true);
    }
}

/// A connection's socket as hyper reads it: the client's end (a read of nothing, or a
/// TLS stream cut without its `close_notify`) is held back while an answer is owed.
///
/// Dropped after hyper has shut it (an answer with `Connection: close`, a refusal above
/// all) while the client may still be sending, such as a request body the gate did not
/// read, it lingers as every connection the gate closes does (see [`crate::linger`]):
/// closed at once, the socket would answer that input with a reset, which destroys the
/// answer before the client has read it.
pub struct Ending<T: AsyncRead + Unpin + Send + 'static> {
    /// Always here but while being dropped.
    io: Option<T>,
    requests: Requests,
    /// hyper has shut the write side.
    shut: bool,
    /// Read since: someone (the relay, after an upgrade) lingered already.
    read_after_shut: bool,
}

impl<T: AsyncRead + Unpin + Send + 'static> Ending<T> {
    pub fn new(io: T, requests: Requests) -> Ending<T> {
        Ending {
            io: Some(io),
            requests,
            shut: false,
            read_after_shut: false,
        }
    }
}

/// What a socket taken away does: fails.
fn gone() -> io::Error {
    io::Error::from(io::ErrorKind::NotConnected)
}

impl<T: AsyncRead + Unpin + Send + 'static> Drop for Ending<T> {
    fn drop(&mut self) {
        let lingers =
            self.shut && !self.read_after_shut && !self.requests.0.ended.load(Ordering::Acquire);
        let runtime = tokio::runtime::Handle::try_current();
        if let (true, Some(mut io), Ok(runtime)) = (lingers, self.io.take(), runtime) {
            runtime.spawn(async move {
                let deadline = Instant::now() + crate::linger::LINGER_TIME;
                crate::linger::discard_until(&mut io, deadline).await;
            });
        }
    }
}

impl<T: AsyncRead + Unpin + Send + 'static> AsyncRead for Ending<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.read_after_shut |= this.shut;
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        if buf.remaining() == 0 {
            return Pin::new(io).poll_read(cx, buf);
        }
        if this.requests.0.ended.load(Ordering::Acquire) {
            return this.requests.end_read(cx).map(Ok);
        }
        let before = buf.filled().len();
        match Pin::new(io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before => {
                this.requests.end_read(cx).map(Ok)
            }
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                this.requests.end_read(cx).map(Ok)
            }
            polled => polled,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Ending<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().io.as_mut() {
            Some(io) => Pin::new(io).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().io.as_mut() {
            Some(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(T::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io.as_mut() {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shut = true;
        match this.io.as_mut() {
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
}
