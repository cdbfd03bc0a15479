//! The `mqtt` source: inputs arrive as messages on a topic filter of the
//! shared MQTT connection.
//!
//! The subscription's handler runs on the connection task, which must never
//! wait (it also publishes every result), so it only copies the payload into
//! a small hand-over queue; the source's own thread parses it (decoding an
//! image takes milliseconds) and pushes it into the pipeline, where the
//! pipeline's overflow policy applies. When the hand-over queue is full the
//! oldest payload is dropped and counted like a queue overflow.
//!
//! Payload formats: `json` (an array of numbers, or an object of
//! name: number, parsed exactly like the `lines` source's JSON), `csv` (one
//! line of comma-separated numbers), `f32le` (raw little-endian f32 values),
//! `image` (JPEG or PNG). A malformed payload is counted in the pipeline's
//! `errors`, logged (the first and every 100th) and skipped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use super::config::{LineFormat, PayloadFormat, SourceConfig};
use crate::message::{Frame, Input, Values};
use crate::sink::mqtt::{Incoming, MessageHandler, MqttHandle};

use super::{SourceCtx, SourceEnd, SourceError};

/// Payloads waiting for the source thread: a few frames (the newest win
/// anyway), more samples (a burst of sensor messages should survive).
const FRAME_HANDOFF: usize = 4;
const VALUES_HANDOFF: usize = 1024;
/// The payloads waiting for the source thread never hold more than this (beyond one
/// payload): a burst of large messages drops the oldest instead of growing memory.
const HANDOFF_MAX_BYTES: usize = 16 << 20;
/// Largest `json`, `csv` or `f32le` payload: a numeric message is one sample or one
/// window, far below this; a larger one is refused before it is copied.
pub const MAX_VALUES_PAYLOAD: usize = 1 << 20;

/// How often the source thread looks at the stop flag while idle.
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// Parses one payload into an input captured at `now`, from `topic`.
pub fn parse_payload(format: PayloadFormat, topic: &str, bytes: &[u8], now: SystemTime) -> Result<Input, String> {
    if bytes.is_empty() {
        return Err("empty payload".into());
    }
    if format != PayloadFormat::Image && bytes.len() > MAX_VALUES_PAYLOAD {
        return Err(format!(
            "{} bytes is over the {} KiB limit for numeric payloads",
            bytes.len(),
            MAX_VALUES_PAYLOAD >> 10
        ));
    }
    let values = |values: Vec<f32>, names: Option<Vec<String>>| {
        Input::Values(Values { values, names, captured: now, origin: Some(topic.to_string()) })
    };
    match format {
        PayloadFormat::Json => {
            let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
            let parsed = super::lines::parse_json(text.trim_start_matches('\u{feff}').trim())?;
            Ok(values(parsed.values, parsed.names))
        }
        PayloadFormat::Csv => {
            let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
            match super::lines::parse_line(LineFormat::Csv, text)? {
                Some(parsed) => Ok(values(parsed.values, None)),
                None => Err("no values (blank or a comment)".into()),
            }
        }
        PayloadFormat::F32le => Ok(values(parse_f32le(bytes)?, None)),
        PayloadFormat::Image => {
            let image = crate::preprocess::decode_image(bytes).map_err(|e| format!("bad image: {e}"))?;
            Ok(Input::Frame(Frame { image, captured: now, origin: Some(topic.to_string()) }))
        }
    }
}

/// Raw little-endian f32 values; every one must be finite.
fn parse_f32le(bytes: &[u8]) -> Result<Vec<f32>, String> {
    if !bytes.len().is_multiple_of(4) {
        return Err(format!("{} bytes is not a whole number of f32 values (a multiple of 4)", bytes.len()));
    }
    bytes
        .chunks_exact(4)
        .enumerate()
        .map(|(i, b)| {
            let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if x.is_finite() {
                Ok(x)
            } else {
                Err(format!("value {} is {x}, not a finite number", i + 1))
            }
        })
        .collect()
}

/// A bounded queue from the connection task to the source thread; drops the oldest when full.
struct Handoff {
    items: Mutex<Waiting>,
    ready: Condvar,
    capacity: usize,
    /// Set when the source stops: the (still registered) handler then ignores messages.
    closed: AtomicBool,
}

/// The payloads in a [`Handoff`] and their total size.
#[derive(Default)]
struct Waiting {
    items: VecDeque<(String, Vec<u8>)>,
    bytes: usize,
}

impl Handoff {
    /// Adds a payload; how many older ones had to be dropped for it (count or bytes bound).
    fn offer(&self, topic: &str, payload: &[u8]) -> u64 {
        let mut w = self.items.lock().unwrap_or_else(|p| p.into_inner());
        let mut dropped = 0;
        while !w.items.is_empty() && (w.items.len() >= self.capacity || w.bytes + payload.len() > HANDOFF_MAX_BYTES) {
            if let Some((_, old)) = w.items.pop_front() {
                w.bytes -= old.len();
                dropped += 1;
            }
        }
        w.bytes += payload.len();
        w.items.push_back((topic.to_string(), payload.to_vec()));
        self.ready.notify_one();
        dropped
    }

    /// The next payload, waiting up to `wait`.
    fn take(&self, wait: Duration) -> Option<(String, Vec<u8>)> {
        let mut w = self.items.lock().unwrap_or_else(|p| p.into_inner());
        if w.items.is_empty() {
            w = self.ready.wait_timeout(w, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
        let item = w.items.pop_front();
        if let Some((_, payload)) = &item {
            w.bytes -= payload.len();
        }
        item
    }
}

/// Marks the hand-over closed however `run` ends.
struct CloseOnDrop(Arc<Handoff>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.closed.store(true, Relaxed);
    }
}

/// Subscribes on the shared connection and pushes parsed payloads until stopped.
pub fn run(cfg: &SourceConfig, ctx: &SourceCtx, hub: &MqttHandle) -> Result<SourceEnd, SourceError> {
    let SourceConfig::Mqtt { topic, format, qos } = cfg else {
        return Err(SourceError(format!("mqtt source started with a `{}` source config", cfg.kind())));
    };
    let format = *format;
    let frames = format == PayloadFormat::Image;
    let handoff = Arc::new(Handoff {
        items: Mutex::new(Waiting::default()),
        ready: Condvar::new(),
        capacity: if frames { FRAME_HANDOFF } else { VALUES_HANDOFF },
        closed: AtomicBool::new(false),
    });
    let _close = CloseOnDrop(handoff.clone());

    let handler: MessageHandler = {
        let handoff = handoff.clone();
        let metrics = ctx.metrics.clone();
        let pipeline = ctx.pipeline.clone();
        Arc::new(move |m: &Incoming| {
            if !frames && m.payload.len() > MAX_VALUES_PAYLOAD {
                // Refused here, before the bytes are copied.
                let n = metrics.errors.fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    log::warn!(
                        "pipeline `{pipeline}`: payload on `{}` skipped: {} bytes is over the {} KiB limit for \
                         numeric payloads ({n} errors so far)",
                        m.topic,
                        m.payload.len(),
                        MAX_VALUES_PAYLOAD >> 10
                    );
                }
                return;
            }
            if handoff.closed.load(Relaxed) {
                return;
            }
            let dropped = handoff.offer(&m.topic, &m.payload);
            if dropped == 0 {
                return;
            }
            if frames {
                metrics.dropped_stale.fetch_add(dropped, Relaxed);
            } else {
                let before = metrics.dropped_queue_full.fetch_add(dropped, Relaxed);
                let n = before + dropped;
                // Logged when the count passes a power of two.
                if (before + 1..=n).any(u64::is_power_of_two) {
                    log::warn!(
                        "pipeline `{pipeline}`: mqtt messages arrive faster than they are parsed, {n} dropped so far"
                    );
                }
            }
        })
    };
    hub.subscribe(topic, *qos, handler);
    log::info!("pipeline `{}`: subscribed to `{topic}` ({format:?} payloads)", ctx.pipeline);

    let mut malformed: u64 = 0;
    while !ctx.stopped() {
        let Some((from, payload)) = handoff.take(IDLE_WAIT) else { continue };
        match parse_payload(format, &from, &payload, SystemTime::now()) {
            Ok(input) => {
                if !ctx.push(input) {
                    break;
                }
            }
            Err(reason) => {
                ctx.metrics.errors.fetch_add(1, Relaxed);
                malformed += 1;
                if malformed == 1 || malformed.is_multiple_of(100) {
                    log::warn!(
                        "pipeline `{}`: payload on `{from}` skipped: {reason} ({malformed} malformed so far)",
                        ctx.pipeline
                    );
                }
            }
        }
    }
    Ok(SourceEnd::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn values(input: Input) -> (Vec<f32>, Option<Vec<String>>) {
        match input {
            Input::Values(v) => {
                assert_eq!(v.origin.as_deref(), Some("sensors/a"));
                assert_eq!(v.captured, now());
                (v.values, v.names)
            }
            other => panic!("expected values, got {other:?}"),
        }
    }

    fn parse(format: PayloadFormat, bytes: &[u8]) -> Result<Input, String> {
        parse_payload(format, "sensors/a", bytes, now())
    }

    #[test]
    fn json_array_gives_unnamed_values() {
        let (v, names) = values(parse(PayloadFormat::Json, b"[1, 2.5, -3e2]").unwrap());
        assert_eq!(v, vec![1.0, 2.5, -300.0]);
        assert!(names.is_none());
    }

    #[test]
    fn json_object_keeps_names_in_the_objects_order() {
        let (v, names) = values(parse(PayloadFormat::Json, br#"{"z": 1, "a": 2, "m": 3.5}"#).unwrap());
        assert_eq!(v, vec![1.0, 2.0, 3.5]);
        assert_eq!(names.unwrap(), vec!["z", "a", "m"]);
    }

    #[test]
    fn malformed_json_is_an_error() {
        for bad in [&b"[1, \"NaN\"]"[..], b"[1, 2", b"{\"a\": \"x\"}", b"[]", b"{}", b"[1e300]", b"\xff\xfe", b"   "] {
            assert!(parse(PayloadFormat::Json, bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn csv_line_gives_values() {
        let (v, names) = values(parse(PayloadFormat::Csv, b" 1, 2.5 ,-3\r\n").unwrap());
        assert_eq!(v, vec![1.0, 2.5, -3.0]);
        assert!(names.is_none());
    }

    #[test]
    fn malformed_csv_is_an_error() {
        for bad in [&b"1,NaN,3"[..], b"1,,3", b"1,x", b"inf", b"\n", b"1,2\n3,4"] {
            assert!(parse(PayloadFormat::Csv, bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn f32le_gives_values() {
        let bytes: Vec<u8> = [1.5f32, -2.0, 0.25].iter().flat_map(|x| x.to_le_bytes()).collect();
        let (v, names) = values(parse(PayloadFormat::F32le, &bytes).unwrap());
        assert_eq!(v, vec![1.5, -2.0, 0.25]);
        assert!(names.is_none());
    }

    #[test]
    fn f32le_needs_whole_finite_values() {
        let err = parse(PayloadFormat::F32le, &[0, 0, 128, 63, 1, 2, 3]).unwrap_err();
        assert!(err.contains("multiple of 4"), "{err}");
        let nan: Vec<u8> = [1.0f32, f32::NAN].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(parse(PayloadFormat::F32le, &nan).unwrap_err().contains("value 2"));
        let inf = f32::INFINITY.to_le_bytes();
        assert!(parse(PayloadFormat::F32le, &inf).is_err());
    }

    #[test]
    fn empty_payloads_are_errors_in_every_format() {
        for f in [PayloadFormat::Json, PayloadFormat::Csv, PayloadFormat::F32le, PayloadFormat::Image] {
            assert_eq!(parse(f, b"").unwrap_err(), "empty payload");
        }
    }

    #[test]
    fn png_payload_gives_a_frame() {
        let img = image::RgbImage::from_fn(4, 3, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        match parse(PayloadFormat::Image, &png).unwrap() {
            Input::Frame(f) => {
                assert_eq!(f.image, img);
                assert_eq!(f.origin.as_deref(), Some("sensors/a"));
                assert_eq!(f.captured, now());
            }
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn bad_image_is_an_error() {
        let err = parse(PayloadFormat::Image, b"\xff\xd8\xff not really a jpeg").unwrap_err();
        assert!(err.starts_with("bad image"), "{err}");
    }

    #[test]
    fn handoff_drops_the_oldest_when_full() {
        let h = Handoff {
            items: Mutex::new(Waiting::default()),
            ready: Condvar::new(),
            capacity: 2,
            closed: AtomicBool::new(false),
        };
        assert_eq!(h.offer("t", b"1"), 0);
        assert_eq!(h.offer("t", b"2"), 0);
        assert_eq!(h.offer("t", b"3"), 1);
        assert_eq!(h.take(IDLE_WAIT).unwrap().1, b"2");
        assert_eq!(h.take(IDLE_WAIT).unwrap().1, b"3");
        assert!(h.take(Duration::from_millis(1)).is_none());
    }

    #[test]
    fn handoff_holds_at_most_its_byte_bound() {
        let h = Handoff {
            items: Mutex::new(Waiting::default()),
            ready: Condvar::new(),
            capacity: VALUES_HANDOFF,
            closed: AtomicBool::new(false),
        };
        let big = vec![b'1'; MAX_VALUES_PAYLOAD];
        let fits = HANDOFF_MAX_BYTES / big.len();
        for _ in 0..fits {
            assert_eq!(h.offer("t", &big), 0);
        }
        assert_eq!(h.offer("t", &big), 1, "the oldest goes when the bytes would pass the bound");
        assert_eq!(h.items.lock().unwrap().bytes, fits * big.len());
        // One payload three times as large evicts three, and says so (each is counted as dropped).
        assert_eq!(h.offer("t", &vec![b'3'; 3 * MAX_VALUES_PAYLOAD]), 3);
        assert_eq!(h.items.lock().unwrap().bytes, HANDOFF_MAX_BYTES);
        let mut n = 0;
        while h.take(Duration::from_millis(1)).is_some() {
            n += 1;
        }
        assert_eq!((n, h.items.lock().unwrap().bytes), (fits - 3 + 1, 0));
    }

    #[test]
    fn numeric_payloads_over_the_limit_are_refused_images_are_not() {
        let mut json = b"[".to_vec();
        while json.len() <= MAX_VALUES_PAYLOAD {
            json.extend_from_slice(b"0.5,");
        }
        json.extend_from_slice(b"0.5]");
        for format in [PayloadFormat::Json, PayloadFormat::Csv, PayloadFormat::F32le] {
            let err = parse(format, &json).unwrap_err();
            assert!(err.contains("over the 1024 KiB limit"), "{format:?}: {err}");
        }
        // An image is bounded by the MQTT packet size and the decoder's limits instead.
        let err = parse(PayloadFormat::Image, &json).unwrap_err();
        assert!(err.starts_with("bad image"), "{err}");
    }
}
