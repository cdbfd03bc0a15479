//! The daemon's TOML configuration: the whole file ([`Config`]), which
//! aggregates the components' own settings (`source::config`,
//! `preprocess::config`, `postprocess::config`, `sink::config`,
//! `homeassistant`, `http`, `model_store`), re-exported here, with the daemon's own tables
//! (`[engine]`, `[broker]`, `[health]`, `[shutdown]`, `[commands]`). `load`
//! parses (unknown keys are refused), resolves paths (relative to the config
//! file), has each component check its values and runs the checks that
//! involve more than one part, naming the key at fault.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::message::Overflow;
pub use crate::postprocess::config::{
    AnomalyScore, BoxOrder, BoxUnits, DetectConfig, DetectFormat, PostprocessConfig, SnapshotConfig, SnapshotWhen, When,
};
pub use crate::preprocess::config::{PreprocessConfig, WindowLayout};
pub use crate::sink::config::{
    is_tls_url, parse_mqtt_url, BrokerTlsConfig, MqttConfig, MqttTlsConfig, OutputConfig, OutputKind,
};
pub use crate::source::config::{HttpMode, LineFormat, PayloadFormat, PixelFormat, Signal, SourceConfig, StreamFormat};

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {reason}")]
    Read {
        /// The file.
        path: String,
        /// OS error.
        reason: String,
    },
    /// TOML syntax, an unknown key or a wrong type (the message names key and line).
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        reason: String,
    },
    /// A value that parses but makes no sense.
    #[error("{path}: `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Dotted key path, e.g. `pipelines[0].source.rate_hz`.
        key: String,
        /// Why.
        reason: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Device id used in topics and payloads (default: the host name).
    #[serde(default)]
    pub device: Option<String>,
    /// The broker to publish to; absent (or without `url`): the embedded broker.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// The embedded broker, started when `mqtt.url` is absent.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Health reports.
    #[serde(default)]
    pub health: HealthConfig,
    /// Shutdown behaviour.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Home Assistant MQTT discovery (off unless `enabled = true`).
    #[serde(default)]
    pub homeassistant: crate::homeassistant::HomeAssistantConfig,
    /// Remote commands over MQTT (off unless `enabled = true`).
    #[serde(default)]
    pub commands: CommandsConfig,
    /// Engine settings shared by every pipeline: threads and the start-up cache.
    #[serde(default)]
    pub engine: EngineConfig,
    /// The models directory `reload_model` may read from, and the keys models must be signed with.
    #[serde(default)]
    pub models: crate::model_store::ModelsConfig,
    /// The status page and Prometheus `/metrics` (off unless the `[http]` table is there).
    #[serde(default)]
    pub http: Option<crate::http::HttpConfig>,
    /// The pipelines: source -> preprocess -> model -> postprocess -> outputs.
    #[serde(default)]
    pub pipelines: Vec<PipelineConfig>,
    /// Directory of the config file; relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file (read again by `reload_config` and SIGHUP).
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[engine]`: how models load and run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Threads for tract's matrix products and edgeinfer's convolutions, per pipeline (a pipeline's `threads` overrides it).
    pub threads: usize,
    /// Start-up cache directory (relative: to the config file); absent: no cache.
    pub cache_dir: Option<PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { threads: 1, cache_dir: None }
    }
}

/// A `threads` value: in range, and above 1 only with the `threads` feature.
fn check_threads(threads: usize) -> Result<(), String> {
    if !(1..=MAX_THREADS).contains(&threads) {
        return Err(format!("must be 1..={MAX_THREADS}"));
    }
    if threads > 1 {
        crate::features::require("threads", "more than one thread")?;
    }
    Ok(())
}

/// Most threads a model may ask for.
pub const MAX_THREADS: usize = 256;

/// The in-process broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Address to listen on.
    pub listen: String,
    /// With it, every client must log in with this user name and the password.
    pub username: Option<String>,
    /// Environment variable holding the broker password.
    pub password_env: Option<String>,
    /// File holding the broker password (first line).
    pub password_file: Option<PathBuf>,
    /// A second listener that speaks MQTT over TLS.
    pub tls: Option<BrokerTlsConfig>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: "127.0.0.1:1883".into(),
            username: None,
            password_env: None,
            password_file: None,
            tls: None,
        }
    }
}

impl BrokerConfig {
    /// The login clients must give, if one is configured; `resolve` makes a path absolute.
    pub fn login(&self, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<Option<(String, String)>, String> {
        let (env, file) = (self.password_env.as_deref(), self.password_file.as_deref());
        crate::secret::login("broker", self.username.as_deref(), env, file, resolve)
    }
}

/// Health reporting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Seconds between health messages (0 disables them).
    pub interval_s: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { interval_s: 30 }
    }
}

/// Shutdown.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long to keep publishing queued results after SIGINT/SIGTERM.
    pub drain_timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { drain_timeout_ms: 3000 }
    }
}

/// The `[commands]` table. Remote commands act on the whole daemon (check
/// and apply a new config, prepare a pipeline again), so `commands` sits
/// above this module and its table is kept here, with the daemon's own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// Subscribe to `edgeinfer/{device}/cmd/+` (opt-in).
    pub enabled: bool,
    /// Environment variable holding the HMAC secret.
    pub hmac_secret_env: Option<String>,
    /// File holding the HMAC secret (first line).
    pub hmac_secret_file: Option<PathBuf>,
    /// How far a command's `ts` may be from the device clock.
    pub max_skew_s: u64,
    /// Fleet groups this device is in: it also takes commands on `edgeinfer/group/<name>/cmd/+`.
    pub groups: Vec<String>,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            enabled: false,
            hmac_secret_env: None,
            hmac_secret_file: None,
            max_skew_s: 300,
            groups: Vec::new(),
        }
    }
}

impl CommandsConfig {
    /// Checks the values; the error names the key (without the `commands.` prefix).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.hmac_secret_env.is_some() && self.hmac_secret_file.is_some() {
            return Err(("hmac_secret_env".into(), "give hmac_secret_env or hmac_secret_file, not both".into()));
        }
        if self.max_skew_s == 0 {
            return Err(("max_skew_s".into(), "must be at least 1".into()));
        }
        for (ix, g) in self.groups.iter().enumerate() {
            if !is_topic_safe(g) {
                return Err((format!("groups[{ix}]"), format!("`{g}` must be letters, digits, `-`, `_` or `.`")));
            }
        }
        Ok(())
    }

    /// The HMAC secret, if one is configured; `resolve` makes a relative path absolute.
    pub fn secret(&self, resolve: &dyn Fn(&std::path::Path) -> PathBuf) -> Result<Option<Vec<u8>>, String> {
        crate::secret::read(
            self.hmac_secret_env.as_deref(),
            self.hmac_secret_file.as_deref(),
            ("commands.hmac_secret_env", "commands.hmac_secret_file"),
            resolve,
        )
    }
}

/// One pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Name used in topics and payloads.
    pub name: String,
    /// The ONNX model.
    pub model: PathBuf,
    /// Labels file (default: found next to the model).
    #[serde(default)]
    pub labels: Option<PathBuf>,
    /// Shape of the model's first input, when it is symbolic.
    #[serde(default)]
    pub input_shape: Option<Vec<usize>>,
    /// Run a QDQ int8 model on float kernels (faster in tract today; activation rounding is lost).
    #[serde(default)]
    pub qdq_as_float: bool,
    /// Threads for this pipeline's model (default: `engine.threads`).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Items queued between source and model.
    #[serde(default)]
    pub queue: Option<usize>,
    /// What to do when the queue is full.
    #[serde(default)]
    pub overflow: Option<Overflow>,
    /// Where inputs come from.
    pub source: SourceConfig,
    /// How inputs become tensors.
    #[serde(default)]
    pub preprocess: PreprocessConfig,
    /// How outputs become results.
    #[serde(default)]
    pub postprocess: Option<PostprocessConfig>,
    /// Where results go (default: one MQTT output with default settings).
    #[serde(default)]
    pub outputs: Vec<OutputConfig>,
    /// JPEG snapshots of frames with their detections drawn (camera pipelines).
    #[serde(default)]
    pub snapshot: Option<SnapshotConfig>,
}

/// Most inputs a pipeline queue may hold.
pub const MAX_QUEUE: usize = 1_000_000;

/// Reads the host name for the default device id.
fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "edgeinfer".into())
}

/// True for names safe inside an MQTT topic level.
fn is_topic_safe(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: shown.clone(), reason: e.to_string() })?;
        let mut cfg = Config::parse(&text, &shown)?;
        // `edgeinfer run app.toml` has an empty parent: that is the current directory.
        cfg.base_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        cfg.path = path.to_path_buf();
        cfg.validate(&shown)?;
        Ok(cfg)
    }

    /// Parses TOML text (no validation).
    pub fn parse(text: &str, shown: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: shown.into(), reason: one_line(&e.to_string()) })
    }

    /// The device id.
    pub fn device(&self) -> String {
        self.device.clone().unwrap_or_else(host_name)
    }

    /// A path from the config, resolved against the config's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Checks values and fills defaults that depend on other keys.
    pub fn validate(&mut self, shown: &str) -> Result<(), ConfigError> {
        let bad = |key: String, reason: String| ConfigError::Invalid { path: shown.into(), key, reason };
        let device = self.device();
        if !is_topic_safe(&device) {
            return Err(bad("device".into(), format!("`{device}` must be letters, digits, `-`, `_` or `.`")));
        }
        self.mqtt.validate().map_err(|(k, r)| bad(format!("mqtt.{k}"), r))?;
        self.broker.listen.parse::<std::net::SocketAddr>().map_err(|e| bad("broker.listen".into(), e.to_string()))?;
        crate::secret::check_login(
            self.broker.username.as_deref(),
            self.broker.password_env.is_some(),
            self.broker.password_file.is_some(),
        )
        .map_err(|(k, r)| bad(format!("broker.{k}"), r))?;
        if let Some(tls) = &self.broker.tls {
            tls.validate(&self.broker.listen).map_err(|(k, r)| bad(format!("broker.tls.{k}"), r))?;
            if self.mqtt.url.is_some() {
                let why = "the embedded broker does not run when mqtt.url is set (remove one of them)";
                return Err(bad("broker.tls".into(), why.into()));
            }
        }
        self.homeassistant.validate().map_err(|(k, r)| bad(format!("homeassistant.{k}"), r))?;
        self.commands.validate().map_err(|(k, r)| bad(format!("commands.{k}"), r))?;
        self.models.validate().map_err(|(k, r)| bad(format!("models.{k}"), r))?;
        if let Some(dir) = &self.models.dir {
            let dir = self.resolve(dir);
            if !dir.is_dir() {
                return Err(bad("models.dir".into(), format!("{} is not a directory", dir.display())));
            }
        }
        if let Some(http) = &self.http {
            http.validate().map_err(|(k, r)| bad(format!("http.{k}"), r))?;
        }
        check_threads(self.engine.threads).map_err(|r| bad("engine.threads".into(), r))?;
        if let Some(dir) = &self.engine.cache_dir {
            let dir = self.resolve(dir);
            if dir.exists() && !dir.is_dir() {
                return Err(bad("engine.cache_dir".into(), format!("{} is not a directory", dir.display())));
            }
        }
        if self.pipelines.is_empty() {
            return Err(bad("pipelines".into(), "at least one [[pipelines]] table is needed".into()));
        }
        let mut names = std::collections::HashSet::new();
        let mut file_paths = std::collections::HashSet::new();
        for (key, topic) in
            [("mqtt.status_topic", &self.mqtt.status_topic), ("mqtt.health_topic", &self.mqtt.health_topic)]
        {
            let rendered = topic.replace("{device}", &device);
            if rendered.contains(['{', '}']) || !crate::sink::mqtt::valid_topic(&rendered) {
                return Err(bad(
                    key.into(),
                    format!("`{topic}` is not a valid topic (placeholder: {{device}}; no `+` or `#`)"),
                ));
            }
        }
        for ix in 0..self.pipelines.len() {
            let key = |k: &str| format!("pipelines[{ix}].{k}");
            let p = &self.pipelines[ix];
            if !is_topic_safe(&p.name) {
                return Err(bad(key("name"), format!("`{}` must be letters, digits, `-`, `_` or `.`", p.name)));
            }
            if !names.insert(p.name.clone()) {
                return Err(bad(key("name"), format!("`{}` is used by two pipelines", p.name)));
            }
            let model = self.resolve(&p.model);
            if !model.is_file() {
                return Err(bad(key("model"), format!("{} does not exist", model.display())));
            }
            if let Some(l) = &p.labels {
                let l = self.resolve(l);
                if !l.is_file() {
                    return Err(bad(key("labels"), format!("{} does not exist", l.display())));
                }
            }
            if let Some(t) = p.threads {
                check_threads(t).map_err(|r| bad(key("threads"), r))?;
            }
            if p.queue.is_some_and(|q| q == 0 || q > MAX_QUEUE) {
                return Err(bad(key("queue"), format!("must be 1..={MAX_QUEUE}")));
            }
            if let Some(feature) = p.source.feature() {
                crate::features::require(feature, &format!("source type `{}`", p.source.kind()))
                    .map_err(|r| bad(key("source.type"), r))?;
            }
            p.source.validate().map_err(|(k, r)| bad(key(&format!("source.{k}")), r))?;
            if let Some(post) = &p.postprocess {
                post.validate().map_err(|(k, r)| bad(key(&format!("postprocess.{k}")), r))?;
            }
            if let PreprocessConfig::Audio(a) = &p.preprocess {
                crate::preprocess::audio::AudioPlan::resolve(a, &p.source.output())
                    .map_err(|e| bad(key(&format!("preprocess.{}", e.key)), e.reason))?;
            }
            p.preprocess.validate().map_err(|(k, r)| bad(key(&format!("preprocess.{k}")), r))?;
            if let Some(snap) = &p.snapshot {
                let skey = |k: &str| key(&format!("snapshot.{k}"));
                if !(p.source.is_frames() || matches!(p.source, SourceConfig::Files { .. })) {
                    return Err(bad(
                        key("snapshot"),
                        format!("needs a camera source (this one is {})", p.source.kind()),
                    ));
                }
                snap.validate().map_err(|(k, r)| bad(skey(&k), r))?;
            }
            let p = &mut self.pipelines[ix];
            if p.outputs.is_empty() {
                p.outputs.push(OutputConfig::default_mqtt());
            }
            for (ox, o) in p.outputs.iter().enumerate() {
                let okey = |k: &str| format!("pipelines[{ix}].outputs[{ox}].{k}");
                o.validate().map_err(|(k, r)| bad(okey(&k), r))?;
                if o.kind == OutputKind::File {
                    let path = self.base_dir.join(o.path.as_deref().unwrap_or(Path::new("")));
                    if !file_paths.insert(path.clone()) {
                        return Err(bad(
                            okey("path"),
                            format!("{} is already written by another file output", path.display()),
                        ));
                    }
                }
                if o.when == When::Threshold
                    && o.threshold.is_none()
                    && !matches!(p.postprocess, Some(PostprocessConfig::Anomaly { .. }))
                {
                    return Err(bad(
                        okey("threshold"),
                        "needed for when = \"threshold\" without an anomaly postprocess".into(),
                    ));
                }
            }
        }
        // Checked last: the default output (MQTT) is filled in above.
        if self.mqtt.url.is_none() && self.wants_mqtt() {
            crate::features::require("broker", "a config without mqtt.url (it starts the embedded MQTT broker)")
                .map_err(|r| bad("mqtt.url".into(), format!("{r}; or set mqtt.url = \"mqtt://HOST:1883\"")))?;
        }
        Ok(())
    }

    /// True when the daemon talks MQTT: a broker URL is set, or something publishes or subscribes.
    pub fn wants_mqtt(&self) -> bool {
        self.mqtt.url.is_some() || self.uses_mqtt() || self.commands.enabled
    }

    /// True when any output or source needs the MQTT broker.
    pub fn uses_mqtt(&self) -> bool {
        self.pipelines.iter().any(|p| {
            matches!(p.source, SourceConfig::Mqtt { .. }) || p.outputs.iter().any(|o| o.kind == OutputKind::Mqtt)
        })
    }
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty() && *l != "|").collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
device = "pi-1"
[[pipelines]]
name = "vib"
model = "m.onnx"
source = { type = "synthetic", signal = "sine" }
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "c.toml").unwrap();
        assert_eq!(c.mqtt.keep_alive_s, 30);
        assert!(c.mqtt.url.is_none());
        assert_eq!(c.broker.listen, "127.0.0.1:1883");
        assert!(matches!(c.pipelines[0].source, SourceConfig::Synthetic { rate_hz, .. } if rate_hz == 100.0));
    }

    #[test]
    fn engine_table_sets_threads_and_cache() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"").unwrap();
        let with = |extra: &str, pipeline_extra: &str| {
            let text = format!(
                "{}\n{extra}\n",
                MINIMAL.replace("model = \"m.onnx\"", &format!("model = \"m.onnx\"\n{pipeline_extra}"))
            );
            let mut c = Config::parse(&text, "c.toml")?;
            c.base_dir = dir.path().to_path_buf();
            c.validate("c.toml").map(|_| c)
        };
        let c = with("", "").unwrap();
        assert_eq!((c.engine.threads, c.engine.cache_dir.as_deref(), c.pipelines[0].threads), (1, None, None));
        let c = with("[engine]\ncache_dir = \"cache\"", "threads = 1").unwrap();
        assert_eq!(c.resolve(c.engine.cache_dir.as_ref().unwrap()), dir.path().join("cache"));
        assert_eq!(c.pipelines[0].threads, Some(1));
        if cfg!(feature = "threads") {
            let c = with("[engine]\nthreads = 2", "threads = 4").unwrap();
            assert_eq!((c.engine.threads, c.pipelines[0].threads), (2, Some(4)));
        } else {
            // Without tract's thread pool, more than one thread is refused, naming the key and feature.
            for (engine, pipeline, key) in
                [("[engine]\nthreads = 2", "", "`engine.threads`"), ("", "threads = 4", "`pipelines[0].threads`")]
            {
                let e = with(engine, pipeline).unwrap_err().to_string();
                assert!(e.contains(key) && e.contains("the `threads` feature"), "{e}");
            }
        }
        let e = with("[engine]\nthreads = 0", "").unwrap_err().to_string();
        assert!(e.contains("`engine.threads`"), "{e}");
        let e = with("", &format!("queue = {}", MAX_QUEUE + 1)).unwrap_err().to_string();
        assert!(e.contains("`pipelines[0].queue`") && e.contains("1..=1000000"), "{e}");
        assert!(with("", &format!("queue = {MAX_QUEUE}")).is_ok());
        let e = with("", "threads = 1000").unwrap_err().to_string();
        assert!(e.contains("`pipelines[0].threads`"), "{e}");
        let e = with("[engine]\ncache_dir = \"m.onnx\"", "").unwrap_err().to_string();
        assert!(e.contains("`engine.cache_dir`") && e.contains("not a directory"), "{e}");
        let e = with("[engine]\ncache = \"x\"", "").unwrap_err().to_string();
        assert!(e.contains("cache"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let text = MINIMAL.replace("device = \"pi-1\"", "device = \"pi-1\"\ncolour = 3");
        let e = Config::parse(&text, "c.toml").unwrap_err().to_string();
        assert!(e.contains("colour") && e.contains("line 3"), "{e}");
        let text = MINIMAL.replace("signal = \"sine\"", "signal = \"sine\", rate = 5");
        let e = Config::parse(&text, "c.toml").unwrap_err().to_string();
        assert!(e.contains("rate"), "{e}");
    }

    #[test]
    fn wrong_values_are_named() {
        let text = MINIMAL.replace("signal = \"sine\"", "signal = \"square\"");
        let e = Config::parse(&text, "c.toml").unwrap_err().to_string();
        assert!(e.contains("square"), "{e}");
        let mut c = Config::parse(&MINIMAL.replace("\"pi-1\"", "\"pi 1\""), "c.toml").unwrap();
        let e = c.validate("c.toml").unwrap_err().to_string();
        assert!(e.contains("`device`"), "{e}");
        // Values with a type of their own are parsed once, here, naming the key and the line.
        for (key, bad) in [("queue_fsync", "sometimes"), ("protocol", "4.0")] {
            let text = format!("{MINIMAL}[mqtt]\nurl = \"mqtt://b\"\n{key} = \"{bad}\"\n");
            let e = Config::parse(&text, "c.toml").unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(bad) && e.contains("line 9"), "{e}");
        }
        let text = format!("{MINIMAL}[mqtt]\nurl = \"mqtt://b\"\nqueue_fsync = \"2s\"\nprotocol = \"5\"\n");
        let c = Config::parse(&text, "c.toml").unwrap();
        assert_eq!(
            c.mqtt.queue_fsync,
            crate::sink::disk_queue::FsyncPolicy::Interval(std::time::Duration::from_secs(2))
        );
        assert_eq!(c.mqtt.protocol, crate::sink::mqtt_proto::Protocol::V5);
    }

    #[test]
    fn mqtt_urls_parse() {
        assert_eq!(parse_mqtt_url("mqtt://broker.local:1884").unwrap(), ("broker.local".into(), 1884));
        assert_eq!(parse_mqtt_url("mqtt://10.0.0.2").unwrap(), ("10.0.0.2".into(), 1883));
        assert!(parse_mqtt_url("http://x").is_err());
        assert!(parse_mqtt_url("mqtt://h:notaport").is_err());
        assert_eq!(parse_mqtt_url("mqtts://h").unwrap(), ("h".into(), 8883));
        assert_eq!(parse_mqtt_url("mqtts://h:443").unwrap(), ("h".into(), 443));
        assert_eq!(parse_mqtt_url("mqtts://[::1]").unwrap(), ("::1".into(), 8883));
        assert!(is_tls_url("mqtts://h") && !is_tls_url("mqtt://h"));
        assert_eq!(parse_mqtt_url("mqtt://[::1]").unwrap(), ("::1".into(), 1883));
        assert_eq!(parse_mqtt_url("mqtt://[::1]:1884").unwrap(), ("::1".into(), 1884));
        assert!(parse_mqtt_url("mqtt://user:pw@host:1883").unwrap_err().contains("credentials"));
    }

    #[test]
    fn optional_parts_this_build_lacks_are_refused_naming_the_feature() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"").unwrap();
        let validate = |text: &str| {
            let mut c = Config::parse(text, "c.toml").unwrap();
            c.base_dir = dir.path().to_path_buf();
            c.validate("c.toml").map_err(|e| e.to_string())
        };
        let expect = |r: Result<(), String>, on: bool, key: &str, feature: &str| match r {
            Ok(()) => assert!(on, "{feature}: accepted without the feature"),
            Err(e) => {
                assert!(!on, "{feature}: {e}");
                assert!(e.contains(&format!("`{key}`")) && e.contains(&format!("the `{feature}` feature")), "{e}");
            }
        };
        // No URL and the default MQTT output: the embedded broker.
        expect(validate(MINIMAL), cfg!(feature = "broker"), "mqtt.url", "broker");
        // Nothing that talks MQTT: no broker needed, in any build.
        let stdout_only = format!("{MINIMAL}  [[pipelines.outputs]]\n  type = \"stdout\"\n");
        validate(&stdout_only).unwrap();
        let tls = format!("[mqtt]\nurl = \"mqtts://b\"\n{}", MINIMAL.replace("device = \"pi-1\"", ""));
        expect(validate(&tls), cfg!(feature = "tls"), "mqtt.url", "tls");
        for (source, feature) in [
            ("{ type = \"serial\", port = \"/dev/ttyUSB0\" }", "serial"),
            ("{ type = \"http\", url = \"http://cam/\" }", "http-source"),
            ("{ type = \"v4l2\" }", "v4l2"),
        ] {
            let text = stdout_only.replace("{ type = \"synthetic\", signal = \"sine\" }", source);
            expect(validate(&text), crate::features::has(feature), "pipelines[0].source.type", feature);
        }
    }

    // Without `tls` an mqtts:// URL is refused first (tests/it/features.rs).
    #[cfg(feature = "tls")]
    #[test]
    fn mqtt_tls_table_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"").unwrap();
        let with = |mqtt: &str| {
            let mut c = Config::parse(&format!("{MINIMAL}\n[mqtt]\n{mqtt}\n"), "c.toml")?;
            c.base_dir = dir.path().to_path_buf();
            c.validate("c.toml").map(|_| c)
        };
        let c = with("url = \"mqtts://b\"\ntls = { ca_file = \"ca.pem\", cert_file = \"c.pem\", key_env = \"K\", alpn = [\"x-amzn-mqtt-ca\"], server_name = \"b.example\" }").unwrap();
        assert_eq!(c.mqtt.tls.unwrap().alpn, vec!["x-amzn-mqtt-ca".to_string()]);
        let e = with("url = \"mqtts://b\"\ntls = { ca_flie = \"x\" }").unwrap_err().to_string();
        assert!(e.contains("ca_flie"), "{e}");
        let e = with("url = \"mqtt://b\"\ntls = { ca_file = \"x\" }").unwrap_err().to_string();
        assert!(e.contains("`mqtt.tls`") && e.contains("plaintext"), "{e}");
        let e = with("tls = { ca_file = \"x\" }").unwrap_err().to_string();
        assert!(e.contains("`mqtt.tls`") && e.contains("mqtts://"), "{e}");
        let e = with("url = \"mqtts://b\"\ntls = { cert_file = \"c.pem\" }").unwrap_err().to_string();
        assert!(e.contains("mqtt.tls.key_file"), "{e}");
        let e = with("url = \"mqtts://b\"\ntls = { key_file = \"k.pem\" }").unwrap_err().to_string();
        assert!(e.contains("mqtt.tls.cert_file"), "{e}");
        let e = with("url = \"mqtts://b\"\ntls = { cert_file = \"c\", key_file = \"k\", key_env = \"K\" }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.tls.key_env"), "{e}");
        let e = with("url = \"mqtts://b\"\ntls = { alpn = [\"\"] }").unwrap_err().to_string();
        assert!(e.contains("mqtt.tls.alpn"), "{e}");
        assert!(with("url = \"mqtts://b:443\"").is_ok());
    }

    #[test]
    fn detect_keys_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"x").unwrap();
        let check = |post: &str| {
            let text = format!(
                "[mqtt]\nurl = \"mqtt://127.0.0.1\"\n\
                 [[pipelines]]\nname = \"p\"\nmodel = \"m.onnx\"\nsource = {{ type = \"lines\" }}\n\
                 [pipelines.postprocess]\ntype = \"detect\"\n{post}\n"
            );
            let mut c = crate::config::Config::parse(&text, "c.toml").map_err(|e| e.to_string())?;
            c.base_dir = dir.path().to_path_buf();
            c.validate("c.toml").map_err(|e| e.to_string())
        };
        check("").unwrap();
        check("min_score = 0.5\niou_threshold = 0.5\nmax_detections = 10\nclass_thresholds = { person = 0.6 }")
            .unwrap();
        for (post, key) in [
            ("min_score = 1.5", "postprocess.min_score"),
            ("iou_threshold = 0", "postprocess.iou_threshold"),
            ("max_detections = 0", "postprocess.max_detections"),
            ("class_thresholds = { person = -1 }", "postprocess.class_thresholds.person"),
            ("classes = []", "postprocess.classes"),
        ] {
            let e = check(post).unwrap_err();
            assert!(e.contains(key), "{post}: {e}");
        }
        let e = check("confidence = 0.5").unwrap_err();
        assert!(e.contains("confidence"), "{e}");
        let e = check("format = \"yolov9\"").unwrap_err();
        assert!(e.contains("yolov9"), "{e}");
    }

    #[test]
    fn config_rejects_two_secret_sources_and_reads_the_secret() {
        let c = CommandsConfig {
            hmac_secret_env: Some("A".into()),
            hmac_secret_file: Some("f".into()),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "hmac_secret_env");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "topsecret\n").unwrap();
        let c = CommandsConfig { hmac_secret_file: Some("s".into()), ..Default::default() };
        assert_eq!(c.secret(&|p| dir.path().join(p)).unwrap().as_deref(), Some(&b"topsecret"[..]));
        let c =
            CommandsConfig { hmac_secret_env: Some("EDGEINFER_TEST_CMD_SECRET_ABSENT".into()), ..Default::default() };
        assert!(c.secret(&|p| p.to_path_buf()).unwrap_err().contains("EDGEINFER_TEST_CMD_SECRET_ABSENT"));
        let c = CommandsConfig { groups: vec!["canary".into(), "site/a".into()], ..Default::default() };
        let (key, why) = c.validate().unwrap_err();
        assert_eq!(key, "groups[1]");
        assert!(why.contains("`site/a`"), "{why}");
    }

    #[test]
    fn the_whole_config_rejects_a_bad_homeassistant_key_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"x").unwrap();
        let text = "[homeassistant]\nenabled = true\nexpire_after_s = 0\n[[pipelines]]\nname = \"p\"\n\
                    model = \"m.onnx\"\nsource = { type = \"lines\" }\n";
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("homeassistant.expire_after_s"), "{e}");
        std::fs::write(&path, text.replace("expire_after_s = 0", "prefix = \"x\"")).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("prefix"), "{e}");
    }
}
