//! permessage-deflate (RFC 7692) on the receiving side, for checking only: the relay
//! forwards compressed frames as they came and inflates a copy of their payload as it
//! passes, so that the inflated size, the message type and the UTF-8 of text can be held
//! to the route's rules. No I/O; inflated bytes go to a caller's sink piece by piece
//! (at most [`PIECE`] at a time, from a buffer on the stack) and are never kept.
//!
//! Memory: one inflate state (zlib-rs through flate2) per direction, made at that
//! direction's first compressed message. When the sender takes its compression context
//! over from one message to the next (RFC 7692 §7.1.1), the state and its window stay for
//! the connection's life; when it does not (`*_no_context_takeover`), the state is freed
//! at the end of every message, so an idle connection holds none. A freed state with the
//! full 15-bit window is kept, reset, as the worker thread's one spare and handed to the
//! next message that needs one, so a connection without context takeover costs no
//! allocation per message (and the spare is the thread's, bounded: one per worker).

use std::cell::Cell;

use flate2::{Decompress, FlushDecompress, Status};

pub use crate::extensions::Deflate;

/// The most inflated bytes handed to the sink at once.
pub const PIECE: usize = 8 * 1024;

/// What RFC 7692 §7.2.2 has the receiver append to a message's payload before inflating
/// its end (the sender removed it).
const TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

impl Deflate {
    /// The inflate window used for this sender: zlib's raw inflate takes 9 to 15 bits,
    /// and a deflater asked for 8 uses 9 (zlib's own rule), so 8 reads as 9.
    fn inflate_bits(self) -> u8 {
        self.window_bits.clamp(9, 15)
    }

    /// The heap an inflate state for this sender holds at most, in bytes: zlib-rs's state
    /// (about 7 KiB of tables and bookkeeping) plus its window, rounded up.
    pub fn memory_bound(self) -> usize {
        8 * 1024 + (1 << self.inflate_bits())
    }
}

/// The window of the states kept as spares: the default, which most peers use and which
/// flate2 resets without reallocating.
const SPARE_BITS: u8 = 15;

thread_local! {
    /// This worker thread's spare inflate state (see the module's documentation).
    static SPARE: Cell<Option<Decompress>> = const { Cell::new(None) };
}

/// A fresh inflate state: the thread's spare when it fits, else a new one.
fn take_state(bits: u8) -> Decompress {
    let spare = (bits == SPARE_BITS)
        .then(|| SPARE.try_with(Cell::take).ok().flatten())
        .flatten();
    spare.unwrap_or_else(|| Decompress::new_with_window_bits(false, bits))
}

/// Give a state back: reset as the thread's spare when it fits, else freed.
fn give_back(mut state: Decompress, bits: u8) {
    if bits == SPARE_BITS {
        state.reset(false);
        let _ = SPARE.try_with(|spare| spare.set(Some(state)));
    }
}

/// The compressed bytes are not a deflate stream (1007 to their sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a compressed message is not valid deflate data")]
pub struct InvalidDeflate;

/// One direction's inflate state, fed a compressed message's payload as it passes.
pub struct Inflater {
    deflate: Deflate,
    state: Option<Decompress>,
    /// The current message's deflate data ended with a final block: whatever else the
    /// message carries is not inflated (zlib's inflate ignores it the same way).
    ended: bool,
}

impl Inflater {
    pub fn new(deflate: Deflate) -> Inflater {
        Inflater {
            deflate,
            state: None,
            ended: false,
        }
    }

    /// Whether an inflate state is held now (between messages: only with context
    /// takeover).
    pub fn holds_state(&self) -> bool {
        self.state.is_some()
    }

    /// The inflate window of a message about to begin, when it will be inflated from an
    /// empty state and nothing of it kept after it (no context takeover): what it
    /// inflates to then depends on its bytes alone (see [`super::checked`]).
    pub fn window_for_a_stream_of_its_own(&self) -> Option<u8> {
        let afresh = !self.deflate.context_takeover && self.state.is_none() && !self.ended;
        afresh.then(|| self.deflate.inflate_bits())
    }

    /// Inflate the next (unmasked) payload bytes of a compressed message, handing the
    /// inflated bytes to `sink` as they come; stops at the first error, the sink's or the
    /// data's.
    pub fn feed<E: std::convert::From<InvalidDeflate>>(
        &mut self,
        mut input: &[u8],
        sink: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.ended {
            return Ok(());
        }
        let bits = self.deflate.inflate_bits();
        let state = self.state.get_or_insert_with(|| take_state(bits));
        let mut out = [0u8; PIECE];
        loop {
            let (read, written) = (state.total_in(), state.total_out());
            let result = state.decompress(input, &mut out, FlushDecompress::None);
            let consumed = (state.total_in() - read) as usize;
            let produced = (state.total_out() - written) as usize;
            input = &input[consumed..];
            // What was inflated before bad data goes to the sink first, so that the
            // verdict is the first rule broken in the message's order, however its bytes
            // arrived.
            if produced > 0 {
                sink(&out[..produced])?;
            }
            match result.map_err(|_| InvalidDeflate)? {
                Status::StreamEnd => {
                    self.ended = true;
                    return Ok(());
                }
                // The output buffer was filled: more may be waiting even with no input.
                Status::Ok if produced == out.len() => {}
                Status::Ok | Status::BufError if input.is_empty() || consumed + produced == 0 => {
                    return Ok(())
                }
                Status::Ok | Status::BufError => {}
            }
        }
    }

    /// The compressed message ended: inflate the tail its sender removed, then keep the
    /// state for the next message (context takeover) or free it.
    pub fn finish<E: std::convert::From<InvalidDeflate>>(
        &mut self,
        sink: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let fed = self.feed(&TAIL, sink);
        // Taken whatever the context: a final block ends this message's stream only.
        let ended = std::mem::take(&mut self.ended);
        if !self.deflate.context_takeover || ended {
            // A final block ends the sender's stream; a next message starts a new one.
            self.release();
        }
        fed
    }

    fn release(&mut self) {
        if let Some(state) = self.state.take() {
            give_back(state, self.deflate.inflate_bits());
        }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    /// What a permessage-deflate sender puts in a message: raw deflate, sync-flushed, the
    /// trailing 00 00 FF FF removed.
    fn compress(state: &mut Compress, text: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len() + 64);
        state
            .compress_vec(text, &mut out, FlushCompress::Sync)
            .unwrap();
        while out.len() == out.capacity() {
            out.reserve(1024);
            state
                .compress_vec(&[], &mut out, FlushCompress::Sync)
                .unwrap();
        }
        assert_eq!(out[out.len() - 4..], TAIL);
        out.truncate(out.len() - 4);
        out
    }

    fn inflate_all(inflater: &mut Inflater, payload: &[u8], cut: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut sink = |piece: &[u8]| -> Result<(), InvalidDeflate> {
            got.extend_from_slice(piece);
            Ok(())
        };
        let cut = cut.min(payload.len());
        inflater.feed(&payload[..cut], &mut sink).unwrap();
        inflater.feed(&payload[cut..], &mut sink).unwrap();
        inflater.finish(&mut sink).unwrap();
        got
    }

    fn json(n: usize) -> Vec<u8> {
        let mut s = String::from("[");
        for i in 0..n {
            s.push_str(&format!(
                "{{\"id\":{i},\"user\":\"u{}\",\"ok\":true}},",
                i % 7
            ));
        }
        s.push(']');
        s.into_bytes()
    }

    #[test]
    fn messages_inflate_however_they_are_cut_with_and_without_context_takeover() {
        for takeover in [true, false] {
            let deflate = Deflate {
                context_takeover: takeover,
                window_bits: 15,
            };
            let mut sender = Compress::new(Compression::default(), false);
            let mut inflater = Inflater::new(deflate);
            for (i, cut) in [0, 1, 7, 100, 5000].into_iter().enumerate() {
                let text = json(200 + i * 50);
                let payload = compress(&mut sender, &text);
                if !takeover {
                    sender.reset();
                }
                assert_eq!(inflate_all(&mut inflater, &payload, cut), text, "cut {cut}");
                assert_eq!(inflater.holds_state(), takeover);
                // A state let go waits, reset, as the thread's spare for the next message.
                let spare = SPARE.with(|s| {
                    let v = s.take();
                    let held = v.is_some();
                    s.set(v);
                    held
                });
                assert_eq!(spare, !takeover);
            }
        }
    }

    #[test]
    fn the_sink_sees_a_bomb_piece_by_piece_and_can_stop_it() {
        let zeros = vec![0u8; 8 << 20];
        let mut sender = Compress::new(Compression::best(), false);
        let payload = compress(&mut sender, &zeros);
        assert!(payload.len() < 16 * 1024, "{}", payload.len());
        let mut inflater = Inflater::new(Deflate {
            context_takeover: false,
            window_bits: 15,
        });
        #[derive(Debug, PartialEq)]
        enum Stop {
            Limit,
            Bad,
        }
        impl std::convert::From<InvalidDeflate> for Stop {
            fn from(_: InvalidDeflate) -> Stop {
                Stop::Bad
            }
        }
        let mut seen = 0usize;
        let mut sink = |piece: &[u8]| {
            assert!(piece.len() <= PIECE);
            seen += piece.len();
            if seen > 100_000 {
                Err(Stop::Limit)
            } else {
                Ok(())
            }
        };
        assert_eq!(inflater.feed(&payload, &mut sink), Err(Stop::Limit));
        assert!(seen <= 100_000 + PIECE);
    }

    #[test]
    fn garbage_is_invalid_deflate() {
        let mut inflater = Inflater::new(Deflate {
            context_takeover: true,
            window_bits: 15,
        });
        let mut sink = |_: &[u8]| -> Result<(), InvalidDeflate> { Ok(()) };
        // A block type of 3 is reserved (RFC 1951 §3.2.3).
        assert_eq!(inflater.feed(&[0xFF, 0xFF], &mut sink), Err(InvalidDeflate));
    }

    #[test]
    fn a_final_block_ends_the_message_stream() {
        let text = json(50);
        let mut sender = Compress::new(Compression::default(), false);
        let mut payload = Vec::with_capacity(4096);
        sender
            .compress_vec(&text, &mut payload, FlushCompress::Finish)
            .unwrap();
        let mut inflater = Inflater::new(Deflate {
            context_takeover: true,
            window_bits: 15,
        });
        assert_eq!(inflate_all(&mut inflater, &payload, 10), text);
        assert!(!inflater.holds_state());
    }

    #[test]
    fn a_final_block_without_context_takeover_leaves_the_next_message_checked() {
        let mut inflater = Inflater::new(Deflate {
            context_takeover: false,
            window_bits: 15,
        });
        for _ in 0..2 {
            let text = json(50);
            let mut sender = Compress::new(Compression::default(), false);
            let mut payload = Vec::with_capacity(4096);
            sender
                .compress_vec(&text, &mut payload, FlushCompress::Finish)
                .unwrap();
            assert_eq!(inflate_all(&mut inflater, &payload, 10), text);
        }
    }

    #[test]
    fn small_windows_read_as_zlib_allows() {
        let d = |bits| Deflate {
            context_takeover: true,
            window_bits: bits,
        };
        assert_eq!(d(8).inflate_bits(), 9);
        assert_eq!(d(15).inflate_bits(), 15);
        assert_eq!(d(15).memory_bound(), 40 * 1024);
    }
}
