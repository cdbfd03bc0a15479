//! Real parts for the daemon tests: a mosquitto broker on a free port, a
//! subscriber (rumqttc's blocking client) that collects messages, and the
//! `edgeinfer` binary running a config written into a temp dir.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Waits until something accepts TCP connections on the port.
pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A TCP relay in front of a broker for the daemons under test. While closed
/// it accepts and at once drops their connections, so they see the broker as
/// down and back off, while the test's own subscribers talk to the broker
/// directly. Opening it lets them through only after the subscribers are ready
/// (a fresh broker discards what is published before anyone subscribed).
pub struct Gate {
    open: Arc<AtomicBool>,
    /// The port daemons connect to.
    pub port: u16,
}

impl Gate {
    /// Starts a relay to `broker_port` on a free port, open or closed.
    pub fn start(broker_port: u16, open: bool) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(open));
        let is_open = open.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !is_open.load(Ordering::SeqCst) {
                    continue; // dropped: the daemon sees the connection close and backs off
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", broker_port)) else { continue };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { continue };
                std::thread::spawn(move || relay(client, server));
                std::thread::spawn(move || relay(s2, c2));
            }
        });
        Gate { open, port }
    }

    /// Lets new connections through (true) or turns them away (false);
    /// connections already relayed are left alone.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either side closes, then closes both.
fn relay(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A mosquitto process, killed on drop.
pub struct Mosquitto {
    child: Child,
    /// Its port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts mosquitto on `port` (anonymous access, loopback only).
    pub fn start_on(port: u16) -> Mosquitto {
        Self::start_with_config(port, "")
    }

    /// Starts mosquitto with a plaintext listener on `port` and `extra` lines
    /// appended to its config (more listeners, TLS files). Waits for `port` only.
    pub fn start_with_config(port: u16, extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}\n"))
            .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (apt-get install -y mosquitto)");
        assert!(wait_port(port, Duration::from_secs(10)), "mosquitto did not start on {port}");
        Mosquitto { child, port, _dir: dir }
    }

    /// Starts mosquitto on a free port.
    pub fn start() -> Mosquitto {
        Self::start_on(free_port())
    }

    /// Starts mosquitto on `port` keeping sessions and their queued messages in
    /// `dir`, so a persistent-session subscriber misses nothing across a [`Mosquitto::stop`].
    pub fn start_persistent(port: u16, dir: &Path) -> Mosquitto {
        // mosquitto started as root drops to its own user, which must be able to write there.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777));
        Self::start_with_config(port, &format!("persistence true\npersistence_location {}/", dir.display()))
    }

    /// Stops it with SIGTERM (it saves its persistence file first) and waits for the exit.
    pub fn stop(mut self) {
        send_signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto_bin() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "mosquitto".into()
}

/// One received message.
#[derive(Debug, Clone)]
pub struct Msg {
    /// Topic.
    pub topic: String,
    /// Payload as text.
    pub payload: String,
    /// Payload as sent.
    pub bytes: Vec<u8>,
    /// Retain flag as delivered.
    pub retain: bool,
}

impl Msg {
    /// The payload parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", self.topic, self.payload))
    }
}

/// The first message in `seen`, or then from `rx` (kept in `seen`), for which `pred` holds.
pub fn wait_in<T: Clone>(
    rx: &Receiver<T>,
    seen: &mut Vec<T>,
    timeout: Duration,
    pred: impl Fn(&T) -> bool,
) -> Option<T> {
    if let Some(m) = seen.iter().find(|m| pred(m)) {
        return Some(m.clone());
    }
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(m) => {
                seen.push(m.clone());
                if pred(&m) {
                    return Some(m);
                }
            }
            Err(_) => break,
        }
    }
    None
}

/// A real MQTT subscriber collecting messages in a background thread.
pub struct Subscriber {
    rx: Receiver<Msg>,
    /// Everything received so far, in order.
    pub seen: Vec<Msg>,
    client: rumqttc::Client,
}

impl Subscriber {
    /// Connects to `port` and subscribes to `filter` (QoS 1), waiting for the SUBACK.
    pub fn connect(port: u16, filter: &str) -> Subscriber {
        Self::connect_with(port, filter, &format!("test-sub-{}", fastrand::u64(..)), true)
    }

    /// Like `connect` with a persistent session (clean_session false, fixed
    /// `client_id`): the broker keeps QoS 1 messages for it while it is away.
    pub fn connect_persistent(port: u16, filter: &str, client_id: &str) -> Subscriber {
        Self::connect_with(port, filter, client_id, false)
    }

    fn connect_with(port: u16, filter: &str, id: &str, clean: bool) -> Subscriber {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_session(clean);
        opts.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut connection) = rumqttc::Client::new(opts, 256);
        client.subscribe(filter, rumqttc::QoS::AtLeastOnce).unwrap();
        let (tx, rx) = channel();
        let (ready_tx, ready_rx) = channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let msg = Msg {
                            topic: p.topic.clone(),
                            payload: String::from_utf8_lossy(&p.payload).into_owned(),
                            bytes: p.payload.to_vec(),
                            retain: p.retain,
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("subscription acknowledged");
        Subscriber { rx, seen: Vec::new(), client }
    }

    /// Waits until `pred` holds for a message received after the call (or any seen before), returning it.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Msg) -> bool) -> Option<Msg> {
        wait_in(&self.rx, &mut self.seen, timeout, pred)
    }

    /// Collects messages on topics matching `pred` until `n` arrived or the timeout passed.
    pub fn collect(&mut self, n: usize, timeout: Duration, pred: impl Fn(&Msg) -> bool) -> Vec<Msg> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<Msg> = self.seen.iter().filter(|m| pred(m)).cloned().collect();
            if got.len() >= n {
                return got;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { return got };
            match self.rx.recv_timeout(left) {
                Ok(m) => self.seen.push(m),
                Err(_) => return self.seen.iter().filter(|m| pred(m)).cloned().collect(),
            }
        }
    }

    /// Publishes a message (as a test publisher).
    pub fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload).unwrap();
    }

    /// Publishes `payload` on `topic` at QoS 1, retained.
    pub fn publish_retained(&self, topic: &str, payload: Vec<u8>) {
        self.client.publish(topic, rumqttc::QoS::AtLeastOnce, true, payload).unwrap();
    }
}

/// A `Command` for the `edgeinfer` binary under test. `EDGEINFER_RUNNER` (for
/// example `qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu`) prefixes it,
/// so an ARM test binary under qemu-user can start the ARM daemon where binfmt_misc
/// is not set up.
pub fn edgeinfer() -> Command {
    let bin = env!("CARGO_BIN_EXE_edgeinfer");
    let runner = std::env::var("EDGEINFER_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(bin);
            cmd
        }
        None => Command::new(bin),
    }
}

/// A running `edgeinfer run`, killed on drop.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its temp dir (config, outputs).
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Writes `config` (with `{models}` replaced by the models directory) and starts the daemon.
    pub fn start(config: &str) -> Daemon {
        Self::start_with_env(config, &[])
    }

    /// Like `start`, with extra environment variables for the daemon.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgeinfer.toml");
        let text = config.replace("{models}", crate::root().join("models").to_str().unwrap());
        std::fs::File::create(&path).and_then(|mut f| f.write_all(text.as_bytes())).unwrap();
        let child = edgeinfer()
            .arg("run")
            .arg(&path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, dir }
    }

    /// Sends a signal: `TERM`, `HUP`, `INT` or `KILL`.
    pub fn signal(&self, sig: &str) {
        send_signal(self.child.id(), sig);
    }

    /// Waits for exit up to `timeout`; returns the exit code (None: still running or killed by a signal).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends the signal named `sig` (`TERM`, `HUP`, `INT`, `KILL`) to process
/// `pid` with kill(2): no `kill` program needed (a minimal Debian has none).
pub fn send_signal(pid: u32, sig: &str) {
    let signum = match sig {
        "TERM" => libc::SIGTERM,
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "KILL" => libc::SIGKILL,
        other => panic!("send_signal: no signal named {other}"),
    };
    // SAFETY: kill(2) with a pid this test started and a valid signal number.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signum) };
    assert!(rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH), "kill -{sig} {pid} failed");
}

/// Runs the `edgeinfer` CLI, failing the test with its stderr unless it succeeds.
pub fn edgeinfer_ok(args: &[&str]) {
    let out = edgeinfer().args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A new signing key `dir/name`, made as a user makes it (`edgeinfer model keygen`): its path
/// and its public key (base64).
pub fn signing_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    edgeinfer_ok(&["model", "keygen", "--out", key.to_str().unwrap()]);
    let public = std::fs::read_to_string(dir.join(format!("{name}.pub"))).unwrap().trim().to_string();
    (key, public)
}

/// Signs `model` with `key` (`edgeinfer model sign`): writes `MODEL.sig` beside it.
pub fn sign(model: &Path, key: &Path) {
    edgeinfer_ok(&["model", "sign", model.to_str().unwrap(), "--key", key.to_str().unwrap()]);
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
