//! Sensor sources through the real daemon: an IIO device as a sysfs-shaped
//! tree in a temp dir (the serial port is in `serial.rs`). Results come from
//! the stdout output.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::Daemon;

pub(crate) const LONG: Duration = Duration::from_secs(30);

/// The result lines the daemon printed so far.
fn results(daemon: &Daemon) -> Vec<serde_json::Value> {
    daemon
        .stdout()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits until the daemon printed at least `n` results.
pub(crate) fn wait_results(daemon: &Daemon, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + LONG;
    loop {
        let got = results(daemon);
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `what` appears in the daemon's log.
pub(crate) fn wait_log(daemon: &Daemon, what: &str) -> bool {
    let deadline = Instant::now() + LONG;
    while Instant::now() < deadline {
        if daemon.stderr().contains(what) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A 3-axis accelerometer as the kernel's lis3dh driver shows it in sysfs.
fn accelerometer(root: &Path) -> PathBuf {
    let dir = root.join("iio:device0");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, value) in [
        ("name", "lis3dh"),
        ("in_accel_x_raw", "12"),
        ("in_accel_y_raw", "-30"),
        ("in_accel_z_raw", "1020"),
        ("in_accel_scale", "0.009576806"),
        ("in_temp_raw", "5"),
        ("sampling_frequency", "400"),
    ] {
        std::fs::write(dir.join(name), format!("{value}\n")).unwrap();
    }
    dir
}

#[test]
fn iio_accelerometer_feeds_the_vibration_model_and_survives_the_device_going_away() {
    let sysfs = tempfile::tempdir().unwrap();
    let dir = accelerometer(sysfs.path());
    let mut daemon = Daemon::start(&format!(
        r#"
device = "pi"
[health]
interval_s = 0
[[pipelines]]
name = "motor"
model = "{{models}}/vibration_f32.onnx"
source = {{ type = "iio", device = "lis3dh", channels = ["in_accel_x", "in_accel_y", "in_accel_z"], rate_hz = 1000, root = "{root}" }}
postprocess = {{ type = "classify", top_k = 4 }}
  [[pipelines.outputs]]
  type = "stdout"
"#,
        root = sysfs.path().display()
    ));
    let got = wait_results(&daemon, 3);
    assert!(got.len() >= 3, "stderr: {}", daemon.stderr());
    assert!(wait_log(&daemon, "in_accel_x = (raw + 0) * 0.009576806"), "stderr: {}", daemon.stderr());
    let v = &got[0];
    assert_eq!(v["pipeline"], "motor");
    assert_eq!(v["input"], "lis3dh");
    assert_eq!(v["result"]["classes"].as_array().unwrap().len(), 4);
    // The device is unbound: the source fails naming the file, and the daemon retries.
    let saved = sysfs.path().join("saved");
    std::fs::rename(&dir, &saved).unwrap();
    assert!(wait_log(&daemon, "iio source failed"), "stderr: {}", daemon.stderr());
    assert!(daemon.stderr().contains("_raw"), "stderr: {}", daemon.stderr());
    assert!(wait_log(&daemon, "no device `lis3dh`"), "stderr: {}", daemon.stderr());
    // Bound again: the retry finds it and results resume.
    let before = results(&daemon).len();
    std::fs::rename(&saved, &dir).unwrap();
    let after = wait_results(&daemon, before + 3);
    assert!(after.len() >= before + 3, "no results after the device came back; stderr: {}", daemon.stderr());
    daemon.signal("TERM");
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
}

#[test]
fn iio_missing_channel_is_reported_with_the_channels_there_are() {
    let sysfs = tempfile::tempdir().unwrap();
    accelerometer(sysfs.path());
    let mut daemon = Daemon::start(&format!(
        r#"
[[pipelines]]
name = "motor"
model = "{{models}}/vibration_f32.onnx"
source = {{ type = "iio", device = "iio:device0", channels = ["in_accel_x", "in_accel_y", "in_anglvel_z"], root = "{root}" }}
  [[pipelines.outputs]]
  type = "stdout"
"#,
        root = sysfs.path().display()
    ));
    assert!(
        wait_log(&daemon, "no channel `in_anglvel_z` (neither in_anglvel_z_raw nor in_anglvel_z_input exists); it has: in_accel_x, in_accel_y, in_accel_z, in_temp"),
        "stderr: {}",
        daemon.stderr()
    );
    daemon.signal("TERM");
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
}
