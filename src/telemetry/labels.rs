//! The label vocabulary every layer above records with: the path a connection takes, the
//! direction a frame travelled, how a command or request ended.
//!
//! Invariants:
//! - Enums that exist only as label values live here; domain enums that are also labels
//!   (`CloseReason`, `RouteReason`, `Comparison`, `PacketType`, `DecodeError`, `DialError`)
//!   live with their owners, derive the same way, and are passed to record methods as
//!   `impl Label`.
//! - A label's spelling comes from one derive (`strum::IntoStaticStr`, snake_case unless a
//!   variant says otherwise), never from a hand-written match; [`Label`] turns any such enum
//!   into its label, so a record method that takes one cannot be handed a misspelt string.
//! - These spellings are an interface: dashboards, alert rules and `docs/metrics.md` match on
//!   them, and the tests below pin them.

/// Anything with a derived static label.
pub trait Label: Copy {
    fn label(self) -> &'static str;
}

impl<T: Copy + Into<&'static str>> Label for T {
    fn label(self) -> &'static str {
        self.into()
    }
}

/// The path a connection takes; the `transport` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum Transport {
    Legacy,
    New,
    /// The dark launch's copy of a legacy connection.
    Shadow,
}

/// Which way a packet travelled; the `direction` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum Direction {
    DevToSrv,
    SrvToDev,
}

/// How a command (server 0x73 f8) ended; the `outcome` label of `tcp_comm_packet_sent_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum CommandOutcome {
    Success,
    Timeout,
    /// The connection ended before the reply or the deadline.
    Abandoned,
}

/// How a request/reply pair ended; the `outcome` label of `tcp_comm_replies_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum ReplyOutcome {
    Matched,
    Timeout,
    /// A reply with no pending request of its kind.
    Unmatched,
    /// Answered by the gateway itself (the new path's local 0xd8 while the upstream resumes).
    Local,
}

/// Why a device connection was closed before it was routed; the `reason` label of
/// `tcp_comm_connections_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum Reject {
    /// All of `listen.max_connections` routed slots are taken.
    Limit,
    /// All of `listen.max_pending` pre-hello slots are taken.
    PendingLimit,
    /// The source address holds `listen.max_pending_per_source` pre-hello slots.
    SourceLimit,
    TlsHandshake,
    TlsTimeout,
    /// The device closed before sending anything.
    ClosedBeforeHello,
    /// Nothing at all within `handshake_timeout`.
    Silent,
    /// `listen.accept_proxy_protocol`: the connection did not start with a valid PROXY
    /// header (none, malformed, or closed before it was complete).
    ProxyHeader,
    /// The PROXY header was not complete within `listen.proxy_header_timeout`.
    ProxyHeaderTimeout,
}

macro_rules! label_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumIter)]
        #[strum(serialize_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $v),+ }
    };
}

label_enum! {
    /// The `outcome` of `tcp_comm_source_pool_collisions_total`: what became of a device
    /// whose preferred pool address another device held.
    SourceCollision {
        /// It got the next free address of the pool.
        Moved,
        /// Every address was held: it shares its preferred one.
        Shared,
    }
}

label_enum! {
    /// The `handshake` of `tcp_comm_upstream_tls_handshakes_total`.
    TlsHandshake {
        /// Certificate, key exchange and the server's signature.
        Full,
        /// The add-on's earlier session, offered again and accepted (`tls_session_reuse`).
        Resumed,
    }
}

label_enum! {
    /// The `outcome` of `tcp_comm_mqtt_messages_total`.
    MqttMessage {
        Published,
        /// The queue toward the broker was full (the broker is down or slow).
        Dropped,
    }
}

label_enum! {
    /// The `command` of `tcp_comm_mqtt_commands_total`: which control it came from.
    MqttCommand { Canary, Rollback, Resume, Promote, Unknown }
}

label_enum! {
    /// The `result` of `tcp_comm_mqtt_commands_total`.
    MqttCommandResult {
        /// Sent to the control task, which applies and audits it.
        Accepted,
        /// Not applied: latched, a promotion gate, or controls off.
        Refused,
        /// A payload that is not what the control takes.
        Malformed,
    }
}

label_enum! {
    /// The `outcome` of `tcp_comm_ack_received_total`: a device's 0x7b for a server 0x73.
    AckOutcome { Received, Timeout, Unmatched }
}

label_enum! {
    /// The `outcome` of `tcp_comm_heartbeats_total`.
    HeartbeatOutcome {
        Acked,
        Missed,
        Unmatched,
        /// Answered by the new path itself while its upstream was being resumed.
        Local,
    }
}

label_enum! {
    /// Which queue; the `direction` label of the queue families.
    Queue {
        DevToSrv,
        SrvToDev,
        /// The dark launch's copy of device reads, on their way to the shadow upstream.
        Mirror,
    }
}

impl From<Direction> for Queue {
    fn from(d: Direction) -> Queue {
        match d {
            Direction::DevToSrv => Queue::DevToSrv,
            Direction::SrvToDev => Queue::SrvToDev,
        }
    }
}

label_enum! {
    /// What was done about a frame that met a full queue; the `action` label.
    QueueAction {
        /// Not queued; the session reads on (device queue: TCP backpressure first).
        Reject,
        /// Older superseded status reports were dropped to make room.
        Shed,
        /// Nothing could be shed: the pair is closed.
        Close,
        /// The dark launch's mirror dropped the read.
        Drop,
    }
}

label_enum! {
    /// Why a device frame was not forwarded; the `reason` of `tcp_comm_idempotent_drops_total`.
    DropReason {
        /// The upstream already had this answer (a retried command answered twice).
        Duplicate,
        /// An answer to a command sent on an earlier upstream connection.
        Stale,
    }
}

label_enum! {
    /// Why a due retry was not sent; the `reason` of `tcp_comm_retries_skipped_total`.
    RetrySkip {
        /// The path-wide retry budget is spent.
        Budget,
        /// Too close to the command's deadline for a copy to help.
        Deadline,
    }
}

label_enum! {
    /// How an upstream loss under a live device ended; the `outcome` of
    /// `tcp_comm_resumptions_total`.
    ResumeOutcome {
        Success,
        Failed,
        HelloTimeout,
        NotEstablished,
        Kicked,
        /// Redialled upstreams closed twice before answering the replayed hello.
        Refused,
        /// Lost while the device had part of a frame: not resumable.
        MidFrame,
    }
}

label_enum! {
    /// A frame the new path handled itself around a resumption; the `action` label.
    ResumeFrame {
        LocalHeartbeatAck,
        SwallowedHelloAck,
        DroppedLateHeartbeatAck,
        SwallowedReplayAnswer,
    }
}

label_enum! {
    /// Why a dark-launch mirror lost its shadow upstream; the `reason` label.
    ShadowLoss {
        ConnectFailed,
        Closed,
        ReadFailed,
        WriteFailed,
    }
}

label_enum! {
    /// How a configuration reload ended; the `result` of `tcp_comm_config_reloads_total`.
    ReloadResult { Applied, Unchanged, Error }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::IntoEnumIterator;

    fn labels<T: Label + IntoEnumIterator>() -> Vec<&'static str> {
        T::iter().map(Label::label).collect()
    }

    #[test]
    fn labels_keep_their_documented_spelling() {
        assert_eq!(labels::<Transport>(), ["legacy", "new", "shadow"]);
        assert_eq!(labels::<Direction>(), ["dev_to_srv", "srv_to_dev"]);
        assert_eq!(
            labels::<CommandOutcome>(),
            ["success", "timeout", "abandoned"]
        );
        assert_eq!(
            labels::<ReplyOutcome>(),
            ["matched", "timeout", "unmatched", "local"]
        );
        assert_eq!(labels::<AckOutcome>(), ["received", "timeout", "unmatched"]);
        assert_eq!(
            labels::<HeartbeatOutcome>(),
            ["acked", "missed", "unmatched", "local"]
        );
        assert_eq!(labels::<Queue>(), ["dev_to_srv", "srv_to_dev", "mirror"]);
        assert_eq!(labels::<QueueAction>(), ["reject", "shed", "close", "drop"]);
        assert_eq!(labels::<DropReason>(), ["duplicate", "stale"]);
        assert_eq!(labels::<RetrySkip>(), ["budget", "deadline"]);
        assert_eq!(
            labels::<ResumeOutcome>(),
            [
                "success",
                "failed",
                "hello_timeout",
                "not_established",
                "kicked",
                "refused",
                "mid_frame"
            ]
        );
        assert_eq!(
            labels::<ResumeFrame>(),
            [
                "local_heartbeat_ack",
                "swallowed_hello_ack",
                "dropped_late_heartbeat_ack",
                "swallowed_replay_answer"
            ]
        );
        assert_eq!(
            labels::<ShadowLoss>(),
            ["connect_failed", "closed", "read_failed", "write_failed"]
        );
        assert_eq!(labels::<ReloadResult>(), ["applied", "unchanged", "error"]);
        assert_eq!(
            labels::<Reject>(),
            [
                "limit",
                "pending_limit",
                "source_limit",
                "tls_handshake",
                "tls_timeout",
                "closed_before_hello",
                "silent",
                "proxy_header",
                "proxy_header_timeout"
            ]
        );
        assert_eq!(labels::<SourceCollision>(), ["moved", "shared"]);
        assert_eq!(labels::<TlsHandshake>(), ["full", "resumed"]);
        assert_eq!(labels::<MqttMessage>(), ["published", "dropped"]);
        assert_eq!(
            labels::<MqttCommand>(),
            ["canary", "rollback", "resume", "promote", "unknown"]
        );
        assert_eq!(
            labels::<MqttCommandResult>(),
            ["accepted", "refused", "malformed"]
        );
    }
}
