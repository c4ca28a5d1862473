//! The protocol decoder against the shared captures: the 64 labelled vectors of
//! `shared/captures/vectors.jsonl`, the 10-minute capture `capture_20251106_082038.jsonl` replayed
//! through `CyncCodec` and `Tap`, and property tests (no panics on arbitrary bytes,
//! encode∘decode round-trips, the length limit applied before any body byte is buffered).
//!
//! Auth codes (0x23 bytes 12–27) are credentials: no assertion message here prints one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use cync_gateway::protocol::packet::inner_checksum;
use cync_gateway::protocol::{
    split_packets, AuthCode, CodecError, Command, CyncCodec, DecodeError, Frame, InfoBody,
    InnerFrame, MeshStatus, MsgId, Packet, PacketType, Tap, TimeReply, DEFAULT_MAX_DATA_LEN,
};
use proptest::prelude::*;
use serde_json::{Map, Value};
use tokio_util::codec::{Decoder, Encoder};

const MAX: usize = DEFAULT_MAX_DATA_LEN;

// ---------------------------------------------------------------------------------------------
// Loading the shared files
// ---------------------------------------------------------------------------------------------

fn captures_dir() -> PathBuf {
    // CYNC_CAPTURES points elsewhere when the tree is tested from a copy (scripts/mutants.sh).
    let dir = std::env::var_os("CYNC_CAPTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/captures"));
    assert!(
        dir.is_dir(),
        "shared captures directory not found at {} (expected <manifest>/../shared/captures)",
        dir.display()
    );
    dir
}

fn read_jsonl(file: &str) -> Vec<Value> {
    let path = captures_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} (expected <manifest>/../shared/captures/{file}): {e}",
            path.display()
        )
    });
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{file}:{}: invalid JSON: {e}", i + 1))
        })
        .collect()
}

fn vectors() -> &'static [Value] {
    static VECTORS: OnceLock<Vec<Value>> = OnceLock::new();
    VECTORS.get_or_init(|| read_jsonl("vectors.jsonl"))
}

/// The bytes of every vector of kind `packet`, with its name.
fn packet_vectors() -> Vec<(String, Bytes)> {
    vectors()
        .iter()
        .filter(|v| v["kind"] == "packet")
        .map(|v| (str_field(v, "name").to_owned(), vector_bytes(v)))
        .collect()
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("field {key:?} missing or not a string in {v}"))
}

fn vector_bytes(v: &Value) -> Bytes {
    let name = str_field(v, "name");
    Bytes::from(hex::decode(str_field(v, "hex")).unwrap_or_else(|e| panic!("{name}: bad hex: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Expectation helpers
// ---------------------------------------------------------------------------------------------

fn want_u64(ctx: &str, want: &Value) -> u64 {
    want.as_u64()
        .unwrap_or_else(|| panic!("{ctx}: expected value {want} is not an unsigned integer"))
}

fn want_i64(ctx: &str, want: &Value) -> i64 {
    want.as_i64()
        .unwrap_or_else(|| panic!("{ctx}: expected value {want} is not an integer"))
}

fn want_str<'a>(ctx: &str, want: &'a Value) -> &'a str {
    want.as_str()
        .unwrap_or_else(|| panic!("{ctx}: expected value {want} is not a string"))
}

fn want_bool(ctx: &str, want: &Value) -> bool {
    want.as_bool()
        .unwrap_or_else(|| panic!("{ctx}: expected value {want} is not a boolean"))
}

fn want_obj<'a>(ctx: &str, want: &'a Value) -> &'a Map<String, Value> {
    want.as_object()
        .unwrap_or_else(|| panic!("{ctx}: expected value {want} is not an object"))
}

fn check_u64(ctx: &str, want: &Value, got: impl Into<u64>) {
    assert_eq!(got.into(), want_u64(ctx, want), "{ctx}");
}

fn check_hex(ctx: &str, want: &Value, got: &[u8]) {
    assert_eq!(hex::encode(got), want_str(ctx, want), "{ctx}");
}

fn check_byte(ctx: &str, want: &Value, got: u8) {
    check_hex(ctx, want, &[got]);
}

fn msg_hex(m: MsgId) -> String {
    hex::encode(m.0)
}

/// Checks one `expect` key of a well-formed packet against the decoder's accessors. A key this
/// function does not know fails the test, so coverage stays explicit.
fn check_packet_key(name: &str, p: &Packet, key: &str, want: &Value) {
    let ctx = format!("{name}: expect.{key}");
    let ctx = ctx.as_str();
    let inner = || -> InnerFrame { p.inner().unwrap_or_else(|| panic!("{ctx}: no inner frame")) };
    let time = || -> TimeReply {
        p.time_reply()
            .unwrap_or_else(|| panic!("{ctx}: time_reply() is None"))
    };
    let info = || -> InfoBody {
        p.info_body()
            .unwrap_or_else(|| panic!("{ctx}: info_body() is None"))
    };
    let hello = || -> (u16, AuthCode, [u8; 3]) {
        p.hello()
            .unwrap_or_else(|| panic!("{ctx}: hello() is None"))
    };
    match key {
        "type" => {
            assert_eq!(p.ptype().label(), want_str(ctx, want), "{ctx}");
            assert_eq!(p.ptype().byte(), p.raw()[0], "{ctx}: type byte");
        }
        "length" => check_u64(ctx, want, p.raw().len() as u64),
        "data_len" => check_u64(ctx, want, p.data_len() as u64),
        "endpoint" => {
            let id = p.id().unwrap_or_else(|| panic!("{ctx}: id() is None"));
            assert_eq!(id.to_hex(), want_str(ctx, want), "{ctx}");
        }
        "msg_id" => {
            let m = p
                .msg_id()
                .unwrap_or_else(|| panic!("{ctx}: msg_id() is None"));
            assert_eq!(msg_hex(m), want_str(ctx, want), "{ctx}");
        }
        "acks_msg_id" => {
            let m = p
                .acks_msg_id()
                .unwrap_or_else(|| panic!("{ctx}: acks_msg_id() is None"));
            assert_eq!(msg_hex(m), want_str(ctx, want), "{ctx}");
        }
        "ref_msg_id" => {
            let (r, _) = p
                .notice()
                .unwrap_or_else(|| panic!("{ctx}: notice() is None"));
            check_hex(ctx, want, &r);
        }
        "code" => {
            let (_, code) = p
                .notice()
                .unwrap_or_else(|| panic!("{ctx}: notice() is None"));
            check_u64(ctx, want, code);
        }
        "auth_len" => check_u64(ctx, want, hello().0),
        "auth_code" => {
            // Compared without printing either side: it is a credential.
            let (_, code, _) = hello();
            assert!(
                code.expose() == want_str(ctx, want).as_bytes(),
                "{ctx}: auth code differs (values not shown)"
            );
        }
        "tail" => check_hex(ctx, want, &hello().2),
        "payload" => check_hex(ctx, want, &p.raw()[5..]),
        "lead" => check_u64(ctx, want, time().lead),
        "year" => check_u64(ctx, want, time().year),
        "month" => check_u64(ctx, want, time().month),
        "day" => check_u64(ctx, want, time().day),
        "weekday" => check_u64(ctx, want, time().weekday),
        "hour" => check_u64(ctx, want, time().hour),
        "minute" => check_u64(ctx, want, time().minute),
        "second" => check_u64(ctx, want, time().second),
        "tz_hhmm" => assert_eq!(i64::from(time().tz_hhmm), want_i64(ctx, want), "{ctx}"),
        "body" => {
            let got = match info() {
                InfoBody::Empty => "empty",
                InfoBody::Tlv(_) => "tlv",
                InfoBody::Records(_) => "records",
                InfoBody::Unrecognised => "unrecognised",
            };
            assert_eq!(got, want_str(ctx, want), "{ctx}");
        }
        "tlv" => {
            let InfoBody::Tlv(items) = info() else {
                panic!("{ctx}: body is not TLV");
            };
            let want = want
                .as_array()
                .unwrap_or_else(|| panic!("{ctx}: not an array"));
            assert_eq!(items.len(), want.len(), "{ctx}: item count");
            for (i, (item, w)) in items.iter().zip(want).enumerate() {
                for (k, wv) in want_obj(ctx, w) {
                    let ctx = format!("{ctx}[{i}].{k}");
                    match k.as_str() {
                        "tag" => check_hex(&ctx, wv, &item.tag.to_be_bytes()),
                        "len" => check_u64(&ctx, wv, item.value.len() as u64),
                        other => panic!("{ctx}: unknown TLV key {other:?}"),
                    }
                }
            }
        }
        "ascii" => {
            let InfoBody::Tlv(items) = info() else {
                panic!("{ctx}: body is not TLV");
            };
            assert_eq!(items.len(), 1, "{ctx}: expected exactly one TLV item");
            let value = &items[0].value;
            assert!(value.is_ascii(), "{ctx}: TLV value is not ASCII");
            let text = std::str::from_utf8(value).expect("ASCII is UTF-8");
            assert_eq!(text, want_str(ctx, want), "{ctx}");
        }
        "records" => {
            let InfoBody::Records(records) = info() else {
                panic!("{ctx}: body is not records");
            };
            let want = want
                .as_array()
                .unwrap_or_else(|| panic!("{ctx}: not an array"));
            assert_eq!(records.len(), want.len(), "{ctx}: record count");
            for (i, (r, w)) in records.iter().zip(want).enumerate() {
                for (k, wv) in want_obj(ctx, w) {
                    let ctx = format!("{ctx}[{i}].{k}");
                    let ctx = ctx.as_str();
                    match k.as_str() {
                        "idx" => check_u64(ctx, wv, r.index),
                        "device" => check_u64(ctx, wv, r.mesh_id),
                        "state" => check_u64(ctx, wv, r.state),
                        "brightness" => check_u64(ctx, wv, r.brightness),
                        "temp" => check_u64(ctx, wv, r.temp),
                        "rgb" => check_hex(ctx, wv, &r.rgb),
                        "online" => check_u64(ctx, wv, r.online),
                        other => panic!("{ctx}: unknown record key {other:?}"),
                    }
                }
            }
        }
        "frame_start" => check_byte(ctx, want, inner().start),
        "inner_seq" => check_byte(ctx, want, inner().seq),
        "inner_pad" => check_hex(ctx, want, &inner().pad),
        "cls" => check_byte(ctx, want, inner().class_byte),
        "opcode" => check_byte(ctx, want, inner().opcode),
        "inner_len" => check_u64(ctx, want, inner().len),
        "checksum" => check_byte(ctx, want, inner().checksum),
        "checksum_valid" => {
            let valid = inner_checksum(p.raw()) == Some(inner().checksum);
            assert_eq!(valid, want_bool(ctx, want), "{ctx}");
        }
        "device_id" | "state" | "brightness" | "temp" | "rgb" | "online" => {
            check_payload_value(ctx, p, key, want)
        }
        "fw_ascii" => {
            let (_, digits) = p
                .firmware()
                .unwrap_or_else(|| panic!("{ctx}: firmware() is None"));
            assert_eq!(digits, want_str(ctx, want), "{ctx}");
        }
        "text" => {
            let text = p
                .channel_reply_text()
                .unwrap_or_else(|| panic!("{ctx}: channel_reply_text() is None"));
            assert_eq!(text, want_str(ctx, want), "{ctx}");
        }
        other => panic!("{name}: unknown expect key {other:?}: the test must check it explicitly"),
    }
}

/// Decoded payload values: `mesh_status()` for a 0x83, `command()` for a 0x73.
fn check_payload_value(ctx: &str, p: &Packet, key: &str, want: &Value) {
    match p.ptype() {
        PacketType::Status => {
            let s: MeshStatus = p
                .mesh_status()
                .unwrap_or_else(|| panic!("{ctx}: mesh_status() is None"));
            match key {
                "device_id" => check_u64(ctx, want, s.mesh_id),
                "state" => check_u64(ctx, want, s.state),
                "brightness" => check_u64(ctx, want, s.brightness),
                "temp" => check_u64(ctx, want, s.temp),
                "rgb" => check_hex(ctx, want, &s.rgb),
                "online" => check_u64(ctx, want, s.online),
                other => panic!("{ctx}: unknown status key {other:?}"),
            }
        }
        PacketType::Data => {
            let c = p
                .command()
                .unwrap_or_else(|| panic!("{ctx}: command() is None"));
            match (key, c) {
                ("device_id", Command::Power { mesh_id, .. })
                | ("device_id", Command::Brightness { mesh_id, .. }) => {
                    check_u64(ctx, want, mesh_id)
                }
                ("state", Command::Power { on, .. }) => check_u64(ctx, want, u8::from(on)),
                ("brightness", Command::Brightness { percent, .. }) => {
                    check_u64(ctx, want, percent)
                }
                (key, c) => panic!("{ctx}: {key:?} cannot be checked on {c:?}"),
            }
        }
        other => panic!("{ctx}: decoded payload values are not defined for {other}"),
    }
}

/// A detail field of a decode error, by its vector key; `None` when the variant has no such field.
fn error_detail(e: &DecodeError, key: &str) -> Option<u64> {
    use DecodeError as E;
    let v = match (key, e) {
        ("have", E::TruncatedHeader { have }) | ("have", E::Truncated { have, .. }) => *have,
        ("need", E::Truncated { need, .. }) => *need,
        ("data_len", E::LengthTooLarge { data_len, .. })
        | ("data_len", E::BadLengthForType { data_len, .. })
        | ("data_len", E::InnerLengthMismatch { data_len, .. }) => *data_len,
        ("extra", E::TrailingBytes { extra }) => *extra,
        ("inner_len", E::InnerLengthMismatch { inner_len, .. }) => *inner_len,
        ("type", E::UnknownType { ty }) | ("type", E::BadLengthForType { ty, .. }) => {
            usize::from(*ty)
        }
        ("byte", E::BadFrameStart { byte }) | ("byte", E::BadFrameEnd { byte }) => {
            usize::from(*byte)
        }
        ("expected", E::ChecksumMismatch { expected, .. }) => usize::from(*expected),
        ("found", E::ChecksumMismatch { found, .. }) => usize::from(*found),
        _ => return None,
    };
    Some(v as u64)
}

const ERROR_DETAIL_KEYS: [&str; 9] = [
    "have",
    "need",
    "data_len",
    "type",
    "byte",
    "extra",
    "expected",
    "found",
    "inner_len",
];

fn check_malformed(name: &str, err: &DecodeError, expect: &Map<String, Value>) {
    let want_error = want_str(&format!("{name}: expect.error"), &expect["error"]);
    assert_eq!(err.reason(), want_error, "{name}: error reason ({err})");
    for (key, want) in expect {
        if key == "error" {
            continue;
        }
        let ctx = format!("{name}: expect.{key}");
        assert!(
            ERROR_DETAIL_KEYS.contains(&key.as_str()),
            "{ctx}: unknown malformed expect key"
        );
        let got = error_detail(err, key)
            .unwrap_or_else(|| panic!("{ctx}: error {err:?} has no field {key:?}"));
        assert_eq!(got, want_u64(&ctx, want), "{ctx} ({err})");
    }
}

const READ_SUMMARY_KEYS: [&str; 10] = [
    "type",
    "length",
    "endpoint",
    "msg_id",
    "acks_msg_id",
    "inner_seq",
    "cls",
    "opcode",
    "checksum_valid",
    "error",
];

fn check_read(name: &str, raw: &[u8], expect: &Map<String, Value>) {
    for key in expect.keys() {
        assert!(
            key == "packets" || key == "leftover",
            "{name}: unknown read expect key {key:?}"
        );
    }
    let (results, leftover) = split_packets(raw, MAX);
    let want_packets = expect["packets"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: expect.packets is not an array"));
    assert_eq!(results.len(), want_packets.len(), "{name}: packet count");
    for (i, ((bytes, result), want)) in results.iter().zip(want_packets).enumerate() {
        let pname = format!("{name}.packets[{i}]");
        let want = want_obj(&pname, want);
        for key in want.keys() {
            assert!(
                READ_SUMMARY_KEYS.contains(&key.as_str()),
                "{pname}: unknown read summary key {key:?}"
            );
        }
        match (result, want.get("error")) {
            (Ok(p), None) => {
                assert_eq!(p.raw(), bytes, "{pname}: raw bytes");
                for (key, w) in want {
                    check_packet_key(&pname, p, key, w);
                }
            }
            (Err(e), Some(w)) => {
                assert_eq!(e.reason(), want_str(&pname, w), "{pname}: error ({e})");
                for (key, w) in want {
                    let ctx = format!("{pname}: {key}");
                    match key.as_str() {
                        "error" => {}
                        "type" => {
                            let first = bytes.first().unwrap_or_else(|| panic!("{ctx}: no bytes"));
                            assert_eq!(format!("0x{first:02x}"), want_str(&ctx, w), "{ctx}");
                        }
                        "length" => check_u64(&ctx, w, bytes.len() as u64),
                        other => panic!("{ctx}: key {other:?} cannot be checked on an error"),
                    }
                }
            }
            (Ok(p), Some(w)) => panic!("{pname}: parsed as {p:?}, expected error {w}"),
            (Err(e), None) => panic!("{pname}: unexpected error {e:?}"),
        }
    }
    let want_leftover = expect
        .get("leftover")
        .unwrap_or_else(|| panic!("{name}: expect.leftover missing"));
    check_hex(&format!("{name}: leftover"), want_leftover, &leftover);
}

// ---------------------------------------------------------------------------------------------
// 1. The labelled vectors
// ---------------------------------------------------------------------------------------------

#[test]
fn vectors_match_the_decoder() {
    let mut per_kind: BTreeMap<String, usize> = BTreeMap::new();
    let mut names = std::collections::BTreeSet::new();
    for v in vectors() {
        let name = str_field(v, "name");
        assert!(names.insert(name), "duplicate vector name {name}");
        let kind = str_field(v, "kind");
        let raw = vector_bytes(v);
        let expect = want_obj(&format!("{name}: expect"), &v["expect"]);
        assert!(!expect.is_empty(), "{name}: empty expect");
        match kind {
            "packet" => {
                assert_eq!(
                    format!("0x{:02x}", raw[0]),
                    str_field(v, "type"),
                    "{name}: vector type field"
                );
                let p = Packet::parse(raw.clone(), MAX)
                    .unwrap_or_else(|e| panic!("{name}: parse failed: {e:?}"));
                assert_eq!(p.raw(), &raw, "{name}: raw bytes kept");
                for (key, want) in expect {
                    check_packet_key(name, &p, key, want);
                }
            }
            "malformed" => {
                let err = Packet::parse(raw, MAX)
                    .expect_err("a malformed vector must be rejected by Packet::parse");
                check_malformed(name, &err, expect);
            }
            "read" => {
                assert_eq!(str_field(v, "type"), "read", "{name}: vector type field");
                check_read(name, &raw, expect);
            }
            other => panic!("{name}: unknown vector kind {other:?}"),
        }
        *per_kind.entry(kind.to_owned()).or_default() += 1;
    }
    let checked: usize = per_kind.values().sum();
    assert_eq!(checked, 64, "vectors checked: {per_kind:?}");
    assert_eq!(per_kind.get("packet"), Some(&46), "{per_kind:?}");
    assert_eq!(per_kind.get("malformed"), Some(&14), "{per_kind:?}");
    assert_eq!(per_kind.get("read"), Some(&4), "{per_kind:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. The capture, through CyncCodec and Tap
// ---------------------------------------------------------------------------------------------

/// Deterministic xorshift64, so chunk sizes do not depend on any RNG crate's version.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn assert_same_frames(ctx: &str, want: &[Frame], got: &[Frame]) {
    assert_eq!(got.len(), want.len(), "{ctx}: frame count");
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        assert_eq!(g.raw, w.raw, "{ctx}: frame {i} raw bytes");
        assert_eq!(g.packet, w.packet, "{ctx}: frame {i} parse result");
    }
}

/// Every frame `codec` yields from `reads`, fed one read at a time. Panics on a framing error.
fn decode_reads(ctx: &str, reads: &[Vec<u8>], whole_reads: bool) -> Vec<Frame> {
    let mut codec = CyncCodec::new(MAX);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for (i, read) in reads.iter().enumerate() {
        buf.extend_from_slice(read);
        while let Some(frame) = codec
            .decode(&mut buf)
            .unwrap_or_else(|e| panic!("{ctx}: read {i}: framing error {e}"))
        {
            frames.push(frame);
        }
        if whole_reads {
            assert!(
                buf.is_empty(),
                "{ctx}: read {i}: {} bytes left over, but every read holds whole packets",
                buf.len()
            );
        }
    }
    assert!(buf.is_empty(), "{ctx}: {} bytes left at the end", buf.len());
    frames
}

#[test]
fn capture_replays_through_codec_and_tap() {
    let lines = read_jsonl("capture_20251106_082038.jsonl");
    assert_eq!(lines.len(), 2251, "reads in the capture");
    let mut reads: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["injected"], Value::Bool(false), "line {}", i + 1);
        let dir = str_field(line, "dir");
        assert!(
            dir == "dev_to_cloud" || dir == "cloud_to_dev",
            "line {}: unknown dir {dir:?}",
            i + 1
        );
        let bytes = hex::decode(str_field(line, "hex"))
            .unwrap_or_else(|e| panic!("line {}: bad hex: {e}", i + 1));
        reads.entry(dir.to_owned()).or_default().push(bytes);
    }

    type Expected = (&'static str, usize, usize, [(u8, usize); 5]);
    let expected: [Expected; 2] = [
        (
            "dev_to_cloud",
            1117,
            17011,
            [
                (0x23, 25),
                (0xc3, 25),
                (0x43, 381),
                (0x83, 101),
                (0xd3, 658),
            ],
        ),
        (
            "cloud_to_dev",
            1134,
            7721,
            [
                (0x28, 25),
                (0xc8, 25),
                (0x48, 381),
                (0x88, 101),
                (0xd8, 658),
            ],
        ),
    ];

    let mut total = 0usize;
    for (dir, n_reads, n_bytes, want_counts) in expected {
        let dir_reads = &reads[dir];
        assert_eq!(dir_reads.len(), n_reads, "{dir}: reads");
        let stream: Vec<u8> = dir_reads.concat();
        assert_eq!(stream.len(), n_bytes, "{dir}: bytes");

        // CyncCodec, in chunks equal to the original reads.
        let frames = decode_reads(dir, dir_reads, true);
        let errors: Vec<String> = frames
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                f.packet
                    .as_ref()
                    .err()
                    .map(|e| format!("frame {i} (0x{:02x}): {e}", f.raw[0]))
            })
            .collect();
        assert!(errors.is_empty(), "{dir}: decode errors: {errors:?}");
        let mut counts: BTreeMap<u8, usize> = BTreeMap::new();
        for f in &frames {
            *counts.entry(f.raw[0]).or_default() += 1;
        }
        let want: BTreeMap<u8, usize> = want_counts.into_iter().collect();
        assert_eq!(counts, want, "{dir}: packets per type");
        let rejoined: Vec<u8> = frames.iter().flat_map(|f| f.raw.to_vec()).collect();
        assert_eq!(rejoined, stream, "{dir}: frames cover the stream exactly");
        total += frames.len();

        // Tap, at the original read boundaries.
        let mut tap = Tap::new(MAX);
        let mut tap_frames = Vec::new();
        for read in dir_reads {
            let out = tap.feed(read);
            assert_eq!(out.errors().count(), 0, "{dir}: tap decode error");
            tap_frames.extend(out.frames().cloned());
        }
        assert_eq!(tap.pending(), 0, "{dir}: tap holds bytes at the end");
        assert_same_frames(&format!("{dir} tap by read"), &frames, &tap_frames);

        // Tap, in seeded 1–7-byte chunks: frames must not depend on read boundaries.
        for seed in [
            0x5eed_0001_u64,
            0x0123_4567_89ab_cdef,
            0xdead_beef_cafe_f00d,
        ] {
            let mut rng = XorShift(seed);
            let mut tap = Tap::new(MAX);
            let mut tap_frames = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let n = (rng.next() % 7 + 1) as usize;
                let end = (at + n).min(stream.len());
                let out = tap.feed(&stream[at..end]);
                assert_eq!(
                    out.errors().count(),
                    0,
                    "{dir} seed {seed:#x}: decode error"
                );
                tap_frames.extend(out.frames().cloned());
                at = end;
            }
            assert_eq!(tap.pending(), 0, "{dir} seed {seed:#x}: bytes left");
            assert_same_frames(&format!("{dir} tap seed {seed:#x}"), &frames, &tap_frames);
        }
    }
    assert_eq!(total, 2380, "packets in the capture");
}

// ---------------------------------------------------------------------------------------------
// 3. Properties
// ---------------------------------------------------------------------------------------------

/// Everything the accessors of a packet return, so two decodings can be compared field by field.
/// `AuthCode` compares by value but prints redacted.
#[derive(Debug, PartialEq)]
struct Fields {
    ptype: PacketType,
    data_len: usize,
    id: Option<String>,
    msg_id: Option<MsgId>,
    acks_msg_id: Option<MsgId>,
    notice: Option<([u8; 2], u8)>,
    hello: Option<(u16, AuthCode, [u8; 3])>,
    inner: Option<InnerFrame>,
    is_command: bool,
    is_command_reply: bool,
    command: Option<Command>,
    mesh_status: Option<MeshStatus>,
    firmware: Option<(u8, String)>,
    info_body: Option<InfoBody>,
    time_reply: Option<TimeReply>,
    channel_reply_text: Option<String>,
}

impl Fields {
    fn of(p: &Packet) -> Self {
        Fields {
            ptype: p.ptype(),
            data_len: p.data_len(),
            id: p.id().map(|id| id.to_hex()),
            msg_id: p.msg_id(),
            acks_msg_id: p.acks_msg_id(),
            notice: p.notice(),
            hello: p.hello(),
            inner: p.inner(),
            is_command: p.is_command(),
            is_command_reply: p.is_command_reply(),
            command: p.command(),
            mesh_status: p.mesh_status(),
            firmware: p.firmware(),
            info_body: p.info_body(),
            time_reply: p.time_reply(),
            channel_reply_text: p.channel_reply_text(),
        }
    }
}

/// Runs every decoding entry point over `bytes`; none may panic, and they must agree.
fn exercise_decoders(bytes: &[u8]) {
    for max in [MAX, 16] {
        if let Ok(p) = Packet::parse(Bytes::copy_from_slice(bytes), max) {
            assert_eq!(&p.raw()[..], bytes);
            let _ = Fields::of(&p);
        }
    }

    // split_packets: raw parts plus leftover give back the input.
    let (parts, leftover) = split_packets(bytes, MAX);
    let mut joined = Vec::new();
    for (i, (raw, result)) in parts.iter().enumerate() {
        match result {
            Err(DecodeError::LengthTooLarge { .. }) => {
                assert_eq!(i, parts.len() - 1, "a too-large header ends the split");
                assert_eq!(raw, &leftover);
            }
            Ok(p) => {
                assert_eq!(p.raw(), raw);
                let _ = Fields::of(p);
                joined.extend_from_slice(raw);
            }
            Err(_) => joined.extend_from_slice(raw),
        }
    }
    joined.extend_from_slice(&leftover);
    assert_eq!(joined, bytes, "split_packets lost or duplicated bytes");

    // CyncCodec on the whole buffer agrees with split_packets.
    let mut codec = CyncCodec::new(MAX);
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    let mut too_large = false;
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => {
                if let Ok(p) = &frame.packet {
                    assert_eq!(p.raw(), &frame.raw);
                    let _ = Fields::of(p);
                }
                frames.push(frame);
            }
            Ok(None) => break,
            Err(e) => {
                assert!(matches!(e, CodecError::TooLarge { .. }), "{e}");
                too_large = true;
                break;
            }
        }
    }
    let split_frames: Vec<_> = parts
        .iter()
        .filter(|(_, r)| !matches!(r, Err(DecodeError::LengthTooLarge { .. })))
        .collect();
    assert_eq!(frames.len(), split_frames.len());
    for (f, (raw, r)) in frames.iter().zip(&split_frames) {
        assert_eq!(&f.raw, raw);
        assert_eq!(&f.packet, r);
    }
    assert_eq!(too_large, parts.len() > split_frames.len());

    // Tap, fed whole and in 3-byte chunks: every byte comes out exactly once, in order (in a
    // segment, or still held as a frame cut short), and what it holds is one plausible frame.
    for chunk in [bytes.len().max(1), 3] {
        let mut tap = Tap::new(MAX);
        let mut out = Vec::new();
        for c in bytes.chunks(chunk) {
            for seg in tap.feed(c).segments {
                out.extend_from_slice(seg.raw());
            }
        }
        assert!(tap.pending() <= 5 + MAX, "held more than one frame");
        if let Some((held, _)) = tap.take_pending() {
            out.extend_from_slice(&held);
        }
        assert_eq!(
            out, bytes,
            "tap in {chunk}-byte reads lost or reordered bytes"
        );
    }
    // Where the whole buffer is valid frames back to back, the tap finds exactly those.
    if !too_large && frames.iter().all(|f| f.packet.is_ok()) && buf.is_empty() {
        let mut tap = Tap::new(MAX);
        let got: Vec<Frame> = tap.feed(bytes).frames().cloned().collect();
        assert_same_frames("tap whole", &frames, &got);
    }
}

const KNOWN_TYPES: [u8; 15] = [
    0x23, 0x28, 0x43, 0x48, 0x73, 0x78, 0x7b, 0x83, 0x88, 0xa3, 0xab, 0xc3, 0xc8, 0xd3, 0xd8,
];

/// A 0x73/0x83 built field by field, with a correct checksum.
#[derive(Debug, Clone)]
struct Framed {
    ty: u8,
    id: [u8; 4],
    msg_id: [u8; 3],
    start: u8,
    seq: u8,
    pad: [u8; 3],
    class: u8,
    opcode: u8,
    /// L + 1 bytes.
    body: Vec<u8>,
}

impl Framed {
    fn inner_len(&self) -> u8 {
        u8::try_from(self.body.len() - 1).expect("body is 1..=256 bytes")
    }

    /// Sum of opcode, L and body (§5.2), computed independently of the decoder.
    fn checksum(&self) -> u8 {
        self.body
            .iter()
            .fold(self.opcode.wrapping_add(self.inner_len()), |a, b| {
                a.wrapping_add(*b)
            })
    }

    fn bytes(&self) -> Bytes {
        let data_len = u16::from(self.inner_len()) + 18;
        let mut v = vec![self.ty, 0, 0];
        v.extend_from_slice(&data_len.to_be_bytes());
        v.extend_from_slice(&self.id);
        v.extend_from_slice(&self.msg_id);
        v.extend_from_slice(&[self.start, self.seq]);
        v.extend_from_slice(&self.pad);
        v.extend_from_slice(&[self.class, self.opcode, self.inner_len()]);
        v.extend_from_slice(&self.body);
        v.extend_from_slice(&[self.checksum(), 0x7e]);
        assert_eq!(v.len(), 5 + usize::from(data_len));
        Bytes::from(v)
    }
}

fn framed_strategy() -> impl Strategy<Value = Framed> {
    let body = prop_oneof![Just(1usize), Just(14), Just(17), Just(20), 1..=256usize]
        .prop_flat_map(|n| prop::collection::vec(any::<u8>(), n));
    (
        prop_oneof![Just(0x73u8), Just(0x83u8)],
        any::<[u8; 4]>(),
        any::<[u8; 3]>(),
        any::<bool>(),
        any::<u8>(),
        prop_oneof![3 => Just([0u8; 3]), 1 => Just([1u8, 0, 0]), 1 => any::<[u8; 3]>()],
        prop_oneof![Just(0xf8u8), Just(0xf9), Just(0xfa), any::<u8>()],
        prop_oneof![
            Just(0xd0u8),
            Just(0xf0),
            Just(0xdb),
            Just(0x00),
            any::<u8>()
        ],
        body,
    )
        .prop_map(
            |(ty, id, msg_id, firmware_start, seq, pad, class, opcode, body)| Framed {
                ty,
                id,
                msg_id,
                start: if ty == 0x83 && firmware_start {
                    0x00
                } else {
                    0x7e
                },
                seq,
                pad,
                class,
                opcode,
                body,
            },
        )
}

/// Byte strings made of header-plausible segments (known types, mostly zero reserved bytes,
/// mostly consistent lengths, some valid framed packets), to reach past the header checks.
fn packetish_strategy() -> impl Strategy<Value = Vec<u8>> {
    let segment = prop_oneof![
        3 => (
            prop_oneof![4 => prop::sample::select(KNOWN_TYPES.to_vec()), 1 => any::<u8>()],
            prop_oneof![9 => Just([0u8, 0]), 1 => any::<[u8; 2]>()],
            prop::collection::vec(any::<u8>(), 0..64),
            prop_oneof![8 => Just(0i32), 2 => -3i32..4],
        )
            .prop_map(|(ty, reserved, body, delta)| {
                let declared = (body.len() as i32 + delta).max(0) as u16;
                let mut v = vec![ty, reserved[0], reserved[1]];
                v.extend_from_slice(&declared.to_be_bytes());
                v.extend_from_slice(&body);
                v
            }),
        1 => framed_strategy().prop_map(|f| f.bytes().to_vec()),
    ];
    (
        prop::collection::vec(segment, 0..8),
        prop::collection::vec(any::<u8>(), 0..6),
    )
        .prop_map(|(segments, tail)| {
            let mut v = segments.concat();
            v.extend_from_slice(&tail);
            v
        })
}

/// Encodes `raw` with both encoder impls, decodes it back, and compares with parsing `raw`.
fn assert_round_trip(ctx: &str, raw: &Bytes) {
    let original = Packet::parse(raw.clone(), MAX)
        .unwrap_or_else(|e| panic!("{ctx}: input must be a valid packet: {e:?}"));
    let want = Fields::of(&original);
    let mut codec = CyncCodec::default();
    for via_packet in [false, true] {
        let mut dst = BytesMut::new();
        if via_packet {
            Encoder::<&Packet>::encode(&mut codec, &original, &mut dst)
        } else {
            Encoder::<Bytes>::encode(&mut codec, raw.clone(), &mut dst)
        }
        .unwrap_or_else(|e| panic!("{ctx}: encode failed: {e}"));
        assert_eq!(&dst[..], &raw[..], "{ctx}: encoding is verbatim");
        let frame = codec
            .decode(&mut dst)
            .unwrap_or_else(|e| panic!("{ctx}: decode failed: {e}"))
            .unwrap_or_else(|| panic!("{ctx}: no frame decoded"));
        assert!(dst.is_empty(), "{ctx}: bytes left after the frame");
        assert_eq!(&frame.raw, raw, "{ctx}: frame raw bytes");
        let p = frame
            .packet
            .unwrap_or_else(|e| panic!("{ctx}: decoded frame does not parse: {e:?}"));
        assert_eq!(p.raw(), raw, "{ctx}: packet raw bytes");
        assert_eq!(Fields::of(&p), want, "{ctx}: fields");
        assert_eq!(p, original, "{ctx}: packet");
    }
}

#[test]
fn vector_packets_round_trip() {
    let packets = packet_vectors();
    assert_eq!(packets.len(), 46);
    for (name, raw) in &packets {
        assert_round_trip(name, raw);
    }
}

#[test]
fn default_limit_is_checked_on_the_header_alone() {
    let mut codec = CyncCodec::default();
    let mut buf = BytesMut::from(&[0x43u8, 0, 0, 0x10, 0x01][..]); // 4097
    match codec.decode(&mut buf) {
        Err(CodecError::TooLarge { data_len, max }) => {
            assert_eq!((data_len, max), (4097, 4096));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let mut buf = BytesMut::from(&[0x43u8, 0, 0, 0x10, 0x00][..]); // 4096
    assert!(matches!(codec.decode(&mut buf), Ok(None)));
}

proptest! {
    /// (a) No decoding entry point panics on arbitrary input, and they agree with each other.
    #[test]
    fn decoders_never_panic(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2048),
            packetish_strategy(),
        ]
    ) {
        exercise_decoders(&bytes);
    }

    /// (b) Generated valid 0x73/0x83 packets parse with the fields they were built from, and
    /// round-trip through both encoders and the decoder.
    #[test]
    fn generated_packets_round_trip(f in framed_strategy(), flip in 1u8..=255) {
        let raw = f.bytes();
        prop_assert_eq!(inner_checksum(&raw), Some(f.checksum()));
        let p = Packet::parse(raw.clone(), MAX)
            .unwrap_or_else(|e| panic!("generated packet rejected: {e:?} ({f:?})"));
        let want_type = if f.ty == 0x73 { PacketType::Data } else { PacketType::Status };
        prop_assert_eq!(p.ptype(), want_type);
        prop_assert_eq!(p.data_len(), usize::from(f.inner_len()) + 18);
        prop_assert_eq!(p.id().map(|id| id.0), Some(f.id));
        prop_assert_eq!(p.msg_id(), Some(MsgId(f.msg_id)));
        prop_assert_eq!(
            p.inner(),
            Some(InnerFrame {
                start: f.start,
                seq: f.seq,
                pad: f.pad,
                class_byte: f.class,
                opcode: f.opcode,
                len: f.inner_len(),
                checksum: f.checksum(),
            })
        );
        assert_round_trip("generated", &raw);

        // The checksum is really checked: any other value is rejected.
        let mut bad = raw.to_vec();
        let at = bad.len() - 2;
        bad[at] ^= flip;
        prop_assert_eq!(
            Packet::parse(Bytes::from(bad), MAX),
            Err(DecodeError::ChecksumMismatch { expected: f.checksum(), found: f.checksum() ^ flip })
        );
    }

    /// (b) A stream of vector and generated packets, encoded back to back with either encoder and
    /// fed to the decoder in arbitrary chunks, decodes to the same packets.
    #[test]
    fn encoded_streams_decode_back(
        items in prop::collection::vec(
            (prop_oneof![
                any::<prop::sample::Index>().prop_map(Ok),
                framed_strategy().prop_map(Err),
            ], any::<bool>()),
            1..10,
        ),
        chunks in prop::collection::vec(1usize..80, 1..16),
    ) {
        let vector_packets = packet_vectors();
        let inputs: Vec<(Bytes, bool)> = items
            .iter()
            .map(|(item, via_packet)| {
                let raw = match item {
                    Ok(index) => index.get(&vector_packets).1.clone(),
                    Err(f) => f.bytes(),
                };
                (raw, *via_packet)
            })
            .collect();
        let mut codec = CyncCodec::default();
        let mut wire = BytesMut::new();
        for (raw, via_packet) in &inputs {
            if *via_packet {
                let p = Packet::parse(raw.clone(), MAX).expect("input packets are valid");
                Encoder::<&Packet>::encode(&mut codec, &p, &mut wire).expect("encode");
            } else {
                Encoder::<Bytes>::encode(&mut codec, raw.clone(), &mut wire).expect("encode");
            }
        }
        let want_wire: Vec<u8> = inputs.iter().flat_map(|(raw, _)| raw.to_vec()).collect();
        prop_assert_eq!(&wire[..], &want_wire[..]);

        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        let mut at = 0;
        let mut sizes = chunks.iter().cycle();
        while at < wire.len() {
            let end = (at + sizes.next().expect("cycle never ends")).min(wire.len());
            buf.extend_from_slice(&wire[at..end]);
            at = end;
            while let Some(frame) = codec.decode(&mut buf).expect("no framing error") {
                frames.push(frame);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(frames.len(), inputs.len());
        for (frame, (raw, _)) in frames.iter().zip(&inputs) {
            prop_assert_eq!(&frame.raw, raw);
            let original = Packet::parse(raw.clone(), MAX).expect("input packets are valid");
            let p = frame.packet.as_ref().expect("decoded frame parses");
            prop_assert_eq!(Fields::of(p), Fields::of(&original));
        }
    }

    /// (c) A header declaring N + 1 is rejected from the 5 header bytes alone, without reserving
    /// anything; a header declaring exactly N waits for the body, reserving no more than 5 + N
    /// (beyond what the amortised growth of the underlying Vec may round up to: at most twice
    /// the previous capacity).
    #[test]
    fn length_limit_is_applied_before_the_body(
        n in prop_oneof![0usize..64, 0usize..65535],
        ty in any::<u8>(),
    ) {
        let mut codec = CyncCodec::new(n);
        let over = u16::try_from(n + 1).expect("n + 1 fits the header");
        let mut buf = BytesMut::with_capacity(5);
        buf.extend_from_slice(&[ty, 0, 0]);
        buf.extend_from_slice(&over.to_be_bytes());
        let cap_before = buf.capacity();
        match codec.decode(&mut buf) {
            Err(CodecError::TooLarge { data_len, max }) => {
                prop_assert_eq!(data_len, n + 1);
                prop_assert_eq!(max, n);
            }
            other => panic!("expected TooLarge for {} > {n}, got {other:?}", n + 1),
        }
        prop_assert_eq!(buf.len(), 5);
        prop_assert!(buf.capacity() <= cap_before, "capacity grew on a rejected header");

        // The tap passes it on as unframed bytes at once, buffering no body.
        let mut tap = Tap::new(n);
        let out = tap.feed(&buf);
        prop_assert_eq!(out.frames().count(), 0);
        if PacketType::from_byte(ty).is_some() {
            prop_assert_eq!(
                out.errors().cloned().collect::<Vec<_>>(),
                vec![DecodeError::LengthTooLarge { data_len: n + 1, max: n }]
            );
        }
        // Nothing of it is framed; a tail that could still start a frame may be held.
        prop_assert_eq!(out.unframed_bytes() + tap.pending(), 5);
        prop_assert!(out.unframed_bytes() >= 1);

        if n >= 1 {
            let exact = u16::try_from(n).expect("n fits the header");
            let mut buf = BytesMut::with_capacity(5);
            buf.extend_from_slice(&[ty, 0, 0]);
            buf.extend_from_slice(&exact.to_be_bytes());
            let cap_before = buf.capacity();
            prop_assert!(matches!(codec.decode(&mut buf), Ok(None)));
            prop_assert_eq!(buf.len(), 5);
            let bound = (5 + n).max(2 * cap_before);
            // The whole frame is reserved at once when its header is read, so the body never
            // makes the buffer grow piecemeal; and no more than that.
            prop_assert!(
                buf.capacity() >= 5 + n,
                "capacity {} below the {} the frame needs",
                buf.capacity(),
                5 + n
            );
            prop_assert!(
                buf.capacity() <= bound,
                "capacity {} above {} for a header declaring {n}",
                buf.capacity(),
                bound
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accessors and edges the vectors do not reach (each found by a mutation that survived)
// ---------------------------------------------------------------------------------------------

mod accessors {
    use super::*;
    use cync_gateway::protocol::{build, header_data_len_checked, DeviceId, HEADER_LEN};

    const DEV: DeviceId = DeviceId([0x38, 0xe8, 0xcf, 0x46]);

    fn parse(b: Bytes) -> Packet {
        Packet::parse(b, MAX).expect("valid")
    }

    #[test]
    fn the_checked_header_length_is_none_until_five_bytes_and_refuses_only_above_the_limit() {
        assert_eq!(header_data_len_checked(&[0x73, 0, 0, 0], 100), None);
        let header = [0x73, 0, 0, 0x00, 0x20];
        assert_eq!(header_data_len_checked(&header, 0x20), Some(Ok(5 + 0x20)));
        assert_eq!(header_data_len_checked(&header, 0x40), Some(Ok(37)));
        assert_eq!(header_data_len_checked(&header, 0x1f), Some(Err(())));
        assert_eq!(
            header_data_len_checked(&[0xd3, 0, 0, 0, 0], 0),
            Some(Ok(HEADER_LEN))
        );
    }

    #[test]
    fn a_frame_exactly_at_the_limit_parses_and_trailing_bytes_are_counted_exactly() {
        // A heartbeat has no data: a limit of zero admits it, and split_packets agrees.
        assert!(Packet::parse(build::heartbeat(), 0).is_ok());
        let (frames, rest) = split_packets(&build::heartbeat(), 0);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].1.is_ok() && rest.is_empty());
        let mut long = build::heartbeat().to_vec();
        long.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            Packet::parse(Bytes::from(long), MAX).err(),
            Some(DecodeError::TrailingBytes { extra: 3 })
        );
    }

    #[test]
    fn commands_and_command_replies_are_told_apart() {
        let cmd = parse(build::power_command(DEV, MsgId([0, 0, 0]), 1, 10, true));
        let reply = parse(build::command_reply(DEV, MsgId([0, 1, 0]), 1, 0xd0));
        let status = parse(build::mesh_status(
            DEV,
            MsgId([0, 2, 0]),
            5,
            1,
            10,
            1,
            50,
            0,
        ));
        assert!(cmd.is_command() && !cmd.is_command_reply());
        assert!(reply.is_command_reply() && !reply.is_command());
        assert!(!status.is_command() && !status.is_command_reply());
        // A 0x83 whose inner frame says f8 is still not a command: only 0x73s are.
        let f8_status = parse(build::framed(
            0x83,
            DEV,
            MsgId([0, 3, 0]),
            0x7e,
            1,
            [0, 0, 0],
            0xf8,
            0xd0,
            &[0, 0],
        ));
        assert!(!f8_status.is_command());
        let f9_status = parse(build::framed(
            0x83,
            DEV,
            MsgId([0, 3, 0]),
            0x7e,
            1,
            [0, 0, 0],
            0xf9,
            0xd0,
            &[0, 0],
        ));
        assert!(!f9_status.is_command_reply());
    }

    /// A brightness command with byte 31 and byte 32 replaced (checksum fixed).
    fn brightness_with(b31: u8, b32: u8) -> Packet {
        let mut raw = build::brightness_command(DEV, MsgId([0, 0, 0]), 2, 10, 55).to_vec();
        raw[31] = b31;
        raw[32] = b32;
        let at = raw.len() - 2;
        raw[at] = inner_checksum(&raw).expect("checksum");
        parse(Bytes::from(raw))
    }

    #[test]
    fn brightness_is_read_only_from_a_well_formed_command() {
        assert!(matches!(
            brightness_with(0x01, 100).command(),
            Some(Command::Brightness { percent: 100, .. })
        ));
        assert!(matches!(
            brightness_with(0x01, 101).command(),
            Some(Command::Other { .. })
        ));
        assert!(matches!(
            brightness_with(0x02, 50).command(),
            Some(Command::Other { .. })
        ));
    }

    #[test]
    fn mesh_status_and_firmware_are_read_only_from_the_reports_that_carry_them() {
        let status = build::mesh_status(DEV, MsgId([0, 2, 0]), 5, 1, 10, 1, 50, 0);
        assert!(parse(status.clone()).mesh_status().is_some());
        // The same inner frame in a 0x73, or with another opcode or class, is not one.
        let body = &status[20..status.len() - 2];
        let as_data = parse(build::framed(
            0x73,
            DEV,
            MsgId([0, 2, 0]),
            0x7e,
            status[13],
            [0, 0, 0],
            0xfa,
            0xdb,
            body,
        ));
        assert_eq!(as_data.mesh_status(), None);
        let other_opcode = parse(build::framed(
            0x83,
            DEV,
            MsgId([0, 2, 0]),
            0x7e,
            status[13],
            [0, 0, 0],
            0xfa,
            0xdc,
            body,
        ));
        assert_eq!(other_opcode.mesh_status(), None);
        let other_class = parse(build::framed(
            0x83,
            DEV,
            MsgId([0, 2, 0]),
            0x7e,
            status[13],
            [0, 0, 0],
            0xf9,
            0xdb,
            body,
        ));
        assert_eq!(other_class.mesh_status(), None);
        let fw = build::firmware_report(DEV, MsgId([0, 6, 0]), true, "11158");
        assert_eq!(
            parse(fw.clone()).firmware().map(|f| f.1),
            Some("11158".into())
        );
        // A 0x73 with the same bytes, or a 0x83 whose inner frame starts with 0x7e, is not.
        let mut as_data = fw.to_vec();
        as_data[0] = 0x73;
        if let Ok(p) = Packet::parse(Bytes::from(as_data), MAX) {
            assert_eq!(p.firmware(), None);
        }
        let mut framed_start = fw.to_vec();
        framed_start[12] = 0x7e;
        if let Ok(p) = Packet::parse(Bytes::from(framed_start), MAX) {
            assert_eq!(p.firmware(), None);
        }
    }

    #[test]
    fn every_tlv_item_keeps_its_own_value() {
        let info = parse(build::info_tlv(
            DEV,
            &[(0xc790, b"first"), (0xc791, b"second"), (0xc792, b"3")],
        ));
        let Some(InfoBody::Tlv(items)) = info.info_body() else {
            panic!("a TLV body");
        };
        let got: Vec<(u16, &[u8])> = items.iter().map(|t| (t.tag, &t.value[..])).collect();
        assert_eq!(
            got,
            [
                (0xc790, &b"first"[..]),
                (0xc791, &b"second"[..]),
                (0xc792, &b"3"[..])
            ]
        );
    }

    #[test]
    fn ids_print_as_hex_and_auth_codes_never_print() {
        assert_eq!(DEV.to_string(), "38e8cf46");
        assert_eq!(format!("{DEV:?}"), "DeviceId(38e8cf46)");
        assert_eq!(MsgId([0, 9, 0x1f]).to_string(), "00091f");
        assert_eq!(format!("{:?}", MsgId([0, 9, 0x1f])), "MsgId(00091f)");
        assert_eq!(PacketType::Data.to_string(), "0x73");
        let hello = parse(build::hello(DEV, b"0123456789abcdef"));
        let (_, auth, _) = hello.hello().expect("a hello");
        assert_eq!(auth.to_string(), "<redacted>");
        assert_eq!(format!("{auth:?}"), "AuthCode(<redacted>)");
        let shown = format!("{hello:?}");
        assert!(shown.contains("Hello") && shown.contains("len"), "{shown}");
        assert!(!shown.contains("0123456789abcdef") && !shown.contains("3031"));
    }
}
