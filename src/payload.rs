//! The versioned JSON payloads subscribers rely on: `edgeinfer/result/v1`
//! (documented in docs/mqtt.md and `schemas/result-v1.schema.json`) and
//! `edgeinfer/health/v1`.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::message::{Event, ResultMsg};

/// Schema id of result payloads.
pub const RESULT_SCHEMA: &str = "edgeinfer/result/v1";
/// Schema id of health payloads.
pub const HEALTH_SCHEMA: &str = "edgeinfer/health/v1";

/// Milliseconds since the Unix epoch.
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// RFC 3339 with microseconds, UTC (precise enough to measure latency on one host).
pub fn rfc3339(t: SystemTime) -> String {
    // humantime refuses times before 1970 (a board whose clock was never set).
    humantime::format_rfc3339_micros(t.max(UNIX_EPOCH)).to_string()
}

/// The result payload, stamped with the time it is published.
pub fn result_json(msg: &ResultMsg, event: Option<&Event>, published: SystemTime) -> serde_json::Value {
    let mut v = serde_json::json!({
        "schema": RESULT_SCHEMA,
        "device": &*msg.device,
        "pipeline": &*msg.pipeline,
        "model": {"name": &*msg.model, "sha256": &*msg.model_sha256},
        "seq": msg.seq,
        "captured_at": rfc3339(msg.captured),
        "captured_ms": epoch_ms(msg.captured),
        "published_at": rfc3339(published),
        "published_ms": epoch_ms(published),
        "latency_ms": msg.latency,
        "result": msg.result,
    });
    if let Some(origin) = &msg.origin {
        v["input"] = serde_json::Value::from(origin.as_str());
    }
    if let Some(e) = event {
        v["event"] = serde_json::to_value(e).unwrap_or_default();
    }
    v
}

/// The result payload as bytes.
pub fn result_bytes(msg: &ResultMsg, event: Option<&Event>, published: SystemTime) -> Vec<u8> {
    serde_json::to_vec(&result_json(msg, event, published)).unwrap_or_default()
}

/// Fills `{device}`, `{pipeline}`, `{model}` and `{label}` (top class, best detection, or
/// anomaly verdict) in a topic template.
pub fn render_topic(template: &str, msg: &ResultMsg) -> String {
    let label = msg
        .result
        .classes
        .as_ref()
        .and_then(|c| c.first())
        .map(|c| c.label.as_str())
        .or_else(|| {
            // Detections are best first, but pick the best explicitly so the order is no contract.
            let best = msg.result.detections.as_ref()?.iter().max_by(|a, b| a.score.total_cmp(&b.score))?;
            Some(best.label.as_str())
        })
        .or_else(|| msg.result.anomaly.map(|a| if a.anomalous { "anomaly" } else { "normal" }))
        .unwrap_or("none");
    template
        .replace("{device}", &msg.device)
        .replace("{pipeline}", &msg.pipeline)
        .replace("{model}", &msg.model)
        .replace("{label}", &sanitize_level(label))
}

/// A label made safe as one topic level (no `/`, `+`, `#`).
fn sanitize_level(s: &str) -> String {
    s.chars().map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Latency, ResultBody};
    use crate::postprocess::ClassScore;

    fn msg() -> ResultMsg {
        ResultMsg {
            device: "pi".into(),
            pipeline: "cam".into(),
            model: "digits".into(),
            model_sha256: "ab".into(),
            seq: 7,
            captured: UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            origin: None,
            latency: Latency::default(),
            result: ResultBody {
                classes: Some(vec![ClassScore { index: 1, label: "a/b".into(), score: 0.9 }]),
                ..Default::default()
            },
        }
    }

    #[test]
    fn payload_has_schema_times_and_seq() {
        let v = result_json(&msg(), None, UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_200));
        assert_eq!(v["schema"], RESULT_SCHEMA);
        assert_eq!(v["seq"], 7);
        assert_eq!(v["captured_ms"], 1_700_000_000_123u64);
        assert_eq!(v["captured_at"], "2023-11-14T22:13:20.123000Z");
        assert_eq!(v["published_ms"], 1_700_000_000_200u64);
        assert_eq!(v["result"]["classes"][0]["label"], "a/b");
        assert!(v.get("event").is_none());
    }

    #[test]
    fn topic_placeholders_are_filled_and_labels_sanitised() {
        assert_eq!(render_topic("x/{device}/{pipeline}/{model}/{label}", &msg()), "x/pi/cam/digits/a_b");
    }

    #[test]
    fn topic_label_of_detections_is_the_best_one() {
        use crate::message::{BoundingBox, Detection, ImageSize};
        let det = |label: &str, score: f32| Detection {
            label: label.into(),
            index: 0,
            score,
            bbox: BoundingBox { x1: 1.0, y1: 2.0, x2: 3.0, y2: 4.0 },
        };
        let mut m = msg();
        m.result = ResultBody {
            detections: Some(vec![det("car", 0.5), det("person", 0.8)]),
            image: Some(ImageSize { width: 640, height: 480 }),
            ..Default::default()
        };
        assert_eq!(render_topic("d/{label}", &m), "d/person");
        let v = result_json(&m, None, UNIX_EPOCH);
        assert_eq!(v["result"]["detections"][1]["box"]["x2"], 3.0);
        assert_eq!(v["result"]["image"]["width"], 640);
        m.result.detections = Some(vec![]);
        assert_eq!(render_topic("d/{label}", &m), "d/none");
    }
}
