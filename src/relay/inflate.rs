//! permessage-deflate (RFC 7692) on the receiving side, for checking only: the relay
//! forwards compressed frames as they came and inflates a copy of their payload as it
//! passes, so that the inflated size, the message type and the UTF-8 of text can be held
//! to the route's rules. No I/O; inflated bytes go to a caller's sink piece by piece
//! (at most [`PIECE`] at a time, from a buffer on the stack) and are never kept.
//!
//! Memory: one inflate state (zlib-rs through flate2, about 47 KiB whatever the window)
//! per direction while a compressed message passes. When the sender does not take its
//! compression context over from one message to the next (`*_no_context_takeover`), the
//! state is freed at the end of every message, so an idle connection holds none. When it
//! does (RFC 7692 §7.1.1), the next message may refer to the last bytes the earlier ones
//! inflated to, up to the sender's window: while those are at most [`SHORT_HISTORY`]
//! bytes (always, for windows of 13 bits or fewer; for the first few kilobytes of a
//! connection, for larger ones), they alone are kept between messages and given to a
//! fresh state as its dictionary when the next message begins; past that, the state
//! stays for the connection's life. A freed state with the full 15-bit window is kept,
//! reset, as the worker thread's one spare and handed to the next message that needs
//! one, so freeing it costs no allocation per message (and the spare is the thread's,
//! bounded: one per worker).

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

    /// The heap an inflate state holds, in bytes: zlib-rs makes one allocation of its
    /// state (about 14 KiB of tables and bookkeeping) and a 32 KiB window, whatever the
    /// window bits (47,552 bytes with zlib-rs 0.6, counted), rounded up.
    pub fn memory_bound(self) -> usize {
        48 * 1024
    }
}

/// The most history (the sender's last inflated bytes, within its window) kept between
/// messages in place of the inflate state: copying it into a fresh state's window at the
/// next message costs little up to here, and saves the state's 47 KiB while the
/// connection idles.
pub const SHORT_HISTORY: usize = 8 * 1024;

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

/// Start a new deflate stream in `state` after a final block, with the same window.
fn restart(state: &mut Decompress, bits: u8) {
    if bits == SPARE_BITS {
        state.reset(false);
    } else {
        // flate2 resets to the default window; a smaller one is made anew.
        *state = Decompress::new_with_window_bits(false, bits);
    }
}

/// The most deflate streams one message may hold. A final block ends a stream and what
/// follows starts another (RFC 7692 §7.2.3.4); senders end a message with one at most,
/// but each restart costs the gate an inflate reset (or, under a narrowed window, a new
/// 47 KiB state) and inflates nothing, so a message of 2-byte empty streams would cost
/// far more than its inflated size says. Past this it is refused as invalid (1007).
pub const MAX_STREAMS_PER_MESSAGE: u32 = 64;

/// An empty final stored block (RFC 1951 §3.2.4): what a stream waiting for a block
/// header, and only such a stream, inflates to its end with no output.
const LAST_EMPTY_BLOCK: [u8; 5] = [0x01, 0x00, 0x00, 0xFF, 0xFF];

/// Whether `state` stands between two blocks, a new block's header next. Feeds it an
/// empty final block, so only for a state about to be let go.
fn at_block_boundary(state: &mut Decompress) -> bool {
    let (read, written) = (state.total_in(), state.total_out());
    let mut out = [0u8; 1];
    let result = state.decompress(&LAST_EMPTY_BLOCK, &mut out, FlushDecompress::Finish);
    matches!(result, Ok(Status::StreamEnd))
        && state.total_out() == written
        && state.total_in() - read == LAST_EMPTY_BLOCK.len() as u64
}

/// The compressed bytes are not a deflate stream (1007 to their sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a compressed message is not valid deflate data")]
pub struct InvalidDeflate;

/// One direction's inflate state, fed a compressed message's payload as it passes.
pub struct Inflater {
    deflate: Deflate,
    state: Option<Decompress>,
    /// Deflate streams ended so far in the message being inflated.
    streams: u32,
    /// With context takeover, while it is short: the last bytes inflated since the
    /// sender's deflate stream began, as many as its window reaches, kept in place of the
    /// state between messages. `None` without context takeover (nothing is kept), and
    /// once it outgrew [`SHORT_HISTORY`] (the state is kept instead).
    history: Option<Vec<u8>>,
}

impl Inflater {
    pub fn new(deflate: Deflate) -> Inflater {
        Inflater {
            deflate,
            state: None,
            streams: 0,
            history: deflate.context_takeover.then(Vec::new),
        }
    }

    /// Whether an inflate state is held now (between messages: only with context
    /// takeover, once the history outgrew [`SHORT_HISTORY`]).
    #[cfg(test)]
    fn holds_state(&self) -> bool {
        self.state.is_some()
    }

    /// How many bytes of history are kept in place of the state, if any is.
    #[cfg(test)]
    fn history_len(&self) -> Option<usize> {
        self.history.as_ref().map(Vec::len)
    }

    /// The inflate window of a message about to begin, when it will be inflated from an
    /// empty state and nothing of it kept after it (no context takeover): what it
    /// inflates to then depends on its bytes alone (see [`super::checked`]).
    pub fn window_for_a_stream_of_its_own(&self) -> Option<u8> {
        let afresh = !self.deflate.context_takeover && self.state.is_none();
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
        let bits = self.deflate.inflate_bits();
        let window = 1usize << bits;
        let state = hold_state(self.deflate, &mut self.state, &self.history)?;
        let history = &mut self.history;
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
                remember(history, &out[..produced], window);
            }
            match result.map_err(|_| InvalidDeflate)? {
                // A final block ends the sender's deflate stream, not its message: what
                // follows starts a new stream (RFC 7692 §7.2.3.4), and receivers such as
                // Chromium's inflate it, so it is inflated and held to the rules here too.
                Status::StreamEnd => {
                    self.streams += 1;
                    if self.streams > MAX_STREAMS_PER_MESSAGE {
                        return Err(InvalidDeflate.into());
                    }
                    restart(state, bits);
                    // A new stream refers to nothing before it.
                    if let Some(history) = history {
                        history.clear();
                    }
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
    /// history or the state for the next message (context takeover), or neither.
    pub fn finish<E: std::convert::From<InvalidDeflate>>(
        &mut self,
        sink: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut fed = self.feed(&TAIL, sink);
        self.streams = 0;
        // Kept for the connection's life, the state reads on from where the message
        // stopped, as every receiver does with context takeover. Let go (no context
        // takeover, or a short history standing in for it), the next message starts
        // afresh here but not at every receiver: Chromium's, for one, keeps inflating where
        // this message left off even without context takeover, and a fresh state from the
        // history reads nothing of a block left open. So a message that stops inside a
        // block (RFC 7692 §7.2.1 has its sender end it at a block boundary) would have them
        // read the next one differently from the gate: refused.
        let let_go = !self.deflate.context_takeover || self.history.is_some();
        if let_go {
            if fed.is_ok() && !self.state.as_mut().is_some_and(at_block_boundary) {
                fed = Err(InvalidDeflate.into());
            }
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

/// The state for a message's next bytes: the one `held`, or a fresh one that starts from
/// the `history` kept.
fn hold_state<'a>(
    deflate: Deflate,
    held: &'a mut Option<Decompress>,
    history: &Option<Vec<u8>>,
) -> Result<&'a mut Decompress, InvalidDeflate> {
    if let Some(state) = held {
        return Ok(state);
    }
    let bits = deflate.inflate_bits();
    let mut fresh = take_state(bits);
    if let Some(history) = history.as_deref().filter(|h| !h.is_empty()) {
        if fresh.set_dictionary(history).is_err() {
            give_back(fresh, bits);
            return Err(InvalidDeflate);
        }
    }
    Ok(held.insert(fresh))
}

/// Add a message's inflated `piece` to the sender's history, which keeps the last
/// `window` bytes; drop the history (the state is kept instead) once it would hold more
/// than [`SHORT_HISTORY`].
fn remember(history: &mut Option<Vec<u8>>, piece: &[u8], window: usize) {
    let Some(kept) = history else { return };
    let wanted = (kept.len() + piece.len()).min(window);
    if wanted > SHORT_HISTORY {
        *history = None;
        return;
    }
    let piece = &piece[piece.len().saturating_sub(window)..];
    kept.drain(..(kept.len() + piece.len() - wanted));
    if kept.capacity() < wanted {
        // Grown by doubling, never past what the window can need.
        let room = wanted.max(2 * kept.capacity()).min(window);
        kept.reserve_exact(room - kept.len());
    }
    kept.extend_from_slice(piece);
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
            let mut inflated = 0;
            for (i, cut) in [0, 1, 7, 100, 5000].into_iter().enumerate() {
                let text = json(200 + i * 50);
                let payload = compress(&mut sender, &text);
                if !takeover {
                    sender.reset();
                }
                assert_eq!(inflate_all(&mut inflater, &payload, cut), text, "cut {cut}");
                // With context takeover, the first message's 6 KiB are kept as history in
                // place of the state; from the second on, the state is kept.
                inflated += text.len();
                let long = takeover && inflated > SHORT_HISTORY;
                assert_eq!(inflater.holds_state(), long, "message {i}");
                assert_eq!(
                    inflater.history_len(),
                    (takeover && !long).then_some(inflated)
                );
                // A state let go waits, reset, as the thread's spare for the next message.
                let spare = SPARE.with(|s| {
                    let v = s.take();
                    let held = v.is_some();
                    s.set(v);
                    held
                });
                assert_eq!(spare, !long);
            }
        }
    }

    /// With context takeover, a sender's later messages refer back to its earlier ones;
    /// the history kept in place of the state carries those references.
    #[test]
    fn a_short_history_stands_in_for_the_state_between_messages() {
        for bits in [15u8, 12, 10, 9] {
            let deflate = Deflate {
                context_takeover: true,
                window_bits: bits,
            };
            let window = 1usize << bits;
            let mut sender = Compress::new_with_window_bits(Compression::default(), false, bits);
            let mut inflater = Inflater::new(deflate);
            let mut inflated = 0;
            for i in 0..60 {
                // Repeated messages, which the sender sends as back-references alone.
                let text = json(5 + i % 3);
                let payload = compress(&mut sender, &text);
                if i >= 3 {
                    assert!(payload.len() * 4 < text.len(), "bits {bits}, message {i}");
                }
                assert_eq!(
                    inflate_all(&mut inflater, &payload, i % 5),
                    text,
                    "bits {bits}"
                );
                inflated += text.len();
                let kept = inflated.min(window);
                if kept <= SHORT_HISTORY {
                    assert_eq!(inflater.history_len(), Some(kept), "bits {bits}");
                    assert!(!inflater.holds_state());
                } else {
                    assert_eq!(inflater.history_len(), None, "bits {bits}");
                    assert!(inflater.holds_state());
                }
            }
        }
    }

    /// A history at its window's size moves on with each piece inflated: the dictionary
    /// given to the next message's state is the sender's last window, however the message
    /// was cut into pieces.
    #[test]
    fn a_full_history_keeps_the_senders_last_window() {
        let deflate = Deflate {
            context_takeover: true,
            window_bits: 10,
        };
        let mut sender = Compress::new_with_window_bits(Compression::best(), false, 10);
        let mut inflater = Inflater::new(deflate);
        let mut all = Vec::new();
        for n in [3, 40, 1, 400, 2, 7] {
            let text = json(n);
            let payload = compress(&mut sender, &text);
            assert_eq!(inflate_all(&mut inflater, &payload, 1), text);
            all.extend_from_slice(&text);
            let history = inflater.history.as_deref().unwrap();
            assert_eq!(history, &all[all.len().saturating_sub(1024)..]);
            assert!(inflater.history.as_ref().unwrap().capacity() <= 1024);
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

    /// A message whose deflate data ends with a final block, as RFC 7692 §7.2.3.4 has it
    /// sent: the block, then one octet that starts an empty stored block (which the
    /// receiver's appended tail completes).
    fn with_final_block(text: &[u8]) -> Vec<u8> {
        let mut sender = Compress::new(Compression::default(), false);
        let mut payload = Vec::with_capacity(text.len() + 64);
        sender
            .compress_vec(text, &mut payload, FlushCompress::Finish)
            .unwrap();
        payload.push(0x00);
        payload
    }

    fn finish_alone(inflater: &mut Inflater, payload: &[u8]) -> Result<usize, InvalidDeflate> {
        let mut seen = 0;
        let mut sink = |piece: &[u8]| -> Result<(), InvalidDeflate> {
            seen += piece.len();
            Ok(())
        };
        inflater.feed(payload, &mut sink)?;
        inflater.finish(&mut sink)?;
        Ok(seen)
    }

    #[test]
    fn messages_ending_with_a_final_block_inflate_with_and_without_context_takeover() {
        for takeover in [true, false] {
            let mut inflater = Inflater::new(Deflate {
                context_takeover: takeover,
                window_bits: 15,
            });
            for n in [50, 80, 20] {
                let text = json(n);
                let payload = with_final_block(&text);
                assert_eq!(inflate_all(&mut inflater, &payload, 10), text);
                // The final block ended the sender's stream: nothing is kept for the next.
                assert!(!inflater.holds_state());
                assert_eq!(inflater.history_len(), takeover.then_some(0));
            }
        }
    }

    #[test]
    fn what_follows_a_final_block_is_inflated_and_counted() {
        // A final block of 2 bytes, then a stream of 4 MiB of zeros: a receiver that starts
        // a new stream after the final block (Chromium's does) gets all of it.
        let mut payload = Vec::with_capacity(16 * 1024);
        Compress::new(Compression::default(), false)
            .compress_vec(b"ok", &mut payload, FlushCompress::Finish)
            .unwrap();
        let mut sender = Compress::new(Compression::best(), false);
        payload.extend(compress(&mut sender, &vec![0u8; 4 << 20]));
        for (takeover, window_bits) in [(true, 15), (false, 15), (false, 10)] {
            let mut inflater = Inflater::new(Deflate {
                context_takeover: takeover,
                window_bits,
            });
            let seen = finish_alone(&mut inflater, &payload);
            assert_eq!(seen, Ok(2 + (4 << 20)), "window {window_bits}");
        }
    }

    /// Refused where the gate lets its state go after the message (without context
    /// takeover, and with it while a short history stands in for the state); read on from
    /// where it stopped once the state is kept, as every receiver with context takeover
    /// reads on.
    #[test]
    fn a_message_that_stops_inside_a_block_is_refused_where_the_state_is_let_go() {
        let deflate = |context_takeover| Deflate {
            context_takeover,
            window_bits: 15,
        };
        // A stored block that announces 65,535 bytes and carries 2: a receiver that keeps
        // its state (Chromium's) would read the next message's bytes as the rest of it.
        let open_stored = [0x00, 0xFF, 0xFF, 0x00, 0x00, b'h', b'i'];
        // A final block without the octet that follows it: the appended tail then starts
        // a stored block's header that the next message would finish.
        let mut bare_final = with_final_block(b"hello");
        bare_final.pop();
        // No deflate data at all: the appended tail alone opens a stored block.
        let empty: &[u8] = &[];
        for payload in [&open_stored[..], &bare_final, empty] {
            for context_takeover in [false, true] {
                let mut inflater = Inflater::new(deflate(context_takeover));
                assert_eq!(finish_alone(&mut inflater, payload), Err(InvalidDeflate));
                assert!(!inflater.holds_state());
            }
            // With context takeover, past the short history (the state kept), the gate
            // reads on as the receiver does.
            let mut sender = Compress::new(Compression::default(), false);
            let mut inflater = Inflater::new(deflate(true));
            let text = json(400);
            assert!(text.len() > SHORT_HISTORY);
            let first = compress(&mut sender, &text);
            assert_eq!(inflate_all(&mut inflater, &first, 5), text);
            assert!(inflater.holds_state());
            assert!(finish_alone(&mut inflater, payload).is_ok());
        }
        // The inflater is good for the next message after a refusal.
        let mut inflater = Inflater::new(deflate(false));
        let _ = finish_alone(&mut inflater, &open_stored);
        let text = json(30);
        let payload = compress(&mut Compress::new(Compression::default(), false), &text);
        assert_eq!(inflate_all(&mut inflater, &payload, 3), text);
    }

    #[test]
    fn small_windows_read_as_zlib_allows() {
        let d = |bits| Deflate {
            context_takeover: true,
            window_bits: bits,
        };
        assert_eq!(d(8).inflate_bits(), 9);
        assert_eq!(d(15).inflate_bits(), 15);
        assert_eq!(d(15).memory_bound(), 48 * 1024);
    }

    /// A message of empty deflate streams, 2 bytes each, inflates to nothing and would
    /// cost a reset each: past 64 streams it is refused; the next message starts afresh.
    #[test]
    fn a_message_of_many_empty_streams_is_refused() {
        let deflate = |context_takeover| Deflate {
            context_takeover,
            window_bits: 15,
        };
        for context_takeover in [true, false] {
            let mut inflater = Inflater::new(deflate(context_takeover));
            // Each `03 00` an empty final block; a message's last byte `00` is the header
            // of the empty stored block whose rest its sender removed (RFC 7692 §7.2.1).
            let empty_streams = |n: u32| [0x03u8, 0x00].repeat(n as usize);
            let mut sink = |_: &[u8]| Ok::<(), InvalidDeflate>(());
            assert_eq!(
                inflater.feed(
                    &[empty_streams(MAX_STREAMS_PER_MESSAGE), vec![0]].concat(),
                    &mut sink
                ),
                Ok(())
            );
            assert_eq!(inflater.finish(&mut sink), Ok(()));
            let mut inflater = Inflater::new(deflate(context_takeover));
            let mut fed = Ok(());
            // Across fragments too: the count is the message's.
            for _ in 0..4 {
                fed = fed.and(inflater.feed(&empty_streams(20), &mut sink));
            }
            assert_eq!(fed, Err(InvalidDeflate));
        }
    }
}
