//! The daemon end to end: the real binary, a real mosquitto (or the embedded
//! broker), a real subscriber. No absolute timings are asserted; waits are
//! generous upper bounds.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeinfer::tensor::Tensor;

use crate::support::{free_port, Daemon, Mosquitto, Msg, Subscriber};

const LONG: Duration = Duration::from_secs(30);

fn result_on(topic: &'static str) -> impl Fn(&Msg) -> bool {
    move |m: &Msg| m.topic == topic
}

#[test]
fn files_source_publishes_what_infer_gives_in_order() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "edgeinfer/t1/#");
    let mut daemon = Daemon::start(&format!(
        r#"
device = "t1"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
[health]
interval_s = 0
[[pipelines]]
name = "cam"
model = "{{models}}/digits_cnn_int8.onnx"
source = {{ type = "files", path = "{{models}}/samples/digits", rate_hz = 0 }}
postprocess = {{ type = "classify", top_k = 3 }}
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1
"#,
        port = broker.port
    ));
    let results = sub.collect(4, LONG, result_on("edgeinfer/t1/cam/result"));
    assert_eq!(results.len(), 4, "stderr: {}", daemon.stderr());
    // The replay finishes, so the daemon drains, says offline and exits 0.
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
    assert!(sub.wait_for(LONG, |m| m.topic == "edgeinfer/t1/status" && m.payload == "offline").is_some());

    let files: Vec<String> = {
        let mut f: Vec<_> = std::fs::read_dir(crate::model("samples/digits"))
            .unwrap()
            .map(|e| e.unwrap().path().to_str().unwrap().to_string())
            .collect();
        f.sort();
        f
    };
    let infer = crate::support::edgeinfer()
        .args(["infer", crate::model("digits_cnn_int8.onnx").to_str().unwrap(), "--top-k", "3"])
        .args(&files)
        .output()
        .unwrap();
    assert!(infer.status.success(), "{}", String::from_utf8_lossy(&infer.stderr));
    let expected: Vec<serde_json::Value> =
        String::from_utf8_lossy(&infer.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(expected.len(), 4);
    for (i, (msg, want)) in results.iter().zip(&expected).enumerate() {
        let v = msg.json();
        assert_eq!(v["schema"], "edgeinfer/result/v1");
        assert_eq!(v["device"], "t1");
        assert_eq!(v["pipeline"], "cam");
        assert_eq!(v["model"]["name"], "digits_cnn_int8");
        assert_eq!(v["model"]["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(v["seq"], (i + 1) as u64, "consecutive seq in order");
        assert_eq!(v["input"], files[i]);
        assert!(v["captured_ms"].as_u64().unwrap() <= v["published_ms"].as_u64().unwrap());
        assert!(v["captured_at"].as_str().unwrap().ends_with('Z'));
        for k in ["preprocess", "inference", "postprocess", "total"] {
            assert!(v["latency_ms"][k].as_f64().unwrap() >= 0.0, "latency {k}");
        }
        let got = v["result"]["classes"].as_array().unwrap();
        let want = want["top"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["label"], w["label"]);
            assert!((g["score"].as_f64().unwrap() - w["score"].as_f64().unwrap()).abs() < 1e-6, "{g} vs {w}");
        }
    }
}

#[test]
#[cfg(feature = "broker")]
fn embedded_broker_serves_results_with_no_broker_configured() {
    let port = free_port();
    let mut daemon = Daemon::start(&format!(
        r#"
device = "t2"
[broker]
listen = "127.0.0.1:{port}"
[[pipelines]]
name = "vib"
model = "{{models}}/vibration_int8.onnx"
source = {{ type = "synthetic", signal = "vibration", rate_hz = 1000 }}
  [[pipelines.outputs]]
  type = "mqtt"
  [[pipelines.outputs]]
  type = "stdout"
"#
    ));
    assert!(crate::support::wait_port(port, LONG), "embedded broker did not listen; stderr: {}", daemon.stderr());
    let mut sub = Subscriber::connect(port, "edgeinfer/t2/#");
    // Live (retain flag clear) if this subscription beat the daemon's connection, retained if not.
    let online = |m: &crate::support::Msg| m.topic == "edgeinfer/t2/status" && m.payload == "online";
    assert!(sub.wait_for(LONG, online).is_some(), "no online status; stderr: {}", daemon.stderr());
    // Either way the broker keeps it for whoever subscribes later.
    let mut late = Subscriber::connect(port, "edgeinfer/t2/status");
    assert!(late.wait_for(LONG, |m| online(m) && m.retain).is_some(), "online status not retained");
    let results = sub.collect(3, LONG, result_on("edgeinfer/t2/vib/result"));
    assert_eq!(results.len(), 3, "stderr: {}", daemon.stderr());
    let v = results[0].json();
    assert_eq!(v["result"]["classes"].as_array().unwrap().len(), 3);
    daemon.signal("TERM");
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
    // The stdout output printed the same kind of payload, one JSON line each.
    let stdout = daemon.stdout();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() >= 3, "{stdout}");
    assert!(lines.windows(2).all(|w| w[1]["seq"].as_u64() == w[0]["seq"].as_u64().map(|s| s + 1)));
}

/// A window file `[1, 3, 128]` as 128 samples of 3 channels, sample after sample.
fn window_as_samples(name: &str) -> Vec<f32> {
    let t = Tensor::read_npy(&crate::model(&format!("samples/vibration/{name}.npy"))).unwrap();
    let v = t.data.to_f64_vec();
    (0..128).flat_map(|s| (0..3).map(move |c| (c, s))).map(|(c, s)| v[c * 128 + s] as f32).collect()
}

#[test]
fn mqtt_source_scores_windows_from_a_publisher() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "edgeinfer/t3/#");
    let daemon = Daemon::start(&format!(
        r#"
device = "t3"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
[[pipelines]]
name = "gw"
model = "{{models}}/vibration_int8.onnx"
source = {{ type = "mqtt", topic = "sensors/+/accel", format = "json", qos = 1 }}
postprocess = {{ type = "classify", top_k = 1 }}
"#,
        port = broker.port
    ));
    assert!(sub.wait_for(LONG, |m| m.topic == "edgeinfer/t3/status" && m.payload == "online").is_some());
    // Give the daemon's subscription a moment after its CONNACK.
    std::thread::sleep(Duration::from_millis(500));
    let publisher = Subscriber::connect(broker.port, "unused/#");
    for name in ["imbalance_0", "bearing_fault_1", "normal_0"] {
        let payload = serde_json::to_vec(&window_as_samples(name)).unwrap();
        publisher.publish("sensors/node7/accel", payload);
    }
    let results = sub.collect(3, LONG, result_on("edgeinfer/t3/gw/result"));
    assert_eq!(results.len(), 3, "stderr: {}", daemon.stderr());
    let labels: Vec<String> =
        results.iter().map(|m| m.json()["result"]["classes"][0]["label"].as_str().unwrap().to_string()).collect();
    assert_eq!(labels, ["imbalance", "bearing_fault", "normal"]);
    assert_eq!(results[0].json()["input"], "sensors/node7/accel");
    // A malformed message is counted and skipped, never fatal.
    publisher.publish("sensors/node7/accel", b"[1, 2, oops".to_vec());
    publisher.publish("sensors/node7/accel", serde_json::to_vec(&window_as_samples("misalignment_0")).unwrap());
    let results = sub.collect(4, LONG, result_on("edgeinfer/t3/gw/result"));
    assert_eq!(results.len(), 4, "stderr: {}", daemon.stderr());
    assert_eq!(results[3].json()["result"]["classes"][0]["label"], "misalignment");
}

#[test]
fn event_outputs_publish_changes_and_crossings_only() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "edgeinfer/t4/#");
    let data = tempfile::tempdir().unwrap();
    let script = [
        "normal_0",
        "normal_1",
        "imbalance_0",
        "normal_0",
        "imbalance_0",
        "imbalance_1",
        "bearing_fault_0",
        "bearing_fault_1",
        "normal_1",
        "normal_0",
    ];
    for (i, name) in script.iter().enumerate() {
        std::fs::copy(
            crate::model(&format!("samples/vibration/{name}.npy")),
            data.path().join(format!("{i:02}_{name}.npy")),
        )
        .unwrap();
    }
    let mut daemon = Daemon::start(&format!(
        r#"
device = "t4"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
[[pipelines]]
name = "m"
model = "{{models}}/vibration_int8.onnx"
source = {{ type = "files", path = "{dir}", rate_hz = 0 }}
postprocess = {{ type = "classify", top_k = 4 }}
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1
  [[pipelines.outputs]]
  type = "mqtt"
  topic = "edgeinfer/{{device}}/{{pipeline}}/state"
  qos = 1
  when = "on_change"
  debounce = 2
  [[pipelines.outputs]]
  type = "mqtt"
  topic = "edgeinfer/{{device}}/{{pipeline}}/fault"
  qos = 1
  when = "threshold"
  class = "bearing_fault"
  threshold = 0.5
  hysteresis = 0.2
"#,
        port = broker.port,
        dir = data.path().display()
    ));
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
    let every = sub.collect(10, LONG, result_on("edgeinfer/t4/m/result"));
    assert_eq!(
        every.iter().map(|m| m.json()["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    let changes: Vec<(u64, serde_json::Value)> = sub
        .collect(4, LONG, result_on("edgeinfer/t4/m/state"))
        .iter()
        .map(|m| (m.json()["seq"].as_u64().unwrap(), m.json()["event"].clone()))
        .collect();
    assert_eq!(
        changes,
        vec![
            (2, serde_json::json!({"kind": "change", "from": null, "to": "normal"})),
            (6, serde_json::json!({"kind": "change", "from": "normal", "to": "imbalance"})),
            (8, serde_json::json!({"kind": "change", "from": "imbalance", "to": "bearing_fault"})),
            (10, serde_json::json!({"kind": "change", "from": "bearing_fault", "to": "normal"})),
        ]
    );
    let faults: Vec<(u64, String)> = sub
        .collect(2, LONG, result_on("edgeinfer/t4/m/fault"))
        .iter()
        .map(|m| (m.json()["seq"].as_u64().unwrap(), m.json()["event"]["kind"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(faults, vec![(7, "rise".to_string()), (9, "fall".to_string())]);
}

fn synthetic_config(device: &str, port: u16, extra_mqtt: &str) -> String {
    format!(
        r#"
device = "{device}"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
keep_alive_s = 5
{extra_mqtt}
[health]
interval_s = 1
[[pipelines]]
name = "vib"
model = "{{models}}/vibration_int8.onnx"
source = {{ type = "synthetic", signal = "vibration", rate_hz = 1000 }}
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1
"#
    )
}

#[test]
fn last_will_on_kill_and_clean_offline_on_sigterm() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "edgeinfer/t5/status");
    let mut daemon = Daemon::start(&synthetic_config("t5", broker.port, ""));
    assert!(sub.wait_for(LONG, |m| m.payload == "online").is_some(), "stderr: {}", daemon.stderr());
    daemon.signal("KILL");
    daemon.wait(LONG);
    sub.seen.clear();
    assert!(sub.wait_for(LONG, |m| m.payload == "offline").is_some(), "Last Will not delivered");

    sub.seen.clear();
    let mut daemon = Daemon::start(&synthetic_config("t5", broker.port, ""));
    assert!(sub.wait_for(LONG, |m| m.payload == "online").is_some());
    sub.seen.clear();
    daemon.signal("TERM");
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
    assert!(sub.wait_for(LONG, |m| m.payload == "offline").is_some());
    // A fresh subscriber sees the retained status.
    let mut late = Subscriber::connect(broker.port, "edgeinfer/t5/status");
    assert!(late.wait_for(LONG, |m| m.payload == "offline" && m.retain).is_some());
}

/// Forwards TCP connections from `listen` to mosquitto once started, so the
/// "broker" appears at a moment the test chooses while the subscriber is
/// already connected to the real broker behind it. Counts connections.
struct LateBroker {
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl LateBroker {
    fn open(listen: u16, target: u16) -> LateBroker {
        let listener = TcpListener::bind(("127.0.0.1", listen)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        client.set_nonblocking(false).ok();
                        if let Ok(server) = TcpStream::connect(("127.0.0.1", target)) {
                            pipe(client, server);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        LateBroker { accepted, stop }
    }
}

impl Drop for LateBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    std::thread::spawn(move || {
        let (mut r, mut w) = (a, b);
        let _ = std::io::copy(&mut r, &mut w);
        let _ = w.shutdown(std::net::Shutdown::Both);
    });
    std::thread::spawn(move || {
        let (mut r, mut w) = (b2, a2);
        let _ = std::io::copy(&mut r, &mut w);
        let _ = w.shutdown(std::net::Shutdown::Both);
    });
}

#[test]
fn absent_broker_results_are_buffered_and_delivered_without_a_tight_loop() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "edgeinfer/t6/#");
    let late_port = free_port();
    let daemon = Daemon::start(&synthetic_config(
        "t6",
        late_port,
        "reconnect_min_ms = 200\nreconnect_max_ms = 1000\nbuffer = 1000",
    ));
    let absent = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let late = LateBroker::open(late_port, broker.port);
    let online = sub.wait_for(LONG, |m| m.topic == "edgeinfer/t6/status" && m.payload == "online");
    assert!(online.is_some(), "never connected; stderr: {}", daemon.stderr());
    let absent_for = absent.elapsed();
    assert!(late.accepted.load(Ordering::Relaxed) >= 1);
    // Results made while the broker was absent arrive, in order, with no gap.
    let results = sub.collect(20, LONG, result_on("edgeinfer/t6/vib/result"));
    let seqs: Vec<u64> = results.iter().map(|m| m.json()["seq"].as_u64().unwrap()).collect();
    assert!(seqs.len() >= 20, "{seqs:?}");
    assert_eq!(seqs[0], 1, "the first result (made while disconnected) was delivered");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "gap in {seqs:?}");
    let captured_first = results[0].json()["captured_ms"].as_u64().unwrap();
    let published_first = results[0].json()["published_ms"].as_u64().unwrap();
    assert!(published_first >= captured_first + 1000, "the first result waited in the buffer");
    // Health reports the attempts: with backoff from 200 ms to 1 s (jittered down to half),
    // at most a few per second; a tight loop would make thousands.
    let health = sub.wait_for(LONG, |m| m.topic == "edgeinfer/t6/health").expect("health").json();
    let attempts = health["mqtt"]["connection_attempts"].as_u64().unwrap();
    let bound = 6 + absent_for.as_secs_f64().ceil() as u64 * 3;
    assert!(attempts >= 2 && attempts <= bound, "{attempts} connection attempts in {absent_for:?} (bound {bound})");
    eprintln!(
        "broker absent for {absent_for:?}: {attempts} connection attempts, first result delivered after {} ms",
        published_first - captured_first
    );
}

#[test]
fn bad_config_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let models = crate::root().join("models");
    for (text, key) in [
        ("device = \"d\"\nbogus = 1\n", "bogus"),
        (
            &format!("[[pipelines]]\nname = \"p\"\nmodel = \"{}/vibration_int8.onnx\"\nsource = {{ type = \"synthetic\", signal = \"sine\", rate_hz = -5 }}\n", models.display()) as &str,
            "pipelines[0].source.rate_hz",
        ),
        (
            &format!("[mqtt]\nurl = \"http://x\"\n[[pipelines]]\nname = \"p\"\nmodel = \"{}/vibration_int8.onnx\"\nsource = {{ type = \"lines\" }}\n", models.display()),
            "mqtt.url",
        ),
        ("[[pipelines]]\nname = \"p\"\nmodel = \"missing.onnx\"\nsource = { type = \"lines\" }\n", "pipelines[0].model"),
        (
            &format!("[[pipelines]]\nname = \"p\"\nmodel = \"{}/vibration_int8.onnx\"\nsource = {{ type = \"mqtt\", topic = \"a/#/b\", format = \"json\" }}\n", models.display()),
            "pipelines[0].source.topic",
        ),
        (
            // an on_change output can never fire without class scores: refused, naming the output
            &format!("[[pipelines]]\nname = \"p\"\nmodel = \"{}/vibration_int8.onnx\"\nsource = {{ type = \"lines\" }}\npostprocess = {{ type = \"values\" }}\n[[pipelines.outputs]]\ntype = \"stdout\"\nwhen = \"on_change\"\n", models.display()),
            "outputs[0]",
        ),
    ] {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        for cmd in ["check", "run"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeinfer")).args([cmd, path.to_str().unwrap()]).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
            assert!(err.contains(key), "{cmd}: `{key}` not named in: {err}");
        }
    }
}

#[test]
fn failing_source_is_retried_and_reported_in_health() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "edgeinfer/t7/#");
    let data = tempfile::tempdir().unwrap();
    let missing = data.path().join("later");
    let daemon = Daemon::start(&format!(
        r#"
device = "t7"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
[health]
interval_s = 1
[[pipelines]]
name = "cam"
model = "{{models}}/digits_cnn_f32.onnx"
source = {{ type = "files", path = "{dir}", rate_hz = 0, loop = true }}
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1
"#,
        port = broker.port,
        dir = missing.display()
    ));
    let failing = sub
        .wait_for(LONG, |m| {
            m.topic == "edgeinfer/t7/health" && m.json()["pipelines"]["cam"]["source"]["restarts"].as_u64() >= Some(1)
        })
        .expect("health reports the failing source");
    let error = failing.json()["pipelines"]["cam"]["source"]["last_error"].as_str().unwrap_or("").to_string();
    assert!(error.contains("later"), "last_error names the path: {error}");
    std::fs::create_dir(&missing).unwrap();
    std::fs::copy(crate::model("samples/digits/digit_4_1.png"), missing.join("a.png")).unwrap();
    let result =
        sub.wait_for(LONG, |m| m.topic == "edgeinfer/t7/cam/result").expect("results once the directory exists");
    assert_eq!(result.json()["result"]["classes"][0]["label"], "4", "stderr: {}", daemon.stderr());
}
