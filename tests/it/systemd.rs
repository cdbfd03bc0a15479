//! The daemon under a stand-in for systemd: a real notify socket receives
//! READY=1, watchdog pings and STOPPING=1, as `Type=notify` + `WatchdogSec=` expect.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::support::Daemon;

const LONG: Duration = Duration::from_secs(30);

/// Receives datagrams until `pred` holds for one or the timeout passes; returns all received.
fn recv_until(sock: &UnixDatagram, timeout: Duration, pred: impl Fn(&str) -> bool) -> (Vec<String>, bool) {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = pred(&msg);
                got.push(msg);
                if done {
                    return (got, true);
                }
            }
            Err(_) => break,
        }
    }
    (got, false)
}

#[test]
fn daemon_notifies_ready_pings_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let config = r#"
device = "sd"
[[pipelines]]
name = "vib"
model = "{models}/vibration_int8.onnx"
source = { type = "synthetic", signal = "vibration", rate_hz = 1000 }
  [[pipelines.outputs]]
  type = "stdout"
"#;
    // A 400 ms watchdog: pings every 200 ms.
    let mut daemon =
        Daemon::start_with_env(config, &[("NOTIFY_SOCKET", path.to_str().unwrap()), ("WATCHDOG_USEC", "400000")]);
    let (got, ready) = recv_until(&sock, LONG, |m| m.lines().any(|l| l == "READY=1"));
    assert!(ready, "no READY=1 (got {got:?}); stderr: {}", daemon.stderr());
    let pid = format!("MAINPID={}", daemon.child.id());
    assert!(got.last().unwrap().lines().any(|l| l == pid), "{got:?}");
    // Two pings prove it is periodic, not a one-off.
    for _ in 0..2 {
        let (got, ping) = recv_until(&sock, LONG, |m| m == "WATCHDOG=1");
        assert!(ping, "no watchdog ping (got {got:?}); stderr: {}", daemon.stderr());
    }
    // Ready means the pipeline runs: results arrive.
    let start = Instant::now();
    while daemon.stdout().is_empty() && start.elapsed() < LONG {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!daemon.stdout().is_empty(), "no results; stderr: {}", daemon.stderr());
    daemon.signal("TERM");
    let (got, stopping) = recv_until(&sock, LONG, |m| m == "STOPPING=1");
    assert!(stopping, "no STOPPING=1 (got {got:?}); stderr: {}", daemon.stderr());
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
}
