//! A protocol-aware fault proxy for either leg (device↔gateway or gateway↔add-on), plaintext.
//!
//! It frames each direction with the Cync codec and applies a plan of rules to the frames that
//! match a filter (packet types, inner class): drop, delay with jitter, duplicate, reorder,
//! corrupt the checksum or the length field, reset the connection, stall mid-frame, slow close,
//! bandwidth limit, heartbeat storm. A rule fires either on the `nth` matching frame of a
//! connection direction (deterministic) or with a `probability` drawn from a seeded RNG.
//!
//! Invariants:
//! - Same plan, same seed, same traffic ⇒ same faults: each (connection, direction, rule) has
//!   its own RNG seeded from the plan seed and the device's hello bytes, so results do not
//!   depend on accept order or on other connections.
//! - Bytes that cannot be framed are passed through untouched (the proxy itself never adds
//!   faults that the plan did not ask for).
//! - [`ChaosStats`] counts every fault that fired, by kind, so tests can show it happened.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::protocol::build;
use crate::protocol::{header_data_len, Packet, PacketType, DEFAULT_MAX_DATA_LEN};

#[derive(Debug, Error)]
pub enum PlanError {
    #[error("reading plan {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("plan: {0}")]
    Parse(String),
    #[error("rule {index}: {message}")]
    Rule { index: usize, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    Drop,
    Delay,
    Duplicate,
    Reorder,
    CorruptChecksum,
    CorruptLength,
    Reset,
    Stall,
    SlowClose,
    Bandwidth,
    HeartbeatStorm,
}

impl Fault {
    /// Its name in plans and reports (derived).
    pub fn label(self) -> &'static str {
        self.into()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Which {
    DevToSrv,
    SrvToDev,
    #[default]
    Both,
}

/// One rule as written in a plan file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub direction: Which,
    pub fault: Fault,
    /// Only frames of these types ("0x73"); all frames when absent.
    #[serde(default)]
    pub types: Vec<String>,
    /// Only 0x73/0x83 frames of this inner class ("f8", "f9", "fa").
    pub class: Option<String>,
    /// Fire on each matching frame with this probability (seeded).
    pub probability: Option<f64>,
    /// Fire on exactly the nth matching frame (1-based) of each connection direction.
    pub nth: Option<u64>,
    /// Delay / slow-close time, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
    /// Added uniformly in [0, jitter_ms].
    #[serde(default)]
    pub jitter_ms: u64,
    /// Bandwidth limit.
    pub bytes_per_sec: Option<u64>,
    /// Heartbeat-storm size.
    #[serde(default = "default_storm")]
    pub count: u32,
}

fn default_storm() -> u32 {
    20
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Plan {
    pub fn parse(text: &str) -> Result<Plan, PlanError> {
        let plan: Plan = toml::from_str(text).map_err(|e| PlanError::Parse(e.to_string()))?;
        for (index, r) in plan.rules.iter().enumerate() {
            let bad = |message: &str| PlanError::Rule {
                index,
                message: message.to_string(),
            };
            for t in &r.types {
                if parse_type(t).is_none() {
                    return Err(bad(&format!("unknown packet type {t:?}")));
                }
            }
            if let Some(c) = &r.class {
                if parse_hex_byte(c).is_none() {
                    return Err(bad(&format!("class {c:?} is not a hex byte like \"f9\"")));
                }
            }
            if r.probability.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
                return Err(bad("probability must be within 0..=1"));
            }
            if r.nth == Some(0) {
                return Err(bad("nth counts from 1"));
            }
            if r.fault == Fault::Bandwidth && r.bytes_per_sec.unwrap_or(0) == 0 {
                return Err(bad("bandwidth needs bytes_per_sec > 0"));
            }
        }
        Ok(plan)
    }

    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }
}

fn parse_hex_byte(s: &str) -> Option<u8> {
    u8::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

fn parse_type(s: &str) -> Option<PacketType> {
    parse_hex_byte(s).and_then(PacketType::from_byte)
}

/// Faults fired so far, by kind.
#[derive(Debug, Default)]
pub struct ChaosStats {
    fired: Mutex<HashMap<&'static str, u64>>,
}

impl ChaosStats {
    fn fire(&self, f: Fault) {
        *self
            .fired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(f.label())
            .or_insert(0) += 1;
    }

    pub fn fired(&self, f: Fault) -> u64 {
        self.fired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(f.label())
            .copied()
            .unwrap_or(0)
    }

    pub fn snapshot(&self) -> HashMap<&'static str, u64> {
        self.fired.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A running chaos proxy.
pub struct Chaos {
    addr: SocketAddr,
    pub stats: Arc<ChaosStats>,
    stop: CancellationToken,
    /// Set by [`Chaos::heal_new_connections`].
    healed: Arc<std::sync::atomic::AtomicBool>,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl Chaos {
    /// Proxies connections accepted on `listener` to `target`, applying `plan`.
    pub fn start(listener: TcpListener, target: SocketAddr, plan: Plan) -> std::io::Result<Chaos> {
        let addr = listener.local_addr()?;
        let stats = Arc::new(ChaosStats::default());
        let stop = CancellationToken::new();
        let plan = Arc::new(plan);
        let clean = Arc::new(Plan {
            seed: plan.seed,
            rules: Vec::new(),
        });
        let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (s, st, h, a) = (stats.clone(), stop.clone(), healed.clone(), armed.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = st.cancelled() => return,
                    r = listener.accept() => r,
                };
                let Ok((client, _)) = accepted else { continue };
                let plan = if h.load(std::sync::atomic::Ordering::SeqCst) {
                    clean.clone()
                } else {
                    plan.clone()
                };
                let (s, st, armed) = (s.clone(), st.clone(), a.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    proxy(client, server, plan, s, st, armed).await;
                });
            }
        });
        Ok(Chaos {
            addr,
            stats,
            stop,
            healed,
            armed,
        })
    }

    /// Stops applying the plan, to open connections too, until [`Chaos::arm`]: forwarding
    /// goes on untouched meanwhile (a fault that starts at a chosen moment).
    pub fn disarm(&self) {
        self.armed.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Applies the plan again, to open connections too.
    pub fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections accepted from now on are forwarded untouched; open ones keep their faults.
    /// (A fault that belongs to the connections a device had, not to the device: once a
    /// device redials, it is healthy.)
    pub fn heal_new_connections(&self) {
        self.healed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Lane {
    rules: Vec<(Rule, SmallRng, u64)>,
    /// Rules apply only while this is set ([`Chaos::arm`]).
    armed: Arc<std::sync::atomic::AtomicBool>,
    held: Option<Bytes>,
    stalled: bool,
}

enum Verdict {
    Continue,
    Reset,
}

async fn proxy(
    client: TcpStream,
    server: TcpStream,
    plan: Arc<Plan>,
    stats: Arc<ChaosStats>,
    stop: CancellationToken,
    armed: Arc<std::sync::atomic::AtomicBool>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // Seed each connection from the device's first bytes so results follow the device, not the
    // order connections were accepted in.
    let mut peek = [0u8; 16];
    let n = client.peek(&mut peek).await.unwrap_or(0);
    let mut h = Sha256::new();
    h.update(plan.seed.to_be_bytes());
    h.update(&peek[..n]);
    let d = h.finalize();
    let conn_seed = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    let lane = |which: Which, salt: u64| Lane {
        rules: plan
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.direction == which || r.direction == Which::Both)
            .map(|(i, r)| {
                let seed = conn_seed ^ salt ^ ((i as u64 + 1) << 40);
                (r.clone(), SmallRng::seed_from_u64(seed), 0)
            })
            .collect(),
        held: None,
        stalled: false,
        armed: armed.clone(),
    };
    let (mut client, mut server) = (client, server);
    let reset = {
        // Borrowed halves: unlike owned ones they send no FIN when dropped, so a reset stays a
        // reset.
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let up = pump(cr, sw, lane(Which::DevToSrv, 1), stats.clone());
        let down = pump(sr, cw, lane(Which::SrvToDev, 2), stats.clone());
        tokio::pin!(up, down);
        let mut up_done = false;
        let mut down_done = false;
        loop {
            if up_done && down_done {
                break false;
            }
            tokio::select! {
                _ = stop.cancelled() => break false,
                r = &mut up, if !up_done => {
                    if matches!(r, Some(Verdict::Reset)) { break true; }
                    up_done = true;
                }
                r = &mut down, if !down_done => {
                    if matches!(r, Some(Verdict::Reset)) { break true; }
                    down_done = true;
                }
            }
        }
    };
    if reset {
        for tcp in [&client, &server] {
            let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
        }
    }
}

fn matches(rule: &Rule, p: Option<&Packet>, ty: u8) -> bool {
    if !rule.types.is_empty() && !rule.types.iter().any(|t| parse_hex_byte(t) == Some(ty)) {
        return false;
    }
    if let Some(c) = &rule.class {
        let want = parse_hex_byte(c);
        let got = p.and_then(|p| p.inner()).map(|f| f.class_byte);
        if got.is_none() || got != want {
            return false;
        }
    }
    true
}

/// Forwards one direction. Returns `Some(Reset)` when a reset fault fired (both sockets are
/// then closed with RST by dropping them with linger 0), `None`/`Continue` on a clean end.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut lane: Lane,
    stats: Arc<ChaosStats>,
) -> Option<Verdict> {
    let mut buf = BytesMut::with_capacity(8192);
    let slow_close = lane
        .rules
        .iter()
        .find(|(r, _, _)| r.fault == Fault::SlowClose)
        .map(|(r, _, _)| Duration::from_millis(r.delay_ms));
    let bandwidth = lane
        .rules
        .iter()
        .find(|(r, _, _)| r.fault == Fault::Bandwidth)
        .and_then(|(r, _, _)| r.bytes_per_sec);
    loop {
        let n = from.read_buf(&mut buf).await.ok()?;
        if n == 0 {
            if let Some(d) = slow_close {
                stats.fire(Fault::SlowClose);
                tokio::time::sleep(d).await;
            }
            if let Some(h) = lane.held.take() {
                let _ = to.write_all(&h).await;
            }
            let _ = to.shutdown().await;
            return Some(Verdict::Continue);
        }
        let mut out: Vec<u8> = Vec::new();
        while let Some(data_len) = header_data_len(&buf) {
            let ty = buf[0];
            if PacketType::from_byte(ty).is_none() || data_len > DEFAULT_MAX_DATA_LEN {
                // Not framable: pass everything buffered through unchanged.
                out.extend_from_slice(&buf.split());
                break;
            }
            if buf.len() < 5 + data_len {
                break;
            }
            let frame = buf.split_to(5 + data_len).freeze();
            let parsed = Packet::parse(frame.clone(), DEFAULT_MAX_DATA_LEN).ok();
            if lane.stalled {
                continue;
            }
            let mut frame_out = vec![frame.clone()];
            let mut delay = Duration::ZERO;
            let mut hold = false;
            let armed = lane.armed.load(std::sync::atomic::Ordering::SeqCst);
            for (rule, rng, seen) in lane.rules.iter_mut() {
                if !armed || matches!(rule.fault, Fault::SlowClose | Fault::Bandwidth) {
                    continue;
                }
                if !matches(rule, parsed.as_ref(), ty) {
                    continue;
                }
                *seen += 1;
                let fire = match (rule.nth, rule.probability) {
                    (Some(n), _) => *seen == n,
                    (None, Some(p)) => rng.gen_bool(p),
                    (None, None) => true,
                };
                if !fire {
                    continue;
                }
                stats.fire(rule.fault);
                match rule.fault {
                    Fault::Drop => frame_out.clear(),
                    Fault::Delay => {
                        let j = if rule.jitter_ms > 0 {
                            rng.gen_range(0..=rule.jitter_ms)
                        } else {
                            0
                        };
                        delay += Duration::from_millis(rule.delay_ms + j);
                    }
                    Fault::Duplicate => {
                        let copies: Vec<Bytes> = frame_out.clone();
                        frame_out.extend(copies);
                    }
                    Fault::Reorder => hold = true,
                    Fault::CorruptChecksum => {
                        frame_out = frame_out
                            .iter()
                            .map(|f| corrupt_at(f, f.len().saturating_sub(2)))
                            .collect();
                    }
                    Fault::CorruptLength => {
                        frame_out = frame_out.iter().map(|f| corrupt_at(f, 4)).collect();
                    }
                    Fault::Reset => {
                        return Some(Verdict::Reset);
                    }
                    Fault::Stall => {
                        // Half of this frame goes out, then nothing more in this direction.
                        let half = frame.slice(..frame.len() / 2);
                        frame_out = vec![half];
                        lane.stalled = true;
                    }
                    Fault::HeartbeatStorm => {
                        for _ in 0..rule.count {
                            frame_out.push(build::heartbeat());
                        }
                    }
                    Fault::SlowClose | Fault::Bandwidth => {}
                }
            }
            if !delay.is_zero() {
                if !out.is_empty() {
                    write_limited(&mut to, &out, bandwidth).await.ok()?;
                    out.clear();
                }
                tokio::time::sleep(delay).await;
            }
            if hold && lane.held.is_none() {
                lane.held = Some(frame_out.concat().into());
                continue;
            }
            for f in frame_out {
                out.extend_from_slice(&f);
            }
            if let Some(h) = lane.held.take() {
                out.extend_from_slice(&h);
            }
        }
        if !out.is_empty() {
            write_limited(&mut to, &out, bandwidth).await.ok()?;
        }
    }
}

fn corrupt_at(f: &Bytes, at: usize) -> Bytes {
    let mut v = f.to_vec();
    if let Some(b) = v.get_mut(at) {
        *b = b.wrapping_add(1);
    }
    v.into()
}

async fn write_limited(
    to: &mut WriteHalf<'_>,
    bytes: &[u8],
    bytes_per_sec: Option<u64>,
) -> std::io::Result<()> {
    match bytes_per_sec {
        None => to.write_all(bytes).await,
        Some(bps) => {
            // Small slices, each followed by the time it "costs" at this rate.
            let step = usize::try_from((bps / 10).max(1)).unwrap_or(1);
            for chunk in bytes.chunks(step) {
                to.write_all(chunk).await?;
                tokio::time::sleep(Duration::from_secs_f64(chunk.len() as f64 / bps as f64)).await;
            }
            Ok(())
        }
    }
}
