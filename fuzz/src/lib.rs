//! The bodies of the fuzz targets, one function per parser that takes outside input.
//! `fuzz_targets/*.rs` hand libFuzzer's bytes to these; the main crate's
//! `tests/it/fuzz_regressions.rs` includes this file and replays every saved crash through
//! the same function, so a fixed crash stays fixed in the normal test suite.

use edgeinfer::commands;
use edgeinfer::engine::{LoadOptions, Model};
use edgeinfer::sink::disk_queue::{crc32, DiskQueue, FsyncPolicy, QueueOptions, Record};
use edgeinfer::source::config::{LineFormat, PayloadFormat};
use edgeinfer::source::http::{multipart_boundary, MultipartReader};
use edgeinfer::source::pipe::JpegSplitter;
use serde_json::Value;
use std::collections::HashMap;
use std::io::Cursor;
use std::time::Duration;

/// Command names: every one the daemon knows, and one it does not.
const NAMES: [&str; 8] =
    ["pause", "resume", "set_threshold", "health", "reload_model", "update_model", "reload_config", "nope"];
/// The HMAC key of the signed commands.
const SECRET: &[u8] = b"fuzz-secret";
/// Record header: body length u32, CRC u32.
const HEADER: usize = 8;

/// Rewrites the ack file's and every whole record's CRC to match its bytes.
fn fix_crcs(ack: &mut [u8], seg: &mut [u8]) {
    if ack.len() == 12 {
        let c = crc32(&ack[..8]);
        ack[8..].copy_from_slice(&c.to_le_bytes());
    }
    let mut at = 0;
    while at + HEADER <= seg.len() {
        let len = u32::from_le_bytes(seg[at..at + 4].try_into().unwrap()) as usize;
        let Some(body) = seg.get(at + HEADER..at + HEADER + len) else { break };
        let c = crc32(body);
        seg[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
        at += HEADER + len;
    }
}

/// The TOML config through the same parsing and validation `edgeinfer check` runs before it loads models.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(mut cfg) = edgeinfer::config::Config::parse(text, "fuzz.toml") {
        let _ = cfg.validate("fuzz.toml");
    }
}

/// MQTT source payloads in every format, and the lines/serial source's line parser.
/// The first byte picks the format; the rest is the payload.
pub fn payload(data: &[u8]) {
    let Some((&pick, bytes)) = data.split_first() else { return };
    let now = std::time::SystemTime::UNIX_EPOCH;
    match pick % 5 {
        0 => drop(edgeinfer::source::mqtt::parse_payload(PayloadFormat::Json, "t", bytes, now)),
        1 => drop(edgeinfer::source::mqtt::parse_payload(PayloadFormat::Csv, "t", bytes, now)),
        2 => drop(edgeinfer::source::mqtt::parse_payload(PayloadFormat::F32le, "t", bytes, now)),
        3 => drop(edgeinfer::source::mqtt::parse_payload(PayloadFormat::Image, "t", bytes, now)),
        _ => {
            let text = String::from_utf8_lossy(bytes);
            for line in text.lines() {
                let _ = edgeinfer::source::lines::parse_line(LineFormat::Json, line);
                let _ = edgeinfer::source::lines::parse_line(LineFormat::Csv, line);
            }
        }
    }
}

/// Remote command JSON: signature and timestamp checks, then the command's own fields.
/// The object is tried as sent (the signature almost never matches) and signed by the
/// harness, so the checks behind the signature see fuzzed input too.
pub fn command(data: &[u8]) {
    let Some((&pick, bytes)) = data.split_first() else { return };
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(bytes) else { return };
    let mut seen = HashMap::new();
    let now = 1_800_000_000.0;
    let _ = commands::verify(SECRET, &obj, now, 30, &mut seen);
    let mac = commands::hmac_sha256(SECRET, commands::canonical(&obj).as_bytes());
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    obj.insert("hmac".into(), Value::String(hex));
    let _ = commands::verify(SECRET, &obj, now, 30, &mut seen);
    let _ = commands::verify(SECRET, &obj, now, 30, &mut seen);
    let _ = commands::parse(NAMES[pick as usize % NAMES.len()], &obj);
}

/// The HTTP camera's MJPEG stream: the content type's boundary, then
/// `multipart/x-mixed-replace` parts read the way the source reads them.
/// Input: a content-type line, a newline, then the body.
pub fn multipart(data: &[u8]) {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let head = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or(&[]);
    let boundary = multipart_boundary(&head).unwrap_or_else(|| "frame".to_string());
    let mut reader = MultipartReader::new(Cursor::new(body), &boundary);
    for n in 0.. {
        match reader.next_part() {
            Ok(Some(part)) => match reader.read_body(&part, n % 2 == 0) {
                Ok(Some(jpeg)) => drop(edgeinfer::preprocess::decode_image(jpeg)),
                Ok(None) => {}
                Err(_) => break,
            },
            Ok(None) | Err(_) => break,
        }
        // Every part consumes at least its delimiter line, so the stream ends; the bound is a safety net.
        assert!(n < 1 << 20, "more parts than bytes");
    }
}

/// Camera frames: JPEG/PNG decoding as every camera source uses it, and the
/// `pipe` source's MJPEG splitter fed in chunks (the first byte sets the chunk size).
pub fn frame(data: &[u8]) {
    let Some((&chunk, bytes)) = data.split_first() else { return };
    let _ = edgeinfer::preprocess::decode_image(bytes);
    let chunk = chunk as usize + 1;
    let mut splitter = JpegSplitter::default();
    for piece in bytes.chunks(chunk) {
        let mut r = Cursor::new(piece);
        while splitter.fill_from(&mut r).map(|n| n > 0).unwrap_or(false) {}
        splitter.drain(|frame| {
            if let Ok(jpeg) = frame {
                let _ = edgeinfer::preprocess::decode_image(jpeg);
            }
        });
    }
}

/// The disk queue's recovery: a segment (and an ack file) as a power cut or a
/// bad card might leave them, opened, read back, appended to and read again.
/// Input: a mode byte, 12 bytes of ack file, then the segment. With an odd mode
/// the harness fixes the CRCs first, so the checks behind them see fuzzed bytes too.
pub fn disk_queue(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
    let (ack, seg) = rest.split_at(rest.len().min(12));
    let (mut ack, mut seg) = (ack.to_vec(), seg.to_vec());
    if mode % 2 == 1 {
        fix_crcs(&mut ack, &mut seg);
    }
    if ack.len() == 12 {
        std::fs::write(dir.path().join("ack"), &ack).unwrap();
    }
    std::fs::write(dir.path().join("00000001.seg"), &seg).unwrap();
    let opts = QueueOptions {
        max_bytes: 1 << 20,
        max_age: Duration::from_secs(3600 * 24 * 365 * 100),
        fsync: FsyncPolicy::Never,
    };
    let Ok(q) = DiskQueue::open(dir.path(), opts) else { return };
    let before = q.read_after(0, 10_000);
    let rec = Record { topic: "t".into(), qos: 1, retain: false, payload: b"x".to_vec() };
    let id = q.append(&rec).expect("append after recovery");
    let after = q.read_after(0, 10_000);
    assert!(after.len() > before.len() || after.len() == 10_000, "the appended record is not read back");
    assert!(before.iter().all(|s| s.id < id), "a recovered id is not below the next one");
    q.close();
}

/// The engine turns a panic inside tract into a load error (`Model::load` runs under
/// `catch_unwind`): for the loader targets such a panic is handled, not a crash, so the
/// abort-on-panic hook libFuzzer installs is replaced by a silent one. A panic that
/// escapes still aborts: libFuzzer's wrapper catches it and aborts.
/// Only under the fuzzer: the test suite that replays these inputs keeps its own hook.
fn panics_inside_the_engine_are_handled() {
    #[cfg(fuzzing)]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    }
}

/// The ONNX loader: protobuf decode, our graph rewrites, shape pinning, tract's
/// analysis, then one inference on zeros (the warm-up), as `edgeinfer run` loads a model.
pub fn onnx(data: &[u8]) {
    panics_inside_the_engine_are_handled();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    std::fs::write(&path, data).unwrap();
    let _ = Model::load(&path, &LoadOptions::default());
}

/// Converted models and start-up cache entries (`.nnef.tgz` / `.nnef.tar`:
/// our sidecar, then tract's NNEF), loaded as the daemon loads them.
/// The first byte picks gzipped or plain.
pub fn converted(data: &[u8]) {
    panics_inside_the_engine_are_handled();
    let Some((&pick, bytes)) = data.split_first() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(if pick % 2 == 0 { "m.nnef.tgz" } else { "m.nnef.tar" });
    std::fs::write(&path, bytes).unwrap();
    let _ = Model::load(&path, &LoadOptions::default());
}

/// A fuzz target's body.
pub type Body = fn(&[u8]);

/// Every target by name, for the replay of saved crashes.
pub const TARGETS: [(&str, Body); 8] = [
    ("config", config),
    ("payload", payload),
    ("command", command),
    ("multipart", multipart),
    ("frame", frame),
    ("disk_queue", disk_queue),
    ("onnx", onnx),
    ("converted", converted),
];
