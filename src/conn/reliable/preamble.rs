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

use bytes::{Bytes, BytesMut};

use super::resume::Owed;
use crate::protocol::{InfoBody, Packet, PacketType};

#[derive(Debug, Clone)]
pub struct Preamble {
    hello: Bytes,
    time_request: Option<Bytes>,
    info_tlv: Option<Bytes>,
    /// Firmware reports by kind: 0 network, 1 device.
    firmware: [Option<Packet>; 2],
}

impl Preamble {
    pub fn new(hello: Bytes) -> Self {
        Self {
            hello,
            time_request: None,
            info_tlv: None,
            firmware: [None, None],
        }
    }

    /// A valid frame the device sent. What is kept is copied: frames are slices of whole
    /// read buffers, and these live as long as the connection.
    pub fn observe(&mut self, p: &Packet) {
        let own = || Bytes::copy_from_slice(p.raw());
        match p.ptype() {
            PacketType::TimeRequest => self.time_request = Some(own()),
            PacketType::Info if matches!(p.info_body(), Some(InfoBody::Tlv(_))) => {
                self.info_tlv = Some(own())
            }
            PacketType::Status => {
                if let Some((kind, _)) = p.firmware() {
                    if let Some(slot) = self.firmware.get_mut(usize::from(kind.min(1))) {
                        *slot = Packet::parse(own(), p.raw().len()).ok();
                    }
                }
            }
            _ => {}
        }
    }

    /// The bytes to write to a redialled upstream before anything else, and the answers they
    /// draw besides the 0x28.
    pub fn replay(&self) -> (Bytes, Vec<Owed>) {
        let mut bytes = BytesMut::from(&self.hello[..]);
        let mut owed = Vec::new();
        if let Some(b) = &self.time_request {
            bytes.extend_from_slice(b);
            owed.push(Owed {
                reply: PacketType::TimeReply,
                echo: None,
            });
        }
        if let Some(b) = &self.info_tlv {
            bytes.extend_from_slice(b);
            owed.push(Owed {
                reply: PacketType::InfoAck,
                echo: None,
            });
        }
        for p in self.firmware.iter().flatten() {
            bytes.extend_from_slice(p.raw());
            owed.push(Owed {
                reply: PacketType::StatusAck,
                echo: p.msg_id(),
            });
        }
        (bytes.freeze(), owed)
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
        let mut p = Preamble::new(hello.clone());
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
    fn a_device_that_sent_only_its_hello_replays_only_its_hello() {
        let hello = build::hello(DEV, &[b'a'; 16]);
        let (bytes, owed) = Preamble::new(hello.clone()).replay();
        assert_eq!(bytes, hello);
        assert!(owed.is_empty());
    }
}
