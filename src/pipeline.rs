//! Wires each pipeline (source -> preprocess -> model -> postprocess ->
//! outputs) and runs the daemon: inference on one thread per pipeline, never
//! on the async reactor; sources on threads of their own; MQTT, health and
//! signals on a small tokio runtime. Owns start-up checks and shutdown.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context};

use crate::config::{Config, OutputKind, When};
use crate::message::{InputQueue, Latency, Overflow, ResultMsg};
use crate::metrics::{Latest, ModelView, MqttMetrics, PipelineMetrics};
use crate::model_store::probation::{Probation, Verdict};
use crate::postprocess::events::{Decision, EventFilter};
use crate::postprocess::results::Postprocessor;
use crate::postprocess::snapshot::Snapshotter;
use crate::prepare::{load_tls, prepare, Prepared};
use crate::sink::mqtt::{MqttHandle, MqttSettings, MqttSink, OutMessage, JSON};
use crate::sink::Sink;

fn read_password(cfg: &Config) -> anyhow::Result<Option<String>> {
    if let Some(var) = &cfg.mqtt.password_env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| anyhow!("mqtt.password_env: environment variable `{var}` is not set"));
    }
    if let Some(file) = &cfg.mqtt.password_file {
        let path = cfg.resolve(file);
        let text =
            std::fs::read_to_string(&path).map_err(|e| anyhow!("mqtt.password_file: {}: {e}", path.display()))?;
        return Ok(Some(text.lines().next().unwrap_or("").to_string()));
    }
    Ok(None)
}

struct Output {
    sink: Box<dyn Sink>,
    filter: EventFilter,
    class: Option<usize>,
}

struct Worker {
    prepared: Prepared,
    queue: Arc<InputQueue>,
    outputs: Vec<Output>,
    metrics: Arc<PipelineMetrics>,
    device: Arc<str>,
    snapshot: Option<SnapshotOut>,
    control: Arc<crate::commands::PipelineControl>,
    /// The newest result and frame for the status page (None without `[http]`).
    latest: Option<Arc<Latest>>,
}

/// Where a pipeline's snapshots go.
struct SnapshotOut {
    snap: Snapshotter,
    topic: String,
    hub: Option<MqttHandle>,
    path: Option<PathBuf>,
}

impl SnapshotOut {
    /// Renders and sends one snapshot; failures are logged and counted, never fatal.
    fn take(&self, frame: &image::RgbImage, detections: &[crate::message::Detection], metrics: &PipelineMetrics) {
        let jpeg = match self.snap.render(frame, detections) {
            Ok(j) => j,
            Err(e) => {
                let n = metrics.errors.fetch_add(1, Relaxed) + 1;
                warn_limited(n, &metrics.name, &e);
                return;
            }
        };
        if let Some(path) = &self.path {
            // Write then rename, so a reader never sees half a JPEG.
            let tmp = path.with_extension("jpg.tmp");
            if let Err(e) = std::fs::write(&tmp, &jpeg).and_then(|_| std::fs::rename(&tmp, path)) {
                let n = metrics.errors.fetch_add(1, Relaxed) + 1;
                warn_limited(n, &metrics.name, &format!("snapshot {}: {e}", path.display()));
            }
        }
        metrics.snapshots.fetch_add(1, Relaxed);
        if let Ok(mut last) = metrics.last_snapshot.lock() {
            *last = Some((SystemTime::now(), jpeg.len()));
        }
        if let Some(hub) = &self.hub {
            let cfg = self.snap.config();
            let msg = OutMessage::raw(self.topic.clone(), jpeg, cfg.qos, cfg.retain, "image/jpeg");
            if !hub.enqueue(msg) {
                metrics.dropped_output.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Prepares a pipeline with the model a run-time update left it running (the state
/// file), if that model is still what the update accepted; else, or if it fails to
/// load, with the configured model. A stale or damaged record never stops the board.
/// With the updated model, also the SHA-256 it was checked with (for the next record).
fn prepare_active(
    cfg: &Config,
    p: &crate::config::PipelineConfig,
    active: Option<&crate::model_store::active::ActiveModels>,
) -> anyhow::Result<(Prepared, Option<String>)> {
    if let Some(active) = active {
        match updated_model(cfg, p, active) {
            Ok(Some((path, sha256))) => {
                let mut updated = p.clone();
                updated.model = path.clone();
                match prepare(cfg, &updated) {
                    Ok(prep) => {
                        log::info!(
                            "pipeline `{}`: running {} (updated at run time; {})",
                            p.name,
                            path.display(),
                            active.path().display()
                        );
                        return Ok((prep, Some(sha256)));
                    }
                    Err(e) => log::error!(
                        "pipeline `{}`: the updated model {} does not load ({e:#}): running the configured model",
                        p.name,
                        path.display()
                    ),
                }
            }
            Ok(None) => {}
            Err(e) => log::warn!("pipeline `{}`: {e}: running the configured model", p.name),
        }
    }
    Ok((prepare(cfg, p)?, None))
}

/// The updated model the state file names for `p`, checked like a `reload_model` path,
/// and its SHA-256.
fn updated_model(
    cfg: &Config,
    p: &crate::config::PipelineConfig,
    active: &crate::model_store::active::ActiveModels,
) -> Result<Option<(PathBuf, String)>, String> {
    let Some(entry) = active.get(&p.name)? else { return Ok(None) };
    let configured = cfg.resolve(&p.model);
    if entry.configured != configured {
        return Err(format!(
            "{} names a model that replaced {}, but the config now has {}",
            active.path().display(),
            entry.configured.display(),
            configured.display()
        ));
    }
    let store = cfg.models.store(&|f| cfg.resolve(f), &configured)?;
    let path = store.confine(&entry.path)?;
    let provenance = store.check(&path)?;
    if provenance.sha256 != entry.sha256 {
        return Err(format!("{} changed since it was accepted (SHA-256 {})", path.display(), provenance.sha256));
    }
    Ok(Some((path, provenance.sha256)))
}

/// The model a worker ran before a run-time swap, kept until the new one passes its probation.
struct Previous {
    prepared: Prepared,
    session: crate::engine::Session,
    path: PathBuf,
    file_sha256: Option<String>,
}

/// A model swapped in at run time, on probation, and what comes back if it fails.
struct OnProbation {
    previous: Previous,
    probation: Probation,
}

/// Makes the worker's per-model state follow the model now in `prepared` (a swap or a
/// rollback): the outputs' class indexes, the status page, a changed anomaly threshold.
/// Returns the new input buffer.
fn follow_model(
    prepared: &mut Prepared,
    outputs: &mut [Output],
    control: &crate::commands::PipelineControl,
    latest: Option<&Arc<Latest>>,
    pipeline: &str,
) -> crate::tensor::Tensor {
    for (out, o) in outputs.iter_mut().zip(&prepared.cfg.outputs) {
        out.class = o.class.as_deref().and_then(|c| prepared.post.label_index(c));
    }
    if let Some(l) = latest {
        l.set_model(model_view(prepared));
    }
    // A set_threshold taken while the new model was loading must outlive the swap:
    // the control holds the current anomaly threshold.
    let current = control.anomaly_threshold.lock().ok().and_then(|a| *a);
    if let Some(t) = current.filter(|t| prepared.post.anomaly_threshold() != Some(*t)) {
        if let Some(c) = control.anomaly_config(t) {
            match Postprocessor::new(Some(&c), prepared.model.outputs(), prepared.labels.clone()) {
                Ok(post) => prepared.post = post,
                Err(e) => log::warn!("pipeline `{pipeline}`: anomaly threshold {t} not applied: {e}"),
            }
        }
    }
    prepared.pre.buffer()
}

/// The model a pipeline runs, as the status page names it.
fn model_view(p: &Prepared) -> ModelView {
    let info = p.model.info();
    ModelView {
        name: info.name.clone(),
        sha256: info.sha256.clone(),
        quantization: info.quantization.clone(),
        kernels: info.int8_path.clone(),
    }
}

fn warn_limited(count: u64, pipeline: &str, what: &str) {
    if count.is_power_of_two() {
        log::warn!("pipeline `{pipeline}`: {what} ({count} so far)");
    }
}

impl Worker {
    fn run(mut self) {
        let Worker { prepared, queue, outputs, metrics, device, snapshot, control, latest } = &mut self;
        let mut session = match prepared.model.session() {
            Ok(s) => s,
            Err(e) => {
                log::error!("pipeline `{}`: {e}", prepared.cfg.name);
                return;
            }
        };
        let pipeline: Arc<str> = prepared.cfg.name.as_str().into();
        let mut model_name: Arc<str> = prepared.model.info().name.as_str().into();
        let mut sha: Arc<str> = prepared.model.info().sha256.as_str().into();
        let mut buf = prepared.pre.buffer();
        let mut results = Vec::new();
        let mut seq: u64 = 0;
        let mut on_probation: Option<OnProbation> = None;
        let mut worked: Vec<f64> = Vec::new();
        // After shutdown closes the queue, what it still holds is processed (bounded
        // by the drain deadline): inputs already accepted are not silently lost.
        while let Some(input) = queue.pop() {
            // Remote commands: changes are applied between two inputs, never during one.
            if control.dirty.load(Relaxed) {
                let pending = control.take_pending();
                if let Some(swap) = pending.swap {
                    // The old model's median latency is the probation's baseline.
                    let baseline = metrics.latency.lock().ok().and_then(|l| l.inference.percentiles()).map(|p| p.0);
                    let old_path = control.model_path.lock().map(|p| p.clone()).unwrap_or_default();
                    let old_sha = control.model_sha256.lock().ok().and_then(|s| s.clone());
                    let old = std::mem::replace(prepared, swap.prepared);
                    let old_session = std::mem::replace(&mut session, swap.session);
                    let old_name = std::mem::replace(&mut model_name, Arc::from(prepared.model.info().name.as_str()));
                    sha = prepared.model.info().sha256.as_str().into();
                    buf = follow_model(prepared, outputs, control, latest.as_ref(), &pipeline);
                    control.now_running(prepared, &swap.path, swap.file_sha256.clone());
                    log::info!("pipeline `{pipeline}`: now running model {model_name}");
                    if swap.probation.inferences > 0 {
                        // Swapped again while on probation: the last accepted model stays the fallback.
                        let previous = match on_probation.take() {
                            Some(p) => p.previous,
                            None => {
                                Previous { prepared: old, session: old_session, path: old_path, file_sha256: old_sha }
                            }
                        };
                        let probation = Probation::new(swap.probation, baseline);
                        control.set_update(serde_json::json!({
                            "state": "probation", "model": &*model_name, "previous": previous.prepared.model.info().name,
                            "inferences": swap.probation.inferences,
                        }));
                        on_probation = Some(OnProbation { previous, probation });
                    } else {
                        on_probation = None;
                        control.set_update(
                            serde_json::json!({"state": "accepted", "model": &*model_name, "previous": &*old_name}),
                        );
                        control.persist();
                    }
                    let _ = swap.done.send(());
                }
                for (which, t) in pending.thresholds {
                    for (ix, (out, o)) in outputs.iter_mut().zip(&prepared.cfg.outputs).enumerate() {
                        if o.when == When::Threshold && which.is_none_or(|w| w == ix) {
                            out.filter = EventFilter::new(o.when, o.debounce, t, o.hysteresis);
                        }
                    }
                    if let (None, Some(c)) = (which, control.anomaly_config(t)) {
                        match Postprocessor::new(Some(&c), prepared.model.outputs(), prepared.labels.clone()) {
                            Ok(post) => prepared.post = post,
                            Err(e) => log::warn!("pipeline `{pipeline}`: anomaly threshold {t} not applied: {e}"),
                        }
                    }
                }
            }
            if control.paused.load(Relaxed) {
                match &input {
                    crate::message::Input::Frame(_) => metrics.dropped_stale.fetch_add(1, Relaxed),
                    _ => control.skipped_paused.fetch_add(1, Relaxed),
                };
                continue;
            }
            let captured = input.captured();
            let origin = input.origin().map(str::to_string);
            let mut mark = Instant::now();
            let mut newest: Option<Arc<ResultMsg>> = None;
            // This input's inferences, for a model on probation: latencies of those that
            // worked (kept only then, in a buffer reused across inputs), and how many failed.
            let probing = on_probation.is_some();
            worked.clear();
            let mut failed = 0u32;
            let post = &mut prepared.post;
            let fed = prepared.pre.feed(&input, &mut buf, |tensor, geometry| {
                let pre_ms = mark.elapsed().as_secs_f64() * 1000.0;
                let t = Instant::now();
                if let Err(e) = session.run_into(std::slice::from_ref(tensor), &mut results) {
                    let n = metrics.errors.fetch_add(1, Relaxed) + 1;
                    warn_limited(n, &pipeline, &format!("inference failed: {e}"));
                    failed += 1;
                    mark = Instant::now();
                    return;
                }
                let infer_ms = t.elapsed().as_secs_f64() * 1000.0;
                // NaN or infinity in a result would reach subscribers as null or garbage.
                if let Some(ix) = results.iter().position(|r| !r.data.all_finite()) {
                    let n = metrics.errors.fetch_add(1, Relaxed) + 1;
                    warn_limited(n, &pipeline, &format!("model output {ix} is not finite (NaN or infinity): skipped"));
                    failed += 1;
                    mark = Instant::now();
                    return;
                }
                let t = Instant::now();
                let processed = match post.apply(&results, Some(tensor), geometry) {
                    Ok(p) => p,
                    Err(e) => {
                        let n = metrics.errors.fetch_add(1, Relaxed) + 1;
                        warn_limited(n, &pipeline, &format!("postprocess failed: {e}"));
                        failed += 1;
                        mark = Instant::now();
                        return;
                    }
                };
                if probing {
                    worked.push(infer_ms);
                }
                let post_ms = t.elapsed().as_secs_f64() * 1000.0;
                let total_ms =
                    SystemTime::now().duration_since(captured).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0);
                seq += 1;
                metrics.inferences.fetch_add(1, Relaxed);
                if let Ok(mut l) = metrics.latency.lock() {
                    l.preprocess.record(pre_ms);
                    l.inference.record(infer_ms);
                    l.postprocess.record(post_ms);
                    l.total.record(total_ms);
                }
                let msg = Arc::new(ResultMsg {
                    device: device.clone(),
                    pipeline: pipeline.clone(),
                    model: model_name.clone(),
                    model_sha256: sha.clone(),
                    seq,
                    captured,
                    origin: origin.clone(),
                    latency: Latency { preprocess: pre_ms, inference: infer_ms, postprocess: post_ms, total: total_ms },
                    result: processed.body,
                });
                for out in outputs.iter_mut() {
                    let score = match out.class {
                        Some(ix) => processed.scores.get(ix).copied(),
                        None => msg
                            .result
                            .anomaly
                            .map(|a| a.score)
                            .or_else(|| msg.result.classes.as_ref().and_then(|c| c.first()).map(|c| c.score)),
                    };
                    if let Decision::Publish(event) = out.filter.decide(&msg.result, score) {
                        if !out.sink.offer(&msg, event.as_ref()) {
                            metrics.dropped_output.fetch_add(1, Relaxed);
                        }
                    }
                }
                if let (Some(snap), crate::message::Input::Frame(frame)) = (snapshot.as_mut(), &input) {
                    let detections = msg.result.detections.as_deref().unwrap_or(&[]);
                    if snap.snap.due(detections, Instant::now()) {
                        snap.take(&frame.image, detections, metrics);
                    }
                }
                if latest.is_some() {
                    newest = Some(msg);
                }
                mark = Instant::now();
            });
            if let Err(e) = fed {
                let n = metrics.errors.fetch_add(1, Relaxed) + 1;
                let from = origin.as_deref().map(|o| format!(" from {o}")).unwrap_or_default();
                warn_limited(n, &pipeline, &format!("input{from} skipped: {e}"));
            }
            if let Some(mut op) = on_probation.take() {
                let mut verdict = Verdict::Continue;
                for outcome in worked.iter().map(Some).chain((0..failed).map(|_| None)) {
                    verdict = match outcome {
                        Some(&ms) => op.probation.ok(ms),
                        None => op.probation.failed(),
                    };
                    if verdict != Verdict::Continue {
                        break;
                    }
                }
                match verdict {
                    Verdict::Continue => on_probation = Some(op),
                    Verdict::Accept => {
                        log::info!("pipeline `{pipeline}`: model {model_name} passed its probation");
                        control.persist();
                        control.set_update(serde_json::json!({
                            "state": "accepted", "model": &*model_name, "previous": op.previous.prepared.model.info().name,
                        }));
                    }
                    Verdict::RollBack(reason) => {
                        let failed_model = model_name.clone();
                        let Previous { prepared: back, session: back_session, path, file_sha256 } = op.previous;
                        *prepared = back;
                        session = back_session;
                        model_name = prepared.model.info().name.as_str().into();
                        sha = prepared.model.info().sha256.as_str().into();
                        buf = follow_model(prepared, outputs, control, latest.as_ref(), &pipeline);
                        control.now_running(prepared, &path, file_sha256);
                        control.persist();
                        control.rollbacks.fetch_add(1, Relaxed);
                        log::warn!("pipeline `{pipeline}`: model {failed_model} rolled back to {model_name}: {reason}");
                        control.set_update(serde_json::json!({
                            "state": "rolled_back", "model": &*failed_model, "previous": &*model_name, "reason": reason,
                        }));
                    }
                }
            }
            if let (Some(l), Some(msg)) = (latest.as_ref(), newest) {
                // The frame is moved, not copied: the worker would drop it here anyway.
                let frame = match input {
                    crate::message::Input::Frame(f) => Some(f.image),
                    _ => None,
                };
                l.store(msg, frame);
            }
        }
    }
}

fn health_json(
    device: &str,
    started: Instant,
    mqtt: &MqttMetrics,
    pipelines: &[Arc<PipelineMetrics>],
    registry: &crate::commands::Registry,
) -> serde_json::Value {
    let now = SystemTime::now();
    let mut per = serde_json::Map::new();
    for p in pipelines {
        per.insert(p.name.clone(), p.health());
    }
    let mut health = serde_json::json!({
        "schema": crate::payload::HEALTH_SCHEMA,
        "device": device,
        "time": crate::payload::rfc3339(now),
        "time_ms": crate::payload::epoch_ms(now),
        "uptime_s": started.elapsed().as_secs_f64(),
        "rss_kb": crate::stats::rss_kb(),
        "version": env!("CARGO_PKG_VERSION"),
        "mqtt": mqtt.health(),
        "pipelines": per,
    });
    registry.augment(&mut health);
    health
}

fn health_log_line(h: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    if let Some(ps) = h["pipelines"].as_object() {
        for (name, p) in ps {
            parts.push(format!(
                "{name}: {} inferences ({:.1}/s), inference p50 {} ms, errors {}, dropped {}/{}/{}",
                p["inferences"],
                p["rate_per_s"].as_f64().unwrap_or(0.0),
                p["latency_ms"]["inference"]["p50"].as_f64().map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into()),
                p["errors"],
                p["dropped"]["queue_full"],
                p["dropped"]["stale_frames"],
                p["dropped"]["output_full"],
            ));
        }
    }
    let m = &h["mqtt"];
    let last_error = m["last_error"].as_str().map(|e| format!(" last_error=\"{e}\"")).unwrap_or_default();
    format!(
        "health: {}; mqtt connected={} queue={} dropped={} reconnects={}{last_error}; rss {} kB",
        parts.join("; "),
        m["connected"],
        m["queue_depth"],
        m["dropped"],
        m["reconnects"],
        h["rss_kb"]
    )
}

/// How a daemon run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// SIGINT/SIGTERM, or every source finished.
    Stopped,
    /// A checked new config waits: restart in place with it (`reload_config`, SIGHUP).
    Reload,
}

/// `edgeinfer run`: runs the daemon until SIGINT/SIGTERM, until every
/// source has finished, or until a config reload was asked for; then drains.
pub fn run(cfg: Config) -> anyhow::Result<RunEnd> {
    let device: Arc<str> = cfg.device().into();
    let active = cfg.models.active_models(&|p| cfg.resolve(p)).map(Arc::new);
    let prepared: Vec<(Prepared, Option<String>)> =
        cfg.pipelines.iter().map(|p| prepare_active(&cfg, p, active.as_deref())).collect::<anyhow::Result<_>>()?;
    let password = read_password(&cfg)?;
    let http_credentials = match &cfg.http {
        Some(h) => h.credentials(&|p| cfg.resolve(p)).map_err(anyhow::Error::msg)?,
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("edgeinfer-io")
        .build()?;
    let result = rt.block_on(run_async(cfg, device, prepared, password, http_credentials, active));
    // A blocking read (stdin) may never return; do not wait for it.
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}

async fn run_async(
    cfg: Config,
    device: Arc<str>,
    prepared: Vec<(Prepared, Option<String>)>,
    password: Option<String>,
    http_credentials: Option<(String, String)>,
    active: Option<Arc<crate::model_store::active::ActiveModels>>,
) -> anyhow::Result<RunEnd> {
    let started = Instant::now();
    // Bound before the pipelines start. A taken port is logged, not fatal: monitoring
    // must not stop inference (a service would otherwise restart-loop on it).
    #[cfg(feature = "http-server")]
    let http_listener = match &cfg.http {
        Some(h) => match crate::http::bind(h).await {
            Ok(l) => Some(l),
            Err(e) => {
                log::error!("{e}; running without the status page and /metrics");
                None
            }
        },
        None => None,
    };
    // The worker keeps its newest frame only for a page that is served.
    #[cfg(feature = "http-server")]
    let serve_page = http_listener.is_some();
    #[cfg(not(feature = "http-server"))]
    let serve_page = false;
    // SIGINT and SIGTERM are ours before the MQTT connection announces `online`: a
    // supervisor (or a test) that stops the daemon as soon as it sees it gets a clean
    // shutdown, not the signals' default action while the pipelines are being started.
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // No broker URL and nothing that publishes or subscribes: no broker, no client
    // (health then goes to the log only).
    let wants_mqtt = cfg.wants_mqtt();
    let mqtt_metrics = Arc::new(MqttMetrics::default());
    let mqtt = if wants_mqtt { Some(connect_mqtt(&cfg, &device, password, mqtt_metrics.clone()).await?) } else { None };
    let hub = mqtt.as_ref().map(|(h, _)| h.clone());
    // Commands subscribe before anything else runs: the subscription goes out with the
    // first connection, ahead of the `online` status.
    let registry = crate::commands::Registry::new();
    let health_cell = Arc::new(std::sync::OnceLock::new());
    let (restart_tx, mut restart_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let restart: crate::commands::RestartNow = Arc::new(move || {
        let _ = restart_tx.send(());
    });
    crate::commands::start(&cfg, &device, hub.as_ref(), registry.clone(), health_cell.clone(), restart.clone())?;
    let infos: Vec<crate::homeassistant::PipelineInfo> = prepared
        .iter()
        .map(|(p, _)| crate::homeassistant::PipelineInfo {
            name: &p.cfg.name,
            kind: p.post.kind_name(),
            model: &p.model.info().name,
            outputs: &p.cfg.outputs,
        })
        .collect();
    let status_topic = cfg.mqtt.status_topic.replace("{device}", &device);
    crate::homeassistant::start(&cfg.homeassistant, &device, &status_topic, &infos, hub.as_ref());

    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut all_metrics = Vec::new();
    let mut queues = Vec::new();
    let mut line_threads = Vec::new();
    let mut workers = Vec::new();
    let mut controls = Vec::new();
    let mut shown = Vec::new();
    let mut stdout_sink: Option<Arc<crate::sink::stdout::LineSink>> = None;
    for (prep, started_sha) in prepared {
        let p = prep.cfg.clone();
        let info = prep.model.info();
        let metrics =
            Arc::new(PipelineMetrics::new(&p.name, &info.name, info.timings.init_ms() + info.timings.warmup_ms));
        log::info!(
            "pipeline `{}`: model {} ({}, loaded in {:.0} ms), {} source",
            p.name,
            info.path.display(),
            info.quantization,
            metrics.model_load_ms,
            p.source.kind()
        );
        let frames = p.source.is_frames();
        let (default_cap, default_policy) = match (&p.source, frames) {
            (_, true) => (1, Overflow::DropOldest),
            (crate::config::SourceConfig::Files { .. }, _) => (16, Overflow::Block),
            _ => (256, Overflow::DropOldest),
        };
        let queue = InputQueue::new(p.queue.unwrap_or(default_cap), p.overflow.unwrap_or(default_policy));
        let mut outputs = Vec::new();
        for o in &p.outputs {
            let sink: Box<dyn Sink> = match o.kind {
                OutputKind::Mqtt => Box::new(MqttSink {
                    hub: hub.clone().context("no MQTT connection")?,
                    topic: o.topic.clone(),
                    qos: o.qos,
                    retain: o.retain,
                }),
                OutputKind::Stdout => {
                    let shared = match &stdout_sink {
                        Some(s) => s.clone(),
                        None => {
                            let (s, h) = crate::sink::stdout::LineSink::stdout()?;
                            line_threads.push(h);
                            let s = Arc::new(s);
                            stdout_sink = Some(s.clone());
                            s
                        }
                    };
                    Box::new(shared)
                }
                OutputKind::File => {
                    let path: PathBuf = cfg.resolve(o.path.as_deref().unwrap_or(std::path::Path::new("results.jsonl")));
                    let (s, h) = crate::sink::file::file_sink(&path, o.max_bytes, o.keep)
                        .with_context(|| format!("pipeline `{}`: output file {}", p.name, path.display()))?;
                    line_threads.push(h);
                    Box::new(s)
                }
            };
            let threshold = o.threshold.or(prep.post.anomaly_threshold()).unwrap_or(0.5);
            let class = o.class.as_deref().and_then(|c| prep.post.label_index(c));
            outputs.push(Output { sink, filter: EventFilter::new(o.when, o.debounce, threshold, o.hysteresis), class });
        }
        let source_ctx = crate::source::SourceCtx {
            pipeline: p.name.clone(),
            queue: queue.clone(),
            metrics: metrics.clone(),
            stop: stop.clone(),
            base_dir: cfg.base_dir.clone(),
        };
        crate::source::spawn(p.source.clone(), source_ctx, hub.clone())?;
        let snapshot = p.snapshot.as_ref().map(|sc| SnapshotOut {
            snap: Snapshotter::new(sc.clone()),
            topic: sc.topic.replace("{device}", &device).replace("{pipeline}", &p.name),
            hub: hub.clone(),
            path: sc.path.as_ref().map(|path| cfg.resolve(path)),
        });
        // `p.model` is the updated model when the state file named one; the config's is the fallback.
        let configured = cfg.pipelines.iter().find(|q| q.name == p.name).map(|q| cfg.resolve(&q.model));
        let configured = configured.unwrap_or_else(|| cfg.resolve(&p.model));
        let control = crate::commands::PipelineControl::new(
            &prep,
            cfg.resolve(&p.model),
            started_sha,
            configured,
            active.clone(),
        );
        controls.push(control.clone());
        let latest = serve_page.then(|| Arc::new(Latest::new(model_view(&prep))));
        if let Some(l) = &latest {
            shown.push((metrics.clone(), l.clone(), p.source.kind()));
        }
        let worker = Worker {
            latest,
            control,
            prepared: prep,
            queue: queue.clone(),
            outputs,
            metrics: metrics.clone(),
            device: device.clone(),
            snapshot,
        };
        let done = done_tx.clone();
        let name = p.name.clone();
        // Big enough for the window ring buffer's construction.
        workers.push(std::thread::Builder::new().name(format!("infer-{name}")).stack_size(8 << 20).spawn(
            move || {
                worker.run();
                log::debug!("pipeline `{name}`: worker stopped");
                let _ = done.send(name);
            },
        )?);
        all_metrics.push(metrics);
        queues.push(queue);
    }
    drop(done_tx);
    drop(stdout_sink);

    registry.set_controls(controls);
    let health_task = spawn_health(
        &cfg,
        device.clone(),
        started,
        hub.clone(),
        mqtt_metrics.clone(),
        all_metrics.clone(),
        registry.clone(),
    );
    let health_now: crate::commands::HealthNow = {
        let (cfg, device, hub, mqtt, pipelines, registry) =
            (cfg.clone(), device.clone(), hub.clone(), mqtt_metrics.clone(), all_metrics.clone(), registry.clone());
        Arc::new(move || publish_health(&device, started, hub.as_ref(), &mqtt, &pipelines, &cfg, &registry))
    };
    let _ = health_cell.set(health_now);
    #[cfg(feature = "http-server")]
    let _status_page = match (http_listener, &cfg.http) {
        (Some(listener), Some(h)) => {
            let (device, mqtt, pipelines, registry) =
                (device.clone(), mqtt_metrics.clone(), all_metrics.clone(), registry.clone());
            let sources = crate::http::Sources {
                device: device.to_string(),
                started,
                mqtt: mqtt.clone(),
                pipelines: shown
                    .into_iter()
                    .map(|(metrics, latest, source)| crate::http::PipelineView {
                        metrics,
                        latest,
                        source: source.into(),
                    })
                    .collect(),
                health: Arc::new(move || health_json(&device, started, &mqtt, &pipelines, &registry)),
            };
            Some(crate::http::start(listener, h, http_credentials, sources).map_err(anyhow::Error::msg)?)
        }
        _ => None,
    };
    #[cfg(not(feature = "http-server"))]
    let _ = (shown, http_credentials);
    let watchdog = crate::sdnotify::ready();

    let mut remaining = workers.len();
    let mut end = RunEnd::Stopped;
    let mut sighup = signal(SignalKind::hangup())?;
    let checking = Arc::new(AtomicBool::new(false));
    loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM: shutting down"); break; }
            _ = restart_rx.recv() => {
                log::info!("config reload: restarting in place with {}", cfg.path.display());
                end = RunEnd::Reload;
                break;
            }
            _ = sighup.recv() => {
                // Checked off the reactor (it loads every model); a bad file keeps the running config.
                if checking.swap(true, Relaxed) {
                    log::warn!("SIGHUP: a reload is already being checked");
                    continue;
                }
                log::info!("SIGHUP: checking {} before reloading", cfg.path.display());
                let (current, restart, checking) = (cfg.clone(), restart.clone(), checking.clone());
                tokio::task::spawn_blocking(move || {
                    match crate::commands::check_new_config(&current) {
                        Ok(changes) => {
                            log::info!("SIGHUP: new config is valid ({changes})");
                            restart();
                        }
                        Err(e) => {
                            log::error!("SIGHUP: not reloading: {e}");
                            checking.store(false, Relaxed);
                        }
                    }
                });
            }
            finished = done_rx.recv() => match finished {
                Some(name) => {
                    log::info!("pipeline `{name}` finished");
                    remaining -= 1;
                    if remaining == 0 { log::info!("every pipeline finished: shutting down"); break; }
                }
                None => break,
            },
        }
    }
    match end {
        RunEnd::Reload => crate::sdnotify::reloading(watchdog),
        RunEnd::Stopped => crate::sdnotify::stopping(watchdog),
    }
    stop.store(true, Relaxed);
    for q in &queues {
        q.close();
    }
    let deadline = Duration::from_millis(cfg.shutdown.drain_timeout_ms);
    let joined = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    });
    if tokio::time::timeout(deadline, joined).await.is_err() {
        log::warn!("an inference worker did not finish within {} ms", deadline.as_millis());
    }
    if let Some(t) = health_task {
        t.abort();
        // Waited for: a tick already past its snapshot (on another runtime thread) must enqueue
        // before the final health, or its older figures would replace the final ones as the
        // retained health.
        let _ = t.await;
    }
    // Final health, so subscribers see the last figures.
    publish_health(&device, started, hub.as_ref(), &mqtt_metrics, &all_metrics, &cfg, &registry);
    if let Some((_, task)) = mqtt {
        task.shutdown(deadline).await;
    }
    // Stdout/file sinks end once every worker (holding the senders) is gone.
    let flushed = tokio::task::spawn_blocking(move || {
        for t in line_threads {
            let _ = t.join();
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(2), flushed).await;
    log::info!("stopped");
    Ok(end)
}

/// Starts the embedded broker when no URL is configured, then the MQTT client.
async fn connect_mqtt(
    cfg: &Config,
    device: &str,
    password: Option<String>,
    metrics: Arc<MqttMetrics>,
) -> anyhow::Result<(MqttHandle, crate::sink::mqtt::MqttTask)> {
    let (host, port, login) = match &cfg.mqtt.url {
        Some(url) => {
            let (host, port) = crate::config::parse_mqtt_url(url).map_err(|e| anyhow!("mqtt.url: {e}"))?;
            (host, port, None)
        }
        None => start_embedded_broker(cfg, &metrics).await?,
    };
    // The daemon logs in to its own broker like any client, unless [mqtt] names a user.
    let (username, password) = match (&cfg.mqtt.username, login) {
        (None, Some((user, pw))) => (Some(user), Some(pw)),
        _ => (cfg.mqtt.username.clone(), password),
    };
    let fill = |t: &str| t.replace("{device}", device);
    let tls = load_tls(cfg)?;
    if let Some(tls) = &tls {
        if tls.insecure {
            log::error!(
                "MQTT: mqtt.tls.insecure_skip_verify is on: the broker's certificate is NOT verified; \
                 anyone on the network path can read and forge this traffic"
            );
        }
        log::info!("MQTT: TLS with {}", tls.summary);
    }
    let settings = MqttSettings {
        host,
        port,
        client_id: fill(&cfg.mqtt.client_id),
        keep_alive: Duration::from_secs(cfg.mqtt.keep_alive_s),
        username,
        password,
        buffer: cfg.mqtt.buffer,
        reconnect_min: Duration::from_millis(cfg.mqtt.reconnect_min_ms),
        reconnect_max: Duration::from_millis(cfg.mqtt.reconnect_max_ms),
        status_topic: fill(&cfg.mqtt.status_topic),
        tls,
        disk_queue: crate::sink::disk_queue::from_config(&cfg.mqtt, &|p| cfg.resolve(p))?,
        protocol: cfg.mqtt.protocol,
        message_expiry: cfg.mqtt.message_expiry_s.map(Duration::from_secs),
        user_properties: cfg.mqtt.user_properties.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    };
    Ok(crate::sink::mqtt::start(settings, metrics))
}

/// Starts the embedded broker on `broker.listen`; the address to connect to, and the
/// login it asks for.
#[cfg(feature = "broker")]
async fn start_embedded_broker(
    cfg: &Config,
    metrics: &MqttMetrics,
) -> anyhow::Result<(String, u16, Option<(String, String)>)> {
    let addr: std::net::SocketAddr = cfg.broker.listen.parse().map_err(|e| anyhow!("broker.listen: {e}"))?;
    let login = cfg.broker.login(&|p| cfg.resolve(p)).map_err(anyhow::Error::msg)?;
    #[cfg(feature = "tls")]
    let tls = match &cfg.broker.tls {
        Some(t) => {
            let server = crate::sink::mqtt_tls::server(t, &|p| cfg.resolve(p)).map_err(anyhow::Error::msg)?;
            let tls_addr: std::net::SocketAddr = t.listen.parse().map_err(|e| anyhow!("broker.tls.listen: {e}"))?;
            Some((tls_addr, server))
        }
        None => None,
    };
    #[cfg(not(feature = "tls"))]
    let tls: Option<(std::net::SocketAddr, ())> = None;
    // Either listener reachable from the network without a login lets anyone in.
    let exposed = !addr.ip().is_loopback() || tls.as_ref().is_some_and(|(a, _)| !a.ip().is_loopback());
    let open = login.is_none() && exposed;
    if open {
        log::warn!(
            "embedded MQTT broker open to the network without a password: anyone who can reach it can read \
             every result and publish into mqtt sources and commands (set broker.username and broker.password_file)"
        );
    }
    let _ = metrics.embedded_broker.set(serde_json::json!({
        "listen": addr.to_string(),
        "tls_listen": tls.as_ref().map(|(a, _)| a.to_string()),
        "authentication": login.is_some(),
        "open_to_the_network": open,
    }));
    let broker_login = login.clone();
    // Waits for the port: keep it off the async workers.
    let started = tokio::task::spawn_blocking(move || crate::broker::start(addr, broker_login)).await?;
    let ours = match started {
        Ok(()) => {
            log::info!(
                "embedded MQTT broker listening on {addr} (try: mosquitto_sub -h {} -p {} -t 'edgeinfer/#' -v)",
                addr.ip(),
                addr.port()
            );
            true
        }
        // Another broker (often a system mosquitto) already serves that address:
        // subscribers there expect our results, so publish to it rather than fail.
        Err(e) if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() => {
            log::warn!("{e}; another broker already listens on {addr}: publishing to it instead");
            false
        }
        Err(e) => return Err(e.into()),
    };
    #[cfg(feature = "tls")]
    if let Some((tls_addr, server)) = tls {
        if ours {
            crate::broker::start_tls(tls_addr, server, addr)?;
            log::info!("embedded MQTT broker: TLS on {tls_addr}");
        } else {
            // Its TLS would open that broker, with its own rules, to the network.
            log::warn!("broker.tls: not started, since the broker on {addr} is not edgeinfer's");
        }
    }
    #[cfg(not(feature = "tls"))]
    let _ = ours;
    Ok((addr.ip().to_string(), addr.port(), login))
}

/// Without the `broker` feature config validation already refused a config that needs it.
#[cfg(not(feature = "broker"))]
async fn start_embedded_broker(
    _cfg: &Config,
    _metrics: &MqttMetrics,
) -> anyhow::Result<(String, u16, Option<(String, String)>)> {
    Err(anyhow!(crate::features::not_built("broker", "a config without mqtt.url (the embedded broker)")))
}

fn publish_health(
    device: &str,
    started: Instant,
    hub: Option<&MqttHandle>,
    mqtt: &MqttMetrics,
    pipelines: &[Arc<PipelineMetrics>],
    cfg: &Config,
    registry: &crate::commands::Registry,
) -> serde_json::Value {
    let h = health_json(device, started, mqtt, pipelines, registry);
    log::info!("{}", health_log_line(&h));
    let topic = cfg.mqtt.health_topic.replace("{device}", device);
    if let Some(hub) = hub {
        hub.enqueue(OutMessage::raw(topic, serde_json::to_vec(&h).unwrap_or_default(), 1, true, JSON));
    }
    h
}

fn spawn_health(
    cfg: &Config,
    device: Arc<str>,
    started: Instant,
    hub: Option<MqttHandle>,
    mqtt: Arc<MqttMetrics>,
    pipelines: Vec<Arc<PipelineMetrics>>,
    registry: Arc<crate::commands::Registry>,
) -> Option<tokio::task::JoinHandle<()>> {
    if cfg.health.interval_s == 0 {
        return None;
    }
    let cfg = cfg.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(cfg.health.interval_s));
        tick.tick().await;
        loop {
            tick.tick().await;
            publish_health(&device, started, hub.as_ref(), &mqtt, &pipelines, &cfg, &registry);
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mqtt: &str, dir: &std::path::Path) -> Config {
        let mut c = Config::parse(
            &format!("{mqtt}\n[[pipelines]]\nname = \"p\"\nmodel = \"m.onnx\"\nsource = {{ type = \"lines\" }}\n"),
            "c.toml",
        )
        .unwrap();
        c.base_dir = dir.to_path_buf();
        c
    }

    #[test]
    fn password_comes_from_a_file_or_the_environment_and_is_named_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\nignored\n").unwrap();
        let c = config("[mqtt]\nusername = \"u\"\npassword_file = \"pw\"", dir.path());
        assert_eq!(read_password(&c).unwrap().as_deref(), Some("s3cret"));

        std::env::set_var("EDGEINFER_TEST_PW_PRESENT", "from-env");
        let c = config("[mqtt]\npassword_env = \"EDGEINFER_TEST_PW_PRESENT\"", dir.path());
        assert_eq!(read_password(&c).unwrap().as_deref(), Some("from-env"));

        let c = config("[mqtt]\npassword_env = \"EDGEINFER_TEST_PW_ABSENT\"", dir.path());
        let e = read_password(&c).unwrap_err().to_string();
        assert!(e.contains("mqtt.password_env") && e.contains("EDGEINFER_TEST_PW_ABSENT"), "{e}");
        let c = config("[mqtt]\npassword_file = \"nope\"", dir.path());
        assert!(read_password(&c).unwrap_err().to_string().contains("mqtt.password_file"));
        assert_eq!(read_password(&config("", dir.path())).unwrap(), None);
    }
}
