//! The relay's reader: walks the bytes of each read from one leg, frame by frame, with the
//! codec of [`super::frame`], and says which bytes pass on (data frame headers and checked
//! payload) and which control frames arrived. It carries an incomplete header to the next
//! read, keeps the frame in progress and the message rules, and, where permessage-deflate
//! was agreed, inflates compressed messages to check them ([`super::inflate`]) or recalls
//! the verdict on the same bytes ([`super::checked`]). No I/O.

use super::checked;
use super::frame::{
    apply_mask, mask_from, parse_header, Deflate, From, Header, Messages, OpCode, Violation,
    MAX_CONTROL_PAYLOAD, MAX_HEADER,
};
use super::inflate::Inflater;

/// A control frame's opcode and (unmasked) payload, held inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    pub opcode: OpCode,
    len: u8,
    payload: [u8; MAX_CONTROL_PAYLOAD as usize],
}

impl Control {
    fn new(opcode: OpCode) -> Control {
        Control {
            opcode,
            len: 0,
            payload: [0; MAX_CONTROL_PAYLOAD as usize],
        }
    }

    pub fn payload(&self) -> &[u8] {
        &self.payload[..usize::from(self.len)]
    }

    /// Append payload bytes, unmasking them (`offset` is their place in the payload).
    fn extend(&mut self, bytes: &[u8], key: Option<[u8; 4]>, offset: u64) {
        let at = usize::from(self.len);
        let Some(into) = self.payload.get_mut(at..at + bytes.len()) else {
            return;
        };
        into.copy_from_slice(bytes);
        if let Some(key) = key {
            apply_mask(into, key, offset);
        }
        self.len += bytes.len() as u8;
    }

    pub fn with_payload(opcode: OpCode, payload: &[u8]) -> Control {
        let mut c = Control::new(opcode);
        let len = payload.len().min(MAX_CONTROL_PAYLOAD as usize);
        c.payload[..len].copy_from_slice(&payload[..len]);
        c.len = len as u8;
        c
    }
}

/// What one step of reading a leg's bytes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The bytes left are an incomplete header (or a data frame's header with none of its
    /// payload yet): carry them to the next read.
    Incomplete,
    /// A data frame's header of `len` bytes, to forward; `starts` a new message. With
    /// `piece`, the frame is a compressed one whose payload goes on as it arrives, one
    /// fragment per read: `piece` is the header to forward in place of the frame's own,
    /// for the payload that follows it in this read.
    DataHeader {
        len: usize,
        header: Header,
        starts: bool,
        piece: Option<Header>,
    },
    /// This many payload bytes of the current data frame, checked, to forward.
    Payload(usize),
    /// This many payload bytes of a compressed frame that goes on one fragment per read
    /// (the first step of a read), checked, to forward behind `header`: a continuation
    /// frame of their length, masked with the frame's key where the piece starts, final
    /// if the frame was and this piece ends it.
    Piece { len: usize, header: Header },
    /// This many bytes of a control frame, consumed; the frame once it is complete.
    Control(usize, Option<Control>),
}

/// A frame whose payload is still arriving.
#[derive(Clone, Copy)]
struct Current {
    header: Header,
    remaining: u64,
    /// Payload bytes already seen (the mask key's phase).
    offset: u64,
    /// A compressed frame split into one fragment per read (see [`Reader::next`]).
    split: bool,
    /// Payload bytes of this read already announced by the piece header that replaced the
    /// frame's own.
    covered: u64,
}

/// Where the frames read from a leg stand: the header bytes carried from the last read,
/// the frame in progress, the message rules, a control frame whose payload is split
/// across reads (held on the heap only then: most arrive whole and are read in place),
/// and, when permessage-deflate was negotiated, the inflate state that checks compressed
/// messages.
pub struct Reader {
    from: From,
    max_frame: u64,
    max_message: u64,
    carry: [u8; MAX_HEADER],
    carry_len: u8,
    current: Option<Current>,
    messages: Messages,
    partial: Option<Box<Control>>,
    inflater: Option<Box<Inflater>>,
    /// Bytes inflated from compressed messages so far.
    inflated: u64,
}

impl Reader {
    pub fn new(from: From, max_frame: u64, max_message: u64) -> Reader {
        Reader {
            from,
            max_frame,
            max_message,
            carry: [0; MAX_HEADER],
            carry_len: 0,
            current: None,
            messages: Messages::default(),
            partial: None,
            inflater: None,
            inflated: 0,
        }
    }

    /// The sender may compress messages as `deflate` says (permessage-deflate was
    /// negotiated): RSV1 marks a compressed message, whose payload is inflated to be
    /// checked.
    pub fn with_deflate(mut self, deflate: Option<Deflate>) -> Reader {
        self.inflater = deflate.map(|d| Box::new(Inflater::new(d)));
        self
    }

    /// Bytes inflated from compressed messages so far.
    pub fn inflated(&self) -> u64 {
        self.inflated
    }

    /// Whether the destination's byte stream stops inside a data frame (its header was
    /// forwarded, some of its payload was not): no frame of the gate's may go there now.
    /// A split compressed frame is inside a fragment only until the read that began it
    /// is passed on.
    pub fn in_data_frame(&self) -> bool {
        self.current
            .is_some_and(|c| !c.header.opcode.is_control() && (!c.split || c.covered > 0))
    }

    /// Read the next step from `data`, the unread bytes of this read.
    pub fn next(&mut self, data: &[u8]) -> Result<Step, Violation> {
        if let Some(current) = &mut self.current {
            let mut n = current.remaining.min(data.len() as u64) as usize;
            // A split frame's piece: the rest of this read, or what its header announced.
            let piece = match current.split {
                true if current.covered > 0 => {
                    n = n.min(current.covered as usize);
                    current.covered -= n as u64;
                    false
                }
                split => split,
            };
            let chunk = &data[..n];
            let key = current.header.mask;
            let offset = current.offset;
            current.remaining -= n as u64;
            current.offset += n as u64;
            let done = current.remaining == 0;
            let header = current.header;
            let step = match piece {
                true => Step::Piece {
                    len: n,
                    header: Header {
                        fin: done && header.fin,
                        opcode: OpCode::Continuation,
                        mask: key.map(|k| mask_from(k, offset)),
                        len: n as u64,
                        compressed: false,
                    },
                },
                false => Step::Payload(n),
            };
            if header.opcode.is_control() {
                let control = self
                    .partial
                    .get_or_insert_with(|| Box::new(Control::new(header.opcode)));
                control.extend(chunk, key, offset);
                if !done {
                    return Ok(Step::Control(n, None));
                }
                self.current = None;
                return Ok(Step::Control(n, self.partial.take().map(|c| *c)));
            }
            if self.messages.checks_payload() {
                let messages = &mut self.messages;
                match key {
                    Some(key) => unmasked(chunk, key, offset, |plain| messages.payload(plain))?,
                    None => messages.payload(chunk)?,
                }
            } else if self.messages.inflates_payload() {
                if done && offset == 0 && header.fin && header.opcode != OpCode::Continuation {
                    // A compressed message of one frame, whole in this read.
                    self.current = None;
                    self.check_whole_compressed(chunk, key, header.opcode == OpCode::Text)?;
                    return Ok(step);
                }
                self.inflate(chunk, key, offset)?;
            }
            if done {
                self.current = None;
                self.frame_end(header.fin)?;
            }
            return Ok(step);
        }
        let deflate = self.inflater.is_some();
        let Some((header, len)) = parse_header(data, self.from, deflate)? else {
            return Ok(Step::Incomplete);
        };
        let mut current = Current {
            header,
            remaining: header.len,
            offset: 0,
            split: false,
            covered: 0,
        };
        if header.opcode.is_control() {
            // A control frame that arrived whole is read where it lies.
            let whole = len + header.len as usize;
            if let Some(payload) = data.get(len..whole) {
                let mut control = Control::new(header.opcode);
                control.extend(payload, header.mask, 0);
                return Ok(Step::Control(whole, Some(control)));
            }
            self.current = Some(current);
            return Ok(Step::Control(len, None));
        }
        // The limits are checked on the header alone; a header whose payload has not
        // begun to arrive waits for it, so that header and payload leave together.
        let mut messages = self.messages.clone();
        messages.header(&header, self.max_frame, self.max_message)?;
        if header.len > 0 && data.len() == len {
            return Ok(Step::Incomplete);
        }
        self.messages = messages;
        // A compressed frame whose payload does not all come in this read goes on as one
        // fragment per read (RFC 6455 §5.4 lets an intermediary that knows the extension
        // refragment; RFC 7692 §6.1 keeps RSV1 on the first): its inflated size is only
        // known as it arrives, and a message found over the limit part way must still be
        // followed by a close frame, which no frame left unfinished would allow.
        let mut piece = None;
        let available = (data.len() - len) as u64;
        if self.messages.inflates_payload() && header.len > available {
            current.split = true;
            current.covered = available;
            piece = Some(Header {
                fin: false,
                len: available,
                ..header
            });
        }
        if header.len == 0 {
            self.frame_end(header.fin)?;
        } else {
            self.current = Some(current);
        }
        let starts = header.opcode != OpCode::Continuation;
        Ok(Step::DataHeader {
            len,
            header,
            starts,
            piece,
        })
    }

    /// The current data frame's payload is complete; a compressed message that ends here
    /// inflates its tail first.
    fn frame_end(&mut self, fin: bool) -> Result<(), Violation> {
        if fin && self.messages.inflates_payload() {
            if let Some(inflater) = &mut self.inflater {
                let (messages, max, inflated) =
                    (&mut self.messages, self.max_message, &mut self.inflated);
                inflater.finish(&mut |piece: &[u8]| {
                    *inflated += piece.len() as u64;
                    messages.inflated(piece, max)
                })?;
            }
        }
        self.messages.frame_end(fin)
    }

    /// Check a compressed message whose one frame is whole in `payload`: a message
    /// compressed as a stream of its own that this thread has already found good takes
    /// that verdict without being inflated again ([`super::checked`]); any other is
    /// inflated as a streamed one would be, and remembered if good.
    fn check_whole_compressed(
        &mut self,
        payload: &[u8],
        key: Option<[u8; 4]>,
        text: bool,
    ) -> Result<(), Violation> {
        let window = self
            .inflater
            .as_ref()
            .and_then(|inflater| inflater.window_for_a_stream_of_its_own());
        let Some(window_bits) = window.filter(|_| payload.len() <= checked::MAX_BYTES) else {
            self.inflate(payload, key, 0)?;
            return self.frame_end(true);
        };
        match key {
            None => self.check_stream_of_its_own(payload, text, window_bits),
            // A client's payload is compared and inflated unmasked: a copy, in the
            // thread's scratch space (the bytes themselves go on masked, as they came).
            Some(key) => checked::with_scratch(|copy| {
                copy.clear();
                copy.extend_from_slice(payload);
                apply_mask(copy, key, 0);
                self.check_stream_of_its_own(copy, text, window_bits)
            }),
        }
    }

    /// [`Reader::check_whole_compressed`] for a message compressed as a stream of its own,
    /// its payload unmasked.
    fn check_stream_of_its_own(
        &mut self,
        plain: &[u8],
        text: bool,
        window_bits: u8,
    ) -> Result<(), Violation> {
        let message = checked::Message::new(plain, text, window_bits);
        if let Some(size) = checked::recall(&message).filter(|&size| size <= self.max_message) {
            self.inflated += size;
            return self.messages.frame_end(true);
        }
        let before = self.inflated;
        self.inflate(plain, None, 0)?;
        self.frame_end(true)?;
        checked::remember(&message, self.inflated - before);
        Ok(())
    }

    /// Inflate a compressed message's payload chunk (unmasking a copy of a client's, a
    /// piece at a time: the bytes go on as they came) and check what it inflates to.
    fn inflate(
        &mut self,
        chunk: &[u8],
        key: Option<[u8; 4]>,
        offset: u64,
    ) -> Result<(), Violation> {
        let Some(inflater) = &mut self.inflater else {
            return Ok(());
        };
        let (messages, max, inflated) = (&mut self.messages, self.max_message, &mut self.inflated);
        let mut sink = |piece: &[u8]| {
            *inflated += piece.len() as u64;
            messages.inflated(piece, max)
        };
        match key {
            Some(key) => unmasked(chunk, key, offset, |plain| inflater.feed(plain, &mut sink)),
            None => inflater.feed(chunk, &mut sink),
        }
    }

    /// Keep the unread `rest` of this read (an incomplete header) for the next one.
    pub fn carry(&mut self, rest: &[u8]) {
        let n = rest.len().min(MAX_HEADER);
        self.carry[..n].copy_from_slice(&rest[..n]);
        self.carry_len = n as u8;
    }

    /// Put the carried bytes just before `buf[MAX_HEADER..]`; returns where they start.
    pub fn uncarry(&mut self, buf: &mut [u8]) -> usize {
        let n = usize::from(std::mem::take(&mut self.carry_len));
        let start = MAX_HEADER - n;
        buf[start..MAX_HEADER].copy_from_slice(&self.carry[..n]);
        start
    }
}

/// Hand `chunk`, masked with `key` from payload `offset` on, to `check` unmasked, a
/// copied piece at a time: the bytes themselves go on masked, as they came.
fn unmasked<E>(
    chunk: &[u8],
    key: [u8; 4],
    offset: u64,
    mut check: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    const PIECE: usize = 1024;
    let mut plain = [0u8; PIECE];
    for (i, piece) in chunk.chunks(PIECE).enumerate() {
        let plain = &mut plain[..piece.len()];
        plain.copy_from_slice(piece);
        apply_mask(plain, key, offset + (i * PIECE) as u64);
        check(plain)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::frame::write_header;

    /// One compressed message as permessage-deflate sends it without context takeover:
    /// a raw deflate stream of its own, sync-flushed, its 00 00 FF FF removed.
    fn compressed(data: &[u8]) -> Vec<u8> {
        use flate2::{Compress, Compression, FlushCompress};
        let mut state = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(data.len() + 64);
        state
            .compress_vec(data, &mut out, FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&[0, 0, 0xFF, 0xFF]));
        out.truncate(out.len() - 4);
        out
    }

    /// `payload` as a one-frame compressed message, masked when from a client.
    fn compressed_frame(opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let h = Header {
            fin: true,
            opcode,
            mask,
            len: payload.len() as u64,
            compressed: true,
        };
        let mut head = [0u8; MAX_HEADER];
        let n = write_header(&h, &mut head);
        let mut wire = head[..n].to_vec();
        let start = wire.len();
        wire.extend_from_slice(payload);
        if let Some(key) = mask {
            apply_mask(&mut wire[start..], key, 0);
        }
        wire
    }

    /// Read `wire` as one read: the first violation, if any.
    fn read_whole(reader: &mut Reader, wire: &[u8]) -> Result<(), Violation> {
        let mut at = 0;
        while at < wire.len() {
            at += match reader.next(&wire[at..])? {
                Step::Incomplete => panic!("a whole frame read as incomplete"),
                Step::DataHeader { len, .. } => len,
                Step::Payload(n) | Step::Piece { len: n, .. } | Step::Control(n, _) => n,
            };
        }
        Ok(())
    }

    fn reader(from: From, max_message: u64, context_takeover: bool) -> Reader {
        Reader::new(from, max_message, max_message).with_deflate(Some(Deflate {
            context_takeover,
            window_bits: 15,
        }))
    }

    #[test]
    fn a_compressed_message_checked_once_is_recalled_only_as_it_was_checked() {
        let text = "{\"price\": 10, \"symbol\": \"ÅÄÖ\"}".repeat(40);
        let payload = compressed(text.as_bytes());
        let inflated = text.len() as u64;
        let window = 15;
        // From a client (masked), then the same bytes from an upstream: one entry.
        let mut first = reader(From::Client, 1 << 20, false);
        let client = compressed_frame(OpCode::Text, &payload, Some([1, 2, 3, 4]));
        assert_eq!(read_whole(&mut first, &client), Ok(()));
        assert_eq!(first.inflated(), inflated);
        let message = checked::Message::new(&payload, true, window);
        assert_eq!(checked::recall(&message), Some(inflated));
        let mut second = reader(From::Server, 1 << 20, false);
        let upstream = compressed_frame(OpCode::Text, &payload, None);
        assert_eq!(read_whole(&mut second, &upstream), Ok(()));
        assert_eq!(second.inflated(), inflated);
        // A remembered size over a route's lower limit is inflated again and refused.
        let mut small = reader(From::Server, inflated - 1, false);
        assert_eq!(read_whole(&mut small, &upstream), Err(Violation::TooBig));

        // Bytes found good as binary are checked again as text.
        let not_utf8 = compressed(&[0xFF, 0xFE, 0x80].repeat(100));
        let mut binary = reader(From::Server, 1 << 20, false);
        let frame = compressed_frame(OpCode::Binary, &not_utf8, None);
        assert_eq!(read_whole(&mut binary, &frame), Ok(()));
        let mut as_text = reader(From::Server, 1 << 20, false);
        let frame = compressed_frame(OpCode::Text, &not_utf8, None);
        assert_eq!(
            read_whole(&mut as_text, &frame),
            Err(Violation::InvalidUtf8)
        );
        assert_eq!(
            checked::recall(&checked::Message::new(&not_utf8, true, window)),
            None
        );

        // With context takeover a message depends on those before it: never remembered.
        let other = compressed("another message, another verdict".as_bytes());
        let mut takeover = reader(From::Server, 1 << 20, true);
        let frame = compressed_frame(OpCode::Text, &other, None);
        assert_eq!(read_whole(&mut takeover, &frame), Ok(()));
        assert_eq!(
            checked::recall(&checked::Message::new(&other, true, window)),
            None
        );
    }
}
