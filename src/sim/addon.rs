//! A fake Home Assistant add-on (the legacy Cync server) with a command harness.
//!
//! Toward devices it reproduces the add-on's observable behaviour (`cync-protocol.md` §4–§9):
//! 0x28 at once; 0xa3 with the device id at +0.5 s (the connection is then "ready"); the mesh
//! query at +2 s, its receive loop blocked until then; the fixed stale 0xc8; 0x48; 0x88
//! echoing the msg_id; 0xd8; never a 0x7b; and the rest of a read dropped after an unknown
//! leading byte.
//!
//! The harness sends `f8` power/brightness commands to ready connections at a configured rate,
//! with msg_id `00 00 00` and a per-connection inner seq 1…255 that wraps, and records a
//! command as done when the `f9` reply with its inner seq arrives within 5 s (else timed out).
//!
//! Invariants:
//! - Behaviour can be changed at run time ([`Addon::set_mode`]) and the server restarted on the
//!   same port ([`Addon::restart`]), which drops every connection, as an add-on restart does.
//! - Like the real one observed on loopback, it can hold connections beyond a limit unanswered
//!   and close them later (`max_connections`), and, like servers that keep one session per
//!   device or peer address, close a device's older connection when a newer one arrives
//!   ([`OneSession`]).
//! - Harness results are exact counts: every command sent ends as exactly one of done, timed
//!   out, or lost (its connection closed first).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use openssl::ssl::SslAcceptor;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::conn::tls::{self, Stream};
use crate::protocol::build;
use crate::protocol::{
    header_data_len, DeviceId, FrameClass, MsgId, Packet, PacketType, DEFAULT_MAX_DATA_LEN,
};

/// How long the harness (like the add-on) waits for a command's `f9` reply.
pub const COMMAND_WAIT: Duration = Duration::from_secs(5);

/// How the add-on answers devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Normal,
    /// Reads but answers nothing (its writing direction stalled).
    Silent,
    /// Answers every packet after a delay (its loop blocked meanwhile, like the real one).
    Slow,
    /// Answers everything but 0x83 (a different answer, for shadow diffing).
    NoStatusAck,
    /// Stops reading devices altogether (its reading direction stalled): their writes back up
    /// into TCP, commands still go out.
    StallReads,
}

impl Mode {
    fn to_u8(self) -> u8 {
        match self {
            Mode::Normal => 0,
            Mode::Silent => 1,
            Mode::Slow => 2,
            Mode::NoStatusAck => 3,
            Mode::StallReads => 4,
        }
    }

    fn from_u8(v: u8) -> Mode {
        match v {
            1 => Mode::Silent,
            2 => Mode::Slow,
            3 => Mode::NoStatusAck,
            4 => Mode::StallReads,
            _ => Mode::Normal,
        }
    }
}

/// Which older connection a new one replaces, as servers that keep one session per device (or
/// per peer address) do: the older one is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OneSession {
    /// Every connection is served (the real add-on).
    #[default]
    None,
    /// A hello from a device closes that device's older connections.
    Device,
    /// A connection from an address closes the older connections from that address.
    Source,
}

#[derive(Debug, Clone)]
pub struct AddonConfig {
    /// Serve TLS (the real add-on only listens with TLS) or plaintext.
    pub tls: bool,
    /// Delay of the 0xa3 after the 0x28.
    pub channel_open_after: Duration,
    /// When the mesh query goes out; the receive loop is blocked until then.
    pub mesh_query_after: Duration,
    pub slow_delay: Duration,
    pub seed: u64,
    /// Connections served at once; beyond it a connection is accepted, read and never
    /// answered, then closed after `over_limit_hold` (what the real add-on does at its limit).
    pub max_connections: Option<usize>,
    pub over_limit_hold: Duration,
    pub one_session: OneSession,
}

impl Default for AddonConfig {
    fn default() -> Self {
        AddonConfig {
            tls: false,
            channel_open_after: Duration::from_millis(500),
            mesh_query_after: Duration::from_secs(2),
            slow_delay: Duration::from_secs(1),
            seed: 1,
            max_connections: None,
            over_limit_hold: Duration::from_secs(15),
            one_session: OneSession::None,
        }
    }
}

/// Harness results.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HarnessReport {
    pub sent: u64,
    pub done: u64,
    pub timed_out: u64,
    pub lost: u64,
    pub in_flight: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// `f9` replies that matched no waiting command: duplicates, or answers after a timeout.
    pub unmatched_replies: u64,
}

impl HarnessReport {
    pub fn success_ratio(&self) -> f64 {
        let finished = self.done + self.timed_out + self.lost;
        if finished == 0 {
            1.0
        } else {
            self.done as f64 / finished as f64
        }
    }
}

struct Conn {
    device: Option<DeviceId>,
    peer: Option<std::net::IpAddr>,
    /// Closes this connection (a newer one replaced it).
    kick: CancellationToken,
    ready: bool,
    next_seq: u8,
    tx: mpsc::UnboundedSender<Bytes>,
    /// Commands awaiting their f9, by inner seq.
    waiting: HashMap<u8, Instant>,
}

struct Harness {
    sent: u64,
    done: u64,
    timed_out: u64,
    lost: u64,
    unmatched: u64,
    latency: Histogram<u64>,
    /// The same, since the last [`Addon::take_interval_p99`]: a cumulative p99 cannot show
    /// a reload's second against the ones before it.
    interval: Histogram<u64>,
    /// Finished commands per device: (done, failed).
    by_device: HashMap<DeviceId, (u64, u64)>,
}

impl Harness {
    fn finished(&mut self, device: Option<DeviceId>, ok: bool, n: u64) {
        if let Some(d) = device {
            let e = self.by_device.entry(d).or_default();
            if ok {
                e.0 += n;
            } else {
                e.1 += n;
            }
        }
    }
}

struct Shared {
    cfg: AddonConfig,
    mode: AtomicU8,
    conns: Mutex<HashMap<u64, Conn>>,
    harness: Mutex<Harness>,
    next_conn: AtomicU64,
    /// Per-type counts of what devices sent, and of connections accepted.
    pub accepted: AtomicU64,
    received: Mutex<HashMap<PacketType, u64>>,
    /// 0x73 packets sent to devices (commands, mesh queries, mesh acks).
    data_sent: AtomicU64,
    /// Connections closed because a newer one replaced them, and connections refused at the
    /// limit (held, then closed).
    kicked: AtomicU64,
    over_limit: AtomicU64,
    /// TLS handshakes that resumed an earlier session: how much signing a proxy's session
    /// reuse spared the add-on, seen from here for every proxy alike.
    resumed: AtomicU64,
    acceptor: Option<SslAcceptor>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running fake add-on.
pub struct Addon {
    addr: SocketAddr,
    shared: Arc<Shared>,
    generation: Mutex<CancellationToken>,
    stop: CancellationToken,
}

impl Addon {
    /// Starts on an already-bound listener.
    pub fn start(listener: TcpListener, cfg: AddonConfig) -> std::io::Result<Arc<Addon>> {
        let addr = listener.local_addr()?;
        let acceptor = if cfg.tls {
            let s = tls::self_signed("*.xlink.cn").map_err(std::io::Error::other)?;
            let mut b = SslAcceptor::mozilla_intermediate_v5(openssl::ssl::SslMethod::tls_server())
                .map_err(std::io::Error::other)?;
            b.set_certificate(&s.cert).map_err(std::io::Error::other)?;
            b.set_private_key(&s.key).map_err(std::io::Error::other)?;
            // Devices reach the real add-on directly with their static-RSA suites: so must
            // they reach this one (the direct baseline of the benchmarks).
            b.set_cipher_list(&format!(
                "{}:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384",
                crate::sim::device::DEVICE_CIPHERS
            ))
            .map_err(std::io::Error::other)?;
            Some(b.build())
        } else {
            None
        };
        let shared = Arc::new(Shared {
            cfg,
            mode: AtomicU8::new(Mode::Normal.to_u8()),
            conns: Mutex::new(HashMap::new()),
            harness: Mutex::new(Harness {
                sent: 0,
                done: 0,
                timed_out: 0,
                lost: 0,
                unmatched: 0,
                latency: new_histogram()?,
                interval: new_histogram()?,
                by_device: HashMap::new(),
            }),
            next_conn: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            received: Mutex::new(HashMap::new()),
            data_sent: AtomicU64::new(0),
            kicked: AtomicU64::new(0),
            over_limit: AtomicU64::new(0),
            acceptor,
        });
        let stop = CancellationToken::new();
        let generation = stop.child_token();
        tokio::spawn(accept_loop(listener, shared.clone(), generation.clone()));
        Ok(Arc::new(Addon {
            addr,
            shared,
            generation: Mutex::new(generation),
            stop,
        }))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.store(mode.to_u8(), Ordering::SeqCst);
    }

    /// Connections open now, and how many are ready (0xa3 sent).
    pub fn connections(&self) -> (usize, usize) {
        let c = lock(&self.shared.conns);
        (c.len(), c.values().filter(|c| c.ready).count())
    }

    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Packets of `t` received from devices so far.
    pub fn received(&self, t: PacketType) -> u64 {
        lock(&self.shared.received).get(&t).copied().unwrap_or(0)
    }

    /// 0x73 packets sent to devices so far; each deserves at most one 0x7b.
    pub fn data_sent(&self) -> u64 {
        self.shared.data_sent.load(Ordering::SeqCst)
    }

    /// TLS handshakes that resumed an earlier session.
    pub fn resumed(&self) -> u64 {
        self.shared.resumed.load(Ordering::SeqCst)
    }

    /// Connections closed because a newer one replaced them ([`OneSession`]).
    pub fn kicked(&self) -> u64 {
        self.shared.kicked.load(Ordering::SeqCst)
    }

    /// Connections accepted beyond `max_connections` (held unanswered, then closed).
    pub fn over_limit(&self) -> u64 {
        self.shared.over_limit.load(Ordering::SeqCst)
    }

    /// Open connections of `device` (served ones, not those held at the limit).
    pub fn connections_of(&self, device: DeviceId) -> usize {
        lock(&self.shared.conns)
            .values()
            .filter(|c| c.device == Some(device))
            .count()
    }

    /// Starts the harness counts and latency histogram afresh (commands in flight still count
    /// when they finish).
    pub fn reset_report(&self) {
        let mut h = lock(&self.shared.harness);
        h.sent = 0;
        h.done = 0;
        h.timed_out = 0;
        h.lost = 0;
        h.unmatched = 0;
        h.latency.reset();
        h.interval.reset();
        h.by_device.clear();
    }

    /// Drops every connection and listens again on the same address, like an add-on restart.
    pub async fn restart(&self) -> std::io::Result<()> {
        self.restart_after(Duration::ZERO).await
    }

    /// Drops every connection, stays away for `outage` (nothing listens: connections are
    /// refused), then listens again on the same address: a real add-on or container restart,
    /// which takes from half a second to several.
    pub async fn restart_after(&self, outage: Duration) -> std::io::Result<()> {
        let next = self.stop.child_token();
        let old = std::mem::replace(&mut *lock(&self.generation), next.clone());
        old.cancel();
        tokio::time::sleep(outage).await;
        // The old listener is dropped by its loop; bind again until the port is free.
        let end = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < end => {
                    let _ = e;
                    tokio::task::yield_now().await;
                }
                Err(e) => return Err(e),
            }
        };
        tokio::spawn(accept_loop(listener, self.shared.clone(), next));
        Ok(())
    }

    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Sends one command to a ready connection (round-robin by connection id from `cursor`).
    /// Returns false when no connection is ready.
    pub fn send_command(&self, cursor: &mut u64, rng: &mut SmallRng) -> bool {
        let mut conns = lock(&self.shared.conns);
        let mut ids: Vec<u64> = conns
            .iter()
            .filter(|(_, c)| c.ready)
            .map(|(k, _)| *k)
            .collect();
        if ids.is_empty() {
            return false;
        }
        ids.sort_unstable();
        let pick = ids[(*cursor as usize) % ids.len()];
        *cursor = cursor.wrapping_add(1);
        let Some(conn) = conns.get_mut(&pick) else {
            return false;
        };
        let Some(dev) = conn.device else {
            return false;
        };
        // Inner seq 1..=255, wrapping, per connection, as the add-on does.
        conn.next_seq = if conn.next_seq == 255 {
            1
        } else {
            conn.next_seq + 1
        };
        let seq = conn.next_seq;
        let zero = MsgId([0, 0, 0]);
        let cmd = if rng.gen_bool(0.5) {
            build::power_command(dev, zero, seq, 10, rng.gen_bool(0.5))
        } else {
            build::brightness_command(dev, zero, seq, 10, rng.gen_range(0..=100))
        };
        if conn.tx.send(cmd).is_err() {
            return false;
        }
        self.shared.data_sent.fetch_add(1, Ordering::SeqCst);
        // A command still waiting on this seq after a wrap is superseded: count it lost.
        if conn.waiting.insert(seq, Instant::now()).is_some() {
            let mut h = lock(&self.shared.harness);
            h.lost += 1;
            h.finished(Some(dev), false, 1);
        }
        lock(&self.shared.harness).sent += 1;
        true
    }

    /// Runs the harness at `rate` commands per second until `stop`.
    pub async fn run_harness(self: &Arc<Self>, rate: f64, seed: u64, stop: CancellationToken) {
        if rate <= 0.0 {
            return;
        }
        let mut rng = SmallRng::seed_from_u64(seed);
        let period = Duration::from_secs_f64(1.0 / rate);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut cursor = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    self.expire();
                    self.send_command(&mut cursor, &mut rng);
                }
            }
        }
    }

    /// The p99 (ms) of the commands answered since the last call, and how many; the
    /// interval starts afresh.
    pub fn take_interval_p99(&self) -> (f64, u64) {
        let mut h = lock(&self.shared.harness);
        let out = (
            h.interval.value_at_quantile(0.99) as f64 / 1000.0,
            h.interval.len(),
        );
        h.interval.reset();
        out
    }

    /// Times out commands older than [`COMMAND_WAIT`].
    pub fn expire(&self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        // Lock order conns → harness everywhere: a command leaves `waiting` and enters the
        // harness counts under one lock, so a report never sees it in neither.
        let mut conns = lock(&self.shared.conns);
        for c in conns.values_mut() {
            let before = c.waiting.len();
            c.waiting
                .retain(|_, sent| now.duration_since(*sent) < COMMAND_WAIT);
            let n = (before - c.waiting.len()) as u64;
            if n > 0 {
                expired.push((c.device, n));
            }
        }
        let mut h = lock(&self.shared.harness);
        for (d, n) in expired {
            h.timed_out += n;
            h.finished(d, false, n);
        }
    }

    /// Finished commands per device since the last reset: (done, failed).
    pub fn outcomes_by_device(&self) -> HashMap<DeviceId, (u64, u64)> {
        self.expire();
        lock(&self.shared.harness).by_device.clone()
    }

    pub fn report(&self) -> HarnessReport {
        self.expire();
        let conns = lock(&self.shared.conns);
        let in_flight: u64 = conns.values().map(|c| c.waiting.len() as u64).sum();
        let h = lock(&self.shared.harness);
        drop(conns);
        let q = |p: f64| h.latency.value_at_quantile(p) as f64 / 1000.0;
        HarnessReport {
            sent: h.sent,
            done: h.done,
            timed_out: h.timed_out,
            lost: h.lost,
            in_flight,
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            max_ms: h.latency.max() as f64 / 1000.0,
            unmatched_replies: h.unmatched,
        }
    }
}

/// Microsecond latencies up to 60 s, 3 significant digits.
pub fn new_histogram() -> std::io::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).map_err(std::io::Error::other)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, gen: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = gen.cancelled() => return,
            r = listener.accept() => r,
        };
        let Ok((tcp, peer)) = accepted else { continue };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        let gen = gen.clone();
        let full = shared
            .cfg
            .max_connections
            .is_some_and(|m| lock(&shared.conns).len() >= m);
        if full {
            shared.over_limit.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(hold_over_limit(tcp, shared.cfg.over_limit_hold, gen));
            continue;
        }
        tokio::spawn(async move {
            let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
            let _ = serve(tcp, id, peer, &shared, gen).await;
            let mut conns = lock(&shared.conns);
            if let Some(c) = conns.remove(&id) {
                let mut h = lock(&shared.harness);
                h.lost += c.waiting.len() as u64;
                h.finished(c.device, false, c.waiting.len() as u64);
            }
        });
    }
}

/// Closes the served connections `older` picks.
fn kick(shared: &Shared, older: impl Fn(&Conn) -> bool) {
    for c in lock(&shared.conns).values().filter(|c| older(c)) {
        if !c.kick.is_cancelled() {
            c.kick.cancel();
            shared.kicked.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A connection beyond the limit: read (TLS or not, the bytes are dropped), never answered,
/// closed after `hold`.
async fn hold_over_limit(mut tcp: TcpStream, hold: Duration, gen: CancellationToken) {
    let end = Instant::now() + hold;
    let mut buf = [0u8; 2048];
    loop {
        tokio::select! {
            _ = gen.cancelled() => return,
            _ = tokio::time::sleep_until(end) => return,
            r = tcp.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { return },
        }
    }
}

async fn serve(
    tcp: TcpStream,
    id: u64,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    gen: CancellationToken,
) -> std::io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut stream = match &shared.acceptor {
        None => Stream::Plain(tcp),
        Some(a) => tls::accept(a, tcp).await.map_err(std::io::Error::other)?,
    };
    if stream.session_reused() {
        shared.resumed.fetch_add(1, Ordering::SeqCst);
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let kicked = CancellationToken::new();
    // The older sessions of this address end as this one registers, under the same lock, so
    // connections that arrive together cannot all slip past each other.
    {
        let mut conns = lock(&shared.conns);
        if shared.cfg.one_session == OneSession::Source {
            for c in conns.values().filter(|c| c.peer == Some(peer.ip())) {
                if !c.kick.is_cancelled() {
                    c.kick.cancel();
                    shared.kicked.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        conns.insert(
            id,
            Conn {
                device: None,
                peer: Some(peer.ip()),
                kick: kicked.clone(),
                ready: false,
                next_seq: 0,
                tx,
                waiting: HashMap::new(),
            },
        );
    }
    let mut rng = SmallRng::seed_from_u64(shared.cfg.seed ^ id);
    let mut carry = BytesMut::new();
    let mut hello_at: Option<Instant> = None;
    let mut channel_sent = false;
    let mut query_sent = false;
    let mut read_buf = vec![0u8; 2048];
    loop {
        let open_due = hello_at.map(|t| t + shared.cfg.channel_open_after);
        let query_due = hello_at.map(|t| t + shared.cfg.mesh_query_after);
        // The add-on's receive loop is blocked between the hello and the mesh query.
        let blocked = (hello_at.is_some() && !query_sent)
            || Mode::from_u8(shared.mode.load(Ordering::SeqCst)) == Mode::StallReads;
        let next_timer = match (channel_sent, query_sent) {
            (false, _) => open_due,
            (true, false) => query_due,
            _ => None,
        };
        tokio::select! {
            _ = gen.cancelled() => return Ok(()),
            _ = kicked.cancelled() => return Ok(()),
            Some(out) = rx.recv() => { stream.write_all(&out).await?; }
            _ = tokio::time::sleep_until(next_timer.unwrap_or_else(Instant::now)), if next_timer.is_some() => {
                let dev = lock(&shared.conns).get(&id).and_then(|c| c.device);
                let Some(dev) = dev else { continue };
                if !channel_sent {
                    channel_sent = true;
                    let r: u16 = rng.gen();
                    let b = r.to_be_bytes();
                    stream.write_all(&build::channel_open(dev, MsgId([b[0], b[1], 0]))).await?;
                    if let Some(c) = lock(&shared.conns).get_mut(&id) { c.ready = true; }
                } else {
                    query_sent = true;
                    shared.data_sent.fetch_add(1, Ordering::SeqCst);
                    stream.write_all(&build::mesh_query(dev, MsgId([0, 0, 0]), 0)).await?;
                }
            }
            // Re-evaluated at least every 50 ms, so a mode change (stall or resume) is noticed.
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            n = stream.read(&mut read_buf), if !blocked => {
                let n = n?;
                if n == 0 { return Ok(()); }
                carry.extend_from_slice(&read_buf[..n]);
                let out = handle_read(&mut carry, id, shared, &mut hello_at).await;
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                }
            }
        }
    }
}

/// Processes whole packets of one read; drops the rest of the read after an unknown type.
async fn handle_read(
    carry: &mut BytesMut,
    id: u64,
    shared: &Shared,
    hello_at: &mut Option<Instant>,
) -> Vec<u8> {
    let mode = Mode::from_u8(shared.mode.load(Ordering::SeqCst));
    let mut out = Vec::new();
    while let Some(data_len) = header_data_len(carry) {
        if PacketType::from_byte(carry[0]).is_none() || data_len > DEFAULT_MAX_DATA_LEN {
            carry.clear();
            break;
        }
        if carry.len() < 5 + data_len {
            break;
        }
        let raw = carry.split_to(5 + data_len).freeze();
        let Ok(p) = Packet::parse(raw, DEFAULT_MAX_DATA_LEN) else {
            continue;
        };
        *lock(&shared.received).entry(p.ptype()).or_insert(0) += 1;
        if mode == Mode::Silent {
            continue;
        }
        if mode == Mode::Slow {
            tokio::time::sleep(shared.cfg.slow_delay).await;
        }
        match p.ptype() {
            PacketType::Hello => {
                if shared.cfg.one_session == OneSession::Device {
                    if let Some(dev) = p.id() {
                        kick(shared, |c| c.device == Some(dev));
                    }
                }
                if let Some(c) = lock(&shared.conns).get_mut(&id) {
                    c.device = p.id();
                }
                *hello_at = Some(Instant::now());
                out.extend_from_slice(&build::hello_ack());
            }
            PacketType::TimeRequest => out.extend_from_slice(&build::time_reply_stale()),
            PacketType::Info => out.extend_from_slice(&build::info_ack()),
            PacketType::Status if mode != Mode::NoStatusAck => {
                if let Some(m) = p.msg_id() {
                    out.extend_from_slice(&build::status_ack(m));
                }
            }
            PacketType::Heartbeat => out.extend_from_slice(&build::heartbeat_ack()),
            PacketType::Data => {
                if let Some(f) = p.inner().filter(|f| f.class() == FrameClass::Reply) {
                    if f.opcode == 0x52 {
                        if let Some(dev) = p.id() {
                            shared.data_sent.fetch_add(1, Ordering::SeqCst);
                            out.extend_from_slice(&build::mesh_ack(dev, MsgId([0, 0, 0]), f.seq));
                        }
                        continue;
                    }
                    let mut conns = lock(&shared.conns);
                    let sent = conns
                        .get_mut(&id)
                        .and_then(|c| c.waiting.remove(&f.seq).map(|t| (t, c.device)));
                    if let Some((sent, device)) = sent {
                        let waited = Instant::now().duration_since(sent);
                        let mut h = lock(&shared.harness);
                        if waited >= COMMAND_WAIT {
                            // The add-on gave up on it already, whenever expiry last ran.
                            h.timed_out += 1;
                            h.finished(device, false, 1);
                        } else {
                            h.done += 1;
                            h.finished(device, true, 1);
                            let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX).max(1);
                            let _ = h.latency.record(us);
                            let _ = h.interval.record(us);
                        }
                    } else if matches!(f.opcode, 0xd0 | 0xf0) {
                        // Only the harness sends power/brightness; the device also answers the
                        // add-on's mesh ack (`af`), which is not the harness's business.
                        lock(&shared.harness).unmatched += 1;
                    }
                }
            }
            _ => {}
        }
    }
    out
}
