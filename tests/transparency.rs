//! What real streams carry besides whole frames — stray bytes, frames cut short, junk headers,
//! a device that half-closes — through both paths over real sockets, side by side: the new
//! path must pass every byte as legacy does, and the decoders of both must stay in step.

mod common;

use std::time::Duration;

use common::*;
use cync_gateway::protocol::packet::InfoRecord;
use cync_gateway::protocol::{build, DeviceId, MsgId};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const PATHS: [&str; 2] = ["legacy", "new"];

fn series(path: &str, s: &str) -> String {
    s.replace("PATH", path)
}

/// Writes `bytes` on one side and reads them, exactly, on the other.
async fn pass(from: &mut TcpStream, to: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
    from.write_all(bytes).await.expect("write");
    read_n(to, bytes.len()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_bytes_and_junk_from_the_upstream_reach_the_device_as_they_came_on_both_paths() {
    let hello = vector("handshake_0x23");
    // A read whose header declares one byte less than the frame has: a lone 0x7e is left.
    let short = vector("read_mesh_request_length_short");
    // 0x78: channel id, referenced msg_id, code.
    let notice = [0x78, 0, 0, 0, 7, 0x38, 0xe8, 0xcf, 0x46, 0x00, 0x10, 0x05];
    // A 21-byte junk run whose header declares far too much, then whole frames.
    let mut junk = vec![0x28, 0x00, 0x00, 0xff, 0xff];
    junk.extend([0x5a; 16]);
    let after_junk = [
        junk.clone(),
        build::hello_ack().to_vec(),
        build::heartbeat_ack().to_vec(),
        build::heartbeat_ack().to_vec(),
        build::heartbeat_ack().to_vec(),
    ]
    .concat();
    assert_eq!(after_junk.len(), 43);
    for path in PATHS {
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gw = TestGateway::new(up.local_addr().expect("addr"))
            .path(path)
            .start()
            .await;
        let (mut dev, mut upc) = scripted_pair(gw.device_addr, &up, &hello).await;
        assert_eq!(
            pass(&mut upc, &mut dev, &short).await,
            short,
            "{path}: short read"
        );
        let next = [&notice[..], &build::heartbeat_ack()[..]].concat();
        assert_eq!(
            pass(&mut upc, &mut dev, &next).await,
            next,
            "{path}: the frame after the stray byte"
        );
        assert_eq!(
            pass(&mut upc, &mut dev, &after_junk).await,
            after_junk,
            "{path}: junk header and what follows it"
        );
        let m = scrape(gw.metrics_addr).await;
        let unframed = sample(
            &m,
            &series(
                path,
                "tcp_comm_unframed_bytes_total{direction=\"srv_to_dev\",transport=\"PATH\"}",
            ),
        );
        assert_eq!(unframed, 22.0, "{path}: the 0x7e and the 21 junk bytes");
        let d8 = sample(
            &m,
            &series(
                path,
                "tcp_comm_packets_total{direction=\"srv_to_dev\",packet_type=\"0xd8\",transport=\"PATH\"}",
            ),
        );
        assert_eq!(d8, 4.0, "{path}: every 0xd8 after the junk decoded");
        gw.shutdown(Duration::from_millis(200)).await;
    }
}

/// A valid 0x83 whose header declares one byte less, so its last byte (0x7e) is left over:
/// the shape of the injected reads in the withheld capture.
fn one_byte_short_status(dev: DeviceId, msg: u8) -> Vec<u8> {
    let mut s = build::mesh_status(dev, MsgId([0, msg, 0]), 0x1f, 1, 10, 1, 50, 0).to_vec();
    s[4] -= 1;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_byte_from_the_device_desynchronises_neither_decoder() {
    let hello = vector("handshake_0x23");
    let dev_id = DeviceId([0x38, 0xe8, 0xcf, 0x46]);
    for path in PATHS {
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gw = TestGateway::new(up.local_addr().expect("addr"))
            .path(path)
            .start()
            .await;
        let (mut dev, mut upc) = scripted_pair(gw.device_addr, &up, &hello).await;
        let short = one_byte_short_status(dev_id, 9);
        assert_eq!(pass(&mut dev, &mut upc, &short).await, short);
        for _ in 0..10 {
            pass(&mut dev, &mut upc, &build::heartbeat()).await;
            pass(&mut upc, &mut dev, &build::heartbeat_ack()).await;
        }
        // A command the device answers at once (f9 reply and 0x7b in one write).
        let cmd = vector("legacy_power_on_0x73");
        assert_eq!(pass(&mut upc, &mut dev, &cmd).await, cmd);
        let answer = [
            build::command_reply(dev_id, MsgId([0, 2, 0]), cmd[13], 0xd0).to_vec(),
            build::data_ack(dev_id, MsgId([0, 0, 0])).to_vec(),
        ]
        .concat();
        assert_eq!(pass(&mut dev, &mut upc, &answer).await, answer);
        let m = eventually("the command counted", || async {
            let m = scrape(gw.metrics_addr).await;
            let ok = sample_or_zero(
                &m,
                &series(
                    path,
                    "tcp_comm_packet_sent_total{outcome=\"success\",transport=\"PATH\"}",
                ),
            );
            (ok >= 1.0).then_some(m)
        })
        .await;
        let get = |s: &str| sample(&m, &series(path, s));
        assert_eq!(
            get("tcp_comm_packets_total{direction=\"dev_to_srv\",packet_type=\"0xd3\",transport=\"PATH\"}"),
            10.0,
            "{path}: heartbeats after the stray byte"
        );
        assert_eq!(
            get("tcp_comm_heartbeats_total{outcome=\"acked\",transport=\"PATH\"}"),
            10.0,
            "{path}: every heartbeat paired with its 0xd8"
        );
        assert_eq!(
            get("tcp_comm_packet_sent_total{outcome=\"success\",transport=\"PATH\"}"),
            1.0
        );
        assert_eq!(
            get("tcp_comm_unframed_bytes_total{direction=\"dev_to_srv\",transport=\"PATH\"}"),
            1.0
        );
        if path == "new" {
            assert_eq!(
                sample_or_zero(&m, "tcp_comm_packet_retransmit_total{transport=\"new\"}"),
                0.0,
                "an answered command is never copied"
            );
        }
        gw.shutdown(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_device_half_closes_the_upstreams_reply_still_reaches_it_on_both_paths() {
    let hello = vector("handshake_0x23");
    // 1,000 heartbeat acks: 5,000 bytes the add-on sends after the device's FIN.
    let reply: Vec<u8> = (0..1000)
        .flat_map(|_| build::heartbeat_ack().to_vec())
        .collect();
    for path in PATHS {
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gw = TestGateway::new(up.local_addr().expect("addr"))
            .path(path)
            .start()
            .await;
        let (mut dev, mut upc) = scripted_pair(gw.device_addr, &up, &hello).await;
        let last = build::heartbeat();
        dev.write_all(&last).await.expect("write");
        dev.shutdown().await.expect("device FIN");
        // The device's last bytes, then its FIN, reach the upstream.
        assert_eq!(read_to_eof(&mut upc).await, last.to_vec(), "{path}");
        upc.write_all(&reply).await.expect("reply");
        upc.shutdown().await.expect("upstream FIN");
        let got = read_to_eof(&mut dev).await;
        assert_eq!(
            got.len(),
            reply.len(),
            "{path}: bytes after the device's FIN"
        );
        assert!(got == reply, "{path}: reply bytes differ");
        let m = wait_metric(
            gw.metrics_addr,
            &series(
                path,
                "tcp_comm_connection_closes_total{reason=\"device_closed\",transport=\"PATH\"}",
            ),
            1.0,
        )
        .await;
        let dropped = family_total(&m, "tcp_comm_close_dropped_bytes_total");
        assert_eq!(dropped, 0.0, "{path}: nothing dropped at close");
        gw.shutdown(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Random streams with junk at read boundaries.
// ---------------------------------------------------------------------------------------------

/// Per type, how many valid frames a stream holds (the expectation, counted by the generator).
#[derive(Debug, Default, Clone, PartialEq)]
struct Counts {
    status: u64,
    info: u64,
    heartbeat: u64,
    time: u64,
}

/// Junk real streams carry.
fn junk(rng: &mut SmallRng, dev: DeviceId, at_end: bool) -> Vec<u8> {
    match rng.gen_range(0..5) {
        0 => vec![0x7e],
        1 if at_end => {
            // A frame cut short whose rest never comes (by two bytes at least, so that a lone
            // 0x7e after it cannot complete it).
            let s = build::mesh_status(dev, MsgId([0, 1, 0]), 0x1f, 1, 10, 1, 50, 0);
            s[..rng.gen_range(1..s.len() - 1)].to_vec()
        }
        2 => {
            // A header declaring far more than the limit, then garbage.
            let mut j = vec![0x43, 0x00, 0x00, 0xff, 0xf0];
            j.extend((0..rng.gen_range(0..12)).map(|_| rng.gen::<u8>() | 0x01));
            j
        }
        _ => {
            // Garbage that does not start like a frame.
            let first = loop {
                let b: u8 = rng.gen();
                if cync_gateway::protocol::PacketType::from_byte(b).is_none() {
                    break b;
                }
            };
            let mut j = vec![first];
            j.extend((0..rng.gen_range(0..20)).map(|_| rng.gen::<u8>()));
            j
        }
    }
}

/// One device read of 1–3 valid frames, junk maybe before or after; with the upstream's
/// answers to them (each 0x83 by its echo, each 0x43 / 0xd3 / 0xc3 by its reply), junk maybe
/// around those too. Counts what is valid.
fn exchange(
    rng: &mut SmallRng,
    dev: DeviceId,
    msg: &mut u16,
    counts: &mut Counts,
) -> (Vec<u8>, Vec<u8>) {
    let mut up = Vec::new();
    let mut down = Vec::new();
    for _ in 0..rng.gen_range(1..=3) {
        match rng.gen_range(0..4) {
            0 => {
                *msg = msg.wrapping_add(1);
                let m = msg.to_be_bytes();
                let id = MsgId([m[0], m[1], 0]);
                up.extend_from_slice(&build::mesh_status(dev, id, 0x1f, 1, 10, 1, 50, 0));
                down.extend_from_slice(&build::status_ack(id));
                counts.status += 1;
            }
            1 => {
                let rec = InfoRecord {
                    index: 0,
                    mesh_id: 5,
                    state: 1,
                    brightness: rng.gen_range(0..=100),
                    temp: 0,
                    rgb: [0; 3],
                    online: 1,
                };
                up.extend_from_slice(&build::info_records(dev, &[rec]));
                down.extend_from_slice(&build::info_ack());
                counts.info += 1;
            }
            2 => {
                up.extend_from_slice(&build::heartbeat());
                down.extend_from_slice(&build::heartbeat_ack());
                counts.heartbeat += 1;
            }
            _ => {
                up.extend_from_slice(&build::time_request());
                down.extend_from_slice(&build::time_reply_stale());
                counts.time += 1;
            }
        }
    }
    let wrap = |frames: Vec<u8>, rng: &mut SmallRng| {
        let mut read = Vec::new();
        if rng.gen_bool(0.2) {
            read.extend(junk(rng, dev, false));
        }
        read.extend(frames);
        if rng.gen_bool(0.3) {
            read.extend(junk(rng, dev, true));
        }
        read
    };
    let up = wrap(up, rng);
    let down = wrap(down, rng);
    (up, down)
}

/// Streams per path over sockets (each frame cut short at the end of an upstream read costs the
/// new path its hold limit, 100 ms, before the bytes go on as they are).
const STREAMS: u64 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_streams_with_junk_at_read_boundaries_stay_byte_exact_and_decoded_on_both_paths() {
    let hello = vector("handshake_0x23");
    let dev = DeviceId([0x38, 0xe8, 0xcf, 0x46]);
    for path in PATHS {
        let started = tokio::time::Instant::now();
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gw = TestGateway::new(up.local_addr().expect("addr"))
            .path(path)
            .start()
            .await;
        let mut want = Counts::default();
        for seed in 0..STREAMS {
            let mut rng = SmallRng::seed_from_u64(seed);
            let (mut d, mut u) = scripted_pair(gw.device_addr, &up, &hello).await;
            let mut msg = 0u16;
            for _ in 0..rng.gen_range(5..25) {
                let (to_up, to_dev) = exchange(&mut rng, dev, &mut msg, &mut want);
                let got = pass(&mut d, &mut u, &to_up).await;
                assert!(got == to_up, "{path} seed {seed}: device bytes differ");
                let got = pass(&mut u, &mut d, &to_dev).await;
                assert!(got == to_dev, "{path} seed {seed}: upstream bytes differ");
            }
            drop(d);
            drop(u);
        }
        // Every valid frame after every junk run decoded, and every request paired with its
        // answer: counted by type, against what the generator put in.
        let got = eventually("every connection closed and counted", || async {
            let m = scrape(gw.metrics_addr).await;
            let closes: f64 = m
                .lines()
                .filter(|l| l.starts_with("tcp_comm_connection_closes_total{"))
                .filter(|l| l.contains(&format!("transport=\"{path}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            (closes == STREAMS as f64).then_some(m)
        })
        .await;
        let count = |dir: &str, t: &str| {
            sample(
                &got,
                &format!("tcp_comm_packets_total{{direction=\"{dir}\",packet_type=\"{t}\",transport=\"{path}\"}}"),
            ) as u64
        };
        let decoded = Counts {
            status: count("dev_to_srv", "0x83"),
            info: count("dev_to_srv", "0x43"),
            heartbeat: count("dev_to_srv", "0xd3"),
            time: count("dev_to_srv", "0xc3"),
        };
        assert_eq!(decoded, want, "{path}: device frames decoded");
        let answered = Counts {
            status: count("srv_to_dev", "0x88"),
            info: count("srv_to_dev", "0x48"),
            heartbeat: count("srv_to_dev", "0xd8"),
            time: count("srv_to_dev", "0xc8"),
        };
        assert_eq!(answered, want, "{path}: upstream frames decoded");
        let paired = |t: &str| {
            sample(
                &got,
                &format!("tcp_comm_replies_total{{outcome=\"matched\",request_type=\"{t}\",transport=\"{path}\"}}"),
            ) as u64
        };
        assert_eq!(
            (
                paired("0x83"),
                paired("0x43"),
                paired("0xd3"),
                paired("0xc3")
            ),
            (want.status, want.info, want.heartbeat, want.time),
            "{path}: requests paired with their answers"
        );
        println!(
            "{path}: {want:?} decoded and paired across {STREAMS} streams in {:?}",
            started.elapsed()
        );
        gw.shutdown(Duration::from_millis(200)).await;
    }
}

/// The same streams through the tap alone, many more of them: every valid frame decoded.
#[test]
fn the_tap_alone_decodes_every_valid_frame_of_a_thousand_junk_laced_streams() {
    use cync_gateway::protocol::{PacketType, Tap};
    let dev = DeviceId([0x38, 0xe8, 0xcf, 0x46]);
    for seed in 0..1000u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut want = Counts::default();
        let (mut tu, mut td) = (Tap::new(4096), Tap::new(4096));
        let mut got = Counts::default();
        let mut got_down = Counts::default();
        let mut msg = 0u16;
        for i in 0..rng.gen_range(5..25) {
            let (up, down) = exchange(&mut rng, dev, &mut msg, &mut want);
            for (tap, read, into) in [(&mut tu, &up, &mut got), (&mut td, &down, &mut got_down)] {
                for f in tap.feed(read).frames() {
                    match f.packet.as_ref().map(|p| p.ptype()) {
                        Ok(PacketType::Status | PacketType::StatusAck) => into.status += 1,
                        Ok(PacketType::Info | PacketType::InfoAck) => into.info += 1,
                        Ok(PacketType::Heartbeat | PacketType::HeartbeatAck) => into.heartbeat += 1,
                        Ok(PacketType::TimeRequest | PacketType::TimeReply) => into.time += 1,
                        _ => {}
                    }
                }
            }
            assert_eq!(
                got,
                want,
                "seed {seed} exchange {i}: device side, read {}",
                hex::encode(&up)
            );
            assert_eq!(
                got_down,
                want,
                "seed {seed} exchange {i}: upstream side, read {}",
                hex::encode(&down)
            );
        }
    }
}
