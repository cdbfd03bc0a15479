//! Remote commands end to end: the real daemon, a real mosquitto, a real client publishing
//! commands on `edgeinfer/<device>/cmd/<name>` and reading the replies.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use crate::support::{Daemon, Mosquitto, Msg, Subscriber};

const LONG: Duration = Duration::from_secs(30);

fn config(port: u16, device: &str, commands: &str) -> String {
    format!(
        r#"
device = "{device}"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
reconnect_min_ms = 100
reconnect_max_ms = 500
[health]
interval_s = 0
[commands]
enabled = true
{commands}
[[pipelines]]
name = "digits"
model = "{{models}}/digits_cnn_int8.onnx"
source = {{ type = "files", path = "{{models}}/samples/digits/digit_4_1.png", rate_hz = 20, loop = true }}
postprocess = {{ type = "classify", top_k = 3 }}
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1
  [[pipelines.outputs]]
  type = "mqtt"
  topic = "edgeinfer/{{device}}/digits/alert"
  when = "threshold"
  threshold = 0.5
"#
    )
}

/// A client that sends commands and waits for their replies.
struct Operator {
    sub: Subscriber,
    device: String,
    next_id: u64,
}

impl Operator {
    fn new(port: u16, device: &str) -> Operator {
        Operator { sub: Subscriber::connect(port, &format!("edgeinfer/{device}/#")), device: device.into(), next_id: 0 }
    }

    /// Publishes raw bytes to `cmd/<name>` and returns the reply whose `id` matches `id`.
    fn send_raw(&mut self, name: &str, payload: Vec<u8>, id: &Value) -> Value {
        let reply_topic = format!("edgeinfer/{}/cmd/{name}/reply", self.device);
        self.sub.publish(&format!("edgeinfer/{}/cmd/{name}", self.device), payload);
        let id = id.clone();
        let m = self
            .sub
            .wait_for(LONG, |m| m.topic == reply_topic && m.json()["id"] == id)
            .unwrap_or_else(|| panic!("no reply to `{name}` id {id}"));
        assert!(!m.retain, "replies are not retained");
        let v = m.json();
        assert_eq!(v["command"], name, "{v}");
        v
    }

    /// Sends `health` until one is answered: the daemon's subscription may reach the broker a
    /// moment after its first result.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + LONG;
        let topic = format!("edgeinfer/{}/cmd/health/reply", self.device);
        while Instant::now() < deadline {
            self.sub.publish(&format!("edgeinfer/{}/cmd/health", self.device), br#"{"id": "ready"}"#.to_vec());
            if self.sub.wait_for(Duration::from_secs(1), |m| m.topic == topic && m.json()["id"] == "ready").is_some() {
                return;
            }
        }
        panic!("the daemon never answered a command");
    }

    /// Sends `body` with a fresh `id`; returns the reply.
    fn send(&mut self, name: &str, mut body: Value) -> Value {
        self.next_id += 1;
        let id = json!(format!("req-{}", self.next_id));
        body["id"] = id.clone();
        self.send_raw(name, serde_json::to_vec(&body).unwrap(), &id)
    }

    fn results_since(&self, since: usize) -> Vec<Value> {
        let topic = format!("edgeinfer/{}/digits/result", self.device);
        self.sub.seen[since.min(self.sub.seen.len())..].iter().filter(|m| m.topic == topic).map(Msg::json).collect()
    }

    /// Waits for `n` results received after index `since` of `seen`.
    fn wait_results(&mut self, since: usize, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        while self.results_since(since).len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            let have = self.sub.seen.len();
            self.sub.collect(have + 1, left.min(Duration::from_millis(200)), |_| true);
        }
        self.results_since(since)
    }

    /// Lets messages arrive for `d`, collecting them.
    fn pump(&mut self, d: Duration) {
        let have = self.sub.seen.len();
        self.sub.collect(have + 1_000_000, d, |_| true);
    }
}

fn model_names(results: &[Value]) -> Vec<String> {
    results.iter().map(|r| r["model"]["name"].as_str().unwrap_or("").to_string()).collect()
}

#[test]
fn every_command_gets_a_reply_and_bad_ones_never_stop_the_daemon() {
    let broker = Mosquitto::start();
    let mut op = Operator::new(broker.port, "cmd1");
    let daemon = Daemon::start(&config(broker.port, "cmd1", ""));
    let first = op.wait_results(0, 3, LONG);
    assert!(first.len() >= 3, "no results; stderr: {}", daemon.stderr());
    assert!(model_names(&first).iter().all(|n| n == "digits_cnn_int8"));
    op.wait_ready();

    // pause: results stop, health says paused; resume: they come back.
    let r = op.send("pause", json!({"pipeline": "digits"}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["paused"], true);
    op.pump(Duration::from_millis(500)); // in flight before the pause took effect
    let mark = op.sub.seen.len();
    op.pump(Duration::from_millis(1500));
    assert_eq!(op.results_since(mark).len(), 0, "results while paused");
    let h = op.send("health", json!({}));
    assert_eq!(h["ok"], true, "{h}");
    assert_eq!(h["result"]["pipelines"]["digits"]["paused"], true, "{h}");
    // Image files are frames: while paused they are dropped as stale.
    assert!(h["result"]["pipelines"]["digits"]["dropped"]["stale_frames"].as_u64().unwrap() > 0, "{h}");
    assert!(
        op.sub
            .wait_for(LONG, |m| m.topic == "edgeinfer/cmd1/health" && m.json()["pipelines"]["digits"]["paused"] == true)
            .is_some(),
        "health was not published on the health topic"
    );
    let mark = op.sub.seen.len();
    let r = op.send("resume", json!({"pipeline": "digits"}));
    assert_eq!((r["ok"].clone(), r["result"]["paused"].clone()), (json!(true), json!(false)), "{r}");
    assert!(op.wait_results(mark, 2, LONG).len() >= 2, "no results after resume");

    // set_threshold: the alert output's filter starts again with the new threshold (a rise at 0.1).
    let r = op.send("set_threshold", json!({"pipeline": "digits", "output": 1, "threshold": 0.1}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["thresholds"], json!([null, 0.1]), "{r}");
    let r = op.send("set_threshold", json!({"pipeline": "digits", "output": 0, "threshold": 0.1}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("not a when = \"threshold\" output"), "{r}");
    let r = op.send("set_threshold", json!({"pipeline": "digits", "output": 7, "threshold": 0.1}));
    assert!(r["error"].as_str().unwrap().contains("no output 7"), "{r}");
    let is_alert = |m: &Msg| m.topic == "edgeinfer/cmd1/digits/alert";
    let rise = op
        .sub
        .wait_for(LONG, |m| is_alert(m) && (m.json()["event"]["threshold"].as_f64().unwrap_or(0.0) - 0.1).abs() < 1e-6);
    assert_eq!(rise.expect("an alert at threshold 0.1").json()["event"]["kind"], "rise");
    // Above any score, without `output`: every threshold output; no alert any more.
    let r = op.send("set_threshold", json!({"pipeline": "digits", "threshold": 2.0}));
    assert_eq!(r["result"]["thresholds"], json!([null, 2.0]), "{r}");
    op.pump(Duration::from_millis(300));
    let mark = op.sub.seen.len();
    op.pump(Duration::from_millis(1000));
    assert!(!op.sub.seen[mark..].iter().any(is_alert), "alerts above a threshold of 2.0");
    assert!(!op.results_since(mark).is_empty(), "results stopped");

    // Errors: each one names the problem, and the daemon keeps going.
    let r = op.send_raw("pause", b"{not json".to_vec(), &Value::Null);
    assert!(r["error"].as_str().unwrap().contains("malformed JSON"), "{r}");
    let r = op.send("reboot", json!({}));
    assert!(r["error"].as_str().unwrap().contains("unknown command `reboot`"), "{r}");
    let r = op.send("pause", json!({"pipeline": "nope"}));
    assert!(r["error"].as_str().unwrap().contains("unknown pipeline `nope`"), "{r}");
    let r = op.send("set_threshold", json!({"pipeline": "digits", "threshold": "high"}));
    assert!(r["error"].as_str().unwrap().contains("`threshold` must be a number"), "{r}");
    let r = op.send_raw("health", b"[1, 2]".to_vec(), &Value::Null);
    assert!(r["error"].as_str().unwrap().contains("JSON object"), "{r}");
    // Over the size limit: refused before parsing (so no `id` is echoed).
    let mut big = vec![b' '; edgeinfer::commands::MAX_COMMAND_BYTES];
    big.extend_from_slice(b"{}");
    let r = op.send_raw("resume", big, &Value::Null);
    assert!(r["error"].as_str().unwrap().contains("commands are at most 64 KiB"), "{r}");

    // A corrupt model: error reply, the old model keeps serving.
    let corrupt = crate::model("corrupt.onnx");
    let r = op.send("reload_model", json!({"pipeline": "digits", "model": corrupt}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("corrupt.onnx"), "{r}");
    let mark = op.sub.seen.len();
    let after = op.wait_results(mark, 3, LONG);
    assert!(after.len() >= 3, "results stopped after a failed reload; stderr: {}", daemon.stderr());
    assert!(model_names(&after).iter().all(|n| n == "digits_cnn_int8"), "{:?}", model_names(&after));

    // A model that loads but does not fit the pipeline (a 1-D sensor model for an image pipeline).
    let r = op.send("reload_model", json!({"pipeline": "digits", "model": crate::model("vibration_f32.onnx")}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("pipeline `digits`"), "{r}");

    // A good model: checked on its reference input, swapped in; results name it.
    let r = op.send("reload_model", json!({"pipeline": "digits", "model": crate::model("digits_cnn_f32.onnx")}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["model"], "digits_cnn_f32");
    assert!(r["result"]["checked_on"].as_str().unwrap().ends_with("ref/digits_cnn_f32/in0.npy"), "{r}");
    assert_eq!(r["result"]["swapped"], true, "{r}");
    let mark = op.sub.seen.len();
    let after = op.wait_results(mark, 3, LONG);
    assert!(after.len() >= 3, "no results after reload");
    assert!(model_names(&after).iter().all(|n| n == "digits_cnn_f32"), "{:?}", model_names(&after));
    // The same digit, the same answer from the float model.
    assert_eq!(after[0]["result"]["classes"][0]["label"], first[0]["result"]["classes"][0]["label"]);
    // Without `model`: the current file again.
    let r = op.send("reload_model", json!({"pipeline": "digits"}));
    assert_eq!((r["ok"].clone(), r["result"]["model"].clone()), (json!(true), json!("digits_cnn_f32")), "{r}");

    let h = op.send("health", json!({}));
    let c = &h["result"]["commands"];
    // Counts include the readiness probe and this health command (a probe sent before the
    // subscription was active never reached the daemon); failures: 2 set_threshold, malformed, unknown command,
    // unknown pipeline, wrong type, not an object, too large, corrupt model, unfit model.
    let probes = op.sub.seen.iter().filter(|m| m.topic.ends_with("/health/reply") && m.json()["id"] == "ready").count();
    assert_eq!(c["received"], 18 + probes as u64, "{h}");
    assert_eq!(c["failed"], 10, "{h}");
    assert_eq!(h["result"]["pipelines"]["digits"]["model"], "digits_cnn_f32", "{h}");
    assert_eq!(h["result"]["pipelines"]["digits"]["model_reloads"], 2, "{h}");
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

fn signed(secret: &[u8], mut body: Value) -> Vec<u8> {
    let obj = body.as_object().unwrap().clone();
    let mac = edgeinfer::commands::hmac_sha256(secret, edgeinfer::commands::canonical(&obj).as_bytes());
    body["hmac"] = json!(mac.iter().map(|b| format!("{b:02x}")).collect::<String>());
    serde_json::to_vec(&body).unwrap()
}

#[test]
fn signed_commands_need_a_valid_hmac_and_a_fresh_timestamp() {
    let broker = Mosquitto::start();
    let mut op = Operator::new(broker.port, "cmd2");
    let secret = b"correct horse battery staple";
    let daemon = Daemon::start_with_env(
        &config(broker.port, "cmd2", "hmac_secret_env = \"EDGEINFER_CMD_SECRET\"\nmax_skew_s = 60"),
        &[("EDGEINFER_CMD_SECRET", std::str::from_utf8(secret).unwrap())],
    );
    assert!(!op.wait_results(0, 1, LONG).is_empty(), "no results; stderr: {}", daemon.stderr());
    op.wait_ready();

    let r = op.send("health", json!({"ts": now_s()}));
    assert!(r["error"].as_str().unwrap().contains("`hmac` is missing"), "{r}");
    let r = op.send_raw("health", signed(b"wrong secret", json!({"id": "w", "ts": now_s()})), &json!("w"));
    assert!(r["error"].as_str().unwrap().contains("does not match"), "{r}");
    let stale = now_s() - 3600;
    let r = op.send_raw("health", signed(secret, json!({"id": "s", "ts": stale})), &json!("s"));
    assert!(r["error"].as_str().unwrap().contains("from the device clock"), "{r}");
    let good = signed(secret, json!({"id": "g", "pipeline": "digits", "ts": now_s()}));
    let r = op.send_raw("pause", good.clone(), &json!("g"));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["paused"], true, "{r}");
    // The same signed bytes again: a replay inside the window.
    op.sub.publish("edgeinfer/cmd2/cmd/pause", good);
    let replay = op
        .sub
        .wait_for(LONG, |m| m.topic == "edgeinfer/cmd2/cmd/pause/reply" && m.json()["ok"] == false)
        .expect("reply to the replay");
    assert!(replay.json()["error"].as_str().unwrap().contains("replayed"), "{}", replay.payload);
}

#[test]
fn set_threshold_without_an_output_changes_the_anomaly_threshold_and_a_reload_keeps_it() {
    let broker = Mosquitto::start();
    let mut op = Operator::new(broker.port, "cmd3");
    let daemon = Daemon::start(&format!(
        r#"
device = "cmd3"
[mqtt]
url = "mqtt://127.0.0.1:{}"
[health]
interval_s = 0
[commands]
enabled = true
[[pipelines]]
name = "vib"
model = "{{models}}/vibration_f32.onnx"
source = {{ type = "synthetic", signal = "vibration", rate_hz = 1000 }}
postprocess = {{ type = "anomaly", threshold = 0.5, score = "not_class", normal_class = "normal" }}
  # The topic `Operator` reads results from.
  [[pipelines.outputs]]
  type = "mqtt"
  topic = "edgeinfer/{{device}}/digits/result"
"#,
        broker.port
    ));
    assert!(!op.wait_results(0, 1, LONG).is_empty(), "no results; stderr: {}", daemon.stderr());
    op.wait_ready();
    let anomaly_after = |op: &mut Operator, threshold: f64| {
        let mark = op.sub.seen.len();
        let results = op.wait_results(mark, 20, LONG);
        let now: Vec<&Value> = results
            .iter()
            .map(|r| &r["result"]["anomaly"])
            .filter(|a| (a["threshold"].as_f64().unwrap() - threshold).abs() < 1e-6)
            .collect();
        assert!(!now.is_empty(), "no result with threshold {threshold}: {results:?}");
        now.iter().map(|a| a["anomalous"].as_bool().unwrap()).collect::<Vec<bool>>()
    };
    let r = op.send("set_threshold", json!({"pipeline": "vib", "threshold": 0.0}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["anomaly_threshold"], 0.0, "{r}");
    assert!(anomaly_after(&mut op, 0.0).iter().all(|&a| a), "every score is >= 0");
    let r = op.send("set_threshold", json!({"pipeline": "vib", "threshold": 1.5}));
    assert_eq!(r["result"]["anomaly_threshold"], 1.5, "{r}");
    assert!(anomaly_after(&mut op, 1.5).iter().all(|&a| !a), "no score is >= 1.5");
    // A reload (int8 model) keeps the threshold set by command.
    let r = op.send("reload_model", json!({"pipeline": "vib", "model": crate::model("vibration_int8.onnx")}));
    assert_eq!(r["ok"], true, "{r}");
    let mark = op.sub.seen.len();
    let after = op.wait_results(mark, 20, LONG);
    let last = after.last().expect("results after the reload");
    assert_eq!(last["model"]["name"], "vibration_int8");
    assert_eq!(last["result"]["anomaly"]["threshold"], 1.5, "{last}");
    // An output index on a pipeline without threshold outputs is refused.
    let r = op.send("set_threshold", json!({"pipeline": "vib", "output": 0, "threshold": 0.2}));
    assert_eq!(r["ok"], false, "{r}");
}

#[test]
fn a_retained_command_is_ignored_so_it_cannot_replay_on_every_reconnect() {
    let broker = Mosquitto::start();
    let mut op = Operator::new(broker.port, "cmd4");
    // Left retained on the broker before the daemon starts: it must not pause the pipeline.
    op.sub.publish_retained("edgeinfer/cmd4/cmd/pause", br#"{"id": "stale", "pipeline": "digits"}"#.to_vec());
    let daemon = Daemon::start(&config(broker.port, "cmd4", ""));
    op.wait_ready();
    let h = op.send("health", json!({}));
    assert_eq!(h["result"]["pipelines"]["digits"]["paused"], false, "{h}");
    assert!(op.sub.seen.iter().all(|m| m.topic != "edgeinfer/cmd4/cmd/pause/reply"), "no reply to a retained command");
    let mark = op.sub.seen.len();
    op.pump(Duration::from_millis(1000));
    assert!(!op.results_since(mark).is_empty(), "results keep coming; stderr: {}", daemon.stderr());
}

#[test]
fn reload_config_checks_the_file_then_restarts_in_place_and_sighup_does_the_same() {
    let broker = Mosquitto::start();
    let device = "reloadcfg";
    let mut op = Operator::new(broker.port, device);
    let mut daemon = Daemon::start(&config(broker.port, device, ""));
    assert!(op.wait_results(0, 2, LONG).len() >= 2, "no results; stderr: {}", daemon.stderr());
    op.wait_ready();
    let path = daemon.dir.path().join("edgeinfer.toml");
    let original = std::fs::read_to_string(&path).unwrap();

    // A broken file: an error reply naming the problem; the running config keeps serving.
    std::fs::write(&path, original.replace("digits_cnn_int8.onnx", "no_such_model.onnx")).unwrap();
    let r = op.send("reload_config", json!({}));
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("no_such_model.onnx") && e.contains("running config stays"), "{e}");
    let mark = op.sub.seen.len();
    assert!(op.wait_results(mark, 2, LONG).len() >= 2, "results stopped after a refused reload");
    assert!(daemon.child.try_wait().unwrap().is_none(), "the daemon exited");

    // A good file with a second pipeline: the reply says what changes, then the same process
    // runs the new config.
    let second = r#"
[[pipelines]]
name = "second"
model = "MODELS/digits_cnn_f32.onnx"
source = { type = "files", path = "MODELS/samples/digits/digit_4_1.png", rate_hz = 10, loop = true }
"#
    .replace("MODELS", crate::root().join("models").to_str().unwrap());
    std::fs::write(&path, format!("{original}\n{second}")).unwrap();
    let r = op.send("reload_config", json!({}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["added"], json!(["second"]), "{r}");
    assert_eq!(r["result"]["removed"], json!([]), "{r}");
    assert_eq!(r["result"]["changed"], json!([]), "{r}");
    assert_eq!(r["result"]["restarting"], true, "{r}");
    let second_topic = format!("edgeinfer/{device}/second/result");
    let m = op.sub.wait_for(LONG, |m| m.topic == second_topic);
    assert!(m.is_some(), "the new pipeline never published; stderr: {}", daemon.stderr());
    assert!(daemon.child.try_wait().unwrap().is_none(), "the daemon exited instead of restarting in place");
    assert!(daemon.stderr().contains("restarting in place"), "{}", daemon.stderr());

    // SIGHUP: the file without the second pipeline is checked and applied the same way.
    std::fs::write(&path, &original).unwrap();
    let starts = |d: &Daemon| d.stderr().matches("config reload: restarting in place").count();
    assert_eq!(starts(&daemon), 1);
    daemon.signal("HUP");
    let deadline = Instant::now() + LONG;
    while starts(&daemon) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(starts(&daemon), 2, "SIGHUP did not reload: {}", daemon.stderr());
    std::thread::sleep(Duration::from_secs(2));
    op.pump(Duration::from_secs(1));
    let mark = op.sub.seen.len();
    op.pump(Duration::from_secs(2));
    let after: Vec<&str> = op.sub.seen[mark..].iter().map(|m| m.topic.as_str()).collect();
    assert!(after.iter().any(|t| t.ends_with("/digits/result")), "{after:?}");
    assert!(!after.iter().any(|t| *t == second_topic), "the removed pipeline still publishes: {after:?}");
    // A broken file on SIGHUP: logged, nothing restarts.
    std::fs::write(&path, "this is [not toml").unwrap();
    daemon.signal("HUP");
    let deadline = Instant::now() + LONG;
    while !daemon.stderr().contains("SIGHUP: not reloading") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(daemon.stderr().contains("SIGHUP: not reloading"), "{}", daemon.stderr());
    assert_eq!(starts(&daemon), 2);
    daemon.signal("TERM");
    assert_eq!(daemon.wait(LONG), Some(0));
}

#[test]
fn reload_model_reads_only_signed_files_inside_the_models_directory() {
    let broker = Mosquitto::start();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("models");
    std::fs::create_dir(&dir).unwrap();
    // The PC side, as a user runs it: a key, and a signed model copied to the board.
    let (key, public) = crate::support::signing_key(root.path(), "signer.key");
    let good = dir.join("digits_v2.onnx");
    std::fs::copy(crate::model("digits_cnn_f32.onnx"), &good).unwrap();
    crate::support::sign(&good, &key);
    // Refused ones: unsigned; signed but altered since; a signature by a key the board
    // does not trust; outside the directory, through `..`, a symlink out, a device.
    std::fs::copy(crate::model("digits_cnn_f32.onnx"), dir.join("unsigned.onnx")).unwrap();
    let altered = dir.join("altered.onnx");
    std::fs::copy(crate::model("digits_cnn_f32.onnx"), &altered).unwrap();
    std::fs::copy(dir.join("digits_v2.onnx.sig"), dir.join("altered.onnx.sig")).unwrap();
    std::fs::OpenOptions::new().append(true).open(&altered).unwrap().write_all(b"\0").unwrap();
    let (other_key, _) = crate::support::signing_key(root.path(), "other.key");
    let stranger = dir.join("stranger.onnx");
    std::fs::copy(crate::model("digits_cnn_f32.onnx"), &stranger).unwrap();
    crate::support::sign(&stranger, &other_key);
    std::fs::copy(crate::model("digits_cnn_f32.onnx"), root.path().join("outside.onnx")).unwrap();
    std::os::unix::fs::symlink(root.path().join("outside.onnx"), dir.join("link.onnx")).unwrap();

    let mut op = Operator::new(broker.port, "cmd-store");
    let models = format!("[models]\ndir = \"{}\"\npublic_keys = [\"{public}\"]", dir.display());
    let daemon = Daemon::start(&config(broker.port, "cmd-store", &models));
    assert!(op.wait_results(0, 2, LONG).len() >= 2, "no results; stderr: {}", daemon.stderr());
    op.wait_ready();
    let mut refused = |model: Value, why: &str| {
        let r = op.send("reload_model", json!({"pipeline": "digits", "model": model}));
        assert_eq!(r["ok"], false, "{r}");
        assert!(r["error"].as_str().unwrap().contains(why), "want `{why}`: {r}");
    };
    refused(json!("/dev/zero"), "is outside the models directory");
    refused(json!(format!("{}/../outside.onnx", dir.display())), "`..` is not allowed");
    refused(json!(root.path().join("outside.onnx")), "is outside the models directory");
    refused(json!(dir.join("link.onnx")), "(it leads to ");
    refused(json!(dir.join("unsigned.onnx")), "models must be signed");
    refused(json!(altered), "the signature is for another file");
    refused(json!(stranger), "which is not in models.public_keys");
    // Still the old model, still serving.
    let mark = op.sub.seen.len();
    let after = op.wait_results(mark, 2, LONG);
    assert!(model_names(&after).iter().all(|n| n == "digits_cnn_int8"), "{:?}", model_names(&after));

    let r = op.send("reload_model", json!({"pipeline": "digits", "model": good}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["signed_by"], public.as_str(), "{r}");
    assert_eq!(r["result"]["model"], "digits_v2");
    let mark = op.sub.seen.len();
    let after = op.wait_results(mark, 2, LONG);
    assert!(model_names(&after).iter().all(|n| n == "digits_v2"), "{:?}", model_names(&after));
    // The configured model is trusted as the config is: back to it without a signature.
    let configured = crate::model("digits_cnn_int8.onnx");
    let r = op.send("reload_model", json!({"pipeline": "digits", "model": configured}));
    assert_eq!((r["ok"].clone(), r["result"]["signed_by"].clone()), (json!(true), Value::Null), "{r}");
}

#[test]
fn a_model_that_fails_on_real_inputs_is_rolled_back_after_the_swap() {
    let broker = Mosquitto::start();
    let mut op = Operator::new(broker.port, "cmd-rollback");
    let models = "[models]\nprobation_inferences = 5\nmax_error_rate = 0.2";
    let daemon = Daemon::start(&config(broker.port, "cmd-rollback", models));
    assert!(op.wait_results(0, 2, LONG).len() >= 2, "no results; stderr: {}", daemon.stderr());
    op.wait_ready();
    // Finite on the all-zero check input, NaN on every real digit photo.
    let r = op.send("reload_model", json!({"pipeline": "digits", "model": crate::model("unstable_digits.onnx")}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        (r["result"]["checked_on"].as_str(), r["result"]["probation_inferences"].as_u64()),
        (Some("zeros"), Some(5))
    );
    // Two failures of five are above 0.2: the old model is back, and health says why.
    let deadline = Instant::now() + LONG;
    let health = loop {
        let h = op.send("health", json!({}));
        if h["result"]["pipelines"]["digits"]["model_rollbacks"] == 1 || Instant::now() > deadline {
            break h;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let p = &health["result"]["pipelines"]["digits"];
    assert_eq!(p["model_rollbacks"], 1, "{health}\nstderr: {}", daemon.stderr());
    assert_eq!(p["model"], "digits_cnn_int8", "{p}");
    let update = &p["model_update"];
    assert_eq!((update["state"].as_str(), update["model"].as_str()), (Some("rolled_back"), Some("unstable_digits")));
    assert_eq!(update["previous"], "digits_cnn_int8");
    assert!(update["reason"].as_str().unwrap().starts_with("2 of its first 2 inferences failed"), "{update}");
    assert!(p["errors"].as_u64() >= Some(2), "the failed inferences count as errors: {p}");
    // No NaN reached subscribers; results come again from the old model.
    let mark = op.sub.seen.len();
    let after = op.wait_results(mark, 3, LONG);
    assert!(after.len() >= 3 && model_names(&after).iter().all(|n| n == "digits_cnn_int8"), "{after:?}");
    assert!(!op.results_since(0).iter().any(|r| r["model"]["name"] == "unstable_digits"), "a NaN result was published");
    assert!(daemon.stderr().contains("model unstable_digits rolled back to digits_cnn_int8"), "{}", daemon.stderr());
    // A good model passes its probation and stays.
    let r = op.send("reload_model", json!({"pipeline": "digits", "model": crate::model("digits_cnn_f32.onnx")}));
    assert_eq!(r["ok"], true, "{r}");
    let deadline = Instant::now() + LONG;
    loop {
        let h = op.send("health", json!({}));
        let u = &h["result"]["pipelines"]["digits"]["model_update"];
        if u["state"] == "accepted" {
            assert_eq!(
                (u["model"].as_str(), u["previous"].as_str()),
                (Some("digits_cnn_f32"), Some("digits_cnn_int8"))
            );
            break;
        }
        assert!(Instant::now() < deadline, "never accepted: {h}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_accepted_update_survives_a_restart_and_a_changed_file_falls_back_to_the_config() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let v2 = dir.path().join("digits_v2.onnx");
    std::fs::copy(crate::model("digits_cnn_f32.onnx"), &v2).unwrap();
    let models = format!("[models]\ndir = \"{}\"\nprobation_inferences = 3", dir.path().display());
    let text = config(broker.port, "cmd-state", &models);
    let mut op = Operator::new(broker.port, "cmd-state");
    let mut daemon = Daemon::start(&text);
    assert!(op.wait_results(0, 2, LONG).len() >= 2, "no results; stderr: {}", daemon.stderr());
    op.wait_ready();
    let r = op.send("reload_model", json!({"pipeline": "digits", "model": v2}));
    assert_eq!(r["ok"], true, "{r}");
    let state = dir.path().join("active.json");
    let deadline = Instant::now() + LONG;
    while !state.exists() {
        assert!(Instant::now() < deadline, "no state file after the probation; stderr: {}", daemon.stderr());
        op.pump(Duration::from_millis(200));
    }
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let entry = &saved["pipelines"]["digits"];
    assert_eq!(saved["schema"], "edgeinfer/active-models/v1");
    assert_eq!(entry["path"], v2.canonicalize().unwrap().to_str().unwrap(), "{saved}");
    assert_eq!(entry["configured"], crate::model("digits_cnn_int8.onnx").to_str().unwrap());
    daemon.signal("TERM");
    assert_eq!(daemon.wait(LONG), Some(0));

    // Started again with the same config: the update is what runs, from the first result.
    let mark = op.sub.seen.len();
    let mut daemon = Daemon::start(&text);
    let first = op.wait_results(mark, 2, LONG);
    assert!(
        !first.is_empty() && model_names(&first).iter().all(|n| n == "digits_v2"),
        "{first:?}\n{}",
        daemon.stderr()
    );
    assert!(daemon.stderr().contains("updated at run time"), "{}", daemon.stderr());
    daemon.signal("TERM");
    assert_eq!(daemon.wait(LONG), Some(0));

    // The file changed behind the daemon's back: the configured model runs, with a warning.
    std::fs::OpenOptions::new().append(true).open(&v2).unwrap().write_all(b"\0").unwrap();
    let mark = op.sub.seen.len();
    let daemon = Daemon::start(&text);
    let first = op.wait_results(mark, 2, LONG);
    assert!(!first.is_empty() && model_names(&first).iter().all(|n| n == "digits_cnn_int8"), "{first:?}");
    let err = daemon.stderr();
    assert!(err.contains("changed since it was accepted") && err.contains("running the configured model"), "{err}");
}

#[test]
fn a_group_command_reaches_only_its_members_so_a_canary_goes_first() {
    let broker = Mosquitto::start();
    // Three boards: one canary, two more; all three in the group `kitchen`.
    let boards = [("fleet-can", "\"canary\", \"kitchen\""), ("fleet-b1", "\"kitchen\""), ("fleet-b2", "\"kitchen\"")];
    let mut sub = Subscriber::connect(broker.port, "edgeinfer/#");
    let daemons: Vec<Daemon> = boards
        .iter()
        .map(|(device, groups)| Daemon::start(&config(broker.port, device, &format!("groups = [{groups}]"))))
        .collect();
    let results_of = |sub: &Subscriber, since: usize, device: &str| -> Vec<String> {
        let topic = format!("edgeinfer/{device}/digits/result");
        sub.seen[since..]
            .iter()
            .filter(|m| m.topic == topic)
            .map(|m| m.json()["model"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let wait_all = |sub: &mut Subscriber, since: usize, want: &[(&str, &str)]| {
        let deadline = Instant::now() + LONG;
        loop {
            let done = want.iter().all(|(d, m)| results_of(sub, since, d).last().is_some_and(|n| n == m));
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "want {want:?}; daemons: {:?}",
                daemons.iter().map(Daemon::stderr).collect::<Vec<_>>()
            );
            let have = sub.seen.len();
            sub.collect(have + 1, Duration::from_millis(200), |_| true);
        }
    };
    let int8 = [("fleet-can", "digits_cnn_int8"), ("fleet-b1", "digits_cnn_int8"), ("fleet-b2", "digits_cnn_int8")];
    wait_all(&mut sub, 0, &int8);
    // Every board answers `health` on the group before the rollout starts (its subscription is live).
    let send = |sub: &mut Subscriber, group: &str, name: &str, id: &str, body: Value, devices: &[&str]| -> Vec<Value> {
        let mut body = body;
        body["id"] = json!(id);
        sub.publish(&format!("edgeinfer/group/{group}/cmd/{name}"), serde_json::to_vec(&body).unwrap());
        let replies = sub
            .collect(devices.len(), LONG, |m| m.topic.ends_with(&format!("/cmd/{name}/reply")) && m.json()["id"] == id);
        let mut got: Vec<Value> = replies.iter().map(Msg::json).collect();
        got.sort_by_key(|r| r["device"].as_str().unwrap_or("").to_string());
        let from: Vec<&str> = got.iter().map(|r| r["device"].as_str().unwrap()).collect();
        let mut want = devices.to_vec();
        want.sort();
        assert_eq!(from, want, "{got:?}");
        for m in &replies {
            let device = m.json()["device"].as_str().unwrap().to_string();
            assert_eq!(m.topic, format!("edgeinfer/{device}/cmd/{name}/reply"), "each replies on its own topic");
        }
        got
    };
    let deadline = Instant::now() + LONG;
    loop {
        sub.publish("edgeinfer/group/kitchen/cmd/health", br#"{"id": "probe"}"#.to_vec());
        let got = sub.collect(3, Duration::from_secs(1), |m| {
            m.topic.ends_with("/cmd/health/reply") && m.json()["id"] == "probe"
        });
        if got.len() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "not every board answers on the group");
    }

    // 1. The canary gets the new model; the others keep the old one.
    let model = crate::model("digits_cnn_f32.onnx");
    let r = send(
        &mut sub,
        "canary",
        "reload_model",
        "canary-1",
        json!({"pipeline": "digits", "model": model}),
        &["fleet-can"],
    );
    assert_eq!(r[0]["ok"], true, "{r:?}");
    let mark = sub.seen.len();
    wait_all(
        &mut sub,
        mark,
        &[("fleet-can", "digits_cnn_f32"), ("fleet-b1", "digits_cnn_int8"), ("fleet-b2", "digits_cnn_int8")],
    );
    assert!(results_of(&sub, mark, "fleet-b1")
        .iter()
        .chain(&results_of(&sub, mark, "fleet-b2"))
        .all(|n| n == "digits_cnn_int8"));
    // 2. Watch its health until the update is accepted (its probation passed).
    let deadline = Instant::now() + LONG;
    loop {
        let id = format!("watch-{}", sub.seen.len());
        let h = send(&mut sub, "canary", "health", &id, json!({}), &["fleet-can"]);
        if h[0]["result"]["pipelines"]["digits"]["model_update"]["state"] == "accepted" {
            break;
        }
        assert!(Instant::now() < deadline, "the canary never accepted the model: {h:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // 3. The rest of the group.
    let r = send(
        &mut sub,
        "kitchen",
        "reload_model",
        "all-1",
        json!({"pipeline": "digits", "model": model}),
        &["fleet-b1", "fleet-b2", "fleet-can"],
    );
    assert!(r.iter().all(|r| r["ok"] == true), "{r:?}");
    let mark = sub.seen.len();
    wait_all(
        &mut sub,
        mark,
        &[("fleet-can", "digits_cnn_f32"), ("fleet-b1", "digits_cnn_f32"), ("fleet-b2", "digits_cnn_f32")],
    );
}

#[test]
fn update_model_takes_a_signed_model_from_a_retained_message() {
    let broker = Mosquitto::start();
    let root = tempfile::tempdir().unwrap();
    let board = root.path().join("models");
    std::fs::create_dir(&board).unwrap();
    let (key, public) = crate::support::signing_key(root.path(), "signer.key");
    let model = root.path().join("digits_v4.onnx");
    std::fs::copy(crate::model("digits_cnn_f32.onnx"), &model).unwrap();
    crate::support::sign(&model, &key);
    let bytes = std::fs::read(&model).unwrap();
    let sha = crate::support::sha256_hex(&bytes);
    // The operator publishes the model and its signature once, retained.
    let mut op = Operator::new(broker.port, "cmd-topic");
    op.sub.publish_retained("fleet/models/digits_v4.onnx", bytes.clone());
    op.sub.publish_retained(
        "fleet/models/digits_v4.onnx.sig",
        std::fs::read(root.path().join("digits_v4.onnx.sig")).unwrap(),
    );
    let models = format!("[models]\ndir = \"{}\"\npublic_keys = [\"{public}\"]", board.display());
    let daemon = Daemon::start(&config(broker.port, "cmd-topic", &models));
    assert!(op.wait_results(0, 2, LONG).len() >= 2, "no results; stderr: {}", daemon.stderr());
    op.wait_ready();

    let r = op.send(
        "update_model",
        json!({"pipeline": "digits", "topic": "fleet/models/digits_v4.onnx", "sha256": "0".repeat(64)}),
    );
    assert!(r["error"].as_str().unwrap().contains("expected 0000"), "{r}");
    let r = op.send(
        "update_model",
        json!({"pipeline": "digits", "topic": "fleet/models/digits_v4.onnx", "url": "https://x/m.onnx", "sha256": sha}),
    );
    assert!(r["error"].as_str().unwrap().contains("one of them"), "{r}");
    let r =
        op.send("update_model", json!({"pipeline": "digits", "topic": "fleet/models/digits_v4.onnx", "sha256": sha}));
    assert_eq!(r["ok"], true, "{r}; stderr: {}", daemon.stderr());
    assert_eq!(r["result"]["signed_by"], public.as_str());
    assert_eq!(r["result"]["downloaded"]["topic"], "fleet/models/digits_v4.onnx");
    assert_eq!(r["result"]["downloaded"]["bytes"], bytes.len());
    assert_eq!(std::fs::read(board.join("digits_v4.onnx")).unwrap(), bytes);
    let mark = op.sub.seen.len();
    let after = op.wait_results(mark, 2, LONG);
    assert!(!after.is_empty() && model_names(&after).iter().all(|n| n == "digits_v4"), "{after:?}");
}
