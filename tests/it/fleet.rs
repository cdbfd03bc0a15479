//! Fleet: several daemons (devices `fleet-0..3`, five pipelines each) publish
//! QoS 1 results to one real mosquitto, three consumers share the load with a
//! `$share/workers/...` subscription (persistent sessions), and the broker is
//! restarted once in the middle. Every (device, pipeline, seq) must be consumed
//! at least once across the group; duplicates are counted. Run with
//! `--nocapture` for the figures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{free_port, Daemon, Gate, Mosquitto, Subscriber};

const DEVICES: usize = 4;
const PIPELINES: usize = 5;
/// Samples per second per pipeline: one result per 128 samples, 10 results/s.
const RATE_HZ: u32 = 1280;
/// Results per pipeline (the source stops after `RESULTS * 128` samples, about 12 s).
const RESULTS: u64 = 120;
const SHARED: &str = "$share/workers/edgeinfer/+/+/result";

/// (device, pipeline, seq) of one consumed result.
type Key = (String, String, u64);

/// A daemon config for `device`: five synthetic vibration pipelines with QoS 1
/// MQTT outputs, queued on disk in `queue_dir` so a broker restart loses nothing.
fn config(device: &str, port: u16, queue_dir: &Path) -> String {
    let mut text = format!(
        r#"
device = "{device}"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
keep_alive_s = 5
reconnect_min_ms = 100
reconnect_max_ms = 1000
queue_dir = "{dir}"
[health]
interval_s = 2
[shutdown]
drain_timeout_ms = 15000
"#,
        dir = queue_dir.display()
    );
    for p in 0..PIPELINES {
        text.push_str(&format!(
            r#"
[[pipelines]]
name = "p{p}"
model = "{{models}}/vibration_int8.onnx"
source = {{ type = "synthetic", signal = "vibration", rate_hz = {RATE_HZ}, count = {count}, seed = {p} }}
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1
"#,
            count = RESULTS * 128
        ));
    }
    text
}

/// One member of the shared subscription: a persistent session (fixed id,
/// clean_session false). mosquitto 2.0.11 keeps the session over a restart
/// (CONNACK session present = 1) but not its `$share` subscription, so the
/// consumer subscribes again on every CONNACK; results published before the
/// first consumer is back have no subscriber and are discarded by the broker.
struct Consumer {
    got: Arc<Mutex<Vec<Key>>>,
    subacks: Arc<AtomicUsize>,
    _client: rumqttc::Client,
}

impl Consumer {
    fn connect(port: u16, id: &str) -> Consumer {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_session(false);
        let (client, mut connection) = rumqttc::Client::new(opts, 256);
        let got = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = channel();
        let sink = got.clone();
        let subacks = Arc::new(AtomicUsize::new(0));
        let acks = subacks.clone();
        let subscriber = client.clone();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if subscriber.try_subscribe(SHARED, rumqttc::QoS::AtLeastOnce).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        acks.fetch_add(1, Ordering::SeqCst);
                        let _ = ready_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let v: serde_json::Value = match serde_json::from_slice(&p.payload) {
                            Ok(v) => v,
                            Err(e) => panic!("{}: not JSON ({e})", p.topic),
                        };
                        let key = (
                            v["device"].as_str().unwrap_or_default().to_string(),
                            v["pipeline"].as_str().unwrap_or_default().to_string(),
                            v["seq"].as_u64().unwrap_or(0),
                        );
                        sink.lock().unwrap().push(key);
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("shared subscription acknowledged");
        Consumer { got, subacks, _client: client }
    }

    fn received(&self) -> Vec<Key> {
        self.got.lock().unwrap().clone()
    }
}

fn total(consumers: &[Consumer]) -> usize {
    consumers.iter().map(|c| c.got.lock().unwrap().len()).sum()
}

#[test]
fn a_fleet_shares_results_across_consumers_through_a_broker_restart() {
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let broker_dir = state.path().join("mosquitto");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let broker = Mosquitto::start_persistent(port, &broker_dir);
    let consumers: Vec<Consumer> = (0..3).map(|i| Consumer::connect(port, &format!("fleet-worker-{i}"))).collect();
    // Devices reach the broker through a gate: after the broker restart it opens
    // only once every consumer has subscribed again (see the note on `Consumer`).
    let gate = Gate::start(port, true);
    let mut daemons: Vec<Daemon> = (0..DEVICES)
        .map(|d| Daemon::start(&config(&format!("fleet-{d}"), gate.port, &state.path().join(format!("queue-{d}")))))
        .collect();

    // Restart the broker in the middle (about 40 % of the results consumed).
    let middle = (RESULTS as usize) * DEVICES * PIPELINES * 2 / 5;
    let start = Instant::now();
    while total(&consumers) < middle && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(total(&consumers) >= middle, "results did not flow; stderr: {}", daemons[0].stderr());
    let before_stop = total(&consumers);
    let subacks: Vec<usize> = consumers.iter().map(|c| c.subacks.load(Ordering::SeqCst)).collect();
    gate.set_open(false);
    broker.stop();
    std::thread::sleep(Duration::from_secs(3));
    let _broker = Mosquitto::start_persistent(port, &broker_dir);
    let start = Instant::now();
    let resubscribed = |cs: &[Consumer]| cs.iter().zip(&subacks).all(|(c, &n)| c.subacks.load(Ordering::SeqCst) > n);
    while !resubscribed(&consumers) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(resubscribed(&consumers), "consumers did not subscribe again after the restart");
    gate.set_open(true);

    // Each daemon exits 0 once its sources are done and its queue is drained.
    for d in &mut daemons {
        assert_eq!(d.wait(Duration::from_secs(40)), Some(0), "stderr: {}", d.stderr());
    }
    // What was sent: the final (retained) health of each device.
    let mut health = Subscriber::connect(port, "edgeinfer/+/health");
    let mut sent: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut reconnects = Vec::new();
    for d in 0..DEVICES {
        let topic = format!("edgeinfer/fleet-{d}/health");
        let h = health.wait_for(Duration::from_secs(10), |m| m.topic == topic).map(|m| m.json());
        let h = h.unwrap_or_else(|| panic!("no retained health for fleet-{d}"));
        reconnects.push(h["mqtt"]["reconnects"].as_u64().unwrap_or(0));
        for p in 0..PIPELINES {
            let n = h["pipelines"][format!("p{p}")]["inferences"].as_u64().unwrap_or(0);
            sent.insert((format!("fleet-{d}"), format!("p{p}")), n);
        }
    }
    let expected: usize = sent.values().map(|&n| n as usize).sum();

    // Wait for the group to catch up, then a little more for late duplicates.
    let start = Instant::now();
    let distinct = |cs: &[Consumer]| cs.iter().flat_map(|c| c.received()).collect::<BTreeSet<Key>>().len();
    while distinct(&consumers) < expected && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));

    let per_consumer: Vec<usize> = consumers.iter().map(|c| c.received().len()).collect();
    let all: Vec<Key> = consumers.iter().flat_map(|c| c.received()).collect();
    let unique: BTreeSet<Key> = all.iter().cloned().collect();
    let duplicates = all.len() - unique.len();
    let mut lost = Vec::new();
    for ((device, pipeline), &n) in &sent {
        for seq in 1..=n {
            if !unique.contains(&(device.clone(), pipeline.clone(), seq)) {
                lost.push(format!("{device}/{pipeline}/{seq}"));
            }
        }
    }
    let unexpected =
        unique.iter().filter(|(d, p, s)| sent.get(&(d.clone(), p.clone())).is_none_or(|&n| *s > n)).count();
    println!(
        "fleet ({DEVICES} devices x {PIPELINES} pipelines, {} results/s in all, QoS 1, broker restarted once after \
         {before_stop} consumed): sent {expected}, received {} ({} distinct), duplicates {duplicates}, lost {}, \
         per consumer {per_consumer:?}, device reconnects {reconnects:?}",
        DEVICES * PIPELINES * (RATE_HZ as usize / 128),
        all.len(),
        unique.len(),
        lost.len()
    );
    assert_eq!(sent.len(), DEVICES * PIPELINES);
    assert!(sent.values().all(|&n| n >= RESULTS / 2), "some pipelines produced too little: {sent:?}");
    assert!(lost.is_empty(), "lost {}: {:?}", lost.len(), &lost[..lost.len().min(20)]);
    assert_eq!(unexpected, 0, "results no pipeline reported sending");
    assert!(per_consumer.iter().all(|&n| n > 0), "a consumer got no share: {per_consumer:?}");
    assert!(reconnects.iter().all(|&r| r >= 1), "every device reconnects after the restart: {reconnects:?}");
}
