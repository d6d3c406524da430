//! The end of every connection the gate closes: a lingering close, as nginx does it.
//!
//! Closing a socket whose peer is still sending makes the kernel answer that input with a
//! TCP reset, and a reset destroys whatever the peer had not read yet: the close frame
//! (1008, 1009, …) or the refusal the gate had just written. So the gate ends its side
//! (TLS close_notify, then FIN), and reads and discards what the peer still sends until
//! the peer closes too, for at most [`LINGER_TIME`] and [`LINGER_BYTES`], before it drops
//! the socket.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

/// The longest the gate waits for a peer to close after its own close (nginx's
/// `lingering_timeout` is 5 s; a peer that reads its close frame closes in a round trip).
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// The most the gate reads and discards from a peer after its own close: the largest
/// message a policy may allow (64 MiB), refused at its header with all of it in flight,
/// fits, and so does a client library's send queue of a few such messages written before
/// it reads (nginx bounds its lingering close by time alone). Discarding costs the gate a
/// read per 16 KiB and no memory; a peer that floods past this within [`LINGER_TIME`] is
/// cut off with a reset, as it would be without the linger.
pub const LINGER_BYTES: u64 = 64 * 1024 * 1024;

/// What each read while lingering takes at most (allocated only for the linger).
const LINGER_READ: usize = 16 * 1024;

/// End `io` gracefully: flush, shut the write side (for TLS, close_notify first), then
/// discard input until the peer's EOF, an error, [`LINGER_BYTES`] or [`LINGER_TIME`]
/// (and never past `deadline`). The caller drops the socket afterwards.
pub async fn close<S>(io: &mut S, deadline: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = deadline.min(Instant::now() + LINGER_TIME);
    if timeout_at(deadline, io.shutdown()).await.is_err() {
        return;
    }
    let _ = timeout_at(deadline, discard(io)).await;
}

/// The second half of [`close`], for a socket whose write side is already shut: discard
/// input until the peer's EOF, an error, [`LINGER_BYTES`] or [`LINGER_TIME`] (and never
/// past `deadline`).
pub async fn discard_until<S: AsyncRead + Unpin>(io: &mut S, deadline: Instant) {
    let _ = timeout_at(deadline.min(Instant::now() + LINGER_TIME), discard(io)).await;
}

/// End `io` after a completed close handshake, when the peer sends nothing more: flush
/// and shut the write side (TLS close_notify, then FIN), never past `deadline`.
pub async fn shutdown<S: AsyncWrite + Unpin>(io: &mut S, deadline: Instant) {
    let _ = timeout_at(deadline.min(Instant::now() + LINGER_TIME), io.shutdown()).await;
}

/// Read and drop input until EOF, an error or [`LINGER_BYTES`].
async fn discard<S: AsyncRead + Unpin>(io: &mut S) {
    let mut scratch = vec![0u8; LINGER_READ];
    let mut read = 0u64;
    while read < LINGER_BYTES {
        match io.read(&mut scratch).await {
            Ok(0) | Err(_) => return,
            Ok(n) => read += n as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// A peer that keeps sending after the gate's close still reads everything the gate
    /// wrote before it: no reset destroys it.
    #[tokio::test]
    async fn a_sending_peer_reads_the_last_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            // Some of the peer's input is unread when the gate closes.
            let mut first = [0u8; 10];
            tcp.read_exact(&mut first).await.unwrap();
            tcp.write_all(b"goodbye").await.unwrap();
            close(&mut tcp, Instant::now() + Duration::from_secs(5)).await;
        });
        let mut peer = TcpStream::connect(addr).await.unwrap();
        for _ in 0..64 {
            peer.write_all(&[7u8; 4096]).await.unwrap();
        }
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"goodbye");
        drop(peer);
        server.await.unwrap();
    }

    /// A peer that never closes is given up on after the linger time.
    #[tokio::test]
    async fn a_silent_peer_is_dropped_after_the_linger_time() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _peer = TcpStream::connect(addr).await.unwrap();
        let (mut tcp, _) = listener.accept().await.unwrap();
        let started = Instant::now();
        close(&mut tcp, Instant::now() + Duration::from_millis(300)).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(1),
            "{took:?}"
        );
    }
}
