//! The postprocess settings of a pipeline (`postprocess`, `snapshot`) and
//! the condition an output publishes on (`when`), parsed into typed values
//! and checked on their own; `config` aggregates them.

use std::path::PathBuf;

use serde::Deserialize;

use super::Softmax;

/// When an output publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Every result.
    #[default]
    Every,
    /// When the top class changes (after `debounce` consecutive results agree).
    OnChange,
    /// When the score crosses `threshold` (with `debounce` and `hysteresis`).
    Threshold,
}

/// When a snapshot is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotWhen {
    /// When something was detected.
    #[default]
    Detection,
    /// For any result (still bounded by `min_interval_s`).
    Every,
}

/// Snapshot settings (`[pipelines.snapshot]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// MQTT topic; `{device}` and `{pipeline}` are filled in.
    pub topic: String,
    /// `detection` or `every`.
    pub when: SnapshotWhen,
    /// At most one snapshot per this many seconds.
    pub min_interval_s: f64,
    /// JPEG quality, 1 to 100.
    pub quality: u8,
    /// Frames wider than this are scaled down first.
    pub max_width: u32,
    /// MQTT retain flag (the latest snapshot is what a new subscriber gets).
    pub retain: bool,
    /// MQTT QoS.
    pub qos: u8,
    /// Also write the latest snapshot to this file (replaced atomically).
    pub path: Option<PathBuf>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            topic: "edgeinfer/{device}/{pipeline}/snapshot".into(),
            when: SnapshotWhen::Detection,
            min_interval_s: 5.0,
            quality: 80,
            max_width: 640,
            retain: true,
            qos: 0,
            path: None,
        }
    }
}

impl SnapshotConfig {
    /// Checks the values on their own (that the source gives frames is the
    /// pipeline's check); the error is (key under `snapshot.`, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, r: String| Err((k.to_string(), r));
        if !(self.min_interval_s >= 0.0 && self.min_interval_s.is_finite()) {
            return bad("min_interval_s", "must be a finite number >= 0".into());
        }
        if !(1..=100).contains(&self.quality) {
            return bad("quality", "must be 1..=100".into());
        }
        if !(16..=8192).contains(&self.max_width) {
            return bad("max_width", "must be 16..=8192".into());
        }
        if self.qos > 2 {
            return bad("qos", format!("{} is not 0, 1 or 2", self.qos));
        }
        let topic = self.topic.replace("{device}", "d").replace("{pipeline}", "p");
        if !crate::mqtt::valid_topic(&topic) {
            return bad("topic", "not a valid MQTT topic (no wildcards, not empty)".into());
        }
        Ok(())
    }
}

fn top3() -> usize {
    3
}

/// What the anomaly score is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyScore {
    /// The first value of the output.
    #[default]
    Output,
    /// Mean squared error between the input tensor and the output (autoencoders).
    Reconstruction,
    /// 1 - probability of `normal_class` (classifiers).
    NotClass,
}

/// Postprocessing.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PostprocessConfig {
    /// Class scores with labels.
    Classify {
        /// Classes reported.
        #[serde(default = "top3")]
        top_k: usize,
        /// Classes scoring below are left out.
        #[serde(default)]
        min_score: f32,
        /// Softmax policy.
        #[serde(default)]
        softmax: Softmax,
        /// Output name (default: the first class-shaped output).
        #[serde(default)]
        output: Option<String>,
    },
    /// Raw values (regression).
    Values {
        /// Output name (default: the first).
        #[serde(default)]
        output: Option<String>,
    },
    /// An anomaly score compared with a threshold.
    Anomaly {
        /// Score at or above which the input is anomalous.
        threshold: f32,
        /// How the score is computed.
        #[serde(default)]
        score: AnomalyScore,
        /// For `not_class`: the label of the normal class.
        #[serde(default)]
        normal_class: Option<String>,
        /// Output name (default: the first).
        #[serde(default)]
        output: Option<String>,
    },
    /// Object detection: boxes with labels and scores.
    Detect(DetectConfig),
}

/// Output layouts of object detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectFormat {
    /// One output [1, N, 5+C]: cx, cy, w, h, objectness, class scores.
    Yolov5,
    /// One output [1, 4+C, N] (YOLOv8, YOLO11): cx, cy, w, h, class scores.
    Yolov8,
    /// Separate boxes [1, N, 4], classes [1, N], scores [1, N] and optional count [1] (TF OD API).
    Ssd,
}

/// Order of the four coordinates of an SSD-style box.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoxOrder {
    /// y1, x1, y2, x2 (TensorFlow).
    Yxyx,
    /// x1, y1, x2, y2.
    Xyxy,
}

/// Units of box coordinates in the model output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoxUnits {
    /// Model-input pixels.
    Pixels,
    /// Fractions 0..1 of the model input's width and height.
    Normalized,
}

fn quarter() -> f32 {
    0.25
}
fn hundred() -> usize {
    100
}

/// Object-detection postprocessing (`type = "detect"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectConfig {
    /// Output layout; guessed from the output shapes (and label count) when absent.
    #[serde(default)]
    pub format: Option<DetectFormat>,
    /// YOLO output in the other axis order: [1, N, 4+C] for yolov8, [1, 5+C, N] for yolov5.
    #[serde(default)]
    pub transposed: Option<bool>,
    /// Confidence below which a detection is dropped.
    #[serde(default = "quarter")]
    pub min_score: f32,
    /// Per-label confidence thresholds that replace `min_score`, e.g. `{ person = 0.6 }`.
    #[serde(default)]
    pub class_thresholds: std::collections::BTreeMap<String, f32>,
    /// Report only these labels (default: every label).
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// Class-wise non-maximum suppression: a box overlapping a better one of its class by more
    /// than this IoU is dropped (default 0.45 for YOLO; SSD outputs are suppressed by the model).
    #[serde(default)]
    pub iou_threshold: Option<f32>,
    /// Most detections reported per result, best first.
    #[serde(default = "hundred")]
    pub max_detections: usize,
    /// Box units in the output (default: pixels for YOLO, normalized for SSD).
    #[serde(default)]
    pub box_units: Option<BoxUnits>,
    /// SSD box coordinate order (default yxyx).
    #[serde(default)]
    pub box_order: Option<BoxOrder>,
    /// SSD: added to the class id to index the labels (-1 when ids start at 1 and line 1 is class 1).
    #[serde(default)]
    pub class_offset: i64,
    /// YOLO: the output to decode (default: the only 3-D output).
    #[serde(default)]
    pub output: Option<String>,
    /// SSD: name of the boxes output (default: found by name or shape).
    #[serde(default)]
    pub boxes_output: Option<String>,
    /// SSD: name of the classes output.
    #[serde(default)]
    pub classes_output: Option<String>,
    /// SSD: name of the scores output.
    #[serde(default)]
    pub scores_output: Option<String>,
    /// SSD: name of the detection count output (optional).
    #[serde(default)]
    pub count_output: Option<String>,
}

impl DetectConfig {
    /// Checks value ranges; the error is (key, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let unit = |x: f32| (0.0..=1.0).contains(&x);
        if !unit(self.min_score) {
            return Err(("min_score".into(), format!("{} is not in 0..=1", self.min_score)));
        }
        if let Some((label, t)) = self.class_thresholds.iter().find(|(_, t)| !unit(**t)) {
            return Err((format!("class_thresholds.{label}"), format!("{t} is not in 0..=1")));
        }
        if self.iou_threshold.is_some_and(|t| !(t > 0.0 && t <= 1.0)) {
            return Err(("iou_threshold".into(), "must be in (0, 1] (1 keeps every box)".into()));
        }
        if self.max_detections == 0 {
            return Err(("max_detections".into(), "must be at least 1".into()));
        }
        if self.classes.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(("classes".into(), "an empty list would report nothing; leave it out for every label".into()));
        }
        Ok(())
    }
}

impl PostprocessConfig {
    /// Checks the values on their own; the error is (key under `postprocess.`, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        match self {
            PostprocessConfig::Anomaly { threshold, .. } if !threshold.is_finite() => {
                Err(("threshold".into(), "must be a finite number".into()))
            }
            PostprocessConfig::Anomaly { score: AnomalyScore::NotClass, normal_class: None, .. } => {
                Err(("normal_class".into(), "needed when score = \"not_class\"".into()))
            }
            PostprocessConfig::Detect(d) => d.validate(),
            _ => Ok(()),
        }
    }
}
