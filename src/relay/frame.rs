//! The WebSocket frame codec (RFC 6455 §5) as plain functions over byte slices: parse a
//! frame header, write one, mask or unmask a payload in chunks, validate UTF-8 across chunks
//! and fragments, apply the message rules (fragmentation, limits) and read a close payload.
//! No I/O and no allocation: the relay's reader (`reader.rs`) drives these over the bytes
//! of each read as they pass through.
//!
//! Proven on its own by the unit tests here and the properties in
//! `tests/frame_properties.rs`.

pub use super::inflate::Deflate;
use super::inflate::InvalidDeflate;

/// The longest frame header: 2 bytes, an 8-byte length and a 4-byte mask key.
pub const MAX_HEADER: usize = 14;

/// Control frames carry at most this many payload bytes (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: u64 = 125;

/// A frame's opcode (RFC 6455 §5.2); the reserved ones are a parse error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    pub fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: OpCode,
    /// The masking key, present exactly on client-to-server frames.
    pub mask: Option<[u8; 4]>,
    /// The payload length as declared (checked against the limits before any payload is
    /// read).
    pub len: u64,
    /// RSV1: the message this frame begins is compressed (permessage-deflate, RFC 7692).
    /// Only ever set on the first frame of a data message, and only when the extension
    /// was negotiated.
    pub compressed: bool,
}

/// Why a frame header is refused; every one is a protocol error (1002).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("a reserved bit is set (no extension was negotiated that defines it)")]
    ReservedBits,
    #[error("the compressed bit (RSV1) is set on a control or continuation frame")]
    CompressedNotFirst,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("a control frame is fragmented")]
    FragmentedControl,
    #[error("a control frame carries more than 125 bytes")]
    ControlTooLong,
    #[error("the 64-bit length has its most significant bit set")]
    LengthTooLarge,
    #[error("the payload length is not in its shortest encoding")]
    NonMinimalLength,
    #[error("a client frame is not masked")]
    Unmasked,
    #[error("a server frame is masked")]
    Masked,
}

/// Which side's frames are being read: a server reads masked frames, a client unmasked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// Frames from a client (the gate is their server): must be masked.
    Client,
    /// Frames from a server (the gate is its client): must not be masked.
    Server,
}

/// Parse the header at the start of `buf`: `Ok(None)` while it is incomplete, else the
/// header and its length in bytes. Never reads past the header. `deflate`: whether
/// permessage-deflate was negotiated, which gives RSV1 its meaning (set on the first frame
/// of a compressed data message, never on another frame).
pub fn parse_header(
    buf: &[u8],
    from: From,
    deflate: bool,
) -> Result<Option<(Header, usize)>, HeaderError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let reserved = if deflate { 0x30 } else { 0x70 };
    if b0 & reserved != 0 {
        return Err(HeaderError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(HeaderError::ReservedOpcode(b0 & 0x0F))?;
    let compressed = b0 & 0x40 != 0;
    if compressed && (opcode == OpCode::Continuation || opcode.is_control()) {
        return Err(HeaderError::CompressedNotFirst);
    }
    let masked = b1 & 0x80 != 0;
    match (from, masked) {
        (From::Client, false) => return Err(HeaderError::Unmasked),
        (From::Server, true) => return Err(HeaderError::Masked),
        _ => {}
    }
    let (len, mut at) = match b1 & 0x7F {
        // RFC 6455 §5.2: "the minimal number of bytes MUST be used to encode the length"
        // (browsers fail a connection whose server does otherwise).
        126 => match buf.get(2..4) {
            Some(b) => match u16::from_be_bytes([b[0], b[1]]) {
                len @ 126.. => (u64::from(len), 4),
                _ => return Err(HeaderError::NonMinimalLength),
            },
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(b);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(HeaderError::LengthTooLarge);
                }
                if len <= u64::from(u16::MAX) {
                    return Err(HeaderError::NonMinimalLength);
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        short => (u64::from(short), 2),
    };
    if opcode.is_control() {
        if !fin {
            return Err(HeaderError::FragmentedControl);
        }
        if len > MAX_CONTROL_PAYLOAD {
            return Err(HeaderError::ControlTooLong);
        }
    }
    let mask = if masked {
        let Some(key) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        at += 4;
        Some([key[0], key[1], key[2], key[3]])
    } else {
        None
    };
    Ok(Some((
        Header {
            fin,
            opcode,
            mask,
            len,
            compressed,
        },
        at,
    )))
}

/// Write `header` into `out` with the shortest length encoding; returns its length.
pub fn write_header(header: &Header, out: &mut [u8; MAX_HEADER]) -> usize {
    out[0] = u8::from(header.fin) << 7 | u8::from(header.compressed) << 6 | header.opcode.bits();
    let mask_bit = if header.mask.is_some() { 0x80 } else { 0 };
    let mut at = match header.len {
        len @ 0..=125 => {
            out[1] = mask_bit | len as u8;
            2
        }
        len @ 126..=0xFFFF => {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        len => {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&len.to_be_bytes());
            10
        }
    };
    if let Some(key) = header.mask {
        out[at..at + 4].copy_from_slice(&key);
        at += 4;
    }
    at
}

/// The key that masks a payload's bytes from `offset` on as `key` masks them from the
/// start: what a fragment cut from a masked frame at `offset` carries.
pub fn mask_from(key: [u8; 4], offset: u64) -> [u8; 4] {
    let shift = (offset % 4) as usize;
    [
        key[shift],
        key[(shift + 1) % 4],
        key[(shift + 2) % 4],
        key[(shift + 3) % 4],
    ]
}

/// XOR `data` with the mask `key`, where `data` starts `offset` bytes into the payload
/// (so a payload can be (un)masked chunk by chunk as it arrives). Masking and unmasking
/// are the same operation. Eight bytes at a time, without `unsafe`.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: u64) {
    let rotated = mask_from(key, offset);
    let wide = u64::from_ne_bytes([
        rotated[0], rotated[1], rotated[2], rotated[3], rotated[0], rotated[1], rotated[2],
        rotated[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= rotated[i % 4];
    }
}

/// UTF-8 validated incrementally, across the chunks and fragments of one text message: at
/// most three bytes of an unfinished character are carried between calls.
#[derive(Debug, Default, Clone)]
pub struct Utf8 {
    pending: [u8; 4],
    pending_len: usize,
}

/// Invalid UTF-8 (1007).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the text is not valid UTF-8")]
pub struct InvalidUtf8;

impl Utf8 {
    /// Check the next `chunk`. Fails as soon as the text so far cannot be the start of
    /// valid UTF-8, without waiting for the end of the message.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), InvalidUtf8> {
        // First complete the character carried over from the last chunk.
        while self.pending_len > 0 && !chunk.is_empty() {
            self.pending[self.pending_len] = chunk[0];
            self.pending_len += 1;
            chunk = &chunk[1..];
            match std::str::from_utf8(&self.pending[..self.pending_len]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_some() => return Err(InvalidUtf8),
                Err(_) => {}
            }
        }
        match std::str::from_utf8(chunk) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(InvalidUtf8),
            Err(e) => {
                // An incomplete character at the end (at most 3 bytes): carry it.
                let rest = &chunk[e.valid_up_to()..];
                self.pending[..rest.len()].copy_from_slice(rest);
                self.pending_len = rest.len();
                Ok(())
            }
        }
    }

    /// The message ended: no character may be left unfinished.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let unfinished = self.pending_len != 0;
        self.pending_len = 0;
        if unfinished {
            Err(InvalidUtf8)
        } else {
            Ok(())
        }
    }
}

/// Why a stream of frames is refused at the message level, with the close code its
/// sender gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// 1002: a continuation with no message to continue, or a new data frame while a
    /// fragmented message is still open.
    #[error("{0}")]
    Protocol(&'static str),
    /// 1009: a frame over the frame limit, or a message that would grow past the message
    /// limit (decided from the header, before any of its payload is passed on).
    #[error("the frame or message is too big")]
    TooBig,
    /// 1007: text that is not UTF-8.
    #[error("the text is not valid UTF-8")]
    InvalidUtf8,
    /// 1007: a compressed message that is not deflate data (its payload is not what its
    /// type and the negotiated extension say it is).
    #[error("a compressed message is not valid deflate data")]
    InvalidDeflate,
}

impl std::convert::From<InvalidDeflate> for Violation {
    fn from(_: InvalidDeflate) -> Violation {
        Violation::InvalidDeflate
    }
}

impl std::convert::From<HeaderError> for Violation {
    fn from(_: HeaderError) -> Violation {
        Violation::Protocol("a frame header RFC 6455 does not allow")
    }
}

impl Violation {
    pub fn code(self) -> u16 {
        match self {
            Violation::Protocol(_) => 1002,
            Violation::TooBig => 1009,
            Violation::InvalidUtf8 | Violation::InvalidDeflate => 1007,
        }
    }
}

/// One direction's message state, fed frame by frame and chunk by chunk as bytes pass
/// through: fragmentation rules, the frame and message limits, and UTF-8 of text. Holds
/// no payload; control frames (already checked by [`parse_header`]) may come between the
/// fragments of a message and do not touch it.
#[derive(Debug, Default, Clone)]
pub struct Messages {
    /// The data message in progress.
    open: Option<Open>,
    /// Whether the current frame belongs to that message (not a control frame).
    in_data_frame: bool,
    utf8: Utf8,
}

/// A data message whose frames are still arriving.
#[derive(Debug, Clone, Copy)]
struct Open {
    opcode: OpCode,
    /// The payload bytes its frames have declared so far (an empty frame that does not
    /// end the message counts as one).
    declared: u64,
    /// Its first frame had RSV1 set (permessage-deflate).
    compressed: bool,
    /// For a compressed message, the bytes it has inflated to so far.
    inflated: u64,
}

/// A limit on a compressed message's wire bytes: the limit on its inflated bytes, plus
/// 1/64 of it and 1 KiB. Deflate makes data that does not compress (random bytes, images,
/// already compressed files) a little larger: 5 bytes per stored block, more when the
/// sender flushes often; zlib's own bound is about 1/4096. Without a wire limit, endless
/// empty deflate blocks would pass unmetered.
pub fn with_deflate_room(limit: u64) -> u64 {
    limit.saturating_add(limit / 64).saturating_add(1024)
}

impl Messages {
    /// A frame header arrived: may the frame go on?
    pub fn header(
        &mut self,
        header: &Header,
        max_frame: u64,
        max_message: u64,
    ) -> Result<(), Violation> {
        if header.opcode.is_control() {
            self.in_data_frame = false;
            return Ok(());
        }
        // A compressed message's wire bytes get deflate's room over the limits (data that
        // does not compress comes out a little larger); its inflated size is held to
        // `max_message` exactly, as it inflates.
        let compressed = match self.open {
            Some(open) => open.compressed,
            None => header.compressed,
        };
        let (max_frame, max_message) = match compressed {
            true => (with_deflate_room(max_frame), with_deflate_room(max_message)),
            false => (max_frame, max_message),
        };
        if header.len > max_frame {
            return Err(Violation::TooBig);
        }
        let so_far = match (header.opcode, self.open) {
            (OpCode::Continuation, None) => {
                return Err(Violation::Protocol(
                    "a continuation frame with no message to continue",
                ))
            }
            (OpCode::Continuation, Some(open)) => open.declared,
            (_, Some(_)) => {
                return Err(Violation::Protocol(
                    "a new message began inside a fragmented one",
                ))
            }
            (opcode, None) => {
                self.open = Some(Open {
                    opcode,
                    declared: 0,
                    compressed: header.compressed,
                    inflated: 0,
                });
                self.utf8 = Utf8::default();
                0
            }
        };
        // A compressed message is held to the limit on the wire too, with deflate's room
        // (its inflated size is counted as it inflates). An empty frame that does not end its message counts as
        // one byte, so that a message has at most as many frames as the limit allows
        // bytes: endless empty fragments would otherwise pass unmetered.
        let weight = match header.len {
            0 if !header.fin => 1,
            len => len,
        };
        let total = so_far.saturating_add(weight);
        if total > max_message {
            return Err(Violation::TooBig);
        }
        if let Some(open) = &mut self.open {
            open.declared = total;
        }
        self.in_data_frame = true;
        Ok(())
    }

    /// Unmasked payload bytes of the current frame, in order (for a compressed message,
    /// see [`Messages::inflated`]).
    pub fn payload(&mut self, chunk: &[u8]) -> Result<(), Violation> {
        match self.open {
            Some(Open {
                opcode: OpCode::Text,
                compressed: false,
                ..
            }) if self.in_data_frame => self.utf8.feed(chunk).map_err(|_| Violation::InvalidUtf8),
            _ => Ok(()),
        }
    }

    /// Inflated bytes of the current compressed message, in order: counted against
    /// `max_message` (1009 as soon as the message inflates past it) and, for text, checked
    /// as UTF-8.
    pub fn inflated(&mut self, piece: &[u8], max_message: u64) -> Result<(), Violation> {
        let Some(open) = &mut self.open else {
            return Ok(());
        };
        // The bytes within the limit are checked before the limit is: the verdict is the
        // first rule broken in the message's order, however it was inflated.
        let room = max_message.saturating_sub(open.inflated);
        let within = &piece[..piece.len().min(usize::try_from(room).unwrap_or(usize::MAX))];
        open.inflated = open.inflated.saturating_add(piece.len() as u64);
        if open.opcode == OpCode::Text {
            self.utf8.feed(within).map_err(|_| Violation::InvalidUtf8)?;
        }
        if within.len() < piece.len() {
            return Err(Violation::TooBig);
        }
        Ok(())
    }

    /// The current frame's payload is complete. For the last frame of a data message
    /// (`fin`), the message ends: its text must be complete UTF-8.
    pub fn frame_end(&mut self, fin: bool) -> Result<(), Violation> {
        if !std::mem::take(&mut self.in_data_frame) || !fin {
            return Ok(());
        }
        let ended = self.open.take();
        if ended.is_some_and(|open| open.opcode == OpCode::Text) {
            return self.utf8.finish().map_err(|_| Violation::InvalidUtf8);
        }
        Ok(())
    }

    /// Whether the current frame's payload is checked as it stands (uncompressed text): a
    /// binary payload need not be unmasked at all.
    pub fn checks_payload(&self) -> bool {
        self.in_data_frame
            && self
                .open
                .is_some_and(|open| open.opcode == OpCode::Text && !open.compressed)
    }

    /// Whether the current frame belongs to a compressed message (its payload is inflated
    /// to be checked).
    pub fn inflates_payload(&self) -> bool {
        self.in_data_frame && self.open.is_some_and(|open| open.compressed)
    }

    /// Whether a fragmented message is open (its next data frame must be a continuation).
    pub fn in_message(&self) -> bool {
        self.open.is_some()
    }
}

/// What a close frame's payload says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosePayload<'a> {
    /// No payload: no status code (1005 to the application).
    Empty,
    Code(u16, &'a str),
}

/// Why a close payload is refused: 1002 for the length or code, 1007 for the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CloseError {
    #[error("a close payload of one byte")]
    OneByte,
    #[error("close code {0} may not be sent")]
    Code(u16),
    #[error("the close reason is not valid UTF-8")]
    Reason,
}

impl CloseError {
    /// The close code the sender of such a payload gets.
    pub fn code(self) -> u16 {
        match self {
            CloseError::OneByte | CloseError::Code(_) => 1002,
            CloseError::Reason => 1007,
        }
    }
}

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4.1–7.4.2 and the IANA
/// registry): 1000–1003, 1007–1014 and 3000–4999. 1014 ("Bad Gateway") comes from a
/// gateway, and also back from a client echoing the gate's own 1014 (Python `websockets`
/// does), or from an upstream that is itself a proxy; 1004–1006 and 1015 never go on the
/// wire.
pub fn code_may_be_sent(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Read an (unmasked) close payload.
pub fn parse_close(payload: &[u8]) -> Result<ClosePayload<'_>, CloseError> {
    match payload {
        [] => Ok(ClosePayload::Empty),
        [_] => Err(CloseError::OneByte),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !code_may_be_sent(code) {
                return Err(CloseError::Code(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| CloseError::Reason)?;
            Ok(ClosePayload::Code(code, reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, len: u64) -> Header {
        Header {
            fin,
            opcode,
            mask,
            len,
            compressed: false,
        }
    }

    #[test]
    fn headers_round_trip_at_every_length_encoding() {
        for len in [0, 1, 125, 126, 127, 0xFFFF, 0x1_0000, u64::MAX >> 1] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let h = header(true, OpCode::Binary, mask, len);
                let mut out = [0u8; MAX_HEADER];
                let n = write_header(&h, &mut out);
                let from = if mask.is_some() {
                    From::Client
                } else {
                    From::Server
                };
                assert_eq!(
                    parse_header(&out[..n], from, false),
                    Ok(Some((h, n))),
                    "{len}"
                );
                // Every strict prefix is incomplete, never an error.
                for cut in 0..n {
                    assert_eq!(
                        parse_header(&out[..cut], from, false),
                        Ok(None),
                        "{len} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn what_rfc_6455_refuses_is_refused() {
        let client = |bytes: &[u8]| parse_header(bytes, From::Client, false);
        assert_eq!(
            client(&[0xC1, 0x80, 0, 0, 0, 0]),
            Err(HeaderError::ReservedBits)
        );
        assert_eq!(
            client(&[0x83, 0x80, 0, 0, 0, 0]),
            Err(HeaderError::ReservedOpcode(3))
        );
        assert_eq!(
            client(&[0x09, 0x80, 0, 0, 0, 0]),
            Err(HeaderError::FragmentedControl)
        );
        assert_eq!(
            client(&[0x89, 0xFE, 0, 126]),
            Err(HeaderError::ControlTooLong)
        );
        assert_eq!(client(&[0x81, 0x05]), Err(HeaderError::Unmasked));
        assert_eq!(
            parse_header(&[0x81, 0x85], From::Server, false),
            Err(HeaderError::Masked)
        );
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(client(&huge), Err(HeaderError::LengthTooLarge));
        // Lengths not in their shortest form, either side; the shortest forms pass.
        let server = |bytes: &[u8]| parse_header(bytes, From::Server, false);
        assert_eq!(
            server(&[0x82, 0x7E, 0, 5]),
            Err(HeaderError::NonMinimalLength)
        );
        assert_eq!(
            server(&[0x82, 0x7E, 0, 125]),
            Err(HeaderError::NonMinimalLength)
        );
        assert!(matches!(server(&[0x82, 0x7E, 0, 126]), Ok(Some(_))));
        assert_eq!(
            client(&[0x82, 0xFE, 0, 5, 1, 2, 3, 4]),
            Err(HeaderError::NonMinimalLength)
        );
        let mut long = vec![0x82, 0x7F];
        long.extend_from_slice(&65_535u64.to_be_bytes());
        assert_eq!(server(&long), Err(HeaderError::NonMinimalLength));
        let mut long = vec![0x82, 0x7F];
        long.extend_from_slice(&65_536u64.to_be_bytes());
        assert!(matches!(server(&long), Ok(Some(_))));
    }

    #[test]
    fn rsv1_marks_a_compressed_message_only_where_deflate_was_negotiated() {
        let mut h = header(true, OpCode::Text, None, 5);
        h.compressed = true;
        let mut out = [0u8; MAX_HEADER];
        let n = write_header(&h, &mut out);
        assert_eq!(out[0], 0xC1);
        assert_eq!(
            parse_header(&out[..n], From::Server, true),
            Ok(Some((h, n)))
        );
        assert_eq!(
            parse_header(&out[..n], From::Server, false),
            Err(HeaderError::ReservedBits)
        );
        // RSV1 on a continuation or a control frame; RSV2 and RSV3 stay reserved.
        for b0 in [0xC0, 0xC9, 0xCA, 0xC8] {
            assert_eq!(
                parse_header(&[b0, 0x00], From::Server, true),
                Err(HeaderError::CompressedNotFirst),
                "{b0:#x}"
            );
        }
        for b0 in [0xA1, 0x91] {
            assert_eq!(
                parse_header(&[b0, 0x00], From::Server, true),
                Err(HeaderError::ReservedBits)
            );
        }
    }

    #[test]
    fn masking_in_chunks_equals_masking_at_once() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut whole = data.clone();
        apply_mask(&mut whole, key, 0);
        for (i, b) in whole.iter().enumerate() {
            assert_eq!(*b, data[i] ^ key[i % 4]);
        }
        for split in [1, 3, 7, 8, 9, 500, 999] {
            let mut parts = data.clone();
            let (a, b) = parts.split_at_mut(split);
            apply_mask(a, key, 0);
            apply_mask(b, key, split as u64);
            assert_eq!(parts, whole, "split at {split}");
        }
    }

    #[test]
    fn utf8_across_chunks() {
        let text = "héllo wörld ✓ 🚀".as_bytes();
        for split in 0..=text.len() {
            let mut v = Utf8::default();
            assert!(v.feed(&text[..split]).is_ok(), "{split}");
            assert!(v.feed(&text[split..]).is_ok(), "{split}");
            assert!(v.finish().is_ok(), "{split}");
        }
        let mut v = Utf8::default();
        assert!(v.feed(&[0xF0, 0x9F]).is_ok());
        assert_eq!(v.finish(), Err(InvalidUtf8));
        let mut v = Utf8::default();
        assert_eq!(
            v.feed(&[0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xED, 0xA0]),
            Err(InvalidUtf8)
        );
    }

    fn frame(fin: bool, opcode: OpCode, len: u64) -> Header {
        header(fin, opcode, Some([0; 4]), len)
    }

    #[test]
    fn fragmentation_and_limits() {
        let mut m = Messages::default();
        // A fragmented text message with a ping between its fragments.
        assert_eq!(m.header(&frame(false, OpCode::Text, 3), 10, 20), Ok(()));
        assert_eq!(m.payload("hé".as_bytes()), Ok(()));
        assert_eq!(m.frame_end(false), Ok(()));
        assert_eq!(m.header(&frame(true, OpCode::Ping, 2), 10, 20), Ok(()));
        assert_eq!(m.payload(b"pi"), Ok(()));
        assert_eq!(m.frame_end(true), Ok(()));
        assert!(m.in_message());
        assert_eq!(
            m.header(&frame(false, OpCode::Binary, 1), 10, 20),
            Err(Violation::Protocol(
                "a new message began inside a fragmented one"
            ))
        );
        let mut m = Messages::default();
        assert_eq!(m.header(&frame(false, OpCode::Text, 10), 10, 20), Ok(()));
        assert_eq!(m.frame_end(false), Ok(()));
        assert_eq!(
            m.header(&frame(true, OpCode::Continuation, 10), 10, 20),
            Ok(())
        );
        assert_eq!(m.frame_end(true), Ok(()));
        assert!(!m.in_message());
        // Limits, from the header alone.
        assert_eq!(
            m.header(&frame(true, OpCode::Binary, 11), 10, 20),
            Err(Violation::TooBig)
        );
        let mut m = Messages::default();
        assert_eq!(m.header(&frame(false, OpCode::Binary, 10), 10, 15), Ok(()));
        assert_eq!(m.frame_end(false), Ok(()));
        assert_eq!(
            m.header(&frame(true, OpCode::Continuation, 6), 10, 15),
            Err(Violation::TooBig)
        );
        let mut m = Messages::default();
        assert_eq!(
            m.header(&frame(true, OpCode::Continuation, 1), 10, 20)
                .map_err(Violation::code),
            Err(1002)
        );
        // Empty fragments that do not end the message count one byte each: a message
        // cannot go on in them for ever. An empty last fragment counts nothing.
        let mut m = Messages::default();
        assert_eq!(m.header(&frame(false, OpCode::Binary, 18), 20, 20), Ok(()));
        assert_eq!(m.frame_end(false), Ok(()));
        for _ in 0..2 {
            assert_eq!(
                m.header(&frame(false, OpCode::Continuation, 0), 20, 20),
                Ok(())
            );
            assert_eq!(m.frame_end(false), Ok(()));
        }
        assert_eq!(
            m.header(&frame(true, OpCode::Continuation, 0), 20, 20),
            Ok(())
        );
        assert_eq!(m.frame_end(true), Ok(()));
        assert_eq!(m.header(&frame(false, OpCode::Binary, 19), 20, 20), Ok(()));
        assert_eq!(m.frame_end(false), Ok(()));
        assert_eq!(
            m.header(&frame(false, OpCode::Continuation, 0), 20, 20),
            Ok(())
        );
        assert_eq!(m.frame_end(false), Ok(()));
        assert_eq!(
            m.header(&frame(false, OpCode::Continuation, 0), 20, 20),
            Err(Violation::TooBig)
        );
        // Text split inside a character is fine; ending inside one is 1007.
        let mut m = Messages::default();
        assert_eq!(m.header(&frame(false, OpCode::Text, 1), 10, 20), Ok(()));
        assert_eq!(m.payload(&[0xC3]), Ok(()));
        assert_eq!(m.frame_end(false), Ok(()));
        assert_eq!(
            m.header(&frame(true, OpCode::Continuation, 0), 10, 20),
            Ok(())
        );
        assert_eq!(m.frame_end(true).map_err(Violation::code), Err(1007));
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close(&[]), Ok(ClosePayload::Empty));
        assert_eq!(parse_close(&[3]), Err(CloseError::OneByte));
        assert_eq!(
            parse_close(&[0x03, 0xE8, b'o', b'k']),
            Ok(ClosePayload::Code(1000, "ok"))
        );
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(
                parse_close(&code.to_be_bytes()),
                Err(CloseError::Code(code))
            );
        }
        assert_eq!(parse_close(&[0x03, 0xE8, 0xFF]), Err(CloseError::Reason));
        assert_eq!(CloseError::Reason.code(), 1007);
    }
}
