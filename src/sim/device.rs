//! A simulated Cync Wi-Fi device that behaves, on the wire, like the real ones in the captures
//! (`cync-protocol.md` §4–§10).
//!
//! It dials out (plain or TLS offering the captured devices' suites), sends its 0x23 with a
//! stable id and auth code derived from a seed, optionally 0xc3, TLV and record 0x43s and a
//! firmware-report pair, then heartbeats (0xd3) after `heartbeat` without sending. It answers
//! 0xa3 with the 1,024-byte 0xab, the mesh query with a mesh reply, and every `f8` command with
//! its `f9` reply (echoing the inner seq) plus the 0x7b in one write, then a 0x83 status
//! 0.08–1 s later. When disconnected it redials with seeded, jittered exponential backoff.
//!
//! Invariants:
//! - Identity and every random choice come from `(seed, index)`: the same seed gives the same
//!   fleet and the same timings.
//! - The device never stops reading, and every write is one packet or one deliberate group of
//!   packets (reply + 0x7b; 0x83 + 0x43), as real devices write them.
//! - [`DeviceStats`] counts what was received and applied, for tests to check delivery.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::conn::tls::Stream;
use crate::protocol::build;
use crate::protocol::{CyncCodec, DeviceId, FrameClass, MsgId, Packet, PacketType};

/// The suites of the captured 88-byte device ClientHello: static RSA with AES-CBC only.
pub const DEVICE_CIPHERS: &str = "AES256-SHA256:AES256-SHA:AES128-SHA256:AES128-SHA";

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// How one simulated device behaves.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub target: SocketAddr,
    pub tls: bool,
    pub seed: u64,
    pub index: u32,
    /// Idle time before a heartbeat; real devices use 21 s.
    pub heartbeat: Duration,
    /// Send a 0xc3 after the hello, as every device in capture C1 did.
    pub time_request: bool,
    /// Send a timestamp TLV 0x43 and a firmware-report pair after connecting.
    pub startup_reports: bool,
    /// Mesh devices this bridge reports (1-byte mesh ids).
    pub mesh: Vec<u8>,
    /// Delay range of the status report after a command.
    pub status_delay: (Duration, Duration),
    /// Redial backoff range.
    pub redial: (Duration, Duration),
    /// Stop after this many connections (None = redial forever).
    pub max_connects: Option<u64>,
}

impl DeviceConfig {
    pub fn new(target: SocketAddr, seed: u64, index: u32) -> DeviceConfig {
        DeviceConfig {
            target,
            tls: false,
            seed,
            index,
            heartbeat: Duration::from_secs(21),
            time_request: true,
            startup_reports: true,
            mesh: vec![u8::try_from(index % 200).unwrap_or(0) + 10],
            status_delay: (Duration::from_millis(80), Duration::from_millis(1000)),
            redial: (Duration::from_millis(100), Duration::from_secs(3)),
            max_connects: None,
        }
    }
}

/// Stable identity derived from `(seed, index)`.
pub fn identity(seed: u64, index: u32) -> (DeviceId, [u8; 16]) {
    let mut h = Sha256::new();
    h.update(b"cync-sim/device:");
    h.update(seed.to_be_bytes());
    h.update(index.to_be_bytes());
    let d = h.finalize();
    let id = DeviceId([d[0], d[1], d[2], d[3]]);
    let hexed = hex::encode(&d[4..12]);
    let mut auth = [0u8; 16];
    auth.copy_from_slice(&hexed.as_bytes()[..16]);
    (id, auth)
}

/// Counters a test reads to check delivery. All monotonic.
#[derive(Debug, Default)]
pub struct DeviceStats {
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub hello_acks: AtomicU64,
    pub channel_opens: AtomicU64,
    pub mesh_queries: AtomicU64,
    pub commands_received: AtomicU64,
    pub commands_applied: AtomicU64,
    pub replies_sent: AtomicU64,
    pub status_sent: AtomicU64,
    pub status_acks: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    pub heartbeat_acks: AtomicU64,
    pub time_replies: AtomicU64,
    pub info_acks: AtomicU64,
    pub other_received: AtomicU64,
    /// Per session, microseconds from writing the hello to reading its 0x28 (benchmarks).
    pub hello_ack_us: std::sync::Mutex<Vec<u64>>,
}

impl DeviceStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One client context for every simulated device: `SslConnector::builder` loads the
/// default CA store (with `SSL_CERT_FILE` set, the whole bundle is parsed), and doing that
/// per connection made a fleet's TLS ramp the generator's bottleneck: the add-on's side of
/// the proxies' upstream handshakes then went unanswered past their 3 s limit.
fn connector() -> Result<&'static SslConnector, String> {
    static CONNECTOR: OnceLock<Result<SslConnector, String>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let mut b =
                SslConnector::builder(SslMethod::tls_client()).map_err(|e| e.to_string())?;
            b.set_verify(SslVerifyMode::NONE);
            b.set_cipher_list(DEVICE_CIPHERS)
                .map_err(|e| e.to_string())?;
            b.set_max_proto_version(Some(SslVersion::TLS1_2))
                .map_err(|e| e.to_string())?;
            Ok(b.build())
        })
        .as_ref()
        .map_err(Clone::clone)
}

async fn dial(cfg: &DeviceConfig) -> Result<Stream, DeviceError> {
    let tcp = TcpStream::connect(cfg.target)
        .await
        .map_err(DeviceError::Connect)?;
    let _ = tcp.set_nodelay(true);
    if !cfg.tls {
        return Ok(Stream::Plain(tcp));
    }
    let tls = |e: &dyn std::fmt::Display| DeviceError::Tls(e.to_string());
    let ssl = connector()
        .map_err(|e| tls(&e))?
        .configure()
        .map_err(|e| tls(&e))?
        .use_server_name_indication(false)
        .verify_hostname(false)
        .into_ssl("")
        .map_err(|e| tls(&e))?;
    let mut s = tokio_openssl::SslStream::new(ssl, tcp).map_err(|e| tls(&e))?;
    Pin::new(&mut s).connect().await.map_err(|e| tls(&e))?;
    Ok(Stream::tls(s))
}

/// Mutable per-device state that survives reconnects (counters continue, like real devices).
struct State {
    id: DeviceId,
    auth: [u8; 16],
    status_msg: u16,
    data_msg: u16,
    report_counter: u8,
    /// (mesh id, on, brightness)
    lights: Vec<(u8, bool, u8)>,
}

impl State {
    fn next_status_msg(&mut self) -> MsgId {
        self.status_msg = self.status_msg.wrapping_add(1);
        let b = self.status_msg.to_be_bytes();
        MsgId([b[0], b[1], 0])
    }

    fn next_data_msg(&mut self) -> MsgId {
        self.data_msg = self.data_msg.wrapping_add(1);
        let b = self.data_msg.to_be_bytes();
        MsgId([b[0], b[1], 0])
    }
}

/// Runs one device until `stop` (or `max_connects` sessions), redialing when disconnected.
pub async fn run(cfg: DeviceConfig, stats: Arc<DeviceStats>, stop: CancellationToken) {
    let (id, auth) = identity(cfg.seed, cfg.index);
    let mut rng = SmallRng::seed_from_u64(cfg.seed ^ (u64::from(cfg.index) << 32) ^ 0x5eed);
    let mut st = State {
        id,
        auth,
        // Real devices continue their counters across reconnects from small values.
        status_msg: rng.gen_range(5..22),
        data_msg: 0,
        report_counter: rng.gen(),
        lights: cfg.mesh.iter().map(|m| (*m, false, 50)).collect(),
    };
    let mut backoff = cfg.redial.0;
    let mut sessions = 0u64;
    while !stop.is_cancelled() {
        if cfg.max_connects.is_some_and(|m| sessions >= m) {
            break;
        }
        sessions += 1;
        if let Ok(stream) = dial(&cfg).await {
            inc(&stats.connects);
            backoff = cfg.redial.0;
            let _ = session(&cfg, &mut st, &mut rng, stream, &stats, &stop).await;
            inc(&stats.disconnects);
        }
        if stop.is_cancelled() {
            break;
        }
        let jitter = rng.gen_range(0.5..1.5);
        let wait = backoff.mul_f64(jitter);
        backoff = (backoff * 2).min(cfg.redial.1);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn session(
    cfg: &DeviceConfig,
    st: &mut State,
    rng: &mut SmallRng,
    stream: Stream,
    stats: &DeviceStats,
    stop: &CancellationToken,
) -> Result<(), DeviceError> {
    let (r, mut w) = tokio::io::split(stream);
    let mut frames = FramedRead::new(r, CyncCodec::default());
    let mut last_send = Instant::now();
    let hello_at = Instant::now();
    let mut acked = false;
    w.write_all(&build::hello(st.id, &st.auth)).await?;
    if cfg.time_request {
        w.write_all(&build::time_request()).await?;
    }
    if cfg.startup_reports {
        let ts = b"20251106:0220:-37,00006,00001,00001,00001,";
        w.write_all(&build::info_tlv(st.id, &[(0xc790, ts)]))
            .await?;
        let m1 = st.next_status_msg();
        let fw_net = build::firmware_report(st.id, m1, false, "0");
        let m2 = st.next_status_msg();
        let fw_dev = build::firmware_report(st.id, m2, true, "11158");
        w.write_all(&[fw_net, fw_dev].concat()).await?;
    }
    // Status reports scheduled after commands: (due, bytes).
    let mut pending: VecDeque<(Instant, Bytes)> = VecDeque::new();
    loop {
        let hb_due = last_send + cfg.heartbeat;
        let next_status = pending.front().map(|(t, _)| *t);
        let frame = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            f = frames.next() => f,
            _ = tokio::time::sleep_until(hb_due) => {
                w.write_all(&build::heartbeat()).await?;
                inc(&stats.heartbeats_sent);
                last_send = Instant::now();
                continue;
            }
            _ = tokio::time::sleep_until(next_status.unwrap_or(hb_due)), if next_status.is_some() => {
                if let Some((_, bytes)) = pending.pop_front() {
                    w.write_all(&bytes).await?;
                    inc(&stats.status_sent);
                    last_send = Instant::now();
                }
                continue;
            }
        };
        let Some(Ok(frame)) = frame else {
            return Ok(());
        };
        let Ok(p) = frame.packet else {
            inc(&stats.other_received);
            continue;
        };
        let reply: Option<Bytes> = match p.ptype() {
            PacketType::HelloAck => {
                if !acked {
                    acked = true;
                    let us = hello_at.elapsed().as_micros() as u64;
                    stats
                        .hello_ack_us
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(us);
                }
                inc(&stats.hello_acks);
                None
            }
            PacketType::ChannelOpen => {
                inc(&stats.channel_opens);
                match (p.id(), p.msg_id()) {
                    (Some(ch), Some(m)) => Some(build::channel_reply(ch, m)),
                    _ => None,
                }
            }
            PacketType::Data if p.is_command() => {
                handle_command(cfg, st, rng, &p, stats, &mut pending)
            }
            PacketType::TimeReply => {
                inc(&stats.time_replies);
                None
            }
            PacketType::InfoAck => {
                inc(&stats.info_acks);
                None
            }
            PacketType::StatusAck => {
                inc(&stats.status_acks);
                None
            }
            PacketType::HeartbeatAck => {
                inc(&stats.heartbeat_acks);
                None
            }
            _ => {
                inc(&stats.other_received);
                None
            }
        };
        if let Some(bytes) = reply {
            w.write_all(&bytes).await?;
            last_send = Instant::now();
        }
    }
}

fn handle_command(
    cfg: &DeviceConfig,
    st: &mut State,
    rng: &mut SmallRng,
    p: &Packet,
    stats: &DeviceStats,
    pending: &mut VecDeque<(Instant, Bytes)>,
) -> Option<Bytes> {
    let f = p.inner()?;
    if f.class() != FrameClass::Request {
        return None;
    }
    let channel = p.id()?;
    let cmd_msg = p.msg_id()?;
    inc(&stats.commands_received);
    let ack = build::data_ack(channel, cmd_msg);
    let my_msg = st.next_data_msg();
    let reply = match f.opcode {
        0x52 => {
            inc(&stats.mesh_queries);
            let devices: Vec<build::MeshDevice> = st
                .lights
                .iter()
                .map(|(m, on, b)| build::MeshDevice {
                    mesh_id: *m,
                    kind: 0x1f,
                    state: u8::from(*on),
                    brightness: *b,
                    temp: 50,
                    rgb: [0; 3],
                })
                .collect();
            build::mesh_reply(channel, my_msg, f.seq, &devices)
        }
        op => {
            if let Some(cmd) = p.command() {
                apply(st, cmd);
            }
            inc(&stats.commands_applied);
            if matches!(op, 0xd0 | 0xf0) {
                let (mesh_id, on, bright) = st.lights.first().copied().unwrap_or((0, false, 0));
                let lo = cfg.status_delay.0.as_millis() as u64;
                let hi = cfg.status_delay.1.as_millis().max(u128::from(lo + 1)) as u64;
                let due = Instant::now() + Duration::from_millis(rng.gen_range(lo..hi));
                st.report_counter = st.report_counter.wrapping_add(1);
                let msg = st.next_status_msg();
                let status = build::mesh_status(
                    st.id,
                    msg,
                    f.seq,
                    st.report_counter,
                    mesh_id,
                    u8::from(on),
                    bright,
                    50,
                );
                pending.push_back((due, status));
            }
            build::command_reply(channel, my_msg, f.seq, op)
        }
    };
    inc(&stats.replies_sent);
    // The f9 reply and the 0x7b go out in one write, as real devices send them.
    Some([reply, ack].concat().into())
}

fn apply(st: &mut State, cmd: crate::protocol::Command) {
    use crate::protocol::Command;
    let target = match cmd {
        Command::Power { mesh_id, .. } | Command::Brightness { mesh_id, .. } => mesh_id,
        Command::Other { .. } => return,
    };
    let only_one = st.lights.len() == 1;
    for l in st.lights.iter_mut() {
        if u16::from(l.0) == target || only_one {
            match cmd {
                Command::Power { on, .. } => l.1 = on,
                Command::Brightness { percent, .. } => l.2 = percent,
                Command::Other { .. } => {}
            }
        }
    }
}
