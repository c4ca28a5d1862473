//! Dark launch, mirror mode: pairing the shadow upstream's replies with the legacy
//! upstream's to the same device traffic. Pure: frames and `now` in, comparisons out.
//!
//! Invariants:
//! - Only replies are compared; what an upstream originates depends on its own timers.
//! - Memory is bounded by `compare_window`: whatever is unpaired for longer is concluded
//!   (missing or extra) and forgotten.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::protocol::{Packet, PacketType};

/// Which upstream a reply came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyFrom {
    Legacy,
    Shadow,
}

/// How one comparison ended; the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum Comparison {
    /// Both upstreams sent it (equal where the content is meant to be equal).
    Match,
    /// Both sent a reply of this type but its content differs.
    Mismatch,
    /// The legacy upstream sent it; the shadow did not within the window.
    Missing,
    /// The shadow sent it; the legacy upstream did not within the window.
    Extra,
    /// The legacy upstream sent it while no shadow upstream was there to answer.
    Uncompared,
}

/// Pairs the two upstreams' replies to the same device traffic.
///
/// Only replies are compared (0x28, 0x48, 0x88, 0xc8, 0xd8, server 0x7b and the 0x78 notice
/// that follows a device 0x7b): what an upstream originates (commands, 0xa3, queries) depends on
/// its own timers and harness. Replies that echo a request (0x88, 0x7b, 0x78) pair by their
/// bytes; the others pair in order per type and must be byte-equal, except the 0xc8 time
/// reply, which legitimately differs.
#[derive(Debug)]
pub struct Comparator {
    window: Duration,
    pending: HashMap<PairKey, VecDeque<Unpaired>>,
}

/// Replies pair within a type, and for echoing types only with the same bytes.
type PairKey = (PacketType, Option<Bytes>);
/// A reply waiting for its counterpart: who sent it, its bytes, when.
type Unpaired = (ReplyFrom, Bytes, Instant);

impl Comparator {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            pending: HashMap::new(),
        }
    }

    /// How long a reply waits for its counterpart.
    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn compared(t: PacketType) -> bool {
        matches!(
            t,
            PacketType::HelloAck
                | PacketType::InfoAck
                | PacketType::StatusAck
                | PacketType::TimeReply
                | PacketType::HeartbeatAck
                | PacketType::DataAck
                | PacketType::Notice
        )
    }

    /// A srv→dev frame from `side`.
    pub fn on_frame(
        &mut self,
        side: ReplyFrom,
        p: &Packet,
        now: Instant,
        out: &mut Vec<(Comparison, PacketType)>,
    ) {
        let t = p.ptype();
        if !Self::compared(t) {
            return;
        }
        let echo = matches!(
            t,
            PacketType::StatusAck | PacketType::DataAck | PacketType::Notice
        );
        let key = (t, echo.then(|| p.raw().clone()));
        let q = self.pending.entry(key).or_default();
        match q.front() {
            Some((other, raw, _)) if *other != side => {
                let equal = t == PacketType::TimeReply || raw == p.raw();
                out.push((
                    if equal {
                        Comparison::Match
                    } else {
                        Comparison::Mismatch
                    },
                    t,
                ));
                q.pop_front();
            }
            _ => q.push_back((side, p.raw().clone(), now)),
        }
    }

    /// Replies unpaired for longer than the window are missing (legacy only) or extra
    /// (shadow only).
    pub fn expire(&mut self, now: Instant, out: &mut Vec<(Comparison, PacketType)>) {
        let window = self.window;
        self.pending.retain(|(t, _), q| {
            while let Some((side, _, at)) = q.front() {
                if now.saturating_duration_since(*at) < window {
                    break;
                }
                out.push((
                    match side {
                        ReplyFrom::Legacy => Comparison::Missing,
                        ReplyFrom::Shadow => Comparison::Extra,
                    },
                    *t,
                ));
                q.pop_front();
            }
            !q.is_empty()
        });
    }

    /// The shadow upstream is gone: legacy replies still waiting can never be compared; the
    /// shadow's own are extra.
    pub fn shadow_gone(&mut self, out: &mut Vec<(Comparison, PacketType)>) {
        for ((t, _), q) in self.pending.drain() {
            for (side, _, _) in q {
                out.push((
                    match side {
                        ReplyFrom::Legacy => Comparison::Uncompared,
                        ReplyFrom::Shadow => Comparison::Extra,
                    },
                    t,
                ));
            }
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{build, DeviceId, MsgId};
    use crate::telemetry::labels::Label;

    fn pkt(b: Bytes) -> Packet {
        Packet::parse(b, 4096).expect("packet")
    }

    #[tokio::test(start_paused = true)]
    async fn pairs_by_type_and_echo_and_expires_the_unpaired() {
        let mut c = Comparator::new(Duration::from_secs(2));
        let mut out = Vec::new();
        let now = Instant::now();
        c.on_frame(ReplyFrom::Legacy, &pkt(build::hello_ack()), now, &mut out);
        c.on_frame(ReplyFrom::Shadow, &pkt(build::hello_ack()), now, &mut out);
        c.on_frame(
            ReplyFrom::Legacy,
            &pkt(build::status_ack(MsgId([0, 9, 0]))),
            now,
            &mut out,
        );
        c.on_frame(
            ReplyFrom::Legacy,
            &pkt(build::status_ack(MsgId([0, 8, 0]))),
            now,
            &mut out,
        );
        c.on_frame(
            ReplyFrom::Shadow,
            &pkt(build::status_ack(MsgId([0, 8, 0]))),
            now,
            &mut out,
        );
        c.on_frame(
            ReplyFrom::Shadow,
            &pkt(build::heartbeat_ack()),
            now,
            &mut out,
        );
        // Not a reply: never compared.
        c.on_frame(
            ReplyFrom::Shadow,
            &pkt(build::channel_open(
                DeviceId([1, 2, 3, 4]),
                MsgId([1, 2, 0]),
            )),
            now,
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                (Comparison::Match, PacketType::HelloAck),
                (Comparison::Match, PacketType::StatusAck),
            ]
        );
        out.clear();
        tokio::time::advance(Duration::from_millis(1999)).await;
        c.expire(Instant::now(), &mut out);
        assert!(out.is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        c.expire(Instant::now(), &mut out);
        out.sort_by_key(|(c, _)| c.label());
        assert_eq!(
            out,
            vec![
                (Comparison::Extra, PacketType::HeartbeatAck),
                (Comparison::Missing, PacketType::StatusAck),
            ]
        );
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn same_type_different_bytes_is_a_mismatch_but_time_replies_may_differ() {
        let mut c = Comparator::new(Duration::from_secs(2));
        let mut out = Vec::new();
        let now = Instant::now();
        let mut odd_ack = build::info_ack().to_vec();
        if let Some(last) = odd_ack.last_mut() {
            *last ^= 0xff;
        }
        c.on_frame(ReplyFrom::Legacy, &pkt(build::info_ack()), now, &mut out);
        c.on_frame(ReplyFrom::Shadow, &pkt(Bytes::from(odd_ack)), now, &mut out);
        let mut late = build::time_reply_stale().to_vec();
        if let Some(b) = late.get_mut(8) {
            *b ^= 1;
        }
        c.on_frame(
            ReplyFrom::Legacy,
            &pkt(build::time_reply_stale()),
            now,
            &mut out,
        );
        c.on_frame(ReplyFrom::Shadow, &pkt(Bytes::from(late)), now, &mut out);
        assert_eq!(
            out,
            vec![
                (Comparison::Mismatch, PacketType::InfoAck),
                (Comparison::Match, PacketType::TimeReply),
            ]
        );
    }
}
