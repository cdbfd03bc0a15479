//! Counters and latency figures per pipeline and for the MQTT connection,
//! and the health message built from them. Updated lock-free (atomics) on
//! the hot path, except the latency ring, which one worker writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use heapless::HistoryBuf;
use image::RgbImage;

use crate::message::ResultMsg;

/// Latency samples kept per stage for percentiles.
pub const LATENCY_SAMPLES: usize = 1024;

/// Upper bounds (seconds) of the latency histogram's buckets, as Prometheus
/// exposes them (`le`); a last `+Inf` bucket is implied. From half a
/// millisecond (a small model on a desktop CPU) to 10 s (a big one on a Pi Zero).
pub const LATENCY_BUCKETS_S: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Latencies of one stage, in milliseconds: the recent samples (for
/// percentiles) and a histogram of every sample since start (for `/metrics`).
pub struct StageLatency {
    recent: HistoryBuf<f32, LATENCY_SAMPLES>,
    /// Samples per bucket of [`LATENCY_BUCKETS_S`] (not cumulative), and above the last.
    buckets: [u64; LATENCY_BUCKETS_S.len() + 1],
    sum_ms: f64,
}

impl Default for StageLatency {
    fn default() -> Self {
        StageLatency { recent: HistoryBuf::new(), buckets: [0; LATENCY_BUCKETS_S.len() + 1], sum_ms: 0.0 }
    }
}

impl StageLatency {
    /// Records one duration.
    pub fn record(&mut self, ms: f64) {
        self.recent.write(ms as f32);
        let s = ms / 1000.0;
        let bucket = LATENCY_BUCKETS_S.iter().position(|&le| s <= le).unwrap_or(LATENCY_BUCKETS_S.len());
        self.buckets[bucket] += 1;
        self.sum_ms += ms;
    }

    /// p50 and p99 of the recent samples (None when empty).
    pub fn percentiles(&self) -> Option<(f64, f64)> {
        self.percentiles_of_last(LATENCY_SAMPLES)
    }

    /// p50 and p99 of the newest `n` samples (fewer if fewer are kept; None when none).
    pub fn percentiles_of_last(&self, n: usize) -> Option<(f64, f64)> {
        let skip = self.recent.len().saturating_sub(n);
        let mut v: Vec<f64> = self.recent.oldest_ordered().skip(skip).map(|&x| x as f64).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Some((crate::stats::percentile(&v, 50.0), crate::stats::percentile(&v, 99.0)))
    }

    /// Samples recorded since start.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Sum of every sample since start, in seconds.
    pub fn sum_s(&self) -> f64 {
        self.sum_ms / 1000.0
    }

    /// Cumulative counts per bucket of [`LATENCY_BUCKETS_S`], then the `+Inf` bucket (= count).
    pub fn cumulative_buckets(&self) -> [u64; LATENCY_BUCKETS_S.len() + 1] {
        let mut out = self.buckets;
        for i in 1..out.len() {
            out[i] += out[i - 1];
        }
        out
    }
}

/// The four stages of a result's latency.
#[derive(Default)]
pub struct Latencies {
    /// Preprocessing.
    pub preprocess: StageLatency,
    /// Inference.
    pub inference: StageLatency,
    /// Postprocessing.
    pub postprocess: StageLatency,
    /// Capture to result.
    pub total: StageLatency,
}

impl Latencies {
    /// Each stage with its name as the health message and `/metrics` call it.
    pub fn stages(&self) -> [(&'static str, &StageLatency); 4] {
        [
            ("preprocess", &self.preprocess),
            ("inference", &self.inference),
            ("postprocess", &self.postprocess),
            ("total", &self.total),
        ]
    }
}

/// The newest result of a pipeline and, for cameras, the frame it came from:
/// what the status page shows. Kept only while the page is on ([http]): the
/// worker moves the frame in (no copy) instead of dropping it.
#[derive(Default)]
pub struct Latest {
    slot: Mutex<LatestView>,
}

/// What [`Latest`] holds.
#[derive(Default, Clone)]
pub struct LatestView {
    /// The newest result.
    pub result: Option<Arc<ResultMsg>>,
    /// The newest frame that reached the model, with its own result (boxes match the picture).
    pub frame: Option<(Arc<RgbImage>, Arc<ResultMsg>)>,
    /// The model now running (changes with `reload_model`).
    pub model: ModelView,
}

/// The model a pipeline runs, as the status page and `/metrics` name it.
#[derive(Default, Clone, Debug, PartialEq)]
pub struct ModelView {
    /// Name (file stem).
    pub name: String,
    /// SHA-256 of the ONNX file, hex.
    pub sha256: String,
    /// Quantization form ("QDQ", "float (not quantized)", ...).
    pub quantization: String,
    /// Which kernels run it.
    pub kernels: String,
}

impl Latest {
    /// A slot for a pipeline running `model`.
    pub fn new(model: ModelView) -> Self {
        Latest { slot: Mutex::new(LatestView { model, ..Default::default() }) }
    }

    /// Keeps `result`, and `frame` (with that result) when the input was a frame.
    pub fn store(&self, result: Arc<ResultMsg>, frame: Option<RgbImage>) {
        if let Ok(mut s) = self.slot.lock() {
            if let Some(f) = frame {
                s.frame = Some((Arc::new(f), result.clone()));
            }
            s.result = Some(result);
        }
    }

    /// Notes a model swap.
    pub fn set_model(&self, model: ModelView) {
        if let Ok(mut s) = self.slot.lock() {
            s.model = model;
        }
    }

    /// A copy of what is held (the frame and results are shared, not copied).
    pub fn view(&self) -> LatestView {
        self.slot.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Figures of one pipeline.
pub struct PipelineMetrics {
    /// Pipeline name.
    pub name: String,
    /// Model name.
    pub model: String,
    /// Model load time (read + analyse + optimise + warm-up).
    pub model_load_ms: f64,
    /// Inputs taken from the source.
    pub inputs: AtomicU64,
    /// Inferences run.
    pub inferences: AtomicU64,
    /// Inputs that failed (bad frame, wrong size, inference error).
    pub errors: AtomicU64,
    /// Inputs dropped because the queue was full (sensor overflow).
    pub dropped_queue_full: AtomicU64,
    /// Frames replaced by a newer one before the model got to them.
    pub dropped_stale: AtomicU64,
    /// Frames a camera source skipped to stay under `max_fps`.
    pub dropped_max_fps: AtomicU64,
    /// Frames a source could not decode (corrupt JPEG, short read).
    pub bad_frames: AtomicU64,
    /// Snapshots taken.
    pub snapshots: AtomicU64,
    /// When the last snapshot was taken and its size in bytes.
    pub last_snapshot: Mutex<Option<(SystemTime, usize)>>,
    /// Samples a paced sensor source skipped because it fell more than a period behind.
    pub dropped_late: AtomicU64,
    /// Results an output could not take (its buffer was full).
    pub dropped_output: AtomicU64,
    /// Times the source was restarted after failing.
    pub source_restarts: AtomicU64,
    /// True while the source runs.
    pub source_running: AtomicBool,
    /// The source's last error.
    pub source_last_error: Mutex<Option<String>>,
    /// Stage latencies.
    pub latency: Mutex<Latencies>,
    started: Instant,
}

impl PipelineMetrics {
    /// Fresh figures.
    pub fn new(name: &str, model: &str, model_load_ms: f64) -> Self {
        PipelineMetrics {
            name: name.into(),
            model: model.into(),
            model_load_ms,
            inputs: AtomicU64::new(0),
            inferences: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            dropped_stale: AtomicU64::new(0),
            dropped_max_fps: AtomicU64::new(0),
            bad_frames: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            last_snapshot: Mutex::new(None),
            dropped_late: AtomicU64::new(0),
            dropped_output: AtomicU64::new(0),
            source_restarts: AtomicU64::new(0),
            source_running: AtomicBool::new(false),
            source_last_error: Mutex::new(None),
            latency: Mutex::new(Latencies::default()),
            started: Instant::now(),
        }
    }

    /// Records a source failure (it will be retried).
    pub fn source_failed(&self, error: &str) {
        self.source_running.store(false, Relaxed);
        if let Ok(mut e) = self.source_last_error.lock() {
            *e = Some(error.to_string());
        }
    }

    /// The health section of this pipeline.
    pub fn health(&self) -> serde_json::Value {
        let inferences = self.inferences.load(Relaxed);
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        let lat = self.latency.lock().ok();
        let last_snapshot = self.last_snapshot.lock().ok().and_then(|l| *l);
        let stage = |f: fn(&Latencies) -> &StageLatency| {
            lat.as_ref()
                .and_then(|l| f(l).percentiles())
                .map(|(p50, p99)| serde_json::json!({"p50": crate::message::micros(p50), "p99": crate::message::micros(p99)}))
                .unwrap_or(serde_json::Value::Null)
        };
        serde_json::json!({
            "model": self.model,
            "model_load_ms": self.model_load_ms,
            "inputs": self.inputs.load(Relaxed),
            "inferences": inferences,
            "rate_per_s": inferences as f64 / elapsed,
            "errors": self.errors.load(Relaxed),
            "dropped": {
                "queue_full": self.dropped_queue_full.load(Relaxed),
                "stale_frames": self.dropped_stale.load(Relaxed),
                "max_fps": self.dropped_max_fps.load(Relaxed),
                "bad_frames": self.bad_frames.load(Relaxed),
                "late_samples": self.dropped_late.load(Relaxed),
                "output_full": self.dropped_output.load(Relaxed),
            },
            "snapshots": {
                "taken": self.snapshots.load(Relaxed),
                "last_at": last_snapshot.map(|(t, _)| crate::payload::rfc3339(t)),
                "last_bytes": last_snapshot.map(|(_, b)| b),
            },
            "source": {
                "running": self.source_running.load(Relaxed),
                "restarts": self.source_restarts.load(Relaxed),
                "last_error": self.source_last_error.lock().ok().and_then(|e| e.clone()),
            },
            "latency_ms": {
                "preprocess": stage(|l| &l.preprocess),
                "inference": stage(|l| &l.inference),
                "postprocess": stage(|l| &l.postprocess),
                "total": stage(|l| &l.total),
            },
        })
    }
}

/// Figures of the MQTT connection.
#[derive(Default)]
pub struct MqttMetrics {
    /// True while connected.
    pub connected: AtomicBool,
    /// TCP/MQTT connection attempts, successful or not.
    pub connection_attempts: AtomicU64,
    /// Successful connections after the first.
    pub reconnects: AtomicU64,
    /// Messages handed to the broker.
    pub published: AtomicU64,
    /// Results dropped because the publish buffer was full.
    pub dropped: AtomicU64,
    /// Messages waiting in the publish buffer.
    pub queue_depth: AtomicU64,
    /// Buffer capacity.
    pub queue_capacity: AtomicU64,
    /// Messages received on subscribed topics.
    pub received: AtomicU64,
    /// Results dropped unsent because they were older than `mqtt.message_expiry_s` (MQTT 5).
    pub expired: AtomicU64,
    /// Why the last connection attempt failed or the connection dropped (None once connected again).
    pub last_error: Mutex<Option<String>>,
    /// The store-and-forward queue, when `mqtt.queue_dir` is set.
    pub disk_queue: std::sync::OnceLock<std::sync::Arc<dyn HealthSection>>,
    /// The embedded broker's listen address and whether it asks for a login, when it runs.
    pub embedded_broker: std::sync::OnceLock<serde_json::Value>,
}

/// A part that reports its own health section (the disk queue), so the
/// metrics need not know its type.
pub trait HealthSection: Send + Sync {
    /// Its section of the health message.
    fn health(&self) -> serde_json::Value;
}

impl MqttMetrics {
    /// The health section of the connection.
    pub fn health(&self) -> serde_json::Value {
        serde_json::json!({
            "connected": self.connected.load(Relaxed),
            "connection_attempts": self.connection_attempts.load(Relaxed),
            "reconnects": self.reconnects.load(Relaxed),
            "published": self.published.load(Relaxed),
            "dropped": self.dropped.load(Relaxed),
            "queue_depth": self.queue_depth.load(Relaxed),
            "queue_capacity": self.queue_capacity.load(Relaxed),
            "received": self.received.load(Relaxed),
            "expired": self.expired.load(Relaxed),
            "last_error": self.last_error.lock().ok().and_then(|e| e.clone()),
            "disk_queue": self.disk_queue.get().map(|q| q.health()),
            "embedded_broker": self.embedded_broker.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_recent_latencies() {
        let mut s = StageLatency::default();
        assert!(s.percentiles().is_none());
        for i in 1..=100 {
            s.record(i as f64);
        }
        assert_eq!(s.percentiles(), Some((50.0, 99.0)));
    }

    #[test]
    fn the_histogram_counts_every_sample_in_its_bucket() {
        let mut s = StageLatency::default();
        for ms in [0.2, 0.5, 0.7, 3.0, 20_000.0] {
            s.record(ms);
        }
        let c = s.cumulative_buckets();
        // le 0.0005 s holds 0.2 and 0.5 ms (upper bounds are inclusive), le 0.001 adds 0.7 ms.
        assert_eq!((c[0], c[1], c[2], c[3]), (2, 3, 3, 4));
        assert_eq!(c[LATENCY_BUCKETS_S.len() - 1], 4, "20 s is above the last bound");
        assert_eq!(c[LATENCY_BUCKETS_S.len()], 5);
        assert_eq!(s.count(), 5);
        assert!((s.sum_s() - 20.0044).abs() < 1e-9);
        assert_eq!(s.percentiles_of_last(2), Some((3.0, 20_000.0)));
    }

    #[test]
    fn latest_keeps_the_newest_frame_with_its_own_result() {
        let l = Latest::new(ModelView { name: "m".into(), ..Default::default() });
        let msg = |seq| {
            Arc::new(ResultMsg {
                device: "d".into(),
                pipeline: "p".into(),
                model: "m".into(),
                model_sha256: "0".into(),
                seq,
                captured: SystemTime::now(),
                origin: None,
                latency: Default::default(),
                result: Default::default(),
            })
        };
        assert!(l.view().result.is_none());
        l.store(msg(1), Some(RgbImage::new(4, 2)));
        l.store(msg(2), None);
        let v = l.view();
        assert_eq!(v.result.map(|r| r.seq), Some(2));
        let (frame, of) = v.frame.unwrap();
        assert_eq!((frame.dimensions(), of.seq), ((4, 2), 1), "the frame stays with the result made from it");
        l.set_model(ModelView { name: "n".into(), ..Default::default() });
        assert_eq!(l.view().model.name, "n");
    }

    #[test]
    fn health_names_every_figure() {
        let m = PipelineMetrics::new("p", "m", 12.0);
        m.inferences.fetch_add(3, Relaxed);
        let h = m.health();
        assert_eq!(h["inferences"], 3);
        assert!(h["dropped"]["stale_frames"].is_number());
        assert!(h["latency_ms"]["inference"].is_null());
    }
}
