//! Detection snapshots: the frame with its boxes drawn, as a JPEG, at a
//! bounded rate (what Frigate users expect on `.../snapshot`).

use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};

use super::config::{SnapshotConfig, SnapshotWhen};
use crate::message::Detection;

/// Box colours, picked by class index so one class keeps its colour.
pub const PALETTE: [[u8; 3]; 8] = [
    [255, 56, 56],
    [56, 200, 56],
    [56, 120, 255],
    [255, 190, 0],
    [200, 56, 255],
    [0, 210, 210],
    [255, 120, 180],
    [255, 255, 255],
];

/// Decides when a pipeline takes a snapshot and renders it.
#[derive(Debug)]
pub struct Snapshotter {
    cfg: SnapshotConfig,
    last: Option<Instant>,
}

impl Snapshotter {
    /// A snapshotter for one pipeline.
    pub fn new(cfg: SnapshotConfig) -> Self {
        Snapshotter { cfg, last: None }
    }

    /// The settings.
    pub fn config(&self) -> &SnapshotConfig {
        &self.cfg
    }

    /// True (and the rate limit is armed) if a result with these detections
    /// arriving at `now` should get a snapshot.
    pub fn due(&mut self, detections: &[Detection], now: Instant) -> bool {
        if self.cfg.when == SnapshotWhen::Detection && detections.is_empty() {
            return false;
        }
        if self.last.is_some_and(|t| now.duration_since(t) < Duration::from_secs_f64(self.cfg.min_interval_s)) {
            return false;
        }
        self.last = Some(now);
        true
    }

    /// The frame with boxes drawn, scaled down to `max_width`, as a JPEG.
    pub fn render(&self, frame: &RgbImage, detections: &[Detection]) -> Result<Vec<u8>, String> {
        let mut img = if frame.width() > self.cfg.max_width {
            let h = (frame.height() as u64 * self.cfg.max_width as u64 / frame.width() as u64).max(1) as u32;
            image::imageops::resize(frame, self.cfg.max_width, h, image::imageops::FilterType::Triangle)
        } else {
            frame.clone()
        };
        let k = img.width() as f64 / frame.width() as f64;
        let thickness = (img.width().max(img.height()) / 320).clamp(1, 4);
        for d in detections {
            let b = &d.bbox;
            draw_rect(&mut img, [b.x1 * k, b.y1 * k, b.x2 * k, b.y2 * k], PALETTE[d.index % PALETTE.len()], thickness);
        }
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, self.cfg.quality)
            .encode_image(&img)
            .map_err(|e| format!("snapshot JPEG: {e}"))?;
        Ok(out)
    }
}

/// Draws a hollow rectangle, clipped to the image.
pub fn draw_rect(img: &mut RgbImage, [x1, y1, x2, y2]: [f64; 4], colour: [u8; 3], thickness: u32) {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return;
    }
    let clamp_x = |v: f64| (v.round().max(0.0) as u32).min(w - 1);
    let clamp_y = |v: f64| (v.round().max(0.0) as u32).min(h - 1);
    let (x1, x2) = (clamp_x(x1.min(x2)), clamp_x(x1.max(x2)));
    let (y1, y2) = (clamp_y(y1.min(y2)), clamp_y(y1.max(y2)));
    let px = Rgb(colour);
    for t in 0..thickness {
        let (top, bottom) = (y1.saturating_add(t).min(y2), y2.saturating_sub(t).max(y1));
        let (left, right) = (x1.saturating_add(t).min(x2), x2.saturating_sub(t).max(x1));
        for x in x1..=x2 {
            img.put_pixel(x, top, px);
            img.put_pixel(x, bottom, px);
        }
        for y in y1..=y2 {
            img.put_pixel(left, y, px);
            img.put_pixel(right, y, px);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::BoundingBox;

    fn det(index: usize, b: [f64; 4]) -> Detection {
        Detection {
            label: format!("c{index}"),
            index,
            score: 0.9,
            bbox: BoundingBox { x1: b[0], y1: b[1], x2: b[2], y2: b[3] },
        }
    }

    fn cfg(toml_text: &str) -> SnapshotConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn rectangle_edges_are_drawn_and_clipped() {
        let mut img = RgbImage::new(20, 10);
        draw_rect(&mut img, [2.0, 3.0, 30.0, 8.0], [255, 0, 0], 1);
        assert_eq!(img.get_pixel(2, 3).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(19, 5).0, [255, 0, 0], "right edge clipped to the image");
        assert_eq!(img.get_pixel(10, 8).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(10, 5).0, [0, 0, 0], "inside stays untouched");
        assert_eq!(img.get_pixel(1, 3).0, [0, 0, 0]);
    }

    #[test]
    fn snapshots_need_detections_and_respect_the_interval() {
        let mut s = Snapshotter::new(cfg("min_interval_s = 2.0"));
        let t0 = Instant::now();
        assert!(!s.due(&[], t0), "nothing detected: no snapshot");
        let d = [det(0, [1.0, 1.0, 5.0, 5.0])];
        assert!(s.due(&d, t0));
        assert!(!s.due(&d, t0 + Duration::from_secs(1)));
        assert!(s.due(&d, t0 + Duration::from_secs(3)));
        let mut every = Snapshotter::new(cfg("when = \"every\"\nmin_interval_s = 0"));
        assert!(every.due(&[], t0) && every.due(&[], t0));
    }

    #[test]
    fn render_scales_down_and_draws_boxes_in_scaled_pixels() {
        let s = Snapshotter::new(cfg("max_width = 100\nquality = 95"));
        let frame = RgbImage::from_pixel(400, 200, Rgb([0, 0, 0]));
        let jpeg = s.render(&frame, &[det(2, [100.0, 40.0, 300.0, 160.0])]).unwrap();
        let back = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (100, 50));
        // The box edge at x = 25 (100 / 4) is blue-ish; the centre stays dark.
        let edge = back.get_pixel(25, 25).0;
        assert!(edge[2] > 150 && edge[0] < 150, "{edge:?}");
        assert!(back.get_pixel(50, 25).0.iter().all(|&c| c < 40));
    }
}
