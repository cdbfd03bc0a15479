//! Home Assistant discovery end to end: the real daemon, a real mosquitto, real subscribers.
//! The discovery configs' `value_template`s are evaluated here (the small subset of Jinja they
//! use) on real result payloads, so a template pointing at the wrong field fails.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Daemon, Mosquitto, Msg, Subscriber};

const LONG: Duration = Duration::from_secs(30);

fn is_config(m: &Msg) -> bool {
    m.topic.starts_with("homeassistant/") && m.topic.ends_with("/config")
}

fn announced(m: &Msg) -> bool {
    is_config(m) && !m.bytes.is_empty()
}

/// Follows `value_json.a.b[0].c` through a payload.
fn lookup<'a>(expr: &str, payload: &'a Value) -> &'a Value {
    let path = expr.trim().strip_prefix("value_json").unwrap_or_else(|| panic!("not a value_json path: {expr}"));
    let mut v = payload;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indexes) = part.split_once('[').map(|(k, i)| (k, Some(i))).unwrap_or((part, None));
        v = &v[key];
        for ix in indexes.into_iter().flat_map(|i| i.split('[')) {
            v = &v[ix.trim_end_matches(']').parse::<usize>().unwrap()];
        }
    }
    assert!(!v.is_null(), "{expr} selects nothing in {payload}");
    v
}

/// Renders a template the way Jinja would for the forms the daemon uses: a path, a path
/// `| length`, and `'A' if path else 'B'`.
fn render(template: &str, payload: &Value) -> String {
    let inner = template.trim().strip_prefix("{{").and_then(|t| t.strip_suffix("}}")).unwrap().trim();
    let unquote = |s: &str| s.trim().trim_matches('\'').to_string();
    if let Some((then, rest)) = inner.split_once(" if ") {
        let (cond, otherwise) = rest.split_once(" else ").unwrap();
        return if lookup(cond, payload).as_bool().unwrap() { unquote(then) } else { unquote(otherwise) };
    }
    if let Some(path) = inner.strip_suffix("| length") {
        return lookup(path, payload).as_array().unwrap().len().to_string();
    }
    match lookup(inner, payload) {
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        other => other.to_string(),
    }
}

fn config(port: u16, pipelines: &str) -> String {
    format!(
        r#"
device = "ha1"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
reconnect_min_ms = 100
reconnect_max_ms = 500
[health]
interval_s = 0
[homeassistant]
enabled = true
device_name = "Test board"
{pipelines}"#
    )
}

const VIB: &str = r#"
[[pipelines]]
name = "vib"
model = "{models}/vibration_f32.onnx"
source = { type = "synthetic", signal = "vibration", rate_hz = 1000 }
postprocess = { type = "classify" }
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1
"#;

const ANOMALY: &str = r#"
[[pipelines]]
name = "vib_anom"
model = "{models}/vibration_f32.onnx"
source = { type = "synthetic", signal = "vibration", rate_hz = 1000 }
postprocess = { type = "anomaly", threshold = 0.5, score = "not_class", normal_class = "normal" }
"#;

const OTHERS: &str = r#"
[[pipelines]]
name = "vib_raw"
model = "{models}/vibration_f32.onnx"
source = { type = "synthetic", signal = "vibration", rate_hz = 1000 }
postprocess = { type = "values" }
  [[pipelines.outputs]]
  type = "stdout"
  [[pipelines.outputs]]
  type = "mqtt"
  topic = "edgeinfer/{device}/raw/{model}"
[[pipelines]]
name = "faces"
model = "{models}/detector_yolov8n.onnx"
input_shape = [1, 3, 320, 320]
source = { type = "files", path = "{models}/samples/detect/faces.jpg", rate_hz = 2, loop = true }
preprocess = { type = "image", resize = "letterbox" }
postprocess = { type = "detect", min_score = 0.25 }
[[pipelines]]
name = "labelled"
model = "{models}/vibration_f32.onnx"
source = { type = "synthetic", signal = "vibration", rate_hz = 1000 }
  [[pipelines.outputs]]
  type = "mqtt"
  topic = "edgeinfer/{device}/labelled/{label}"
"#;

/// (config topic, state topic, the result field the template must select).
type Expected = (&'static str, &'static str, fn(&Value) -> String);

const EXPECTED: [Expected; 6] = [
    ("homeassistant/sensor/edgeinfer_ha1/vib_class/config", "edgeinfer/ha1/vib/result", |v| {
        v["result"]["classes"][0]["label"].as_str().unwrap().to_string()
    }),
    ("homeassistant/sensor/edgeinfer_ha1/vib_score/config", "edgeinfer/ha1/vib/result", |v| {
        v["result"]["classes"][0]["score"].to_string()
    }),
    ("homeassistant/sensor/edgeinfer_ha1/vib_anom_score/config", "edgeinfer/ha1/vib_anom/result", |v| {
        v["result"]["anomaly"]["score"].to_string()
    }),
    ("homeassistant/binary_sensor/edgeinfer_ha1/vib_anom_anomalous/config", "edgeinfer/ha1/vib_anom/result", |v| {
        if v["result"]["anomaly"]["anomalous"].as_bool().unwrap() { "ON" } else { "OFF" }.into()
    }),
    ("homeassistant/sensor/edgeinfer_ha1/vib_raw_value/config", "edgeinfer/ha1/raw/vibration_f32", |v| {
        v["result"]["values"][0].to_string()
    }),
    ("homeassistant/sensor/edgeinfer_ha1/faces_detections/config", "edgeinfer/ha1/faces/result", |v| {
        v["result"]["detections"].as_array().unwrap().len().to_string()
    }),
];

fn topics(msgs: &[Msg]) -> BTreeSet<String> {
    msgs.iter().map(|m| m.topic.clone()).collect()
}

/// Waits until every topic of `want` was announced in a message received from index `since`
/// on; returns the announcements since then. (Counting messages is not enough: an announcement
/// racing a reconnection may come twice, interleaved.)
fn announced_since(sub: &mut Subscriber, since: usize, want: &BTreeSet<String>) -> Vec<Msg> {
    let deadline = Instant::now() + LONG;
    loop {
        let got: Vec<Msg> = sub.seen[since.min(sub.seen.len())..].iter().filter(|m| announced(m)).cloned().collect();
        let Some(left) = deadline.checked_duration_since(Instant::now()) else { return got };
        if topics(&got).is_superset(want) {
            return got;
        }
        let n = sub.seen.iter().filter(|m| announced(m)).count() + 1;
        sub.collect(n, left, announced);
    }
}

#[test]
fn discovery_configs_are_retained_read_real_results_and_are_reannounced() {
    let broker = Mosquitto::start();
    let mut live = Subscriber::connect(broker.port, "#");
    let daemon = Daemon::start(&config(broker.port, &format!("{VIB}{ANOMALY}{OTHERS}")));
    let want: BTreeSet<String> = EXPECTED.iter().map(|e| e.0.to_string()).collect();
    let first = announced_since(&mut live, 0, &want);
    assert_eq!(topics(&first), want, "stderr: {}", daemon.stderr());
    let stderr = daemon.stderr();
    assert!(stderr.contains("`labelled`") && stderr.contains("cannot be a state topic"), "stderr: {stderr}");

    // A subscriber arriving later gets them from the broker: they are retained.
    let mut late = Subscriber::connect(broker.port, "homeassistant/#");
    let retained: Vec<Msg> = announced_since(&mut late, 0, &want).into_iter().filter(|m| m.retain).collect();
    assert_eq!(topics(&retained), want, "discovery configs must be retained");

    let labels: Vec<String> =
        std::fs::read_to_string(crate::model("vibration.labels.txt")).unwrap().lines().map(str::to_string).collect();
    for (topic, state_topic, field) in EXPECTED {
        let c = retained.iter().find(|m| m.topic == topic).unwrap().json();
        let object_id = topic.split('/').nth(3).unwrap();
        assert_eq!(c["unique_id"], format!("edgeinfer_ha1_{object_id}"), "{topic}");
        assert_eq!(c["default_entity_id"], format!("{}.edgeinfer_ha1_{object_id}", topic.split('/').nth(1).unwrap()));
        assert_eq!(c["device"]["identifiers"], serde_json::json!(["edgeinfer_ha1"]), "{topic}");
        assert_eq!(c["device"]["name"], "Test board");
        assert_eq!(c["device"]["model"], "edgeinfer");
        assert_eq!(c["device"]["sw_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(c["availability_topic"], "edgeinfer/ha1/status");
        assert_eq!(
            (c["payload_available"].as_str(), c["payload_not_available"].as_str()),
            (Some("online"), Some("offline"))
        );
        assert_eq!(c["state_topic"], state_topic, "{topic}");
        if let Some(attrs) = c.get("json_attributes_topic") {
            assert_eq!(attrs, state_topic);
            assert!(c["json_attributes_template"].as_str().unwrap().contains("value_json.result."));
        }

        let result =
            live.wait_for(LONG, |m| m.topic == state_topic).unwrap_or_else(|| panic!("no result on {state_topic}"));
        let result = result.json();
        let state = render(c["value_template"].as_str().unwrap(), &result);
        assert_eq!(state, field(&result), "{topic}: template {} on {result}", c["value_template"]);
        if topic.ends_with("vib_class/config") {
            assert!(labels.contains(&state), "{state} is not a vibration label");
        }
        if topic.contains("binary_sensor") {
            assert!(state == c["payload_on"] || state == c["payload_off"], "{state} is neither on nor off");
        }
        if topic.ends_with("faces_detections/config") {
            assert!(state.parse::<usize>().unwrap() > 0, "the photo has faces");
        }
    }
    assert!(live.wait_for(LONG, |m| m.topic == "edgeinfer/ha1/status" && m.payload == "online").is_some());

    // Home Assistant restarted: its birth message makes every config come again.
    live.collect(usize::MAX, Duration::from_secs(1), announced);
    let before = live.seen.len();
    live.publish("homeassistant/status", b"online".to_vec());
    let after = announced_since(&mut live, before, &want);
    assert_eq!(topics(&after), want, "stderr: {}", daemon.stderr());
    assert!(after.len() >= want.len());

    // The broker restarts (and forgets everything: no persistence): edgeinfer reconnects and announces again.
    let port = broker.port;
    drop(broker);
    let _broker = Mosquitto::start_on(port);
    let mut fresh = Subscriber::connect(port, "homeassistant/#");
    let again = announced_since(&mut fresh, 0, &want);
    assert_eq!(topics(&again), want, "stderr: {}", daemon.stderr());
}

/// Publishes a retained message and waits for the broker's acknowledgement.
fn publish_retained(port: u16, topic: &str, payload: &[u8]) {
    let mut opts = rumqttc::MqttOptions::new(format!("test-pub-{}", fastrand::u64(..)), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = rumqttc::Client::new(opts, 10);
    client.publish(topic, rumqttc::QoS::AtLeastOnce, true, payload.to_vec()).unwrap();
    for event in connection.iter() {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = event {
            return;
        }
        event.unwrap();
    }
}

#[test]
fn a_removed_pipeline_has_its_configs_cleared_on_the_next_start() {
    let broker = Mosquitto::start();
    // Another device's config: same prefix, other node id. It must survive.
    let foreign = "homeassistant/sensor/edgeinfer_other/vib_anom_score/config";
    publish_retained(broker.port, foreign, br#"{"name": "other"}"#);
    let mut sub = Subscriber::connect(broker.port, "homeassistant/#");
    let gone = [
        "homeassistant/sensor/edgeinfer_ha1/vib_anom_score/config",
        "homeassistant/binary_sensor/edgeinfer_ha1/vib_anom_anomalous/config",
    ];
    let kept =
        ["homeassistant/sensor/edgeinfer_ha1/vib_class/config", "homeassistant/sensor/edgeinfer_ha1/vib_score/config"];

    let mut first = Daemon::start(&config(broker.port, &format!("{VIB}{ANOMALY}")));
    let ours: BTreeSet<String> = gone.iter().chain(&kept).map(|t| t.to_string()).collect();
    let got = topics(&announced_since(&mut sub, 0, &ours));
    assert_eq!(got, ours.iter().chain([&foreign.to_string()]).cloned().collect(), "stderr: {}", first.stderr());
    first.signal("TERM");
    assert_eq!(first.wait(LONG), Some(0), "stderr: {}", first.stderr());
    let seen_before = sub.seen.len();

    let second = Daemon::start(&config(broker.port, VIB));
    for topic in gone {
        let cleared = sub.wait_for(LONG, |m| m.topic == topic && m.bytes.is_empty());
        assert!(cleared.is_some(), "{topic} not cleared; stderr: {}", second.stderr());
    }
    assert!(second.stderr().contains("clearing"), "stderr: {}", second.stderr());

    // What the broker keeps now: the remaining pipeline's configs and the other device's, nothing of the removed one.
    let mut check = Subscriber::connect(broker.port, "homeassistant/#");
    let want: BTreeSet<String> = kept.iter().chain([&foreign]).map(|t| t.to_string()).collect();
    let retained: Vec<Msg> = check.collect(want.len(), LONG, |m| announced(m) && m.retain);
    assert_eq!(topics(&retained), want);
    // Anything else retained would have come in the same burst as these.
    let extra = check.collect(usize::MAX, Duration::from_secs(1), |m| m.retain && !want.contains(&m.topic));
    assert!(extra.is_empty(), "unexpected retained configs: {:?}", topics(&extra));
    assert!(
        sub.seen[seen_before..]
            .iter()
            .all(|m| !(m.bytes.is_empty() && (kept.contains(&m.topic.as_str()) || m.topic == foreign))),
        "a config still in use was cleared"
    );
}
