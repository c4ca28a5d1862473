//! Typed Cync packets: validation of one whole packet and field access at fixed offsets.
//!
//! Owns the knowledge of `cync-protocol.md` §2–§5: the 5-byte header, the per-type lengths, the
//! id/msg_id positions and the inner frame of 0x73/0x83 at offset 12.
//!
//! Invariants:
//! - A [`Packet`] exists only for bytes that passed every check of [`Packet::parse`], in the order
//!   the captures README lists them; so every accessor below reads at offsets known to exist and
//!   never panics.
//! - Fields are located by offset, never by searching for 0x7e: 0x7e occurs inside ids, bodies
//!   and checksums, and firmware reports start their frame with 0x00.
//! - The raw bytes are kept untouched (`Bytes`, cheap to clone) so callers can forward exactly
//!   what arrived; nothing here re-encodes.
//! - The 0x23 authorisation code is a credential: it is only reachable through [`AuthCode`],
//!   whose `Debug`/`Display` print a redaction.

use std::fmt;

use bytes::Bytes;
use thiserror::Error;

/// Size of the header every packet starts with.
pub const HEADER_LEN: usize = 5;
/// Default upper bound for the header's `data_len`. The largest seen is 1,019 (0xab).
pub const DEFAULT_MAX_DATA_LEN: usize = 4096;
/// Offset of the inner frame of 0x73/0x83.
pub const FRAME_OFFSET: usize = 12;

/// Every type byte seen on a device connection. The metric label is the type byte as
/// `0xNN`, matching the protocol doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, strum::IntoStaticStr)]
pub enum PacketType {
    #[strum(serialize = "0x23")]
    Hello,
    #[strum(serialize = "0x28")]
    HelloAck,
    #[strum(serialize = "0x43")]
    Info,
    #[strum(serialize = "0x48")]
    InfoAck,
    #[strum(serialize = "0x73")]
    Data,
    #[strum(serialize = "0x78")]
    Notice,
    #[strum(serialize = "0x7b")]
    DataAck,
    #[strum(serialize = "0x83")]
    Status,
    #[strum(serialize = "0x88")]
    StatusAck,
    #[strum(serialize = "0xa3")]
    ChannelOpen,
    #[strum(serialize = "0xab")]
    ChannelReply,
    #[strum(serialize = "0xc3")]
    TimeRequest,
    #[strum(serialize = "0xc8")]
    TimeReply,
    #[strum(serialize = "0xd3")]
    Heartbeat,
    #[strum(serialize = "0xd8")]
    HeartbeatAck,
}

impl PacketType {
    pub const ALL: [PacketType; 15] = [
        PacketType::Hello,
        PacketType::HelloAck,
        PacketType::Info,
        PacketType::InfoAck,
        PacketType::Data,
        PacketType::Notice,
        PacketType::DataAck,
        PacketType::Status,
        PacketType::StatusAck,
        PacketType::ChannelOpen,
        PacketType::ChannelReply,
        PacketType::TimeRequest,
        PacketType::TimeReply,
        PacketType::Heartbeat,
        PacketType::HeartbeatAck,
    ];

    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0x23 => Self::Hello,
            0x28 => Self::HelloAck,
            0x43 => Self::Info,
            0x48 => Self::InfoAck,
            0x73 => Self::Data,
            0x78 => Self::Notice,
            0x7b => Self::DataAck,
            0x83 => Self::Status,
            0x88 => Self::StatusAck,
            0xa3 => Self::ChannelOpen,
            0xab => Self::ChannelReply,
            0xc3 => Self::TimeRequest,
            0xc8 => Self::TimeReply,
            0xd3 => Self::Heartbeat,
            0xd8 => Self::HeartbeatAck,
            _ => return None,
        })
    }

    pub fn byte(self) -> u8 {
        match self {
            Self::Hello => 0x23,
            Self::HelloAck => 0x28,
            Self::Info => 0x43,
            Self::InfoAck => 0x48,
            Self::Data => 0x73,
            Self::Notice => 0x78,
            Self::DataAck => 0x7b,
            Self::Status => 0x83,
            Self::StatusAck => 0x88,
            Self::ChannelOpen => 0xa3,
            Self::ChannelReply => 0xab,
            Self::TimeRequest => 0xc3,
            Self::TimeReply => 0xc8,
            Self::Heartbeat => 0xd3,
            Self::HeartbeatAck => 0xd8,
        }
    }

    /// Metric label: the type byte as `0xNN` (derived).
    pub fn label(self) -> &'static str {
        self.into()
    }

    /// `data_len` of the fixed-size types.
    fn fixed_data_len(self) -> Option<usize> {
        match self {
            Self::Hello => Some(26),
            Self::HelloAck => Some(2),
            Self::InfoAck | Self::StatusAck => Some(3),
            Self::Notice | Self::DataAck | Self::ChannelOpen => Some(7),
            Self::TimeRequest => Some(1),
            Self::TimeReply => Some(11),
            Self::Heartbeat | Self::HeartbeatAck => Some(0),
            Self::Info | Self::Data | Self::Status | Self::ChannelReply => None,
        }
    }

    /// Minimum `data_len` of the variable-size types.
    fn min_data_len(self) -> usize {
        match self {
            Self::Info | Self::ChannelReply => 7,
            Self::Data | Self::Status => 18,
            other => other.fixed_data_len().unwrap_or(0),
        }
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Why bytes are not one valid packet. Variants are listed in the order they are checked.
#[derive(Debug, Error, Clone, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum DecodeError {
    #[error("truncated header: {have} of 5 bytes")]
    TruncatedHeader { have: usize },
    #[error("data length {data_len} above the limit of {max}")]
    LengthTooLarge { data_len: usize, max: usize },
    #[error("truncated packet: {have} of {need} bytes")]
    Truncated { need: usize, have: usize },
    #[error("{extra} bytes after the packet")]
    TrailingBytes { extra: usize },
    #[error("unknown packet type 0x{ty:02x}")]
    UnknownType { ty: u8 },
    #[error("reserved header bytes are {0:02x?}, expected 00 00")]
    ReservedNonzero([u8; 2]),
    #[error("data length {data_len} is not valid for type 0x{ty:02x}")]
    BadLengthForType { ty: u8, data_len: usize },
    #[error("inner frame starts with 0x{byte:02x}")]
    BadFrameStart { byte: u8 },
    #[error("data length {data_len} does not match inner length {inner_len} + 18")]
    InnerLengthMismatch { data_len: usize, inner_len: usize },
    #[error("inner frame ends with 0x{byte:02x}, expected 0x7e")]
    BadFrameEnd { byte: u8 },
    #[error("checksum 0x{found:02x}, computed 0x{expected:02x}")]
    ChecksumMismatch { expected: u8, found: u8 },
}

impl DecodeError {
    /// Stable snake_case code (derived), used as the `reason` metric label and in the test
    /// vectors.
    pub fn reason(&self) -> &'static str {
        self.into()
    }

    /// Every reason, in the order the checks run.
    pub const REASONS: &'static [&'static str] = <Self as strum::VariantNames>::VARIANTS;
}

/// A 4-byte id: the device id of a 0x23/0x43/0x83, or a channel id of the 0x73 family.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DeviceId(pub [u8; 4]);

impl DeviceId {
    /// Parses the 8-hex-digit form [`DeviceId::to_hex`] prints (case-insensitive).
    pub fn from_hex(text: &str) -> Option<DeviceId> {
        let bytes = hex::decode(text).ok()?;
        Some(DeviceId(bytes.try_into().ok()?))
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

/// The 3-byte message field at 9–11 (a big-endian u16 counter plus 0x00 in all data).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MsgId(pub [u8; 3]);

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MsgId({self})")
    }
}

/// The 0x23 authorisation code. Printing it never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthCode(Bytes);

impl AuthCode {
    /// The secret itself, for the few places that must compare or re-send it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for AuthCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthCode(<redacted>)")
    }
}

impl fmt::Display for AuthCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Class byte of an inner frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameClass {
    /// `f8`: a request/command.
    Request,
    /// `f9`: the reply to a command, echoing its inner seq.
    Reply,
    /// `fa`: an unsolicited report.
    Report,
    Other(u8),
}

impl FrameClass {
    pub fn from_byte(b: u8) -> Self {
        match b {
            0xf8 => Self::Request,
            0xf9 => Self::Reply,
            0xfa => Self::Report,
            other => Self::Other(other),
        }
    }
}

/// The inner frame of a 0x73/0x83 (`cync-protocol.md` §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerFrame {
    pub start: u8,
    pub seq: u8,
    pub pad: [u8; 3],
    pub class_byte: u8,
    pub opcode: u8,
    /// L: the body is L + 1 bytes.
    pub len: u8,
    pub checksum: u8,
}

impl InnerFrame {
    pub fn class(&self) -> FrameClass {
        FrameClass::from_byte(self.class_byte)
    }
}

/// The `fa db 13` mesh status body of a 42-byte 0x83.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshStatus {
    pub mesh_id: u8,
    pub online: u8,
    pub state: u8,
    pub brightness: u8,
    pub temp: u8,
    pub rgb: [u8; 3],
}

/// A power or brightness command (`f8 d0` / `f8 f0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Power { mesh_id: u16, on: bool },
    Brightness { mesh_id: u16, percent: u8 },
    Other { opcode: u8 },
}

/// One 19-byte status record of a 0x43.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoRecord {
    pub index: u8,
    pub mesh_id: u8,
    pub state: u8,
    pub brightness: u8,
    pub temp: u8,
    pub rgb: [u8; 3],
    pub online: u8,
}

/// One TLV item of a 0x43 body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    pub tag: u16,
    pub value: Bytes,
}

/// The body of a 0x43.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoBody {
    Empty,
    Records(Vec<InfoRecord>),
    Tlv(Vec<Tlv>),
    /// None of the known forms; forwarded like any other.
    Unrecognised,
}

/// The 0xc8 time reply fields (meaning partly inferred, §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeReply {
    pub lead: u8,
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub weekday: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// Signed ±HHMM, e.g. −600 for UTC−06:00.
    pub tz_hhmm: i16,
}

/// One validated packet and its raw bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Packet {
    ptype: PacketType,
    raw: Bytes,
}

impl fmt::Debug for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The raw bytes of a 0x23 hold the auth code, so Debug never prints them.
        f.debug_struct("Packet")
            .field("type", &self.ptype)
            .field("len", &self.raw.len())
            .finish()
    }
}

/// Sum of the bytes `raw[18 ..= 20 + L]` modulo 256 (§5.2).
pub fn inner_checksum(raw: &[u8]) -> Option<u8> {
    let l = usize::from(*raw.get(19)?);
    let body = raw.get(18..=20 + l)?;
    Some(body.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Reads `data_len` from a header; `None` when fewer than 5 bytes are given.
pub fn header_data_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    Some(usize::from(u16::from_be_bytes([buf[3], buf[4]])))
}

/// Total frame size from a header, checked against the limit: `None` while fewer than 5 bytes
/// are buffered, `Err(())` when `data_len` is above `max_data_len`.
#[allow(clippy::result_unit_err)]
pub fn header_data_len_checked(buf: &[u8], max_data_len: usize) -> Option<Result<usize, ()>> {
    let data_len = header_data_len(buf)?;
    if data_len > max_data_len {
        Some(Err(()))
    } else {
        Some(Ok(HEADER_LEN + data_len))
    }
}

fn arr<const N: usize>(raw: &[u8], at: usize) -> Option<[u8; N]> {
    raw.get(at..at + N)?.try_into().ok()
}

impl Packet {
    /// Validates `raw` as exactly one packet, running the checks in the documented order.
    pub fn parse(raw: Bytes, max_data_len: usize) -> Result<Packet, DecodeError> {
        let have = raw.len();
        let data_len = header_data_len(&raw).ok_or(DecodeError::TruncatedHeader { have })?;
        if data_len > max_data_len {
            return Err(DecodeError::LengthTooLarge {
                data_len,
                max: max_data_len,
            });
        }
        let need = HEADER_LEN + data_len;
        if have < need {
            return Err(DecodeError::Truncated { need, have });
        }
        if have > need {
            return Err(DecodeError::TrailingBytes { extra: have - need });
        }
        let ty = raw[0];
        let ptype = PacketType::from_byte(ty).ok_or(DecodeError::UnknownType { ty })?;
        if raw[1] != 0 || raw[2] != 0 {
            return Err(DecodeError::ReservedNonzero([raw[1], raw[2]]));
        }
        let len_ok = match ptype.fixed_data_len() {
            Some(fixed) => data_len == fixed,
            None => data_len >= ptype.min_data_len(),
        };
        if !len_ok {
            return Err(DecodeError::BadLengthForType { ty, data_len });
        }
        if matches!(ptype, PacketType::Data | PacketType::Status) {
            let start = raw[FRAME_OFFSET];
            let start_ok = start == 0x7e || (ptype == PacketType::Status && start == 0x00);
            if !start_ok {
                return Err(DecodeError::BadFrameStart { byte: start });
            }
            let inner_len = usize::from(raw[19]);
            if data_len != inner_len + 18 {
                return Err(DecodeError::InnerLengthMismatch {
                    data_len,
                    inner_len,
                });
            }
            let last = raw[have - 1];
            if last != 0x7e {
                return Err(DecodeError::BadFrameEnd { byte: last });
            }
            // data_len == L + 18 puts the checksum at 21 + L == have - 2.
            let expected = inner_checksum(&raw).unwrap_or(0);
            let found = raw[have - 2];
            if expected != found {
                return Err(DecodeError::ChecksumMismatch { expected, found });
            }
        }
        Ok(Packet { ptype, raw })
    }

    pub fn ptype(&self) -> PacketType {
        self.ptype
    }

    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn data_len(&self) -> usize {
        self.raw.len() - HEADER_LEN
    }

    /// The 4-byte id: 6–9 in a 0x23, 5–8 in the types that carry one.
    pub fn id(&self) -> Option<DeviceId> {
        let at = match self.ptype {
            PacketType::Hello => 6,
            PacketType::Info
            | PacketType::Data
            | PacketType::Notice
            | PacketType::DataAck
            | PacketType::Status
            | PacketType::ChannelOpen
            | PacketType::ChannelReply => 5,
            _ => return None,
        };
        arr(&self.raw, at).map(DeviceId)
    }

    /// The sender's msg_id (9–11) of a 0x43/0x73/0x83/0xa3.
    pub fn msg_id(&self) -> Option<MsgId> {
        match self.ptype {
            PacketType::Info | PacketType::Data | PacketType::Status | PacketType::ChannelOpen => {
                arr(&self.raw, 9).map(MsgId)
            }
            _ => None,
        }
    }

    /// The msg_id an acknowledgement echoes: 0x7b/0xab at 9–11, 0x48/0x88 at 5–7.
    pub fn acks_msg_id(&self) -> Option<MsgId> {
        match self.ptype {
            PacketType::DataAck | PacketType::ChannelReply => arr(&self.raw, 9).map(MsgId),
            PacketType::InfoAck | PacketType::StatusAck => arr(&self.raw, 5).map(MsgId),
            _ => None,
        }
    }

    /// 0x78: the referenced msg_id (9–10) and the status code (11).
    pub fn notice(&self) -> Option<([u8; 2], u8)> {
        if self.ptype != PacketType::Notice {
            return None;
        }
        Some((arr(&self.raw, 9)?, self.raw[11]))
    }

    /// 0x23: auth length (10–11), the code (12–27) and the tail (28–30).
    pub fn hello(&self) -> Option<(u16, AuthCode, [u8; 3])> {
        if self.ptype != PacketType::Hello {
            return None;
        }
        let auth_len = u16::from_be_bytes(arr(&self.raw, 10)?);
        Some((
            auth_len,
            AuthCode(self.raw.slice(12..28)),
            arr(&self.raw, 28)?,
        ))
    }

    /// The inner frame of a 0x73/0x83.
    pub fn inner(&self) -> Option<InnerFrame> {
        if !matches!(self.ptype, PacketType::Data | PacketType::Status) {
            return None;
        }
        let r = &self.raw;
        Some(InnerFrame {
            start: r[12],
            seq: r[13],
            pad: arr(r, 14)?,
            class_byte: r[17],
            opcode: r[18],
            len: r[19],
            checksum: r[r.len() - 2],
        })
    }

    /// True for a srv→dev command: a 0x73 of class `f8`.
    pub fn is_command(&self) -> bool {
        self.ptype == PacketType::Data
            && self
                .inner()
                .is_some_and(|f| f.class() == FrameClass::Request)
    }

    /// True for a device's reply to a command: a 0x73 of class `f9`.
    pub fn is_command_reply(&self) -> bool {
        self.ptype == PacketType::Data
            && self.inner().is_some_and(|f| f.class() == FrameClass::Reply)
    }

    /// Power/brightness details of an `f8` command, located as in §5.4.
    pub fn command(&self) -> Option<Command> {
        let f = self.inner().filter(|f| f.class() == FrameClass::Request)?;
        let r = &self.raw;
        let mesh_id = u16::from_le_bytes(arr(r, 26)?);
        Some(match (f.opcode, r.len()) {
            (0xd0, 36) => Command::Power {
                mesh_id,
                on: r[31] != 0,
            },
            (0xf0, 39) if r[31] == 0x01 && r[32] <= 100 => Command::Brightness {
                mesh_id,
                percent: r[32],
            },
            (opcode, _) => Command::Other { opcode },
        })
    }

    /// The `fa db 13` status body of a 42-byte 0x83 (§5.5).
    pub fn mesh_status(&self) -> Option<MeshStatus> {
        let f = self.inner()?;
        if self.ptype != PacketType::Status || f.class_byte != 0xfa || f.opcode != 0xdb {
            return None;
        }
        if f.len != 0x13 {
            return None;
        }
        let r = &self.raw;
        Some(MeshStatus {
            mesh_id: r[24],
            online: r[31],
            state: r[32],
            brightness: r[33],
            temp: r[34],
            rgb: arr(r, 35)?,
        })
    }

    /// The ASCII version digits of a firmware report (`86 01 0t` at 32–34).
    pub fn firmware(&self) -> Option<(u8, String)> {
        let f = self.inner()?;
        if self.ptype != PacketType::Status || f.start != 0x00 {
            return None;
        }
        let r = &self.raw;
        if r.get(32..34)? != [0x86, 0x01] {
            return None;
        }
        let end = r.len() - 2;
        let digits: String = r
            .get(35..end)?
            .iter()
            .take_while(|b| b.is_ascii_graphic())
            .map(|b| char::from(*b))
            .collect();
        Some((r[34], digits))
    }

    /// The body of a 0x43 (§4.4).
    pub fn info_body(&self) -> Option<InfoBody> {
        if self.ptype != PacketType::Info {
            return None;
        }
        let body = self.raw.slice(12..);
        if body.is_empty() {
            return Some(InfoBody::Empty);
        }
        if body[0] >= 0xc0 {
            if let Some(items) = parse_tlv(&body) {
                return Some(InfoBody::Tlv(items));
            }
        }
        if body.len().is_multiple_of(19) {
            let records = body
                .chunks_exact(19)
                .map(|c| InfoRecord {
                    index: c[0],
                    mesh_id: c[3],
                    state: c[4],
                    brightness: c[5],
                    temp: c[6],
                    rgb: [c[7], c[8], c[9]],
                    online: c[10],
                })
                .collect();
            return Some(InfoBody::Records(records));
        }
        Some(InfoBody::Unrecognised)
    }

    /// The fields of a 0xc8.
    pub fn time_reply(&self) -> Option<TimeReply> {
        if self.ptype != PacketType::TimeReply {
            return None;
        }
        let r = &self.raw;
        Some(TimeReply {
            lead: r[5],
            year: u16::from_be_bytes(arr(r, 6)?),
            month: r[8],
            day: r[9],
            weekday: r[10],
            hour: r[11],
            minute: r[12],
            second: r[13],
            tz_hhmm: i16::from_be_bytes(arr(r, 14)?),
        })
    }

    /// The length-prefixed ASCII text of a 0xab (`xlink_dev`).
    pub fn channel_reply_text(&self) -> Option<String> {
        if self.ptype != PacketType::ChannelReply {
            return None;
        }
        let n = usize::from(*self.raw.get(14)?);
        let text = self.raw.get(15..15 + n)?;
        Some(text.iter().map(|b| char::from(*b)).collect())
    }
}

fn parse_tlv(mut body: &[u8]) -> Option<Vec<Tlv>> {
    let owned = Bytes::copy_from_slice(body);
    let mut items = Vec::new();
    let mut at = 0usize;
    while !body.is_empty() {
        if body.len() < 3 {
            return None;
        }
        let tag = u16::from_be_bytes([body[0], body[1]]);
        let len = usize::from(body[2]);
        if body.len() < 3 + len {
            return None;
        }
        items.push(Tlv {
            tag,
            value: owned.slice(at + 3..at + 3 + len),
        });
        at += 3 + len;
        body = &body[3 + len..];
    }
    Some(items)
}

/// Splits a buffer into whole packets by the header length rule, as the protocol doc's
/// reference decoder does. Returns each packet's raw bytes with its parse result, and the bytes
/// left over. A header above the limit ends the split: its entry's raw bytes are everything from
/// that header on, which are also returned as left over.
#[allow(clippy::type_complexity)]
pub fn split_packets(
    buf: &[u8],
    max_data_len: usize,
) -> (Vec<(Bytes, Result<Packet, DecodeError>)>, Bytes) {
    let mut out = Vec::new();
    let mut rest = Bytes::copy_from_slice(buf);
    while let Some(data_len) = header_data_len(&rest) {
        if data_len > max_data_len {
            out.push((
                rest.clone(),
                Err(DecodeError::LengthTooLarge {
                    data_len,
                    max: max_data_len,
                }),
            ));
            return (out, rest);
        }
        let total = HEADER_LEN + data_len;
        if rest.len() < total {
            break;
        }
        let one = rest.split_to(total);
        out.push((one.clone(), Packet::parse(one, max_data_len)));
    }
    (out, rest)
}
