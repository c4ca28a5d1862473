//! The Cync wire protocol: stream framing ([`codec`]) and typed packets ([`packet`]).
//!
//! Everything here is pure (no I/O); it is shared by the listener's handshake peek, the legacy
//! observer, the reliable session and the simulator.

pub mod build;
pub mod codec;
pub mod packet;
pub mod tap;

pub use codec::{CodecError, CyncCodec, Frame};
pub use packet::{
    header_data_len, header_data_len_checked, split_packets, AuthCode, Command, DecodeError,
    DeviceId, FrameClass, InfoBody, InnerFrame, MeshStatus, MsgId, Packet, PacketType, TimeReply,
    DEFAULT_MAX_DATA_LEN, HEADER_LEN,
};
pub use tap::{Segment, Tap, TapOutput};
