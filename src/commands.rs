//! Remote commands over MQTT: `edgeinfer/{device}/cmd/<name>` with JSON payloads, JSON replies on
//! `.../cmd/<name>/reply` (or, on MQTT 5, the request's response topic, with its correlation
//! data). Pause/resume a pipeline, change a threshold, publish health now, reload a model (loaded
//! and checked off the reactor; swapped into the worker between inputs) or the whole config
//! (checked, then the daemon restarts itself in place with it).
//! Optionally every command carries an HMAC-SHA256 over its canonical JSON and a timestamp.
//!
//! Access control belongs to the broker (ACLs); the HMAC is for brokers without them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;

use crate::config::{Config, PipelineConfig, PostprocessConfig, When};
use crate::engine::Session;
use crate::prepare::Prepared;
use crate::sink::mqtt::{Incoming, MqttHandle, OutMessage, PublishMeta, JSON};
use crate::tensor::Tensor;

type HmacSha256 = Hmac<Sha256>;

/// The HMAC-SHA256 (RFC 2104) state of `msg` under `key`.
fn mac(key: &[u8], msg: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    mac
}

/// HMAC-SHA256 (RFC 2104) of `msg` under `key`.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    mac(key, msg).finalize().into_bytes().into()
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string; `None` when it is not one.
fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

/// The signed text: the payload without `hmac`, keys sorted at every level, no whitespace
/// (Python: `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`).
pub fn canonical(obj: &Map<String, Value>) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&m[k]))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    let mut m = obj.clone();
    m.remove("hmac");
    sorted(&Value::Object(m)).to_string()
}

/// Checks `hmac` and `ts` of a command; `seen` remembers signatures inside the window so a
/// captured command cannot be replayed while its `ts` is still fresh.
pub fn verify(
    secret: &[u8],
    obj: &Map<String, Value>,
    now_s: f64,
    max_skew_s: u64,
    seen: &mut HashMap<String, f64>,
) -> Result<(), String> {
    let given = obj.get("hmac").ok_or("`hmac` is missing (this device requires signed commands)")?;
    let given = given.as_str().ok_or("`hmac` must be a hex string")?.to_ascii_lowercase();
    let ts = obj.get("ts").ok_or("`ts` is missing (unix seconds; signed commands need it)")?;
    let ts = ts.as_f64().ok_or("`ts` must be a number (unix seconds)")?;
    let signed = mac(secret, canonical(obj).as_bytes());
    // verify_slice compares in constant time; the signature is only known to be good after it.
    if from_hex(&given).is_none_or(|g| signed.clone().verify_slice(&g).is_err()) {
        return Err("`hmac` does not match the payload".into());
    }
    let want = hex(&signed.finalize().into_bytes());
    let skew = (now_s - ts).abs();
    if skew > max_skew_s as f64 {
        return Err(format!("`ts` is {skew:.0} s from the device clock (at most {max_skew_s} s allowed)"));
    }
    seen.retain(|_, t| (now_s - *t).abs() <= max_skew_s as f64);
    if seen.insert(want, ts).is_some() {
        return Err("replayed command (this signature was already used)".into());
    }
    Ok(())
}

/// Largest command payload: commands are a few fields; a larger payload is refused before
/// it is parsed (and, with an HMAC secret, before it is copied and sorted for the check).
pub const MAX_COMMAND_BYTES: usize = 64 << 10;

/// Refuses a payload over [`MAX_COMMAND_BYTES`].
pub fn check_size(payload: &[u8]) -> Result<(), String> {
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(format!(
            "the payload is {} bytes; commands are at most {} KiB",
            payload.len(),
            MAX_COMMAND_BYTES >> 10
        ));
    }
    Ok(())
}

/// A signed command names who it is for in `target` (covered by the signature): required on
/// a group topic, so a command signed for the canaries cannot be replayed to the whole group
/// (each device keeps its own replay cache); checked when present on a device topic.
fn check_target(obj: &Map<String, Value>, target: &str) -> Result<(), String> {
    match obj.get("target") {
        Some(Value::String(t)) if t == target => Ok(()),
        Some(other) => Err(format!("`target` is {other}, but this command came for `{target}`")),
        None if target.starts_with("group/") => {
            Err(format!("`target` is missing: a signed group command must name its group (`\"target\": \"{target}\"`)"))
        }
        None => Ok(()),
    }
}

/// Where `update_model` gets the model.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// An `https://` URL (and `URL.sig`).
    Url(String),
    /// A retained message on an MQTT topic, the model's bytes (and `TOPIC.sig`).
    Topic(String),
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Skip inference on a pipeline.
    Pause { pipeline: String },
    /// Undo `Pause`.
    Resume { pipeline: String },
    /// A new threshold for one output (or every threshold output and the anomaly postprocess).
    SetThreshold { pipeline: String, output: Option<usize>, threshold: f32 },
    /// Publish health now.
    Health,
    /// Load a model (None: the current file again) and swap it in.
    ReloadModel { pipeline: String, model: Option<PathBuf> },
    /// Download a model over HTTPS into the models directory, check it and swap it in.
    UpdateModel { pipeline: String, source: ModelSource, sha256: String, name: Option<String> },
    /// Read the config file again, check it, and restart in place with it.
    ReloadConfig,
}

/// Reads a command named `name` from its JSON object; errors name the field.
pub fn parse(name: &str, obj: &Map<String, Value>) -> Result<Command, String> {
    let string = |key: &str| -> Result<String, String> {
        match obj.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(other) => Err(format!("`{key}` must be a non-empty string, got {other}")),
            None => Err(format!("`{key}` is missing")),
        }
    };
    Ok(match name {
        "pause" => Command::Pause { pipeline: string("pipeline")? },
        "resume" => Command::Resume { pipeline: string("pipeline")? },
        "health" => Command::Health,
        "set_threshold" => {
            let threshold = match obj.get("threshold") {
                Some(v) => {
                    v.as_f64().filter(|t| t.is_finite()).ok_or(format!("`threshold` must be a number, got {v}"))?
                }
                None => return Err("`threshold` is missing".into()),
            };
            let output = match obj.get("output") {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .and_then(|u| usize::try_from(u).ok())
                        .ok_or(format!("`output` must be an output index (0, 1, ...), got {v}"))?,
                ),
            };
            Command::SetThreshold { pipeline: string("pipeline")?, output, threshold: threshold as f32 }
        }
        "reload_model" => {
            let model = match obj.get("model") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if !s.is_empty() => Some(PathBuf::from(s)),
                Some(v) => return Err(format!("`model` must be a path string, got {v}")),
            };
            Command::ReloadModel { pipeline: string("pipeline")?, model }
        }
        "update_model" => {
            let name = match obj.get("name") {
                None | Some(Value::Null) => None,
                Some(_) => Some(string("name")?),
            };
            let source = match (obj.contains_key("url"), obj.contains_key("topic")) {
                (true, false) => ModelSource::Url(string("url")?),
                (false, true) => ModelSource::Topic(string("topic")?),
                _ => return Err("give `url` (https://...) or `topic` (a retained MQTT message), one of them".into()),
            };
            Command::UpdateModel { pipeline: string("pipeline")?, source, sha256: string("sha256")?, name }
        }
        "reload_config" => Command::ReloadConfig,
        other => {
            return Err(format!(
                "unknown command `{other}` (known: pause, resume, set_threshold, health, reload_model, \
                 update_model, reload_config)"
            ))
        }
    })
}

/// A model checked and ready to replace a pipeline's current one.
pub struct Swap {
    /// Model and stages built for it.
    pub prepared: Prepared,
    /// A session made off the worker thread.
    pub session: Session,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// That file's SHA-256 as checked before loading (None: the configured model, not checked).
    pub file_sha256: Option<String>,
    /// Its probation: the worker keeps the old model until it is over.
    pub probation: crate::model_store::probation::Bounds,
    /// Told once the worker has switched.
    pub done: std::sync::mpsc::Sender<()>,
}

/// Changes waiting for the worker, applied between two inputs.
#[derive(Default)]
pub struct Pending {
    /// A model to switch to.
    pub swap: Option<Swap>,
    /// New thresholds: (output index or None for all threshold outputs, value).
    pub thresholds: Vec<(Option<usize>, f32)>,
}

/// What the command handler and one pipeline's worker share.
pub struct PipelineControl {
    /// Pipeline name.
    pub name: String,
    /// Inference is skipped while set (inputs are still drained).
    pub paused: AtomicBool,
    /// Inputs skipped while paused.
    pub skipped_paused: AtomicU64,
    /// Set when `pending` holds something; the worker checks it before each input.
    pub dirty: AtomicBool,
    /// Changes for the worker.
    pub pending: Mutex<Pending>,
    /// Model file in use (after the last swap).
    pub model_path: Mutex<PathBuf>,
    /// Its SHA-256 as checked when it was loaded at run time or from the state file
    /// (None: the configured model).
    pub model_sha256: Mutex<Option<String>>,
    /// Model name in use.
    pub model_name: Mutex<String>,
    /// Input of the model in use, and the postprocess kind: a replacement must match them.
    fit: Mutex<(crate::engine::TensorSpec, &'static str)>,
    /// Current thresholds per output (None: not a threshold output).
    pub thresholds: Mutex<Vec<Option<f32>>>,
    /// The anomaly postprocess threshold, if it is one.
    pub anomaly_threshold: Mutex<Option<f32>>,
    /// Successful model reloads.
    pub reloads: AtomicU64,
    /// Models swapped back out after failing their probation.
    pub rollbacks: AtomicU64,
    /// The last run-time model change: on probation, accepted or rolled back (health `model_update`).
    pub update: Mutex<Option<Value>>,
    /// A reload is loading a model now (one at a time: a burst must not run a Pi out of memory).
    reloading: AtomicBool,
    cfg: PipelineConfig,
    /// The model the config file names (resolved), trusted without the models directory's rules.
    configured: PathBuf,
    /// Where an accepted update is recorded for the next start.
    active: Option<Arc<crate::model_store::active::ActiveModels>>,
}

impl PipelineControl {
    /// The control of a prepared pipeline, with the thresholds it starts with.
    pub fn new(
        prep: &Prepared,
        model_path: PathBuf,
        model_sha256: Option<String>,
        configured: PathBuf,
        active: Option<Arc<crate::model_store::active::ActiveModels>>,
    ) -> Arc<Self> {
        let anomaly = prep.post.anomaly_threshold();
        let thresholds = prep
            .cfg
            .outputs
            .iter()
            .map(|o| (o.when == When::Threshold).then(|| o.threshold.or(anomaly).unwrap_or(0.5)))
            .collect();
        Arc::new(PipelineControl {
            name: prep.cfg.name.clone(),
            paused: AtomicBool::new(false),
            skipped_paused: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            pending: Mutex::new(Pending::default()),
            model_path: Mutex::new(model_path),
            model_sha256: Mutex::new(model_sha256),
            model_name: Mutex::new(prep.model.info().name.clone()),
            fit: Mutex::new((prep.model.inputs()[0].clone(), prep.post.kind_name())),
            thresholds: Mutex::new(thresholds),
            anomaly_threshold: Mutex::new(anomaly),
            reloads: AtomicU64::new(0),
            rollbacks: AtomicU64::new(0),
            update: Mutex::new(None),
            reloading: AtomicBool::new(false),
            cfg: prep.cfg.clone(),
            configured,
            active,
        })
    }

    /// Takes what is pending (the worker calls this when `dirty` was set).
    pub fn take_pending(&self) -> Pending {
        self.dirty.store(false, Relaxed);
        self.pending.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default()
    }

    /// The anomaly postprocess config with `threshold`, for rebuilding the postprocessor.
    pub fn anomaly_config(&self, threshold: f32) -> Option<PostprocessConfig> {
        match self.cfg.postprocess.clone() {
            Some(PostprocessConfig::Anomaly { score, normal_class, output, .. }) => {
                Some(PostprocessConfig::Anomaly { threshold, score, normal_class, output })
            }
            _ => None,
        }
    }

    /// The worker now runs `prep`, loaded from `path` with this checked SHA-256 (after a swap
    /// or a rollback): the next `reload_model` is checked against it.
    pub fn now_running(&self, prep: &Prepared, path: &std::path::Path, sha256: Option<String>) {
        if let Ok(mut m) = self.model_path.lock() {
            *m = path.to_path_buf();
        }
        if let Ok(mut s) = self.model_sha256.lock() {
            *s = sha256;
        }
        if let Ok(mut f) = self.fit.lock() {
            *f = (prep.model.inputs()[0].clone(), prep.post.kind_name());
        }
        if let Ok(mut m) = self.model_name.lock() {
            *m = prep.model.info().name.clone();
        }
    }

    /// Records, for the next start, the model the worker now runs (its configured model:
    /// the record is removed). Runs on the worker between two inputs, once per model change:
    /// one small atomic write, no hashing (the hash checked at load is recorded). Failures
    /// are logged: the model runs anyway.
    pub fn persist(&self) {
        let Some(active) = &self.active else { return };
        let path = self.model_path.lock().map(|p| p.clone()).unwrap_or_default();
        let sha256 = self.model_sha256.lock().ok().and_then(|s| s.clone());
        let entry = match sha256 {
            _ if path == self.configured => None,
            Some(sha256) => Some(crate::model_store::active::Entry {
                path,
                sha256,
                configured: self.configured.clone(),
                since: crate::payload::rfc3339(std::time::SystemTime::now()),
            }),
            None => {
                log::warn!("pipeline `{}`: model state not saved: {} has no checked hash", self.name, path.display());
                return;
            }
        };
        if let Err(e) = active.set(&self.name, entry) {
            log::warn!("pipeline `{}`: model state not saved ({}): {e}", self.name, active.path().display());
        }
    }

    /// Records the state of the last run-time model change.
    pub fn set_update(&self, state: Value) {
        if let Ok(mut u) = self.update.lock() {
            *u = Some(state);
        }
    }

    fn push(&self, f: impl FnOnce(&mut Pending)) {
        if let Ok(mut p) = self.pending.lock() {
            f(&mut p);
        }
        self.dirty.store(true, Relaxed);
    }
}

/// Command counters and every pipeline's control; also adds their figures to health.
pub struct Registry {
    /// One per pipeline, in config order; set once the pipelines run.
    controls: OnceLock<Vec<Arc<PipelineControl>>>,
    /// Commands that arrived.
    pub received: AtomicU64,
    /// Commands answered with an error.
    pub failed: AtomicU64,
}

impl Registry {
    /// An empty registry: commands are answered "starting" until [`Registry::set_controls`].
    pub fn new() -> Arc<Self> {
        Arc::new(Registry { controls: OnceLock::new(), received: AtomicU64::new(0), failed: AtomicU64::new(0) })
    }

    /// The pipelines' controls, once they run (a second call is ignored).
    pub fn set_controls(&self, controls: Vec<Arc<PipelineControl>>) {
        let _ = self.controls.set(controls);
    }

    fn controls(&self) -> &[Arc<PipelineControl>] {
        self.controls.get().map(Vec::as_slice).unwrap_or_default()
    }

    fn control(&self, name: &str) -> Result<&Arc<PipelineControl>, String> {
        let controls = self.controls.get().ok_or("starting up: the pipelines are not running yet; try again")?;
        controls.iter().find(|c| c.name == name).ok_or_else(|| {
            let names: Vec<&str> = controls.iter().map(|c| c.name.as_str()).collect();
            format!("unknown pipeline `{name}` (pipelines: {names:?})")
        })
    }

    /// Adds `commands` and per-pipeline `paused`, `skipped_paused`, `model`, `thresholds` to health.
    pub fn augment(&self, health: &mut Value) {
        health["commands"] = json!({"received": self.received.load(Relaxed), "failed": self.failed.load(Relaxed)});
        for c in self.controls() {
            let Some(p) = health["pipelines"].get_mut(&c.name).and_then(Value::as_object_mut) else { continue };
            p.insert("paused".into(), c.paused.load(Relaxed).into());
            p.insert("skipped_paused".into(), c.skipped_paused.load(Relaxed).into());
            p.insert("model_reloads".into(), c.reloads.load(Relaxed).into());
            p.insert("model_rollbacks".into(), c.rollbacks.load(Relaxed).into());
            p.insert("model_update".into(), c.update.lock().ok().and_then(|u| u.clone()).unwrap_or(Value::Null));
            if let Ok(name) = c.model_name.lock() {
                p.insert("model".into(), name.as_str().into());
            }
            if let Ok(t) = c.thresholds.lock() {
                p.insert("thresholds".into(), thresholds_json(&t));
            }
        }
    }
}

/// Publishes the health message now and returns it.
pub type HealthNow = Arc<dyn Fn() -> Value + Send + Sync>;

/// Asks the daemon to restart in place with its (checked) config file.
pub type RestartNow = Arc<dyn Fn() + Send + Sync>;

/// What the command handler needs.
struct Handler {
    cfg: Arc<Config>,
    device: String,
    hub: MqttHandle,
    registry: Arc<Registry>,
    health: Arc<OnceLock<HealthNow>>,
    restart: RestartNow,
    secret: Option<Vec<u8>>,
    seen: Mutex<HashMap<String, f64>>,
    /// A reload_config is being checked (one at a time).
    reloading_config: AtomicBool,
}

/// Where a reply goes: the request's MQTT 5 response topic (with its correlation data), or
/// `.../cmd/<name>/reply`.
struct ReplyTo {
    topic: String,
    correlation_data: Option<Vec<u8>>,
}

/// Subscribes to `edgeinfer/{device}/cmd/+` when `[commands]` is enabled, before the pipelines
/// start (commands that arrive before they run are answered "starting up"). `health` is filled
/// in once health can be published. Errors (a missing secret) stop the start-up.
pub fn start(
    cfg: &Config,
    device: &str,
    hub: Option<&MqttHandle>,
    registry: Arc<Registry>,
    health: Arc<OnceLock<HealthNow>>,
    restart: RestartNow,
) -> anyhow::Result<()> {
    if !cfg.commands.enabled {
        return Ok(());
    }
    let Some(hub) = hub else {
        anyhow::bail!("commands.enabled needs MQTT");
    };
    let secret = cfg.commands.secret(&|p| cfg.resolve(p)).map_err(anyhow::Error::msg)?;
    let filter = format!("edgeinfer/{device}/cmd/+");
    // A fleet group's commands reach every member; each replies on its own topic.
    let filters: Vec<String> = std::iter::once(filter)
        .chain(cfg.commands.groups.iter().map(|g| format!("edgeinfer/group/{g}/cmd/+")))
        .collect();
    log::info!(
        "commands: listening on {}{}",
        filters.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", "),
        if secret.is_some() { " (HMAC-signed commands only)" } else { "" }
    );
    let handler = Arc::new(Handler {
        cfg: Arc::new(cfg.clone()),
        device: device.to_string(),
        hub: hub.clone(),
        registry,
        health,
        restart,
        secret,
        seen: Mutex::new(HashMap::new()),
        reloading_config: AtomicBool::new(false),
    });
    // Retained commands are ignored: they would run again on every reconnect.
    for f in &filters {
        let handler = handler.clone();
        hub.subscribe_live(f, 1, Arc::new(move |m: &Incoming| handler.clone().on_message(m)));
    }
    Ok(())
}

/// The reply topic for command `name`.
fn reply_topic(device: &str, name: &str) -> String {
    format!("edgeinfer/{device}/cmd/{name}/reply")
}

impl Handler {
    /// Runs on the connection task: everything here is quick; model loading goes to a thread.
    fn on_message(self: Arc<Self>, m: &Incoming) {
        let name = m.topic.rsplit('/').next().unwrap_or("").to_string();
        self.registry.received.fetch_add(1, Relaxed);
        let to = match m.response_topic.as_deref() {
            Some(t) if crate::sink::mqtt::valid_topic(t) => t.to_string(),
            Some(t) => {
                log::warn!("commands: `{name}`: response topic `{t}` is not a valid topic; replying on the default");
                reply_topic(&self.device, &name)
            }
            None => reply_topic(&self.device, &name),
        };
        let to = ReplyTo { topic: to, correlation_data: m.correlation_data.as_ref().map(|c| c.to_vec()) };
        let mut id = Value::Null;
        // Who the command was sent to: this device, or a group it is in.
        let target = match m.topic.strip_prefix("edgeinfer/group/").and_then(|t| t.split('/').next()) {
            Some(group) => format!("group/{group}"),
            None => self.device.clone(),
        };
        let outcome =
            self.accept(&name, &target, &m.payload, &mut id).and_then(|cmd| self.execute(&name, cmd, &to, id.clone()));
        match outcome {
            Ok(None) => {} // answered later (reload_model, reload_config)
            Ok(Some(result)) => self.reply(&name, &to, id, Ok(result)),
            Err(e) => self.reply(&name, &to, id, Err(e)),
        }
    }

    fn accept(&self, name: &str, target: &str, payload: &[u8], id: &mut Value) -> Result<Command, String> {
        check_size(payload)?;
        let value: Value = serde_json::from_slice(payload).map_err(|e| format!("malformed JSON: {e}"))?;
        let Value::Object(obj) = value else { return Err("the payload must be a JSON object".into()) };
        *id = obj.get("id").cloned().unwrap_or(Value::Null);
        if let Some(secret) = &self.secret {
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
            let mut seen = self.seen.lock().map_err(|_| "internal: replay cache poisoned".to_string())?;
            verify(secret, &obj, now, self.cfg.commands.max_skew_s, &mut seen)?;
            check_target(&obj, target)?;
        }
        parse(name, &obj)
    }

    fn reply(&self, name: &str, to: &ReplyTo, id: Value, outcome: Result<Value, String>) {
        let body = match outcome {
            Ok(result) => json!({"id": id, "ok": true, "command": name, "device": self.device, "result": result}),
            Err(error) => {
                self.registry.failed.fetch_add(1, Relaxed);
                log::warn!("commands: `{name}` failed: {error}");
                json!({"id": id, "ok": false, "command": name, "device": self.device, "error": error})
            }
        };
        // A name with `+`/`#` cannot come from a subscription match, but keep the topic valid anyway.
        if !crate::sink::mqtt::valid_topic(&to.topic) {
            return;
        }
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut msg = OutMessage::raw(to.topic.clone(), bytes, 1, false, JSON);
        msg.meta = PublishMeta { correlation_data: to.correlation_data.clone(), ..msg.meta };
        self.hub.enqueue(msg);
    }

    /// Runs `job` (loading a model for pipeline `c`) on a thread of its own and replies with
    /// its outcome; one at a time per pipeline (a burst must not run a Pi out of memory).
    fn spawn_loader(
        self: &Arc<Self>,
        c: &Arc<PipelineControl>,
        name: &str,
        to: &ReplyTo,
        id: Value,
        job: impl FnOnce(&PipelineControl) -> Result<Value, String> + Send + 'static,
    ) -> Result<Option<Value>, String> {
        /// Clears the pipeline's loading flag however the job ends, a panic included.
        struct Loading(Arc<PipelineControl>);
        impl Drop for Loading {
            fn drop(&mut self) {
                self.0.reloading.store(false, Relaxed);
            }
        }
        if c.reloading.swap(true, Relaxed) {
            return Err(format!("pipeline `{}` is already loading a model; try again when it replied", c.name));
        }
        let loading = Loading(c.clone());
        let (me, name) = (self.clone(), name.to_string());
        let to = ReplyTo { topic: to.topic.clone(), correlation_data: to.correlation_data.clone() };
        let thread = format!("{name}-{}", c.name);
        std::thread::Builder::new()
            .name(thread)
            .stack_size(8 << 20)
            .spawn(move || {
                let outcome = job(&loading.0);
                drop(loading);
                me.reply(&name, &to, id, outcome);
            })
            .map_err(|e| format!("cannot start the loader thread: {e}"))?;
        Ok(None)
    }

    /// Ok(None): the reply comes later from another thread.
    fn execute(self: &Arc<Self>, name: &str, cmd: Command, to: &ReplyTo, id: Value) -> Result<Option<Value>, String> {
        match cmd {
            Command::Pause { pipeline } | Command::Resume { pipeline } => {
                let c = self.registry.control(&pipeline)?;
                let pause = name == "pause";
                let was = c.paused.swap(pause, Relaxed);
                log::info!("commands: pipeline `{pipeline}` {}", if pause { "paused" } else { "resumed" });
                Ok(Some(json!({"pipeline": pipeline, "paused": pause, "was_paused": was})))
            }
            Command::Health => match self.health.get() {
                Some(health) => Ok(Some(health())),
                None => Err("starting up: health is not available yet; try again".into()),
            },
            Command::SetThreshold { pipeline, output, threshold } => {
                let c = self.registry.control(&pipeline)?;
                let mut thresholds = c.thresholds.lock().map_err(|_| "internal: lock poisoned")?;
                let mut anomaly = c.anomaly_threshold.lock().map_err(|_| "internal: lock poisoned")?;
                match output {
                    Some(ix) => match thresholds.get_mut(ix) {
                        Some(Some(t)) => *t = threshold,
                        Some(None) => {
                            return Err(format!(
                                "output {ix} of pipeline `{pipeline}` is not a when = \"threshold\" output"
                            ))
                        }
                        None => {
                            return Err(format!(
                                "pipeline `{pipeline}` has {} outputs, no output {ix}",
                                thresholds.len()
                            ))
                        }
                    },
                    None => {
                        if anomaly.is_none() && thresholds.iter().all(Option::is_none) {
                            return Err(format!(
                                "pipeline `{pipeline}` has no threshold: no when = \"threshold\" output and no \
                                 anomaly postprocess"
                            ));
                        }
                        thresholds.iter_mut().flatten().for_each(|t| *t = threshold);
                        if let Some(a) = anomaly.as_mut() {
                            *a = threshold;
                        }
                    }
                }
                c.push(|p| p.thresholds.push((output, threshold)));
                Ok(Some(json!({
                    "pipeline": pipeline,
                    "thresholds": thresholds_json(&thresholds),
                    "anomaly_threshold": anomaly.map(short),
                })))
            }
            Command::ReloadModel { pipeline, model } => {
                let c = self.registry.control(&pipeline)?.clone();
                let requested = match model {
                    Some(p) => self.cfg.resolve(&p),
                    None => c.model_path.lock().map_err(|_| "internal: lock poisoned")?.clone(),
                };
                // The path came in a message: only the configured model (trusted like the config
                // file) or a file inside the models directory, signed when keys are set.
                let configured = c.configured.clone();
                let (path, store) = if requested == configured {
                    (requested, None)
                } else {
                    let store = self.cfg.models.store(&|p| self.cfg.resolve(p), &configured)?;
                    (store.confine(&requested).map_err(|e| format!("pipeline `{pipeline}`: {e}"))?, Some(store))
                };
                let cfg = self.cfg.clone();
                self.spawn_loader(&c, name, to, id, move |loader| {
                    match store.as_ref().map(|s| s.check(&path)).transpose() {
                        Ok(provenance) => reload(&cfg, loader, &path, provenance),
                        Err(e) => Err(format!("pipeline `{}`: {e}", loader.name)),
                    }
                })
            }
            Command::UpdateModel { pipeline, source, sha256, name: file } => {
                let c = self.registry.control(&pipeline)?.clone();
                let store = self.cfg.models.store(&|p| self.cfg.resolve(p), &c.configured)?;
                let (cfg, hub) = (self.cfg.clone(), self.hub.clone());
                self.spawn_loader(&c, name, to, id, move |loader| {
                    update(&cfg, loader, &store, &hub, &source, &sha256, file.as_deref())
                })
            }
            Command::ReloadConfig => {
                if self.reloading_config.swap(true, Relaxed) {
                    return Err("a reload_config is already being checked; try again when it replied".into());
                }
                let me = self.clone();
                let name = name.to_string();
                let to = ReplyTo { topic: to.topic.clone(), correlation_data: to.correlation_data.clone() };
                let spawned =
                    std::thread::Builder::new().name("reload-config".into()).stack_size(8 << 20).spawn(move || {
                        let outcome = check_new_config(&me.cfg);
                        let ok = outcome.is_ok();
                        if !ok {
                            me.reloading_config.store(false, Relaxed);
                        }
                        // The reply is queued before the restart begins, and the restart
                        // publishes what is queued before it disconnects.
                        me.reply(&name, &to, id, outcome);
                        if ok {
                            (me.restart)();
                        }
                    });
                if let Err(e) = spawned {
                    self.reloading_config.store(false, Relaxed);
                    return Err(format!("cannot start the checker thread: {e}"));
                }
                Ok(None)
            }
        }
    }
}

/// Reads the config file the daemon runs again and checks it as `edgeinfer check` does (every
/// model loaded); on success, what would change.
pub fn check_new_config(current: &Config) -> Result<Value, String> {
    let path = current.path.clone();
    let new = Config::load(&path).map_err(|e| format!("{e}; the running config stays"))?;
    crate::prepare::check(&new).map_err(|e| format!("{}: {e:#}; the running config stays", path.display()))?;
    let old_names: Vec<&str> = current.pipelines.iter().map(|p| p.name.as_str()).collect();
    let new_names: Vec<&str> = new.pipelines.iter().map(|p| p.name.as_str()).collect();
    let added: Vec<&str> = new_names.iter().copied().filter(|n| !old_names.contains(n)).collect();
    let removed: Vec<&str> = old_names.iter().copied().filter(|n| !new_names.contains(n)).collect();
    let changed: Vec<&str> = new
        .pipelines
        .iter()
        .filter(|p| current.pipelines.iter().any(|o| o.name == p.name && format!("{o:?}") != format!("{p:?}")))
        .map(|p| p.name.as_str())
        .collect();
    let differs = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    Ok(json!({
        "config": path,
        "pipelines": new_names,
        "added": added,
        "removed": removed,
        "changed": changed,
        "mqtt_changed": differs(&current.mqtt, &new.mqtt),
        "restarting": true,
    }))
}

/// Loads `path` for the pipeline, checks it fits (and, with `provenance`, that the
/// file loaded is the one whose hash was checked), runs it on its reference input (or
/// zeros), hands it to the worker and waits for the switch.
fn reload(
    cfg: &Config,
    c: &PipelineControl,
    path: &std::path::Path,
    provenance: Option<crate::model_store::Provenance>,
) -> Result<Value, String> {
    let mut p = c.cfg.clone();
    p.model = path.to_path_buf();
    // Rebuilt with the current anomaly threshold, so a reload keeps a changed threshold.
    if let Some(t) = c.anomaly_threshold.lock().ok().and_then(|a| *a) {
        p.postprocess = c.anomaly_config(t).or(p.postprocess);
    }
    let prepared = crate::prepare::prepare(cfg, &p).map_err(|e| format!("{e:#}"))?;
    // A converted model names the hash of the ONNX file it came from, not its own.
    let converted = prepared.model.info().origin == crate::engine::Origin::Converted;
    if let Some(checked) = provenance.as_ref().filter(|_| !converted) {
        let loaded = &prepared.model.info().sha256;
        if *loaded != checked.sha256 {
            return Err(format!(
                "{}: the file changed while it was being loaded (sha256 {} checked, {loaded} loaded)",
                path.display(),
                checked.sha256
            ));
        }
    }
    let new_fit = (prepared.model.inputs()[0].clone(), prepared.post.kind_name());
    {
        let fit = c.fit.lock().map_err(|_| "internal: lock poisoned")?;
        let (old, new) = (&fit.0, &new_fit.0);
        // The preprocessing (and whoever reads the results) was set up for the current model:
        // a different rank or element type is a different kind of input, not a new version.
        if old.shape.len() != new.shape.len() || old.elem_type != new.elem_type {
            return Err(format!(
                "pipeline `{}`: {} takes {:?} {}, the current model {:?} {} (rank and type must match)",
                c.name,
                path.display(),
                new.shape,
                new.elem_type,
                old.shape,
                old.elem_type
            ));
        }
        if fit.1 != new_fit.1 {
            return Err(format!(
                "pipeline `{}`: {} gives `{}` results, the current model `{}`",
                c.name,
                path.display(),
                new_fit.1,
                fit.1
            ));
        }
    }
    let mut session = prepared.model.session().map_err(|e| e.to_string())?;
    let spec = &prepared.model.inputs()[0];
    let stem = prepared.model.info().name.clone();
    let ref_input = path.parent().map(|d| d.join("ref").join(&stem).join("in0.npy")).filter(|f| f.is_file());
    let (input, checked_on) = match &ref_input {
        Some(f) => {
            let t = Tensor::read_npy(f).map_err(|e| format!("reference input {}: {e}", f.display()))?;
            if t.shape != spec.shape || t.elem_type() != spec.elem_type {
                return Err(format!(
                    "reference input {} is {:?} {}, the model wants {:?} {}",
                    f.display(),
                    t.shape,
                    t.elem_type(),
                    spec.shape,
                    spec.elem_type
                ));
            }
            (t, f.display().to_string())
        }
        None => (Tensor::zeros(&spec.shape, spec.elem_type), "zeros".to_string()),
    };
    let outputs = session.run(std::slice::from_ref(&input)).map_err(|e| format!("test inference failed: {e}"))?;
    for (o, s) in outputs.iter().zip(prepared.model.outputs()) {
        if o.data.to_f64_vec().iter().any(|v| !v.is_finite()) {
            return Err(format!("test inference: output `{}` is not finite", s.name));
        }
    }
    let info = prepared.model.info().clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let probation = cfg.models.probation();
    let file_sha256 = provenance.as_ref().map(|p| p.sha256.clone());
    let swap = Swap { prepared, session, path: path.to_path_buf(), file_sha256, probation, done: tx };
    c.push(|pending| pending.swap = Some(swap));
    let swapped = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(()) => true,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            return Err("superseded by a newer reload_model before the worker took it".into())
        }
    };
    c.reloads.fetch_add(1, Relaxed);
    log::info!("commands: pipeline `{}`: model {} loaded (checked on {checked_on})", c.name, info.path.display());
    Ok(json!({
        "pipeline": c.name,
        "model": info.name,
        "path": info.path,
        "sha256": info.sha256,
        "quantization": info.quantization,
        "checked_on": checked_on,
        "signed_by": provenance.and_then(|p| p.signed_by),
        // False: no input arrived within 10 s; the worker switches before its next input.
        "swapped": swapped,
        // The old model comes back if these first inferences fail too often or run too slowly.
        "probation_inferences": probation.inferences,
    }))
}

/// `update_model`: brings the model into the models directory (HTTPS or a retained MQTT
/// message), then checks and swaps it like `reload_model`.
fn update(
    cfg: &Config,
    c: &PipelineControl,
    store: &crate::model_store::Store,
    hub: &MqttHandle,
    source: &ModelSource,
    sha256: &str,
    name: Option<&str>,
) -> Result<Value, String> {
    let named = |e: String| format!("pipeline `{}`: {e}", c.name);
    let (got, from) = match source {
        ModelSource::Url(url) => {
            let ca_file = cfg.models.ca_file.as_ref().map(|f| cfg.resolve(f));
            let got = download(store, ca_file.as_deref(), url, sha256, name).map_err(named)?;
            (got, json!({"url": url.split('?').next().unwrap_or(url)}))
        }
        ModelSource::Topic(topic) => {
            (from_topic(store, hub, topic, sha256, name).map_err(named)?, json!({"topic": topic}))
        }
    };
    log::info!(
        "commands: pipeline `{}`: {} {} ({} bytes)",
        c.name,
        if got.reused { "already have" } else { "received" },
        got.path.display(),
        got.bytes
    );
    let path = store.confine(&got.path).map_err(named)?;
    let provenance = match store.check(&path) {
        Ok(p) => p,
        Err(e) => {
            // Never trusted: a signature that fails does not stay (the next update fetches it
            // again), nor does a model just received with it.
            if store.requires_signatures() {
                let _ = std::fs::remove_file(crate::model_store::signature::path_for(&path));
            }
            if !got.reused {
                let _ = std::fs::remove_file(&path);
            }
            return Err(named(e));
        }
    };
    let mut result = reload(cfg, c, &path, Some(provenance))?;
    let mut downloaded = from;
    downloaded["bytes"] = got.bytes.into();
    downloaded["reused"] = got.reused.into();
    result["downloaded"] = downloaded;
    Ok(result)
}

/// How long `update_model` waits for a retained model (or signature) message.
const RETAINED_WAIT: Duration = Duration::from_secs(30);

/// The model (and, when models must be signed, its signature) from retained messages on
/// `topic` and `TOPIC.sig`. Limited by the MQTT packet size (8 MiB).
fn from_topic(
    store: &crate::model_store::Store,
    hub: &MqttHandle,
    topic: &str,
    sha256: &str,
    name: Option<&str>,
) -> Result<crate::model_store::incoming::Downloaded, String> {
    use crate::model_store::incoming;
    let name = incoming::file_name(topic, name)?;
    let bytes = hub.fetch_retained(topic, RETAINED_WAIT)?;
    let got =
        incoming::save(store.dir(), name, sha256, store.max_bytes(), &bytes).map_err(|e| format!("`{topic}`: {e}"))?;
    if store.requires_signatures() {
        let sig = hub.fetch_retained(&format!("{topic}.sig"), RETAINED_WAIT).and_then(|sig| {
            if sig.len() as u64 > crate::model_store::signature::MAX_BYTES {
                return Err(format!("`{topic}.sig`: {} bytes is not a signature", sig.len()));
            }
            incoming::save_signature(&got.path, &sig)
        });
        if let Err(e) = sig {
            if !got.reused {
                let _ = std::fs::remove_file(&got.path);
            }
            return Err(format!("{e} (the signature; models must be signed)"));
        }
    }
    Ok(got)
}

#[cfg(feature = "model-fetch")]
fn download(
    store: &crate::model_store::Store,
    ca_file: Option<&std::path::Path>,
    url: &str,
    sha256: &str,
    name: Option<&str>,
) -> Result<crate::model_store::incoming::Downloaded, String> {
    use crate::model_store::fetch;
    let agent = fetch::agent(ca_file)?;
    let req = fetch::Request { url, sha256, name, signature: store.requires_signatures() };
    fetch::fetch(&agent, &req, store.dir(), store.max_bytes())
}

#[cfg(not(feature = "model-fetch"))]
fn download(
    _: &crate::model_store::Store,
    _: Option<&std::path::Path>,
    _: &str,
    _: &str,
    _: Option<&str>,
) -> Result<crate::model_store::incoming::Downloaded, String> {
    Err(crate::features::not_built("model-fetch", "update_model from a URL (downloads over HTTPS)"))
}

/// An f32 as the shortest decimal that reads back to it (0.1, not 0.10000000149011612).
fn short(x: f32) -> Value {
    x.to_string().parse::<f64>().map(Value::from).unwrap_or(Value::Null)
}

fn thresholds_json(t: &[Option<f32>]) -> Value {
    Value::Array(t.iter().map(|x| x.map(short).unwrap_or(Value::Null)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        // Test case 6: a key longer than the block is hashed first.
        let mac = hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First");
        assert_eq!(hex(&mac), "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    }

    #[test]
    fn canonical_form_sorts_keys_and_drops_the_hmac() {
        let o = obj(r#"{"ts": 5, "hmac": "x", "b": {"z": 1, "a": [2, {"d": 1, "c": 0}]}, "a": "é"}"#);
        assert_eq!(canonical(&o), r#"{"a":"é","b":{"a":[2,{"c":0,"d":1}],"z":1},"ts":5}"#);
    }

    #[test]
    fn signatures_are_checked_with_their_time_window_and_replays() {
        let secret = b"s3cret";
        let mut o = obj(r#"{"id": 1, "pipeline": "p", "ts": 1000}"#);
        let mac = hex(&hmac_sha256(secret, canonical(&o).as_bytes()));
        o.insert("hmac".into(), mac.clone().into());
        let mut seen = HashMap::new();
        assert_eq!(verify(secret, &o, 1010.0, 300, &mut seen), Ok(()));
        assert!(verify(secret, &o, 1011.0, 300, &mut seen).unwrap_err().contains("replayed"));
        assert!(verify(secret, &o, 1400.0, 300, &mut HashMap::new()).unwrap_err().contains("`ts`"));
        assert!(verify(b"other", &o, 1010.0, 300, &mut HashMap::new()).unwrap_err().contains("does not match"));
        let mut tampered = o.clone();
        tampered.insert("pipeline".into(), "q".into());
        assert!(verify(secret, &tampered, 1010.0, 300, &mut HashMap::new()).unwrap_err().contains("does not match"));
        let mut unsigned = o.clone();
        unsigned.remove("hmac");
        assert!(verify(secret, &unsigned, 1010.0, 300, &mut HashMap::new()).unwrap_err().contains("missing"));
        let mut no_ts = obj(r#"{"id": 1}"#);
        no_ts.insert("hmac".into(), mac.clone().into());
        assert!(verify(secret, &no_ts, 1010.0, 300, &mut HashMap::new()).unwrap_err().contains("`ts` is missing"));
        // Upper-case hex is the same signature; anything that is not hex matches nothing.
        let mut upper = o.clone();
        upper.insert("hmac".into(), mac.to_ascii_uppercase().into());
        assert_eq!(verify(secret, &upper, 1010.0, 300, &mut HashMap::new()), Ok(()));
        for bad in ["zz", "abc", ""] {
            let mut o = o.clone();
            o.insert("hmac".into(), bad.into());
            assert!(verify(secret, &o, 1010.0, 300, &mut HashMap::new()).unwrap_err().contains("does not match"));
        }
    }

    #[test]
    fn a_signed_group_command_must_name_its_group() {
        assert!(check_target(&obj("{}"), "group/canary").unwrap_err().contains("`target` is missing"));
        assert_eq!(check_target(&obj(r#"{"target": "group/canary"}"#), "group/canary"), Ok(()));
        // Signed for the canaries, republished to everyone: refused.
        let e = check_target(&obj(r#"{"target": "group/canary"}"#), "group/kitchen").unwrap_err();
        assert!(e.contains("came for `group/kitchen`"), "{e}");
        assert_eq!(check_target(&obj("{}"), "cam1"), Ok(()), "device commands may omit it");
        assert!(check_target(&obj(r#"{"target": "cam2"}"#), "cam1").is_err());
    }

    #[test]
    fn commands_parse_and_errors_name_the_field() {
        assert_eq!(parse("pause", &obj(r#"{"pipeline": "p"}"#)), Ok(Command::Pause { pipeline: "p".into() }));
        assert_eq!(parse("resume", &obj(r#"{"pipeline": "p"}"#)), Ok(Command::Resume { pipeline: "p".into() }));
        assert_eq!(parse("health", &obj("{}")), Ok(Command::Health));
        assert_eq!(parse("reload_config", &obj(r#"{"id": 1}"#)), Ok(Command::ReloadConfig));
        assert_eq!(
            parse("set_threshold", &obj(r#"{"pipeline": "p", "output": 1, "threshold": 0.25}"#)),
            Ok(Command::SetThreshold { pipeline: "p".into(), output: Some(1), threshold: 0.25 })
        );
        assert_eq!(
            parse("reload_model", &obj(r#"{"pipeline": "p", "model": "m.onnx"}"#)),
            Ok(Command::ReloadModel { pipeline: "p".into(), model: Some("m.onnx".into()) })
        );
        assert_eq!(
            parse("reload_model", &obj(r#"{"pipeline": "p"}"#)),
            Ok(Command::ReloadModel { pipeline: "p".into(), model: None })
        );
        let sha = "a".repeat(64);
        assert_eq!(
            parse("update_model", &obj(&format!(r#"{{"pipeline": "p", "topic": "m/x.onnx", "sha256": "{sha}"}}"#))),
            Ok(Command::UpdateModel {
                pipeline: "p".into(),
                source: ModelSource::Topic("m/x.onnx".into()),
                sha256: sha.clone(),
                name: None
            })
        );
        let both = format!(r#"{{"pipeline": "p", "topic": "t", "url": "https://h/x.onnx", "sha256": "{sha}"}}"#);
        assert!(parse("update_model", &obj(&both)).unwrap_err().contains("one of them"));
        assert!(parse("update_model", &obj(r#"{"pipeline": "p", "url": "https://h/x.onnx"}"#))
            .unwrap_err()
            .contains("`sha256` is missing"));
        assert!(parse("pause", &obj("{}")).unwrap_err().contains("`pipeline` is missing"));
        assert!(parse("pause", &obj(r#"{"pipeline": 3}"#)).unwrap_err().contains("`pipeline` must be"));
        assert!(parse("set_threshold", &obj(r#"{"pipeline": "p", "threshold": "high"}"#))
            .unwrap_err()
            .contains("`threshold` must be a number"));
        assert!(parse("set_threshold", &obj(r#"{"pipeline": "p", "threshold": 1, "output": -1}"#))
            .unwrap_err()
            .contains("`output`"));
        assert!(parse("reload_model", &obj(r#"{"pipeline": "p", "model": 1}"#)).unwrap_err().contains("`model`"));
        assert!(parse("reboot", &obj("{}")).unwrap_err().contains("unknown command `reboot`"));
    }
}
