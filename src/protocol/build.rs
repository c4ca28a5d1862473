//! Building packets: the byte layouts of `cync-protocol.md` §4–§5 in the write direction.
//!
//! Used by the simulator (devices and the fake add-on) and by the gateway where it must answer
//! on a peer's behalf (a local 0xd8 while the upstream is being resumed).
//!
//! Invariants:
//! - Every builder produces a packet that [`super::Packet::parse`] accepts (checked by tests),
//!   with `data_len` and, for 0x73/0x83, the inner length and checksum computed, not typed in.
//! - Builders never invent ids or counters: the caller supplies them, because the protocol
//!   requires echoes and counters to come from the right peer.

use bytes::{BufMut, Bytes, BytesMut};

use super::packet::{inner_checksum, DeviceId, InfoRecord, MsgId};

fn packet(ty: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(ty);
    b.put_u16(0);
    // Callers build bodies far below 64 KiB; saturate rather than wrap if one ever is not.
    b.put_u16(u16::try_from(body.len()).unwrap_or(u16::MAX));
    b.put_slice(body);
    b.freeze()
}

/// 0x23 hello: device id, 16-byte auth code, fixed tail.
pub fn hello(id: DeviceId, auth: &[u8; 16]) -> Bytes {
    let mut body = vec![0x03];
    body.extend_from_slice(&id.0);
    body.extend_from_slice(&[0x00, 0x10]);
    body.extend_from_slice(auth);
    body.extend_from_slice(&[0x00, 0x00, 0x3c]);
    packet(0x23, &body)
}

pub fn hello_ack() -> Bytes {
    packet(0x28, &[0x00, 0x00])
}

pub fn time_request() -> Bytes {
    packet(0xc3, &[0x0c])
}

/// The add-on's fixed, stale 0xc8 (2024-03-10 12:04:31 −05:00).
pub fn time_reply_stale() -> Bytes {
    packet(
        0xc8,
        &[
            0x0d, 0x07, 0xe8, 0x03, 0x0a, 0x01, 0x0c, 0x04, 0x1f, 0xfe, 0x0c,
        ],
    )
}

/// 0x43 with an empty body.
pub fn info_empty(id: DeviceId) -> Bytes {
    let mut body = id.0.to_vec();
    body.extend_from_slice(&[0x01, 0x01, 0x06]);
    packet(0x43, &body)
}

/// 0x43 with status records.
pub fn info_records(id: DeviceId, records: &[InfoRecord]) -> Bytes {
    let mut body = id.0.to_vec();
    body.extend_from_slice(&[0x01, 0x01, 0x06]);
    for r in records {
        body.extend_from_slice(&[
            r.index,
            0x00,
            0x10,
            r.mesh_id,
            r.state,
            r.brightness,
            r.temp,
            r.rgb[0],
            r.rgb[1],
            r.rgb[2],
            0x01,
            0x00,
            r.mesh_id,
            0,
            0,
            0,
            0,
            0,
            0,
        ]);
    }
    packet(0x43, &body)
}

/// 0x43 with TLV items.
pub fn info_tlv(id: DeviceId, items: &[(u16, &[u8])]) -> Bytes {
    let mut body = id.0.to_vec();
    body.extend_from_slice(&[0x01, 0x01, 0x06]);
    for (tag, value) in items {
        body.extend_from_slice(&tag.to_be_bytes());
        body.push(u8::try_from(value.len()).unwrap_or(u8::MAX));
        body.extend_from_slice(value);
    }
    packet(0x43, &body)
}

/// 0x48: the add-on builds it from the 0x43's bytes 9–10 plus 00.
pub fn info_ack() -> Bytes {
    packet(0x48, &[0x01, 0x01, 0x00])
}

/// A framed 0x73/0x83: header, id, msg_id, frame at 12 with checksum and end byte.
// One argument per wire field keeps call sites readable against the protocol doc's table.
#[allow(clippy::too_many_arguments)]
pub fn framed(
    ty: u8,
    id: DeviceId,
    msg: MsgId,
    start: u8,
    seq: u8,
    pad: [u8; 3],
    class: u8,
    opcode: u8,
    body: &[u8],
) -> Bytes {
    // body is L + 1 bytes; an empty body is not representable, so callers pass at least one.
    let l = u8::try_from(body.len().saturating_sub(1)).unwrap_or(u8::MAX);
    let mut b = id.0.to_vec();
    b.extend_from_slice(&msg.0);
    b.push(start);
    b.push(seq);
    b.extend_from_slice(&pad);
    b.push(class);
    b.push(opcode);
    b.push(l);
    b.extend_from_slice(body);
    b.push(0); // checksum placeholder
    b.push(0x7e);
    let mut p = BytesMut::from(&packet(ty, &b)[..]);
    let at = p.len() - 2;
    p[at] = inner_checksum(&p).unwrap_or(0);
    p.freeze()
}

/// A 0x73 with the usual frame start (0x7e) and zero inner pad: every data packet the add-on
/// and devices exchange in the captures, apart from the [S25] mode-change traffic.
fn data(channel: DeviceId, msg: MsgId, seq: u8, class: u8, opcode: u8, body: &[u8]) -> Bytes {
    framed(0x73, channel, msg, 0x7e, seq, [0; 3], class, opcode, body)
}

/// The body shared by the light commands (§5.4): inner seq again at 21, mesh id little-endian
/// at 26–27, then `<opcode> 11 02` and the opcode's own tail.
fn light_command(
    channel: DeviceId,
    msg: MsgId,
    seq: u8,
    mesh_id: u16,
    opcode: u8,
    tail: &[u8],
) -> Bytes {
    let m = mesh_id.to_le_bytes();
    let mut body = vec![0x00, seq, 0, 0, 0, 0, m[0], m[1], opcode, 0x11, 0x02];
    body.extend_from_slice(tail);
    data(channel, msg, seq, 0xf8, opcode, &body)
}

/// srv→dev power command `f8 d0 0d`.
pub fn power_command(channel: DeviceId, msg: MsgId, seq: u8, mesh_id: u16, on: bool) -> Bytes {
    light_command(channel, msg, seq, mesh_id, 0xd0, &[u8::from(on), 0, 0])
}

/// srv→dev brightness command `f8 f0 10`.
pub fn brightness_command(
    channel: DeviceId,
    msg: MsgId,
    seq: u8,
    mesh_id: u16,
    percent: u8,
) -> Bytes {
    light_command(
        channel,
        msg,
        seq,
        mesh_id,
        0xf0,
        &[0x01, percent.min(100), 0xff, 0xff, 0xff, 0xff],
    )
}

/// srv→dev mesh info query `f8 52 06`.
pub fn mesh_query(channel: DeviceId, msg: MsgId, seq: u8) -> Bytes {
    data(
        channel,
        msg,
        seq,
        0xf8,
        0x52,
        &[0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00],
    )
}

/// dev→srv reply `f9 <opcode> 01 00 00` echoing the command's inner seq.
pub fn command_reply(channel: DeviceId, msg: MsgId, seq: u8, opcode: u8) -> Bytes {
    data(channel, msg, seq, 0xf9, opcode, &[0x00, 0x00])
}

/// One mesh device in a mesh info reply (24-byte record, §5.4).
#[derive(Debug, Clone, Copy)]
pub struct MeshDevice {
    pub mesh_id: u8,
    pub kind: u8,
    pub state: u8,
    pub brightness: u8,
    pub temp: u8,
    pub rgb: [u8; 3],
}

/// dev→srv mesh info reply `f9 52`: 24-byte records after a 7-byte lead, as real firmware
/// sends it (vector `device_mesh_reply_f952`: `00 n 00 00 00 n 00` for n records), so the
/// first record starts at offset 27.
pub fn mesh_reply(channel: DeviceId, msg: MsgId, seq: u8, devices: &[MeshDevice]) -> Bytes {
    let n = u8::try_from(devices.len()).unwrap_or(u8::MAX);
    let mut body = vec![0x00, n, 0x00, 0x00, 0x00, n, 0x00];
    for d in devices {
        let mut r = [0u8; 24];
        r[0] = d.mesh_id;
        r[2] = d.kind;
        r[8] = d.state;
        r[12] = d.brightness;
        r[16] = d.temp;
        r[20] = d.rgb[0];
        r[21] = d.rgb[1];
        r[22] = d.rgb[2];
        body.extend_from_slice(&r);
    }
    data(channel, msg, seq, 0xf9, 0x52, &body)
}

/// srv→dev ack of a mesh info reply `f8 af 02`.
pub fn mesh_ack(channel: DeviceId, msg: MsgId, seq: u8) -> Bytes {
    data(channel, msg, seq, 0xf8, 0xaf, &[0x00, 0x00, 0x00])
}

/// 0x7b echoing a 0x73's bytes 5–11 (channel id and msg_id).
pub fn data_ack(channel: DeviceId, msg: MsgId) -> Bytes {
    let mut body = channel.0.to_vec();
    body.extend_from_slice(&msg.0);
    packet(0x7b, &body)
}

/// dev→srv 0x83 `fa db 13` status of one mesh device (§5.5).
#[allow(clippy::too_many_arguments)]
pub fn mesh_status(
    id: DeviceId,
    msg: MsgId,
    seq: u8,
    counter: u8,
    mesh_id: u8,
    state: u8,
    brightness: u8,
    temp: u8,
) -> Bytes {
    let body = [
        0x00, counter, 0x25, 0x11, mesh_id, 0x00, mesh_id, 0x00, 0xdb, 0x11, 0x02, 0x01, state,
        brightness, temp, 0xff, 0xff, 0xff, 0x00, 0x00,
    ];
    framed(0x83, id, msg, 0x7e, seq, [0; 3], 0xfa, 0xdb, &body)
}

/// dev→srv firmware report (0x83, frame start 0x00, `86 01 0t` + ASCII digits).
pub fn firmware_report(id: DeviceId, msg: MsgId, device_fw: bool, version: &str) -> Bytes {
    let mut body = vec![0u8; 33];
    // Absolute offsets 28 (0xea), 32–34 (86 01 0t) and 35.. (ASCII digits); the body starts at 20.
    body[8] = 0xea;
    body[12] = 0x86;
    body[13] = 0x01;
    body[14] = u8::from(device_fw);
    for (i, c) in version.bytes().take(18).enumerate() {
        body[15 + i] = c;
    }
    framed(0x83, id, msg, 0x00, 0x00, [0; 3], 0xfa, 0x00, &body)
}

/// 0x88 echoing a 0x83's msg_id.
pub fn status_ack(msg: MsgId) -> Bytes {
    packet(0x88, &msg.0)
}

/// 0xa3 channel open.
pub fn channel_open(channel: DeviceId, msg: MsgId) -> Bytes {
    let mut body = channel.0.to_vec();
    body.extend_from_slice(&msg.0);
    packet(0xa3, &body)
}

/// The device's 1,024-byte 0xab answer to a 0xa3.
pub fn channel_reply(channel: DeviceId, msg: MsgId) -> Bytes {
    let mut body = channel.0.to_vec();
    body.extend_from_slice(&msg.0);
    body.extend_from_slice(&[0x07, 0x00, 0x09]);
    body.extend_from_slice(b"xlink_dev");
    body.resize(1019 - 4, 0);
    body.extend_from_slice(&[0xe3, 0x4f, 0x02, 0x10]);
    packet(0xab, &body)
}

pub fn heartbeat() -> Bytes {
    packet(0xd3, &[])
}

pub fn heartbeat_ack() -> Bytes {
    packet(0xd8, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::packet::{Command, Packet, PacketType};

    const ID: DeviceId = DeviceId([0x38, 0xe8, 0xcf, 0x46]);
    const Z: MsgId = MsgId([0, 0, 0]);
    const RECORD: InfoRecord = InfoRecord {
        index: 5,
        mesh_id: 238,
        state: 1,
        brightness: 10,
        temp: 10,
        rgb: [255; 3],
        online: 1,
    };

    fn ok(b: Bytes) -> Packet {
        Packet::parse(b, 4096).expect("builder output parses")
    }

    #[test]
    fn every_builder_parses() {
        let all = [
            hello(ID, b"1e07d8ce0a617a37"),
            hello_ack(),
            time_request(),
            time_reply_stale(),
            info_empty(ID),
            info_records(ID, &[RECORD]),
            info_tlv(
                ID,
                &[(0xc790, b"20251106:0220:-37,00006,00001,00001,00001,")],
            ),
            info_ack(),
            power_command(ID, Z, 1, 80, true),
            brightness_command(ID, Z, 3, 80, 40),
            mesh_query(ID, Z, 0x1f),
            command_reply(ID, MsgId([0, 2, 0]), 1, 0xd0),
            mesh_reply(
                ID,
                Z,
                0x1f,
                &[MeshDevice {
                    mesh_id: 5,
                    kind: 1,
                    state: 1,
                    brightness: 100,
                    temp: 0,
                    rgb: [0; 3],
                }],
            ),
            mesh_ack(ID, Z, 0x1e),
            data_ack(ID, Z),
            mesh_status(ID, MsgId([0, 9, 0]), 0x1f, 0x72, 80, 1, 10, 10),
            firmware_report(ID, MsgId([0, 1, 0]), true, "11158"),
            status_ack(MsgId([0x1f, 0x83, 0])),
            channel_open(ID, MsgId([0x15, 0x1f, 0])),
            channel_reply(ID, MsgId([0x15, 0x1f, 0])),
            heartbeat(),
            heartbeat_ack(),
        ];
        for b in all {
            ok(b);
        }
        let rec = ok(info_records(ID, &[RECORD]));
        // The same record as the real one in vector device_info_0x43_one_record.
        assert_eq!(
            &rec.raw()[..],
            &hex::decode(
                "430000001a38e8cf460101060500 10ee010a0affffff0100ee000000000000".replace(' ', "")
            )
            .expect("hex")[..]
        );
    }

    #[test]
    fn builders_reproduce_real_packets_byte_for_byte() {
        // The add-on's own power command (vector legacy_power_on_0x73).
        let real =
            hex::decode("730000001f38e8cf460000007e01000000f8d00d0001000000005000d01102010000127e")
                .expect("hex");
        assert_eq!(&power_command(ID, Z, 1, 80, true)[..], &real[..]);
        // The add-on's brightness command whose checksum is 0x7b (legacy_brightness_0x73).
        let real = hex::decode(
            "730000002238e8cf460000007e03000000f8f0100003000000005000f011020128ffffffff7b7e",
        )
        .expect("hex");
        assert_eq!(&brightness_command(ID, Z, 3, 80, 40)[..], &real[..]);
        // A real device f9 reply (device_power_reply_f9d0).
        let real = hex::decode("73000000132de4b5d20002007e21000000f9d0010000d17e").expect("hex");
        assert_eq!(
            &command_reply(
                DeviceId([0x2d, 0xe4, 0xb5, 0xd2]),
                MsgId([0, 2, 0]),
                0x21,
                0xd0
            )[..],
            &real[..]
        );
        assert_eq!(
            &time_reply_stale()[..],
            &hex::decode("c80000000b0d07e8030a010c041ffe0c").expect("hex")[..]
        );
        let p = ok(power_command(ID, Z, 7, 0x0105, false));
        assert_eq!(
            p.command(),
            Some(Command::Power {
                mesh_id: 0x0105,
                on: false
            })
        );
        assert_eq!(ok(channel_reply(ID, Z)).raw().len(), 1024);
        assert_eq!(
            ok(channel_reply(ID, Z)).channel_reply_text().as_deref(),
            Some("xlink_dev")
        );
        let fw = ok(firmware_report(ID, MsgId([0, 2, 0]), true, "11158"));
        assert_eq!(fw.ptype(), PacketType::Status);
        assert_eq!(fw.firmware(), Some((1, "11158".to_string())));
        assert_eq!(fw.raw().len(), 55);
        let st = ok(mesh_status(ID, MsgId([0, 9, 0]), 0x1f, 0x72, 80, 1, 10, 10));
        assert_eq!(st.raw().len(), 42);
        let ms = st.mesh_status().expect("status body");
        assert_eq!(
            (ms.mesh_id, ms.online, ms.state, ms.brightness),
            (80, 1, 1, 10)
        );
    }
}
