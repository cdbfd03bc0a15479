//! The outputs' and the MQTT connection's settings: `[[pipelines.outputs]]`
//! and `[mqtt]` (with `[mqtt.tls]`), parsed into typed values once and
//! checked on their own; `config` aggregates them and checks what involves
//! other parts (topics with the device, file paths used twice).

use std::path::PathBuf;

use serde::Deserialize;

use super::disk_queue::FsyncPolicy;
use super::mqtt_proto::Protocol;
use crate::postprocess::config::When;

/// MQTT client settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host:port`; absent: start the embedded broker and use it.
    pub url: Option<String>,
    /// Client id; `{device}` is replaced.
    pub client_id: String,
    /// Keep-alive interval.
    pub keep_alive_s: u64,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// File holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// Results held in memory while the broker is unreachable; the oldest are dropped beyond it.
    pub buffer: usize,
    /// First reconnect delay.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay.
    pub reconnect_max_ms: u64,
    /// Retained availability topic (`online` / `offline`).
    pub status_topic: String,
    /// Retained health topic.
    pub health_topic: String,
    /// TLS for an `mqtts://` URL (`[mqtt.tls]`); absent: the system CA certificates, no client certificate.
    pub tls: Option<MqttTlsConfig>,
    /// Store-and-forward directory for QoS 1/2 results (relative: to the config file); absent: memory only.
    pub queue_dir: Option<PathBuf>,
    /// The disk queue's segment files never exceed this; the oldest are dropped beyond it.
    pub queue_max_bytes: u64,
    /// Queued results older than this are dropped.
    pub queue_max_age_s: u64,
    /// When queued results are forced to disk: `always`, `never` or an interval like `100ms`.
    pub queue_fsync: FsyncPolicy,
    /// MQTT protocol version: `"3.1.1"` (default) or `"5"`.
    pub protocol: Protocol,
    /// MQTT 5: results not delivered within this many seconds expire (on the broker and here).
    pub message_expiry_s: Option<u64>,
    /// MQTT 5: user properties added to every message (`{ site = "barn" }`).
    pub user_properties: std::collections::BTreeMap<String, String>,
}

/// `[broker.tls]`: MQTT over TLS on a listener of its own, in front of the embedded broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTlsConfig {
    /// Address of the TLS listener (MQTT over TLS is port 8883 by convention).
    pub listen: String,
    /// The broker's certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PEM file, unencrypted).
    pub key_file: Option<PathBuf>,
    /// Environment variable holding the private key as PEM text (instead of key_file).
    pub key_env: Option<String>,
}

impl BrokerTlsConfig {
    /// Checks what can be checked without reading files.
    pub fn validate(&self, plain: &str) -> Result<(), (String, String)> {
        crate::features::require("tls", "broker.tls").map_err(|e| ("listen".to_string(), e))?;
        let addr: std::net::SocketAddr = self.listen.parse().map_err(|e| ("listen".to_string(), format!("{e}")))?;
        if addr.port() == 0 {
            return Err(("listen".into(), "port 0 is not supported: give the port to listen on".into()));
        }
        if plain.parse::<std::net::SocketAddr>().is_ok_and(|p| p.port() == addr.port()) {
            return Err(("listen".into(), format!("port {} is already broker.listen's", addr.port())));
        }
        match (&self.key_file, &self.key_env) {
            (Some(_), Some(_)) => Err(("key_env".into(), "give key_file or key_env, not both".into())),
            (None, None) => {
                Err(("key_file".into(), "the certificate needs its private key: key_file or key_env".into()))
            }
            _ => Ok(()),
        }
    }
}

/// `[mqtt.tls]`: how to talk TLS to an `mqtts://` broker.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttTlsConfig {
    /// CA certificates (PEM) that sign the broker's certificate; absent: the system CA certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM file, unencrypted).
    pub key_file: Option<PathBuf>,
    /// Environment variable holding the client private key as PEM text (instead of key_file).
    pub key_env: Option<String>,
    /// ALPN protocols to offer, e.g. `["x-amzn-mqtt-ca"]` for AWS IoT Core on port 443.
    pub alpn: Vec<String>,
    /// Name the broker's certificate must be valid for, instead of the URL host.
    pub server_name: Option<String>,
    /// Accept any broker certificate: encrypted but not authenticated (tests only; logged as an error).
    pub insecure_skip_verify: bool,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: None,
            client_id: "edgeinfer-{device}".into(),
            keep_alive_s: 30,
            username: None,
            password_env: None,
            password_file: None,
            buffer: 1000,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
            status_topic: "edgeinfer/{device}/status".into(),
            health_topic: "edgeinfer/{device}/health".into(),
            tls: None,
            queue_dir: None,
            queue_max_bytes: 64 << 20,
            queue_max_age_s: 7 * 24 * 3600,
            queue_fsync: FsyncPolicy::Interval(std::time::Duration::from_millis(100)),
            protocol: Protocol::V311,
            message_expiry_s: None,
            user_properties: Default::default(),
        }
    }
}

impl MqttConfig {
    /// Checks the `[mqtt]` values on their own (the topics, which take the
    /// device, are checked with it); the error is (key under `mqtt.`, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, r: String| Err((k.to_string(), r));
        if let Some(url) = &self.url {
            parse_mqtt_url(url).map_err(|r| ("url".to_string(), r))?;
            if is_tls_url(url) {
                crate::features::require("tls", "an mqtts:// broker").map_err(|r| ("url".to_string(), r))?;
            }
        }
        if let Some(tls) = &self.tls {
            validate_tls(tls, self.url.as_deref())
                .map_err(|(k, r)| (if k.is_empty() { "tls".into() } else { format!("tls.{k}") }, r))?;
        }
        if self.password_env.is_some() && self.password_file.is_some() {
            return bad("password_env", "give password_env or password_file, not both".into());
        }
        if self.keep_alive_s < 5 {
            return bad("keep_alive_s", "must be at least 5".into());
        }
        if self.buffer == 0 {
            return bad("buffer", "must be at least 1".into());
        }
        if self.queue_max_bytes < 4096 {
            return bad("queue_max_bytes", "must be at least 4096".into());
        }
        if self.queue_max_age_s == 0 {
            return bad("queue_max_age_s", "must be at least 1".into());
        }
        if self.protocol != Protocol::V5 {
            let v5_only = |key: &str| {
                bad(key, "is an MQTT 5 property: set mqtt.protocol = \"5\" (the broker must speak MQTT 5)".into())
            };
            if self.message_expiry_s.is_some() {
                return v5_only("message_expiry_s");
            }
            if !self.user_properties.is_empty() {
                return v5_only("user_properties");
            }
        } else if self.url.is_none() {
            return bad(
                "protocol",
                "\"5\" needs an external broker (mqtt.url): the embedded broker speaks MQTT 3.1.1".into(),
            );
        }
        if let Some(e) = self.message_expiry_s {
            if e == 0 || e > u32::MAX as u64 {
                return bad("message_expiry_s", format!("must be between 1 and {}", u32::MAX));
            }
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return bad("reconnect_max_ms", "need 0 < reconnect_min_ms <= reconnect_max_ms".into());
        }
        Ok(())
    }
}

/// `[mqtt.tls]` without reading files: it needs an `mqtts://` URL, a certificate goes with a key.
fn validate_tls(tls: &MqttTlsConfig, url: Option<&str>) -> Result<(), (String, String)> {
    let err = |k: &str, r: &str| Err((k.to_string(), r.to_string()));
    match url {
        Some(u) if is_tls_url(u) => {}
        Some(_) => return err("", "TLS settings are given but mqtt.url is mqtt:// (plaintext): use mqtts://host:port"),
        None => return err("", "needs mqtt.url = \"mqtts://host:port\" (the embedded broker speaks plaintext)"),
    }
    if tls.key_file.is_some() && tls.key_env.is_some() {
        return err("key_env", "give key_file or key_env, not both");
    }
    if tls.cert_file.is_some() && tls.key_file.is_none() && tls.key_env.is_none() {
        return err("key_file", "cert_file needs key_file or key_env");
    }
    if tls.cert_file.is_none() && (tls.key_file.is_some() || tls.key_env.is_some()) {
        return err("cert_file", "a client key is set but no cert_file");
    }
    if let Some(p) = tls.alpn.iter().find(|p| p.is_empty() || p.len() > 255) {
        return err("alpn", &format!("`{p}`: each protocol must be 1 to 255 bytes"));
    }
    if tls.server_name.as_deref().is_some_and(str::is_empty) {
        return err("server_name", "must not be empty");
    }
    Ok(())
}

/// True for an `mqtts://` URL.
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("mqtts://")
}

/// Splits `mqtt://host[:port]` (default 1883) or `mqtts://host[:port]`
/// (TLS, default 8883) into host and port; [`is_tls_url`] tells which.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), String> {
    let (rest, default_port) = match (url.strip_prefix("mqtt://"), url.strip_prefix("mqtts://")) {
        (Some(rest), _) => (rest, 1883),
        (None, Some(rest)) => (rest, 8883),
        (None, None) => return Err(format!("`{url}` is not an mqtt://host:port or mqtts://host:port URL")),
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') {
        return Err("credentials do not belong in the URL: use mqtt.username and password_env / password_file".into());
    }
    let port_of = |p: &str| p.parse::<u16>().map_err(|_| format!("`{p}` is not a port number"));
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        // [::1] or [::1]:1884
        let (h, after) = v6.split_once(']').ok_or_else(|| format!("`{url}`: unclosed `[`"))?;
        match after.strip_prefix(':') {
            Some(p) => (h.to_string(), port_of(p)?),
            None if after.is_empty() => (h.to_string(), default_port),
            None => return Err(format!("`{url}` is not an mqtt://host:port URL")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), port_of(p)?),
            None => (rest.to_string(), default_port),
        }
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("`{url}` has no valid host"));
    }
    Ok((host, port))
}

/// Output kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// Publish to the MQTT broker.
    Mqtt,
    /// JSON lines on stdout.
    Stdout,
    /// JSON lines in a file, rotated by size.
    File,
}

fn default_topic() -> String {
    "edgeinfer/{device}/{pipeline}/result".into()
}
fn debounce_one() -> u32 {
    1
}
fn ten_mib() -> u64 {
    10 * 1024 * 1024
}
fn keep_five() -> usize {
    5
}

/// One output of a pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// `mqtt`, `stdout` or `file`.
    #[serde(rename = "type")]
    pub kind: OutputKind,
    /// MQTT topic template: `{device}`, `{pipeline}`, `{model}`, `{label}`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// MQTT QoS 0, 1 or 2.
    #[serde(default)]
    pub qos: u8,
    /// MQTT retain flag.
    #[serde(default)]
    pub retain: bool,
    /// File path (`file` outputs).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Rotate the file when it would grow past this size.
    #[serde(default = "ten_mib")]
    pub max_bytes: u64,
    /// Rotated files kept (`path.1` newest ... `path.N`).
    #[serde(default = "keep_five")]
    pub keep: usize,
    /// Publish policy.
    #[serde(default)]
    pub when: When,
    /// Consecutive results needed before a change or crossing counts.
    #[serde(default = "debounce_one")]
    pub debounce: u32,
    /// Threshold for `when = "threshold"` (default: the anomaly threshold).
    #[serde(default)]
    pub threshold: Option<f32>,
    /// A crossing back down needs score < threshold - hysteresis.
    #[serde(default)]
    pub hysteresis: f32,
    /// For `threshold`: score of this class instead of the anomaly or top score.
    #[serde(default)]
    pub class: Option<String>,
}

impl OutputConfig {
    /// An MQTT output with every default.
    pub fn default_mqtt() -> Self {
        toml::from_str("type = \"mqtt\"").expect("defaults parse")
    }
}

impl OutputConfig {
    /// Checks one output's values on their own (a file path used twice and
    /// a threshold the postprocess must give are checked by the pipeline);
    /// the error is (key under the output, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, r: String| Err((k.to_string(), r));
        if self.qos > 2 {
            return bad("qos", format!("{} is not 0, 1 or 2", self.qos));
        }
        if self.kind == OutputKind::File && self.path.is_none() {
            return bad("path", "a file output needs a path".into());
        }
        if self.kind != OutputKind::File && self.path.is_some() {
            return bad("path", "only file outputs take a path".into());
        }
        if self.debounce == 0 {
            return bad("debounce", "must be at least 1".into());
        }
        if !(self.hysteresis >= 0.0 && self.hysteresis.is_finite()) {
            return bad("hysteresis", "must be a finite number >= 0".into());
        }
        if self.threshold.is_some_and(|t| !t.is_finite()) {
            return bad("threshold", "must be a finite number".into());
        }
        for placeholder in self.topic.match_indices('{').map(|(i, _)| &self.topic[i..]) {
            let name = placeholder.split('}').next().unwrap_or("");
            if !matches!(name, "{device" | "{pipeline" | "{model" | "{label") {
                return bad(
                    "topic",
                    format!("unknown placeholder `{name}}}` (use {{device}}, {{pipeline}}, {{model}}, {{label}})"),
                );
            }
        }
        if self.topic.contains(['+', '#']) {
            return bad("topic", "a publish topic cannot contain `+` or `#`".into());
        }
        Ok(())
    }
}
