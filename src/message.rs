//! What flows between the stages of a pipeline: source inputs, the bounded
//! input queue with its overflow policy, and inference results.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

/// One class and its score.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassScore {
    /// Index in the output vector.
    pub index: usize,
    /// Label from the labels file, or the index as text.
    pub label: String,
    /// Probability (after softmax where applied) or raw score.
    pub score: f32,
}

/// What a source gives the stages after it, as far as its config tells
/// (`SourceConfig::output`): preprocessing is chosen and checked against
/// this, without knowing the source's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOutput {
    /// The source's `type`, for messages.
    pub kind: &'static str,
    /// What its inputs are.
    pub gives: Gives,
    /// Inputs come from several origins (MQTT topics) and are windowed per origin.
    pub per_origin: bool,
    /// Sample rate and channels of a PCM audio stream, when the config says them.
    pub pcm: Option<(u32, usize)>,
}

/// What kind of inputs a source gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gives {
    /// Camera-like frames (images).
    Frames,
    /// Sensor samples, rows or audio.
    Values,
    /// Not known before the inputs arrive (files: images, arrays or tensors).
    Unknown,
}

impl SourceOutput {
    /// A source of values of kind `kind`, from one origin, without PCM settings.
    pub fn values(kind: &'static str) -> SourceOutput {
        SourceOutput { kind, gives: Gives::Values, per_origin: false, pcm: None }
    }

    /// True for a source of camera-like frames.
    pub fn is_frames(&self) -> bool {
        self.gives == Gives::Frames
    }
}

/// A camera frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Decoded RGB pixels.
    pub image: image::RgbImage,
    /// When it was captured.
    pub captured: SystemTime,
    /// Where it came from (file name), if anywhere in particular.
    pub origin: Option<String>,
}

/// Numeric values: one sensor sample (one value per channel), several
/// samples back to back, or one row of tabular features.
#[derive(Debug, Clone)]
pub struct Values {
    /// The numbers.
    pub values: Vec<f32>,
    /// Feature names when the input was a JSON object (tabular models).
    pub names: Option<Vec<String>>,
    /// When they were captured.
    pub captured: SystemTime,
    /// Where they came from, if anywhere in particular.
    pub origin: Option<String>,
}

/// One item from a source.
#[derive(Debug, Clone)]
pub enum Input {
    /// An image.
    Frame(Frame),
    /// Numbers.
    Values(Values),
    /// A ready tensor (a `.npy` file), fed to the model as is.
    Tensor {
        /// The tensor.
        tensor: crate::tensor::Tensor,
        /// When it was read.
        captured: SystemTime,
        /// The file.
        origin: Option<String>,
    },
}

impl Input {
    /// Capture time.
    pub fn captured(&self) -> SystemTime {
        match self {
            Input::Frame(f) => f.captured,
            Input::Values(v) => v.captured,
            Input::Tensor { captured, .. } => *captured,
        }
    }

    /// Origin (file name), if any.
    pub fn origin(&self) -> Option<&str> {
        match self {
            Input::Frame(f) => f.origin.as_deref(),
            Input::Values(v) => v.origin.as_deref(),
            Input::Tensor { origin, .. } => origin.as_deref(),
        }
    }
}

/// What to do when the input queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Drop the oldest queued item (a camera: the newest frame wins).
    DropOldest,
    /// Drop the item being pushed.
    DropNewest,
    /// Make the source wait (files replay: every item matters and the source can pause).
    Block,
}

/// The outcome of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Queued; the oldest item was dropped to make room.
    DroppedOldest,
    /// Not queued: the queue was full.
    DroppedNewest,
    /// The queue is closed (shutdown).
    Closed,
}

struct QueueState {
    items: VecDeque<Input>,
    closed: bool,
}

/// A bounded, closable queue between a source and its inference worker.
/// Capacity 1 with `DropOldest` is a newest-frame-wins slot.
pub struct InputQueue {
    state: Mutex<QueueState>,
    changed: Condvar,
    capacity: usize,
    overflow: Overflow,
}

impl InputQueue {
    /// A queue holding at most `capacity` items (at least 1).
    pub fn new(capacity: usize, overflow: Overflow) -> Arc<Self> {
        let capacity = capacity.max(1);
        Arc::new(InputQueue {
            state: Mutex::new(QueueState { items: VecDeque::new(), closed: false }),
            changed: Condvar::new(),
            capacity,
            overflow,
        })
    }

    /// Adds an item, applying the overflow policy when full. Only `Block` waits.
    pub fn push(&self, item: Input) -> Pushed {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.closed {
                return Pushed::Closed;
            }
            if st.items.len() < self.capacity {
                st.items.push_back(item);
                self.changed.notify_all();
                return Pushed::Queued;
            }
            match self.overflow {
                Overflow::DropOldest => {
                    st.items.pop_front();
                    st.items.push_back(item);
                    self.changed.notify_all();
                    return Pushed::DroppedOldest;
                }
                Overflow::DropNewest => return Pushed::DroppedNewest,
                Overflow::Block => {
                    st = self.changed.wait_timeout(st, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
                }
            }
        }
    }

    /// Takes the next item, waiting for one; `None` once closed and empty.
    pub fn pop(&self) -> Option<Input> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(item) = st.items.pop_front() {
                self.changed.notify_all();
                return Some(item);
            }
            if st.closed {
                return None;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// No more pushes; `pop` drains what is queued, then returns `None`.
    pub fn close(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.closed = true;
        self.changed.notify_all();
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.state.lock().map(|s| s.items.len()).unwrap_or(0)
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.state.lock().map(|s| s.closed).unwrap_or(true)
    }
}

/// `ms` rounded to whole microseconds: latencies are measured to about
/// that, and further digits in a payload are float noise
/// (`0.20741800000000002`).
pub fn micros(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

fn serialize_micros<S: serde::Serializer>(ms: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(micros(*ms))
}

/// Per-stage latency of one result, in milliseconds (serialized to the microsecond).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Latency {
    /// Decoding, resizing, windowing, conversion.
    #[serde(serialize_with = "serialize_micros")]
    pub preprocess: f64,
    /// The model.
    #[serde(serialize_with = "serialize_micros")]
    pub inference: f64,
    /// Scores, labels, thresholds.
    #[serde(serialize_with = "serialize_micros")]
    pub postprocess: f64,
    /// Capture to result ready (includes queueing).
    #[serde(serialize_with = "serialize_micros")]
    pub total: f64,
}

/// An anomaly verdict.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Anomaly {
    /// The score compared with the threshold.
    pub score: f32,
    /// The threshold.
    pub threshold: f32,
    /// score >= threshold.
    pub anomalous: bool,
}

/// The result part of a payload.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ResultBody {
    /// Best classes, best first (classification).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<ClassScore>>,
    /// Raw output values (regression or raw outputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<f32>>,
    /// Anomaly score and flag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<Anomaly>,
    /// Detected objects, best first, boxes in source-image pixels (detection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detections: Option<Vec<Detection>>,
    /// Size of the source image the boxes refer to (detection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSize>,
}

/// A box corner to corner, in source-image pixels (x right, y down, origin top left), rounded
/// to 0.01 px (f64, so that JSON shows the rounded value and not its nearest f32).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BoundingBox {
    /// Left edge.
    pub x1: f64,
    /// Top edge.
    pub y1: f64,
    /// Right edge.
    pub x2: f64,
    /// Bottom edge.
    pub y2: f64,
}

/// One detected object.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Detection {
    /// Label from the labels file, or the class index as text.
    pub label: String,
    /// Class index in the model's output.
    pub index: usize,
    /// Confidence (YOLOv5: objectness x class score).
    pub score: f32,
    /// Where, in source-image pixels.
    #[serde(rename = "box")]
    pub bbox: BoundingBox,
}

/// Width and height of an image in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ImageSize {
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

/// Why a result was published, when an output publishes on events only.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The top class changed.
    Change {
        /// Previous class label (None for the first result).
        from: Option<String>,
        /// New class label.
        to: String,
    },
    /// The score rose to or above the threshold.
    Rise {
        /// The score.
        score: f32,
        /// The threshold.
        threshold: f32,
    },
    /// The score fell below threshold minus hysteresis.
    Fall {
        /// The score.
        score: f32,
        /// The threshold.
        threshold: f32,
    },
    /// The set of detected labels changed (after debounce).
    LabelsChanged {
        /// Labels now present that were not.
        appeared: Vec<String>,
        /// Labels no longer present.
        left: Vec<String>,
        /// Every label present now.
        present: Vec<String>,
    },
}

/// One inference result, shared by every output of the pipeline.
#[derive(Debug, Clone)]
pub struct ResultMsg {
    /// Device id.
    pub device: Arc<str>,
    /// Pipeline name.
    pub pipeline: Arc<str>,
    /// Model name (file stem).
    pub model: Arc<str>,
    /// Model file SHA-256.
    pub model_sha256: Arc<str>,
    /// Per-pipeline sequence number of every result computed (published or not).
    pub seq: u64,
    /// Capture time of the input.
    pub captured: SystemTime,
    /// Where the input came from (file), if known.
    pub origin: Option<String>,
    /// Stage latencies.
    pub latency: Latency,
    /// What the model said.
    pub result: ResultBody,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(x: f32) -> Input {
        Input::Values(Values { values: vec![x], names: None, captured: SystemTime::now(), origin: None })
    }

    fn first(i: Input) -> f32 {
        match i {
            Input::Values(v) => v.values[0],
            _ => panic!(),
        }
    }

    #[test]
    fn latencies_are_serialized_to_the_microsecond() {
        let l = Latency { preprocess: 0.00466, inference: 0.20741800000000002, postprocess: 0.0004, total: 12.3456789 };
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(json, r#"{"preprocess":0.005,"inference":0.207,"postprocess":0.0,"total":12.346}"#);
    }

    #[test]
    fn capacity_one_drop_oldest_keeps_the_newest() {
        let q = InputQueue::new(1, Overflow::DropOldest);
        assert_eq!(q.push(values(1.0)), Pushed::Queued);
        assert_eq!(q.push(values(2.0)), Pushed::DroppedOldest);
        assert_eq!(first(q.pop().unwrap()), 2.0);
    }

    #[test]
    fn drop_newest_keeps_what_was_queued() {
        let q = InputQueue::new(2, Overflow::DropNewest);
        q.push(values(1.0));
        q.push(values(2.0));
        assert_eq!(q.push(values(3.0)), Pushed::DroppedNewest);
        assert_eq!(first(q.pop().unwrap()), 1.0);
    }

    #[test]
    fn close_drains_then_ends() {
        let q = InputQueue::new(4, Overflow::Block);
        q.push(values(1.0));
        q.close();
        assert_eq!(q.push(values(2.0)), Pushed::Closed);
        assert!(q.pop().is_some());
        assert!(q.pop().is_none());
    }

    #[test]
    fn block_waits_for_room() {
        let q = InputQueue::new(1, Overflow::Block);
        q.push(values(1.0));
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.push(values(2.0)));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(first(q.pop().unwrap()), 1.0);
        assert_eq!(t.join().unwrap(), Pushed::Queued);
        assert_eq!(first(q.pop().unwrap()), 2.0);
    }
}
