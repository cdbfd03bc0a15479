//! TLS and mutual TLS against a real mosquitto: certificates made in the test
//! (a CA, a server certificate, a client certificate, a second unrelated CA),
//! a TLS listener that requires a client certificate, and a plaintext listener
//! on another port for the test's subscriber only.

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

use crate::support::{free_port, wait_port, Daemon, Mosquitto, Subscriber};

const LONG: Duration = Duration::from_secs(30);
/// How long a refused daemon is watched for anything it might publish.
const QUIET: Duration = Duration::from_secs(3);

/// Test certificates written as PEM files into a temp dir.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ca.pem`, `server.pem`/`server.key` (for `server_names`), `client.pem`/`client.key`
    /// signed by that CA, and `other-ca.pem`, a CA that signed nothing here.
    pub(crate) fn new(server_names: &[&str]) -> Pki {
        Self::with(server_names, false)
    }

    /// Like `new`; `expired`: the server certificate expired in 2001.
    fn with(server_names: &[&str], expired: bool) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        let (ca, ca_key) = make_ca("edgeinfer test CA");
        let (other, _) = make_ca("some other CA");
        write("ca.pem", ca.pem());
        write("other-ca.pem", other.pem());
        for (name, sans, cn, usage) in [
            (
                "server",
                server_names.iter().map(|s| s.to_string()).collect(),
                "broker",
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            ("client", Vec::new(), "edgeinfer-device", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            if expired && name == "server" {
                params.not_before = rcgen::date_time_ymd(2000, 1, 1);
                params.not_after = rcgen::date_time_ymd(2001, 1, 1);
            }
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Pki { dir }
    }
}

fn make_ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

/// A mosquitto with a plaintext listener (`port`, for the subscriber) and a
/// TLS listener (`tls_port`) that requires a client certificate from `pki`'s CA.
struct TlsBroker {
    broker: Mosquitto,
    tls_port: u16,
}

fn tls_broker(pki: &Pki) -> TlsBroker {
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        pki.path("ca.pem").display(),
        pki.path("server.pem").display(),
        pki.path("server.key").display()
    );
    let broker = Mosquitto::start_with_config(free_port(), &extra);
    assert!(wait_port(tls_port, LONG), "mosquitto did not open its TLS listener on {tls_port}");
    TlsBroker { broker, tls_port }
}

/// A daemon config publishing vibration results at 1 kHz samples to `url` with `tls` as `[mqtt.tls]`.
fn config(device: &str, url: &str, tls: &str) -> String {
    format!(
        r#"
device = "{device}"
[mqtt]
url = "{url}"
reconnect_min_ms = 200
reconnect_max_ms = 1000
[mqtt.tls]
{tls}
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

fn files(pki: &Pki, ca: &str, client: bool) -> String {
    let mut t = format!("ca_file = \"{}\"\n", pki.path(ca).display());
    if client {
        t += &format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            pki.path("client.pem").display(),
            pki.path("client.key").display()
        );
    }
    t
}

/// Waits until the daemon's stderr contains `needle`.
fn wait_stderr(daemon: &Daemon, needle: &str, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if daemon.stderr().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The health log line's `last_error="..."` once it holds `needle`.
fn health_error(daemon: &Daemon, needle: &str) -> Option<String> {
    let deadline = std::time::Instant::now() + LONG;
    while std::time::Instant::now() < deadline {
        let err = daemon.stderr();
        if let Some(line) =
            err.lines().filter(|l| l.contains("health:") && l.contains("last_error=")).find(|l| l.contains(needle))
        {
            return Some(line.to_string());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[test]
fn mutual_tls_delivers_results_and_check_reads_the_files() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let b = tls_broker(&pki);
    let mut sub = Subscriber::connect(b.broker.port, "edgeinfer/tls1/#");
    // The key from an environment variable, as a container secret would give it.
    let key = std::fs::read_to_string(pki.path("client.key")).unwrap();
    let tls = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_env = \"EDGEINFER_TEST_MQTT_KEY\"\n",
        pki.path("ca.pem").display(),
        pki.path("client.pem").display()
    );
    let cfg = config("tls1", &format!("mqtts://localhost:{}", b.tls_port), &tls);
    let mut daemon = Daemon::start_with_env(&cfg, &[("EDGEINFER_TEST_MQTT_KEY", &key)]);
    assert!(
        sub.wait_for(LONG, |m| m.topic == "edgeinfer/tls1/status" && m.payload == "online").is_some(),
        "stderr: {}",
        daemon.stderr()
    );
    let results = sub.collect(3, LONG, |m| m.topic == "edgeinfer/tls1/vib/result");
    assert_eq!(results.len(), 3, "stderr: {}", daemon.stderr());
    assert_eq!(results[0].json()["pipeline"], "vib");
    let health = sub.wait_for(LONG, |m| m.topic == "edgeinfer/tls1/health").expect("health over TLS");
    assert_eq!(health.json()["mqtt"]["connected"], true);
    assert!(health.json()["mqtt"]["last_error"].is_null(), "{}", health.payload);
    daemon.signal("TERM");
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
    let stderr = daemon.stderr();
    assert!(!stderr.contains("PRIVATE KEY") && !stderr.contains(key.lines().nth(1).unwrap()), "key leaked: {stderr}");

    // `check` parses the files without connecting (the broker is not needed).
    drop(b);
    let path = daemon.dir.path().join("edgeinfer.toml");
    let out =
        crate::support::edgeinfer().arg("check").arg(&path).env("EDGEINFER_TEST_MQTT_KEY", &key).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("mqtt tls: CA file") && text.contains("client certificate"), "{text}");
}

#[test]
fn check_names_the_key_and_file_of_a_bad_tls_setting() {
    let pki = Pki::new(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let run_check = |tls: &str| {
        let path = dir.path().join("edgeinfer.toml");
        let text =
            config("chk", "mqtts://localhost", tls).replace("{models}", crate::root().join("models").to_str().unwrap());
        std::fs::write(&path, text).unwrap();
        let out = crate::support::edgeinfer().arg("check").arg(&path).output().unwrap();
        assert!(!out.status.success(), "check accepted {tls}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // A certificate where the key should be: no private key in it.
    let e = run_check(&format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        pki.path("ca.pem").display(),
        pki.path("client.pem").display(),
        pki.path("ca.pem").display()
    ));
    assert!(e.contains("mqtt.tls.key_file") && e.contains("ca.pem") && e.contains("no private key"), "{e}");
    // The server's key with the client's certificate.
    let e = run_check(&format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        pki.path("ca.pem").display(),
        pki.path("client.pem").display(),
        pki.path("server.key").display()
    ));
    assert!(e.contains("mqtt.tls.key_file") && e.contains("does not belong"), "{e}");
    assert!(!e.contains("PRIVATE KEY-----"), "{e}");
    let e = run_check(&format!("ca_file = \"{}\"", pki.path("missing.pem").display()));
    assert!(e.contains("mqtt.tls.ca_file") && e.contains("missing.pem"), "{e}");
    let e = run_check(&format!("ca_file = \"{}\"", pki.path("client.key").display()));
    assert!(e.contains("mqtt.tls.ca_file") && e.contains("no certificate"), "{e}");
}

#[test]
fn wrong_ca_is_refused_clearly_and_nothing_is_published() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let b = tls_broker(&pki);
    let mut sub = Subscriber::connect(b.broker.port, "edgeinfer/#");
    let cfg = config("tls2", &format!("mqtts://localhost:{}", b.tls_port), &files(&pki, "other-ca.pem", true));
    let mut daemon = Daemon::start(&cfg);
    assert!(wait_stderr(&daemon, "not signed by a trusted CA", LONG), "stderr: {}", daemon.stderr());
    let line = health_error(&daemon, "not signed by a trusted CA").expect("health shows the error");
    assert!(line.contains("connected=false"), "{line}");
    assert!(sub.wait_for(QUIET, |m| m.topic.starts_with("edgeinfer/tls2/")).is_none(), "something got through");
    daemon.signal("TERM");
    assert_eq!(daemon.wait(LONG), Some(0), "stderr: {}", daemon.stderr());
}

#[test]
fn a_broker_requiring_a_client_certificate_refuses_a_client_without_one() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let b = tls_broker(&pki);
    let mut sub = Subscriber::connect(b.broker.port, "edgeinfer/#");
    let cfg = config("tls3", &format!("mqtts://localhost:{}", b.tls_port), &files(&pki, "ca.pem", false));
    let daemon = Daemon::start(&cfg);
    assert!(wait_stderr(&daemon, "client certificate", LONG), "stderr: {}", daemon.stderr());
    assert!(health_error(&daemon, "client certificate").is_some(), "stderr: {}", daemon.stderr());
    assert!(sub.wait_for(QUIET, |m| m.topic.starts_with("edgeinfer/tls3/")).is_none(), "something got through");
}

#[test]
fn mqtts_to_a_plaintext_port_fails_with_a_tls_error_and_never_speaks_plaintext() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "edgeinfer/#");
    let cfg = config("tls4", &format!("mqtts://localhost:{}", broker.port), &files(&pki, "ca.pem", true));
    let daemon = Daemon::start(&cfg);
    assert!(wait_stderr(&daemon, "TLS error", LONG), "stderr: {}", daemon.stderr());
    assert!(daemon.stderr().contains("plaintext"), "stderr: {}", daemon.stderr());
    assert!(sub.wait_for(QUIET, |m| m.topic.starts_with("edgeinfer/tls4/")).is_none(), "plaintext got through");
    assert!(!daemon.stderr().contains("MQTT: connected"), "stderr: {}", daemon.stderr());
}

#[test]
fn a_certificate_for_another_name_is_refused_unless_server_name_says_so() {
    let pki = Pki::new(&["broker.example"]);
    let b = tls_broker(&pki);
    let mut sub = Subscriber::connect(b.broker.port, "edgeinfer/#");
    let url = format!("mqtts://127.0.0.1:{}", b.tls_port);
    let daemon = Daemon::start(&config("tls5", &url, &files(&pki, "ca.pem", true)));
    assert!(wait_stderr(&daemon, "not issued for this host name", LONG), "stderr: {}", daemon.stderr());
    assert!(sub.wait_for(QUIET, |m| m.topic.starts_with("edgeinfer/tls5/")).is_none(), "something got through");
    drop(daemon);

    let tls = files(&pki, "ca.pem", true) + "server_name = \"broker.example\"\n";
    let daemon = Daemon::start(&config("tls6", &url, &tls));
    assert!(sub.wait_for(LONG, |m| m.topic == "edgeinfer/tls6/vib/result").is_some(), "stderr: {}", daemon.stderr());
}

#[test]
fn an_expired_broker_certificate_is_refused() {
    let pki = Pki::with(&["localhost"], true);
    let b = tls_broker(&pki);
    let mut sub = Subscriber::connect(b.broker.port, "edgeinfer/#");
    let daemon =
        Daemon::start(&config("tls7", &format!("mqtts://localhost:{}", b.tls_port), &files(&pki, "ca.pem", true)));
    assert!(wait_stderr(&daemon, "certificate has expired", LONG), "stderr: {}", daemon.stderr());
    assert!(sub.wait_for(QUIET, |m| m.topic.starts_with("edgeinfer/tls7/")).is_none(), "something got through");
}

/// `[broker.tls]`: the embedded broker over TLS, with its login, checked with `mosquitto_sub --cafile`.
#[cfg(feature = "broker")]
#[test]
fn the_embedded_broker_serves_mqtt_over_tls_and_keeps_its_login() {
    use crate::mqtt_hub::sub_one_with;
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    std::fs::write(pki.path("broker.pw"), "open sesame\n").unwrap();
    let (port, tls_port) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        r#"
device = "tlsbroker"
[broker]
listen = "127.0.0.1:{port}"
username = "edge"
password_file = "{pw}"
tls = {{ listen = "127.0.0.1:{tls_port}", cert_file = "{cert}", key_file = "{key}" }}
[health]
interval_s = 1
[[pipelines]]
name = "vib"
model = "{{models}}/vibration_int8.onnx"
source = {{ type = "synthetic", signal = "vibration", rate_hz = 1000 }}
  [[pipelines.outputs]]
  type = "mqtt"
"#,
        pw = pki.path("broker.pw").display(),
        cert = pki.path("server.pem").display(),
        key = pki.path("server.key").display(),
    ));
    assert!(wait_port(tls_port, LONG), "no TLS listener; stderr: {}", daemon.stderr());
    let ca = pki.path("ca.pem").display().to_string();
    let login = Some(("edge", "open sesame"));
    let topic = "edgeinfer/tlsbroker/vib/result";
    let (ok, got) = sub_one_with(tls_port, topic, login, &["--cafile", &ca]);
    assert!(ok && got.starts_with(&format!("{topic} {{")), "over TLS: {got}\nstderr: {}", daemon.stderr());
    let (ok, got) = sub_one_with(tls_port, topic, None, &["--cafile", &ca]);
    assert!(!ok && got.is_empty(), "anonymous over TLS: {got}");
    let (ok, got) = sub_one_with(tls_port, topic, Some(("edge", "wrong")), &["--cafile", &ca]);
    assert!(!ok && got.is_empty(), "wrong password over TLS: {got}");
    // A client that trusts another CA does not get through the handshake.
    let other = pki.path("other-ca.pem").display().to_string();
    let (ok, got) = sub_one_with(tls_port, topic, login, &["--cafile", &other]);
    assert!(!ok && got.is_empty(), "untrusted certificate accepted: {got}");
    // Plain MQTT on the TLS port is not MQTT to it.
    let (ok, got) = sub_one_with(tls_port, topic, login, &[]);
    assert!(!ok && got.is_empty(), "plaintext on the TLS port: {got}");
    let (ok, got) = sub_one_with(tls_port, "edgeinfer/tlsbroker/health", login, &["--cafile", &ca]);
    assert!(ok, "{got}");
    let health: serde_json::Value = serde_json::from_str(got.split_once(' ').unwrap().1).unwrap();
    let b = &health["mqtt"]["embedded_broker"];
    assert_eq!(b["tls_listen"], format!("127.0.0.1:{tls_port}"), "{health}");
    assert_eq!(b["authentication"], true);
    assert_eq!(b["open_to_the_network"], false);
}

/// A `[broker.tls]` key that does not belong to its certificate fails `check`, naming the key.
#[cfg(feature = "broker")]
#[test]
fn a_broker_tls_key_of_another_certificate_is_refused_by_check() {
    let pki = Pki::new(&["localhost"]);
    let cfg = pki.path("edgeinfer.toml");
    std::fs::write(
        &cfg,
        format!(
            "device = \"d\"\n[broker]\nlisten = \"127.0.0.1:{}\"\ntls = {{ listen = \"127.0.0.1:{}\", cert_file = \"server.pem\", key_file = \"client.key\" }}\n\
             [[pipelines]]\nname = \"vib\"\nmodel = \"{}/models/vibration_int8.onnx\"\nsource = {{ type = \"synthetic\", signal = \"vibration\" }}\n  [[pipelines.outputs]]\n  type = \"mqtt\"\n",
            free_port(),
            free_port(),
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeinfer")).arg("check").arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check passed: {err}");
    assert!(err.contains("broker.tls.key_file") && err.contains("does not belong"), "{err}");
}

/// A `[broker.tls]` listener open to the network without a login: the broker
/// starts, says so in health and warns in the log.
#[cfg(feature = "broker")]
#[test]
fn a_tls_listener_off_loopback_without_a_login_is_flagged_in_health_and_the_log() {
    use crate::mqtt_hub::sub_one_with;
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let (port, tls_port) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        r#"
device = "opentls"
[broker]
listen = "127.0.0.1:{port}"
tls = {{ listen = "0.0.0.0:{tls_port}", cert_file = "{cert}", key_file = "{key}" }}
[health]
interval_s = 1
[[pipelines]]
name = "vib"
model = "{{models}}/vibration_int8.onnx"
source = {{ type = "synthetic", signal = "vibration", rate_hz = 1000 }}
  [[pipelines.outputs]]
  type = "mqtt"
"#,
        cert = pki.path("server.pem").display(),
        key = pki.path("server.key").display(),
    ));
    assert!(wait_port(tls_port, LONG), "no TLS listener; stderr: {}", daemon.stderr());
    let ca = pki.path("ca.pem").display().to_string();
    let (ok, got) = sub_one_with(tls_port, "edgeinfer/opentls/health", None, &["--cafile", &ca]);
    assert!(ok, "{got}\nstderr: {}", daemon.stderr());
    let health: serde_json::Value = serde_json::from_str(got.split_once(' ').unwrap().1).unwrap();
    assert_eq!(health["mqtt"]["embedded_broker"]["open_to_the_network"], true, "{health}");
    assert!(daemon.stderr().contains("open to the network without a password"), "{}", daemon.stderr());
}
