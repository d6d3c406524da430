//! A worker thread's memory of compressed messages it has already inflated and found
//! good, so that the same bytes are not inflated again.
//!
//! A message compressed without context takeover (RFC 7692 §7.1.1) is a deflate stream
//! of its own: what it inflates to depends on its bytes and the window size alone. Servers
//! that broadcast compress such a message once and send the same bytes to every subscriber
//! (gorilla/websocket's `PreparedMessage`, uWebSockets' shared compressor, any fan-out
//! that caches the frame); a gate in front of them would otherwise inflate those bytes
//! once per subscriber. So the relay remembers, per worker thread, the last [`ENTRIES`]
//! such messages it inflated whole and found good — their bytes, whether they were text,
//! the window, and the size they inflated to — and a message with the same bytes, kind and
//! window takes that verdict without being inflated again. The bytes are compared in full
//! (the hash only finds the candidate), so a message that merely collides is inflated as
//! any other.
//!
//! Only good verdicts are kept: a message that broke a rule ended its connection. The
//! size limit is not part of the verdict: a remembered size over the route's
//! `max_message_bytes` is inflated again, so that the limit is enforced where it is
//! passed. Bounded: at most [`ENTRIES`] messages of at most [`MAX_BYTES`] each per worker
//! thread, replaced oldest first; a lookup is a CRC-32 of the payload, a scan of the
//! entries' hashes and one comparison; nothing is allocated but an entry's bytes, while
//! the memory fills.

use std::cell::Cell;

/// The largest compressed payload remembered. Broadcast messages are small; larger ones
/// cost one memory copy of this size on the stack to be unmasked and compared.
pub const MAX_BYTES: usize = 8 * 1024;

/// How many messages a worker thread remembers.
const ENTRIES: usize = 128;

/// A compressed message as the memory knows it: its unmasked payload, whether it is
/// text (checked as UTF-8) or binary, and its sender's inflate window.
#[derive(Clone, Copy)]
pub struct Message<'a> {
    bytes: &'a [u8],
    text: bool,
    window_bits: u8,
    hash: u32,
}

impl<'a> Message<'a> {
    pub fn new(bytes: &'a [u8], text: bool, window_bits: u8) -> Message<'a> {
        Message {
            bytes,
            text,
            window_bits,
            hash: crc32fast::hash(bytes),
        }
    }
}

#[derive(Default)]
struct Entry {
    hash: u32,
    text: bool,
    window_bits: u8,
    inflated: u64,
    bytes: Vec<u8>,
}

impl Entry {
    fn is(&self, message: &Message<'_>) -> bool {
        self.hash == message.hash
            && self.text == message.text
            && self.window_bits == message.window_bits
            && self.bytes == message.bytes
    }
}

#[derive(Default)]
struct Memory {
    entries: Vec<Entry>,
    /// The entry replaced next once all are in use (the oldest).
    next: usize,
}

thread_local! {
    static MEMORY: Cell<Memory> = Cell::new(Memory::default());
    /// Where a client's payload is unmasked to be compared and inflated.
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Run `f` with this thread's scratch buffer (it grows to the largest payload given it,
/// at most [`MAX_BYTES`] as the relay uses it, and is kept for the next message).
pub fn with_scratch<T>(f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    let mut scratch = SCRATCH.try_with(Cell::take).unwrap_or_default();
    let out = f(&mut scratch);
    let _ = SCRATCH.try_with(|cell| cell.set(scratch));
    out
}

fn with_memory<T>(f: impl FnOnce(&mut Memory) -> T) -> Option<T> {
    MEMORY
        .try_with(|cell| {
            let mut memory = cell.take();
            let out = f(&mut memory);
            cell.set(memory);
            out
        })
        .ok()
}

/// The size `message` inflates to, if this thread has found the same message good.
pub fn recall(message: &Message<'_>) -> Option<u64> {
    with_memory(|memory| {
        memory
            .entries
            .iter()
            .find(|entry| entry.is(message))
            .map(|entry| entry.inflated)
    })
    .flatten()
}

/// `message` was inflated whole, to `inflated` bytes, and broke no rule.
pub fn remember(message: &Message<'_>, inflated: u64) {
    if message.bytes.len() > MAX_BYTES {
        return;
    }
    with_memory(|memory| {
        // Already there when a remembered size was over a route's limit and the message
        // was inflated again.
        if memory.entries.iter().any(|entry| entry.is(message)) {
            return;
        }
        let entry = if memory.entries.len() < ENTRIES {
            memory.entries.push(Entry::default());
            memory.entries.last_mut()
        } else {
            let at = memory.next;
            memory.next = (at + 1) % ENTRIES;
            memory.entries.get_mut(at)
        };
        if let Some(entry) = entry {
            // An entry's buffer is reused: the memory allocates only while it fills or grows.
            entry.hash = message.hash;
            entry.text = message.text;
            entry.window_bits = message.window_bits;
            entry.inflated = inflated;
            entry.bytes.clear();
            entry.bytes.extend_from_slice(message.bytes);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_recalled_only_with_the_same_bytes_kind_and_window() {
        let bytes = b"not really deflate, the memory does not care".to_vec();
        let text = Message::new(&bytes, true, 15);
        assert_eq!(recall(&text), None);
        remember(&text, 1234);
        assert_eq!(recall(&Message::new(&bytes, true, 15)), Some(1234));
        assert_eq!(recall(&Message::new(&bytes, false, 15)), None);
        assert_eq!(recall(&Message::new(&bytes, true, 12)), None);
        let mut other = bytes.clone();
        other[3] ^= 1;
        assert_eq!(recall(&Message::new(&other, true, 15)), None);
        assert_eq!(recall(&Message::new(&bytes[1..], true, 15)), None);
    }

    #[test]
    fn the_memory_holds_at_most_its_entries_and_forgets_the_oldest() {
        let payloads: Vec<Vec<u8>> = (0..ENTRIES as u32 + 5)
            .map(|i| i.to_be_bytes().repeat(10))
            .collect();
        for (i, bytes) in payloads.iter().enumerate() {
            remember(&Message::new(bytes, false, 15), i as u64);
        }
        let held = with_memory(|m| m.entries.len()).unwrap();
        assert_eq!(held, ENTRIES);
        for (i, bytes) in payloads.iter().enumerate() {
            let expected = (i >= 5).then_some(i as u64);
            assert_eq!(recall(&Message::new(bytes, false, 15)), expected, "{i}");
        }
        let big = vec![7u8; MAX_BYTES + 1];
        remember(&Message::new(&big, false, 15), 1);
        assert_eq!(recall(&Message::new(&big, false, 15)), None);
    }
}
