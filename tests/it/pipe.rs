//! The pipe source end to end with a real `ffmpeg` (installed by `.ci/run`):
//! an MJPEG stream and raw frames into the daemon, results at a real
//! subscriber, `max_fps`, restart after the command exits, stderr in the log.

use std::time::{Duration, Instant};

use crate::support::{Daemon, Mosquitto, Msg, Subscriber};

const LONG: Duration = Duration::from_secs(60);

/// Panics with a clear message when ffmpeg is missing: these tests are not optional.
fn ffmpeg() -> &'static str {
    let ok = std::process::Command::new("ffmpeg").arg("-version").output().is_ok_and(|o| o.status.success());
    assert!(ok, "ffmpeg is needed by the pipe tests: apt-get install -y ffmpeg (.ci/run does)");
    "ffmpeg"
}

fn toml_list(args: &[&str]) -> String {
    let quoted: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

fn infer_top(image: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args(["infer", crate::model("digits_cnn_f32.onnx").to_str().unwrap(), image])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    v["top"][0]["label"].as_str().unwrap().to_string()
}

fn daemon_for(device: &str, port: u16, command: &[&str], source_extra: &str) -> Daemon {
    Daemon::start(&format!(
        r#"
device = "{device}"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
[health]
interval_s = 1
[[pipelines]]
name = "cam"
model = "{{models}}/digits_cnn_f32.onnx"
  [pipelines.source]
  type = "pipe"
  command = {command}
  {source_extra}
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1
"#,
        command = toml_list(command)
    ))
}

fn results(device: &str) -> impl Fn(&Msg) -> bool + '_ {
    move |m: &Msg| m.topic == format!("edgeinfer/{device}/cam/result")
}

#[test]
fn raw_rgb24_and_gray8_frames_give_what_infer_gives_on_the_image() {
    let ff = ffmpeg();
    let broker = Mosquitto::start();
    let image = crate::model("samples/digits/digit_1_3.png");
    let image = image.to_str().unwrap();
    let want = infer_top(image);
    for (device, pix_fmt, format) in [("p1", "rgb24", "rgb24"), ("p2", "gray", "gray8")] {
        let mut sub = Subscriber::connect(broker.port, &format!("edgeinfer/{device}/#"));
        let cmd = [ff, "-loglevel", "error", "-i", image, "-f", "rawvideo", "-pix_fmt", pix_fmt, "-s", "8x8", "-"];
        let extra = format!("format = \"{format}\"\nwidth = 8\nheight = 8\nrestart = false");
        let mut daemon = daemon_for(device, broker.port, &cmd, &extra);
        let got = sub.wait_for(LONG, results(device)).unwrap_or_else(|| panic!("no result: {}", daemon.stderr()));
        let v = got.json();
        assert_eq!(v["result"]["classes"][0]["label"], want.as_str(), "{format}: {v}");
        assert!(v["captured_ms"].as_u64() <= v["published_ms"].as_u64());
        // The command ends and restart is off: the daemon drains and exits 0.
        assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
    }
}

#[test]
fn mjpeg_stream_at_30_fps_is_limited_by_max_fps_and_counted_in_health() {
    let ff = ffmpeg();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "edgeinfer/p3/#");
    // A real-time 30 fps test pattern for 3 s, as an MJPEG stream.
    let cmd = [
        ff,
        "-loglevel",
        "error",
        "-re",
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=320x240:rate=30",
        "-t",
        "3",
        "-f",
        "mjpeg",
        "-q:v",
        "5",
        "-",
    ];
    let mut daemon = daemon_for("p3", broker.port, &cmd, "format = \"mjpeg\"\nmax_fps = 10\nrestart = false");
    let all = sub.collect(1000, Duration::from_secs(8), |m| m.topic.starts_with("edgeinfer/p3/"));
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
    let got: Vec<&Msg> = all.iter().filter(|m| results("p3")(m)).collect();
    // About 10 fps of 30 pass: never all 90 frames, and more than a handful.
    assert!((10..=45).contains(&got.len()), "{} results; stderr: {}", got.len(), daemon.stderr());
    let seqs: Vec<u64> = got.iter().map(|m| m.json()["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "in order: {seqs:?}");
    let skipped = all
        .iter()
        .filter(|m| m.topic == "edgeinfer/p3/health")
        .filter_map(|m| m.json()["pipelines"]["cam"]["dropped"]["max_fps"].as_u64())
        .max();
    assert!(skipped.is_some_and(|n| n > 0), "health counts frames skipped by max_fps: {skipped:?}");
}

#[test]
fn the_command_is_restarted_when_it_exits_and_its_stderr_is_logged() {
    let ff = ffmpeg();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "edgeinfer/p4/#");
    // Three frames, then ffmpeg exits; `-loglevel info` makes it say something on stderr.
    let cmd = [
        ff,
        "-loglevel",
        "info",
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x64:rate=30",
        "-frames:v",
        "3",
        "-f",
        "mjpeg",
        "-",
    ];
    let mut daemon = daemon_for("p4", broker.port, &cmd, "format = \"mjpeg\"");
    let t = Instant::now();
    // More than three results means the command ran again.
    let more = sub.wait_for(LONG, |m| results("p4")(m) && m.json()["seq"].as_u64() > Some(3));
    assert!(more.is_some(), "not restarted after {:?}; stderr: {}", t.elapsed(), daemon.stderr());
    let health = sub
        .wait_for(LONG, |m| {
            m.topic == "edgeinfer/p4/health"
                && m.json()["pipelines"]["cam"]["source"]["restarts"].as_u64().is_some_and(|r| r >= 1)
        })
        .expect("health shows the restart")
        .json();
    let last_error = health["pipelines"]["cam"]["source"]["last_error"].as_str().unwrap_or_default().to_string();
    assert!(last_error.contains("exited"), "{health}");
    daemon.signal("TERM");
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
    assert!(daemon.stderr().contains("ffmpeg: "), "ffmpeg's stderr reaches the log: {}", daemon.stderr());
}

/// Capture-to-publish latency and dropped frames with ffmpeg at 30 fps into
/// the MobileNetV2-shaped int8 model. A measurement, not a test:
/// `cargo test --release --test it pipe_camera_figures -- --ignored --nocapture`.
#[test]
#[ignore]
fn pipe_camera_figures() {
    let ff = ffmpeg();
    let broker = Mosquitto::start();
    let seconds = 20;
    for (name, qdq) in [("int8", false), ("int8 as float", true)] {
        let mut sub = Subscriber::connect(broker.port, "edgeinfer/fig/#");
        let t = seconds.to_string();
        let cmd = [
            ff,
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=640x480:rate=30",
            "-t",
            &t,
            "-f",
            "mjpeg",
            "-q:v",
            "5",
            "-",
        ];
        let mut daemon = Daemon::start(&format!(
            r#"
device = "fig"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
[health]
interval_s = 1
[[pipelines]]
name = "cam"
model = "{{models}}/mobilenetv2_int8.onnx"
qdq_as_float = {qdq}
  [pipelines.source]
  type = "pipe"
  command = {command}
  format = "mjpeg"
  restart = false
  [[pipelines.outputs]]
  type = "mqtt"
"#,
            port = broker.port,
            command = toml_list(&cmd)
        ));
        let got = sub.collect(100_000, Duration::from_secs(seconds + 5), results("fig"));
        let health: Vec<serde_json::Value> = sub
            .collect(100, Duration::from_secs(2), |m| m.topic == "edgeinfer/fig/health")
            .iter()
            .map(Msg::json)
            .collect();
        daemon.wait(LONG);
        let mut lat: Vec<f64> = got
            .iter()
            .map(|m| {
                let v = m.json();
                (v["published_ms"].as_u64().unwrap() - v["captured_ms"].as_u64().unwrap()) as f64
            })
            .collect();
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(f64::NAN);
        let last = health.last().cloned().unwrap_or_default();
        let p = &last["pipelines"]["cam"];
        println!(
            "{name}: {} results in {seconds} s from {} frames; stale frames dropped {}; capture->publish p50 {:.1} ms p90 {:.1} ms; inference p50 {} ms; preprocess p50 {} ms",
            got.len(),
            p["inputs"],
            p["dropped"]["stale_frames"],
            pct(0.5),
            pct(0.9),
            p["latency_ms"]["inference"]["p50"],
            p["latency_ms"]["preprocess"]["p50"],
        );
    }
}
