//! A decoding tap: fed the reads of one direction of a connection, in order, it splits them
//! into frames and *unframed* bytes, and stays in step with the stream whatever junk real
//! streams carry (design decision 6).
//!
//! Real streams are not always well formed: a read may end in a stray byte after a frame whose
//! declared length is one short (the captures have such reads), a frame may be cut short, or a
//! header may be garbage. The add-on itself resynchronises at the next read. A tap therefore:
//! - frames by the header length only where the header is *plausible*: a known type byte,
//!   reserved bytes 1–2 zero, and a length within the limit;
//! - turns an implausible header into unframed bytes, up to the next position in the same read
//!   where a whole valid frame starts (or a plausible frame begins that the read cuts short);
//! - holds a plausible partial frame at the end of a read, and at the next read boundary
//!   abandons it (as unframed bytes) when completing it gives an invalid packet, or when it
//!   needs more than the new read and the new read holds a whole valid frame of its own: the
//!   frames of the new read are preferred to a frame that cannot be.
//!
//! Invariants:
//! - Every byte fed comes out exactly once, in order, in a [`Segment`] (or is still held as the
//!   partial frame, [`Tap::pending`]): callers that forward segments forward the stream
//!   verbatim.
//! - What is held never exceeds one frame of `5 + max_data_len` bytes, in a buffer of its own
//!   (between reads a tap keeps no read buffer alive); an oversized header is unframed from its
//!   5 header bytes alone, before any body is buffered.
//! - Only a plausible head is ever held, so one stray byte cannot swallow the frames after it.

use bytes::{Bytes, BytesMut};

use super::codec::Frame;
use super::packet::{header_data_len, DecodeError, Packet, PacketType, HEADER_LEN};

/// One piece of a tapped stream, in stream order.
#[derive(Clone)]
pub enum Segment {
    /// A length-delimited frame; its content may still be invalid (`packet` is `Err`).
    Frame(Frame),
    /// Bytes that could not be framed, and why: forwarded verbatim, never decoded.
    Unframed { bytes: Bytes, reason: DecodeError },
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the bytes: they may hold a device's auth code.
        match self {
            Segment::Frame(fr) => fr.fmt(f),
            Segment::Unframed { bytes, reason } => f
                .debug_struct("Unframed")
                .field("len", &bytes.len())
                .field("reason", reason)
                .finish(),
        }
    }
}

impl Segment {
    /// The segment's bytes, as they were in the stream.
    pub fn raw(&self) -> &Bytes {
        match self {
            Segment::Frame(f) => &f.raw,
            Segment::Unframed { bytes, .. } => bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.raw().len()
    }

    pub fn is_empty(&self) -> bool {
        self.raw().is_empty()
    }
}

/// What a tap produced from one read.
#[derive(Debug, Default)]
pub struct TapOutput {
    pub segments: Vec<Segment>,
    /// Bytes at the front of `segments` that came from earlier reads: the held partial frame,
    /// completed or abandoned by this read (0 when nothing was held, or it is still held).
    pub carried: usize,
    /// Bytes held when this read arrived: 0 means the read starts on a frame boundary.
    pub held_before: usize,
}

impl TapOutput {
    pub fn frames(&self) -> impl Iterator<Item = &Frame> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Frame(f) => Some(f),
            Segment::Unframed { .. } => None,
        })
    }

    /// Every problem found: unframed runs and frames whose content is invalid, in order.
    pub fn errors(&self) -> impl Iterator<Item = &DecodeError> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Frame(f) => f.packet.as_ref().err(),
            Segment::Unframed { reason, .. } => Some(reason),
        })
    }

    /// Bytes that could not be framed.
    pub fn unframed_bytes(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Unframed { .. }))
            .map(Segment::len)
            .sum()
    }
}

/// Why `head` cannot start a frame, judged on as much of it as there is (at least one byte).
fn implausible(head: &[u8], max_data_len: usize) -> Option<DecodeError> {
    let ty = *head.first()?;
    if PacketType::from_byte(ty).is_none() {
        return Some(DecodeError::UnknownType { ty });
    }
    let r1 = head.get(1).copied().unwrap_or(0);
    let r2 = head.get(2).copied().unwrap_or(0);
    if r1 != 0 || r2 != 0 {
        return Some(DecodeError::ReservedNonzero([r1, r2]));
    }
    match header_data_len(head) {
        Some(data_len) if data_len > max_data_len => Some(DecodeError::LengthTooLarge {
            data_len,
            max: max_data_len,
        }),
        _ => None,
    }
}

/// The whole valid frame that starts `buf`, if one does: its length.
fn whole_valid_at(buf: &[u8], max_data_len: usize) -> Option<usize> {
    if implausible(buf, max_data_len).is_some() {
        return None;
    }
    let total = HEADER_LEN + header_data_len(buf)?;
    let raw = buf.get(..total)?;
    Packet::parse(Bytes::copy_from_slice(raw), max_data_len).ok()?;
    Some(total)
}

/// Whether `buf` starts with a plausible frame that it cuts short.
fn cut_short_at(buf: &[u8], max_data_len: usize) -> bool {
    if buf.is_empty() || implausible(buf, max_data_len).is_some() {
        return false;
    }
    header_data_len(buf).is_none_or(|d| HEADER_LEN + d > buf.len())
}

/// Splits the reads of one direction into [`Segment`]s.
pub struct Tap {
    max_data_len: usize,
    /// A plausible frame cut short by the end of the last read.
    held: BytesMut,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("max_data_len", &self.max_data_len)
            .field("held", &self.held.len())
            .finish()
    }
}

impl Tap {
    pub fn new(max_data_len: usize) -> Self {
        Self {
            max_data_len,
            held: BytesMut::new(),
        }
    }

    /// Bytes held waiting for the rest of a frame.
    pub fn pending(&self) -> usize {
        self.held.len()
    }

    /// Gives up the held partial frame (the stream ended, or it waited too long): its bytes
    /// and why they are unframed.
    pub fn take_pending(&mut self) -> Option<(Bytes, DecodeError)> {
        if self.held.is_empty() {
            return None;
        }
        let bytes = self.held.split().freeze();
        let need = header_data_len(&bytes).map_or(HEADER_LEN, |d| HEADER_LEN + d);
        let reason = if bytes.len() < HEADER_LEN {
            DecodeError::TruncatedHeader { have: bytes.len() }
        } else {
            DecodeError::Truncated {
                need,
                have: bytes.len(),
            }
        };
        Some((bytes, reason))
    }

    /// Whether the held partial frame should be dropped in favour of `read`: completing it
    /// with `read` gives an invalid packet, or it would take more than `read` to complete and
    /// `read`, decoded on its own, holds a whole valid frame (a continuation that happens to
    /// hold one is not a thing real streams do; frames cut short by junk are).
    fn abandon_for(&self, read: &[u8]) -> bool {
        let max = self.max_data_len;
        let held = &self.held[..];
        let mut head = held.to_vec();
        head.extend(read.iter().take(HEADER_LEN.saturating_sub(held.len())));
        if implausible(&head, max).is_some() {
            return true;
        }
        match header_data_len(&head) {
            Some(d) if HEADER_LEN + d <= held.len() + read.len() => {
                let mut whole = held.to_vec();
                whole.extend_from_slice(&read[..HEADER_LEN + d - held.len()]);
                whole_valid_at(&whole, max).is_none()
            }
            _ => Tap::new(max).feed(read).frames().any(|f| f.packet.is_ok()),
        }
    }

    pub fn feed(&mut self, read: &[u8]) -> TapOutput {
        let held_before = self.held.len();
        let mut out = TapOutput {
            held_before,
            ..TapOutput::default()
        };
        if held_before > 0 && !read.is_empty() && self.abandon_for(read) {
            if let Some((bytes, reason)) = self.take_pending() {
                out.segments.push(Segment::Unframed { bytes, reason });
            }
        }
        self.held.extend_from_slice(read);
        let mut buf = self.held.split();
        while !buf.is_empty() {
            if let Some(reason) = implausible(&buf, self.max_data_len) {
                // Unframed up to the next place a frame can start (else to the end).
                let end = (1..buf.len())
                    .find(|&j| {
                        whole_valid_at(&buf[j..], self.max_data_len).is_some()
                            || cut_short_at(&buf[j..], self.max_data_len)
                    })
                    .unwrap_or(buf.len());
                let bytes = buf.split_to(end).freeze();
                out.segments.push(Segment::Unframed { bytes, reason });
                continue;
            }
            let Some(data_len) = header_data_len(&buf) else {
                break;
            };
            let total = HEADER_LEN + data_len;
            if buf.len() < total {
                break;
            }
            let raw = buf.split_to(total).freeze();
            let packet = Packet::parse(raw.clone(), self.max_data_len);
            out.segments.push(Segment::Frame(Frame { raw, packet }));
        }
        // Hold only what is held: the frames just made are slices of this buffer, and the
        // rest of its allocation must not stay alive with the tap between reads.
        self.held = if buf.is_empty() {
            BytesMut::new()
        } else {
            BytesMut::from(&buf[..])
        };
        // The held bytes lead the first segment whenever anything was emitted.
        if !out.segments.is_empty() {
            out.carried = held_before;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::build;
    use crate::protocol::packet::{DeviceId, MsgId};

    const MAX: usize = 4096;

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// Per segment: `Ok(type byte)` for a valid frame, `Err(reason)` otherwise; and the bytes.
    fn shape(out: &TapOutput) -> Vec<Result<u8, &'static str>> {
        out.segments
            .iter()
            .map(|s| match s {
                Segment::Frame(f) => match &f.packet {
                    Ok(p) => Ok(p.ptype().byte()),
                    Err(e) => Err(e.reason()),
                },
                Segment::Unframed { reason, .. } => Err(reason.reason()),
            })
            .collect()
    }

    fn joined(out: &TapOutput) -> Vec<u8> {
        out.segments.iter().flat_map(|s| s.raw().to_vec()).collect()
    }

    #[test]
    fn a_stray_byte_at_the_end_of_a_read_is_unframed_at_once() {
        let mut tap = Tap::new(MAX);
        let ack = build::hello_ack();
        let read = cat(&[&ack, &[0x7e]]);
        let out = tap.feed(&read);
        assert_eq!(shape(&out), vec![Ok(0x28), Err("unknown_type")]);
        assert_eq!(joined(&out), read);
        assert_eq!(tap.pending(), 0, "a lone 0x7e is never held");
        let out = tap.feed(&build::heartbeat_ack());
        assert_eq!(shape(&out), vec![Ok(0xd8)]);
    }

    #[test]
    fn a_frame_one_byte_short_is_abandoned_for_the_frame_that_starts_the_next_read() {
        let dev = DeviceId([1, 2, 3, 4]);
        let status = build::mesh_status(dev, MsgId([0, 9, 0]), 1, 1, 10, 1, 100, 0);
        let reply = build::command_reply(dev, MsgId([0, 2, 0]), 7, 0xd0);
        let mut tap = Tap::new(MAX);
        let out = tap.feed(&status[..status.len() - 1]);
        assert!(out.segments.is_empty());
        let read = cat(&[&reply, &build::data_ack(dev, MsgId([0, 0, 0]))]);
        let out = tap.feed(&read);
        assert_eq!(out.carried, status.len() - 1);
        assert_eq!(shape(&out), vec![Err("truncated"), Ok(0x73), Ok(0x7b)]);
        assert_eq!(joined(&out), cat(&[&status[..status.len() - 1], &read]));
    }

    #[test]
    fn a_frame_split_across_reads_is_completed() {
        let dev = DeviceId([1, 2, 3, 4]);
        let reply = build::channel_reply(dev, MsgId([1, 2, 0]));
        let mut tap = Tap::new(MAX);
        for cut in [1, 3, 5, 100, 1023] {
            assert!(tap.feed(&reply[..cut]).segments.is_empty());
            let out = tap.feed(&reply[cut..]);
            assert_eq!(out.carried, cut);
            assert_eq!(shape(&out), vec![Ok(0xab)], "cut at {cut}");
        }
    }

    #[test]
    fn junk_inside_a_read_is_unframed_up_to_the_next_valid_frame() {
        // A 21-byte junk run whose header declares far too much, then a 0x28 and three 0xd8.
        let mut junk = vec![0x28, 0, 0, 0xff, 0xff];
        junk.extend([0x5a; 16]);
        let read = cat(&[
            &junk,
            &build::hello_ack(),
            &build::heartbeat_ack(),
            &build::heartbeat_ack(),
            &build::heartbeat_ack(),
        ]);
        let mut tap = Tap::new(MAX);
        let out = tap.feed(&read);
        assert_eq!(
            shape(&out),
            vec![
                Err("length_too_large"),
                Ok(0x28),
                Ok(0xd8),
                Ok(0xd8),
                Ok(0xd8)
            ]
        );
        assert_eq!(out.segments[0].len(), 21);
        assert_eq!(out.unframed_bytes(), 21);
        assert_eq!(joined(&out), read);
    }

    #[test]
    fn an_oversized_header_is_unframed_before_any_body_is_buffered() {
        let mut tap = Tap::new(100);
        let out = tap.feed(&[0x73, 0, 0, 0, 101]);
        assert_eq!(shape(&out), vec![Err("length_too_large")]);
        assert_eq!(tap.pending(), 0);
    }

    #[test]
    fn a_plausible_partial_is_held_and_can_be_given_up() {
        let mut tap = Tap::new(MAX);
        assert!(tap.feed(&[0xd8, 0]).segments.is_empty());
        assert_eq!(tap.pending(), 2);
        let (bytes, reason) = tap.take_pending().expect("held");
        assert_eq!(bytes.as_ref(), &[0xd8, 0]);
        assert_eq!(reason.reason(), "truncated_header");
        assert_eq!(tap.pending(), 0);
    }

    #[test]
    fn debug_output_never_shows_the_bytes() {
        let auth = *b"1e07d8ce0a617a37";
        let hello = build::hello(DeviceId([0x38, 0xe8, 0xcf, 0x46]), &auth);
        let mut tap = Tap::new(MAX);
        let out = tap.feed(&[&hello[..], &[0x7e, b'1', b'e'], &hello[..10]].concat());
        let text = format!("{out:?} {tap:?}");
        assert!(out.segments.len() == 2 && tap.pending() == 10, "{text}");
        for secret in ["1e07d8ce0a617a37", "31, 101, 48", "31 65 30", "316530"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("0x23"), "{text}");
    }

    #[test]
    fn an_invalid_frame_that_is_not_junk_keeps_its_length() {
        let dev = DeviceId([1, 2, 3, 4]);
        let mut status = build::mesh_status(dev, MsgId([0, 9, 0]), 1, 1, 10, 1, 100, 0).to_vec();
        let n = status.len();
        status[n - 2] ^= 1;
        let read = cat(&[&status, &build::heartbeat()]);
        let out = Tap::new(MAX).feed(&read);
        assert_eq!(shape(&out), vec![Err("checksum_mismatch"), Ok(0xd3)]);
    }

    #[test]
    fn a_header_is_implausible_when_either_reserved_byte_is_set_and_only_above_the_limit() {
        for reserved in [[0, 1], [1, 0]] {
            let mut frame = build::heartbeat().to_vec();
            frame[1..3].copy_from_slice(&reserved);
            let out = Tap::new(MAX).feed(&frame);
            assert_eq!(shape(&out), vec![Err("reserved_nonzero")], "{reserved:?}");
        }
        // data_len exactly at the limit is a frame; one above is junk.
        let ack = build::status_ack(MsgId([0, 1, 0]));
        assert_eq!(shape(&Tap::new(3).feed(&ack)), vec![Ok(0x88)]);
        assert_eq!(
            shape(&Tap::new(2).feed(&ack)),
            vec![Err("length_too_large")]
        );
        // A partial whose declared end is exactly the bytes held is no longer cut short.
        let mut tap = Tap::new(3);
        assert!(tap.feed(&ack[..7]).segments.is_empty(), "held");
        assert_eq!(shape(&tap.feed(&ack[7..])), vec![Ok(0x88)]);
    }

    #[test]
    fn a_partial_given_up_says_how_much_was_missing() {
        let mut tap = Tap::new(MAX);
        let ack = build::status_ack(MsgId([0, 1, 0]));
        tap.feed(&ack[..5]);
        let (bytes, reason) = tap.take_pending().expect("held");
        assert_eq!(bytes.len(), 5);
        assert_eq!(reason, DecodeError::Truncated { need: 8, have: 5 });
        tap.feed(&ack[..4]);
        let (_, reason) = tap.take_pending().expect("held");
        assert_eq!(reason, DecodeError::TruncatedHeader { have: 4 });
        assert_eq!(tap.take_pending(), None);
    }

    #[test]
    fn each_output_says_how_much_of_it_was_held_before() {
        let mut tap = Tap::new(MAX);
        let ack = build::status_ack(MsgId([0, 1, 0]));
        let out = tap.feed(&ack[..6]);
        assert_eq!((out.held_before, out.carried), (0, 0));
        let out = tap.feed(&ack[6..]);
        assert_eq!((out.held_before, out.carried), (6, 6));
        assert!(out.segments.iter().all(|s| !s.is_empty()));
        assert_eq!(out.segments[0].len(), ack.len());
        let tap_text = format!("{tap:?}");
        assert!(
            tap_text.contains("held: 0") && tap_text.contains("4096"),
            "{tap_text}"
        );
    }
}
