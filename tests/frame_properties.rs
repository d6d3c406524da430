//! Properties of the relay's own frame codec (`wsgate::relay::frame`): it never panics on
//! any bytes, a header parses the same however its bytes arrive, headers round-trip,
//! masking in chunks equals masking at once, incremental UTF-8 validation agrees with
//! validating the whole message however it is split, and the message rules (fragmentation,
//! limits, UTF-8) find the same first violation fed chunk by chunk as read whole; and the
//! relay's reader passes on the same frames, and stops at the same violation, however a
//! stream is cut into reads.
//! `.ci/run` runs these at 5,000 cases.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseResult, TestRunner};
use wsgate::relay::frame::{
    apply_mask, code_may_be_sent, parse_close, parse_header, write_header, From, Header, Messages,
    OpCode, Utf8, Violation, MAX_HEADER,
};
use wsgate::relay::reader::{Reader, Step};

fn check<S: Strategy>(name: &str, strategy: S, property: impl Fn(S::Value) -> TestCaseResult) {
    let config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    if let Err(e) = TestRunner::new(config).run(&strategy, property) {
        panic!("property {name:?} failed: {e}");
    }
}

fn from() -> impl Strategy<Value = From> {
    prop_oneof![Just(From::Client), Just(From::Server)]
}

fn opcode() -> impl Strategy<Value = OpCode> {
    prop_oneof![
        Just(OpCode::Continuation),
        Just(OpCode::Text),
        Just(OpCode::Binary),
        Just(OpCode::Close),
        Just(OpCode::Ping),
        Just(OpCode::Pong),
    ]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..=130, 65_530u64..=65_540, 0u64..=(u64::MAX >> 1)]
}

/// Any bytes: parsing never panics, and a prefix gives either "not yet" or exactly what
/// the whole gives (the header is decided by its own bytes, not by how they arrive).
#[test]
fn a_header_parses_the_same_however_its_bytes_arrive() {
    let bytes = prop::collection::vec(any::<u8>(), 0..20);
    let deflate = any::<bool>();
    check(
        "header prefixes",
        (bytes, from(), deflate),
        |(bytes, from, deflate)| {
            let whole = parse_header(&bytes, from, deflate);
            for cut in 0..=bytes.len() {
                let part = parse_header(&bytes[..cut], from, deflate);
                prop_assert!(
                    part == Ok(None) || part == whole,
                    "cut {cut}: {part:?} vs {whole:?}"
                );
            }
            if let Ok(Some((header, len))) = whole {
                prop_assert!(len <= MAX_HEADER && len <= bytes.len());
                prop_assert_eq!(header.mask.is_some(), from == From::Client);
                prop_assert!(header.len >> 63 == 0);
                if header.opcode.is_control() {
                    prop_assert!(header.fin && header.len <= 125);
                }
            }
            Ok(())
        },
    );
}

/// Every valid header written is read back as itself, and its bytes are exactly consumed.
#[test]
fn headers_round_trip() {
    let headers = (any::<bool>(), opcode(), any::<Option<[u8; 4]>>(), length());
    check("header round trip", headers, |(fin, opcode, mask, len)| {
        let (fin, len) = if opcode.is_control() {
            (true, len % 126)
        } else {
            (fin, len)
        };
        let header = Header {
            fin,
            opcode,
            mask,
            len,
            compressed: false,
        };
        let mut out = [0u8; MAX_HEADER];
        let n = write_header(&header, &mut out);
        let from = if mask.is_some() {
            From::Client
        } else {
            From::Server
        };
        let mut with_payload = out[..n].to_vec();
        with_payload.extend_from_slice(b"payload bytes after the header");
        prop_assert_eq!(
            parse_header(&with_payload, from, false),
            Ok(Some((header, n)))
        );
        Ok(())
    });
}

/// Masking a payload in arbitrary chunks, each at its offset, equals masking it at once,
/// which is the byte-wise XOR of RFC 6455 §5.3; masking twice restores it.
#[test]
fn masking_in_any_chunks_equals_masking_at_once() {
    let input = (
        prop::collection::vec(any::<u8>(), 0..300),
        any::<[u8; 4]>(),
        prop::collection::vec(0usize..300, 0..6),
    );
    check("masking", input, |(data, key, mut cuts)| {
        let mut whole = data.clone();
        apply_mask(&mut whole, key, 0);
        for (i, b) in whole.iter().enumerate() {
            prop_assert_eq!(*b, data[i] ^ key[i % 4]);
        }
        cuts.iter_mut().for_each(|c| *c = (*c).min(data.len()));
        cuts.sort_unstable();
        let mut chunked = data.clone();
        let mut start = 0;
        for end in cuts.into_iter().chain([data.len()]) {
            apply_mask(&mut chunked[start..end], key, start as u64);
            start = end;
        }
        prop_assert_eq!(&chunked, &whole);
        apply_mask(&mut chunked, key, 0);
        prop_assert_eq!(chunked, data);
        Ok(())
    });
}

/// Mostly valid UTF-8 with a few bytes changed, split anywhere: incremental validation
/// accepts exactly what `str::from_utf8` accepts for the whole message.
#[test]
fn utf8_is_judged_the_same_however_the_message_is_split() {
    let input = (
        any::<String>(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        prop::collection::vec(any::<prop::sample::Index>(), 0..5),
    );
    check("utf-8", input, |(text, changes, cuts)| {
        let mut bytes = text.into_bytes();
        if !bytes.is_empty() {
            for (at, byte) in changes {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
        }
        let expected = std::str::from_utf8(&bytes).is_ok();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut validator = Utf8::default();
        let mut ok = true;
        let mut start = 0;
        for end in points.into_iter().chain([bytes.len()]) {
            if validator.feed(&bytes[start..end]).is_err() {
                ok = false;
                break;
            }
            start = end;
        }
        if ok {
            ok = validator.finish().is_ok();
        }
        prop_assert_eq!(ok, expected, "{:?}", bytes);
        Ok(())
    });
}

/// Any close payload: no panic; a code is accepted exactly when a peer may send it.
#[test]
fn close_payloads_are_judged_by_code_and_reason() {
    let payload = prop::collection::vec(any::<u8>(), 0..130);
    check("close payloads", payload, |payload| {
        let result = parse_close(&payload);
        if payload.len() >= 2 {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let reason_ok = std::str::from_utf8(&payload[2..]).is_ok();
            prop_assert_eq!(result.is_ok(), code_may_be_sent(code) && reason_ok);
        } else {
            prop_assert_eq!(result.is_ok(), payload.is_empty());
        }
        Ok(())
    });
}

/// One frame of a generated stream: fin, opcode, payload, and where its payload is cut
/// into chunks as it arrives.
type Frame = (bool, OpCode, Vec<u8>, Vec<prop::sample::Index>);

fn frames() -> impl Strategy<Value = Vec<Frame>> {
    let opcode = prop_oneof![
        3 => Just(OpCode::Continuation),
        2 => Just(OpCode::Text),
        2 => Just(OpCode::Binary),
        1 => Just(OpCode::Ping),
    ];
    let payload = prop_oneof![
        any::<String>().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..12),
    ];
    let frame = (
        any::<bool>(),
        opcode,
        payload,
        prop::collection::vec(any::<prop::sample::Index>(), 0..3),
    );
    prop::collection::vec(frame, 0..8)
}

/// The rules read whole: the first frame that breaks one, as the close code its sender
/// gets (RFC 6455 §5.4 fragmentation, the two limits, UTF-8 of text).
fn reference(frames: &[Frame], max_frame: u64, max_message: u64) -> Result<(), u16> {
    let mut open: Option<(OpCode, Vec<u8>)> = None;
    // The message's size as the limit counts it: an empty frame that does not end the
    // message counts as one byte.
    let mut counted = 0u64;
    for (fin, opcode, payload, _) in frames {
        if *opcode == OpCode::Ping {
            continue;
        }
        if payload.len() as u64 > max_frame {
            return Err(1009);
        }
        let continuation = *opcode == OpCode::Continuation;
        if continuation != open.is_some() {
            return Err(1002);
        }
        if !continuation {
            open = Some((*opcode, Vec::new()));
            counted = 0;
        }
        let Some((kind, text)) = open.as_mut() else {
            return Err(0);
        };
        counted += match payload.len() {
            0 if !fin => 1,
            len => len as u64,
        };
        if counted > max_message {
            return Err(1009);
        }
        text.extend_from_slice(payload);
        if *kind == OpCode::Text {
            if let Err(e) = std::str::from_utf8(text) {
                if e.error_len().is_some() || *fin {
                    return Err(1007);
                }
            }
        }
        if *fin {
            open = None;
        }
    }
    Ok(())
}

/// Fed header by header and chunk by chunk, the message state finds exactly the first
/// violation the whole-stream reading finds, with the same close code, and never lets a
/// frame or message past its limit.
#[test]
fn message_rules_hold_however_payloads_arrive() {
    let input = (frames(), 0u64..16, 0u64..40);
    check(
        "message rules",
        input,
        |(frames, max_frame, max_message)| {
            let expected = reference(&frames, max_frame, max_message);
            let mut state = Messages::default();
            let mut run = || -> Result<(), Violation> {
                for (fin, opcode, payload, cuts) in &frames {
                    let fin = *fin || opcode.is_control();
                    let header = Header {
                        fin,
                        opcode: *opcode,
                        mask: Some([1, 2, 3, 4]),
                        len: payload.len() as u64,
                        compressed: false,
                    };
                    state.header(&header, max_frame, max_message)?;
                    let mut points: Vec<usize> =
                        cuts.iter().map(|c| c.index(payload.len() + 1)).collect();
                    points.sort_unstable();
                    let mut start = 0;
                    for end in points.into_iter().chain([payload.len()]) {
                        state.payload(&payload[start..end])?;
                        start = end;
                    }
                    state.frame_end(fin)?;
                }
                Ok(())
            };
            let got = run().map_err(Violation::code);
            prop_assert_eq!(got, expected);
            Ok(())
        },
    );
}

/// A generated stream on the wire: each frame's header and payload (masked when it is a
/// client's), control payloads cut to the 125 bytes a control frame may carry. Returns the
/// frames as encoded and the wire bytes of the data frames alone.
fn encode(frames: &[Frame], from: From) -> (Vec<Frame>, Vec<u8>, Vec<u8>) {
    let (mut wire, mut data, mut sent) = (Vec::new(), Vec::new(), Vec::new());
    for (fin, opcode, payload, cuts) in frames {
        let mut payload = payload.clone();
        if opcode.is_control() {
            payload.truncate(125);
        }
        let fin = *fin || opcode.is_control();
        let mask = (from == From::Client).then_some([0x37, 0xfa, 0x21, 0x3d]);
        let header = Header {
            fin,
            opcode: *opcode,
            mask,
            len: payload.len() as u64,
            compressed: false,
        };
        let mut bytes = [0u8; MAX_HEADER];
        let n = write_header(&header, &mut bytes);
        let mut frame = bytes[..n].to_vec();
        let mut body = payload.clone();
        if let Some(key) = mask {
            apply_mask(&mut body, key, 0);
        }
        frame.extend_from_slice(&body);
        if !opcode.is_control() {
            data.extend_from_slice(&frame);
        }
        wire.extend_from_slice(&frame);
        sent.push((fin, *opcode, payload, cuts.clone()));
    }
    (sent, wire, data)
}

/// `wire` cut into reads at the given points.
fn cut_into_reads<'a>(wire: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
    points.sort_unstable();
    let mut reads = Vec::new();
    let mut start = 0;
    for end in points.into_iter().chain([wire.len()]) {
        reads.push(&wire[start..end]);
        start = end;
    }
    reads
}

/// The messages in a relayed stream of data frames, each as its first frame's opcode and
/// RSV1, the unmasked payload of all its frames, and whether its final frame came; a frame
/// cut short at the end counts with what of it is there.
fn messages_of(bytes: &[u8], from: From) -> Vec<(OpCode, bool, Vec<u8>, bool)> {
    let mut messages: Vec<(OpCode, bool, Vec<u8>, bool)> = Vec::new();
    let mut at = 0;
    while let Ok(Some((header, len))) = parse_header(&bytes[at..], from, true) {
        let start = at + len;
        let end = (start + header.len as usize).min(bytes.len());
        let mut payload = bytes[start..end].to_vec();
        if let Some(key) = header.mask {
            apply_mask(&mut payload, key, 0);
        }
        match messages.last_mut() {
            Some(last) if header.opcode == OpCode::Continuation => {
                last.2.extend_from_slice(&payload);
                last.3 = header.fin;
            }
            _ => messages.push((header.opcode, header.compressed, payload, header.fin)),
        }
        if end < start + header.len as usize {
            break;
        }
        at = end;
    }
    messages
}

/// Whether `a` is the start of `b`: the same messages, the last of `a` perhaps cut short.
fn is_prefix(a: &[(OpCode, bool, Vec<u8>, bool)], b: &[(OpCode, bool, Vec<u8>, bool)]) -> bool {
    let Some((last, rest)) = a.split_last() else {
        return true;
    };
    b.len() >= a.len()
        && rest == &b[..rest.len()]
        && (last.0, last.1) == (b[rest.len()].0, b[rest.len()].1)
        && b[rest.len()].2.starts_with(&last.2)
}

/// Whether `bytes` is whole frames, none cut short.
fn whole_frames(bytes: &[u8], from: From) -> bool {
    let mut at = 0;
    while at < bytes.len() {
        match parse_header(&bytes[at..], from, true) {
            Ok(Some((header, len))) if at + len + header.len as usize <= bytes.len() => {
                at += len + header.len as usize;
            }
            _ => return false,
        }
    }
    true
}

/// The bytes passed on, the control frames, and the first violation's close code.
type Relayed = (Vec<u8>, Vec<(OpCode, Vec<u8>)>, Option<u16>);

/// What the relay does with the bytes of each read, over a [`Reader`]: data frames passed
/// on as they are (a split compressed frame as one fragment per read), control frames
/// collected; the first violation ends it, and what the violating frame had put out in
/// that read is taken back, as the relay does.
fn relay(reader: &mut Reader, reads: &[&[u8]]) -> Relayed {
    let (mut passed, mut controls) = (Vec::new(), Vec::new());
    let header_bytes = |header: &Header| {
        let mut head = [0u8; MAX_HEADER];
        let n = write_header(header, &mut head);
        head[..n].to_vec()
    };
    for read in reads {
        let mut buf = vec![0u8; MAX_HEADER + read.len()];
        buf[MAX_HEADER..].copy_from_slice(read);
        let mut at = reader.uncarry(&mut buf);
        let mut frame_start = None;
        while at < buf.len() {
            match reader.next(&buf[at..]) {
                Err(v) => {
                    if let Some(start) = frame_start {
                        passed.truncate(start);
                    }
                    return (passed, controls, Some(v.code()));
                }
                Ok(Step::Incomplete) => {
                    reader.carry(&buf[at..]);
                    break;
                }
                Ok(Step::DataHeader { len, piece, .. }) => {
                    frame_start = reader.in_data_frame().then_some(passed.len());
                    match piece {
                        Some(piece) => passed.extend_from_slice(&header_bytes(&piece)),
                        None => passed.extend_from_slice(&buf[at..at + len]),
                    }
                    at += len;
                }
                Ok(Step::Payload(len)) => {
                    passed.extend_from_slice(&buf[at..at + len]);
                    at += len;
                    if !reader.in_data_frame() {
                        frame_start = None;
                    }
                }
                Ok(Step::Piece { len, header }) => {
                    passed.extend_from_slice(&header_bytes(&header));
                    passed.extend_from_slice(&buf[at..at + len]);
                    at += len;
                }
                Ok(Step::Control(len, control)) => {
                    at += len;
                    if let Some(c) = control {
                        controls.push((c.opcode, c.payload().to_vec()));
                    }
                }
            }
        }
    }
    (passed, controls, None)
}

/// The relay's reader over a generated stream cut into reads anywhere: it finds the same
/// first violation as the whole-stream reading whatever the cuts; without one it passes on
/// exactly the data frames' bytes (as they came, masked or not) and every control frame;
/// with one it has passed on a prefix of them, and no frame or message past a limit.
#[test]
fn the_reader_relays_the_same_stream_however_it_is_read() {
    let input = (
        frames(),
        from(),
        prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        0u64..16,
        0u64..40,
    );
    check(
        "reader",
        input,
        |(frames, from, cuts, max_frame, max_message)| {
            let (frames, wire, data) = encode(&frames, from);
            let expected = reference(&frames, max_frame, max_message).err();
            let reads = cut_into_reads(&wire, &cuts);
            let mut reader = Reader::new(from, max_frame, max_message);
            let (passed, controls, violation) = relay(&mut reader, &reads);
            prop_assert_eq!(violation, expected);
            prop_assert!(data.starts_with(&passed));
            if violation.is_none() {
                prop_assert_eq!(&passed, &data);
                let pings: Vec<_> = frames
                    .iter()
                    .filter(|f| f.1.is_control())
                    .map(|f| (f.1, f.2.clone()))
                    .collect();
                prop_assert_eq!(controls, pings);
            }
            // What was passed on never declares a frame or message past the limits.
            let (mut at, mut message) = (0, 0u64);
            while let Ok(Some((header, n))) = parse_header(&passed[at..], from, false) {
                prop_assert!(header.len <= max_frame);
                message = if header.opcode == OpCode::Continuation {
                    message
                } else {
                    0
                } + header.len;
                prop_assert!(message <= max_message);
                at += n + header.len as usize;
                if at >= passed.len() {
                    break;
                }
            }
            Ok(())
        },
    );
}

/// A permessage-deflate sender's message: raw deflate, sync-flushed, its trailing
/// 00 00 FF FF removed (RFC 7692 §7.2.1).
fn deflated(state: &mut flate2::Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let start = state.total_in();
    loop {
        let used = (state.total_in() - start) as usize;
        state
            .compress_vec(&data[used..], &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        if (state.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity() + 64);
    }
    // zlib makes no second flush without new input: an empty message right after
    // another is the one byte RFC 7692 §7.2.3.6 gives it (an empty stored block's first
    // bits), as senders that flush each message write it.
    if out.is_empty() {
        return vec![0x00];
    }
    out.truncate(out.len() - 4);
    out
}

/// Compressed messages (text or binary, context taken over or not) split into fragments
/// anywhere, perhaps with one byte of the stream flipped, and the stream cut into reads
/// anywhere: the reader reaches the same verdict as reading the stream in one read (twice:
/// the second time recalling what the first found good), and
/// without one passes on the same bytes and inflates the same count; with nothing flipped, that
/// verdict is the one the inflated sizes decide (1009 for the first message inflating
/// past the limit, else every byte passed on and every inflated byte counted).
#[test]
fn compressed_messages_are_checked_the_same_however_they_are_cut() {
    let message = (
        any::<bool>(),
        prop_oneof![
            "[a-z{}\":, ]{0,300}".prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..300),
            (0usize..4000).prop_map(|n| vec![b'x'; n]),
        ],
        prop::collection::vec(any::<prop::sample::Index>(), 0..3),
    );
    let input = (
        prop::collection::vec(message, 1..5),
        from(),
        any::<bool>(),
        prop::option::of((any::<prop::sample::Index>(), 1u8..=255)),
        prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        1u64..5000,
    );
    check(
        "compressed",
        input,
        |(messages, from, takeover, flip, cuts, max_message)| {
            let mut sender = flate2::Compress::new(flate2::Compression::fast(), false);
            let (mut wire, mut data) = (Vec::new(), Vec::new());
            let mask = (from == From::Client).then_some([0x37, 0xfa, 0x21, 0x3d]);
            // The first message that breaks a limit, on the wire or inflated.
            let mut verdict = None;
            for (text, plain, splits) in &messages {
                if !takeover {
                    sender.reset();
                }
                let payload = deflated(&mut sender, plain);
                let text = *text && std::str::from_utf8(plain).is_ok();
                if verdict.is_none()
                    && (plain.len() as u64 > max_message
                        || payload.len() as u64
                            > wsgate::relay::frame::with_deflate_room(max_message))
                {
                    verdict = Some(1009);
                }
                let mut points: Vec<usize> =
                    splits.iter().map(|s| s.index(payload.len() + 1)).collect();
                points.sort_unstable();
                points.dedup();
                let mut start = 0;
                let ends: Vec<usize> = points.into_iter().chain([payload.len()]).collect();
                for (i, end) in ends.iter().enumerate() {
                    let header = Header {
                        fin: i + 1 == ends.len(),
                        opcode: match (i, text) {
                            (0, true) => OpCode::Text,
                            (0, false) => OpCode::Binary,
                            _ => OpCode::Continuation,
                        },
                        mask,
                        len: (end - start) as u64,
                        compressed: i == 0,
                    };
                    let mut head = [0u8; MAX_HEADER];
                    let n = write_header(&header, &mut head);
                    let mut body = payload[start..*end].to_vec();
                    if let Some(key) = mask {
                        apply_mask(&mut body, key, 0);
                    }
                    wire.extend_from_slice(&head[..n]);
                    wire.extend_from_slice(&body);
                    start = *end;
                }
                data.extend_from_slice(plain);
            }
            if let Some((at, bits)) = flip {
                // A flipped byte may land in a header as well as in deflate data.
                let at = at.index(wire.len());
                wire[at] ^= bits;
            }
            let deflate = Some(wsgate::relay::frame::Deflate {
                context_takeover: takeover,
                window_bits: 15,
            });
            let whole = {
                let mut reader = Reader::new(from, max_message, max_message).with_deflate(deflate);
                let relayed = relay(&mut reader, &[&wire]);
                (relayed, reader.inflated())
            };
            // Read whole again: messages the first reading found good are now recalled
            // rather than inflated (each worker thread remembers some), to the same end.
            let again = {
                let mut reader = Reader::new(from, max_message, max_message).with_deflate(deflate);
                let relayed = relay(&mut reader, &[&wire]);
                (relayed, reader.inflated())
            };
            prop_assert_eq!(&again, &whole);
            let reads = cut_into_reads(&wire, &cuts);
            let mut reader = Reader::new(from, max_message, max_message).with_deflate(deflate);
            let cut = relay(&mut reader, &reads);
            prop_assert_eq!(&cut.2, &(whole.0).2);
            // Both pass on the same messages, up to where each found the violation (a
            // flipped byte may make a frame a control frame, which is not passed on); a
            // frame cut by the reads goes on as fragments, with the same payload bytes.
            let (cut_messages, whole_messages) =
                (messages_of(&cut.0, from), messages_of(&(whole.0).0, from));
            prop_assert!(
                is_prefix(&cut_messages, &whole_messages)
                    || is_prefix(&whole_messages, &cut_messages)
            );
            if cut.2.is_none() {
                prop_assert_eq!(&cut_messages, &whole_messages);
                prop_assert_eq!(reader.inflated(), whole.1);
            }
            if flip.is_none() {
                prop_assert_eq!(cut.2, verdict);
                if verdict.is_none() {
                    prop_assert_eq!(&cut_messages, &messages_of(&wire, from));
                    prop_assert_eq!(reader.inflated(), data.len() as u64);
                } else {
                    // However the violation was cut, what went on ends between frames:
                    // the receiver can be sent its close frame next.
                    prop_assert!(whole_frames(&cut.0, from), "a frame left unfinished");
                }
            }
            Ok(())
        },
    );
}
