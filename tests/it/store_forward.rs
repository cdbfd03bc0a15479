//! Store and forward with real faults: the daemon with `mqtt.queue_dir`
//! against a real mosquitto that is stopped and restarted, the daemon killed
//! with SIGKILL, a corrupt queue tail, and a full queue. Each test prints its
//! figures (sent, received, duplicates, lost); run with `--nocapture`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::{free_port, Daemon, Gate, Mosquitto, Subscriber};

const LONG: Duration = Duration::from_secs(20);

/// A daemon config: a synthetic vibration source at `rate_hz` (one result per
/// 128 samples) with a QoS 1 MQTT output queued on disk in `queue_dir`.
fn config(device: &str, pipeline: &str, port: u16, queue_dir: &Path, rate_hz: u32, extra_mqtt: &str) -> String {
    format!(
        r#"
device = "{device}"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
keep_alive_s = 5
reconnect_min_ms = 100
reconnect_max_ms = 500
queue_dir = "{dir}"
{extra_mqtt}
[health]
interval_s = 1
[[pipelines]]
name = "{pipeline}"
model = "{{models}}/vibration_int8.onnx"
source = {{ type = "synthetic", signal = "vibration", rate_hz = {rate_hz} }}
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1
"#,
        dir = queue_dir.display()
    )
}

/// The `seq` of every result received on `topic`, in arrival order.
fn seqs(sub: &Subscriber, topic: &str) -> Vec<u64> {
    sub.seen.iter().filter(|m| m.topic == topic).filter_map(|m| m.json()["seq"].as_u64()).collect()
}

/// Drains what arrived so far (a wait that matches nothing).
fn drain(sub: &mut Subscriber, d: Duration) {
    sub.wait_for(d, |_| false);
}

/// Figures of a delivery: (distinct, duplicates, lost in [first, last], first occurrences in order).
fn figures(got: &[u64]) -> (usize, usize, Vec<u64>, bool) {
    let distinct: BTreeSet<u64> = got.iter().copied().collect();
    let dups = got.len() - distinct.len();
    let lost = match (distinct.first(), distinct.last()) {
        (Some(&a), Some(&b)) => (a..=b).filter(|s| !distinct.contains(s)).collect(),
        _ => Vec::new(),
    };
    let mut seen = BTreeSet::new();
    let firsts: Vec<u64> = got.iter().copied().filter(|s| seen.insert(*s)).collect();
    let ordered = firsts.windows(2).all(|w| w[0] < w[1]);
    (distinct.len(), dups, lost, ordered)
}

/// The records stored in a queue directory and not yet acknowledged (segment
/// format: `len u32 | crc u32 | body`, ack file: `id u64 | crc u32`), as
/// (topic, payload JSON), read independently of the daemon's code.
fn stored(dir: &Path) -> Vec<(String, serde_json::Value)> {
    let acked = std::fs::read(dir.join("ack"))
        .ok()
        .filter(|b| b.len() == 12)
        .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()))
        .unwrap_or(0);
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut segs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    let mut out = Vec::new();
    for seg in segs {
        let data = std::fs::read(&seg).unwrap();
        let mut pos = 0;
        while pos + 8 <= data.len() {
            let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
            if pos + 8 + len > data.len() {
                break;
            }
            let body = &data[pos + 8..pos + 8 + len];
            pos += 8 + len;
            if u64::from_le_bytes(body[..8].try_into().unwrap()) <= acked {
                continue;
            }
            let topic_len = u16::from_le_bytes([body[18], body[19]]) as usize;
            let topic = String::from_utf8(body[20..20 + topic_len].to_vec()).unwrap();
            let payload = serde_json::from_slice(&body[20 + topic_len..]).unwrap();
            out.push((topic, payload));
        }
    }
    out
}

fn segment_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The latest health message's `mqtt.disk_queue` section.
fn disk_health(sub: &mut Subscriber, device: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let topic = format!("edgeinfer/{device}/health");
    let found = sub.wait_for(LONG, |m| m.topic == topic && pred(&m.json()["mqtt"]["disk_queue"]));
    found.map(|m| m.json()["mqtt"]["disk_queue"].clone()).unwrap_or(serde_json::Value::Null)
}

#[test]
fn broker_restarts_under_load_lose_nothing() {
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let queue = state.path().join("queue");
    let broker_dir = state.path().join("mosquitto");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let mut broker = Mosquitto::start_persistent(port, &broker_dir);
    let mut sub = Subscriber::connect_persistent(port, "edgeinfer/sf1/#", "sf1-sub");
    // 3200 Hz / 128 samples: 25 results/s.
    let mut daemon = Daemon::start(&config("sf1", "vib", port, &queue, 3200, ""));
    let topic = "edgeinfer/sf1/vib/result";
    assert!(sub.wait_for(LONG, |m| m.topic == topic).is_some(), "stderr: {}", daemon.stderr());
    for _ in 0..2 {
        drain(&mut sub, Duration::from_secs(2));
        broker.stop();
        std::thread::sleep(Duration::from_secs(3));
        broker = Mosquitto::start_persistent(port, &broker_dir);
    }
    drain(&mut sub, Duration::from_secs(2));
    daemon.signal("TERM");
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
    drain(&mut sub, Duration::from_secs(2));
    let got = seqs(&sub, topic);
    let (distinct, dups, lost, ordered) = figures(&got);
    let sent = got.iter().max().copied().unwrap_or(0);
    println!(
        "store-forward broker restart x2 (25 results/s, QoS 1): sent {sent}, received {} ({distinct} distinct), \
         duplicates {dups}, lost {}, in order {ordered}",
        got.len(),
        lost.len()
    );
    assert!(distinct > 100, "too few results to mean anything: {distinct}");
    assert!(lost.is_empty(), "lost seqs {lost:?}; stderr: {}", daemon.stderr());
    assert_eq!(got.iter().min(), Some(&1), "the first result (seq 1) was lost");
    assert!(ordered, "first arrivals out of order: {got:?}");
    assert!(daemon.stderr().contains("reconnected"), "stderr: {}", daemon.stderr());
}

#[test]
fn results_queued_on_disk_survive_sigkill() {
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let queue = state.path().join("queue");
    let broker_dir = state.path().join("mosquitto");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let broker = Mosquitto::start_persistent(port, &broker_dir);
    let mut sub = Subscriber::connect_persistent(port, "edgeinfer/sf2/#", "sf2-sub");
    let mut daemon = Daemon::start(&config("sf2", "vib", port, &queue, 3200, ""));
    let topic = "edgeinfer/sf2/vib/result";
    assert!(sub.wait_for(LONG, |m| m.topic == topic).is_some(), "stderr: {}", daemon.stderr());
    drain(&mut sub, Duration::from_secs(1));
    broker.stop();
    std::thread::sleep(Duration::from_secs(3));
    daemon.signal("KILL");
    daemon.wait(LONG);
    let queued: Vec<u64> = stored(&queue).iter().filter_map(|(_, v)| v["seq"].as_u64()).collect();
    assert!(queued.len() > 20, "results queued while the broker was down: {}", queued.len());

    let _broker = Mosquitto::start_persistent(port, &broker_dir);
    // Another pipeline name: the replayed results keep the first run's topic.
    let daemon2 = Daemon::start(&config("sf2", "vib2", port, &queue, 3200, ""));
    let last = *queued.iter().max().unwrap();
    let arrived = sub.wait_for(LONG, |m| m.topic == topic && m.json()["seq"].as_u64() == Some(last));
    drain(&mut sub, Duration::from_secs(1));
    let got = seqs(&sub, topic);
    let (distinct, dups, lost, ordered) = figures(&got);
    let missing: Vec<u64> = queued.iter().filter(|s| !got.contains(s)).copied().collect();
    println!(
        "store-forward SIGKILL with broker down: sent {} (unacknowledged on disk at kill {}), received {} ({distinct} distinct), \
         duplicates {dups}, lost {}, in order {ordered}",
        last,
        queued.len(),
        got.len(),
        lost.len() + missing.len()
    );
    assert!(arrived.is_some(), "last queued result {last} never arrived; stderr: {}", daemon2.stderr());
    assert!(missing.is_empty(), "queued results lost: {missing:?}");
    assert!(lost.is_empty(), "lost seqs {lost:?}");
    assert_eq!(got.iter().min(), Some(&1), "the first result (seq 1) was lost");
    assert!(ordered);
}

#[test]
fn a_corrupt_queue_tail_is_reported_and_the_rest_delivered() {
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let queue = state.path().join("queue");
    // No broker: everything stays queued.
    let mut daemon = Daemon::start(&config("sf3", "vib", port, &queue, 3200, ""));
    let start = Instant::now();
    while stored(&queue).len() < 20 && start.elapsed() < LONG {
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.signal("KILL");
    daemon.wait(LONG);
    let before = stored(&queue);
    assert!(before.len() >= 20, "stderr: {}", daemon.stderr());
    // A power cut mid-write: the last record loses its end.
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&queue).unwrap().map(|e| e.unwrap().path()).collect();
    segs.retain(|p| p.extension().is_some_and(|x| x == "seg"));
    segs.sort();
    let last_seg = segs.last().unwrap();
    let len = std::fs::metadata(last_seg).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(last_seg).unwrap().set_len(len - 5).unwrap();
    let intact: Vec<u64> = stored(&queue).iter().filter_map(|(_, v)| v["seq"].as_u64()).collect();
    assert_eq!(intact.len(), before.len() - 1);

    let _broker = Mosquitto::start_on(port);
    let mut sub = Subscriber::connect(port, "edgeinfer/sf3/#");
    let daemon2 = Daemon::start(&config("sf3", "vib2", port, &queue, 3200, ""));
    let topic = "edgeinfer/sf3/vib/result";
    let last = *intact.last().unwrap();
    let arrived = sub.wait_for(LONG, |m| m.topic == topic && m.json()["seq"].as_u64() == Some(last));
    let health = disk_health(&mut sub, "sf3", |d| d["corrupt_records_skipped"].as_u64().is_some());
    drain(&mut sub, Duration::from_secs(1));
    let got = seqs(&sub, topic);
    let (distinct, dups, lost, _) = figures(&got);
    let missing: Vec<u64> = intact.iter().filter(|s| !got.contains(s)).copied().collect();
    println!(
        "store-forward corrupt tail: stored {}, intact {}, received {} ({distinct} distinct), duplicates {dups}, \
         lost {}, corrupt_records_skipped {}",
        before.len(),
        intact.len(),
        got.len(),
        missing.len() + lost.len(),
        health["corrupt_records_skipped"]
    );
    assert!(arrived.is_some(), "stderr: {}", daemon2.stderr());
    assert!(missing.is_empty(), "intact records lost: {missing:?}");
    assert_eq!(health["corrupt_records_skipped"], 1, "health: {health}");
    assert!(daemon2.stderr().contains("skipped"), "stderr: {}", daemon2.stderr());
    assert!(!got.contains(&before.last().unwrap().1["seq"].as_u64().unwrap()), "the cut record was sent");
}

#[test]
fn a_full_queue_drops_the_oldest_counts_them_and_stays_within_its_bound() {
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let queue = state.path().join("queue");
    let max = 8192u64;
    let extra = format!("queue_max_bytes = {max}");
    // The subscriber is in place before the daemon gets through: a result the
    // broker took before anyone subscribed would be missing yet never dropped.
    let _broker = Mosquitto::start_on(port);
    let mut sub = Subscriber::connect(port, "edgeinfer/sf4/#");
    let gate = Gate::start(port, false);
    // 6400 Hz / 128: 50 results/s, far more than 8 KiB holds.
    let mut daemon = Daemon::start(&config("sf4", "vib", gate.port, &queue, 6400, &extra));
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < Duration::from_secs(4) {
        peak = peak.max(segment_bytes(&queue));
        std::thread::sleep(Duration::from_millis(20));
    }
    gate.set_open(true);
    let topic = "edgeinfer/sf4/vib/result";
    // Once connected again nothing more is dropped: the latest health then has the final count
    // (the health messages buffered while the broker was down say connected = false).
    let health_topic = "edgeinfer/sf4/health";
    let connected = |m: &crate::support::Msg| m.topic == health_topic && m.json()["mqtt"]["connected"] == true;
    assert!(sub.wait_for(LONG, connected).is_some(), "stderr: {}", daemon.stderr());
    drain(&mut sub, Duration::from_secs(2));
    let latest = sub.seen.iter().rev().find(|m| connected(m)).map(|m| m.json());
    let health = latest.map(|h| h["mqtt"]["disk_queue"].clone()).unwrap_or_default();
    daemon.signal("TERM");
    daemon.wait(LONG);
    let got = seqs(&sub, topic);
    let (distinct, dups, _, _) = figures(&got);
    let first = got.iter().min().copied().unwrap_or(0);
    let sent = got.iter().max().copied().unwrap_or(0);
    let dropped = health["dropped_full"].as_u64().unwrap_or(0);
    let lost = sent.saturating_sub(distinct as u64 + dropped);
    println!(
        "store-forward queue full ({max} bytes, broker unreachable 4 s, 50 results/s): sent {sent}, received {} \
         ({distinct} distinct), duplicates {dups}, dropped_full {dropped} (first seq received {first}), \
         lost uncounted {lost}, peak disk {peak} bytes",
        got.len(),
    );
    assert!(peak <= max, "queue files grew to {peak} bytes");
    assert!(health["dropped_full"].as_u64().unwrap_or(0) > 0, "health: {health}; stderr: {}", daemon.stderr());
    assert!(first > 1, "the oldest results should have been dropped");
    // Every result older than the first received was dropped and counted; one
    // dropped while already in flight may still arrive (counted and delivered).
    assert!(dropped >= first - 1, "{} oldest missing but only {dropped} counted", first - 1);
    assert_eq!(lost, 0, "results lost without being counted");
}
