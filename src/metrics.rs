//! Counters and latency figures per pipeline and for the MQTT connection,
//! and the health message built from them. Updated lock-free (atomics) on
//! the hot path, except the latency ring, which one worker writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use heapless::HistoryBuf;

/// Latency samples kept per stage for percentiles.
pub const LATENCY_SAMPLES: usize = 1024;

/// Recent latencies of one stage, in milliseconds.
pub struct StageLatency {
    recent: HistoryBuf<f32, LATENCY_SAMPLES>,
}

impl Default for StageLatency {
    fn default() -> Self {
        StageLatency { recent: HistoryBuf::new() }
    }
}

impl StageLatency {
    /// Records one duration.
    pub fn record(&mut self, ms: f64) {
        self.recent.write(ms as f32);
    }

    /// p50 and p99 of the recent samples (None when empty).
    pub fn percentiles(&self) -> Option<(f64, f64)> {
        if self.recent.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = self.recent.oldest_ordered().map(|&x| x as f64).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        Some((crate::stats::percentile(&v, 50.0), crate::stats::percentile(&v, 99.0)))
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
    fn health_names_every_figure() {
        let m = PipelineMetrics::new("p", "m", 12.0);
        m.inferences.fetch_add(3, Relaxed);
        let h = m.health();
        assert_eq!(h["inferences"], 3);
        assert!(h["dropped"]["stale_frames"].is_number());
        assert!(h["latency_ms"]["inference"].is_null());
    }
}
