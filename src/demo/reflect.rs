//! The demo upstream's echo: each frame sent back as it came, over the relay's own frame
//! codec. With permessage-deflate agreed with both `*_no_context_takeover` parameters,
//! every compressed message is a deflate stream of its own, so echoing its frames as they
//! came (RSV1 included) is a valid answer: the demo never compresses or inflates.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::relay::frame::{apply_mask, parse_header, write_header, Header, OpCode, MAX_HEADER};

/// What the demo answers a permessage-deflate offer with.
pub const DEFLATE_ANSWER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The largest frame the demo echoes; a larger one ends the connection.
const MAX_FRAME: u64 = 1 << 20;

/// Whether the client's `Sec-WebSocket-Extensions` holds a permessage-deflate offer that
/// [`DEFLATE_ANSWER`] accepts: one without `server_max_window_bits` (the echoed data was
/// compressed with the client's window, which such an offer says the client cannot read).
pub fn deflate_offered(extensions: &str) -> bool {
    extensions.split(',').any(|offer| {
        let mut params = offer.split(';').map(str::trim);
        params.next() == Some("permessage-deflate")
            && params.all(|p| !p.starts_with("server_max_window_bits"))
    })
}

/// Echo frames until the client closes, errs, or sends more than [`MAX_FRAME`] in one.
pub async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, deflate: bool) {
    let mut head = Vec::with_capacity(MAX_HEADER);
    let mut payload = Vec::new();
    loop {
        let (header, _) = loop {
            match parse_header(&head, crate::relay::frame::From::Client, deflate) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) if head.len() < MAX_HEADER => {
                    let mut b = [0u8; 1];
                    if io.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                _ => return,
            }
        };
        head.clear();
        if header.len > MAX_FRAME {
            return;
        }
        payload.resize(header.len as usize, 0);
        if io.read_exact(&mut payload).await.is_err() {
            return;
        }
        if let Some(key) = header.mask {
            apply_mask(&mut payload, key, 0);
        }
        let opcode = match header.opcode {
            OpCode::Ping => OpCode::Pong,
            OpCode::Pong => continue,
            other => other,
        };
        let reply = Header {
            opcode,
            mask: None,
            ..header
        };
        let mut out = [0u8; MAX_HEADER];
        let n = write_header(&reply, &mut out);
        let sent = async {
            io.write_all(&out[..n]).await?;
            io.write_all(&payload).await?;
            io.flush().await
        };
        if sent.await.is_err() || opcode == OpCode::Close {
            return;
        }
    }
}
