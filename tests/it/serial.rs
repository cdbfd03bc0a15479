//! The serial source through the real daemon (feature `serial`): a serial
//! port as a pseudo-terminal the test writes to like a microcontroller would.
//! Results come from the stdout output.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use edgeinfer::tensor::Tensor;
use serialport::{SerialPort, TTYPort};

use crate::sensors::{wait_log, wait_results, LONG};
use crate::support::Daemon;

/// A window file `[1, 3, 128]` as one JSON line of 128 samples of 3 channels, sample after sample.
fn window_line(name: &str) -> String {
    let t = Tensor::read_npy(&crate::model(&format!("samples/vibration/{name}.npy"))).unwrap();
    let v = t.data.to_f64_vec();
    let samples: Vec<f32> =
        (0..128).flat_map(|s| (0..3).map(move |c| (c, s))).map(|(c, s)| v[c * 128 + s] as f32).collect();
    format!("{}\r\n", serde_json::to_string(&samples).unwrap())
}

/// A close-on-exec copy of `fd`, which is closed. `pair` leaves both ends
/// inheritable: the daemon (or a process another test starts) would keep the
/// master open, so that closing it here would never hang the pty up.
fn cloexec(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just taken out of its owner with `into_raw_fd`.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    owned.try_clone().expect("F_DUPFD_CLOEXEC")
}

/// True once process `pid` has `path` open.
fn has_open(pid: u32, path: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.filter_map(|e| e.ok()).any(|e| std::fs::read_link(e.path()).is_ok_and(|p| p == Path::new(path)))
}

#[test]
fn serial_port_lines_are_classified_in_order_and_a_hang_up_is_retried() {
    // The master end plays the microcontroller; the slave end is kept open so
    // the pty stays up whatever the daemon does.
    let (master, slave) = TTYPort::pair().expect("a pseudo-terminal pair");
    let port = slave.name().expect("the slave's path");
    let mut master = File::from(cloexec(master.into_raw_fd()));
    let slave = cloexec(slave.into_raw_fd());
    let mut daemon = Daemon::start(&format!(
        r#"
[[pipelines]]
name = "uart"
model = "{{models}}/vibration_f32.onnx"
source = {{ type = "serial", port = "{port}", baud = 9600, format = "json" }}
postprocess = {{ type = "classify", top_k = 1 }}
  [[pipelines.outputs]]
  type = "stdout"
"#
    ));
    let deadline = Instant::now() + LONG;
    while !has_open(daemon.child.id(), &port) {
        assert!(Instant::now() < deadline, "the daemon never opened {port}; stderr: {}", daemon.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The source drops what came before it opened, and the first line after,
    // which may be a tail: empty lines get it in step.
    for _ in 0..10 {
        master.write_all(b"\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    for name in ["imbalance_0", "bearing_fault_1"] {
        master.write_all(window_line(name).as_bytes()).unwrap();
    }
    master.write_all(b"[1, 2, oops\r\n").unwrap();
    master.write_all(window_line("normal_0").as_bytes()).unwrap();
    let got = wait_results(&daemon, 3);
    assert_eq!(got.len(), 3, "stderr: {}", daemon.stderr());
    let labels: Vec<&str> = got.iter().map(|v| v["result"]["classes"][0]["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["imbalance", "bearing_fault", "normal"]);
    assert_eq!(got[0]["input"], port.as_str());
    assert!(wait_log(&daemon, "skipped (1 malformed lines so far)"), "stderr: {}", daemon.stderr());
    // Unplugged: the source fails and is retried with backoff; the daemon keeps running.
    drop(master);
    drop(slave);
    assert!(wait_log(&daemon, "serial source failed"), "stderr: {}", daemon.stderr());
    assert!(daemon.stderr().contains("hung up"), "stderr: {}", daemon.stderr());
    assert!(daemon.child.try_wait().unwrap().is_none(), "the daemon exited");
    daemon.signal("TERM");
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
}
