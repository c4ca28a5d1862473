//! tokio-util codec for the Cync stream framing: 5-byte header, `data_len` big-endian at 3–4.
//!
//! Owns stream framing only; what a frame *means* is [`super::packet`]'s job.
//!
//! Invariants:
//! - The header is checked as soon as its 5 bytes are buffered and a `data_len` above
//!   `max_data_len` is rejected before any of the body is buffered, so a hostile or corrupt
//!   length can never make the decoder reserve or hold more than `5 + max_data_len` bytes.
//! - A frame whose contents are invalid (unknown type, bad checksum, …) is still yielded as a
//!   [`Frame`] with its parse error attached: framing only fails when the stream itself can no
//!   longer be split, which keeps `Framed` usable (it stops after the first `Err`).
//! - Encoding writes a frame's bytes verbatim; nothing is ever re-serialised.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio_util::codec::{Decoder, Encoder};

use super::packet::{header_data_len, DecodeError, Packet, DEFAULT_MAX_DATA_LEN, HEADER_LEN};

/// A stream-level framing failure: after this the byte stream cannot be split any more.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum CodecError {
    #[error("frame data length {data_len} above the limit of {max}")]
    #[strum(serialize = "length_too_large")]
    TooLarge { data_len: usize, max: usize },
    #[error("i/o: {0}")]
    #[strum(serialize = "io")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// Stable snake_case code (derived), as the decode-error `reason` labels are.
    pub fn reason(&self) -> &'static str {
        self.into()
    }
}

/// One length-delimited frame off the wire and the result of parsing it.
#[derive(Clone)]
pub struct Frame {
    pub raw: Bytes,
    pub packet: Result<Packet, DecodeError>,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A 0x23's bytes hold the device's auth code: Debug shows the type and length only.
        f.debug_struct("Frame")
            .field("type", &self.raw.first().map(|b| format!("0x{b:02x}")))
            .field("len", &self.raw.len())
            .field("packet", &self.packet)
            .finish()
    }
}

/// Splits a byte stream into Cync frames.
#[derive(Debug, Clone, Copy)]
pub struct CyncCodec {
    max_data_len: usize,
}

impl Default for CyncCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_DATA_LEN)
    }
}

impl CyncCodec {
    pub fn new(max_data_len: usize) -> Self {
        Self { max_data_len }
    }
}

impl Decoder for CyncCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let Some(data_len) = header_data_len(src) else {
            return Ok(None);
        };
        if data_len > self.max_data_len {
            return Err(CodecError::TooLarge {
                data_len,
                max: self.max_data_len,
            });
        }
        let total = HEADER_LEN + data_len;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let raw = src.split_to(total).freeze();
        let packet = Packet::parse(raw.clone(), self.max_data_len);
        Ok(Some(Frame { raw, packet }))
    }
}

impl Encoder<Bytes> for CyncCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.put(item);
        Ok(())
    }
}

impl Encoder<&Packet> for CyncCodec {
    type Error = CodecError;

    fn encode(&mut self, item: &Packet, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.put_slice(item.raw());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reasons_are_the_documented_labels() {
        let too_large = CodecError::TooLarge {
            data_len: 9,
            max: 8,
        };
        assert_eq!(too_large.reason(), "length_too_large");
        assert_eq!(CodecError::Io(std::io::Error::other("x")).reason(), "io");
    }
}
