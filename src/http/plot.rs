//! What the status page draws, as SVG made here: the latency history of a
//! pipeline (p50 and p99 per stage over the last ten minutes) and the newest
//! camera frame with its detections. SVG keeps the labels as text the
//! browser renders, so no font is compiled in.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use base64::Engine as _;
use heapless::HistoryBuf;
use image::RgbImage;
use serde_json::{json, Value};

use crate::message::ResultMsg;
use crate::metrics::PipelineMetrics;
use crate::postprocess::snapshot::PALETTE;

/// How often a point is added to the history.
pub const STEP: Duration = Duration::from_secs(2);
/// Points kept: ten minutes.
pub const POINTS: usize = 300;
/// Stage names in the order of `Latencies::stages`, with their plot colours.
const STAGES: [(&str, &str); 4] =
    [("preprocess", "#8e6c8a"), ("inference", "#e4572e"), ("postprocess", "#5b9a2f"), ("total", "#2e86ab")];
/// Widest frame the camera view embeds (wider ones are scaled down: the page is a monitor, not a recorder).
pub const VIEW_MAX_WIDTH: u32 = 640;

/// One step of the history.
#[derive(Debug, Clone, Copy)]
struct Point {
    at: Instant,
    /// Inferences in this step, and its length.
    inferences: u64,
    seconds: f64,
    /// p50 and p99 (ms) of each stage's samples in this step; None when it had none.
    stages: [Option<(f32, f32)>; 4],
}

/// A pipeline's latency history, sampled every [`STEP`] from its metrics.
pub struct History {
    points: HistoryBuf<Point, POINTS>,
    counts: [u64; 4],
    inferences: u64,
    last: Instant,
}

impl History {
    /// An empty history starting at `now`.
    pub fn new(now: Instant) -> Self {
        History { points: HistoryBuf::new(), counts: [0; 4], inferences: 0, last: now }
    }

    /// Adds the point for the samples recorded since the previous one.
    pub fn sample(&mut self, m: &PipelineMetrics, now: Instant) {
        let mut stages = [None; 4];
        if let Ok(l) = m.latency.lock() {
            for (i, (_, stage)) in l.stages().into_iter().enumerate() {
                let new = stage.count().saturating_sub(self.counts[i]);
                self.counts[i] = stage.count();
                if new > 0 {
                    stages[i] = stage.percentiles_of_last(new as usize).map(|(a, b)| (a as f32, b as f32));
                }
            }
        }
        let inferences = m.inferences.load(Relaxed);
        let seconds = now.duration_since(self.last).as_secs_f64();
        self.points.write(Point { at: now, inferences: inferences.saturating_sub(self.inferences), seconds, stages });
        self.inferences = inferences;
        self.last = now;
    }

    /// The newest figures: inferences per second over the last ten seconds, and the
    /// newest step's percentiles.
    pub fn recent_json(&self) -> Value {
        let newest: Vec<&Point> = self.points.oldest_ordered().rev().take(5).collect();
        let seconds: f64 = newest.iter().map(|p| p.seconds).sum();
        let inferences: u64 = newest.iter().map(|p| p.inferences).sum();
        let mut latency = serde_json::Map::new();
        for (i, (name, _)) in STAGES.iter().enumerate() {
            let v = newest
                .first()
                .and_then(|p| p.stages[i])
                .map(|(p50, p99)| json!({"p50": round3(p50), "p99": round3(p99)}))
                .unwrap_or(Value::Null);
            latency.insert(name.to_string(), v);
        }
        json!({
            "rate_per_s": if seconds > 0.0 { Some((inferences as f64 / seconds * 100.0).round() / 100.0) } else { None },
            "latency_ms": latency,
            "points": self.points.len(),
        })
    }
}

fn round3(ms: f32) -> f64 {
    (ms as f64 * 1000.0).round() / 1000.0
}

/// A round upper bound for the y axis whose quarters are round too (1, 2, 4, 6
/// or 8 times a power of ten).
fn nice_ceiling(v: f64) -> f64 {
    let v = v.max(0.001);
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 4.0, 6.0, 8.0, 10.0].iter().map(|m| m * p).find(|&c| c >= v * (1.0 - 1e-9)).unwrap_or(10.0 * p)
}

/// Milliseconds with few digits, for axis labels.
fn ms_label(v: f64) -> String {
    if v >= 10.0 || v == 0.0 {
        format!("{v:.0} ms")
    } else if v >= 1.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

/// The latency plot: for each stage its p50 (solid) and p99 (dashed) over the
/// last ten minutes, x in seconds before `now`.
pub fn latency_svg(h: &History, now: Instant) -> String {
    const W: f64 = 640.0;
    const H: f64 = 220.0;
    let (left, right, top, bottom) = (58.0, 10.0, 28.0, 22.0);
    let span = STEP.as_secs_f64() * POINTS as f64;
    let points: Vec<&Point> = h.points.oldest_ordered().collect();
    let max = points.iter().flat_map(|p| p.stages.iter().flatten().map(|s| s.1 as f64)).fold(0.0, f64::max);
    let ymax = nice_ceiling(max);
    let x = |at: Instant| left + (W - left - right) * (1.0 - now.duration_since(at).as_secs_f64() / span);
    let y = |ms: f64| top + (H - top - bottom) * (1.0 - ms / ymax);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="latency" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    for k in 0..=4 {
        let v = ymax * k as f64 / 4.0;
        let yy = y(v);
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end" fill="#555">{label}</text>"##,
            x2 = W - right,
            tx = left - 4.0,
            ty = yy + 4.0,
            label = ms_label(v)
        );
    }
    for (label, ago) in [("-10 min", span), ("-5 min", span / 2.0), ("now", 0.0)] {
        let xx = left + (W - left - right) * (1.0 - ago / span);
        let anchor = if ago == 0.0 { "end" } else { "middle" };
        let _ = write!(
            s,
            r##"<text x="{xx:.1}" y="{ty}" text-anchor="{anchor}" fill="#555">{label}</text>"##,
            ty = H - 6.0
        );
    }
    let mut lx = left;
    for (name, colour) in STAGES {
        let _ = write!(
            s,
            r#"<line x1="{lx}" x2="{x2}" y1="12" y2="12" stroke="{colour}" stroke-width="2"/><text x="{tx}" y="16">{name}</text>"#,
            x2 = lx + 16.0,
            tx = lx + 20.0
        );
        lx += 30.0 + 7.0 * name.len() as f64;
    }
    let _ = write!(
        s,
        r##"<text x="{tx}" y="16" text-anchor="end" fill="#555">solid p50, dashed p99</text>"##,
        tx = W - right
    );
    if points.is_empty() || max == 0.0 {
        let _ = write!(
            s,
            r##"<text x="{tx}" y="{ty}" text-anchor="middle" fill="#888">no inferences in the last 10 minutes</text>"##,
            tx = (left + W - right) / 2.0,
            ty = H / 2.0
        );
    }
    for (i, (name, colour)) in STAGES.iter().enumerate() {
        for (which, dash) in [("p50", ""), ("p99", r#" stroke-dasharray="4 3""#)] {
            let value = |p: &Point| p.stages[i].map(|(p50, p99)| if which == "p50" { p50 } else { p99 } as f64);
            // A step without samples (or a gap in sampling) breaks the line.
            let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
            let mut prev: Option<Instant> = None;
            for p in &points {
                let Some(v) = value(p) else {
                    prev = None;
                    continue;
                };
                let joined = prev.is_some_and(|t| p.at.duration_since(t) < STEP.mul_f64(1.5));
                if !joined {
                    runs.push(Vec::new());
                }
                if let Some(run) = runs.last_mut() {
                    run.push((x(p.at), y(v)));
                }
                prev = Some(p.at);
            }
            for run in runs {
                if let [(cx, cy)] = run[..] {
                    let _ = write!(
                        s,
                        r#"<circle class="{which}" data-stage="{name}" cx="{cx:.1}" cy="{cy:.1}" r="2" fill="{colour}"/>"#
                    );
                } else {
                    let coords: Vec<String> = run.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
                    let _ = write!(
                        s,
                        r#"<polyline class="{which}" data-stage="{name}" fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{}"/>"#,
                        coords.join(" ")
                    );
                }
            }
        }
    }
    s.push_str("</svg>");
    s
}

/// Text safe inside SVG/XML.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The frame (scaled to at most [`VIEW_MAX_WIDTH`], embedded as JPEG) with
/// its result drawn over it: a box and a label per detection, or the top class.
/// Coordinates stay in the source image's pixels, as the results give them.
pub fn camera_view(frame: &RgbImage, result: &ResultMsg) -> Result<String, String> {
    let (w, h) = frame.dimensions();
    if w == 0 || h == 0 {
        return Err("empty frame".into());
    }
    let small;
    let shown = if w > VIEW_MAX_WIDTH {
        let sh = (h as u64 * VIEW_MAX_WIDTH as u64 / w as u64).max(1) as u32;
        small = image::imageops::resize(frame, VIEW_MAX_WIDTH, sh, image::imageops::FilterType::Triangle);
        &small
    } else {
        frame
    };
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80)
        .encode_image(shown)
        .map_err(|e| format!("camera view JPEG: {e}"))?;
    let data = base64::engine::general_purpose::STANDARD.encode(&jpeg);
    // About 16 px text and 2 px lines on the page, which shows the view between 320
    // and 760 px wide (in the frame's own units, the viewBox).
    let units_per_px = w as f64 / (w as f64).clamp(320.0, 760.0);
    let font = 16.0 * units_per_px;
    let stroke = 2.0 * units_per_px;
    let mut s = String::with_capacity(data.len() + 1024);
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="camera" data-seq="{seq}" viewBox="0 0 {w} {h}" style="max-width: {shown_w}px" font-family="sans-serif" font-size="{font:.1}"><image x="0" y="0" width="{w}" height="{h}" preserveAspectRatio="none" href="data:image/jpeg;base64,{data}"/>"#,
        seq = result.seq,
        // A small frame (a 64-pixel model input) is shown at least 320 pixels wide.
        shown_w = shown.width().max(320),
    );
    for d in result.result.detections.as_deref().unwrap_or(&[]) {
        let b = &d.bbox;
        let [r, g, bl] = PALETTE[d.index % PALETTE.len()];
        let (x1, y1) = (b.x1.min(b.x2), b.y1.min(b.y2));
        let (bw, bh) = ((b.x2 - b.x1).abs(), (b.y2 - b.y1).abs());
        let text = format!("{} {:.0}%", xml_escape(&d.label), d.score * 100.0);
        // The label sits above the box, or inside it at the top edge of the picture.
        let ty = if y1 > font * 1.2 { y1 - font * 0.3 } else { y1 + font };
        let _ = write!(
            s,
            r#"<g class="det" data-label="{label}"><rect x="{x1:.1}" y="{y1:.1}" width="{bw:.1}" height="{bh:.1}" fill="none" stroke="rgb({r},{g},{bl})" stroke-width="{stroke:.2}"/><text x="{x1:.1}" y="{ty:.1}" fill="rgb({r},{g},{bl})" stroke="black" stroke-width="{halo:.2}" paint-order="stroke">{text}</text></g>"#,
            label = xml_escape(&d.label),
            halo = font / 8.0,
        );
    }
    if let Some(top) = result.result.classes.as_ref().and_then(|c| c.first()) {
        let _ = write!(
            s,
            r#"<text class="top-class" x="{x:.1}" y="{y:.1}" fill="white" stroke="black" stroke-width="{halo:.2}" paint-order="stroke">{label} {score:.0}%</text>"#,
            x = font * 0.5,
            y = font * 1.2,
            halo = font / 8.0,
            label = xml_escape(&top.label),
            score = top.score * 100.0
        );
    }
    s.push_str("</svg>");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{BoundingBox, Detection, Latency, ResultBody};
    use std::sync::Arc;

    fn result(seq: u64, detections: Vec<Detection>) -> ResultMsg {
        ResultMsg {
            device: "d".into(),
            pipeline: "p".into(),
            model: "m".into(),
            model_sha256: "00".into(),
            seq,
            captured: std::time::SystemTime::now(),
            origin: None,
            latency: Latency::default(),
            result: ResultBody { detections: Some(detections), ..Default::default() },
        }
    }

    #[test]
    fn camera_view_embeds_the_frame_and_draws_escaped_labels_in_source_pixels() {
        let frame = RgbImage::from_pixel(1280, 720, image::Rgb([10, 200, 30]));
        let det = Detection {
            label: "cat <&> \"dog\"".into(),
            index: 2,
            score: 0.875,
            bbox: BoundingBox { x1: 100.0, y1: 200.0, x2: 300.0, y2: 500.0 },
        };
        let svg = camera_view(&frame, &result(7, vec![det])).unwrap();
        assert!(svg.contains(r#"data-seq="7""#) && svg.contains(r#"viewBox="0 0 1280 720""#), "{}", &svg[..200]);
        assert!(svg.contains(r#"<rect x="100.0" y="200.0" width="200.0" height="300.0""#));
        assert!(svg.contains("cat &lt;&amp;&gt; &quot;dog&quot; 88%"));
        assert!(svg.contains(&format!("rgb({},{},{})", PALETTE[2][0], PALETTE[2][1], PALETTE[2][2])));
        // The embedded JPEG is the frame scaled to the view's width, and decodes.
        let start = svg.find("base64,").unwrap() + 7;
        let end = start + svg[start..].find('"').unwrap();
        let jpeg = base64::engine::general_purpose::STANDARD.decode(&svg[start..end]).unwrap();
        let img = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (VIEW_MAX_WIDTH, 360));
        assert!(img.get_pixel(10, 10).0[1] > 150, "still green");
    }

    #[test]
    fn history_points_hold_the_percentiles_of_their_own_step() {
        let m = Arc::new(PipelineMetrics::new("p", "m", 1.0));
        let t0 = Instant::now();
        let mut h = History::new(t0);
        let record = |ms: &[f64]| {
            let mut l = m.latency.lock().unwrap();
            for &v in ms {
                l.inference.record(v);
                l.total.record(v * 2.0);
            }
            m.inferences.fetch_add(ms.len() as u64, Relaxed);
        };
        record(&[1.0; 10]);
        h.sample(&m, t0 + STEP);
        h.sample(&m, t0 + STEP * 2); // nothing in this step: a gap
        record(&[5.0; 4]);
        h.sample(&m, t0 + STEP * 3);
        let pts: Vec<&Point> = h.points.oldest_ordered().collect();
        assert_eq!(pts.len(), 3);
        assert_eq!(pts[0].stages[1], Some((1.0, 1.0)));
        assert_eq!(pts[1].stages[1], None);
        assert_eq!(pts[2].stages[1], Some((5.0, 5.0)), "only the new samples, not the older 1 ms ones");
        assert_eq!(pts[2].stages[3], Some((10.0, 10.0)));
        assert_eq!(pts[0].stages[0], None, "a stage never recorded stays empty");
        let recent = h.recent_json();
        assert_eq!(recent["rate_per_s"], 2.33, "14 inferences in 6 s");
        assert_eq!(recent["latency_ms"]["inference"]["p50"], 5.0);

        let svg = latency_svg(&h, t0 + STEP * 3);
        // The gap splits each line: two single points per series, drawn as dots.
        assert_eq!(svg.matches(r#"<circle class="p50" data-stage="inference""#).count(), 2, "{svg}");
        assert!(!svg.contains("<polyline"), "{svg}");
        assert!(svg.contains(">10 ms<"), "y axis up to the highest p99 (10 ms): {svg}");
        record(&[2.0; 3]);
        h.sample(&m, t0 + STEP * 4);
        let svg = latency_svg(&h, t0 + STEP * 4);
        assert_eq!(svg.matches(r#"<polyline class="p99" data-stage="total""#).count(), 1, "{svg}");
    }

    #[test]
    fn an_empty_history_says_so() {
        let t0 = Instant::now();
        let svg = latency_svg(&History::new(t0), t0);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("no inferences in the last 10 minutes"));
        assert_eq!(nice_ceiling(3.2), 4.0);
        assert_eq!(nice_ceiling(0.07), 0.08);
        assert_eq!(nice_ceiling(20.0), 20.0);
        assert_eq!(nice_ceiling(41.0), 60.0);
    }
}
