//! Object-detection postprocessing: decodes YOLOv5, YOLOv8/YOLO11 and SSD-style (TF OD API)
//! outputs into labelled boxes in source-image pixels, with confidence thresholds (global and
//! per label), a label filter, class-wise non-maximum suppression and a cap on the count.
//! The decoder keeps its scratch buffers between frames, so a frame allocates only its result.

use super::config::{BoxOrder, BoxUnits, DetectConfig, DetectFormat};
use crate::engine::TensorSpec;
use crate::message::{BoundingBox, Detection};
use crate::preprocess::ImageGeometry;
use crate::tensor::{Data, Tensor};

/// IoU threshold of YOLO's class-wise NMS when the config gives none.
pub const DEFAULT_IOU: f32 = 0.45;

/// Where the values are and how they are laid out.
#[derive(Debug, Clone, PartialEq)]
enum Layout {
    /// One output [1, attrs, n] (`attrs_first`) or [1, n, attrs], attrs = 4 (+1 objectness) + classes.
    Yolo { output: usize, objectness: bool, attrs_first: bool, classes: usize },
    /// Separate outputs, as TFLite's detection post-processing and the TF OD API emit them.
    Ssd { boxes: usize, classes: usize, scores: usize, count: Option<usize>, order: BoxOrder },
}

/// The fixed part of a decoder.
#[derive(Debug, Clone)]
struct Settings {
    layout: Layout,
    units: BoxUnits,
    labels: Vec<String>,
    /// Minimum score per class index; classes past the end use `min_score`.
    thresholds: Vec<f32>,
    min_score: f32,
    /// Classes reported (None: every class); classes past the end are not.
    allowed: Option<Vec<bool>>,
    /// The smallest threshold of any reported class: a cheap early skip.
    lowest: f32,
    iou: Option<f32>,
    max_detections: usize,
    class_offset: i64,
}

/// A box that passed its threshold, in model-input pixels.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    bbox: [f32; 4],
    score: f32,
    class: usize,
    index: usize,
}

/// Buffers reused from frame to frame.
#[derive(Debug, Clone, Default)]
struct Scratch {
    best_score: Vec<f32>,
    best_class: Vec<u32>,
    candidates: Vec<Candidate>,
    kept: Vec<usize>,
    /// Non-f32 outputs converted to f32, one buffer per output read.
    converted: [Vec<f32>; 4],
}

/// A configured detection decoder for one model.
#[derive(Debug, Clone)]
pub struct Detector {
    settings: Settings,
    scratch: Scratch,
}

fn describe(outputs: &[TensorSpec]) -> String {
    outputs.iter().map(|o| format!("`{}` {:?}", o.name, o.shape)).collect::<Vec<_>>().join(", ")
}

fn named(outputs: &[TensorSpec], name: &str, key: &str) -> Result<usize, String> {
    outputs
        .iter()
        .position(|o| o.name == name)
        .ok_or_else(|| format!("{key}: the model has no output `{name}` (outputs: {})", describe(outputs)))
}

fn format_name(f: DetectFormat) -> &'static str {
    match f {
        DetectFormat::Yolov5 => "yolov5",
        DetectFormat::Yolov8 => "yolov8",
        DetectFormat::Ssd => "ssd",
    }
}

/// Picks the YOLO output and its orientation from the shape, the label count and the config.
fn yolo_layout(
    cfg: &DetectConfig,
    outputs: &[TensorSpec],
    labels: &[String],
    format: Option<DetectFormat>,
) -> Result<(DetectFormat, Layout), String> {
    let output = match &cfg.output {
        Some(name) => named(outputs, name, "output")?,
        None => {
            let three_d: Vec<usize> = (0..outputs.len()).filter(|&i| outputs[i].shape.len() == 3).collect();
            match three_d.as_slice() {
                [one] => *one,
                [] => return Err(format!("no output is 3-D like a YOLO output (outputs: {})", describe(outputs))),
                _ => {
                    return Err(format!(
                        "several 3-D outputs ({}): set postprocess.output to the one to decode",
                        describe(outputs)
                    ))
                }
            }
        }
    };
    let spec = &outputs[output];
    let s = &spec.shape;
    if s.len() != 3 || s[0] != 1 {
        return Err(format!("output `{}` has shape {s:?}; YOLO outputs are [1, a, b]", spec.name));
    }
    // (format, attributes along axis 1, transposed relative to that format's usual layout)
    let all = [
        (DetectFormat::Yolov8, true, false),
        (DetectFormat::Yolov5, false, false),
        (DetectFormat::Yolov8, false, true),
        (DetectFormat::Yolov5, true, true),
    ];
    let transposed = cfg.transposed.or(format.map(|_| false));
    let fits: Vec<(DetectFormat, bool)> = all
        .iter()
        .filter(|(f, _, t)| format.is_none_or(|want| want == *f) && transposed.is_none_or(|want| want == *t))
        // Without labels the label count cannot pick the layout: a transposed v5 is too rare to
        // guess, the attribute axis is taken to be the shorter one (models predict far more boxes
        // than they have classes), and [1, N, 5+C] vs a transposed v8 is left to the config.
        .filter(|(f, _, t)| {
            !(labels.is_empty() && format.is_none() && transposed.is_none() && *t && *f == DetectFormat::Yolov5)
        })
        .filter(|(f, attrs_first, _)| {
            let (attrs, n) = if *attrs_first { (s[1], s[2]) } else { (s[2], s[1]) };
            let head = if *f == DetectFormat::Yolov5 { 5 } else { 4 };
            attrs > head && if labels.is_empty() { attrs < n } else { attrs == head + labels.len() }
        })
        .map(|(f, a, _)| (*f, *a))
        .collect();
    let label_note = if labels.is_empty() { String::new() } else { format!(" with {} labels", labels.len()) };
    let (f, attrs_first) = match fits.as_slice() {
        [one] if labels.is_empty() && format.is_none() && transposed.is_none() && !one.1 => {
            return Err(format!(
                "output `{}` {s:?} could be YOLOv5 [1, N, 5+C] or a transposed YOLOv8 [1, N, 4+C]: \
                 give a labels file, or set postprocess.format (and transposed = true for YOLOv8)",
                spec.name
            ))
        }
        [one] => *one,
        [] => {
            let want = match format {
                Some(DetectFormat::Yolov5) => "[1, N, 5+C] (YOLOv5)",
                Some(_) => "[1, 4+C, N] (YOLOv8; [1, N, 4+C] with transposed = true)",
                None => "[1, 4+C, N] (YOLOv8) or [1, N, 5+C] (YOLOv5)",
            };
            return Err(format!(
                "output `{}` has shape {s:?}, which does not fit {want}{label_note} (outputs: {})",
                spec.name,
                describe(outputs)
            ));
        }
        _ => {
            return Err(format!(
                "output `{}` {s:?}{label_note} fits several YOLO layouts: set postprocess.format and transposed",
                spec.name
            ))
        }
    };
    let objectness = f == DetectFormat::Yolov5;
    let attrs = if attrs_first { s[1] } else { s[2] };
    let classes = attrs - if objectness { 5 } else { 4 };
    Ok((f, Layout::Yolo { output, objectness, attrs_first, classes }))
}

/// Finds one SSD output: by its configured name, a usual name, a unique name part, or a shape test.
fn ssd_output(
    outputs: &[TensorSpec],
    configured: &Option<String>,
    key: &str,
    exact: &[&str],
    part: &str,
) -> Result<Option<usize>, String> {
    if let Some(name) = configured {
        return named(outputs, name, key).map(Some);
    }
    if let Some(i) = outputs.iter().position(|o| exact.contains(&o.name.to_lowercase().as_str())) {
        return Ok(Some(i));
    }
    let parts: Vec<usize> = (0..outputs.len()).filter(|&i| outputs[i].name.to_lowercase().contains(part)).collect();
    Ok(if parts.len() == 1 { Some(parts[0]) } else { None })
}

fn ssd_layout(cfg: &DetectConfig, outputs: &[TensorSpec]) -> Result<Layout, String> {
    let elems = |i: usize| outputs[i].shape.iter().product::<usize>();
    let mut boxes = ssd_output(outputs, &cfg.boxes_output, "boxes_output", &["detection_boxes", "boxes"], "box")?;
    let mut classes =
        ssd_output(outputs, &cfg.classes_output, "classes_output", &["detection_classes", "classes"], "class")?;
    let mut scores =
        ssd_output(outputs, &cfg.scores_output, "scores_output", &["detection_scores", "scores"], "score")?;
    let mut count = ssd_output(outputs, &cfg.count_output, "count_output", &["num_detections", "count"], "num")?;
    if boxes.is_none() {
        let by_shape: Vec<usize> = (0..outputs.len())
            .filter(|&i| outputs[i].shape.len() >= 2 && outputs[i].shape.last() == Some(&4))
            .collect();
        if by_shape.len() == 1 {
            boxes = Some(by_shape[0]);
        }
    }
    // TFLite's TFLite_Detection_PostProcess order: boxes, classes, scores, count.
    if boxes == Some(0) && classes.is_none() && scores.is_none() && (3..=4).contains(&outputs.len()) {
        classes = Some(1);
        scores = Some(2);
        if outputs.len() == 4 && count.is_none() {
            count = Some(3);
        }
    }
    let (Some(boxes), Some(classes), Some(scores)) = (boxes, classes, scores) else {
        return Err(format!(
            "cannot tell which outputs are the SSD boxes, classes and scores (outputs: {}): \
             set boxes_output, classes_output, scores_output (and count_output)",
            describe(outputs)
        ));
    };
    let n = elems(scores);
    let shape = |i: usize| &outputs[i].shape;
    if outputs[boxes].shape.last() != Some(&4) || elems(boxes) != 4 * n {
        return Err(format!(
            "SSD boxes `{}` {:?} should be [1, N, 4] with N = {n} (from scores `{}` {:?})",
            outputs[boxes].name,
            shape(boxes),
            outputs[scores].name,
            shape(scores)
        ));
    }
    if elems(classes) != n {
        return Err(format!(
            "SSD classes `{}` {:?} and scores `{}` {:?} should both be [1, N]",
            outputs[classes].name,
            shape(classes),
            outputs[scores].name,
            shape(scores)
        ));
    }
    if let Some(c) = count {
        if elems(c) != 1 {
            return Err(format!("SSD count `{}` {:?} should hold one value", outputs[c].name, shape(c)));
        }
    }
    if [boxes, classes, scores].iter().chain(count.iter()).collect::<std::collections::BTreeSet<_>>().len()
        != 3 + count.is_some() as usize
    {
        return Err(format!(
            "SSD outputs must be distinct (outputs: {}): set boxes_output, classes_output, scores_output",
            describe(outputs)
        ));
    }
    Ok(Layout::Ssd { boxes, classes, scores, count, order: cfg.box_order.unwrap_or(BoxOrder::Yxyx) })
}

impl Detector {
    /// Builds a decoder; the layout is guessed from the outputs where the config leaves it open.
    pub fn new(cfg: &DetectConfig, outputs: &[TensorSpec], labels: &[String]) -> Result<Self, String> {
        let ssd_keys = [&cfg.boxes_output, &cfg.classes_output, &cfg.scores_output, &cfg.count_output];
        let wants_ssd = cfg.format == Some(DetectFormat::Ssd) || ssd_keys.iter().any(|k| k.is_some());
        let (format, layout) = if wants_ssd {
            (DetectFormat::Ssd, ssd_layout(cfg, outputs)?)
        } else if cfg.format.is_none() && outputs.len() >= 3 {
            match ssd_layout(cfg, outputs) {
                Ok(l) => (DetectFormat::Ssd, l),
                Err(ssd) => yolo_layout(cfg, outputs, labels, None).map_err(|yolo| format!("{yolo}; {ssd}"))?,
            }
        } else {
            yolo_layout(cfg, outputs, labels, cfg.format)?
        };
        if format != DetectFormat::Ssd {
            if cfg.box_order.is_some() {
                return Err(format!("box_order applies to SSD outputs; this is {}", format_name(format)));
            }
            if cfg.class_offset != 0 {
                return Err(format!("class_offset applies to SSD outputs; this is {}", format_name(format)));
            }
        } else if cfg.transposed.is_some() || cfg.output.is_some() {
            return Err("transposed and output apply to YOLO outputs; this is ssd (use boxes_output, ...)".into());
        }
        let class_count = match layout {
            Layout::Yolo { classes, .. } => {
                if !labels.is_empty() && labels.len() != classes {
                    return Err(format!(
                        "the labels file has {} labels, the output has {classes} classes",
                        labels.len()
                    ));
                }
                classes
            }
            Layout::Ssd { .. } => labels.len(),
        };
        let labels: Vec<String> =
            if labels.is_empty() { (0..class_count).map(|i| i.to_string()).collect() } else { labels.to_vec() };
        let class_of = |name: &str, key: &str| -> Result<usize, String> {
            labels
                .iter()
                .position(|l| l == name)
                .or_else(|| if class_count == 0 { name.parse().ok() } else { None })
                .ok_or_else(|| {
                    let shown: Vec<&str> = labels.iter().take(12).map(String::as_str).collect();
                    let more = if labels.len() > shown.len() { ", ..." } else { "" };
                    format!("{key}: `{name}` is not a label (labels: {}{more})", shown.join(", "))
                })
        };
        let mut thresholds = vec![cfg.min_score; class_count];
        for (name, &t) in &cfg.class_thresholds {
            let c = class_of(name, "class_thresholds")?;
            if c >= thresholds.len() {
                thresholds.resize(c + 1, cfg.min_score);
            }
            thresholds[c] = t;
        }
        let allowed = match &cfg.classes {
            None => None,
            Some(names) => {
                let mut allowed = vec![false; class_count];
                for name in names {
                    let c = class_of(name, "classes")?;
                    if c >= allowed.len() {
                        allowed.resize(c + 1, false);
                    }
                    allowed[c] = true;
                }
                Some(allowed)
            }
        };
        let lowest = match &allowed {
            None => thresholds.iter().copied().fold(cfg.min_score, f32::min),
            Some(a) => (0..a.len())
                .filter(|&c| a[c])
                .map(|c| thresholds.get(c).copied().unwrap_or(cfg.min_score))
                .fold(f32::INFINITY, f32::min),
        };
        let iou = match (cfg.iou_threshold, format) {
            (Some(t), _) => Some(t),
            (None, DetectFormat::Ssd) => None,
            (None, _) => Some(DEFAULT_IOU),
        };
        let units =
            cfg.box_units.unwrap_or(if format == DetectFormat::Ssd { BoxUnits::Normalized } else { BoxUnits::Pixels });
        Ok(Detector {
            settings: Settings {
                layout,
                units,
                labels,
                thresholds,
                min_score: cfg.min_score,
                allowed,
                lowest,
                iou,
                max_detections: cfg.max_detections.max(1),
                class_offset: cfg.class_offset,
            },
            scratch: Scratch::default(),
        })
    }

    /// `yolov5`, `yolov8` or `ssd`: what the decoder reads.
    pub fn format_name(&self) -> &'static str {
        match self.settings.layout {
            Layout::Yolo { objectness: true, .. } => "yolov5",
            Layout::Yolo { .. } => "yolov8",
            Layout::Ssd { .. } => "ssd",
        }
    }

    /// Label of a class index.
    pub fn label(&self, class: usize) -> String {
        self.settings.labels.get(class).cloned().unwrap_or_else(|| class.to_string())
    }

    /// Decodes one result: detections best first, boxes in source-image pixels, clipped to it.
    pub fn decode(&mut self, outputs: &[Tensor], geometry: &ImageGeometry) -> Result<Vec<Detection>, String> {
        let Detector { settings, scratch } = self;
        scratch.candidates.clear();
        match settings.layout {
            Layout::Yolo { output, objectness, attrs_first, classes } => {
                let t = outputs.get(output).ok_or("the model gave fewer outputs than it declares")?;
                let Scratch { best_score, best_class, candidates, converted: [conv, ..], .. } = scratch;
                let values = as_f32(t, conv)?;
                let head = if objectness { 5 } else { 4 };
                let attrs = head + classes;
                let n = values.len() / attrs;
                let s = &t.shape;
                let fits = s.len() == 3 && if attrs_first { s[1] == attrs } else { s[2] == attrs };
                if !fits || n * attrs != values.len() {
                    return Err(format!("output shape {s:?} changed: expected {attrs} values per box"));
                }
                let unit = unit_scale(settings.units, geometry);
                if attrs_first {
                    let best = (best_score, best_class);
                    decode_attrs_first(settings, best, candidates, values, head, classes, objectness, unit);
                } else {
                    decode_boxes_first(settings, candidates, values, head, classes, objectness, unit);
                }
            }
            Layout::Ssd { boxes, classes, scores, count, order } => {
                let get = |i: usize| outputs.get(i).ok_or("the model gave fewer outputs than it declares");
                let [c0, c1, c2, c3] = &mut scratch.converted;
                let boxes = as_f32(get(boxes)?, c0)?;
                let classes = as_f32(get(classes)?, c1)?;
                let scores = as_f32(get(scores)?, c2)?;
                let count = match count {
                    Some(i) => as_f32(get(i)?, c3)?.first().copied(),
                    None => None,
                };
                if boxes.len() != 4 * scores.len() || classes.len() != scores.len() {
                    return Err(format!(
                        "SSD outputs disagree: {} box values, {} classes, {} scores",
                        boxes.len(),
                        classes.len(),
                        scores.len()
                    ));
                }
                let unit = unit_scale(settings.units, geometry);
                decode_ssd(settings, &mut scratch.candidates, boxes, classes, scores, count, order, unit);
            }
        }
        suppress(&mut scratch.candidates, &mut scratch.kept, settings.iou, settings.max_detections);
        let mut found = Vec::with_capacity(scratch.kept.len());
        for &k in &scratch.kept {
            let c = scratch.candidates[k];
            if let Some(bbox) = to_source(c.bbox, geometry) {
                let label = settings.labels.get(c.class).cloned().unwrap_or_else(|| c.class.to_string());
                found.push(Detection { label, index: c.class, score: c.score, bbox });
            }
        }
        Ok(found)
    }
}

impl Settings {
    fn threshold(&self, class: usize) -> f32 {
        self.thresholds.get(class).copied().unwrap_or(self.min_score)
    }

    fn passes(&self, class: usize, score: f32) -> bool {
        score >= self.threshold(class) && self.allowed.as_ref().is_none_or(|a| a.get(class) == Some(&true))
    }
}

/// The tensor's values as f32: borrowed when they are f32, else converted into `buf`.
fn as_f32<'a>(t: &'a Tensor, buf: &'a mut Vec<f32>) -> Result<&'a [f32], String> {
    fn fill<T: Copy>(buf: &mut Vec<f32>, v: &[T], f: impl Fn(T) -> f32) {
        buf.clear();
        buf.extend(v.iter().map(|&x| f(x)));
    }
    match &t.data {
        Data::F32(v) => return Ok(v),
        Data::F64(v) => fill(buf, v, |x| x as f32),
        Data::I8(v) => fill(buf, v, f32::from),
        Data::U8(v) => fill(buf, v, f32::from),
        Data::I16(v) => fill(buf, v, f32::from),
        Data::I32(v) => fill(buf, v, |x| x as f32),
        Data::I64(v) => fill(buf, v, |x| x as f32),
        Data::Bool(_) | Data::String(_) => {
            return Err(format!("an output holds {} values, not numbers", t.elem_type()));
        }
    }
    Ok(buf)
}

/// Multipliers from output units to model-input pixels.
fn unit_scale(units: BoxUnits, g: &ImageGeometry) -> (f32, f32) {
    match units {
        BoxUnits::Pixels => (1.0, 1.0),
        BoxUnits::Normalized => (g.input.0 as f32, g.input.1 as f32),
    }
}

fn center_box(cx: f32, cy: f32, w: f32, h: f32, unit: (f32, f32)) -> [f32; 4] {
    let (cx, cy, hw, hh) = (cx * unit.0, cy * unit.1, w * unit.0 / 2.0, h * unit.1 / 2.0);
    [cx - hw, cy - hh, cx + hw, cy + hh]
}

/// [1, attrs, n]: one contiguous row per attribute. The best class is found one class row at a
/// time, which reads memory in order and keeps the inner loop simple enough to vectorise.
#[allow(clippy::too_many_arguments)]
fn decode_attrs_first(
    s: &Settings,
    (best_score, best_class): (&mut Vec<f32>, &mut Vec<u32>),
    candidates: &mut Vec<Candidate>,
    values: &[f32],
    head: usize,
    classes: usize,
    objectness: bool,
    unit: (f32, f32),
) {
    let n = values.len() / (head + classes);
    best_score.clear();
    best_score.extend_from_slice(&values[head * n..(head + 1) * n]);
    best_class.clear();
    best_class.resize(n, 0);
    for c in 1..classes {
        let row = &values[(head + c) * n..(head + c + 1) * n];
        for ((best, class), &v) in best_score.iter_mut().zip(best_class.iter_mut()).zip(row) {
            if v > *best {
                *best = v;
                *class = c as u32;
            }
        }
    }
    for i in 0..n {
        let score = if objectness { best_score[i] * values[4 * n + i] } else { best_score[i] };
        if score < s.lowest {
            continue;
        }
        let class = best_class[i] as usize;
        if !s.passes(class, score) {
            continue;
        }
        let bbox = center_box(values[i], values[n + i], values[2 * n + i], values[3 * n + i], unit);
        candidates.push(Candidate { bbox, score, class, index: i });
    }
}

/// [1, n, attrs]: one contiguous row per box.
fn decode_boxes_first(
    s: &Settings,
    candidates: &mut Vec<Candidate>,
    values: &[f32],
    head: usize,
    classes: usize,
    objectness: bool,
    unit: (f32, f32),
) {
    for (i, row) in values.chunks_exact(head + classes).enumerate() {
        let obj = if objectness { row[4] } else { 1.0 };
        // Class scores are at most 1, so a low objectness rules the box out before the argmax.
        if obj < s.lowest {
            continue;
        }
        let (mut class, mut best) = (0, row[head]);
        for (c, &v) in row[head..].iter().enumerate().skip(1) {
            if v > best {
                best = v;
                class = c;
            }
        }
        let score = best * obj;
        if !s.passes(class, score) {
            continue;
        }
        candidates.push(Candidate { bbox: center_box(row[0], row[1], row[2], row[3], unit), score, class, index: i });
    }
}

#[allow(clippy::too_many_arguments)]
fn decode_ssd(
    s: &Settings,
    candidates: &mut Vec<Candidate>,
    boxes: &[f32],
    classes: &[f32],
    scores: &[f32],
    count: Option<f32>,
    order: BoxOrder,
    unit: (f32, f32),
) {
    // The count says how many leading rows are real; the rest is padding.
    let n = match count {
        Some(c) if c.is_finite() => (c.max(0.0) as usize).min(scores.len()),
        _ => scores.len(),
    };
    for i in 0..n {
        let score = scores[i];
        let raw = classes[i];
        if score < s.lowest || !raw.is_finite() {
            continue;
        }
        let Ok(class) = usize::try_from(raw.round() as i64 + s.class_offset) else { continue };
        if !s.passes(class, score) {
            continue;
        }
        let q = &boxes[4 * i..4 * i + 4];
        let (x1, y1, x2, y2) = match order {
            BoxOrder::Yxyx => (q[1], q[0], q[3], q[2]),
            BoxOrder::Xyxy => (q[0], q[1], q[2], q[3]),
        };
        let bbox = [x1 * unit.0, y1 * unit.1, x2 * unit.0, y2 * unit.1];
        candidates.push(Candidate { bbox, score, class, index: i });
    }
}

/// Intersection over union of two corner boxes (0 when either is empty).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Sorts best first (ties: lower index first) and keeps, greedily, the boxes that overlap no
/// better box of their class by more than `iou_threshold`, up to `max` of them.
fn suppress(candidates: &mut [Candidate], kept: &mut Vec<usize>, iou_threshold: Option<f32>, max: usize) {
    candidates.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
    kept.clear();
    for (i, c) in candidates.iter().enumerate() {
        if kept.len() >= max {
            break;
        }
        let suppressed = iou_threshold.is_some_and(|t| {
            kept.iter().any(|&k| candidates[k].class == c.class && iou(&candidates[k].bbox, &c.bbox) > t)
        });
        if !suppressed {
            kept.push(i);
        }
    }
}

/// Model-input pixels -> source pixels, clipped; None when nothing of the box is in the image.
fn to_source(b: [f32; 4], g: &ImageGeometry) -> Option<BoundingBox> {
    let (sx, sy) = g.placement.scale;
    let (px, py) = (g.placement.pad.0 as f32, g.placement.pad.1 as f32);
    let (w, h) = (g.source.0 as f32, g.source.1 as f32);
    // Two decimals: finer than a pixel, and short in JSON.
    let fix = |v: f32, max: f32| (f64::from(v.clamp(0.0, max)) * 100.0).round() / 100.0;
    let x1 = fix((b[0] - px) / sx, w);
    let y1 = fix((b[1] - py) / sy, h);
    let x2 = fix((b[2] - px) / sx, w);
    let y2 = fix((b[3] - py) / sy, h);
    (x2 > x1 && y2 > y1).then_some(BoundingBox { x1, y1, x2, y2 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::Placement;
    use crate::tensor::ElemType;

    fn spec(name: &str, shape: &[usize]) -> TensorSpec {
        TensorSpec { name: name.into(), shape: shape.to_vec(), elem_type: ElemType::F32, quantization: None }
    }

    fn cfg(toml_text: &str) -> DetectConfig {
        toml::from_str(toml_text).unwrap()
    }

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// The model input is the image itself.
    fn identity(w: u32, h: u32) -> ImageGeometry {
        ImageGeometry { placement: Placement { scale: (1.0, 1.0), pad: (0, 0) }, source: (w, h), input: (w, h) }
    }

    /// A YOLOv8 output [1, 4+C, N] from rows of (cx, cy, w, h, scores...).
    fn yolov8(rows: &[Vec<f32>]) -> Tensor {
        let attrs = rows[0].len();
        let n = rows.len();
        let mut v = vec![0.0; attrs * n];
        for (i, r) in rows.iter().enumerate() {
            for (a, &x) in r.iter().enumerate() {
                v[a * n + i] = x;
            }
        }
        Tensor::from_f32(vec![1, attrs, n], v).unwrap()
    }

    fn boxes(d: &[Detection]) -> Vec<(String, [f64; 4])> {
        d.iter().map(|d| (d.label.clone(), [d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2])).collect()
    }

    #[test]
    fn nms_drops_overlapping_boxes_of_a_class_and_keeps_other_classes() {
        let mut det = Detector::new(&cfg(""), &[spec("out", &[1, 6, 4])], &labels(&["cat", "dog"])).unwrap();
        let out = yolov8(&[
            vec![50.0, 50.0, 20.0, 20.0, 0.9, 0.1], // cat, best
            vec![52.0, 50.0, 20.0, 20.0, 0.8, 0.1], // cat, IoU 0.82 with the first: dropped
            vec![51.0, 50.0, 20.0, 20.0, 0.1, 0.7], // dog on the same spot: kept
            vec![80.0, 80.0, 10.0, 10.0, 0.6, 0.0], // cat elsewhere: kept
        ]);
        let d = det.decode(&[out], &identity(100, 100)).unwrap();
        assert_eq!(
            boxes(&d),
            vec![
                ("cat".to_string(), [40.0, 40.0, 60.0, 60.0]),
                ("dog".to_string(), [41.0, 40.0, 61.0, 60.0]),
                ("cat".to_string(), [75.0, 75.0, 85.0, 85.0]),
            ]
        );
        assert_eq!(d.iter().map(|d| d.score).collect::<Vec<_>>(), [0.9, 0.7, 0.6]);
        assert_eq!(d.iter().map(|d| d.index).collect::<Vec<_>>(), [0, 1, 0]);

        // A looser IoU threshold keeps the overlapping cat; max_detections cuts the tail.
        let mut det = Detector::new(
            &cfg("iou_threshold = 0.9\nmax_detections = 2"),
            &[spec("out", &[1, 6, 4])],
            &labels(&["cat", "dog"]),
        )
        .unwrap();
        let out = yolov8(&[
            vec![50.0, 50.0, 20.0, 20.0, 0.9, 0.1],
            vec![52.0, 50.0, 20.0, 20.0, 0.8, 0.1],
            vec![51.0, 50.0, 20.0, 20.0, 0.1, 0.7],
            vec![80.0, 80.0, 10.0, 10.0, 0.6, 0.0],
        ]);
        let d = det.decode(&[out], &identity(100, 100)).unwrap();
        assert_eq!(d.iter().map(|d| d.score).collect::<Vec<_>>(), [0.9, 0.8]);
    }

    #[test]
    fn iou_of_known_boxes() {
        assert_eq!(iou(&[0.0, 0.0, 10.0, 10.0], &[5.0, 0.0, 15.0, 10.0]), 50.0 / 150.0);
        assert_eq!(iou(&[0.0, 0.0, 10.0, 10.0], &[20.0, 20.0, 30.0, 30.0]), 0.0);
        assert_eq!(iou(&[0.0, 0.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 0.0]), 0.0);
    }

    #[test]
    fn letterbox_and_stretch_map_back_to_source_pixels() {
        // A 640x480 image letterboxed into 320x320: scale 0.5, 40 px of padding on top.
        let letterbox = ImageGeometry {
            placement: Placement { scale: (0.5, 0.5), pad: (0, 40) },
            source: (640, 480),
            input: (320, 320),
        };
        let mut det = Detector::new(&cfg(""), &[spec("out", &[1, 5, 3])], &labels(&["thing"])).unwrap();
        let out = yolov8(&[
            // model box x 90..110, y 130..170 -> source x 180..220, y (130-40)*2=180 .. 260
            vec![100.0, 150.0, 20.0, 40.0, 0.9],
            // runs into the top padding and past the right edge: clipped to the image
            vec![310.0, 45.0, 40.0, 20.0, 0.8],
            // entirely inside the bottom padding: nothing of it is in the image
            vec![100.0, 300.0, 20.0, 20.0, 0.7],
        ]);
        let d = det.decode(&[out], &letterbox).unwrap();
        assert_eq!(
            boxes(&d),
            vec![("thing".to_string(), [180.0, 180.0, 220.0, 260.0]), ("thing".to_string(), [580.0, 0.0, 640.0, 30.0])]
        );

        // The same image stretched to 320x320: x scale 0.5, y scale 2/3.
        let stretch = ImageGeometry {
            placement: Placement { scale: (0.5, 320.0 / 480.0), pad: (0, 0) },
            source: (640, 480),
            input: (320, 320),
        };
        let out = yolov8(&[vec![100.0, 150.0, 20.0, 40.0, 0.9]]);
        let d = det.decode(&[out], &stretch).unwrap();
        // y: 130 * 1.5 = 195, 170 * 1.5 = 255
        assert_eq!(boxes(&d), vec![("thing".to_string(), [180.0, 195.0, 220.0, 255.0])]);

        // Normalised units are fractions of the model input.
        let mut det =
            Detector::new(&cfg("box_units = \"normalized\""), &[spec("out", &[1, 5, 3])], &labels(&["thing"])).unwrap();
        let out = yolov8(&[vec![100.0 / 320.0, 150.0 / 320.0, 20.0 / 320.0, 40.0 / 320.0, 0.9]]);
        let d = det.decode(&[out], &letterbox).unwrap();
        assert_eq!(boxes(&d), vec![("thing".to_string(), [180.0, 180.0, 220.0, 260.0])]);
    }

    #[test]
    fn yolov8_transposed_is_decoded_when_told_or_when_the_labels_fit() {
        // [1, N, 4+C] with 2 classes; YOLO outputs have more boxes than attributes, so 8 boxes.
        let mut rows8 = vec![vec![10.0, 10.0, 4.0, 4.0, 0.2, 0.9], vec![30.0, 30.0, 4.0, 4.0, 0.3, 0.1]];
        for k in 0..6 {
            rows8.push(vec![50.0 + k as f32, 50.0, 2.0, 2.0, 0.0, 0.0]);
        }
        let flat: Vec<f32> = rows8.iter().flatten().copied().collect();
        let t8 = Tensor::from_f32(vec![1, 8, 6], flat).unwrap();
        let outs8 = [spec("out", &[1, 8, 6])];
        let mut told = Detector::new(&cfg("format = \"yolov8\"\ntransposed = true"), &outs8, &[]).unwrap();
        let mut by_labels = Detector::new(&cfg(""), &outs8, &labels(&["a", "b"])).unwrap();
        for det in [&mut told, &mut by_labels] {
            assert_eq!(det.format_name(), "yolov8");
            let d = det.decode(std::slice::from_ref(&t8), &identity(64, 64)).unwrap();
            assert_eq!(d.iter().map(|d| (d.index, d.score)).collect::<Vec<_>>(), [(1, 0.9), (0, 0.3)]);
            assert_eq!([d[0].bbox.x1, d[0].bbox.y1, d[0].bbox.x2, d[0].bbox.y2], [8.0, 8.0, 12.0, 12.0]);
        }
        // Without labels or format, [1, N, 6] could be YOLOv5 with 1 class or YOLOv8 with 2.
        let e = Detector::new(&cfg(""), &outs8, &[]).unwrap_err();
        assert!(e.contains("`out`") && e.contains("format"), "{e}");
    }

    #[test]
    fn yolov5_multiplies_objectness_and_class_score() {
        // [1, N, 5+C]: cx, cy, w, h, objectness, 2 classes; 8 boxes so the shape is plausible.
        let mut rows = vec![
            vec![20.0, 20.0, 10.0, 10.0, 0.9, 0.2, 0.8], // b: 0.72
            vec![60.0, 20.0, 10.0, 10.0, 0.5, 0.9, 0.1], // a: 0.45
            vec![20.0, 60.0, 10.0, 10.0, 0.2, 1.0, 0.0], // a: 0.2, below 0.25
        ];
        rows.resize(8, vec![0.0; 7]);
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let t = Tensor::from_f32(vec![1, 8, 7], flat).unwrap();
        let outs = [spec("out", &[1, 8, 7])];
        let mut det = Detector::new(&cfg(""), &outs, &labels(&["a", "b"])).unwrap();
        assert_eq!(det.format_name(), "yolov5");
        let d = det.decode(std::slice::from_ref(&t), &identity(100, 100)).unwrap();
        let got: Vec<(String, f32)> = d.iter().map(|d| (d.label.clone(), d.score)).collect();
        assert_eq!(got, [("b".to_string(), 0.9 * 0.8), ("a".to_string(), 0.5 * 0.9)]);
        assert_eq!([d[1].bbox.x1, d[1].bbox.y1, d[1].bbox.x2, d[1].bbox.y2], [55.0, 15.0, 65.0, 25.0]);
        // Explicit format without labels: classes = attrs - 5.
        let mut det = Detector::new(&cfg("format = \"yolov5\""), &outs, &[]).unwrap();
        let d = det.decode(std::slice::from_ref(&t), &identity(100, 100)).unwrap();
        assert_eq!(d.iter().map(|d| d.label.as_str()).collect::<Vec<_>>(), ["1", "0"]);
    }

    #[test]
    fn per_class_thresholds_and_class_filter() {
        let out_spec = [spec("out", &[1, 7, 4])];
        let names = labels(&["person", "car", "dog"]);
        let rows = vec![
            vec![10.0, 10.0, 4.0, 4.0, 0.5, 0.0, 0.0], // person 0.5 < 0.6: dropped
            vec![30.0, 10.0, 4.0, 4.0, 0.0, 0.3, 0.0], // car 0.3 >= 0.25: kept
            vec![50.0, 10.0, 4.0, 4.0, 0.0, 0.0, 0.9], // dog: kept unless filtered
            vec![70.0, 10.0, 4.0, 4.0, 0.7, 0.0, 0.0], // person 0.7: kept
        ];
        let mut det = Detector::new(&cfg("class_thresholds = { person = 0.6 }"), &out_spec, &names).unwrap();
        let d = det.decode(&[yolov8(&rows)], &identity(100, 100)).unwrap();
        assert_eq!(
            d.iter().map(|d| (d.label.as_str(), d.score)).collect::<Vec<_>>(),
            [("dog", 0.9), ("person", 0.7), ("car", 0.3)]
        );
        let mut det = Detector::new(
            &cfg("classes = [\"person\", \"car\"]\nclass_thresholds = { person = 0.6 }"),
            &out_spec,
            &names,
        )
        .unwrap();
        let d = det.decode(&[yolov8(&rows)], &identity(100, 100)).unwrap();
        assert_eq!(d.iter().map(|d| d.label.as_str()).collect::<Vec<_>>(), ["person", "car"]);
        // A box whose best class is filtered out is not reported as its second-best class.
        let rows = vec![vec![10.0, 10.0, 4.0, 4.0, 0.4, 0.0, 0.9], vec![0.0; 7], vec![0.0; 7], vec![0.0; 7]];
        let mut det = Detector::new(&cfg("classes = [\"person\"]"), &out_spec, &names).unwrap();
        assert!(det.decode(&[yolov8(&rows)], &identity(100, 100)).unwrap().is_empty());

        let e = Detector::new(&cfg("classes = [\"persn\"]"), &out_spec, &names).unwrap_err();
        assert!(e.contains("`persn`") && e.contains("person, car, dog"), "{e}");
        let e = Detector::new(&cfg("class_thresholds = { cat = 0.5 }"), &out_spec, &names).unwrap_err();
        assert!(e.contains("class_thresholds") && e.contains("`cat`"), "{e}");
    }

    fn ssd_specs() -> Vec<TensorSpec> {
        vec![
            spec("detection_boxes", &[1, 4, 4]),
            spec("detection_classes", &[1, 4]),
            spec("detection_scores", &[1, 4]),
            spec("num_detections", &[1]),
        ]
    }

    fn ssd_outputs(count: f32) -> Vec<Tensor> {
        vec![
            // y1, x1, y2, x2 normalised
            Tensor::from_f32(
                vec![1, 4, 4],
                vec![
                    0.1, 0.2, 0.3, 0.4, // person
                    0.5, 0.5, 1.0, 1.0, // car
                    0.0, 0.0, 0.1, 0.1, // person, beyond the count
                    0.0, 0.0, 0.0, 0.0, // padding
                ],
            )
            .unwrap(),
            Tensor::from_f32(vec![1, 4], vec![1.0, 3.0, 1.0, 0.0]).unwrap(),
            Tensor::from_f32(vec![1, 4], vec![0.9, 0.8, 0.95, 0.0]).unwrap(),
            Tensor::from_f32(vec![1], vec![count]).unwrap(),
        ]
    }

    #[test]
    fn ssd_outputs_are_found_by_name_and_the_count_is_respected() {
        // TF OD API ids start at 1 with label 1 on the first line: class_offset = -1.
        let names = labels(&["person", "bicycle", "car"]);
        let mut det = Detector::new(&cfg("class_offset = -1"), &ssd_specs(), &names).unwrap();
        assert_eq!(det.format_name(), "ssd");
        let d = det.decode(&ssd_outputs(2.0), &identity(200, 100)).unwrap();
        assert_eq!(
            boxes(&d),
            vec![("person".to_string(), [40.0, 10.0, 80.0, 30.0]), ("car".to_string(), [100.0, 50.0, 200.0, 100.0])]
        );
        // Without the count, the third row (0.95) is reported too, first.
        let mut det = Detector::new(
            &cfg("class_offset = -1\nboxes_output = \"detection_boxes\"\nclasses_output = \"detection_classes\"\n\
                  scores_output = \"detection_scores\""),
            &ssd_specs()[..3],
            &names,
        )
        .unwrap();
        let d = det.decode(&ssd_outputs(2.0)[..3], &identity(200, 100)).unwrap();
        assert_eq!(d.iter().map(|d| d.score).collect::<Vec<_>>(), [0.95, 0.9, 0.8]);
    }

    #[test]
    fn ssd_in_tflite_order_with_pixel_xyxy_boxes() {
        let specs = vec![spec("a", &[1, 2, 4]), spec("b", &[1, 2]), spec("c", &[1, 2]), spec("d", &[1])];
        let mut det = Detector::new(
            &cfg("format = \"ssd\"\nbox_order = \"xyxy\"\nbox_units = \"pixels\""),
            &specs,
            &labels(&["a", "b"]),
        )
        .unwrap();
        let outs = vec![
            Tensor::from_f32(vec![1, 2, 4], vec![10.0, 20.0, 30.0, 40.0, 0.0, 0.0, 5.0, 5.0]).unwrap(),
            Tensor::from_f32(vec![1, 2], vec![1.0, 0.0]).unwrap(),
            Tensor::from_f32(vec![1, 2], vec![0.5, 0.1]).unwrap(),
            Tensor::from_f32(vec![1], vec![2.0]).unwrap(),
        ];
        let d = det.decode(&outs, &identity(100, 100)).unwrap();
        assert_eq!(boxes(&d), vec![("b".to_string(), [10.0, 20.0, 30.0, 40.0])]);

        // Two [1, N] outputs with no telling names, not in TFLite order: the error names them.
        let specs = vec![spec("x", &[1, 2]), spec("y", &[1, 2, 4]), spec("z", &[1, 2])];
        let e = Detector::new(&cfg("format = \"ssd\""), &specs, &[]).unwrap_err();
        assert!(e.contains("`x` [1, 2]") && e.contains("`y` [1, 2, 4]") && e.contains("scores_output"), "{e}");
    }

    #[test]
    fn layouts_that_cannot_be_told_apart_are_errors_naming_the_outputs() {
        let e = Detector::new(&cfg(""), &[spec("logits", &[1, 10])], &[]).unwrap_err();
        assert!(e.contains("`logits` [1, 10]"), "{e}");
        let e = Detector::new(&cfg(""), &[spec("a", &[1, 22, 2100]), spec("b", &[1, 9, 100])], &[]).unwrap_err();
        assert!(e.contains("`a`") && e.contains("`b`") && e.contains("postprocess.output"), "{e}");
        let e = Detector::new(&cfg(""), &[spec("out", &[1, 22, 2100])], &labels(&["a", "b"])).unwrap_err();
        assert!(e.contains("`out`") && e.contains("2 labels"), "{e}");
        let e = Detector::new(&cfg("format = \"yolov5\""), &[spec("out", &[1, 22, 2100])], &[]).unwrap_err();
        assert!(e.contains("[1, N, 5+C]"), "{e}");
        let e = Detector::new(&cfg("box_order = \"xyxy\""), &[spec("out", &[1, 22, 2100])], &[]).unwrap_err();
        assert!(e.contains("box_order"), "{e}");
        // Unambiguous: [1, 4+C, N] without labels is YOLOv8.
        let det = Detector::new(&cfg(""), &[spec("out", &[1, 22, 2100])], &[]).unwrap();
        assert_eq!((det.format_name(), det.label(17)), ("yolov8", "17".to_string()));
    }

    #[test]
    fn config_values_are_checked_and_named() {
        let check = |text: &str| toml::from_str::<DetectConfig>(text).unwrap().validate().map_err(|(k, _)| k);
        check("").unwrap();
        check("min_score = 0.5\niou_threshold = 0.5\nmax_detections = 10\nclass_thresholds = { person = 0.6 }")
            .unwrap();
        for (text, key) in [
            ("min_score = 1.5", "min_score"),
            ("iou_threshold = 0", "iou_threshold"),
            ("max_detections = 0", "max_detections"),
            ("class_thresholds = { person = -1 }", "class_thresholds.person"),
            ("classes = []", "classes"),
        ] {
            assert_eq!(check(text).unwrap_err(), key, "{text}");
        }
    }

    #[test]
    fn scratch_is_reused_between_frames() {
        let mut det = Detector::new(&cfg("min_score = 0.0"), &[spec("out", &[1, 22, 2100])], &[]).unwrap();
        let t = Tensor::from_f32(vec![1, 22, 2100], (0..22 * 2100).map(|i| (i % 97) as f32 / 97.0).collect()).unwrap();
        det.decode(std::slice::from_ref(&t), &identity(320, 320)).unwrap();
        let caps = (det.scratch.best_score.capacity(), det.scratch.candidates.capacity());
        let ptr = det.scratch.candidates.as_ptr();
        det.decode(std::slice::from_ref(&t), &identity(320, 320)).unwrap();
        assert_eq!((det.scratch.best_score.capacity(), det.scratch.candidates.capacity()), caps);
        assert_eq!(det.scratch.candidates.as_ptr(), ptr);
    }
}
