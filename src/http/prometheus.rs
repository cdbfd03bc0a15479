//! `/metrics` in Prometheus' text exposition format (version 0.0.4): the
//! health message's counters under Prometheus names and units (seconds,
//! bytes, `_total` counters), and each stage's latency as a histogram.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use serde_json::Value;

use super::server::Sources;
use crate::metrics::LATENCY_BUCKETS_S;

/// Writes metric families: a family's HELP and TYPE, then its samples.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", number(value));
    }

    /// A family with one sample per pipeline.
    fn per_pipeline(&mut self, src: &Sources, name: &str, kind: &str, help: &str, value: impl Fn(usize) -> f64) {
        self.family(name, kind, help);
        for (ix, p) in src.pipelines.iter().enumerate() {
            self.sample(name, &[("pipeline", &p.metrics.name)], value(ix));
        }
    }
}

/// A label value with `\`, `"` and newlines escaped, as the format requires.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A sample value: integers without a fraction, `+Inf`/`-Inf`/`NaN` spelled as Prometheus does.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// The reasons an input or result is dropped, as the health message names them.
const DROP_REASONS: [&str; 6] = ["queue_full", "stale_frames", "max_fps", "bad_frames", "late_samples", "output_full"];

/// The whole `/metrics` text. `health` is the health message of this moment:
/// what only it holds (commands, pauses, the disk queue) is read from it.
pub fn render(src: &Sources, health: &Value) -> String {
    let mut out = Exposition(String::with_capacity(8 << 10));
    let o = &mut out;
    o.family("edgeinfer_build_info", "gauge", "Version and device id of this edgeinfer (always 1).");
    o.sample("edgeinfer_build_info", &[("version", env!("CARGO_PKG_VERSION")), ("device", &src.device)], 1.0);
    o.family("edgeinfer_uptime_seconds", "gauge", "Seconds since the daemon started.");
    o.sample("edgeinfer_uptime_seconds", &[], src.started.elapsed().as_secs_f64());
    if let Some(kb) = crate::stats::rss_kb() {
        o.family("process_resident_memory_bytes", "gauge", "Resident memory of the edgeinfer process in bytes.");
        o.sample("process_resident_memory_bytes", &[], (kb * 1024) as f64);
    }

    let views: Vec<_> = src.pipelines.iter().map(|p| p.latest.view()).collect();
    o.family("edgeinfer_model_info", "gauge", "The model each pipeline runs (always 1).");
    for (p, v) in src.pipelines.iter().zip(&views) {
        let m = &v.model;
        o.sample(
            "edgeinfer_model_info",
            &[
                ("pipeline", &p.metrics.name),
                ("model", &m.name),
                ("sha256", &m.sha256),
                ("quantization", &m.quantization),
            ],
            1.0,
        );
    }
    let pm = |ix: usize| &src.pipelines[ix].metrics;
    o.per_pipeline(src, "edgeinfer_model_load_seconds", "gauge", "Time the model took to load and warm up.", |ix| {
        pm(ix).model_load_ms / 1000.0
    });
    o.per_pipeline(src, "edgeinfer_inputs_total", "counter", "Inputs taken from the source.", |ix| {
        pm(ix).inputs.load(Relaxed) as f64
    });
    o.per_pipeline(src, "edgeinfer_inferences_total", "counter", "Inferences run.", |ix| {
        pm(ix).inferences.load(Relaxed) as f64
    });
    o.per_pipeline(
        src,
        "edgeinfer_errors_total",
        "counter",
        "Inputs that failed (bad input, inference or postprocess error).",
        |ix| pm(ix).errors.load(Relaxed) as f64,
    );
    o.family("edgeinfer_dropped_total", "counter", "Inputs and results dropped, by reason.");
    for p in &src.pipelines {
        let m = &p.metrics;
        let counts = [
            &m.dropped_queue_full,
            &m.dropped_stale,
            &m.dropped_max_fps,
            &m.bad_frames,
            &m.dropped_late,
            &m.dropped_output,
        ];
        for (reason, c) in DROP_REASONS.iter().zip(counts) {
            o.sample("edgeinfer_dropped_total", &[("pipeline", &m.name), ("reason", reason)], c.load(Relaxed) as f64);
        }
    }
    o.per_pipeline(src, "edgeinfer_snapshots_total", "counter", "Detection snapshots taken.", |ix| {
        pm(ix).snapshots.load(Relaxed) as f64
    });
    o.per_pipeline(src, "edgeinfer_source_up", "gauge", "1 while the pipeline's source runs.", |ix| {
        pm(ix).source_running.load(Relaxed) as u8 as f64
    });
    o.per_pipeline(
        src,
        "edgeinfer_source_restarts_total",
        "counter",
        "Times the source was restarted after failing.",
        |ix| pm(ix).source_restarts.load(Relaxed) as f64,
    );
    let from_health = |ix: usize, key: &str| health["pipelines"][&pm(ix).name][key].clone();
    if src.pipelines.iter().enumerate().any(|(ix, _)| !from_health(ix, "paused").is_null()) {
        o.per_pipeline(src, "edgeinfer_paused", "gauge", "1 while a remote command holds the pipeline paused.", |ix| {
            from_health(ix, "paused").as_bool().unwrap_or(false) as u8 as f64
        });
        o.per_pipeline(
            src,
            "edgeinfer_model_reloads_total",
            "counter",
            "Models swapped in by reload_model or update_model.",
            |ix| from_health(ix, "model_reloads").as_f64().unwrap_or(0.0),
        );
        o.per_pipeline(
            src,
            "edgeinfer_model_rollbacks_total",
            "counter",
            "Models swapped back out after failing their probation.",
            |ix| from_health(ix, "model_rollbacks").as_f64().unwrap_or(0.0),
        );
    }

    o.family(
        "edgeinfer_inference_seconds",
        "histogram",
        "Latency of each stage of a result: preprocess, inference, postprocess, and total from capture to result.",
    );
    for p in &src.pipelines {
        let Ok(lat) = p.metrics.latency.lock() else { continue };
        for (stage, l) in lat.stages() {
            let labels = [("pipeline", p.metrics.name.as_str()), ("stage", stage)];
            let les = LATENCY_BUCKETS_S.iter().map(|le| number(*le)).chain(["+Inf".to_string()]);
            for (le, count) in les.zip(l.cumulative_buckets()) {
                o.sample("edgeinfer_inference_seconds_bucket", &[labels[0], labels[1], ("le", &le)], count as f64);
            }
            o.sample("edgeinfer_inference_seconds_sum", &labels, l.sum_s());
            o.sample("edgeinfer_inference_seconds_count", &labels, l.count() as f64);
        }
    }

    let m = &src.mqtt;
    let gauge = |o: &mut Exposition, name: &str, help: &str, v: f64| {
        o.family(name, "gauge", help);
        o.sample(name, &[], v);
    };
    let counter = |o: &mut Exposition, name: &str, help: &str, v: u64| {
        o.family(name, "counter", help);
        o.sample(name, &[], v as f64);
    };
    gauge(
        o,
        "edgeinfer_mqtt_connected",
        "1 while connected to the MQTT broker.",
        m.connected.load(Relaxed) as u8 as f64,
    );
    counter(
        o,
        "edgeinfer_mqtt_connection_attempts_total",
        "MQTT connection attempts.",
        m.connection_attempts.load(Relaxed),
    );
    counter(o, "edgeinfer_mqtt_reconnects_total", "MQTT connections after the first.", m.reconnects.load(Relaxed));
    counter(o, "edgeinfer_mqtt_published_total", "Messages handed to the broker.", m.published.load(Relaxed));
    counter(
        o,
        "edgeinfer_mqtt_dropped_total",
        "Results dropped because the publish buffer was full.",
        m.dropped.load(Relaxed),
    );
    counter(
        o,
        "edgeinfer_mqtt_expired_total",
        "Results dropped unsent after mqtt.message_expiry_s.",
        m.expired.load(Relaxed),
    );
    counter(o, "edgeinfer_mqtt_received_total", "Messages received on subscribed topics.", m.received.load(Relaxed));
    gauge(
        o,
        "edgeinfer_mqtt_queue_messages",
        "Messages waiting in the publish buffer.",
        m.queue_depth.load(Relaxed) as f64,
    );
    gauge(
        o,
        "edgeinfer_mqtt_queue_capacity_messages",
        "Capacity of the publish buffer.",
        m.queue_capacity.load(Relaxed) as f64,
    );
    let disk = &health["mqtt"]["disk_queue"];
    if disk.is_object() {
        let f = |k: &str| disk[k].as_f64().unwrap_or(0.0);
        gauge(o, "edgeinfer_disk_queue_records", "Results stored on disk waiting for the broker.", f("records"));
        gauge(o, "edgeinfer_disk_queue_bytes", "Bytes of the disk queue's segment files.", f("bytes"));
        o.family(
            "edgeinfer_disk_queue_dropped_total",
            "counter",
            "Stored results dropped, by reason (full: max_bytes; age: max_age).",
        );
        o.sample("edgeinfer_disk_queue_dropped_total", &[("reason", "full")], f("dropped_full"));
        o.sample("edgeinfer_disk_queue_dropped_total", &[("reason", "age")], f("dropped_age"));
    }
    let commands = &health["commands"];
    if commands.is_object() {
        let f = |k: &str| commands[k].as_u64().unwrap_or(0);
        counter(o, "edgeinfer_commands_received_total", "Remote commands received.", f("received"));
        counter(o, "edgeinfer_commands_failed_total", "Remote commands refused or failed.", f("failed"));
    }
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_labels_are_spelled_as_the_format_wants() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.0025), "0.0025");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
