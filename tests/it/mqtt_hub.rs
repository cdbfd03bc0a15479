//! The shared MQTT connection (the library's hub) against real brokers: the
//! embedded one and mosquitto, observed by real subscribers. Results arrive in
//! order with the documented payload; the status topic says `online` while
//! connected and keeps a retained `offline` afterwards (shutdown or Last
//! Will); with no broker, callers are never blocked, reconnection backs off,
//! and the bounded buffer is delivered once a broker appears.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use edgeinfer::message::{Latency, ResultBody, ResultMsg};
use edgeinfer::metrics::MqttMetrics;
use edgeinfer::sink::mqtt::{self, Body, MqttHandle, MqttSettings, MqttTask, OutMessage};

use crate::support::{free_port, Mosquitto, Subscriber};

const PATIENCE: Duration = Duration::from_secs(20);

fn runtime() -> tokio::runtime::Runtime {
    // Shown only for a failing test; rumqttd's tracing spans would drown the rest.
    let mut logger = env_logger::builder();
    logger.is_test(true);
    #[cfg(feature = "broker")]
    for target in edgeinfer::broker::LOG_TARGETS {
        logger.filter_module(target, log::LevelFilter::Off);
    }
    let _ = logger.try_init();
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

fn settings(port: u16, name: &str, buffer: usize, reconnect_max_ms: u64) -> MqttSettings {
    MqttSettings {
        host: "127.0.0.1".into(),
        port,
        client_id: format!("hub-{name}"),
        keep_alive: Duration::from_secs(5),
        username: None,
        password: None,
        buffer,
        reconnect_min: Duration::from_millis(200),
        reconnect_max: Duration::from_millis(reconnect_max_ms),
        status_topic: format!("test/{name}/status"),
        tls: None,
        disk_queue: None,
        protocol: mqtt::Protocol::V311,
        message_expiry: None,
        user_properties: Vec::new(),
    }
}

/// Starts the hub on `rt`.
fn start_hub(rt: &tokio::runtime::Runtime, settings: MqttSettings) -> (MqttHandle, MqttTask, Arc<MqttMetrics>) {
    let metrics = Arc::new(MqttMetrics::default());
    let _inside = rt.enter();
    let (hub, task) = mqtt::start(settings, metrics.clone());
    (hub, task, metrics)
}

#[cfg(feature = "broker")]
fn start_embedded_broker(port: u16) {
    edgeinfer::broker::start(std::net::SocketAddr::from(([127, 0, 0, 1], port)), None).expect("embedded broker starts");
}

fn result(seq: u64) -> OutMessage {
    let msg = ResultMsg {
        device: "testdev".into(),
        pipeline: "p".into(),
        model: "m".into(),
        model_sha256: "00".into(),
        seq,
        captured: SystemTime::now(),
        origin: None,
        latency: Latency::default(),
        result: ResultBody { values: Some(vec![seq as f32]), ..Default::default() },
    };
    OutMessage {
        topic: String::new(),
        body: Body::Result(Arc::new(msg), None),
        qos: 1,
        retain: false,
        meta: Default::default(),
    }
}

fn result_on(topic: &str, seq: u64) -> OutMessage {
    OutMessage { topic: topic.into(), ..result(seq) }
}

fn wait_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Enqueues from a plain thread, as inference workers do; panics if that blocks.
fn enqueue_from_thread(hub: &MqttHandle, msgs: Vec<OutMessage>) -> Vec<bool> {
    let hub = hub.clone();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let accepted: Vec<bool> = msgs.into_iter().map(|m| hub.enqueue(m)).collect();
        let _ = tx.send(accepted);
    });
    rx.recv_timeout(PATIENCE).expect("enqueue returned (it must never block)")
}

/// Checks the payloads are results with these sequence numbers, in order.
fn assert_results(payloads: &[serde_json::Value], seqs: impl IntoIterator<Item = u64>) {
    let got: Vec<u64> = payloads.iter().map(|v| v["seq"].as_u64().expect("seq")).collect();
    let want: Vec<u64> = seqs.into_iter().collect();
    assert_eq!(got, want, "results out of order or missing");
    for v in payloads {
        assert_eq!(v["schema"], edgeinfer::payload::RESULT_SCHEMA);
        assert_eq!(v["device"], "testdev");
        assert_eq!(v["model"]["name"], "m");
        assert!(v["published_ms"].as_u64() >= v["captured_ms"].as_u64(), "{v}");
        assert_eq!(v["result"]["values"][0].as_f64(), v["seq"].as_f64());
    }
}

/// A subscription of the hub itself, collected into a channel.
fn hub_subscription(hub: &MqttHandle, filter: &str) -> Receiver<(String, Vec<u8>)> {
    let (tx, rx) = channel();
    let tx = std::sync::Mutex::new(tx);
    hub.subscribe(
        filter,
        1,
        Arc::new(move |m: &mqtt::Incoming| {
            if let Ok(tx) = tx.lock() {
                let _ = tx.send((m.topic.clone(), m.payload.to_vec()));
            }
        }),
    );
    rx
}

fn json(payload: &[u8]) -> serde_json::Value {
    serde_json::from_slice(payload).expect("JSON payload")
}

/// The retained status as a new subscriber sees it.
fn retained_status(port: u16, topic: &str) -> (String, bool) {
    let mut late = Subscriber::connect(port, topic);
    let m = late.wait_for(PATIENCE, |m| m.topic == topic).expect("a retained status");
    (m.payload, m.retain)
}

/// Publishes results in order, checks the status before and after shutdown.
fn publish_in_order_with_status(port: u16, name: &str) {
    let rt = runtime();
    let status = format!("test/{name}/status");
    let results = format!("test/{name}/results");
    let mut sub = Subscriber::connect(port, &format!("test/{name}/#"));
    let (hub, task, metrics) = start_hub(&rt, settings(port, name, 1000, 2000));

    assert!(sub.wait_for(PATIENCE, |m| m.topic == status && m.payload == "online").is_some(), "online status");
    assert_eq!(retained_status(port, &status), ("online".to_string(), true));
    assert!(metrics.connected.load(Relaxed));

    let n = 50;
    let accepted = enqueue_from_thread(&hub, (0..n).map(|seq| result_on(&results, seq)).collect());
    assert!(accepted.iter().all(|a| *a));
    let got = sub.collect(n as usize, PATIENCE, |m| m.topic == results);
    let payloads: Vec<serde_json::Value> = got.iter().map(|m| m.json()).collect();
    assert_results(&payloads, 0..n);
    assert!(wait_until(PATIENCE, || metrics.published.load(Relaxed) == n), "published = {:?}", metrics.published);

    // Raw bytes go out as they are; QoS 0 is delivered too.
    let raw = OutMessage::raw(format!("test/{name}/raw"), b"{\"x\":1}".to_vec(), 0, false, "application/json");
    assert!(hub.enqueue(raw));
    let m = sub.wait_for(PATIENCE, |m| m.topic.ends_with("/raw")).expect("raw message");
    assert_eq!(m.payload, "{\"x\":1}");

    rt.block_on(task.shutdown(Duration::from_secs(2)));
    assert!(sub.wait_for(PATIENCE, |m| m.topic == status && m.payload == "offline").is_some(), "offline status");
    assert_eq!(retained_status(port, &status), ("offline".to_string(), true));
    assert!(!metrics.connected.load(Relaxed));
    assert!(!hub.enqueue(result_on(&results, 99)), "enqueue after shutdown must refuse");
    assert_eq!(metrics.dropped.load(Relaxed), 1);
    assert_eq!(metrics.connection_attempts.load(Relaxed), 1);
    assert_eq!(metrics.reconnects.load(Relaxed), 0);
}

#[test]
#[cfg(feature = "broker")]
fn results_arrive_in_order_and_status_goes_online_then_offline_on_the_embedded_broker() {
    let port = free_port();
    start_embedded_broker(port);
    publish_in_order_with_status(port, "embedded");
}

#[test]
fn results_arrive_in_order_and_status_goes_online_then_offline_on_mosquitto() {
    let broker = Mosquitto::start();
    publish_in_order_with_status(broker.port, "mosquitto");
}

#[test]
#[cfg(feature = "broker")]
fn without_a_broker_enqueue_never_blocks_backoff_is_slow_and_the_buffer_is_delivered_later() {
    let port = free_port();
    let rt = runtime();
    let buffer = 5;
    // Steps 200, 400, 800, 1600, 1600 ms, each jittered to 50-100 %: at most 6 attempts in 3 s.
    let (hub, task, metrics) = start_hub(&rt, settings(port, "late", buffer, 1600));
    let echoed = hub_subscription(&hub, "test/late/results");

    let queued = 8u64;
    let accepted = enqueue_from_thread(&hub, (0..queued).map(|seq| result_on("test/late/results", seq)).collect());
    assert!(accepted.iter().all(|a| *a));
    std::thread::sleep(Duration::from_secs(3));
    let attempts = metrics.connection_attempts.load(Relaxed);
    assert!((2..=6).contains(&attempts), "{attempts} connection attempts in 3 s");
    assert_eq!(metrics.dropped.load(Relaxed), queued - buffer as u64, "oldest dropped beyond the buffer");
    assert_eq!(metrics.queue_depth.load(Relaxed), buffer as u64);
    assert_eq!(metrics.queue_capacity.load(Relaxed), buffer as u64);
    assert!(!metrics.connected.load(Relaxed));
    assert_eq!(metrics.published.load(Relaxed), 0);

    // A broker appears: the newest `buffer` results arrive, in order, through it.
    start_embedded_broker(port);
    let mut payloads = Vec::new();
    while payloads.len() < buffer {
        let (topic, payload) = echoed.recv_timeout(PATIENCE).expect("buffered results delivered");
        assert_eq!(topic, "test/late/results");
        payloads.push(json(&payload));
    }
    assert_results(&payloads, queued - buffer as u64..queued);
    assert!(wait_until(PATIENCE, || metrics.published.load(Relaxed) == buffer as u64));
    assert!(metrics.connected.load(Relaxed));
    assert_eq!(metrics.reconnects.load(Relaxed), 0, "the first connection is not a reconnect");
    assert!(metrics.received.load(Relaxed) >= buffer as u64);
    assert_eq!(metrics.queue_depth.load(Relaxed), 0);
    assert_eq!(retained_status(port, "test/late/status"), ("online".to_string(), true));
    rt.block_on(task.shutdown(Duration::from_secs(1)));
}

#[test]
#[cfg(feature = "broker")]
fn a_hub_that_dies_without_disconnecting_leaves_its_last_will() {
    let port = free_port();
    start_embedded_broker(port);
    let rt = runtime();
    let (_hub, _task, metrics) = start_hub(&rt, settings(port, "will", 10, 1000));
    assert!(wait_until(PATIENCE, || metrics.connected.load(Relaxed)));
    assert_eq!(retained_status(port, "test/will/status"), ("online".to_string(), true));
    // The process "crashes": its tasks and socket vanish without a DISCONNECT.
    rt.shutdown_background();
    let mut sub = Subscriber::connect(port, "test/will/status");
    let will = sub.wait_for(PATIENCE, |m| m.payload == "offline");
    assert!(will.is_some(), "Last Will published; saw {:?}", sub.seen);
    assert_eq!(retained_status(port, "test/will/status"), ("offline".to_string(), true));
}

#[test]
fn the_buffer_survives_a_broker_restart() {
    let port = free_port();
    let broker = Mosquitto::start_on(port);
    let rt = runtime();
    let (hub, task, metrics) = start_hub(&rt, settings(port, "restart", 100, 1000));
    let echoed = hub_subscription(&hub, "test/restart/results");
    assert!(wait_until(PATIENCE, || metrics.connected.load(Relaxed)));
    assert!(hub.enqueue(result_on("test/restart/results", 0)));
    let (_, first) = echoed.recv_timeout(PATIENCE).expect("first result");
    assert_eq!(json(&first)["seq"], 0);
    // Acknowledged, so it is not sent again after the restart (at least once: it could be).
    assert!(wait_until(PATIENCE, || metrics.published.load(Relaxed) == 1));

    drop(broker);
    assert!(wait_until(PATIENCE, || !metrics.connected.load(Relaxed)), "connection loss noticed");
    let accepted = enqueue_from_thread(&hub, (1..=10).map(|seq| result_on("test/restart/results", seq)).collect());
    assert!(accepted.iter().all(|a| *a));

    let _broker = Mosquitto::start_on(port);
    let mut payloads = Vec::new();
    while payloads.len() < 10 {
        let (_, payload) = echoed.recv_timeout(PATIENCE).expect("results after the restart");
        payloads.push(json(&payload));
    }
    assert_results(&payloads, 1..=10);
    assert!(wait_until(PATIENCE, || metrics.reconnects.load(Relaxed) == 1));
    assert_eq!(metrics.dropped.load(Relaxed), 0);
    rt.block_on(task.shutdown(Duration::from_secs(1)));
}

#[test]
fn shutdown_without_a_broker_returns_soon_after_its_deadline() {
    let rt = runtime();
    let (hub, task, metrics) = start_hub(&rt, settings(free_port(), "gone", 10, 1000));
    assert!(hub.enqueue(result_on("test/gone/results", 0)));
    let started = Instant::now();
    rt.block_on(task.shutdown(Duration::from_millis(500)));
    // Generous: the contract is deadline + about 2 s.
    assert!(started.elapsed() < Duration::from_secs(10), "shutdown took {:?}", started.elapsed());
    assert_eq!(metrics.dropped.load(Relaxed), 1, "the unsent message is counted");
}

#[test]
#[cfg(feature = "broker")]
fn the_mqtt_source_parses_payloads_arriving_through_the_broker() {
    use edgeinfer::config::{PayloadFormat, SourceConfig};
    use edgeinfer::message::{Input, InputQueue, Overflow};
    use edgeinfer::metrics::PipelineMetrics;
    use edgeinfer::source::{SourceCtx, SourceEnd};
    use std::sync::atomic::AtomicBool;

    let port = free_port();
    start_embedded_broker(port);
    let rt = runtime();
    let (hub, task, metrics) = start_hub(&rt, settings(port, "source", 10, 1000));
    // Retained, so the source gets them whenever its subscription lands.
    for (topic, payload) in [("a", &b"[1, 2.5]"[..]), ("b", br#"{"z": 3, "a": 4}"#), ("c", b"[1, \"x\"]")] {
        let raw = OutMessage::raw(format!("test/src/{topic}/in"), payload.to_vec(), 1, true, "application/json");
        assert!(hub.enqueue(raw));
    }
    assert!(wait_until(PATIENCE, || metrics.published.load(Relaxed) == 3));

    let pipeline = Arc::new(PipelineMetrics::new("src", "m", 0.0));
    let ctx = SourceCtx {
        pipeline: "src".into(),
        queue: InputQueue::new(16, Overflow::DropOldest),
        metrics: pipeline.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        base_dir: std::env::temp_dir(),
    };
    let cfg = SourceConfig::Mqtt { topic: "test/src/+/in".into(), format: PayloadFormat::Json, qos: 1 };
    let source = {
        let (ctx, hub) = (ctx.clone(), hub.clone());
        std::thread::spawn(move || edgeinfer::source::mqtt::run(&cfg, &ctx, &hub))
    };
    assert!(wait_until(PATIENCE, || ctx.queue.len() == 2 && pipeline.errors.load(Relaxed) == 1));
    let mut inputs: Vec<(String, Vec<f32>, Option<Vec<String>>)> = (0..2)
        .map(|_| match ctx.queue.pop() {
            Some(Input::Values(v)) => (v.origin.unwrap_or_default(), v.values, v.names),
            other => panic!("expected values, got {other:?}"),
        })
        .collect();
    inputs.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(inputs[0], ("test/src/a/in".into(), vec![1.0, 2.5], None));
    assert_eq!(inputs[1], ("test/src/b/in".into(), vec![3.0, 4.0], Some(vec!["z".into(), "a".into()])));
    assert_eq!(pipeline.inputs.load(Relaxed), 2);

    ctx.stop.store(true, Relaxed);
    let end = source.join().expect("source thread");
    assert_eq!(end.expect("source ends cleanly"), SourceEnd::Stopped);
    assert!(metrics.received.load(Relaxed) >= 3);
    rt.block_on(task.shutdown(Duration::from_secs(1)));
}

/// mosquitto with a password file, killed on drop.
struct AuthMosquitto {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for AuthMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto_with_password(port: u16, user: &str, password: &str) -> AuthMosquitto {
    let dir = tempfile::tempdir().expect("temp dir");
    let passwords = dir.path().join("passwords");
    let made = std::process::Command::new("mosquitto_passwd")
        .arg("-c")
        .arg("-b")
        .arg(&passwords)
        .args([user, password])
        .status()
        .expect("mosquitto_passwd runs");
    assert!(made.success());
    let conf = dir.path().join("mosquitto.conf");
    let text = format!(
        "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\n",
        passwords.display()
    );
    std::fs::write(&conf, text).expect("write config");
    let child = std::process::Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto runs");
    assert!(crate::support::wait_port(port, PATIENCE), "mosquitto listens on {port}");
    AuthMosquitto { child, _dir: dir }
}

#[test]
fn username_and_password_are_sent_and_a_refusal_is_retried_with_backoff() {
    let port = free_port();
    let _broker = mosquitto_with_password(port, "edge", "s3cret");
    let rt = runtime();

    let mut wrong = settings(port, "auth-wrong", 10, 1000);
    wrong.username = Some("edge".into());
    wrong.password = Some("nope".into());
    let (_, wrong_task, wrong_metrics) = start_hub(&rt, wrong);

    let mut right = settings(port, "auth-right", 10, 1000);
    right.username = Some("edge".into());
    right.password = Some("s3cret".into());
    let (hub, task, metrics) = start_hub(&rt, right);
    assert!(wait_until(PATIENCE, || metrics.connected.load(Relaxed)), "connects with the right password");
    assert!(hub.enqueue(result_on("test/auth/results", 1)));
    assert!(wait_until(PATIENCE, || metrics.published.load(Relaxed) == 1));

    assert!(wait_until(PATIENCE, || wrong_metrics.connection_attempts.load(Relaxed) >= 3), "refusals are retried");
    assert!(!wrong_metrics.connected.load(Relaxed));
    rt.block_on(async {
        tokio::join!(task.shutdown(Duration::from_secs(1)), wrong_task.shutdown(Duration::from_millis(200)));
    });
}

/// QoS 1 and 2 results through the disk queue: each record leaves the queue once the broker
/// acknowledged it (PUBACK, or PUBCOMP after PUBREC), whichever packet ids the client reuses in
/// between; with MQTT 5 the broker's Receive Maximum caps the window.
fn mixed_qos_through_the_disk_queue(protocol: mqtt::Protocol, name: &str) {
    use edgeinfer::sink::disk_queue::{DiskQueue, FsyncPolicy, QueueOptions};
    let broker = Mosquitto::start();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let opts = QueueOptions { max_bytes: 16 << 20, max_age: Duration::from_secs(3600), fsync: FsyncPolicy::Never };
    let disk = Arc::new(DiskQueue::open(dir.path(), opts).unwrap());
    let topic = format!("test/{name}/results");
    let mut sub = Subscriber::connect(broker.port, &topic);
    let mut s = settings(broker.port, name, 1000, 1000);
    s.disk_queue = Some(disk.clone());
    s.protocol = protocol;
    let (hub, task, metrics) = start_hub(&rt, s);
    let n = 400u64;
    let msgs = (0..n).map(|seq| OutMessage { qos: 1 + (seq % 2) as u8, ..result_on(&topic, seq) }).collect();
    assert!(enqueue_from_thread(&hub, msgs).iter().all(|a| *a));
    let distinct = |sub: &Subscriber| {
        let mut seqs: Vec<u64> =
            sub.seen.iter().filter(|m| m.topic == topic).map(|m| m.json()["seq"].as_u64().unwrap()).collect();
        seqs.sort_unstable();
        seqs.dedup();
        seqs
    };
    sub.collect(n as usize, PATIENCE, |m| m.topic == topic);
    // Duplicates would have ended the collection early: wait for the rest.
    let deadline = Instant::now() + PATIENCE;
    while distinct(&sub).len() < n as usize && Instant::now() < deadline {
        let have = sub.seen.len();
        sub.collect(have + 10, Duration::from_millis(500), |_| true);
    }
    let received = sub.seen.iter().filter(|m| m.topic == topic).count();
    assert_eq!(distinct(&sub), (0..n).collect::<Vec<_>>(), "every result delivered ({received} received)");
    assert!(wait_until(PATIENCE, || disk.pending() == 0), "{} records never acknowledged", disk.pending());
    assert!(wait_until(PATIENCE, || metrics.published.load(Relaxed) == n), "published {:?}", metrics.published);
    assert_eq!(metrics.dropped.load(Relaxed), 0);
    rt.block_on(task.shutdown(Duration::from_secs(2)));
}

#[test]
fn mixed_qos_results_through_the_disk_queue_are_all_acknowledged_mqtt311() {
    mixed_qos_through_the_disk_queue(mqtt::Protocol::V311, "mixed311");
}

#[test]
fn mixed_qos_results_through_the_disk_queue_are_all_acknowledged_mqtt5() {
    mixed_qos_through_the_disk_queue(mqtt::Protocol::V5, "mixed5");
}

/// `mosquitto_sub` for one message within 5 s: (exit ok, what it printed).
#[cfg(feature = "broker")]
fn sub_one(port: u16, topic: &str, login: Option<(&str, &str)>) -> (bool, String) {
    sub_one_with(port, topic, login, &[])
}

/// `sub_one` with more `mosquitto_sub` arguments (`--cafile ca.pem` for TLS).
#[cfg(feature = "broker")]
pub(crate) fn sub_one_with(port: u16, topic: &str, login: Option<(&str, &str)>, args: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new("mosquitto_sub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-C", "1", "-W", "5", "-v"]);
    cmd.args(args);
    if let Some((user, password)) = login {
        cmd.args(["-u", user, "-P", password]);
    }
    let out = cmd.output().expect("mosquitto_sub runs (.ci/test installs mosquitto-clients)");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
}

#[cfg(feature = "broker")]
#[test]
fn the_embedded_broker_with_a_password_refuses_anonymous_and_wrong_logins() {
    let port = crate::support::free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broker.pw"), "open sesame\n").unwrap();
    let daemon = crate::support::Daemon::start(&format!(
        r#"
device = "locked"
[broker]
listen = "127.0.0.1:{port}"
username = "edge"
password_file = "{pw}"
[health]
interval_s = 1
[[pipelines]]
name = "digits"
model = "{{models}}/digits_cnn_int8.onnx"
source = {{ type = "files", path = "{{models}}/samples/digits/digit_4_1.png", rate_hz = 5, loop = true }}
"#,
        pw = dir.path().join("broker.pw").display()
    ));
    assert!(crate::support::wait_port(port, Duration::from_secs(60)), "stderr: {}", daemon.stderr());
    // The daemon itself logs in with the broker's login: its results arrive.
    let (ok, got) = sub_one(port, "edgeinfer/locked/digits/result", Some(("edge", "open sesame")));
    assert!(ok && got.starts_with("edgeinfer/locked/digits/result "), "{got}\nstderr: {}", daemon.stderr());
    let (ok, got) = sub_one(port, "edgeinfer/#", None);
    assert!(!ok && got.is_empty(), "anonymous: {got}");
    let (ok, got) = sub_one(port, "edgeinfer/#", Some(("edge", "wrong")));
    assert!(!ok && got.is_empty(), "wrong password: {got}");
    // Health says the broker asks for a login.
    let (ok, got) = sub_one(port, "edgeinfer/locked/health", Some(("edge", "open sesame")));
    assert!(ok, "{got}");
    let health: serde_json::Value = serde_json::from_str(got.split_once(' ').unwrap().1).unwrap();
    let b = &health["mqtt"]["embedded_broker"];
    assert_eq!(b["authentication"], true, "{health}");
    assert_eq!(b["open_to_the_network"], false);
    assert_eq!(b["listen"], format!("127.0.0.1:{port}"));
}

/// The 8 MiB packet limit, both ways, against mosquitto (which allows more): a result
/// over it is dropped and counted and the connection stays up; a message over it from
/// someone else never reaches a handler, and later messages still do.
#[test]
fn messages_over_the_packet_limit_are_dropped_both_ways_and_the_rest_flows() {
    use std::sync::Mutex;
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "test/limit/out/#");
    let rt = runtime();
    let (hub, task, metrics) = start_hub(&rt, settings(broker.port, "limit", 10, 1000));
    let got: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let seen = got.clone();
    hub.subscribe(
        "test/limit/in/#",
        0,
        Arc::new(move |m| seen.lock().unwrap().push((m.topic.clone(), m.payload.len()))),
    );
    assert!(wait_until(PATIENCE, || metrics.connected.load(Relaxed)));

    let big = vec![7u8; mqtt::MAX_PACKET_BYTES];
    let bytes = "application/octet-stream";
    assert!(hub.enqueue(OutMessage::raw("test/limit/out/big".into(), big.clone(), 1, false, bytes)));
    assert!(hub.enqueue(OutMessage::raw("test/limit/out/small".into(), b"ok".to_vec(), 1, false, bytes)));
    let small = sub.wait_for(PATIENCE, |m| m.topic == "test/limit/out/small");
    assert!(small.is_some(), "the message after the oversized one was not delivered");
    assert!(!sub.seen.iter().any(|m| m.topic == "test/limit/out/big"));
    assert_eq!(metrics.dropped.load(Relaxed), 1, "the oversized result is counted in mqtt.dropped");
    assert_eq!(metrics.reconnects.load(Relaxed), 0, "an oversized result must not cost the connection");

    // Incoming: 9 MiB from another client (QoS 0: a QoS 1 copy would come back on every reconnect).
    let mut opts = rumqttc::MqttOptions::new("limit-pub", "127.0.0.1", broker.port);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut conn) = rumqttc::Client::new(opts, 16);
    std::thread::spawn(move || for _ in conn.iter() {});
    client.publish("test/limit/in/big", rumqttc::QoS::AtMostOnce, false, vec![1u8; 9 << 20]).unwrap();
    // Small messages until one arrives: the hub may be reconnecting after refusing the big one.
    let deadline = Instant::now() + PATIENCE;
    while !got.lock().unwrap().iter().any(|(t, _)| t == "test/limit/in/small") {
        assert!(Instant::now() < deadline, "no message arrived after the oversized one");
        client.publish("test/limit/in/small", rumqttc::QoS::AtMostOnce, false, b"1".to_vec()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        got.lock().unwrap().iter().all(|(_, len)| *len <= mqtt::MAX_PACKET_BYTES),
        "an oversized message was handled"
    );
    // The 9 MiB message did reach the client, which refused it and connected again.
    assert!(metrics.reconnects.load(Relaxed) >= 1, "the oversized message never reached the hub");
    println!(
        "packet limit: outgoing dropped {}, reconnects after the incoming 9 MiB message {}, last error {:?}",
        metrics.dropped.load(Relaxed),
        metrics.reconnects.load(Relaxed),
        metrics.last_error.lock().unwrap()
    );
    rt.block_on(task.shutdown(Duration::from_secs(1)));
}
