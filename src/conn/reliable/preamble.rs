//! A device's session preamble: what it told the server about itself after connecting, kept so
//! that a resumed upstream learns the device as a fresh connection would have told it.
//!
//! A fresh device connection sends its 0x23 hello, usually a 0xc3 time request, a TLV-form
//! 0x43 (counters, or its local timestamp) and a pair of firmware-report 0x83s (network, then
//! device firmware). The add-on learns the device's firmware only from those reports. On
//! resumption they are replayed in that order, in one write, and their answers (0x28, 0xc8,
//! 0x48, the 0x88 echoing each report) are swallowed: the device already had them.
//!
//! What a resumed upstream does *not* get, and why: status reports (0x83 `fa db`, record-form
//! 0x43) describe mesh state that may have changed since; the add-on sends its mesh query on
//! every new connection (forwarded to the device, which answers with the current state), so
//! replaying old states could only mislead it. The replayed TLV 0x43 carries the timestamp the
//! device sent when it connected.
//!
//! Invariants:
//! - Bounded: one frame per kind, the latest seen, whatever the device sends.
//! - Only whole, valid frames the device itself sent are kept; nothing is built or rewritten.

use bytes::Bytes;

use super::resume::Owed;
use crate::protocol::{InfoBody, MsgId, Packet, PacketType};

/// The kinds kept, in replay order.
const HELLO: usize = 0;
const TIME_REQUEST: usize = 1;
const INFO_TLV: usize = 2;
/// Firmware reports by kind: network, then device.
const FIRMWARE: [usize; 2] = [3, 4];
const KINDS: usize = 5;

#[derive(Debug, Clone)]
pub struct Preamble {
    /// The kept frames back to back in replay order, in one allocation of their exact size:
    /// a buffer per frame cost each idle session 0.2 KiB more (five allocations and their
    /// headers, and the handles to them).
    kept: Box<[u8]>,
    /// Each kind's length in `kept`; 0 for a kind not seen.
    lens: [u32; KINDS],
    /// The msg_id each firmware report's 0x88 echoes.
    echo: [Option<MsgId>; 2],
}

impl Preamble {
    pub fn new(hello: &[u8]) -> Self {
        let mut p = Self {
            kept: Box::default(),
            lens: [0; KINDS],
            echo: [None, None],
        };
        p.keep(HELLO, hello);
        p
    }

    /// A valid frame the device sent. What is kept is copied: frames are slices of whole
    /// read buffers, and these live as long as the connection.
    pub fn observe(&mut self, p: &Packet) {
        match p.ptype() {
            PacketType::TimeRequest => self.keep(TIME_REQUEST, p.raw()),
            PacketType::Info if matches!(p.info_body(), Some(InfoBody::Tlv(_))) => {
                self.keep(INFO_TLV, p.raw())
            }
            PacketType::Status => {
                if let Some((kind, _)) = p.firmware() {
                    let which = usize::from(kind.min(1));
                    self.echo[which] = p.msg_id();
                    self.keep(FIRMWARE[which], p.raw());
                }
            }
            _ => {}
        }
    }

    /// Replaces kind `at`'s frame with `frame`; the buffer is rebuilt (a device sends these
    /// once a connection, rarely again).
    fn keep(&mut self, at: usize, frame: &[u8]) {
        let Ok(len) = u32::try_from(frame.len()) else {
            return;
        };
        let mut kept = Vec::with_capacity(self.kept.len() + frame.len());
        let mut from = 0;
        for (kind, &n) in self.lens.iter().enumerate() {
            let n = n as usize;
            let old = self.kept.get(from..from + n).unwrap_or_default();
            from += n;
            kept.extend_from_slice(if kind == at { frame } else { old });
        }
        self.lens[at] = len;
        self.kept = kept.into_boxed_slice();
    }

    /// The kinds seen and their frames, in replay order.
    fn frames(&self) -> impl Iterator<Item = (usize, &[u8])> + '_ {
        let mut at = 0;
        self.lens.iter().enumerate().filter_map(move |(kind, &n)| {
            let n = n as usize;
            let frame = self.kept.get(at..at + n)?;
            at += n;
            (n > 0).then_some((kind, frame))
        })
    }

    /// The bytes to write to a redialled upstream before anything else, and the answers they
    /// draw besides the 0x28.
    pub fn replay(&self) -> (Bytes, Vec<Owed>) {
        let owed = self
            .frames()
            .filter_map(|(kind, _)| match kind {
                TIME_REQUEST => Some((PacketType::TimeReply, None)),
                INFO_TLV => Some((PacketType::InfoAck, None)),
                k if k == FIRMWARE[0] => Some((PacketType::StatusAck, self.echo[0])),
                k if k == FIRMWARE[1] => Some((PacketType::StatusAck, self.echo[1])),
                _ => None,
            })
            .map(|(reply, echo)| Owed { reply, echo })
            .collect();
        (Bytes::copy_from_slice(&self.kept), owed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::build;
    use crate::protocol::{DeviceId, MsgId};

    const DEV: DeviceId = DeviceId([0x38, 0xe8, 0xcf, 0x46]);

    fn pkt(b: Bytes) -> Packet {
        Packet::parse(b, 4096).expect("valid")
    }

    #[test]
    fn replays_what_a_fresh_connection_sends_in_its_order_and_nothing_else() {
        let hello = build::hello(DEV, &[b'a'; 16]);
        let mut p = Preamble::new(&hello);
        let tlv = build::info_tlv(DEV, &[(0xc790, b"20251106:0220:-37,00006,")]);
        let fw_net = build::firmware_report(DEV, MsgId([0, 6, 0]), false, "0");
        let fw_dev = build::firmware_report(DEV, MsgId([0, 7, 0]), true, "11158");
        let fw_dev_new = build::firmware_report(DEV, MsgId([0, 9, 0]), true, "11160");
        for b in [
            build::time_request(),
            tlv.clone(),
            fw_net.clone(),
            fw_dev.clone(),
            build::heartbeat(),
            build::mesh_status(DEV, MsgId([0, 8, 0]), 1, 1, 10, 1, 100, 0),
            build::info_empty(DEV),
            fw_dev_new.clone(),
        ] {
            p.observe(&pkt(b));
        }
        let (bytes, owed) = p.replay();
        let want = [hello, build::time_request(), tlv, fw_net, fw_dev_new].concat();
        assert_eq!(bytes.as_ref(), want.as_slice());
        assert_eq!(
            owed,
            vec![
                Owed {
                    reply: PacketType::TimeReply,
                    echo: None
                },
                Owed {
                    reply: PacketType::InfoAck,
                    echo: None
                },
                Owed {
                    reply: PacketType::StatusAck,
                    echo: Some(MsgId([0, 6, 0]))
                },
                Owed {
                    reply: PacketType::StatusAck,
                    echo: Some(MsgId([0, 9, 0]))
                },
            ]
        );
    }

    #[test]
    fn frames_seen_out_of_order_or_reported_again_at_another_length_replay_in_order() {
        let hello = build::hello(DEV, &[b'a'; 16]);
        let mut p = Preamble::new(&hello);
        let tlv = build::info_tlv(DEV, &[(0xc790, b"20251106:0220:-37,00006,")]);
        let tlv_longer = build::info_tlv(DEV, &[(0xc790, b"20251106:0221:-37,00006,00017,")]);
        let fw_dev = build::firmware_report(DEV, MsgId([0, 7, 0]), true, "11158");
        let fw_dev_new = build::firmware_report(DEV, MsgId([0, 9, 0]), true, "11160");
        let fw_net = build::firmware_report(DEV, MsgId([0, 6, 0]), false, "0");
        for b in [
            fw_dev,
            tlv.clone(),
            fw_dev_new.clone(),
            tlv_longer.clone(),
            build::time_request(),
            fw_net.clone(),
        ] {
            p.observe(&pkt(b));
        }
        assert_ne!(tlv.len(), tlv_longer.len());
        let (bytes, owed) = p.replay();
        let want = [hello, build::time_request(), tlv_longer, fw_net, fw_dev_new].concat();
        assert_eq!(bytes.as_ref(), want.as_slice());
        let echoes: Vec<_> = owed.iter().map(|o| o.echo).collect();
        assert_eq!(
            echoes,
            vec![None, None, Some(MsgId([0, 6, 0])), Some(MsgId([0, 9, 0]))]
        );
    }

    #[test]
    fn a_device_that_sent_only_its_hello_replays_only_its_hello() {
        let hello = build::hello(DEV, &[b'a'; 16]);
        let (bytes, owed) = Preamble::new(&hello).replay();
        assert_eq!(bytes, hello);
        assert!(owed.is_empty());
    }
}
